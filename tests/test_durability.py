"""Nothing acknowledged is lost (PS3.4 B.2.3: Success only once the instance is stored).

Real faults, no mocks: the gateway process is killed with SIGKILL in the middle of parallel
stores; its storage lives on a real, tiny tmpfs that fills up; that file system is remounted
read-only. In every case each instance that got 0x0000 must be retrievable and indexed after a
restart, and every refusal must be 0xA700 (Out of Resources: the sender keeps it and retries).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from conftest import GatewayProcess, partial_receptions
from samples import dataset_bytes, stored_path


def make_ct_series(directory: Path, count: int, *, rows: int = 256) -> list[Path]:
    """``count`` CT instances (``rows``² 16-bit) of one new study, written as Part 10 files."""
    from pydicom.dataset import Dataset, FileMetaDataset

    directory.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(7)
    files = []
    for number in range(1, count + 1):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName = "DURABLE-1", "Durable^Test"
        ds.Modality, ds.InstanceNumber, ds.StudyDate = "CT", number, "20260101"
        ds.Rows = ds.Columns = rows
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4095, (rows, rows), dtype=np.uint16).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = directory / f"{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def send_all(gateway: GatewayProcess, files: list[Path]) -> dict[Path, int | None]:
    """C-STORE each file on one association; status per file (None: no response)."""
    results: dict[Path, int | None] = dict.fromkeys(files)
    results.update(send_all_progressively(gateway, files))
    return results


def indexed(gateway: GatewayProcess) -> set[str]:
    with sqlite3.connect(gateway.index_file) as db:
        return {row[0] for row in db.execute("SELECT SOPInstanceUID FROM instance")}


def assert_consistent(gateway: GatewayProcess) -> None:
    """Every index row points at a complete, parseable blob (never a partial file)."""
    with sqlite3.connect(gateway.index_file) as db:
        for sop, key in db.execute("SELECT SOPInstanceUID, blob_key FROM instance"):
            blob = gateway.data / key
            assert blob.is_file(), f"indexed {sop} has no blob"
            assert pydicom.dcmread(blob).SOPInstanceUID == sop


def test_kill_9_during_parallel_stores_loses_nothing_acknowledged(
        make_gateway: object, tmp_path: Path) -> None:
    gw = make_gateway().start()  # type: ignore[operator]
    batches = [make_ct_series(tmp_path / f"sender{n}", 60) for n in range(4)]
    results: list[dict[Path, int | None]] = [{} for _ in batches]
    acknowledged = threading.Semaphore(0)

    def sender(number: int) -> None:
        ae_results = results[number]
        for path, status in send_all_progressively(gw, batches[number]):
            ae_results[path] = status
            if status == 0:
                acknowledged.release()

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for _ in range(40):  # kill once 40 instances were acknowledged: mid-stream for sure
        assert acknowledged.acquire(timeout=60), "senders stalled before the kill"
    gw.kill9()
    for thread in threads:
        thread.join(60)
    acked = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p
             for batch in results for p, s in batch.items() if s == 0}
    unacked = sum(1 for batch in results for s in batch.values() if s != 0) + \
        sum(len(b) for b in batches) - sum(len(r) for r in results)
    assert len(acked) >= 40 and unacked > 0, "the kill did not land mid-stream"

    gw.start()  # same storage, same index
    assert "did not stop cleanly" in gw.log  # and looked for index rows a crash could take
    assert not partial_receptions(gw.data), "partial receptions left in staging"
    present = indexed(gw)
    for sop, path in acked.items():
        stored = stored_path(gw.data, sop)
        assert stored is not None, f"acknowledged {sop} lost"
        assert dataset_bytes(stored) == dataset_bytes_of_sent(path)
        assert sop in present, f"acknowledged {sop} not indexed"
    assert_consistent(gw)


def send_all_progressively(gateway: GatewayProcess,
                           files: list[Path]) -> Iterator[tuple[Path, int | None]]:
    """C-STORE the files one by one on one association, yielding each status as it comes;
    stops at the first store that gets no response (association gone)."""
    ae = AE(ae_title=f"SENDER{threading.get_ident() % 1000}")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", gateway.dimse_port, ae_title=gateway.ae_title)
    if not assoc.is_established:
        return
    for path in files:
        try:
            status = assoc.send_c_store(pydicom.dcmread(path))
        except Exception:
            return
        if not status or "Status" not in status:
            return
        yield path, int(status.Status)
    assoc.release()


def dataset_bytes_of_sent(path: Path) -> bytes:
    """pynetdicom encodes a Dataset as written by pydicom, which is the file's data set."""
    return dataset_bytes(path)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 6 MiB tmpfs (the tests run as root, as CI does)."""
    if os.geteuid() != 0:
        pytest.fail("the full-disk tests mount a tmpfs and must run as root (CI does)")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _gateway_on(make_gateway: object, disk: Path, **storage: object) -> GatewayProcess:
    gw: GatewayProcess = make_gateway(  # type: ignore[operator]
        extra={"storage": {**storage},
               "index": {"url": f"sqlite:///{disk.parent / 'index.sqlite'}"}})
    gw.extra["storage"]["path"] = str(disk / "data")
    return gw.start()


def test_full_disk_answers_a700_and_keeps_everything_acknowledged(
        make_gateway: object, small_disk: Path, tmp_path: Path) -> None:
    """The disk really fills up (no free-space reserve): stores fail with 0xA700, not an abort
    and not a success; what was acknowledged stays complete."""
    gw = _gateway_on(make_gateway, small_disk, min_free_bytes=0)
    files = make_ct_series(tmp_path / "big", 60)  # 60 × 128 KiB > 6 MiB
    results = send_all(gw, files)
    statuses = list(results.values())
    assert 0 in statuses, "nothing could be stored at all"
    refused = [s for s in statuses if s not in (0, None)]
    assert refused and set(refused) == {0xA700}, f"statuses: {sorted(set(statuses), key=str)}"
    check_acknowledged(gw, results)
    assert "0xA700" in gw.log


def test_free_space_reserve_refuses_with_a700_before_the_disk_is_full(
        make_gateway: object, small_disk: Path, tmp_path: Path) -> None:
    gw = _gateway_on(make_gateway, small_disk, min_free_bytes=3 * 1024 * 1024)
    results = send_all(gw, make_ct_series(tmp_path / "big", 40))
    statuses = list(results.values())
    assert 0 in statuses and 0xA700 in statuses
    assert None not in statuses, "the association must survive: every store gets an answer"
    check_acknowledged(gw, results)
    assert "min_free_bytes" in gw.log


def test_read_only_storage_answers_a700(make_gateway: object, small_disk: Path,
                                        tmp_path: Path) -> None:
    gw = _gateway_on(make_gateway, small_disk, min_free_bytes=0)
    files = make_ct_series(tmp_path / "ro", 4)
    assert list(send_all(gw, files[:2]).values()) == [0, 0]
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        later = send_all(gw, files[2:])
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert set(later.values()) == {0xA700}
    after = send_all(gw, files[2:])  # the sender's retry, once storage is back
    assert set(after.values()) == {0}
    check_acknowledged(gw, {**dict.fromkeys(files, 0)})


def check_acknowledged(gw: GatewayProcess, results: dict[Path, int | None]) -> None:
    present = indexed(gw)
    for path, status in results.items():
        sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        if status == 0:
            stored = stored_path(gw.data, sop)
            assert stored is not None and sop in present, f"acknowledged {sop} lost"
            assert dataset_bytes(stored) == dataset_bytes(path)
        else:
            assert sop not in present, f"refused {sop} is indexed"
    assert_consistent(gw)
    assert not partial_receptions(gw.data), "partial data left behind"
