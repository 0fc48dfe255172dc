"""Smoke run of the benchmark harness (bench/): it starts the gateway and dcmtk storescp,
pushes a tiny generated study into each with storescu, verifies every instance arrived, runs
the query/retrieve measures against the gateway loaded with that study and the scale measure
on a tiny generated index, and writes the report; then the cohort measure on a tiny world
and the FHIR publishing measure with a few tiny studies, both against the real FHIR server
(sekmet-fhir). No timing is asserted: only that the harness works end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import sekmet
from bench.phases import PHASES

from conftest import ROOT, require_dcmtk
from fhir_servers import SEKMET_BIN


def _section(report: str, title: str) -> str:
    """The Markdown of one ``## title`` section."""
    start = report.index(f"## {title}")
    end = report.find("\n## ", start + 1)
    return report[start:] if end < 0 else report[start:end]


def test_quick_benchmark_runs_every_measure_against_the_gateway(tmp_path: Path) -> None:
    require_dcmtk()
    out, raw = tmp_path / "benchmarks.md", tmp_path / "latest.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--targets",
         "gateway,gateway-cached,storescp,storescp-fsync,fsync-floor",
         "--measures", "ingest,qido,cfind,wado,cmove,cget,scale",
         "--runs", "1", "--assocs", "1,4", "--studies", "1", "--series-per-study", "1",
         "--instances-per-series", "12", "--requests", "3", "--retrieves", "1",
         "--scale-studies", "20", "--cache", str(tmp_path / "cache"),
         "--out", str(out), "--json", str(raw)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = out.read_text()
    ingest = _section(report, "C-STORE ingest")
    assert "| gateway: imaging-gateway (this project; default configuration" in ingest
    assert "ratio to storescp" in ingest
    rows = [line for line in ingest.splitlines()
            if line.startswith(("| gateway:", "| gateway-cached:", "| storescp:",
                                "| storescp-fsync:", "| fsync-floor:"))]
    assert len(rows) == 10 and all(row.endswith("| 1/1 |") for row in rows), rows
    # The durable references: dcmtk syncing each file, and the disk's own durable limit.
    floor = next(row for row in rows if row.startswith("| fsync-floor:"))
    assert float(floor.split("|")[3].split()[0]) > 0  # inst/s measured
    # The ratio goals are judged in the report (no Orthanc here: no memory goal).
    goals = [line for line in ingest.splitlines()
             if line.startswith(("| 1 assoc.: inst/s ratio", "| 4 assoc.: inst/s ratio"))]
    assert len(goals) == 2 and all(g.endswith(("| met |", "| **missed** |")) for g in goals)
    # Query/retrieve and scale: the gateway alone (no Orthanc here), every run checked.
    for title, gateway_rows in (("QIDO-RS latency", 3), ("C-FIND latency", 1),
                                ("WADO-RS whole-study retrieval", 1), ("C-GET", 1),
                                ("QIDO-RS at scale", 3)):
        rows = [line for line in _section(report, title).splitlines() if "| gateway |" in line]
        assert len(rows) == gateway_rows and all(r.endswith("| 1/1 |") for r in rows), rows
    assert "| gateway |" in _section(report, "C-MOVE")
    data = json.loads(raw.read_text())
    assert {"ingest", "qido", "cfind", "wado", "cmove", "cget", "scale"} <= set(data)
    assert data["scale"]["manifest"]["counts"]["instances"] == 400


def test_the_cohort_measure_runs_against_the_real_fhir_server(tmp_path: Path) -> None:
    """A tiny world (300 studies, 20 cohort members) seeded into sekmet-fhir, both criteria
    evaluated with their Server-Timing split, scoped and unscoped QIDO-RS checked."""
    if not SEKMET_BIN.is_file():  # the same install bench.cohort uses
        pytest.fail(f"sekmet-fhir is not installed at {SEKMET_BIN}: run scripts/test.sh")
    out, raw = tmp_path / "benchmarks.md", tmp_path / "latest.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--targets", "gateway",
         "--measures", "cohort", "--runs", "1", "--studies", "1", "--series-per-study", "1",
         "--instances-per-series", "2", "--requests", "3", "--evaluations", "1",
         "--cohort-studies", "300", "--cohort-members", "20",
         "--cache", str(tmp_path / "cache"), "--out", str(out), "--json", str(raw)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    section = _section(out.read_text(), "Cohort queries at scale")
    evaluations = [line for line in section.splitlines()
                   if line.startswith(("| `Patient?", "| `Condition?", "| cached"))]
    assert len(evaluations) == 3 and all(r.endswith("| 1/1 |") for r in evaluations), section
    qido = [line for line in section.splitlines()
            if line.startswith(("| patient |", "| modality_ct |", "| date_"))]
    assert len(qido) == 4 and all("**failed**" not in r for r in qido), section
    data = json.loads(raw.read_text())["cohort"]
    assert data["manifest"]["members"] == 20
    assert data["manifest"]["fhir_resources"]["Patient"] == data["manifest"]["index_patients"]
    for run in data["evaluations"]:
        assert run["status"] == "ok", run
        for evaluation in run["evaluations"]:
            assert evaluation["total_ms"] >= evaluation["fhir_ms"] >= 0
            assert (evaluation["fhir_requests"] > 0) == (run["case"] != "cached")


def test_publish_measure_runs_against_sekmet(tmp_path: Path) -> None:
    require_dcmtk()
    missing = sekmet.missing_reason()
    if missing:  # scripts/test.sh installs it: never skip silently
        pytest.fail(missing)
    out, raw = tmp_path / "benchmarks.md", tmp_path / "latest.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--targets", "gateway",
         "--measures", "publish", "--runs", "1", "--studies", "2", "--series-per-study", "1",
         "--instances-per-series", "3", "--publish-studies", "4",
         "--cache", str(tmp_path / "cache"), "--out", str(out), "--json", str(raw)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    section = _section(out.read_text(), "FHIR publishing")
    latency = [line for line in section.splitlines() if "| gateway |" in line]
    assert len(latency) == 1 and latency[0].endswith("| 1/1 |"), section
    rows = [line for line in section.splitlines()
            if line.startswith(("| gateway publisher", "| plain PUT"))]
    assert len(rows) == 3 and all(row.endswith("| 1/1 |") for row in rows), section
    data = json.loads(raw.read_text())["publish"]
    (lat,) = data["latency"]["runs"]
    assert lat["status"] == "ok" and len(lat["samples_ms"]) == 2, lat
    (thr,) = data["throughput"]["runs"]
    assert thr["status"] == "ok", thr["error"]
    assert thr["requests"]["POST ImagingStudy"] == 4, thr["requests"]
    assert thr["gateway"]["studies"] == thr["put_parallel"]["studies"] == 4


def test_only_a_whole_full_run_replaces_the_committed_report() -> None:
    """docs/benchmarks.md is the project's record: a quick or partial run writes its report
    under bench/results/ unless told otherwise."""
    from bench.__main__ import RECORD, SCRATCH, parse_args, report_path

    assert report_path(parse_args(["--full"])) == RECORD
    assert report_path(parse_args([])) == SCRATCH
    assert report_path(parse_args(["--quick"])) == SCRATCH
    assert report_path(parse_args(["--full", "--measures", "ingest"])) == SCRATCH
    assert report_path(parse_args(["--full", "--targets", "gateway,storescp"])) == SCRATCH
    assert report_path(parse_args(["--quick", "--out", "x.md"])) == Path("x.md")


def test_the_phase_profile_times_every_phase_of_a_c_store(tmp_path: Path) -> None:
    """``python -m bench.phases`` wraps gateway functions by name: each must still exist and
    run once per stored instance (a renamed one would leave its phase at zero)."""
    require_dcmtk()
    result = subprocess.run(
        [sys.executable, "-m", "bench.phases", "--instances-per-series", "8", "--assocs", "1",
         "--cache", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line.split("|") for line in result.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| phase")]
    assert [row[1].strip(" ·") for row in rows] == [phase[2] for phase in PHASES]
    assert all(float(row[2]) > 0.5 and float(row[3]) > 0 for row in rows), rows
