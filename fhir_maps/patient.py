"""PatientFacts → FHIR Patient, for a "create the Patient if it does not exist" policy.

Used when the EMR has no Patient with the study's identifier and the site allows the gateway
to create one (e.g. in a transaction with ``ifNoneExist`` on the identifier token, so a
concurrent publisher cannot create a second). Sources (PS3.3 C.7.1.1 Patient Module; FHIR R4
patient.html):

==============  =================================================================
Patient         DICOM
==============  =================================================================
identifier      Patient ID + Issuer of Patient ID (:mod:`fhir_maps.identity`)
name            Patient's Name (0010,0010), one HumanName per PN component group
birthDate       Patient's Birth Date (0010,0030)
gender          Patient's Sex (0010,0040): M → male, F → female, O → other
==============  =================================================================

An absent or unrecognised sex leaves ``gender`` out rather than asserting ``unknown``.
"""

from __future__ import annotations

from typing import Any

from fhir_maps.dicom_values import clean_text, fhir_date
from fhir_maps.facts import MappingOptions, PatientFacts
from fhir_maps.identity import patient_identity
from fhir_maps.names import human_names

#: Patient's Sex (0010,0040) enumerated values → administrative-gender (required binding).
GENDER = {"M": "male", "F": "female", "O": "other"}


def build_patient(patient: PatientFacts, options: MappingOptions) -> dict[str, Any]:
    """The Patient JSON for a patient the EMR does not know yet.

    Parameters
    ----------
    patient
        The DICOM patient attributes.
    options
        ``patient_systems`` gives the identifier system.

    Returns
    -------
    dict
        A Patient without ``id`` whose only identifier is the patient's identity.

    Raises
    ------
    UnmappedPatientIdentity
        The (Patient ID, Issuer) key has no configured system: a Patient without a usable
        identifier would be a duplicate nobody can find again.
    """
    identity = patient_identity(patient.patient_id, patient.issuer, options.patient_systems)
    resource: dict[str, Any] = {"resourceType": "Patient",
                                "identifier": [identity.identifier()]}
    names = human_names(patient.name)
    if names:
        resource["name"] = names
    gender = GENDER.get((clean_text(patient.sex) or "").upper())
    if gender:
        resource["gender"] = gender
    birth_date = fhir_date(patient.birth_date)
    if birth_date:
        resource["birthDate"] = birth_date
    return resource
