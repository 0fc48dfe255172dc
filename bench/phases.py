"""``python -m bench.phases``: where a C-STORE's time goes inside the gateway.

Runs the ingest measure's workload (the dataset, ``storescu`` with 1 or more parallel
associations) against the gateway in its default configuration, with phase timers in every
gateway process (:mod:`bench.phase_timers`), and prints, per instance stored, for each phase:
how often it ran, the CPU time of the thread that ran it and the wall time. Phases nest (the
table is indented accordingly): a phase's figures include those of the phases under it. The
timers themselves cost a few microseconds a call, so the totals run a little higher than in
``python -m bench``.

Examples::

    python -m bench.phases                    # 2600 instances (the full dataset), 1 and 4 assoc.
    python -m bench.phases --quick --assocs 4 # 250 instances

What the phases are is in :data:`PHASES`; the gateway's "Index later" (gateway/ingest.py) is
why the index commit runs after the response, on a helper thread beside the next flush.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench import BENCH_ROOT_DEFAULT
from bench.dataset import FULL_SPEC, QUICK_SPEC, DatasetSpec, ensure_dataset, warm_page_cache
from bench.ingest import IngestRun, run_once
from bench.targets import GatewayTarget

#: (module, function or Class.method, label, depth, what it is). The wrapped name is the one
#: its callers look up (``read_instance`` as gateway.ingest imported it).
PHASES: tuple[tuple[str, str, str, int, str], ...] = (
    ("gateway.receiver", "Association.next_message", "receive", 0,
     "one DIMSE message from the socket: the C-STORE command and data set PDUs"),
    ("gateway.receiver", "ReceiveSink.__init__", "staging file", 1,
     "a staging file for the data set (from the pool), its Part 10 header"),
    ("gateway.receiver", "ReceiveSink.write", "write to staging", 1,
     "data set fragments written into the staging file (and their writeback started)"),
    ("gateway.receiver", "Association._store", "store and respond", 0,
     "the C-STORE once its data set is in: the write path, then the response"),
    ("gateway.ingest", "Ingest.store_file", "write path", 1,
     "gateway.ingest.Ingest.store_file: everything up to a durable, acknowledgeable instance"),
    ("gateway.ingest", "read_instance", "parse header", 2,
     "the header walked and the index record built (pixel data skipped)"),
    ("gateway.index", "Index.prior_state", "prior state", 2,
     "index lookups: is this SOP Instance stored or rejected already"),
    ("gateway.storage", "FileStorage.put_file", "move into place", 2,
     "the staging file renamed to its key (directories made when new)"),
    ("gateway.ingest", "Ingest._sync", "flush", 2,
     "the blob made durable; the previous instance's index commit runs beside it"),
    ("gateway.storage", "_make_durable", "fsync", 3,
     "the fsync itself (and the release of the blob's cached pages)"),
    ("gateway.receiver", "Association.respond", "respond", 1,
     "the C-STORE response encoded and sent"),
    ("gateway.ingest", "Ingest._commit_acknowledged", "index commit", 0,
     "the index rows of an acknowledged instance, in one transaction (helper thread)"),
)


@dataclass
class PhaseFigure:
    """One phase's totals over a run, from every gateway process."""

    label: str
    depth: int
    calls: int
    cpu_ns: int
    wall_ns: int


class GatewayPhasesTarget(GatewayTarget):
    """The gateway (default configuration) with the phase timers loaded into its processes."""

    name = "gateway-phases"
    description = "imaging-gateway with phase timers (bench.phases)"
    serves_qr = False
    phases_dir: Path | None = None

    def env(self) -> dict[str, str]:
        timers = str(Path(__file__).resolve().parent / "phase_timers")
        path = os.pathsep.join(p for p in (timers, os.environ.get("PYTHONPATH", "")) if p)
        return {**os.environ, "PYTHONPATH": path, "BENCH_PHASES_DIR": str(self.phases_dir),
                "BENCH_PHASES": json.dumps([phase[:3] for phase in PHASES])}


def collect(folder: Path) -> list[PhaseFigure]:
    """Every phase's totals summed over the processes that wrote into ``folder``."""
    totals: dict[str, list[int]] = {}
    for written in folder.glob("phases-*.json"):
        for label, values in json.loads(written.read_text()).items():
            into = totals.setdefault(label, [0, 0, 0])
            for i, value in enumerate(values):
                into[i] += value
    figures = []
    for _module, _path, label, depth, _what in PHASES:
        cpu_ns, calls, wall_ns = totals.get(label, [0, 0, 0])
        figures.append(PhaseFigure(label, depth, calls, cpu_ns, wall_ns))
    return figures


#: The phase run exactly once per instance stored: the figures are per call of it.
PER_INSTANCE = "store and respond"


def render(run: IngestRun, figures: list[PhaseFigure]) -> str:
    """The run's line and its table of phases per instance, as Markdown."""
    seen = next(f.calls for f in figures if f.label == PER_INSTANCE)
    instances = max(seen, 1)  # the timers' own count (a process's last moment may be lost)
    lines = [f"### {run.assocs} association(s): {run.inst_per_s or 0:.0f} inst/s, server CPU "
             f"{(run.server_cpu_s or 0) / run.instances * 1e6:.0f} µs per instance "
             f"(every process of the gateway, kernel time included); the timers saw "
             f"{seen} of the {run.instances} instances", "",
             "| phase | calls per instance | thread CPU µs per instance | "
             "wall µs per instance | what |", "|---|---|---|---|---|"]
    what = {label: text for _m, _p, label, _d, text in PHASES}
    for figure in figures:
        name = "· " * figure.depth + figure.label
        lines.append(f"| {name} | {figure.calls / instances:.2f} | "
                     f"{figure.cpu_ns / instances / 1e3:.0f} | "
                     f"{figure.wall_ns / instances / 1e3:.0f} | {what[figure.label]} |")
    return "\n".join(lines)


def profile(spec: DatasetSpec, assocs: int, cache: Path) -> tuple[IngestRun, list[PhaseFigure]]:
    """One ingest run of the dataset over ``assocs`` associations, with the phase timers."""
    dataset = ensure_dataset(spec, cache)
    warm_page_cache(dataset.files)
    target = GatewayPhasesTarget()
    with tempfile.TemporaryDirectory(prefix="phases-", dir=cache) as folder:
        target.phases_dir = Path(folder)
        run = run_once(target, dataset, assocs, 1, cache / "runs")
        if run.status != "ok":
            raise RuntimeError(f"the run failed: {run.error}")
        return run, collect(Path(folder))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.phases", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the quick dataset (250 instances)")
    parser.add_argument("--assocs", default="1,4", help="parallel associations, e.g. 1,4")
    parser.add_argument("--instances-per-series", type=int, default=None,
                        help="a smaller dataset (2 studies x 1 series of this many)")
    parser.add_argument("--cache", type=Path, default=Path(BENCH_ROOT_DEFAULT))
    args = parser.parse_args(argv)
    spec = QUICK_SPEC if args.quick else FULL_SPEC
    if args.instances_per_series:
        spec = DatasetSpec(studies=2, series_per_study=1,
                           instances_per_series=args.instances_per_series)
    for assocs in (int(a) for a in args.assocs.split(",")):
        run, figures = profile(spec, assocs, args.cache)
        print(render(run, figures), end="\n\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
