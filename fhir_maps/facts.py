"""What the mapping is built from: frozen facts about one study, and the mapping options.

The facts are DICOM values as the index keeps them (PS3.5 text, already decoded with the
Specific Character Set; DA ``YYYYMMDD``, TM ``HHMMSS.FFFFFF``; PN with ``^`` components and
``=`` groups; multi-valued attributes split into tuples, e.g. with
:func:`fhir_maps.split_multi` for the index's ``\\``-joined text; code sequences and PN
lists stored as DICOM JSON read with :func:`fhir_maps.coded_concepts` and
:func:`fhir_maps.person_names`). Absent or empty attributes are ``None`` (or an empty
tuple). Nothing here checks values: the builders drop what is not valid rather than guess
(see each builder).

The options say what the DICOM data cannot: which FHIR version to write, the public DICOMweb
address, which identifier system an issuer's numbers belong to, and the local time zone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import tzinfo
from types import MappingProxyType
from typing import Literal

#: The FHIR release written: "R4" (4.0.1, the default) or "R5" (5.0.0).
FhirVersion = Literal["R4", "R5"]

#: ImagingStudy.status (FHIR R4/R5, required binding ``imagingstudy-status``).
ImagingStudyStatus = Literal["registered", "available", "cancelled", "entered-in-error",
                             "unknown"]


@dataclass(frozen=True)
class CodedConcept:
    """One DICOM coded entry (PS3.3 Table 8.8-1, Code Sequence Macro).

    Attributes
    ----------
    code_value
        Code Value (0008,0100), else Long Code Value (0008,0119), else URN Code Value
        (0008,0120).
    coding_scheme
        Coding Scheme Designator (0008,0102), e.g. ``"SCT"``, ``"LN"``, ``"DCM"``,
        ``"RADLEX"``, or a local ``"99…"`` scheme; ``""`` when absent (URN codes).
    code_meaning
        Code Meaning (0008,0104): the human-readable text.
    scheme_version
        Coding Scheme Version (0008,0103).
    """

    code_value: str
    coding_scheme: str
    code_meaning: str | None = None
    scheme_version: str | None = None


@dataclass(frozen=True)
class PatientFacts:
    """The Patient Module attributes the index keeps (PS3.3 C.7.1.1).

    Attributes
    ----------
    patient_id
        Patient ID (0010,0020); ``""`` when empty (it is Type 2).
    issuer
        Issuer of Patient ID (0010,0021); ``""`` when absent, as the index keys it.
    name
        Patient's Name (0010,0010) as PN text: ``Family^Given^Middle^Prefix^Suffix``,
        optionally followed by ``=Ideographic`` and ``=Phonetic`` groups (PS3.5 6.2.1).
    birth_date
        Patient's Birth Date (0010,0030), DA ``YYYYMMDD``.
    sex
        Patient's Sex (0010,0040): ``M``, ``F`` or ``O``.
    """

    patient_id: str
    issuer: str = ""
    name: str | None = None
    birth_date: str | None = None
    sex: str | None = None


@dataclass(frozen=True)
class InstanceFacts:
    """One SOP Instance (PS3.3 C.12.1 SOP Common, C.7.6.1 General Image).

    Attributes
    ----------
    sop_instance_uid, sop_class_uid
        (0008,0018) and (0008,0016).
    number
        Instance Number (0020,0013).
    title
        A human-readable title: Content Label (0070,0080), the SR/KOS Concept Name Code
        Sequence (0040,A043) meaning, or Document Title (0042,0010), as the index picks it.
    """

    sop_instance_uid: str
    sop_class_uid: str
    number: int | None = None
    title: str | None = None


@dataclass(frozen=True)
class SeriesFacts:
    """One series (PS3.3 C.7.3.1 General Series).

    Attributes
    ----------
    series_instance_uid, modality
        (0020,000E) and Modality (0008,0060).
    number, description
        Series Number (0020,0011), Series Description (0008,103E).
    body_part_examined
        Body Part Examined (0018,0015), a defined term of PS3.16 Annex L.
    anatomic_region
        Anatomic Region Sequence (0008,2218) items; preferred to ``body_part_examined``
        when it carries a SNOMED CT code.
    laterality
        Laterality (0020,0060): ``R``, ``L``, ``B`` (both) or ``U`` (unpaired).
    date, time
        Series Date (0008,0021) and Series Time (0008,0031).
    performing_physicians, operators
        Performing Physician's Name (0008,1050) and Operators' Name (0008,1070), PN text.
    number_of_instances
        Number of Series Related Instances (0020,1209); ``None`` to count ``instances``.
    instances
        The instances of the series (may be empty when only the counts are published).
    """

    series_instance_uid: str
    modality: str | None
    number: int | None = None
    description: str | None = None
    body_part_examined: str | None = None
    anatomic_region: tuple[CodedConcept, ...] = ()
    laterality: str | None = None
    date: str | None = None
    time: str | None = None
    performing_physicians: tuple[str, ...] = ()
    operators: tuple[str, ...] = ()
    number_of_instances: int | None = None
    instances: tuple[InstanceFacts, ...] = ()


@dataclass(frozen=True)
class StudyFacts:
    """One study with its patient and series (PS3.3 C.7.2.1 General Study; PS3.4 C.6.1.1.3).

    Attributes
    ----------
    study_instance_uid
        Study Instance UID (0020,000D).
    patient
        The patient the study belongs to.
    date, time, timezone_offset
        Study Date (0008,0020), Study Time (0008,0030) and Timezone Offset From UTC
        (0008,0201, ``+HHMM``/``-HHMM``).
    accession_number, accession_issuer
        Accession Number (0008,0050) and its issuer from Issuer of Accession Number
        Sequence (0008,0051) (Universal, else Local Namespace Entity ID).
    study_id, description
        Study ID (0020,0010) and Study Description (0008,1030).
    referring_physician
        Referring Physician's Name (0008,0090), PN text.
    reading_physicians
        Name of Physician(s) Reading Study (0008,1060), PN text.
    modalities_in_study
        Modalities in Study (0008,0061); the series modalities are added to it.
    number_of_series, number_of_instances
        (0020,1206) and (0020,1208); ``None`` to count ``series``.
    procedure_codes
        Procedure Code Sequence (0008,1032).
    reason_codes
        Reason For Performed Procedure Code Sequence (0040,1012).
    series
        The series of the study.
    """

    study_instance_uid: str
    patient: PatientFacts
    date: str | None = None
    time: str | None = None
    timezone_offset: str | None = None
    accession_number: str | None = None
    accession_issuer: str | None = None
    study_id: str | None = None
    description: str | None = None
    referring_physician: str | None = None
    reading_physicians: tuple[str, ...] = ()
    modalities_in_study: tuple[str, ...] = ()
    number_of_series: int | None = None
    number_of_instances: int | None = None
    procedure_codes: tuple[CodedConcept, ...] = ()
    reason_codes: tuple[CodedConcept, ...] = ()
    series: tuple[SeriesFacts, ...] = ()


def _frozen(mapping: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class IdentifierSystems:
    """Where the numbers of each issuer live in FHIR: issuer → ``Identifier.system``.

    Used for patients (Issuer of Patient ID (0010,0021)) and accession numbers (Issuer of
    Accession Number Sequence (0008,0051)). See :mod:`fhir_maps.identity` for the rules.

    Attributes
    ----------
    by_issuer
        Issuer value as it appears in the DICOM data (exact, case-sensitive) → system URI.
        Several issuers may share one system (aliases of one assigning authority).
    default
        System for values that carry **no** issuer. It is never used for an issuer that is
        present but not configured: that would merge two sites' numbers.
    """

    by_issuer: Mapping[str, str] = field(default_factory=dict)
    default: str | None = None

    def __post_init__(self) -> None:
        if any(not issuer.strip() for issuer in self.by_issuer):
            raise ValueError("an issuer must not be empty: use `default` for values without one")
        if any(not system.strip() for system in self.by_issuer.values()) or \
                (self.default is not None and not self.default.strip()):
            raise ValueError("an identifier system must not be empty")
        object.__setattr__(self, "by_issuer", _frozen(self.by_issuer))

    def __hash__(self) -> int:
        return hash((frozenset(self.by_issuer.items()), self.default))


@dataclass(frozen=True)
class MappingOptions:
    """Site configuration the DICOM data cannot supply.

    Attributes
    ----------
    fhir_version
        ``"R4"`` (4.0.1 wire format, default) or ``"R5"``.
    dicomweb_base_url
        Public DICOMweb service base (scheme, authority, path; no ``/studies``), the
        Endpoint.address (standards digest §2). Required by :func:`build_endpoint`.
    patient_systems
        Issuer of Patient ID → Patient.identifier.system.
    accession_systems
        Issuer of Accession Number → ServiceRequest/ImagingStudy accession identifier system.
    default_timezone
        The modality's local time zone, used for Study/Series Date+Time when the data has no
        Timezone Offset From UTC (0008,0201). ``None``: such times are dropped (a FHIR
        dateTime with a time needs an offset), only the date is kept.
    coding_systems
        Extra Coding Scheme Designator → FHIR system URI (e.g. a local ``99HOSP`` procedure
        code scheme); they override the built-in table.
    endpoint_name
        Endpoint.name.
    """

    fhir_version: FhirVersion = "R4"
    dicomweb_base_url: str | None = None
    patient_systems: IdentifierSystems = field(default_factory=IdentifierSystems)
    accession_systems: IdentifierSystems = field(default_factory=IdentifierSystems)
    default_timezone: tzinfo | None = None
    coding_systems: Mapping[str, str] = field(default_factory=dict)
    endpoint_name: str = "Imaging gateway DICOMweb (WADO-RS)"

    def __post_init__(self) -> None:
        if self.fhir_version not in ("R4", "R5"):
            raise ValueError(f"unsupported FHIR version {self.fhir_version!r}")
        object.__setattr__(self, "coding_systems", _frozen(self.coding_systems))

    def __hash__(self) -> int:
        return hash((self.fhir_version, self.dicomweb_base_url, self.patient_systems,
                     self.accession_systems, self.default_timezone,
                     frozenset(self.coding_systems.items()), self.endpoint_name))
