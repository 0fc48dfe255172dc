"""Storage Commitment Push Model (PS3.4 Annex J) on a running gateway, with pynetdicom as the
modality: N-ACTION in, N-EVENT-REPORT out, on the requester's association while it stays open
and on a new association (SCP/SCU role selection) when it has released.

Instances are stored with dcmtk ``storescu``; the modality asks for commitment of stored,
unknown and class-mismatched instances and reads the report's sequences.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from conftest import GatewayProcess, dcmtk_env, free_port, require_dcmtk
from samples import stored_path, synthetic_instance

SC = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage (what samples write)
CT = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
WELL_KNOWN = "1.2.840.10008.1.20.1.1"
DELAY = 0.3  # dimse.commitment_report_delay for these tests


@dataclass
class Reports:
    """N-EVENT-REPORTs a modality received: (event type, information, calling AE)."""

    received: list[tuple[int, Dataset, str]] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)
    hold: threading.Event | None = None  # while set-up, answer only once it is set

    def handler(self, event: evt.Event) -> tuple[int, None]:
        information = event.event_information
        information.TransactionUID  # noqa: B018  (decode now, in the handler's thread)
        with self.arrived:
            self.received.append((int(event.event_type), information,
                                  str(event.assoc.requestor.ae_title).strip()))
            self.arrived.notify_all()
        if self.hold is not None:
            self.hold.wait(30)
        return 0x0000, None

    def wait_for(self, transaction: str, timeout: float = 30) -> tuple[int, Dataset, str]:
        deadline = time.monotonic() + timeout
        with self.arrived:
            while True:
                for report in self.received:
                    if report[1].TransactionUID == transaction:
                        return report
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no report for transaction {transaction}")
                self.arrived.wait(left)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A gateway holding a few stored instances, and the modality's listening AE (the peer
    MODALITY in ``[dimse.peers]``) that receives reports on new associations."""
    require_dcmtk()
    root = tmp_path_factory.mktemp("commitment")
    files = root / "files"
    files.mkdir()
    stored = [synthetic_instance(files, PatientID="PCOMMIT", InstanceNumber=n)
              for n in range(1, 5)]
    modality_port = free_port()
    gateway = GatewayProcess(root, free_port(), free_port(), extra={"dimse": {
        "commitment_report_delay": DELAY,
        "peers": {"MODALITY": {"host": "127.0.0.1", "port": modality_port}}}})
    gateway.start()
    sent = subprocess.run(["storescu", "-aec", gateway.ae_title, "127.0.0.1",
                           str(gateway.dimse_port), *map(str, stored)],
                          capture_output=True, text=True, env=dcmtk_env(), timeout=60)
    assert sent.returncode == 0, sent.stderr
    reports = Reports()
    listener = AE(ae_title="MODALITY")
    listener.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    server = listener.start_server(("127.0.0.1", modality_port), block=False,
                                   evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)])
    yield {"gateway": gateway, "sops": [p.stem for p in stored], "reports": reports}
    server.shutdown()
    gateway.stop()


def request(sops: list[tuple[str, str]], transaction: str | None = None) -> Dataset:
    """Request Storage Commitment Action Information (PS3.4 Table J.3-1)."""
    ds = Dataset()
    ds.TransactionUID = transaction or generate_uid()
    items = []
    for sop_class, sop_uid in sops:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_uid
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def associate(gateway: GatewayProcess, title: str = "MODALITY",
              handler: Callable[[evt.Event], tuple[int, None]] | None = None) -> Association:
    ae = AE(ae_title=title)
    ae.add_requested_context(StorageCommitmentPushModel)
    handlers = [(evt.EVT_N_EVENT_REPORT, handler)] if handler else []
    assoc = ae.associate("127.0.0.1", gateway.dimse_port, ae_title=gateway.ae_title,
                         evt_handlers=handlers)
    assert assoc.is_established
    return assoc


def n_action(assoc: Association, ds: Dataset, action_type: int = 1,
             instance: str = WELL_KNOWN) -> int:
    status, _reply = assoc.send_n_action(ds, action_type, StorageCommitmentPushModel, instance)
    return int(status.Status)


def wait_for_log(gateway: GatewayProcess, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + 30
    while gateway.log.count(text) < count:
        assert time.monotonic() < deadline, f"not logged: {text}\n{gateway.log[-2000:]}"
        time.sleep(0.05)


def references(ds: Dataset, keyword: str) -> dict[str, tuple[str, int | None]]:
    """SOP Instance UID → (SOP Class UID, Failure Reason) of one of the report's sequences."""
    return {str(item.ReferencedSOPInstanceUID):
            (str(item.ReferencedSOPClassUID), item.get("FailureReason"))
            for item in ds.get(keyword, [])}


def test_report_on_the_same_association(world: dict[str, Any]) -> None:
    gateway, sops, reports = world["gateway"], world["sops"], world["reports"]
    unknown, other = generate_uid(), generate_uid()
    mixed = request([(SC, sops[0]), (SC, sops[1]), (CT, unknown), (CT, sops[2]),
                     ("1.2.3.4", other)])
    fine = request([(SC, sop) for sop in sops])
    assoc = associate(gateway, handler=reports.handler)
    try:
        assert n_action(assoc, mixed) == 0x0000
        event_type, info, caller = reports.wait_for(mixed.TransactionUID)
        # a second transaction on the same, still open association
        assert n_action(assoc, fine) == 0x0000
        all_type, all_info, _ = reports.wait_for(fine.TransactionUID)
    finally:
        assoc.release()
    assert caller == "MODALITY", "reported by the modality's own association's peer"
    assert event_type == 2, "J.3.3.1.1: failures exist"
    assert info.RetrieveAETitle == gateway.ae_title
    assert references(info, "ReferencedSOPSequence") == {sops[0]: (SC, None),
                                                          sops[1]: (SC, None)}
    assert references(info, "FailedSOPSequence") == {
        unknown: (CT, 0x0112),  # no such object instance
        sops[2]: (CT, 0x0119),  # class/instance conflict
        other: ("1.2.3.4", 0x0122),  # referenced SOP class not supported
    }
    assert all_type == 1
    assert references(all_info, "ReferencedSOPSequence") == {sop: (SC, None) for sop in sops}
    assert "FailedSOPSequence" not in all_info


def test_report_on_a_new_association_after_release(world: dict[str, Any]) -> None:
    gateway, sops, reports = world["gateway"], world["sops"], world["reports"]
    ds = request([(SC, sops[3]), (SC, unknown := generate_uid())])
    on_requesting_association = Reports()
    assoc = associate(gateway, handler=on_requesting_association.handler)
    try:
        assert n_action(assoc, ds) == 0x0000
    finally:
        assoc.release()  # at once: the report must come on an association the gateway opens
    event_type, info, caller = reports.wait_for(ds.TransactionUID)
    assert on_requesting_association.received == []
    assert caller == gateway.ae_title, "the gateway requested the association (role selection)"
    assert event_type == 2
    assert references(info, "ReferencedSOPSequence") == {sops[3]: (SC, None)}
    assert references(info, "FailedSOPSequence") == {unknown: (SC, 0x0112)}


def test_an_unknown_requester_that_released_is_logged(world: dict[str, Any]) -> None:
    gateway, sops = world["gateway"], world["sops"]
    ds = request([(SC, sops[0])])
    assoc = associate(gateway, title="STRANGER")
    try:
        assert n_action(assoc, ds) == 0x0000
    finally:
        assoc.release()
    wait_for_log(gateway, f"storage commitment {ds.TransactionUID}: cannot deliver")
    assert "STRANGER released its association and is not in [dimse.peers]" in gateway.log


def test_a_stored_file_that_vanished_is_not_committed(world: dict[str, Any],
                                                      tmp_path: Path) -> None:
    gateway, reports = world["gateway"], world["reports"]
    path = synthetic_instance(tmp_path, PatientID="PCOMMIT")
    sent = subprocess.run(["storescu", "-aec", gateway.ae_title, "127.0.0.1",
                           str(gateway.dimse_port), str(path)],
                          capture_output=True, text=True, env=dcmtk_env(), timeout=60)
    assert sent.returncode == 0, sent.stderr
    blob = stored_path(gateway.data, path.stem)
    assert blob is not None
    blob.unlink()
    ds = request([(SC, path.stem)])
    assoc = associate(gateway, handler=reports.handler)
    try:
        assert n_action(assoc, ds) == 0x0000
        event_type, info, _ = reports.wait_for(ds.TransactionUID)
    finally:
        assoc.release()
    assert event_type == 2
    assert references(info, "FailedSOPSequence") == {path.stem: (SC, 0x0110)}


def test_a_transaction_uid_still_in_progress_is_a_duplicate(world: dict[str, Any]) -> None:
    gateway, sops = world["gateway"], world["sops"]
    transaction = generate_uid()
    first = Reports(hold=threading.Event())  # holds its answer: the transaction stays active
    second = Reports()
    one = associate(gateway, handler=first.handler)
    two = associate(gateway, handler=second.handler)
    try:
        assert n_action(one, request([(SC, sops[0])], transaction)) == 0x0000
        first.wait_for(transaction)
        assert n_action(two, request([(SC, sops[1])], transaction)) == 0x0000
        event_type, info, _ = second.wait_for(transaction)
        assert first.hold is not None
        first.hold.set()
        # release only once the first answer is in (else it races the modality's release)
        wait_for_log(gateway, f"storage commitment {transaction}: result delivered to "
                              "MODALITY on the same association", count=2)
    finally:
        one.release()
        two.release()
    assert event_type == 2
    assert references(info, "FailedSOPSequence") == {sops[1]: (SC, 0x0131)}
    assert first.received[0][0] == 1


@pytest.mark.parametrize(("change", "action_type", "instance", "status", "comment"), [
    ("no transaction", 1, WELL_KNOWN, 0x0115, "Transaction UID"),
    ("empty sequence", 1, WELL_KNOWN, 0x0115, "Referenced SOP Sequence"),
    ("item without instance", 1, WELL_KNOWN, 0x0115, "item 1"),
    ("", 2, WELL_KNOWN, 0x0123, "Action Type ID 2"),
    ("", 1, "1.2.840.10008.1.20.1.2", 0x0112, "well-known"),
])
def test_a_request_it_cannot_take_on_fails_at_once(
        world: dict[str, Any], change: str, action_type: int, instance: str, status: int,
        comment: str) -> None:
    gateway, sops = world["gateway"], world["sops"]
    ds = request([(SC, sops[0])])
    if change == "no transaction":
        del ds.TransactionUID
    elif change == "empty sequence":
        ds.ReferencedSOPSequence = []
    elif change == "item without instance":
        del ds.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    assoc = associate(gateway)
    try:
        rsp, _reply = assoc.send_n_action(ds, action_type, StorageCommitmentPushModel,
                                          instance)
    finally:
        assoc.release()
    assert rsp.Status == status
    assert comment in rsp.ErrorComment
