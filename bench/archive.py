"""Query/retrieve targets started once, with the benchmark dataset loaded, for every Q/R run.

The query and retrieve measures (:mod:`bench.qido`, :mod:`bench.wado`, :mod:`bench.dimse_qr`)
need archives that already hold the data. :class:`Archives` starts each target that
:attr:`~bench.targets.Target.serves_qr` (the gateway, Orthanc) on a fresh directory, loads the
same files into each by its fastest bulk path (gateway: ``imaging-gateway import``; Orthanc:
two parallel ``storescu``), checks that every instance is indexed, and keeps them running until
the end. Loading time is not a measured figure (it is recorded in the raw JSON only).

It also starts the C-MOVE destination both archives know as ``BENCHDEST``: dcmtk ``storescp
--ignore`` (receives every byte, stores nothing: the protocol limit, so the archive's sending
is what is measured) with a 128 KiB maximum PDU.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.dataset import GeneratedDataset
from bench.targets import (
    HOST,
    RunningTarget,
    Target,
    TargetStartError,
    dcmtk_env,
    echo_ok,
    free_port,
)

DEST_AET = "BENCHDEST"
"""AE title of the C-MOVE destination, configured on every Q/R target."""
MAX_PDU = 131072
"""Maximum PDU the dcmtk receivers (move destination, getscu) advertise: dcmtk's largest."""


class MoveDestination:
    """dcmtk ``storescp --ignore`` on a free port: ``with MoveDestination(dir) as dest: ...``."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.log_path = workdir / "move-destination.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> MoveDestination:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["storescp", "-aet", DEST_AET, "+xa", "-pdu", str(MAX_PDU), "--ignore",
                 str(self.port)],
                env=dcmtk_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.perf_counter() + 10
        while not echo_ok(DEST_AET, self.port):
            if self.proc.poll() is not None or time.perf_counter() > deadline:
                self.__exit__()
                raise TargetStartError(f"move destination (storescp) did not start: "
                                       f"{self.log_path.read_text(errors='replace')[-300:]}")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @property
    def peers(self) -> dict[str, tuple[str, int]]:
        """The ``peers`` entry the archives need to reach it."""
        return {DEST_AET: (HOST, self.port)}


@dataclass
class LoadedTarget:
    """One started archive and how its loading went."""

    target: Target
    running: RunningTarget | None
    load_s: float | None = None
    """seconds from the start of loading to every instance indexed (not a measured figure)."""
    error: str | None = None
    """why the target is not usable (start or load failed); None when it is."""

    @property
    def ok(self) -> bool:
        """Whether the target is running with the whole dataset loaded."""
        return self.running is not None and self.error is None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {"target": self.target.name, "load_s": self.load_s, "error": self.error,
                "startup_s": self.running.startup_s if self.running else None}


@dataclass
class Archives:
    """Every Q/R target, started and loaded: ``with Archives(...) as archives: ...``."""

    targets: list[Target]
    dataset: GeneratedDataset
    workroot: Path
    loaded: list[LoadedTarget] = field(default_factory=list)
    destination: MoveDestination | None = None

    def __enter__(self) -> Archives:
        self.workroot.mkdir(parents=True, exist_ok=True)
        self.destination = MoveDestination(self.workroot).__enter__()
        for target in self.targets:
            self.loaded.append(self._start_and_load(target))
        return self

    def __exit__(self, *exc: object) -> None:
        for item in self.loaded:
            if item.running is not None:
                item.running.stop()
                item.running.cleanup()
        if self.destination is not None:
            self.destination.__exit__()

    def _start_and_load(self, target: Target) -> LoadedTarget:
        assert self.destination is not None
        rt = RunningTarget(target, self.workroot, peers=self.destination.peers)
        try:
            rt.start()
        except TargetStartError as exc:
            rt.cleanup()
            return LoadedTarget(target, None, error=str(exc))
        item = LoadedTarget(target, rt)
        t0 = time.perf_counter()
        try:
            target.load(rt.ep, self.dataset.files, self.dataset.root / "files", rt.ep.workdir)
            count = target.indexed_count(rt.ep)
            if count is not None and count != self.dataset.instances:
                raise RuntimeError(f"{count} of {self.dataset.instances} instances indexed "
                                   "after loading")
        except Exception as exc:  # the target stays listed, as failed, with the reason
            item.error = f"loading failed: {exc}\n--- server log tail ---\n{rt.log_tail()}"
            return item
        item.load_s = time.perf_counter() - t0
        return item

    def usable(self) -> list[LoadedTarget]:
        """The targets that started and hold the whole dataset, in the order given."""
        return [item for item in self.loaded if item.ok]
