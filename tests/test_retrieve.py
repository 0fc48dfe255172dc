"""``gateway.retrieve`` in process (the API C-MOVE/C-GET will call): locate and its order and
scoping, the choice of transfer syntax, byte-exact and transcoded output, missing blobs."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from gateway import retrieve
from gateway.bootstrap import Services, build_services
from gateway.config import load_settings
from gateway.errors import InstanceMissing, TranscodeError
from gateway.index import patient, series
from gateway.retrieve import EXPLICIT_VR_LITTLE_ENDIAN as ELE
from gateway.retrieve import IMPLICIT_VR_LITTLE_ENDIAN as IMPLICIT

from samples import sample_files, synthetic

JPEG_LS = "1.2.840.10008.1.2.4.80"
RLE = "1.2.840.10008.1.2.5"
WEB_EXCLUDED = frozenset({IMPLICIT, "1.2.840.10008.1.2.2"})


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    built = build_services(load_settings(overrides={
        "storage": {"path": str(tmp_path / "data"), "fsync": False}}))
    yield built
    built.close()


def _store(services: Services, ds: pydicom.Dataset, directory: Path) -> None:
    path = directory / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    services.ingest.store_file(path, move=False)


def test_locate_orders_by_series_then_instance_number_and_scopes(services: Services,
                                                                 tmp_path: Path) -> None:
    study, first, second = generate_uid(), generate_uid(), generate_uid()
    pixels = np.zeros((2, 2), dtype=np.uint16)
    made = {
        "s2-i1": synthetic(pixels, study=study, series=second, series_number=2,
                           instance_number=1),
        "s1-i2": synthetic(pixels, study=study, series=first, series_number=1,
                           instance_number=2),
        "s1-i10": synthetic(pixels, study=study, series=first, series_number=1,
                            instance_number=10),
        "s1-none": synthetic(pixels, study=study, series=first, series_number=1),
    }
    del made["s1-none"].InstanceNumber  # absent numbers sort last
    for ds in made.values():
        _store(services, ds, tmp_path)
    order = [made[k].SOPInstanceUID for k in ("s1-i2", "s1-i10", "s1-none", "s2-i1")]
    assert [i.sop_uid for i in retrieve.locate(services.index, study)] == order
    assert [i.sop_uid for i in retrieve.locate(services.index, study, first)] == order[:3]
    assert [i.sop_uid for i in retrieve.locate(services.index, sop_uid=order[::-1])] == order
    scoped = retrieve.locate(services.index, study, where=series.c.SeriesNumber == 2)
    assert [i.sop_uid for i in scoped] == order[3:]
    assert retrieve.locate(services.index, where=patient.c.PatientID == "nobody") == []
    item = scoped[0]
    assert (item.study_uid, item.series_uid, item.transfer_syntax_uid) == (study, second, ELE)
    assert item.is_image and item.rows == 2
    for bad in ("1.02", "", "x" * 65):
        with pytest.raises(ValueError):
            retrieve.locate(services.index, bad)
    with pytest.raises(ValueError):
        retrieve.locate(services.index)


def test_transfer_syntax_choice() -> None:
    choose = retrieve.select_transfer_syntax
    assert choose(JPEG_LS, [ELE, JPEG_LS]) == JPEG_LS  # the stored one whenever acceptable
    assert choose(JPEG_LS, [ELE]) == ELE
    assert choose(JPEG_LS, ["1.2.840.10008.1.2.4.50"]) is None  # never made lossy
    assert choose(IMPLICIT, ["*"], excluded=WEB_EXCLUDED) == ELE
    assert choose(JPEG_LS, ["*"], excluded=WEB_EXCLUDED) == JPEG_LS
    assert choose(ELE, [RLE]) == RLE
    assert choose(ELE, [RLE], has_pixels=False) is None
    assert choose(IMPLICIT, [IMPLICIT, ELE], excluded=WEB_EXCLUDED) == ELE
    assert retrieve.can_transcode("1.2.840.10008.1.2.4.51", ELE)  # a decoder exists ...
    assert RLE in retrieve.offered_syntaxes(JPEG_LS)


def test_prepare_is_byte_exact_or_transcoded_and_load_dataset_for_dimse(
        services: Services, tmp_path: Path) -> None:
    files = sample_files(tmp_path)
    for path in files.values():
        services.ingest.store_file(path, move=False)
    original = pydicom.dcmread(files[JPEG_LS])
    [item] = retrieve.locate(services.index, sop_uid=original.SOPInstanceUID)
    exact = retrieve.prepare(services.storage, item, JPEG_LS)
    assert not exact.transcoded
    assert b"".join(exact.chunks()) == retrieve.blob_path(services.storage, item).read_bytes()
    native = retrieve.prepare(services.storage, item, IMPLICIT)
    assert native.transcoded
    decoded = pydicom.dcmread(io.BytesIO(b"".join(native.chunks(size=100))))
    assert decoded.file_meta.TransferSyntaxUID == IMPLICIT
    assert np.array_equal(decoded.pixel_array, original.pixel_array)
    ds = retrieve.load_dataset(services.storage, item, RLE)
    assert ds.file_meta.TransferSyntaxUID == RLE
    assert np.array_equal(ds.pixel_array, original.pixel_array)
    assert ds.SOPInstanceUID == original.SOPInstanceUID
    bad = pydicom.dcmread(files["1.2.840.10008.1.2.4.51"]).SOPInstanceUID
    [undecodable] = retrieve.locate(services.index, sop_uid=bad)
    with pytest.raises(TranscodeError):  # ... but fails on pydicom's sample
        retrieve.prepare(services.storage, undecodable, ELE)


def test_missing_blob_raises_instance_missing(services: Services, tmp_path: Path) -> None:
    ds = synthetic(np.zeros((2, 2), dtype=np.uint16), study=generate_uid(),
                   series=generate_uid())
    _store(services, ds, tmp_path)
    [item] = retrieve.locate(services.index, sop_uid=ds.SOPInstanceUID)
    retrieve.blob_path(services.storage, item).unlink()
    for call in (lambda: retrieve.prepare(services.storage, item, ELE),
                 lambda: retrieve.metadata(services.storage, item, str),
                 lambda: retrieve.pixel_info(services.storage, item)):
        with pytest.raises(InstanceMissing, match="missing"):
            call()
