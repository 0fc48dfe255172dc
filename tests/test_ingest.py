"""The single write path under concurrency (gateway.ingest): stores that run at the same time
share fsyncs and one index commit, yet each succeeds or fails on its own."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pydicom.uid
import pytest
from sqlalchemy import event

import gateway.index
import gateway.ingest
from gateway.bootstrap import build_services
from gateway.config import load_settings
from gateway.errors import OutOfResources

from samples import fresh_copies, synthetic_instance


def _store_concurrently(services: Any, files: list[Path]) -> dict[Path, object]:
    """Store every file at once, one thread each: the result or the OutOfResources raised."""
    outcomes: dict[Path, object] = {}

    def store(path: Path) -> None:
        try:
            outcomes[path] = services.ingest.store_file(path, move=False, source="test")
        except OutOfResources as exc:
            outcomes[path] = exc

    threads = [threading.Thread(target=store, args=(p,)) for p in files]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcomes


def test_concurrent_stores_are_all_indexed_and_one_failure_stays_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(environ={}, overrides={"storage": {"path": str(tmp_path / "data")}})
    services = build_services(settings)
    files = fresh_copies(tmp_path, 24)
    doomed = pydicom.dcmread(files[5], stop_before_pixels=True).SOPInstanceUID
    upsert = services.index.upsert_instance
    upsert_each = gateway.ingest.GroupCommit._upsert_each
    batches: list[int] = []

    def failing_upsert(conn: Any, record: Any, **kwargs: Any) -> None:  # failure injection
        upsert(conn, record, **kwargs)  # its rows are written, then it fails: all must go
        if record.sop_uid == doomed:
            raise RuntimeError("injected index failure")

    def counted(self: Any, conn: Any, ready: list[Any]) -> None:
        batches.append(len(ready))
        upsert_each(self, conn, ready)

    monkeypatch.setattr(services.index, "upsert_instance", failing_upsert)
    monkeypatch.setattr(gateway.ingest.GroupCommit, "_upsert_each", counted)
    outcomes = _store_concurrently(services, files)
    failed = [p for p, o in outcomes.items() if isinstance(o, OutOfResources)]
    assert failed == [files[5]]
    assert batches, "no two stores shared a commit: the savepoints went untested"
    counts = services.index.counts()
    assert counts["instances"] == 23
    study = services.index.study_row(pydicom.dcmread(files[0]).StudyInstanceUID)
    assert study is not None and study["NumberOfStudyRelatedInstances"] == 23
    assert services.index.find_instance(doomed) is None
    services.close()


def test_rows_are_committed_only_after_their_blobs_are_durable_and_a_failed_fsync_stays_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No commit before the blobs it indexes are durable, and an instance whose blob could
    not be made durable is refused (0xA700) and left unindexed, alone in its batch."""
    settings = load_settings(environ={}, overrides={"storage": {"path": str(tmp_path / "data")}})
    services = build_services(settings)
    files = fresh_copies(tmp_path, 12)
    doomed = pydicom.dcmread(files[3], stop_before_pixels=True).SOPInstanceUID
    storage, index = services.storage, services.index
    durable: set[str] = set()
    written: list[str] = []  # blob keys whose rows the open transaction holds
    not_yet_durable_at_commit: list[str] = []
    real_sync, real_upsert = storage.sync, index.upsert_instance

    def slow_sync(keys: Any) -> dict[str, OutOfResources]:  # failure injection
        keys = list(keys)
        threading.Event().wait(0.05)  # a slow disk: more stores queue up meanwhile
        failed = {k: OutOfResources("injected fsync failure") for k in keys if doomed in k}
        failed.update(real_sync([k for k in keys if k not in failed]))
        durable.update(k for k in keys if k not in failed)
        return failed

    def recording_upsert(conn: Any, record: Any, **kwargs: Any) -> None:
        real_upsert(conn, record, **kwargs)
        written.append(kwargs["blob_key"])

    def on_commit(_conn: Any) -> None:
        not_yet_durable_at_commit.extend(k for k in written if k not in durable)
        written.clear()

    monkeypatch.setattr(storage, "sync", slow_sync)
    monkeypatch.setattr(index, "upsert_instance", recording_upsert)
    event.listen(index.engine, "commit", on_commit)
    event.listen(index.engine, "rollback", lambda _conn: written.clear())
    outcomes = _store_concurrently(services, files)
    assert [p for p, o in outcomes.items() if isinstance(o, OutOfResources)] == [files[3]]
    assert index.find_instance(doomed) is None
    assert index.counts()["instances"] == 11
    assert not_yet_durable_at_commit == []
    services.close()


def test_a_lone_store_whose_index_write_fails_leaves_no_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(environ={}, overrides={"storage": {"path": str(tmp_path / "data")}})
    services = build_services(settings)
    (path,) = fresh_copies(tmp_path, 1)
    upsert = services.index.upsert_instance

    def half_written(conn: Any, record: Any, **kwargs: Any) -> None:  # failure injection
        upsert(conn, record, **kwargs)  # the rows are written, then the write fails
        raise RuntimeError("injected index failure")

    monkeypatch.setattr(services.index, "upsert_instance", half_written)
    with pytest.raises(OutOfResources, match="index write failed"):
        services.ingest.store_file(path, move=False, source="test")
    assert services.index.counts() == {"patients": 0, "studies": 0, "series": 0,
                                       "instances": 0}
    services.close()


def _with_new_series(files: list[Path]) -> list[Path]:
    """The same instances moved to a new series of their study (new UIDs, same files)."""
    series_uid = pydicom.uid.generate_uid()
    for path in files:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(path)
    return files


def test_a_machine_crash_loses_no_acknowledged_instance_of_the_index(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store path's commits do not wait for the WAL to reach the disk (gateway.index,
    "Durability on SQLite"). A machine crash keeps exactly what the last durable commit made
    durable: here the database as it was after each durable commit (a durable commit fsyncs
    the whole WAL) stands for the disk. Restored to that, the index lacks rows of instances
    whose stores succeeded; the start after the unclean stop indexes them all again."""
    import shutil
    import sqlite3

    from gateway import index as index_module

    monkeypatch.setattr(index_module, "SYNC_SECONDS", 3600.0)  # no periodic sync meanwhile
    data = tmp_path / "data"
    settings = load_settings(environ={}, overrides={"storage": {"path": str(data)}})
    services = build_services(settings)
    database = data / "index.sqlite"
    disk = tmp_path / "disk.sqlite"  # the index as a crash would find it
    write = services.index.write

    @contextmanager
    def recording_write(*, durable: bool = True) -> Any:
        with write(durable=durable) as conn:
            yield conn
        if durable:
            with sqlite3.connect(database) as live, sqlite3.connect(disk) as copy:
                live.backup(copy)

    monkeypatch.setattr(services.index, "write", recording_write)
    assert services.index.begin_running() is False  # a first start: nothing to recover
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = fresh_copies(tmp_path / "a", 6)
    second = _with_new_series(fresh_copies(tmp_path / "b", 4))
    for path in first + second:
        assert services.ingest.store_file(path, move=False, source="test").outcome == "stored"
    stored = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in first + second}
    services.index.close(sync=False)  # the machine stops: no clean end, no final sync

    shutil.copyfile(disk, database)
    for leftover in (data / "index.sqlite-wal", data / "index.sqlite-shm"):
        leftover.unlink(missing_ok=True)
    restarted = build_services(settings)
    lost = {uid for uid in stored if restarted.index.find_instance(uid) is None}
    assert lost, "every commit was durable: the test does not exercise a lost commit"
    assert restarted.index.begin_running() is True
    assert restarted.ingest.recover() == len(lost)
    assert all(restarted.index.find_instance(uid) is not None for uid in stored)
    study = restarted.index.study_row(pydicom.dcmread(first[0]).StudyInstanceUID)
    assert study is not None
    assert (study["NumberOfStudyRelatedSeries"], study["NumberOfStudyRelatedInstances"]) == (2, 10)
    restarted.index.end_running()
    assert restarted.index.begin_running() is False  # that stop was clean
    restarted.close()


def test_an_instance_acknowledged_before_its_index_rows_survives_a_crash_in_between(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """"Index later" (gateway.ingest): the lean receiver answers a C-STORE once the blob is
    durable and its series marked for recovery, and commits the index rows after the
    response. A crash between the two loses nothing: the next start indexes the blob."""
    from gateway import index as index_module

    monkeypatch.setattr(index_module, "SYNC_SECONDS", 3600.0)  # no periodic sync meanwhile
    data = tmp_path / "data"
    settings = load_settings(environ={}, overrides={"storage": {"path": str(data)}})
    services = build_services(settings)
    assert services.index.begin_running() is False
    first, acknowledged = fresh_copies(tmp_path, 2)
    services.ingest.store_file(first, move=False, source="test")  # an older store, indexed
    result = services.ingest.store_file(acknowledged, move=True, source="test",
                                        defer_index=True)
    assert result.outcome == "stored" and result.commit_index is not None
    assert not acknowledged.exists()  # moved into the store, and durable (fsync'd) there
    assert services.index.find_instance(result.sop_uid) is None  # its rows: not yet
    assert (result.study_uid, result.series_uid) in services.index.recovery_candidates()
    services.index.close(sync=False)  # the machine stops before result.commit_index() ran

    restarted = build_services(settings)
    assert restarted.index.begin_running() is True
    assert restarted.ingest.recover() == 1
    assert restarted.index.find_instance(result.sop_uid) is not None
    assert restarted.index.counts()["instances"] == 2
    restarted.close()


def test_a_new_series_is_marked_for_recovery_beside_the_blob_flush_and_before_the_answer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """"Index later": the recovery mark of a new series is a durable commit, a flush of its
    own. It runs beside the blob's flush, after the previous instance's index rows (the
    ``meanwhile`` work), and is done when store_file returns, so the acknowledgement still
    comes after it; a mark that cannot be written fails the store."""
    settings = load_settings(environ={}, overrides={"storage": {"path": str(tmp_path / "data")}})
    services = build_services(settings)
    beside: list[str] = []
    first = services.ingest.store_file(
        synthetic_instance(tmp_path), move=True, source="test", defer_index=True,
        meanwhile=lambda: beside.append(threading.current_thread().name))
    assert beside and beside[0].startswith("beside-fsync")
    assert (first.study_uid, first.series_uid) in services.index.recovery_candidates()

    def unwritable(series: Any) -> Any:  # failure injection: the index refuses the mark
        raise OutOfResources("index unavailable: injected")

    monkeypatch.setattr(services.index, "store_write", unwritable)
    with pytest.raises(OutOfResources, match="injected"):
        services.ingest.store_file(synthetic_instance(tmp_path), move=True, source="test",
                                   defer_index=True, meanwhile=first.commit_index)
    services.close()


def test_index_rows_committed_after_the_response_are_retried_then_logged_never_raised(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    settings = load_settings(environ={}, overrides={"storage": {"path": str(tmp_path / "data")}})
    services = build_services(settings)
    (path,) = fresh_copies(tmp_path, 1)
    result = services.ingest.store_file(path, move=True, source="test", defer_index=True)
    assert result.commit_index is not None
    upsert = services.index.upsert_instance
    attempts: list[int] = []

    def failing_once(conn: Any, record: Any, **kwargs: Any) -> None:  # failure injection
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("injected index failure")
        upsert(conn, record, **kwargs)

    monkeypatch.setattr(services.index, "upsert_instance", failing_once)
    result.commit_index()  # the first attempt fails, the retry commits
    assert len(attempts) == 2
    assert services.index.find_instance(result.sop_uid) is not None
    result.commit_index()  # the receiver calls it again after a store ran it beside a flush
    assert len(attempts) == 2  # committed once

    (tmp_path / "other").mkdir()
    (other,) = fresh_copies(tmp_path / "other", 1)
    later = services.ingest.store_file(other, move=True, source="test", defer_index=True)
    assert later.commit_index is not None
    monkeypatch.setattr(services.index, "upsert_instance", _always_failing)
    with caplog.at_level("ERROR", logger="gateway.ingest"):
        later.commit_index()  # both attempts fail: logged, not raised
    assert services.index.find_instance(later.sop_uid) is None
    assert f"{later.sop_uid} was acknowledged" in caplog.text
    assert "imaging-gateway reindex" in caplog.text
    services.close()


def _always_failing(conn: Any, record: Any, **kwargs: Any) -> None:
    raise RuntimeError("injected index failure")


def test_an_object_replaced_in_place_before_a_crash_is_indexed_again_from_its_blob(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """duplicate_policy = "replace": the new object takes the old one's blob key, so after a
    crash that took its new row the key is still named, by the old row. Recovery tells the
    two apart by time: that blob was written after its row."""
    from gateway import index as index_module

    monkeypatch.setattr(index_module, "SYNC_SECONDS", 3600.0)
    data = tmp_path / "data"
    settings = load_settings(environ={}, overrides={
        "storage": {"path": str(data), "duplicate_policy": "replace"}})
    services = build_services(settings)
    assert services.index.begin_running() is False
    (original,) = fresh_copies(tmp_path, 1)
    first = services.ingest.store_file(original, move=False, source="test")
    services.index.sync()  # the original row is durable
    # File times come from the kernel's coarse clock, which lags time.time() by up to a tick
    # (4 ms here): a replacement written within that tick of the row could look older than it.
    time.sleep(0.05)
    replacement = tmp_path / "replacement.dcm"
    ds = pydicom.dcmread(original)
    ds.InstanceNumber = 99
    ds.save_as(replacement)
    result = services.ingest.store_file(replacement, move=True, source="test",
                                        defer_index=True)
    assert result.outcome == "replaced" and result.commit_index is not None
    services.index.close(sync=False)  # the machine stops before the new row is committed

    restarted = build_services(settings)
    assert restarted.index.begin_running() is True
    assert _instance_number(data, first.sop_uid) == 1  # the old row, as the crash left it
    assert restarted.ingest.recover() == 1
    assert _instance_number(data, first.sop_uid) == 99
    assert restarted.ingest.recover() == 0  # the row is current now
    restarted.close()


def _instance_number(data: Path, sop_uid: str) -> int:
    import sqlite3

    with sqlite3.connect(data / "index.sqlite") as db:
        (number,) = db.execute('SELECT "InstanceNumber" FROM instance '
                               'WHERE "SOPInstanceUID" = ?', (sop_uid,)).fetchone()
    return int(number)


def test_a_store_whose_response_cannot_be_sent_is_still_indexed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lean receiver commits a C-STORE's index rows after its response ("Index later").
    When that response cannot be sent (the peer is gone), the blob is stored all the same
    and must not be left without its rows until some later unclean stop."""
    import time

    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    from gateway import receiver
    from gateway.dimse import DimseNode
    from gateway.upper_layer import C_STORE_RSP

    from conftest import free_port

    settings = load_settings(environ={}, overrides={
        "storage": {"path": str(tmp_path / "data")},
        "dimse": {"host": "127.0.0.1", "port": free_port(), "ae_title": "LOST_RSP"}})
    services = build_services(settings)
    respond = receiver.Association.respond

    def lost_store_response(self: Any, message: Any, command_field: int, *args: Any,
                            **kwargs: Any) -> None:  # failure injection
        if command_field == C_STORE_RSP:
            raise OSError("connection reset by peer")
        respond(self, message, command_field, *args, **kwargs)

    monkeypatch.setattr(receiver.Association, "respond", lost_store_response)
    node = DimseNode(settings, services.ingest)
    _host, port = node.start()
    (path,) = fresh_copies(tmp_path, 1)
    ds = pydicom.dcmread(path)
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="LOST_RSP")
    assert assoc.is_established
    assoc.send_c_store(ds)  # no response comes: the gateway ends the association
    assoc.abort()
    deadline = time.monotonic() + 30
    while services.index.find_instance(ds.SOPInstanceUID) is None \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    node.stop(drain_seconds=1)
    assert services.index.find_instance(ds.SOPInstanceUID) is not None
    services.close()


def test_stores_leave_checkpoints_to_the_index_syncer(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A store's commit never stalls to copy the WAL into the database (SQLite would do it
    inside whichever commit crosses 1000 WAL pages); the syncer's sync checkpoints."""
    # The syncer's own period must not pass while the instances are stored (on a slow
    # machine it would: then it checkpoints and the database grows during the stores).
    monkeypatch.setattr(gateway.index, "SYNC_SECONDS", 3600.0)
    settings = load_settings(environ={}, overrides={"storage": {"path": str(tmp_path / "data")}})
    services = build_services(settings)
    database = Path(services.index.engine.url.database or "")
    wal = database.with_name(database.name + "-wal")
    before = database.stat().st_size
    for path in fresh_copies(tmp_path, 260):
        services.ingest.store_file(path, move=False)
    assert wal.stat().st_size > 1000 * 4096  # past SQLite's default threshold, unchecked
    assert database.stat().st_size == before  # nothing copied into the database yet
    services.index.sync()
    assert database.stat().st_size > before
    assert services.index.counts()["instances"] == 260
    services.close()
