"""A teleradiologist's timeline of one patient: the studies the gateway holds, merged with what the
EMR's FHIR server records (Encounters, Conditions, Procedures, DiagnosticReports).

How things are found (FHIR R4 search.html; the parameters are in each resource's search page):

=====================  =========================================================================
the Patient            ``GET Patient/<id>``
held studies           as cohorts find them (:mod:`gateway.cohort`): the publish records (studies
                       the publisher placed under ``Patient/<id>``) and the Patient's identifiers
                       → (PatientID, issuer) keys by the one identity rule
                       (:func:`fhir_maps.patient_keys`), through the query engine (exact
                       PatientID and issuer, never a wildcard)
their ImagingStudy     ``ImagingStudy?identifier=urn:dicom:uid|urn:oid:<uid>,…`` (a comma list
                       is an OR, R4 search.html §3.1.1.4.3), ``_elements=identifier,status``
FHIR events            ``Encounter|Condition|Procedure|DiagnosticReport?patient=Patient/<id>``,
                       every page (``next`` links), only the elements the timeline shows
                       (``_elements``, :data:`EVENT_ELEMENTS`)
=====================  =========================================================================

``since``/``until`` are applied to each event's ``when`` here, not as FHIR ``date`` parameters:
each kind's ``when`` falls back across elements (a Condition without ``onset`` has a
``recordedDate``) that no single search parameter covers. A patient's record is bounded and
only a few elements per resource travel. Held studies are limited in the index by Study Date.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import and_, or_, select

from fhir_maps import (
    PatientKey,
    fhir_date,
    fhir_datetime,
    patient_keys,
    split_multi,
    study_search_token,
)
from gateway.context import ClinicalContext, Json, chunks
from gateway.errors import FhirPermanentError, NotFound
from gateway.index import Index, patient, publication, study
from gateway.query import Condition, Match, Query, run

__all__ = ["EVENT_ELEMENTS", "EVENT_KINDS", "Window", "held_studies", "patient_history"]

#: Event kinds, in the order that breaks ties between equal times.
EVENT_KINDS = ("imaging-study", "DiagnosticReport", "Procedure", "Encounter", "Condition")
#: The elements each FHIR kind needs (``_elements``; choice elements by the base name and the
#: typed names, as servers differ in which they accept). ``status``/``verificationStatus`` are
#: needed to leave ``entered-in-error`` out (:func:`gateway.context.entered_in_error`).
EVENT_ELEMENTS: Mapping[str, tuple[str, ...]] = {
    "Encounter": ("status", "class", "type", "serviceType", "period"),
    "Condition": ("clinicalStatus", "verificationStatus", "code", "onset", "onsetDateTime",
                  "onsetPeriod", "recordedDate", "abatement", "abatementDateTime",
                  "abatementPeriod"),
    "Procedure": ("status", "code", "performed", "performedDateTime", "performedPeriod"),
    "DiagnosticReport": ("status", "code", "effective", "effectiveDateTime", "effectivePeriod",
                         "issued", "imagingStudy"),
}
_UID_CHUNK = 40  # ImagingStudy identifiers per OR search: keeps the URL well under 8 kB


@dataclass(frozen=True)
class Window:
    """Dates (inclusive) a history is limited to; ``None`` leaves that side open."""

    since: date | None = None
    until: date | None = None

    @property
    def open(self) -> bool:
        return self.since is None and self.until is None

    def admits(self, when: str | None) -> bool:
        """Whether a FHIR date/dateTime (its calendar date as written) falls in the window.

        A partial date (``2024``, ``2024-03``) is admitted when its range meets the window;
        an event without a date only when the window is open.
        """
        if self.open:
            return True
        if not when:
            return False
        first, last = _date_span(when)
        if self.since is not None and last < self.since.isoformat():
            return False
        return not (self.until is not None and first > self.until.isoformat())

    def study_date_range(self) -> str | None:
        """The window as a DICOM DA range (PS3.4 C.2.2.2.5) for the query engine."""
        if self.open:
            return None
        low = self.since.strftime("%Y%m%d") if self.since else ""
        high = self.until.strftime("%Y%m%d") if self.until else ""
        return f"{low}-{high}"


def _date_span(when: str) -> tuple[str, str]:
    """First and last calendar day (ISO) of a FHIR date or dateTime, as written."""
    day = when[:10]
    if len(day) == 4:
        return f"{day}-01-01", f"{day}-12-31"
    if len(day) == 7:
        return f"{day}-01", f"{day}-31"  # compared as strings: "-31" follows every real day
    return day, day


_FHIR_TIME = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?"
                        r"(Z|[+-]\d{2}:\d{2})?)?)?)?")


def instant(when: str | None) -> float | None:
    """A FHIR date/dateTime/instant as POSIX time, for ordering: its first instant, in UTC
    when it carries no offset (a date, or a time without a zone). None when unreadable."""
    if not when:
        return None
    match = _FHIR_TIME.fullmatch(when.strip())
    if match is None:
        return None
    year, month, day, hour, minute, second, zone = match.groups()
    try:
        moment = datetime(int(year), int(month or 1), int(day or 1), int(hour or 0),
                          int(minute or 0), int(second or 0), tzinfo=UTC)
    except ValueError:
        return None
    offset = 0
    if zone and zone != "Z":
        offset = (int(zone[1:3]) * 60 + int(zone[4:6])) * 60 * (1 if zone[0] == "+" else -1)
    return moment.timestamp() - offset  # UTC = local time minus the offset


# -- reading FHIR elements ------------------------------------------------------------------------
def _concept_text(concept: Any) -> str | None:
    """What a CodeableConcept (or a list of them, or a Coding) says to a person: its text,
    else a display, else a code."""
    if isinstance(concept, list):
        return next((t for t in map(_concept_text, concept) if t), None)
    if not isinstance(concept, dict):
        return None
    if isinstance(concept.get("text"), str) and concept["text"]:
        return str(concept["text"])
    codings = [c for c in (concept.get("coding") if "coding" in concept else [concept]) or []
               if isinstance(c, dict)]
    for key in ("display", "code"):
        for coding in codings:
            if coding.get(key):
                return str(coding[key])
    return None


def _code(concept: Any) -> str | None:
    """The first code of a CodeableConcept (e.g. ``clinicalStatus``)."""
    if isinstance(concept, dict):
        for coding in concept.get("coding") or []:
            if isinstance(coding, dict) and coding.get("code"):
                return str(coding["code"])
    return None


def _first_time(resource: Mapping[str, Any], *choices: str) -> str | None:
    """The first of ``choices`` that is set: a dateTime element, or a Period's ``start``/``end``
    written ``effectivePeriod.start``."""
    for choice in choices:
        name, _, part = choice.partition(".")
        value = resource.get(name)
        if part and isinstance(value, dict):
            value = value.get(part)
        if isinstance(value, str) and value:
            return value
    return None


def _human_name(resource: Mapping[str, Any]) -> str | None:
    names = sorted((n for n in resource.get("name") or [] if isinstance(n, dict)),
                   key=lambda n: n.get("use") != "official")
    for name in names:
        if name.get("text"):
            return str(name["text"])
        text = " ".join(str(p) for p in [*(name.get("given") or []), name.get("family")] if p)
        if text:
            return text
    return None


# -- the events ------------------------------------------------------------------------------------
def held_studies(index: Index, patient_reference: str, keys: Iterable[PatientKey],
                 window: Window = Window()) -> list[Match]:
    """The studies the index holds for one FHIR Patient, within the window's Study Date range,
    through the query engine: those published under ``patient_reference`` (``Patient/<id>``)
    and those of its patient keys (exact PatientID and issuer)."""
    published = study.c.StudyInstanceUID.in_(
        select(publication.c.StudyInstanceUID)
        .where(publication.c.patient_reference == patient_reference))
    scope = or_(published, *(and_(patient.c.PatientID == key.patient_id,
                                  patient.c.IssuerOfPatientID == key.issuer)
                             for key in sorted(set(keys))))
    date_range = window.study_date_range()
    conditions = (Condition("StudyDate", (date_range,)),) if date_range else ()
    return run(index, Query("STUDY", conditions, scope=scope)).matches


def _published_ids(context: ClinicalContext, study_uids: Sequence[str]) -> dict[str, str]:
    """Study Instance UID → ImagingStudy id, for those published (not entered-in-error)."""
    by_value = {f"urn:oid:{uid}": uid for uid in study_uids}
    found: dict[str, str] = {}
    for chunk in chunks(study_uids, _UID_CHUNK):
        tokens = ",".join(study_search_token(uid) for uid in chunk)
        for resource in context.search_all("ImagingStudy", {"identifier": tokens},
                                           elements=("identifier", "status")):
            if resource.get("status") == "entered-in-error":
                continue
            for identifier in resource.get("identifier") or []:
                if isinstance(identifier, dict) and identifier.get("system") == "urn:dicom:uid":
                    uid = by_value.get(str(identifier.get("value")))
                    if uid is not None:
                        found[uid] = str(resource["id"])
    return found


def _study_event(context: ClinicalContext, match: Match, imaging_study_id: str | None,
                 reports: Sequence[str]) -> Json:
    uid = str(match["StudyInstanceUID"])
    modalities = list(split_multi(match["ModalitiesInStudy"]))
    description = match["StudyDescription"] or None
    return {
        "when": fhir_datetime(match["StudyDate"], match["StudyTime"],
                              offset=match["TimezoneOffsetFromUTC"],
                              default_timezone=context.options.default_timezone),
        "kind": "imaging-study",
        "summary": description or " ".join(modalities) or "imaging study",
        "StudyInstanceUID": uid,
        "date": fhir_date(match["StudyDate"]),
        "modalities": modalities,
        "description": description,
        "accession": match["AccessionNumber"] or None,
        "series": match["NumberOfStudyRelatedSeries"],
        "instances": match["NumberOfStudyRelatedInstances"],
        "dicomweb": f"{context.dicomweb_url}/studies/{uid}",
        "reference": f"ImagingStudy/{imaging_study_id}" if imaging_study_id else None,
        "reports": list(reports),
    }


def _fhir_event(context: ClinicalContext, resource: Json) -> Json:
    kind = str(resource["resourceType"])
    end: str | None = None
    status = resource.get("status")
    if kind == "Encounter":
        when = _first_time(resource, "period.start", "period.end")
        end = _first_time(resource, "period.end")
        summary = (_concept_text(resource.get("type"))
                   or _concept_text(resource.get("serviceType"))
                   or _concept_text(resource.get("class")))
    elif kind == "Condition":
        when = _first_time(resource, "onsetDateTime", "onsetPeriod.start", "recordedDate")
        end = _first_time(resource, "abatementDateTime", "abatementPeriod.end")
        summary = _concept_text(resource.get("code"))
        status = _code(resource.get("clinicalStatus"))
    elif kind == "Procedure":
        when = _first_time(resource, "performedDateTime", "performedPeriod.start")
        end = _first_time(resource, "performedPeriod.end")
        summary = _concept_text(resource.get("code"))
    else:  # DiagnosticReport
        when = _first_time(resource, "effectiveDateTime", "effectivePeriod.start", "issued")
        summary = _concept_text(resource.get("code"))
    event: Json = {"when": when, "kind": kind, "summary": summary or kind, "status": status,
                   "reference": f"{kind}/{resource['id']}"}
    if end:
        event["end"] = end
    if kind == "DiagnosticReport":
        event["imaging_studies"] = [r for r in (context.canonical(ref, "ImagingStudy")
                                                for ref in resource.get("imagingStudy") or [])
                                    if r]
    return event


def _event_order(event: Mapping[str, Any]) -> tuple[bool, float, int, str]:
    at = instant(event.get("when"))
    return (at is None, -(at or 0.0), EVENT_KINDS.index(event["kind"]),
            str(event.get("reference") or event.get("StudyInstanceUID") or ""))


def patient_history(context: ClinicalContext, patient_id: str,
                    window: Window = Window()) -> Json:
    """A teleradiologist's timeline of one FHIR Patient (module doc for the searches).

    Parameters
    ----------
    context
        The FHIR server and the index to read.
    patient_id
        The FHIR ``Patient.id``.
    window
        Optional ``since``/``until`` dates (inclusive) on each event's ``when``.

    Returns
    -------
    dict
        ::

            {"patient": {"reference": "Patient/<id>", "name": str | None,
                         "birthDate": str | None, "gender": str | None,
                         "dicom": [{"PatientID": str, "IssuerOfPatientID": str}, …]},
             "since": "YYYY-MM-DD" | None, "until": "YYYY-MM-DD" | None,
             "events": [event, …]}

        ``dicom`` lists the index keys the Patient's identifiers map to. Every event has
        ``when`` (a FHIR date/dateTime, or None), ``kind`` (one of :data:`EVENT_KINDS`),
        ``summary`` (text for a person) and ``reference`` (``Type/id`` on the FHIR server;
        None for a study not published). FHIR events add ``status``, and ``end`` when they
        have one (Encounter/Procedure period end, Condition abatement); DiagnosticReports add
        ``imaging_studies`` (the ``ImagingStudy/<id>`` they report on). Imaging studies add
        ``StudyInstanceUID``, ``date``, ``modalities``, ``description``, ``accession``,
        ``series``, ``instances``, ``dicomweb`` (the study's DICOMweb Retrieve URL) and
        ``reports`` (the ``DiagnosticReport/<id>`` naming its ImagingStudy).

        ``when`` is: a study's Study Date/Time with its offset (as ImagingStudy.started);
        Encounter ``period.start``; Condition ``onset[x]``, else ``recordedDate``; Procedure
        ``performed[x]``; DiagnosticReport ``effective[x]``, else ``issued``. Order: newest
        first by the first instant of ``when`` (UTC when it has no offset), ties by kind in
        :data:`EVENT_KINDS` order, then by reference (or UID); events without a date last.

    Raises
    ------
    NotFound
        The FHIR server has no such Patient (404/410), or ``patient_id`` is not a FHIR id.
    FhirError
        Any other failure of the FHIR server, with its OperationOutcome.
    """
    try:
        subject = context.client.read("Patient", patient_id)
    except ValueError:
        raise NotFound("not a FHIR resource id") from None
    except FhirPermanentError as exc:
        if exc.status in (404, 410):
            raise NotFound(f"the FHIR server has no Patient {patient_id}") from exc
        raise
    patient_ref = f"Patient/{patient_id}"
    keys = sorted(patient_keys(subject.get("identifier") or [],
                               context.options.patient_systems))
    studies = held_studies(context.index, patient_ref, keys, window)
    published = _published_ids(context, [str(m["StudyInstanceUID"]) for m in studies])
    events: list[Json] = []
    for kind, elements in EVENT_ELEMENTS.items():
        for resource in context.search_all(kind, {"patient": patient_ref}, elements=elements):
            event = _fhir_event(context, resource)
            if window.admits(event["when"]):
                events.append(event)
    reports_of: dict[str, list[str]] = {}
    for event in events:
        for study_ref in event.get("imaging_studies") or []:
            reports_of.setdefault(study_ref, []).append(event["reference"])
    for match in studies:
        study_id = published.get(str(match["StudyInstanceUID"]))
        reports = sorted(reports_of.get(f"ImagingStudy/{study_id}", [])) if study_id else []
        event = _study_event(context, match, study_id, reports)
        if window.admits(event["when"] or event["date"]):
            events.append(event)
    events.sort(key=_event_order)
    return {
        "patient": {"reference": patient_ref, "name": _human_name(subject),
                    "birthDate": subject.get("birthDate"), "gender": subject.get("gender"),
                    "dicom": [{"PatientID": k.patient_id, "IssuerOfPatientID": k.issuer}
                              for k in keys]},
        "since": window.since.isoformat() if window.since else None,
        "until": window.until.isoformat() if window.until else None,
        "events": events,
    }
