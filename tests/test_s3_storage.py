"""Blobs in an S3 bucket (``storage.backend = "s3"``), on a real S3 wire protocol (moto's server,
tests/s3.py): a C-STORE is acknowledged only once its object is in the bucket, byte-exact; a
blob whose local copy is gone is read back from the bucket; a bucket that cannot take a blob
fails the C-STORE with the status that tells the sender whether to retry, and nothing is
indexed; deletion and ``reindex`` work on the bucket."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from gateway.config import load_settings
from gateway.errors import ConfigError
from gateway.storage import S3Storage, instance_key
from gateway.upper_layer import dataset_offset

from conftest import GatewayProcess, c_store, c_store_all, dcmtk_env, require_dcmtk
from s3 import CREDENTIALS, MotoServer, S3Bucket
from samples import dataset_bytes, fresh_copies
from test_durability import make_ct_series, send_all_progressively

MULTIPART_DICOM = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}


def _key(path: Path) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return instance_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


def _on_s3(make_gateway: Callable[..., GatewayProcess], bucket: S3Bucket) -> GatewayProcess:
    """A started gateway keeping its blobs in ``bucket``."""
    return make_gateway(extra={"storage": bucket.settings()}, env=CREDENTIALS).start()


def test_each_acknowledged_instance_is_an_object_in_the_bucket_holding_what_was_sent(
        make_gateway: Callable[..., GatewayProcess], s3_bucket: S3Bucket,
        tmp_path: Path) -> None:
    require_dcmtk()
    gateway = _on_s3(make_gateway, s3_bucket)
    files = fresh_copies(tmp_path, 8)
    senders = [subprocess.Popen(["storescu", "-aec", gateway.ae_title, "127.0.0.1",
                                 str(gateway.dimse_port), *map(str, half)], env=dcmtk_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for half in (files[:4], files[4:])]
    assert [s.wait(60) for s in senders] == [0, 0]

    objects = s3_bucket.objects()
    assert sorted(objects) == sorted(_key(f) for f in files)
    for sent in files:
        stored = objects[_key(sent)]
        # the whole stored file, as the files backend keeps it (byte-exact as received: the
        # received data set behind the gateway's file meta, tests/test_dimse.py)
        assert stored == (gateway.data / "s3-cache" / _key(sent)).read_bytes()
        assert pydicom.dcmread(BytesIO(stored)).SOPInstanceUID == \
            pydicom.dcmread(sent).SOPInstanceUID
    (study,) = requests.get(f"{gateway.dicomweb}/studies", timeout=10).json()
    assert study["00201208"]["Value"] == [8]


def test_an_instance_whose_local_copy_is_gone_is_read_back_from_the_bucket(
        make_gateway: Callable[..., GatewayProcess], s3_bucket: S3Bucket,
        tmp_path: Path) -> None:
    gateway = _on_s3(make_gateway, s3_bucket)
    files = fresh_copies(tmp_path, 3)
    study_uid = c_store_all(gateway, files)
    shutil.rmtree(gateway.data / "s3-cache" / study_uid)  # the local cache loses the whole study

    retrieved = requests.get(f"{gateway.dicomweb}/studies/{study_uid}", headers=MULTIPART_DICOM,
                             timeout=30)
    assert retrieved.status_code == 200
    assert retrieved.content.count(b"DICM") == 3
    objects = s3_bucket.objects()
    for path in files:  # back in the cache, as in the bucket
        assert (gateway.data / "s3-cache" / _key(path)).read_bytes() == objects[_key(path)]


def test_a_bucket_that_is_gone_refuses_the_c_store_for_good_and_nothing_is_indexed(
        make_gateway: Callable[..., GatewayProcess], s3_bucket: S3Bucket,
        tmp_path: Path) -> None:
    gateway = _on_s3(make_gateway, s3_bucket)
    s3_bucket.client().delete_bucket(Bucket=s3_bucket.name)

    (path,) = fresh_copies(tmp_path, 1)
    status = c_store(gateway, path)
    assert status.Status == 0x0110  # Processing failure: retrying the same bucket cannot help
    assert "NoSuchBucket" in status.ErrorComment and "storage.s3_bucket" in status.ErrorComment
    assert requests.get(f"{gateway.dicomweb}/studies", timeout=10).json() == []


def test_an_unreachable_object_store_fails_the_c_store_with_a700_so_the_sender_retries(
        make_gateway: Callable[..., GatewayProcess], tmp_path: Path) -> None:
    server = MotoServer(tmp_path)  # its own: this test stops it
    server.start()
    bucket = S3Bucket(server.endpoint, "gw-unreachable")
    bucket.client().create_bucket(Bucket=bucket.name)
    gateway = _on_s3(make_gateway, bucket)
    first, second = fresh_copies(tmp_path, 2)
    assert c_store(gateway, first).Status == 0x0000
    server.stop()

    status = c_store(gateway, second)
    assert status.Status == 0xA700  # Out of Resources: the sender keeps its copy, retries later
    assert "object store unavailable" in status.ErrorComment
    found = requests.get(f"{gateway.dicomweb}/instances", timeout=10).json()
    assert [i["00080018"]["Value"][0] for i in found] == [pydicom.dcmread(first).SOPInstanceUID]


def test_deleting_a_study_removes_its_objects_and_reindex_rebuilds_the_index_from_the_bucket(
        make_gateway: Callable[..., GatewayProcess], s3_bucket: S3Bucket,
        tmp_path: Path) -> None:
    gateway = _on_s3(make_gateway, s3_bucket)
    files = fresh_copies(tmp_path, 4)
    study_uid = c_store_all(gateway, files)
    assert gateway.stop() == 0

    gateway.index_file.unlink()  # index and local cache lost: only the bucket remains
    shutil.rmtree(gateway.data / "s3-cache" / study_uid)
    done = gateway.cli("reindex", "--no-progress")
    assert done.returncode == 0, done.stderr
    gateway.start()
    (study,) = requests.get(f"{gateway.dicomweb}/studies", timeout=10).json()
    assert study["00201208"]["Value"] == [4]

    assert requests.delete(f"{gateway.dicomweb}/studies/{study_uid}",
                           timeout=10).status_code == 204
    assert s3_bucket.objects() == {}


def test_a_bucket_that_cannot_be_used_stops_the_start_with_a_configuration_error(
        make_gateway: Callable[..., GatewayProcess], s3_bucket: S3Bucket) -> None:
    gateway = make_gateway(extra={"storage": s3_bucket.settings(s3_bucket="gw-no-such-bucket")},
                           env=CREDENTIALS)
    done = gateway.cli("reindex", "--no-progress")
    assert done.returncode == 2
    assert "storage.s3_bucket" in done.stderr and "gw-no-such-bucket" in done.stderr


def test_the_s3_backend_needs_a_bucket() -> None:
    with pytest.raises(ConfigError, match=r"storage\.s3_bucket: required"):
        load_settings(environ={}, overrides={"storage": {"backend": "s3"}})


def test_the_cache_keeps_the_most_recently_used_blobs_within_its_limit(
        s3_bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(S3Storage, "CACHE_GRACE_SECONDS", 0.0)
    root = tmp_path / "storage"
    stranger = root / "1.2" / "1.2.3" / "1.2.3.9.dcm"  # a files-backend blob of the same path
    stranger.parent.mkdir(parents=True)
    stranger.write_bytes(b"\0" * 5000)
    os.utime(stranger, (0, 0))
    storage = S3Storage(root, bucket=s3_bucket.name, endpoint_url=s3_bucket.endpoint,
                        cache_max_bytes=2500)
    keys = [instance_key("1.2", "1.2.3", f"1.2.3.{n}") for n in range(5)]
    for age, key in enumerate(keys):
        blob = tmp_path / "blob"
        blob.write_bytes(bytes([age]) * 1000)
        storage.put_file(key, blob, move=True)
        stamp = time.time() - 1000 + age  # the first stored is the least recently used
        os.utime(storage.path_for(key), (stamp, stamp))

    storage.trim_cache()  # (stores past a tenth of the limit also start one in the background)
    assert [storage.file_of(k) for k in keys if Path(storage.file_of(k)).exists()] == \
        [storage.file_of(k) for k in keys[3:]]
    assert stranger.exists()  # the cache is its own directory: nothing else is trimmed
    assert storage.path_for(keys[0]).read_bytes() == bytes([0]) * 1000  # fetched again
    assert sorted(storage.keys()) == sorted(keys)
    storage.delete(keys[0])
    assert not storage.exists(keys[0]) and storage.exists(keys[1])


def test_kill_9_during_parallel_stores_to_s3_loses_nothing_acknowledged(
        make_gateway: Callable[..., GatewayProcess], s3_bucket: S3Bucket,
        tmp_path: Path) -> None:
    gateway = _on_s3(make_gateway, s3_bucket)
    batches = [make_ct_series(tmp_path / f"sender{n}", 40, rows=128) for n in range(4)]
    results: list[dict[Path, int | None]] = [{} for _ in batches]
    acknowledged = threading.Semaphore(0)

    def sender(number: int) -> None:
        for path, status in send_all_progressively(gateway, batches[number]):
            results[number][path] = status
            if status == 0:
                acknowledged.release()

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for _ in range(30):  # mid-stream for sure
        assert acknowledged.acquire(timeout=60), "senders stalled before the kill"
    gateway.kill9()
    for thread in threads:
        thread.join(60)
    acked = [path for batch in results for path, status in batch.items() if status == 0]
    assert len(acked) >= 30 and len(acked) < sum(len(b) for b in batches)

    objects = s3_bucket.objects()  # each acknowledged instance is in the bucket, whole
    for path in acked:
        assert dataset_bytes(path) == _data_set(objects[_key(path)])
    gateway.start()  # the same bucket, cache and index: rows the kill took are recovered
    assert "did not stop cleanly" in gateway.log
    found = requests.get(f"{gateway.dicomweb}/instances", params={"limit": 1000},
                         timeout=10).json()
    present = {item["00080018"]["Value"][0] for item in found}
    assert {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in acked} <= present


def _data_set(blob: bytes) -> bytes:
    """The data set of a Part 10 file held in memory (after its file meta)."""
    return blob[dataset_offset(blob):]


def test_stow_rs_into_the_bucket_and_c_get_of_copies_no_longer_cached(
        make_gateway: Callable[..., GatewayProcess], s3_bucket: S3Bucket,
        tmp_path: Path) -> None:
    require_dcmtk()
    gateway = _on_s3(make_gateway, s3_bucket)
    files = fresh_copies(tmp_path, 3)
    DICOMwebClient(gateway.dicomweb).store_instances(
        datasets=[pydicom.dcmread(path) for path in files])
    assert sorted(s3_bucket.objects()) == sorted(_key(path) for path in files)
    study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
    shutil.rmtree(gateway.data / "s3-cache" / study_uid)

    out = tmp_path / "got"
    out.mkdir()
    got = subprocess.run(
        ["getscu", "-S", "+B", "-aec", gateway.ae_title, "-od", str(out),
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
         "127.0.0.1", str(gateway.dimse_port)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=60)
    assert got.returncode == 0, got.stderr
    received = {pydicom.dcmread(p).SOPInstanceUID: p for p in out.iterdir()}
    for path in files:
        sop = pydicom.dcmread(path).SOPInstanceUID
        assert dataset_bytes(received[sop]) == dataset_bytes(path)
