"""The index: patient/study/series/instance rows and the publish outbox, on SQLAlchemy Core.

Columns are named by DICOM keyword. The patient is keyed by (PatientID, IssuerOfPatientID)
(PS3.3 C.7.1.1; an absent issuer is the empty string, so two sites' "12345" never merge when
they carry issuers). Study and series counts (NumberOfStudyRelatedSeries/Instances,
NumberOfSeriesRelatedInstances) and ModalitiesInStudy/SOPClassesInStudy are kept current in
the same transaction as the instance row, so C-FIND and QIDO-RS read them directly.

Runs on SQLite (default; WAL, ``BEGIN IMMEDIATE`` so concurrent writers queue instead of
deadlocking) and PostgreSQL.

Durability on SQLite. Every commit is durable before it returns (synchronous=FULL: the WAL is
fsync'd), except the store path's (:meth:`Index.write` with ``durable=False``, see
:mod:`gateway.ingest`), which saves that flush per instance under a protocol that still
loses no acknowledged instance:

* such a commit survives a crash of the process (it is in the WAL) but not of the machine
  until the WAL is next fsync'd: by a later durable commit, a checkpoint, or the syncer
  thread, which makes a durable commit at most :data:`SYNC_SECONDS` after any other;
* its blob is already durable (the store path fsyncs it first), so what a machine crash can
  take is index rows of blobs that are on disk;
* before its series' first such commit (and again every ``RECOVERY_WINDOW / 2`` seconds) a
  durable commit records the series in ``recovery_mark``;
* a start after an unclean stop (``index_state.running`` still set) re-indexes the blobs of
  every series marked within ``RECOVERY_WINDOW`` seconds before the last durable sync that
  have no row, or were written after their row (replaced in place)
  (:meth:`Index.recovery_candidates`, :meth:`gateway.ingest.Ingest.recover`).

The C-STORE path may also commit after its response ("Index later" in :mod:`gateway.ingest`);
its series is marked before the response, so the same recovery covers it.

Checkpoints (copying the WAL into the database file, with two fsyncs) are the syncer's work
too, once a second after its durable commit, so no store's commit stalls for one: SQLite's own
automatic checkpoint, which runs inside whichever commit crosses the threshold, is only a
backstop at :data:`WAL_BACKSTOP_PAGES`.

A lost commit happened after the last sync S; its series was marked durably at most
``RECOVERY_WINDOW / 2`` seconds before it, so after ``S - RECOVERY_WINDOW``: recovery scans it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    Engine,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy import (
    Index as SqlIndex,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from gateway.errors import OutOfResources
from gateway.records import (
    INSTANCE_KEYWORDS,
    PATIENT_KEYWORDS,
    SERIES_KEYWORDS,
    STUDY_KEYWORDS,
    InstanceRecord,
)

log = logging.getLogger("gateway.index")
metadata = MetaData()


def _text_columns(keywords: tuple[str, ...], integers: set[str]) -> list[Column[Any]]:
    return [Column(k, Integer if k in integers else String) for k in keywords]


patient = Table(
    "patient", metadata,
    Column("id", Integer, primary_key=True),
    *_text_columns(PATIENT_KEYWORDS, set()),
    Column("updated_at", Float, nullable=False),
    UniqueConstraint("PatientID", "IssuerOfPatientID", name="uq_patient_identity"),
)
study = Table(
    "study", metadata,
    Column("id", Integer, primary_key=True),
    Column("StudyInstanceUID", String(64), nullable=False, unique=True),
    Column("patient_id", Integer, ForeignKey("patient.id"), nullable=False, index=True),
    *_text_columns(STUDY_KEYWORDS, set()),
    Column("IssuerOfAccessionNumber", String),
    Column("ModalitiesInStudy", String),
    Column("SOPClassesInStudy", String),
    Column("NumberOfStudyRelatedSeries", Integer, nullable=False, default=0),
    Column("NumberOfStudyRelatedInstances", Integer, nullable=False, default=0),
    Column("attributes", JSON, nullable=False, default=dict),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    SqlIndex("ix_study_date", "StudyDate"),
    SqlIndex("ix_study_accession", "AccessionNumber"),
)
series = Table(
    "series", metadata,
    Column("id", Integer, primary_key=True),
    Column("SeriesInstanceUID", String(64), nullable=False, unique=True),
    Column("study_id", Integer, ForeignKey("study.id"), nullable=False, index=True),
    *_text_columns(SERIES_KEYWORDS, {"SeriesNumber"}),
    Column("NumberOfSeriesRelatedInstances", Integer, nullable=False, default=0),
    Column("attributes", JSON, nullable=False, default=dict),
    Column("updated_at", Float, nullable=False),
    # ModalitiesInStudy matching is EXISTS(series of the study with this Modality): answered
    # from this index alone instead of one series row read per candidate study.
    SqlIndex("ix_series_study_modality", "study_id", "Modality"),
)
instance = Table(
    "instance", metadata,
    Column("id", Integer, primary_key=True),
    Column("SOPInstanceUID", String(64), nullable=False, unique=True),
    Column("series_id", Integer, ForeignKey("series.id"), nullable=False, index=True),
    Column("SOPClassUID", String(64), nullable=False),
    *_text_columns(tuple(k for k in INSTANCE_KEYWORDS if k != "SOPClassUID"),
                   {"InstanceNumber", "Rows", "Columns", "BitsAllocated", "NumberOfFrames"}),
    Column("DocumentTitle", String),
    Column("TransferSyntaxUID", String(64), nullable=False),
    Column("blob_key", String, nullable=False),
    Column("blob_size", Integer, nullable=False),
    Column("source", String, nullable=True),
    Column("received_at", Float, nullable=False),
)
#: One row per study waiting to be (re)published to FHIR; written in the store transaction.
outbox = Table(
    "outbox", metadata,
    Column("StudyInstanceUID", String(64), primary_key=True),
    Column("due_at", Float, nullable=False, index=True),
    Column("reason", String, nullable=False),
    Column("state", String, nullable=False, default="pending"),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", String),
    Column("updated_at", Float, nullable=False),
)
#: Instances rejected by an IOCM Key Object Selection (PS3.3 KOS titles 113001, 113037-113039):
#: removed from the archive and refused if they are sent again.
rejected = Table(
    "rejected", metadata,
    Column("SOPInstanceUID", String(64), primary_key=True),
    Column("StudyInstanceUID", String(64), nullable=False),
    Column("reason", String, nullable=False),  # the note's Concept Name code value
    Column("note_uid", String(64), nullable=False),  # SOP Instance UID of the rejection note
    Column("rejected_at", Float, nullable=False),
)


#: Where each study was published: the FHIR Patient it went under and its ImagingStudy (the
#: publish record cohort queries join on).
publication = Table(
    "publication", metadata,
    Column("StudyInstanceUID", String(64), primary_key=True),
    Column("patient_reference", String, index=True),  # "Patient/123", None if logical only
    Column("imaging_study_id", String),
    Column("published_at", Float, nullable=False),
)
#: Saved cohorts (gateway.cohort) and their members as last evaluated.
cohort = Table(
    "cohort", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String, nullable=False),
    Column("fhir_query", String, nullable=False),
    Column("imaging", JSON, nullable=False),  # [[QIDO key, value], …]
    Column("created_at", Float, nullable=False),
    Column("evaluated_at", Float),
)
cohort_member = Table(
    "cohort_member", metadata,
    Column("cohort_id", Integer, ForeignKey("cohort.id", ondelete="CASCADE"), primary_key=True),
    Column("study_id", Integer, primary_key=True),
    SqlIndex("ix_cohort_member_study", "study_id"),
)


#: Series that received instances through non-durable commits lately (see the module
#: docstring): where a start after a crash looks for blobs the index lost.
recovery_mark = Table(
    "recovery_mark", metadata,
    Column("SeriesInstanceUID", String(64), primary_key=True),
    Column("StudyInstanceUID", String(64), nullable=False),
    Column("marked_at", Float, nullable=False, index=True),
)
#: One row: when the index was last made durable, and whether a gateway is running on it
#: (still set at start = the last one did not stop cleanly).
index_state = Table(
    "index_state", metadata,
    Column("id", Integer, primary_key=True),
    Column("synced_at", Float, nullable=False),
    Column("running", Integer, nullable=False),
)

#: Longest a non-durable commit stays so (the syncer's period), in seconds.
SYNC_SECONDS = 1.0
#: A series is marked again when its mark is older than half of this; recovery scans series
#: marked this long before the last sync (margin for clocks that step).
RECOVERY_WINDOW = 60.0


@dataclass(frozen=True)
class StoredInstance:
    """What the index says about a stored instance (enough to serve or compare it)."""

    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    blob_key: str
    blob_size: int


@dataclass(frozen=True)
class OutboxItem:
    """A study claimed for publishing: why it was queued, how many attempts failed before,
    and the claim's token (see :meth:`Index.claim_due`)."""

    study_uid: str
    reason: str
    attempts: int
    token: float


class _WriterLock:
    """Queue SQLite writers on a lock instead of SQLite's busy handler.

    SQLite admits one writer at a time and makes the others poll with growing sleeps (1, 2,
    5 … 100 ms). Threads of one process queue on a mutex, processes (``dimse.workers``, an
    ``import`` beside a running gateway) on ``flock`` of a file next to the database; both
    wake the next writer the moment the previous one commits.
    """

    def __init__(self, path: str | None) -> None:
        self._mutex = threading.Lock()
        self._fd: int | None = None
        if path is not None:
            try:
                self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                self._fd = None  # e.g. a read-only directory: SQLite's own locking still holds

    def __enter__(self) -> None:
        self._mutex.acquire()
        if self._fd is not None:
            with contextlib.suppress(OSError):  # without the flock SQLite still serialises
                fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *_exc: object) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._mutex.release()


class _Prepared:
    """A Core statement compiled once; on SQLite run as plain driver SQL.

    SQLAlchemy's per-execution work (cache key, parameter processing, result set-up) costs
    ~0.2 ms a statement, as much as SQLite executing it; the store path runs ten of them per
    instance. On SQLite the compiled SQL is handed to the driver directly, JSON parameters
    serialised here; other databases go through SQLAlchemy as usual.
    """

    def __init__(self, statement: Any, dialect: Any, *, raw: bool) -> None:
        self.statement = statement
        self.raw = raw
        compiled = statement.compile(dialect=dialect)
        self.sql = str(compiled)
        self.positions = compiled.positiontup
        self.defaults = dict(compiled.params)
        self.json = {name for name, bind in compiled.binds.items()
                     if isinstance(bind.type, JSON)}

    def __call__(self, conn: Connection, params: dict[str, Any]) -> Any:
        if not self.raw:
            return conn.execute(self.statement, params)
        values = {**self.defaults, **params}
        for name in self.json:
            if values.get(name) is not None:
                values[name] = json.dumps(values[name])
        args = tuple(values[n] for n in self.positions) if self.positions is not None \
            else values
        # The DBAPI cursor of this connection, inside the transaction conn began: skipping
        # SQLAlchemy's result set-up halves the cost of these small statements.
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        cursor.execute(self.sql, args)
        return _Rows(cursor)


class _Rows:
    """The few result accessors the store path uses, over a DBAPI cursor."""

    def __init__(self, cursor: Any) -> None:
        self._rows: list[tuple[Any, ...]] = cursor.fetchall() if cursor.description else []
        cursor.close()

    def first(self) -> tuple[Any, ...] | None:
        return self._rows[0] if self._rows else None

    def one(self) -> tuple[Any, ...]:
        if len(self._rows) != 1:
            raise LookupError(f"expected one row, got {len(self._rows)}")
        return self._rows[0]

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None

    def scalar_one(self) -> Any:
        return self.one()[0]


#: Connections :meth:`Index._connection` keeps for reuse (one per concurrent store, roughly).
_SPARE_CONNECTIONS = 8


class IndexUnavailable(OutOfResources):
    """The database cannot be written (locked for too long, disk full, server down)."""


class Index:
    """The index database. Thread-safe; share one per process."""

    # Prepared statements (see _prepare): built as Core statements, then wrapped in _Prepared.
    _stmt_patient: Any
    _stmt_study: Any
    _stmt_series: Any
    _stmt_instance: Any
    _stmt_find: Any
    _stmt_old_series: Any
    _stmt_study_add: Any
    _stmt_series_add: Any
    _stmt_outbox: Any
    _stmt_study_counts: Any
    _stmt_rejected: Any

    def __init__(self, url: str, *, quiet_seconds: float = 0.0) -> None:
        self.url = url
        self.quiet_seconds = quiet_seconds
        self.is_sqlite = url.startswith("sqlite")
        self.engine: Engine = _make_engine(url)
        self._insert = sqlite.insert if self.is_sqlite else postgresql.insert
        self._write_lock: Any = contextlib.nullcontext()
        if self.is_sqlite:
            database = self.engine.url.database
            self._write_lock = _WriterLock(f"{database}.writelock" if database and
                                           database != ":memory:" else None)
        self._spare: list[Connection] = []
        self._spare_lock = threading.Lock()
        #: Marks this process committed durably: series → marked_at (see the module docstring).
        self._marks: dict[str, float] = {}
        self._unsynced = threading.Event()  # a non-durable commit since the last sync
        self._closing = threading.Event()
        self._syncer: threading.Thread | None = None
        self._syncer_lock = threading.Lock()
        self._prepare()

    def create_schema(self) -> None:
        metadata.create_all(self.engine)
        with self.write() as conn:
            if conn.execute(select(index_state.c.id)).first() is None:
                conn.execute(index_state.insert().values(id=1, synced_at=time.time(),
                                                         running=0))

    def close(self, *, sync: bool = True) -> None:
        """Stop the syncer and close every connection; first make every commit durable,
        unless ``sync`` is false (as a crash would leave it)."""
        self._closing.set()
        if self._syncer is not None:
            self._syncer.join(10)
        if sync:
            with contextlib.suppress(IndexUnavailable):
                self.sync()
        with self._spare_lock:
            spare, self._spare = self._spare, []
        for conn in spare:
            conn.close()
        self.engine.dispose()

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(select(1))
            return True
        except SQLAlchemyError:
            return False

    # -- transactions ----------------------------------------------------------------------------
    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        """A connection for the write path's statements. On SQLite one kept from earlier use:
        taking one from SQLAlchemy's pool and resetting it on return costs more than most of
        the statements a store runs. A connection that ends in an error is not kept."""
        if not self.is_sqlite:
            with self.engine.connect() as fresh:
                yield fresh
            return
        with self._spare_lock:
            conn = self._spare.pop() if self._spare else None
        if conn is None:
            conn = self.engine.connect()
        keep = False
        try:
            yield conn
            keep = not conn.in_transaction() and \
                not conn.connection.driver_connection.in_transaction  # type: ignore[union-attr]
        finally:
            if keep:
                with self._spare_lock:
                    keep = len(self._spare) < _SPARE_CONNECTIONS
                    if keep:
                        self._spare.append(conn)
            if not keep:
                conn.close()

    @contextmanager
    def write(self, *, durable: bool = True) -> Iterator[Connection]:
        """One write transaction; raises :class:`IndexUnavailable` if the database refuses.

        ``durable=False`` (the store path only, under the protocol of the module docstring):
        on SQLite the commit does not wait for the WAL to reach the disk."""
        lazy = not durable and self.is_sqlite
        try:
            with self._write_lock, self._connection() as conn:
                driver: Any = conn.connection.driver_connection if self.is_sqlite else None
                if lazy:
                    driver.execute("PRAGMA synchronous=NORMAL")
                try:
                    if driver is not None:
                        # Straight to the driver: through SQLAlchemy (exec_driver_sql) this
                        # statement alone cost ~0.1 ms, a fifth of a store's whole commit.
                        driver.execute("BEGIN IMMEDIATE")
                    else:
                        conn.begin()
                    try:
                        yield conn
                    except BaseException:
                        _end(conn, driver, commit=False)
                        raise
                    _end(conn, driver, commit=True)
                finally:
                    if lazy:
                        driver.execute("PRAGMA synchronous=FULL")
        except OperationalError as exc:
            raise IndexUnavailable(f"index unavailable: {exc.orig}") from exc
        except sqlite3.OperationalError as exc:
            raise IndexUnavailable(f"index unavailable: {exc}") from exc
        if lazy:
            self._unsynced.set()
            self._start_syncer()

    # -- durability of the store path's commits (see the module docstring) ----------------------
    def needs_mark(self, series_uid: str, now: float) -> bool:
        """True when a store into this series must first mark it (in a durable commit).
        Never on PostgreSQL, whose commits are all durable."""
        return self.is_sqlite and self._marks.get(series_uid, 0.0) < now - RECOVERY_WINDOW / 2

    @contextmanager
    def store_write(self, series: Mapping[str, str]) -> Iterator[Connection]:
        """The store path's transaction for instances of ``series`` (series → study UID):
        it does not wait for the disk, unless one of them is new to this process (or was last
        marked long ago): then the transaction marks it for recovery and is durable. With
        no statement of its own it only makes those marks (before an acknowledgement that
        comes ahead of the index rows, "Index later" in :mod:`gateway.ingest`)."""
        now = time.time()
        to_mark = {uid: study for uid, study in series.items() if self.needs_mark(uid, now)}
        with self.write(durable=bool(to_mark)) as conn:
            for series_uid, study_uid in to_mark.items():
                stmt = self._insert(recovery_mark).values(
                    SeriesInstanceUID=series_uid, StudyInstanceUID=study_uid, marked_at=now)
                conn.execute(stmt.on_conflict_do_update(  # a mark never moves back in time
                    index_elements=["SeriesInstanceUID"],
                    set_={"marked_at": func.max(recovery_mark.c.marked_at,
                                                stmt.excluded.marked_at),
                          "StudyInstanceUID": stmt.excluded.StudyInstanceUID}))
            yield conn
        for uid in to_mark:
            self._marks[uid] = now
        if len(self._marks) > 10_000:
            self._marks = {k: v for k, v in self._marks.items()
                           if v >= now - RECOVERY_WINDOW / 2}

    def sync(self) -> None:
        """Make every commit so far durable (a durable commit fsyncs the whole WAL) and record
        when; a no-op unless a non-durable commit happened since the last."""
        if not self._unsynced.is_set():
            return
        self._unsynced.clear()
        try:
            with self.write() as conn:
                conn.execute(update(index_state).where(index_state.c.id == 1)
                             .values(synced_at=time.time()))
                conn.execute(delete(recovery_mark).where(
                    recovery_mark.c.marked_at < time.time() - 4 * RECOVERY_WINDOW))
        except BaseException:
            self._unsynced.set()
            raise
        self.checkpoint()

    def checkpoint(self) -> None:
        """Copy the WAL into the database file without waiting for readers or writers
        (SQLite ``PASSIVE`` checkpoint; see "Checkpoints" in the module docstring)."""
        if not self.is_sqlite:
            return
        with self._connection() as conn:
            driver: Any = conn.connection.driver_connection
            driver.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _start_syncer(self) -> None:
        if self._syncer is not None:
            return
        with self._syncer_lock:
            if self._syncer is None and not self._closing.is_set():
                self._syncer = threading.Thread(target=self._sync_forever, name="index-sync",
                                                daemon=True)
                self._syncer.start()

    def _sync_forever(self) -> None:
        while not self._closing.wait(SYNC_SECONDS):
            try:
                self.sync()
            except Exception as exc:  # the next period tries again; commits stay safe
                log.warning("index sync failed (%s); retrying", exc)

    def begin_running(self) -> bool:
        """Note that a gateway runs on this index; True when the last one did not stop
        cleanly (then :meth:`recovery_candidates` says where to look)."""
        with self.write() as conn:
            row = conn.execute(select(index_state.c.running)).first()
            conn.execute(update(index_state).values(running=1))
        return bool(row and row[0])

    def end_running(self) -> None:
        """A clean stop: every commit durable, nothing to recover at the next start (one
        durable commit: it fsyncs the whole WAL, every earlier commit with it)."""
        with self.write() as conn:
            conn.execute(update(index_state).values(running=0, synced_at=time.time()))

    def recovery_candidates(self) -> list[tuple[str, str]]:
        """(study, series) UIDs whose blobs may lack rows after a machine crash: the series
        marked within ``RECOVERY_WINDOW`` seconds before the last durable sync."""
        with self.engine.connect() as conn:
            synced_at = conn.execute(select(index_state.c.synced_at)).scalar() or 0.0
            rows = conn.execute(select(recovery_mark.c.StudyInstanceUID,
                                       recovery_mark.c.SeriesInstanceUID)
                                .where(recovery_mark.c.marked_at >= synced_at - RECOVERY_WINDOW)
                                .order_by(recovery_mark.c.marked_at)).all()
        return [(row[0], row[1]) for row in rows]

    def blob_keys_of_series(self, series_uid: str) -> dict[str, float]:
        """The storage keys the index names for the instances of one series, each with when
        its row was written (``received_at``, seconds since the epoch)."""
        with self.engine.connect() as conn:
            return {key: at for key, at in conn.execute(
                select(instance.c.blob_key, instance.c.received_at)
                .select_from(instance.join(series))
                .where(series.c.SeriesInstanceUID == series_uid))}

    # -- reads -----------------------------------------------------------------------------------
    def find_instance(self, sop_uid: str, conn: Connection | None = None) -> StoredInstance | None:
        if conn is not None:
            row = self._stmt_find(conn, {"sop": sop_uid}).first()
        else:
            with self._connection() as own:
                row = self._stmt_find(own, {"sop": sop_uid}).first()
        return StoredInstance(*row) if row else None

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {name: conn.execute(select(func.count()).select_from(table)).scalar_one()
                    for name, table in (("patients", patient), ("studies", study),
                                        ("series", series), ("instances", instance))}

    def study_row(self, study_uid: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(study).where(study.c.StudyInstanceUID == study_uid)).first()
        return dict(row._mapping) if row else None

    # -- the write -------------------------------------------------------------------------------
    def _prepare(self) -> None:
        """Build every write statement once, with bind parameters, so each store only binds
        values to already-compiled SQL (building Core statements per call cost ~20 ms)."""
        self._patient_cols = ("PatientID", "IssuerOfPatientID", *PATIENT_KEYWORDS[2:],
                              "updated_at")
        self._study_cols = ("StudyInstanceUID", "patient_id", *STUDY_KEYWORDS,
                            "IssuerOfAccessionNumber", "updated_at")
        self._series_cols = ("SeriesInstanceUID", "study_id", *SERIES_KEYWORDS, "updated_at")
        self._instance_cols = tuple(c.name for c in instance.c if c.name != "id")
        self._stmt_patient = self._upsert_stmt(patient, ("PatientID", "IssuerOfPatientID"),
                                               self._patient_cols)
        self._stmt_study = self._upsert_stmt(
            study, ("StudyInstanceUID",), self._study_cols,
            insert_only=("created_at", "attributes", "NumberOfStudyRelatedSeries",
                         "NumberOfStudyRelatedInstances"))
        self._stmt_series = self._upsert_stmt(
            series, ("SeriesInstanceUID",), self._series_cols,
            insert_only=("attributes", "NumberOfSeriesRelatedInstances"))
        self._stmt_instance = self._upsert_stmt(instance, ("SOPInstanceUID",),
                                                self._instance_cols, keep_nulls=True)
        self._stmt_find = (
            select(instance.c.SOPInstanceUID, study.c.StudyInstanceUID,
                   series.c.SeriesInstanceUID, instance.c.SOPClassUID,
                   instance.c.TransferSyntaxUID, instance.c.blob_key, instance.c.blob_size)
            .select_from(instance.join(series).join(study))
            .where(instance.c.SOPInstanceUID == bindparam("sop")))
        self._stmt_old_series = select(instance.c.series_id).where(
            instance.c.SOPInstanceUID == bindparam("sop"))
        # A new instance in one statement per level: the upsert also counts it and returns
        # what decides whether the study row needs more (a new series, modality or class).
        self._stmt_study_add = self._upsert_stmt(
            study, ("StudyInstanceUID",), self._study_cols,
            insert_only=("created_at", "attributes", "NumberOfStudyRelatedSeries",
                         "NumberOfStudyRelatedInstances"),
            increment=("NumberOfStudyRelatedInstances",),
            returning=("ModalitiesInStudy", "SOPClassesInStudy", "attributes"))
        self._stmt_series_add = self._upsert_stmt(
            series, ("SeriesInstanceUID",), self._series_cols,
            insert_only=("attributes", "NumberOfSeriesRelatedInstances"),
            increment=("NumberOfSeriesRelatedInstances",),
            returning=("NumberOfSeriesRelatedInstances",))
        outbox_stmt = self._insert(outbox).values(
            {c: bindparam(c) for c in ("StudyInstanceUID", "due_at", "reason", "state",
                                       "attempts", "last_error", "updated_at")})
        self._stmt_outbox = outbox_stmt.on_conflict_do_update(
            index_elements=["StudyInstanceUID"],
            set_={k: outbox_stmt.excluded[k] for k in ("due_at", "reason", "state", "attempts",
                                                       "last_error", "updated_at")})
        self._stmt_study_counts = (
            update(study).where(study.c.id == bindparam("stid")).values(
                NumberOfStudyRelatedSeries=study.c.NumberOfStudyRelatedSeries
                + bindparam("new_series"),
                ModalitiesInStudy=bindparam("modalities"),
                SOPClassesInStudy=bindparam("classes"),
                attributes=bindparam("merged", type_=JSON)))
        self._stmt_rejected = select(rejected.c.reason, rejected.c.note_uid).where(
            rejected.c.SOPInstanceUID == bindparam("sop"))
        for name in ("patient", "study", "series", "instance", "find", "old_series",
                     "study_add", "series_add", "outbox", "study_counts", "rejected"):
            attribute = f"_stmt_{name}"
            setattr(self, attribute, _Prepared(getattr(self, attribute), self.engine.dialect,
                                               raw=self.is_sqlite))

    def _upsert_stmt(self, table: Table, keys: tuple[str, ...], columns: tuple[str, ...], *,
                     insert_only: tuple[str, ...] = (), keep_nulls: bool = False,
                     increment: tuple[str, ...] = (), returning: tuple[str, ...] = ()) -> Any:
        """``INSERT … ON CONFLICT (keys) DO UPDATE … RETURNING id[, returning…]``.

        By default an absent (NULL) value never erases a known one: instances of one study may
        carry more or fewer optional attributes, and the index keeps the union. Columns in
        ``increment`` (inserted as given) grow by one when the row already exists.
        """
        stmt = self._insert(table).values({c: bindparam(c) for c in (*columns, *insert_only)})
        updates: dict[str, Any] = {
            name: (stmt.excluded[name] if keep_nulls
                   else func.coalesce(stmt.excluded[name], table.c[name]))
            for name in columns if name not in keys
        }
        updates.update({name: table.c[name] + 1 for name in increment})
        return stmt.on_conflict_do_update(index_elements=list(keys), set_=updates).returning(
            table.c.id, *(table.c[name] for name in returning))

    def upsert_instance(self, conn: Connection, record: InstanceRecord, *, blob_key: str,
                        blob_size: int, source: str | None) -> None:
        """Insert or update the rows of one instance and everything above it, in ``conn``'s
        transaction, keep the counts current and queue the study for publishing."""
        now = time.time()
        patient_id = self._stmt_patient(conn, {
            **dict.fromkeys(self._patient_cols), **record.patient, "updated_at": now,
        }).scalar_one()
        old_series_id = self._stmt_old_series(conn, {"sop": record.sop_uid}).scalar()
        study_values = {
            **dict.fromkeys(self._study_cols), **record.study,
            "StudyInstanceUID": record.study_uid, "patient_id": patient_id, "updated_at": now,
            "created_at": now, "attributes": record.study_json,
            "NumberOfStudyRelatedSeries": 0, "NumberOfStudyRelatedInstances": 0,
        }
        series_values = {
            **dict.fromkeys(self._series_cols), **record.series,
            "SeriesInstanceUID": record.series_uid, "updated_at": now,
            "attributes": record.series_json, "NumberOfSeriesRelatedInstances": 0,
        }
        if old_series_id is None:  # the common case: one more instance, maybe a new series
            study_id, modalities, classes, attributes = self._stmt_study_add(
                conn, {**study_values, "NumberOfStudyRelatedInstances": 1}).one()
            series_id, in_series = self._stmt_series_add(
                conn, {**series_values, "study_id": study_id,
                       "NumberOfSeriesRelatedInstances": 1}).one()
            self._insert_instance(conn, record, series_id, blob_key, blob_size, source, now)
            self._count_new_instance(conn, record, study_id, new_series=in_series == 1,
                                     modalities=modalities, classes=classes,
                                     attributes=attributes)
        else:  # a replaced object, possibly moved between series/studies: recount both
            study_id = self._stmt_study(conn, study_values).scalar_one()
            series_id = self._stmt_series(conn, {**series_values,
                                                 "study_id": study_id}).scalar_one()
            self._insert_instance(conn, record, series_id, blob_key, blob_size, source, now)
            self._refresh_counts(conn, series_id, study_id)
            if old_series_id != series_id:
                old_study_id = conn.execute(select(series.c.study_id)
                                            .where(series.c.id == old_series_id)).scalar_one()
                self._refresh_counts(conn, old_series_id, old_study_id)
            if record.study_json:
                self._merge_json(conn, study, study_id, record.study_json)
        if record.series_json:
            self._merge_json(conn, series, series_id, record.series_json)
        self.queue_publish(conn, record.study_uid, "instances-added", now)

    def _insert_instance(self, conn: Connection, record: InstanceRecord, series_id: int,
                         blob_key: str, blob_size: int, source: str | None,
                         now: float) -> None:
        self._stmt_instance(conn, {
            **dict.fromkeys(self._instance_cols), **record.instance,
            "SOPInstanceUID": record.sop_uid, "SOPClassUID": record.sop_class_uid,
            "series_id": series_id, "TransferSyntaxUID": record.transfer_syntax_uid,
            "blob_key": blob_key, "blob_size": blob_size, "source": source,
            "received_at": now,
        })

    def _count_new_instance(self, conn: Connection, record: InstanceRecord, study_id: int, *,
                            new_series: bool, modalities: str | None, classes: str | None,
                            attributes: Any) -> None:
        """The study row after one more instance (already counted by the upsert): one more
        series, ModalitiesInStudy, SOPClassesInStudy and study attributes, written only when
        one of them changes (for most instances none does)."""
        modality = record.series.get("Modality")
        modality_set = set(modalities.split("\\")) if modalities else set()
        class_set = set(classes.split("\\")) if classes else set()
        current = attributes if isinstance(attributes, dict) else json.loads(attributes or "{}")
        merged = {**current, **record.study_json}
        if (not new_series and (not modality or modality in modality_set)
                and record.sop_class_uid in class_set and merged == current):
            return
        if modality:
            modality_set.add(modality)
        class_set.add(record.sop_class_uid)
        self._stmt_study_counts(conn, {
            "stid": study_id, "new_series": 1 if new_series else 0,
            "modalities": "\\".join(sorted(modality_set)) or None,
            "classes": "\\".join(sorted(class_set)),
            "merged": merged,
        })

    def queue_publish(self, conn: Connection, study_uid: str, reason: str,
                      now: float | None = None) -> None:
        """(Re)schedule a study for publishing once it has been quiet for ``quiet_seconds``."""
        now = time.time() if now is None else now
        self._stmt_outbox(conn, {
            "StudyInstanceUID": study_uid, "due_at": now + self.quiet_seconds, "reason": reason,
            "state": "pending", "attempts": 0, "last_error": None, "updated_at": now})

    def _merge_json(self, conn: Connection, table: Table, row_id: int,
                    attributes: dict[str, Any]) -> None:
        current = conn.execute(select(table.c.attributes).where(table.c.id == row_id)).scalar()
        merged = {**(current if isinstance(current, dict) else json.loads(current or "{}")),
                  **attributes}
        if merged != current:
            conn.execute(update(table).where(table.c.id == row_id).values(attributes=merged))

    def _refresh_counts(self, conn: Connection, series_id: int, study_id: int) -> None:
        count = conn.execute(select(func.count()).select_from(instance)
                             .where(instance.c.series_id == series_id)).scalar_one()
        if count == 0:
            conn.execute(delete(series).where(series.c.id == series_id))
        else:
            conn.execute(update(series).where(series.c.id == series_id)
                         .values(NumberOfSeriesRelatedInstances=count))
        rows = conn.execute(
            select(series.c.Modality, series.c.NumberOfSeriesRelatedInstances)
            .where(series.c.study_id == study_id)).all()
        classes = conn.execute(
            select(instance.c.SOPClassUID).distinct()
            .select_from(instance.join(series))
            .where(series.c.study_id == study_id)).scalars().all()
        conn.execute(update(study).where(study.c.id == study_id).values(
            NumberOfStudyRelatedSeries=len(rows),
            NumberOfStudyRelatedInstances=sum(r[1] for r in rows),
            ModalitiesInStudy="\\".join(sorted({r[0] for r in rows if r[0]})) or None,
            SOPClassesInStudy="\\".join(sorted(classes)) or None,
        ))

    # -- the publish outbox ------------------------------------------------------------------------
    def claim_due(self, *, limit: int, lease_seconds: float,
                  now: float | None = None) -> list[OutboxItem]:
        """Take up to ``limit`` studies due for publishing: pending ones whose quiet period
        has passed, and claimed ones whose lease ran out (a publisher that died mid-way).

        Each is leased for ``lease_seconds`` (``due_at`` moves to the end of the lease) and
        stamped with a token (``updated_at``): :meth:`finish_publish` removes the row only if
        no store re-queued the study meanwhile. On PostgreSQL ``FOR UPDATE SKIP LOCKED`` lets
        several replicas claim side by side without taking the same study.
        """
        now = time.time() if now is None else now
        stmt = (select(outbox.c.StudyInstanceUID, outbox.c.reason, outbox.c.attempts)
                .where(outbox.c.state.in_(("pending", "publishing")), outbox.c.due_at <= now)
                .order_by(outbox.c.due_at).limit(limit))
        if not self.is_sqlite:
            stmt = stmt.with_for_update(skip_locked=True)
        claimed: list[OutboxItem] = []
        with self.write() as conn:
            for uid, reason, attempts in conn.execute(stmt).all():
                token = now + len(claimed) * 1e-6  # distinct per row, monotonic per claim
                conn.execute(update(outbox).where(outbox.c.StudyInstanceUID == uid).values(
                    state="publishing", due_at=now + lease_seconds, updated_at=token))
                claimed.append(OutboxItem(uid, reason, attempts, token))
        return claimed

    def release_leases(self) -> int:
        """Make every claimed study due again (a single-node publisher starting: nothing
        else can be holding a lease on an SQLite index)."""
        with self.write() as conn:
            result = conn.execute(update(outbox).where(outbox.c.state == "publishing").values(
                state="pending", due_at=time.time()))
        return int(result.rowcount)

    def finish_publish(self, item: OutboxItem) -> bool:
        """Drop the outbox row of a published study, unless it was re-queued meanwhile
        (then it stays pending and is published again). True if removed."""
        with self.write() as conn:
            result = conn.execute(delete(outbox).where(
                outbox.c.StudyInstanceUID == item.study_uid, outbox.c.updated_at == item.token))
        return bool(result.rowcount)

    def retry_publish(self, item: OutboxItem, *, due_at: float, error: str,
                      state: str = "pending") -> None:
        """Schedule another attempt (``state`` ``pending``) or park the study for an operator
        (``failed``, the dead letter) with the reason; a study re-queued meanwhile by a store
        keeps its new schedule."""
        with self.write() as conn:
            conn.execute(update(outbox).where(
                outbox.c.StudyInstanceUID == item.study_uid, outbox.c.updated_at == item.token,
            ).values(state=state, due_at=due_at, attempts=item.attempts + 1,
                     last_error=error[:2000], updated_at=time.time()))

    def outbox_states(self) -> dict[str, int]:
        """How many studies the outbox holds in each state (for ``/metrics``)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(outbox.c.state, func.count()).group_by(outbox.c.state))
            return {str(state): int(count) for state, count in rows}

    def outbox_rows(self, *, states: tuple[str, ...] | None = None,
                    study_uid: str | None = None) -> list[dict[str, Any]]:
        """The outbox as rows (for ``publish --failed`` and ``/api/publish``)."""
        stmt = select(outbox).order_by(outbox.c.due_at)
        if states is not None:
            stmt = stmt.where(outbox.c.state.in_(states))
        if study_uid is not None:
            stmt = stmt.where(outbox.c.StudyInstanceUID == study_uid)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(stmt)]

    def replay(self, study_uid: str | None = None, *, now: float | None = None) -> int:
        """Make failed studies (or one study, whatever its state) due again now; returns how
        many. A study with no outbox row (already published) is queued afresh."""
        now = time.time() if now is None else now
        with self.write() as conn:
            if study_uid is None:
                result = conn.execute(update(outbox).where(outbox.c.state == "failed").values(
                    state="pending", due_at=now, attempts=0, updated_at=now))
                return int(result.rowcount)
            self._stmt_outbox(conn, {
                "StudyInstanceUID": study_uid, "due_at": now, "reason": "replay",
                "state": "pending", "attempts": 0, "last_error": None, "updated_at": now})
            return 1

    def study_snapshot(self, study_uid: str) -> dict[str, Any] | None:
        """Everything the index holds about one study, for the FHIR mapping: ``study`` and
        ``patient`` rows, ``series`` rows (each with its ``instances``) and ``published_at``
        (when it was last recorded as published, None if never), or None if the study is not
        (or no longer) stored."""
        with self.engine.connect() as conn:
            row = conn.execute(select(study).where(study.c.StudyInstanceUID == study_uid)).first()
            if row is None:
                return None
            study_row = dict(row._mapping)
            patient_row = dict(conn.execute(select(patient).where(
                patient.c.id == study_row["patient_id"])).one()._mapping)
            series_rows = [dict(r._mapping) for r in conn.execute(
                select(series).where(series.c.study_id == study_row["id"]))]
            by_id = {s["id"]: s for s in series_rows}
            for s in series_rows:
                s["instances"] = []
            for r in conn.execute(select(instance).where(
                    instance.c.series_id.in_(list(by_id)))):
                by_id[r.series_id]["instances"].append(dict(r._mapping))
            published_at = conn.execute(select(publication.c.published_at).where(
                publication.c.StudyInstanceUID == study_uid)).scalar()
        for row_with_json in (study_row, *series_rows):
            if isinstance(row_with_json.get("attributes"), str):
                row_with_json["attributes"] = json.loads(row_with_json["attributes"])
        return {"study": study_row, "patient": patient_row, "series": series_rows,
                "published_at": published_at}

    def record_publication(self, study_uid: str, *, patient_reference: str | None,
                           imaging_study_id: str | None) -> None:
        """Remember under which Patient and as which ImagingStudy a study was published."""
        values = {"StudyInstanceUID": study_uid, "patient_reference": patient_reference,
                  "imaging_study_id": imaging_study_id, "published_at": time.time()}
        stmt = self._insert(publication).values(values)
        with self.write() as conn:
            conn.execute(stmt.on_conflict_do_update(
                index_elements=["StudyInstanceUID"],
                set_={k: stmt.excluded[k] for k in values if k != "StudyInstanceUID"}))

    def forget_publication(self, study_uid: str) -> None:
        with self.write() as conn:
            conn.execute(delete(publication).where(
                publication.c.StudyInstanceUID == study_uid))

    # -- removal ---------------------------------------------------------------------------------
    def remove(self, conn: Connection, *, study_uid: str, series_uid: str | None = None,
               sop_uids: list[str] | None = None, reason: str) -> list[StoredInstance]:
        """Delete the index rows of a study, a series or some instances of a study, in
        ``conn``'s transaction; counts follow, emptied series, studies and patients go, and
        each touched study is queued for publishing with ``reason``. Returns what was removed
        (the caller deletes the blobs once the transaction has committed)."""
        stmt = (select(instance.c.SOPInstanceUID, study.c.StudyInstanceUID,
                       series.c.SeriesInstanceUID, instance.c.SOPClassUID,
                       instance.c.TransferSyntaxUID, instance.c.blob_key, instance.c.blob_size,
                       instance.c.id, series.c.id, study.c.id, study.c.patient_id)
                .select_from(instance.join(series).join(study))
                .where(study.c.StudyInstanceUID == study_uid))
        if series_uid is not None:
            stmt = stmt.where(series.c.SeriesInstanceUID == series_uid)
        if sop_uids is not None:
            stmt = stmt.where(instance.c.SOPInstanceUID.in_(sop_uids))
        rows = conn.execute(stmt).all()
        if not rows:
            return []
        conn.execute(delete(instance).where(instance.c.id.in_([r[7] for r in rows])))
        for series_id, study_id in sorted({(r[8], r[9]) for r in rows}):
            self._refresh_counts(conn, series_id, study_id)
        for study_id, patient_id in sorted({(r[9], r[10]) for r in rows}):
            left = conn.execute(select(func.count()).select_from(series)
                                .where(series.c.study_id == study_id)).scalar_one()
            if left == 0:
                conn.execute(delete(study).where(study.c.id == study_id))
                others = conn.execute(select(func.count()).select_from(study)
                                      .where(study.c.patient_id == patient_id)).scalar_one()
                if others == 0:
                    conn.execute(delete(patient).where(patient.c.id == patient_id))
        self.queue_publish(conn, study_uid, reason)
        return [StoredInstance(*r[:7]) for r in rows]

    def reject(self, conn: Connection, references: list[tuple[str, str]], *, reason: str,
               note_uid: str) -> None:
        """Remember ``(study_uid, sop_uid)`` pairs as rejected (an IOCM note), so they are
        refused if sent again."""
        now = time.time()
        stmt = self._insert(rejected).values([
            {"SOPInstanceUID": sop, "StudyInstanceUID": study_uid, "reason": reason,
             "note_uid": note_uid, "rejected_at": now} for study_uid, sop in references])
        conn.execute(stmt.on_conflict_do_nothing(index_elements=["SOPInstanceUID"]))

    def rejection_of(self, sop_uid: str,
                     conn: Connection | None = None) -> tuple[str, str] | None:
        """(reason code, note UID) if this instance was rejected by an IOCM note."""
        if conn is not None:
            row = self._stmt_rejected(conn, {"sop": sop_uid}).first()
        else:
            with self._connection() as own:
                row = self._stmt_rejected(own, {"sop": sop_uid}).first()
        return (row[0], row[1]) if row else None

    def prior_state(self, sop_uid: str) -> tuple[tuple[str, str] | None, StoredInstance | None]:
        """What the write path checks before storing (one connection for both): the IOCM
        rejection of this SOP Instance UID, and the instance stored under it."""
        with self._connection() as conn:
            return self.rejection_of(sop_uid, conn), self.find_instance(sop_uid, conn)

    def clear(self) -> None:
        """Delete every row (``reindex`` rebuilds from the blobs). The outbox is kept."""
        with self.write() as conn:
            for table in (instance, series, study, patient):
                conn.execute(delete(table))


SQLITE_CACHE_KIB = 16384
"""Page cache of each SQLite connection (SQLite's default is 2 MiB). Pages missing from it are
read from the operating system's cache one system call each; at 1,000,000 instances a year's
studies touch more than 2 MiB of pages, so the default made a one-year QIDO-RS query re-read
them on every request (bench scale measure: SQL alone 22 -> 7 ms). Memory is taken as pages are
read, so a small index never fills it."""
#: WAL size (pages) at which a commit checkpoints by itself: only when the syncer's
#: checkpoints fall behind (SQLite's default, 1000 pages, would checkpoint inside a store's
#: commit every few hundred instances).
WAL_BACKSTOP_PAGES = 16000


def _end(conn: Connection, driver: Any, *, commit: bool) -> None:
    """End a write transaction: through SQLAlchemy when it knows of one (PostgreSQL, or a
    statement of the transaction went through it: it then began its own, which on SQLite is
    the driver's), else on the SQLite driver, where :meth:`Index.write` began it."""
    if driver is None or conn.in_transaction():
        if commit:
            conn.commit()
        else:
            conn.rollback()
    elif commit:
        driver.commit()
    else:
        driver.rollback()


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False},
                               pool_size=16, max_overflow=32)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # Autocommit at the driver level: this module issues BEGIN IMMEDIATE itself.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
            cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_BACKSTOP_PAGES}")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=16, max_overflow=32)
