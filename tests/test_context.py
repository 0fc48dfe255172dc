"""The reader's clinical context (gateway.context, gateway.api) end to end: storescu → gateway →
sekmet-fhir (SMART Backend Services), clinical data seeded in sekmet afterwards, then
``/api/studies/{uid}/context`` and ``/api/patients/{id}/history`` over HTTP.

One gateway and one seeded patient for the module; the failure tests run their own gateway
against the failure-injection server, and "FHIR not configured" runs in-process.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import requests
from fhir.resources.R4B.bundle import Bundle
from test_publisher import ACCESSION, MRN, gateway_with_fhir, imaging_studies, send, uid, wait_for

from gateway.bootstrap import build_services
from gateway.config import load_settings
from gateway.fhir_client import FhirClient
from gateway.history import Window, instant
from gateway.web import create_app

from conftest import GatewayProcess, free_port
from fhir_servers import BROAD_SCOPE, Answer, ClientKeys, FailureServer, Sekmet, sekmet_client

CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"


@dataclass
class World:
    """The module's gateway and what was seeded: ids by name."""

    gateway: GatewayProcess
    fhir: FhirClient
    mrn: str
    current: str  # StudyInstanceUID, published
    prior: str  # StudyInstanceUID, held but not on the FHIR server
    elsewhere: str  # same Patient ID under another (unconfigured) issuer
    ids: dict[str, str]

    def ref(self, name: str) -> str:
        return self.ids[name]

    def get(self, path: str, **params: str) -> requests.Response:
        return requests.get(f"{self.gateway.base_url}{path}", params=params, timeout=60)


def _create(fhir: FhirClient, resource: dict[str, Any]) -> str:
    created = fhir.create(resource).id
    assert created is not None
    return f"{resource['resourceType']}/{created}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, sekmet: Sekmet,
          client_keys: ClientKeys) -> Iterator[World]:
    root = tmp_path_factory.mktemp("context")

    def make(extra: dict[str, dict[str, object]], name: str = "gw") -> GatewayProcess:
        (root / name).mkdir()  # the default fhir.scope: what publishing and reading need
        return GatewayProcess(root / name, free_port(), free_port(), extra=extra)

    gateway = gateway_with_fhir(make, sekmet, client_keys).start()
    try:
        with sekmet_client(sekmet, client_keys, scope=BROAD_SCOPE) as fhir:
            yield _seed(gateway, fhir, root)
    finally:
        gateway.stop()


def _seed(gateway: GatewayProcess, fhir: FhirClient, root: Path) -> World:
    mrn, current, prior, elsewhere = f"MRN-CTX-{uuid.uuid4().hex[:8]}", uid(), uid(), uid()
    accession = f"A-{uuid.uuid4().hex[:8]}"
    send(gateway, root / "current", 2, PatientID=mrn, PatientName="READER^RITA",
         StudyInstanceUID=current, StudyDate="20240310", StudyTime="101500",
         TimezoneOffsetFromUTC="+0100", AccessionNumber=accession,
         StudyDescription="CT CHEST")
    send(gateway, root / "prior", 1, PatientID=mrn, StudyInstanceUID=prior,
         StudyDate="20230105", StudyTime="083000", TimezoneOffsetFromUTC="+0100",
         AccessionNumber=f"A-{uuid.uuid4().hex[:8]}", StudyDescription="CT ABDOMEN")
    send(gateway, root / "elsewhere", 1, PatientID=mrn, IssuerOfPatientID="ELSEWHERE",
         StudyInstanceUID=elsewhere, StudyDate="20240101")
    (published,) = wait_for(lambda: imaging_studies(fhir, current), what="ImagingStudy")
    (prior_published,) = wait_for(lambda: imaging_studies(fhir, prior), what="prior")
    # The prior stands for a study never published: the gateway holds it, FHIR does not.
    fhir.delete("ImagingStudy", prior_published["id"])
    assert imaging_studies(fhir, prior) == []

    ids = {"study": f"ImagingStudy/{published['id']}"}
    patient = ids["patient"] = published["subject"]["reference"]
    assert patient.startswith("Patient/"), "patient_policy create made the Patient"
    ids["encounter"] = _create(fhir, {
        "resourceType": "Encounter", "status": "finished", "subject": {"reference": patient},
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "type": [{"text": "Radiology outpatient visit"}],
        "period": {"start": "2024-03-10T09:30:00+01:00", "end": "2024-03-10T12:00:00+01:00"}})
    # The order arrives after publication: the ImagingStudy names it by accession only.
    ids["order"] = _create(fhir, {
        "resourceType": "ServiceRequest", "status": "active", "intent": "order",
        "subject": {"reference": patient}, "encounter": {"reference": ids["encounter"]},
        "identifier": [{"system": ACCESSION, "value": accession}], "code": {"text": "CT chest"}})
    ids["active"] = _create(fhir, {
        "resourceType": "Condition", "subject": {"reference": patient},
        "clinicalStatus": {"coding": [{"system": CLINICAL, "code": "active"}]},
        "code": {"text": "Lung nodule"}, "onsetDateTime": "2023-11-02"})
    ids["resolved"] = _create(fhir, {
        "resourceType": "Condition", "subject": {"reference": patient},
        "clinicalStatus": {"coding": [{"system": CLINICAL, "code": "resolved"}]},
        "code": {"text": "Pneumonia"}, "onsetDateTime": "2021-02-01",
        "abatementDateTime": "2021-03-01"})
    ids["procedure"] = _create(fhir, {
        "resourceType": "Procedure", "status": "completed", "subject": {"reference": patient},
        "code": {"text": "Bronchoscopy"}, "performedDateTime": "2024-02-20T14:00:00+01:00"})
    # The same instant as the report below, written in UTC: ties go by kind.
    ids["same-time"] = _create(fhir, {
        "resourceType": "Procedure", "status": "completed", "subject": {"reference": patient},
        "code": {"text": "Contrast reaction treated"},
        "performedDateTime": "2024-03-10T12:00:00Z"})
    ids["report"] = _create(fhir, {
        "resourceType": "DiagnosticReport", "status": "final", "subject": {"reference": patient},
        "code": {"text": "CT chest report"}, "imagingStudy": [{"reference": ids["study"]}],
        "effectiveDateTime": "2024-03-10T13:00:00+01:00"})
    ids["addendum"] = _create(fhir, {
        "resourceType": "DiagnosticReport", "status": "preliminary",
        "subject": {"reference": patient}, "basedOn": [{"reference": ids["order"]}],
        "code": {"text": "CT chest addendum"}, "effectiveDateTime": "2024-03-11T08:00:00+01:00"})
    ids["lab"] = _create(fhir, {
        "resourceType": "DiagnosticReport", "status": "final", "subject": {"reference": patient},
        "code": {"text": "Full blood count"}, "effectiveDateTime": "2024-01-15"})
    # Never true: left out of the context and the history.
    ids["error-condition"] = _create(fhir, {
        "resourceType": "Condition", "subject": {"reference": patient},
        "clinicalStatus": {"coding": [{"system": CLINICAL, "code": "active"}]},
        "verificationStatus": {"coding": [{"system": VERIFICATION,
                                           "code": "entered-in-error"}]},
        "code": {"text": "Wrong patient's nodule"}, "onsetDateTime": "2024-03-01"})
    ids["error-report"] = _create(fhir, {
        "resourceType": "DiagnosticReport", "status": "entered-in-error",
        "subject": {"reference": patient}, "code": {"text": "Report on the wrong study"},
        "imagingStudy": [{"reference": ids["study"]}], "effectiveDateTime": "2024-03-10"})
    someone_else = _create(fhir, {"resourceType": "Patient", "name": [{"family": "Other"}]})
    ids["someone-else"] = _create(fhir, {
        "resourceType": "Condition", "subject": {"reference": someone_else},
        "clinicalStatus": {"coding": [{"system": CLINICAL, "code": "active"}]},
        "code": {"text": "Not this patient's"}})
    return World(gateway, fhir, mrn, current, prior, elsewhere, ids)


def _entries(bundle: dict[str, Any], mode: str | None = None) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry") or []
            if mode is None or e["search"]["mode"] == mode]


def _refs(resources: list[dict[str, Any]]) -> set[str]:
    return {f"{r['resourceType']}/{r['id']}" for r in resources}


# -- the study's context -------------------------------------------------------------------------
def test_context_of_a_published_study(world: World) -> None:
    answer = world.get(f"/api/studies/{world.current}/context")
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("application/fhir+json")
    bundle = answer.json()
    Bundle.model_validate(bundle)  # a valid FHIR Bundle
    assert bundle["type"] == "searchset" and bundle["total"] == 1
    assert _refs(_entries(bundle, "match")) == {world.ref("study")}
    assert _refs(_entries(bundle, "include")) == {
        world.ref(name) for name in ("patient", "order", "encounter", "report", "addendum",
                                     "active")}, "not the resolved Condition, not the lab report"
    assert _entries(bundle, "outcome") == [], "nothing was missing"
    (order,) = [r for r in _entries(bundle) if r["resourceType"] == "ServiceRequest"]
    assert order["code"]["text"] == "CT chest", "whole resources, not element subsets"
    for entry in bundle["entry"]:
        resource = entry["resource"]
        assert entry["fullUrl"] == f"{world.fhir.base_url}/{resource['resourceType']}/" \
                                   f"{resource['id']}"


def test_context_of_a_study_not_published_finds_the_patient_by_identity(world: World) -> None:
    bundle = world.get(f"/api/studies/{world.prior}/context").json()
    assert bundle["total"] == 0 and _entries(bundle, "match") == []
    assert _refs(_entries(bundle, "include")) == {world.ref("patient"), world.ref("active")}
    (outcome,) = _entries(bundle, "outcome")
    texts = " ".join(issue["diagnostics"] for issue in outcome["issue"])
    assert "not published" in texts and "accession number" in texts
    assert world.mrn not in texts, "no patient identifiers in messages"


def test_unknown_or_malformed_study(world: World) -> None:
    missing = world.get(f"/api/studies/{uid()}/context")
    assert missing.status_code == 404
    assert "holds no study" in missing.json()["error"]
    assert world.get("/api/studies/1.2.abc/context").status_code == 400


# -- the patient's history -----------------------------------------------------------------------
def _timeline(history: dict[str, Any]) -> list[tuple[str, str]]:
    return [(e["kind"], e["reference"] or e["StudyInstanceUID"]) for e in history["events"]]


def test_history_merges_held_studies_and_fhir_events_newest_first(world: World) -> None:
    patient_id = world.ref("patient").split("/")[1]
    answer = world.get(f"/api/patients/{patient_id}/history")
    assert answer.status_code == 200, answer.text
    history = answer.json()
    assert history["patient"]["reference"] == world.ref("patient")
    assert history["patient"]["name"] == "RITA READER"
    assert history["patient"]["dicom"] == [{"PatientID": world.mrn, "IssuerOfPatientID": ""}]
    r = world.ref
    assert _timeline(history) == [
        ("DiagnosticReport", r("addendum")),  # 2024-03-11T08:00+01:00
        ("DiagnosticReport", r("report")),  # 2024-03-10T13:00+01:00 …
        ("Procedure", r("same-time")),  # … = 12:00Z: a tie, broken by kind
        ("imaging-study", r("study")),  # 2024-03-10T10:15+01:00
        ("Encounter", r("encounter")),  # 2024-03-10T09:30+01:00
        ("Procedure", r("procedure")),  # 2024-02-20
        ("DiagnosticReport", r("lab")),  # 2024-01-15
        ("Condition", r("active")),  # 2023-11-02
        ("imaging-study", world.prior),  # 2023-01-05, held but not published
        ("Condition", r("resolved")),  # 2021-02-01
    ], "the study under another issuer is another patient"
    by_ref = {e["reference"] or e["StudyInstanceUID"]: e for e in history["events"]}
    study = by_ref[r("study")]
    assert study["StudyInstanceUID"] == world.current
    assert study["when"] == "2024-03-10T10:15:00+01:00" and study["date"] == "2024-03-10"
    assert study["modalities"] == ["CT"] and study["description"] == "CT CHEST"
    assert study["instances"] == 2 and study["reports"] == [r("report")]
    assert study["dicomweb"] == f"{world.gateway.dicomweb}/studies/{world.current}"
    assert requests.get(study["dicomweb"] + "/metadata", timeout=30).status_code == 200
    prior = by_ref[world.prior]
    assert prior["reference"] is None and prior["dicomweb"].endswith(world.prior)
    assert by_ref[r("resolved")]["status"] == "resolved"
    assert by_ref[r("resolved")]["end"] == "2021-03-01"
    assert by_ref[r("encounter")]["summary"] == "Radiology outpatient visit"
    assert by_ref[r("report")]["imaging_studies"] == [r("study")]


def test_history_window(world: World) -> None:
    patient_id = world.ref("patient").split("/")[1]
    history = world.get(f"/api/patients/{patient_id}/history", since="2024-01-15",
                        until="2024-03-10").json()
    assert (history["since"], history["until"]) == ("2024-01-15", "2024-03-10")
    assert [ref for _kind, ref in _timeline(history)] == [
        world.ref(n) for n in ("report", "same-time", "study", "encounter", "procedure", "lab")]
    bad = world.get(f"/api/patients/{patient_id}/history", since="last week")
    assert bad.status_code == 400 and "since" in bad.json()["error"]


def test_unknown_or_malformed_patient(world: World) -> None:
    answer = world.get(f"/api/patients/{uuid.uuid4().hex}/history")
    assert answer.status_code == 404 and "no Patient" in answer.json()["error"]
    assert world.get("/api/patients/not_an_id/history").status_code == 400


def test_instants_and_windows_of_partial_dates() -> None:
    assert instant("2024-03-10T13:00:00+01:00") == instant("2024-03-10T12:00:00Z")
    assert instant("2024") == instant("2024-01-01") == instant("2024-01-01T00:00:00Z")
    assert instant("2024-13-01") is None and instant("last week") is None
    march = Window(since=date(2024, 3, 15), until=date(2024, 4, 30))
    assert march.admits("2024-03") and march.admits("2024") and march.admits("2024-04-30T23:59Z")
    assert not march.admits("2024-02") and not march.admits("2024-05-01") \
        and not march.admits(None)
    assert Window().admits(None), "undated events only in an open window"
    assert march.study_date_range() == "20240315-20240430"
    assert Window(until=date(2024, 1, 1)).study_date_range() == "-20240101"


# -- failures ------------------------------------------------------------------------------------
def _outcome(text: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "exception", "diagnostics": text}]}


def test_fhir_failures_answer_502_or_503_with_the_servers_outcome(
        make_gateway: Any, failing: FailureServer, tmp_path: Path) -> None:
    gateway = make_gateway(extra={
        "fhir": {"base_url": failing.url, "auth": "none", "timeout": 5},
        "publish": {"quiet_seconds": 0.5, "patient_system": MRN, "max_backoff": 2}}).start()
    study = uid()
    send(gateway, tmp_path / "files", 1, PatientID="MRN-FAIL", StudyInstanceUID=study)
    paths = [f"/api/studies/{study}/context", "/api/patients/p1/history"]
    fhir_json = {"Content-Type": "application/fhir+json"}

    failing.answers = [Answer(503, {**fhir_json, "Retry-After": "7"},
                              _outcome("down for maintenance"))]
    for path in paths:
        answer = requests.get(gateway.base_url + path, timeout=30)
        assert answer.status_code == 503, path
        assert answer.json() == _outcome("down for maintenance"), "the server's own outcome"
        assert answer.headers["Retry-After"] == "7"
        assert answer.headers["Content-Type"].startswith("application/fhir+json")

    for status in (500, 403):
        failing.answers = [Answer(status, fhir_json, _outcome(f"failure {status}"))]
        for path in paths:
            answer = requests.get(gateway.base_url + path, timeout=30)
            assert answer.status_code == 502, (status, path)
            assert answer.json() == _outcome(f"failure {status}")

    failing.answers = [Answer(502)]  # no OperationOutcome: the gateway writes one
    answer = requests.get(gateway.base_url + paths[0], timeout=30)
    assert answer.status_code == 502
    (issue,) = answer.json()["issue"]
    assert issue["code"] == "transient" and "HTTP 502" in issue["diagnostics"]


def test_without_a_fhir_server_the_api_says_so(tmp_path: Path) -> None:
    settings = load_settings(environ={}, overrides={"storage": {"path": str(tmp_path)}})
    services = build_services(settings)
    try:
        client = create_app(services).test_client()
        for path in (f"/api/studies/{uid()}/context", "/api/patients/p1/history"):
            answer = client.get(path)
            assert answer.status_code == 503
            assert "fhir.base_url" in answer.get_json()["error"]
    finally:
        services.close()
