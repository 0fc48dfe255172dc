"""Blob storage: keys come only from valid UIDs (PS3.5 §9.1), and writes are atomic."""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidInstance, OutOfResources
from gateway.storage import FileStorage, instance_key, is_valid_uid

UID_ALPHABET = st.sampled_from(list("0123456789./\\\x00a %"))


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(st.text(), st.text(UID_ALPHABET), st.from_regex(r"[0-9.]{1,70}")),
                min_size=3, max_size=3))
def test_any_uid_string_yields_a_path_inside_the_root_or_is_rejected(
        tmp_path_factory: pytest.TempPathFactory, uids: list[str]) -> None:
    root = tmp_path_factory.getbasetemp() / "hypothesis-root"
    storage = FileStorage(root, fsync=False)
    try:
        key = instance_key(*uids)
    except InvalidInstance:
        assert not all(is_valid_uid(u) for u in uids)
        return
    path = storage.path_for(key)
    assert path.is_relative_to(storage.root)
    assert path.parent.parent.parent == storage.root
    assert path.name == f"{uids[2]}.dcm"


@pytest.mark.parametrize("uid, valid", [
    ("1.2.840.10008.1.2.1", True), ("0", True), ("1.0.3", True),
    ("1.02.3", False), ("1..2", False), (".1.2", False), ("1.2.", False), ("", False),
    ("1." + "1" * 63, False), ("1.2.abc", False), ("1.2 ", False), ("../1", False),
])
def test_uid_syntax_follows_ps3_5_section_9_1(uid: str, valid: bool) -> None:
    assert is_valid_uid(uid) is valid


def test_put_is_atomic_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "root")
    key = instance_key("1.2.3", "1.2.3.4", "1.2.3.4.5")
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_bytes(b"first")
    second.write_bytes(b"second")
    storage.put_file(key, first, move=False)
    storage.put_file(key, second, move=True)
    assert storage.path_for(key).read_bytes() == b"second"
    assert list(storage.staging_dir().iterdir()) == []
    assert list(storage.keys()) == [key]
    assert first.exists() and not second.exists()  # copied vs taken over


def test_write_errors_become_out_of_resources(tmp_path: Path) -> None:
    """A failing file system (here: the staging directory is gone and a file sits in its
    place) surfaces as 0xA700, never as a crash or a partial blob."""
    storage = FileStorage(tmp_path / "root")
    staging = storage.staging_dir()
    staging.rmdir()
    staging.write_text("not a directory")
    key = instance_key("1.2.3", "1.2.3.4", "1.2.3.4.5")
    with pytest.raises(OutOfResources) as raised:
        source = tmp_path / "source"
        source.write_bytes(b"data")
        storage.put_file(key, source, move=False)
    assert raised.value.status == 0xA700
    assert not storage.path_for(key).exists()


def test_path_for_refuses_keys_that_are_not_instance_keys(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "root")
    for key in ("../x.dcm", "1/2/../../../x.dcm", "/etc/passwd", "1.2/3.4/5.6.txt"):
        with pytest.raises(ValueError):
            storage.path_for(key)


# -- the staging file a received data set streams into (gateway.receiver.ReceiveSink) --------


def test_staging_files_are_unique_and_skip_leftovers(tmp_path, monkeypatch):
    from gateway.receiver import ReceiveSink

    monkeypatch.setattr(ReceiveSink, "directory", tmp_path)
    first = ReceiveSink()
    # A file left by an earlier process that had this process id: never reused or truncated.
    leftover = tmp_path / f"{os.getpid()}-{int(first.name.rsplit('-', 1)[1][:-4]) + 1}.dcm"
    leftover.write_bytes(b"earlier")
    second = ReceiveSink()
    assert first.name != second.name and Path(second.name) != leftover
    assert leftover.read_bytes() == b"earlier"
    for sink in (first, second):
        sink.close()


def test_a_received_data_set_is_written_whole_through_the_writeback_steps(tmp_path,
                                                                          monkeypatch):
    from gateway.receiver import ReceiveSink

    monkeypatch.setattr(ReceiveSink, "directory", tmp_path)
    monkeypatch.setattr(ReceiveSink, "writeback", True)  # as over a storage that fsyncs
    started: list[tuple[int, int]] = []
    monkeypatch.setattr("gateway.storage.start_writeback",
                        lambda fd, offset, length: started.append((offset, length)))
    payload = os.urandom(3 * ReceiveSink.WRITEBACK_STEP + 12345)
    sink = ReceiveSink()
    for start in range(0, len(payload), 16384):  # as PDVs arrive
        sink.write(payload[start:start + 16384])
    sink.finish()
    sink.close()
    assert Path(sink.name).read_bytes() == payload
    # Writeback of each step began while later data was still arriving, contiguously; the
    # tail's began when the last data arrived (while the header is parsed, before the fsync).
    assert len(started) == 4 and started[0][0] == 0
    assert all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(started))
    assert started[-1][0] + started[-1][1] == len(payload)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_start_writeback_uses_sync_file_range_on_linux(tmp_path):
    from gateway import storage

    assert storage._SYNC_FILE_RANGE is not None
    path = tmp_path / "blob"
    with open(path, "wb") as handle:
        handle.write(b"x" * 100_000)
        handle.flush()
        storage.start_writeback(handle.fileno(), 0, 100_000)
    assert path.stat().st_size == 100_000


def test_the_staging_pool_keeps_empty_files_ready_and_removes_the_idle_ones_on_close(tmp_path):
    """Receptions take a file created ahead of time (creating one can cost milliseconds);
    the pool refills in the background, never hands a file out twice, and a clean stop
    leaves only the files takers still hold."""
    from gateway.storage import StagingPool

    storage = FileStorage(tmp_path / "data")
    pool = storage.staging_pool()
    ready = storage.staging_dir() / StagingPool.SUBDIRECTORY
    taken = []
    for _ in range(3):
        name, fd = pool.take()
        os.write(fd, b"received")
        os.close(fd)
        taken.append(name)
    assert len(set(taken)) == 3

    def idle() -> set[str]:
        return {str(p) for p in ready.iterdir() if p.stat().st_size == 0}

    deadline = time.monotonic() + 10
    while len(idle()) < StagingPool.SIZE and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(idle()) == StagingPool.SIZE and not idle() & set(taken)
    storage.close()
    assert {str(p) for p in ready.iterdir()} == set(taken)
    assert all(Path(name).read_bytes() == b"received" for name in taken)


@pytest.mark.parametrize(("kind", "setting", "directory_synced"), [
    ("ext4", "auto", False), ("xfs", "auto", False),  # the blob's fsync carries its name
    ("btrfs", "auto", True), ("nfs4", "auto", True), ("", "auto", True),
    ("ext4", "always", True),
])
def test_a_new_blobs_directory_is_fsynced_unless_its_own_fsync_made_the_name_durable(
        tmp_path, monkeypatch, kind, setting, directory_synced):
    from gateway import storage as storage_module

    synced: list[str] = []
    monkeypatch.setattr(storage_module, "file_system_type", lambda path: kind)
    monkeypatch.setattr(storage_module, "_fsync_dir", lambda path: synced.append(str(path)))
    storage = FileStorage(tmp_path / "root", fsync_directories=setting)
    key = instance_key("1.2.3", "1.2.3.4", "1.2.3.4.5")
    source = tmp_path / "received.dcm"
    source.write_bytes(b"data")
    storage.put_file(key, source, move=True, durable=False)
    assert storage.sync([key]) == {}
    series_directory = str(storage.path_for(key).parent)
    assert (series_directory in synced) is directory_synced
    # A directory made for the blob is always fsync'd in its parent, whatever the setting.
    assert str(storage.path_for(key).parent.parent) in synced


def test_the_file_system_of_a_path_is_read_from_the_mount_table(tmp_path):
    from gateway.storage import file_system_type

    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    assert file_system_type("/") == next(f[2] for f in mounts if f[1] == "/")
    assert file_system_type(str(tmp_path)) != ""


def _cached_pages(path: Path) -> int:
    """How many pages of ``path`` are in the page cache (mincore(2) over a mapping of it,
    which by itself reads nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    resident = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as handle, \
            mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY) as mapping:
        start = ctypes.c_char.from_buffer(mapping)
        try:
            assert libc.mincore(ctypes.c_void_p(ctypes.addressof(start)),
                                ctypes.c_size_t(size), resident) == 0, ctypes.get_errno()
        finally:
            del start
    return sum(flag & 1 for flag in resident)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and fadvise: Linux")
@pytest.mark.parametrize("received", [True, False], ids=["received", "imported"])
@pytest.mark.parametrize("keep", [False, True], ids=["released", "cache_new_blobs"])
def test_a_new_blob_leaves_the_page_cache_once_durable_unless_configured_to_stay(
        tmp_path, received, keep):
    storage = FileStorage(tmp_path / "root", cache_new_blobs=keep)
    key = instance_key("1.2.3", "1.2.3.4", "1.2.3.4.5")
    source = storage.staging_dir() / "received.dcm"
    data = os.urandom(64 * mmap.PAGESIZE)
    source.write_bytes(data)
    if received:  # C-STORE, STOW-RS: moved into place, then made durable
        storage.put_file(key, source, move=True, durable=False)
        assert _cached_pages(storage.path_for(key)) == 64  # just written: all in memory
        assert storage.sync([key]) == {}
    else:  # bulk import: copied and made durable in one call
        assert _cached_pages(source) == 64
        storage.put_file(key, source, move=False)
    assert _cached_pages(storage.path_for(key)) == (64 if keep else 0)
    assert storage.path_for(key).read_bytes() == data  # released from memory, not lost
