"""QIDO-RS (PS3.18 §10.6) on a running gateway, with dicomweb-client and plain HTTP.

The archive of :data:`samples.ARCHIVE` is imported once; every test only reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import GatewayProcess, free_port
from samples import S1, S2, S3, SE_A, SE_B, SE_C, SE_D, write_archive

STUDY_REQUIRED = {  # PS3.18 Table 10.6.3-3 (Instance Availability, Timezone: if known)
    "00080020": "StudyDate", "00080030": "StudyTime", "00080050": "AccessionNumber",
    "00080056": "InstanceAvailability", "00080061": "ModalitiesInStudy",
    "00080090": "ReferringPhysicianName", "00081190": "RetrieveURL",
    "00100010": "PatientName", "00100020": "PatientID", "00100030": "PatientBirthDate",
    "00100040": "PatientSex", "0020000D": "StudyInstanceUID", "00200010": "StudyID",
    "00201206": "NumberOfStudyRelatedSeries", "00201208": "NumberOfStudyRelatedInstances",
}
SERIES_REQUIRED = {"00080060", "0020000E", "00200011", "00201209", "00081190"}  # 10.6.3-4
INSTANCE_REQUIRED = {"00080016", "00080018", "00200013", "00081190"}  # 10.6.3-5


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("qido")
    gateway = GatewayProcess(root, free_port(), free_port())
    files = root / "files"
    files.mkdir()
    write_archive(files)
    imported = gateway.cli("import", str(files))
    assert imported.returncode == 0, imported.stderr
    gateway.start()
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def client(archive: GatewayProcess) -> DICOMwebClient:
    return DICOMwebClient(url=archive.dicomweb)


def get(archive: GatewayProcess, path: str, **params: Any) -> requests.Response:
    return requests.get(f"{archive.dicomweb}{path}", params=params, timeout=10)


def uids(results: list[dict[str, Any]], tag: str) -> list[str]:
    return sorted(r[tag]["Value"][0] for r in results)


def value(result: dict[str, Any], tag: str) -> Any:
    return result[tag].get("Value", [None])[0]


def test_studies_carry_the_required_return_attributes(
        archive: GatewayProcess, client: DICOMwebClient) -> None:
    studies = client.search_for_studies()
    assert uids(studies, "0020000D") == sorted([S1, S2, S3])
    (s1,) = [s for s in studies if value(s, "0020000D") == S1]
    assert set(STUDY_REQUIRED) <= set(s1)
    assert s1["00081190"] == {"vr": "UR", "Value": [f"{archive.dicomweb}/studies/{S1}"]}
    assert s1["00080061"] == {"vr": "CS", "Value": ["CT", "SR"]}
    assert s1["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "DOE^JOHN"}]}
    assert (value(s1, "00201206"), value(s1, "00201208")) == (2, 3)
    assert value(s1, "00080056") == "ONLINE"
    assert list(s1) == sorted(s1), "Annex F: keys in ascending tag order"
    assert s1["00080090"] == {"vr": "PN"}, "F.2.5: an empty attribute has no Value"


def test_matching_is_the_engines(client: DICOMwebClient) -> None:
    found = client.search_for_studies(search_filters={"PatientName": "doe*"})
    assert uids(found, "0020000D") == sorted([S1, S2])
    found = client.search_for_studies(search_filters={"StudyDate": "20240101-",
                                                      "ModalitiesInStudy": "CT"})
    assert uids(found, "0020000D") == sorted([S1, S3])
    found = client.search_for_studies(search_filters={"StudyInstanceUID": f"{S2},{S3}"})
    assert uids(found, "0020000D") == sorted([S2, S3])
    found = client.search_for_studies(search_filters={"PatientName": "ja do"}, fuzzymatching=True)
    assert uids(found, "0020000D") == [S2]


def test_the_six_search_resources(archive: GatewayProcess, client: DICOMwebClient) -> None:
    series = client.search_for_series(study_instance_uid=S1)
    assert uids(series, "0020000E") == sorted([SE_A, SE_B])
    assert all(set(s) >= SERIES_REQUIRED for s in series)
    assert "00100020" not in series[0], "study attributes only on /series (all series)"

    everywhere = get(archive, "/series", Modality="CT").json()
    assert uids(everywhere, "0020000E") == sorted([SE_A, SE_D])
    assert all("00080020" in s and "00100020" in s for s in everywhere)

    instances = client.search_for_instances(study_instance_uid=S1, series_instance_uid=SE_A)
    assert sorted(value(i, "00200013") for i in instances) == [1, 2]
    assert all(set(i) >= INSTANCE_REQUIRED for i in instances)
    (first,) = [i for i in instances if value(i, "00200013") == 1]
    sop = value(first, "00080018")
    assert value(first, "00081190") == \
        f"{archive.dicomweb}/studies/{S1}/series/{SE_A}/instances/{sop}"

    in_study = client.search_for_instances(study_instance_uid=S1)
    assert len(in_study) == 3 and all("00080060" in i for i in in_study)

    anywhere = get(archive, "/instances", PatientID="P2").json()
    assert len(anywhere) == 1
    assert value(anywhere[0], "0020000E") == SE_C and value(anywhere[0], "00100020") == "P2"


def test_sequence_matching_with_a_dotted_key(archive: GatewayProcess) -> None:
    found = get(archive, "/series",
                **{"RequestAttributesSequence.ScheduledProcedureStepID": "SPS*"}).json()
    assert uids(found, "0020000E") == [SE_C]
    sequence = found[0]["00400275"]
    assert sequence["vr"] == "SQ" and value(sequence["Value"][0], "00400009") == "SPS9"


def test_includefield(archive: GatewayProcess) -> None:
    (s2,) = get(archive, "/studies", PatientID="P2", includefield="00081030").json()
    assert value(s2, "00081030") == "MR HEAD"
    (s2,) = get(archive, "/studies", PatientID="P2", includefield="all").json()
    assert "00080062" in s2, "all: every attribute the index keeps at this level"
    response = get(archive, "/studies", PatientID="P2", includefield="PatientComments")
    assert response.status_code == 200
    assert "PatientComments is not kept in the index" in response.headers["Warning"]


def test_limit_and_offset_page_with_a_warning_when_cut(archive: GatewayProcess) -> None:
    first = get(archive, "/studies", limit=2)
    assert first.status_code == 200 and len(first.json()) == 2
    assert first.headers["Warning"].startswith("299 ")
    assert "Additional results can be requested" in first.headers["Warning"]
    rest = get(archive, "/studies", limit=2, offset=2)
    assert len(rest.json()) == 1 and "Warning" not in rest.headers
    seen = uids(first.json(), "0020000D") + uids(rest.json(), "0020000D")
    assert sorted(seen) == sorted([S1, S2, S3])


def test_no_match_is_an_empty_list(archive: GatewayProcess) -> None:
    response = get(archive, "/studies", PatientID="nobody")
    assert (response.status_code, response.json()) == (200, [])
    assert response.headers["Content-Type"] == "application/dicom+json"


@pytest.mark.parametrize(("path", "params", "message"), [
    ("/studies", {"StudyDate": "March"}, "StudyDate"),
    ("/studies", {"NoSuchKeyword": "x"}, "NoSuchKeyword"),
    ("/studies", {"Modality": "CT"}, "series-level"),
    ("/studies", {"PatientComments": "x"}, "not supported"),
    ("/studies", {"limit": "-1"}, "limit"),
    ("/studies", {"offset": "99999999999999999999"}, "offset must be an integer from 0 to"),
    ("/series", {"SeriesNumber": "99999999999999999999"}, "outside the range of IS"),
    ("/studies/1.2.x/series", {}, "not a valid UID"),
    ("/studies", {"StudyInstanceUID": "1.2,3..4"}, "not a valid UID"),
])
def test_a_query_it_cannot_answer_is_400_with_the_reason(
        archive: GatewayProcess, path: str, params: dict[str, str], message: str) -> None:
    response = get(archive, path, **params)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_a_repeated_attribute_is_400(archive: GatewayProcess) -> None:
    response = requests.get(f"{archive.dicomweb}/studies?PatientID=P1&PatientID=P2", timeout=10)
    assert response.status_code == 400 and "more than once" in response.json()["error"]


def test_an_accept_it_cannot_satisfy_is_406(archive: GatewayProcess) -> None:
    response = requests.get(f"{archive.dicomweb}/studies", timeout=10,
                            headers={"Accept": "image/png"})
    assert response.status_code == 406


def test_xml_answers_follow_the_native_dicom_model(archive: GatewayProcess) -> None:
    """PS3.18 §8.7.5 / PS3.19 A.1: multipart/related; type="application/dicom+xml"."""
    from email.parser import BytesParser
    from xml.etree import ElementTree

    response = requests.get(f"{archive.dicomweb}/studies", params={"PatientID": "P1"},
                            timeout=10,
                            headers={"Accept": 'multipart/related; type="application/dicom+xml"'})
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith(
        'multipart/related; type="application/dicom+xml"; boundary=')
    message = BytesParser().parsebytes(
        b"Content-Type: " + response.headers["Content-Type"].encode() + b"\r\n\r\n"
        + response.content)
    (part,) = message.get_payload()
    assert part.get_content_type() == "application/dicom+xml"
    ns = {"d": "http://dicom.nema.org/PS3.19/models/NativeDICOM"}
    root = ElementTree.fromstring(part.get_payload(decode=True))
    assert root.tag == "{http://dicom.nema.org/PS3.19/models/NativeDICOM}NativeDicomModel"
    uid = root.find("d:DicomAttribute[@keyword='StudyInstanceUID']/d:Value", ns)
    assert uid is not None and uid.text == S1 and uid.get("number") == "1"
    family = root.find("d:DicomAttribute[@tag='00100010']/d:PersonName/d:Alphabetic/"
                       "d:FamilyName", ns)
    assert family is not None and family.text == "DOE"
    modalities = root.findall("d:DicomAttribute[@keyword='ModalitiesInStudy']/d:Value", ns)
    assert [m.text for m in modalities] == ["CT", "SR"]


#: Keys and values a client may send, well formed or not, for the property below.
_ANY_KEY = st.sampled_from([
    "PatientID", "PatientName", "PatientBirthDate", "StudyDate", "StudyTime",
    "ModalitiesInStudy", "SOPClassesInStudy", "Modality", "AccessionNumber",
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SeriesNumber",
    "InstanceNumber", "NumberOfStudyRelatedInstances", "StudyDescription", "00100020",
    "0020000D", "RequestAttributesSequence.ScheduledProcedureStepID", "includefield",
    "limit", "offset", "fuzzymatching", "NoSuchKeyword", "a.b.c"])
_ANY_VALUE = st.one_of(
    st.sampled_from(["", "*", "?", "\\", "20240101-", "-", "2024-01-01", "20240230",
                     "235960", "1.2.3", "1.2..3", "CT,MR", "Doe^John", "99999999999999999999",
                     "-1", "0", "all", "true", "1e309", "nan", "%", "_", "'", "\"", "[", "é"]),
    st.text(max_size=12))


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(level=st.sampled_from(["/studies", "/series", "/instances", f"/studies/{S1}/series",
                              f"/studies/{S1}/instances",
                              f"/studies/{S1}/series/{SE_A}/instances"]),
       params=st.lists(st.tuples(_ANY_KEY, _ANY_VALUE), max_size=4))
def test_no_query_is_a_server_error(archive: GatewayProcess, level: str,
                                    params: list[tuple[str, str]]) -> None:
    """Whatever a client puts in a query (PS3.18 §8.3.4), the answer is 200, 204 or a 4xx
    whose body says why: never a 5xx (a QIDO-RS parameter fuzzer found three kinds of 500:
    a study list key below the study level, and integers beyond what the database holds)."""
    response = requests.get(f"{archive.dicomweb}{level}", params=params, timeout=10)
    assert response.status_code < 500, (params, response.text[:300])
    if response.status_code >= 400:
        assert response.json()["error"]
