"""The index record of an instance (gateway.records) agrees with pydicom's full reading.

records.py decodes only the indexed elements, some of them without pydicom; for every file of
pydicom's test data (all transfer syntaxes, many character sets) the values must be what
pydicom itself reads, and a truncated copy of any of them must be refused.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_files

from gateway import records
from gateway.dimse import configure_pynetdicom
from gateway.errors import InvalidInstance, StoreError
from gateway.records import INTEGER_KEYWORDS, PN_KEYWORDS, normalize_pn, read_instance

configure_pynetdicom()
FILES = sorted(Path(f) for f in get_testdata_files() + get_charset_files("*.dcm")
               if Path(f).is_file())


def _pydicom_value(ds: pydicom.Dataset, keyword: str) -> object:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if keyword in INTEGER_KEYWORDS:
        try:
            return int(value)
        except (TypeError, ValueError):
            return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value) or None
    return str(value).strip() or None


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's own remarks on odd samples
def test_record_values_equal_pydicoms_reading_for_every_sample_file() -> None:
    checked = 0
    for path in FILES:
        try:
            record = read_instance(path)
        except StoreError:
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for group in (record.patient, record.study, record.series, record.instance):
            for keyword, value in group.items():
                if keyword in ("DocumentTitle", "IssuerOfAccessionNumber"):
                    continue
                expected = _pydicom_value(ds, keyword)
                if keyword in ("PatientID", "IssuerOfPatientID") and expected is None:
                    expected = ""
                if keyword in PN_KEYWORDS and isinstance(expected, str):
                    expected = normalize_pn(expected) or None  # empty trailing parts dropped
                assert value == expected, f"{path.name} {keyword}: {value!r} != {expected!r}"
        checked += 1
    assert checked > 150


@pytest.mark.parametrize("path", [p for p in FILES if p.name in (
    "CT_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "emri_small_RLE.dcm",
    "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm", "test-SR.dcm", "SC_rgb_jpeg.dcm")],
    ids=lambda p: p.name)
def test_any_truncation_is_refused(path: Path, tmp_path: Path) -> None:
    data = path.read_bytes()
    read_instance(path)  # the whole file is fine
    for cut in (1, 2, 7, 100, 1000, len(data) // 2):
        short = tmp_path / f"cut{cut}.dcm"
        short.write_bytes(data[: len(data) - cut])
        with pytest.raises(InvalidInstance):
            read_instance(short)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_simple_reader_gives_the_record_pydicoms_parser_gives(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Uncomplicated files (little endian, defined lengths) skip pydicom's parser; for every
    sample file and for truncated copies the outcome must be the same either way."""
    samples = list(FILES)
    for path in [p for p in FILES if p.name in ("CT_small.dcm", "JPEG2000.dcm")]:
        data = path.read_bytes()
        for cut in (1, 9, 300):
            short = tmp_path / f"{path.stem}-cut{cut}.dcm"
            short.write_bytes(data[:len(data) - cut])
            samples.append(short)
        for number, tail in enumerate((b"\x01garbage", b"\x00\x00\x07", b"\x00" * 6)):
            padded = tmp_path / f"{path.stem}-tail{number}.dcm"
            padded.write_bytes(data + tail)
            samples.append(padded)

    def outcomes() -> dict[Path, object]:
        found: dict[Path, object] = {}
        for path in samples:
            try:
                found[path] = read_instance(path)
            except StoreError as exc:
                found[path] = type(exc)
        return found

    simple = outcomes()
    used = 0
    for path in samples:
        with open(path, "rb") as handle:
            try:
                used += records._read_simple(handle) is not None
            except StoreError:
                used += 1
    monkeypatch.setattr(records, "_read_simple", lambda handle: None)
    assert outcomes() == simple
    assert used > 150  # the fast path is the common one, not a rarity


def test_reading_headers_in_parallel_leaves_the_warning_filters_alone(tmp_path: Path) -> None:
    """Associations store in parallel threads of one process: the warnings ``read_instance``
    records for itself must neither leak into the process's filters nor miss a truncation."""
    import sys
    import threading
    import warnings

    data = Path(get_testdata_files("MR_small_bigendian.dcm")[0]).read_bytes()  # pydicom's parser
    good, short = tmp_path / "good.dcm", tmp_path / "short.dcm"
    good.write_bytes(data)
    short.write_bytes(data[:-1000])
    filters = list(warnings.filters)
    accepted: list[Path] = []

    def read(path: Path) -> None:
        for _ in range(200):
            try:
                read_instance(path)
            except StoreError:
                continue
            if path == short:
                accepted.append(path)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=read, args=(path,)) for path in (good, short) * 2]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert accepted == []
    assert warnings.filters == filters
