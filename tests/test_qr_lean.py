"""C-MOVE and C-GET on the lean Upper Layer (gateway.qr_lean): what a retrieve answers when
things go wrong on the way (PS3.4 C.4.2.1.5, C.4.3.1.4), and that it answers exactly what the
pynetdicom path answers when nothing does.

An in-process DICOM node holds one series of small instances. Move Destinations: an in-process
pynetdicom storage SCP (which may be told to abort the association after some instances), and
a configured peer where nothing listens.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from gateway.bootstrap import Services, build_services
from gateway.config import Peer, load_settings
from gateway.dimse import DimseNode

from conftest import free_port
from samples import stored_path, synthetic_instance

COUNT = 8
STUDY, SERIES = "1.2.826.0.1.3680043.10.1.88", "1.2.826.0.1.3680043.10.2.88"
MOVE, GET = StudyRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelGet


class Destination:
    """A pynetdicom storage SCP that records what it receives and, when ``abort_after`` is
    set, aborts the association once it has taken that many instances."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.abort_after: int | None = None
        self.lock = threading.Lock()
        ae = AE(ae_title="DEST")
        ae.add_supported_context(SecondaryCaptureImageStorage)
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event) -> int:
        with self.lock:
            if self.abort_after is not None and len(self.received) >= self.abort_after:
                event.assoc.abort()
                return 0xA700
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("qr_lean")
    destination = Destination()
    nodes = {}
    services_list: list[Services] = []
    sops = []
    for lean in (True, False):
        settings = load_settings(environ={}, overrides={
            "storage": {"path": str(root / f"data-{lean}"), "fsync": False},
            "dimse": {"host": "127.0.0.1", "port": free_port(), "ae_title": "LEAN_GW",
                      "lean_upper_layer": lean,
                      "pending_interval": 0}})  # as pynetdicom: Pending after every one
        settings = dataclasses.replace(settings, peers={
            "DEST": Peer("DEST", "127.0.0.1", destination.port),
            "DOWN": Peer("DOWN", "127.0.0.1", free_port())})
        services = build_services(settings)
        services_list.append(services)
        for number in range(COUNT):
            path = synthetic_instance(root, PatientID="P88", StudyInstanceUID=STUDY,
                                      SeriesInstanceUID=SERIES, InstanceNumber=number + 1,
                                      SOPInstanceUID=f"1.2.826.0.1.3680043.10.3.88.{number}")
            services.ingest.store_file(path, move=True)
        node = DimseNode(settings, services.ingest)
        _host, port = node.start()
        nodes[lean] = (node, port, root / f"data-{lean}")
        sops = [f"1.2.826.0.1.3680043.10.3.88.{n}" for n in range(COUNT)]
    yield {"nodes": nodes, "destination": destination, "sops": sops}
    for node, _port, _data in nodes.values():
        node.stop(drain_seconds=1)
    for services in services_list:
        services.close()
    destination.server.shutdown()


def _identifier() -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = STUDY
    identifier.SeriesInstanceUID = SERIES
    return identifier


def _move(port: int, destination: str) -> list[tuple[Dataset, Dataset | None]]:
    ae = AE(ae_title="MOVESCU")
    ae.add_requested_context(MOVE)
    assoc = ae.associate("127.0.0.1", port, ae_title="LEAN_GW")
    assert assoc.is_established
    try:
        return list(assoc.send_c_move(_identifier(), destination, MOVE))
    finally:
        assoc.release()


def _get(port: int) -> tuple[list[tuple[Dataset, Dataset | None]], list[str]]:
    got: list[str] = []

    def on_store(event: evt.Event) -> int:
        got.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(GET)
    ae.add_requested_context(SecondaryCaptureImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="LEAN_GW",
                         ext_neg=[build_role(SecondaryCaptureImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        return list(assoc.send_c_get(_identifier(), GET)), got
    finally:
        assoc.release()


def _failed(identifier: Dataset | None) -> list[str]:
    """Failed SOP Instance UID List (0008,0058) as a list, whatever its multiplicity."""
    element = identifier.get("FailedSOPInstanceUIDList") if identifier is not None else None
    if element is None or element == "":
        return []
    return [str(uid) for uid in element] if not isinstance(element, str) else [element]


def _summary(responses: list[tuple[Dataset, Dataset | None]]) -> list[tuple[Any, ...]]:
    """What a retrieve answered: status and counts of each response, and the failed list.

    C.4.2.1.6 (and C.4.3.1.3 for C-GET) allow Number of Remaining Sub-operations only in
    pending and cancelled responses; pynetdicom 3.0 also puts a zero in its final Success
    response, which the lean path leaves out, so a final 0 is read as absent here."""
    rows = []
    for number, (status, identifier) in enumerate(responses):
        remaining = status.get("NumberOfRemainingSuboperations")
        if number == len(responses) - 1 and status.Status != 0xFE00 and remaining == 0:
            remaining = None
        rows.append((status.Status, remaining,
                     status.get("NumberOfCompletedSuboperations"),
                     status.get("NumberOfFailedSuboperations"),
                     status.get("NumberOfWarningSuboperations"),
                     _failed(identifier) if identifier is not None else None))
    return rows


def test_c_move_answers_alike_on_both_paths(world: dict[str, Any]) -> None:
    """Every response, pending and final, counts the same on the lean path as on pynetdicom's:
    a pending FF00 per sub-operation, then 0000 with all completed."""
    destination: Destination = world["destination"]
    answers = {}
    for lean, (_node, port, _data) in world["nodes"].items():
        destination.received.clear()
        answers[lean] = _summary(_move(port, "DEST"))
        assert sorted(destination.received) == sorted(world["sops"])
    assert answers[True] == answers[False]
    assert answers[True][-1][:4] == (0x0000, None, COUNT, 0)
    _node, port, _data = world["nodes"][True]
    final, _identifier = _move(port, "DEST")[-1]
    assert "NumberOfRemainingSuboperations" not in final, "C.4.2.1.6: not in a final Success"


def test_c_get_answers_alike_on_both_paths(world: dict[str, Any]) -> None:
    answers = {}
    for lean, (_node, port, _data) in world["nodes"].items():
        responses, got = _get(port)
        assert sorted(got) == sorted(world["sops"])
        answers[lean] = _summary(responses)
    assert answers[True] == answers[False]
    assert [row[1] for row in answers[True][:-1]] == list(range(COUNT - 1, -1, -1))


def test_a_destination_nobody_answers_at_is_a702_with_a_reason(world: dict[str, Any]) -> None:
    """A configured Move Destination that cannot be associated with: nothing was sent, the
    sub-operations cannot be performed (A702), and the Error Comment says why."""
    _node, port, _data = world["nodes"][True]
    [(final, _identifier)] = _move(port, "DOWN")
    assert final.Status == 0xA702
    assert "cannot connect to DOWN" in final.ErrorComment


def test_a_destination_that_aborts_leaves_the_rest_failed_and_listed(
        world: dict[str, Any]) -> None:
    """The destination aborts after 3 instances: those count as completed, the one it
    aborted on and every later one as failed, all listed in Failed SOP Instance UID List;
    the final status is B000 (some failed)."""
    destination: Destination = world["destination"]
    _node, port, _data = world["nodes"][True]
    destination.received.clear()
    destination.abort_after = 3
    try:
        responses = _move(port, "DEST")
    finally:
        destination.abort_after = None
    final, identifier = responses[-1]
    assert (final.Status, final.NumberOfCompletedSuboperations,
            final.NumberOfFailedSuboperations) == (0xB000, 3, COUNT - 3)
    assert sorted(_failed(identifier)) == sorted(set(world["sops"]) - set(destination.received))


def test_a_stored_file_that_vanished_is_one_failed_sub_operation(
        world: dict[str, Any], tmp_path: Path) -> None:
    """C-GET of a series one of whose files was removed behind the gateway's back: the
    others arrive, that one is listed as failed, B000."""
    _node, port, data = world["nodes"][True]
    lost = world["sops"][0]
    path = stored_path(data, lost)
    assert path is not None
    kept = tmp_path / "kept.dcm"
    path.rename(kept)
    try:
        responses, got = _get(port)
    finally:
        kept.rename(path)
    final, identifier = responses[-1]
    assert sorted(got) == sorted(set(world["sops"]) - {lost})
    assert (final.Status, final.NumberOfFailedSuboperations) == (0xB000, 1)
    assert _failed(identifier) == [lost]
