"""The one query engine (gateway.query) against the matching rules of PS3.4 C.2.2.2.

A small archive with known attributes is stored through the real write path; each case is a
query and the studies/series it must find, with the clause of the standard it checks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.dialects import sqlite as sqlite_dialect

from gateway.bootstrap import Services, build_services
from gateway.config import load_settings
from gateway.index import SQLITE_CACHE_KIB, Index, study
from gateway.query import (
    Condition,
    Query,
    QueryError,
    compile_query,
    conditions_from_pairs,
    run,
)

from postgres import new_database
from samples import ARCHIVE, S1, S2, S3, SE_A, SE_B, SE_C, SE_D, synthetic_instance


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def services(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Services]:
    """The archive, indexed in SQLite and (second round) in a real PostgreSQL."""
    root = tmp_path_factory.mktemp("query")
    overrides: dict[str, dict[str, object]] = {"storage": {"path": str(root / "data")}}
    if request.param == "postgresql":
        server = request.getfixturevalue("postgres_server")
        url = new_database(server)
        overrides["index"] = {"url": url}
    settings = load_settings(environ={}, overrides=overrides)
    built = build_services(settings)
    for attributes in ARCHIVE:
        built.ingest.store_file(synthetic_instance(root, **attributes), move=True,
                                source="test")
    yield built
    built.close()


def find(services: Services, level: str, *pairs: tuple[str, str], fuzzy: bool = False,
         limit: int | None = None, offset: int = 0) -> list[str]:
    """Unique keys of the matches of a query, ``pairs`` as QIDO-RS gives them."""
    conditions = conditions_from_pairs(
        (name, value.split(",") if "UID" in name or "InStudy" in name else [value])
        for name, value in pairs)
    result = run(services.index, Query(level, conditions, fuzzy=fuzzy, limit=limit,
                                       offset=offset))
    key = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
           "PATIENT": "PatientID", "IMAGE": "SOPInstanceUID"}[level]
    return sorted(m[key] for m in result.matches)


CASES = [
    # (clause, level, query, expected)
    ("C.2.2.2.1 single value is case-sensitive", "STUDY",
     [("StudyDescription", "CT CHEST")], [S1]),
    ("C.2.2.2.1 single value is case-sensitive", "STUDY",
     [("StudyDescription", "ct chest")], []),
    ("C.2.2.2.1 PN case-insensitive (as stated in the conformance statement)", "STUDY",
     [("PatientName", "doe^john")], [S1]),
    ("PS3.5 6.2.1.1 trailing empty PN components are insignificant", "STUDY",
     [("PatientName", "O'BRIEN^ANN")], [S3]),
    ("PS3.5 6.2.1.1 trailing empty PN components are insignificant", "STUDY",
     [("PatientName", "DOE^JOHN^^")], [S1]),
    ("C.2.2.2.2 list of UIDs", "STUDY", [("StudyInstanceUID", f"{S1},{S3}")], [S1, S3]),
    ("C.2.2.2.3 universal matching", "STUDY", [("PatientName", "")], [S1, S2, S3]),
    ("C.2.2.2.4 '*' alone is universal", "STUDY", [("StudyDescription", "*")], [S1, S2, S3]),
    ("C.2.2.2.4 wildcard *", "STUDY", [("PatientName", "Doe*")], [S1, S2]),
    ("C.2.2.2.4 wildcards stay case-sensitive", "STUDY", [("StudyDescription", "CT*")], [S1]),
    ("C.2.2.2.4 wildcard ?", "STUDY", [("StudyDescription", "?T CHEST")], [S1]),
    ("SQL's own wildcards are literal: _", "STUDY", [("AccessionNumber", "ACC_*")], [S2]),
    ("SQL's own wildcards are literal: %", "STUDY", [("AccessionNumber", "ACC%")], []),
    ("SQL's own wildcards are literal: %", "STUDY", [("AccessionNumber", "*%")], [S2]),
    ("GLOB's own brackets are literal", "STUDY", [("StudyDescription", "*[contrast]")], [S3]),
    ("C.2.2.2.5 date range a-", "STUDY", [("StudyDate", "20240101-")], [S1, S3]),
    ("C.2.2.2.5 date range -b", "STUDY", [("StudyDate", "-20231231")], [S2]),
    ("C.2.2.2.5 date range a-b", "STUDY", [("StudyDate", "20240101-20241231")], [S1]),
    ("C.2.2.2.1 single date", "STUDY", [("StudyDate", "20240315")], [S1]),
    ("C.2.2.2.5 time range, upper bound covers its minute", "STUDY",
     [("StudyTime", "-1015")], [S1, S3]),
    ("C.2.2.2.5 time range a-b", "STUDY", [("StudyTime", "0800-1000")], [S3]),
    ("a TM value names its whole minute", "STUDY", [("StudyTime", "1015")], [S1]),
    ("ModalitiesInStudy: a study with such a series", "STUDY",
     [("ModalitiesInStudy", "SR")], [S1]),
    ("ModalitiesInStudy: list of values", "STUDY",
     [("ModalitiesInStudy", "CT,MR")], [S1, S2, S3]),
    ("ModalitiesInStudy: wildcard", "STUDY", [("ModalitiesInStudy", "M?")], [S2]),
    ("ModalitiesInStudy in a series-level query: every series of such a study", "SERIES",
     [("ModalitiesInStudy", "SR")], [SE_A, SE_B]),
    ("SOPClassesInStudy in a series-level query", "SERIES",
     [("SOPClassesInStudy", "1.2.840.10008.5.1.4.1.1.7")], [SE_A, SE_B, SE_C, SE_D]),
    ("keys of higher levels in a lower-level query", "SERIES",
     [("PatientID", "P1"), ("Modality", "CT")], [SE_A]),
    ("series attribute", "SERIES", [("BodyPartExamined", "HEAD")], [SE_C]),
    ("IS value", "SERIES", [("SeriesNumber", "2")], [SE_B]),
    ("C.2.2.2.6 sequence matching", "SERIES",
     [("RequestAttributesSequence.ScheduledProcedureStepID", "SPS9")], [SE_C]),
    ("C.2.2.2.6 sequence matching with a wildcard", "SERIES",
     [("RequestAttributesSequence.ScheduledProcedureStepID", "SPS*")], [SE_C]),
    ("C.2.2.2.6 every key of the item must match", "SERIES",
     [("RequestAttributesSequence.ScheduledProcedureStepID", "SPS9"),
      ("RequestAttributesSequence.RequestedProcedureID", "RP2")], []),
    ("patient level", "PATIENT", [("PatientName", "DOE*")], ["P1", "P2"]),
    ("tags as 8 hex digits (PS3.18 8.3.4.1)", "STUDY", [("00100020", "P2")], [S2]),
]


@pytest.mark.parametrize(("clause", "level", "pairs", "expected"), CASES,
                         ids=[f"{c[0]}: {c[2]}" for c in CASES])
def test_matching_rule(services: Services, clause: str, level: str,
                       pairs: list[tuple[str, str]], expected: list[str]) -> None:
    assert find(services, level, *pairs) == sorted(expected), clause


def test_study_list_keys_match_in_an_instance_level_query(services: Services) -> None:
    """ModalitiesInStudy and SOPClassesInStudy are study attributes: in an instance-level
    query they select every instance of the studies they match (a series- or instance-level
    query used to fail with a SQL error, as a 500 on QIDO-RS)."""
    of_s2 = find(services, "IMAGE", ("StudyInstanceUID", S2))
    assert of_s2
    assert find(services, "IMAGE", ("StudyInstanceUID", S2), ("ModalitiesInStudy", "MR")) == of_s2
    assert find(services, "IMAGE", ("StudyInstanceUID", S2), ("ModalitiesInStudy", "CT")) == []
    assert find(services, "IMAGE", ("StudyInstanceUID", S2),
                ("SOPClassesInStudy", "1.2.840.10008.5.1.4.1.1.7")) == of_s2


FUZZY = [
    ("jo", [S1]),          # the start of a given name
    ("doe", [S1, S2]),     # the start of a family name, any case
    ("ja do", [S2]),       # every word must start some component
    ("bri", []),           # not the start of a component
]


@pytest.mark.parametrize(("value", "expected"), FUZZY)
def test_fuzzy_person_name_matching(services: Services, value: str,
                                    expected: list[str]) -> None:
    assert find(services, "STUDY", ("PatientName", value), fuzzy=True) == sorted(expected)


ERRORS = [
    ("STUDY", [("StudyDate", "2024*")], "wildcards are not allowed"),
    ("STUDY", [("StudyDate", "March")], "not a DA value"),
    ("STUDY", [("StudyInstanceUID", "abc")], "not a valid UID"),
    ("STUDY", [("Modality", "CT")], "series-level attribute"),
    ("STUDY", [("Foo", "x")], "not a DICOM attribute"),
    ("STUDY", [("PatientComments", "x")], "not supported"),
    ("SERIES", [("SeriesNumber", "two")], "not a number"),
    ("SERIES", [("SeriesNumber", "2147483648")], "outside the range of IS"),
    ("STUDY", [("StudyDate", "-")], "at least one bound"),
    ("STUDY", [("NumberOfPatientRelatedStudies", "3")], "returned but not matched"),
]


@pytest.mark.parametrize(("level", "pairs", "message"), ERRORS)
def test_a_query_it_cannot_run_is_an_error_not_an_empty_answer(
        services: Services, level: str, pairs: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(QueryError, match=message):
        find(services, level, *pairs)


def test_an_unsupported_return_key_is_reported_not_refused(services: Services) -> None:
    result = run(services.index, Query("STUDY", (Condition("PatientComments"),
                                                 Condition("PatientID", ("P1",)))))
    assert [m["StudyInstanceUID"] for m in result.matches] == [S1]
    assert result.unsupported == ["PatientComments"]


def test_limit_and_offset_page_through_a_stable_order(services: Services) -> None:
    first = run(services.index, Query("STUDY", limit=2))
    rest = run(services.index, Query("STUDY", limit=2, offset=2))
    assert first.more and not rest.more
    uids = [m["StudyInstanceUID"] for m in first.matches + rest.matches]
    assert sorted(uids) == [S1, S2, S3]


def test_patient_level_answers_carry_the_related_counts(services: Services) -> None:
    (p1,) = run(services.index, Query("PATIENT", (Condition("PatientID", ("P1",)),))).matches
    assert (p1["NumberOfPatientRelatedStudies"], p1["NumberOfPatientRelatedSeries"],
            p1["NumberOfPatientRelatedInstances"]) == (1, 2, 3)


def test_study_answers_carry_the_maintained_study_attributes(services: Services) -> None:
    (s1,) = run(services.index, Query("STUDY", (Condition("StudyInstanceUID", (S1,)),))).matches
    assert s1["ModalitiesInStudy"] == "CT\\SR"
    assert (s1["NumberOfStudyRelatedSeries"], s1["NumberOfStudyRelatedInstances"]) == (2, 3)
    assert s1["PatientName"] == "DOE^JOHN"


def test_a_scope_narrows_every_query_and_filters_what_an_identifying_key_finds(
        services: Services) -> None:
    """A cohort's scope (``study.id IN (members)``): the same answers whatever shape it takes;
    on SQLite, with an exact PatientID or UID, that key's index drives the search and the
    members only filter (without statistics SQLite would otherwise read every member)."""
    members = study.c.id.in_(select(study.c.id).where(study.c.StudyInstanceUID.in_([S1, S3])))
    queries = {
        (("PatientID", ("P1",)),): [S1],
        (("PatientID", ("P2",)),): [],
        (("StudyInstanceUID", (S1, S2)),): [S1],
        (("PatientID", ("P*",)),): [S1, S3],
        (): [S1, S3],
    }
    for pairs, expected in queries.items():
        query = Query("STUDY", conditions_from_pairs(pairs), scope=members)
        assert sorted(m["StudyInstanceUID"] for m in run(services.index, query).matches) \
            == expected, pairs
    if not services.index.is_sqlite:
        return

    def plan(*pairs: tuple[str, tuple[str, ...]]) -> list[str]:
        stmt, _ = compile_query(Query("STUDY", conditions_from_pairs(pairs), scope=members),
                                sqlite=True)
        sql = str(stmt.compile(dialect=sqlite_dialect.dialect(),
                               compile_kwargs={"literal_binds": True}))
        with services.index.engine.connect() as conn:
            return [row[3] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}")]

    assert plan(("PatientID", ("P1",)))[0].startswith("SEARCH patient USING INDEX")
    assert "USING INDEX sqlite_autoindex_study_1" in plan(("StudyInstanceUID", (S1,)))[0]
    # no identifying key: the members are the most selective thing, and drive
    assert plan(("PatientName", ("DOE*",)))[0] == "SEARCH study USING INTEGER PRIMARY KEY " \
        "(rowid=?)"


@given(st.text(alphabet="ab%_[]*?\\^ ", max_size=8))
def test_any_wildcard_value_matches_like_the_python_reference(value: str) -> None:
    """For every value, the SQL the engine builds agrees with a regular-expression reading of
    C.2.2.2.4 on a fixed set of strings (escaping of %, _, [ and \\ included)."""
    import re
    import sqlite3

    from gateway.query import _pattern, _wildcard_tokens

    candidates = ["ab", "a%b", "a_b", "[a]", "a\\b", "", "ba", "a b", "%", "_"]
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in value)
    expected = {c for c in candidates if re.fullmatch(regex, c, re.DOTALL)}
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (v TEXT)")
    db.executemany("INSERT INTO t VALUES (?)", [(c,) for c in candidates])
    pattern = _pattern(_wildcard_tokens(value), sqlite=True)
    got = {r[0] for r in db.execute("SELECT v FROM t WHERE v GLOB ?", (pattern,))}
    assert got == expected


def test_sqlite_connections_keep_a_page_cache_for_a_large_index(tmp_path: Path) -> None:
    """SQLite's 2 MiB default made a one-year query at 1M instances re-read its pages on
    every request (see ``gateway.index.SQLITE_CACHE_KIB``)."""
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    try:
        with index.engine.connect() as conn:
            size = conn.exec_driver_sql("PRAGMA cache_size").scalar()
    finally:
        index.close()
    assert size == -SQLITE_CACHE_KIB and SQLITE_CACHE_KIB >= 8192


@pytest.mark.parametrize("durable", [True, False])
def test_a_write_the_database_refuses_is_index_unavailable_and_leaves_it_usable(
        tmp_path: Path, durable: bool) -> None:
    """Another writer holds SQLite's write lock past the busy timeout: the write path's
    transaction (begun on the driver itself) fails as IndexUnavailable, which the store path
    answers 0xA700, and the connection it used works again afterwards."""
    import sqlite3

    from gateway.index import IndexUnavailable, index_state

    database = tmp_path / "index.sqlite"
    index = Index(f"sqlite:///{database}")
    index.create_schema()
    with index._connection() as conn:  # the connection the next write takes
        conn.connection.driver_connection.execute("PRAGMA busy_timeout=50")  # type: ignore
    blocker = sqlite3.connect(database, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(IndexUnavailable, match="locked"), index.write(durable=durable):
            pass
    finally:
        blocker.rollback()
        blocker.close()
    with index.write(durable=durable) as conn:
        conn.execute(index_state.update().values(running=1))
    with index.engine.connect() as conn:
        assert conn.execute(select(index_state.c.running)).scalar() == 1
    index.close()
