"""QIDO-RS latency: typical viewer/worklist searches against the loaded archives.

Three query cases (the rows of infra.md's reference table), each answered from the dataset's
manifest so every answer is checked (HTTP 200, DICOM JSON array of the expected length):

* ``patient``: ``/studies?PatientID=<id>``, cycling over the dataset's patients;
* ``date_ct``: ``/studies?StudyDate=<lo>-<hi>&ModalitiesInStudy=CT``, the range spanning the
  middle half of the dataset's study dates;
* ``series_instances``: ``/studies/<s>/series/<se>/instances``, cycling over the series.

One run = ``requests`` sequential requests of one case on one keep-alive connection, after
``WARMUP`` unmeasured ones; latency from sending the request to the last byte of the answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from bench.archive import LoadedTarget
from bench.clients import HttpClient
from bench.dataset import GeneratedDataset
from bench.procmon import TreeMonitor
from bench.qrstats import Goal, LatencyRun, Summary, failures, latency_table

WARMUP = 3
"""Unmeasured requests per case and run (connection set-up, first-touch caches)."""
DICOM_JSON = "application/dicom+json"
GOAL = Goal("vs_reference")


@dataclass(frozen=True)
class QueryCase:
    """A named query and the (path below the DICOMweb root, expected matches) it cycles over."""

    name: str
    label: str
    requests: tuple[tuple[str, int], ...]


def cases(dataset: GeneratedDataset) -> list[QueryCase]:
    """The three query cases for ``dataset``, with their expected answer sizes."""
    studies = dataset.studies
    per_patient: dict[str, int] = {}
    for st in studies:
        per_patient[st.patient_id] = per_patient.get(st.patient_id, 0) + 1
    dates = sorted(st.study_date for st in studies)
    lo, hi = dates[len(dates) // 4], dates[(3 * len(dates)) // 4]
    in_range = sum(1 for st in studies if lo <= st.study_date <= hi
                   and any(se.modality == "CT" for se in st.series))
    return [
        QueryCase("patient", "`/studies?PatientID={id}`",
                  tuple((f"/studies?PatientID={pid}", n) for pid, n in per_patient.items())),
        QueryCase("date_ct", f"`/studies?StudyDate={lo}-{hi}&ModalitiesInStudy=CT`",
                  ((f"/studies?StudyDate={lo}-{hi}&ModalitiesInStudy=CT", in_range),)),
        QueryCase("series_instances", "`/studies/{s}/series/{se}/instances`",
                  tuple((f"/studies/{st.study_uid}/series/{se.series_uid}/instances",
                         se.instances) for st in studies for se in st.series)),
    ]


def check_answer(status: int, body: bytes, expected: int | None) -> int:
    """The number of matches in a QIDO-RS answer; raises ``ValueError`` if it is wrong."""
    if status != 200:
        raise ValueError(f"HTTP {status}: {body[:200]!r}")
    matches = json.loads(body)
    if not isinstance(matches, list):
        raise ValueError(f"not a JSON array: {body[:200]!r}")
    if expected is not None and len(matches) != expected:
        raise ValueError(f"{len(matches)} matches, expected {expected}")
    return len(matches)


def run_case(measure: str, case: QueryCase, loaded: LoadedTarget, run: int, requests: int,
             root: str | None = None) -> LatencyRun:
    """``requests`` timed requests of ``case`` (after :data:`WARMUP`) against one target."""
    rt = loaded.running
    assert rt is not None and rt.ep.http_port is not None
    base = loaded.target.dicomweb_root if root is None else root
    result = LatencyRun(measure, case.name, loaded.target.name, run, "failed", None, requests)
    client = HttpClient(rt.ep.http_port)
    samples: list[float] = []
    matches = 0
    mon: TreeMonitor | None = None
    try:
        for i in range(WARMUP):
            path, expected = case.requests[i % len(case.requests)]
            reply = client.get(base + path, DICOM_JSON)
            check_answer(reply.status, reply.body, expected)
        mon = TreeMonitor(rt.pid)
        mon.start()
        for i in range(requests):
            path, expected = case.requests[(i + run) % len(case.requests)]
            reply = client.get(base + path, DICOM_JSON)
            matches += check_answer(reply.status, reply.body, expected)
            samples.append(reply.seconds * 1000)
        result.finish(samples, matches, mon.stop().cpu_seconds)
    except Exception as exc:  # a wrong answer or a dead server: the run failed, say why
        result.error = f"{case.name}: {exc!r}"
        if mon is not None:
            mon.stop()
    finally:
        client.close()
    return result


def run_all_cases(loaded: LoadedTarget, dataset: GeneratedDataset, run: int,
                  requests: int) -> list[LatencyRun]:
    """Every case once (one run) against one target."""
    return [run_case("qido", case, loaded, run, requests) for case in cases(dataset)]


def render_markdown(summaries: list[Summary], dataset: GeneratedDataset, requests: int,
                    runs: int) -> str:
    """The QIDO-RS section."""
    labels = {c.name: c.label for c in cases(dataset)}
    parts = [
        "## QIDO-RS latency",
        "",
        f"{requests} sequential requests per query and run on one keep-alive HTTP connection "
        f"(after {WARMUP} unmeasured), {runs} run(s); per run the p50 and p95 of the "
        "request latencies (send to last byte), shown as median (min-max) over runs. Every "
        "answer is checked against the dataset (200, expected number of matches). Gateway "
        f"at `/dicomweb`, Orthanc at `/dicom-web`. Goal: {GOAL.describe()} (gateway p50 no "
        "higher than Orthanc's).",
        "",
        latency_table(summaries, labels),
    ]
    lines = failures(summaries)
    if lines:
        parts += ["", "Failed runs:", "", *lines]
    return "\n".join(parts) + "\n"
