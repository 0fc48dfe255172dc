"""Benchmark harness for imaging-gateway and its reference peers.

Run ``python -m bench --help`` from the repository root. Each measure lives in its own
module (``bench.ingest``; ``bench.qido``, ``bench.wado``, ``bench.dimse_qr`` for C-FIND,
C-MOVE and C-GET, run by ``bench.qrrun`` against archives loaded by ``bench.archive``;
``bench.scale`` for the 1M-instance index; ``bench.publish`` for FHIR publishing against
sekmet-fhir, started by ``bench.sekmet`` and driven by ``bench.fhir_peer``; ``bench.cohort``
for cohort queries against a real FHIR server) and shares the dataset generator and build
cache (``bench.dataset``), the target launcher (``bench.targets``), the process-tree
monitors (``bench.procmon``), the Q/R statistics and tables (``bench.qrstats``) and the
report writer (``bench.report``).
"""

from __future__ import annotations

BENCH_ROOT_DEFAULT = "/tmp/imaging-gateway-bench"
"""Where datasets and per-run target directories live (outside the repository)."""
