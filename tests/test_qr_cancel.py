"""C-CANCEL of a C-MOVE (PS3.7 9.1.4, PS3.4 C.4.2): the SCP stops the sub-operations and ends
with FE00 (sub-operations terminated due to Cancel Indication) and the counts so far.

An in-process DICOM node holds a series of many small instances; each C-STORE sub-operation is
slowed (failure injection, 5 ms) so that the C-CANCEL always arrives while instances remain.
The Move Destination is dcmtk ``storescp --ignore``.
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove  # type: ignore[attr-defined]

from gateway import qr
from gateway.bootstrap import build_services
from gateway.config import Peer, load_settings
from gateway.dimse import DimseNode

from conftest import dcmtk_env, free_port, require_dcmtk
from samples import synthetic_instance

MANY = 300
#: dimse.pending_interval of the slow node: each sub-operation takes at least 5 ms there.
PENDING_INTERVAL = 0.1
STUDY, SERIES = "1.2.826.0.1.3680043.10.1.77", "1.2.826.0.1.3680043.10.2.77"


def _listening(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@pytest.fixture
def slow_move_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    require_dcmtk()
    destination_port = free_port()
    destination = subprocess.Popen(["storescp", "--ignore", "-aet", "DEST",
                                    str(destination_port)], env=dcmtk_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    settings = load_settings(environ={}, overrides={
        "storage": {"path": str(tmp_path / "data"), "fsync": False},
        "dimse": {"host": "127.0.0.1", "port": free_port(), "ae_title": "SLOW_GW",
                  "pending_interval": PENDING_INTERVAL}})
    settings = dataclasses.replace(
        settings, peers={"DEST": Peer("DEST", "127.0.0.1", destination_port)})
    services = build_services(settings)
    for number in range(MANY):
        services.ingest.store_file(synthetic_instance(
            tmp_path, PatientID="P77", StudyInstanceUID=STUDY, SeriesInstanceUID=SERIES,
            InstanceNumber=number + 1), move=True)
    outgoing = qr.QueryRetrieve.outgoing

    def slow_outgoing(self: qr.QueryRetrieve, *args: Any) -> qr.Outgoing:
        time.sleep(0.005)
        return outgoing(self, *args)

    monkeypatch.setattr(qr.QueryRetrieve, "outgoing", slow_outgoing)
    node = DimseNode(settings, services.ingest)
    _host, port = node.start()
    _listening(destination_port)
    yield port
    node.stop(drain_seconds=1)
    services.close()
    destination.terminate()
    destination.wait()


def _move_association(port: int, model: str) -> tuple[Any, Dataset]:
    """An association to the slow node for ``model``, and the identifier of its series."""
    ae = AE(ae_title="MOVESCU")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title="SLOW_GW")
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = STUDY
    identifier.SeriesInstanceUID = SERIES
    return assoc, identifier


def test_c_cancel_ends_a_c_move_with_fe00_and_the_counts(slow_move_node: int) -> None:
    model = StudyRootQueryRetrieveInformationModelMove
    assoc, identifier = _move_association(slow_move_node, model)
    responses = []
    try:
        for status, _identifier in assoc.send_c_move(identifier, "DEST", model, msg_id=9):
            responses.append(status)
            if len(responses) == 1:
                assert status.Status == 0xFF00
                context_id = assoc._get_valid_context(model, "", "scu").context_id
                assoc.send_c_cancel(9, context_id)
    finally:
        assoc.release()
    final = responses[-1]
    assert final.Status == 0xFE00, "PS3.4 C.4.2: a cancelled C-MOVE ends with FE00"
    assert all(r.Status == 0xFF00 for r in responses[:-1])
    completed = final.NumberOfCompletedSuboperations
    assert 1 <= completed < MANY
    assert "NumberOfRemainingSuboperations" in final
    assert completed + final.NumberOfRemainingSuboperations + \
        final.NumberOfFailedSuboperations + final.NumberOfWarningSuboperations == MANY


def test_pending_responses_come_at_most_once_per_pending_interval(slow_move_node: int) -> None:
    """PS3.4 C.4.2.3.1: Pending responses are optional; the gateway sends one after a
    sub-operation only once dimse.pending_interval seconds have passed since the last
    response (here 0.1 s, and 300 sub-operations of at least 5 ms each), each with counts
    that add up, then the final response."""
    model = StudyRootQueryRetrieveInformationModelMove
    assoc, identifier = _move_association(slow_move_node, model)
    try:
        responses = [status for status, _ in assoc.send_c_move(identifier, "DEST", model)]
    finally:
        assoc.release()
    pending, final = responses[:-1], responses[-1]
    assert (final.Status, final.NumberOfCompletedSuboperations) == (0x0000, MANY)
    assert all(r.Status == 0xFF00 for r in pending)
    # With one after every sub-operation there would be MANY; half would take 15 s.
    assert 1 <= len(pending) <= MANY // 2
    remaining = [r.NumberOfRemainingSuboperations for r in pending]
    assert remaining == sorted(remaining, reverse=True) and len(set(remaining)) == len(remaining)
    assert all(r.NumberOfCompletedSuboperations + r.NumberOfRemainingSuboperations == MANY
               for r in pending)
