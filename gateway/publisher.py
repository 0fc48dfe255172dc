"""The FHIR publisher: keeps exactly one ImagingStudy per stored study current on the FHIR
server, linked to its Patient, its order and the gateway's DICOMweb Endpoint.

Driven by the outbox (:mod:`gateway.index`): every store, deletion or rejection (re)queues its
study in the same transaction, due once the study has been quiet for
``publish.quiet_seconds``. A store never waits for FHIR and never fails because of it.

For each due study (:meth:`Publisher.publish`):

1. read the study from the index and map it with :mod:`fhir_maps`;
2. the Endpoint: found or created once by its identifier (conditional create);
3. the subject: ``Patient?identifier=system|value`` by the one identity function
   (:func:`fhir_maps.patient_identity`); when there is none, ``publish.patient_policy`` says
   what to do: ``create`` it from the DICOM demographics (conditional create, so two
   publishers never make two), ``hold`` the study until the EMR knows the patient, or refer
   to it by ``identifier`` only;
4. the order: ``ServiceRequest?identifier=<accession>`` → ``basedOn`` (a logical reference by
   the accession number when the server has none);
5. the ImagingStudy: found by ``identifier=urn:dicom:uid|urn:oid:<StudyInstanceUID>``; created
   with ``If-None-Exist`` when absent, else updated with ``If-Match`` on the version read (a
   concurrent edit makes the update fail with 412 and the study is read and merged again).
   A study the index has never recorded as published is created at once, without the search:
   ``If-None-Exist`` makes the server do it (one request less per new study); a 200 (it
   exists after all: a rebuilt index, another replica) leads to the search and update.
   Elements the gateway does not own (notes, extensions, …) are kept.

A study no longer in the index (deleted, or every instance rejected) becomes
``entered-in-error`` or is deleted, per ``publish.on_delete``.

Failures: a transient one (FHIR or OAuth server down, slow, 5xx, 429) is retried with
exponential back-off and jitter (``Retry-After`` respected), forever; a permanent one (a 4xx
with an OperationOutcome, refused credentials or scopes, an ambiguous match, an unmapped
issuer) parks the study in the ``failed`` state with the reason, for an operator to fix and
replay (``imaging-gateway publish --failed / --replay``, ``/api/publish``). Replays and
restarts never duplicate anything: every write is conditional on an identifier.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fhir_maps import (
    IdentifierSystems,
    InstanceFacts,
    MappingError,
    MappingOptions,
    PatientFacts,
    SeriesFacts,
    StudyFacts,
    accession_identifier,
    build_endpoint,
    build_imaging_study,
    build_patient,
    coded_concepts,
    endpoint_search_token,
    patient_identity,
    person_names,
    search_token,
    split_multi,
    study_search_token,
)
from gateway.errors import FhirError, FhirPermanentError, FhirTransientError
from gateway.fhir_client import FhirClient
from gateway.index import Index, OutboxItem

log = logging.getLogger("gateway.publisher")

#: ImagingStudy elements the gateway writes; any other element found on the server is kept.
OWNED = {"identifier", "status", "modality", "subject", "started", "basedOn", "referrer",
         "interpreter", "endpoint", "numberOfSeries", "numberOfInstances", "procedureCode",
         "procedure", "reasonCode", "reason", "description", "series", "text"}


class HoldForPatient(Exception):
    """``patient_policy = hold`` and the FHIR server does not know the patient yet."""


@dataclass(frozen=True)
class PublishPolicy:
    """The ``[publish]`` settings the publisher acts on."""

    patient_policy: str = "create"
    on_delete: str = "entered-in-error"
    include_instances: bool = True
    max_backoff: float = 300.0
    hold_retry: float = 60.0
    lease_seconds: float = 120.0
    batch: int = 16
    poll_seconds: float = 1.0
    workers: int = 4


def study_facts(snapshot: Mapping[str, Any]) -> StudyFacts:
    """The index's view of a study (:meth:`gateway.index.Index.study_snapshot`) as mapping
    facts."""
    study, patient = snapshot["study"], snapshot["patient"]
    attributes = study.get("attributes") or {}
    series = []
    for row in snapshot["series"]:
        series_attributes = row.get("attributes") or {}
        series.append(SeriesFacts(
            series_instance_uid=row["SeriesInstanceUID"], modality=row.get("Modality"),
            number=row.get("SeriesNumber"), description=row.get("SeriesDescription"),
            body_part_examined=row.get("BodyPartExamined"),
            anatomic_region=coded_concepts(series_attributes.get("AnatomicRegionSequence")),
            laterality=row.get("Laterality"), date=row.get("SeriesDate"),
            time=row.get("SeriesTime"),
            performing_physicians=split_multi(row.get("PerformingPhysicianName")),
            operators=split_multi(row.get("OperatorsName")),
            number_of_instances=row.get("NumberOfSeriesRelatedInstances"),
            instances=tuple(InstanceFacts(
                sop_instance_uid=i["SOPInstanceUID"], sop_class_uid=i["SOPClassUID"],
                number=i.get("InstanceNumber"), title=i.get("DocumentTitle"))
                for i in row["instances"])))
    return StudyFacts(
        study_instance_uid=study["StudyInstanceUID"],
        patient=PatientFacts(patient_id=patient.get("PatientID") or "",
                             issuer=patient.get("IssuerOfPatientID") or "",
                             name=patient.get("PatientName"),
                             birth_date=patient.get("PatientBirthDate"),
                             sex=patient.get("PatientSex")),
        date=study.get("StudyDate"), time=study.get("StudyTime"),
        timezone_offset=study.get("TimezoneOffsetFromUTC"),
        accession_number=study.get("AccessionNumber"),
        accession_issuer=study.get("IssuerOfAccessionNumber"),
        study_id=study.get("StudyID"), description=study.get("StudyDescription"),
        referring_physician=study.get("ReferringPhysicianName"),
        reading_physicians=person_names(attributes.get("NameOfPhysiciansReadingStudy")),
        modalities_in_study=split_multi(study.get("ModalitiesInStudy")),
        number_of_series=study.get("NumberOfStudyRelatedSeries"),
        number_of_instances=study.get("NumberOfStudyRelatedInstances"),
        procedure_codes=coded_concepts(attributes.get("ProcedureCodeSequence")),
        reason_codes=coded_concepts(attributes.get("ReasonForPerformedProcedureCodeSequence")),
        series=tuple(series))


def _entries(bundle: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry") or []
            if isinstance(e, dict) and isinstance(e.get("resource"), dict)
            and (e.get("search") or {}).get("mode", "match") == "match"]


class Publisher:
    """Publishes due studies from the outbox to one FHIR server."""

    def __init__(self, index: Index, client: FhirClient, options: MappingOptions,
                 policy: PublishPolicy) -> None:
        self.index = index
        self.client = client
        self.options = options
        self.policy = policy
        self._endpoint: dict[str, Any] | None = None
        self._endpoint_lock = threading.Lock()
        # Striped by patient identity: two studies of a new patient must not both create it.
        self._patient_locks = [threading.Lock() for _ in range(64)]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=max(1, policy.workers),
                                        thread_name_prefix="publish")

    # -- the loop --------------------------------------------------------------------------------
    def start(self) -> None:
        if self.index.is_sqlite:  # one node: leases left by a crash are ours to take back
            released = self.index.release_leases()
            if released:
                log.info("%d studies left mid-publish by the last run are due again", released)
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.run_once()
            except Exception:  # the loop must survive anything, e.g. the index being locked
                log.exception("publisher loop error")
                worked = 0
            if not worked:
                self._stop.wait(self.policy.poll_seconds)

    def run_once(self) -> int:
        """Publish what is due now; returns how many studies were handled."""
        items = self.index.claim_due(limit=self.policy.batch,
                                     lease_seconds=self.policy.lease_seconds)
        # Several studies at once (``publish.workers``): each costs a few round trips to the
        # FHIR server, mostly waiting. A claimed study left undone by a stop is re-claimed.
        list(self._pool.map(self._handle_unless_stopped, items))
        return len(items)

    def _handle_unless_stopped(self, item: OutboxItem) -> str | None:
        return None if self._stop.is_set() else self.handle(item)

    def handle(self, item: OutboxItem) -> str:
        """Publish one claimed study and settle its outbox row: ``published``, ``retry`` or
        ``failed``."""
        started = time.monotonic()
        try:
            self.publish(item.study_uid)
        except HoldForPatient as exc:
            self.index.retry_publish(item, due_at=time.time() + self.policy.hold_retry,
                                     error=str(exc))
            log.info("study %s held: %s", item.study_uid, exc)
            return "retry"
        except FhirTransientError as exc:
            delay = self._backoff(item.attempts, exc.retry_after)
            self.index.retry_publish(item, due_at=time.time() + delay, error=str(exc))
            log.warning("study %s: FHIR unavailable (%s); retry in %.0f s", item.study_uid,
                        exc, delay)
            return "retry"
        except (FhirPermanentError, MappingError) as exc:
            self.index.retry_publish(item, due_at=time.time(), error=str(exc), state="failed")
            log.error("study %s not published (dead letter): %s", item.study_uid, exc)
            return "failed"
        except FhirError as exc:  # any other client error: treat as transient
            delay = self._backoff(item.attempts, None)
            self.index.retry_publish(item, due_at=time.time() + delay, error=str(exc))
            return "retry"
        self.index.finish_publish(item)
        log.info("study %s published (%s) in %.0f ms", item.study_uid, item.reason,
                 (time.monotonic() - started) * 1000)
        return "published"

    def _backoff(self, attempts: int, retry_after: float | None) -> float:
        """Exponential back-off with full jitter, capped; never sooner than Retry-After."""
        ceiling = min(self.policy.max_backoff, 2.0 * 2 ** min(attempts, 16))
        delay = random.uniform(ceiling / 2, ceiling)
        return max(delay, retry_after or 0.0)

    # -- one study -------------------------------------------------------------------------------
    def publish(self, study_uid: str) -> dict[str, Any] | None:
        """Bring the FHIR server in line with the index for one study; returns the
        ImagingStudy as written (None when a removed study had nothing to retract)."""
        snapshot = self.index.study_snapshot(study_uid)
        if snapshot is None:
            return self._retract(study_uid)
        facts = study_facts(snapshot)
        subject = self._subject(facts.patient)
        resource = build_imaging_study(
            facts, self.options, subject=subject, endpoint=self.endpoint_reference(),
            based_on=self._orders(facts), include_instances=self.policy.include_instances)
        written = self._upsert(study_uid, resource,
                               search_first=snapshot.get("published_at") is not None)
        reference = (written.get("subject") or {}).get("reference")
        self.index.record_publication(
            study_uid, patient_reference=reference if isinstance(reference, str) else None,
            imaging_study_id=written.get("id") if isinstance(written.get("id"), str) else None)
        return written

    def endpoint_reference(self) -> dict[str, Any]:
        """The gateway's DICOMweb Endpoint, created once (conditional create by identifier)."""
        with self._endpoint_lock:
            return self._endpoint_once()

    def _endpoint_once(self) -> dict[str, Any]:
        if self._endpoint is None:
            token = endpoint_search_token(self.options.dicomweb_base_url)
            written = self.client.create(build_endpoint(self.options),
                                         if_none_exist={"identifier": token})
            if written.id is None:
                found = _entries(self.client.search("Endpoint", {"identifier": token}))
                if len(found) != 1:
                    raise FhirPermanentError("the Endpoint was written but cannot be found "
                                             "again by its identifier")
                self._endpoint = {"reference": f"Endpoint/{found[0]['id']}"}
            else:
                self._endpoint = {"reference": f"Endpoint/{written.id}"}
        return self._endpoint

    def _subject(self, patient: PatientFacts) -> dict[str, Any] | None:
        identity = patient_identity(patient.patient_id, patient.issuer,
                                    self.options.patient_systems)
        if self.policy.patient_policy == "identifier":
            return None  # fhir_maps writes the logical reference by identifier
        with self._patient_locks[hash(identity.token) % len(self._patient_locks)]:
            return self._find_or_create_patient(patient, identity.token, identity.system)

    def _find_or_create_patient(self, patient: PatientFacts, token: str,
                                system: str) -> dict[str, Any]:
        found = _entries(self.client.search("Patient", {"identifier": token},
                                            elements=["id"]))
        if len(found) > 1:
            raise FhirPermanentError(f"{len(found)} Patients carry the identifier "
                                     f"{system}|…; refusing to guess")
        if found:
            return {"reference": f"Patient/{found[0]['id']}"}
        if self.policy.patient_policy == "hold":
            raise HoldForPatient(f"waiting for a Patient with identifier system "
                                 f"{system} (patient_policy = hold)")
        written = self.client.create(build_patient(patient, self.options),
                                     if_none_exist={"identifier": token})
        if written.id is None:
            raise FhirPermanentError("the Patient was created but the server did not say "
                                     "where")
        return {"reference": f"Patient/{written.id}"}

    def _orders(self, facts: StudyFacts) -> list[dict[str, Any]] | None:
        accession = accession_identifier(facts, self.options)
        if accession is None:
            return []
        value = accession["value"]
        token = search_token(accession["system"], value) if accession.get("system") else value
        found = _entries(self.client.search("ServiceRequest", {"identifier": token},
                                            elements=["id"]))
        if len(found) == 1:
            return [{"reference": f"ServiceRequest/{found[0]['id']}"}]
        return None  # none or several: the logical reference by accession number

    def _existing(self, study_uid: str) -> dict[str, Any] | None:
        found = _entries(self.client.search("ImagingStudy",
                                            {"identifier": study_search_token(study_uid)}))
        if len(found) > 1:
            raise FhirPermanentError(f"{len(found)} ImagingStudy resources carry the study's "
                                     "identifier; resolve the duplicates on the server")
        return found[0] if found else None

    def _upsert(self, study_uid: str, resource: dict[str, Any], *,
                search_first: bool = True) -> dict[str, Any]:
        """Create or update the study's ImagingStudy; ``search_first=False`` tries the
        conditional create before looking for an existing one (a study never published)."""
        for attempt in range(5):
            existing = self._existing(study_uid) if search_first or attempt else None
            if existing is None:
                written = self.client.create(
                    resource, if_none_exist={"identifier": study_search_token(study_uid)})
                if written.status == 201:
                    return written.resource or resource
                continue  # 200: someone else created it meanwhile; update that one
            merged = {k: v for k, v in existing.items() if k not in OWNED and k != "meta"}
            merged.update(resource)
            merged["id"] = existing["id"]
            if _same(existing, merged):
                return existing  # nothing changed: no new version
            version = (existing.get("meta") or {}).get("versionId")
            try:
                written = self.client.update(merged, if_match=version)
            except FhirPermanentError as exc:
                if exc.status in (409, 412):  # edited meanwhile: read and merge again
                    continue
                raise
            return written.resource or merged
        raise FhirTransientError(f"ImagingStudy for study {study_uid} kept changing while "
                                 "being updated")

    def _retract(self, study_uid: str) -> dict[str, Any] | None:
        self.index.forget_publication(study_uid)
        existing = self._existing(study_uid)
        if existing is None:
            return None
        if self.policy.on_delete == "delete":
            self.client.delete("ImagingStudy", existing["id"])
            return None
        if existing.get("status") == "entered-in-error":
            return existing
        retracted = {k: v for k, v in existing.items() if k != "meta"}
        retracted["status"] = "entered-in-error"
        version = (existing.get("meta") or {}).get("versionId")
        written = self.client.update(retracted, if_match=version)
        return written.resource or retracted


def _same(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Whether the server already holds ``wanted`` (ignoring server-managed ``meta``/``text``)."""
    strip = {"meta", "text"}
    return ({k: v for k, v in existing.items() if k not in strip}
            == {k: v for k, v in wanted.items() if k not in strip})


def identifier_systems(by_issuer: Mapping[str, str], default: str | None) -> IdentifierSystems:
    return IdentifierSystems(by_issuer=dict(by_issuer), default=default)


__all__ = ["OWNED", "HoldForPatient", "PublishPolicy", "Publisher", "identifier_systems",
           "study_facts"]
