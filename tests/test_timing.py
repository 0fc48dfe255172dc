"""gateway.timing: the durations behind the Server-Timing header (W3C Server Timing)."""

from __future__ import annotations

import re
import threading
import time

import pytest

from gateway import timing

#: One metric of a Server-Timing value: name;dur=<ms>;desc="<text>"
METRIC = re.compile(r'^(?P<name>[a-z]+);dur=(?P<dur>\d+\.\d);desc="(?P<desc>[^"]*)"$')


def parse(header: str) -> dict[str, tuple[float, str]]:
    found = {}
    for part in header.split(", "):
        match = METRIC.match(part)
        assert match, part
        found[match["name"]] = (float(match["dur"]), match["desc"])
    return found


def test_spans_add_up_per_name_and_total_comes_last() -> None:
    token = timing.start()
    try:
        for _ in range(3):
            with timing.span("fhir"):
                time.sleep(0.01)
        with timing.span("index"):
            time.sleep(0.005)
        collected = timing.current()
        assert collected is not None
        header = collected.header()
    finally:
        timing.stop(token)
    metrics = parse(header)
    assert list(metrics) == ["fhir", "index", "total"]
    assert metrics["fhir"][0] >= 30 and metrics["fhir"][1] == "FHIR server (3 requests)"
    assert metrics["index"][0] >= 5
    assert metrics["total"][0] >= metrics["fhir"][0] + metrics["index"][0]


def test_a_span_that_raises_still_counts() -> None:
    token = timing.start()
    try:
        with pytest.raises(RuntimeError), timing.span("fhir"):
            raise RuntimeError("the server went away")
        collected = timing.current()
        assert collected is not None and collected.counts == {"fhir": 1}
    finally:
        timing.stop(token)


def test_outside_a_request_spans_do_nothing_and_threads_never_mix() -> None:
    with timing.span("fhir"):
        pass
    assert timing.current() is None
    seen: list[dict[str, int]] = []

    def request(n: int) -> None:
        token = timing.start()
        for _ in range(n):
            with timing.span("fhir"):
                pass
        collected = timing.current()
        assert collected is not None
        seen.append(dict(collected.counts))
        timing.stop(token)

    threads = [threading.Thread(target=request, args=(n,)) for n in (1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(s["fhir"] for s in seen) == [1, 2, 3]
    assert timing.current() is None
