"""Storage Commitment Push Model SCP (PS3.4 Annex J) on pynetdicom: translation and the check.

A requester (typically a modality) sends N-ACTION (Action Type ID 1, Request Storage Commitment)
on the well-known SOP Instance 1.2.840.10008.1.20.1.1, with a Transaction UID (0008,1195) and a
Referenced SOP Sequence (0008,1199) of (SOP Class UID, SOP Instance UID) pairs (Table J.3-1).

1. The N-ACTION-RSP goes back at once (J.3.2.1.3): 0000 when the request is well formed and
   the gateway takes it on; otherwise a failure, with an Error Comment (0000,0902) saying why:
   0x0112 No such SOP Instance (not the well-known instance), 0x0123 No such action (Action
   Type ID other than 1), 0x0115 Invalid argument value (Transaction UID or Referenced SOP
   Sequence missing, empty or not valid UIDs: PS3.7 10.1.4.1.10; Annex J defines no status
   of its own), 0x0110 Processing failure (Action Information that cannot be decoded).
2. After the response has gone out, every reference is checked against the index and the
   storage (J.3.3.1.2): committed when the index holds the instance with the same SOP Class and
   its stored file is there, with the size the index recorded. Otherwise it fails with a Failure
   Reason (0008,1197) (PS3.3 C.14.1.1): 0x0112 No such object instance, 0x0119 Class/Instance
   conflict, 0x0122 Referenced SOP Class not supported (unknown and not a storage class the
   gateway accepts), 0x0110 Processing failure (stored file missing or truncated, index
   unavailable), 0x0131 Duplicate transaction UID (that transaction is still being answered).
3. The result is an N-EVENT-REPORT (J.3.3.1): Event Type ID 1 when everything is committed, 2
   when failures exist, carrying the Transaction UID, Retrieve AE Title (0008,0054), the
   committed references (Referenced SOP Sequence) and the failed ones (Failed SOP Sequence
   (0008,1198)); every reference of the request is in exactly one of the two.

Delivery (J.3.3.1.2, J.3.3.1.3): the report goes on the requester's own association if it is
still open ``dimse.commitment_report_delay`` seconds after the N-ACTION-RSP. It is sent from the
association's own thread right after the response went out (the way C-GET sends its
sub-operations), so nothing else reads or writes that association meanwhile. A requester that
releases (or aborts) within the delay, or while the report is waiting for its response, gets the
report on a new association the gateway opens to the calling AE title's ``[dimse.peers]`` entry,
proposing the Storage Commitment SOP Class with SCP/SCU Role Selection, itself as SCP (PS3.7
D.3.3.4); up to three attempts. A requester that is not a known peer is told nothing more: a
warning is logged.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import build_context, build_role, evt
from pynetdicom.dimse_primitives import N_ACTION, N_EVENT_REPORT
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT, A_RELEASE
from sqlalchemy.exc import SQLAlchemyError

from gateway.config import Peer
from gateway.index import Index, IndexUnavailable, StoredInstance
from gateway.storage import FileStorage, is_valid_uid

log = logging.getLogger("gateway.commitment")

#: Storage Commitment Push Model SOP Class and its well-known SOP Instance (PS3.4 J.3.5).
SOP_CLASS = "1.2.840.10008.1.20.1"
SOP_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_COMMITMENT = 1  #: Action Type ID (J.3.2.1.1)
ALL_COMMITTED, FAILURES_EXIST = 1, 2  #: Event Type IDs (J.3.3.1.1)
TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]

# Failure Reasons (PS3.3 C.14.1.1)
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
SOP_CLASS_NOT_SUPPORTED = 0x0122
DUPLICATE_TRANSACTION_UID = 0x0131

# N-ACTION statuses (PS3.7 10.1.4.1.10)
_NO_SUCH_SOP_INSTANCE = 0x0112
_INVALID_ARGUMENT_VALUE = 0x0115
_NO_SUCH_ACTION = 0x0123

#: Waits between attempts to deliver a report on a new association.
RETRY_DELAYS = (0.0, 2.0, 10.0)
_POLL = 0.01


class MalformedRequest(Exception):
    """The N-ACTION cannot be taken on; ``status`` is the N-ACTION-RSP failure status."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status


@dataclass(frozen=True)
class Reference:
    """One item of a Referenced SOP Sequence (PS3.3 Table 10-11, SOP Instance Reference)."""

    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Outcome:
    """The result of one Storage Commitment transaction (PS3.4 J.3.3.1.1).

    ``failed`` pairs each failed reference with its Failure Reason (PS3.3 C.14.1.1).
    """

    transaction_uid: str
    committed: tuple[Reference, ...]
    failed: tuple[tuple[Reference, int], ...]

    @property
    def event_type(self) -> int:
        """1: storage commitment request successful; 2: complete, failures exist."""
        return FAILURES_EXIST if self.failed else ALL_COMMITTED

    def event_information(self, retrieve_ae_title: str) -> Dataset:
        """The N-EVENT-REPORT Event Information (PS3.4 Table J.3-2): Transaction UID, the
        committed references (with Retrieve AE Title, where they can be retrieved from) and
        the failed ones with their Failure Reasons."""
        ds = Dataset()
        ds.TransactionUID = self.transaction_uid
        if self.committed:
            ds.RetrieveAETitle = retrieve_ae_title
            ds.ReferencedSOPSequence = [_item(ref) for ref in self.committed]
        if self.failed:
            items = []
            for ref, reason in self.failed:
                item = _item(ref)
                item.FailureReason = reason
                items.append(item)
            ds.FailedSOPSequence = items
        return ds


def _item(ref: Reference) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ref.sop_class_uid
    item.ReferencedSOPInstanceUID = ref.sop_instance_uid
    return item


def parse_request(action_information: Dataset | None) -> tuple[str, tuple[Reference, ...]]:
    """Transaction UID and references of a Request Storage Commitment (PS3.4 Table J.3-1).

    Raises
    ------
    MalformedRequest
        0x0115 (Invalid argument value) when the Transaction UID or the Referenced SOP
        Sequence is missing, empty or holds something that is not a valid UID; 0x0110 when the
        Action Information cannot be decoded.
    """
    if action_information is None:
        raise MalformedRequest(_INVALID_ARGUMENT_VALUE, "no Action Information")
    try:
        transaction = str(action_information.get("TransactionUID", "") or "").strip()
        sequence = action_information.get("ReferencedSOPSequence", None)
        items = list(sequence) if sequence is not None else []
        references = tuple(
            Reference(str(item.get("ReferencedSOPClassUID", "") or "").strip(),
                      str(item.get("ReferencedSOPInstanceUID", "") or "").strip())
            for item in items)
    except Exception as exc:  # pydicom decodes lazily: a broken element raises here
        raise MalformedRequest(PROCESSING_FAILURE,
                               f"Action Information cannot be decoded: {exc}") from exc
    if not transaction:
        raise MalformedRequest(_INVALID_ARGUMENT_VALUE, "Transaction UID (0008,1195) missing")
    if not is_valid_uid(transaction):
        raise MalformedRequest(_INVALID_ARGUMENT_VALUE, "Transaction UID is not a valid UID")
    if not references:
        raise MalformedRequest(_INVALID_ARGUMENT_VALUE,
                               "Referenced SOP Sequence (0008,1199) missing or empty")
    for number, ref in enumerate(references, 1):
        if not (is_valid_uid(ref.sop_class_uid) and is_valid_uid(ref.sop_instance_uid)):
            raise MalformedRequest(_INVALID_ARGUMENT_VALUE,
                                   f"Referenced SOP Sequence item {number}: SOP Class or "
                                   "Instance UID missing or not valid")
    return transaction, references


def check(index: Index, storage: FileStorage, transaction_uid: str,
          references: Iterable[Reference], storage_classes: Collection[str]) -> Outcome:
    """Decide, reference by reference, whether the gateway commits to keep it (PS3.4
    J.3.3.1.2): the index holds the instance with the same SOP Class and the stored file is
    there with the recorded size. See the module docstring for the Failure Reasons."""
    committed: list[Reference] = []
    failed: list[tuple[Reference, int]] = []
    for ref in references:
        try:
            stored = index.find_instance(ref.sop_instance_uid)
        except (SQLAlchemyError, IndexUnavailable):
            log.exception("storage commitment %s: index unavailable", transaction_uid)
            failed.append((ref, PROCESSING_FAILURE))
            continue
        reason = _failure_reason(storage, ref, stored, storage_classes)
        if reason is None:
            committed.append(ref)
        else:
            failed.append((ref, reason))
    return Outcome(transaction_uid, tuple(committed), tuple(failed))


def _failure_reason(storage: FileStorage, ref: Reference, stored: StoredInstance | None,
                    storage_classes: Collection[str]) -> int | None:
    if stored is None:
        if ref.sop_class_uid not in storage_classes:
            return SOP_CLASS_NOT_SUPPORTED
        return NO_SUCH_OBJECT_INSTANCE
    if stored.sop_class_uid != ref.sop_class_uid:
        return CLASS_INSTANCE_CONFLICT
    try:
        path: Path = storage.path_for(stored.blob_key)
        if path.stat().st_size != stored.blob_size:
            log.warning("storage commitment: SOP Instance %s: stored file has %d bytes, the "
                        "index says %d", ref.sop_instance_uid, path.stat().st_size,
                        stored.blob_size)
            return PROCESSING_FAILURE
    except (OSError, ValueError):
        log.warning("storage commitment: SOP Instance %s is indexed but its stored file is "
                    "missing", ref.sop_instance_uid)
        return PROCESSING_FAILURE
    return None


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]  # LO
    return ds


@dataclass
class _Job:
    """One accepted N-ACTION waiting for its response to go out."""

    transaction_uid: str
    references: tuple[Reference, ...]
    calling: str
    message_id: int
    context_id: int
    transfer_syntax: str


class CommitmentSCP:
    """Answers Storage Commitment requests and delivers their results.

    Parameters
    ----------
    index, storage
        Where stored instances are looked up.
    peers
        ``[dimse.peers]``: where a requester that released its association is reached.
    ae
        The gateway's pynetdicom AE, used to open the association for a late report.
    ae_title
        Reported as Retrieve AE Title (0008,0054) of the committed instances.
    storage_classes
        The storage SOP classes the gateway accepts (an unknown instance of another class
        fails with 0x0122).
    report_delay
        ``dimse.commitment_report_delay`` (seconds).
    """

    def __init__(self, index: Index, storage: FileStorage, peers: Mapping[str, Peer], *,
                 ae: Any, ae_title: str, storage_classes: Collection[str],
                 report_delay: float) -> None:
        self.index = index
        self.storage = storage
        self.peers = peers
        self.ae = ae
        self.ae_title = ae_title
        self.storage_classes = frozenset(storage_classes)
        self.report_delay = report_delay
        self._active: set[str] = set()
        self._lock = threading.Lock()
        self._message_ids = itertools.count(1)
        self._stopping = threading.Event()
        self._threads: set[threading.Thread] = set()

    # -- the N-ACTION ----------------------------------------------------------------------------
    def handle(self, event: evt.Event) -> tuple[Dataset | int, None]:
        """pynetdicom ``EVT_N_ACTION`` handler: the N-ACTION-RSP status (PS3.4 J.3.2.1.3).

        When the request is taken on, the check and the report run once the response has been
        sent (see :meth:`_on_sent`)."""
        request: Any = event.request
        calling = str(event.assoc.requestor.ae_title).strip()
        if str(request.RequestedSOPInstanceUID) != SOP_INSTANCE:
            return _failure(_NO_SUCH_SOP_INSTANCE,
                            f"not the well-known instance {SOP_INSTANCE}"), None
        if event.action_type != REQUEST_COMMITMENT:
            return _failure(_NO_SUCH_ACTION,
                            f"Action Type ID {event.action_type} is not 1"), None
        try:
            information = (event.action_information
                           if request.ActionInformation is not None else None)
            transaction, references = parse_request(information)
        except MalformedRequest as exc:
            log.warning("storage commitment request from %s refused 0x%04X: %s", calling,
                        exc.status, exc)
            return _failure(exc.status, str(exc)), None
        except Exception as exc:
            log.warning("storage commitment request from %s: undecodable: %s", calling, exc)
            return _failure(PROCESSING_FAILURE, "Action Information cannot be decoded"), None
        log.info("storage commitment request %s from %s: %d references", transaction,
                 calling, len(references))
        # the check and the report follow once this returns and the response is on its way
        job = _Job(transaction, references, calling, int(request.MessageID),
                   int(event.context.context_id), str(event.context.transfer_syntax))
        self._await_response(event.assoc, job)
        return 0x0000, None

    def _await_response(self, assoc: Any, job: _Job) -> None:
        """Run :meth:`_report` right after this job's N-ACTION-RSP has been queued for the
        network, in the association's own thread: the association's ``dimse.send_msg`` is
        wrapped once (pynetdicom's ``EVT_DIMSE_SENT`` fires before the message is queued, too
        early: the report would overtake the response)."""
        dimse = assoc.dimse
        pending: dict[int, _Job] | None = dimse.__dict__.get("_gateway_commitment_jobs")
        if pending is None:
            pending = dimse.__dict__.setdefault("_gateway_commitment_jobs", {})
            original = dimse.send_msg

            def send_msg(primitive: Any, context_id: int) -> None:
                original(primitive, context_id)
                if isinstance(primitive, N_ACTION) and pending:
                    sent = pending.pop(int(primitive.MessageIDBeingRespondedTo or 0), None)
                    # a success only: pynetdicom may have turned ours into a failure
                    if sent is not None and primitive.Status == 0x0000:
                        self._report(assoc, sent, time.monotonic() + self.report_delay)

            dimse.send_msg = send_msg
        pending[job.message_id] = job

    # -- the result ------------------------------------------------------------------------------
    def _report(self, assoc: Any, job: _Job, open_until: float) -> None:
        """Check the references, then send the report on ``assoc`` if the requester keeps it
        open, else on a new association. Runs in the association's thread."""
        with self._lock:
            duplicate = job.transaction_uid in self._active
            self._active.add(job.transaction_uid)

        def finished() -> None:
            # A duplicate is answered but must not end the transaction already in progress.
            if not duplicate:
                self._finished(job.transaction_uid)

        try:
            outcome = self._outcome(job, duplicate=duplicate)
            log.info("storage commitment %s for %s: %d committed, %d failed",
                     job.transaction_uid, job.calling, len(outcome.committed),
                     len(outcome.failed))
            if self._still_open_at(assoc, open_until) and self._send_on(assoc, job, outcome):
                finished()
                return
            self._deliver_later(job.calling, outcome, finished)
        except Exception:
            log.exception("storage commitment %s: report failed", job.transaction_uid)
            finished()

    def _finished(self, transaction_uid: str) -> None:
        """The transaction is no longer active (PS3.4 J.3.3.1.2): its UID may come again."""
        with self._lock:
            self._active.discard(transaction_uid)

    def _outcome(self, job: _Job, *, duplicate: bool) -> Outcome:
        if duplicate:
            log.warning("storage commitment %s from %s: transaction already in progress",
                        job.transaction_uid, job.calling)
            return Outcome(job.transaction_uid, (),
                           tuple((ref, DUPLICATE_TRANSACTION_UID) for ref in job.references))
        try:
            return check(self.index, self.storage, job.transaction_uid, job.references,
                         self.storage_classes)
        except Exception:
            log.exception("storage commitment %s: check failed", job.transaction_uid)
            return Outcome(job.transaction_uid, (),
                           tuple((ref, PROCESSING_FAILURE) for ref in job.references))

    @staticmethod
    def _closing(assoc: Any) -> bool:
        """The requester released or aborted (or the association is gone): an A-RELEASE or
        A-ABORT waiting for the association's reactor, which this thread is running."""
        if not assoc.is_established:
            return True
        waiting = assoc.dul.peek_next_pdu()
        return isinstance(waiting, A_ABORT | A_P_ABORT) or (
            isinstance(waiting, A_RELEASE) and waiting.result is None)

    def _still_open_at(self, assoc: Any, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if self._closing(assoc):
                return False
            time.sleep(_POLL)
        return not self._closing(assoc)

    def _send_on(self, assoc: Any, job: _Job, outcome: Outcome) -> bool:
        """Send the report on the requester's association; False when it was not answered
        (released, aborted or timed out meanwhile), so it must go on a new association."""
        syntax = UID(job.transfer_syntax)
        encoded = encode(outcome.event_information(self.ae_title), syntax.is_implicit_VR,
                         syntax.is_little_endian, syntax.is_deflated)
        if encoded is None:
            log.error("storage commitment %s: the report cannot be encoded", job.transaction_uid)
            return False
        request = N_EVENT_REPORT()
        request.MessageID = next(self._message_ids) % 0xFFFF + 1
        request.AffectedSOPClassUID = SOP_CLASS
        request.AffectedSOPInstanceUID = SOP_INSTANCE
        request.EventTypeID = outcome.event_type
        request.EventInformation = BytesIO(encoded)
        assoc.dimse.send_msg(request, job.context_id)
        status = self._await_report_response(assoc, int(request.MessageID))
        if status is None:
            log.info("storage commitment %s: %s did not answer the report on its association",
                     job.transaction_uid, job.calling)
            return False
        _log_delivered(job.transaction_uid, job.calling, "same association", status)
        return True

    @classmethod
    def _await_report_response(cls, assoc: Any, message_id: int) -> int | None:
        """Wait for the N-EVENT-REPORT-RSP (up to the DIMSE timeout); None if the requester
        releases or aborts first. Requests it sends meanwhile go back on the queue, in order,
        for the association to serve once this returns."""
        messages = assoc.dimse.msg_queue
        timeout = assoc.dimse.dimse_timeout
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        others: list[Any] = []
        try:
            while True:
                try:
                    item = messages.get(timeout=_POLL * 5)
                except queue.Empty:
                    if cls._closing(assoc) or (deadline is not None
                                               and time.monotonic() > deadline):
                        return None
                    continue
                message = item[1]
                if isinstance(message, N_EVENT_REPORT) and \
                        message.MessageIDBeingRespondedTo == message_id:
                    return int(message.Status) if message.Status is not None else 0x0110
                others.append(item)
        finally:
            if others:
                while True:  # keep the arrival order: ours first, then whatever came after
                    try:
                        others.append(messages.get_nowait())
                    except queue.Empty:
                        break
                for item in others:
                    messages.put(item)

    # -- on a new association --------------------------------------------------------------------
    def _deliver_later(self, calling: str, outcome: Outcome,
                       finished: Callable[[], None]) -> None:
        peer = self.peers.get(calling)
        if peer is None:
            finished()
            log.warning("storage commitment %s: cannot deliver the result (%d committed, %d "
                        "failed): %s released its association and is not in [dimse.peers]",
                        outcome.transaction_uid, len(outcome.committed), len(outcome.failed),
                        calling)
            return
        thread = threading.Thread(target=self._deliver_to_peer, args=(peer, outcome, finished),
                                  name=f"commitment-{calling}", daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _deliver_to_peer(self, peer: Peer, outcome: Outcome,
                         finished: Callable[[], None]) -> None:
        try:
            for attempt, delay in enumerate(RETRY_DELAYS, 1):
                if self._stopping.wait(delay):
                    break
                problem = self._send_new_association(peer, outcome)
                if problem is None:
                    return
                log.warning("storage commitment %s: attempt %d to report to %s (%s:%d) "
                            "failed: %s", outcome.transaction_uid, attempt, peer.ae_title,
                            peer.host, peer.port, problem)
            log.error("storage commitment %s: result not delivered to %s",
                      outcome.transaction_uid, peer.ae_title)
        finally:
            finished()
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _send_new_association(self, peer: Peer, outcome: Outcome) -> str | None:
        """Open an association to ``peer`` as SCP of Storage Commitment (role selection,
        PS3.7 D.3.3.4) and send the report; None on success, else what went wrong."""
        assoc = self.ae.associate(
            peer.host, peer.port, ae_title=peer.ae_title,
            contexts=[build_context(SOP_CLASS, TRANSFER_SYNTAXES)],
            ext_neg=[build_role(SOP_CLASS, scu_role=False, scp_role=True)])
        if not assoc.is_established:
            return "association not accepted"
        try:
            accepted = [cx for cx in assoc.accepted_contexts
                        if str(cx.abstract_syntax) == SOP_CLASS and cx.as_scp]
            if not accepted:
                return "the peer did not accept the SCP role for Storage Commitment"
            status, _reply = assoc.send_n_event_report(
                outcome.event_information(self.ae_title), outcome.event_type, SOP_CLASS,
                SOP_INSTANCE, msg_id=next(self._message_ids) % 0xFFFF + 1)
            if "Status" not in status:
                return "no N-EVENT-REPORT response"
            _log_delivered(outcome.transaction_uid, peer.ae_title, "new association",
                           int(status.Status))
            return None
        finally:
            if assoc.is_established:
                assoc.release()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop retrying late reports; wait (up to ``timeout``) for those being sent."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def _log_delivered(transaction: str, ae_title: str, how: str, status: int) -> None:
    if status == 0x0000:
        log.info("storage commitment %s: result delivered to %s on the %s", transaction,
                 ae_title, how)
    else:
        log.warning("storage commitment %s: %s answered the result (%s) with status 0x%04X",
                    transaction, ae_title, how, status)

