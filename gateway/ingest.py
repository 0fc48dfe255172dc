"""The single write path: C-STORE, STOW-RS and bulk import all call :meth:`Ingest.store_file`.

Order of operations (the durability promise, PS3.4 B.2.3 "Success" only once stored):

1. parse the header, pixel data skipped (:func:`gateway.records.read_instance`), and check
   the file is complete;
2. validate: UIDs present and valid, SOP Class/Instance as declared by the sender, Study UID as
   the STOW-RS URL demands;
3. compare with what is stored under the same SOP Instance UID (identical → success, nothing
   changes; different → the configured duplicate policy);
4. move the blob into place (rename; a new instance is not yet indexed) and make it durable
   (fsync of the file, and of its directory where the file system needs it:
   ``storage.fsync_directories``), each store in its own thread, so the flushes of concurrent
   stores overlap;
5. in ONE index transaction, upsert patient/study/series/instance rows, refresh the counts
   and queue the study in the publish outbox; concurrent stores share the commit
   (:class:`GroupCommit`);
6. only then report success. Any failure before 6 raises a :class:`~gateway.errors.StoreError`
   carrying the DIMSE status; a blob left without an index row is never served and is picked
   up by ``reindex``.

**Index later** (``defer_index=True``, the C-STORE path of the lean receiver, on SQLite): step 5
runs after the response instead of before it. The receiver (``gateway.receiver``,
``Association._store``) hands it to the next store on the association as ``meanwhile``, which
runs it on a helper thread while the next blob is flushed to disk: step 4's fsync is a
millisecond in which the association thread waits with the GIL released, so the commit
costs the association no time. If the sender goes quiet for 5 ms instead, the commit runs in
that idle time; it never waits more than 50 ms, and it runs before anything else the
association does (a C-FIND, a C-MOVE, the release, the end of the connection) and before the
next response. What makes that safe: the blob is durable (step 4) and its series is marked
for recovery in a durable commit (gateway.index, "Durability on SQLite") before the response,
exactly what the non-durable commit of step 5 already relies on: a crash between the response
and the commit is recovered at the next start like a commit the crash took from the WAL. What
it changes: other associations and HTTP see a streamed instance one instance later (a few
milliseconds), the last of a burst 5 ms after its response. A commit that fails after the
response is retried once, then logged as an error naming the blob, which ``reindex`` indexes.
PostgreSQL's commits are durable and need no recovery marks, so there the response always
waits for step 5.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydicom
from sqlalchemy.engine import Connection

from gateway import metrics
from gateway.errors import (
    DuplicateInstance,
    InvalidInstance,
    OutOfResources,
    RejectedInstance,
    SOPClassMismatch,
    StoreError,
    StudyMismatch,
)
from gateway.index import Index, StoredInstance
from gateway.records import InstanceRecord, read_instance
from gateway.storage import FileStorage, instance_key

log = logging.getLogger("gateway.ingest")

Outcome = Literal["stored", "unchanged", "replaced", "rejection-applied"]

#: Key Object Selection Document Storage (PS3.4 B.5).
KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
#: Document titles of IOCM rejection notes (PS3.16 CID 7011; IHE RAD TF-1 IOCM), by DCM code.
REJECTION_TITLES = {
    "113001": "Rejected for Quality Reasons",
    "113037": "Rejected for Patient Safety Reasons",
    "113038": "Incorrect Modality Worklist Entry",
    "113039": "Data Retention Policy Expired",
}


@dataclass(frozen=True)
class StoreResult:
    """A stored (or already present) instance."""

    outcome: Outcome
    sop_class_uid: str
    sop_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    #: With ``defer_index``: commits the index rows; call it once the response is sent. It
    #: raises nothing (a failure is retried, then logged) and commits once however often and
    #: from however many threads it is called (a call while another runs waits for it).
    #: None when nothing is left to do.
    commit_index: Callable[[], None] | None = field(default=None, compare=False, repr=False)
    #: Bytes written to storage (the blob stored or replaced); 0 when nothing was written.
    blob_size: int = 0


def dataset_offset(path: Path) -> int:
    """Byte offset where the data set starts (after preamble, 'DICM' and the file meta group)."""
    with open(path, "rb") as handle:
        head = handle.read(144)
        # (0002,0000) UL File Meta Information Group Length, explicit VR little endian
        if len(head) == 144 and head[132:138] == b"\x02\x00\x00\x00UL":
            return 144 + int.from_bytes(head[140:144], "little")
        from pydicom.filereader import _read_file_meta_info, read_preamble  # rare: no length

        handle.seek(0)
        read_preamble(handle, False)
        _read_file_meta_info(handle)
        return handle.tell()


def same_dataset(first: Path, second: Path) -> bool:
    """True when the two Part 10 files hold byte-identical data sets (their file meta groups
    may differ: the same object sent by another sender or through another protocol)."""
    offset_a, offset_b = dataset_offset(first), dataset_offset(second)
    if first.stat().st_size - offset_a != second.stat().st_size - offset_b:
        return False
    with open(first, "rb") as a, open(second, "rb") as b:
        a.seek(offset_a)
        b.seek(offset_b)
        while chunk := a.read(1 << 20):
            if chunk != b.read(len(chunk)):
                return False
    return True


@dataclass
class _Pending:
    """One instance whose blob is in place and whose index rows are to be committed."""

    record: InstanceRecord
    key: str
    size: int
    source: str | None
    finished: bool = False
    error: StoreError | None = None


class GroupCommit:
    """Commits the index rows of durable blobs, several stores at a time.

    Every store waits until its rows are committed, exactly as if it were alone. But when
    stores run concurrently (several associations, STOW-RS requests), the first to arrive
    commits everything that queued up meanwhile: one index commit for the lot (on SQLite it
    does not wait for the disk either, see :mod:`gateway.index`). Leader/followers, no extra
    thread: a lone sender pays nothing for it. Each instance gets its own savepoint, so one
    bad row cannot fail the others. Only a blob already
    durable is queued here (:meth:`Ingest.store_file` makes it so first, in the storing
    thread: the flushes of concurrent stores then overlap instead of queueing behind one
    leader).
    """

    def __init__(self, index: Index) -> None:
        self.index = index
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._busy = False

    def commit(self, item: _Pending) -> None:
        """Return once ``item`` is durable and indexed; raise its StoreError otherwise."""
        batch: list[_Pending] | None = None
        with self._cond:
            self._queue.append(item)
            while not item.finished:
                if not self._busy:
                    batch, self._queue, self._busy = self._queue, [], True
                    break
                self._cond.wait()
        if batch is not None:
            try:
                self._commit(batch)
            finally:
                with self._cond:
                    for pending in batch:
                        pending.finished = True
                    self._busy = False
                    self._cond.notify_all()
        if item.error is not None:
            raise item.error

    def _commit(self, batch: list[_Pending]) -> None:
        # Not waiting for the disk unless a series needs marking (gateway.index,
        # "Durability on SQLite").
        series = {p.record.series_uid: p.record.study_uid for p in batch}
        try:
            with self.index.store_write(series) as conn:
                if len(batch) == 1:  # alone, the transaction is its savepoint: a failure
                    self._upsert(conn, batch[0])  # rolls it back
                else:
                    self._upsert_each(conn, batch)
        except StoreError as exc:
            for pending in batch:
                pending.error = pending.error or exc
        except Exception as exc:
            for pending in batch:
                pending.error = pending.error or OutOfResources(f"index unavailable: {exc}")

    def _upsert_each(self, conn: Connection, ready: list[_Pending]) -> None:
        """Several instances in one transaction, each in its own savepoint."""
        # On SQLite straight to the driver, in the transaction Index.write began there (as
        # the store path's statements run): through SQLAlchemy the savepoints cost ~20 µs
        # more each, a tenth of what a batch of eight spends per instance on its rows.
        driver: Any = conn.connection.driver_connection if self.index.is_sqlite else None
        run: Any = driver.execute if driver is not None else conn.exec_driver_sql
        for number, pending in enumerate(ready):
            savepoint = f"instance_{number}"
            run(f"SAVEPOINT {savepoint}")
            try:
                self._upsert(conn, pending)
            except Exception:
                run(f"ROLLBACK TO SAVEPOINT {savepoint}")
            run(f"RELEASE SAVEPOINT {savepoint}")

    def _upsert(self, conn: Connection, pending: _Pending) -> None:
        try:
            self.index.upsert_instance(conn, pending.record, blob_key=pending.key,
                                       blob_size=pending.size, source=pending.source)
        except Exception as exc:
            log.exception("index row of %s not written", pending.record.sop_uid)
            pending.error = OutOfResources(f"index write failed: {exc}")
            raise


class _RunOnce:
    """``work`` run at most once, by whichever thread calls first; a call while another
    thread runs it waits for it to finish."""

    __slots__ = ("_lock", "_work")

    def __init__(self, work: Callable[[], None]) -> None:
        self._work: Callable[[], None] | None = work
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            work, self._work = self._work, None
            if work is not None:
                work()


_HELPERS: ThreadPoolExecutor | None = None
_HELPERS_LOCK = threading.Lock()


def _helpers() -> ThreadPoolExecutor:
    """The threads that run ``meanwhile`` work beside a flush (created on first use)."""
    global _HELPERS
    with _HELPERS_LOCK:
        if _HELPERS is None:
            _HELPERS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="beside-fsync")
        return _HELPERS


class Ingest:
    """Stores instances into a :class:`FileStorage` and an :class:`Index`."""

    def __init__(self, storage: FileStorage, index: Index, *,
                 duplicate_policy: str = "reject", min_free_bytes: int = 0) -> None:
        self.storage = storage
        self.index = index
        self.duplicate_policy = duplicate_policy
        self.min_free_bytes = min_free_bytes
        self._group = GroupCommit(index)

    def store_file(
        self,
        path: Path,
        *,
        move: bool,
        expected_sop_class: str | None = None,
        expected_sop_uid: str | None = None,
        expected_study_uid: str | None = None,
        source: str | None = None,
        defer_index: bool = False,
        meanwhile: Callable[[], None] | None = None,
    ) -> StoreResult:
        """Validate and durably store the Part 10 file at ``path``.

        Parameters
        ----------
        path
            A complete Part 10 file (preamble, file meta, data set as received).
        move
            The file may be moved into the store (received into the staging area): on success
            it is gone from ``path`` (moved, or removed when nothing needed storing);
            otherwise it is copied and left alone (bulk import).
        expected_sop_class, expected_sop_uid
            The SOP Class/Instance the sender declared (C-STORE Affected SOP Class/Instance,
            the negotiated abstract syntax); a mismatch is 0xA900 / 0xC000.
        expected_study_uid
            STOW-RS ``/studies/{uid}``: instances of other studies fail (0xC409).
        source
            Who sent it (calling AE title, ``STOW-RS``, ``import``), for the index and logs.
        defer_index
            Return before the index rows are committed, with
            :attr:`StoreResult.commit_index` to call after the response ("Index later" in the
            module docstring; on SQLite only, elsewhere it changes nothing).
        meanwhile
            Work to run on a helper thread while this blob is being flushed to disk (the
            previous instance's ``commit_index``, see "Index later"): the flush is ~1 ms of
            waiting with the GIL released, which the work fills. It runs only where a new blob
            is fsync'd; elsewhere, and when this call fails first, it does not run at all, so
            the caller must run it after: it must be safe to call twice, the second call
            waiting for the first to finish, as :attr:`StoreResult.commit_index` is.

        Raises
        ------
        gateway.errors.StoreError
            Not stored; ``status`` tells why (and whether a retry can help).
        """
        try:
            result = self._store(path, move, expected_sop_class, expected_sop_uid,
                                 expected_study_uid, source, defer_index, meanwhile)
        except StoreError as exc:
            metrics.store_failed(exc.status)
            raise
        except Exception:
            metrics.store_failed(None)
            raise
        metrics.stored(result.outcome, result.blob_size)
        return result

    def _store(self, path: Path, move: bool, expected_sop_class: str | None,
               expected_sop_uid: str | None, expected_study_uid: str | None,
               source: str | None, defer_index: bool,
               meanwhile: Callable[[], None] | None) -> StoreResult:
        """:meth:`store_file`'s work."""
        record = read_instance(path)
        self._validate(record, expected_sop_class, expected_sop_uid, expected_study_uid)
        if record.sop_class_uid == KOS_SOP_CLASS:
            note = rejection_note(path)
            if note is not None:
                self._apply_rejection(record, *note)
                if move:
                    path.unlink(missing_ok=True)
                return self._result("rejection-applied", record)
        rejection, existing = self.index.prior_state(record.sop_uid)
        if rejection is not None:
            raise RejectedInstance(
                f"SOP Instance {record.sop_uid} was rejected by note {rejection[1]} "
                f"({REJECTION_TITLES.get(rejection[0], rejection[0])}); it is not stored again")
        outcome: Outcome = "stored"
        if existing is not None:
            try:
                stored = self.storage.path_for(existing.blob_key)
            except OSError as exc:  # an object store that cannot be read now
                raise OutOfResources(f"the stored copy of SOP Instance {record.sop_uid} "
                                     f"cannot be compared now: {exc}") from exc
            if not stored.is_file():
                pass  # the index lost its blob: store this one
            elif same_dataset(path, stored):
                if move:
                    path.unlink(missing_ok=True)
                return self._result("unchanged", record)
            elif self.duplicate_policy == "reject":
                raise DuplicateInstance(
                    f"SOP Instance {record.sop_uid} is already stored with different content "
                    "(duplicate_policy = reject)")
            outcome = "replaced"
        key = instance_key(record.study_uid, record.series_uid, record.sop_uid)
        self._check_space()
        size = os.path.getsize(path)  # read just now: it is there
        if existing is not None and existing.blob_key == key and \
                os.path.exists(self.storage.file_of(key)):
            # An acknowledged blob is replaced in place: the new one is durable before its
            # name takes the old one's, so a crash in between leaves the old one whole.
            self.storage.put_file(key, path, move=move, durable=True)
        else:
            # A new name: moved into place first, then made durable (file, then directory);
            # until its row is committed, nothing names it.
            self.storage.put_file(key, path, move=move, durable=False)
            # A new series' recovery mark (defer_index) is a durable index commit, a flush of
            # its own: beside the blob's, it overlaps it instead of following it (once per
            # series, ~10 ms here).
            mark = (lambda: self._mark_for_recovery(record)) if defer_index and \
                self.index.needs_mark(record.series_uid, time.time()) else None
            failed = self._sync(key, meanwhile, mark)
            if failed:
                raise failed[key]
        pending = _Pending(record, key, size, source)
        replaced_key = existing.blob_key if existing is not None and \
            existing.blob_key != key else None
        if defer_index and self.index.is_sqlite:
            self._mark_for_recovery(record)  # when not beside the flush (or it was not needed)
            return self._result(outcome, record, _RunOnce(
                lambda: self._commit_acknowledged(pending, replaced_key)), size)
        self._commit(pending, replaced_key)
        return self._result(outcome, record, blob_size=size)

    def _sync(self, key: str, *beside: Callable[[], None] | None) -> dict[str, OutOfResources]:
        """Step 4's flush of a newly named blob, with the ``beside`` work run meanwhile on a
        helper thread, in order; the flush returns once that work is done too, and an
        exception of it fails the store. Without fsync nothing runs beside (the caller runs
        it after)."""
        work = [w for w in beside if w is not None]
        if not work or not self.storage.fsync:
            return self.storage.sync([key])

        def run_all() -> None:
            for each in work:
                each()

        helper = _helpers().submit(run_all)
        try:
            failed = self.storage.sync([key])
        finally:
            error = helper.exception()  # waits for it
        if error is not None:
            raise error
        return failed

    def _commit(self, pending: _Pending, replaced_key: str | None) -> None:
        """Step 5: the index rows of a durable blob; then the blob it replaced goes."""
        self._group.commit(pending)
        if replaced_key is not None:
            try:
                self.storage.delete(replaced_key)
            except OSError as exc:  # stored and indexed all the same; only a leftover stays
                log.error("blob %s, replaced by %s, could not be deleted (%s); reindex would "
                          "bring it back", replaced_key, pending.key, exc)

    def _mark_for_recovery(self, record: InstanceRecord) -> None:
        """Before an instance is acknowledged ahead of its index rows: its series is marked
        for recovery in a durable commit, unless it was marked recently."""
        if self.index.needs_mark(record.series_uid, time.time()):
            with self.index.store_write({record.series_uid: record.study_uid}):
                pass

    def _commit_acknowledged(self, pending: _Pending, replaced_key: str | None) -> None:
        """Step 5 after the response (``defer_index``): retried once; a failure is logged,
        never raised (the sender holds a success already, and the blob is durable)."""
        for attempt in (1, 2):
            try:
                self._commit(_Pending(pending.record, pending.key, pending.size,
                                      pending.source), replaced_key)
                return
            except Exception as exc:  # a StoreError, or the replaced blob's deletion
                if attempt == 2:
                    log.error("SOP Instance %s was acknowledged and its blob %s is durable, but "
                              "its index rows could not be written (%s): it is not served until "
                              "`imaging-gateway reindex`", pending.record.sop_uid, pending.key,
                              exc)
                    return
                log.warning("index rows of acknowledged SOP Instance %s failed (%s); retrying",
                            pending.record.sop_uid, exc)
                time.sleep(0.2)

    # -- removal ---------------------------------------------------------------------------------
    def delete(self, study_uid: str, series_uid: str | None = None,
               sop_uid: str | None = None, *, reason: str = "deleted") -> int:
        """Delete a study, a series or an instance: index rows first (in one transaction, so
        nothing removed is served any more, and the study is queued for publishing), then
        the blobs. Returns how many instances went."""
        with self.index.write() as conn:
            removed = self.index.remove(conn, study_uid=study_uid, series_uid=series_uid,
                                        sop_uids=[sop_uid] if sop_uid else None, reason=reason)
        self._delete_blobs(removed)
        log.info("deleted %d instances of study %s (%s)", len(removed), study_uid, reason)
        return len(removed)

    def _apply_rejection(self, note: InstanceRecord, reason: str,
                         references: list[tuple[str, str]]) -> None:
        """IOCM (IHE RAD TF-2 RAD-66): the referenced instances leave every query and
        retrieve and are deleted; they are remembered so a re-send is refused. The note
        itself is not kept as an instance (a study must not survive as its own rejection)."""
        removed = []
        with self.index.write() as conn:
            self.index.reject(conn, references, reason=reason, note_uid=note.sop_uid)
            by_study: dict[str, list[str]] = {}
            for study_uid, sop in references:
                by_study.setdefault(study_uid, []).append(sop)
            for study_uid, sops in by_study.items():
                removed += self.index.remove(conn, study_uid=study_uid, sop_uids=sops,
                                             reason=f"rejected-{reason}")
        self._delete_blobs(removed)
        log.info("rejection note %s (%s) removed %d of %d referenced instances", note.sop_uid,
                 reason, len(removed), len(references))

    def _delete_blobs(self, removed: list[StoredInstance]) -> None:
        for gone in removed:
            try:
                self.storage.delete(gone.blob_key)
            except OSError as exc:  # the row is gone, so the blob is never served
                log.error("blob %s of a removed instance could not be deleted (%s); "
                          "reindex would bring it back", gone.blob_key, exc)

    def index_blob(self, key: str) -> StoreResult:
        """(Re)create the index rows of an already stored blob (``reindex``)."""
        path = self.storage.path_for(key)
        record = read_instance(path)
        expected = instance_key(record.study_uid, record.series_uid, record.sop_uid)
        if expected != key:
            raise InvalidInstance(f"blob {key} holds an instance whose UIDs say {expected}")
        if self.index.rejection_of(record.sop_uid) is not None:
            raise RejectedInstance(f"blob {key} is an instance rejected by an IOCM note; "
                                   "not indexed again")
        with self.index.write() as conn:
            self.index.upsert_instance(conn, record, blob_key=key, blob_size=path.stat().st_size,
                                       source="reindex")
        return self._result("stored", record)

    def recover(self) -> int:
        """After an unclean stop: in the series marked for recovery (gateway.index,
        "Durability on SQLite"), index the blobs that have no row, and those written after
        their row (an object replaced in place, ``duplicate_policy = "replace"``, whose new
        row the crash took): what a machine crash may have taken from the index of
        acknowledged, durable blobs. Returns how many it indexed.

        "Written after their row": the blob's modification time is later than the row's
        ``received_at``. A row is always written after its blob, and the kernel's file
        times are never ahead of the clock, so a current row never qualifies."""
        indexed = 0
        for study_uid, series_uid in self.index.recovery_candidates():
            named = self.index.blob_keys_of_series(series_uid)
            try:
                keys = self.storage.series_keys(study_uid, series_uid)
            except OSError as exc:  # an object store that cannot be listed now
                log.error("recovery: series %s not checked: %s", series_uid, exc)
                continue
            for key in keys:
                if key in named:
                    try:
                        modified = self.storage.modified_at(key)
                    except OSError as exc:
                        log.warning("recovery: blob %s skipped: %s", key, exc)
                        continue
                    if modified is None or modified <= named[key]:
                        continue  # not newer than its row, or gone meanwhile
                    why = "replaced before the unclean stop; its row was older"
                else:
                    why = "stored before the unclean stop"
                try:
                    self.index_blob(key)
                except (StoreError, OSError) as exc:
                    log.warning("recovery: blob %s not indexed: %s", key, exc)
                    continue
                indexed += 1
                log.info("recovery: indexed %s, %s", key, why)
        return indexed

    def _check_space(self) -> None:
        if not self.min_free_bytes:
            return
        try:
            free = self.storage.free_bytes()
        except OSError as exc:
            raise OutOfResources(f"storage unavailable: {exc.strerror or exc}") from exc
        if free < self.min_free_bytes:
            raise OutOfResources(
                f"storage has {free // 2**20} MiB free, below storage.min_free_bytes "
                f"({self.min_free_bytes // 2**20} MiB); refusing new instances until space is "
                "freed")

    @staticmethod
    def _validate(record: InstanceRecord, sop_class: str | None, sop_uid: str | None,
                  study_uid: str | None) -> None:
        # What went wrong comes first: a C-STORE response's Error Comment keeps 64 characters.
        if sop_class is not None and record.sop_class_uid != sop_class:
            raise SOPClassMismatch(
                f"SOP Class of the data set differs from the declared: {record.sop_class_uid} "
                f"in the data set, {sop_class} declared")
        if sop_uid is not None and record.sop_uid != sop_uid:
            raise InvalidInstance(
                f"SOP Instance UID of the data set differs from the declared: {record.sop_uid} "
                f"in the data set, {sop_uid} declared")
        if study_uid is not None and record.study_uid != study_uid:
            raise StudyMismatch(
                f"instance belongs to study {record.study_uid}, not {study_uid} named in the URL")

    @staticmethod
    def _result(outcome: Outcome, record: InstanceRecord,
                commit_index: Callable[[], None] | None = None,
                blob_size: int = 0) -> StoreResult:
        return StoreResult(outcome, record.sop_class_uid, record.sop_uid, record.study_uid,
                           record.series_uid, record.transfer_syntax_uid, commit_index,
                           blob_size)


def rejection_note(path: Path) -> tuple[str, list[tuple[str, str]]] | None:
    """For a Key Object Selection whose title is an IOCM rejection (DCM 113001, 113037,
    113038, 113039): the title's code and the ``(study_uid, sop_uid)`` pairs it references in
    Current Requested Procedure Evidence Sequence (PS3.3 C.17.2). None for any other KOS."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    titles = ds.get("ConceptNameCodeSequence") or []
    if not titles:
        return None
    code = str(titles[0].get("CodeValue", ""))
    if code not in REJECTION_TITLES or titles[0].get("CodingSchemeDesignator") != "DCM":
        return None
    references = []
    for study_item in ds.get("CurrentRequestedProcedureEvidenceSequence") or []:
        study_uid = str(study_item.get("StudyInstanceUID", ""))
        for series_item in study_item.get("ReferencedSeriesSequence") or []:
            for sop_item in series_item.get("ReferencedSOPSequence") or []:
                sop = str(sop_item.get("ReferencedSOPInstanceUID", ""))
                if sop and study_uid:
                    references.append((study_uid, sop))
    if not references:
        raise InvalidInstance("IOCM rejection note references no instances "
                              "(Current Requested Procedure Evidence Sequence is empty)")
    return code, references
