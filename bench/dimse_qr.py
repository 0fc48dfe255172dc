"""DIMSE query/retrieve: C-FIND latency, C-MOVE and C-GET throughput.

* **C-FIND** (latency): pynetdicom 3.0 SCU on one persistent association (Study Root, STUDY
  level, ``PatientID`` = one patient, cycling; the usual study-list return keys). Latency from
  sending the request to the final response; each answer must hold the patient's studies.
* **C-MOVE** (throughput): pynetdicom SCU on one association per run, moving whole patients
  (Patient Root, PATIENT level) to ``BENCHDEST`` (dcmtk ``storescp --ignore``, see
  :mod:`bench.archive`); timed from the request to the final response, which must report
  every instance completed and none failed. The SCU only reads small pending responses, so a
  Python client does not limit the figure.
* **C-GET** (throughput): dcmtk ``getscu --ignore`` (128 KiB PDUs), since the receiving side
  must keep up with the archive (a pynetdicom receiver would cap it near 100 inst/s). One
  process and association per run fetches one whole patient ``retrieves`` times
  (``--repeat``; getscu 3.6.7 crashes when given several query files), timed from launch to
  exit: the tool's start-up and association set-up (an ``echoscu`` process is recorded
  beside the figures for scale) are paid once per run. Checked by exit status and one C-STORE
  response per instance received.

Both SCUs run with ``TCP_NODELAY`` (pynetdicom's client sockets: set after association;
dcmtk: ``TCP_NODELAY=1``), so no request waits on a delayed ACK.

pynetdicom 3.0.4 pauses an association's reactor thread around each ``send_*()`` with an
``Event`` that is set and, for the next request, cleared again at once; ``Event.wait()``
returns as soon as it is notified, even if the flag was cleared meanwhile, so the reactor can
run on and take the peer's next response off the queue ("Received unexpected C-FIND service
message"): the request then sees too few responses or waits for its DIMSE timeout. The
harness's SCU associations use :class:`_Checkpoint`, whose ``wait()`` re-checks the flag.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
)

from bench.archive import DEST_AET, MAX_PDU, LoadedTarget
from bench.dataset import GeneratedDataset
from bench.procmon import TreeMonitor
from bench.qrstats import (
    Goal,
    LatencyRun,
    Summary,
    ThroughputRun,
    failures,
    latency_table,
    throughput_table,
)
from bench.targets import HOST, dcmtk_env

SCU_AET = "BENCHSCU"
WARMUP = 3
FIND_GOAL = Goal("vs_reference")
_PENDING = (0xFF00, 0xFF01)


@dataclass(frozen=True)
class Patient:
    """A patient of the dataset with what retrieving it must deliver."""

    patient_id: str
    studies: int
    instances: int
    bytes: int


def patients(dataset: GeneratedDataset) -> list[Patient]:
    """Every patient in order of first appearance, with study and instance counts."""
    sizes = {path: path.stat().st_size for path in dataset.files}
    found: dict[str, list[int]] = {}
    for st in dataset.studies:
        entry = found.setdefault(st.patient_id, [0, 0, 0])
        entry[0] += 1
        for se in st.series:
            entry[1] += se.instances
            entry[2] += sum(sizes[dataset.root / rel] for rel in se.files)
    return [Patient(pid, *counts) for pid, counts in found.items()]


class _Checkpoint(threading.Event):
    """An Event whose ``wait()`` returns only once the flag is really set (see module doc)."""

    def wait(self, timeout: float | None = None) -> bool:
        while not self.is_set():
            super().wait(timeout)
            if timeout is not None:
                return self.is_set()
        return True


@contextmanager
def association(loaded: LoadedTarget, context: Any) -> Iterator[Association]:
    """One pynetdicom association to the target for ``context``, TCP_NODELAY on its socket."""
    assert loaded.running is not None
    ae = AE(ae_title=SCU_AET)
    ae.add_requested_context(context)
    ae.network_timeout = ae.dimse_timeout = ae.acse_timeout = 120
    assoc = ae.associate(HOST, loaded.running.ep.dimse_port, ae_title=loaded.target.aet)
    if not assoc.is_established:
        raise ConnectionError(f"association with {loaded.target.aet} not established")
    sock = assoc.dul.socket.socket if assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    checkpoint = _Checkpoint()
    checkpoint.set()
    assoc._reactor_checkpoint = checkpoint  # the reactor reads the attribute on every turn
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def _find_identifier(patient_id: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = patient_id
    for keyword in ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
                    "StudyDescription", "ModalitiesInStudy", "PatientName",
                    "NumberOfStudyRelatedInstances"):
        setattr(ds, keyword, "")
    return ds


def _one_find(assoc: Association, patient: Patient) -> tuple[float, int]:
    """(seconds, matches) of one C-FIND; raises ``ValueError`` on a failure or a wrong count."""
    t0 = time.perf_counter()
    matches = 0
    final = None
    for status, _identifier in assoc.send_c_find(_find_identifier(patient.patient_id),
                                                  StudyRootQueryRetrieveInformationModelFind):
        if not status:
            raise ValueError("no C-FIND response (timeout or abort)")
        if status.Status in _PENDING:
            matches += 1
        else:
            final = int(status.Status)
    seconds = time.perf_counter() - t0
    if final != 0:
        raise ValueError(f"C-FIND final status {final}")
    if matches != patient.studies:
        raise ValueError(f"C-FIND for {patient.patient_id}: {matches} matches, expected "
                         f"{patient.studies}")
    return seconds, matches


def run_cfind(loaded: LoadedTarget, dataset: GeneratedDataset, run: int,
              requests: int) -> LatencyRun:
    """``requests`` C-FINDs (after :data:`WARMUP`) on one association against one target."""
    assert loaded.running is not None
    everyone = patients(dataset)
    result = LatencyRun("cfind", "study_by_patient", loaded.target.name, run, "failed", None,
                        requests)
    mon: TreeMonitor | None = None
    try:
        with association(loaded, StudyRootQueryRetrieveInformationModelFind) as assoc:
            for i in range(WARMUP):
                _one_find(assoc, everyone[i % len(everyone)])
            samples, total = [], 0
            mon = TreeMonitor(loaded.running.pid)
            mon.start()
            for i in range(requests):
                seconds, matches = _one_find(assoc, everyone[(i + run) % len(everyone)])
                samples.append(seconds * 1000)
                total += matches
            result.finish(samples, total, mon.stop().cpu_seconds)
    except Exception as exc:
        result.error = repr(exc)
        if mon is not None:
            mon.stop()
    return result


def _move_identifier(patient_id: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "PATIENT"
    ds.PatientID = patient_id
    return ds


def _one_move(assoc: Association, patient: Patient) -> float:
    """Seconds of one C-MOVE of a whole patient; ``ValueError`` unless all sub-ops completed."""
    t0 = time.perf_counter()
    final: Dataset | None = None
    for status, _identifier in assoc.send_c_move(_move_identifier(patient.patient_id), DEST_AET,
                                                  PatientRootQueryRetrieveInformationModelMove):
        if not status:
            raise ValueError("no C-MOVE response (timeout or abort)")
        if status.Status not in _PENDING:
            final = status
    seconds = time.perf_counter() - t0
    if final is None or final.Status != 0:
        code = None if final is None else f"0x{int(final.Status):04X}"
        raise ValueError(f"C-MOVE of {patient.patient_id}: final status {code} after "
                         f"{seconds:.1f} s")
    completed = final.get("NumberOfCompletedSuboperations")
    failed = final.get("NumberOfFailedSuboperations")
    if (completed is not None and int(completed) != patient.instances) or failed:
        raise ValueError(f"C-MOVE of {patient.patient_id}: {completed} completed, {failed} "
                         f"failed, expected {patient.instances}")
    return seconds


def run_cmove(loaded: LoadedTarget, dataset: GeneratedDataset, run: int,
              retrieves: int) -> ThroughputRun:
    """One run: move the first ``retrieves`` patients to the destination, one association."""
    assert loaded.running is not None
    chosen = patients(dataset)[:max(1, retrieves)]
    result = ThroughputRun("cmove", "patient", loaded.target.name, run, "failed", None,
                           len(chosen))
    mon: TreeMonitor | None = None
    try:
        with association(loaded, PatientRootQueryRetrieveInformationModelMove) as assoc:
            mon = TreeMonitor(loaded.running.pid)
            mon.start()
            seconds = [_one_move(assoc, p) for p in chosen]
            result.finish(seconds, sum(p.instances for p in chosen),
                          sum(p.bytes for p in chosen), mon.stop().cpu_seconds)
    except Exception as exc:
        result.error = repr(exc)
        if mon is not None:
            mon.stop()
    return result


def _get_repeated(loaded: LoadedTarget, patient: Patient, repeat: int) -> float:
    """Seconds of one getscu process fetching a whole patient ``repeat`` times on one
    association; ``ValueError`` unless every instance arrived every time."""
    assert loaded.running is not None
    cmd = ["getscu", "-v", "-P", "-aet", SCU_AET, "-aec", loaded.target.aet, "--ignore",
           "-pdu", str(MAX_PDU), "--repeat", str(repeat), "-k", "QueryRetrieveLevel=PATIENT",
           "-k", f"PatientID={patient.patient_id}", HOST, str(loaded.running.ep.dimse_port)]
    expected = patient.instances * repeat
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=dcmtk_env(), capture_output=True, text=True,
                          timeout=max(120, expected), cwd=loaded.running.ep.workdir)
    seconds = time.perf_counter() - t0
    output = done.stdout + done.stderr
    received = output.count("Sending C-STORE Response (Success)")
    if done.returncode != 0 or received != expected:
        tail = " | ".join(output.splitlines()[-3:])
        raise ValueError(f"getscu for {patient.patient_id} x{repeat}: exit {done.returncode}, "
                         f"{received} of {expected} instances: {tail}")
    return seconds


def echo_seconds(loaded: LoadedTarget) -> float | None:
    """Wall time of one dcmtk ``echoscu`` process against the target (start-up + association)."""
    assert loaded.running is not None
    t0 = time.perf_counter()
    done = subprocess.run(["echoscu", "-aec", loaded.target.aet, HOST,
                           str(loaded.running.ep.dimse_port)], env=dcmtk_env(),
                          capture_output=True)
    return time.perf_counter() - t0 if done.returncode == 0 else None


def run_cget(loaded: LoadedTarget, dataset: GeneratedDataset, run: int,
             retrieves: int) -> ThroughputRun:
    """One run: one ``getscu`` process C-GETs one patient ``retrieves`` times (the patient
    changes from run to run)."""
    assert loaded.running is not None
    everyone = patients(dataset)
    patient = everyone[(run - 1) % len(everyone)]
    repeat = max(1, retrieves)
    result = ThroughputRun("cget", "patient", loaded.target.name, run, "failed", None, repeat)
    mon: TreeMonitor | None = None
    try:
        mon = TreeMonitor(loaded.running.pid)
        mon.start()
        seconds = _get_repeated(loaded, patient, repeat)
        result.finish([seconds], patient.instances * repeat, patient.bytes * repeat,
                      mon.stop().cpu_seconds)
    except Exception as exc:
        result.error = repr(exc)
        if mon is not None:
            mon.stop()
    return result


def render_cfind(summaries: list[Summary], requests: int, runs: int) -> str:
    """The C-FIND section."""
    parts = [
        "## C-FIND latency",
        "",
        f"pynetdicom 3.0 SCU, one persistent association per run (TCP_NODELAY), Study Root, "
        f"STUDY level, `PatientID=<id>` cycling over the patients, 8 return keys; "
        f"{requests} requests per run (after {WARMUP} unmeasured), {runs} run(s); latency "
        "from the request to the final response, p50/p95 per run, median (min-max) over runs. "
        "The stock pynetdicom SCU polls its queues every 1 ms, which adds up to about a "
        "millisecond to both archives alike. Goal (by analogy with QIDO-RS): "
        f"{FIND_GOAL.describe()}.",
        "",
        latency_table(summaries, {"study_by_patient": "study by `PatientID`"}),
    ]
    lines = failures(summaries)
    if lines:
        parts += ["", "Failed runs:", "", *lines]
    return "\n".join(parts) + "\n"


def render_retrieve(measure: str, summaries: list[Summary], dataset: GeneratedDataset,
                    retrieves: int, runs: int, echo_ms: dict[str, float]) -> str:
    """The C-MOVE or C-GET section."""
    chosen = patients(dataset)[:max(1, retrieves)]
    instances = sum(p.instances for p in chosen)
    per = instances // len(chosen)
    if measure == "cmove":
        head = ["## C-MOVE", "",
                f"pynetdicom 3.0 SCU, one association per run, Patient Root, {len(chosen)} "
                f"whole patients (≈{per} instances each, {instances} in all) per run moved "
                f"to `{DEST_AET}` (dcmtk `storescp --ignore`, 128 KiB max PDU, configured "
                "on both archives); each move timed from the request to the final response, "
                "which must report every sub-operation completed. inst/s over the summed move "
                f"times, {runs} run(s), median (min-max). Goal: at least Orthanc's throughput."]
    else:
        overhead = ", ".join(f"{name} {ms:.0f} ms" for name, ms in echo_ms.items())
        head = ["## C-GET", "",
                f"dcmtk `getscu --ignore` (TCP_NODELAY=1, 128 KiB max PDU): per run one "
                f"process and association fetching one whole patient (≈{per} instances; "
                f"another patient each run) {max(1, retrieves)} times (`--repeat`), timed from "
                f"launch to exit (start-up and association set-up included once; a whole "
                f"`echoscu` process took {overhead or 'n/a'}); it must exit 0 with one "
                "C-STORE per instance. inst/s over that time, "
                f"{runs} run(s), median (min-max). Goal: at least Orthanc's throughput."]
    parts = [*head, "", throughput_table(summaries)]
    lines = failures(summaries)
    if lines:
        parts += ["", "Failed runs:", "", *lines]
    return "\n".join(parts) + "\n"
