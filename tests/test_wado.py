"""WADO-RS (PS3.18 §10.4) and WADO-URI (PS3.18 §9) against a real ``imaging-gateway serve``,
driven by dicomweb-client and by requests (for exact statuses and headers).

One gateway serves the whole module (``gw``); the samples (one file per transfer syntax, from
``tests/samples.py``) and a small synthetic study are stored once through STOW-RS. Every check
of "byte-exact" compares with the stored file; every check of "transcoded" decodes the result
with pydicom and compares its pixels with the original's (lossless sources).
"""

from __future__ import annotations

import io
import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.uid import generate_uid
from werkzeug.http import parse_options_header

from conftest import GatewayProcess, free_port
from samples import sample_files, stored_path, synthetic

ELE = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
RLE = "1.2.840.10008.1.2.5"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_LS = "1.2.840.10008.1.2.4.80"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"  # pydicom's sample: no decoder here can read it
#: Lossless compressed samples: transcoding them must give the original pixels exactly.
LOSSLESS = (JPEG_LOSSLESS_SV1, "1.2.840.10008.1.2.4.57", JPEG_LS, J2K_LOSSLESS, RLE,
            "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202")
NATIVE = (IMPLICIT, ELE, BIG_ENDIAN, DEFLATED)
LOSSY = (JPEG_BASELINE, JPEG_EXTENDED, "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.91",
         "1.2.840.10008.1.2.4.203")
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def dicom_accept(syntax: str | None = None) -> str:
    return 'multipart/related; type="application/dicom"' + (
        f"; transfer-syntax={syntax}" if syntax else "")


@dataclass(frozen=True)
class Part:
    headers: dict[str, str]
    body: bytes


def parts(response: requests.Response) -> list[Part]:
    """The parts of a ``multipart/related`` response (RFC 2046 §5.1.1), checked strictly."""
    mimetype, options = parse_options_header(response.headers["Content-Type"])
    assert mimetype == "multipart/related", response.headers["Content-Type"]
    boundary = options["boundary"].encode()
    body = response.content
    assert body.endswith(b"--" + boundary + b"--\r\n"), body[-80:]
    found = []
    for chunk in body.split(b"--" + boundary)[1:-1]:
        assert chunk.startswith(b"\r\n") and chunk.endswith(b"\r\n")
        head, _, data = chunk[2:-2].partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        found.append(Part({k.lower(): v for k, v in headers.items()}, data))
    return found


def error_of(response: requests.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["Content-Type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert isinstance(body.get("error"), str) and body["error"]
    return body


def to_bytes(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def stow(gw: GatewayProcess, *files: bytes) -> None:
    boundary = "wado-test-boundary"
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
                    + data + b"\r\n" for data in files) + b"--" + boundary.encode() + b"--\r\n"
    response = requests.post(f"{gw.dicomweb}/studies", data=body, timeout=60, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json"})
    assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("wado")
    gateway = GatewayProcess(root, free_port(), free_port(),
                             extra={"storage": {"fsync": False}}).start()
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def client(gw: GatewayProcess) -> DICOMwebClient:
    return DICOMwebClient(gw.dicomweb)


@pytest.fixture(scope="module")
def samples(gw: GatewayProcess, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Dataset]:
    """Transfer syntax → the sample stored in it (the data set as sent, pixels included)."""
    files = sample_files(tmp_path_factory.mktemp("samples"))
    stow(gw, *(path.read_bytes() for path in files.values()))
    return {syntax: pydicom.dcmread(path) for syntax, path in files.items()}


@dataclass(frozen=True)
class Study:
    uid: str
    series: list[str]
    instances: list[Dataset]  # in the order retrieval must give: series 1 (1, 2), series 2


@pytest.fixture(scope="module")
def study(gw: GatewayProcess) -> Study:
    """Two series sent out of order; series 2 also holds a 3-frame image and a non-image."""
    uid, first, second = generate_uid(), generate_uid(), generate_uid()
    ramp = np.arange(16 * 16, dtype=np.int16).reshape(16, 16) * 4 - 400
    a = synthetic(ramp, study=uid, series=first, series_number=1, instance_number=1,
                  WindowCenter=0, WindowWidth=800)
    b = synthetic(ramp + 1, study=uid, series=first, series_number=1, instance_number=2)
    frames = np.stack([np.full((8, 8), 100 * (n + 1), dtype=np.uint16) for n in range(3)])
    c = synthetic(frames, study=uid, series=second, series_number=2, instance_number=1)
    plan = pydicom.dcmread(Path(pydicom.data.get_testdata_file("rtplan.dcm")))
    plan.StudyInstanceUID, plan.SeriesInstanceUID = uid, second
    plan.SeriesNumber, plan.InstanceNumber = 2, 2
    plan.SOPInstanceUID = plan.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    plan.file_meta.TransferSyntaxUID = ELE  # rtplan.dcm is Implicit VR, never sent as is
    stow(gw, *(to_bytes(ds) for ds in (c, plan, b, a)))
    return Study(uid, [first, second], [a, b, c, plan])


def instance_url(gw: GatewayProcess, ds: Dataset) -> str:
    return (f"{gw.dicomweb}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")


def stored_file(gw: GatewayProcess, ds: Dataset) -> bytes:
    path = stored_path(gw.data, ds.SOPInstanceUID)
    assert path is not None
    return path.read_bytes()


# -- retrieve instances: byte-exact, transcoded, default ----------------------------------------
@pytest.mark.parametrize("how", ["*", "stored"])
def test_stored_syntax_accepted_gives_the_stored_file_byte_for_byte(
        gw: GatewayProcess, samples: dict[str, Dataset], how: str) -> None:
    """PS3.18 §8.7.3.5: with ``transfer-syntax=*`` (or the stored UID) the instance is sent as
    stored: the part is the stored Part 10 file, unchanged. Implicit VR Little Endian and Big
    Endian are never sent on the web (§8.7.3): those come as Explicit VR Little Endian."""
    for syntax, ds in samples.items():
        asked = "*" if how == "*" else syntax
        response = requests.get(instance_url(gw, ds), headers={"Accept": dicom_accept(asked)},
                                timeout=30)
        if syntax in (IMPLICIT, BIG_ENDIAN):
            if how == "stored":
                error_of(response, 406)
                continue
            [part] = parts(response)
            assert pydicom.dcmread(io.BytesIO(part.body)).file_meta.TransferSyntaxUID == ELE
            continue
        assert response.status_code == 200, (syntax, response.text[:300])
        [part] = parts(response)
        assert part.body == stored_file(gw, ds), syntax
        assert part.headers["content-type"] == f"application/dicom; transfer-syntax={syntax}"
        assert part.headers["content-location"] == instance_url(gw, ds)
        outer = parse_options_header(response.headers["Content-Type"])[1]
        assert outer["type"] == "application/dicom" and outer["transfer-syntax"] == syntax


def test_default_is_explicit_vr_little_endian_except_for_lossy_pixel_data(
        gw: GatewayProcess, samples: dict[str, Dataset]) -> None:
    """PS3.18 §8.7.3: no transfer-syntax parameter → Explicit VR Little Endian, "unless the
    origin server has only access to the pixel data in lossy compressed form" (then: as
    stored). Lossless sources decode to exactly the original pixels."""
    for syntax, ds in samples.items():
        response = requests.get(instance_url(gw, ds), headers={"Accept": dicom_accept()},
                                timeout=30)
        assert response.status_code == 200, (syntax, response.text[:300])
        [part] = parts(response)
        got = pydicom.dcmread(io.BytesIO(part.body))
        if syntax in LOSSY:
            assert part.body == stored_file(gw, ds), syntax
            continue
        assert got.file_meta.TransferSyntaxUID == ELE, syntax
        assert part.headers["content-type"] == f"application/dicom; transfer-syntax={ELE}"
        assert got.SOPInstanceUID == ds.SOPInstanceUID  # lossless: the same object
        assert np.array_equal(got.pixel_array, ds.pixel_array), syntax


@pytest.mark.parametrize("source", LOSSLESS)
def test_dicomweb_client_gets_lossless_sources_decompressed_on_request(
        client: DICOMwebClient, samples: dict[str, Dataset], source: str) -> None:
    ds = samples[source]
    got = client.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                                   media_types=(("application/dicom", ELE),))
    assert got.file_meta.TransferSyntaxUID == ELE
    assert np.array_equal(got.pixel_array, ds.pixel_array)
    assert got.PhotometricInterpretation == ds.PhotometricInterpretation


def test_lossy_source_is_decompressed_when_explicitly_asked(
        gw: GatewayProcess, samples: dict[str, Dataset]) -> None:
    ds = samples[JPEG_BASELINE]
    response = requests.get(instance_url(gw, ds), headers={"Accept": dicom_accept(ELE)},
                            timeout=30)
    [part] = parts(response)
    got = pydicom.dcmread(io.BytesIO(part.body))
    assert got.file_meta.TransferSyntaxUID == ELE
    assert np.array_equal(got.pixel_array, ds.pixel_array)  # pydicom's decode, as RGB


@pytest.mark.parametrize(("source", "target"), [(JPEG_LS, RLE), (ELE, J2K_LOSSLESS),
                                                (RLE, DEFLATED)])
def test_lossless_recompression_to_another_syntax(gw: GatewayProcess,
                                                  samples: dict[str, Dataset], source: str,
                                                  target: str) -> None:
    ds = samples[source]
    response = requests.get(instance_url(gw, ds), timeout=30, headers={
        "Accept": f"{dicom_accept(JPEG_BASELINE)}, {dicom_accept(target)};q=0.5"})
    [part] = parts(response)
    got = pydicom.dcmread(io.BytesIO(part.body))
    assert got.file_meta.TransferSyntaxUID == target
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    assert np.array_equal(got.pixel_array, ds.pixel_array)


def test_q_values_order_the_choice(gw: GatewayProcess, samples: dict[str, Dataset]) -> None:
    """RFC 9110 §12.5.1: the client's preferred representation wins; at equal preference the
    stored syntax wins (no work, exact bytes)."""
    ds = samples[JPEG_LS]
    url = instance_url(gw, ds)
    preferred = requests.get(url, timeout=30, headers={
        "Accept": f"{dicom_accept('*')};q=0.4, {dicom_accept(ELE)};q=0.9"})
    assert parts(preferred)[0].headers["content-type"].endswith(ELE)
    tie = requests.get(url, timeout=30, headers={
        "Accept": f"{dicom_accept(ELE)}, {dicom_accept(JPEG_LS)}"})
    assert parts(tie)[0].body == stored_file(gw, ds)


def test_single_part_application_dicom_for_one_instance(
        gw: GatewayProcess, samples: dict[str, Dataset]) -> None:
    ds = samples[ELE]
    response = requests.get(instance_url(gw, ds), headers={"Accept": "application/dicom"},
                            timeout=30)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/dicom"
    assert response.content == stored_file(gw, ds)


def test_study_and_series_are_streamed_in_series_and_instance_order(
        gw: GatewayProcess, client: DICOMwebClient, study: Study) -> None:
    """The response is produced part by part (chunked, no Content-Length: a study is never
    held in memory); order is Series Number, then Instance Number."""
    response = requests.get(f"{gw.dicomweb}/studies/{study.uid}", timeout=30,
                            headers={"Accept": dicom_accept("*")})
    assert response.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in response.headers
    assert response.headers["Content-Location"] == f"{gw.dicomweb}/studies/{study.uid}"
    got = [part.body for part in parts(response)]
    assert got == [stored_file(gw, ds) for ds in study.instances]
    retrieved = client.retrieve_study(study.uid)
    assert [ds.SOPInstanceUID for ds in retrieved] == \
        [ds.SOPInstanceUID for ds in study.instances]
    series = client.retrieve_series(study.uid, study.series[1])
    assert [ds.SOPInstanceUID for ds in series] == \
        [ds.SOPInstanceUID for ds in study.instances[2:]]


# -- errors --------------------------------------------------------------------------------------
def test_unsatisfiable_accept_is_406_naming_what_is_offered(
        gw: GatewayProcess, samples: dict[str, Dataset]) -> None:
    url = instance_url(gw, samples[ELE])
    for accept in (dicom_accept(JPEG_BASELINE),  # lossy target: never produced
                   dicom_accept(IMPLICIT),  # not on the web (PS3.18 §8.7.3)
                   "application/dicom+xml", "text/html",
                   'multipart/related; type="application/octet-stream"'):
        body = error_of(requests.get(url, headers={"Accept": accept}, timeout=30), 406)
        assert dicom_accept(ELE) in body["offered"], body
        assert not any(o.endswith(("=" + IMPLICIT, "=" + BIG_ENDIAN)) for o in body["offered"])
    undecodable = samples[JPEG_EXTENDED]  # pydicom's sample no installed decoder can read
    body = error_of(requests.get(instance_url(gw, undecodable), timeout=30,
                                 headers={"Accept": dicom_accept(ELE)}), 406)
    assert body["offered"] == [dicom_accept(JPEG_EXTENDED)]
    assert "JPEG Extended" in body["error"]


def test_the_accept_query_parameter_takes_the_place_of_the_header(
        gw: GatewayProcess, samples: dict[str, Dataset]) -> None:
    """PS3.18 §8.3.3.1: ``accept`` in the query overrides the Accept header."""
    url = instance_url(gw, samples[ELE])
    response = requests.get(url, params={"accept": "application/dicom+xml"}, timeout=30,
                            headers={"Accept": dicom_accept()})
    error_of(response, 406)


def test_what_is_not_stored_is_404(gw: GatewayProcess, samples: dict[str, Dataset],
                                   study: Study) -> None:
    ds = samples[ELE]
    other = generate_uid()
    for url in (f"{gw.dicomweb}/studies/{other}",
                f"{gw.dicomweb}/studies/{ds.StudyInstanceUID}/series/{other}",
                f"{gw.dicomweb}/studies/{study.uid}/series/{ds.SeriesInstanceUID}"
                f"/instances/{ds.SOPInstanceUID}",  # exists, but not in that study
                f"{gw.dicomweb}/studies/{other}/metadata",
                f"{instance_url(gw, ds)}/frames/2",  # one frame only
                f"{instance_url(gw, study.instances[3])}/frames/1",  # no pixel data
                f"{instance_url(gw, ds)}/bulkdata/00081140/0/00081150",
                f"{gw.dicomweb}/studies/{other}/rendered"):
        error_of(requests.get(url, timeout=30), 404)


def test_an_instance_stored_with_malformed_values_is_served_as_far_as_it_can_be(
        gw: GatewayProcess) -> None:
    """The store path keeps objects byte for byte and reads only what it indexes, so an object
    can be stored with a malformed value elsewhere: here Pixel Spacing, a DS that is no number,
    and Number of Frames "1A". Its metadata leaves the unreadable element out (and logs it),
    whole otherwise; its frames, which cannot be found without a frame count, are a 500 that
    says why. Until both were handled, the metadata answer broke off mid-stream (a 200 with
    a cut body) and the frames were a 500 with no reason (found by storing garbled objects
    and retrieving them every way)."""
    ds = synthetic(np.zeros((8, 8), dtype=np.uint16), study=generate_uid(),
                   series=generate_uid())
    ds.PixelSpacing = [1.5, 1.5]
    ds.NumberOfFrames = 1
    data = to_bytes(ds)
    spacing = b"\x28\x00\x30\x00DS\x08\x001.5\\1.5 "
    frames = b"\x28\x00\x08\x00IS\x02\x001 "
    assert spacing in data and frames in data
    data = data.replace(spacing, spacing[:8] + b"1.\x025\\1.5")
    data = data.replace(frames, frames[:8] + b"1A")
    stow(gw, data)
    url = instance_url(gw, ds)
    metadata = requests.get(f"{url}/metadata", timeout=10)
    assert metadata.status_code == 200
    [attributes] = metadata.json()
    assert "00280030" not in attributes
    assert attributes["00100020"]["Value"] == ["WADO-TEST"]
    assert "element 00280030 left out" in gw.log
    error = error_of(requests.get(f"{url}/frames/1", timeout=10, headers={
        "Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}), 500)
    assert "NumberOfFrames ('1A') is not a positive integer" in error["error"]
    bulk = requests.get(f"{url}/bulkdata/7FE00010", timeout=10, headers={
        "Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'})
    assert "NumberOfFrames ('1A') is not a positive integer" in error_of(bulk, 500)["error"]


def test_pixel_data_that_crashes_its_decoder_is_refused_with_the_reason(
        gw: GatewayProcess) -> None:
    """RLE Lossless (PS3.5 Annex G) whose first segment decodes to more bytes than a segment
    holds: pylibjpeg-rle, written in Rust, panics on it, and pyo3 raises that panic as a
    BaseException, which every ``except Exception`` let through (found by storing garbled
    objects and rendering them). Rendering and native frames refuse it (406, the only
    representations left are the stored ones) and say that the decoder crashed."""
    from pydicom.encaps import encapsulate

    ds = synthetic(np.zeros((10, 10), dtype=np.uint16), study=generate_uid(),
                   series=generate_uid())
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    full, overlong = bytes([0xF7, 0]) * 10, bytes([0xF7, 0]) * 11  # 100 and 110 bytes
    segments = [overlong, full, full, full]
    offsets = [64 + sum(len(s) for s in segments[:n]) for n in range(4)]
    frame = struct.pack("<16L", 4, *offsets, *[0] * 11) + b"".join(segments)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.5"  # RLE Lossless
    stow(gw, to_bytes(ds))
    url = instance_url(gw, ds)
    rendered = error_of(requests.get(f"{url}/rendered", timeout=10,
                                     headers={"Accept": "image/png"}), 406)
    assert "the decoder crashed" in rendered["error"]
    native = error_of(requests.get(f"{url}/frames/1", timeout=10, headers={
        "Accept": 'multipart/related; type="application/octet-stream"'}), 406)
    assert "the decoder crashed" in native["error"]


@pytest.mark.parametrize("path", [
    "studies/1.02.3", "studies/abc/metadata", "studies/1.2/series/1..3",
    "studies/1.2/series/1.3/instances/" + "1" * 65,
    "studies/1.2/series/1.3/instances/1.4/frames/0",
    "studies/1.2/series/1.3/instances/1.4/frames/1,x",
    "studies/1.2/series/1.3/instances/1.4/bulkdata/7FE0",
    "studies/1.2/series/1.3/instances/1.4/rendered?window=1",
    "studies/1.2/series/1.3/instances/1.4/rendered?viewport=0,0",
    "studies/1.2/series/1.3/instances/1.4/thumbnail?quality=101",
])
def test_malformed_uid_or_parameter_is_400(gw: GatewayProcess, path: str) -> None:
    error_of(requests.get(f"{gw.dicomweb}/{path}", timeout=30), 400)


def test_missing_blob_is_reported_and_the_rest_still_served(gw: GatewayProcess) -> None:
    """An index row whose file is gone: a clear 500 for that instance alone, 206 with a
    Warning for a series that still has others; the server keeps serving."""
    study_uid, series_uid = generate_uid(), generate_uid()
    kept, lost = (synthetic(np.zeros((4, 4), dtype=np.uint16), study=study_uid,
                            series=series_uid, instance_number=n) for n in (1, 2))
    stow(gw, to_bytes(kept), to_bytes(lost))
    path = stored_path(gw.data, lost.SOPInstanceUID)
    assert path is not None
    path.unlink()
    body = error_of(requests.get(instance_url(gw, lost), timeout=30), 500)
    assert lost.SOPInstanceUID in body["error"] and "missing" in body["error"]
    error_of(requests.get(instance_url(gw, lost) + "/metadata", timeout=30), 500)
    series = requests.get(f"{gw.dicomweb}/studies/{study_uid}/series/{series_uid}", timeout=30,
                          headers={"Accept": dicom_accept("*")})
    assert series.status_code == 206
    assert lost.SOPInstanceUID in series.headers["Warning"]
    assert [p.body for p in parts(series)] == [stored_file(gw, kept)]
    assert requests.get(f"{gw.base_url}/healthz", timeout=5).status_code == 200


# -- metadata and bulk data ---------------------------------------------------------------------
def test_metadata_is_dicom_json_with_bulk_data_uris(gw: GatewayProcess, client: DICOMwebClient,
                                                    study: Study) -> None:
    """PS3.18 Annex F: an array with one object per instance; tags in ascending order; pixel
    data as a BulkDataURI that really serves the pixels."""
    response = requests.get(f"{gw.dicomweb}/studies/{study.uid}/metadata", timeout=30)
    assert response.headers["Content-Type"].startswith("application/dicom+json")
    objects = response.json()
    assert [o["00080018"]["Value"][0] for o in objects] == \
        [ds.SOPInstanceUID for ds in study.instances]
    for obj in objects:
        assert list(obj) == sorted(obj)
        assert not any(key.endswith("0000") for key in obj)
    series = client.retrieve_series_metadata(study.uid, study.series[1])
    assert len(series) == 2
    multiframe = study.instances[2]
    meta = client.retrieve_instance_metadata(study.uid, study.series[1],
                                             multiframe.SOPInstanceUID)
    assert meta["7FE00010"]["vr"] == "OW" and "Value" not in meta["7FE00010"]
    [pixels] = client.retrieve_bulkdata(meta["7FE00010"]["BulkDataURI"])
    assert pixels == multiframe.PixelData
    restored = Dataset.from_json(meta, lambda uri: bytes(client.retrieve_bulkdata(uri)[0]))
    assert restored.Rows == 8 and restored.NumberOfFrames == 3
    assert restored.PixelData == multiframe.PixelData


def test_compressed_pixel_data_bulk_data(client: DICOMwebClient,
                                         samples: dict[str, Dataset]) -> None:
    """The Pixel Data BulkDataURI of a compressed instance gives native pixels by default,
    or the stored code stream per frame when the client accepts that image type."""
    ds = samples[JPEG_LS]
    meta = client.retrieve_instance_metadata(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                             ds.SOPInstanceUID)
    uri = meta["7FE00010"]["BulkDataURI"]
    [native] = client.retrieve_bulkdata(uri, media_types=(("application/octet-stream",),))
    assert native == ds.pixel_array.astype("<i2").tobytes()
    [stream] = client.retrieve_bulkdata(uri, media_types=(("image/jls",),))
    assert stream == next(generate_frames(ds.PixelData, number_of_frames=1))


# -- frames --------------------------------------------------------------------------------------
def test_native_frames(client: DICOMwebClient, study: Study, gw: GatewayProcess) -> None:
    ds = study.instances[2]
    frames = client.retrieve_instance_frames(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                             ds.SOPInstanceUID, [3, 1])
    expected = [np.full((8, 8), v, dtype="<u2").tobytes() for v in (300, 100)]
    assert frames == expected
    response = requests.get(f"{instance_url(gw, ds)}/frames/2", timeout=30, headers={
        "Accept": 'multipart/related; type="application/octet-stream"'})
    [part] = parts(response)
    assert part.headers["content-type"] == f"application/octet-stream; transfer-syntax={ELE}"
    assert part.headers["content-location"] == f"{instance_url(gw, ds)}/frames/2"
    assert part.body == np.full((8, 8), 200, dtype="<u2").tobytes()


@pytest.mark.parametrize("source", LOSSLESS)
def test_compressed_frames_decoded_or_as_stored(client: DICOMwebClient,
                                                samples: dict[str, Dataset],
                                                source: str) -> None:
    ds = samples[source]
    uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    [native] = client.retrieve_instance_frames(
        *uids, [1], media_types=(("application/octet-stream", ELE),))
    expected = ds.pixel_array
    assert native == expected.astype(expected.dtype.newbyteorder("<")).tobytes()
    media = {"1.2.840.10008.1.2.4.57": "image/jpeg", JPEG_LOSSLESS_SV1: "image/jpeg",
             JPEG_LS: "image/jls", J2K_LOSSLESS: "image/jp2", RLE: "image/dicom-rle"}
    if source in media:  # dicomweb-client knows no HTJ2K media type
        [stream] = client.retrieve_instance_frames(*uids, [1], media_types=((media[source],),))
        assert stream == next(generate_frames(ds.PixelData, number_of_frames=1))


def test_frames_negotiation_headers_and_406(gw: GatewayProcess,
                                            samples: dict[str, Dataset]) -> None:
    ds = samples[J2K_LOSSLESS]
    url = f"{instance_url(gw, ds)}/frames/1"
    stored = requests.get(url, timeout=30, headers={
        "Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'})
    [part] = parts(stored)
    assert part.headers["content-type"] == f"image/jp2; transfer-syntax={J2K_LOSSLESS}"
    refused = requests.get(url, timeout=30, headers={
        "Accept": 'multipart/related; type="image/jls"'})
    body = error_of(refused, 406)
    assert 'multipart/related; type="image/jp2"; transfer-syntax=' + J2K_LOSSLESS \
        in body["offered"]


# -- rendered and thumbnails ----------------------------------------------------------------------
def _png(data: bytes) -> np.ndarray[Any, Any]:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return np.asarray(image)


def test_rendered_window_rescale_and_monochrome1_give_exact_grey_levels(
        gw: GatewayProcess, client: DICOMwebClient) -> None:
    """Stored values 0..4 step 1000 with rescale -1000 (modality -1000..3000); window 1000,2001
    linear-exact → 0, 0, 64, 191, 255 (PS3.3 C.11.2.1.3.2); MONOCHROME1 the complement."""
    study_uid, series_uid = generate_uid(), generate_uid()
    stored = (np.arange(5, dtype=np.uint16) * 1000).reshape(1, 5)
    mono2 = synthetic(stored, study=study_uid, series=series_uid, instance_number=1,
                      RescaleSlope=1, RescaleIntercept=-1000)
    mono1 = synthetic(stored, study=study_uid, series=series_uid, instance_number=2,
                      photometric="MONOCHROME1", RescaleSlope=1, RescaleIntercept=-1000)
    stow(gw, to_bytes(mono2), to_bytes(mono1))
    params = {"window": "1000,2001,linear-exact"}
    modality = np.arange(5) * 1000.0 - 1000
    expected = [round(min(max((x - 1000) / 2001 + 0.5, 0), 1) * 255) for x in modality]
    got2 = _png(client.retrieve_instance_rendered(
        study_uid, series_uid, mono2.SOPInstanceUID, media_types=("image/png",),
        params=params))
    assert got2[0].tolist() == expected
    got1 = _png(client.retrieve_instance_rendered(
        study_uid, series_uid, mono1.SOPInstanceUID, media_types=("image/png",),
        params=params))
    assert got1[0].tolist() == [255 - v for v in expected]


def test_rendered_viewport_quality_and_default_jpeg(gw: GatewayProcess, client: DICOMwebClient,
                                                    samples: dict[str, Dataset]) -> None:
    ds = samples[ELE]  # CT_small: 128 × 128
    uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    default = client.retrieve_instance_rendered(*uids)
    assert Image.open(io.BytesIO(default)).format == "JPEG"
    small = client.retrieve_instance_rendered(*uids, media_types=("image/jpeg",),
                                              params={"viewport": "64,32", "quality": "20"})
    image = Image.open(io.BytesIO(small))
    assert image.size == (32, 32)
    best = client.retrieve_instance_rendered(*uids, media_types=("image/jpeg",),
                                             params={"viewport": "64,32", "quality": "100"})
    assert len(small) < len(best)
    colour = samples[JPEG_BASELINE]  # YBR_FULL_422 JPEG → RGB
    png = _png(client.retrieve_instance_rendered(
        colour.StudyInstanceUID, colour.SeriesInstanceUID, colour.SOPInstanceUID,
        media_types=("image/png",)))
    assert png.shape == (100, 100, 3)
    assert np.array_equal(png, colour.pixel_array)


def test_rendered_series_and_frames_are_multipart(gw: GatewayProcess, client: DICOMwebClient,
                                                  study: Study) -> None:
    response = requests.get(f"{gw.dicomweb}/studies/{study.uid}/series/{study.series[0]}"
                            "/rendered", headers={"Accept": 'multipart/related; type="image/png"'},
                            timeout=30)
    rendered = parts(response)
    assert [p.headers["content-type"] for p in rendered] == ["image/png", "image/png"]
    assert all(_png(p.body).shape == (16, 16) for p in rendered)
    body = client.retrieve_series_rendered(study.uid, study.series[1])  # Accept */*: multipart
    assert body.count(b"Content-Type: image/jpeg") == 1  # the RT plan has no image
    multiframe = study.instances[2]
    frames = requests.get(f"{instance_url(gw, multiframe)}/frames/1,3/rendered", timeout=30,
                          headers={"Accept": 'multipart/related; type="image/png"'})
    # flat frames and no window in the data: the middle grey
    assert [_png(p.body)[0, 0] for p in parts(frames)] == [128, 128]
    one = client.retrieve_instance_frames_rendered(
        multiframe.StudyInstanceUID, multiframe.SeriesInstanceUID, multiframe.SOPInstanceUID,
        [2], media_types=("image/png",), params={"window": "150,201"})
    assert (_png(one) == round(((200 - 149.5) / 200 + 0.5) * 255)).all()  # frame 2 is 200
    error_of(requests.get(f"{gw.dicomweb}/studies/{study.uid}/rendered", timeout=30,
                          headers={"Accept": "image/png"}), 406)


def test_thumbnails(gw: GatewayProcess, study: Study, samples: dict[str, Dataset]) -> None:
    ds = samples[ELE]
    for url in (f"{gw.dicomweb}/studies/{ds.StudyInstanceUID}/thumbnail",
                f"{gw.dicomweb}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                "/thumbnail",
                f"{instance_url(gw, ds)}/thumbnail",
                f"{instance_url(gw, study.instances[2])}/frames/2/thumbnail"):
        response = requests.get(url, timeout=30)
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"] == "image/jpeg"
        assert max(Image.open(io.BytesIO(response.content)).size) <= 128
    sized = requests.get(f"{instance_url(gw, ds)}/thumbnail", timeout=30,
                         params={"viewport": "40,40"}, headers={"Accept": "image/png"})
    assert _png(sized.content).shape == (40, 40)


# -- WADO-URI ------------------------------------------------------------------------------------
def _wado(gw: GatewayProcess, ds: Dataset, **params: str) -> requests.Response:
    query = {"requestType": "WADO", "studyUID": ds.StudyInstanceUID,
             "seriesUID": ds.SeriesInstanceUID, "objectUID": ds.SOPInstanceUID, **params}
    return requests.get(f"{gw.base_url}/wado", params=query, timeout=30)


def test_wado_uri_dicom_and_rendered(gw: GatewayProcess, samples: dict[str, Dataset],
                                     study: Study) -> None:
    """PS3.18 §9: default for a single-frame image is image/jpeg; application/dicom with
    transferSyntax; rendering parameters."""
    ds = samples[JPEG_LS]
    jpeg = _wado(gw, ds)
    assert jpeg.status_code == 200 and jpeg.headers["Content-Type"] == "image/jpeg"
    dicom = _wado(gw, ds, contentType="application/dicom")
    assert dicom.headers["Content-Type"] == "application/dicom"
    got = pydicom.dcmread(io.BytesIO(dicom.content))
    assert got.file_meta.TransferSyntaxUID == ELE
    assert np.array_equal(got.pixel_array, ds.pixel_array)
    exact = _wado(gw, ds, contentType="application/dicom", transferSyntax=JPEG_LS)
    assert exact.content == stored_file(gw, ds)
    error_of(_wado(gw, ds, contentType="application/dicom", transferSyntax=JPEG_BASELINE), 406)
    sized = _wado(gw, ds, contentType="image/png", rows="32", columns="16")
    assert _png(sized.content).shape == (16, 16)
    frame = _wado(gw, study.instances[2], contentType="image/png", frameNumber="3",
                  windowCenter="300", windowWidth="2")
    assert _png(frame.content).tolist() == [[255] * 8] * 8
    plan = _wado(gw, study.instances[3])  # no pixels: application/dicom by default
    assert plan.content == stored_file(gw, study.instances[3])
    error_of(_wado(gw, study.instances[3], contentType="image/jpeg"), 406)


@pytest.mark.parametrize("params", [
    {"requestType": "XYZ"}, {"studyUID": "1.02"}, {"objectUID": ""}, {"anonymize": "yes"},
    {"contentType": "image/png", "windowCenter": "10"}, {"contentType": "image/png",
                                                         "rows": "0"},
    {"contentType": "image/jpeg", "imageQuality": "0"}, {"transferSyntax": "abc",
                                                         "contentType": "application/dicom"},
])
def test_wado_uri_bad_requests_are_400(gw: GatewayProcess, samples: dict[str, Dataset],
                                       params: dict[str, str]) -> None:
    body = error_of(_wado(gw, samples[ELE], **params), 400)
    if "anonymize" in params:
        assert "anonymize" in body["error"]


def test_wado_uri_unknown_object_is_404(gw: GatewayProcess, samples: dict[str, Dataset]) -> None:
    ds = samples[ELE]
    error_of(_wado(gw, ds, objectUID=generate_uid()), 404)


# -- metadata round trip ---------------------------------------------------------------------------
_TEXT = st.text(st.characters(min_codepoint=0x41, max_codepoint=0x5A), min_size=1, max_size=12)
_BINARY = {"SelectorOBValue": 1, "SelectorOWValue": 2, "SelectorOFValue": 4,
           "SelectorODValue": 8, "SelectorOLValue": 4, "SelectorOVValue": 8}


def _binary(width: int) -> st.SearchStrategy[bytes]:
    return st.integers(0, 700).flatmap(
        lambda n: st.binary(min_size=n * width, max_size=n * width)).map(
        lambda b: b + b"\x00" if len(b) % 2 else b)


@st.composite
def datasets(draw: st.DrawFn) -> tuple[Dataset, str]:
    """A non-image object with elements of many VRs, large and small binary values (top
    level and in a sequence item), stored in Explicit or Implicit VR Little Endian."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    syntax = draw(st.sampled_from([ELE, IMPLICIT]))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID = draw(_TEXT)
    ds.Modality = "DOC"
    optional: dict[str, st.SearchStrategy[Any]] = {
        "InstitutionName": _TEXT, "StationName": _TEXT,
        "OperatorsName": st.lists(st.builds(lambda a, b: f"{a}^{b}", _TEXT, _TEXT),
                                  min_size=1, max_size=3),
        "AcquisitionDate": st.dates(date(1900, 1, 1), date(2099, 12, 31)).map(
            lambda d: d.strftime("%Y%m%d")),
        "SliceThickness": st.decimals(-1000, 1000, places=3).map(lambda d: str(d)),
        "AcquisitionNumber": st.integers(-1000, 1000),
        "TextValue": st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E),
                             max_size=2000).map(str.rstrip),
        "SelectorFDValue": st.lists(st.floats(allow_nan=False, allow_infinity=False),
                                    min_size=1, max_size=3),
        "SelectorFLValue": st.floats(width=32, allow_nan=False, allow_infinity=False),
        "SelectorSLValue": st.integers(-(2**31), 2**31 - 1),
        "SelectorUSValue": st.lists(st.integers(0, 65535), min_size=1, max_size=4),
        **{name: _binary(width) for name, width in _BINARY.items()},
    }
    for keyword, strategy in optional.items():
        if draw(st.booleans()):
            setattr(ds, keyword, draw(strategy))
    if draw(st.booleans()):
        item = Dataset()
        item.ReferencedSOPClassUID = CT_IMAGE
        item.ReferencedSOPInstanceUID = generate_uid()
        item.SelectorOBValue = draw(_binary(1))
        ds.ReferencedImageSequence = [item, Dataset()]
    return ds, syntax


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(example=datasets())
def test_metadata_round_trip(gw: GatewayProcess, client: DICOMwebClient,
                             example: tuple[Dataset, str]) -> None:
    """PS3.18 Annex F: ``Dataset.from_json`` of the metadata equals the stored data set; bulk
    values (binary over 1024 bytes, anywhere) come back through their BulkDataURI."""
    ds, _syntax = example
    stow(gw, to_bytes(ds))
    stored = pydicom.dcmread(io.BytesIO(stored_file(gw, ds)))
    meta = client.retrieve_instance_metadata(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                             ds.SOPInstanceUID)
    uris: list[str] = []

    def fetch(uri: str) -> bytes:
        uris.append(uri)
        [value] = client.retrieve_bulkdata(uri)
        return bytes(value)  # dicomweb-client gives a bytearray, which pydicom takes as a list

    restored = Dataset.from_json(json.dumps(meta), fetch)
    expected_bulk = sum(1 for elem in stored.iterall()
                        if elem.VR in ("OB", "OW", "OF", "OD", "OL", "OV")
                        and elem.value and len(elem.value) > 1024)
    assert len(uris) == expected_bulk
    assert _values(restored) == _values(stored)


def _values(ds: Dataset) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for elem in ds:
        if elem.VR == "SQ":
            out[str(elem.tag)] = [_values(item) for item in elem.value]
        elif isinstance(elem.value, float) and math.isfinite(elem.value):
            out[str(elem.tag)] = (elem.VR, elem.value)
        else:
            out[str(elem.tag)] = (elem.VR, elem.value if not isinstance(elem.value, bytes)
                                  else bytes(elem.value))
    return out
