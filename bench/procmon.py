"""CPU time and memory of a server's whole process tree, sampled in a background thread.

A server may fork worker processes (the gateway does), so every figure covers the root
process and all its descendants, found again at each sample:

* CPU seconds = for every process seen during the window, its last sampled user+system
  time, minus what the processes alive at the start had already used then. A child that
  exits between two samples loses at most one interval (~50 ms) of its CPU time.
* Peak RSS = the largest, over all samples, of the SUM of the resident set sizes of the
  tree's processes at that sample (shared pages are counted once per process, as `ps`
  would).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil  # type: ignore[import-untyped]

ProcKey = tuple[int, float]
"""(pid, create_time): identifies a process even if its pid is reused."""


@dataclass
class TreeUsage:
    """What a process tree used during one measurement window."""

    cpu_seconds: float
    """user + system CPU seconds of the whole tree during the window."""
    peak_rss_bytes: int
    """max over samples of the summed RSS of the tree, in bytes."""
    samples: int
    """how many samples were taken (one every ``interval`` seconds)."""
    max_processes: int
    """the most processes seen in the tree at one sample."""


def _tree(root: psutil.Process) -> list[psutil.Process]:
    """The root and its living descendants (an empty list once the root is gone)."""
    try:
        return [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return []


class TreeMonitor:
    """Samples a process tree every ``interval`` seconds between :meth:`start` and :meth:`stop`."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self._baseline: dict[ProcKey, float] = {}
        self._last: dict[ProcKey, float] = {}
        self._peak_rss = 0
        self._samples = 0
        self._max_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-monitor", daemon=True)

    def _sample(self) -> None:
        """Record CPU times of every process in the tree and the tree's summed RSS."""
        rss = 0
        procs = _tree(self.root)
        for proc in procs:
            try:
                with proc.oneshot():
                    key = (proc.pid, proc.create_time())
                    times = proc.cpu_times()
                    mem = proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
            self._last[key] = times.user + times.system
            rss += mem
        self._peak_rss = max(self._peak_rss, rss)
        self._max_procs = max(self._max_procs, len(procs))
        self._samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> None:
        """Take the baseline sample and begin sampling in the background."""
        self._sample()
        self._baseline = dict(self._last)
        self._thread.start()

    def stop(self) -> TreeUsage:
        """Stop sampling, take a final sample, and return the window's usage."""
        self._stop.set()
        self._thread.join()
        self._sample()
        used = sum(self._last.values()) - sum(self._baseline.values())
        return TreeUsage(
            cpu_seconds=max(0.0, used),
            peak_rss_bytes=self._peak_rss,
            samples=self._samples,
            max_processes=self._max_procs,
        )


class CpuTimeline:
    """CPU seconds of a process tree sampled over time, for windows known only afterwards.

    :class:`TreeMonitor` needs the window's start and end as they happen; here the window
    comes later (e.g. from timestamps in a server's log), so every ``interval`` seconds the
    tree's summed user+system time is recorded with :func:`time.time`, and
    :meth:`between` interpolates linearly. ``pid`` is a callable because the process may not
    exist yet when sampling starts (it is waited for).
    """

    def __init__(self, pid: Callable[[], int | None], interval: float = 0.01) -> None:
        self._pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._seen: dict[ProcKey, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-timeline", daemon=True)

    def __enter__(self) -> CpuTimeline:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        root = None
        while not self._stop.wait(self.interval):
            if root is None:
                pid = self._pid()
                if pid is None:
                    continue
                try:
                    root = psutil.Process(pid)
                except psutil.NoSuchProcess:
                    return
            for proc in _tree(root):  # processes that exit keep their last figure
                try:
                    times = proc.cpu_times()
                    self._seen[(proc.pid, proc.create_time())] = times.user + times.system
                except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                    continue
            self.samples.append((time.time(), sum(self._seen.values())))

    def at(self, when: float) -> float | None:
        """The tree's CPU seconds at epoch time ``when`` (None outside the samples)."""
        for (t0, c0), (t1, c1) in itertools.pairwise(self.samples):
            if t0 <= when <= t1:
                return c0 + (c1 - c0) * ((when - t0) / (t1 - t0) if t1 > t0 else 0.0)
        return None

    def between(self, start: float, end: float) -> float | None:
        """CPU seconds the tree used from ``start`` to ``end`` (epoch), if both were sampled."""
        a, b = self.at(start), self.at(end)
        return None if a is None or b is None else max(0.0, b - a)


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot, all cores summed.

    From the first line of /proc/stat: user + nice + system + irq + softirq + steal (idle
    and iowait left out). The difference over a window, less the CPU of the processes the
    benchmark knows about, is what other processes on the machine took meanwhile.
    """
    with open("/proc/stat") as fh:
        fields = fh.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def own_cpu_seconds() -> float:
    """user+system CPU seconds of this (harness) process so far, all threads."""
    t = os.times()
    return t.user + t.system
