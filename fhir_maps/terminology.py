"""Code systems and the small code tables the mapping needs.

Sources (DICOM current edition, PS3.16; FHIR R4 4.0.1 / R5 5.0.0 terminology):

* Modality (0008,0060) defined terms: CID 29 "Acquisition Modality" (which includes CID 34
  "Waveform Acquisition Modality"), CID 32 "Non-Acquisition Modality" (CID 33 = 29 ∪ 32), and
  the retired terms still listed in the DCM code system FHIR R4 ships. Code system
  ``http://dicom.nema.org/resources/ontology/DCM``.
* Laterality (0020,0060): R4 ``series.laterality`` is bound to the FHIR value set
  ``bodysite-laterality`` (SNOMED CT 419161000 Unilateral left, 419465000 Unilateral right,
  51440002 Bilateral); R5 to DICOM CID 244 "Laterality" (7771000 Left, 24028007 Right,
  51440002 Right and left). ``U`` (unpaired) has no code in either and is left out.
* Coding Scheme Designator → FHIR system: PS3.16 Table 8-1 designators with their
  terminology.hl7.org canonical URIs; local schemes (``99…``, ``L``) have none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fhir_maps.dicom_values import clean_text
from fhir_maps.facts import CodedConcept, FhirVersion

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED = "http://snomed.info/sct"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
URI_SYSTEM = "urn:ietf:rfc:3986"

#: CID 29 Acquisition Modality with CID 34 Waveform Acquisition Modality (code → meaning).
ACQUISITION_MODALITIES: Mapping[str, str] = {
    "AR": "Autorefraction", "BDUS": "Ultrasound Bone Densitometry",
    "BI": "Biomagnetic Imaging", "BMD": "Bone Mineral Densitometry",
    "CFM": "Confocal Microscopy", "CR": "Computed Radiography", "CT": "Computed Tomography",
    "DG": "Diaphanography", "DMS": "Dermoscopy", "DX": "Digital Radiography",
    "ECG": "Electrocardiography", "EEG": "Electroencephalography",
    "EMG": "Electromyography", "EOG": "Electrooculography",
    "EPS": "Cardiac Electrophysiology", "ES": "Endoscopy", "GM": "General Microscopy",
    "HD": "Hemodynamic", "IO": "Intra-oral Radiography",
    "IVOCT": "Intravascular Optical Coherence Tomography", "IVUS": "Intravascular Ultrasound",
    "KER": "Keratometry", "LEN": "Lensometry", "LS": "Laser surface scan",
    "MG": "Mammography", "MR": "Magnetic Resonance", "NM": "Nuclear Medicine",
    "OAM": "Ophthalmic Axial Measurements", "OCT": "Optical Coherence Tomography",
    "OP": "Ophthalmic Photography", "OPM": "Ophthalmic Mapping",
    "OPT": "Ophthalmic Tomography",
    "OPTBSV": "Ophthalmic Tomography B-scan Volume Analysis",
    "OPTENF": "Ophthalmic Tomography En Face", "OPV": "Ophthalmic Visual Field",
    "OSS": "Optical Surface Scanner", "PA": "Photoacoustic", "POS": "Position Sensor",
    "PT": "Positron emission tomography", "PX": "Panoramic X-Ray", "RESP": "Respiratory",
    "RF": "Radiofluoroscopy", "RG": "Radiographic imaging", "RTIMAGE": "RT Image",
    "SM": "Slide Microscopy", "SRF": "Subjective Refraction", "TG": "Thermography",
    "US": "Ultrasound", "VA": "Visual Acuity", "XA": "X-Ray Angiography",
    "XC": "External-camera Photography",
}

#: Retired acquisition modality terms (PS3.3 C.7.3.1.1.1) that old equipment still sends.
RETIRED_ACQUISITION_MODALITIES: Mapping[str, str] = {
    "AS": "Angioscopy", "CD": "Color flow Doppler", "CF": "Cinefluorography",
    "CP": "Culposcopy", "CS": "Cystoscopy", "DD": "Duplex Doppler",
    "DF": "Digital fluoroscopy", "DM": "Digital microscopy",
    "DS": "Digital Subtraction Angiography", "EC": "Echocardiography",
    "FA": "Fluorescein angiography", "FS": "Fundoscopy", "LP": "Laparoscopy",
    "MA": "Magnetic resonance angiography", "MS": "Magnetic resonance spectroscopy",
    "OPR": "Ophthalmic Refraction", "ST": "Single-photon emission computed tomography",
    "VF": "Videofluorography",
}

#: CID 32 Non-Acquisition Modality: derived objects, never a study's ``modality``.
NON_ACQUISITION_MODALITIES: Mapping[str, str] = {
    "ASMT": "Content Assessment Result", "AU": "Audio", "CTPROTOCOL": "CT Protocol",
    "DOC": "Document", "FID": "Spatial Fiducials", "HC": "Hard Copy",
    "IOL": "Intraocular Lens Calculation", "KO": "Key Object Selection",
    "M3D": "3D Manufacturing Modeling System", "OT": "Other Modality", "PLAN": "Plan",
    "PR": "Presentation State", "REG": "Registration", "RTDOSE": "RT Dose",
    "RTPLAN": "RT Plan", "RTRECORD": "RT Treatment Record", "RTSTRUCT": "RT Structure Set",
    "RWV": "Real World Value Map", "SEG": "Segmentation", "SMR": "Stereometric Relationship",
    "SR": "Structured Report Document", "STAIN": "Automated Slide Stainer",
    "TEXTUREMAP": "Texture Map",
}

_ALL_MODALITIES = {**ACQUISITION_MODALITIES, **RETIRED_ACQUISITION_MODALITIES,
                   **NON_ACQUISITION_MODALITIES}

#: Laterality (0020,0060) → (SNOMED CT code, display) for each FHIR version.
LATERALITY: Mapping[FhirVersion, Mapping[str, tuple[str, str]]] = {
    "R4": {"L": ("419161000", "Unilateral left"), "R": ("419465000", "Unilateral right"),
           "B": ("51440002", "Bilateral")},
    "R5": {"L": ("7771000", "Left"), "R": ("24028007", "Right"),
           "B": ("51440002", "Right and left")},
}

#: PS3.16 Table 8-1 Coding Scheme Designator → FHIR code system URI.
CODING_SCHEMES: Mapping[str, str] = {
    "DCM": DCM,
    "SCT": SNOMED,
    "SRT": "http://snomed.info/srt",
    "LN": "http://loinc.org",
    "RADLEX": "http://radlex.org",
    "UCUM": "http://unitsofmeasure.org",
    "I9C": "http://hl7.org/fhir/sid/icd-9-cm",
    "I10": "http://hl7.org/fhir/sid/icd-10",
    "C4": "http://www.ama-assn.org/go/cpt",
    "UMLS": "http://www.nlm.nih.gov/research/umls",
}


def is_acquisition_modality(code: str) -> bool:
    """True for a modality that acquires data (CID 29 incl. waveforms, or a retired one).

    Derived objects (SR, KO, PR, SEG, REG, DOC, OT…, CID 32) and unknown terms are not:
    ImagingStudy.modality lists acquisition modalities only (R4 binding CID 29).
    """
    return code in ACQUISITION_MODALITIES or code in RETIRED_ACQUISITION_MODALITIES


def modality_coding(code: str | None) -> dict[str, Any]:
    """The DCM Coding for a Modality (0008,0060) value.

    A defined term becomes ``{system: DCM, code, display}``. An absent value becomes ``OT``
    ("Other Modality"), since series.modality is required. A value DICOM does not define is
    kept as ``display`` only rather than claimed as a DCM code.
    """
    code = clean_text(code) or "OT"
    meaning = _ALL_MODALITIES.get(code)
    if meaning is None:
        return {"display": code}
    return {"system": DCM, "code": code, "display": meaning}


def codeable(coding: Mapping[str, Any], text: str | None = None) -> dict[str, Any]:
    """A CodeableConcept holding one Coding (a display-only Coding becomes ``text``)."""
    if "code" not in coding:
        return {"text": str(coding.get("display", text or ""))}
    concept: dict[str, Any] = {"coding": [dict(coding)]}
    if text:
        concept["text"] = text
    return concept


def fhir_code(value: object) -> str | None:
    r"""A FHIR ``code`` from a DICOM value, or None when nothing is left: :func:`clean_text`,
    and white space inside collapsed to single spaces (the ``code`` pattern
    ``[^\s]+( [^\s]+)*`` admits no other)."""
    text = clean_text(value)
    return " ".join(text.split()) if text else None


def concept_coding(concept: CodedConcept,
                   extra_schemes: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A FHIR Coding for a DICOM coded entry.

    The Coding Scheme Designator becomes ``system`` via ``extra_schemes`` (site
    configuration, wins) or :data:`CODING_SCHEMES`. A scheme with no known URI (a local
    ``99…`` scheme) gives a Coding without ``system``: the code and meaning are kept, and
    the site can configure the URI. A code value with nothing FHIR can carry as a ``code``
    gives a Coding with the meaning only (empty when there is none either).
    """
    coding: dict[str, Any] = {}
    code = fhir_code(concept.code_value)
    meaning = clean_text(concept.code_meaning)
    system = (extra_schemes or {}).get(concept.coding_scheme) \
        or CODING_SCHEMES.get(concept.coding_scheme)
    if code is not None:
        version = clean_text(concept.scheme_version)
        if system:
            coding["system"] = system
        if version and system and concept.coding_scheme != "SCT":
            coding["version"] = version
        coding["code"] = code
    if meaning:
        coding["display"] = meaning
    return coding


def concept_codeable(concept: CodedConcept,
                     extra_schemes: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """A FHIR CodeableConcept for a DICOM coded entry (``text`` = Code Meaning); None when
    the entry has neither a usable code nor a meaning."""
    coding = concept_coding(concept, extra_schemes)
    if not coding:
        return None
    return codeable(coding, coding.get("display"))


def laterality_coding(value: str | None, version: FhirVersion) -> dict[str, Any] | None:
    """The SNOMED CT Coding for Laterality (0020,0060) ``L``/``R``/``B``, else None."""
    found = LATERALITY[version].get((clean_text(value) or "").upper())
    if found is None:
        return None
    return {"system": SNOMED, "code": found[0], "display": found[1]}
