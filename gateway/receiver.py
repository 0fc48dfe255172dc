"""A lean DICOM Upper Layer acceptor for storage associations (PS3.8 §9, PS3.7 §9.3.1, §9.3.5).

Why it exists: pynetdicom decodes every PDU into objects, runs a state machine and two threads
per association, and costs ≈7 ms of CPU per received CT image here, ten times dcmtk's storescp.
A modality pushing a study needs only this: A-ASSOCIATE negotiation, P-DATA-TF carrying
C-STORE/C-ECHO requests, A-RELEASE and A-ABORT. This module does exactly that with blocking
reads into one reusable buffer, one thread per association and no per-PDU objects:

* each C-STORE data set is streamed from the PDVs straight into a staging file behind a Part 10
  header (byte-exact as received) and handed to the single write path;
* the C-STORE response carries the write path's status, and an Error Comment (0000,0902) on
  failure so the sender's log says why.

What it reuses from pynetdicom: PDU encoding/decoding of the association PDUs and presentation
context negotiation (``negotiate_as_acceptor``), so negotiation behaves exactly as pynetdicom's.
What it does not do: associations proposing anything but Storage and Verification are handed,
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
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.uid import UID
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from gateway.errors import OutOfResources

log = logging.getLogger("gateway.dimse")

#: The gateway's Implementation Class UID (PS3.7 D.3.3.2), a UUID-derived UID under 2.25.
IMPLEMENTATION_CLASS_UID = "2.25.264218094562271553766384327549063962811"
IMPLEMENTATION_VERSION_NAME = "IMAGING_GW_01"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"

_PDU_HEADER = struct.Struct(">BxL")
#: With an unlimited maximum PDU advertised, a larger length can only be garbage.
_ABSURD_PDU = 64 * 1024 * 1024
_PDV_HEADER = struct.Struct(">LBB")
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
NO_DATA_SET = 0x0101


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

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        self.error: OSError | None = None
        self.file = self  # pynetdicom calls .file.flush()
        self._handle: Any = None
        try:
            fd, self.name = tempfile.mkstemp(dir=self.directory, suffix=".dcm")
            self._handle = os.fdopen(fd, "wb", buffering=1 << 20)
        except OSError as exc:
            self.error = exc
            self.name = str(self.directory / f"unwritable-{id(self)}.dcm")
        ReceiveSink._open[self.name] = self

    def write(self, data: bytes) -> int:
        if self._handle is not None:
            try:
                self._handle.write(data)
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def flush(self) -> None:
        """Ignored: pynetdicom flushes after every PDV; :meth:`finish` flushes once."""

    def finish(self) -> None:
        """Flush everything received; raise :class:`OutOfResources` if any write failed."""
        if self._handle is not None:
            try:
                self._handle.flush()
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
    def for_path(cls, path: Path | str) -> ReceiveSink | None:
        return cls._open.get(str(path))


class ProtocolError(Exception):
    """The peer broke PS3.8; the association is aborted (A-P-ABORT, ``reason``)."""

    def __init__(self, message: str, reason: int = 0x02) -> None:
        super().__init__(message)
        self.reason = reason


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


@dataclass
class _Message:
    """The DIMSE message being received on one presentation context."""

    context_id: int
    command: bytearray = field(default_factory=bytearray)
    fields: dict[int, bytes] | None = None
    sink: Any = None  # open staging file while a data set streams in
    path: Path | None = None


#: handler(path, sop_class_uid, sop_instance_uid, calling_ae) -> (status, error_comment)
StoreHandler = Callable[[Path, str, str, str], tuple[int, str]]


def storage_only(rq: A_ASSOCIATE, supported: set[str]) -> bool:
    """True when every proposed abstract syntax is one this receiver serves itself."""
    return all(str(cx.abstract_syntax) in supported
               for cx in rq.presentation_context_definition_list)


def peek_associate_rq(sock: socket.socket, timeout: float) -> A_ASSOCIATE | None:
    """Read (without consuming) the A-ASSOCIATE-RQ at the head of ``sock``."""
    sock.settimeout(timeout)
    header = _recv_peek(sock, 6)
    if header is None or header[0] != 0x01:
        return None
    length = _PDU_HEADER.unpack(header)[1]
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
        sock.sendall(bytes([0x03, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x01, 0x01, 0x07]))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


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


class StorageAssociation:
    """One association served by this receiver, from A-ASSOCIATE-RQ to release or abort."""

    def __init__(self, sock: socket.socket, address: tuple[str, int], policy: Policy,
                 staging: Path, on_store: StoreHandler) -> None:
        self.sock = sock
        self.address = address
        self.policy = policy
        self.staging = staging
        self.on_store = on_store
        self.calling_ae = "?"
        self.established = False
        self.contexts: dict[int, tuple[str, str]] = {}  # id → (abstract syntax, transfer syntax)
        self.peer_max_pdu = 0
        self._buffer = bytearray(256 * 1024)
        self._messages: dict[int, _Message] = {}

    # -- transport ---------------------------------------------------------------------------
    def _recv_exact(self, view: memoryview) -> bool:
        """Fill ``view`` from the socket; False on orderly close before anything was read."""
        got = 0
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if n == 0:
                if got == 0:
                    return False
                raise ProtocolError("connection closed in the middle of a PDU", 0x00)
            got += n
        return True

    def _read_pdu(self) -> tuple[int, memoryview] | None:
        header = bytearray(6)
        if not self._recv_exact(memoryview(header)):
            return None
        pdu_type, length = _PDU_HEADER.unpack(header)
        if pdu_type not in (0x01, 0x04, 0x05, 0x06, 0x07):
            raise ProtocolError(f"unrecognised PDU type 0x{pdu_type:02X}", 0x01)
        limit = self.policy.max_pdu or _ABSURD_PDU
        if length > limit:
            raise ProtocolError(f"PDU of {length} bytes exceeds the maximum length {limit}",
                                0x06)
        if length > len(self._buffer):
            self._buffer = bytearray(length)
        body = memoryview(self._buffer)[:length]
        self._recv_exact(body)
        return pdu_type, body

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)

    # -- association lifecycle -----------------------------------------------------------------
    def run(self) -> None:
        try:
            self.sock.settimeout(self.policy.acse_timeout)
            first = self._read_pdu()
            if first is None:
                return
            pdu_type, body = first
            if pdu_type != 0x01:
                raise ProtocolError("expected A-ASSOCIATE-RQ", 0x02)
            if not self._negotiate(bytes(_PDU_HEADER.pack(0x01, len(body))) + bytes(body)):
                return
            self.sock.settimeout(self.policy.network_timeout)
            self._serve()
        except ProtocolError as exc:
            log.warning("association with %s aborted: %s", self.calling_ae, exc)
            self._abort(exc.reason)
        except TimeoutError:
            log.warning("association with %s aborted: no data for %s s (network_timeout)",
                        self.calling_ae, self.policy.network_timeout)
            self._abort(0x00)
        except OSError as exc:
            if self.established:
                log.warning("association with %s ended abnormally: %s", self.calling_ae, exc)
        finally:
            self._discard_partial()
            with contextlib.suppress(OSError):
                self.sock.close()

    def _abort(self, reason: int) -> None:
        pdu = A_ABORT_RQ()
        pdu.source = 0x02
        pdu.reason_diagnostic = reason
        with contextlib.suppress(OSError):
            self._send(pdu.encode())

    def _negotiate(self, data: bytes) -> bool:
        """A-ASSOCIATE-RQ → AC or RJ (PS3.8 §7.1, Table 9-21)."""
        rq_pdu = A_ASSOCIATE_RQ()
        try:
            rq_pdu.decode(data)
            rq = rq_pdu.to_primitive()
        except Exception as exc:
            raise ProtocolError(f"malformed A-ASSOCIATE-RQ: {exc}", 0x06) from exc
        self.calling_ae = str(rq.calling_ae_title).strip()
        called = str(rq.called_ae_title).strip()
        policy = self.policy
        reject: tuple[int, int, int] | None = None
        if not (rq_pdu.protocol_version & 0x01):
            reject = (0x01, 0x02, 0x02)  # protocol version not supported
        elif str(rq.application_context_name) != APPLICATION_CONTEXT:
            reject = (0x01, 0x01, 0x02)  # application context name not supported
        elif policy.allowed_callers is not None and self.calling_ae not in policy.allowed_callers:
            reject = (0x01, 0x01, 0x03)  # calling AE title not recognised
        elif policy.check_called_ae and called != policy.ae_title:
            reject = (0x01, 0x01, 0x07)  # called AE title not recognised
        elif _ACTIVE.count() > policy.maximum_associations:
            reject = (0x02, 0x03, 0x02)  # local limit exceeded (transient)
        if reject is not None:
            rj = A_ASSOCIATE()
            rj.result, rj.result_source, rj.diagnostic = reject
            rj_pdu = A_ASSOCIATE_RJ()
            rj_pdu.from_primitive(rj)
            self._send(rj_pdu.encode())
            log.warning("association rejected: calling %s called %s from %s (result %d, "
                        "source %d, reason %d)", self.calling_ae, called, self.address[0],
                        *reject)
            return False
        self.peer_max_pdu = int(rq.maximum_length_received or 0)
        roles = {
            UID(str(item.sop_class_uid)): (item.scu_role, item.scp_role)
            for item in rq.user_information if isinstance(item, SCP_SCU_RoleSelectionNegotiation)
        }
        results, role_items = negotiate_as_acceptor(
            rq.presentation_context_definition_list, policy.supported_contexts, roles or None)
        self.contexts = {int(cx.context_id or 0): (str(cx.abstract_syntax),
                                                   str(cx.transfer_syntax[0]))
                         for cx in results if cx.result == 0x00}
        ac = A_ASSOCIATE()
        ac.application_context_name = APPLICATION_CONTEXT
        ac.calling_ae_title = rq.calling_ae_title
        ac.called_ae_title = rq.called_ae_title
        ac.result, ac.result_source = 0x00, 0x01
        ac.presentation_context_definition_results_list = results
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = policy.max_pdu
        class_uid = ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ac.user_information = [max_length, class_uid, version, *role_items]
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(ac)
        self._send(pdu.encode())
        self.established = True
        log.info("association accepted from %s (%s:%s), %d presentation contexts",
                 self.calling_ae, self.address[0], self.address[1], len(self.contexts))
        return True

    def _serve(self) -> None:
        while True:
            pdu = self._read_pdu()
            if pdu is None:
                raise ProtocolError("connection closed without A-RELEASE", 0x00)
            pdu_type, body = pdu
            if pdu_type == 0x04:
                self._p_data(body)
            elif pdu_type == 0x05:  # A-RELEASE-RQ → A-RELEASE-RP
                self._send(b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00")
                self.established = False
                return
            elif pdu_type == 0x07:  # A-ABORT
                log.warning("association with %s aborted by the peer", self.calling_ae)
                self.established = False
                return
            else:
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}", 0x02)

    # -- DIMSE over P-DATA ---------------------------------------------------------------------
    def _p_data(self, body: memoryview) -> None:
        """Split a P-DATA-TF into its PDVs (PS3.8 §9.3.5, Annex E)."""
        offset, end = 0, len(body)
        while offset < end:
            if end - offset < 6:
                raise ProtocolError("truncated PDV item", 0x06)
            item_length, context_id, control = _PDV_HEADER.unpack_from(body, offset)
            value = body[offset + 6: offset + 4 + item_length]
            offset += 4 + item_length
            if item_length < 2 or offset > end:
                raise ProtocolError("PDV item length runs past its PDU", 0x06)
            if context_id not in self.contexts:
                raise ProtocolError(f"PDV on presentation context {context_id}, which was not "
                                    "accepted", 0x06)
            message = self._messages.get(context_id)
            if message is None:
                message = self._messages[context_id] = _Message(context_id)
            if control & 0x01:
                self._command_fragment(message, value, last=bool(control & 0x02))
            else:
                self._data_fragment(message, value, last=bool(control & 0x02))

    def _command_fragment(self, message: _Message, value: memoryview, *, last: bool) -> None:
        if message.fields is not None:
            raise ProtocolError("command fragment after the command set was complete", 0x06)
        message.command += value
        if not last:
            return
        message.fields = _parse_command(bytes(message.command))
        command_field = _us(message.fields, 0x00000100)
        has_data = _us(message.fields, 0x00000800) != NO_DATA_SET
        if command_field == C_STORE_RQ and has_data:
            self._open_sink(message)
        elif command_field == C_ECHO_RQ and not has_data:
            self._messages.pop(message.context_id)
            self._respond(message, C_ECHO_RSP, 0x0000, VERIFICATION, None, "")
        else:
            raise ProtocolError(f"unsupported DIMSE command 0x{command_field:04X} on a storage "
                                "association", 0x02)

    def _open_sink(self, message: _Message) -> None:
        assert message.fields is not None
        abstract, transfer = self.contexts[message.context_id]
        sink = ReceiveSink()
        sink.write(part10_header(_ui(message.fields, 0x00000002) or abstract,
                                 _ui(message.fields, 0x00001000), transfer, self.calling_ae))
        message.sink, message.path = sink, Path(sink.name)

    def _data_fragment(self, message: _Message, value: memoryview, *, last: bool) -> None:
        if message.sink is None:
            raise ProtocolError("data set fragment without a C-STORE command", 0x02)
        message.sink.write(value)
        if last:
            self._messages.pop(message.context_id)
            self._store(message)

    def _store(self, message: _Message) -> None:
        assert message.fields is not None and message.path is not None
        abstract, _transfer = self.contexts[message.context_id]
        sop_class = _ui(message.fields, 0x00000002) or abstract
        sop_uid = _ui(message.fields, 0x00001000)
        try:  # on_store finishes the sink (the same call for pynetdicom's path)
            status, comment = self.on_store(message.path, abstract, sop_uid, self.calling_ae)
        finally:
            message.sink.close()
            with contextlib.suppress(OSError):  # e.g. a read-only file system
                message.path.unlink(missing_ok=True)  # moved into the store unless it failed
        self._respond(message, C_STORE_RSP, status, sop_class, sop_uid, comment)

    def _respond(self, message: _Message, command_field: int, status: int, sop_class: str,
                 sop_uid: str | None, comment: str) -> None:
        assert message.fields is not None
        elements = [
            (0x00000002, _ui_bytes(sop_class)),
            (0x00000100, struct.pack("<H", command_field)),
            (0x00000120, struct.pack("<H", _us(message.fields, 0x00000110))),
            (0x00000800, struct.pack("<H", NO_DATA_SET)),
            (0x00000900, struct.pack("<H", status)),
        ]
        if comment and status not in (0x0000,) and not (0xFF00 <= status <= 0xFF01):
            text = comment.encode("ascii", "replace")[:64]
            elements.append((0x00000902, text + b" " * (len(text) % 2)))
        if sop_uid is not None:
            elements.append((0x00001000, _ui_bytes(sop_uid)))
        command = b"".join(struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(v)) + v
                           for tag, v in sorted(elements))
        command = struct.pack("<HHLL", 0, 0, 4, len(command)) + command  # (0000,0000) UL
        pdv = _PDV_HEADER.pack(len(command) + 2, message.context_id, 0x03) + command
        self._send(_PDU_HEADER.pack(0x04, len(pdv)) + pdv)

    def _discard_partial(self) -> None:
        """An association that ended mid-data-set: nothing was acknowledged, drop it."""
        for message in self._messages.values():
            if message.sink is not None:
                message.sink.close()
            if message.path is not None:
                with contextlib.suppress(OSError):
                    message.path.unlink(missing_ok=True)
        self._messages.clear()


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
        _meta_element(0x0002, b"UI", _ui_bytes(sop_class)),
        _meta_element(0x0003, b"UI", _ui_bytes(sop_uid)),
        _meta_element(0x0010, b"UI", _ui_bytes(transfer_syntax)),
        _meta_element(0x0012, b"UI", _ui_bytes(IMPLEMENTATION_CLASS_UID)),
        _meta_element(0x0013, b"SH", version + b" " * (len(version) % 2)),
        _meta_element(0x0016, b"AE", ae + b" " * (len(ae) % 2)),
    ))
    return (b"\x00" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<L", len(group)))
            + group)


def _parse_command(data: bytes) -> dict[int, bytes]:
    """Command set elements (implicit VR little endian, PS3.7 §6.3.1): tag → value bytes."""
    fields: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHL", data, offset)
        offset += 8
        if offset + length > len(data):
            raise ProtocolError("command set element runs past the command", 0x06)
        fields[(group << 16) | element] = data[offset: offset + length]
        offset += length
    if offset != len(data):
        raise ProtocolError("trailing bytes in the command set", 0x06)
    return fields


def _us(fields: dict[int, bytes], tag: int) -> int:
    value = fields.get(tag, b"")
    return struct.unpack("<H", value[:2])[0] if len(value) >= 2 else 0


def _ui(fields: dict[int, bytes], tag: int) -> str:
    return fields.get(tag, b"").rstrip(b"\x00 ").decode("ascii", "replace")


def _ui_bytes(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


class _ActiveCounter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._associations: set[StorageAssociation] = set()

    def add(self, assoc: StorageAssociation) -> None:
        with self._lock:
            self._associations.add(assoc)

    def remove(self, assoc: StorageAssociation) -> None:
        with self._lock:
            self._associations.discard(assoc)

    def count(self) -> int:
        return len(self._associations)

    def established(self) -> list[StorageAssociation]:
        with self._lock:
            return [a for a in self._associations if a.established]

    def all(self) -> list[StorageAssociation]:
        with self._lock:
            return list(self._associations)


_ACTIVE = _ActiveCounter()


def serve_storage_association(sock: socket.socket, address: tuple[str, int], policy: Policy,
                              staging: Path, on_store: StoreHandler) -> None:
    """Run one storage association to its end in the calling thread."""
    assoc = StorageAssociation(sock, address, policy, staging, on_store)
    _ACTIVE.add(assoc)
    try:
        assoc.run()
    finally:
        _ACTIVE.remove(assoc)


def active_storage_associations() -> list[StorageAssociation]:
    return _ACTIVE.all()


def abort_all() -> None:
    """Abort every open storage association (used at the end of a drain)."""
    for assoc in _ACTIVE.all():
        with contextlib.suppress(OSError):
            assoc.sock.shutdown(socket.SHUT_RDWR)

