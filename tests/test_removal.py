"""Taking instances out: DELETE over DICOMweb, and IOCM rejection notes (IHE RAD TF-2 RAD-66:
a Key Object Selection titled 113001/113037/113038/113039 received by C-STORE or STOW-RS)."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pydicom
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from conftest import GatewayProcess, dcmtk_env, require_dcmtk
from samples import stored_path, synthetic_instance

STUDY, SERIES = "1.2.826.0.1.3680043.10.7.1", "1.2.826.0.1.3680043.10.7.2"


def storescu(gateway: GatewayProcess, *files: Path) -> subprocess.CompletedProcess[str]:
    require_dcmtk()
    return subprocess.run(["storescu", "-v", "-aec", gateway.ae_title, "127.0.0.1",
                           str(gateway.dimse_port), *map(str, files)],
                          capture_output=True, text=True, env=dcmtk_env(), timeout=60)


def three_instances(directory: Path) -> list[Path]:
    return [synthetic_instance(directory, PatientID="P7", StudyInstanceUID=STUDY,
                               SeriesInstanceUID=SERIES, Modality="CT", InstanceNumber=n)
            for n in (1, 2, 3)]


def instances(gateway: GatewayProcess) -> list[str]:
    found = requests.get(f"{gateway.dicomweb}/instances", params={"StudyInstanceUID": STUDY},
                         timeout=10).json()
    return sorted(i["00080018"]["Value"][0] for i in found)


def outbox_reason(gateway: GatewayProcess) -> str:
    with sqlite3.connect(gateway.index_file) as db:
        (reason,) = db.execute("SELECT reason FROM outbox WHERE StudyInstanceUID = ?",
                               (STUDY,)).fetchone()
    return str(reason)


def rejection_note(directory: Path, code: str, meaning: str, sops: list[str]) -> Path:
    """A KOS rejection note (PS3.3 A.35.4, IHE IOCM) referencing ``sops`` of the study."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.59"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "KO"
    ds.PatientID = "P7"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = code, "DCM", meaning
    ds.ConceptNameCodeSequence = [title]
    referenced = []
    for sop in sops:
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        item.ReferencedSOPInstanceUID = sop
        referenced.append(item)
    series_item = Dataset()
    series_item.SeriesInstanceUID = SERIES
    series_item.ReferencedSOPSequence = referenced
    study_item = Dataset()
    study_item.StudyInstanceUID = STUDY
    study_item.ReferencedSeriesSequence = [series_item]
    ds.CurrentRequestedProcedureEvidenceSequence = [study_item]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = directory / "rejection.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_delete_instance_series_and_study(gateway: GatewayProcess, tmp_path: Path) -> None:
    files = three_instances(tmp_path)
    assert storescu(gateway, *files).returncode == 0
    sops = [pydicom.dcmread(f).SOPInstanceUID for f in files]
    base = f"{gateway.dicomweb}/studies/{STUDY}/series/{SERIES}"

    assert requests.delete(f"{base}/instances/{sops[0]}", timeout=10).status_code == 204
    assert instances(gateway) == sorted(sops[1:])
    assert stored_path(gateway.data, sops[0]) is None, "the blob is gone"
    (study,) = requests.get(f"{gateway.dicomweb}/studies", params={"StudyInstanceUID": STUDY},
                            timeout=10).json()
    assert study["00201208"]["Value"] == [2], "the counts follow"
    assert outbox_reason(gateway) == "deleted", "the FHIR update is queued"
    again = requests.delete(f"{base}/instances/{sops[0]}", timeout=10)
    assert again.status_code == 404

    assert requests.delete(base, timeout=10).status_code == 204
    assert instances(gateway) == []
    assert requests.get(f"{gateway.dicomweb}/studies", params={"PatientID": "P7"},
                        timeout=10).json() == [], "an emptied study goes with its last series"
    assert requests.delete(f"{gateway.dicomweb}/studies/{STUDY}", timeout=10).status_code == 404
    bad = requests.delete(f"{gateway.dicomweb}/studies/1.2.x", timeout=10)
    assert bad.status_code == 400


def test_delete_can_be_switched_off(make_gateway: object, tmp_path: Path) -> None:
    gateway = make_gateway(extra={"http": {"allow_delete": False}}).start()  # type: ignore[operator]
    assert storescu(gateway, *three_instances(tmp_path)).returncode == 0
    response = requests.delete(f"{gateway.dicomweb}/studies/{STUDY}", timeout=10)
    assert response.status_code == 405 and "allow_delete" in response.json()["error"]
    assert len(instances(gateway)) == 3


def test_a_rejection_note_removes_what_it_references_and_keeps_it_out(
        gateway: GatewayProcess, tmp_path: Path) -> None:
    files = three_instances(tmp_path)
    assert storescu(gateway, *files).returncode == 0
    sops = [pydicom.dcmread(f).SOPInstanceUID for f in files]
    note = rejection_note(tmp_path, "113001", "Rejected for Quality Reasons", sops[:2])

    sent = storescu(gateway, note)
    assert sent.returncode == 0, sent.stderr
    assert instances(gateway) == [sops[2]], "rejected instances leave every query"
    assert all(stored_path(gateway.data, s) is None for s in sops[:2]), "and are deleted"
    assert outbox_reason(gateway) == "rejected-113001"
    wado = requests.get(f"{gateway.dicomweb}/studies/{STUDY}/series/{SERIES}/instances",
                        timeout=10).json()
    assert len(wado) == 1

    again = storescu(gateway, files[0])
    assert "Status: 0x124" in again.stdout + again.stderr, "a rejected instance is refused"
    assert instances(gateway) == [sops[2]]


def test_rejecting_every_instance_removes_the_study(gateway: GatewayProcess,
                                                     tmp_path: Path) -> None:
    files = three_instances(tmp_path)
    assert storescu(gateway, *files).returncode == 0
    sops = [pydicom.dcmread(f).SOPInstanceUID for f in files]
    note = rejection_note(tmp_path, "113039", "Data Retention Policy Expired", sops)
    response = requests.post(
        f"{gateway.dicomweb}/studies", timeout=10,
        data=b"--b\r\nContent-Type: application/dicom\r\n\r\n" + note.read_bytes() + b"\r\n--b--",
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})
    assert response.status_code == 200, response.text
    assert requests.get(f"{gateway.dicomweb}/studies", params={"StudyInstanceUID": STUDY},
                        timeout=10).json() == [], "no study is left, not even the note"
