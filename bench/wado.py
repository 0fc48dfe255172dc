"""WADO-RS whole-study retrieval throughput.

``GET <root>/studies/<uid>`` with ``Accept: multipart/related; type="application/dicom";
transfer-syntax=*`` (any syntax: both archives send the stored bytes, no transcoding) on one
keep-alive connection. Orthanc 1.10's DICOMweb plugin 1.7 accepts this header as it is (no
``transfer-syntax`` at all would also do); the gateway too.

Before the first run, each study is fetched once, unmeasured, and its multipart answer parsed:
it must hold one ``application/dicom`` part per instance of the study. Measured runs then read
every answer into a reused buffer and check its status and length against that verified one.
One run = the first ``retrieves`` studies in order; inst/s and MB/s (bytes of the multipart
bodies, 10^6) over the summed request times.
"""

from __future__ import annotations

import re

from bench.archive import LoadedTarget
from bench.clients import HttpClient
from bench.dataset import GeneratedDataset, StudyInfo
from bench.procmon import TreeMonitor
from bench.qrstats import Summary, ThroughputRun, failures, throughput_table

ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?')

#: Body length of each (target, study) answer as verified before the runs.
_verified: dict[tuple[str, str], int] = {}
#: Content-Type (without its boundary) each target answered with, for the report.
CONTENT_TYPES: dict[str, str] = {}


def studies_for(dataset: GeneratedDataset, retrieves: int) -> list[StudyInfo]:
    """The studies every run retrieves: the first ``retrieves`` of the dataset."""
    return dataset.studies[:max(1, retrieves)]


def count_parts(content_type: str, body: bytes) -> int:
    """Number of parts of a multipart body (``ValueError`` when it is not multipart)."""
    found = _BOUNDARY.search(content_type)
    if not content_type.startswith("multipart/related") or not found:
        raise ValueError(f"not a multipart/related answer: {content_type!r}")
    delimiter = b"--" + found.group(1).encode()
    return body.count(delimiter + b"\r\n")


def verify(loaded: LoadedTarget, studies: list[StudyInfo]) -> str:
    """Fetch each study once and check its parts; return the answers' Content-Type."""
    assert loaded.running is not None and loaded.running.ep.http_port is not None
    client = HttpClient(loaded.running.ep.http_port)
    content_type = ""
    try:
        for st in studies:
            reply = client.get(f"{loaded.target.dicomweb_root}/studies/{st.study_uid}", ACCEPT)
            if reply.status != 200:
                raise ValueError(f"HTTP {reply.status} for study {st.study_uid}")
            expected = sum(se.instances for se in st.series)
            parts = count_parts(reply.content_type, reply.body)
            if parts != expected:
                raise ValueError(f"{parts} parts for study {st.study_uid}, expected {expected}")
            _verified[(loaded.target.name, st.study_uid)] = reply.length
            content_type = reply.content_type
    finally:
        client.close()
    return re.sub(r";\s*boundary=[^;]+", "", content_type)


def run_target(loaded: LoadedTarget, dataset: GeneratedDataset, run: int,
               retrieves: int) -> ThroughputRun:
    """One run: retrieve every study of :func:`studies_for` once, timed."""
    assert loaded.running is not None and loaded.running.ep.http_port is not None
    studies = studies_for(dataset, retrieves)
    result = ThroughputRun("wado", "study", loaded.target.name, run, "failed", None,
                           len(studies))
    client = HttpClient(loaded.running.ep.http_port)
    mon: TreeMonitor | None = None
    try:
        if any((loaded.target.name, st.study_uid) not in _verified for st in studies):
            CONTENT_TYPES[loaded.target.name] = verify(loaded, studies)
        seconds, nbytes, instances = [], 0, 0
        mon = TreeMonitor(loaded.running.pid)
        mon.start()
        for st in studies:
            reply = client.get(f"{loaded.target.dicomweb_root}/studies/{st.study_uid}", ACCEPT,
                               keep_body=False)
            wanted = _verified[(loaded.target.name, st.study_uid)]
            count = sum(se.instances for se in st.series)
            # boundaries may differ in length between answers; the parts may not
            if reply.status != 200 or abs(reply.length - wanted) > 100 * count:
                raise ValueError(f"study {st.study_uid}: HTTP {reply.status}, {reply.length} "
                                 f"bytes (verified answer: {wanted})")
            seconds.append(reply.seconds)
            nbytes += reply.length
            instances += count
        result.finish(seconds, instances, nbytes, mon.stop().cpu_seconds)
    except Exception as exc:
        result.error = repr(exc)
        if mon is not None:
            mon.stop()
    finally:
        client.close()
    return result


def render_markdown(summaries: list[Summary], dataset: GeneratedDataset, retrieves: int,
                    runs: int) -> str:
    """The WADO-RS section."""
    studies = studies_for(dataset, retrieves)
    instances = sum(se.instances for st in studies for se in st.series)
    parts = [
        "## WADO-RS whole-study retrieval",
        "",
        f"`GET /studies/{{uid}}` with `Accept: {ACCEPT}` on one keep-alive connection: "
        f"{len(studies)} studies ({instances} instances) per run, {runs} run(s); inst/s and "
        "MB/s (multipart body bytes, 10^6) over the summed request times, median (min-max) "
        "over runs. Each study's answer was parsed once before the runs (one part per "
        "instance); measured answers are read into a buffer and checked by status and "
        "length. Goal: at least Orthanc's throughput.",
        "",
        throughput_table(summaries),
        "",
        "- **what each archive needs for this request**: " + "; ".join(
            f"{name} answered `{ct}`" for name, ct in CONTENT_TYPES.items())
        + ". Orthanc's DICOMweb plugin 1.7 takes `transfer-syntax=*` as is and sends the "
        "stored files; no extra configuration.",
    ]
    lines = failures(summaries)
    if lines:
        parts += ["", "Failed runs:", "", *lines]
    return "\n".join(parts) + "\n"
