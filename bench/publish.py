"""FHIR publishing: acknowledgement-to-readable latency, and studies/s against plain PUTs.

**Set-up**, once per invocation (:mod:`bench.fhir_peer`): sekmet-fhir 0.1.1 on loopback,
plain HTTP, no authentication, fresh data; seeded with one Patient per Patient ID
(``PATIENT_SYSTEM|<PatientID>``) and one ServiceRequest per accession number
(``ACCESSION_SYSTEM|<AccessionNumber>``) of every study sent, so the publisher finds the
subject and the order by identifier as on a site whose EMR registers patients and orders
first. The gateway runs ``patient_policy = "hold"`` (what such a site runs: the EMR owns
patient registration); every patient exists, so nothing is ever held.

**One run** (a fresh gateway directory, :class:`PublishGatewayTarget`):

1. *throughput*: ``imaging-gateway import`` of ``studies`` small studies (one MR series of a
   few 256x256 instances each) with the gateway stopped, then, once every study's quiet period
   has passed, the gateway is started with FHIR configured: the whole backlog is due at once
   (a migration, or a gateway coming back). The window runs from the gateway's log line saying
   the publisher started to its log line for the last study published (the publisher logs
   after the FHIR server acknowledged the write), both on the gateway's clock (ms). Every
   study is then checked on the FHIR server (one ImagingStudy, its numberOfInstances, subject
   and basedOn the seeded resources). The FHIR requests made in the window are counted from
   sekmet's access log.
2. *plain PUT*, the physical limit: the ImagingStudy resources the gateway wrote, read back,
   given new ids and identifiers, and written with ``PUT ImagingStudy/<id>`` by a trivial
   client (:class:`requests.Session`, keep-alive), once sequentially and once from
   ``publish.workers`` threads (one session each), then deleted.
3. *latency*: with the gateway still running, every study of the benchmark dataset in turn is
   sent with dcmtk ``storescu -v`` (one association, TCP_NODELAY=1); the time of the last
   C-STORE-RSP is when storescu logs it (read from its pipe). Then ``ImagingStudy?identifier=
   urn:dicom:uid|urn:oid:<uid>`` is polled every ``POLL_SECONDS`` on one keep-alive session
   until the answer holds the study with the right numberOfInstances; latency = arrival of that
   answer - last acknowledgement. Goal (issue 4): p95 <= quiet period + 2 s.
4. the gateway is stopped and every ImagingStudy it wrote is deleted, so the next run starts
   from the same state (the Endpoint and the seeded resources stay).
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import requests

from bench import sekmet
from bench.dataset import DatasetSpec, GeneratedDataset, StudyInfo, ensure_dataset
from bench.fhir_peer import ACCESSION_SYSTEM, PATIENT_SYSTEM, Fhir, Rate, copy_ids, put_copies
from bench.procmon import CpuTimeline, TreeMonitor
from bench.qrstats import Goal, LatencyRun, Summary, failures, latency_table, summarize_latency
from bench.report import Stat, fmt_stat, md_table
from bench.targets import HOST, GatewayTarget, RunningTarget, dcmtk_env

POLL_SECONDS = 0.02
"""Interval between two looks for a study's ImagingStudy (latency)."""
SLACK_SECONDS = 2.0
"""Issue 4: p95 latency at most the quiet period plus this."""
SENDER_AET = "BENCHSCU"
THROUGHPUT_SEED = 20250404
"""Seed of the small studies of the throughput phase (distinct from the main dataset's)."""
_LOG_TIME = re.compile(rb"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


@dataclass(frozen=True)
class PublishOptions:
    """What one invocation of the measure does."""

    runs: int
    quiet_seconds: float
    studies: int
    """studies published at once in the throughput phase."""
    instances_per_study: int = 3
    workers: int = 4
    """``publish.workers``: the publisher's concurrency, and the plain-PUT client's."""
    latency_studies: int | None = None
    """studies of the benchmark dataset sent one at a time in the latency phase (None: all)."""

    @property
    def latency_limit_s(self) -> float:
        """The latency goal: quiet period + :data:`SLACK_SECONDS`."""
        return self.quiet_seconds + SLACK_SECONDS


QUICK = PublishOptions(runs=2, quiet_seconds=1.0, studies=20, latency_studies=3)
FULL = PublishOptions(runs=3, quiet_seconds=2.0, studies=200)


@dataclass
class ThroughputRun:
    """One run's throughput figures (None until measured)."""

    run: int
    status: str = "failed"
    error: str | None = None
    gateway: Rate | None = None
    put_sequential: Rate | None = None
    put_parallel: Rate | None = None
    requests: dict[str, int] = field(default_factory=dict)
    """FHIR requests sekmet logged in the gateway's window, by ``METHOD Type[?|/id]``."""
    publish_ms: list[float] = field(default_factory=list)
    """each study's publish time as the gateway logged it (claim to acknowledged write)."""
    startup_overlap_s: float | None = None
    """how long the gateway went on starting (HTTP server) inside the window."""

    @property
    def ratio(self) -> float | None:
        """Gateway studies/s over the parallel plain PUTs' (same concurrency, same run)."""
        if self.gateway is None or self.put_parallel is None:
            return None
        return self.gateway.per_s / self.put_parallel.per_s

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        out = asdict(self)
        out.update(ratio=self.ratio, gateway=self.gateway and self.gateway.as_dict(),
                   put_sequential=self.put_sequential and self.put_sequential.as_dict(),
                   put_parallel=self.put_parallel and self.put_parallel.as_dict())
        return out


class PublishGatewayTarget(GatewayTarget):
    """The gateway publishing to ``fhir_base`` without authentication."""

    def __init__(self, fhir_base: str, opts: PublishOptions) -> None:
        self.extra_config = (
            "[fhir]\n"
            f'base_url = "{fhir_base}"\n'
            'auth = "none"\n'
            "[publish]\n"
            f"quiet_seconds = {opts.quiet_seconds}\n"
            f"workers = {opts.workers}\n"
            'patient_policy = "hold"\n'
            f'patient_system = "{PATIENT_SYSTEM}"\n'
            f'accession_system = "{ACCESSION_SYSTEM}"\n'
        )


# -- the gateway's log -----------------------------------------------------------------------------
def _log_time(line: bytes) -> float | None:
    """Epoch seconds of a gateway log line (its ``asctime``, local time, ms), or None."""
    match = _LOG_TIME.match(line)
    if match is None:
        return None
    return datetime.strptime(match.group(1).decode(), "%Y-%m-%d %H:%M:%S,%f").timestamp()


@dataclass
class PublishLog:
    """What the gateway logged about publishing: when the publisher started, each study."""

    started: float | None = None
    ready: float | None = None
    """log time of the gateway's ``imaging-gateway ready`` line (HTTP up, after the publisher)."""
    published: list[float] = field(default_factory=list)
    """log time of each ``study ... published`` line."""
    publish_ms: list[float] = field(default_factory=list)
    trouble: list[str] = field(default_factory=list)
    """lines saying a study was held, failed or waits for the FHIR server."""


def read_publish_log(path: Path) -> PublishLog:
    """Parse the gateway's ``server.log`` for the publisher's lines."""
    out = PublishLog()
    for line in path.read_bytes().splitlines():
        if b"publishing to FHIR server" in line:
            out.started = _log_time(line)
        elif b"imaging-gateway ready" in line:
            out.ready = _log_time(line)
        elif b" published (" in line and b"gateway.publisher" in line:
            stamp = _log_time(line)
            if stamp is not None:
                out.published.append(stamp)
            ms = re.search(rb" in (\d+) ms", line)
            if ms:
                out.publish_ms.append(float(ms.group(1)))
        elif b"gateway.publisher" in line and (b" held: " in line or b"dead letter" in line
                                                or b"FHIR unavailable" in line
                                                or b"loop error" in line):
            out.trouble.append(line.decode(errors="replace")[:300])
    return out


def wait_published(path: Path, count: int, timeout: float) -> PublishLog:
    """Read the log until ``count`` studies are published; raise on trouble or timeout."""
    deadline = time.monotonic() + timeout
    while True:
        seen = read_publish_log(path)
        if seen.trouble:
            raise RuntimeError(f"publisher trouble: {seen.trouble[0]}")
        if len(seen.published) >= count and seen.started is not None:
            return seen
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(seen.published)} of {count} studies published after "
                               f"{timeout:.0f} s")
        time.sleep(0.05)


# -- sending and polling ---------------------------------------------------------------------------
def send_study(ep_aet: str, port: int, files: Sequence[str], root: Path,
               timeout: float = 120.0) -> float:
    """Send ``files`` (relative to ``root``) on one association with ``storescu -v``.

    Returns the :func:`time.perf_counter` at which storescu logged the last C-STORE-RSP.
    Raises ``RuntimeError`` unless every file got a success response and storescu exited 0.
    """
    cmd = ["storescu", "-v", "-aet", SENDER_AET, "-aec", ep_aet, HOST, str(port), *files]
    proc = subprocess.Popen(cmd, cwd=root, env=dcmtk_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    last_ack, ok = 0.0, 0
    tail: deque[bytes] = deque(maxlen=4)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if b"Received Store Response" in line:
                last_ack = time.perf_counter()
                ok += b"(Success)" in line
            tail.append(line.strip())
        code = proc.wait()
    finally:
        watchdog.cancel()
    if code != 0 or ok != len(files):
        raise RuntimeError(f"storescu exit {code}, {ok}/{len(files)} successful responses: "
                           + " | ".join(t.decode(errors="replace") for t in tail))
    return last_ack


def wait_readable(fhir: Fhir, session: requests.Session, st: StudyInfo, instances: int,
                  timeout: float) -> tuple[float, dict[str, Any]]:
    """Poll until the study's ImagingStudy holds ``instances``; (arrival time, resource)."""
    deadline = time.perf_counter() + timeout
    while True:
        found = fhir.find_study(st.study_uid, session)
        now = time.perf_counter()
        if len(found) == 1 and found[0].get("numberOfInstances") == instances:
            return now, found[0]
        if len(found) > 1:
            raise RuntimeError(f"{len(found)} ImagingStudy resources for study {st.study_uid}")
        if now > deadline:
            raise RuntimeError(f"study {st.study_uid} not readable {timeout:.0f} s after its "
                               "last acknowledgement")
        time.sleep(POLL_SECONDS)


def _instances(st: StudyInfo) -> int:
    return sum(se.instances for se in st.series)


def _files(st: StudyInfo) -> list[str]:
    return [rel for se in st.series for rel in se.files]


# -- one run ---------------------------------------------------------------------------------------
def run_once(number: int, fhir: Fhir, small: GeneratedDataset, dataset: GeneratedDataset,
             opts: PublishOptions, workroot: Path) -> tuple[ThroughputRun, LatencyRun]:
    """Throughput, plain PUTs, then latency with one gateway (see the module docstring)."""
    thr = ThroughputRun(number)
    lat = LatencyRun("publish", "latency", "gateway", number, "failed", None,
                     len(dataset.studies))
    target = PublishGatewayTarget(fhir.base, opts)
    rt = RunningTarget(target, workroot)
    written: list[str] = []  # ImagingStudy ids to delete at the end
    try:
        published = _throughput(rt, target, fhir, small, opts, thr)
        written += [r["id"] for r in published]
        _plain_puts(fhir, published, number, opts, thr)
        thr.status = "ok"
        _latency(rt, fhir, dataset, opts, lat, written)
    except Exception as exc:  # the run failed: say why, with the gateway's last words
        error = f"{exc}\n--- gateway log tail ---\n{rt.log_tail()}"
        if thr.status != "ok" and thr.error is None:
            thr.error = error
        if lat.status != "ok" and lat.error is None:
            lat.error = error
    finally:
        rt.stop()
        rt.cleanup()
        _forget(fhir, small.studies + dataset.studies, written)
    return thr, lat


def _throughput(rt: RunningTarget, target: GatewayTarget, fhir: Fhir, small: GeneratedDataset,
                opts: PublishOptions, thr: ThroughputRun) -> list[dict[str, Any]]:
    """Import with the gateway stopped, start it, time the backlog; the resources written."""
    target.prepare(rt.ep)
    target.load(rt.ep, small.files, small.root / "files", rt.ep.workdir)
    time.sleep(opts.quiet_seconds + 0.1)  # every study due before the publisher starts
    offset = fhir.log_size()
    sekmet_pid = fhir.process.pid if fhir.process else None
    with CpuTimeline(lambda: sekmet_pid) as fhir_cpu, \
            CpuTimeline(lambda: rt.proc.pid if rt.proc else None) as gateway_cpu:
        rt.start()
        seen = wait_published(rt.log_path, len(small.studies), timeout=max(60.0, opts.studies))
    thr.requests = fhir.requests_since(offset)
    assert seen.started is not None
    end = max(seen.published)
    thr.gateway = Rate(len(small.studies), max(end - seen.started, 1e-3),
                       fhir_cpu.between(seen.started, end),
                       gateway_cpu.between(seen.started, end))
    thr.publish_ms = seen.publish_ms
    if seen.ready is not None:
        thr.startup_overlap_s = max(0.0, seen.ready - seen.started)
    published = []
    for st in small.studies:
        found = fhir.find_study(st.study_uid)
        if len(found) != 1:
            raise RuntimeError(f"{len(found)} ImagingStudy resources for study {st.study_uid}")
        problem = fhir.check(st, found[0], _instances(st))
        if problem:
            raise RuntimeError(f"study {st.study_uid}: {problem}")
        published.append(found[0])
    return published


def _plain_puts(fhir: Fhir, published: list[dict[str, Any]], number: int,
                opts: PublishOptions, thr: ThroughputRun) -> None:
    """The reference: the same resources PUT by a trivial client, then deleted again."""
    for tag, workers in ((f"{number}s", 1), (f"{number}p", opts.workers)):
        try:
            rate = put_copies(fhir, published, tag, workers)
        finally:
            fhir.delete(copy_ids(tag, len(published)))
        if workers == 1:
            thr.put_sequential = rate
        else:
            thr.put_parallel = rate


def _latency(rt: RunningTarget, fhir: Fhir, dataset: GeneratedDataset, opts: PublishOptions,
             lat: LatencyRun, written: list[str]) -> None:
    """Each study of ``dataset`` in turn: last acknowledgement to readable ImagingStudy."""
    samples = []
    root = dataset.root
    monitor = TreeMonitor(rt.pid)
    monitor.start()
    with requests.Session() as poller:
        for st in dataset.studies:
            acked = send_study(rt.ep.aet, rt.ep.dimse_port, _files(st), root)
            readable, resource = wait_readable(fhir, poller, st, _instances(st),
                                               timeout=opts.quiet_seconds + 60)
            written.append(resource["id"])
            problem = fhir.check(st, resource, _instances(st))
            if problem:
                raise RuntimeError(f"study {st.study_uid}: {problem}")
            samples.append((readable - acked) * 1000)
    lat.finish(samples, len(samples), monitor.stop().cpu_seconds)


def _forget(fhir: Fhir, studies: Sequence[StudyInfo], written: list[str]) -> None:
    """Delete what the run wrote, including anything written before a failure."""
    ids = set(written)
    for st in studies:
        try:
            ids.update(r["id"] for r in fhir.find_study(st.study_uid))
        except requests.RequestException:
            continue
    fhir.delete(sorted(ids))


# -- the measure -----------------------------------------------------------------------------------
def small_spec(opts: PublishOptions) -> DatasetSpec:
    """The throughput phase's studies: one MR series (256x256) of a few instances each."""
    return DatasetSpec(studies=opts.studies, series_per_study=1,
                       instances_per_series=opts.instances_per_study, mr_every=1,
                       seed=THROUGHPUT_SEED)


def _progress(thr: ThroughputRun, lat: LatencyRun) -> None:
    if thr.status == "ok" and thr.gateway and thr.put_parallel and thr.put_sequential:
        line = (f"gateway {thr.gateway.per_s:6.1f} studies/s; plain PUT "
                f"{thr.put_parallel.per_s:6.1f} parallel, {thr.put_sequential.per_s:6.1f} "
                "sequential")
    else:
        line = f"throughput FAILED {(thr.error or '').splitlines()[:1]}"
    if lat.status == "ok":
        line += f"; latency p50 {lat.p50_ms:6.0f} ms p95 {lat.p95_ms:6.0f} ms"
    else:
        line += f"; latency FAILED {(lat.error or '').splitlines()[:1]}"
    print(f"  run {lat.run} publish: {line}", file=sys.stderr, flush=True)


def run(dataset: GeneratedDataset, cache: Path, opts: PublishOptions, *,
        available: str | None = None,
        progress: Callable[[ThroughputRun, LatencyRun], None] = _progress,
        ) -> tuple[dict[str, Any], str]:
    """Start sekmet, seed it, do ``opts.runs`` runs; return (raw JSON, Markdown section).

    ``available`` is why the gateway cannot run (None: it can).
    """
    if available is None:
        available = sekmet.missing_reason()
    if available is not None:
        return {"error": available}, f"## FHIR publishing\n\nNot measured: {available}.\n"
    small = ensure_dataset(small_spec(opts), cache)
    dataset = replace(dataset, studies=dataset.studies[:opts.latency_studies])
    workroot = cache / "runs"
    workroot.mkdir(parents=True, exist_ok=True)
    throughput: list[ThroughputRun] = []
    latency: list[LatencyRun] = []
    root = Path(tempfile.mkdtemp(prefix="sekmet-", dir=workroot))
    print(f"publish: sekmet on loopback, {opts.studies} small studies for throughput, "
          f"{len(dataset.studies)} for latency, quiet {opts.quiet_seconds:g} s ...",
          file=sys.stderr, flush=True)
    with Fhir(root) as fhir:
        fhir.seed([*small.studies, *dataset.studies])
        for number in range(1, opts.runs + 1):
            thr, lat = run_once(number, fhir, small, dataset, opts, workroot)
            throughput.append(thr)
            latency.append(lat)
            progress(thr, lat)
    shutil.rmtree(root, ignore_errors=True)
    goal = Goal("p95_below", opts.latency_limit_s * 1000)
    summaries = summarize_latency(latency, goal)
    raw = {"options": asdict(opts), "sekmet": sekmet.version(),
           "small_dataset": small.describe(), "latency_dataset": dataset.describe(),
           "latency": {"runs": [r.as_dict() for r in latency],
                       "summary": [s.as_dict() for s in summaries]},
           "throughput": {"runs": [r.as_dict() for r in throughput],
                          "summary": _as_json(throughput_summary(throughput))}}
    return raw, render_markdown(summaries, throughput, opts, small, dataset)


def _rate_stats(runs: Sequence[ThroughputRun],
                pick: Callable[[ThroughputRun], Rate | None]) -> dict[str, Stat | None]:
    """studies/s and CPU ms per study of both sides for one writer, over the ok runs."""
    rates = [rate for r in runs if r.status == "ok" and (rate := pick(r)) is not None]
    return {
        "per_s": Stat.of([rate.per_s for rate in rates]),
        "fhir_cpu_ms": Stat.of([rate.fhir_cpu_s * 1000 / rate.studies for rate in rates
                                if rate.fhir_cpu_s is not None]),
        "client_cpu_ms": Stat.of([rate.client_cpu_s * 1000 / rate.studies for rate in rates
                                  if rate.client_cpu_s is not None]),
    }


def _ratio_stat(runs: Sequence[ThroughputRun],
                pick: Callable[[ThroughputRun], Rate | None]) -> Stat | None:
    """Gateway studies/s over the reference's, run by run."""
    return Stat.of([r.gateway.per_s / ref.per_s for r in runs
                    if r.status == "ok" and r.gateway and (ref := pick(r)) is not None])


WRITERS: dict[str, Callable[[ThroughputRun], Rate | None]] = {
    "gateway": lambda r: r.gateway,
    "put_parallel": lambda r: r.put_parallel,
    "put_sequential": lambda r: r.put_sequential,
}


def throughput_summary(runs: Sequence[ThroughputRun]) -> dict[str, Any]:
    """Per writer: studies/s, CPU ms / study of both sides, ratio of the gateway to it."""
    ok = [r for r in runs if r.status == "ok" and r.gateway]
    out: dict[str, Any] = {
        name: {**_rate_stats(runs, pick), "gateway_ratio": _ratio_stat(runs, pick)}
        for name, pick in WRITERS.items()}
    out["requests_per_study"] = Stat.of([sum(r.requests.values()) / r.gateway.studies
                                         for r in ok if r.gateway])
    out["publish_ms"] = Stat.of([statistics.median(r.publish_ms) for r in ok if r.publish_ms])
    out["startup_overlap_ms"] = Stat.of([r.startup_overlap_s * 1000 for r in ok
                                         if r.startup_overlap_s is not None])
    return out


def _as_json(value: Any) -> Any:
    if isinstance(value, Stat):
        return value.as_dict()
    if isinstance(value, dict):
        return {k: _as_json(v) for k, v in value.items()}
    return value


# -- the report ------------------------------------------------------------------------------------
_REQUEST_MEANING = {
    "GET Patient?": "subject by identifier",
    "GET ServiceRequest?": "order by accession number",
    "GET ImagingStudy?": "existing ImagingStudy by Study Instance UID",
    "POST ImagingStudy": "conditional create (`If-None-Exist`)",
    "PUT ImagingStudy/id": "update with `If-Match`",
    "POST Endpoint": "the gateway's Endpoint, conditional create (once per gateway start)",
    "GET Endpoint?": "the Endpoint found again (once)",
    "GET metadata": "capabilities",
}


def _request_rows(runs: Sequence[ThroughputRun]) -> list[list[str]]:
    """Requests by kind: what it is for, in the window and per study (median over runs)."""
    ok = [(r, r.gateway.studies) for r in runs if r.status == "ok" and r.gateway]
    rows = []
    for kind in sorted({k for r, _n in ok for k in r.requests}):
        total = Stat.of([float(r.requests.get(kind, 0)) for r, _n in ok])
        per = Stat.of([r.requests.get(kind, 0) / n for r, n in ok])
        rows.append([f"`{kind}`", _REQUEST_MEANING.get(kind, ""), fmt_stat(total),
                     fmt_stat(per, 2)])
    return rows


def _throughput_table(runs: Sequence[ThroughputRun], workers: int) -> str:
    summary = throughput_summary(runs)
    ok = sum(r.status == "ok" for r in runs)
    runs_cell = f"{ok}/{len(runs)}" if ok == len(runs) else f"**{ok}/{len(runs)}**"
    labels = {"gateway": f"gateway publisher ({workers} workers)",
              "put_parallel": f"plain PUT, {workers} threads (reference)",
              "put_sequential": "plain PUT, sequential"}
    rows = []
    for name, label in labels.items():
        stats = summary[name]
        ratio = "-" if name == "gateway" else fmt_stat(stats["gateway_ratio"], 2)
        rows.append([label, fmt_stat(stats["per_s"], 1), ratio,
                     fmt_stat(stats["fhir_cpu_ms"], 1), fmt_stat(stats["client_cpu_ms"], 1),
                     runs_cell])
    return md_table(["writer", "studies/s", "ratio gateway / this (same run)",
                     "FHIR server CPU ms / study", "writer CPU ms / study", "runs ok"], rows)


def render_markdown(summaries: list[Summary], throughput: Sequence[ThroughputRun],
                    opts: PublishOptions, small: GeneratedDataset,
                    dataset: GeneratedDataset) -> str:
    """The FHIR publishing section: latency, throughput against plain PUTs, requests."""
    summary = throughput_summary(throughput)
    label = (f"last C-STORE-RSP → ImagingStudy readable ({len(dataset.studies)} studies of "
             f"{dataset.spec.series_per_study * dataset.spec.instances_per_series} instances, "
             "one at a time)")
    quiet_ms = opts.quiet_seconds * 1000
    lat = summaries[0] if summaries else None
    above = (f"Above the quiet period: p50 +{lat.main.median - quiet_ms:.0f} ms, p95 "
             f"+{lat.second.median - quiet_ms:.0f} ms (median over runs); the publisher "
             "looks for due studies every quiet period / 4 (at most 1 s), which bounds the "
             "wait after the quiet period. " if lat and lat.main and lat.second else "")
    parts = [
        "## FHIR publishing",
        "",
        f"FHIR server: sekmet-fhir {sekmet.version() or '?'} on loopback (plain HTTP, no "
        "authentication, SQLite), seeded with a Patient per Patient ID and a ServiceRequest "
        "per accession number. Gateway: `[fhir] auth = \"none\"`, `[publish] quiet_seconds = "
        f"{opts.quiet_seconds:g}`, `workers = {opts.workers}`, `patient_policy = \"hold\"` "
        "(the EMR registers patients; all are known, so nothing is held). "
        f"{opts.runs} run(s), each on a fresh gateway; median (min-max) over runs.",
        "",
        "### Latency",
        "",
        "Each study sent alone with `storescu` (one association); from the last C-STORE-RSP "
        "(when storescu logs it) to the arrival of the first answer to "
        "`ImagingStudy?identifier=urn:dicom:uid|urn:oid:<uid>` (polled every "
        f"{POLL_SECONDS * 1000:.0f} ms) holding the study with every instance. Per run the "
        "p50 and p95 over the studies; server CPU = the gateway's per study (receiving, "
        f"storing and publishing it). Goal (issue 4): p95 ≤ quiet period + {SLACK_SECONDS:g} s "
        f"= {opts.latency_limit_s * 1000:.0f} ms.",
        "",
        latency_table(summaries, {"latency": label}, ratio=False, first="measure"),
        "",
        above + "Raw per-study figures in the JSON.",
        "",
        "### Throughput",
        "",
        f"{opts.studies} studies ({small.describe()}) imported with the gateway stopped, "
        "then the gateway started with all of them due: from its log line announcing the "
        "publisher to its log line for the last study published (both after the FHIR server "
        "acknowledged). Every ImagingStudy is then checked (one per study, numberOfInstances, "
        "subject and basedOn the seeded resources). Reference in the same run: the resources "
        "the gateway wrote, under new ids, `PUT ImagingStudy/<id>` by a trivial keep-alive "
        f"client, sequentially and from {opts.workers} threads (the publisher's "
        "concurrency): the physical limit of one write per study. CPU: sekmet's and the "
        "writer's (the gateway's process tree, or the harness) in the same window; both "
        "share the machine's cores. The gateway's start-up goes on inside the window for "
        f"{fmt_stat(summary['startup_overlap_ms'])} ms (its HTTP server starts after the "
        "publisher), as on any restart with a backlog. Issue 4 sets no number for "
        "throughput.",
        "",
        _throughput_table(throughput, opts.workers),
        "",
        "What the publisher asks of the FHIR server in the throughput window (sekmet's "
        f"access log): {fmt_stat(summary['requests_per_study'], 1)} requests per study, "
        "against 1 for a plain PUT. Each study took "
        f"{fmt_stat(summary['publish_ms'])} ms from claim to acknowledged write (median "
        "of the gateway's log, per run).",
        "",
        md_table(["request", "what for", "in the window", "per study"],
                 _request_rows(throughput)),
    ]
    lines = failures(summaries) + [
        f"- throughput, run {r.run}: {(r.error or '').strip().splitlines()[0][:300]}"
        for r in throughput if r.status != "ok"]
    if lines:
        parts += ["", "Failed runs:", "", *lines]
    return "\n".join(parts) + "\n"
