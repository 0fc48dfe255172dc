"""The gateway on a real PostgreSQL index (``index.url = postgresql+psycopg://…``): the same
write path, query engine and outbox as on SQLite. (The query engine's whole table of
matching cases also runs on PostgreSQL: tests/test_query.py.)"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import requests
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from gateway.config import load_settings
from gateway.index import Index, OutboxItem

from conftest import GatewayProcess, dcmtk_env, require_dcmtk
from samples import fresh_copies


def test_store_query_retrieve_and_delete_on_postgresql(
        make_gateway: Callable[..., GatewayProcess], postgres_url: str, tmp_path: Path) -> None:
    require_dcmtk()
    gateway = make_gateway(extra={"index": {"url": postgres_url}}).start()
    files = fresh_copies(tmp_path, 12)
    halves = (files[:6], files[6:])
    senders = [subprocess.Popen(["storescu", "-aec", gateway.ae_title, "127.0.0.1",
                                 str(gateway.dimse_port), *map(str, half)], env=dcmtk_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for half in halves]  # two associations writing at once
    assert [s.wait(60) for s in senders] == [0, 0]

    (study,) = requests.get(f"{gateway.dicomweb}/studies", timeout=10).json()
    assert study["00201208"]["Value"] == [12]
    study_uid = study["0020000D"]["Value"][0]

    ae = AE(ae_title="PGSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", gateway.dimse_port, ae_title=gateway.ae_title)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.StudyInstanceUID = study_uid
    identifier.SOPInstanceUID = ""
    found = [ds for status, ds in assoc.send_c_find(
        identifier, StudyRootQueryRetrieveInformationModelFind) if ds is not None]
    assoc.release()
    assert len(found) == 12

    retrieved = requests.get(f"{gateway.dicomweb}/studies/{study_uid}", timeout=30, headers={
        "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert retrieved.status_code == 200 and retrieved.content.count(b"DICM") == 12

    assert requests.delete(f"{gateway.dicomweb}/studies/{study_uid}",
                           timeout=10).status_code == 204
    assert requests.get(f"{gateway.dicomweb}/studies", timeout=10).json() == []


def test_two_publishers_never_claim_the_same_study(postgres_url: str) -> None:
    """FOR UPDATE SKIP LOCKED (PostgreSQL): replicas claim side by side, each study once."""
    index = Index(postgres_url, quiet_seconds=0)
    index.create_schema()
    with index.write() as conn:
        for number in range(40):
            index.queue_publish(conn, f"1.2.3.{number}", "instances-added", now=0.0)
    claimed: list[list[OutboxItem]] = [[], []]

    def claim(slot: int) -> None:
        while batch := index.claim_due(limit=3, lease_seconds=60):
            claimed[slot].extend(batch)

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    uids = [item.study_uid for slot in claimed for item in slot]
    assert sorted(uids) == sorted(f"1.2.3.{n}" for n in range(40)), "each study exactly once"
    index.close()


def test_settings_accept_a_postgresql_url(postgres_url: str) -> None:
    settings = load_settings(environ={"GATEWAY_INDEX_URL": postgres_url})
    assert settings.index_url == postgres_url
