"""Smoke run of the benchmark harness (bench/): it starts the gateway and dcmtk storescp,
pushes a tiny generated study into each with storescu, verifies every instance arrived and
writes the report. No timing is asserted: only that the harness works end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, require_dcmtk


def test_quick_ingest_benchmark_runs_against_the_gateway_and_storescp(tmp_path: Path) -> None:
    require_dcmtk()
    out, raw = tmp_path / "benchmarks.md", tmp_path / "latest.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--targets", "gateway,storescp",
         "--runs", "1", "--assocs", "1,4", "--studies", "1", "--series-per-study", "1",
         "--instances-per-series", "12", "--cache", str(tmp_path / "cache"),
         "--out", str(out), "--json", str(raw)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = out.read_text()
    assert "| gateway: imaging-gateway (this project) |" in report
    assert "ratio to storescp" in report
    rows = [line for line in report.splitlines()
            if line.startswith(("| gateway:", "| storescp:"))]
    assert len(rows) == 4 and all(row.endswith("| 1/1 |") for row in rows), rows
    data = json.loads(raw.read_text())
    assert "ingest" in json.dumps(data)
