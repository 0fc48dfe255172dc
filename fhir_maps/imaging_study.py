"""StudyFacts → FHIR ImagingStudy (R4 4.0.1 by default, R5 5.0.0 on request).

Element by element, with the DICOM source each comes from (FHIR R4 imagingstudy-mappings,
DICOM tab; standards digest §1.1). Elements whose source is absent or invalid are left out.

========================  ==========================================================
ImagingStudy              DICOM
========================  ==========================================================
identifier                Study Instance UID (``urn:dicom:uid`` / ``urn:oid:<uid>``);
                          Accession Number + Issuer (type ACSN); Study ID
status                    the caller's (default ``available``)
modality                  Modalities in Study ∪ series Modality, acquisition only (CID 29)
subject                   Patient ID + Issuer (see :mod:`fhir_maps.identity`)
started                   Study Date + Study Time + Timezone Offset From UTC
basedOn                   the order: the caller's reference, else the accession number
referrer                  Referring Physician's Name
interpreter (R4 only)     Name of Physician(s) Reading Study
endpoint                  the caller's Endpoint reference (see :mod:`fhir_maps.endpoint`)
numberOfSeries/Instances  (0020,1206)/(0020,1208), else counted
procedureCode / procedure Procedure Code Sequence
reasonCode / reason       Reason For Performed Procedure Code Sequence
description               Study Description
series.uid/number         Series Instance UID, Series Number
series.modality           Modality
series.description        Series Description
series.numberOfInstances  (0020,1209), else counted
series.bodySite           Anatomic Region Sequence, else Body Part Examined (PS3.16 Annex L)
series.laterality         Laterality
series.started            Series Date + Series Time (+ the study's offset)
series.performer          Performing Physician's Name (PRF), Operators' Name (SPRF)
series.instance           SOP Instance UID, SOP Class UID, Instance Number, title
========================  ==========================================================

R5 changes (standards digest §1.4): modality and series.modality become CodeableConcepts,
series.bodySite a CodeableReference (``{"concept": …}``), laterality a CodeableConcept (CID
244 codes), procedureCode → ``procedure`` and reasonCode → ``reason`` (CodeableReference),
interpreter is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from fhir_maps.body_parts import series_body_site
from fhir_maps.dicom_values import clean_text, fhir_datetime
from fhir_maps.errors import MappingError
from fhir_maps.facts import (
    CodedConcept,
    ImagingStudyStatus,
    InstanceFacts,
    MappingOptions,
    SeriesFacts,
    StudyFacts,
)
from fhir_maps.identity import issuer_system, patient_identity, search_token
from fhir_maps.names import display_name
from fhir_maps.terminology import (
    DCM,
    PARTICIPATION_TYPE,
    URI_SYSTEM,
    V2_0203,
    codeable,
    concept_codeable,
    is_acquisition_modality,
    laterality_coding,
    modality_coding,
)

Json = dict[str, Any]

#: ImagingStudy.identifier system for the Study Instance UID (R4 imagingstudy notes).
STUDY_UID_SYSTEM = "urn:dicom:uid"
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_STATUSES = ("registered", "available", "cancelled", "entered-in-error", "unknown")
#: Identifier.type of an accession number: v2-0203 ACSN and DICOM 121022 (as IHE MADO does).
ACCESSION_TYPE: Json = {"coding": [
    {"system": V2_0203, "code": "ACSN", "display": "Accession ID"},
    {"system": DCM, "code": "121022", "display": "Accession Number"},
]}


def _uid(value: str, what: str) -> str:
    value = value.strip()
    if len(value) > 64 or not _UID.fullmatch(value):
        raise MappingError(f"{what} {value[:80]!r} is not a valid DICOM UID")
    return value


def study_identifier(study_uid: str) -> Json:
    """The ImagingStudy identifier of a Study Instance UID (``urn:dicom:uid``)."""
    return {"use": "official", "system": STUDY_UID_SYSTEM,
            "value": f"urn:oid:{_uid(study_uid, 'Study Instance UID')}"}


def study_search_token(study_uid: str) -> str:
    """``urn:dicom:uid|urn:oid:<uid>`` for ``ImagingStudy?identifier=`` (conditional update)."""
    return search_token(STUDY_UID_SYSTEM, f"urn:oid:{_uid(study_uid, 'Study Instance UID')}")


def accession_identifier(study: StudyFacts, options: MappingOptions) -> Json | None:
    """The accession number as a FHIR Identifier (type ACSN), or None without one.

    ``system`` comes from ``options.accession_systems`` by the same rule as patient
    identifiers (:func:`fhir_maps.identity.issuer_system`): an issuer that is present but not
    configured gets no system (never the default), and is named in ``assigner.display``.
    Without a system the identifier is informative only; do not search on it.
    """
    value = clean_text(study.accession_number)
    if value is None:
        return None
    issuer = clean_text(study.accession_issuer)
    identifier: Json = {"use": "usual", "type": ACCESSION_TYPE}
    system = issuer_system(issuer, options.accession_systems)
    if system:
        identifier["system"] = system
    identifier["value"] = value
    if issuer:
        identifier["assigner"] = {"display": issuer}
    return identifier


def order_reference(study: StudyFacts, options: MappingOptions) -> Json | None:
    """A logical reference to the ServiceRequest the study fulfils, by accession number.

    R4 imagingstudy notes: the accession number may be carried as
    ``basedOn.identifier`` (type ACSN) when the order's resource id is not known.
    """
    identifier = accession_identifier(study, options)
    if identifier is None:
        return None
    return {"type": "ServiceRequest", "identifier": identifier}


def patient_reference(study: StudyFacts, options: MappingOptions) -> Json:
    """A logical reference to the study's Patient by identifier.

    Raises
    ------
    UnmappedPatientIdentity
        When the patient key has no configured identifier system.
    """
    identity = patient_identity(study.patient.patient_id, study.patient.issuer,
                                options.patient_systems)
    return {"type": "Patient", "identifier": identity.identifier()}


def _modality(code: str | None, version: str) -> Json:
    coding = modality_coding(code)
    return coding if version == "R4" else codeable(coding)


def _study_modalities(study: StudyFacts) -> list[str]:
    codes = {clean_text(m) for m in study.modalities_in_study}
    codes |= {clean_text(s.modality) for s in study.series}
    return sorted(c for c in codes if c and is_acquisition_modality(c))


def _sort_key(number: int | None, uid: str) -> tuple[bool, int, str]:
    return number is None, number or 0, uid


def _instance(instance: InstanceFacts) -> Json:
    entry: Json = {"uid": _uid(instance.sop_instance_uid, "SOP Instance UID"),
                   "sopClass": {"system": URI_SYSTEM, "code":
                                f"urn:oid:{_uid(instance.sop_class_uid, 'SOP Class UID')}"}}
    if instance.number is not None and instance.number >= 0:
        entry["number"] = instance.number
    title = clean_text(instance.title)
    if title:
        entry["title"] = title
    return entry


def _codeables(concepts: Sequence[CodedConcept], options: MappingOptions) -> list[Json]:
    found = (concept_codeable(c, options.coding_systems) for c in concepts)
    return [c for c in found if c is not None]


def _performers(series: SeriesFacts) -> list[Json]:
    performers = []
    for names, code, display in ((series.performing_physicians, "PRF", "performer"),
                                 (series.operators, "SPRF", "secondary performer")):
        function = codeable({"system": PARTICIPATION_TYPE, "code": code, "display": display})
        for name in names:
            shown = display_name(name)
            if shown:
                performers.append({"function": function, "actor": {"display": shown}})
    return performers


def _series(series: SeriesFacts, study: StudyFacts, options: MappingOptions,
            include_instances: bool) -> Json:
    version = options.fhir_version
    entry: Json = {"uid": _uid(series.series_instance_uid, "Series Instance UID")}
    if series.number is not None and series.number >= 0:
        entry["number"] = series.number
    entry["modality"] = _modality(series.modality, version)
    description = clean_text(series.description)
    if description:
        entry["description"] = description
    count = series.number_of_instances
    entry["numberOfInstances"] = len(series.instances) if count is None else count
    body_site = series_body_site(series.body_part_examined, series.anatomic_region)
    if body_site is not None:
        entry["bodySite"] = body_site if version == "R4" else {"concept": codeable(body_site)}
    laterality = laterality_coding(series.laterality, version)
    if laterality is not None:
        entry["laterality"] = laterality if version == "R4" else codeable(laterality)
    started = fhir_datetime(series.date, series.time, offset=study.timezone_offset,
                            default_timezone=options.default_timezone)
    if started:
        entry["started"] = started
    performers = _performers(series)
    if performers:
        entry["performer"] = performers
    if include_instances and series.instances:
        instances = sorted(series.instances, key=lambda i: _sort_key(i.number,
                                                                      i.sop_instance_uid))
        entry["instance"] = [_instance(i) for i in instances]
    return entry


def build_imaging_study(study: StudyFacts, options: MappingOptions, *,
                        subject: Mapping[str, Any] | None = None,
                        endpoint: Mapping[str, Any] | None = None,
                        based_on: Sequence[Mapping[str, Any]] | None = None,
                        status: ImagingStudyStatus = "available",
                        include_instances: bool = True) -> Json:
    """The ImagingStudy JSON (as sent on the wire) for one study.

    Parameters
    ----------
    study
        The study, its patient, series and instances.
    options
        FHIR version, identifier systems, default time zone, extra coding schemes.
    subject
        Reference to the Patient, e.g. ``{"reference": "Patient/123"}`` once resolved, or a
        conditional reference inside a transaction. None: a logical reference by the patient
        identifier (:func:`patient_reference`).
    endpoint
        Reference to the DICOMweb Endpoint (:func:`fhir_maps.build_endpoint`); None leaves
        ``endpoint`` out.
    based_on
        References to the order(s). None: a logical ServiceRequest reference by accession
        number when there is one (:func:`order_reference`); ``[]``: no ``basedOn``.
    status
        ImagingStudy.status (``available`` for a stored study; ``entered-in-error`` when the
        whole study was rejected, IHE IOCM).
    include_instances
        False to publish series without their instance lists (large studies; the counts
        stay).

    Returns
    -------
    dict
        The resource without ``id``/``meta`` (the server assigns them; publish with a
        conditional update on :func:`study_search_token`). Series are ordered by Series
        Number then UID, instances by Instance Number then UID, so an unchanged study maps to
        identical JSON.

    Raises
    ------
    MappingError
        A UID is not a valid DICOM UID, or ``status`` is not an ImagingStudy status.
    UnmappedPatientIdentity
        ``subject`` is None and the patient key cannot be mapped.
    """
    if status not in _STATUSES:
        raise MappingError(f"{status!r} is not an ImagingStudy status")
    version = options.fhir_version
    resource: Json = {"resourceType": "ImagingStudy"}
    identifiers = [study_identifier(study.study_instance_uid)]
    accession = accession_identifier(study, options)
    if accession is not None:
        identifiers.append(accession)
    study_id = clean_text(study.study_id)
    if study_id:
        identifiers.append({"use": "secondary", "value": study_id})
    resource["identifier"] = identifiers
    resource["status"] = status
    modalities = [_modality(code, version) for code in _study_modalities(study)]
    if modalities:
        resource["modality"] = modalities
    resource["subject"] = dict(subject) if subject is not None \
        else patient_reference(study, options)
    started = fhir_datetime(study.date, study.time, offset=study.timezone_offset,
                            default_timezone=options.default_timezone)
    if started:
        resource["started"] = started
    if based_on is None:
        order = order_reference(study, options)
        orders = [order] if order is not None else []
    else:
        orders = [dict(reference) for reference in based_on]
    if orders:
        resource["basedOn"] = orders
    referrer = display_name(study.referring_physician)
    if referrer:
        resource["referrer"] = {"display": referrer}
    readers = [n for n in (display_name(r) for r in study.reading_physicians) if n]
    if readers and version == "R4":
        resource["interpreter"] = [{"display": name} for name in readers]
    if endpoint is not None:
        resource["endpoint"] = [dict(endpoint)]
    series = sorted(study.series, key=lambda s: _sort_key(s.number, s.series_instance_uid))
    mapped = [_series(s, study, options, include_instances) for s in series]
    resource["numberOfSeries"] = len(mapped) if study.number_of_series is None \
        else study.number_of_series
    resource["numberOfInstances"] = sum(s["numberOfInstances"] for s in mapped) \
        if study.number_of_instances is None else study.number_of_instances
    procedures = _codeables(study.procedure_codes, options)
    if procedures:
        if version == "R4":
            resource["procedureCode"] = procedures
        else:
            resource["procedure"] = [{"concept": p} for p in procedures]
    reasons = _codeables(study.reason_codes, options)
    if reasons:
        if version == "R4":
            resource["reasonCode"] = reasons
        else:
            resource["reason"] = [{"concept": r} for r in reasons]
    description = clean_text(study.description)
    if description:
        resource["description"] = description
    if mapped:
        resource["series"] = mapped
    return resource
