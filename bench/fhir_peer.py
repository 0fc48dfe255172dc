"""The FHIR server side of the publish measure: sekmet, its seed data, a trivial client.

:class:`Fhir` starts sekmet-fhir (:mod:`bench.sekmet`, plain HTTP on loopback, no
authentication), seeds it with the Patients and ServiceRequests the studies refer to, finds
and checks the ImagingStudy resources the gateway wrote, deletes them between runs, and counts
the requests in sekmet's access log. :func:`put_copies` is the reference writer: plain
``PUT ImagingStudy/<id>`` on keep-alive :class:`requests.Session` objects.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests

from bench import sekmet
from bench.dataset import StudyInfo
from bench.procmon import TreeMonitor, own_cpu_seconds
from bench.targets import free_port

PATIENT_SYSTEM = "urn:oid:1.2.3.4.5.1"
"""Identifier system of the seeded Patients (sekmet's own MRN system)."""
ACCESSION_SYSTEM = "urn:oid:1.2.3.4.5.11"
"""Identifier system of the seeded ServiceRequests' accession numbers (sekmet's)."""
STUDY_SYSTEM = "urn:dicom:uid"
_ACCESS = re.compile(r'"(GET|POST|PUT|DELETE|PATCH) /fhir/([A-Za-z]+)?([^ "]*) HTTP')


@dataclass
class Rate:
    """``studies`` written in ``seconds``, with the CPU the two sides used in that window."""

    studies: int
    seconds: float
    fhir_cpu_s: float | None = None
    """sekmet's CPU seconds."""
    client_cpu_s: float | None = None
    """the writer's CPU seconds: the gateway's process tree, or the harness for plain PUTs."""

    @property
    def per_s(self) -> float:
        """Studies per second."""
        return self.studies / self.seconds

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {**asdict(self), "per_s": self.per_s}


# -- sekmet ---------------------------------------------------------------------------------------
class Fhir:
    """sekmet started for the measure, and a keep-alive session to it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.settings = sekmet.plain_settings(root, self.port)
        self.base = str(self.settings["base_url"])
        self.process: subprocess.Popen[bytes] | None = None
        self.session = requests.Session()
        self.patients: dict[str, str] = {}
        """Patient ID -> seeded Patient id."""
        self.orders: dict[str, str] = {}
        """accession number -> seeded ServiceRequest id."""

    def __enter__(self) -> Fhir:
        self.process = sekmet.start(self.settings, self.root)
        return self

    def __exit__(self, *exc: object) -> None:
        self.session.close()
        sekmet.stop_process(self.process)

    @property
    def log_path(self) -> Path:
        """sekmet's output: uvicorn's access log, one line per request."""
        return self.root / sekmet.LOG_NAME

    def log_size(self) -> int:
        """Current length of the access log (to count the requests made after this point)."""
        return self.log_path.stat().st_size

    def requests_since(self, offset: int) -> dict[str, int]:
        """Requests logged since ``offset``, by ``METHOD Type`` plus ``?`` (search) or ``/id``."""
        with open(self.log_path, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
        counts: Counter[str] = Counter()
        for match in _ACCESS.finditer(text):
            method, rtype, rest = match.groups()
            shape = "?" if rest.startswith("?") else "/id" if rest.startswith("/") else ""
            counts[f"{method} {rtype or '[base]'}{shape}"] += 1
        return dict(sorted(counts.items()))

    def post(self, resource: dict[str, Any]) -> str:
        """Create ``resource``; its new id."""
        reply = self.session.post(f"{self.base}/{resource['resourceType']}", json=resource,
                                  timeout=30)
        reply.raise_for_status()
        return str(reply.json()["id"])

    def seed(self, studies: Sequence[StudyInfo]) -> None:
        """A Patient per Patient ID and a ServiceRequest per accession number (once each)."""
        for st in studies:
            if st.patient_id not in self.patients:
                family, _, given = st.patient_name.partition("^")
                self.patients[st.patient_id] = self.post({
                    "resourceType": "Patient",
                    "identifier": [{"system": PATIENT_SYSTEM, "value": st.patient_id}],
                    "name": [{"family": family, "given": [given] if given else []}]})
            if st.accession_number not in self.orders:
                self.orders[st.accession_number] = self.post({
                    "resourceType": "ServiceRequest", "status": "active", "intent": "order",
                    "identifier": [{"system": ACCESSION_SYSTEM, "value": st.accession_number}],
                    "subject": {"reference": f"Patient/{self.patients[st.patient_id]}"},
                    "code": {"text": f"{st.modality} imaging"}})

    def find_study(self, study_uid: str,
                   session: requests.Session | None = None) -> list[dict[str, Any]]:
        """The ImagingStudy resources carrying the study's identifier."""
        reply = (session or self.session).get(
            f"{self.base}/ImagingStudy",
            params={"identifier": f"{STUDY_SYSTEM}|urn:oid:{study_uid}"}, timeout=30)
        reply.raise_for_status()
        return [e["resource"] for e in reply.json().get("entry") or []
                if (e.get("search") or {}).get("mode", "match") == "match"]

    def check(self, st: StudyInfo, resource: dict[str, Any], instances: int) -> str | None:
        """What is wrong with the published ``resource`` of ``st`` (None: all right)."""
        if resource.get("numberOfInstances") != instances:
            return f"numberOfInstances {resource.get('numberOfInstances')} != {instances}"
        subject = (resource.get("subject") or {}).get("reference")
        if subject != f"Patient/{self.patients[st.patient_id]}":
            return f"subject {subject!r} is not the seeded Patient"
        orders = [b.get("reference") for b in resource.get("basedOn") or []]
        if orders != [f"ServiceRequest/{self.orders[st.accession_number]}"]:
            return f"basedOn {orders!r} is not the seeded ServiceRequest"
        return None

    def delete(self, resource_ids: Sequence[str]) -> None:
        """Delete ImagingStudy resources by id (outside any measured window)."""
        for rid in resource_ids:  # already gone (404, 410) is fine
            reply = self.session.delete(f"{self.base}/ImagingStudy/{rid}", timeout=30)
            if reply.status_code not in (404, 410):
                reply.raise_for_status()


# -- plain PUT -------------------------------------------------------------------------------------
def copy_ids(tag: str, count: int) -> list[str]:
    """The ids :func:`put_copies` writes for ``tag``."""
    return [f"bench-put-{tag}-{i}" for i in range(count)]


def put_copies(fhir: Fhir, published: Sequence[dict[str, Any]], tag: str,
               workers: int) -> Rate:
    """PUT a copy of each resource under a new id (:func:`copy_ids`) and identifier.

    ``workers`` threads with a session each (1: the harness's own session, sequentially).
    """
    copies = []
    for rid, resource in zip(copy_ids(tag, len(published)), published, strict=True):
        copy = {k: v for k, v in resource.items() if k != "meta"}
        copy["id"] = rid  # and a Study Instance UID identifier of its own
        copy["identifier"] = [{**ident, "value": f"{ident.get('value')}.{rid}"}
                              if ident.get("system") == STUDY_SYSTEM else ident
                              for ident in resource.get("identifier") or []]
        copies.append(copy)
    local = threading.local()

    def put(copy: dict[str, Any]) -> None:
        session = fhir.session if workers == 1 else getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        reply = session.put(f"{fhir.base}/ImagingStudy/{copy['id']}", json=copy, timeout=30)
        if reply.status_code not in (200, 201):
            raise RuntimeError(f"PUT ImagingStudy/{copy['id']}: {reply.status_code} "
                               f"{reply.text[:200]}")

    assert fhir.process is not None
    monitor = TreeMonitor(fhir.process.pid)
    monitor.start()
    own0, t0 = own_cpu_seconds(), time.perf_counter()
    if workers == 1:
        for copy in copies:
            put(copy)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(put, copies))
    seconds, own = time.perf_counter() - t0, own_cpu_seconds() - own0
    return Rate(len(copies), seconds, monitor.stop().cpu_seconds, own)
