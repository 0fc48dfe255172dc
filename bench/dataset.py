"""Deterministic synthetic CT/MR dataset for the benchmarks.

The same :class:`DatasetSpec` always yields byte-identical files: UIDs are ``2.25.<int>``
built from a SHA-256 of the seed and the item's position, names and dates come from a
seeded generator, and pixels are a smooth phantom (body ellipse, lungs, bone ring, slow
gradients) plus seeded noise, so they neither compress to nothing nor look like white noise.

Files are Part-10 (128-byte preamble, ``DICM``, file meta), Explicit VR Little Endian,
written under ``<cache>/dataset-<key>/files/<study>/<series>/<instance>.dcm`` next to a
``manifest.json`` that lists every file and the study/series/patient identifiers, so later
measures (QIDO, WADO, C-FIND, C-MOVE) can pick their queries from it. A directory whose
manifest exists is complete and is reused as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from bench import BENCH_ROOT_DEFAULT

GENERATOR_VERSION = 1
"""Bump when the generator's output changes, so old caches are not reused."""

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

_FIRST = ["JOHN", "MARY", "AHMED", "LENA", "KENJI", "SOFIA", "OLU", "PRIYA", "IVAN", "CHLOE"]
_LAST = ["DOE", "SMITH", "GARCIA", "MULLER", "TANAKA", "KOWALSKI", "OKAFOR", "NGUYEN", "ROSSI"]
_PHYS = ["WELBY^MARCUS", "HOUSE^GREGORY", "GREY^MEREDITH", "KILDARE^JAMES", "QUINN^MICHAELA"]
_CT_PARTS = ["CHEST", "ABDOMEN", "HEAD", "PELVIS"]
_MR_PARTS = ["BRAIN", "KNEE", "SPINE", "SHOULDER"]


@dataclass(frozen=True)
class DatasetSpec:
    """Shape of a synthetic dataset.

    Study ``i`` is MR when ``mr_every > 0`` and ``i % mr_every == mr_every - 1``, CT
    otherwise. Study ``i`` belongs to patient ``i // studies_per_patient``.
    """

    studies: int
    series_per_study: int
    instances_per_series: int
    mr_every: int = 4
    studies_per_patient: int = 1
    seed: int = 20250101

    def key(self) -> str:
        """Short hash of the spec and the generator version: the cache directory's name."""
        payload = json.dumps({**asdict(self), "v": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def is_mr(self, study: int) -> bool:
        """Whether study number ``study`` (0-based) is an MR study."""
        return self.mr_every > 0 and study % self.mr_every == self.mr_every - 1

    @property
    def total_instances(self) -> int:
        """Number of instances (files) in the dataset."""
        return self.studies * self.series_per_study * self.instances_per_series


QUICK_SPEC = DatasetSpec(studies=5, series_per_study=1, instances_per_series=50)
"""≈250 instances (200 CT + 50 MR), ≈112 MB: for a run that ends within two minutes."""

FULL_SPEC = DatasetSpec(studies=26, series_per_study=2, instances_per_series=50)
"""2600 instances (2000 CT + 600 MR), ≈1.13 GB: the size infra.md's reference figures used."""


@dataclass
class SeriesInfo:
    """Identifiers of one generated series."""

    series_uid: str
    series_number: int
    modality: str
    body_part: str
    instances: int
    files: list[str] = field(default_factory=list)


@dataclass
class StudyInfo:
    """Identifiers of one generated study (what a QIDO/C-FIND measure would query for)."""

    study_uid: str
    accession_number: str
    patient_id: str
    patient_name: str
    study_date: str
    modality: str
    series: list[SeriesInfo] = field(default_factory=list)


@dataclass
class GeneratedDataset:
    """A dataset on disk: where it is and what it holds."""

    spec: DatasetSpec
    root: Path
    files: list[Path]
    total_bytes: int
    ct_instances: int
    mr_instances: int
    studies: list[StudyInfo]

    @property
    def instances(self) -> int:
        """Number of instances (one file each)."""
        return len(self.files)

    def describe(self) -> str:
        """One line for reports: counts, modalities, size in decimal MB."""
        s = self.spec
        return (
            f"{self.instances} instances ({self.ct_instances} CT 512x512, "
            f"{self.mr_instances} MR 256x256; 16-bit MONOCHROME2, Explicit VR LE), "
            f"{s.studies} studies x {s.series_per_study} series x {s.instances_per_series} "
            f"instances, {self.total_bytes / 1e6:.0f} MB, seed {s.seed}, key {s.key()}"
        )


def uid_for(seed: int, *parts: object) -> str:
    """A deterministic ``2.25.<decimal>`` UID (≤ 64 chars) from the seed and a path of parts."""
    digest = hashlib.sha256(("/".join(map(str, (seed, *parts)))).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big") >> 1)


def _rng(seed: int, *parts: object) -> np.random.Generator:
    """A numpy generator seeded from the seed and a path of parts."""
    digest = hashlib.sha256(("/".join(map(str, (seed, "rng", *parts)))).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised coordinates in [-1, 1] for a ``size``x``size`` image (cached)."""
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    return axis[np.newaxis, :], axis[:, np.newaxis]


def _phantom(size: int, modality: str, variant: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth stored-value image (uint16 range 0..4095) of a body cross-section.

    ``variant`` in [0, 1] moves the anatomy a little along the series. CT values are HU+1024
    (air ≈ 24, lung ≈ 224, water ≈ 1024, bone ≈ 2000); MR values are arbitrary intensities.
    """
    x, y = _grid(size)
    rx, ry = 0.80 + 0.06 * variant, 0.62 + 0.05 * variant
    body = (x / rx) ** 2 + (y / ry) ** 2 <= 1.0
    lungs = (((np.abs(x) - 0.33) / 0.22) ** 2 + (y / 0.38) ** 2) <= 1.0 - 0.3 * variant
    ring = np.abs(np.sqrt(x**2 + (y + 0.35) ** 2) - 0.12) < 0.025
    phase = rng.uniform(0, 2 * np.pi, 2).astype(np.float32)
    texture = 40.0 * np.sin(5.0 * x + phase[0]) + 30.0 * np.cos(4.0 * y + phase[1])
    if modality == "CT":
        img = np.where(body, 1024.0 + 60.0 * y + texture, 24.0)
        img = np.where(lungs & body, 224.0 + 0.5 * texture, img)
        img = np.where(ring, 2000.0, img)
    else:
        img = np.where(body, 900.0 - 300.0 * (x**2 + y**2) + 2.0 * texture, 30.0)
        img = np.where(ring, 1800.0, img)
        img = np.where(lungs & body, 300.0 + texture, img)
    return np.clip(img, 24, 4000).astype(np.int32)


class _SeriesPixels:
    """Pixels for one series: a few precomputed phantoms plus per-instance noise (fast)."""

    VARIANTS = 6

    def __init__(self, size: int, modality: str, rng: np.random.Generator) -> None:
        self.rng = rng
        self.bases = [
            _phantom(size, modality, v / (self.VARIANTS - 1), rng) for v in range(self.VARIANTS)
        ]
        self.noise = 18 if modality == "CT" else 12

    def frame(self, index: int, count: int) -> bytes:
        """Little-endian uint16 pixel bytes for instance ``index`` of ``count``."""
        base = self.bases[min(self.VARIANTS - 1, index * self.VARIANTS // max(count, 1))]
        noise = self.rng.integers(-self.noise, self.noise + 1, size=base.shape, dtype=np.int32)
        return (base + noise).astype("<u2").tobytes()


def _patient(spec: DatasetSpec, patient_index: int) -> dict[str, str]:
    """Deterministic patient-module attributes for patient number ``patient_index``."""
    rng = _rng(spec.seed, "patient", patient_index)
    birth = date(1940, 1, 1) + timedelta(days=int(rng.integers(0, 365 * 65)))
    return {
        "PatientID": f"BENCH{patient_index:05d}",
        "PatientName": f"{_LAST[int(rng.integers(len(_LAST)))]}^"
        f"{_FIRST[int(rng.integers(len(_FIRST)))]}",
        "PatientBirthDate": birth.strftime("%Y%m%d"),
        "PatientSex": "F" if rng.integers(2) else "M",
    }


def _study_dataset(spec: DatasetSpec, study: int) -> tuple[Dataset, StudyInfo]:
    """Patient + study level attributes shared by every instance of study ``study``."""
    rng = _rng(spec.seed, "study", study)
    modality = "MR" if spec.is_mr(study) else "CT"
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    for keyword, value in _patient(spec, study // max(spec.studies_per_patient, 1)).items():
        setattr(ds, keyword, value)
    study_day = date(2024, 1, 2) + timedelta(days=int(rng.integers(0, 500)))
    ds.StudyDate = study_day.strftime("%Y%m%d")
    ds.StudyTime = f"{int(rng.integers(7, 19)):02d}{int(rng.integers(60)):02d}00"
    ds.AccessionNumber = f"ACC{spec.seed % 10000:04d}{study:06d}"
    ds.StudyID = str(study + 1)
    ds.StudyInstanceUID = uid_for(spec.seed, "study", study)
    ds.StudyDescription = f"{modality} {'BRAIN' if modality == 'MR' else 'CHEST'} ROUTINE"
    ds.ReferringPhysicianName = _PHYS[int(rng.integers(len(_PHYS)))]
    ds.InstitutionName = "BENCH GENERAL HOSPITAL"
    ds.Manufacturer = "IMAGING-GATEWAY-BENCH"
    ds.ManufacturerModelName = "SYNTH-CT" if modality == "CT" else "SYNTH-MR"
    ds.StationName = f"{modality}01"
    info = StudyInfo(
        study_uid=ds.StudyInstanceUID,
        accession_number=ds.AccessionNumber,
        patient_id=ds.PatientID,
        patient_name=str(ds.PatientName),
        study_date=ds.StudyDate,
        modality=modality,
    )
    return ds, info


def _series_dataset(spec: DatasetSpec, study_ds: Dataset, study: int, series: int) -> Dataset:
    """Study attributes plus series, frame-of-reference, equipment and image-pixel modules."""
    modality = "MR" if spec.is_mr(study) else "CT"
    ds = Dataset()
    ds.update(study_ds)
    ds.Modality = modality
    ds.SOPClassUID = MR_IMAGE_STORAGE if modality == "MR" else CT_IMAGE_STORAGE
    ds.SeriesInstanceUID = uid_for(spec.seed, "series", study, series)
    ds.FrameOfReferenceUID = uid_for(spec.seed, "for", study, series)
    ds.SeriesNumber = series + 1
    parts = _MR_PARTS if modality == "MR" else _CT_PARTS
    ds.BodyPartExamined = parts[(study + series) % len(parts)]
    ds.SeriesDescription = f"{ds.BodyPartExamined} AX {'T2' if modality == 'MR' else '5MM'}"
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    ds.PatientPosition = "HFS"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    size = 256 if modality == "MR" else 512
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if modality == "CT":
        ds.PixelSpacing = [0.703125, 0.703125]
        ds.SliceThickness = "5.0"
        ds.KVP = "120"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.ConvolutionKernel = "STANDARD"
    else:
        ds.PixelSpacing = [0.9375, 0.9375]
        ds.SliceThickness = "4.0"
        ds.MagneticFieldStrength = "1.5"
        ds.RepetitionTime = "4000"
        ds.EchoTime = "90"
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "SK"
        ds.ScanOptions = "FS"
        ds.MRAcquisitionType = "2D"
        ds.WindowCenter = "600"
        ds.WindowWidth = "1200"
    return ds


def _write_instance(ds: Dataset, path: Path, seed: int, study: int, series: int,
                    instance: int, pixels: bytes) -> None:
    """Fill the instance-level attributes of ``ds`` (mutated in place) and write it."""
    ds.SOPInstanceUID = uid_for(seed, "instance", study, series, instance)
    ds.InstanceNumber = instance + 1
    ds.AcquisitionNumber = 1
    z = -100.0 + float(ds.SliceThickness) * instance
    ds.ImagePositionPatient = [-180.0, -180.0, z]
    ds.SliceLocation = z
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.InstanceCreationDate = ds.StudyDate
    ds.InstanceCreationTime = ds.StudyTime
    ds.PixelData = pixels
    ds["PixelData"].VR = "OW"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "BENCH_GEN_1"
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def _generate_into(spec: DatasetSpec, root: Path) -> list[StudyInfo]:
    """Write every file of ``spec`` under ``root/files`` and return the study summaries."""
    studies: list[StudyInfo] = []
    for study in range(spec.studies):
        study_ds, info = _study_dataset(spec, study)
        for series in range(spec.series_per_study):
            ds = _series_dataset(spec, study_ds, study, series)
            series_info = SeriesInfo(
                series_uid=ds.SeriesInstanceUID,
                series_number=int(ds.SeriesNumber),
                modality=ds.Modality,
                body_part=ds.BodyPartExamined,
                instances=spec.instances_per_series,
            )
            folder = root / "files" / f"{study:03d}" / f"{series:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = _SeriesPixels(int(ds.Rows), ds.Modality, _rng(spec.seed, "px", study, series))
            for inst in range(spec.instances_per_series):
                rel = f"files/{study:03d}/{series:02d}/{inst:04d}.dcm"
                frame = pixels.frame(inst, spec.instances_per_series)
                _write_instance(ds, root / rel, spec.seed, study, series, inst, frame)
                series_info.files.append(rel)
            info.series.append(series_info)
        studies.append(info)
    return studies


def _manifest(spec: DatasetSpec, root: Path, studies: list[StudyInfo]) -> dict[str, Any]:
    """The manifest's content: spec, per-file sizes, and study/series summaries."""
    files = [rel for st in studies for se in st.series for rel in se.files]
    sizes = [(root / rel).stat().st_size for rel in files]
    return {
        "generator_version": GENERATOR_VERSION,
        "spec": asdict(spec),
        "key": spec.key(),
        "instances": len(files),
        "total_bytes": sum(sizes),
        "files": [{"path": rel, "bytes": n} for rel, n in zip(files, sizes, strict=True)],
        "studies": [asdict(st) for st in studies],
    }


def _load(spec: DatasetSpec, root: Path) -> GeneratedDataset:
    """Read ``root/manifest.json`` back into a :class:`GeneratedDataset`."""
    manifest = json.loads((root / "manifest.json").read_text())
    studies = [
        StudyInfo(**{**st, "series": [SeriesInfo(**se) for se in st["series"]]})
        for st in manifest["studies"]
    ]
    counts = {"CT": 0, "MR": 0}
    for st in studies:
        for se in st.series:
            counts[se.modality] = counts.get(se.modality, 0) + se.instances
    return GeneratedDataset(
        spec=spec,
        root=root,
        files=[root / f["path"] for f in manifest["files"]],
        total_bytes=int(manifest["total_bytes"]),
        ct_instances=counts["CT"],
        mr_instances=counts["MR"],
        studies=studies,
    )


def build_once(root: Path, build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """The manifest of the cached build at ``root``, building it first if it is missing.

    ``build`` fills a temporary sibling directory and returns the manifest, which is written
    last; the directory is then renamed into place, so an interrupted build never leaves a
    half-written one that looks complete.
    """
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
        try:
            (tmp / "manifest.json").write_text(json.dumps(build(tmp)))
            if root.exists():
                shutil.rmtree(root)
            os.rename(tmp, root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    return manifest


def ensure_dataset(spec: DatasetSpec, cache: Path | None = None) -> GeneratedDataset:
    """Return the dataset for ``spec``, generating it first unless a complete copy is cached
    (:func:`build_once`)."""
    cache = cache or Path(BENCH_ROOT_DEFAULT)
    root = cache / f"dataset-{spec.key()}"
    build_once(root, lambda tmp: _manifest(spec, tmp, _generate_into(spec, tmp)))
    return _load(spec, root)


def warm_page_cache(files: list[Path]) -> None:
    """Read every file once so the first measured run does not pay for disk reads."""
    for path in files:
        with open(path, "rb") as fh:
            while fh.read(1 << 20):
                pass


def split(files: list[Path], parts: int) -> Iterator[list[Path]]:
    """Split ``files`` into ``parts`` contiguous, near-equal, non-empty chunks (in order)."""
    parts = max(1, min(parts, len(files)))
    base, extra = divmod(len(files), parts)
    start = 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        yield files[start:end]
        start = end
