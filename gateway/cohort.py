"""Cross queries: clinical criteria (a FHIR search) × imaging criteria (QIDO-style keys).

A cohort is a FHIR search relative to the FHIR base (any resource type:
``Patient?birthdate=le1980-11-21&_has:Condition:subject:code=…``, or
``Condition?code=…&onset-date=ge2024-01-01`` whose ``subject``/``patient`` references are
taken) plus imaging keys matched by the one query engine (``ModalitiesInStudy=CT``,
``StudyDate=20240101-``…). Evaluation (:meth:`Cohorts.evaluate`):

1. the FHIR search is checked first (``_summary=count``): a search the server rejects, or
   whose ``self`` link shows it ignored one of the parameters, is an error carrying the
   server's OperationOutcome, never an empty cohort;
2. every page of the result is read (``next`` links; only ``identifier`` or the subject
   references are asked for) and the FHIR Patients collected, with their identifiers;
3. FHIR patients become imaging studies two ways: the publish records (which study the
   publisher placed under which Patient) and the identity function
   (:func:`fhir_maps.patient_keys`, the same rule the publisher uses) from the Patients'
   identifiers to the index's (PatientID, IssuerOfPatientID) keys;
4. those studies are narrowed by the imaging keys through :func:`gateway.query.run`.

The members (study rows) are stored in ``cohort_member`` and reused for
``cohorts.cache_seconds``; after that the next use evaluates the cohort again. Everything
that answers for a cohort (QIDO-RS and WADO-RS under ``/cohorts/{id}/dicomweb``, C-FIND /
C-MOVE / C-GET addressed to its AE title, the exports) uses :meth:`Cohorts.scope`, an SQL
condition on ``study.id``: nothing outside the cohort is visible there.

Where an evaluation's time goes is collected for the ``Server-Timing`` header of the cohort
API (:mod:`gateway.timing`): ``fhir`` is the time spent waiting for the FHIR server (in
:class:`~gateway.fhir_client.FhirClient`), ``index`` the index work below (the publish-record
and identity look-ups, the imaging query, storing and counting the members).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from sqlalchemy import ColumnElement, delete, func, insert, select, update

from fhir_maps import MappingOptions, patient_keys
from gateway.errors import FhirError, FhirPermanentError, FhirTransientError, GatewayError
from gateway.fhir_client import FhirClient
from gateway.index import Index, cohort, cohort_member, patient, publication, study
from gateway.query import Query, QueryError, conditions_from_pairs, run
from gateway.timing import span

_RESOURCE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
#: Search parameters that shape the answer rather than select patients.
_RESULT_PARAMETERS = {"_count", "_elements", "_summary", "_sort", "_include", "_revinclude",
                      "_total", "_format", "_pretty"}


class CohortError(GatewayError):
    """A cohort that cannot be evaluated: ``status`` is the HTTP status to answer (400 bad
    definition or a search the FHIR server refused, 404 unknown cohort, 502/503 FHIR server
    trouble), ``outcome`` the FHIR server's OperationOutcome when there is one."""

    def __init__(self, message: str, *, status: int,
                 outcome: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.outcome = outcome


@dataclass(frozen=True)
class Definition:
    """What a cohort is: a name, a FHIR search and imaging keys (QIDO-RS style pairs)."""

    name: str
    fhir_query: str
    imaging: tuple[tuple[str, str], ...] = ()

    @property
    def resource_type(self) -> str:
        return self.fhir_query.split("?", 1)[0]

    @property
    def parameters(self) -> list[tuple[str, str]]:
        return parse_qsl(self.fhir_query.partition("?")[2], keep_blank_values=True)


@dataclass(frozen=True)
class Members:
    """The studies of a cohort (index row ids) and its member counts."""

    study_ids: frozenset[int]
    patients: int
    studies: int
    series: int
    instances: int


def parse_definition(body: Any) -> Definition:
    """A cohort definition from the API's JSON (``name``, ``fhir``, ``imaging``)."""
    if not isinstance(body, dict):
        raise CohortError("expected a JSON object with name, fhir and imaging", status=400)
    name = body.get("name")
    fhir_query = body.get("fhir")
    imaging = body.get("imaging") or {}
    if not isinstance(name, str) or not name.strip():
        raise CohortError("name: a non-empty string is required", status=400)
    if not isinstance(fhir_query, str):
        raise CohortError("fhir: a FHIR search such as \"Patient?birthdate=le1980\" is "
                          "required", status=400)
    if isinstance(imaging, dict):
        pairs = tuple((str(k), str(v)) for k, v in imaging.items())
    elif isinstance(imaging, list) and all(isinstance(p, list | tuple) and len(p) == 2
                                           for p in imaging):
        pairs = tuple((str(k), str(v)) for k, v in imaging)
    else:
        raise CohortError("imaging: an object of QIDO-RS keys and values", status=400)
    definition = Definition(name.strip(), fhir_query.strip().lstrip("/"), pairs)
    check_definition(definition)
    return definition


def check_definition(definition: Definition) -> None:
    if "?" not in definition.fhir_query or not _RESOURCE.match(definition.resource_type):
        raise CohortError(f"fhir: expected ResourceType?parameters, got "
                          f"{definition.fhir_query[:80]!r}", status=400)
    try:
        imaging_conditions(definition.imaging)
    except QueryError as exc:
        raise CohortError(f"imaging: {exc}", status=400) from exc


def imaging_conditions(pairs: Iterable[tuple[str, str]]) -> Any:
    """The imaging keys as engine conditions (UIDs and code strings may list values)."""
    return conditions_from_pairs(
        (key, value.replace("\\", ",").split(",") if key.endswith(("UID", "InStudy"))
         or key == "Modality" else [value]) for key, value in pairs)


class Cohorts:
    """Saved and ad hoc cohorts over one index and one FHIR server."""

    def __init__(self, index: Index, client: FhirClient | None, options: MappingOptions, *,
                 cache_seconds: float = 60.0, page_size: int = 500) -> None:
        self.index = index
        self.client = client
        self.options = options
        self.cache_seconds = cache_seconds
        self.page_size = page_size
        self._lock = threading.Lock()
        self._adhoc: dict[str, tuple[float, frozenset[int]]] = {}

    # -- saved cohorts ---------------------------------------------------------------------------
    def create(self, definition: Definition) -> int:
        """Save a cohort after evaluating it once (so a bad one is refused at once)."""
        check_definition(definition)
        study_ids = self._evaluate(definition)
        with span("index"), self.index.write() as conn:
            cohort_id = int(conn.execute(insert(cohort).values(
                name=definition.name, fhir_query=definition.fhir_query,
                imaging=[list(p) for p in definition.imaging], created_at=time.time(),
                evaluated_at=time.time()).returning(cohort.c.id)).scalar_one())
            self._store_members(conn, cohort_id, study_ids)
        return cohort_id

    def definition(self, cohort_id: int) -> Definition:
        with span("index"), self.index.engine.connect() as conn:
            row = conn.execute(select(cohort).where(cohort.c.id == cohort_id)).first()
        if row is None:
            raise CohortError(f"no cohort {cohort_id}", status=404)
        return Definition(row.name, row.fhir_query, tuple((k, v) for k, v in row.imaging))

    def ids(self) -> list[int]:
        with span("index"), self.index.engine.connect() as conn:
            return [int(r[0]) for r in conn.execute(select(cohort.c.id).order_by(cohort.c.id))]

    def delete(self, cohort_id: int) -> None:
        self.definition(cohort_id)
        with span("index"), self.index.write() as conn:
            conn.execute(delete(cohort_member).where(cohort_member.c.cohort_id == cohort_id))
            conn.execute(delete(cohort).where(cohort.c.id == cohort_id))

    def refresh(self, cohort_id: int, *, force: bool = False) -> None:
        """Evaluate the cohort again if its members are older than ``cache_seconds``.

        Every scoped request starts here: while the members are fresh it costs one look at
        the cohort's row."""
        with span("index"), self.index.engine.connect() as conn:
            row = conn.execute(select(cohort.c.evaluated_at).where(
                cohort.c.id == cohort_id)).first()
        if row is None:
            raise CohortError(f"no cohort {cohort_id}", status=404)
        evaluated = row[0]
        if not force and evaluated is not None and \
                time.time() - float(evaluated) < self.cache_seconds:
            return
        study_ids = self._evaluate(self.definition(cohort_id))
        with span("index"), self.index.write() as conn:
            conn.execute(delete(cohort_member).where(cohort_member.c.cohort_id == cohort_id))
            self._store_members(conn, cohort_id, study_ids)
            conn.execute(update(cohort).where(cohort.c.id == cohort_id).values(
                evaluated_at=time.time()))

    def scope(self, cohort_id: int) -> ColumnElement[bool]:
        """The SQL condition "the study belongs to this cohort" (members refreshed first)."""
        self.refresh(cohort_id)
        members = select(cohort_member.c.study_id).where(cohort_member.c.cohort_id == cohort_id)
        return study.c.id.in_(members)

    def adhoc_scope(self, fhir_query: str) -> ColumnElement[bool]:
        """The scope of an unsaved FHIR criterion (the QIDO-RS ``fhir-criteria`` extension),
        cached for ``cache_seconds`` by its text."""
        definition = Definition("ad hoc", fhir_query.strip().lstrip("/"))
        check_definition(definition)
        with self._lock:
            cached = self._adhoc.get(definition.fhir_query)
        if cached is None or time.time() - cached[0] >= self.cache_seconds:
            cached = (time.time(), self._evaluate(definition))
            with self._lock:
                self._adhoc[definition.fhir_query] = cached
        return study.c.id.in_(sorted(cached[1]) or [-1])

    def members(self, cohort_id: int) -> Members:
        scope = self.scope(cohort_id)
        with span("index"), self.index.engine.connect() as conn:
            row = conn.execute(select(
                func.count(func.distinct(study.c.patient_id)), func.count(study.c.id),
                func.coalesce(func.sum(study.c.NumberOfStudyRelatedSeries), 0),
                func.coalesce(func.sum(study.c.NumberOfStudyRelatedInstances), 0),
            ).where(scope)).one()
            ids = frozenset(int(r[0]) for r in conn.execute(select(study.c.id).where(scope)))
        return Members(ids, int(row[0]), int(row[1]), int(row[2]), int(row[3]))

    def export_rows(self, cohort_id: int, dicomweb_url: str) -> list[dict[str, Any]]:
        """Per member study: its UIDs and date, its DICOMweb URL, its FHIR references."""
        scope = self.scope(cohort_id)
        stmt = (select(study.c.StudyInstanceUID, study.c.StudyDate, study.c.ModalitiesInStudy,
                       study.c.StudyDescription, patient.c.PatientID,
                       patient.c.IssuerOfPatientID, publication.c.patient_reference,
                       publication.c.imaging_study_id)
                .select_from(study.join(patient).outerjoin(
                    publication,
                    publication.c.StudyInstanceUID == study.c.StudyInstanceUID))
                .where(scope).order_by(study.c.StudyDate, study.c.StudyInstanceUID))
        with self.index.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        return [{
            "StudyInstanceUID": r[0], "StudyDate": r[1], "ModalitiesInStudy": r[2],
            "StudyDescription": r[3], "PatientID": r[4], "IssuerOfPatientID": r[5],
            "dicomweb": f"{dicomweb_url}/studies/{r[0]}",
            "Patient": r[6], "ImagingStudy": f"ImagingStudy/{r[7]}" if r[7] else None,
        } for r in rows]

    # -- evaluation ------------------------------------------------------------------------------
    def _store_members(self, conn: Any, cohort_id: int, study_ids: Iterable[int]) -> None:
        rows = [{"cohort_id": cohort_id, "study_id": i} for i in sorted(study_ids)]
        if rows:
            conn.execute(insert(cohort_member), rows)

    def _evaluate(self, definition: Definition) -> frozenset[int]:
        """The index ids of the studies in the cohort, evaluated now."""
        references, identifiers = self._fhir_patients(definition)
        candidates = self._studies_of(references, identifiers)
        if not candidates:
            return frozenset()
        query = Query("STUDY", imaging_conditions(definition.imaging),
                      scope=study.c.id.in_(sorted(candidates)))
        with span("index"):
            try:
                result = run(self.index, query)
            except QueryError as exc:
                raise CohortError(f"imaging: {exc}", status=400) from exc
            uids = [m["StudyInstanceUID"] for m in result.matches]
            with self.index.engine.connect() as conn:
                return frozenset(int(r[0]) for r in conn.execute(
                    select(study.c.id).where(study.c.StudyInstanceUID.in_(uids))))

    def _fhir_patients(self, definition: Definition
                       ) -> tuple[set[str], list[dict[str, Any]]]:
        """Patient references (``Patient/id``) the search selects, and their identifiers."""
        client = self._client()
        kind, params = definition.resource_type, definition.parameters
        try:
            self._check_search(client, kind, params)
            if kind == "Patient":
                patients = list(client.search_all(kind, params, elements=["identifier"],
                                                       count=self.page_size))
                return {f"Patient/{p['id']}" for p in patients}, patients
            references: set[str] = set()
            for resource in client.search_all(kind, params,
                                                   elements=["subject", "patient"],
                                                   count=self.page_size):
                for field in ("subject", "patient"):
                    ref = (resource.get(field) or {}).get("reference")
                    if isinstance(ref, str) and ref.startswith("Patient/"):
                        references.add(ref.split("/_history")[0])
            return references, self._identifiers_of(client, references)
        except FhirTransientError as exc:
            raise CohortError(f"the FHIR server is unavailable: {exc}", status=503,
                              outcome=exc.outcome) from exc
        except FhirPermanentError as exc:
            raise CohortError(f"the FHIR server refused the search: {exc}", status=400
                              if exc.status and 400 <= exc.status < 500 else 502,
                              outcome=exc.outcome) from exc
        except FhirError as exc:
            raise CohortError(f"FHIR search failed: {exc}", status=502) from exc

    def _client(self) -> FhirClient:
        if self.client is None:
            raise CohortError("cohorts need a FHIR server: set fhir.base_url", status=503)
        return self.client

    @staticmethod
    def _check_search(client: FhirClient, kind: str, params: Sequence[tuple[str, str]]) -> None:
        """Refuse a search the server would answer wrongly: rejected outright (4xx with an
        OperationOutcome), or run with some criterion silently dropped (its ``self`` link
        lacks a parameter that was sent), which would present a wider set as the cohort."""
        bundle = client.search(kind, [*params, ("_summary", "count")])
        self_link = next((link.get("url") for link in bundle.get("link") or []
                          if isinstance(link, dict) and link.get("relation") == "self"), None)
        if not isinstance(self_link, str):
            return
        echoed = {name.split(":")[0] for name, _ in parse_qsl(urlsplit(self_link).query)}
        sent = {name.split(":")[0] for name, _ in params} - _RESULT_PARAMETERS
        ignored = sorted(sent - echoed)
        if ignored:
            raise FhirPermanentError(
                f"the FHIR server ignored the search parameter(s) {', '.join(ignored)} "
                f"(not in its self link): the result would not be the cohort asked for",
                status=400)

    def _identifiers_of(self, client: FhirClient, references: set[str]
                        ) -> list[dict[str, Any]]:
        ids = sorted(r.split("/", 1)[1] for r in references)
        patients: list[dict[str, Any]] = []
        for start in range(0, len(ids), 100):
            chunk = ",".join(ids[start:start + 100])
            patients.extend(client.search_all("Patient", {"_id": chunk},
                                                   elements=["identifier"],
                                                   count=self.page_size))
        return patients

    def _studies_of(self, references: set[str], patients: list[dict[str, Any]]) -> set[int]:
        """Index study ids of these FHIR patients: by publish record and by identity."""
        found: set[int] = set()
        keys = patient_keys([i for p in patients for i in p.get("identifier") or []],
                            self.options.patient_systems)
        with span("index"), self.index.engine.connect() as conn:
            refs = sorted(references)
            for start in range(0, len(refs), 500):
                found.update(int(r[0]) for r in conn.execute(
                    select(study.c.id).join(publication, publication.c.StudyInstanceUID
                                            == study.c.StudyInstanceUID)
                    .where(publication.c.patient_reference.in_(refs[start:start + 500]))))
            by_issuer: dict[str, list[str]] = {}
            for key in keys:
                by_issuer.setdefault(key.issuer, []).append(key.patient_id)
            for issuer, patient_ids in by_issuer.items():
                for start in range(0, len(patient_ids), 500):
                    found.update(int(r[0]) for r in conn.execute(
                        select(study.c.id).join(patient).where(
                            patient.c.IssuerOfPatientID == issuer,
                            patient.c.PatientID.in_(patient_ids[start:start + 500]))))
        return found


def ae_title_of(prefix: str, cohort_id: int) -> str:
    """The DICOM AE title that addresses a cohort (at most 16 characters)."""
    return f"{prefix}{cohort_id}"[:16]


def cohort_of_ae_title(prefix: str, title: str) -> int | None:
    if title.startswith(prefix) and title[len(prefix):].isdigit():
        return int(title[len(prefix):])
    return None


__all__ = ["CohortError", "Cohorts", "Definition", "Members", "ae_title_of",
           "cohort_of_ae_title", "parse_definition"]
