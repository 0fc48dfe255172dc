"""Cohort (cross) queries at scale: 1,000 FHIR patients against a 100,000-study index.

**The world.** The imaging side is the scale measure's index (:mod:`bench.scale`, built by the
gateway's own write path ``Index.upsert_instance``) for ``scale_spec(studies)``, copied to
``<cache>/cohort-<key>/index.sqlite``. The clinical side is a real FHIR server, sekmet-fhir
0.1.1 (``scripts/_env.sh install_sekmet``), seeded from the index with transaction Bundles and
cached beside it (``sekmet.db``):

* one Patient per index patient, with the site's MRN identifier (``system`` = the gateway's
  ``[publish] patient_system``, ``value`` = PatientID; the index's IssuerOfPatientID is empty,
  so the default system applies), a second identifier under a system the gateway does not
  know (ignored by the identity function), name, gender and birth date from the index;
* one or two background Conditions per patient (hypertension, diabetes … SNOMED CT coded);
* exactly ``members`` patients born on or before :data:`BORN_BY` with an *active* osteosarcoma
  (SNOMED CT 307576001) Condition, and half as many younger ones with a *resolved* one (so the
  birth-date criterion has work to do);
* an ImagingStudy for 90 % of the studies (the published ones), and for those the publish
  record the publisher keeps (``publication``: the study went under ``Patient/<id>`` as
  ``ImagingStudy/<id>``), written into the index copy in one transaction with the gateway's
  table definition (``Index.record_publication`` does the same one row per transaction).

FHIR Patients become imaging studies through **both** of the gateway's paths on every
evaluation: the publish records (for the 90 % published) and the identity function
(``fhir_maps.patient_keys`` on the Patients' identifiers → PatientID, for all). The identity
path alone finds every member; the publish records find nothing it would not, but they are
read (and timed) all the same. Both criteria, :data:`CRITERIA` ``patient_has``
(``Patient?birthdate=le1980-11-21&_has:Condition:subject:code=…``) and ``condition_subjects``
(``Condition?code=…&clinical-status=active``, whose subjects are then read as
``Patient?_id=…``), select exactly the ``members`` patients; the imaging keys
(:data:`IMAGING`) narrow their studies. Every answer is checked against the expected counts,
computed here from the index rows and the seed, not by the gateway.

**Evaluation** (goal: gateway time < 1 s). ``POST /api/cohorts`` with a criterion and the
imaging keys, then ``DELETE`` (untimed). ``POST`` always evaluates (``Cohorts.create``
evaluates before saving, whatever the cache), and with ``cohorts.cache_seconds`` =
:data:`CACHE_SECONDS` the counts in the same answer reuse those members: each ``POST`` is
exactly one cold evaluation (the cohort cache bypassed; the OS page cache and sekmet are warm,
after one unmeasured evaluation per criterion and run). The gateway's own ``Server-Timing``
header splits it: ``fhir`` (waiting for the FHIR server, measured around each HTTP exchange
in ``FhirClient``), ``index`` and ``total``; gateway time = ``total − fhir``. The client's
round trip is reported too. The cached figure is ``GET /api/cohorts/{id}`` within the cache
period (members and counts from ``cohort_member``, no FHIR request). Each invocation serves
the cached index itself (cohorts an interrupted run left there are deleted first) and a copy
of the seeded sekmet database.

**Scoped vs unscoped QIDO-RS** (goal: scoped ≤ 1.5 × unscoped). The same queries
(:func:`qido_cases`) against ``/dicomweb`` and ``/cohorts/{id}/dicomweb`` of a cohort made
with ``patient_has``, with :func:`bench.qido.run_case`; the order alternates between runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import scale, sekmet
from bench.archive import LoadedTarget
from bench.clients import HttpClient
from bench.dataset import build_once
from bench.qido import QueryCase, run_case
from bench.qrstats import Goal, LatencyRun, Summary, failures, summarize_latency
from bench.report import Stat, fmt_stat, md_table
from bench.targets import Endpoint, RunningTarget, Target, TargetStartError, http_json

GENERATOR_VERSION = 1
SEKMET_VERSION = "0.1.1"
PATIENT_SYSTEM = "urn:oid:2.16.840.1.113883.3.7777.1"
"""The site's MRN system: ``[publish] patient_system`` of the gateway under test."""
OTHER_SYSTEM = "urn:oid:2.16.840.1.113883.3.7777.9"
"""A second Patient identifier the gateway is not configured for (must be ignored)."""
SNOMED = "http://snomed.info/sct"
OSTEOSARCOMA = "307576001"
BORN_BY = "1980-11-21"
CRITERIA = {
    "patient_has": f"Patient?birthdate=le{BORN_BY}&_has:Condition:subject:code="
                   f"{SNOMED}|{OSTEOSARCOMA}",
    "condition_subjects": f"Condition?code={SNOMED}|{OSTEOSARCOMA}&clinical-status=active",
}
IMAGING = {"ModalitiesInStudy": "CT,MR", "StudyDate": "20180101-20241231"}
_IMAGING_MODALITIES = frozenset(IMAGING["ModalitiesInStudy"].split(","))
_IMAGING_FROM, _IMAGING_TO = IMAGING["StudyDate"].split("-")
CACHE_SECONDS = 600
"""``cohorts.cache_seconds`` of the gateway under test: longer than any run."""
GATEWAY_GOAL_MS = 1000.0
RATIO_GOAL = 1.5
PUBLISHED = 0.9
"""Share of studies with an ImagingStudy and a publish record."""
BUNDLE_ENTRIES = 1000
"""Entries per seeding transaction."""
_BACKGROUND = (("38341003", "Hypertensive disorder"), ("44054006", "Type 2 diabetes mellitus"),
               ("195967001", "Asthma"), ("13645005", "Chronic obstructive lung disease"),
               ("55822004", "Hyperlipidemia"), ("35489007", "Depressive disorder"))
_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
_DCM = "http://dicom.nema.org/resources/ontology/DCM"


@dataclass(frozen=True)
class CohortSpec:
    """The index size (studies, as in :func:`bench.scale.scale_spec`), the cohort's patients
    and the seed of the clinical world."""

    studies: int = 100_000
    members: int = 1_000
    seed: int = 20250303

    @property
    def scale(self) -> scale.ScaleSpec:
        """The index it is built on."""
        return scale.scale_spec(self.studies)


def cache_key(spec: CohortSpec) -> str:
    """Short hash of the spec, this generator, sekmet's version and the index's own key."""
    payload = json.dumps({**asdict(spec), "v": GENERATOR_VERSION, "sekmet": SEKMET_VERSION,
                          "index": scale.cache_key(spec.scale)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


# -- the FHIR server -------------------------------------------------------------------------
class SekmetTarget(Target):
    """sekmet-fhir over plain HTTP on loopback, no authentication, from a seeded database."""

    name = "sekmet"
    description = f"sekmet-fhir {SEKMET_VERSION} (FHIR R4, SQLite)"
    aet = "SEKMET"
    uses_http = True
    ready_timeout = 60.0

    def __init__(self, seeded: Path | None = None) -> None:
        self.seeded = seeded

    def unavailable_reason(self) -> str | None:
        return sekmet.missing_reason()

    def prepare(self, ep: Endpoint) -> None:
        data = ep.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        if self.seeded is not None:
            shutil.copyfile(self.seeded, data / "sekmet.db")
        settings = {  # YAML is a superset of JSON
            "base_url": self.base_url(ep), "host": "127.0.0.1", "port": ep.http_port,
            "data_dir": str(data), "own_private_key_path": str(ep.workdir / "own.pem"),
            "simulator": {"enabled": False}, "log_inbound": False,
            "server_auth": {"types": ["none"]},
        }
        (ep.workdir / "settings.yaml").write_text(json.dumps(settings))

    def command(self, ep: Endpoint) -> list[str]:
        return [str(sekmet.SEKMET_BIN), "serve", "-c", str(ep.workdir / "settings.yaml")]

    def env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("SEKMET_")}

    def is_ready(self, ep: Endpoint) -> bool:
        try:
            http_json(f"{self.base_url(ep)}/metadata")
        except (OSError, ValueError):
            return False
        return True

    @staticmethod
    def base_url(ep: Endpoint) -> str:
        """The FHIR base of the started server."""
        return f"http://127.0.0.1:{ep.http_port}/fhir"


class CohortGatewayTarget(scale.ScaleGatewayTarget):
    """The gateway on the cohort index, with sekmet as its FHIR server."""

    def __init__(self, index_path: Path, fhir_base: str) -> None:
        super().__init__(index_path)
        self.extra_config += (f'[fhir]\nbase_url = "{fhir_base}"\nauth = "none"\n'
                              f'[publish]\npatient_system = "{PATIENT_SYSTEM}"\n'
                              f"[cohorts]\ncache_seconds = {CACHE_SECONDS}\n")


# -- the world -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Study:
    uid: str
    date: str
    modalities: frozenset[str]
    patient_id: str

    @property
    def in_imaging(self) -> bool:
        """Whether the cohort's imaging keys (:data:`IMAGING`) select it."""
        return bool(self.modalities & _IMAGING_MODALITIES) and \
            _IMAGING_FROM <= self.date <= _IMAGING_TO


def _fhir_id(kind: str, seed: int, key: str) -> str:
    """An opaque, deterministic FHIR id (as an EMR's would be: not the MRN)."""
    return f"{kind}-{hashlib.sha256(f'{seed}/{kind}/{key}'.encode()).hexdigest()[:20]}"


def _read_index(path: Path) -> tuple[list[_Study], dict[str, dict[str, str]]]:
    """Every study and patient of the index, read with sqlite3 (not through the gateway)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT s.StudyInstanceUID, s.StudyDate, s.ModalitiesInStudy, p.PatientID, "
            "p.PatientName, p.PatientBirthDate, p.PatientSex FROM study s "
            "JOIN patient p ON p.id = s.patient_id ORDER BY s.id").fetchall()
    finally:
        conn.close()
    studies, patients = [], {}
    for uid, day, modalities, pid, name, birth, sex in rows:
        studies.append(_Study(uid, day, frozenset((modalities or "").split("\\")), pid))
        patients[pid] = {"name": name or "", "birth": birth, "sex": sex or ""}
    return studies, patients


@dataclass
class _Plan:
    """The clinical world: FHIR resources to seed and the publish records to write."""

    resources: list[list[dict[str, Any]]] = field(default_factory=list)
    """per patient: its Patient, Conditions and ImagingStudies"""
    publications: list[dict[str, Any]] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    """PatientIDs of the cohort (both criteria select exactly these)"""
    counts: dict[str, int] = field(default_factory=dict)


def _plan(spec: CohortSpec, studies: list[_Study],
          patients: dict[str, dict[str, str]]) -> _Plan:
    """Patients, Conditions and ImagingStudies for the index (deterministic from the seed)."""
    rng = np.random.default_rng(spec.seed)
    by_birth = sorted(patients)
    born_by = BORN_BY.replace("-", "")
    old = [p for p in by_birth if patients[p]["birth"] <= born_by]
    young = [p for p in by_birth if patients[p]["birth"] > born_by]
    if len(old) < spec.members:
        raise ValueError(f"the index has {len(old)} patients born by {BORN_BY}, fewer than "
                         f"the {spec.members} cohort members asked for: use more studies")
    members = sorted(str(p) for p in rng.choice(old, size=spec.members, replace=False))
    decoys = {str(p) for p in rng.choice(young, size=min(len(young), spec.members // 2),
                                         replace=False)} if young else set()
    member_set = set(members)
    of_patient: dict[str, list[_Study]] = {}
    for st in studies:
        of_patient.setdefault(st.patient_id, []).append(st)
    plan = _Plan(members=members)
    now = time.time()
    conditions = imaging_studies = 0
    for pid in by_birth:
        info = patients[pid]
        fid = _fhir_id("pt", spec.seed, pid)
        family, _, given = info["name"].partition("^")
        birth = info["birth"]
        entries: list[dict[str, Any]] = [{
            "resourceType": "Patient", "id": fid,
            "identifier": [{"system": PATIENT_SYSTEM, "value": pid},
                           {"system": OTHER_SYSTEM, "value": f"N{int(rng.integers(10**8))}"}],
            "name": [{"family": family.title(), "given": [given.title()]}],
            "gender": {"F": "female", "M": "male"}.get(info["sex"], "unknown"),
            "birthDate": f"{birth[:4]}-{birth[4:6]}-{birth[6:8]}"}]
        codes = [_BACKGROUND[int(i)] for i in rng.choice(
            len(_BACKGROUND), size=1 + int(rng.random() < 0.3), replace=False)]
        statuses = ["active"] * len(codes)
        if pid in member_set or pid in decoys:
            codes.append((OSTEOSARCOMA, "Osteosarcoma"))
            statuses.append("active" if pid in member_set else "resolved")
        for n, ((code, display), status) in enumerate(zip(codes, statuses, strict=True)):
            entries.append({
                "resourceType": "Condition", "id": _fhir_id("cd", spec.seed, f"{pid}/{n}"),
                "subject": {"reference": f"Patient/{fid}"},
                "clinicalStatus": {"coding": [{"system": _CLINICAL, "code": status}]},
                "code": {"coding": [{"system": SNOMED, "code": code, "display": display}]},
                "onsetDateTime": f"{2005 + int(rng.integers(19))}-0{1 + int(rng.integers(9))}"
                                 f"-1{int(rng.integers(10))}"})
            conditions += 1
        for st in of_patient.get(pid, []):
            if rng.random() >= PUBLISHED:
                continue
            isid = _fhir_id("is", spec.seed, st.uid)
            entries.append({
                "resourceType": "ImagingStudy", "id": isid, "status": "available",
                "subject": {"reference": f"Patient/{fid}"},
                "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{st.uid}"}],
                "started": f"{st.date[:4]}-{st.date[4:6]}-{st.date[6:8]}",
                "modality": [{"system": _DCM, "code": m} for m in sorted(st.modalities)]})
            plan.publications.append({"StudyInstanceUID": st.uid,
                                      "patient_reference": f"Patient/{fid}",
                                      "imaging_study_id": isid, "published_at": now})
            imaging_studies += 1
        plan.resources.append(entries)
    plan.counts = {"Patient": len(by_birth), "Condition": conditions,
                   "ImagingStudy": imaging_studies}
    return plan


def _seed_sekmet(plan: _Plan, workroot: Path) -> tuple[Path, float]:
    """Start an empty sekmet, PUT the plan's resources in transaction Bundles, stop it; the
    seeded database file and the seconds taken."""
    from gateway.fhir_client import FhirClient

    t0 = time.perf_counter()
    target = SekmetTarget()
    rt = RunningTarget(target, workroot)
    rt.start()
    try:
        base = target.base_url(rt.ep)
        with FhirClient(base, timeout=300) as client:
            entries: list[dict[str, Any]] = []
            for group in [*plan.resources, []]:
                if entries and (not group or len(entries) + len(group) > BUNDLE_ENTRIES):
                    client.transaction({"resourceType": "Bundle", "type": "transaction",
                                        "entry": entries})
                    entries = []
                entries += [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r,
                             "request": {"method": "PUT",
                                         "url": f"{r['resourceType']}/{r['id']}"}}
                            for r in group]
            found = client.search("Patient", {"_summary": "count"}).get("total")
            if found != plan.counts["Patient"]:
                raise RuntimeError(f"sekmet holds {found} Patients after seeding, expected "
                                   f"{plan.counts['Patient']}")
    finally:
        rt.stop()
    db = rt.ep.workdir / "data" / "sekmet.db"
    conn = sqlite3.connect(db)  # fold sekmet's write-ahead log into the one file kept
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return db, time.perf_counter() - t0


def _write_publications(index_path: Path, rows: list[dict[str, Any]]) -> None:
    """The publish records, in the gateway's ``publication`` table, one transaction."""
    from sqlalchemy import insert

    from gateway.index import Index, publication

    index = Index(f"sqlite:///{index_path}")
    try:
        with index.write() as conn:
            for start in range(0, len(rows), 5000):
                conn.execute(insert(publication), rows[start:start + 5000])
        with index.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        index.close()


def _expected(studies: list[_Study], members: list[str]) -> dict[str, Any]:
    """The cohort's expected counts and the QIDO-RS requests with their expected answers."""
    member_set = set(members)
    cohort = [st for st in studies if st.patient_id in member_set and st.in_imaging]
    per_patient: dict[str, tuple[int, int]] = {}
    for st in studies:
        if st.patient_id in member_set:
            n_all, n_in = per_patient.get(st.patient_id, (0, 0))
            per_patient[st.patient_id] = (n_all + 1, n_in + st.in_imaging)

    def both(match: Any) -> tuple[int, int]:
        return (sum(1 for st in studies if match(st)), sum(1 for st in cohort if match(st)))

    ct = both(lambda st: "CT" in st.modalities)
    years, months = [], []
    for year in range(int(_IMAGING_FROM[:4]), int(_IMAGING_TO[:4]) + 1):
        lo, hi = f"{year}0101", f"{year}1231"
        years.append((f"{lo}-{hi}", *both(lambda st, lo=lo, hi=hi: lo <= st.date <= hi)))
        for month in range(1, 13):
            prefix = f"{year}{month:02d}"
            months.append((f"{prefix}01-{prefix}31", *both(
                lambda st, p=prefix: st.date.startswith(p) and "CT" in st.modalities)))
    patients = [(pid, n_all, n_in) for pid, (n_all, n_in) in sorted(per_patient.items())
                if n_in > 0]
    step = max(1, len(patients) // 200)
    return {"studies": len(cohort), "patients": len({st.patient_id for st in cohort}),
            "ct": ct, "years": years, "months": months, "patients_sample": patients[::step][:200]}


def ensure_world(spec: CohortSpec, cache: Path) -> tuple[Path, Path, dict[str, Any]]:
    """The cohort's index copy, seeded sekmet database and manifest (built once, cached)."""
    scale_path, _scale_manifest = scale.ensure_index(spec.scale, cache)
    root = cache / f"cohort-{cache_key(spec)}"

    def build(tmp: Path) -> dict[str, Any]:
        print(f"cohort: seeding sekmet and publish records for {spec.studies} studies (once; "
              f"cached in {root})", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        shutil.copyfile(scale_path, tmp / "index.sqlite")
        studies, patients = _read_index(tmp / "index.sqlite")
        plan = _plan(spec, studies, patients)
        _write_publications(tmp / "index.sqlite", plan.publications)
        seeded, seed_s = _seed_sekmet(plan, tmp / "seeding")
        shutil.move(seeded, tmp / "sekmet.db")
        shutil.rmtree(tmp / "seeding")
        return {"spec": asdict(spec), "generator_version": GENERATOR_VERSION,
                "fhir_resources": plan.counts, "publications": len(plan.publications),
                "index_studies": len(studies), "index_patients": len(patients),
                "members": len(plan.members), "seed_seconds": round(seed_s, 1),
                "build_seconds": round(time.perf_counter() - t0, 1),
                "expected": _expected(studies, plan.members)}

    manifest = build_once(root, build)
    return root / "index.sqlite", root / "sekmet.db", manifest


def qido_cases(expected: dict[str, Any]) -> list[tuple[QueryCase, QueryCase]]:
    """(unscoped, scoped) query cases with their expected answer sizes (limit 100)."""
    def pair(name: str, label: str, rows: list[tuple[str, int, int]]) -> tuple[QueryCase,
                                                                                  QueryCase]:
        return (QueryCase(name, label, tuple((p, n) for p, n, _ in rows)),
                QueryCase(name, label, tuple((p, m) for p, _, m in rows)))

    ct_all, ct_in = expected["ct"]
    cases = [
        pair("modality_ct", "`/studies?ModalitiesInStudy=CT&limit=100`",
             [("/studies?ModalitiesInStudy=CT&limit=100", min(ct_all, 100), min(ct_in, 100))]),
        pair("date_year", "`/studies?StudyDate={one year}&limit=100`",
             [(f"/studies?StudyDate={r}&limit=100", min(a, 100), min(b, 100))
              for r, a, b in expected["years"]]),
        pair("date_month_ct", "`/studies?StudyDate={one month}&ModalitiesInStudy=CT&limit=100`",
             [(f"/studies?StudyDate={r}&ModalitiesInStudy=CT&limit=100", min(a, 100),
               min(b, 100)) for r, a, b in expected["months"]]),
    ]
    if expected["patients_sample"]:
        cases.insert(0, pair("patient", "`/studies?PatientID={member}`",
                             [(f"/studies?PatientID={pid}", a, b)
                              for pid, a, b in expected["patients_sample"]]))
    return cases


# -- the measure -----------------------------------------------------------------------------
@dataclass
class Evaluation:
    """One timed request of the cohort API: client round trip and the Server-Timing parts."""

    client_ms: float
    total_ms: float
    fhir_ms: float
    index_ms: float
    fhir_requests: int

    @property
    def gateway_ms(self) -> float:
        """The gateway's own time: everything but waiting for the FHIR server."""
        return self.total_ms - self.fhir_ms


@dataclass
class EvaluationRun:
    """Several evaluations of one criterion (or cached reads) in one run."""

    case: str
    run: int
    status: str = "failed"
    error: str | None = None
    evaluations: list[Evaluation] = field(default_factory=list)

    def median(self, figure: str) -> float | None:
        """The run's median of one :class:`Evaluation` figure, None unless ok."""
        if self.status != "ok" or not self.evaluations:
            return None
        return float(statistics.median(getattr(e, figure) for e in self.evaluations))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (each evaluation with its gateway time)."""
        return {"case": self.case, "run": self.run, "status": self.status, "error": self.error,
                "evaluations": [{**asdict(e), "gateway_ms": e.gateway_ms}
                                for e in self.evaluations]}


def parse_server_timing(value: str) -> dict[str, tuple[float, str]]:
    """``Server-Timing`` metrics: name → (ms, description)."""
    metrics = {}
    for part in value.split(","):
        name, *params = part.strip().split(";")
        values = dict(p.split("=", 1) for p in params if "=" in p)
        metrics[name] = (float(values.get("dur", "nan")), values.get("desc", "").strip('"'))
    return metrics


def _timed(client: HttpClient, method: str, path: str,
           body: dict[str, Any] | None = None) -> tuple[Evaluation, dict[str, Any]]:
    """One cohort API request: its figures and its JSON answer (raises on an error)."""
    data = None if body is None else json.dumps(body).encode()
    reply = client.request(method, path, body=data,
                           headers={"Content-Type": "application/json"} if data else {})
    if reply.status not in (200, 201):
        raise RuntimeError(f"{method} {path}: HTTP {reply.status}: {reply.body[:300]!r}")
    metrics = parse_server_timing(reply.headers.get("server-timing", ""))
    if "total" not in metrics:
        raise RuntimeError(f"{method} {path}: no Server-Timing total in the answer")
    fhir_ms, desc = metrics.get("fhir", (0.0, ""))
    requests = int(desc.split("(")[1].split()[0]) if "(" in desc else 0
    evaluation = Evaluation(reply.seconds * 1000, metrics["total"][0], fhir_ms,
                            metrics.get("index", (0.0, ""))[0], requests)
    answer: dict[str, Any] = json.loads(reply.body)
    return evaluation, answer


def _check_counts(answer: dict[str, Any], expected: dict[str, Any]) -> None:
    counts = answer.get("counts") or {}
    if (counts.get("studies"), counts.get("patients")) != (expected["studies"],
                                                           expected["patients"]):
        raise ValueError(f"cohort counts {counts}, expected {expected['studies']} studies of "
                         f"{expected['patients']} patients")


def _create(client: HttpClient, criterion: str,
            expected: dict[str, Any]) -> tuple[Evaluation, int]:
    """POST one cohort (a cold evaluation), checked; its figures and id."""
    evaluation, answer = _timed(client, "POST", "/api/cohorts", {
        "name": "bench", "fhir": criterion, "imaging": IMAGING})
    _check_counts(answer, expected)
    return evaluation, int(answer["id"])


def _delete(client: HttpClient, cohort_id: int) -> None:
    reply = client.request("DELETE", f"/api/cohorts/{cohort_id}")
    if reply.status != 204:
        raise RuntimeError(f"DELETE cohort {cohort_id}: HTTP {reply.status}")


def evaluate(client: HttpClient, case: str, run: int, evaluations: int,
             expected: dict[str, Any]) -> EvaluationRun:
    """One unmeasured, then ``evaluations`` timed cold evaluations of ``CRITERIA[case]``."""
    result = EvaluationRun(case, run)
    try:
        for n in range(evaluations + 1):
            timed, cohort_id = _create(client, CRITERIA[case], expected)
            _delete(client, cohort_id)
            if n:
                result.evaluations.append(timed)
        result.status = "ok"
    except Exception as exc:  # a wrong answer or a dead server: the run failed, say why
        result.error = f"{case}: {exc!r}"
    return result


def cached_reads(client: HttpClient, cohort_id: int, run: int, reads: int,
                 expected: dict[str, Any]) -> EvaluationRun:
    """``reads`` timed ``GET /api/cohorts/{id}`` within the cache period."""
    result = EvaluationRun("cached", run)
    try:
        for _ in range(reads):
            timed, answer = _timed(client, "GET", f"/api/cohorts/{cohort_id}")
            _check_counts(answer, expected)
            if timed.fhir_requests:
                raise RuntimeError("a cached read asked the FHIR server")
            result.evaluations.append(timed)
        result.status = "ok"
    except Exception as exc:
        result.error = f"cached: {exc!r}"
    return result


def _reset_cohorts(index_path: Path) -> None:
    """Forget cohorts a previous (interrupted) run left in the cached index."""
    conn = sqlite3.connect(index_path)
    try:
        conn.execute("DELETE FROM cohort_member")
        conn.execute("DELETE FROM cohort")
        conn.commit()
    finally:
        conn.close()


def _progress(line: str) -> None:
    print(f"  {line}", file=sys.stderr, flush=True)


def _measure(loaded: LoadedTarget, manifest: dict[str, Any], runs: int, evaluations: int,
             requests: int) -> tuple[list[EvaluationRun], list[LatencyRun]]:
    """Every run: the cold evaluations per criterion, cached reads, scoped/unscoped QIDO."""
    assert loaded.running is not None and loaded.running.ep.http_port is not None
    expected = manifest["expected"]
    evals: list[EvaluationRun] = []
    qido: list[LatencyRun] = []
    client = HttpClient(loaded.running.ep.http_port, timeout=600)
    try:
        for number in range(1, runs + 1):
            for case in CRITERIA:
                res = evaluate(client, case, number, evaluations, expected)
                evals.append(res)
                _progress(f"run {number} cohort {case:18s} " + (
                    f"gateway {res.median('gateway_ms'):7.1f} ms fhir "
                    f"{res.median('fhir_ms'):7.1f} ms" if res.status == "ok"
                    else f"FAILED {res.error}"))
            try:
                _timed_create, cohort_id = _create(client, CRITERIA["patient_has"], expected)
            except Exception as exc:
                evals.append(EvaluationRun("cached", number, error=f"create: {exc!r}"))
                continue
            evals.append(cached_reads(client, cohort_id, number, max(evaluations, 3),
                                      expected))
            scoped_root = f"/cohorts/{cohort_id}/dicomweb"
            for unscoped, scoped in qido_cases(expected):
                order = [("unscoped", unscoped, "/dicomweb"), ("scoped", scoped, scoped_root)]
                for target, query, root in order[::-1] if number % 2 == 0 else order:
                    lat = run_case("cohort", query, loaded, number, requests, root=root)
                    lat.target = target
                    qido.append(lat)
                    _progress(f"run {number} cohort {query.name:14s} {target:8s} " + (
                        f"p50 {lat.p50_ms:6.1f} ms p95 {lat.p95_ms:6.1f} ms"
                        if lat.status == "ok" else f"FAILED {lat.error}"))
            _delete(client, cohort_id)
    finally:
        client.close()
    return evals, qido


def run(spec: CohortSpec, cache: Path, runs: int, evaluations: int, requests: int, *,
        available: bool = True) -> tuple[dict[str, Any], str]:
    """Build or reuse the world, run the measure ``runs`` times; (raw, Markdown section)."""
    title = "## Cohort queries at scale"
    missing = SekmetTarget().unavailable_reason()
    if not available or missing:
        reason = missing or "gateway not available"
        return {"error": reason}, f"{title}\n\nNot measured: {reason}.\n"
    index_path, sekmet_db, manifest = ensure_world(spec, cache)
    _reset_cohorts(index_path)
    scale.warm(index_path)
    evals: list[EvaluationRun] = []
    qido: list[LatencyRun] = []
    error = None
    sekmet = RunningTarget(SekmetTarget(sekmet_db), cache / "runs")
    gateway: RunningTarget | None = None
    try:
        sekmet.start()
        target = CohortGatewayTarget(index_path, SekmetTarget.base_url(sekmet.ep))
        gateway = RunningTarget(target, cache / "runs")
        gateway.start()
        evals, qido = _measure(LoadedTarget(target, gateway), manifest, runs, evaluations,
                               requests)
    except TargetStartError as exc:
        error = str(exc)
    finally:
        for rt in (gateway, sekmet):  # the gateway first: it holds connections to sekmet
            if rt is not None:
                rt.stop()
                rt.cleanup()
    eval_summary = summarize_evaluations(evals)
    # Its verdicts concern a target named "gateway" (none here): ours are the ratios below.
    qido_summary = summarize_latency(qido, Goal("vs_reference"))
    ratios = scoped_ratios(qido_summary)
    raw = {"manifest": manifest, "index_path": str(index_path), "error": error,
           "imaging": IMAGING, "criteria": CRITERIA, "cache_seconds": CACHE_SECONDS,
           "evaluations": [r.as_dict() for r in evals], "evaluation_summary": eval_summary,
           "qido_runs": [r.as_dict() for r in qido],
           "qido_summary": [s.as_dict() for s in qido_summary], "qido_ratios": ratios}
    return raw, render_markdown(manifest, eval_summary, qido_summary, ratios, runs,
                                evaluations, requests, error)


# -- summaries and the report ----------------------------------------------------------------
_FIGURES = ("client_ms", "total_ms", "fhir_ms", "gateway_ms", "index_ms", "fhir_requests")


def summarize_evaluations(evals: list[EvaluationRun]) -> list[dict[str, Any]]:
    """Per case: min/median/max over runs of each run's median figures, and the verdict."""
    out = []
    for case in dict.fromkeys(r.case for r in evals):
        mine = [r for r in evals if r.case == case]
        ok = [r for r in mine if r.status == "ok"]
        stats = {f: Stat.of([r.median(f) for r in ok]) for f in _FIGURES}
        gateway = stats["gateway_ms"]
        verdict = "-" if case == "cached" else "**no figures**" if gateway is None else (
            "met" if gateway.median < GATEWAY_GOAL_MS else "**missed**")
        out.append({"case": case, "runs_ok": len(ok), "runs_total": len(mine),
                    "verdict": verdict, "errors": [r.error for r in mine if r.error],
                    **{f: s.as_dict() if s else None for f, s in stats.items()}})
    return out


def scoped_ratios(summaries: list[Summary]) -> list[dict[str, Any]]:
    """Per query: scoped / unscoped medians of p50 and p95, and the verdict (p50 ≤ 1.5×)."""
    out = []
    for case in dict.fromkeys(s.case for s in summaries):
        by = {s.target: s for s in summaries if s.case == case}
        u, s = by.get("unscoped"), by.get("scoped")
        p50 = p95 = None
        if u and s and u.main and s.main and u.second and s.second:
            p50 = s.main.median / u.main.median
            p95 = s.second.median / u.second.median
        verdict = "**no figures**" if p50 is None else (
            "met" if p50 <= RATIO_GOAL else "**missed**")
        out.append({"case": case, "p50_ratio": p50, "p95_ratio": p95, "verdict": verdict})
    return out


def _stat(entry: dict[str, Any], figure: str, digits: int = 0) -> str:
    value = entry.get(figure)
    return fmt_stat(Stat(**value) if value else None, digits)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render_markdown(manifest: dict[str, Any], evals: list[dict[str, Any]],
                    qido: list[Summary], ratios: list[dict[str, Any]], runs: int,
                    evaluations: int, requests: int, error: str | None) -> str:
    """The cohort section: the world, the evaluations, scoped vs unscoped QIDO-RS."""
    exp = manifest["expected"]
    res = manifest["fhir_resources"]
    parts = [
        "## Cohort queries at scale (gateway + sekmet-fhir)",
        "",
        f"Index of {manifest['index_studies']:,} studies of {manifest['index_patients']:,} "
        f"patients (the scale measure's generator, `Index.upsert_instance`), "
        f"{manifest['publications']:,} of them with publish records; sekmet-fhir "
        f"{SEKMET_VERSION} (HTTP on loopback, no auth) seeded with {res['Patient']:,} "
        f"Patients, {res['Condition']:,} Conditions and {res['ImagingStudy']:,} ImagingStudies "
        f"in transaction Bundles ({manifest['seed_seconds']:.0f} s, cached). Both criteria "
        f"select exactly {manifest['members']:,} patients; with the imaging keys "
        f"`{json.dumps(IMAGING)}` the cohort is {exp['studies']:,} studies of "
        f"{exp['patients']:,} patients, checked on every answer. FHIR patients map to "
        "studies by the publish records and by the identity function (PatientID from the "
        "MRN identifier).",
        "",
        f"**Evaluation** (`POST /api/cohorts`, each one cold: `create` always evaluates; "
        f"{evaluations} per criterion and run after 1 unmeasured, {runs} run(s); per run the "
        "median, shown as median (min-max) over runs). Times from the gateway's "
        "`Server-Timing` header: *total* is the request inside the gateway, *FHIR* the time "
        "spent waiting for sekmet's answers, *gateway* = total − FHIR (of which *index* is "
        "the index work); *client* is the HTTP round trip. *Cached* is `GET /api/cohorts/{id}` "
        f"within `cohorts.cache_seconds` ({CACHE_SECONDS} s): no FHIR request. "
        f"Goal: gateway < {GATEWAY_GOAL_MS / 1000:.0f} s.",
        "",
    ]
    if error:
        parts += [f"**Not measured**: {error.splitlines()[0]}", ""]
    labels = {"patient_has": f"`{CRITERIA['patient_has']}`",
              "condition_subjects": f"`{CRITERIA['condition_subjects']}`",
              "cached": "cached (`GET /api/cohorts/{id}`)"}
    rows = []
    for e in evals:
        runs_cell = f"{e['runs_ok']}/{e['runs_total']}"
        rows.append([labels.get(e["case"], e["case"]), _stat(e, "fhir_requests"),
                     _stat(e, "client_ms"), _stat(e, "total_ms"), _stat(e, "fhir_ms"),
                     _stat(e, "gateway_ms"), _stat(e, "index_ms"), e["verdict"],
                     runs_cell if e["runs_ok"] == e["runs_total"] else f"**{runs_cell}**"])
    parts.append(md_table(["criterion", "FHIR requests", "client ms", "total ms", "FHIR ms",
                           "gateway ms", "of which index ms", "goal", "runs ok"], rows))
    parts += [
        "",
        f"**Scoped vs unscoped QIDO-RS**: the same queries at `/dicomweb` and at "
        f"`/cohorts/{{id}}/dicomweb`, {requests} requests per query, target and run (after 3 "
        "unmeasured), order alternating between runs; p50/p95 per run, median (min-max) over "
        f"runs; answers checked. Goal: scoped p50 ≤ {RATIO_GOAL}× unscoped.",
        "",
    ]
    stats = {(s.case, s.target): s for s in qido}
    rows = []
    for r in ratios:
        u, s = stats.get((r["case"], "unscoped")), stats.get((r["case"], "scoped"))
        cells = []
        for x in (u, s):
            cells += ([fmt_stat(x.main, 1), fmt_stat(x.second, 1),
                       f"{x.runs_ok}/{x.runs_total}"] if x and x.runs_ok
                      else ["**failed**", "-", f"0/{x.runs_total if x else 0}"])
        rows.append([r["case"], *cells, _ratio(r["p50_ratio"]), _ratio(r["p95_ratio"]),
                     r["verdict"]])
    parts.append(md_table(["query", "unscoped p50 ms", "unscoped p95 ms", "runs ok",
                           "scoped p50 ms", "scoped p95 ms", "runs ok", "p50 ratio",
                           "p95 ratio", "goal"], rows))
    queries = {c.name: c.label for c, _ in qido_cases(exp)}
    parts += ["", "Queries: " + "; ".join(f"{k} = {v}" for k, v in queries.items()) + "."]
    lines = failures(qido) + [f"- evaluation: {err.splitlines()[0][:300]}"
                              for e in evals for err in e["errors"]]
    if lines:
        parts += ["", "Failed runs:", "", *lines]
    return "\n".join(parts) + "\n"
