"""A study's clinical context: what the EMR's FHIR server knows that a reader needs beside the
images, as one FHIR R4 ``searchset`` Bundle (:meth:`ClinicalContext.study_context`).

The Bundle holds the ImagingStudy (``search.mode = match``; absent when the study is not
published), its Patient, its order(s) (ServiceRequest), the Encounter, the DiagnosticReports
about the study and the patient's active Conditions (``include``) and, when something could
not be found, an OperationOutcome saying what (``outcome``). It is what a server with the right
``_include``/``_revinclude`` support would answer to ``ImagingStudy?identifier=``. The patient's
timeline (:mod:`gateway.history`) reads through the same :class:`ClinicalContext`.

How things are found (FHIR R4 search.html; the parameters are in each resource's search page):

=================  ==============================================================================
the ImagingStudy   ``ImagingStudy?identifier=urn:dicom:uid|urn:oid:<uid>``
                   (:func:`fhir_maps.study_search_token`)
the Patient        the ImagingStudy's ``subject``: read, or ``Patient?identifier=`` for a logical
                   reference; for a study not published, the one identity rule
                   (:func:`fhir_maps.patient_identity`) on the index's PatientID/Issuer →
                   ``Patient?identifier=system|value``
the order          ``ImagingStudy.basedOn``: read, or ``ServiceRequest?identifier=`` for a
                   logical reference by accession number; for a study not published, its
                   accession identifier (:func:`fhir_maps.accession_identifier`). Orders of
                   another patient are left out.
the Encounter      ``ImagingStudy.encounter``, else each order's ``encounter``
reports            ``DiagnosticReport?patient=Patient/<id>&_elements=imagingStudy,basedOn``, kept
                   when ``imagingStudy`` names the ImagingStudy or ``basedOn`` one of the orders,
                   then fetched whole by ``_id``. FHIR R4 has no search parameter on
                   ``DiagnosticReport.imagingStudy`` (R5 adds ``study``; sekmet-fhir has none),
                   so ``DiagnosticReport?imaging-study=`` is not portable. Without a Patient:
                   ``DiagnosticReport?based-on=ServiceRequest/<id>``.
Conditions         ``Condition?patient=Patient/<id>&clinical-status=`` active, recurrence or
                   relapse (condition-clinical: the last two are kinds of active)
=================  ==============================================================================

Resources marked ``entered-in-error`` (``status``, or a Condition's ``verificationStatus``) are
left out everywhere: they were never true.

Failures are not hidden: any FHIR error propagates (:class:`~gateway.errors.FhirError`, with the
server's OperationOutcome), so no caller shows an outage as an empty context. Only a resource
another one *references* that is gone (404/410 on read) becomes a warning. Two resources where
one is expected (two ImagingStudy resources for one study, two Patients for one identifier) are
refused with :class:`~gateway.errors.FhirPermanentError`, as the publisher does: another
patient's record beside the images is the worst possible answer.

The access token must allow reading these types (SMART ``system/Patient.rs``,
``ImagingStudy.rs``, ``ServiceRequest.rs``, ``Encounter.rs``, ``Condition.rs``,
``Procedure.rs``, ``DiagnosticReport.rs``; the default ``fhir.scope``, ``system/*.rs`` …, does).
A refused scope surfaces as the server's 403 OperationOutcome.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from fhir_maps import (
    MappingOptions,
    PatientFacts,
    StudyFacts,
    UnmappedPatientIdentity,
    accession_identifier,
    patient_identity,
    search_token,
    study_search_token,
)
from gateway.errors import FhirPermanentError, NotFound
from gateway.fhir_client import FhirClient
from gateway.index import Index
from gateway.query import Condition, Query, run
from gateway.storage import is_valid_uid

__all__ = ["ACTIVE_CLINICAL_STATUS", "ClinicalContext", "Json", "chunks", "entered_in_error"]

CLINICAL_STATUS = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION_STATUS = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
#: condition-clinical codes that mean "active": ``recurrence`` and ``relapse`` are kinds of
#: ``active`` in that code system's hierarchy.
ACTIVE_CLINICAL_STATUS = ("active", "recurrence", "relapse")
_ID_CHUNK = 50  # ids per ``_id=`` search

Json = dict[str, Any]
Warnings = list[tuple[str, str, str]]  # (severity, issue type, text) for the OperationOutcome


def _outcome(issues: Sequence[tuple[str, str, str]]) -> Json:
    return {"resourceType": "OperationOutcome", "issue": [
        {"severity": severity, "code": code, "diagnostics": text}
        for severity, code, text in issues]}


def chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    """``items`` in slices of at most ``size`` (for OR lists that must stay short)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def entered_in_error(resource: Mapping[str, Any]) -> bool:
    """Whether the resource is marked as never having been true: ``status`` (Encounter,
    Procedure, DiagnosticReport, ServiceRequest, ImagingStudy) or a Condition's
    ``verificationStatus`` ``entered-in-error``."""
    if resource.get("status") == "entered-in-error":
        return True
    verification = resource.get("verificationStatus")
    return isinstance(verification, dict) and any(
        isinstance(c, dict) and c.get("code") == "entered-in-error"
        for c in verification.get("coding") or [])


# -- the service -----------------------------------------------------------------------------------
class ClinicalContext:
    """Reads the FHIR server and the index for the reader's views: the study context here, the
    patient's timeline in :mod:`gateway.history`.

    Parameters
    ----------
    index
        The gateway's index.
    client
        The FHIR server (the publisher's client: same server, same credentials).
    options
        The site's mapping options: the identifier systems of the one identity rule.
    dicomweb_url
        The gateway's DICOMweb base (``settings.dicomweb_url``), for Retrieve URLs.
    page_size
        ``_count`` asked for on searches that page.
    """

    def __init__(self, index: Index, client: FhirClient, options: MappingOptions,
                 dicomweb_url: str, *, page_size: int = 100) -> None:
        self.index = index
        self.client = client
        self.options = options
        self.dicomweb_url = dicomweb_url.rstrip("/")
        self.page_size = page_size

    # -- references ------------------------------------------------------------------------------
    def local_id(self, reference: Any, resource_type: str) -> str | None:
        """The id in a literal reference to ``resource_type`` on this server (``Type/id``,
        ``Type/id/_history/v`` or the absolute URL under the base), else None (a logical
        reference, a contained resource, another server, another type)."""
        if not isinstance(reference, dict) or not isinstance(reference.get("reference"), str):
            return None
        text: str = reference["reference"]
        base = self.client.base_url + "/"
        if text.startswith(base):
            text = text[len(base):]
        elif "://" in text:
            return None
        parts = text.split("/")
        if len(parts) >= 2 and parts[0] == resource_type and re.fullmatch(
                r"[A-Za-z0-9\-.]{1,64}", parts[1]):
            return parts[1]
        return None

    def _read_referenced(self, resource_type: str, resource_id: str,
                         warnings: Warnings) -> Json | None:
        """Read a resource another one points to; gone (404/410) is a warning, not an error."""
        try:
            resource = self.client.read(resource_type, resource_id)
        except FhirPermanentError as exc:
            if exc.status in (404, 410):
                warnings.append(("warning", "not-found",
                                 f"{resource_type}/{resource_id} is referenced but the FHIR "
                                 f"server no longer has it (HTTP {exc.status})"))
                return None
            raise
        if entered_in_error(resource):
            warnings.append(("warning", "not-found", f"{resource_type}/{resource_id} is "
                             "referenced but marked entered-in-error; left out"))
            return None
        return resource

    def search_all(self, resource_type: str, params: Mapping[str, str | Sequence[str]],
                   elements: Sequence[str] | None = None) -> list[Json]:
        """Every ``resource_type`` a search matches, all pages, ``entered-in-error`` left out."""
        return [r for r in self.client.search_all(resource_type, params, elements=elements,
                                                  count=self.page_size)
                if r.get("resourceType") == resource_type and not entered_in_error(r)]

    def _by_identifier(self, resource_type: str, identifier: Mapping[str, Any]) -> list[Json]:
        """``[type]?identifier=system|value``; nothing for an identifier without a system
        (it would match other namespaces' values: see :mod:`fhir_maps.identity`)."""
        system, value = identifier.get("system"), identifier.get("value")
        if not isinstance(system, str) or not system or not isinstance(value, str) or not value:
            return []
        return self.search_all(resource_type, {"identifier": search_token(system, value)})

    # -- the held study --------------------------------------------------------------------------
    def _held_study(self, study_uid: str) -> StudyFacts:
        """What the index knows of a held study that the FHIR searches need."""
        if not is_valid_uid(study_uid):
            raise NotFound("not a valid Study Instance UID")
        found = run(self.index, Query("STUDY", (Condition("StudyInstanceUID", (study_uid,)),)))
        row = self.index.study_row(study_uid)  # for IssuerOfAccessionNumber, not a query key
        if not found.matches or row is None:
            raise NotFound(f"the gateway holds no study {study_uid}")
        match = found.matches[0]
        return StudyFacts(
            study_instance_uid=study_uid,
            patient=PatientFacts(patient_id=match["PatientID"] or "",
                                 issuer=match["IssuerOfPatientID"] or ""),
            accession_number=row.get("AccessionNumber"),
            accession_issuer=row.get("IssuerOfAccessionNumber"))

    def _imaging_study(self, study_uid: str) -> Json | None:
        found = self.search_all("ImagingStudy", {"identifier": study_search_token(study_uid)})
        if len(found) > 1:
            raise FhirPermanentError(
                f"{len(found)} ImagingStudy resources carry the identifier of study "
                f"{study_uid}; resolve the duplicates on the server",
                outcome=_outcome([("error", "multiple-matches",
                                   f"{len(found)} ImagingStudy resources carry the identifier "
                                   f"of study {study_uid}")]))
        return found[0] if found else None

    def _patient_by_identifier(self, identifier: Mapping[str, Any]) -> Json | None:
        found = self._by_identifier("Patient", identifier)
        if len(found) > 1:
            raise FhirPermanentError(
                f"{len(found)} Patients carry the study's patient identifier; refusing to "
                "guess", outcome=_outcome([("error", "multiple-matches",
                                            f"{len(found)} Patients carry the study's patient "
                                            "identifier (system "
                                            f"{identifier.get('system')}); refusing to guess")]))
        return found[0] if found else None

    def _study_patient(self, imaging_study: Json | None, facts: StudyFacts,
                       warnings: Warnings) -> Json | None:
        if imaging_study is not None:
            subject = imaging_study.get("subject")
            patient_id = self.local_id(subject, "Patient")
            if patient_id is not None:
                return self._read_referenced("Patient", patient_id, warnings)
            logical = (subject or {}).get("identifier") if isinstance(subject, dict) else None
            if isinstance(logical, dict):
                found = self._patient_by_identifier(logical)
                if found is None:
                    warnings.append(("warning", "not-found", "the FHIR server has no Patient "
                                     "with the ImagingStudy's subject identifier"))
                return found
            warnings.append(("warning", "not-supported", "the ImagingStudy's subject is not a "
                             "Patient on this server"))
            return None
        try:
            identity = patient_identity(facts.patient.patient_id, facts.patient.issuer,
                                        self.options.patient_systems)
        except UnmappedPatientIdentity as exc:
            warnings.append(("warning", "not-found", f"the study's patient has no FHIR "
                             f"identity: {exc}"))
            return None
        found = self._patient_by_identifier(identity.identifier())
        if found is None:
            warnings.append(("warning", "not-found", "the FHIR server has no Patient with the "
                             "study's patient identifier"))
        return found

    def _orders(self, imaging_study: Json | None, facts: StudyFacts, patient_ref: str | None,
                warnings: Warnings) -> list[Json]:
        references: list[Any] = []
        if imaging_study is not None:
            references = [r for r in imaging_study.get("basedOn") or [] if isinstance(r, dict)]
        else:
            accession = accession_identifier(facts, self.options)
            if accession is not None:
                references = [{"type": "ServiceRequest", "identifier": accession}]
        orders: list[Json] = []
        for reference in references:
            order_id = self.local_id(reference, "ServiceRequest")
            if order_id is not None:
                read = self._read_referenced("ServiceRequest", order_id, warnings)
                orders.extend([read] if read is not None else [])
            elif isinstance(reference.get("identifier"), dict) and reference.get(
                    "type", "ServiceRequest") == "ServiceRequest":
                found = self._by_identifier("ServiceRequest", reference["identifier"])
                mine = [o for o in found if patient_ref is None or o.get("subject") is None
                        or self.canonical(o.get("subject"), "Patient") == patient_ref]
                if len(mine) < len(found):
                    warnings.append(("warning", "conflict", f"{len(found) - len(mine)} "
                                     "ServiceRequest(s) with the study's accession number "
                                     "belong to another patient; left out"))
                if not found:
                    warnings.append(("information", "not-found", "no ServiceRequest carries "
                                     "the study's accession number"))
                orders.extend(mine)
        return orders

    def _encounters(self, imaging_study: Json | None, orders: Iterable[Json],
                    warnings: Warnings) -> list[Json]:
        sources = [imaging_study] if imaging_study is not None and imaging_study.get(
            "encounter") else list(orders)
        ids = dict.fromkeys(i for i in (self.local_id(s.get("encounter"), "Encounter")
                                        for s in sources) if i is not None)
        found = [self._read_referenced("Encounter", i, warnings) for i in ids]
        return [e for e in found if e is not None]

    def _reports(self, imaging_study: Json | None, orders: Sequence[Json],
                 patient_ref: str | None) -> list[Json]:
        """DiagnosticReports about the study: ``imagingStudy`` names it or ``basedOn`` names
        one of its orders (module doc: R4 cannot search on ``imagingStudy``)."""
        study_ref = f"ImagingStudy/{imaging_study['id']}" if imaging_study else None
        order_refs = {f"ServiceRequest/{o['id']}" for o in orders}
        if patient_ref is not None:
            wanted = []
            for report in self.search_all("DiagnosticReport", {"patient": patient_ref},
                                           elements=("imagingStudy", "basedOn")):
                studies = {self.canonical(r, "ImagingStudy")
                           for r in report.get("imagingStudy") or []}
                based_on = {self.canonical(r, "ServiceRequest")
                            for r in report.get("basedOn") or []}
                if (study_ref is not None and study_ref in studies) or (based_on & order_refs):
                    wanted.append(str(report["id"]))
            reports: list[Json] = []
            for chunk in chunks(sorted(set(wanted)), _ID_CHUNK):
                reports.extend(self.search_all("DiagnosticReport", {"_id": ",".join(chunk)}))
            return reports
        reports = []
        for order_ref in sorted(order_refs):
            reports.extend(self.search_all("DiagnosticReport", {"based-on": order_ref}))
        return reports

    def canonical(self, reference: Any, resource_type: str) -> str | None:
        found = self.local_id(reference, resource_type)
        return f"{resource_type}/{found}" if found is not None else None

    def study_context(self, study_uid: str) -> Json:
        """The clinical context of one held study, as a FHIR R4 ``searchset`` Bundle.

        Parameters
        ----------
        study_uid
            Study Instance UID (0020,000D) of a study the gateway holds.

        Returns
        -------
        dict
            ``Bundle`` (R4 bundle.html) of type ``searchset``: the ImagingStudy as ``match``
            (absent when the study is not published), then as ``include`` the Patient, the
            ServiceRequest(s), the Encounter(s), the DiagnosticReports that reference the
            ImagingStudy (``imagingStudy``) or an order (``basedOn``), and the Patient's
            active Conditions (``clinical-status`` active, recurrence, relapse); an
            OperationOutcome (``outcome``) lists what could not be found. ``total`` counts
            the matches (0 or 1).

        Raises
        ------
        NotFound
            The gateway does not hold the study (or the UID is not valid).
        FhirError
            The FHIR server failed or refused a request (its OperationOutcome attached); or
            it holds two ImagingStudy resources for the study, or two Patients for its
            patient identifier.
        """
        facts = self._held_study(study_uid)
        warnings: Warnings = []
        imaging_study = self._imaging_study(study_uid)
        if imaging_study is None:
            warnings.append(("information", "not-found", "the study is not published to the "
                             "FHIR server (yet): no ImagingStudy carries its identifier"))
        subject = self._study_patient(imaging_study, facts, warnings)
        patient_ref = f"Patient/{subject['id']}" if subject else None
        orders = self._orders(imaging_study, facts, patient_ref, warnings)
        encounters = self._encounters(imaging_study, orders, warnings)
        reports = self._reports(imaging_study, orders, patient_ref)
        conditions: list[Json] = []
        if patient_ref is not None:
            conditions = self.search_all("Condition", {
                "patient": patient_ref,
                "clinical-status": ",".join(search_token(CLINICAL_STATUS, code)
                                            for code in ACTIVE_CLINICAL_STATUS)})
        entries: list[Json] = []
        seen: set[tuple[str, str]] = set()

        def add(resource: Json | None, mode: str) -> None:
            if resource is None:
                return
            key = (str(resource.get("resourceType")), str(resource.get("id")))
            if key in seen:
                return
            seen.add(key)
            entries.append({"fullUrl": f"{self.client.base_url}/{key[0]}/{key[1]}",
                            "resource": resource, "search": {"mode": mode}})

        add(imaging_study, "match")
        for resource in [subject, *orders, *encounters, *reports, *conditions]:
            add(resource, "include")
        if warnings:
            entries.append({"resource": _outcome(warnings), "search": {"mode": "outcome"}})
        return {"resourceType": "Bundle", "type": "searchset",
                "total": 1 if imaging_study is not None else 0, "entry": entries}
