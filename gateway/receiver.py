"""The lean DICOM Upper Layer acceptor (PS3.8 §9, PS3.7 §9.3): the gateway's associations.

Why it exists: pynetdicom decodes every PDU into objects, runs a state machine and two threads
per association, and costs ≈7 ms of CPU per received CT image here, ten times dcmtk's storescp;
its C-STORE sub-operations (C-MOVE, C-GET) cost as much again. This module serves an
association with blocking reads into one reusable buffer, one thread and no per-PDU objects
(framing in :mod:`gateway.upper_layer`):

* each C-STORE data set is streamed from the PDVs straight into a staging file behind a Part 10
  header (byte-exact as received) and handed to the single write path; the C-STORE response
  carries the write path's status, and an Error Comment (0000,0902) on failure so the sender's
  log says why;
* C-ECHO is answered here;
* C-FIND, C-MOVE, C-GET (and C-CANCEL) go to the Query/Retrieve handler
  (:mod:`gateway.qr_lean`), which talks on this association through :class:`Association`.

What it reuses from pynetdicom: PDU encoding/decoding of the association PDUs and presentation
context negotiation (``negotiate_as_acceptor``), so negotiation behaves exactly as pynetdicom's.
Associations proposing a service this module does not serve (Storage Commitment) are handed,
untouched (the request is only peeked at), to the full pynetdicom AE (see ``gateway.dimse``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import struct
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from pydicom.uid import UID, AllTransferSyntaxes
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import (
    AllStoragePresentationContexts,
    PresentationContext,
    build_context,
    negotiate_as_acceptor,
)

from gateway import metrics, storage, upper_layer
from gateway.errors import OutOfResources, StoreError
from gateway.upper_layer import (
    A_RELEASE_RP,
    AFFECTED_SOP_CLASS,
    AFFECTED_SOP_INSTANCE,
    APPLICATION_CONTEXT,
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_ECHO_RSP,
    C_FIND_RQ,
    C_GET_RQ,
    C_MOVE_RQ,
    C_STORE_RQ,
    C_STORE_RSP,
    COMMAND_FIELD,
    ERROR_COMMENT,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    MESSAGE_ID,
    PDU_HEADER,
    RESPONDED_TO,
    STATUS,
    AssociationEnded,
    Message,
    ProtocolError,
    text,
    ui,
    us,
)

log = logging.getLogger("gateway.dimse")

VERIFICATION = "1.2.840.10008.1.1"
_EXPLICIT_LE, _DEFLATED, _BIG_ENDIAN, _IMPLICIT_LE = (
    "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2")

#: Every transfer syntax pydicom knows (stored byte-exact, so none needs a codec here), in the
#: order the gateway prefers when a presentation context offers several (the acceptor's first
#: match wins): Explicit VR Little Endian; then the compressed syntaxes, so a sender holding
#: compressed pixels can send them as they are; Deflate, Big Endian and Implicit VR last.
TRANSFER_SYNTAXES = [_EXPLICIT_LE] + [
    str(uid) for uid in AllTransferSyntaxes
    if str(uid) not in (_EXPLICIT_LE, _DEFLATED, _BIG_ENDIAN, _IMPLICIT_LE)
] + [_DEFLATED, _BIG_ENDIAN, _IMPLICIT_LE]
#: Every Storage SOP Class pynetdicom knows.
STORAGE_CLASSES = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)


def storage_contexts() -> list[PresentationContext]:
    """The presentation contexts of a receiver: Verification, and every Storage SOP Class in
    every transfer syntax. Storage accepts both roles: a C-GET requester proposes them with
    itself as SCP (role selection, PS3.7 D.3.3.4), a plain sender as SCU."""
    contexts = [build_context(VERIFICATION, TRANSFER_SYNTAXES)]
    for uid in sorted(STORAGE_CLASSES):
        context = build_context(uid, TRANSFER_SYNTAXES)
        context.scu_role = context.scp_role = True
        contexts.append(context)
    return contexts


def storage_only(rq: A_ASSOCIATE) -> bool:
    """True when the request proposes nothing but Verification and Storage (what a receiver
    process serves; see :mod:`gateway.workers`)."""
    return all(str(cx.abstract_syntax) in STORAGE_CLASSES
               or str(cx.abstract_syntax) == VERIFICATION
               for cx in rq.presentation_context_definition_list)


def storing_into(ingest: Any, *, index_after_response: bool = False) -> StoreHandler:
    """The C-STORE handler over the write path (:meth:`gateway.ingest.Ingest.store_file`):
    the status, for failures an error comment, and what to run once the response is sent.
    Shared by the lean Upper Layer (``index_after_response``: the index rows are committed
    after the response, see "Index later" in :mod:`gateway.ingest`) and the pynetdicom
    handler (which answers only when the handler returns, so commits before)."""

    def store(path: Path, sop_class: str, sop_uid: str, calling: str,
              meanwhile: Callable[[], None] | None) -> StoreReply:
        try:
            sink = ReceiveSink.for_path(path)
            if sink is not None:
                try:
                    sink.finish()  # flush; a write that failed while receiving is 0xA700 here
                except StoreError as exc:  # before the write path (which counts its own)
                    metrics.store_failed(exc.status)
                    raise
            result = ingest.store_file(path, move=True, expected_sop_class=sop_class,
                                       expected_sop_uid=sop_uid, source=calling,
                                       defer_index=index_after_response, meanwhile=meanwhile)
        except StoreError as exc:
            log.warning("C-STORE from %s failed 0x%04X: SOP Instance %s: %s", calling,
                        exc.status, sop_uid, exc)
            return exc.status, str(exc), None
        except Exception:
            log.exception("C-STORE from %s: unexpected error storing SOP Instance %s",
                          calling, sop_uid)
            return 0xA700, "internal error; please retry", None  # the sender retries
        log.debug("C-STORE from %s %s study %s sop %s", calling, result.outcome,
                  result.study_uid, result.sop_uid)
        return 0x0000, "", result.commit_index

    return store

#: (status, error_comment, after): ``after`` is None or what to run once the response is sent.
StoreReply = tuple[int, str, Callable[[], None] | None]
#: handler(path, sop_class_uid, sop_instance_uid, calling_ae, meanwhile) -> StoreReply, where
#: ``meanwhile`` is None or work to run while the blob is flushed (``Ingest.store_file``).
StoreHandler = Callable[[Path, str, str, str, Callable[[], None] | None], StoreReply]
#: handler(association, message): serves one C-FIND, C-MOVE or C-GET request to its end.
QueryRetrieveHandler = Callable[["Association", Message], None]


class ReceiveSink:
    """Where pynetdicom streams one received data set (stands in for its NamedTemporaryFile).

    pynetdicom writes each incoming C-STORE data set to ``NamedTemporaryFile()`` from its DUL
    thread, where an ``OSError`` (disk full, read-only file system) aborts the association. This
    sink records such an error instead and swallows the rest of the data, so the C-STORE
    handler can answer 0xA700 Out of Resources, the status that tells the sender to keep the
    instance and retry (PS3.4 B.2.3). It also buffers writes (pynetdicom flushes every PDV).
    """

    _open: weakref.WeakValueDictionary[str, ReceiveSink] = weakref.WeakValueDictionary()
    directory: Path = Path(tempfile.gettempdir())

    #: Bytes written between two starts of their writeback to disk (with ``writeback``), so
    #: the fsync before the acknowledgement has little left to do.
    WRITEBACK_STEP = 256 * 1024
    #: Writes smaller than this are gathered (pynetdicom hands over one PDV at a time, however
    #: small); a larger one (the lean Upper Layer's PDVs of up to the maximum PDU length) goes
    #: straight from the receive buffer to the file, never copied into this buffer.
    BUFFER = 64 * 1024
    writeback = True
    #: Where staging files come from once :meth:`stage_into` named a storage.
    pool: storage.StagingPool | None = None

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        self.error: OSError | None = None
        self.file = self  # pynetdicom calls .file.flush()
        self._handle: Any = None
        self._written = 0
        self._kicked = 0
        try:
            fd = self._create()
            self._handle = os.fdopen(fd, "wb", buffering=self.BUFFER)
        except OSError as exc:
            self.error = exc
        ReceiveSink._open[self.name] = self

    def _create(self) -> int:
        """A new staging file: from the storage's pool of ready ones once staged into a
        storage (:meth:`stage_into`), else created here."""
        # A name even if none can be had (the error then answers 0xA700 through finish())
        self.name = os.path.join(self.directory, f"unavailable-{id(self)}")
        if self.pool is not None:
            self.name, fd = self.pool.take()
        else:
            self.name, fd = storage.new_staging_file(str(self.directory))
        return fd

    def write(self, data: bytes) -> int:
        if self._handle is not None:
            try:
                self._handle.write(data)
                self._written += len(data)
                if self.writeback and self._written - self._kicked >= self.WRITEBACK_STEP:
                    self._handle.flush()
                    self._start_writeback()
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def _start_writeback(self) -> None:
        """Start the writeback of what was flushed since the last start (``writeback``)."""
        if self.writeback and self._written > self._kicked:
            storage.start_writeback(self._handle.fileno(), self._kicked,
                                    self._written - self._kicked)
            self._kicked = self._written

    def flush(self) -> None:
        """Ignored: pynetdicom flushes after every PDV; :meth:`finish` flushes once."""

    def finish(self) -> None:
        """Flush everything received; raise :class:`OutOfResources` if any write failed."""
        if self._handle is not None:
            try:
                self._handle.flush()
                self._start_writeback()  # the tail: it proceeds while the header is parsed
            except OSError as exc:
                self._fail(exc)
        if self.error is not None:
            raise OutOfResources(f"cannot write received data to the staging area: "
                                 f"{self.error.strerror or self.error}")

    def close(self) -> None:
        if self._handle is not None:
            try:
                self._handle.close()
            except OSError as exc:
                self.error = self.error or exc
            self._handle = None

    def _fail(self, exc: OSError) -> None:
        self.error = self.error or exc
        handle, self._handle = self._handle, None
        with contextlib.suppress(OSError):
            handle.close()
        with contextlib.suppress(OSError):  # e.g. the file system just went read-only
            Path(self.name).unlink(missing_ok=True)

    def __del__(self) -> None:
        # An association aborted mid-transfer never reaches the handler: drop its partial data.
        if self._handle is not None:
            try:
                self._handle.close()
                Path(self.name).unlink(missing_ok=True)
            except OSError:
                pass

    @classmethod
    def stage_into(cls, storage: Any) -> None:
        """Received data sets land in ``storage``'s staging area (so moving one into place is
        a rename, not a copy); their writeback starts early when the storage fsyncs."""
        cls.directory = storage.staging_dir()
        cls.pool = storage.staging_pool()
        cls.writeback = storage.fsync

    @classmethod
    def for_path(cls, path: Path | str) -> ReceiveSink | None:
        return cls._open.get(str(path))


@dataclass(frozen=True)
class Policy:
    """Who may associate and what is accepted (from ``[dimse]`` settings)."""

    ae_title: str
    supported_contexts: list[PresentationContext]
    allowed_callers: tuple[str, ...] | None = None
    check_called_ae: bool = True
    max_pdu: int = 0
    network_timeout: float = 60.0
    acse_timeout: float = 30.0
    maximum_associations: int = 64
    #: Called AE titles accepted besides ``ae_title`` (a cohort's), when given.
    also_called: Callable[[str], bool] | None = None

    @classmethod
    def of(cls, dimse: Mapping[str, Any], contexts: list[PresentationContext],
           **changes: Any) -> Policy:
        """The policy the ``[dimse]`` settings describe, serving ``contexts``."""
        fields: dict[str, Any] = {
            "ae_title": dimse["ae_title"], "supported_contexts": contexts,
            "allowed_callers": dimse["allowed_callers"],
            "check_called_ae": dimse["check_called_ae"], "max_pdu": dimse["max_pdu"],
            "network_timeout": dimse["network_timeout"]}
        return cls(**{**fields, **changes})


def lean_serves(rq: A_ASSOCIATE, elsewhere: set[str]) -> bool:
    """True unless the request proposes an abstract syntax only pynetdicom serves here
    (``elsewhere``: Storage Commitment). Syntaxes nobody serves are rejected context by
    context, as pynetdicom would."""
    return not any(str(cx.abstract_syntax) in elsewhere
                   for cx in rq.presentation_context_definition_list)


def peek_associate_rq(sock: socket.socket, timeout: float) -> A_ASSOCIATE | None:
    """Read (without consuming) the A-ASSOCIATE-RQ at the head of ``sock``."""
    sock.settimeout(timeout)
    header = _recv_peek(sock, 6)
    if header is None or header[0] != 0x01:
        return None
    length = PDU_HEADER.unpack(header)[1]
    if length > 1 << 20:
        return None
    data = _recv_peek(sock, 6 + length)
    if data is None:
        return None
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(data)
    return pdu.to_primitive()


def reject_called_ae(sock: socket.socket) -> None:
    """Answer an A-ASSOCIATE-RQ with A-ASSOCIATE-RJ (PS3.8 9.3.4): rejected-permanent, by the
    service user, called AE title not recognised; then close."""
    with contextlib.suppress(OSError):
        # The request is still unread (peeked): read it, or closing would send a reset.
        sock.recv(1 << 20)
        sock.sendall(bytes([0x03, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x01, 0x01, 0x07]))
        await_close(sock)
    sock.close()


def await_close(sock: socket.socket, timeout: float = 2.0) -> None:
    """After A-ASSOCIATE-RJ the requestor closes the connection (PS3.8 9.1.4, ARTIM): let it,
    so it reads the RJ before any close of ours (closing first can reach it as a reset and
    lose the RJ); stop waiting after ``timeout``."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(timeout)
        while sock.recv(4096):
            pass


def _recv_peek(sock: socket.socket, size: int) -> bytes | None:
    while True:
        data = sock.recv(size, socket.MSG_PEEK)
        if len(data) >= size:
            return data
        if not data:
            return None
        # Not all there yet: wait for more without consuming what is there.
        with contextlib.suppress(OSError):
            select.select([sock], [], [], 0.005)


#: How long a read waits for the peer, while an instance's index rows are deferred, before
#: the idle time goes to them (other connections see the instance at most this late when the
#: association goes quiet after it).
INDEX_PATIENCE = 0.005
#: The longest an instance's index rows wait for the next instance's flush to run beside.
INDEX_AT_MOST = 0.05


class Association:
    """One association served by this module, from A-ASSOCIATE-RQ to release or abort."""

    def __init__(self, sock: socket.socket, address: tuple[str, int], policy: Policy,
                 on_store: StoreHandler, on_query: QueryRetrieveHandler | None = None) -> None:
        self.sock = sock
        self.address = address
        self.policy = policy
        self.on_store = on_store
        self.on_query = on_query
        self.calling_ae = "?"
        self.called_ae = ""
        self.established = False
        #: accepted context id → its negotiated context (abstract syntax, transfer syntax,
        #: roles)
        self.contexts: dict[int, PresentationContext] = {}
        self.channel = upper_layer.Channel(sock, max_pdu=policy.max_pdu)
        self.reader = upper_layer.MessageReader((), self._sink_for)
        self._ready: deque[Message] = deque()
        #: An A-RELEASE-RQ read while an operation was answered: released after it.
        self._release_requested = False

    # -- association lifecycle -----------------------------------------------------------------
    def run(self) -> None:
        try:
            upper_layer.set_timeout(self.sock, self.policy.acse_timeout)
            first = self.channel.read_pdu()
            if first is None:
                return
            pdu_type, body = first
            if pdu_type != 0x01:
                raise ProtocolError("expected A-ASSOCIATE-RQ", 0x02)
            if not self._negotiate(bytes(PDU_HEADER.pack(0x01, len(body))) + bytes(body)):
                return
            upper_layer.set_timeout(self.sock, self.policy.network_timeout)
            self._serve()
        except ProtocolError as exc:
            log.warning("association with %s aborted: %s", self.calling_ae, exc)
            self.channel.abort(exc.reason, source=0x02)
        except TimeoutError:
            log.warning("association with %s aborted: no data for %s s (network_timeout)",
                        self.calling_ae, self.policy.network_timeout)
            self.channel.abort(0x00, source=0x02)
        except AssociationEnded:
            pass
        except OSError as exc:
            if self.established:
                log.warning("association with %s ended abnormally: %s", self.calling_ae, exc)
        except Exception:  # a bug of ours: the peer gets an A-ABORT, the log the traceback
            log.exception("association with %s aborted: internal error", self.calling_ae)
            self.channel.abort(0x00, source=0x02)
        finally:
            self.channel.run_deferred()  # an acknowledged instance's rows, whatever happened
            self.established = False
            self._discard_partial()
            with contextlib.suppress(OSError):
                self.sock.close()


    def _negotiate(self, data: bytes) -> bool:
        """A-ASSOCIATE-RQ → AC or RJ (PS3.8 §7.1, Table 9-21)."""
        rq_pdu = A_ASSOCIATE_RQ()
        try:
            rq_pdu.decode(data)
            rq = rq_pdu.to_primitive()
        except Exception as exc:
            raise ProtocolError(f"malformed A-ASSOCIATE-RQ: {exc}", 0x06) from exc
        self.calling_ae = str(rq.calling_ae_title).strip()
        called = self.called_ae = str(rq.called_ae_title).strip()
        policy = self.policy
        reject: tuple[int, int, int] | None = None
        if not (rq_pdu.protocol_version & 0x01):
            reject = (0x01, 0x02, 0x02)  # protocol version not supported
        elif str(rq.application_context_name) != APPLICATION_CONTEXT:
            reject = (0x01, 0x01, 0x02)  # application context name not supported
        elif policy.allowed_callers is not None and self.calling_ae not in policy.allowed_callers:
            reject = (0x01, 0x01, 0x03)  # calling AE title not recognised
        elif (policy.check_called_ae and called != policy.ae_title
              and not (policy.also_called is not None and policy.also_called(called))):
            reject = (0x01, 0x01, 0x07)  # called AE title not recognised
        elif _ACTIVE.count() > policy.maximum_associations:
            reject = (0x02, 0x03, 0x02)  # local limit exceeded (transient)
        if reject is not None:
            rj = A_ASSOCIATE()
            rj.result, rj.result_source, rj.diagnostic = reject
            rj_pdu = A_ASSOCIATE_RJ()
            rj_pdu.from_primitive(rj)
            self.channel.send(rj_pdu.encode())
            log.warning("association rejected: calling %s called %s from %s (result %d, "
                        "source %d, reason %d)", self.calling_ae, called, self.address[0],
                        *reject)
            await_close(self.sock)
            return False
        self.channel.peer_max_pdu = int(rq.maximum_length_received or 0)
        roles = {
            UID(str(item.sop_class_uid)): (item.scu_role, item.scp_role)
            for item in rq.user_information if isinstance(item, SCP_SCU_RoleSelectionNegotiation)
        }
        results, role_items = negotiate_as_acceptor(
            rq.presentation_context_definition_list, policy.supported_contexts, roles or None)
        self.contexts = {int(cx.context_id or 0): cx for cx in results if cx.result == 0x00}
        self.reader.contexts = set(self.contexts)
        ac = A_ASSOCIATE()
        ac.application_context_name = APPLICATION_CONTEXT
        ac.calling_ae_title = rq.calling_ae_title
        ac.called_ae_title = rq.called_ae_title
        ac.result, ac.result_source = 0x00, 0x01
        ac.presentation_context_definition_results_list = results
        ac.user_information = [*upper_layer.implementation_items(policy.max_pdu), *role_items]
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(ac)
        self.channel.send(pdu.encode())
        self.established = True
        log.info("association accepted from %s (%s:%s), %d presentation contexts",
                 self.calling_ae, self.address[0], self.address[1], len(self.contexts))
        return True

    def _serve(self) -> None:
        while True:
            try:
                message = self.next_message()
            except AssociationEnded:
                return
            command = message.command_field
            if command == C_STORE_RQ and message.sink is not None:
                self._store(message)
                continue
            # Anything else sees every instance this association stored, indexed.
            self.channel.run_deferred()
            if command == C_ECHO_RQ and not message.has_data_set:
                self.respond(message, C_ECHO_RSP, 0x0000,
                             sop_class=message.text(AFFECTED_SOP_CLASS) or VERIFICATION)
            elif command in (C_FIND_RQ, C_GET_RQ, C_MOVE_RQ) and self.on_query is not None:
                self.on_query(self, message)
            elif command == C_CANCEL_RQ:
                pass  # for an operation already answered: nothing to cancel (PS3.7 9.3.2.3)
            else:
                raise ProtocolError(f"unsupported DIMSE command 0x{command:04X}", 0x02)

    # -- DIMSE messages --------------------------------------------------------------------------
    def next_message(self) -> Message:
        """The next complete DIMSE message from the peer (put back ones first).

        Raises
        ------
        AssociationEnded
            The peer released (answered with A-RELEASE-RP) or aborted the association.
        """
        while not self._ready:
            if self._release_requested:
                self._release()
            self._ready.extend(self._read_messages())
        return self._ready.popleft()

    def _read_messages(self, *, release_later: bool = False) -> list[Message]:
        """The messages the peer's next PDU completes (often none: a data set's first part).
        ``release_later``: an A-RELEASE-RQ is kept for when the messages before it are
        answered (it came while an operation was in progress: the operation finishes)."""
        pdu = self.channel.read_pdu()
        if pdu is None:
            raise ProtocolError("connection closed without A-RELEASE", 0x00)
        pdu_type, body = pdu
        if pdu_type == 0x04:
            return self.reader.feed(body)
        if pdu_type == 0x05:  # A-RELEASE-RQ → A-RELEASE-RP
            if release_later:
                self._release_requested = True
                return []
            self._release()
        if pdu_type == 0x07:  # A-ABORT
            log.warning("association with %s aborted by the peer", self.calling_ae)
            self.established = False
            raise AssociationEnded("aborted by the peer")
        raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}", 0x02)

    def _release(self) -> NoReturn:
        self.channel.run_deferred()  # indexed before the release is confirmed
        self.channel.send(A_RELEASE_RP)
        self.established = False
        raise AssociationEnded("released by the peer")

    def put_back(self, message: Message) -> None:
        """A message that arrived while another operation awaited its reply: served after."""
        self._ready.append(message)

    def cancel_requested(self, message_id: int) -> bool:
        """True when a C-CANCEL-RQ for ``message_id`` has arrived (PS3.7 9.3.2.3): reads what
        the peer has sent meanwhile, without waiting for more."""
        found = False
        for waiting in list(self._ready):
            if _cancels(waiting, message_id):
                self._ready.remove(waiting)
                found = True
        # Only what arrived since: a message put back earlier is not read again (reading it
        # again and again, with more waiting on the socket, was a loop that never ended).
        while not found and not self._release_requested and self.channel.readable():
            for message in self._read_messages(release_later=True):
                if _cancels(message, message_id):
                    found = True
                elif message.command_field != C_CANCEL_RQ:
                    self.put_back(message)
        return found

    def transfer_syntax(self, context_id: int) -> str:
        return str(self.contexts[context_id].transfer_syntax[0])

    def abstract_syntax(self, context_id: int) -> str:
        return str(self.contexts[context_id].abstract_syntax)

    def respond(self, message: Message, command_field: int, status: int, *, sop_class: str,
                sop_uid: str | None = None, comment: str = "",
                extra: dict[int, bytes] | None = None, data_set: bytes | None = None) -> None:
        """The response to ``message`` (PS3.7 9.3): its Message ID, ``status`` and, for a
        failure or warning, ``comment`` as the Error Comment."""
        elements = {
            AFFECTED_SOP_CLASS: ui(sop_class),
            COMMAND_FIELD: us(command_field),
            RESPONDED_TO: us(message.us(MESSAGE_ID)),
            STATUS: us(status),
        }
        if comment and status != 0x0000 and not 0xFF00 <= status <= 0xFF01:
            elements[ERROR_COMMENT] = text(comment, 64)
        if sop_uid is not None:
            elements[AFFECTED_SOP_INSTANCE] = ui(sop_uid)
        if extra:
            elements.update(extra)
        self.channel.send_message(message.context_id, elements, data_set)

    # -- C-STORE -------------------------------------------------------------------------------
    def _sink_for(self, message: Message) -> Any:
        """C-STORE data sets stream into a staging file; all others stay in memory."""
        if message.command_field != C_STORE_RQ:
            return None
        context = self.contexts[message.context_id]
        sink = ReceiveSink()
        sink.write(part10_header(message.text(AFFECTED_SOP_CLASS) or
                                 str(context.abstract_syntax),
                                 message.text(AFFECTED_SOP_INSTANCE),
                                 str(context.transfer_syntax[0]), self.calling_ae))
        return sink

    def _store(self, message: Message) -> None:
        """One C-STORE. What the write path leaves for after the response (the index rows,
        "Index later" in :mod:`gateway.ingest`) is deferred on the channel: it runs while the
        next instance is flushed to disk (``meanwhile``), where it costs the association no
        time, or in idle time (the peer silent for :data:`INDEX_PATIENCE`), or before
        anything else the association does; in every case before the next response."""
        sink: ReceiveSink = message.sink
        path = Path(sink.name)
        abstract = self.abstract_syntax(message.context_id)
        sop_class = message.text(AFFECTED_SOP_CLASS) or abstract
        sop_uid = message.text(AFFECTED_SOP_INSTANCE)
        status = 0xA700
        earlier = self.channel.take_deferred()
        try:  # on_store finishes the sink (the same call for pynetdicom's path)
            status, comment, after = self.on_store(path, abstract, sop_uid, self.calling_ae,
                                                   earlier)
        finally:
            if earlier is not None:  # a no-op if on_store ran it (commit_index runs once)
                earlier()
            sink.close()
            if status != 0x0000:  # stored: moved into the store (or an identical re-send)
                with contextlib.suppress(OSError):  # e.g. a read-only file system
                    path.unlink(missing_ok=True)
        try:
            self.respond(message, C_STORE_RSP, status, sop_class=sop_class, sop_uid=sop_uid,
                         comment=comment)
        except BaseException:  # the blob is stored even so: index it now
            if after is not None:
                after()
            raise
        if after is not None:
            self.channel.defer(after, patience=INDEX_PATIENCE, at_most=INDEX_AT_MOST)

    def _discard_partial(self) -> None:
        """An association that ended mid-data-set: nothing was acknowledged, drop it."""
        for message in [*self.reader.discard(), *self._ready]:
            sink = message.sink
            if isinstance(sink, ReceiveSink):
                sink.close()
                with contextlib.suppress(OSError):
                    Path(sink.name).unlink(missing_ok=True)
        self._ready.clear()


def _cancels(message: Message, message_id: int) -> bool:
    return (message.command_field == C_CANCEL_RQ
            and message.us(RESPONDED_TO) == message_id)


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHL", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def part10_header(sop_class: str, sop_uid: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, 'DICM' and the File Meta Information group (PS3.10 §7.1), encoded directly
    (pydicom's writer costs more than receiving the whole image)."""
    ae = source_ae.encode("ascii", "replace")[:16]
    version = IMPLEMENTATION_VERSION_NAME.encode("ascii")
    group = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", ui(sop_class)),
        _meta_element(0x0003, b"UI", ui(sop_uid)),
        _meta_element(0x0010, b"UI", ui(transfer_syntax)),
        _meta_element(0x0012, b"UI", ui(IMPLEMENTATION_CLASS_UID)),
        _meta_element(0x0013, b"SH", version + b" " * (len(version) % 2)),
        _meta_element(0x0016, b"AE", ae + b" " * (len(ae) % 2)),
    ))
    return (b"\x00" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<L", len(group)))
            + group)


class _ActiveCounter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._associations: set[Association] = set()

    def add(self, assoc: Association) -> None:
        with self._lock:
            self._associations.add(assoc)

    def remove(self, assoc: Association) -> None:
        with self._lock:
            self._associations.discard(assoc)

    def count(self) -> int:
        return len(self._associations)

    def established(self) -> list[Association]:
        with self._lock:
            return [a for a in self._associations if a.established]

    def all(self) -> list[Association]:
        with self._lock:
            return list(self._associations)


_ACTIVE = _ActiveCounter()


def serve_association(sock: socket.socket, address: tuple[str, int], policy: Policy,
                      on_store: StoreHandler,
                      on_query: QueryRetrieveHandler | None = None) -> None:
    """Run one association to its end in the calling thread."""
    assoc = Association(sock, address, policy, on_store, on_query)
    _ACTIVE.add(assoc)
    try:
        assoc.run()
    finally:
        _ACTIVE.remove(assoc)


def active_associations() -> list[Association]:
    return _ACTIVE.all()


def abort_all(wait: float = 5.0) -> None:
    """Abort every open storage association (used at the end of a drain), and wait up to
    ``wait`` seconds for their threads to finish with them (each still commits the index rows
    of what it acknowledged: the index must stay open until then)."""
    for assoc in _ACTIVE.all():
        with contextlib.suppress(OSError):
            assoc.sock.shutdown(socket.SHUT_RDWR)
    deadline = time.monotonic() + wait
    while _ACTIVE.count() and time.monotonic() < deadline:
        time.sleep(0.01)

