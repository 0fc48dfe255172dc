"""C-STORE ingest: dcmtk ``storescu`` pushes the whole dataset into a freshly started target.

One run = start the target on an empty directory, start ``assocs`` storescu processes at
once (the file list cut into that many contiguous parts, one association each, TCP_NODELAY=1),
wait for them, check that every instance was stored, stop the target, delete its files.

Figures of one run (all over the same window, see :class:`IngestRun`):

* ``elapsed_s``: from launching the senders to the later of (a) the last sender's exit and
  (b) the start of the first count that found every instance stored (targets that store
  asynchronously pay for their backlog here);
* ``inst_per_s`` = instances / elapsed_s; ``mb_per_s`` = bytes of the sent files / elapsed_s
  / 10^6 (decimal MB, file sizes as on disk including the Part-10 header);
* ``server_cpu_s``: user+system CPU seconds of the target's whole process tree in the window;
* ``server_peak_rss_mb``: max over ~50 ms samples of the summed RSS of the tree, in MB (10^6);
* ``client_cpu_s``: user+system CPU seconds of the storescu processes (they share the 2 cores).

A run whose senders did not all exit 0, or whose target holds fewer instances than were sent
after ``SETTLE_TIMEOUT`` seconds, is ``failed`` and carries no figures.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import targets as targets_mod
from bench.dataset import GeneratedDataset, split
from bench.procmon import TreeMonitor, machine_busy_seconds, own_cpu_seconds
from bench.report import Stat, fmt_stat, md_table
from bench.targets import (
    HOST,
    RunningTarget,
    Target,
    TargetStartError,
    count_part10_files,
    dcmtk_env,
)

SETTLE_TIMEOUT = 30.0
"""Seconds to wait, after the senders finish, for the target to hold every instance."""

SENDER_AET = "BENCHSCU"


@dataclass
class IngestRun:
    """One ingest run of one target at one parallelism. Figures are None unless status is ok."""

    target: str
    assocs: int
    run: int
    status: str
    """"ok" or "failed"."""
    error: str | None
    instances: int
    """instances sent."""
    bytes: int
    """bytes of the files sent (decimal MB = bytes / 10^6)."""
    verified_by: str
    stored: int | None = None
    """instances the target held at the end (None when it cannot be told)."""
    elapsed_s: float | None = None
    send_s: float | None = None
    """from launching the senders to the last one's exit."""
    settle_s: float | None = None
    """elapsed_s - send_s: how long the target needed after the senders finished."""
    inst_per_s: float | None = None
    mb_per_s: float | None = None
    server_cpu_s: float | None = None
    server_peak_rss_mb: float | None = None
    server_max_procs: int | None = None
    client_cpu_s: float | None = None
    other_cpu_s: float | None = None
    """CPU seconds the rest of the machine (not target, senders or harness) used in the window:
    a measure of disturbance; compare it to elapsed_s x cores."""
    startup_s: float | None = None
    """how long the target took to answer after launch (not part of elapsed_s)."""

    def succeeded(self, elapsed: float, send_s: float, server_cpu_s: float) -> None:
        """Mark the run ok with the figures every target has (RSS and the rest are the
        caller's)."""
        self.status = "ok"
        self.elapsed_s, self.send_s, self.settle_s = elapsed, send_s, elapsed - send_s
        self.inst_per_s = self.instances / elapsed
        self.mb_per_s = self.bytes / elapsed / 1e6
        self.server_cpu_s = server_cpu_s

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _children_cpu() -> float:
    """user+system CPU seconds of this process's reaped children so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _sender_timeout(instances: int) -> float:
    """Generous upper bound for one send (even at 5 instances/s), so a hung target ends."""
    return max(120.0, instances / 5.0)


def _launch_senders(rt: RunningTarget, dataset: GeneratedDataset, assocs: int,
                    logdir: Path) -> list[tuple[subprocess.Popen[bytes], Path]]:
    """Start one storescu per part of the file list, all at once; return (process, log)."""
    senders = []
    for i, part in enumerate(split(dataset.files, assocs)):
        log = logdir / f"storescu-{i}.log"
        cmd = [
            "storescu", "-aet", SENDER_AET, "-aec", rt.ep.aet, HOST, str(rt.ep.dimse_port),
            *(str(p.relative_to(dataset.root)) for p in part),
        ]
        with open(log, "wb") as fh:
            proc = subprocess.Popen(cmd, cwd=dataset.root, env=dcmtk_env(),
                                    stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT)
        senders.append((proc, log))
    return senders


def _wait_senders(senders: list[tuple[subprocess.Popen[bytes], Path]],
                  timeout: float) -> list[str]:
    """Wait for every sender; return one error line per sender that failed or timed out."""
    errors = []
    deadline = time.perf_counter() + timeout
    for i, (proc, log) in enumerate(senders):
        try:
            code = proc.wait(timeout=max(0.1, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        if code != 0:
            tail = " | ".join(log.read_text(errors="replace").splitlines()[-3:])
            what = "timed out" if code is None else f"exit {code}"
            errors.append(f"storescu #{i} {what}: {tail}")
    return errors


def _settle(target: Target, rt: RunningTarget, expected: int,
            t_sent: float) -> tuple[int | None, float]:
    """Poll the target's stored count until it reaches ``expected`` or SETTLE_TIMEOUT passes.

    Returns (last count, time at which the successful count started — or now on timeout).
    """
    while True:
        t_count = time.perf_counter()
        stored = target.stored_count(rt.ep)
        if stored is None or stored >= expected:
            return stored, max(t_count, t_sent)
        if t_count - t_sent > SETTLE_TIMEOUT:
            return stored, t_count
        time.sleep(0.05)


KEEP_RUNS: bool | None = None
"""Keep every run's files until all ingest runs are done instead of deleting them before the
next run: True (``--keep-runs``), False (``--no-keep-runs``), None (default: keep them when
the disk has room for every run). On ext4 without a journal (this project's benchmark
machine) a new file is slow to create for a minute after many files near it were deleted
(the allocator skips recently freed inodes: 0.3 to 1.4 ms of system time per file instead of
~0.05 ms), so deleting between runs makes every run pay for the previous one's deletion, and
a target that creates a file per instance on its critical path (storescp, Orthanc) most."""
KEPT_RUNS = False
"""Whether the last :func:`run_all` kept its runs' files (for the report)."""
ROOM_MARGIN = 5 * 10**9
"""Free bytes left over when runs are kept (default mode)."""


def run_once(target: Target, dataset: GeneratedDataset, assocs: int, run: int,
             workroot: Path, kept: list[RunningTarget] | None = None) -> IngestRun:
    """Start ``target`` fresh, ingest the whole dataset over ``assocs`` associations, stop it."""
    result = IngestRun(target=target.name, assocs=assocs, run=run, status="failed", error=None,
                       instances=dataset.instances, bytes=dataset.total_bytes,
                       verified_by=target.verification())
    rt = RunningTarget(target, workroot)
    if target.in_process:
        _measure_in_process(rt, dataset, assocs, result)
        _keep_or_clean(rt, kept)
        return result
    try:
        rt.start()
    except TargetStartError as exc:
        rt.cleanup()
        result.error = str(exc)
        return result
    try:
        _measure(target, rt, dataset, assocs, result)
    except Exception as exc:  # e.g. the target died and cannot be counted: the run failed
        result.status = "failed"
        result.error = f"measurement aborted: {exc!r}"
    finally:
        rt.stop()
        if result.status == "failed" and result.error:
            result.error += f"\n--- server log tail ---\n{rt.log_tail()}"
        _keep_or_clean(rt, kept)
    return result


def _keep_or_clean(rt: RunningTarget, kept: list[RunningTarget] | None) -> None:
    """A finished run's files: deleted now, or kept until every run is done."""
    if kept is None:
        rt.cleanup()
    else:
        rt.sync()
        kept.append(rt)


WRITE_STEP = 128 * 1024
"""Bytes per write() in :func:`write_durably` (a PDV of the gateway's receive path)."""


def write_durably(files: list[Path], folder: Path) -> None:
    """Each file's bytes into a new file under ``folder``, fsync'd before the next (what a
    receiver must do at the least before acknowledging an instance)."""
    folder.mkdir(parents=True, exist_ok=True)
    for number, source in enumerate(files):
        data = memoryview(source.read_bytes())
        fd = os.open(folder / f"{number}.dcm", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:written + WRITE_STEP])
            os.fsync(fd)
        finally:
            os.close(fd)


def _measure_in_process(rt: RunningTarget, dataset: GeneratedDataset, assocs: int,
                        result: IngestRun) -> None:
    """The fsync floor: :func:`write_durably` in one thread per association; CPU is the
    harness's own over the window."""
    out = rt.ep.workdir / (rt.target.output_dir or "out")
    errors: list[str] = []

    def work(number: int, part: list[Path]) -> None:
        try:
            write_durably(part, out / str(number))
        except OSError as exc:
            errors.append(f"writer #{number}: {exc}")

    cpu0 = own_cpu_seconds()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(number, part))
               for number, part in enumerate(split(dataset.files, assocs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - t0
    result.stored = count_part10_files(out)
    if errors or result.stored < dataset.instances:
        result.error = "; ".join(errors) or f"{result.stored} of {dataset.instances} written"
        return
    result.succeeded(elapsed, elapsed, own_cpu_seconds() - cpu0)


def _measure(target: Target, rt: RunningTarget, dataset: GeneratedDataset, assocs: int,
             result: IngestRun) -> None:
    """The measured part of :func:`run_once`; fills ``result`` in place."""
    result.startup_s = rt.startup_s
    monitor = TreeMonitor(rt.pid)
    monitor.start()
    cpu0 = _children_cpu()
    busy0, own0 = machine_busy_seconds(), own_cpu_seconds()
    t0 = time.perf_counter()
    senders = _launch_senders(rt, dataset, assocs, rt.ep.workdir)
    errors = _wait_senders(senders, _sender_timeout(dataset.instances))
    t_sent = time.perf_counter()
    client_cpu = _children_cpu() - cpu0
    if errors:  # a sender failed: the run is lost anyway, count once instead of waiting
        t_done = time.perf_counter()
        stored = target.stored_count(rt.ep)
    else:
        stored, t_done = _settle(target, rt, dataset.instances, t_sent)
    usage = monitor.stop()
    busy, own = machine_busy_seconds() - busy0, own_cpu_seconds() - own0
    result.stored = stored
    if stored is not None and stored < dataset.instances:
        errors.append(f"target holds {stored} of {dataset.instances} instances "
                      f"{t_done - t_sent:.0f} s after the senders finished")
    code = rt.proc.poll() if rt.proc else None
    if code is not None:
        errors.append(f"{target.name} exited with {code} during the run")
    if errors:
        result.error = "\n".join(errors)
        return
    elapsed = t_done - t0
    result.succeeded(elapsed, t_sent - t0, usage.cpu_seconds)
    result.server_peak_rss_mb = usage.peak_rss_bytes / 1e6
    result.server_max_procs = usage.max_processes
    result.client_cpu_s = client_cpu
    result.other_cpu_s = max(0.0, busy - own - client_cpu - usage.cpu_seconds)


def run_all(targets: list[Target], dataset: GeneratedDataset, assocs_list: list[int],
            runs: int, workroot: Path, progress: Callable[[IngestRun], None]) -> list[IngestRun]:
    """Every (run, parallelism, target) in interleaved order, so drift hits all targets alike.

    A target that fails to start is not tried again (its later runs are skipped).
    """
    global KEPT_RUNS
    results: list[IngestRun] = []
    broken: set[str] = set()
    keep = KEEP_RUNS
    if keep is None:  # room for every run's files (and the gateway's index beside them)?
        storing = sum(1 for target in targets if target.stores)
        need = int(storing * len(assocs_list) * runs * dataset.total_bytes * 1.1)
        workroot.mkdir(parents=True, exist_ok=True)
        keep = shutil.disk_usage(workroot).free > need + ROOM_MARGIN
    KEPT_RUNS = keep
    kept: list[RunningTarget] | None = [] if keep else None
    try:
        for run in range(1, runs + 1):
            for assocs in assocs_list:
                for target in targets:
                    if target.name in broken:
                        continue
                    res = run_once(target, dataset, assocs, run, workroot, kept)
                    if res.status != "ok" and res.startup_s is None:
                        broken.add(target.name)
                    results.append(res)
                    progress(res)
    finally:
        for rt in kept or ():
            rt.cleanup()
    return results


@dataclass
class IngestSummary:
    """A target's figures at one parallelism over its successful runs."""

    target: str
    assocs: int
    runs_ok: int
    runs_total: int
    inst_per_s: Stat | None
    mb_per_s: Stat | None
    server_cpu_s: Stat | None
    server_cpu_s_per_1000: float | None
    """median server CPU seconds per 1000 instances."""
    server_peak_rss_mb: Stat | None
    client_cpu_s: Stat | None
    settle_s: Stat | None
    other_load: Stat | None
    """cores' worth of CPU that everything else on the machine used during the windows."""
    ratio: float | None
    """median inst/s divided by storescp's median inst/s at the same parallelism."""
    errors: list[str]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


REFERENCE = "storescp"


def summarize(results: list[IngestRun], instances: int) -> list[IngestSummary]:
    """One summary per (target, parallelism) in first-seen order, with ratios to storescp."""
    keys = list(dict.fromkeys((r.target, r.assocs) for r in results))
    summaries = []
    for target, assocs in keys:
        mine = [r for r in results if (r.target, r.assocs) == (target, assocs)]
        ok = [r for r in mine if r.status == "ok"]
        cpu = Stat.of([r.server_cpu_s for r in ok])
        summaries.append(IngestSummary(
            target=target, assocs=assocs, runs_ok=len(ok), runs_total=len(mine),
            inst_per_s=Stat.of([r.inst_per_s for r in ok]),
            mb_per_s=Stat.of([r.mb_per_s for r in ok]),
            server_cpu_s=cpu,
            server_cpu_s_per_1000=cpu.median * 1000 / instances if cpu else None,
            server_peak_rss_mb=Stat.of([r.server_peak_rss_mb for r in ok]),
            client_cpu_s=Stat.of([r.client_cpu_s for r in ok]),
            settle_s=Stat.of([r.settle_s for r in ok]),
            other_load=Stat.of([r.other_cpu_s / r.elapsed_s for r in ok
                                if r.other_cpu_s is not None and r.elapsed_s]),
            ratio=None,
            errors=[f"run {r.run}: {r.error}" for r in mine if r.status != "ok"],
        ))
    for s in summaries:
        ref = next((x for x in summaries if x.target == REFERENCE and x.assocs == s.assocs), None)
        if ref and ref.inst_per_s and s.inst_per_s:
            s.ratio = s.inst_per_s.median / ref.inst_per_s.median
    return summaries


def _row(s: IngestSummary, descriptions: dict[str, str]) -> list[str]:
    """One Markdown table row; a target with no successful run shows as failed."""
    name = f"{s.target}: {descriptions.get(s.target, '')}".rstrip(": ")
    runs = f"{s.runs_ok}/{s.runs_total}"
    if s.runs_ok == 0:
        return [name, "**failed**", "-", "-", "-", "-", "-", runs]
    return [
        name,
        f"{s.ratio:.2f}" if s.ratio is not None else "-",
        fmt_stat(s.inst_per_s),
        fmt_stat(s.mb_per_s),
        fmt_stat(s.server_cpu_s, 2),
        f"{s.server_cpu_s_per_1000:.2f}" if s.server_cpu_s_per_1000 is not None else "-",
        fmt_stat(s.server_peak_rss_mb),
        runs if s.runs_ok == s.runs_total else f"**{runs}**",
    ]


RATIO_GOALS = {1: 0.50, 4: 0.80}
"""Issue 6: the gateway's inst/s over storescp's, by parallelism (Orthanc: 0.35 and 0.61)."""
RSS_GOAL_ASSOCS = 4
"""Issue 6: peak RSS while ingesting with this many associations no more than Orthanc's."""


def _goals(summaries: list[IngestSummary]) -> list[str]:
    """The issue's ingest goals for the default gateway, met or missed (empty if unmeasured)."""
    by = {(s.target, s.assocs): s for s in summaries if s.runs_ok}
    rows = []
    for assocs, goal in RATIO_GOALS.items():
        gw, orthanc = by.get(("gateway", assocs)), by.get(("orthanc", assocs))
        if gw is None or gw.ratio is None:
            continue
        rows.append([
            f"{assocs} assoc.: inst/s ratio to storescp", f"{gw.ratio:.2f}",
            f"{orthanc.ratio:.2f}" if orthanc and orthanc.ratio is not None else "-",
            f"≥ {goal:.2f}", "met" if gw.ratio >= goal else "**missed**"])
    gw, orthanc = by.get(("gateway", RSS_GOAL_ASSOCS)), by.get(("orthanc", RSS_GOAL_ASSOCS))
    if gw and orthanc and gw.server_peak_rss_mb and orthanc.server_peak_rss_mb:
        mine, theirs = gw.server_peak_rss_mb.median, orthanc.server_peak_rss_mb.median
        rows.append([f"{RSS_GOAL_ASSOCS} assoc.: peak RSS MB", f"{mine:.0f}", f"{theirs:.0f}",
                     "≤ Orthanc's", "met" if mine <= theirs else "**missed**"])
    if not rows:
        return []
    return ["", "### Goals (issue 6)", "",
            md_table(["measure", "gateway", "orthanc", "goal", "state"], rows)]


DISTURBED_CORES = 0.2
"""Other load (in cores) above which the report flags the figures as disturbed."""


def _disturbance_note(summaries: list[IngestSummary]) -> str:
    """A bullet saying how much CPU the rest of the machine took during the windows."""
    loads = [s.other_load for s in summaries if s.other_load]
    if not loads:
        return "- **other load**: not measured."
    worst = max(loads, key=lambda x: x.max)
    typical = statistics.median(x.median for x in loads)
    note = (f"- **other load** (CPU used meanwhile by everything else, in cores; kernel "
            "threads count too, so a target that fsyncs shows ~0.1-0.2 of its own): "
            f"typical {typical:.2f}, worst run {worst.max:.2f}.")
    if worst.max > DISTURBED_CORES:
        note += (f" **Some runs were probably disturbed** (> {DISTURBED_CORES} core): rerun "
                 "on a quiet machine before trusting small differences.")
    return note


HEADER = ["target", "ratio to storescp", "inst/s", "MB/s", "server CPU s",
          "CPU s / 1000 inst", "peak RSS MB", "runs ok"]


def render_markdown(summaries: list[IngestSummary], targets: list[Target],
                    unavailable: dict[str, str], runs: int, dataset: GeneratedDataset) -> str:
    """The ingest section: one table per parallelism, then definitions and failures."""
    descriptions = {t.name: t.description for t in targets}
    parts = [
        "## C-STORE ingest",
        "",
        f"Sender: dcmtk `storescu` (TCP_NODELAY=1) pushing all {dataset.instances} instances "
        f"({dataset.total_bytes / 1e6:.0f} MB); each run restarts the target on an empty "
        f"directory; {runs} run(s) per cell, median (min-max). Ratio = the target's median "
        "inst/s over storescp's median inst/s in the same invocation.",
    ]
    for assocs in dict.fromkeys(s.assocs for s in summaries):
        rows = [_row(s, descriptions) for s in summaries if s.assocs == assocs]
        label = "1 association" if assocs == 1 else f"{assocs} parallel associations"
        parts += ["", f"### {label}", "", md_table(HEADER, rows)]
    parts += _goals(summaries)
    parts += [
        "",
        "- **inst/s**, **MB/s** (10^6 bytes of Part-10 files): over the window from launching "
        "the senders to the later of the last sender's exit and the moment every instance was "
        "found stored.",
        "- **server CPU s**: user+system CPU of the target's whole process tree in that window; "
        "**peak RSS MB**: the largest summed RSS of the tree over 50 ms samples.",
        "- **between runs** the target's files are "
        + ("kept until every run is done (deleting them would make files created in the "
           "next minute near the deleted ones cost 0.3-1.4 ms of system time each instead of "
           "~0.05 ms on this machine's ext4 without a journal: every run would pay for the "
           "previous one's deletion)" if KEPT_RUNS else
           "deleted (`--no-keep-runs`, or too little room to keep them: on this machine's "
           "ext4 without a journal, files created in the next minute near the deleted ones "
           "cost 0.3-1.4 ms of system time each instead of ~0.05 ms)")
        + " and "
        + ("dirty pages are synced to disk (outside the window), so one run's writeback "
           "does not slow the next." if targets_mod.SYNC_BETWEEN_RUNS else
           "dirty pages are NOT synced (`--no-sync`): a run may pay for the previous "
           "run's writeback."),
        "- **verification**: " + "; ".join(
            f"{t.name}: {t.verification()}" for t in targets if t.name not in unavailable
        ) + ". A run that lost instances counts as failed and gives no figures.",
    ]
    parts.append(_disturbance_note(summaries))
    for name, reason in unavailable.items():
        parts.append(f"- **{name}**: {reason}.")
    errors = [(s, e) for s in summaries for e in s.errors]
    if errors:
        parts += ["", "### Failed runs", ""]
        for s, err in errors:
            first = err.strip().splitlines()[0][:300]
            parts.append(f"- {s.target}, {s.assocs} assoc., {first}")
    return "\n".join(parts) + "\n"
