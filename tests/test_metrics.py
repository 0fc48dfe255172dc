"""``/metrics``: Prometheus text exposition of what the gateway did and holds, summed over its
processes (a receiver process stores C-STOREs, the main one STOW-RS), read by
prometheus_client's own parser as a Prometheus server would."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import get_args

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from prometheus_client.parser import text_string_to_metric_families
from requests.exceptions import HTTPError

from gateway import metrics
from gateway.ingest import Outcome

from conftest import GatewayProcess, dcmtk_env, require_dcmtk
from samples import fresh_copies


def _samples(gateway: GatewayProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) → value, from ``GET /metrics``."""
    answer = requests.get(f"{gateway.base_url}/metrics", timeout=10)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(answer.text)
            for sample in family.samples}


def test_metrics_count_stores_of_every_process_failures_requests_and_what_the_index_holds(
        make_gateway: Callable[..., GatewayProcess], tmp_path: Path) -> None:
    require_dcmtk()
    gateway = make_gateway(extra={"dimse": {"workers": 2}}).start()
    before = _samples(gateway)
    assert before[("imaging_gateway_instances_stored_total", (("outcome", "stored"),))] == 0
    assert before[("imaging_gateway_index_objects", (("level", "instances"),))] == 0

    files = fresh_copies(tmp_path, 5)
    senders = [subprocess.Popen(["storescu", "-aec", gateway.ae_title, "127.0.0.1",
                                 str(gateway.dimse_port), *map(str, part)], env=dcmtk_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for part in (files[:2], files[2:4])]  # two associations, two processes
    assert [s.wait(60) for s in senders] == [0, 0]
    assert "dimse-1 gateway.dimse: association accepted" in gateway.log  # a receiver process
    client = DICOMwebClient(gateway.dicomweb)
    client.store_instances(datasets=[pydicom.dcmread(files[4])])  # the main process
    changed = pydicom.dcmread(files[0])
    changed.PatientName = "Someone^Else"  # a different object under a stored SOP Instance UID
    try:
        client.store_instances(datasets=[changed])
    except HTTPError as exc:
        assert exc.response.status_code == 409
    assert requests.get(f"{gateway.dicomweb}/studies", timeout=10).status_code == 200
    assert requests.get(f"{gateway.dicomweb}/studies?StudyDate=bad", timeout=10) \
        .status_code == 400

    assert requests.request("XYZ1", f"{gateway.base_url}/healthz", timeout=10) \
        .status_code == 405  # a method nobody knows: counted, but not by its name

    after = _samples(gateway)
    assert after[("imaging_gateway_index_up", ())] == 1
    assert after[("imaging_gateway_http_requests_total", (
        ("endpoint", "unmatched"), ("method", "other"), ("status", "405")))] == 1
    assert after[("imaging_gateway_instances_stored_total", (("outcome", "stored"),))] == 5
    size = sum(path.stat().st_size for path in files)
    assert size * 0.9 < after[("imaging_gateway_stored_bytes_total", ())] < size * 1.1
    assert after[("imaging_gateway_store_failures_total", (("status", "0x0111"),))] == 1
    assert after[("imaging_gateway_index_objects", (("level", "instances"),))] == 5
    assert after[("imaging_gateway_index_objects", (("level", "studies"),))] == 1
    assert after[("imaging_gateway_storage_free_bytes", ())] > 0
    queries = {labels: value for (name, labels), value in after.items()
               if name == "imaging_gateway_http_requests_total"
               and dict(labels)["endpoint"] == "dicomweb.search_studies"}
    assert queries == {(("endpoint", "dicomweb.search_studies"), ("method", "GET"),
                        ("status", "200")): 1,
                       (("endpoint", "dicomweb.search_studies"), ("method", "GET"),
                        ("status", "400")): 1}
    assert after[("imaging_gateway_http_request_duration_seconds_count",
                  (("endpoint", "dicomweb.search_studies"),))] == 2


def test_every_outcome_of_the_write_path_is_a_series() -> None:
    assert set(metrics.OUTCOMES) == set(get_args(Outcome))
