"""Where a request's time went: named durations for the ``Server-Timing`` response header.

W3C Server Timing (https://www.w3.org/TR/server-timing/) lets a server tell its client how
long parts of the answer took: ``Server-Timing: fhir;dur=412.3;desc="FHIR server (3
requests)", index;dur=35.0;…, total;dur=468.9;…`` (milliseconds). Cohort evaluations send it
(:mod:`gateway.cohort_api`), so an operator can tell a slow FHIR server from a slow gateway:
``total − fhir`` is the gateway's own time.

A request opens a :class:`Timings` with :func:`start` and closes it with :func:`stop`; the
services below wrap the parts they know in :func:`span` (``fhir`` around each exchange with
the FHIR server in :class:`~gateway.fhir_client.FhirClient`, ``index`` around the index work
of a cohort evaluation). Outside a request that collects, :func:`span` does nothing. The
current collector is a :class:`contextvars.ContextVar`, so concurrent requests (one thread
each) and background work (the publisher) never mix their figures.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field

__all__ = ["Timings", "current", "span", "start", "stop"]

#: What each metric name means, sent as its ``desc``.
DESCRIPTIONS = {"fhir": "FHIR server", "index": "index queries", "total": "whole request"}


@dataclass
class Timings:
    """Named durations (seconds) and how many spans made each, since :attr:`started`."""

    started: float = field(default_factory=time.perf_counter)
    seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        """Count one span of ``name`` that took ``seconds``."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + 1

    def header(self) -> str:
        """The ``Server-Timing`` value: every metric in ms, then ``total`` (up to now).

        ``fhir`` says how many requests its time is made of (``desc="FHIR server (3
        requests)"``). Metric names are tokens, ``dur`` a decimal and no ``desc`` holds a
        comma, so splitting the value on ``,`` is safe."""
        total = (time.perf_counter() - self.started) * 1000
        parts = []
        for name, seconds in (*self.seconds.items(), ("total", None)):
            ms = total if seconds is None else seconds * 1000
            desc = DESCRIPTIONS.get(name, name)
            if name == "fhir":
                n = self.counts[name]
                desc += f" ({n} request{'s' if n != 1 else ''})"
            parts.append(f'{name};dur={ms:.1f};desc="{desc}"')
        return ", ".join(parts)


_CURRENT: ContextVar[Timings | None] = ContextVar("gateway_timings", default=None)


def start() -> Token[Timings | None]:
    """Start collecting for the current request; give the token to :func:`stop`."""
    return _CURRENT.set(Timings())


def stop(token: Token[Timings | None]) -> None:
    """Stop collecting (restores whatever was current before :func:`start`)."""
    _CURRENT.reset(token)


def current() -> Timings | None:
    """The collector of the current request, or None outside one."""
    return _CURRENT.get()


@contextmanager
def span(name: str) -> Iterator[None]:
    """Add the time of the ``with`` block to metric ``name`` of the current request (also
    when the block raises); nothing outside a collecting request."""
    timings = _CURRENT.get()
    if timings is None:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings.add(name, time.perf_counter() - t0)
