"""Sample Part 10 files for the receiver tests, one per transfer syntax.

Most come unchanged from pydicom's test data (``pydicom-data`` ships them offline). pydicom has
no file for a few syntaxes; those are derived here, each with a real, decodable code stream:

* 1.2.840.10008.1.2.4.57 (JPEG Lossless, process 14): the process-14 selection-value-1 file
  ``JPEG-LL.dcm`` relabelled; SV1 is a special case of process 14, so the stream is valid.
* 1.2.840.10008.1.2.4.81 (JPEG-LS near-lossless): pydicom's file lacks Study/Series UIDs;
  they are added (the pixel stream is untouched).
* 1.2.840.10008.1.2.4.201/.202/.203 (HTJ2K): a JPEG 2000 lossless code stream relabelled.
  HTJ2K decoders (ISO/IEC 15444-15) decode Part 1 code streams; the gateway never decodes
  pixels on receipt anyway: what is checked is that the syntax is negotiated and the bytes
  are kept exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import generate_uid

from conftest import pydicom_file

SAMPLES: dict[str, str] = {
    "1.2.840.10008.1.2": "MR_small_implicit.dcm",
    "1.2.840.10008.1.2.1": "CT_small.dcm",
    "1.2.840.10008.1.2.2": "MR_small_bigendian.dcm",
    "1.2.840.10008.1.2.1.99": "image_dfl.dcm",
    "1.2.840.10008.1.2.4.50": "SC_rgb_jpeg_dcmtk.dcm",
    "1.2.840.10008.1.2.4.51": "JPEG-lossy.dcm",
    "1.2.840.10008.1.2.4.70": "JPEG-LL.dcm",
    "1.2.840.10008.1.2.4.80": "MR_small_jpeg_ls_lossless.dcm",
    "1.2.840.10008.1.2.4.90": "MR_small_jp2klossless.dcm",
    "1.2.840.10008.1.2.4.91": "JPEG2000.dcm",
    "1.2.840.10008.1.2.5": "MR_small_RLE.dcm",
}

_DERIVED: dict[str, tuple[str, bool]] = {
    # syntax: (source file, add missing study/series UIDs)
    "1.2.840.10008.1.2.4.57": ("JPEG-LL.dcm", False),
    "1.2.840.10008.1.2.4.81": ("JPEGLSNearLossless_16.dcm", True),
    "1.2.840.10008.1.2.4.201": ("MR_small_jp2klossless.dcm", False),
    "1.2.840.10008.1.2.4.202": ("MR_small_jp2klossless.dcm", False),
    "1.2.840.10008.1.2.4.203": ("MR_small_jp2klossless.dcm", False),
}


def sample_files(directory: Path) -> dict[str, Path]:
    """Transfer syntax UID → a Part 10 file in that syntax, written to ``directory`` with a
    fresh SOP Instance UID (pydicom's MR_small files share one UID across encodings)."""
    files: dict[str, Path] = {}
    sources = {s: (name, False) for s, name in SAMPLES.items()} | _DERIVED
    for syntax, (source, add_uids) in sources.items():
        ds = pydicom.dcmread(pydicom_file(source))
        ds.file_meta.TransferSyntaxUID = syntax
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if add_uids:
            ds.StudyInstanceUID = generate_uid()
            ds.SeriesInstanceUID = generate_uid()
        path = directory / f"derived-{syntax}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files[syntax] = path
    return files


def dataset_bytes(path: Path) -> bytes:
    """The data set as encoded in a Part 10 file: everything after the file meta group."""
    from gateway.ingest import dataset_offset

    return path.read_bytes()[dataset_offset(path):]


def stored_path(data: Path, sop_uid: str) -> Path | None:
    """Where the gateway keeps an instance, found by walking its storage (not its index)."""
    found = list(data.glob(f"*/*/{sop_uid}.dcm"))
    return found[0] if found else None


def fresh_copies(directory: Path, count: int, source: str = "CT_small.dcm") -> list[Path]:
    """``count`` copies of a pydicom sample, each with a new SOP Instance UID (same study and
    series) and its own Instance Number, written to ``directory``."""
    files = []
    for number in range(count):
        ds = pydicom.dcmread(pydicom_file(source))
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = number + 1
        path = directory / f"{number:03d}.dcm"
        ds.save_as(path)
        files.append(path)
    return files


def synthetic_instance(directory: Path, **attributes: object) -> Path:
    """A small Part 10 file (Secondary Capture, no pixel data) with the given attributes, by
    keyword; a sequence is given as a list of dicts. UIDs not given are generated. Returns
    the file's path (named by its SOP Instance UID)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    for keyword, value in attributes.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            items = []
            for fields in value:
                item = Dataset()
                for sub_keyword, sub_value in fields.items():
                    setattr(item, sub_keyword, sub_value)
                items.append(item)
            setattr(ds, keyword, items)
        else:
            setattr(ds, keyword, value)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path = directory / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


#: A small archive with known attributes for the query tests (C-FIND, QIDO-RS, the engine):
#: three patients, three studies, four series, five instances.
S1, S2, S3 = (f"1.2.826.0.1.3680043.10.1.{n}" for n in (1, 2, 3))
SE_A, SE_B, SE_C, SE_D = (f"1.2.826.0.1.3680043.10.2.{n}" for n in (1, 2, 3, 4))

ARCHIVE: list[dict[str, object]] = [
    # Patient P1, study S1: a CT series of two images and an SR series.
    *({"PatientID": "P1", "PatientName": "DOE^JOHN", "PatientBirthDate": "19700101",
       "PatientSex": "M", "StudyInstanceUID": S1, "StudyDate": "20240315",
       "StudyTime": "101500", "AccessionNumber": "ACC1", "StudyDescription": "CT CHEST",
       "SeriesInstanceUID": SE_A, "Modality": "CT", "SeriesNumber": 1, "InstanceNumber": n}
      for n in (1, 2)),
    {"PatientID": "P1", "PatientName": "DOE^JOHN", "StudyInstanceUID": S1,
     "StudyDate": "20240315", "StudyTime": "101500", "AccessionNumber": "ACC1",
     "StudyDescription": "CT CHEST", "SeriesInstanceUID": SE_B, "Modality": "SR",
     "SeriesNumber": 2, "InstanceNumber": 1},
    # Patient P2, study S2: MR of the head, with request attributes.
    {"PatientID": "P2", "PatientName": "Doe^Jane", "StudyInstanceUID": S2,
     "StudyDate": "20231231", "StudyTime": "235959", "AccessionNumber": "ACC_2%",
     "StudyDescription": "MR HEAD", "SeriesInstanceUID": SE_C, "Modality": "MR",
     "SeriesNumber": 1, "BodyPartExamined": "HEAD", "InstanceNumber": 1,
     "RequestAttributesSequence": [{"ScheduledProcedureStepID": "SPS9",
                                    "RequestedProcedureID": "RP1"}]},
    # Patient P3 (name sent with empty trailing components), study S3.
    {"PatientID": "P3", "PatientName": "O'BRIEN^ANN^^^", "StudyInstanceUID": S3,
     "StudyDate": "20250101", "StudyTime": "0800", "AccessionNumber": "A3",
     "StudyDescription": "ct abdomen [contrast]", "SeriesInstanceUID": SE_D,
     "Modality": "CT", "SeriesNumber": 1, "InstanceNumber": 1},
]


def write_archive(directory: Path) -> list[Path]:
    """The files of :data:`ARCHIVE`, written to ``directory``."""
    return [synthetic_instance(directory, **attributes) for attributes in ARCHIVE]


def synthetic(pixels: np.ndarray[Any, Any], *, study: str, series: str, series_number: int = 1,
              instance_number: int = 1, photometric: str = "MONOCHROME2",
              **attrs: Any) -> Dataset:
    """A minimal image (Secondary Capture) with the given 16-bit grey pixels ((frames,) rows,
    columns), Explicit VR Little Endian."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = "WADO-TEST"
    ds.PatientName = "Test^Wado"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality = "OT"
    ds.SeriesNumber, ds.InstanceNumber = series_number, instance_number
    signed = pixels.dtype.kind == "i"
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = pixels.astype("<i2" if signed else "<u2").tobytes()
    for name, value in attrs.items():
        setattr(ds, name, value)
    return ds


def storescu_profile(path: Path, files: object) -> Path:
    """A storescu association profile proposing, for each file, its SOP class in exactly its
    own transfer syntax (storescu's command-line options cover only some syntaxes)."""
    syntaxes: dict[str, str] = {}
    contexts: list[str] = []
    for file in files:  # type: ignore[attr-defined]
        meta = pydicom.dcmread(file, stop_before_pixels=True).file_meta
        name = syntaxes.setdefault(str(meta.TransferSyntaxUID), f"TS{len(syntaxes) + 1}")
        entry = f"{meta.MediaStorageSOPClassUID}\\{name}"
        if entry not in contexts:
            contexts.append(entry)
    lines = ["[[TransferSyntaxes]]"]
    for uid, name in syntaxes.items():
        lines += [f"[{name}]", f"TransferSyntax1 = {uid}"]
    lines += ["[[PresentationContexts]]", "[SampleContexts]"]
    lines += [f"PresentationContext{i} = {c}" for i, c in enumerate(contexts, start=1)]
    lines += ["[[Profiles]]", "[Samples]", "PresentationContexts = SampleContexts"]
    path.write_text("\n".join(lines) + "\n")
    return path
