"""Cross queries (gateway.cohort): clinical criteria from a real FHIR server (sekmet-fhir) ×
imaging criteria from the index, answered through the API, cohort-scoped DICOMweb and the
QIDO-RS ``fhir-criteria`` extension.

Seeded world: patients with birth dates and SNOMED-coded Conditions in FHIR, and their studies
sent with storescu and published by the gateway. Every expected cohort is computed here by
brute force from the seed, independently of the gateway.
"""

from __future__ import annotations

import csv
import io
import re
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from test_publisher import MRN, gateway_with_fhir, imaging_studies, send, uid, wait_for

from conftest import GatewayProcess, dcmtk_env, free_port, require_dcmtk
from fhir_servers import BROAD_SCOPE, ClientKeys, Sekmet, sekmet_client

OSTEOSARCOMA = "http://snomed.info/sct|307576001"
#: What a modality might send as Study Description: a spreadsheet formula.
DESCRIPTION = '=HYPERLINK("http://attacker.example","CT chest")'

RUN = uuid.uuid4().hex[:6]  # sekmet is shared by the session: this module's own patients

#: (name, birth date, conditions as (SNOMED code, clinical status))
PATIENTS = {
    f"A{RUN}": ("1970-05-01", [("307576001", "active")]),
    f"B{RUN}": ("1990-02-01", [("307576001", "active")]),
    f"C{RUN}": ("1960-07-01", [("38341003", "active")]),  # hypertension only
    f"D{RUN}": ("1975-03-01", [("307576001", "resolved")]),
}
#: (patient, modality, study date)
STUDIES = [
    (f"A{RUN}", "CT", "20240510"), (f"A{RUN}", "CT", "20230101"), (f"A{RUN}", "MR", "20240601"),
    (f"B{RUN}", "CT", "20240715"),
    (f"C{RUN}", "CT", "20240301"),
    (f"D{RUN}", "CT", "20250101"),
]


def brute_force(born_before: str | None, code: str | None, modality: str | None,
                since: str | None) -> set[str]:
    """The study keys (patient, modality, date) a cohort must contain, from the seed."""
    chosen = {p for p, (birth, conditions) in PATIENTS.items()
              if (born_before is None or birth <= born_before)
              and (code is None or any(c == code for c, _status in conditions))}
    return {f"{p}|{m}|{d}" for p, m, d in STUDIES if p in chosen
            and (modality is None or m == modality) and (since is None or d >= since)}


@pytest.fixture(scope="module")
def world(sekmet: Sekmet, client_keys: ClientKeys, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("cohort")
    made: list[GatewayProcess] = []

    def make(name: str = "gw", extra: dict[str, Any] | None = None, **_: Any) -> GatewayProcess:
        gateway = GatewayProcess(root / name, free_port(), free_port(), extra=extra or {})
        gateway.root.mkdir(exist_ok=True)
        made.append(gateway)
        return gateway

    storescp: subprocess.Popen[bytes] | None = None
    try:
        gateway = gateway_with_fhir(make, sekmet, client_keys)
        gateway.extra["cohorts"] = {"cache_seconds": 0}
        require_dcmtk()
        store_port = free_port()
        (root / "moved").mkdir()
        storescp = subprocess.Popen(["storescp", "-aet", "COHORT_SINK", "-od", str(root / "moved"),
                                     str(store_port)], env=dcmtk_env(),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        gateway.extra["dimse"] = {"peers": {"COHORT_SINK": {"host": "127.0.0.1",
                                                             "port": store_port}}}
        gateway.start()
        with sekmet_client(sekmet, client_keys, scope=BROAD_SCOPE) as fhir:
            for mrn, (birth, conditions) in PATIENTS.items():
                patient = fhir.create({"resourceType": "Patient", "birthDate": birth,
                                       "identifier": [{"system": MRN, "value": mrn}]}).id
                for code, status in conditions:
                    fhir.create({"resourceType": "Condition", "subject": {
                        "reference": f"Patient/{patient}"},
                        "clinicalStatus": {"coding": [{
                            "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                            "code": status}]},
                        "code": {"coding": [{"system": "http://snomed.info/sct", "code": code}]}})
            keys: dict[str, str] = {}
            for number, (mrn, modality, date) in enumerate(STUDIES):
                study_uid = uid()
                keys[study_uid] = f"{mrn}|{modality}|{date}"
                send(gateway, root / f"s{number}", 1, PatientID=mrn, StudyInstanceUID=study_uid,
                     Modality=modality, StudyDate=date, StudyDescription=DESCRIPTION)
            for study_uid in keys:
                wait_for(lambda s=study_uid: imaging_studies(fhir, s), what="publication")
        yield {"gateway": gateway, "keys": keys, "moved": root / "moved"}
    finally:  # also when setting up failed half way
        for process in made:
            if process.process is not None:
                process.stop()
        if storescp is not None:
            storescp.terminate()
            storescp.wait()


def create(gateway: GatewayProcess, fhir: str, imaging: dict[str, str] | None = None
           ) -> requests.Response:
    return requests.post(f"{gateway.base_url}/api/cohorts", timeout=60,
                         json={"name": "test", "fhir": fhir, "imaging": imaging or {}})


def members(world: dict[str, Any], answer: list[dict[str, Any]]) -> set[str]:
    return {world["keys"][s["0020000D"]["Value"][0]] for s in answer}


def test_clinical_by_imaging_cohort_equals_the_brute_force_join(world: dict[str, Any]) -> None:
    gateway: GatewayProcess = world["gateway"]
    response = create(gateway, f"Patient?birthdate=le1980-01-01&_has:Condition:subject:code="
                               f"{OSTEOSARCOMA}", {"ModalitiesInStudy": "CT",
                                                   "StudyDate": "20240101-"})
    assert response.status_code == 201, response.text
    cohort = response.json()
    expected = brute_force("1980-01-01", "307576001", "CT", "20240101")
    # D's osteosarcoma is resolved but _has matches any Condition with the code
    assert cohort["counts"]["studies"] == len(expected)
    scoped = requests.get(f"{cohort['dicomweb']}/studies", timeout=30).json()
    assert members(world, scoped) == expected
    assert cohort["ae_title"] == f"COHORT_{cohort['id']}"
    assert cohort["counts"]["patients"] == len({k.split("|")[0] for k in expected})


def server_timing(response: requests.Response) -> dict[str, tuple[float, str]]:
    """The Server-Timing metrics of an answer: name → (milliseconds, description)."""
    metrics = {}
    for part in response.headers["Server-Timing"].split(","):
        name, *params = part.strip().split(";")
        values = dict(p.split("=", 1) for p in params)
        metrics[name] = (float(values["dur"]), values.get("desc", "").strip('"'))
    return metrics


def test_cohort_answers_say_where_their_time_went(world: dict[str, Any]) -> None:
    """Server-Timing: the FHIR server's share (and how many requests), the index's, the
    whole request; total − fhir is the gateway's own time."""
    gateway: GatewayProcess = world["gateway"]
    response = create(gateway, f"Patient?birthdate=le1980-01-01&_has:Condition:subject:code="
                               f"{OSTEOSARCOMA}", {"ModalitiesInStudy": "CT"})
    assert response.status_code == 201, response.text
    metrics = server_timing(response)
    assert list(metrics) == ["fhir", "index", "total"]
    (fhir, desc), (index, _), (total, _) = metrics["fhir"], metrics["index"], metrics["total"]
    # at least the _summary=count check and the one page of patients (the world's
    # cache_seconds = 0 makes the counts in the answer evaluate it a second time)
    assert re.fullmatch(r"FHIR server \((\d+) requests\)", desc) and \
        int(desc.split("(")[1].split()[0]) >= 2, desc
    assert 0 < fhir < total and 0 < index < total and fhir + index <= total
    url = f"{gateway.base_url}/api/cohorts/{response.json()['id']}"
    read = requests.get(url, timeout=60)  # the world's cache_seconds is 0: evaluated again
    assert server_timing(read)["fhir"][0] > 0
    gone = requests.delete(url, timeout=30)
    assert gone.status_code == 204 and list(server_timing(gone)) == ["index", "total"]
    failed = create(gateway, "Patient?no-such-parameter=1")
    assert failed.status_code == 400 and "fhir" in server_timing(failed)


def test_subjects_of_another_resource_type(world: dict[str, Any]) -> None:
    gateway: GatewayProcess = world["gateway"]
    response = create(gateway, f"Condition?code={OSTEOSARCOMA}&clinical-status=active")
    assert response.status_code == 201, response.text
    scoped = requests.get(f"{response.json()['dicomweb']}/studies", timeout=30).json()
    expected = {k for k in brute_force(None, "307576001", None, None)
                if not k.startswith(f"D{RUN}")}  # D's condition is resolved
    assert members(world, scoped) == expected


def test_the_cohort_dicomweb_base_shows_and_serves_only_members(
        world: dict[str, Any]) -> None:
    gateway: GatewayProcess = world["gateway"]
    cohort = create(gateway, f"Patient?identifier={MRN}|B{RUN}").json()
    (study_uid,) = [s for s, k in world["keys"].items() if k.startswith(f"B{RUN}")]
    outsider = next(s for s, k in world["keys"].items() if k.startswith(f"C{RUN}"))
    client = DICOMwebClient(url=cohort["dicomweb"])
    found = client.search_for_studies()
    assert [s["0020000D"]["Value"][0] for s in found] == [study_uid]
    assert found[0]["00081190"]["Value"][0] == f"{cohort['dicomweb']}/studies/{study_uid}"
    assert client.search_for_studies(search_filters={"ModalitiesInStudy": "MR"}) == [], \
        "every normal parameter narrows further"
    assert len(client.retrieve_study(study_uid)) == 1
    assert requests.get(f"{cohort['dicomweb']}/studies/{outsider}", timeout=30
                        ).status_code == 404, "nothing outside the cohort is retrievable"
    assert requests.get(f"{cohort['dicomweb']}/studies", timeout=30,
                        params={"StudyInstanceUID": outsider}).json() == []
    assert requests.post(f"{cohort['dicomweb']}/studies", timeout=30).status_code == 405


def test_ad_hoc_fhir_criteria_on_qido(world: dict[str, Any]) -> None:
    gateway: GatewayProcess = world["gateway"]
    answer = requests.get(f"{gateway.dicomweb}/studies", timeout=60, params={
        "fhir-criteria": f"Patient?birthdate=ge1985-01-01&identifier={MRN}|B{RUN}"}).json()
    assert members(world, answer) == brute_force(None, None, None, None) & {
        k for k in brute_force(None, None, None, None) if k.startswith(f"B{RUN}")}


def test_the_identity_function_finds_studies_without_publish_records(
        world: dict[str, Any]) -> None:
    gateway: GatewayProcess = world["gateway"]
    with sqlite3.connect(gateway.index_file) as db:
        db.execute("DELETE FROM publication WHERE StudyInstanceUID IN "
                   "(SELECT StudyInstanceUID FROM study JOIN patient ON patient.id = "
                   "study.patient_id WHERE patient.PatientID = ?)", (f"C{RUN}",))
    cohort = create(gateway, f"Patient?identifier={MRN}|C{RUN}").json()
    assert cohort["counts"]["studies"] == len(brute_force(None, "38341003", None, None))


def test_get_list_export_and_delete(world: dict[str, Any]) -> None:
    gateway: GatewayProcess = world["gateway"]
    cohort = create(gateway, f"Patient?identifier={MRN}|A{RUN}",
                    {"ModalitiesInStudy": "CT"}).json()
    url = f"{gateway.base_url}/api/cohorts/{cohort['id']}"
    assert requests.get(url, timeout=30).json()["counts"] == cohort["counts"]
    assert cohort["id"] in [c["id"] for c in requests.get(f"{gateway.base_url}/api/cohorts",
                                                          timeout=60).json()]
    rows = requests.get(f"{url}/export", timeout=30).json()
    assert {world["keys"][r["StudyInstanceUID"]] for r in rows} == brute_force(
        None, None, "CT", None) & {k for k in world["keys"].values() if k.startswith(f"A{RUN}")}
    assert all(r["ImagingStudy"].startswith("ImagingStudy/") and
               r["Patient"].startswith("Patient/") and r["dicomweb"].endswith(
                   r["StudyInstanceUID"]) for r in rows)
    table = list(csv.DictReader(io.StringIO(requests.get(
        f"{url}/export", params={"format": "csv"}, timeout=30).text)))
    assert [r["StudyInstanceUID"] for r in table] == [r["StudyInstanceUID"] for r in rows]
    # A spreadsheet opening the CSV shows the description as text instead of running it; the
    # JSON keeps it as stored.
    assert {r["StudyDescription"] for r in rows} == {DESCRIPTION}
    assert {r["StudyDescription"] for r in table} == {"'" + DESCRIPTION}
    assert requests.delete(url, timeout=30).status_code == 204
    assert requests.get(url, timeout=30).status_code == 404
    assert requests.get(f"{cohort['dicomweb']}/studies", timeout=30).status_code == 404


@pytest.mark.parametrize(("fhir", "status", "message"), [
    ("Patient?no-such-parameter=1", 400, "FHIR server"),
    ("Patient", 400, "ResourceType?parameters"),
    ("patient?x=1", 400, "ResourceType?parameters"),
])
def test_a_search_the_fhir_server_refuses_is_an_error_not_an_empty_cohort(
        world: dict[str, Any], fhir: str, status: int, message: str) -> None:
    response = create(world["gateway"], fhir)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_bad_imaging_keys_are_refused(world: dict[str, Any]) -> None:
    response = create(world["gateway"], f"Patient?identifier={MRN}|A{RUN}",
                      {"StudyDate": "March"})
    assert response.status_code == 400 and "StudyDate" in response.json()["error"]


def test_the_cohort_ae_title_answers_c_find_and_c_move_for_members_only(
        world: dict[str, Any], tmp_path: Path) -> None:
    gateway: GatewayProcess = world["gateway"]
    cohort = create(gateway, f"Patient?identifier={MRN}|A{RUN}",
                    {"ModalitiesInStudy": "CT"}).json()
    expected = {s for s, k in world["keys"].items()
                if k.startswith(f"A{RUN}") and "|CT|" in k}
    found = subprocess.run(
        ["findscu", "-S", "-aec", cohort["ae_title"], "-X", "-od", str(tmp_path),
         "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "127.0.0.1",
         str(gateway.dimse_port)], capture_output=True, text=True, env=dcmtk_env(), timeout=60)
    assert found.returncode == 0, found.stderr
    answered = {str(pydicom.dcmread(p).StudyInstanceUID) for p in tmp_path.glob("rsp*.dcm")}
    assert answered == expected

    moved = subprocess.run(
        ["movescu", "-P", "-aec", cohort["ae_title"], "-aem", "COHORT_SINK",
         "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID=*", "127.0.0.1",
         str(gateway.dimse_port)], capture_output=True, text=True, env=dcmtk_env(), timeout=60)
    assert moved.returncode == 0, moved.stderr
    arrived = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)
               for p in world["moved"].iterdir()}
    assert arrived == expected, "a wildcard C-MOVE through the cohort moves only its members"


def test_an_unknown_cohort_ae_title_is_rejected(world: dict[str, Any]) -> None:
    gateway: GatewayProcess = world["gateway"]
    out = subprocess.run(["echoscu", "-aec", "COHORT_99999", "127.0.0.1",
                          str(gateway.dimse_port)], capture_output=True, text=True,
                         env=dcmtk_env(), timeout=30)
    assert out.returncode != 0
    assert "Called AE Title Not Recognized" in out.stdout + out.stderr
