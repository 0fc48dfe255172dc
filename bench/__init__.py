"""Benchmark harness for imaging-gateway and its reference peers.

Run ``python -m bench --help`` from the repository root. Each measure lives in its own
module (``bench.ingest`` today; QIDO, WADO, C-FIND, C-MOVE later) and shares the dataset
generator (``bench.dataset``), the target launcher (``bench.targets``), the process-tree
monitor (``bench.procmon``) and the report writer (``bench.report``).
"""

from __future__ import annotations

BENCH_ROOT_DEFAULT = "/tmp/imaging-gateway-bench"
"""Where datasets and per-run target directories live (outside the repository)."""
