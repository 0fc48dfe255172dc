"""The DICOM Upper Layer and DIMSE message framing, lean (PS3.8 §9, PS3.7 §6.3, §9.3).

What the gateway's own associations are made of, on either side: PDUs read with blocking reads
into one reusable buffer, DIMSE messages sent as a command set plus a data set fragmented to the
peer's maximum PDU length, data sets of stored files streamed from disk with no decoding, and
command sets encoded and parsed directly (implicit VR little endian, PS3.7 §6.3.1).

* :class:`Channel` is one established association's socket: read a PDU, send a message.
* :class:`MessageReader` assembles PDVs into DIMSE messages; a data set goes into memory, or
  into a sink (a staging file) when the caller says so for its command.
* :func:`request_association` is the requestor side (a C-MOVE sub-association): A-ASSOCIATE-RQ
  out, A-ASSOCIATE-AC/RJ in.

The association PDUs themselves (A-ASSOCIATE-RQ/AC/RJ) are encoded and decoded by pynetdicom's
``pdu`` module, so negotiation is byte-for-byte pynetdicom's.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

#: The gateway's Implementation Class UID (PS3.7 D.3.3.2), a UUID-derived UID under 2.25.
IMPLEMENTATION_CLASS_UID = "2.25.264218094562271553766384327549063962811"
IMPLEMENTATION_VERSION_NAME = "IMAGING_GW_01"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLICIT_LE, EXPLICIT_LE, DEFLATED_LE, EXPLICIT_BE = (
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2")

PDU_HEADER = struct.Struct(">BxL")
PDV_HEADER = struct.Struct(">LBB")
#: With an unlimited maximum PDU advertised, a larger length can only be garbage.
ABSURD_PDU = 64 * 1024 * 1024
#: PDU body size used when the peer sets no limit (maximum length 0).
UNLIMITED_CHUNK = 1 << 20
#: Largest data set kept in memory (identifiers, responses); more is a protocol abuse.
MAX_IN_MEMORY_DATA_SET = 16 * 1024 * 1024
A_RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
A_RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"

# DIMSE command fields (PS3.7 E.1)
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_GET_RQ, C_GET_RSP = 0x0010, 0x8010
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
C_MOVE_RQ, C_MOVE_RSP = 0x0021, 0x8021
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_CANCEL_RQ = 0x0FFF
NO_DATA_SET = 0x0101

# Command set elements (PS3.7 E.1), as (group << 16) | element
AFFECTED_SOP_CLASS = 0x00000002
COMMAND_FIELD = 0x00000100
MESSAGE_ID = 0x00000110
RESPONDED_TO = 0x00000120
MOVE_DESTINATION = 0x00000600
PRIORITY = 0x00000700
DATA_SET_TYPE = 0x00000800
STATUS = 0x00000900
ERROR_COMMENT = 0x00000902
AFFECTED_SOP_INSTANCE = 0x00001000
REMAINING = 0x00001020
COMPLETED = 0x00001021
FAILED = 0x00001022
WARNING = 0x00001023
MOVE_ORIGINATOR_AE = 0x00001030
MOVE_ORIGINATOR_ID = 0x00001031


class ProtocolError(Exception):
    """The peer broke PS3.8; the association is aborted (A-P-ABORT, ``reason``)."""

    def __init__(self, message: str, reason: int = 0x02) -> None:
        super().__init__(message)
        self.reason = reason


class AssociationEnded(Exception):
    """The peer released or aborted the association while a reply was awaited."""


# -- command sets ------------------------------------------------------------------------------
def us(value: int) -> bytes:
    """A US value."""
    return struct.pack("<H", value)


def ui(uid: str) -> bytes:
    """A UI value, padded with NUL to an even length. A character a UID cannot hold (a peer's
    garbled UID, echoed back) becomes '?', which no validation takes for a UID."""
    raw = uid.encode("ascii", "replace")
    return raw + b"\x00" if len(raw) % 2 else raw


def text(value: str, limit: int) -> bytes:
    """An AE/LO-style value: ASCII, at most ``limit`` bytes, padded with a space."""
    raw = value.encode("ascii", "replace")[:limit]
    return raw + b" " if len(raw) % 2 else raw


def encode_command(elements: dict[int, bytes]) -> bytes:
    """A command set (implicit VR little endian) with its Command Group Length (0000,0000)."""
    body = b"".join(struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value
                    for tag, value in sorted(elements.items()))
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


def parse_command(data: bytes) -> dict[int, bytes]:
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


def field_us(fields: dict[int, bytes], tag: int) -> int:
    """A US command element, 0 when absent."""
    value = fields.get(tag, b"")
    return int(struct.unpack("<H", value[:2])[0]) if len(value) >= 2 else 0


def field_text(fields: dict[int, bytes], tag: int) -> str:
    """A UI/AE command element without its padding, "" when absent."""
    return fields.get(tag, b"").strip(b"\x00 ").decode("ascii", "replace")


def decode_data_set(data: bytes, transfer_syntax: str) -> Dataset:
    """A data set received on a context with ``transfer_syntax`` (identifiers, responses),
    decoded whole: a value that cannot be read (a garbled VR, say) raises here, where the
    caller answers that the data set cannot be decoded, not later where it is used (pydicom
    converts each value on first access)."""
    ds = decode(io.BytesIO(data), transfer_syntax == IMPLICIT_LE,
                transfer_syntax != EXPLICIT_BE, transfer_syntax == DEFLATED_LE)
    for _element in ds.iterall():  # converts every value, in sequences too
        pass
    return ds


def encode_data_set(ds: Dataset, transfer_syntax: str) -> bytes:
    """``ds`` encoded for a context with ``transfer_syntax``."""
    data = encode(ds, transfer_syntax == IMPLICIT_LE, transfer_syntax != EXPLICIT_BE,
                  transfer_syntax == DEFLATED_LE)
    if data is None:
        raise ValueError("the data set cannot be encoded")
    return data


# -- messages --------------------------------------------------------------------------------
#: Where a data set goes: a file-like object with ``write`` (a staging file), or None for memory.
SinkFor = Callable[["Message"], Any]


@dataclass
class Message:
    """One DIMSE message received on presentation context ``context_id``."""

    context_id: int
    command: bytearray = field(default_factory=bytearray)
    fields: dict[int, bytes] | None = None
    data: bytearray | None = None  # the data set, when kept in memory
    sink: Any = None  # where the data set streamed to otherwise
    complete: bool = False

    @property
    def command_field(self) -> int:
        return field_us(self.fields or {}, COMMAND_FIELD)

    @property
    def has_data_set(self) -> bool:
        return field_us(self.fields or {}, DATA_SET_TYPE) != NO_DATA_SET

    def us(self, tag: int) -> int:
        return field_us(self.fields or {}, tag)

    def text(self, tag: int) -> str:
        return field_text(self.fields or {}, tag)


class MessageReader:
    """Assembles P-DATA-TF PDUs into DIMSE messages (PS3.8 §9.3.5, Annex E).

    ``sink_for`` is asked, once a message's command set is complete and announces a data set,
    where that data set should go (a writable file object, or None to keep it in memory).
    """

    def __init__(self, contexts: Iterable[int], sink_for: SinkFor | None = None) -> None:
        self.contexts = set(contexts)
        self.sink_for = sink_for
        self.partial: dict[int, Message] = {}

    def feed(self, body: memoryview) -> list[Message]:
        """The messages a P-DATA-TF body completes, in order."""
        done: list[Message] = []
        offset, end = 0, len(body)
        while offset < end:
            if end - offset < 6:
                raise ProtocolError("truncated PDV item", 0x06)
            item_length, context_id, control = PDV_HEADER.unpack_from(body, offset)
            value = body[offset + 6: offset + 4 + item_length]
            offset += 4 + item_length
            if item_length < 2 or offset > end:
                raise ProtocolError("PDV item length runs past its PDU", 0x06)
            if context_id not in self.contexts:
                raise ProtocolError(f"PDV on presentation context {context_id}, which was not "
                                    "accepted", 0x06)
            message = self.partial.get(context_id)
            if message is None:
                message = self.partial[context_id] = Message(context_id)
            last = bool(control & 0x02)
            if control & 0x01:
                self._command_fragment(message, value, last)
            else:
                self._data_fragment(message, value, last)
            if message.complete:
                del self.partial[context_id]
                done.append(message)
        return done

    def _command_fragment(self, message: Message, value: memoryview, last: bool) -> None:
        if message.fields is not None:
            raise ProtocolError("command fragment after the command set was complete", 0x06)
        message.command += value
        if not last:
            return
        message.fields = parse_command(bytes(message.command))
        if not message.has_data_set:
            message.complete = True
            return
        message.sink = self.sink_for(message) if self.sink_for is not None else None
        if message.sink is None:
            message.data = bytearray()

    def _data_fragment(self, message: Message, value: memoryview, last: bool) -> None:
        if message.fields is None or not message.has_data_set:
            raise ProtocolError("data set fragment without a command announcing one", 0x02)
        if message.sink is not None:
            message.sink.write(value)
        else:
            assert message.data is not None
            if len(message.data) + len(value) > MAX_IN_MEMORY_DATA_SET:
                raise ProtocolError("data set of a query or response message is too large",
                                    0x06)
            message.data += value
        if last:
            message.complete = True

    def discard(self) -> list[Message]:
        """The unfinished messages (an association that ended mid-message), forgotten."""
        left = list(self.partial.values())
        self.partial.clear()
        return left


# -- the socket of an association --------------------------------------------------------------
def set_timeout(sock: socket.socket, seconds: float) -> None:
    """Make every read and write on ``sock`` give up after ``seconds`` without data, as
    ``sock.settimeout`` would, but in the kernel (SO_RCVTIMEO, SO_SNDTIMEO on a blocking
    socket): Python's own timeout polls the socket before each call, one system call more
    for every PDU fragment received. A read or write that runs out raises ``BlockingIOError``,
    which :class:`Channel` reports as ``TimeoutError``."""
    sock.settimeout(None)
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


class Channel:
    """One association's socket: whole PDUs in, DIMSE messages out.

    ``peer_max_pdu`` is the peer's Maximum Length Received (0 = no limit): every P-DATA-TF
    sent has a body no longer than that.

    It can also hold one piece of deferred work (:meth:`defer`), run in time the peer leaves
    idle: when a read finds nothing for ``patience`` seconds, or at the first read after a
    deadline, or when :meth:`run_deferred` or :meth:`take_deferred` hand it on earlier.
    """

    def __init__(self, sock: socket.socket, peer_max_pdu: int = 0, max_pdu: int = 0) -> None:
        self.sock = sock
        self.peer_max_pdu = peer_max_pdu
        self.max_pdu = max_pdu
        self._buffer = bytearray(256 * 1024)
        self._file_buffer = bytearray()  # stored data sets pass through it on their way out
        self._out = bytearray()
        self._message_id = 0
        self._deferred: Callable[[], None] | None = None
        self._patience = 0.0
        self._deadline = 0.0

    def defer(self, work: Callable[[], None], *, patience: float, at_most: float) -> None:
        """Run ``work`` once the peer keeps a read waiting ``patience`` seconds, or at the
        first read that completes ``at_most`` seconds from now, unless it is handed on first
        (one piece at a time: deferring another runs the one before)."""
        self.run_deferred()
        self._deferred, self._patience = work, patience
        self._deadline = time.monotonic() + at_most

    def take_deferred(self) -> Callable[[], None] | None:
        """The deferred work, no longer this channel's to run (None when there is none)."""
        work, self._deferred = self._deferred, None
        return work

    def run_deferred(self) -> None:
        """Run the deferred work now, if there is any."""
        work = self.take_deferred()
        if work is not None:
            work()

    def _recv_or_run_deferred(self, view: memoryview) -> int:
        """A read while work is deferred: what is there, or a wait of up to ``patience``
        for it, after which the idle time goes to the work (and the read then blocks)."""
        try:
            got = self.sock.recv_into(view, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            if not self.readable(self._patience):
                self.run_deferred()
            return self.sock.recv_into(view)
        if time.monotonic() > self._deadline:
            self.run_deferred()
        return got

    def new_message_id(self) -> int:
        """A Message ID for a request this side sends (C-STORE sub-operations)."""
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    @property
    def chunk(self) -> int:
        """Most data set bytes one PDV may carry (the PDU body less the PDV item header)."""
        limit = self.peer_max_pdu if self.peer_max_pdu else UNLIMITED_CHUNK
        return max(limit - 6, 1)

    def _recv_exact(self, view: memoryview) -> bool:
        """Fill ``view`` from the socket; False on orderly close before anything was read."""
        got = 0
        while got < len(view):
            try:
                n = self.sock.recv_into(view[got:]) if self._deferred is None \
                    else self._recv_or_run_deferred(view[got:])
            except BlockingIOError as exc:  # SO_RCVTIMEO ran out (see set_timeout)
                raise TimeoutError("no data from the peer within the timeout") from exc
            if n == 0:
                if got == 0:
                    return False
                raise ProtocolError("connection closed in the middle of a PDU", 0x00)
            got += n
        return True

    def read_pdu(self) -> tuple[int, memoryview] | None:
        """The next PDU (type, body); None when the peer closed the connection cleanly. The
        body is valid until the next call."""
        header = bytearray(6)
        if not self._recv_exact(memoryview(header)):
            return None
        pdu_type, length = PDU_HEADER.unpack(header)
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            raise ProtocolError(f"unrecognised PDU type 0x{pdu_type:02X}", 0x01)
        limit = self.max_pdu or ABSURD_PDU
        # Maximum Length Received limits P-DATA-TF; association PDUs only need to be sane.
        if length > (limit if pdu_type == 0x04 else max(limit, 1 << 20)):
            raise ProtocolError(f"PDU of {length} bytes exceeds the maximum length {limit}",
                                0x06)
        if length > len(self._buffer):
            self._buffer = bytearray(length)
        body = memoryview(self._buffer)[:length]
        self._recv_exact(body)
        return pdu_type, body

    def readable(self, wait: float = 0.0) -> bool:
        """True when the peer has sent something not yet read (a C-CANCEL, say), or sends it
        within ``wait`` seconds."""
        try:
            ready, _, _ = select.select([self.sock], [], [], wait)
        except (OSError, ValueError):
            return True  # let the read report it
        return bool(ready)

    def send(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self.sock.sendall(data)
        except BlockingIOError as exc:  # SO_SNDTIMEO ran out (see set_timeout)
            raise TimeoutError("the peer took nothing within the timeout") from exc

    def send_message(self, context_id: int, command: dict[int, bytes],
                     data_set: bytes | None = None) -> None:
        """A DIMSE message whose data set (if any) is in memory."""
        command[DATA_SET_TYPE] = us(0x0000 if data_set is not None else NO_DATA_SET)
        self._send_command(context_id, encode_command(command), more=data_set is not None)
        if data_set is not None:
            view = memoryview(data_set)
            self._send_data_set(context_id, len(view), lambda start, n: view[start: start + n])

    def send_file_message(self, context_id: int, command: dict[int, bytes], handle: BinaryIO,
                          offset: int, length: int) -> None:
        """A DIMSE message whose data set is ``length`` bytes of ``handle`` from ``offset``
        (a stored file's data set, streamed as it lies on disk)."""
        command[DATA_SET_TYPE] = us(0x0000)
        self._send_command(context_id, encode_command(command), more=True)
        fd = handle.fileno()
        if len(self._file_buffer) < min(self.chunk, length):
            self._file_buffer = bytearray(min(self.chunk, length))
        buffer = memoryview(self._file_buffer)

        def read(start: int, n: int) -> memoryview:
            got = os.preadv(fd, [buffer[:n]], offset + start) if n else 0
            if got != n:
                raise OSError(f"stored file shorter than expected ({start + got} of {length} "
                              "data set bytes)")
            return buffer[:n]

        self._send_data_set(context_id, length, read)

    def _send_data_set(self, context_id: int, length: int,
                       piece: Callable[[int, int], memoryview]) -> None:
        """``length`` bytes of data set, ``piece(start, n)`` at a time, one PDV per PDU of at
        most the peer's maximum length, the last one flagged (PS3.8 E.2)."""
        step, sent = self.chunk, 0
        while True:
            n = min(step, length - sent)
            data = piece(sent, n)
            sent += n
            self._pdv(context_id, 0x02 if sent >= length else 0x00, data)
            if sent >= length:
                return

    def _send_command(self, context_id: int, command: bytes, *, more: bool) -> None:
        # A command set fits any sane PDU; fragment anyway when the peer's limit is tiny.
        step = self.chunk
        for start in range(0, max(len(command), 1), step):
            piece = command[start: start + step]
            last = start + step >= len(command)
            self._pdv(context_id, 0x03 if last else 0x01, memoryview(piece), flush=not more)

    def _pdv(self, context_id: int, control: int, value: memoryview, *,
             flush: bool = True) -> None:
        """One PDV in a PDU of its own. Small PDVs (a command set followed by its data set)
        are held back and go out in one segment with what follows."""
        header = PDU_HEADER.pack(0x04, len(value) + 6) + PDV_HEADER.pack(len(value) + 2,
                                                                         context_id, control)
        if not flush:
            self._out += header
            self._out += value
            return
        if self._out:
            pending, self._out = self._out, bytearray()
            self._sendv([pending, header, value])
        else:
            self._sendv([header, value])

    def _sendv(self, buffers: list[Any]) -> None:
        """Send all of ``buffers`` with as few system calls as the socket allows."""
        total = sum(len(b) for b in buffers)
        try:
            sent = self.sock.sendmsg(buffers)
        except BlockingIOError as exc:  # SO_SNDTIMEO ran out (see set_timeout)
            raise TimeoutError("the peer took nothing within the timeout") from exc
        if sent < total:  # a partial send (full socket buffer): finish with sendall
            self.send(b"".join(bytes(b) for b in buffers)[sent:])

    def release(self) -> None:
        """A-RELEASE-RQ, then wait (briefly) for the A-RELEASE-RP; close."""
        with contextlib.suppress(OSError, ProtocolError):
            self.send(A_RELEASE_RQ)
            while (pdu := self.read_pdu()) is not None and pdu[0] not in (0x06, 0x07):
                pass
        self.close()

    def abort(self, reason: int = 0x00, source: int = 0x00) -> None:
        """A-ABORT (source 0 = service user, 2 = service provider), then close."""
        pdu = A_ABORT_RQ()
        pdu.source = source
        pdu.reason_diagnostic = reason
        with contextlib.suppress(OSError):
            self.send(pdu.encode())
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def implementation_items(max_pdu: int) -> list[Any]:
    """The user information every association PDU of the gateway carries: Maximum Length
    Received (``max_pdu``, 0 = unlimited) and the Implementation Class UID and Version Name
    (PS3.7 D.3.3.1, D.3.3.2)."""
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return [max_length, class_uid, version]


# -- the requestor side ------------------------------------------------------------------------
class AssociationRefused(Exception):
    """The peer could not be reached, rejected the association or answered nonsense."""


@dataclass
class Requested:
    """An association this gateway requested, once accepted."""

    channel: Channel
    #: accepted context id → (abstract syntax, transfer syntax)
    accepted: dict[int, tuple[str, str]]
    _reader: MessageReader | None = None
    _ready: list[Message] = field(default_factory=list)

    def next_message(self) -> Message:
        """The next complete DIMSE message from the peer.

        Raises
        ------
        AssociationEnded
            The peer released, aborted or closed the association.
        """
        if self._reader is None:
            self._reader = MessageReader(self.accepted)
        while not self._ready:
            pdu = self.channel.read_pdu()
            if pdu is None or pdu[0] in (0x05, 0x07):
                raise AssociationEnded("the peer ended the association")
            if pdu[0] != 0x04:
                raise ProtocolError(f"unexpected PDU type 0x{pdu[0]:02X}")
            self._ready.extend(self._reader.feed(pdu[1]))
        return self._ready.pop(0)

    def context_for(self, sop_class: str, transfer_syntax: str) -> int | None:
        """The accepted context carrying ``sop_class`` in ``transfer_syntax``."""
        for context_id, (abstract, syntax) in self.accepted.items():
            if abstract == sop_class and syntax == transfer_syntax:
                return context_id
        return None

    def syntaxes(self) -> dict[str, list[str]]:
        """SOP class → the transfer syntaxes the peer accepted it in."""
        found: dict[str, list[str]] = {}
        for abstract, syntax in self.accepted.values():
            found.setdefault(abstract, []).append(syntax)
        return found


def request_association(host: str, port: int, calling: str, called: str,
                        contexts: list[PresentationContext], *, timeout: float,
                        max_pdu: int = 0) -> Requested:
    """Open an association to ``called`` at ``host:port`` proposing ``contexts``.

    Raises
    ------
    AssociationRefused
        Connection refused or timed out, A-ASSOCIATE-RJ, A-ABORT, or a malformed answer.
    """
    for number, context in enumerate(contexts):
        context.context_id = 2 * number + 1
    rq = A_ASSOCIATE()
    rq.application_context_name = APPLICATION_CONTEXT
    rq.calling_ae_title = calling
    rq.called_ae_title = called
    rq.presentation_context_definition_list = contexts
    rq.user_information = implementation_items(max_pdu)
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(rq)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise AssociationRefused(f"cannot connect to {called} at {host}:{port}: "
                                 f"{exc.strerror or exc}") from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    channel = Channel(sock, max_pdu=max_pdu)
    try:
        channel.send(pdu.encode())
        answer = channel.read_pdu()
    except (OSError, ProtocolError) as exc:
        channel.close()
        raise AssociationRefused(f"{called} at {host}:{port} did not answer the association "
                                 f"request: {exc}") from exc
    if answer is None:
        channel.close()
        raise AssociationRefused(f"{called} at {host}:{port} closed the connection")
    pdu_type, body = answer
    raw = PDU_HEADER.pack(pdu_type, len(body)) + bytes(body)
    if pdu_type == 0x03:
        rj = A_ASSOCIATE_RJ()
        rj.decode(raw)
        channel.close()
        raise AssociationRefused(f"{called} at {host}:{port} rejected the association "
                                 f"(result {rj.result}, source {rj.source}, reason "
                                 f"{rj.reason_diagnostic})")
    if pdu_type != 0x02:
        channel.abort()
        raise AssociationRefused(f"{called} at {host}:{port} answered the association request "
                                 f"with PDU type 0x{pdu_type:02X}")
    ac_pdu = A_ASSOCIATE_AC()
    try:
        ac_pdu.decode(raw)
        ac = ac_pdu.to_primitive()
    except Exception as exc:
        channel.abort()
        raise AssociationRefused(f"malformed A-ASSOCIATE-AC from {called}: {exc}") from exc
    proposed = {context.context_id: str(context.abstract_syntax) for context in contexts}
    accepted = {}
    for result in ac.presentation_context_definition_results_list:
        context_id = result.context_id
        if (result.result == 0x00 and context_id is not None and context_id in proposed
                and result.transfer_syntax):
            accepted[context_id] = (proposed[context_id], str(result.transfer_syntax[0]))
    channel.peer_max_pdu = int(ac.maximum_length_received or 0)
    sock.settimeout(timeout)
    return Requested(channel, accepted)


def meta_end(head: bytes) -> int | None:
    """Where the data set of a Part 10 file starting with ``head`` (at least 144 bytes) begins,
    when the File Meta Information has the usual layout (preamble, ``DICM``, (0002,0000) File
    Meta Information Group Length first); None otherwise."""
    if (len(head) >= 144 and head[128:132] == b"DICM"
            and head[132:136] == b"\x02\x00\x00\x00" and head[136:138] == b"UL"):
        return 144 + int(struct.unpack_from("<L", head, 140)[0])
    return None


def dataset_offset(source: BinaryIO | bytes) -> int:
    """Where the data set of a Part 10 file (an open stored file, or a whole file in memory)
    starts; an unusual File Meta Information layout is left to pydicom to read."""
    if isinstance(source, bytes):
        offset = meta_end(source[:144])
        fp: BinaryIO = io.BytesIO(source)
    else:
        offset = meta_end(os.pread(source.fileno(), 144, 0))
        fp = source
    if offset is not None:
        return offset
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp.seek(0)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    return fp.tell()
