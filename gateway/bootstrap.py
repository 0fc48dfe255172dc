"""Builds the services from :class:`~gateway.config.Settings`: the only module that knows every
concrete class."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import Settings
from gateway.index import Index
from gateway.ingest import Ingest
from gateway.storage import FileStorage


@dataclass
class Services:
    """Everything an entry point needs, wired once."""

    settings: Settings
    storage: FileStorage
    index: Index
    ingest: Ingest

    def close(self) -> None:
        self.index.close()


def build_services(settings: Settings, *, create_schema: bool = True) -> Services:
    """Open storage and index (creating them if new) and wire the write path."""
    storage = FileStorage(settings.storage_path, fsync=settings.storage["fsync"])
    index = Index(settings.index_url)
    if create_schema:
        index.create_schema()
    ingest = Ingest(storage, index, duplicate_policy=settings.storage["duplicate_policy"],
                    min_free_bytes=settings.storage["min_free_bytes"])
    return Services(settings=settings, storage=storage, index=index, ingest=ingest)
