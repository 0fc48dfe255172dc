"""The single write path under concurrency (gateway.ingest): stores that run at the same time
share fsyncs and one index commit, yet each succeeds or fails on its own."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest

from gateway.bootstrap import build_services
from gateway.config import load_settings
from gateway.errors import OutOfResources

from samples import fresh_copies


def test_concurrent_stores_are_all_indexed_and_one_failure_stays_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(environ={}, overrides={"storage": {"path": str(tmp_path / "data")}})
    services = build_services(settings)
    files = fresh_copies(tmp_path, 24)
    doomed = pydicom.dcmread(files[5], stop_before_pixels=True).SOPInstanceUID
    upsert = services.index.upsert_instance

    def failing_upsert(conn: Any, record: Any, **kwargs: Any) -> None:  # failure injection
        if record.sop_uid == doomed:
            raise RuntimeError("injected index failure")
        upsert(conn, record, **kwargs)

    monkeypatch.setattr(services.index, "upsert_instance", failing_upsert)
    outcomes: dict[Path, object] = {}

    def store(path: Path) -> None:
        try:
            outcomes[path] = services.ingest.store_file(path, move=False, source="test")
        except OutOfResources as exc:
            outcomes[path] = exc

    threads = [threading.Thread(target=store, args=(p,)) for p in files]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    failed = [p for p, o in outcomes.items() if isinstance(o, OutOfResources)]
    assert failed == [files[5]]
    counts = services.index.counts()
    assert counts["instances"] == 23
    study = services.index.study_row(pydicom.dcmread(files[0]).StudyInstanceUID)
    assert study is not None and study["NumberOfStudyRelatedInstances"] == 23
    assert services.index.find_instance(doomed) is None
    services.close()
