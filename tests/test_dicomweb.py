"""STOW-RS Store Instances (PS3.18 §10.5), driven by the real dicomweb-client and by hand-built
``multipart/related`` bodies sent with requests (so the exact bytes sent are known).

PS3.18 §10.5.3 and Annex I: the response is a Store Instances Response Module data set
(``application/dicom+json``) with a Referenced SOP Sequence (0008,1199) item per stored instance
and a Failed SOP Sequence (0008,1198) item, with its Failure Reason (0008,1197), per instance that
was not stored. HTTP status: 200 all stored; 202 some stored; 409 none stored; 400 bad syntax;
413 payload too large; 415 unsupported media type.

As for C-STORE (PS3.4 B.2.3), "stored" is checked on disk and in the index every time, and every
failure checks that nothing partial is left behind: no blob, no index row, no staging file.
Errors at the request level (400/406/413/415) carry JSON with a human-readable ``error``.

To keep the run short most tests share one gateway (``stow_gateway``) and send fresh copies of
pydicom's test files (new SOP Instance UIDs), so no test sees another's instances.
"""

from __future__ import annotations

import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from conftest import GatewayProcess, free_port, partial_receptions, pydicom_file
from samples import dataset_bytes, sample_files, stored_path

BOUNDARY = "StowRsBoundary-6f1d2c"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'

Part = tuple[bytes, str | None]  # (body, Content-Type of the part; None: no header)


# -- helpers -------------------------------------------------------------------------------------
def _multipart(parts: list[Part], boundary: str = BOUNDARY) -> bytes:
    """A ``multipart/related`` body (RFC 2387 / RFC 2046 §5.1) with one part per item."""
    body = b""
    for data, content_type in parts:
        body += f"--{boundary}\r\n".encode()
        if content_type is not None:
            body += f"Content-Type: {content_type}\r\n".encode()
        body += b"\r\n" + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


def _files(*paths: Path) -> list[Part]:
    return [(path.read_bytes(), "application/dicom") for path in paths]


def _stow(gateway: GatewayProcess, body: bytes | Iterator[bytes], *,
          study_uid: str | None = None, content_type: str = STOW_TYPE) -> requests.Response:
    url = f"{gateway.dicomweb}/studies" + (f"/{study_uid}" if study_uid else "")
    return requests.post(url, data=body, timeout=60,
                         headers={"Content-Type": content_type,
                                  "Accept": "application/dicom+json"})


def _response_dataset(response: requests.Response) -> Dataset:
    """The Store Instances Response Module (PS3.18 Annex I) of a 200/202/409 response."""
    assert response.headers["Content-Type"].startswith("application/dicom+json"), \
        response.headers["Content-Type"]
    return Dataset.from_json(response.json())


def _error(response: requests.Response) -> str:
    """The human-readable reason of a request-level error (400/406/413/415)."""
    assert response.headers["Content-Type"].startswith("application/json"), response.text
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    return str(body["error"])


def _index_has(gateway: GatewayProcess, sop_uid: str) -> bool:
    with sqlite3.connect(gateway.data / "index.sqlite") as db:
        return db.execute("SELECT 1 FROM instance WHERE SOPInstanceUID = ?",
                          (sop_uid,)).fetchone() is not None


def _blobs(gateway: GatewayProcess) -> set[Path]:
    return set(gateway.data.glob("*/*/*.dcm"))


def _staging(gateway: GatewayProcess) -> list[Path]:
    return partial_receptions(gateway.data)


def _assert_not_stored(gateway: GatewayProcess, sop_uid: str) -> None:
    assert stored_path(gateway.data, sop_uid) is None, f"{sop_uid} was stored"
    assert not _index_has(gateway, sop_uid), f"{sop_uid} was indexed"


def _copy(source: str, directory: Path, name: str) -> Path:
    """A Part 10 copy of a pydicom test file with a fresh SOP Instance UID."""
    ds = pydicom.dcmread(pydicom_file(source))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = directory / name
    ds.save_as(path, enforce_file_format=True)
    return path


def _uids(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


@pytest.fixture(scope="module")
def stow_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway shared by the tests of this module (default settings, but a short HTTP
    read timeout so that a client that vanished mid-upload is noticed quickly)."""
    root = tmp_path_factory.mktemp("stow")
    gateway = GatewayProcess(root, free_port(), free_port(),
                             extra={"http": {"read_timeout": 2}}).start()
    yield gateway
    gateway.stop()


Fresh = Callable[[str], Path]


@pytest.fixture
def fresh(tmp_path: Path) -> Fresh:
    """``fresh("CT_small.dcm")`` → a Part 10 copy with a new SOP Instance UID."""
    count = iter(range(1000))
    return lambda source: _copy(source, tmp_path, f"{next(count)}-{source}")


# -- success -------------------------------------------------------------------------------------
def test_dicomweb_client_store_instances_round_trip(gateway: GatewayProcess) -> None:
    """PS3.18 §10.5.3.1 / Annex I: every stored instance gets a Referenced SOP Sequence item with
    its SOP Class/Instance UIDs and a Retrieve URL under the service's base URL; the response's
    own Retrieve URL (0008,1190) names the study."""
    client = DICOMwebClient(gateway.dicomweb)
    ct = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    mr = pydicom.dcmread(pydicom_file("MR_small.dcm"))

    for ds, url_study in ((ct, None), (mr, mr.StudyInstanceUID)):  # POST /studies[/{uid}]
        result = client.store_instances(datasets=[ds], study_instance_uid=url_study)
        assert "FailedSOPSequence" not in result
        assert result.RetrieveURL == f"{gateway.dicomweb}/studies/{ds.StudyInstanceUID}"
        [item] = result.ReferencedSOPSequence
        assert item.ReferencedSOPClassUID == ds.SOPClassUID
        assert item.ReferencedSOPInstanceUID == ds.SOPInstanceUID
        assert item.RetrieveURL == (
            f"{gateway.dicomweb}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")
        stored = stored_path(gateway.data, ds.SOPInstanceUID)
        assert stored is not None and stored.parent.parent.name == ds.StudyInstanceUID
        assert stored.parent.name == ds.SeriesInstanceUID
        assert _index_has(gateway, ds.SOPInstanceUID)
        assert pydicom.dcmread(stored).PixelData == ds.PixelData


def test_dicomweb_client_chunked_upload_is_stored(stow_gateway: GatewayProcess,
                                                 fresh: Fresh) -> None:
    """dicomweb-client sends bodies above its chunk size with Transfer-Encoding: chunked
    (no Content-Length); the gateway must read such a body to its end."""
    client = DICOMwebClient(stow_gateway.dicomweb, chunk_size=8192)
    datasets = [pydicom.dcmread(fresh("CT_small.dcm")) for _ in range(3)]
    result = client.store_instances(datasets=datasets)
    assert sorted(i.ReferencedSOPInstanceUID for i in result.ReferencedSOPSequence) == \
        sorted(ds.SOPInstanceUID for ds in datasets)
    for ds in datasets:
        assert stored_path(stow_gateway.data, ds.SOPInstanceUID) is not None
        assert _index_has(stow_gateway, ds.SOPInstanceUID)


def test_every_transfer_syntax_is_stored_byte_exact_as_sent(stow_gateway: GatewayProcess,
                                                           tmp_path: Path) -> None:
    """One request, one Part 10 file per transfer syntax: the stored data set is the sent one,
    byte for byte, and its file meta names the same transfer syntax."""
    files = sample_files(tmp_path)
    response = _stow(stow_gateway, _multipart(_files(*files.values())))
    assert response.status_code == 200, response.text
    result = _response_dataset(response)
    assert len(result.ReferencedSOPSequence) == len(files)
    for syntax, path in files.items():
        sop_uid = _uids(path).SOPInstanceUID
        stored = stored_path(stow_gateway.data, sop_uid)
        assert stored is not None, f"{syntax}: referenced but not stored"
        assert dataset_bytes(stored) == dataset_bytes(path), f"{syntax}: bytes differ"
        assert pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID \
            == syntax
        assert _index_has(stow_gateway, sop_uid)
    assert _staging(stow_gateway) == []


def test_several_instances_of_several_studies_in_one_request(stow_gateway: GatewayProcess,
                                                            fresh: Fresh) -> None:
    paths = [fresh(n) for n in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm")]
    response = _stow(stow_gateway, _multipart(_files(*paths)))
    assert response.status_code == 200, response.text
    result = _response_dataset(response)
    referenced = {i.ReferencedSOPInstanceUID: i for i in result.ReferencedSOPSequence}
    assert len(referenced) == 3
    for path in paths:
        ds = _uids(path)
        assert referenced[ds.SOPInstanceUID].ReferencedSOPClassUID == ds.SOPClassUID
        assert referenced[ds.SOPInstanceUID].RetrieveURL.startswith(
            f"{stow_gateway.dicomweb}/studies/{ds.StudyInstanceUID}/series/")
        assert stored_path(stow_gateway.data, ds.SOPInstanceUID) is not None
        assert _index_has(stow_gateway, ds.SOPInstanceUID)


def test_part_without_content_type_header_is_taken_as_application_dicom(
        stow_gateway: GatewayProcess, fresh: Fresh) -> None:
    """RFC 2387 §3.1: the ``type`` parameter gives the media type of the parts; a part without
    its own Content-Type header is of that type."""
    path = fresh("CT_small.dcm")
    response = _stow(stow_gateway, _multipart([(path.read_bytes(), None)]))
    assert response.status_code == 200, response.text
    assert stored_path(stow_gateway.data, _uids(path).SOPInstanceUID) is not None


def test_part_media_type_parameters_are_allowed(stow_gateway: GatewayProcess,
                                               fresh: Fresh) -> None:
    """PS3.18 §8.7.3.5: a part may carry ``transfer-syntax`` in its media type."""
    path = fresh("CT_small.dcm")
    part_type = f"application/dicom; transfer-syntax={_uids(path).file_meta.TransferSyntaxUID}"
    response = _stow(stow_gateway, _multipart([(path.read_bytes(), part_type)]))
    assert response.status_code == 200, response.text
    assert stored_path(stow_gateway.data, _uids(path).SOPInstanceUID) is not None


@pytest.mark.parametrize("accept", [
    "application/dicom+json",
    "application/json",
    "*/*",
    "application/*",
    "application/dicom+xml;q=0.9, application/dicom+json;q=0.5",
])
def test_accept_header_allowing_dicom_json_is_served(stow_gateway: GatewayProcess,
                                                     fresh: Fresh, accept: str) -> None:
    """RFC 9110 §12.5.1: media ranges (``*/*``, ``application/*``) and q-values; any Accept
    that admits application/dicom+json gets the Store Instances Response."""
    path = fresh("CT_small.dcm")
    response = requests.post(f"{stow_gateway.dicomweb}/studies", timeout=60,
                             data=_multipart(_files(path)),
                             headers={"Content-Type": STOW_TYPE, "Accept": accept})
    assert response.status_code == 200, response.text
    assert _response_dataset(response).ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
        _uids(path).SOPInstanceUID


def test_media_types_are_compared_case_insensitively(stow_gateway: GatewayProcess,
                                                     fresh: Fresh) -> None:
    """RFC 9110 §8.3.1 (and RFC 2045 §5.1): type, subtype and parameter names are
    case-insensitive, so ``Multipart/Related`` and a part of ``Application/DICOM`` are the
    same media types as their lower-case spellings."""
    path = fresh("CT_small.dcm")
    response = _stow(stow_gateway, _multipart([(path.read_bytes(), "Application/DICOM")]),
                     content_type=f'Multipart/Related; Type="Application/DICOM"; '
                                  f"boundary={BOUNDARY}")
    assert response.status_code == 200, response.text
    assert stored_path(stow_gateway.data, _uids(path).SOPInstanceUID) is not None


def test_preamble_before_the_first_boundary_is_ignored(stow_gateway: GatewayProcess,
                                                       fresh: Fresh) -> None:
    """RFC 2046 §5.1.1: a multipart body may start with a preamble, which is to be ignored
    (RFC 2387 multipart/related inherits that syntax)."""
    path = fresh("CT_small.dcm")
    body = b"This is a multi-part message in MIME format.\r\n" + _multipart(_files(path))
    response = _stow(stow_gateway, body)
    assert response.status_code == 200, response.text
    assert stored_path(stow_gateway.data, _uids(path).SOPInstanceUID) is not None


def test_identical_resend_succeeds_and_changes_nothing(stow_gateway: GatewayProcess,
                                                       fresh: Fresh) -> None:
    path = fresh("CT_small.dcm")
    sop_uid = _uids(path).SOPInstanceUID
    assert _stow(stow_gateway, _multipart(_files(path))).status_code == 200
    stored = stored_path(stow_gateway.data, sop_uid)
    assert stored is not None
    before = (stored.stat().st_ino, stored.stat().st_mtime_ns)
    response = _stow(stow_gateway, _multipart(_files(path)))
    assert response.status_code == 200, response.text
    [item] = _response_dataset(response).ReferencedSOPSequence
    assert item.ReferencedSOPInstanceUID == sop_uid
    assert (stored.stat().st_ino, stored.stat().st_mtime_ns) == before


# -- failures of single instances (Failed SOP Sequence) ------------------------------------------
def test_instance_of_another_study_than_the_url_is_refused_c409(stow_gateway: GatewayProcess,
                                                                fresh: Fresh) -> None:
    """PS3.18 §10.5.3.1 / Table 10.5.3-1: POST /studies/{uid} with an instance whose Study
    Instance UID differs: not stored, Failure Reason C409, and 409 when nothing was stored."""
    path = fresh("CT_small.dcm")
    ds = _uids(path)
    blobs = _blobs(stow_gateway)
    response = _stow(stow_gateway, _multipart(_files(path)), study_uid=generate_uid())
    assert response.status_code == 409, response.text
    result = _response_dataset(response)
    assert "ReferencedSOPSequence" not in result
    [failed] = result.FailedSOPSequence
    assert failed.FailureReason == 0xC409
    assert failed.ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert failed.ReferencedSOPClassUID == ds.SOPClassUID
    _assert_not_stored(stow_gateway, ds.SOPInstanceUID)
    assert _blobs(stow_gateway) == blobs and _staging(stow_gateway) == []


def test_one_good_and_one_mismatching_instance_is_202(stow_gateway: GatewayProcess,
                                                      fresh: Fresh) -> None:
    """PS3.18 §10.5.3: some instances stored, some failed → 202 Accepted, one sequence each."""
    good, other = fresh("CT_small.dcm"), fresh("MR_small.dcm")
    good_ds, other_ds = _uids(good), _uids(other)
    response = _stow(stow_gateway, _multipart(_files(good, other)),
                     study_uid=good_ds.StudyInstanceUID)
    assert response.status_code == 202, response.text
    result = _response_dataset(response)
    assert [i.ReferencedSOPInstanceUID for i in result.ReferencedSOPSequence] == \
        [good_ds.SOPInstanceUID]
    [failed] = result.FailedSOPSequence
    assert (failed.ReferencedSOPInstanceUID, failed.FailureReason) == \
        (other_ds.SOPInstanceUID, 0xC409)
    assert stored_path(stow_gateway.data, good_ds.SOPInstanceUID) is not None
    _assert_not_stored(stow_gateway, other_ds.SOPInstanceUID)
    assert _staging(stow_gateway) == []


def test_a_non_dicom_part_fails_alone_202(stow_gateway: GatewayProcess, fresh: Fresh) -> None:
    """A part of another media type than application/dicom is not an instance: it fails
    (Failed SOP item with a Cxxx reason) while the DICOM part beside it is stored."""
    good = fresh("CT_small.dcm")
    blobs = _blobs(stow_gateway)
    response = _stow(stow_gateway, _multipart([(b"just some notes\r\n", "text/plain"),
                                               *_files(good)]))
    assert response.status_code == 202, response.text
    result = _response_dataset(response)
    assert [i.ReferencedSOPInstanceUID for i in result.ReferencedSOPSequence] == \
        [_uids(good).SOPInstanceUID]
    [failed] = result.FailedSOPSequence
    assert 0xC000 <= failed.FailureReason <= 0xCFFF, hex(failed.FailureReason)
    assert _blobs(stow_gateway) - blobs == {stored_path(stow_gateway.data,
                                                        _uids(good).SOPInstanceUID)}
    assert _staging(stow_gateway) == []


def test_truncated_part10_file_is_refused_and_leaves_nothing(stow_gateway: GatewayProcess,
                                                             fresh: Fresh) -> None:
    """A file cut inside its pixel data cannot be understood: Failure Reason Cxxx, 409."""
    source = fresh("CT_small.dcm")
    data = source.read_bytes()
    blobs = _blobs(stow_gateway)
    response = _stow(stow_gateway, _multipart([(data[: len(data) - 5000], "application/dicom")]))
    assert response.status_code == 409, response.text
    [failed] = _response_dataset(response).FailedSOPSequence
    assert 0xC000 <= failed.FailureReason <= 0xCFFF, hex(failed.FailureReason)
    _assert_not_stored(stow_gateway, _uids(source).SOPInstanceUID)
    assert _blobs(stow_gateway) == blobs and _staging(stow_gateway) == []


def test_part_that_is_not_a_part10_file_is_refused(stow_gateway: GatewayProcess) -> None:
    """PS3.18 §10.5.1: each application/dicom part is a PS3.10 file; arbitrary bytes fail with
    a Cxxx reason and nothing is stored."""
    blobs = _blobs(stow_gateway)
    response = _stow(stow_gateway,
                     _multipart([(b"\x00" * 64 + b"not dicom at all", "application/dicom")]))
    assert response.status_code == 409, response.text
    [failed] = _response_dataset(response).FailedSOPSequence
    assert 0xC000 <= failed.FailureReason <= 0xCFFF, hex(failed.FailureReason)
    assert _blobs(stow_gateway) == blobs and _staging(stow_gateway) == []


def test_different_object_with_a_stored_sop_instance_uid_is_refused_0111(
        stow_gateway: GatewayProcess, fresh: Fresh, tmp_path: Path) -> None:
    """storage.duplicate_policy = reject (default): Failure Reason 0x0111 (Duplicate SOP
    Instance, PS3.7 C.4), 409, and the stored object is kept as it was."""
    original = fresh("CT_small.dcm")
    assert _stow(stow_gateway, _multipart(_files(original))).status_code == 200
    changed = pydicom.dcmread(original)
    changed.StudyDescription = "changed after the fact"
    other = tmp_path / "changed.dcm"
    changed.save_as(other)
    response = _stow(stow_gateway, _multipart(_files(other)))
    assert response.status_code == 409, response.text
    [failed] = _response_dataset(response).FailedSOPSequence
    assert (failed.ReferencedSOPInstanceUID, failed.FailureReason) == \
        (changed.SOPInstanceUID, 0x0111)
    stored = stored_path(stow_gateway.data, changed.SOPInstanceUID)
    assert stored is not None and dataset_bytes(stored) == dataset_bytes(original)
    assert _staging(stow_gateway) == []


# -- request-level errors (no Store Instances Response) ------------------------------------------
CT = pydicom_file("CT_small.dcm").read_bytes()


@pytest.mark.parametrize("content_type, cause", [
    ("application/json", "multipart/related"),
    ("application/dicom", "multipart/related"),
    ('multipart/related; type="application/dicom+json"; boundary=' + BOUNDARY,
     "application/dicom+json"),
    ('multipart/related; type="application/dicom+xml"; boundary=' + BOUNDARY,
     "application/dicom+xml"),
])
def test_unsupported_media_type_is_415(stow_gateway: GatewayProcess, content_type: str,
                                       cause: str) -> None:
    """PS3.18 §10.5.3 / §8.7.5: a Content-Type the service does not support → 415. This
    gateway takes PS3.10 instances (type="application/dicom") only."""
    blobs = _blobs(stow_gateway)
    response = _stow(stow_gateway, _multipart([(CT, "application/dicom")]),
                     content_type=content_type)
    assert response.status_code == 415, response.text
    assert cause in _error(response)
    assert _blobs(stow_gateway) == blobs and _staging(stow_gateway) == []


@pytest.mark.parametrize("case, content_type, body, cause", [
    ("missing boundary", 'multipart/related; type="application/dicom"',
     _multipart([(CT, "application/dicom")]), "boundary"),
    ("no delimiter at all", STOW_TYPE, b"this is not a multipart body", "malformed"),
    ("body ends inside a part", STOW_TYPE,
     f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + CT[:20000],
     "closing boundary"),
    ("empty body", STOW_TYPE, b"", "no parts"),
    ("only the close delimiter", STOW_TYPE, f"--{BOUNDARY}--\r\n".encode(), "no parts"),
])
def test_malformed_request_is_400(stow_gateway: GatewayProcess, case: str, content_type: str,
                                  body: bytes, cause: str) -> None:
    """PS3.18 §8.7.5 / §10.5.3: a request that is not a well-formed multipart/related
    message → 400 Bad Request, and nothing received is kept."""
    blobs = _blobs(stow_gateway)
    response = _stow(stow_gateway, body, content_type=content_type)
    assert response.status_code == 400, f"{case}: {response.status_code} {response.text}"
    assert cause in _error(response), case
    assert _blobs(stow_gateway) == blobs and _staging(stow_gateway) == []


def test_accept_header_excluding_dicom_json_is_406(stow_gateway: GatewayProcess) -> None:
    """PS3.18 §8.7.5 / RFC 9110 §15.5.7: the response can only be application/dicom+json."""
    blobs = _blobs(stow_gateway)
    response = requests.post(f"{stow_gateway.dicomweb}/studies", timeout=60,
                             data=_multipart([(CT, "application/dicom")]),
                             headers={"Content-Type": STOW_TYPE, "Accept": "text/html"})
    assert response.status_code == 406, response.text
    assert "application/dicom+json" in _error(response)
    assert _blobs(stow_gateway) == blobs and _staging(stow_gateway) == []


@pytest.mark.parametrize("study_uid", ["1.02.3", "1.2.abc", "1." + "2" * 70, "1..2"])
def test_invalid_study_uid_in_the_url_is_400(stow_gateway: GatewayProcess,
                                            study_uid: str) -> None:
    """PS3.18 §10.5.1: {StudyInstanceUID} is a UID (PS3.5 §9.1); anything else → 400."""
    blobs = _blobs(stow_gateway)
    response = _stow(stow_gateway, _multipart([(CT, "application/dicom")]), study_uid=study_uid)
    assert response.status_code == 400, response.text
    message = _error(response)
    assert "Study Instance UID" in message and study_uid[:20] in message
    assert _blobs(stow_gateway) == blobs and _staging(stow_gateway) == []


def test_request_larger_than_max_request_bytes_is_413(make_gateway: object,
                                                      tmp_path: Path) -> None:
    """http.max_request_bytes: a declared Content-Length above it → 413 before anything is
    read; a chunked body (no Content-Length) that grows past it → 413 too. Nothing is stored
    either way, and a request under the limit still goes through."""
    gw = make_gateway(extra={"http": {"max_request_bytes": 100000}}).start()  # type: ignore[operator]
    files = [_copy("CT_small.dcm", tmp_path, f"ct{i}.dcm") for i in range(3)]  # ~118 kB
    body = _multipart(_files(*files))
    assert len(body) > 100000

    response = _stow(gw, body)
    assert response.status_code == 413, response.text
    assert "max_request_bytes" in _error(response)

    response = _stow(gw, iter([body[:30000], body[30000:60000], body[60000:]]))  # chunked
    assert response.status_code == 413, response.text
    assert "max_request_bytes" in _error(response)

    for path in files:
        _assert_not_stored(gw, _uids(path).SOPInstanceUID)
    assert _blobs(gw) == set() and _staging(gw) == []

    response = _stow(gw, _multipart(_files(files[0])))
    assert response.status_code == 200, response.text


def test_client_disconnecting_mid_upload_leaves_no_staging_files(
        stow_gateway: GatewayProcess, fresh: Fresh) -> None:
    """An upload cut off half-way was never acknowledged: its parts must not stay in the
    staging area (nor be stored)."""
    gateway = stow_gateway
    paths = [fresh("CT_small.dcm"), fresh("MR_small.dcm")]
    blobs = _blobs(gateway)
    body = _multipart(_files(*paths))
    head = (f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1:{gateway.http_port}\r\n"
            f"Content-Type: {STOW_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    answered = gateway.log.count("POST /dicomweb/studies HTTP/1.1")
    with socket.create_connection(("127.0.0.1", gateway.http_port), timeout=10) as sock:
        sock.sendall(head + body[: len(body) // 2])
        time.sleep(0.5)
    # The server reads the body until the end of the stream, which the disconnect brings
    # (or read_timeout): then it stages what came, finds the body cut and answers 400. Its
    # staging must be empty once it has answered (polling staging alone could look before
    # the parts were even written).
    deadline = time.monotonic() + 15
    while gateway.log.count("POST /dicomweb/studies HTTP/1.1") == answered \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gateway.log.count("POST /dicomweb/studies HTTP/1.1") == answered + 1
    assert _staging(gateway) == [], gateway.log[-3000:]
    assert _blobs(gateway) == blobs
    for path in paths:
        _assert_not_stored(gateway, _uids(path).SOPInstanceUID)
    assert requests.get(f"{gateway.base_url}/readyz", timeout=5).status_code == 200
