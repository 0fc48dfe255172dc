"""The lean DICOM Upper Layer (gateway.receiver, gateway.upper_layer) against what a broken or
hostile peer sends: PS3.8 §9.3 PDUs and PS3.7 §9.3 command sets garbled byte by byte.

Whatever arrives, an association ends with its connection closed (after an A-ABORT, an
A-ASSOCIATE-RJ or a release), never with an error of the gateway's own (an exception it did
not expect, logged as such) or a wait for data that cannot come; nothing half received stays
in staging; and an instance acknowledged with Success is stored, whole. The peer here is a
plain socket speaking bytes built with pydicom and pynetdicom's own encoders, so the
gateway's framing code does not check itself.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context

from gateway import receiver
from gateway.bootstrap import build_services
from gateway.config import load_settings
from gateway.dimse import DimseNode
from gateway.ingest import Ingest
from gateway.records import read_instance
from gateway.storage import FileStorage

from samples import synthetic_instance

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
VERIFICATION = "1.2.840.10008.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
A_RELEASE_RQ = bytes.fromhex("0500000000040000000000")


# -- the peer's bytes ----------------------------------------------------------------------------
def associate_rq(called: str = "GW") -> bytes:
    """A-ASSOCIATE-RQ proposing Secondary Capture (context 1), Verification (3), Study Root
    C-FIND (5) and C-MOVE (7)."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = "FUZZER", called
    storage = build_context(SECONDARY_CAPTURE, [ExplicitVRLittleEndian])
    storage.context_id = 1
    echo = build_context(VERIFICATION, [ExplicitVRLittleEndian])
    echo.context_id = 3
    find = build_context(STUDY_ROOT_FIND, [ExplicitVRLittleEndian])
    find.context_id = 5
    move = build_context(STUDY_ROOT_MOVE, [ExplicitVRLittleEndian])
    move.context_id = 7
    primitive.presentation_context_definition_list = [storage, echo, find, move]
    limit = MaximumLengthNotification()
    limit.maximum_length_received = 16384
    primitive.user_information = [limit]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def command_set(**elements: object) -> bytes:
    """A command set (PS3.7 §6.3.1: implicit VR little endian) with its group length."""
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    body = encode(ds, True, True)
    assert body is not None
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body


def p_data(*items: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF PDU of PDV items (context id, message control header, fragment)."""
    body = b"".join(struct.pack(">LBB", len(value) + 2, context, control) + value
                    for context, control, value in items)
    return struct.pack(">BBL", 0x04, 0x00, len(body)) + body


def c_store_rq(sop_uid: str, message_id: int = 7) -> bytes:
    return command_set(AffectedSOPClassUID=SECONDARY_CAPTURE, CommandField=0x0001,
                       MessageID=message_id, Priority=0, CommandDataSetType=0x0000,
                       AffectedSOPInstanceUID=sop_uid)


def data_set_of(path: Path) -> tuple[str, bytes]:
    """The SOP Instance UID and data set (explicit VR little endian) of a Part 10 file."""
    ds = dcmread(path)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return str(ds.SOPInstanceUID), buffer.getvalue()


def session(sop_uid: str, data: bytes) -> bytes:
    """A whole association: a C-STORE whose command comes in two fragments and whose data set
    comes over two PDUs (the first shared with the command's end), a C-FIND for every study,
    a C-MOVE to a destination the gateway does not know, a C-ECHO, the release."""
    command = c_store_rq(sop_uid)
    half = len(data) // 2
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientID = "*"
    identifier.StudyInstanceUID = ""
    identifier.ModalitiesInStudy = ""
    find = command_set(AffectedSOPClassUID=STUDY_ROOT_FIND, CommandField=0x0020, MessageID=8,
                       Priority=0, CommandDataSetType=0x0000)
    move = command_set(AffectedSOPClassUID=STUDY_ROOT_MOVE, CommandField=0x0021, MessageID=9,
                       Priority=0, CommandDataSetType=0x0000, MoveDestination="NOWHERE")
    echo = command_set(AffectedSOPClassUID=VERIFICATION, CommandField=0x0030, MessageID=10,
                       CommandDataSetType=0x0101)
    return (associate_rq()
            + p_data((1, 0x01, command[:10]))
            + p_data((1, 0x03, command[10:]), (1, 0x00, data[:half]))
            + p_data((1, 0x02, data[half:]))
            + p_data((5, 0x03, find), (5, 0x02, encode(identifier, False, True) or b""))
            + p_data((7, 0x03, move), (7, 0x02, encode(identifier, False, True) or b""))
            + p_data((3, 0x03, echo))
            + A_RELEASE_RQ)


# -- reading the gateway's answers ---------------------------------------------------------------
def responses(stream: bytes) -> tuple[list[int], list[Dataset]]:
    """The PDU types the gateway sent, and its DIMSE command sets (each in one PDV here)."""
    types, commands, offset = [], [], 0
    while offset + 6 <= len(stream):
        pdu_type, length = stream[offset], struct.unpack_from(">L", stream, offset + 2)[0]
        body = stream[offset + 6: offset + 6 + length]
        offset += 6 + length
        types.append(pdu_type)
        at = 0
        while pdu_type == 0x04 and at + 6 <= len(body):
            item_length, control = struct.unpack_from(">L", body, at)[0], body[at + 5]
            if control & 0x01:
                fragment = BytesIO(body[at + 6: at + 4 + item_length])
                commands.append(decode(fragment, True, True))
            at += 4 + item_length
    return types, commands


# -- the gateway's side ----------------------------------------------------------------------------
@dataclass
class Node:
    """The gateway's DICOM node as ``serve`` wires it (write path, query/retrieve), not
    listening: each test hands it one end of a socket pair."""

    storage: FileStorage
    ingest: Ingest
    dimse: DimseNode
    root: Path

    def sample(self) -> tuple[str, bytes]:
        """A new instance (Secondary Capture, no pixels): its SOP Instance UID and data set."""
        return data_set_of(synthetic_instance(self.root))

    def staged(self) -> list[str]:
        """The files in staging: partial receptions (nothing else is made there: the pool of
        files made ahead of need is off in these tests)."""
        return sorted(os.listdir(self.storage.staging_dir()))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    root = tmp_path_factory.mktemp("upper_layer")
    settings = load_settings(environ={}, overrides={
        "storage": {"path": str(root / "data"), "fsync": False},
        "dimse": {"ae_title": "GW", "network_timeout": 5}})
    services = build_services(settings)
    sink = receiver.ReceiveSink
    saved = (sink.directory, sink.pool, sink.writeback)
    dimse = DimseNode(settings, services.ingest)  # stages into the storage
    sink.pool = None
    try:
        yield Node(services.storage, services.ingest, dimse, root)
    finally:
        sink.directory, sink.pool, sink.writeback = saved
        services.close()


@dataclass
class Outcome:
    #: What the gateway logged as errors: an exception it did not expect (the association
    #: then ends with an A-ABORT), or a store that failed for a reason of its own (0xA700).
    errors: list[str]
    hung: bool
    sent_back: bytes


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(self.format(record))


def serve(node: Node, stream: bytes) -> Outcome:
    """One association over a socket pair: the peer sends ``stream``, then half-closes."""
    ours, theirs = socket.socketpair()
    association = receiver.Association(ours, ("127.0.0.1", 104), node.dimse.policy,
                                       node.dimse.lean_store, node.dimse.lean_qr)
    errors = _Errors()
    escaped: list[str] = []

    def run() -> None:
        try:
            association.run()
        except BaseException:
            escaped.append(traceback.format_exc())

    logger = logging.getLogger("gateway")
    logger.addHandler(errors)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    theirs.settimeout(10)
    back = bytearray()
    try:
        theirs.sendall(stream)
        theirs.shutdown(socket.SHUT_WR)
        while chunk := theirs.recv(65536):
            back += chunk
    except OSError:  # the gateway closed first (a reset while we were still sending)
        pass
    thread.join(10)
    logger.removeHandler(errors)
    theirs.close()
    return Outcome(errors.seen + escaped, thread.is_alive(), bytes(back))


# -- the properties --------------------------------------------------------------------------------
def test_an_intact_session_is_answered_in_order_even_when_the_peer_does_not_wait(
        node: Node) -> None:
    """The session the garbled ones start from, sent at once (by a peer that does not wait
    for each response, although PS3.7 asks it to unless asynchronous operations were
    negotiated): C-STORE Success, the C-FIND answered in full, the C-MOVE refused 0xA801
    (destination unknown), the C-ECHO, the release; the instance stored whole. Until a
    C-FIND's check for C-CANCEL stopped re-reading requests it had put back, the requests
    waiting behind it made that check loop forever at full CPU."""
    sop_uid, data = node.sample()
    outcome = serve(node, session(sop_uid, data))
    assert outcome.errors == [] and not outcome.hung
    types, commands = responses(outcome.sent_back)
    assert types[0] == 0x02 and types[-1] == 0x06  # A-ASSOCIATE-AC ... A-RELEASE-RP
    answered = [(c.CommandField, c.Status) for c in commands]
    assert answered[0] == (0x8001, 0x0000)  # C-STORE-RSP Success
    assert (0x8020, 0xFF00) in answered  # C-FIND-RSP Pending: at least the study just stored
    assert answered[-3:] == [(0x8020, 0x0000), (0x8021, 0xA801), (0x8030, 0x0000)]
    _rejection, stored = node.ingest.index.prior_state(sop_uid)
    assert stored is not None
    assert read_instance(node.storage.path_for(stored.blob_key)).sop_uid == sop_uid
    assert node.staged() == []


def test_a_command_uid_that_is_not_ascii_is_refused_c000_and_the_association_goes_on(
        node: Node) -> None:
    """A garbled Affected SOP Instance UID in the command (bytes no UID can hold) is the
    sender's error, answered 0xC000 with a comment naming both UIDs (PS3.4 B.2.3); until it
    was handled, it ended the association's thread with a UnicodeEncodeError, no answer and
    a staging file left behind."""
    sop_uid, data = node.sample()
    declared = sop_uid.encode()[:-1] + b"\xe9"  # é in Latin-1: no UID holds it
    command = c_store_rq(sop_uid).replace(sop_uid.encode(), declared)
    stream = (associate_rq() + p_data((1, 0x03, command)) + p_data((1, 0x02, data))
              + A_RELEASE_RQ)
    outcome = serve(node, stream)
    assert outcome.errors == [] and not outcome.hung
    types, commands = responses(outcome.sent_back)
    assert types == [0x02, 0x04, 0x06]
    assert commands[0].Status == 0xC000
    assert str(commands[0].ErrorComment).startswith(
        "SOP Instance UID of the data set differs from the declared")
    assert node.ingest.index.prior_state(sop_uid) == (None, None)
    assert node.staged() == []


def test_a_c_find_identifier_with_a_garbled_value_is_refused_c000(node: Node) -> None:
    """An identifier whose element cannot be read (here a VR no standard defines) is answered
    0xC000 with the reason (PS3.4 C.4.1.1.4: Error, Unable to process); until it was
    handled, pydicom's lazy decoding raised NotImplementedError in the query, which ended the
    association's thread with no answer."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.ModalitiesInStudy = "CT"
    encoded = encode(identifier, False, True) or b""
    garbled = encoded.replace(b"\x08\x00\x61\x00CS", b"\x08\x00\x61\x00C\xcc")
    assert garbled != encoded
    find = command_set(AffectedSOPClassUID=STUDY_ROOT_FIND, CommandField=0x0020, MessageID=3,
                       Priority=0, CommandDataSetType=0x0000)
    stream = associate_rq() + p_data((5, 0x03, find), (5, 0x02, garbled)) + A_RELEASE_RQ
    outcome = serve(node, stream)
    assert outcome.errors == [] and not outcome.hung
    types, commands = responses(outcome.sent_back)
    assert types == [0x02, 0x04, 0x06]
    assert (commands[0].CommandField, commands[0].Status) == (0x8020, 0xC000)
    assert str(commands[0].ErrorComment).startswith("identifier cannot be decoded")


def test_an_error_of_the_gateway_s_own_aborts_the_association_and_is_logged(
        node: Node, caplog: pytest.LogCaptureFixture) -> None:
    """A bug in a handler (injected here: a C-FIND handler that raises) must not leave the
    peer with a connection closed for no reason it can read: it gets an A-ABORT (PS3.8
    §7.3.1: source "service provider"), and the log the traceback."""

    def broken(_association: receiver.Association, _message: object) -> None:
        raise RuntimeError("injected failure")

    ours, theirs = socket.socketpair()
    association = receiver.Association(ours, ("127.0.0.1", 104), node.dimse.policy,
                                       node.dimse.lean_store, broken)
    find = command_set(AffectedSOPClassUID=STUDY_ROOT_FIND, CommandField=0x0020, MessageID=3,
                       Priority=0, CommandDataSetType=0x0000)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    theirs.sendall(associate_rq() + p_data((5, 0x03, find),
                                           (5, 0x02, encode(identifier, False, True) or b"")))
    with caplog.at_level(logging.ERROR, logger="gateway"):
        association.run()
    theirs.settimeout(5)
    back = b""
    while chunk := theirs.recv(65536):
        back += chunk
    theirs.close()
    types, _commands = responses(back)
    assert types == [0x02, 0x07]  # A-ASSOCIATE-AC, A-ABORT
    assert back[-2:] == b"\x02\x00"  # source: service provider; reason: not specified
    assert "aborted: internal error" in caplog.text and "injected failure" in caplog.text


#: One edit of a session: what ("replace", "insert", "cut"), where (a number reduced to the
#: session's length; with ``early``, to its association request and first command bytes, where
#: a byte changes meaning), and the bytes it puts there.
EDITS = st.lists(st.tuples(st.sampled_from(["replace", "replace", "insert", "cut"]),
                           st.integers(0, 1 << 20), st.booleans(),
                           st.binary(min_size=1, max_size=8)),
                 min_size=1, max_size=4)


def garble(stream: bytes, edits: list[tuple[str, int, bool, bytes]]) -> bytes:
    garbled = bytearray(stream)
    early = len(associate_rq()) + 80
    for what, where, in_head, new in edits:
        if not garbled:
            break
        at = where % (min(len(garbled), early) if in_head else len(garbled))
        if what == "replace":
            garbled[at:at + 1] = new[:1]
        elif what == "insert":
            garbled[at:at] = new
        else:
            del garbled[at:]
    return bytes(garbled)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edits=EDITS)
def test_a_garbled_session_ends_cleanly_and_stores_only_what_it_acknowledges(
        node: Node, edits: list[tuple[str, int, bool, bytes]]) -> None:
    sop_uid, data = node.sample()
    outcome = serve(node, garble(session(sop_uid, data), edits))
    assert outcome.errors == [], outcome.errors[0]
    assert not outcome.hung, "the association's thread still waits after the peer's close"
    assert node.staged() == [], "a partial reception stayed in staging"
    _types, commands = responses(outcome.sent_back)
    acknowledged = [c for c in commands if c.CommandField == 0x8001 and c.Status == 0x0000]
    for response in acknowledged:
        _rejection, stored = node.ingest.index.prior_state(
            str(response.AffectedSOPInstanceUID))
        assert stored is not None, "acknowledged but not indexed"
        read_instance(node.storage.path_for(stored.blob_key))  # whole: parses to its end
