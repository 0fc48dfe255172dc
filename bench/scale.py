"""QIDO-RS at scale: a 1,000,000-instance (50,000-study) gateway index, queried over HTTP.

**The index** is written by the gateway's own write path, ``gateway.index.Index
.upsert_instance`` (the statements every C-STORE runs: patient/study/series/instance upserts,
counts, ModalitiesInStudy, outbox), in transactions of a few thousand instances, from records
generated here instead of parsed files; no blobs exist (QIDO never reads them). The publish
outbox is emptied at the end, as on an archive whose studies were published. No ``ANALYZE``
is run: the gateway never runs it, so the planner sees what a real index would give it.

Distributions (seeded, deterministic): patients hold 1 to 30 studies (geometric, mean ≈3.3);
study dates uniform over 2015-2024; modalities CR 30 %, CT 22 %, MR 15 %, US 15 %, DX 8 %,
MG 6 %, PT 2 %, NM 2 % with per-modality series and instance counts (a CR study: 1-3 series of
1-2 images; a CT: 2-6 series of 20-120; an MR: 4-10 series of 15-40 ...), 4 % of CT studies
with an extra SR series; instance counts scaled so the total is exactly 20 per study on
average. The index is cached under ``<cache>/scale-<key>/`` (key: spec, generator version and
the schema's DDL, so a schema change rebuilds it) and built once (≈4 min for 1M instances).

**The measure** starts the gateway with ``[index] url`` pointing at that file and times, like
:mod:`bench.qido`, ``/studies?PatientID=<id>`` (cycling over patients with several studies)
and ``/studies?StudyDate=<range>&ModalitiesInStudy=CT&limit=100`` over one month and over one
year (cycling over months/years). Goal: p95 < 50 ms. For each query the report also gives the
SQLite plan (``EXPLAIN QUERY PLAN`` of the SQL the gateway's engine builds) and the time of
that SQL alone, so a missed goal can be traced to the database or to the layers above it.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import sqlite3
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from bench.archive import LoadedTarget
from bench.dataset import build_once
from bench.qido import QueryCase, run_case
from bench.qrstats import Goal, LatencyRun, failures, latency_table, summarize_latency
from bench.report import md_table
from bench.targets import GatewayTarget, RunningTarget, TargetStartError

GENERATOR_VERSION = 1
GOAL = Goal("p95_below", 50.0)
INSTANCES_PER_STUDY = 20
BATCH_INSTANCES = 5000
"""Instances per write transaction while building."""
FIRST_DAY, DAYS = date(2015, 1, 1), 3652  # 2015-01-01 .. 2024-12-31

_MODALITIES = ("CR", "CT", "MR", "US", "DX", "MG", "PT", "NM")
_WEIGHTS = (0.30, 0.22, 0.15, 0.15, 0.08, 0.06, 0.02, 0.02)
#: modality -> (series low, series high, instances low, instances high), inclusive
_SHAPE = {"CR": (1, 3, 1, 2), "DX": (1, 2, 1, 3), "CT": (2, 6, 20, 120), "MR": (4, 10, 15, 40),
          "US": (1, 1, 5, 40), "MG": (1, 1, 4, 4), "PT": (3, 3, 50, 100), "NM": (2, 2, 1, 30)}
_SOP_CLASS = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1",
              "CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
              "US": "1.2.840.10008.5.1.4.1.1.6.1", "MG": "1.2.840.10008.5.1.4.1.1.1.2",
              "PT": "1.2.840.10008.5.1.4.1.1.128", "NM": "1.2.840.10008.5.1.4.1.1.20",
              "SR": "1.2.840.10008.5.1.4.1.1.88.22"}
_DESCRIPTION = {"CR": "CHEST PA", "DX": "HAND 2 VIEWS", "CT": "CT CHEST ABDOMEN",
                "MR": "MR BRAIN", "US": "US ABDOMEN", "MG": "SCREENING MAMMO",
                "PT": "PET CT WHOLE BODY", "NM": "BONE SCAN"}
_LAST = ["DOE", "SMITH", "GARCIA", "MULLER", "TANAKA", "KOWALSKI", "OKAFOR", "NGUYEN", "ROSSI",
         "DUBOIS", "SILVA", "KIM", "HANSEN", "KHAN", "BROWN"]
_FIRST = ["JOHN", "MARY", "AHMED", "LENA", "KENJI", "SOFIA", "OLU", "PRIYA", "IVAN", "CHLOE"]


@dataclass(frozen=True)
class ScaleSpec:
    """Size and seed of the scale index: ``studies`` x 20 instances on average."""

    studies: int
    seed: int = 20250202

    @property
    def instances(self) -> int:
        """Total instances (exactly 20 per study on average)."""
        return self.studies * INSTANCES_PER_STUDY


FULL_SCALE = ScaleSpec(studies=50_000)
"""1,000,000 instances, 50,000 studies."""


def scale_spec(studies: int) -> ScaleSpec:
    """The spec for ``studies`` studies (the command line's ``--scale-studies``)."""
    return ScaleSpec(studies=max(10, studies))


def _schema_ddl() -> str:
    """The gateway's SQLite DDL (tables and indexes), part of the cache key."""
    from sqlalchemy.dialects import sqlite as sqlite_dialect
    from sqlalchemy.schema import CreateIndex, CreateTable

    from gateway.index import metadata

    dialect = sqlite_dialect.dialect()
    parts = []
    for table in metadata.sorted_tables:
        parts.append(str(CreateTable(table).compile(dialect=dialect)))
        parts += [str(CreateIndex(ix).compile(dialect=dialect))
                  for ix in sorted(table.indexes, key=lambda ix: str(ix.name))]
    return "\n".join(parts)


def cache_key(spec: ScaleSpec) -> str:
    """Short hash of the spec, the generator version and the gateway's schema."""
    payload = json.dumps({**asdict(spec), "v": GENERATOR_VERSION, "ddl": _schema_ddl()},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclass
class _Study:
    patient: int
    day: int
    modality: str
    series: list[tuple[str, int]]  # (modality, instances)


def _plan(spec: ScaleSpec) -> list[_Study]:
    """Every study's patient, date, modality and series sizes (deterministic)."""
    rng = np.random.default_rng(spec.seed)
    n = spec.studies
    per_patient = np.minimum(rng.geometric(0.3, size=n), 30)
    owners = np.repeat(np.arange(n), per_patient)[:n]
    rng.shuffle(owners)  # a patient's studies are spread over the years, not adjacent
    days = rng.integers(0, DAYS, size=n)
    modalities = rng.choice(len(_MODALITIES), size=n, p=_WEIGHTS)
    studies = []
    for i in range(n):
        modality = _MODALITIES[int(modalities[i])]
        s_lo, s_hi, i_lo, i_hi = _SHAPE[modality]
        series = [(modality, int(rng.integers(i_lo, i_hi + 1)))
                  for _ in range(int(rng.integers(s_lo, s_hi + 1)))]
        if modality == "CT" and rng.random() < 0.04:
            series.append(("SR", 1))
        studies.append(_Study(int(owners[i]), int(days[i]), modality, series))
    _rescale(studies, spec.instances)
    return studies


def _rescale(studies: list[_Study], total: int) -> None:
    """Scale the image series' instance counts so all series together hold exactly ``total``."""
    current = sum(c for st in studies for _m, c in st.series)
    factor = total / current
    for st in studies:
        st.series = [(m, c if m == "SR" else max(1, round(c * factor))) for m, c in st.series]
    diff = total - sum(c for st in studies for _m, c in st.series)
    big = sorted(((c, i, j) for i, st in enumerate(studies) for j, (m, c) in enumerate(st.series)
                  if m != "SR"), reverse=True)
    k = 0
    while diff != 0:
        _c, i, j = big[k % len(big)]
        m, c = studies[i].series[j]
        step = 1 if diff > 0 else -1
        if c + step >= 1:
            studies[i].series[j] = (m, c + step)
            diff -= step
        k += 1


def _uid(kind: int, seed: int, *numbers: int) -> str:
    """A deterministic ``2.25.<decimal>`` UID from a kind, the seed and indexes."""
    digest = hashlib.sha256(f"{kind}/{seed}/{'/'.join(map(str, numbers))}".encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:15], "big"))


def _patient(spec: ScaleSpec, number: int) -> dict[str, Any]:
    rng = np.random.default_rng([spec.seed, number])
    birth = date(1930, 1, 1) + timedelta(days=int(rng.integers(0, 365 * 90)))
    return {"PatientID": f"SC{number:07d}", "IssuerOfPatientID": "",
            "PatientName": f"{_LAST[int(rng.integers(len(_LAST)))]}^"
                           f"{_FIRST[int(rng.integers(len(_FIRST)))]}",
            "PatientBirthDate": birth.strftime("%Y%m%d"),
            "PatientSex": "F" if rng.integers(2) else "M"}


def _build(spec: ScaleSpec, path: Path) -> dict[str, Any]:
    """Write the index at ``path`` with the gateway's write path; return the manifest."""
    from gateway.index import Index
    from gateway.records import InstanceRecord

    t0 = time.perf_counter()
    studies = _plan(spec)
    index = Index(f"sqlite:///{path}")
    index.create_schema()
    patients: dict[int, dict[str, Any]] = {}
    written = 0
    pending: list[InstanceRecord] = []

    def flush() -> None:
        with index.write() as conn:
            for n, record in enumerate(pending):
                index.upsert_instance(conn, record, blob_key=f"scale/{written + n}.dcm",
                                      blob_size=524_288, source="bench-scale")

    for number, st in enumerate(studies):
        patient = patients.get(st.patient)
        if patient is None:
            patient = patients[st.patient] = _patient(spec, st.patient)
        day = FIRST_DAY + timedelta(days=st.day)
        study_uid = _uid(1, spec.seed, number)
        study_attrs = {"StudyDate": day.strftime("%Y%m%d"),
                       "StudyTime": f"{8 + number % 10:02d}{number % 60:02d}00",
                       "AccessionNumber": f"SA{number:08d}", "StudyID": str(number % 10000),
                       "StudyDescription": _DESCRIPTION[st.modality],
                       "ReferringPhysicianName": "WELBY^MARCUS"}
        for s, (modality, count) in enumerate(st.series):
            series_uid = _uid(2, spec.seed, number, s)
            series_attrs = {"Modality": modality, "SeriesNumber": s + 1,
                            "SeriesDescription": f"{modality} SERIES {s + 1}",
                            "SeriesDate": study_attrs["StudyDate"],
                            "InstitutionName": "BENCH GENERAL HOSPITAL",
                            "StationName": f"{modality}01", "Manufacturer": "BENCH"}
            for i in range(count):
                image = modality != "SR"
                pending.append(InstanceRecord(
                    study_uid=study_uid, series_uid=series_uid,
                    sop_uid=_uid(3, spec.seed, number, s, i),
                    sop_class_uid=_SOP_CLASS[modality],
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    patient=patient, study=study_attrs, series=series_attrs,
                    instance={"InstanceNumber": i + 1, "Rows": 512 if image else None,
                              "Columns": 512 if image else None,
                              "BitsAllocated": 16 if image else None,
                              "ContentDate": study_attrs["StudyDate"]}))
                if len(pending) >= BATCH_INSTANCES:
                    flush()
                    written += len(pending)
                    pending.clear()
                    if written % 100_000 < BATCH_INSTANCES:
                        print(f"  scale index: {written} / {spec.instances} instances "
                              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
                              flush=True)
    if pending:
        flush()
        written += len(pending)
    with index.engine.connect() as conn:
        conn.exec_driver_sql("DELETE FROM outbox")
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    counts = index.counts()
    index.close()
    return _manifest(spec, studies, patients, counts, time.perf_counter() - t0)


def _manifest(spec: ScaleSpec, studies: list[_Study], patients: dict[int, dict[str, Any]],
              counts: dict[str, int], seconds: float) -> dict[str, Any]:
    """What the queries need to know (expected answers) and how the build went."""
    per_patient: dict[int, int] = {}
    for st in studies:
        per_patient[st.patient] = per_patient.get(st.patient, 0) + 1
    several = [p for p, n in sorted(per_patient.items()) if n >= 3] or sorted(per_patient)
    step = max(1, len(several) // 200)
    sample = [(patients[p]["PatientID"], per_patient[p]) for p in several[::step][:200]]
    ct_days = sorted(st.day for st in studies if any(m == "CT" for m, _c in st.series))
    months, years = [], []
    for y in range(2015, 2025):
        for m in range(1, 13):
            lo = date(y, m, 1)
            hi = (date(y + (m == 12), m % 12 + 1, 1) - timedelta(days=1))
            months.append(_range(lo, hi, ct_days))
        years.append(_range(date(y, 1, 1), date(y, 12, 31), ct_days))
    return {"spec": asdict(spec), "generator_version": GENERATOR_VERSION,
            "counts": counts, "build_seconds": round(seconds, 1),
            "modalities": {m: sum(1 for st in studies if st.modality == m) for m in _MODALITIES},
            "patients_sample": sample, "months": months, "years": years}


def _range(lo: date, hi: date, ct_days: list[int]) -> tuple[str, int]:
    """(``lo-hi`` as a DICOM date range, CT studies in it)."""
    a, b = (lo - FIRST_DAY).days, (hi - FIRST_DAY).days
    n = bisect.bisect_right(ct_days, b) - bisect.bisect_left(ct_days, a)
    return f"{lo:%Y%m%d}-{hi:%Y%m%d}", n


def ensure_index(spec: ScaleSpec, cache: Path) -> tuple[Path, dict[str, Any]]:
    """The cached index for ``spec`` (building it first if needed) and its manifest."""
    root = cache / f"scale-{cache_key(spec)}"

    def build(tmp: Path) -> dict[str, Any]:
        print(f"scale: building a {spec.instances}-instance index (once; cached in {root})",
              file=sys.stderr, flush=True)
        return _build(spec, tmp / "index.sqlite")

    return root / "index.sqlite", build_once(root, build)


def cases(manifest: dict[str, Any]) -> list[QueryCase]:
    """The query cases over the scale index, with expected answer sizes (limit 100)."""
    return [
        QueryCase("patient", "`/studies?PatientID={id}` (patients with ≥ 3 studies)",
                  tuple((f"/studies?PatientID={pid}", n)
                        for pid, n in manifest["patients_sample"])),
        QueryCase("date_month_ct",
                  "`/studies?StudyDate={one month}&ModalitiesInStudy=CT&limit=100`",
                  tuple((f"/studies?StudyDate={r}&ModalitiesInStudy=CT&limit=100", min(n, 100))
                        for r, n in manifest["months"])),
        QueryCase("date_year_ct",
                  "`/studies?StudyDate={one year}&ModalitiesInStudy=CT&limit=100`",
                  tuple((f"/studies?StudyDate={r}&ModalitiesInStudy=CT&limit=100", min(n, 100))
                        for r, n in manifest["years"])),
    ]


def _sql_for(case: QueryCase) -> str:
    """The SQL the gateway's engine runs for the case's first request (literal values)."""
    from urllib.parse import parse_qsl, urlsplit

    from sqlalchemy.dialects import sqlite as sqlite_dialect

    from gateway.query import Query, compile_query, conditions_from_pairs

    url = urlsplit(case.requests[0][0])
    pairs = [(k, v.split(",") if k == "ModalitiesInStudy" else [v])
             for k, v in parse_qsl(url.query) if k != "limit"]
    limit = 100 if "limit=100" in url.query else 1000
    stmt, _python = compile_query(Query("STUDY", conditions_from_pairs(pairs), limit=limit),
                                  sqlite=True)
    stmt = stmt.limit(limit + 1)
    compiled = stmt.compile(dialect=sqlite_dialect.dialect(),
                            compile_kwargs={"literal_binds": True})
    return str(compiled)


def explain(path: Path, case: QueryCase, repeats: int = 15) -> dict[str, Any]:
    """``EXPLAIN QUERY PLAN`` and the median time of the case's SQL alone, on the index."""
    sql = _sql_for(case)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql)]
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            conn.execute(sql).fetchall()
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        conn.close()
    return {"sql": sql, "plan": plan, "sql_ms_median": statistics.median(times)}


class ScaleGatewayTarget(GatewayTarget):
    """The gateway serving a prepared index file instead of its own."""

    name = "gateway"

    def __init__(self, index_path: Path) -> None:
        self.extra_config = f'[index]\nurl = "sqlite:///{index_path}"\n'


def warm(path: Path) -> None:
    """Read the index file once, so the first run does not pay for disk reads."""
    with open(path, "rb") as fh:
        while fh.read(1 << 22):
            pass


def run(spec: ScaleSpec, cache: Path, runs: int, requests: int, *,
        available: bool = True) -> tuple[dict[str, Any], str]:
    """Build or reuse the index, run the cases ``runs`` times; return (raw, Markdown section)."""
    if not available:
        return {"error": "gateway not available"}, "## QIDO-RS at scale\n\nGateway not " \
                                                    "available: not measured.\n"
    path, manifest = ensure_index(spec, cache)
    warm(path)
    query_cases = cases(manifest)
    plans = {c.name: explain(path, c) for c in query_cases}
    target = ScaleGatewayTarget(path)
    rt = RunningTarget(target, cache / "runs")
    results: list[LatencyRun] = []
    error = None
    try:
        rt.start()
    except TargetStartError as exc:
        error = str(exc)
    if error is None:
        loaded = LoadedTarget(target, rt)
        try:
            for number in range(1, runs + 1):
                for case in query_cases:
                    res = run_case("scale", case, loaded, number, requests)
                    results.append(res)
                    state = (f"p50 {res.p50_ms:6.1f} ms p95 {res.p95_ms:6.1f} ms"
                             if res.status == "ok" else f"FAILED {res.error}")
                    print(f"  run {number} scale {case.name:16s} {state}", file=sys.stderr,
                          flush=True)
        finally:
            rt.stop()
            rt.cleanup()
    summaries = summarize_latency(results, GOAL)
    raw = {"manifest": {k: v for k, v in manifest.items() if k not in ("months", "years")},
           "index_path": str(path), "plans": plans, "error": error,
           "runs": [r.as_dict() for r in results], "summary": [s.as_dict() for s in summaries]}
    return raw, render_markdown(summaries, manifest, plans, query_cases, requests, runs, error)


def render_markdown(summaries: list[Any], manifest: dict[str, Any], plans: dict[str, Any],
                    query_cases: list[QueryCase], requests: int, runs: int,
                    error: str | None) -> str:
    """The scale section: figures, then each query's SQLite plan and SQL-only time."""
    counts = manifest["counts"]
    mods = ", ".join(f"{m} {n}" for m, n in manifest["modalities"].items())
    parts = [
        "## QIDO-RS at scale (gateway, SQLite)",
        "",
        f"Index of {counts['instances']:,} instances, {counts['series']:,} series, "
        f"{counts['studies']:,} studies, {counts['patients']:,} patients (studies by "
        f"modality: {mods}; dates 2015-2024), written by the gateway's write path "
        f"(`Index.upsert_instance`) in {manifest['build_seconds']:.0f} s and cached; "
        f"no `ANALYZE`. The gateway serves it over HTTP; {requests} requests per query and "
        f"run (after 3 unmeasured), {runs} run(s), p50/p95 per run, median (min-max). "
        f"Goal: {GOAL.describe()}.",
        "",
    ]
    if error:
        parts += [f"**The gateway did not start**: {error.splitlines()[0]}", ""]
    labels = {c.name: c.label for c in query_cases}
    parts.append(latency_table(summaries, labels, ratio=False))
    parts += ["", "Where the time goes (the SQL the engine builds for each query, run alone "
              "on the index with Python's sqlite3, median of 15):", ""]
    rows = []
    for case in query_cases:
        info = plans[case.name]
        rows.append([labels[case.name], f"{info['sql_ms_median']:.1f}",
                     "; ".join(f"`{step}`" for step in info["plan"])])
    parts.append(md_table(["query", "SQL alone ms", "SQLite plan"], rows))
    lines = failures(summaries)
    if lines:
        parts += ["", "Failed runs:", "", *lines]
    return "\n".join(parts) + "\n"
