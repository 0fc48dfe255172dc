"""Runs the query/retrieve measures (qido, wado, cfind, cmove, cget) and renders their sections.

The archives are started and loaded once (:class:`bench.archive.Archives`); then, for each run,
each measure, each archive in turn, so slow drift of the machine hits every target alike.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import dimse_qr, qido, wado
from bench.archive import Archives, LoadedTarget
from bench.dataset import GeneratedDataset
from bench.qrstats import (
    LatencyRun,
    ThroughputRun,
    summarize_latency,
    summarize_throughput,
)
from bench.report import md_table
from bench.targets import Target

QR_MEASURES = ("qido", "cfind", "wado", "cmove", "cget")
"""The query/retrieve measures, in report order."""


@dataclass(frozen=True)
class QrOptions:
    """How much each run does."""

    runs: int
    requests: int
    """requests per query case and run (QIDO-RS, C-FIND)."""
    retrieves: int
    """studies (WADO-RS) or patients (C-MOVE, C-GET) retrieved per run."""


def _progress(res: LatencyRun | ThroughputRun) -> None:
    if res.status != "ok":
        first = (res.error or "").strip().splitlines()[:1]
        print(f"  run {res.run} {res.measure:5s} {res.case:16s} {res.target:8s} FAILED {first}",
              file=sys.stderr, flush=True)
    elif isinstance(res, LatencyRun):
        print(f"  run {res.run} {res.measure:5s} {res.case:16s} {res.target:8s} "
              f"p50 {res.p50_ms:7.2f} ms p95 {res.p95_ms:7.2f} ms", file=sys.stderr, flush=True)
    else:
        print(f"  run {res.run} {res.measure:5s} {res.case:16s} {res.target:8s} "
              f"{res.inst_per_s:7.1f} inst/s {res.mb_per_s:7.1f} MB/s", file=sys.stderr,
              flush=True)


def _one(measure: str, item: LoadedTarget, dataset: GeneratedDataset, run: int,
         opts: QrOptions) -> list[LatencyRun | ThroughputRun]:
    if measure == "qido":
        return list(qido.run_all_cases(item, dataset, run, opts.requests))
    if measure == "cfind":
        return [dimse_qr.run_cfind(item, dataset, run, opts.requests)]
    if measure == "wado":
        return [wado.run_target(item, dataset, run, opts.retrieves)]
    if measure == "cmove":
        return [dimse_qr.run_cmove(item, dataset, run, opts.retrieves)]
    if measure == "cget":
        return [dimse_qr.run_cget(item, dataset, run, opts.retrieves)]
    raise ValueError(measure)


def run_qr(measures: list[str], targets: list[Target], dataset: GeneratedDataset,
           workroot: Path, opts: QrOptions,
           progress: Callable[[LatencyRun | ThroughputRun], None] = _progress,
           ) -> tuple[dict[str, Any], list[str]]:
    """Run the chosen Q/R measures; return (raw JSON parts, Markdown sections)."""
    chosen = [m for m in QR_MEASURES if m in measures]
    qr_targets = [t for t in targets if t.serves_qr]
    results: dict[str, list[LatencyRun | ThroughputRun]] = {m: [] for m in chosen}
    raw: dict[str, Any] = {}
    print(f"query/retrieve: starting and loading {', '.join(t.name for t in qr_targets)} ...",
          file=sys.stderr, flush=True)
    with Archives(qr_targets, dataset, workroot) as archives:
        for item in archives.loaded:
            state = f"loaded in {item.load_s:.1f} s" if item.ok else f"FAILED: {item.error}"
            print(f"  {item.target.name}: {state}", file=sys.stderr, flush=True)
        usable = archives.usable()
        echo_ms = {}
        if "cget" in chosen:
            for item in usable:
                seconds = dimse_qr.echo_seconds(item)
                if seconds is not None:
                    echo_ms[item.target.name] = seconds * 1000
        for run in range(1, opts.runs + 1):
            for measure in chosen:
                for item in usable:
                    for res in _one(measure, item, dataset, run, opts):
                        results[measure].append(res)
                        progress(res)
        raw["setup"] = {"archives": [item.as_dict() for item in archives.loaded],
                        "options": asdict(opts), "echoscu_ms": echo_ms,
                        "wado_content_types": dict(wado.CONTENT_TYPES)}
    sections = [_setup_section(archives.loaded, dataset)]
    for measure in chosen:
        runs = results[measure]
        if measure in ("qido", "cfind"):
            lat = [r for r in runs if isinstance(r, LatencyRun)]
            summaries = summarize_latency(lat, qido.GOAL if measure == "qido"
                                          else dimse_qr.FIND_GOAL)
            if measure == "qido":
                sections.append(qido.render_markdown(summaries, dataset, opts.requests,
                                                     opts.runs))
            else:
                sections.append(dimse_qr.render_cfind(summaries, opts.requests, opts.runs))
        else:
            thr = [r for r in runs if isinstance(r, ThroughputRun)]
            summaries = summarize_throughput(thr)
            if measure == "wado":
                sections.append(wado.render_markdown(summaries, dataset, opts.retrieves,
                                                     opts.runs))
            else:
                sections.append(dimse_qr.render_retrieve(measure, summaries, dataset,
                                                         opts.retrieves, opts.runs, echo_ms))
        raw[measure] = {"runs": [r.as_dict() for r in runs],
                        "summary": [s.as_dict() for s in summaries]}
    return raw, sections


def _setup_section(loaded: list[LoadedTarget], dataset: GeneratedDataset) -> str:
    rows = []
    for item in loaded:
        how = ("`imaging-gateway import` (2 jobs)" if item.target.name == "gateway"
               else "2 parallel `storescu`" if item.target.name == "orthanc" else "-")
        state = (f"{item.load_s:.1f} s" if item.ok
                 else "**failed**: " + (item.error or "").strip().splitlines()[0][:200])
        rows.append([item.target.name, item.target.description, how, state])
    return "\n".join([
        "## Query and retrieve: set-up",
        "",
        f"Each archive is started once on an empty directory and loaded with the same "
        f"{dataset.instances} files by its fastest bulk path, then checked to index every "
        "instance (gateway: `/api/status`; Orthanc: `/statistics`). Loading is not a "
        "measured figure. The archives stay up for all query/retrieve runs; each run does "
        "every measure against each archive in turn. Both know the C-MOVE destination "
        "`BENCHDEST` (dcmtk `storescp --ignore`). Orthanc is configured with "
        "`DicomAlwaysAllowFind/Get/Move` (1.9+ refuses Q/R from unknown AE titles by "
        "default); otherwise the same settings as in the ingest measure.",
        "",
        md_table(["archive", "what", "loaded with", "load time"], rows),
    ]) + "\n"
