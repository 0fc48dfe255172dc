"""The Storage SCP (PS3.4 Annex B) and Verification, driven by real senders: dcmtk and pynetdicom.

PS3.4 B.2.3: "Success" means the SCP has stored the instance. So every test that gets 0x0000
back checks the instance is really there (file on disk, row in the index), and every failure
status checks that nothing partial is left to be served.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psutil
import pydicom
import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from conftest import GatewayProcess, dcmtk_env, partial_receptions, pydicom_file, require_dcmtk
from samples import dataset_bytes, fresh_copies, sample_files, stored_path, storescu_profile


def _index_has(gateway: GatewayProcess, sop_uid: str) -> bool:
    import sqlite3

    with sqlite3.connect(gateway.index_file) as db:
        return db.execute("SELECT 1 FROM instance WHERE SOPInstanceUID = ?",
                          (sop_uid,)).fetchone() is not None


def _send_raw(gateway: GatewayProcess, path: Path, *, calling: str = "TEST_SCU",
              contexts: list[tuple[str, str]] | None = None) -> int:
    """C-STORE the bytes of ``path`` exactly as they are in the file (pynetdicom's chunked send
    reads the data set straight from the file), on a context built from its file meta."""
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    ae = AE(ae_title=calling)
    for abstract, syntax in contexts or [(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)]:
        ae.add_requested_context(abstract, syntax)
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", gateway.dimse_port, ae_title=gateway.ae_title)
        assert assoc.is_established, "association was not accepted"
        status = assoc.send_c_store(path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    assert status, "no C-STORE response"
    return int(status.Status)


def test_c_echo_answers_success_to_dcmtk_echoscu(gateway: GatewayProcess) -> None:
    require_dcmtk()
    result = subprocess.run(["echoscu", "-aec", gateway.ae_title, "127.0.0.1",
                             str(gateway.dimse_port)], env=dcmtk_env(), capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_every_transfer_syntax_is_stored_byte_exact_as_received(
        gateway: GatewayProcess, tmp_path: Path) -> None:
    """pynetdicom sends each file's data set bytes unchanged; the stored data set must equal
    them byte for byte, behind a Part 10 header naming the negotiated transfer syntax."""
    for syntax, path in sample_files(tmp_path).items():
        status = _send_raw(gateway, path)
        assert status == 0x0000, f"{syntax}: status 0x{status:04X}\n{gateway.log[-2000:]}"
        sop_uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        stored = stored_path(gateway.data, sop_uid)
        assert stored is not None, f"{syntax}: acknowledged but not stored"
        assert dataset_bytes(stored) == dataset_bytes(path), f"{syntax}: bytes differ"
        meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == syntax
        assert meta.MediaStorageSOPInstanceUID == sop_uid
        assert _index_has(gateway, sop_uid)


def test_dcmtk_storescu_sends_every_transfer_syntax(gateway: GatewayProcess,
                                                     tmp_path: Path) -> None:
    """dcmtk re-encodes what it reads before sending, so here the check is that each instance
    arrives in its own transfer syntax (-R: propose only the file's syntax) with the same
    content."""
    require_dcmtk()
    # dcmtk 3.6.7 (Debian 12) predates HTJ2K and reads such files as Explicit VR LE; HTJ2K
    # reception is covered by the pynetdicom byte-exact test above.
    files = {s: p for s, p in sample_files(tmp_path).items()
             if not s.startswith("1.2.840.10008.1.2.4.20")}
    config = storescu_profile(tmp_path / "storescu.cfg", files.values())
    result = subprocess.run(
        ["storescu", "-xf", str(config), "Samples", "-aec", gateway.ae_title, "127.0.0.1",
         str(gateway.dimse_port), *map(str, files.values())], env=dcmtk_env(),
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr + gateway.log[-2000:]
    for syntax, path in files.items():
        original = pydicom.dcmread(path)
        stored = stored_path(gateway.data, original.SOPInstanceUID)
        assert stored is not None, f"{syntax}: not stored"
        copy = pydicom.dcmread(stored)
        assert copy.file_meta.TransferSyntaxUID == syntax
        assert copy.PixelData == original.PixelData, f"{syntax}: pixel data changed"
        assert copy.StudyInstanceUID == original.StudyInstanceUID


def test_resending_an_identical_instance_succeeds_and_changes_nothing(
        gateway: GatewayProcess) -> None:
    path = pydicom_file("CT_small.dcm")
    assert _send_raw(gateway, path) == 0x0000
    stored = stored_path(gateway.data, pydicom.dcmread(path).SOPInstanceUID)
    assert stored is not None
    before = (stored.stat().st_ino, stored.stat().st_mtime_ns)
    assert _send_raw(gateway, path) == 0x0000
    assert (stored.stat().st_ino, stored.stat().st_mtime_ns) == before


def _changed_copy(original: Path, directory: Path,
                  description: str) -> tuple[pydicom.Dataset, Path]:
    """The same SOP Instance UID with different content (another Study Description)."""
    changed = pydicom.dcmread(original)
    changed.StudyDescription = description
    path = directory / "changed.dcm"
    changed.save_as(path)
    return changed, path


def test_different_object_with_a_stored_uid_is_rejected_by_default(
        gateway: GatewayProcess, tmp_path: Path) -> None:
    original = pydicom_file("CT_small.dcm")
    assert _send_raw(gateway, original) == 0x0000
    changed, other = _changed_copy(original, tmp_path, "changed after the fact")
    assert _send_raw(gateway, other) == 0x0111  # Duplicate SOP Instance (PS3.7 C.4)
    stored = stored_path(gateway.data, changed.SOPInstanceUID)
    assert stored is not None
    assert dataset_bytes(stored) == dataset_bytes(original)
    assert "0x0111" in gateway.log and changed.SOPInstanceUID in gateway.log


def test_replace_policy_replaces_the_stored_object(make_gateway: object,
                                                   tmp_path: Path) -> None:
    gw = make_gateway(extra={"storage": {"duplicate_policy": "replace"}}).start()  # type: ignore[operator]
    original = pydicom_file("CT_small.dcm")
    assert _send_raw(gw, original) == 0x0000
    changed, other = _changed_copy(original, tmp_path, "corrected")
    assert _send_raw(gw, other) == 0x0000
    stored = stored_path(gw.data, changed.SOPInstanceUID)
    assert stored is not None and pydicom.dcmread(stored).StudyDescription == "corrected"


def test_data_set_of_another_sop_class_than_the_context_is_refused_a900(
        gateway: GatewayProcess, tmp_path: Path) -> None:
    """An MR data set sent on a CT Image Storage context: 0xA900 (PS3.4 B.2.3)."""
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage  # what the sender declares
    path = tmp_path / "mismatch.dcm"
    ds.save_as(path)
    status = _send_raw(gateway, path, contexts=[(CTImageStorage, ds.file_meta.TransferSyntaxUID)])
    assert status == 0xA900
    assert stored_path(gateway.data, ds.SOPInstanceUID) is None
    assert not _index_has(gateway, ds.SOPInstanceUID)
    assert "0xA900" in gateway.log and "TEST_SCU" in gateway.log
    assert str(ds.PatientName) not in gateway.log and str(ds.PatientID) not in gateway.log


@pytest.mark.parametrize("keyword, value", [
    ("StudyInstanceUID", "1.2.3.abc"),
    ("SeriesInstanceUID", "../../../etc/passwd"),
    ("StudyInstanceUID", "1.02.3"),
    ("SeriesInstanceUID", "1." + "2" * 70),
    ("StudyInstanceUID", None),
])
def test_missing_or_invalid_uids_are_refused_c000(gateway: GatewayProcess, tmp_path: Path,
                                                 keyword: str, value: str | None) -> None:
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if value is None:
        delattr(ds, keyword)
    else:
        ds[keyword].value = value
    path = tmp_path / "bad.dcm"
    ds.save_as(path)
    status = _send_raw(gateway, path)
    assert 0xC000 <= status <= 0xCFFF, f"0x{status:04X}"
    assert stored_path(gateway.data, ds.SOPInstanceUID) is None
    assert not _index_has(gateway, ds.SOPInstanceUID)
    assert not any(p.name == "passwd" for p in gateway.root.rglob("passwd"))


def test_truncated_data_set_is_refused_and_leaves_nothing(gateway: GatewayProcess,
                                                          tmp_path: Path) -> None:
    source = pydicom_file("CT_small.dcm")
    data = source.read_bytes()
    path = tmp_path / "truncated.dcm"
    path.write_bytes(data[: len(data) - 5000])  # cut inside the pixel data
    status = _send_raw(gateway, path)
    assert 0xC000 <= status <= 0xCFFF, f"0x{status:04X}"
    sop_uid = pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID
    assert stored_path(gateway.data, sop_uid) is None
    assert not _index_has(gateway, sop_uid)
    assert partial_receptions(gateway.data) == []


def test_unknown_calling_ae_is_rejected_when_allowed_callers_is_set(
        make_gateway: object) -> None:
    gw = make_gateway(extra={"dimse": {"allowed_callers": ["MODALITY1"]}}).start()  # type: ignore[operator]
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", gw.dimse_port, ae_title=gw.ae_title)
    assert assoc.is_rejected
    assert (assoc.acceptor.primitive.result, assoc.acceptor.primitive.diagnostic) == (1, 3), \
        "expected rejected-permanent, calling AE title not recognised"
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", gw.dimse_port, ae_title=gw.ae_title)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    assert "INTRUDER" in gw.log


def test_wrong_called_ae_title_is_rejected(gateway: GatewayProcess) -> None:
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", gateway.dimse_port, ae_title="SOMEONE_ELSE")
    assert assoc.is_rejected, (f"not rejected (aborted: {assoc.is_aborted}); gateway log:\n"
                               f"{gateway.log[-3000:]}")
    assert assoc.acceptor.primitive.diagnostic == 7  # called AE title not recognised


def test_dcmtk_storescu_of_a_folder_stores_everything(gateway: GatewayProcess) -> None:
    require_dcmtk()
    files = [pydicom_file(n) for n in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm",
                                   "waveform_ecg.dcm", "test-SR.dcm")]
    result = subprocess.run(["storescu", "-aec", gateway.ae_title, "127.0.0.1",
                             str(gateway.dimse_port), *map(str, files)],
                            env=dcmtk_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for path in files:
        sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert stored_path(gateway.data, sop) is not None
        assert _index_has(gateway, sop)


def test_sigterm_stops_cleanly(gateway: GatewayProcess) -> None:
    assert _send_raw(gateway, pydicom_file("CT_small.dcm")) == 0x0000
    assert gateway.stop() == 0
    assert "stopped" in gateway.log
    gateway.start()  # a clean stop leaves nothing for the next start to recover
    assert "did not stop cleanly" not in gateway.log


def test_mr_and_ct_contexts_coexist(gateway: GatewayProcess) -> None:
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", gateway.dimse_port, ae_title=gateway.ae_title)
    assert assoc.is_established
    for name in ("CT_small.dcm", "MR_small.dcm"):
        assert assoc.send_c_store(pydicom.dcmread(pydicom_file(name))).Status == 0
    assoc.release()


@pytest.mark.parametrize("with_commitment", [False, True])
def test_the_lean_upper_layer_serves_all_but_storage_commitment(
        gateway: GatewayProcess, with_commitment: bool) -> None:
    """Both paths accept the same storage and query contexts, store through the same write
    path and reject what the gateway does not offer (Modality Worklist); an association that
    proposes Storage Commitment goes to pynetdicom (which logs no context count), any other to
    the lean Upper Layer."""
    study_root_find, worklist = "1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.31"
    commitment = "1.2.840.10008.1.20.1"
    title = f"MIXED_{int(with_commitment)}"
    ae = AE(ae_title=title)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(study_root_find)
    ae.add_requested_context(worklist)
    if with_commitment:
        ae.add_requested_context(commitment)
    assoc = ae.associate("127.0.0.1", gateway.dimse_port, ae_title=gateway.ae_title)
    assert assoc.is_established
    assert sorted(cx.abstract_syntax for cx in assoc.accepted_contexts) == \
        sorted([CTImageStorage, study_root_find] + ([commitment] if with_commitment else []))
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    assert assoc.send_c_store(ds).Status == 0
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ds.StudyInstanceUID
    answers = list(assoc.send_c_find(query, study_root_find))
    assert [status.Status for status, _ in answers] == [0xFF00, 0x0000]
    assoc.release()
    assert stored_path(gateway.data, ds.SOPInstanceUID) is not None
    accepted_line = gateway.log.split(title)[1].split("\n")[0]
    assert ("presentation contexts" in accepted_line) is not with_commitment


def test_an_instance_is_indexed_while_its_association_stays_open(
        gateway: GatewayProcess) -> None:
    """The index rows of a C-STORE are committed after its response (the lean receiver's
    "Index later"), beside the next instance's flush; a sender that goes quiet instead does
    not keep the instance from other clients until it releases."""
    ae = AE(ae_title="QUIET_SCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", gateway.dimse_port, ae_title=gateway.ae_title)
    assert assoc.is_established
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    try:
        assert assoc.send_c_store(ds).Status == 0
        deadline = time.monotonic() + 10
        while not _index_has(gateway, ds.SOPInstanceUID):  # the association stays open
            assert time.monotonic() < deadline, "not indexed while the sender was quiet"
            time.sleep(0.01)
        found = requests.get(f"{gateway.base_url}/dicomweb/instances",
                             params={"SOPInstanceUID": ds.SOPInstanceUID}, timeout=10)
        assert found.status_code == 200 and len(found.json()) == 1
    finally:
        assoc.release()


def test_a_c_find_after_a_stream_of_c_stores_on_one_association_finds_every_one(
        gateway: GatewayProcess) -> None:
    """Each instance's index rows wait for the next instance's flush; whatever comes after
    the last C-STORE on the association (here a C-FIND) sees them all."""
    study_root_find = "1.2.840.10008.5.1.4.1.2.2.1"
    ae = AE(ae_title="STREAM_SCU")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(study_root_find)
    assoc = ae.associate("127.0.0.1", gateway.dimse_port, ae_title=gateway.ae_title)
    assert assoc.is_established
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    sent = []
    try:
        for _ in range(6):
            ds.SOPInstanceUID = generate_uid()
            assert assoc.send_c_store(ds).Status == 0
            sent.append(ds.SOPInstanceUID)
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID, query.SeriesInstanceUID = ds.StudyInstanceUID, \
            ds.SeriesInstanceUID
        query.SOPInstanceUID = ""
        answers = [(status.Status, found) for status, found in
                   assoc.send_c_find(query, study_root_find)]
    finally:
        assoc.release()
    assert answers[-1][0] == 0x0000
    assert sorted(found.SOPInstanceUID for status, found in answers if status == 0xFF00) == \
        sorted(sent)


def test_failure_status_carries_an_error_comment_the_sender_can_read(
        gateway: GatewayProcess, tmp_path: Path) -> None:
    """PS3.7 C.4: failures may carry Error Comment (0000,0902); dcmtk prints it."""
    require_dcmtk()
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = "1.2.3.abc"
    path = tmp_path / "bad.dcm"
    ds.save_as(path)
    result = subprocess.run(["storescu", "-d", "-aec", gateway.ae_title, "127.0.0.1",
                             str(gateway.dimse_port), str(path)], env=dcmtk_env(),
                            capture_output=True, text=True, timeout=30)
    output = result.stderr + result.stdout
    assert "Received Store Response" in output
    assert "(0000,0902) LO [StudyInstanceUID is missing or not a valid UID" in output


def test_sender_vanishing_mid_instance_leaves_nothing_behind(
        gateway: GatewayProcess, tmp_path: Path) -> None:
    """An association aborted in the middle of a data set: nothing acknowledged, nothing
    stored, no staging leftovers, and the gateway keeps serving."""
    import socket
    import struct
    import time

    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = "VANISHING", gateway.ae_title
    context = build_context(CTImageStorage, "1.2.840.10008.1.2.1")
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    primitive.user_information = [max_length]
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(primitive)
    with socket.create_connection(("127.0.0.1", gateway.dimse_port)) as sock:
        sock.sendall(rq.encode())
        assert sock.recv(1)[0] == 0x02, "expected A-ASSOCIATE-AC"
        time.sleep(0.2)
        sock.recv(65536)
        # a C-STORE-RQ command, then half a data set, then the connection drops
        sop = generate_uid()
        elements = [(0x0002, CTImageStorage), (0x0100, 1), (0x0110, 7), (0x0700, 0),
                    (0x0800, 0), (0x1000, sop)]
        command = b""
        for element, value in elements:
            raw = (struct.pack("<H", value) if isinstance(value, int)
                   else value.encode() + b"\0" * (len(value) % 2))
            command += struct.pack("<HHL", 0, element, len(raw)) + raw
        command = struct.pack("<HHLL", 0, 0, 4, len(command)) + command
        pdv = struct.pack(">LBB", len(command) + 2, 1, 0x03) + command
        sock.sendall(struct.pack(">BxL", 4, len(pdv)) + pdv)
        data = b"\x08\x00\x16\x00UI" + b"x" * 5000
        pdv = struct.pack(">LBB", len(data) + 2, 1, 0x00) + data
        sock.sendall(struct.pack(">BxL", 4, len(pdv)) + pdv)
        time.sleep(0.2)
    deadline = time.time() + 10
    while partial_receptions(gateway.data) and time.time() < deadline:
        time.sleep(0.1)
    assert partial_receptions(gateway.data) == []
    assert stored_path(gateway.data, sop) is None
    assert _send_raw(gateway, pydicom_file("CT_small.dcm")) == 0x0000


def test_pynetdicom_path_stores_too_when_the_lean_receiver_is_off(make_gateway: object,
                                                                   tmp_path: Path) -> None:
    gw = make_gateway(extra={"dimse": {"lean_upper_layer": False}}).start()  # type: ignore[operator]
    for syntax, path in list(sample_files(tmp_path).items())[:4]:
        assert _send_raw(gw, path) == 0x0000, syntax
        sop_uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        stored = stored_path(gw.data, sop_uid)
        assert stored is not None and dataset_bytes(stored) == dataset_bytes(path)


def test_receiver_processes_share_the_associations(make_gateway: object,
                                                   tmp_path: Path) -> None:
    """dimse.workers = 2: the main process hands associations to the least busy of itself and
    its receiver process; four parallel senders are spread over both, all their instances are
    stored and indexed in the one index, and SIGTERM stops every process."""
    require_dcmtk()
    gw = make_gateway(extra={"dimse": {"workers": 2}}).start()  # type: ignore[operator]
    files = fresh_copies(tmp_path, 40)
    senders = [subprocess.Popen(["storescu", "-aec", gw.ae_title, "127.0.0.1",
                                 str(gw.dimse_port), *map(str, files[n::4])], env=dcmtk_env())
               for n in range(4)]
    assert [sender.wait(60) for sender in senders] == [0, 0, 0, 0]
    for path in files:
        sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert stored_path(gw.data, sop) is not None and _index_has(gw, sop)
    accepted_by = {line.split()[3] for line in gw.log.splitlines()
                   if "association accepted from STORESCU" in line}
    assert accepted_by == {"MainProcess", "dimse-1"}
    assert gw.process is not None
    children = psutil.Process(gw.process.pid).children(recursive=True)
    assert children, "no receiver process was started"
    # A receiver process holds only the write path: no pixel or download libraries.
    from gateway.workers import NOT_IN_RECEIVERS

    for child in children:
        mapped = {Path(region.path).parts for region in child.memory_maps()}
        loaded = {name for name in NOT_IN_RECEIVERS for parts in mapped
                  if name.lower() in (part.lower() for part in parts)}
        assert not loaded, f"receiver process {child.pid} loaded {loaded}"
    assert gw.stop() == 0
    # multiprocessing's resource tracker, a child too, exits a moment after its parent
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], "a receiver process outlived the gateway"


def test_a_receiver_process_does_not_outlive_a_killed_gateway(make_gateway: object) -> None:
    """kill -9 of the main process: its receiver process notices (its control socket closes),
    aborts what it serves and exits; nothing is left holding the index."""
    import os
    import signal

    gw = make_gateway(extra={"dimse": {"workers": 2}}).start()  # type: ignore[operator]
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(CTImageStorage)
    held = [ae.associate("127.0.0.1", gw.dimse_port, ae_title=gw.ae_title) for _ in range(2)]
    assert all(assoc.is_established for assoc in held)
    assert gw.process is not None
    children = psutil.Process(gw.process.pid).children(recursive=True)
    assert children, "no receiver process was started"
    os.kill(gw.process.pid, signal.SIGKILL)
    gw.process.wait(10)
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], "a receiver process outlived its gateway"
    for assoc in held:
        assoc.abort()


@pytest.mark.parametrize("taken", ["dimse", "http"])
def test_a_taken_port_ends_the_gateway_with_its_setting_named_and_no_receiver_left(
        make_gateway: object, taken: str) -> None:
    """Receiver processes are launched first, before the main process listens: when a port
    turns out to be taken, the gateway exits 2 (configuration) with one line naming the
    setting, and no receiver process is left behind."""
    import socket
    import time

    started = time.time() - 1
    gw = make_gateway(extra={"dimse": {"workers": 2}})  # type: ignore[operator]
    port = gw.dimse_port if taken == "dimse" else gw.http_port
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        with pytest.raises(RuntimeError, match="exited with"):
            gw.start()
    assert gw.process is not None and gw.process.returncode == 2
    assert f"configuration error: {taken}.port: cannot listen on 127.0.0.1:{port}" in gw.log
    assert "Traceback" not in gw.log
    receivers = [p for p in psutil.process_iter(["cmdline", "create_time"])
                 if "gateway.workers" in " ".join(p.info["cmdline"] or ())
                 and p.info["create_time"] >= started]
    _gone, alive = psutil.wait_procs(receivers, timeout=10)
    assert alive == [], "a receiver process outlived a gateway that did not start"


def test_sigterm_lets_an_association_in_progress_finish(make_gateway: object,
                                                        tmp_path: Path) -> None:
    """SIGTERM stops new associations but drains the open ones: a sender in the middle of a
    study gets every instance acknowledged and stored, then the gateway exits 0."""
    import time

    require_dcmtk()
    gw = make_gateway().start()  # type: ignore[operator]
    files = fresh_copies(tmp_path, 40)
    # --repeat slows the sender down enough that the signal lands mid-association
    sender = subprocess.Popen(["storescu", "--repeat", "5", "-aec", gw.ae_title, "127.0.0.1",
                               str(gw.dimse_port), *map(str, files)], env=dcmtk_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not list(gw.data.glob("*/*/*.dcm")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gw.process is not None
    gw.process.send_signal(15)
    assert sender.wait(60) == 0, sender.stdout.read() if sender.stdout else ""
    assert gw.process.wait(60) == 0
    for path in files:
        sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert stored_path(gw.data, sop) is not None and _index_has(gw, sop)
    assert "draining" in gw.log


def test_sigterm_to_every_process_of_the_gateway_still_drains(make_gateway: object,
                                                              tmp_path: Path) -> None:
    """systemd (KillMode=control-group) and a terminal's Ctrl-C signal every process of the
    service at once, receiver processes included: they leave stopping to the main process, so
    associations in progress on each of them still finish, every instance stored."""
    import time

    require_dcmtk()
    gw = make_gateway(extra={"dimse": {"workers": 2}}).start()  # type: ignore[operator]
    files = fresh_copies(tmp_path, 40)
    senders = [subprocess.Popen(["storescu", "--repeat", "5", "-aec", gw.ae_title, "127.0.0.1",
                                 str(gw.dimse_port), *map(str, files[n::2])], env=dcmtk_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
               for n in range(2)]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and {
            line.split()[3] for line in gw.log.splitlines()
            if "association accepted from STORESCU" in line} != {"MainProcess", "dimse-1"}:
        time.sleep(0.01)
    assert gw.process is not None
    everyone = [psutil.Process(gw.process.pid)]
    everyone += everyone[0].children(recursive=True)
    assert len(everyone) >= 2
    for process in everyone:
        process.send_signal(15)
    for sender in senders:
        assert sender.wait(60) == 0, sender.stdout.read() if sender.stdout else ""
    assert gw.process.wait(60) == 0
    for path in files:
        sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert stored_path(gw.data, sop) is not None and _index_has(gw, sop)


def test_only_storage_associations_go_to_receiver_processes() -> None:
    """A receiver process loads only the write path: associations proposing anything besides
    Verification and Storage (query/retrieve, Storage Commitment) stay in the main process."""
    from pynetdicom import build_context
    from pynetdicom.pdu_primitives import A_ASSOCIATE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    from gateway import receiver

    def request(*sop_classes: str) -> A_ASSOCIATE:
        rq = A_ASSOCIATE()
        rq.presentation_context_definition_list = [build_context(uid) for uid in sop_classes]
        for number, context in enumerate(rq.presentation_context_definition_list):
            context.context_id = 2 * number + 1
        return rq

    assert receiver.storage_only(request(CTImageStorage, MRImageStorage, Verification))
    assert not receiver.storage_only(
        request(CTImageStorage, StudyRootQueryRetrieveInformationModelFind))
    assert not receiver.storage_only(request(CTImageStorage, "1.2.840.10008.1.20.1"))


def test_an_association_that_cannot_be_routed_is_closed_not_left_hanging() -> None:
    """If looking at the A-ASSOCIATE-RQ fails (say, the index is unreadable while checking a
    cohort's AE title), the requestor's connection is closed at once, not left unanswered."""
    import socket
    from types import SimpleNamespace

    from gateway.dimse import GatewayAssociationServer

    def failing_route(_sock: object, _address: object) -> bool:  # failure injection
        raise RuntimeError("injected routing failure")

    ours, theirs = socket.socketpair()
    GatewayAssociationServer._route(SimpleNamespace(route=failing_route),  # type: ignore[arg-type]
                                    ours, ("127.0.0.1", 1))
    theirs.settimeout(5)
    assert theirs.recv(10) == b""  # end of file: closed
    theirs.close()


def test_the_accept_loop_runs_no_full_garbage_collection(monkeypatch: object) -> None:
    """pynetdicom's accept loop runs a full ``gc.collect()`` every 60th turn; in a server's
    heap that held the GIL for up to 120 ms, stalling every association of the process. The
    gateway's listener leaves collection to the collector's own schedule."""
    import gc

    from gateway.dimse import GatewayAssociationServer

    collections: list[object] = []
    monkeypatch.setattr(gc, "collect",  # type: ignore[attr-defined]
                        lambda *args, **kwargs: collections.append(args) or 0)
    server = GatewayAssociationServer.__new__(GatewayAssociationServer)
    server._gc = [0, 59]  # what pynetdicom's __init__ sets
    for _ in range(200):
        server.service_actions()
    assert collections == []


def test_a_silent_peer_is_aborted_after_the_network_timeout(make_gateway: object) -> None:
    """PS3.8 9.1.5 (ARTIM, and the gateway's own dimse.network_timeout): an association on
    which the peer sends nothing is aborted, not held forever; the gateway goes on serving."""
    import time

    gw = make_gateway(extra={"dimse": {"network_timeout": 1}}).start()  # type: ignore[operator]
    ae = AE(ae_title="SILENT")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", gw.dimse_port, ae_title=gw.ae_title)
    assert assoc.is_established
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    waited = 10 - (deadline - time.monotonic())
    assert assoc.is_aborted, "the gateway kept a silent association open"
    assert 0.9 < waited < 8, f"aborted after {waited:.1f} s, network_timeout is 1 s"
    assert "no data for 1 s (network_timeout)" in gw.log
    assert _send_raw(gw, pydicom_file("CT_small.dcm")) == 0x0000
