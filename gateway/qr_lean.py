"""C-FIND, C-MOVE and C-GET on the lean Upper Layer (PS3.4 C.4, PS3.7 9.1.2-9.1.4); translation
only: what to find and send is :class:`gateway.qr.QueryRetrieve`'s, the wire is
:mod:`gateway.upper_layer`'s.

Each C-STORE sub-operation sends a stored instance's data set straight from its file, in PDUs
of the receiver's maximum length, without decoding it (or a transcoded copy when the receiver
did not accept the stored transfer syntax). C-GET sub-operations go on the requester's own
association, on the storage contexts it took the SCP role for (PS3.7 D.3.3.4); C-MOVE ones on
a new association to the Move Destination, requested with :func:`upper_layer
.request_association`. One sub-operation is outstanding at a time.

Responses (C.4.2.1.5, C.4.3.1.4): a pending response (FF00) with the four counts after a
sub-operation once ``dimse.pending_interval`` seconds have passed since the last response
(0: after every one; they are optional, C.4.2.3.1, and each costs the requester a response to
decode); the final one 0000 when all succeeded, B000 when some failed or gave a
warning, A702 when all failed, FE00 after a C-CANCEL (with the remaining count); a final
response other than 0000 carries Failed SOP Instance UID List (0008,0058) in an identifier.
Refusals before any sub-operation: A801 Move Destination unknown, A702 when the destination
cannot be associated with, A900/C000/A701 from the query (with an Error Comment each).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset

from gateway import dicom_binary, upper_layer
from gateway.qr import Outgoing, QueryRetrieve, Refused, answer_dataset, contexts_for
from gateway.receiver import Association
from gateway.upper_layer import (
    AFFECTED_SOP_CLASS,
    AFFECTED_SOP_INSTANCE,
    C_FIND_RQ,
    C_FIND_RSP,
    C_GET_RQ,
    C_GET_RSP,
    C_MOVE_RSP,
    C_STORE_RQ,
    C_STORE_RSP,
    COMMAND_FIELD,
    COMPLETED,
    FAILED,
    MESSAGE_ID,
    MOVE_DESTINATION,
    MOVE_ORIGINATOR_AE,
    MOVE_ORIGINATOR_ID,
    PRIORITY,
    REMAINING,
    RESPONDED_TO,
    STATUS,
    WARNING,
    AssociationEnded,
    AssociationRefused,
    Channel,
    Message,
    ProtocolError,
    Requested,
    text,
    ui,
    us,
)

log = logging.getLogger("gateway.qr")

#: The counts are US (C.4.2.1.5): more matches cannot be reported.
MAX_SUB_OPERATIONS = 0xFFFF


def storage_status_kind(status: int) -> str:
    """``success``, ``warning`` or ``failure`` for a C-STORE response status (PS3.4 B.2.3,
    Annex C.4.2.1.5: warnings count apart from failures)."""
    if status == 0x0000:
        return "success"
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return "warning"
    return "failure"


@dataclass
class SubOperations:
    """The sub-operation counts of one C-MOVE or C-GET, and the instances that failed."""

    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)

    def record(self, status: int | None, sop_uid: str) -> None:
        """One sub-operation's outcome: its C-STORE status, or None when it was never sent."""
        kind = storage_status_kind(status) if status is not None else "failure"
        self.remaining -= 1
        if kind == "success":
            self.completed += 1
        elif kind == "warning":
            self.warning += 1
        else:
            self.failed += 1
            self.failed_uids.append(sop_uid)

    def fail_remaining(self, uids: list[str]) -> None:
        """The rest could not be attempted (the destination went away)."""
        self.failed += len(uids)
        self.failed_uids.extend(uids)
        self.remaining = 0

    def counts(self, *, final: bool = False) -> dict[int, bytes]:
        elements = {COMPLETED: us(self.completed), FAILED: us(self.failed),
                    WARNING: us(self.warning)}
        if not final:
            elements[REMAINING] = us(self.remaining)
        return elements

    def final_status(self, total: int) -> int:
        if not self.failed and not self.warning:
            return 0x0000
        return 0xA702 if self.failed == total else 0xB000


def _status_of(value: Any) -> tuple[int, str]:
    """(status, comment) from a (status Dataset | int) as :meth:`QueryRetrieve.find` yields."""
    if isinstance(value, Dataset):
        return int(value.Status), str(value.get("ErrorComment", "") or "")
    return int(value), ""


class LeanQueryRetrieve:
    """The handler :class:`gateway.receiver.Association` calls for C-FIND/C-MOVE/C-GET."""

    def __init__(self, service: QueryRetrieve, *, network_timeout: float,
                 max_pdu: int = 0, pending_interval: float = 0.0) -> None:
        self.service = service
        self.network_timeout = network_timeout
        self.max_pdu = max_pdu
        self.pending_interval = pending_interval

    def __call__(self, assoc: Association, message: Message) -> None:
        command = message.command_field
        transfer_syntax = assoc.transfer_syntax(message.context_id)
        model = message.text(AFFECTED_SOP_CLASS) or assoc.abstract_syntax(message.context_id)
        response = {C_FIND_RQ: C_FIND_RSP, C_GET_RQ: C_GET_RSP}.get(command, C_MOVE_RSP)
        try:
            if not message.has_data_set or message.data is None:
                raise ValueError("the request has no identifier")
            identifier = upper_layer.decode_data_set(bytes(message.data), transfer_syntax)
        except Exception as exc:
            assoc.respond(message, response, 0xC000, sop_class=model,
                          comment=f"identifier cannot be decoded: {exc}")
            return
        if command == C_FIND_RQ:
            self.find(assoc, message, model, identifier)
        elif command == C_GET_RQ:
            self.get(assoc, message, model, identifier)
        else:
            self.move(assoc, message, model, identifier)

    # -- C-FIND ----------------------------------------------------------------------------------
    def find(self, assoc: Association, message: Message, model: str,
             identifier: Dataset) -> None:
        message_id = message.us(MESSAGE_ID)
        transfer_syntax = assoc.transfer_syntax(message.context_id)
        answers = self.service.find_json(
            model, identifier, called=assoc.called_ae, calling=assoc.calling_ae,
            is_cancelled=lambda: assoc.cancel_requested(message_id))
        implicit = transfer_syntax == upper_layer.IMPLICIT_LE
        for status_value, answer in answers:
            status, comment = _status_of(status_value)
            data = None
            if answer is not None:
                data = dicom_binary.encode_json(answer, implicit=implicit)
                if data is None:  # something the direct encoder leaves to pydicom
                    data = upper_layer.encode_data_set(answer_dataset(answer), transfer_syntax)
            assoc.respond(message, C_FIND_RSP, status, sop_class=model, comment=comment,
                          data_set=data)

    # -- C-GET and C-MOVE ------------------------------------------------------------------------
    def _locate(self, assoc: Association, message: Message, model: str,
                identifier: Dataset, response: int) -> list[Any] | None:
        """The instances to send, or None after answering a refusal."""
        try:
            items = self.service.locate(model, identifier, called=assoc.called_ae)
        except Refused as exc:
            log.info("%s from %s refused: %s", "C-GET" if response == C_GET_RSP else "C-MOVE",
                     assoc.calling_ae, exc)
            self._final(assoc, message, response, model, exc.status, str(exc))
            return None
        if len(items) > MAX_SUB_OPERATIONS:
            self._final(assoc, message, response, model, 0xA702,
                        f"{len(items)} instances match, more than one retrieve can count; "
                        "retrieve by study or series")
            return None
        return items

    def _final(self, assoc: Association, message: Message, response: int, model: str,
               status: int, comment: str = "", ops: SubOperations | None = None) -> None:
        transfer_syntax = assoc.transfer_syntax(message.context_id)
        ops = ops or SubOperations(0)
        data = None
        if ops.failed_uids or status == 0xFE00:  # C.4.2.1.5: with Cancel, Failure, Warning
            failed = Dataset()
            failed.FailedSOPInstanceUIDList = ops.failed_uids
            data = upper_layer.encode_data_set(failed, transfer_syntax)
        assoc.respond(message, response, status, sop_class=model, comment=comment,
                      extra=ops.counts(final=status != 0xFE00), data_set=data)

    def get(self, assoc: Association, message: Message, model: str,
            identifier: Dataset) -> None:
        """C-GET (C.4.3): each instance as a C-STORE sub-operation on this association."""
        items = self._locate(assoc, message, model, identifier, C_GET_RSP)
        if items is None:
            return
        log.info("C-GET from %s: %d instances", assoc.calling_ae, len(items))
        accepted: dict[int, tuple[str, str]] = {
            cid: (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            for cid, cx in assoc.contexts.items() if cx.as_scu}
        target = Requested(assoc.channel, accepted)

        self._sub_operations(assoc, message, model, C_GET_RSP, items, target,
                             assoc.next_message, assoc.put_back, originator=None)

    def move(self, assoc: Association, message: Message, model: str,
             identifier: Dataset) -> None:
        """C-MOVE (C.4.2): each instance as a C-STORE sub-operation on a new association to
        the Move Destination."""
        destination = message.text(MOVE_DESTINATION)
        peer = self.service.peers.get(destination)
        if peer is None:
            log.warning("C-MOVE from %s to unknown destination %s", assoc.calling_ae,
                        destination)
            self._final(assoc, message, C_MOVE_RSP, model, 0xA801,
                        f"Move Destination {destination} unknown: not under [dimse.peers]")
            return
        items = self._locate(assoc, message, model, identifier, C_MOVE_RSP)
        if items is None:
            return
        if not items:
            self._final(assoc, message, C_MOVE_RSP, model, 0x0000)
            return
        try:
            target = upper_layer.request_association(
                peer.host, peer.port, self.service.ae_title, destination, contexts_for(items),
                timeout=self.network_timeout, max_pdu=self.max_pdu)
        except AssociationRefused as exc:
            log.warning("C-MOVE from %s: %s", assoc.calling_ae, exc)
            self._final(assoc, message, C_MOVE_RSP, model, 0xA702, str(exc))
            return
        log.info("C-MOVE from %s: %d instances to %s", assoc.calling_ae, len(items),
                 destination)
        try:
            self._sub_operations(assoc, message, model, C_MOVE_RSP, items, target,
                                 target.next_message, lambda _message: None,
                                 originator=(assoc.calling_ae, message.us(MESSAGE_ID)))
        finally:
            target.channel.release()

    def _sub_operations(self, assoc: Association, message: Message, model: str,
                        response: int, items: list[Any], target: Requested,
                        next_message: Callable[[], Message],
                        put_back: Callable[[Message], None], *,
                        originator: tuple[str, int] | None) -> None:
        """Send every instance to ``target``, whose replies ``next_message`` reads (a
        C-CANCEL among them goes to ``put_back``), answering pending responses with the
        counts, then the final response."""
        message_id = message.us(MESSAGE_ID)
        ops = SubOperations(len(items))
        accepted = target.syntaxes()
        pending: Iterator[Any] = iter(items)
        last_response = time.monotonic()
        for item in pending:
            if assoc.cancel_requested(message_id):
                log.info("retrieve from %s cancelled with %d sub-operations left",
                         assoc.calling_ae, ops.remaining)
                self._final(assoc, message, response, model, 0xFE00, ops=ops)
                return
            out = self.service.outgoing(item, accepted)
            context_id = (target.context_for(item.sop_class_uid, out.transfer_syntax)
                          if not out.reason else None)
            if context_id is None:
                ops.record(None, item.sop_uid)
            else:
                try:
                    store_id = target.channel.new_message_id()
                    _send_store(target.channel, context_id, store_id, out, originator)
                    ops.record(_store_status(next_message, store_id, put_back), item.sop_uid)
                except FileNotFoundError:
                    log.warning("sub-operation for SOP Instance %s fails: its stored file "
                                "vanished", item.sop_uid)
                    ops.record(None, item.sop_uid)
                except (AssociationEnded, OSError, ProtocolError) as exc:
                    if target.channel is assoc.channel:
                        raise  # the requester's own association: nothing left to answer on
                    log.warning("retrieve from %s: the destination association failed: %s",
                                assoc.calling_ae, exc)
                    ops.record(None, item.sop_uid)
                    ops.fail_remaining([rest.sop_uid for rest in pending])
                    break
            if time.monotonic() - last_response >= self.pending_interval:
                assoc.respond(message, response, 0xFF00, sop_class=model, extra=ops.counts())
                last_response = time.monotonic()
        self._final(assoc, message, response, model, ops.final_status(len(items)), ops=ops)


def _store_status(next_message: Callable[[], Message], store_id: int,
                  put_back: Callable[[Message], None]) -> int:
    """The status of the C-STORE-RSP to ``store_id`` (one sub-operation is outstanding at a
    time). A C-CANCEL arriving meanwhile is put back, to be looked at before the next one;
    any other request is a protocol error (no asynchronous operations were negotiated)."""
    deferred: list[Message] = []
    try:
        while True:
            reply = next_message()
            if reply.command_field == C_STORE_RSP and reply.us(RESPONDED_TO) == store_id:
                return reply.us(STATUS)
            if reply.command_field != upper_layer.C_CANCEL_RQ:
                raise ProtocolError("a request arrived while a C-STORE sub-operation awaited "
                                    "its response", 0x02)
            deferred.append(reply)
    finally:
        for waiting in deferred:
            put_back(waiting)


def _send_store(channel: Channel, context_id: int, message_id: int, out: Outgoing,
                originator: tuple[str, int] | None) -> None:
    """A C-STORE-RQ (PS3.7 9.3.1.1) carrying ``out``'s data set."""
    item = out.item
    command = {
        AFFECTED_SOP_CLASS: ui(item.sop_class_uid),
        COMMAND_FIELD: us(C_STORE_RQ),
        MESSAGE_ID: us(message_id),
        PRIORITY: us(0x0000),
        AFFECTED_SOP_INSTANCE: ui(item.sop_uid),
    }
    if originator is not None:
        command[MOVE_ORIGINATOR_AE] = text(originator[0], 16)
        command[MOVE_ORIGINATOR_ID] = us(originator[1])
    if out.path is not None:
        with open(out.path, "rb") as handle:
            offset = upper_layer.dataset_offset(handle)
            length = _size(handle) - offset
            channel.send_file_message(context_id, command, handle, offset, length)
        return
    assert out.part10 is not None
    channel.send_message(context_id, command, out.part10[upper_layer.dataset_offset(out.part10):])


def _size(handle: Any) -> int:
    return os.fstat(handle.fileno()).st_size
