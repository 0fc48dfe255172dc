"""C-FIND (PS3.4 C.4.1) on a running gateway, with dcmtk ``findscu`` and pynetdicom.

The archive of :data:`samples.ARCHIVE` plus one series of many images (for C-CANCEL) and a
patient with a non-ASCII name are imported once; every test only reads.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from gateway import qr
from gateway.bootstrap import build_services
from gateway.config import load_settings
from gateway.dimse import DimseNode

from conftest import GatewayProcess, dcmtk_env, free_port, require_dcmtk
from samples import S1, S2, S3, SE_A, SE_B, synthetic_instance, write_archive

MANY = 300
BIG_STUDY, BIG_SERIES = "1.2.826.0.1.3680043.10.1.9", "1.2.826.0.1.3680043.10.2.9"


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("qr")
    gateway = GatewayProcess(root, free_port(), free_port())
    files = root / "files"
    files.mkdir()
    write_archive(files)
    for number in range(MANY):
        synthetic_instance(files, PatientID="P9", PatientName="MANY^IMAGES",
                           StudyInstanceUID=BIG_STUDY, SeriesInstanceUID=BIG_SERIES,
                           Modality="CT", InstanceNumber=number + 1)
    synthetic_instance(files, PatientID="P10", PatientName="Müller^Jörg",
                       SpecificCharacterSet="ISO_IR 192")
    imported = gateway.cli("import", str(files))
    assert imported.returncode == 0, imported.stderr
    gateway.start()
    yield gateway
    gateway.stop()


def c_find(archive: GatewayProcess, keys: dict[str, Any], *,
           model: str = StudyRootQueryRetrieveInformationModelFind,
           ) -> list[tuple[int, Dataset | None]]:
    """(status, identifier) of every response to one C-FIND, over a pynetdicom association."""
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", archive.dimse_port, ae_title=archive.ae_title)
    assert assoc.is_established
    identifier = Dataset()
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    try:
        return [(int(status.Status), found) for status, found in
                assoc.send_c_find(identifier, model)]
    finally:
        assoc.release()


def matches(responses: list[tuple[int, Dataset | None]]) -> list[Dataset]:
    assert responses[-1][0] == 0x0000, f"final status 0x{responses[-1][0]:04X}"
    return [found for status, found in responses[:-1] if found is not None]


def test_study_root_study_level(archive: GatewayProcess) -> None:
    found = matches(c_find(archive, {"QueryRetrieveLevel": "STUDY", "PatientName": "doe*",
                                     "StudyInstanceUID": "", "ModalitiesInStudy": "",
                                     "NumberOfStudyRelatedInstances": "", "StudyDate": ""}))
    by_uid = {ds.StudyInstanceUID: ds for ds in found}
    assert sorted(by_uid) == sorted([S1, S2])
    s1 = by_uid[S1]
    assert list(s1.ModalitiesInStudy) == ["CT", "SR"]
    assert s1.NumberOfStudyRelatedInstances == 3 and s1.StudyDate == "20240315"
    assert s1.QueryRetrieveLevel == "STUDY" and s1.RetrieveAETitle == archive.ae_title
    assert "AccessionNumber" not in s1, "C.4.1.1.3.2: only the keys asked for come back"


def test_patient_root_patient_level_with_counts(archive: GatewayProcess) -> None:
    found = matches(c_find(archive, {"QueryRetrieveLevel": "PATIENT", "PatientID": "P1",
                                     "PatientName": "", "NumberOfPatientRelatedStudies": "",
                                     "NumberOfPatientRelatedInstances": ""},
                           model=PatientRootQueryRetrieveInformationModelFind))
    (p1,) = found
    assert (p1.PatientName, p1.NumberOfPatientRelatedStudies,
            p1.NumberOfPatientRelatedInstances) == ("DOE^JOHN", 1, 3)


def test_series_and_image_levels(archive: GatewayProcess) -> None:
    series = matches(c_find(archive, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": S1,
                                      "SeriesInstanceUID": "", "Modality": "",
                                      "SeriesNumber": ""}))
    assert sorted((s.SeriesInstanceUID, s.Modality) for s in series) == \
        sorted([(SE_A, "CT"), (SE_B, "SR")])
    images = matches(c_find(archive, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": S1,
                                      "SeriesInstanceUID": SE_A, "SOPInstanceUID": "",
                                      "InstanceNumber": "", "SOPClassUID": ""}))
    assert sorted(i.InstanceNumber for i in images) == [1, 2]
    assert all(i.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" for i in images)


def test_non_ascii_answers_declare_utf8(archive: GatewayProcess) -> None:
    (found,) = matches(c_find(archive, {"QueryRetrieveLevel": "STUDY", "PatientID": "P10",
                                        "PatientName": ""}))
    assert found.SpecificCharacterSet == "ISO_IR 192"
    assert str(found.PatientName) == "Müller^Jörg"


def test_an_optional_key_the_index_lacks_is_returned_empty_with_ff01(
        archive: GatewayProcess) -> None:
    responses = c_find(archive, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": S3,
                                 "PatientComments": ""})
    (status, found), final = responses[0], responses[-1]
    assert (status, final[0]) == (0xFF01, 0x0000)
    assert found is not None and found.PatientComments == ""


@pytest.mark.parametrize(("keys", "status", "comment"), [
    ({"QueryRetrieveLevel": "STUDY", "PatientComments": "x"}, 0xA900, "not supported"),
    ({"QueryRetrieveLevel": "STUDY", "Modality": "CT"}, 0xA900, "series-level"),
    ({"QueryRetrieveLevel": "PATIENT", "PatientID": "P1"}, 0xC000, "not in this model"),
    ({"PatientID": "P1"}, 0xC000, "Level missing"),
    ({"QueryRetrieveLevel": "STUDY", "StudyDate": "2024*"}, 0xC000, "wildcards"),
])
def test_a_query_it_cannot_run_fails_with_a_reason(
        archive: GatewayProcess, keys: dict[str, str], status: int, comment: str) -> None:
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", archive.dimse_port, ae_title=archive.ae_title)
    identifier = Dataset()
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    try:
        ((rsp, found),) = list(assoc.send_c_find(identifier,
                                                 StudyRootQueryRetrieveInformationModelFind))
    finally:
        assoc.release()
    assert rsp.Status == status and found is None
    assert comment in rsp.ErrorComment


def test_findscu_from_dcmtk(archive: GatewayProcess, tmp_path: Path) -> None:
    require_dcmtk()
    out = subprocess.run(
        ["findscu", "-S", "-aec", archive.ae_title, "-X", "-od", str(tmp_path),
         "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={S2}",
         "-k", "SeriesInstanceUID", "-k", "Modality", "-k", "BodyPartExamined",
         "127.0.0.1", str(archive.dimse_port)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    (answer,) = [pydicom.dcmread(p) for p in sorted(tmp_path.glob("rsp*.dcm"))]
    assert (answer.Modality, answer.BodyPartExamined) == ("MR", "HEAD")


@pytest.fixture
def slow_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """An in-process DICOM node over a copy of the big series whose answers are slowed (2 ms
    each, failure injection) so that a C-CANCEL always arrives while matches remain."""
    settings = load_settings(environ={}, overrides={
        "storage": {"path": str(tmp_path / "data")},
        "dimse": {"host": "127.0.0.1", "port": free_port(), "ae_title": "SLOW_GW"}})
    services = build_services(settings)
    for number in range(MANY):
        services.ingest.store_file(synthetic_instance(
            tmp_path, PatientID="P9", StudyInstanceUID=BIG_STUDY, SeriesInstanceUID=BIG_SERIES,
            InstanceNumber=number + 1), move=True)
    encode = qr.to_dicom_json

    def slow_encode(*args: Any) -> Any:
        time.sleep(0.002)
        return encode(*args)

    monkeypatch.setattr(qr, "to_dicom_json", slow_encode)
    node = DimseNode(settings, services.ingest)
    _host, port = node.start()
    yield port
    node.stop(drain_seconds=1)
    services.close()


def test_c_cancel_stops_the_answers(slow_node: int) -> None:
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", slow_node, ae_title="SLOW_GW")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.StudyInstanceUID = BIG_STUDY
    identifier.SOPInstanceUID = ""
    statuses = []
    try:
        responses = assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind,
                                      msg_id=7)
        for status, _found in responses:
            statuses.append(int(status.Status))
            if len(statuses) == 1:
                context_id = assoc._get_valid_context(
                    StudyRootQueryRetrieveInformationModelFind, "", "scu").context_id
                assoc.send_c_cancel(7, context_id)
    finally:
        assoc.release()
    assert statuses[-1] == 0xFE00, "C.4.1.2.3: a cancelled C-FIND ends with FE00"
    assert len(statuses) - 1 < MANY


def test_findscu_cancel_after_n_responses(slow_node: int, tmp_path: Path) -> None:
    require_dcmtk()
    out = subprocess.run(
        ["findscu", "-v", "-S", "-aec", "SLOW_GW", "--cancel", "5", "-X", "-od", str(tmp_path),
         "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={BIG_STUDY}",
         "-k", "SOPInstanceUID", "127.0.0.1", str(slow_node)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Cancel: MatchingTerminatedDueToCancelRequest" in out.stdout + out.stderr
    assert len(list(tmp_path.glob("rsp*.dcm"))) < MANY
