"""Interoperability: a real Orthanc (Debian's 1.10) pulls studies from the gateway over DIMSE.

Orthanc knows the gateway as the modality ``GATEWAY``; the gateway knows Orthanc as the peer
``ORTHANC`` (``[dimse.peers.ORTHANC]``, the Move Destination). Studies are stored into the
gateway with dcmtk ``storescu``; then Orthanc, driven through its REST API, queries (C-FIND) and
retrieves (C-MOVE, PS3.4 C.4.2) them, and must end up with every instance: same UIDs, and the
same pixel data (the same bytes when the instance kept its transfer syntax, the same decoded
pixels when the gateway had to transcode it for Orthanc).

Orthanc runs with its own JSON configuration on loopback ports, a fresh storage directory,
``RemoteAccessAllowed`` off, and ``TCP_NODELAY=1`` in its environment (its DICOM layer is
Debian's dcmtk, which leaves Nagle on otherwise). ``scripts/test.sh`` installs it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from conftest import GatewayProcess, dcmtk_env, free_port, pydicom_file, require_dcmtk
from samples import stored_path, storescu_profile, synthetic_instance

ORTHANC_AE = "ORTHANC"
#: A mix of encodings Orthanc 1.10 (dcmtk 3.6.7) accepts as they are.
SAMPLES = ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
           "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
           "SC_rgb_jpeg_dcmtk.dcm", "JPEG-LL.dcm", "image_dfl.dcm"]


@dataclass
class Orthanc:
    """A running Orthanc with its own configuration and storage."""

    root: Path
    dicom_port: int
    http_port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log(self) -> str:
        path = self.root / "orthanc.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, gateway: GatewayProcess, timeout: float = 60) -> Orthanc:
        if shutil.which("Orthanc") is None:
            pytest.fail("Orthanc is not installed: run scripts/test.sh (it installs it)")
        config = {
            "Name": "INTEROP",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "DicomAet": ORTHANC_AE,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "Plugins": [],
            "DicomModalities": {
                "GATEWAY": [gateway.ae_title, "127.0.0.1", gateway.dimse_port]},
        }
        (self.root / "orthanc.json").write_text(json.dumps(config, indent=2))
        with open(self.root / "orthanc.log", "ab") as log:
            self.process = subprocess.Popen(["Orthanc", str(self.root / "orthanc.json")],
                                            stdout=log, stderr=subprocess.STDOUT,
                                            env=dcmtk_env())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}:\n{self.log}")
            try:
                if requests.get(f"{self.url}/system", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"Orthanc not ready after {timeout} s:\n{self.log}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def get(self, path: str) -> Any:
        answer = requests.get(f"{self.url}{path}", timeout=60)
        answer.raise_for_status()
        return answer.json() if "json" in answer.headers.get("Content-Type", "") \
            else answer.content

    def post(self, path: str, body: Any) -> Any:
        answer = requests.post(f"{self.url}{path}", data=json.dumps(body), timeout=300)
        assert answer.status_code == 200, f"{path}: {answer.status_code} {answer.text}"
        return answer.json()

    def study_files(self, study_uid: str, expected: int,
                    timeout: float = 60) -> dict[str, pydicom.Dataset]:
        """SOP Instance UID → the instance as Orthanc stored it, for one study, once Orthanc
        holds ``expected`` instances of it (or ``timeout`` passed: whatever it has then)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.post("/tools/find", {"Level": "Study",
                                              "Query": {"StudyInstanceUID": study_uid}})
            held = len(self.get(f"/studies/{found[0]}/instances")) if found else 0
            if held >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if not found:
            return {}
        (study_id,) = found
        files = {}
        for instance in self.get(f"/studies/{study_id}/instances"):
            ds = pydicom.dcmread(io.BytesIO(self.get(f"/instances/{instance['ID']}/file")))
            files[str(ds.SOPInstanceUID)] = ds
        return files


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    require_dcmtk()
    root = tmp_path_factory.mktemp("orthanc")
    orthanc_root = root / "orthanc"
    orthanc_root.mkdir()
    orthanc = Orthanc(orthanc_root, free_port(), free_port())
    gateway = GatewayProcess(root, free_port(), free_port(), extra={"dimse": {"peers": {
        ORTHANC_AE: {"host": "127.0.0.1", "port": orthanc.dicom_port}}}})
    studies: dict[str, dict[str, Path]] = {}
    # Study A: the pydicom samples in several encodings, one series each.
    study_a, files_a = generate_uid(), root / "a"
    files_a.mkdir()
    for name in SAMPLES:
        ds = pydicom.dcmread(pydicom_file(name))
        ds.PatientID, ds.PatientName = "PINTEROP", "INTEROP^A"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_a, generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = files_a / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
    studies[study_a] = {p.stem: p for p in files_a.iterdir()}
    # Study B: twenty small instances in two series.
    study_b, files_b = generate_uid(), root / "b"
    files_b.mkdir()
    series = [generate_uid(), generate_uid()]
    for number in range(20):
        synthetic_instance(files_b, PatientID="PINTEROP", PatientName="INTEROP^B",
                           StudyInstanceUID=study_b, SeriesInstanceUID=series[number % 2],
                           InstanceNumber=number + 1)
    studies[study_b] = {p.stem: p for p in files_b.iterdir()}
    gateway.start()
    orthanc.start(gateway)
    # storescu proposes each file's SOP class in exactly the file's transfer syntax (a
    # profile), so every instance is stored as it is encoded.
    for paths in (sorted(files_a.iterdir()), sorted(files_b.iterdir())):
        profile = storescu_profile(root / "storescu.cfg", paths)
        sent = subprocess.run(["storescu", "-xf", str(profile), "Samples", "-aec",
                               gateway.ae_title, "127.0.0.1", str(gateway.dimse_port),
                               *map(str, paths)],
                              capture_output=True, text=True, env=dcmtk_env(), timeout=120)
        assert sent.returncode == 0, sent.stderr
    yield {"gateway": gateway, "orthanc": orthanc, "studies": studies,
           "a": study_a, "b": study_b}
    orthanc.stop()
    gateway.stop()


def assert_same_instances(got: dict[str, pydicom.Dataset], originals: dict[str, Path],
                          gateway: GatewayProcess) -> None:
    """Orthanc holds exactly the study's instances, each with the UIDs and the pixel data the
    gateway stored (dcmtk's storescu may re-encode what it sends, so the reference is the
    gateway's copy, not the file given to storescu)."""
    assert sorted(got) == sorted(originals), "Orthanc must hold every instance of the study"
    for sop, ds in got.items():
        kept = stored_path(gateway.data, sop)
        assert kept is not None, sop
        original = pydicom.dcmread(kept)
        for keyword in ("SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
            assert ds[keyword].value == original[keyword].value, (sop, keyword)
        if "PixelData" not in original:
            continue
        syntax = original.file_meta.TransferSyntaxUID
        if ds.file_meta.TransferSyntaxUID == syntax:
            assert ds.PixelData == original.PixelData, f"{syntax}: pixel data changed"
        else:  # transcoded for Orthanc: the same pixels
            assert np.array_equal(ds.pixel_array, original.pixel_array), syntax


def test_orthanc_queries_and_retrieves_a_study(world: dict[str, Any]) -> None:
    """Orthanc's Query/Retrieve: C-FIND for the study, then C-MOVE of it to itself."""
    orthanc: Orthanc = world["orthanc"]
    study = world["a"]
    query = orthanc.post("/modalities/GATEWAY/query", {
        "Level": "Study", "Query": {"StudyInstanceUID": study, "PatientID": "",
                                    "NumberOfStudyRelatedInstances": ""}})
    answers = orthanc.get(f"/queries/{query['ID']}/answers?expand&simplify")
    assert [a["StudyInstanceUID"] for a in answers] == [study]
    assert answers[0]["NumberOfStudyRelatedInstances"] == str(len(SAMPLES))
    orthanc.post(f"/queries/{query['ID']}/retrieve",
                 {"TargetAet": ORTHANC_AE, "Synchronous": True})
    originals = world["studies"][study]
    assert_same_instances(orthanc.study_files(study, len(originals)), originals,
                          world["gateway"])


def test_orthanc_moves_a_study_by_its_uid(world: dict[str, Any]) -> None:
    """Orthanc's C-MOVE SCU (``/modalities/{id}/move``) with the study as the only key."""
    orthanc: Orthanc = world["orthanc"]
    study = world["b"]
    orthanc.post("/modalities/GATEWAY/move", {
        "Level": "Study", "Resources": [{"StudyInstanceUID": study}],
        "TargetAet": ORTHANC_AE})
    originals = world["studies"][study]
    assert_same_instances(orthanc.study_files(study, len(originals)), originals,
                          world["gateway"])
    assert os.path.isdir(orthanc.root / "storage")
