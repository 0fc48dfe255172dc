"""``python -m bench``: run the benchmarks and write a Markdown report + bench/results/latest.json.

The report of a whole ``--full`` run is docs/benchmarks.md (the project's record); any other
run writes bench/results/report.md unless ``--out`` names a file.

Examples::

    python -m bench --quick                          # small dataset, main targets, ~1.5 min
    python -m bench --full --runs 3                  # ≈2600 instances, ≈1.1 GB, + scale
    python -m bench --full --targets storescp,orthanc --assocs 1
    python -m bench --quick --measures qido,wado     # query/retrieve only
    python -m bench --quick --measures scale         # the 1M-instance index (built once)
    python -m bench --quick --measures publish       # FHIR publishing against sekmet-fhir
    python -m bench --quick --measures cohort        # 1,000 FHIR patients x 100,000 studies

Peers come from scripts/install_bench_deps.sh (dcmtk, Orthanc + DICOMweb plugin); the FHIR
server of the publish and cohort measures (sekmet-fhir) from scripts/test.sh.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench import BENCH_ROOT_DEFAULT, cohort, ingest, publish, scale
from bench import targets as targets_mod
from bench.dataset import FULL_SPEC, QUICK_SPEC, DatasetSpec, ensure_dataset, warm_page_cache
from bench.qrrun import QR_MEASURES, QrOptions, run_qr
from bench.report import render_document, write_outputs
from bench.sysinfo import REPO_ROOT, machine_info, tool_versions
from bench.targets import TARGETS, Target

MEASURES = ("ingest", *QR_MEASURES, "publish", "scale", "cohort")
"""Measures this harness knows, in report order."""
QUICK_TARGETS = ("gateway", "storescp", "storescp-ignore", "fsync-floor", "orthanc",
                 "pynetdicom-min")
"""What --quick runs unless --targets says otherwise: the gateway, the peers issue 6 names, and
the disk's fsync floor (a fraction of a second). The gateway's variants (gateway-1p,
gateway-cached) and storescp-fsync are in --full, or asked for by name: with them the quick
mode took three minutes instead of under two."""
QUICK_MEASURES = ("ingest", *QR_MEASURES, "publish")
"""What --quick runs unless --measures says otherwise (scale and cohort are opt-in there:
their indexes take minutes to build the first time)."""


RECORD = REPO_ROOT / "docs/benchmarks.md"
"""The committed report: only a whole ``--full`` run (every measure, every target) writes it
unless ``--out`` says otherwise, so a quick or partial run never replaces the record."""
SCRATCH = REPO_ROOT / "bench/results/report.md"
"""Where any other run's report goes by default (bench/results/ is not committed)."""


def report_path(args: argparse.Namespace) -> Path:
    """``--out``, else :data:`RECORD` for a whole ``--full`` run and :data:`SCRATCH` for any
    other."""
    if args.out is not None:
        return Path(args.out)
    whole = args.full and args.measures is None and args.targets is None
    return RECORD if whole else SCRATCH


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="≈250 instances (112 MB), 2 runs, the main targets: about two "
                      "minutes (default)")
    mode.add_argument("--full", action="store_true",
                      help="2600 instances (≈1.13 GB) as in infra.md, 3 runs")
    p.add_argument("--targets",
                   help=f"comma-separated, from: {','.join(TARGETS)} (default: all with "
                   f"--full; with --quick {','.join(QUICK_TARGETS)})")
    p.add_argument("--measures",
                   help=f"comma-separated, from: {','.join(MEASURES)} (default: all but scale "
                   "with --quick, all with --full)")
    p.add_argument("--runs", type=int, help="runs per target and parallelism (2 quick, 3 full)")
    p.add_argument("--assocs", default="1,4",
                   help="parallel associations to measure, comma-separated (default 1,4)")
    p.add_argument("--requests", type=int,
                   help="QIDO-RS/C-FIND requests per query and run (20 quick, 50 full)")
    p.add_argument("--retrieves", type=int,
                   help="studies (WADO-RS) or patients (C-MOVE/C-GET) per run (3 quick, 10 full)")
    p.add_argument("--scale-studies", type=int, default=scale.FULL_SCALE.studies,
                   help="studies in the scale index, 20 instances each on average "
                   f"(default {scale.FULL_SCALE.studies})")
    p.add_argument("--cohort-studies", type=int, default=cohort.CohortSpec.studies,
                   help="studies in the cohort measure's index (default "
                   f"{cohort.CohortSpec.studies})")
    p.add_argument("--cohort-members", type=int, default=cohort.CohortSpec.members,
                   help="patients the cohort's FHIR criteria select (default "
                   f"{cohort.CohortSpec.members})")
    p.add_argument("--evaluations", type=int,
                   help="cold cohort evaluations per criterion and run (3 quick, 10 full)")
    p.add_argument("--publish-studies", type=int,
                   help="studies published at once in the publish throughput phase "
                   f"({publish.QUICK.studies} quick, {publish.FULL.studies} full)")
    p.add_argument("--quiet-seconds", type=float,
                   help="the gateway's publish.quiet_seconds in the publish measure "
                   f"({publish.QUICK.quiet_seconds:g} quick, {publish.FULL.quiet_seconds:g} full)")
    p.add_argument("--studies", type=int, help="override the preset's number of studies")
    p.add_argument("--series-per-study", type=int, help="override series per study")
    p.add_argument("--instances-per-series", type=int, help="override instances per series")
    p.add_argument("--seed", type=int, help="override the dataset seed")
    p.add_argument("--no-sync", action="store_true",
                   help="don't sync dirty pages to disk between runs (runs then interfere)")
    p.add_argument("--keep-runs", action=argparse.BooleanOptionalAction, default=None,
                   help="keep each ingest run's files until all are done instead of deleting "
                   "them before the next run (default: when the disk has room for every "
                   "run; see bench.ingest.KEEP_RUNS)")
    p.add_argument("--out", type=Path,
                   help=f"Markdown report (default {RECORD.relative_to(REPO_ROOT)} for a whole "
                   f"--full run, the project's record; else {SCRATCH.relative_to(REPO_ROOT)})")
    p.add_argument("--json", type=Path, default=REPO_ROOT / "bench/results/latest.json",
                   help="raw results (default bench/results/latest.json)")
    p.add_argument("--cache", type=Path, default=Path(BENCH_ROOT_DEFAULT),
                   help=f"datasets and run directories (default {BENCH_ROOT_DEFAULT})")
    return p.parse_args(argv)


def choose_spec(args: argparse.Namespace) -> DatasetSpec:
    """The preset for --quick/--full with any size overrides applied."""
    spec = FULL_SPEC if args.full else QUICK_SPEC
    overrides = {
        "studies": args.studies,
        "series_per_study": args.series_per_study,
        "instances_per_series": args.instances_per_series,
        "seed": args.seed,
    }
    return replace(spec, **{k: v for k, v in overrides.items() if v is not None})


def choose_targets(names: str) -> list[Target]:
    """Targets by name, in the order given; exits with a message on an unknown name."""
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in TARGETS]
    if unknown:
        sys.exit(f"unknown target(s): {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    return [TARGETS[n] for n in chosen]


def _progress(res: ingest.IngestRun) -> None:
    """One stderr line per finished run."""
    if res.status == "ok":
        print(f"  run {res.run} {res.target:16s} {res.assocs} assoc: "
              f"{res.inst_per_s:7.1f} inst/s {res.mb_per_s:6.1f} MB/s "
              f"cpu {res.server_cpu_s:6.2f} s rss "
              + (f"{res.server_peak_rss_mb:6.1f} MB" if res.server_peak_rss_mb else "-"),
              file=sys.stderr, flush=True)
    else:
        first = (res.error or "").strip().splitlines()[:1]
        print(f"  run {res.run} {res.target:16s} {res.assocs} assoc: FAILED {first}",
              file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Generate or reuse the dataset, run the measures, write and print the report."""
    args = parse_args(argv)
    if args.measures is None:
        measures = list(MEASURES if args.full else QUICK_MEASURES)
    else:
        measures = [m.strip() for m in args.measures.split(",") if m.strip()]
    if any(m not in MEASURES for m in measures):
        sys.exit(f"unknown measure in {args.measures!r}; known: {', '.join(MEASURES)}")
    spec = choose_spec(args)
    runs = args.runs or (3 if args.full else 2)
    assocs_list = [int(a) for a in args.assocs.split(",") if a.strip()]
    targets = choose_targets(args.targets or ",".join(TARGETS if args.full else QUICK_TARGETS))
    targets_mod.SYNC_BETWEEN_RUNS = not args.no_sync
    ingest.KEEP_RUNS = args.keep_runs
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)

    load1 = os.getloadavg()[0]
    if load1 > 0.5:
        print(f"warning: 1-minute load average is {load1:.2f} before starting; other work on "
              "this machine will disturb the figures (see 'other load' in the report)",
              file=sys.stderr)
    t_start = time.perf_counter()
    print(f"dataset: {spec.total_instances} instances ...", file=sys.stderr, flush=True)
    args.cache = args.cache.resolve()
    dataset = ensure_dataset(spec, args.cache)
    warm_page_cache(dataset.files)
    print(f"dataset ready in {time.perf_counter() - t_start:.1f} s: {dataset.root}",
          file=sys.stderr, flush=True)

    unavailable = {t.name: r for t in targets if (r := t.unavailable_reason())}
    for name, reason in unavailable.items():
        print(f"  {name}: {reason}", file=sys.stderr)
    runnable = [t for t in targets if t.name not in unavailable]

    raw: dict[str, Any] = {
        "command": command,
        "machine": machine_info(),
        "tools": tool_versions(),
        "dataset": {"description": dataset.describe(), "root": str(dataset.root),
                    "spec": asdict(spec), "instances": dataset.instances,
                    "bytes": dataset.total_bytes},
        "unavailable": unavailable,
        "sync_between_runs": not args.no_sync,
        "loadavg_before": load1,
    }
    sections: list[str] = []
    if "ingest" in measures:
        results = ingest.run_all(runnable, dataset, assocs_list, runs,
                                 args.cache / "runs", _progress)
        summaries = ingest.summarize(results, dataset.instances)
        raw["ingest"] = {"runs": [r.as_dict() for r in results],
                         "summary": [s.as_dict() for s in summaries]}
        sections.append(ingest.render_markdown(summaries, targets, unavailable, runs, dataset))
    if any(m in QR_MEASURES for m in measures):
        opts = QrOptions(runs=runs, requests=args.requests or (50 if args.full else 20),
                         retrieves=args.retrieves or (10 if args.full else 3))
        qr_raw, qr_sections = run_qr(measures, runnable, dataset, args.cache / "runs", opts)
        raw.update(qr_raw)
        sections += qr_sections
    if "publish" in measures:
        preset = publish.FULL if args.full else publish.QUICK
        pub_opts = replace(preset, runs=runs, studies=args.publish_studies or preset.studies,
                           quiet_seconds=preset.quiet_seconds if args.quiet_seconds is None
                           else args.quiet_seconds)
        raw["publish"], pub_section = publish.run(
            dataset, args.cache, pub_opts, available=unavailable.get("gateway"))
        sections.append(pub_section)
    if "scale" in measures:
        spec_scale = scale.scale_spec(args.scale_studies)
        scale_raw, scale_section = scale.run(
            spec_scale, args.cache, runs, args.requests or (50 if args.full else 20),
            available="gateway" not in unavailable)
        raw["scale"] = scale_raw
        sections.append(scale_section)
    if "cohort" in measures:
        cohort_raw, cohort_section = cohort.run(
            cohort.CohortSpec(studies=args.cohort_studies, members=args.cohort_members),
            args.cache, runs, args.evaluations or (10 if args.full else 3),
            args.requests or (50 if args.full else 20), available="gateway" not in unavailable)
        raw["cohort"] = cohort_raw
        sections.append(cohort_section)

    raw["wall_seconds"] = time.perf_counter() - t_start
    raw_path = str(args.json.relative_to(REPO_ROOT) if args.json.is_relative_to(REPO_ROOT)
                   else args.json)
    doc = render_document(command, raw["machine"], raw["tools"], dataset.describe(), sections,
                          raw_path)
    args.out = report_path(args)
    write_outputs(doc, args.out, raw, args.json)
    print(doc)
    print(f"wrote {args.out} and {args.json} in {raw['wall_seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
