"""Pure DICOM → FHIR mappings (no network, disk or database; never imports gateway).

Facts in (:mod:`fhir_maps.facts`), JSON dicts out, FHIR R4 (4.0.1) by default and R5 on
request::

    options = MappingOptions(dicomweb_base_url="https://gw.example.org/dicom-web",
                             patient_systems=IdentifierSystems({"HOSP": "urn:oid:1.2.3"}))
    endpoint = build_endpoint(options)
    study = build_imaging_study(facts, options, endpoint={"reference": "Endpoint/1"})

:func:`patient_identity` / :func:`patient_keys` are the one identity rule shared by the
publisher and the cohort queries (see :mod:`fhir_maps.identity`).
"""

from typing import Any

from fhir_maps.body_parts import BODY_PART_EXAMINED, body_part_coding
from fhir_maps.dicom_json import coded_concepts, person_names
from fhir_maps.dicom_values import fhir_date, fhir_datetime, split_multi
from fhir_maps.endpoint import (
    build_endpoint,
    dicomweb_address,
    endpoint_identifier,
    endpoint_search_token,
)
from fhir_maps.errors import MappingError, UnmappedPatientIdentity
from fhir_maps.facts import (
    CodedConcept,
    FhirVersion,
    IdentifierSystems,
    ImagingStudyStatus,
    InstanceFacts,
    MappingOptions,
    PatientFacts,
    SeriesFacts,
    StudyFacts,
)
from fhir_maps.identity import (
    PatientIdentity,
    PatientKey,
    issuer_system,
    patient_identity,
    patient_keys,
    search_token,
)
from fhir_maps.imaging_study import (
    accession_identifier,
    build_imaging_study,
    order_reference,
    patient_reference,
    study_identifier,
    study_search_token,
)
from fhir_maps.names import display_name, human_names
from fhir_maps.patient import build_patient


def __getattr__(name: str) -> Any:
    """``to_model`` (validation with fhir.resources) is imported on first use: the models cost
    ~25 MB and a second of start-up that the gateway's DICOM processes never need."""
    if name == "to_model":
        from fhir_maps.models import to_model

        return to_model
    raise AttributeError(f"module 'fhir_maps' has no attribute {name!r}")

__all__ = [
    "BODY_PART_EXAMINED",
    "CodedConcept",
    "FhirVersion",
    "IdentifierSystems",
    "ImagingStudyStatus",
    "InstanceFacts",
    "MappingError",
    "MappingOptions",
    "PatientFacts",
    "PatientIdentity",
    "PatientKey",
    "SeriesFacts",
    "StudyFacts",
    "UnmappedPatientIdentity",
    "accession_identifier",
    "body_part_coding",
    "build_endpoint",
    "build_imaging_study",
    "build_patient",
    "coded_concepts",
    "dicomweb_address",
    "display_name",
    "endpoint_identifier",
    "endpoint_search_token",
    "fhir_date",
    "fhir_datetime",
    "human_names",
    "issuer_system",
    "order_reference",
    "patient_identity",
    "patient_keys",
    "patient_reference",
    "person_names",
    "search_token",
    "split_multi",
    "study_identifier",
    "study_search_token",
    "to_model",
]
