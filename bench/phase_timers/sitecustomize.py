"""Phase timers inside the gateway's processes, for ``python -m bench.phases``.

Loaded at interpreter start-up through ``PYTHONPATH`` (Python imports ``sitecustomize`` by
itself) in every process of a gateway the harness started with ``BENCH_PHASES_DIR`` set, and
in no other. It wraps the functions of :data:`bench.phases.PHASES` so that each call adds the
calling thread's CPU time, the wall time and one call to its phase, and writes the totals of
its process to ``$BENCH_PHASES_DIR/phases-<pid>.json`` ten times a second and at exit (a
receiver process ends with ``os._exit``: its last tenth of a second may be missing).
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

OUT = os.environ.get("BENCH_PHASES_DIR")
#: label -> [thread CPU ns, calls, wall ns]
TOTALS: dict[str, list[int]] = {}
_LOCK = threading.Lock()


def _timed(function: Callable[..., Any], label: str) -> Callable[..., Any]:
    totals = TOTALS.setdefault(label, [0, 0, 0])

    def timed(*args: Any, **kwargs: Any) -> Any:
        cpu, wall = time.thread_time_ns(), time.perf_counter_ns()
        try:
            return function(*args, **kwargs)
        finally:
            spent_cpu, spent_wall = time.thread_time_ns() - cpu, time.perf_counter_ns() - wall
            with _LOCK:
                totals[0] += spent_cpu
                totals[1] += 1
                totals[2] += spent_wall

    return timed


def _install() -> None:
    phases = json.loads(os.environ["BENCH_PHASES"])
    for module_name, path, label in phases:
        owner: Any = importlib.import_module(module_name)
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        setattr(owner, name, _timed(getattr(owner, name), label))  # functions and methods


def _dump() -> None:
    with _LOCK:
        snapshot = {label: list(values) for label, values in TOTALS.items()}
    path = os.path.join(str(OUT), f"phases-{os.getpid()}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(snapshot, handle)
    os.replace(path + ".tmp", path)


def _dump_forever() -> None:
    while True:
        time.sleep(0.1)
        _dump()


if OUT and os.environ.get("BENCH_PHASES"):
    _install()
    atexit.register(_dump)
    threading.Thread(target=_dump_forever, name="bench-phases", daemon=True).start()
