"""Builds the services from :class:`~gateway.config.Settings`: the only module that knows every
concrete class."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from gateway.config import Settings
from gateway.index import Index
from gateway.ingest import Ingest
from gateway.storage import FileStorage, S3Storage

if TYPE_CHECKING:  # imported where used: a receiver process needs only the write path
    from fhir_maps import MappingOptions
    from gateway.cohort import Cohorts
    from gateway.fhir_client import FhirClient
    from gateway.publisher import Publisher


@dataclass
class Services:
    """Everything an entry point needs, wired once."""

    settings: Settings
    storage: FileStorage
    index: Index
    ingest: Ingest
    cohorts: Cohorts
    publisher: Publisher | None = None
    fhir: FhirClient | None = None

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.stop()
        if self.fhir is not None:
            self.fhir.close()
        self.index.close()
        self.storage.close()


def settle_heap() -> None:
    """Once a server process has started (every library loaded, services built): collect the
    start-up garbage, then move what remains out of the garbage collector's sight for good
    (:func:`gc.freeze`).

    Why: the collector's full collections walk every tracked object, and a server's
    ~110,000 start-up objects (SQLAlchemy, pydicom's dictionaries, fhir.resources' models) made
    each take 20-120 ms here, holding the GIL, so every association of the process stalled
    that long, several times a minute under load. Those objects live as long as the process;
    frozen, they are never walked again. What the process allocates later is collected as
    usual."""
    gc.collect()
    gc.freeze()


def open_storage(settings: Settings) -> FileStorage:
    """The blob store ``[storage]`` names: files under its path, or an S3 bucket."""
    given = settings.storage
    if given["backend"] == "s3":
        return S3Storage(settings.storage_path, bucket=given["s3_bucket"],
                         prefix=given["s3_prefix"], endpoint_url=given["s3_endpoint_url"],
                         region=given["s3_region"], cache_max_bytes=given["cache_max_bytes"])
    return FileStorage(settings.storage_path, fsync=given["fsync"],
                       fsync_directories=given["fsync_directories"],
                       cache_new_blobs=given["cache_new_blobs"])


def build_write_path(settings: Settings, *,
                     create_schema: bool = True) -> tuple[FileStorage, Index, Ingest]:
    """Open storage and index (creating them if new) and wire the write path over them."""
    storage = open_storage(settings)
    index = Index(settings.index_url, quiet_seconds=settings.publish["quiet_seconds"])
    if create_schema:
        index.create_schema()
    ingest = Ingest(storage, index, duplicate_policy=settings.storage["duplicate_policy"],
                    min_free_bytes=settings.storage["min_free_bytes"])
    return storage, index, ingest


def build_services(settings: Settings, *, create_schema: bool = True) -> Services:
    """The write path, the FHIR client, cohorts and the publisher."""
    from gateway.cohort import Cohorts
    from gateway.fhir_client import FhirClient

    storage, index, ingest = build_write_path(settings, create_schema=create_schema)
    client = FhirClient.from_settings({**settings.fhir, "scope": settings.fhir_scope})
    options = mapping_options(settings)
    cohorts = Cohorts(index, client, options,
                      cache_seconds=settings.cohorts["cache_seconds"])
    return Services(settings=settings, storage=storage, index=index, ingest=ingest,
                    cohorts=cohorts, publisher=build_publisher(settings, index, client),
                    fhir=client)


def mapping_options(settings: Settings) -> MappingOptions:
    """What fhir_maps needs to know about this site (``[publish]``, ``[fhir]``, the URL)."""
    from fhir_maps import IdentifierSystems, MappingOptions

    publish = settings.publish
    zone = publish["timezone"]
    return MappingOptions(
        fhir_version=settings.fhir["version"],
        dicomweb_base_url=settings.dicomweb_url,
        patient_systems=IdentifierSystems(publish["patient_systems"],
                                          publish["patient_system"]),
        accession_systems=IdentifierSystems(publish["accession_systems"],
                                            publish["accession_system"]),
        default_timezone=ZoneInfo(zone) if zone else None)


def build_publisher(settings: Settings, index: Index,
                    client: FhirClient | None) -> Publisher | None:
    """The FHIR publisher, or None when ``fhir.base_url`` is not set (publishing off)."""
    from gateway.publisher import Publisher, PublishPolicy

    if client is None:
        return None
    publish = settings.publish
    policy = PublishPolicy(
        patient_policy=publish["patient_policy"], on_delete=publish["on_delete"],
        include_instances=publish["include_instances"],
        max_backoff=float(publish["max_backoff"]), hold_retry=float(publish["hold_seconds"]),
        workers=publish["workers"],
        poll_seconds=min(1.0, max(0.1, publish["quiet_seconds"] / 4)))
    return Publisher(index, client, mapping_options(settings), policy)
