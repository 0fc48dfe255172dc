"""Prometheus metrics, served at ``/metrics``: what the staff running the gateway watch.

Counted as it happens (prometheus_client counters and a histogram):

* ``imaging_gateway_instances_stored_total{outcome}``: instances through the write path, by
  outcome (``stored``, ``replaced``, ``unchanged``, ``rejection-applied``), whatever brought
  them (C-STORE, STOW-RS, import); ``imaging_gateway_stored_bytes_total``: their bytes;
* ``imaging_gateway_store_failures_total{status}``: stores refused, by DIMSE status
  (``0xA700`` out of resources, ``0xC000`` invalid, …; STOW-RS maps the same statuses);
* ``imaging_gateway_http_requests_total{method,endpoint,status}`` and
  ``imaging_gateway_http_request_duration_seconds{endpoint}``: HTTP requests by Flask endpoint
  (a bounded set of names, never a URL with UIDs in it), until the handler returns (a
  streamed WADO-RS body goes on after that).

Read from the index and the disk at each scrape: ``imaging_gateway_index_objects{level}``
(patients, studies, series, instances), ``imaging_gateway_publish_outbox{state}`` (studies
waiting for, being given to, or failed at the FHIR server) and
``imaging_gateway_storage_free_bytes``.

Several processes store instances (``dimse.workers``), so ``serve`` runs prometheus_client in
its multiprocess mode (:func:`enable_multiprocess`, before any metric exists in any process):
each process keeps its counters in small memory-mapped files of a private directory under the
temporary directory (``TMPDIR``, else ``/tmp``; it needs a few megabytes and must not be
cleaned under a running gateway), and ``/metrics`` sums them. A clean stop removes the
directory; one left by a killed gateway can be deleted. Other commands count in memory and
show nothing. prometheus_client is imported on first use, after that choice.

A count never fails a store: an error while counting is logged once and ignored. An index
that cannot be read leaves its gauges out of a scrape (``imaging_gateway_index_up`` 0).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.bootstrap import Services

log = logging.getLogger("gateway.metrics")

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The outcomes of the write path (gateway.ingest.Outcome).
OUTCOMES = ("stored", "replaced", "unchanged", "rejection-applied")
#: Methods counted by name; any other a client sends is counted as "other".
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
_warned = False
_making = threading.Lock()


def enable_multiprocess() -> Callable[[], None]:
    """Make this process and the processes it starts count into one fresh directory; returns
    what removes it at the end. Call before any metric is made (``serve`` does, first)."""
    directory = tempfile.mkdtemp(prefix="imaging-gateway-metrics-")
    os.environ[MULTIPROCESS_ENV] = directory
    return lambda: shutil.rmtree(directory, ignore_errors=True)


def prepare() -> None:
    """Make the metrics now (at start-up), not on the first store."""
    with _never_failing():
        _metrics()


def _metrics() -> dict[str, Any]:
    with _making:  # threads of `import` count at once; each metric is made once
        return _made()


@cache
def _made() -> dict[str, Any]:
    from prometheus_client import Counter, Histogram

    made = {
        "stored": Counter("imaging_gateway_instances_stored", "Instances through the write "
                          "path, by outcome", ["outcome"]),
        "bytes": Counter("imaging_gateway_stored_bytes", "Bytes of instances stored or replaced"),
        "failed": Counter("imaging_gateway_store_failures", "Stores refused, by DIMSE status",
                          ["status"]),
        "requests": Counter("imaging_gateway_http_requests", "HTTP requests answered",
                            ["method", "endpoint", "status"]),
        "seconds": Histogram("imaging_gateway_http_request_duration_seconds",
                             "HTTP request handling time (until the handler returns)",
                             ["endpoint"], buckets=(.001, .0025, .005, .01, .025, .05, .1, .25,
                                                    .5, 1, 2.5, 5, 10)),
    }
    for outcome in OUTCOMES:  # every outcome is a series from the start (at 0)
        made["stored"].labels(outcome)
    return made


@contextlib.contextmanager
def _never_failing() -> Iterator[None]:
    global _warned
    try:
        yield
    except Exception:  # a count must never fail what is counted
        if not _warned:
            _warned = True
            log.exception("counting a metric failed (further failures are not logged)")


def stored(outcome: str, size: int) -> None:
    """One instance through the write path (``size`` counts for new and replaced blobs)."""
    with _never_failing():
        metrics = _metrics()
        metrics["stored"].labels(outcome).inc()
        if outcome in ("stored", "replaced"):
            metrics["bytes"].inc(size)


def store_failed(status: int | None) -> None:
    """A store refused with DIMSE ``status``, or (None) ended by an unexpected error."""
    with _never_failing():
        _metrics()["failed"].labels("error" if status is None else f"0x{status:04X}").inc()


def http_request(method: str, endpoint: str, status: int, seconds: float) -> None:
    with _never_failing():
        metrics = _metrics()
        method = method if method in HTTP_METHODS else "other"  # a client names the method
        metrics["requests"].labels(method, endpoint, str(status)).inc()
        metrics["seconds"].labels(endpoint).observe(seconds)


def exposition(services: Services, accept: str) -> tuple[bytes, str]:
    """Every metric (of every process) in the format the ``Accept`` header asks for (the
    Prometheus text format, or OpenMetrics), and its content type."""
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.exposition import choose_encoder

    _metrics()  # the counters exist (at zero) before the first store
    registry = CollectorRegistry()
    if MULTIPROCESS_ENV in os.environ:
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(_Delegate(REGISTRY))
    registry.register(_StateCollector(services))
    encode, content_type = choose_encoder(accept)
    return encode(registry), content_type


class _Delegate:
    """Another registry's metrics, as one collector."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Any]:
        yield from self.registry.collect()


class _StateCollector:
    """The gauges read at scrape time: index sizes, the FHIR outbox, free storage."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("imaging_gateway_index_up",
                               "1 when this scrape could read the index, else 0")
        try:  # an index that cannot be read leaves these out, never the counters
            counts = self.services.index.counts()
            states = self.services.index.outbox_states()
        except Exception as exc:
            log.warning("/metrics: the index cannot be read: %s", exc)
            up.add_metric([], 0)
            yield up
        else:
            up.add_metric([], 1)
            yield up
            objects = GaugeMetricFamily("imaging_gateway_index_objects",
                                        "Objects in the index, by level", labels=["level"])
            for level, count in counts.items():
                objects.add_metric([level], count)
            yield objects
            outbox = GaugeMetricFamily("imaging_gateway_publish_outbox",
                                       "Studies in the FHIR publishing outbox, by state",
                                       labels=["state"])
            for state, count in states.items():
                outbox.add_metric([state], count)
            yield outbox
        free = GaugeMetricFamily("imaging_gateway_storage_free_bytes",
                                 "Free bytes on the file system of storage.path")
        with contextlib.suppress(OSError):
            free.add_metric([], self.services.storage.free_bytes())
        yield free
