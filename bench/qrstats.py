"""Runs, summaries and Markdown tables shared by the query/retrieve measures.

Two shapes of measure:

* **latency** (QIDO-RS, C-FIND, QIDO at scale): one run = ``requests`` sequential requests of
  one query case on one persistent connection/association; a run's figures are the p50 and
  p95 of its request latencies (nearest-rank). The summary gives, over the successful runs,
  median (min-max) of the per-run p50 and p95.
* **throughput** (WADO-RS, C-MOVE, C-GET): one run = a fixed list of retrievals; a run's
  figures are instances/s and MB/s over the summed retrieval times.

Ratios compare the gateway with Orthanc from the same invocation: for latency, gateway p50 /
Orthanc p50 (**below 1 = the gateway is faster**); for throughput, gateway / Orthanc (**above
1 = the gateway is faster**). A :class:`Goal` says what the project aims for; the report marks
each gateway row *met* or **missed**.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.report import Stat, fmt_stat, md_table

SUBJECT = "gateway"
"""The target whose goals are checked."""
REFERENCE = "orthanc"
"""The target ratios are taken against."""


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of ``values`` (not empty)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Goal:
    """What the subject must reach in one measure.

    ``kind`` is ``"vs_reference"`` (latency p50 no higher than the reference's, or throughput
    no lower) or ``"p95_below"`` (every run's p95 median below ``limit_ms``).
    """

    kind: str
    limit_ms: float = 0.0

    def describe(self) -> str:
        """The goal as the report states it."""
        if self.kind == "p95_below":
            return f"p95 < {self.limit_ms:.0f} ms"
        return "at least Orthanc's speed"


@dataclass
class LatencyRun:
    """One run of one query case against one target. Figures are None unless status is ok."""

    measure: str
    case: str
    target: str
    run: int
    status: str
    error: str | None
    requests: int
    p50_ms: float | None = None
    p95_ms: float | None = None
    mean_ms: float | None = None
    max_ms: float | None = None
    matches: int | None = None
    """matches summed over the run's requests (each checked against the dataset)."""
    server_cpu_ms_per_request: float | None = None
    samples_ms: list[float] = field(default_factory=list)

    def finish(self, samples_ms: list[float], matches: int, server_cpu_s: float | None) -> None:
        """Fill the figures from the request latencies and mark the run ok."""
        self.status = "ok"
        self.samples_ms = [round(v, 3) for v in samples_ms]
        self.p50_ms = percentile(samples_ms, 50)
        self.p95_ms = percentile(samples_ms, 95)
        self.mean_ms = sum(samples_ms) / len(samples_ms)
        self.max_ms = max(samples_ms)
        self.matches = matches
        if server_cpu_s is not None:
            self.server_cpu_ms_per_request = server_cpu_s * 1000 / len(samples_ms)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass
class ThroughputRun:
    """One run of one retrieve measure against one target."""

    measure: str
    case: str
    target: str
    run: int
    status: str
    error: str | None
    operations: int
    instances: int = 0
    bytes: int = 0
    elapsed_s: float | None = None
    inst_per_s: float | None = None
    mb_per_s: float | None = None
    op_ms: list[float] = field(default_factory=list)
    """duration of each retrieval in milliseconds."""
    server_cpu_s: float | None = None

    def finish(self, op_seconds: list[float], instances: int, nbytes: int,
               server_cpu_s: float | None) -> None:
        """Fill the figures from the retrievals' durations and mark the run ok."""
        elapsed = sum(op_seconds)
        self.status = "ok"
        self.op_ms = [round(s * 1000, 2) for s in op_seconds]
        self.instances, self.bytes, self.elapsed_s = instances, nbytes, elapsed
        self.inst_per_s = instances / elapsed
        self.mb_per_s = nbytes / elapsed / 1e6
        self.server_cpu_s = server_cpu_s

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass
class Summary:
    """A target's figures for one case of one measure over its successful runs.

    For latency ``main`` is the p50 and ``second`` the p95 (ms); for throughput ``main`` is
    inst/s and ``second`` MB/s. ``cpu`` is server CPU ms per request (latency) or CPU s per
    1000 instances (throughput).
    """

    measure: str
    case: str
    target: str
    runs_ok: int
    runs_total: int
    main: Stat | None
    second: Stat | None
    cpu: Stat | None
    ratio: float | None = None
    verdict: str = ""
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _first_error(runs: Sequence[LatencyRun | ThroughputRun]) -> list[str]:
    return [f"run {r.run}: {r.error}" for r in runs if r.status != "ok"]


def summarize_latency(runs: list[LatencyRun], goal: Goal) -> list[Summary]:
    """One summary per (case, target) in first-seen order, with ratios and verdicts."""
    out = []
    for case, target in dict.fromkeys((r.case, r.target) for r in runs):
        mine = [r for r in runs if (r.case, r.target) == (case, target)]
        ok = [r for r in mine if r.status == "ok"]
        out.append(Summary(
            measure=mine[0].measure, case=case, target=target, runs_ok=len(ok),
            runs_total=len(mine), main=Stat.of([r.p50_ms for r in ok]),
            second=Stat.of([r.p95_ms for r in ok]),
            cpu=Stat.of([r.server_cpu_ms_per_request for r in ok]),
            errors=_first_error(mine)))
    for s in out:
        ref = next((x for x in out if x.case == s.case and x.target == REFERENCE), None)
        if s.main and ref is not None and ref.main and s.target != REFERENCE:
            s.ratio = s.main.median / ref.main.median
        if s.target == SUBJECT:
            s.verdict = _latency_verdict(s, ref, goal)
        elif s.target == REFERENCE and goal.kind == "vs_reference":
            s.verdict = "reference"
    return out


def _latency_verdict(s: Summary, ref: Summary | None, goal: Goal) -> str:
    if s.main is None or s.second is None:
        return "**no figures**"
    if goal.kind == "p95_below":
        return "met" if s.second.median < goal.limit_ms else "**missed**"
    if ref is None or ref.main is None:
        return "no Orthanc figures in this run"
    return "met" if s.main.median <= ref.main.median else "**missed**"


def summarize_throughput(runs: list[ThroughputRun]) -> list[Summary]:
    """One summary per (case, target), ratios to Orthanc, verdict: at least Orthanc's inst/s."""
    out = []
    for case, target in dict.fromkeys((r.case, r.target) for r in runs):
        mine = [r for r in runs if (r.case, r.target) == (case, target)]
        ok = [r for r in mine if r.status == "ok"]
        out.append(Summary(
            measure=mine[0].measure, case=case, target=target, runs_ok=len(ok),
            runs_total=len(mine), main=Stat.of([r.inst_per_s for r in ok]),
            second=Stat.of([r.mb_per_s for r in ok]),
            cpu=Stat.of([r.server_cpu_s * 1000 / r.instances for r in ok
                         if r.server_cpu_s is not None and r.instances]),
            errors=_first_error(mine)))
    for s in out:
        ref = next((x for x in out if x.case == s.case and x.target == REFERENCE), None)
        if s.main and ref is not None and ref.main and s.target != REFERENCE:
            s.ratio = s.main.median / ref.main.median
        if s.target == REFERENCE:
            s.verdict = "reference"
        elif s.target == SUBJECT:
            if s.main is None:
                s.verdict = "**no figures**"
            elif ref is None or ref.main is None:
                s.verdict = "no Orthanc figures in this run"
            else:
                s.verdict = "met" if s.main.median >= ref.main.median else "**missed**"
    return out


def _runs_cell(s: Summary) -> str:
    runs = f"{s.runs_ok}/{s.runs_total}"
    return runs if s.runs_ok == s.runs_total else f"**{runs}**"


def latency_table(summaries: list[Summary], case_labels: dict[str, str],
                  ratio: bool = True, first: str = "query") -> str:
    """Markdown: one row per (case, target) with p50, p95, CPU per request, ratio, goal;
    ``first`` heads the column of case labels."""
    header = [first, "target", "p50 ms", "p95 ms", "server CPU ms / request"]
    if ratio:
        header.append("p50 ratio to Orthanc (< 1 = faster)")
    header += ["goal", "runs ok"]
    rows = []
    order = {case: i for i, case in enumerate(dict.fromkeys(s.case for s in summaries))}
    for s in sorted(summaries, key=lambda x: order[x.case]):  # stable: targets keep order
        row = [case_labels.get(s.case, s.case), s.target]
        if s.runs_ok == 0:
            row += ["**failed**", "-", "-"]
        else:
            row += [fmt_stat(s.main, 1), fmt_stat(s.second, 1), fmt_stat(s.cpu, 1)]
        if ratio:
            row.append(f"{s.ratio:.2f}" if s.ratio is not None else "-")
        row += [s.verdict or "-", _runs_cell(s)]
        rows.append(row)
    return md_table(header, rows)


def throughput_table(summaries: list[Summary]) -> str:
    """Markdown: one row per target with inst/s, MB/s, CPU per 1000 instances, ratio, goal."""
    header = ["target", "inst/s", "MB/s", "server CPU s / 1000 inst",
              "ratio to Orthanc (> 1 = faster)", "goal", "runs ok"]
    rows = []
    for s in summaries:
        if s.runs_ok == 0:
            figures = ["**failed**", "-", "-"]
        else:
            figures = [fmt_stat(s.main), fmt_stat(s.second), fmt_stat(s.cpu, 2)]
        rows.append([s.target, *figures, f"{s.ratio:.2f}" if s.ratio is not None else "-",
                     s.verdict or "-", _runs_cell(s)])
    return md_table(header, rows)


def failures(summaries: list[Summary]) -> list[str]:
    """Markdown bullets for failed runs (first line of each error)."""
    lines = []
    for s in summaries:
        for err in s.errors:
            first = err.strip().splitlines()[0][:300]
            lines.append(f"- {s.target}, {s.case}: {first}")
    return lines
