"""The FHIR publisher end to end: storescu → gateway → a real FHIR server (sekmet-fhir, SMART
Backend Services with private_key_jwt RS384), checked through the FHIR API and dicomweb-client.

The FHIR server is shared by the session (each test uses its own patients and studies), except
where a test stops it: that one runs its own.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from gateway.bootstrap import build_services, mapping_options
from gateway.config import load_settings
from gateway.fhir_client import FhirClient
from gateway.publisher import Publisher, PublishPolicy

from conftest import GatewayProcess, dcmtk_env, free_port, require_dcmtk
from fhir_servers import (
    BROAD_SCOPE,
    JWT_CLIENT,
    NARROW_CLIENT,
    ClientKeys,
    Sekmet,
    credentials,
    sekmet_client,
)
from samples import synthetic_instance

MRN = "urn:oid:1.2.826.0.1.3680043.10.99.1"
ACCESSION = "urn:oid:1.2.826.0.1.3680043.10.99.2"


def uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


def gateway_with_fhir(make_gateway: Callable[..., GatewayProcess], server: Sekmet,
                      keys: ClientKeys, *, name: str = "gw", **publish: object
                      ) -> GatewayProcess:
    fhir: dict[str, object] = {
        "base_url": server.base_url, "auth": "smart_backend", "client_id": JWT_CLIENT,
        "private_key_file": str(keys.rsa.path), "key_id": keys.rsa.kid,
        "ca_bundle": str(server.ca_file)}
    return make_gateway(name=name, extra={
        "fhir": fhir,
        "publish": {"quiet_seconds": 0.5, "patient_system": MRN, "accession_system": ACCESSION,
                    "max_backoff": 2, **publish}})


def send(gateway: GatewayProcess, directory: Path, count: int, **attributes: object
         ) -> list[Path]:
    require_dcmtk()
    directory.mkdir(exist_ok=True)
    files = [synthetic_instance(directory, **{"Modality": "CT", "SeriesNumber": 1,
                                              "InstanceNumber": n + 1, **attributes})
             for n in range(count)]
    sent = subprocess.run(["storescu", "-aec", gateway.ae_title, "127.0.0.1",
                           str(gateway.dimse_port), *map(str, files)],
                          capture_output=True, text=True, env=dcmtk_env(), timeout=60)
    assert sent.returncode == 0, sent.stderr
    return files


def imaging_studies(fhir: FhirClient, study_uid: str) -> list[dict[str, Any]]:
    bundle = fhir.search("ImagingStudy", {"identifier": f"urn:dicom:uid|urn:oid:{study_uid}"})
    return [e["resource"] for e in bundle.get("entry") or []]


def wait_for(condition: Callable[[], Any], timeout: float = 60, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what or condition}")


@pytest.fixture
def fhir(sekmet: Sekmet, client_keys: ClientKeys) -> Iterator[FhirClient]:
    with sekmet_client(sekmet, client_keys, scope=BROAD_SCOPE) as client:
        yield client


def test_a_study_becomes_one_imaging_study_linked_to_patient_order_and_endpoint(
        make_gateway: Callable[..., GatewayProcess], sekmet: Sekmet, client_keys: ClientKeys,
        fhir: FhirClient, tmp_path: Path) -> None:
    mrn, accession, study_uid = f"MRN-{uuid.uuid4().hex[:8]}", f"A-{uuid.uuid4().hex[:8]}", uid()
    patient = fhir.create({"resourceType": "Patient",
                           "identifier": [{"system": MRN, "value": mrn}],
                           "name": [{"family": "Existing"}]}).id
    order = fhir.create({"resourceType": "ServiceRequest", "status": "active",
                         "intent": "order", "subject": {"reference": f"Patient/{patient}"},
                         "identifier": [{"system": ACCESSION, "value": accession}]}).id
    gateway = gateway_with_fhir(make_gateway, sekmet, client_keys).start()
    series_uid = uid()
    send(gateway, tmp_path / "first", 3, PatientID=mrn, PatientName="EXISTING^PAT",
         StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid, AccessionNumber=accession)

    (published,) = wait_for(lambda: imaging_studies(fhir, study_uid), what="ImagingStudy")
    assert published["numberOfInstances"] == 3 and published["numberOfSeries"] == 1
    assert published["subject"]["reference"] == f"Patient/{patient}", "the existing Patient"
    assert [b["reference"] for b in published["basedOn"]] == [f"ServiceRequest/{order}"]
    patients = fhir.search("Patient", {"identifier": f"{MRN}|{mrn}"})
    assert len(patients.get("entry") or []) == 1, "no duplicate Patient"

    endpoint = fhir.read("Endpoint", published["endpoint"][0]["reference"].split("/")[1])
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs"
    assert endpoint["address"] == gateway.dicomweb
    served = DICOMwebClient(url=endpoint["address"]).search_for_instances(
        study_instance_uid=study_uid)
    assert len(served) == 3, "the Endpoint's address serves the study"

    # More instances later: the same resource, updated; still one.
    version = published["meta"]["versionId"]
    send(gateway, tmp_path / "later", 2, PatientID=mrn, StudyInstanceUID=study_uid,
         SeriesInstanceUID=uid(), AccessionNumber=accession)
    updated = wait_for(lambda: [s for s in imaging_studies(fhir, study_uid)
                                if s.get("numberOfInstances") == 5], what="the update")
    assert len(imaging_studies(fhir, study_uid)) == 1
    assert updated[0]["id"] == published["id"] and updated[0]["meta"]["versionId"] != version
    assert updated[0]["numberOfSeries"] == 2

    # Replaying a published study changes nothing and duplicates nothing.
    assert gateway.cli("publish", "--replay", "--study", study_uid).returncode == 0
    time.sleep(2)
    again = imaging_studies(fhir, study_uid)
    assert len(again) == 1 and again[0]["meta"]["versionId"] == updated[0]["meta"]["versionId"]


def test_deleting_the_study_marks_the_imaging_study_entered_in_error(
        make_gateway: Callable[..., GatewayProcess], sekmet: Sekmet, client_keys: ClientKeys,
        fhir: FhirClient, tmp_path: Path) -> None:
    study_uid = uid()
    gateway = gateway_with_fhir(make_gateway, sekmet, client_keys).start()
    send(gateway, tmp_path, 2, PatientID=f"MRN-{uuid.uuid4().hex[:8]}",
         StudyInstanceUID=study_uid, SeriesInstanceUID=uid())
    wait_for(lambda: imaging_studies(fhir, study_uid), what="ImagingStudy")
    assert requests.delete(f"{gateway.dicomweb}/studies/{study_uid}",
                           timeout=10).status_code == 204
    (_retracted,) = wait_for(lambda: [s for s in imaging_studies(fhir, study_uid)
                                     if s["status"] == "entered-in-error"], what="retraction")
    assert len(imaging_studies(fhir, study_uid)) == 1


def test_patient_policy_create_makes_the_patient_once(
        make_gateway: Callable[..., GatewayProcess], sekmet: Sekmet, client_keys: ClientKeys,
        fhir: FhirClient, tmp_path: Path) -> None:
    mrn = f"MRN-{uuid.uuid4().hex[:8]}"
    gateway = gateway_with_fhir(make_gateway, sekmet, client_keys).start()
    studies = [uid(), uid()]
    for number, study_uid in enumerate(studies):
        send(gateway, tmp_path / str(number), 1, PatientID=mrn, PatientName="NEW^PATIENT",
             PatientBirthDate="19800101", PatientSex="F", StudyInstanceUID=study_uid)
    for study_uid in studies:
        wait_for(lambda s=study_uid: imaging_studies(fhir, s), what="ImagingStudy")
    bundle = fhir.search("Patient", {"identifier": f"{MRN}|{mrn}"})
    (created,) = [e["resource"] for e in bundle.get("entry") or []]
    assert created["birthDate"] == "1980-01-01" and created["gender"] == "female"
    assert created["name"][0]["family"] == "NEW"
    for study_uid in studies:
        assert imaging_studies(fhir, study_uid)[0]["subject"]["reference"] == \
            f"Patient/{created['id']}"


def test_hold_waits_for_the_emr_to_know_the_patient(
        make_gateway: Callable[..., GatewayProcess], sekmet: Sekmet, client_keys: ClientKeys,
        fhir: FhirClient, tmp_path: Path) -> None:
    mrn, study_uid = f"MRN-{uuid.uuid4().hex[:8]}", uid()
    gateway = gateway_with_fhir(make_gateway, sekmet, client_keys, patient_policy="hold",
                                hold_seconds=1).start()
    send(gateway, tmp_path, 1, PatientID=mrn, StudyInstanceUID=study_uid)
    status = wait_for(lambda: [r for r in requests.get(f"{gateway.base_url}/api/publish",
                                                       timeout=10).json()["retrying"]
                               if r["study"] == study_uid], what="the hold")
    assert "waiting for a Patient" in status[0]["error"]
    assert imaging_studies(fhir, study_uid) == []
    patient = fhir.create({"resourceType": "Patient",
                           "identifier": [{"system": MRN, "value": mrn}]}).id
    (published,) = wait_for(lambda: imaging_studies(fhir, study_uid), what="ImagingStudy")
    assert published["subject"]["reference"] == f"Patient/{patient}"


def test_refused_scopes_go_to_the_dead_letter_with_the_reason(
        make_gateway: Callable[..., GatewayProcess], sekmet: Sekmet, client_keys: ClientKeys,
        tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(sekmet.narrow_secret.reveal())
    gateway = make_gateway(extra={
        "fhir": {"base_url": sekmet.base_url, "auth": "client_credentials",
                 "client_id": NARROW_CLIENT, "auth_method": "client_secret_basic",
                 "client_secret_file": str(secret), "ca_bundle": str(sekmet.ca_file),
                 "scope": "system/Patient.rs"},
        "publish": {"quiet_seconds": 0.5, "patient_system": MRN,
                    "patient_policy": "identifier"}}).start()
    study_uid = uid()
    send(gateway, tmp_path / "files", 1, PatientID="MRN-NARROW", StudyInstanceUID=study_uid)
    failed = wait_for(lambda: requests.get(f"{gateway.base_url}/api/publish",
                                           timeout=10).json()["failed"], what="dead letter")
    assert failed[0]["study"] == study_uid
    assert "403" in failed[0]["error"]
    listed = gateway.cli("publish", "--failed")
    assert listed.returncode == 1 and study_uid in listed.stdout and "failed" in listed.stdout


def test_fhir_server_down_then_back_publishes_everything_once(
        make_gateway: Callable[..., GatewayProcess], client_keys: ClientKeys,
        tmp_path: Path) -> None:
    server = Sekmet(tmp_path / "own-sekmet", client_keys, port=free_port())
    server.root.mkdir()
    server.start()
    try:
        gateway = gateway_with_fhir(make_gateway, server, client_keys).start()
        server.stop()
        studies = [uid() for _ in range(3)]
        for number, study_uid in enumerate(studies):
            send(gateway, tmp_path / str(number), 2, PatientID=f"MRN-DOWN-{number}",
                 StudyInstanceUID=study_uid)
        wait_for(lambda: len(requests.get(f"{gateway.base_url}/api/publish",
                                          timeout=10).json()["retrying"]) == 3,
                 what="retries while the server is down")
        server.start()  # same data directory, same port
        with sekmet_client(server, client_keys, scope=BROAD_SCOPE) as fhir:
            for study_uid in studies:
                wait_for(lambda s=study_uid: imaging_studies(fhir, s), timeout=90,
                         what="publication after the outage")
            assert all(len(imaging_studies(fhir, s)) == 1 for s in studies)
        assert requests.get(f"{gateway.base_url}/api/publish", timeout=10).json()["pending"] == 0
    finally:
        server.stop()


def test_a_gateway_killed_while_publishing_never_duplicates(
        make_gateway: Callable[..., GatewayProcess], sekmet: Sekmet, client_keys: ClientKeys,
        fhir: FhirClient, tmp_path: Path) -> None:
    gateway = gateway_with_fhir(make_gateway, sekmet, client_keys).start()
    studies = [uid() for _ in range(8)]
    for number, study_uid in enumerate(studies):
        send(gateway, tmp_path / str(number), 1, PatientID=f"MRN-KILL-{number}",
             StudyInstanceUID=study_uid)
    wait_for(lambda: any(imaging_studies(fhir, s) for s in studies), what="first publication")
    gateway.kill9()
    gateway.start()
    for study_uid in studies:
        wait_for(lambda s=study_uid: imaging_studies(fhir, s), timeout=90, what="publication")
    assert [len(imaging_studies(fhir, s)) for s in studies] == [1] * len(studies)


def test_a_new_study_is_created_at_once_and_a_published_one_found_and_updated(
        sekmet: Sekmet, client_keys: ClientKeys, fhir: FhirClient, tmp_path: Path) -> None:
    """The ImagingStudy requests of the publisher, seen on the wire: a study the index never
    published is created with ``If-None-Exist`` straight away (the server searches: one
    request less per new study, docs/benchmarks.md), a published one is searched and updated,
    and one already on the server but unknown to the index (a rebuilt index, another replica)
    is still never duplicated."""
    study_uid, mrn = uid(), f"MRN-{uuid.uuid4().hex[:8]}"
    seen: list[tuple[str, str]] = []

    def publisher(name: str) -> tuple[Publisher, Any]:
        settings = load_settings(environ={}, overrides={
            "storage": {"path": str(tmp_path / name)},
            "publish": {"patient_system": MRN, "accession_system": ACCESSION}})
        services = build_services(settings)
        session = requests.Session()
        session.hooks["response"].append(lambda r, *_a, **_k: seen.append(
            (r.request.method or "", (r.request.path_url or "").split("/fhir/")[-1])))
        client = FhirClient(sekmet.base_url, ca_bundle=str(sekmet.ca_file), session=session,
                            auth=credentials(sekmet, client_keys, "private_key_jwt",
                                             scope=BROAD_SCOPE, fhir_base_url=sekmet.base_url,
                                             verify=str(sekmet.ca_file)))
        return Publisher(services.index, client, mapping_options(settings),
                         PublishPolicy(patient_policy="create")), services

    def store(services: Any, directory: Path, count: int) -> None:
        directory.mkdir()
        for n in range(count):
            services.ingest.store_file(
                synthetic_instance(directory, PatientID=mrn, StudyInstanceUID=study_uid,
                                   SeriesInstanceUID=f"{study_uid}.1", InstanceNumber=n + 1),
                move=False, source="test")

    def study_requests() -> list[tuple[str, str]]:
        made = [(method, path.split("?")[0].split("/")[0] + ("?" if "?" in path else ""))
                for method, path in seen if path.startswith("ImagingStudy")]
        seen.clear()
        return made

    first, services = publisher("first")
    store(services, tmp_path / "a", 2)
    first.publish(study_uid)
    assert study_requests() == [("POST", "ImagingStudy")], "no search before the create"
    store(services, tmp_path / "b", 1)
    first.publish(study_uid)
    assert study_requests() == [("GET", "ImagingStudy?"), ("PUT", "ImagingStudy")]
    (published,) = imaging_studies(fhir, study_uid)
    assert published["numberOfInstances"] == 3

    other, other_services = publisher("second")  # the same study in a fresh index
    store(other_services, tmp_path / "c", 3)
    other.publish(study_uid)
    assert study_requests()[:2] == [("POST", "ImagingStudy"), ("GET", "ImagingStudy?")], \
        "the conditional create finds it (200), then the publisher reads and merges"
    assert [s["id"] for s in imaging_studies(fhir, study_uid)] == [published["id"]]
    for made in (first, other):
        made.stop()
        made.client.close()
    services.close()
    other_services.close()
