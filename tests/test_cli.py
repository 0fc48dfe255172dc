"""``imaging-gateway import`` and ``reindex``: the commands a site runs when migrating from
another archive and after losing (or distrusting) its index.

Both work on the storage and the index directly, so the gateway here is configured but not
started, except where the result is checked through the running server's /api/status.
Exit codes (gateway.cli): 0 success, 1 some instances failed, 2 bad configuration.

What "stored" means is the same as for C-STORE and STOW-RS (PS3.4 B.2.3): a blob at
``<study>/<series>/<sop>.dcm`` and its rows in the index, with the study's counts
(NumberOfStudyRelatedSeries/Instances, ModalitiesInStudy: PS3.4 C.6.1.1.2 / C.3.4) right.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pydicom
import requests
from pydicom.uid import generate_uid

from conftest import GatewayProcess, partial_receptions, pydicom_file
from samples import dataset_bytes, stored_path

#: Distinct SOP Instance UIDs, five studies, five modalities.
GOOD = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "waveform_ecg.dcm", "test-SR.dcm")


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _query(gateway: GatewayProcess, sql: str, *args: object) -> list[tuple[object, ...]]:
    with sqlite3.connect(gateway.data / "index.sqlite") as db:
        return db.execute(sql, args).fetchall()


def _indexed(gateway: GatewayProcess) -> set[str]:
    return {str(r[0]) for r in _query(gateway, "SELECT SOPInstanceUID FROM instance")}


def _study(gateway: GatewayProcess, study_uid: str) -> tuple[object, ...]:
    [row] = _query(gateway, "SELECT NumberOfStudyRelatedInstances, NumberOfStudyRelatedSeries, "
                            "ModalitiesInStudy FROM study WHERE StudyInstanceUID = ?", study_uid)
    return row


def _tree(root: Path) -> dict[str, Path]:
    """A folder tree as found on an old archive's disk: DICOM files in nested folders, plus
    things that are not instances. Returns name → path."""
    files: dict[str, Path] = {}
    for number, name in enumerate(GOOD):
        folder = root / f"patient{number % 2}" / f"study{number}" / "series1"
        folder.mkdir(parents=True)
        files[name] = folder / f"IM{number:04d}"  # archives rarely keep the .dcm suffix
        shutil.copy(pydicom_file(name), files[name])
    (root / "README.txt").write_text("exported from the old PACS\n")
    data = pydicom_file("CT_small.dcm").read_bytes()
    truncated = root / "patient0" / "broken.dcm"
    ct = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ct.SOPInstanceUID = generate_uid()
    ct.file_meta.MediaStorageSOPInstanceUID = ct.SOPInstanceUID
    ct.save_as(truncated, enforce_file_format=True)
    truncated.write_bytes(truncated.read_bytes()[: len(data) - 5000])  # cut in the pixel data
    files["truncated"] = truncated
    raw = root / "patient1" / "no-header.dcm"  # a bare data set, without the Part 10 header
    raw.write_bytes(dataset_bytes(pydicom_file("MR_small.dcm")))
    assert raw.read_bytes()[128:132] != b"DICM"
    return files


def _summary(stdout: str) -> str:
    [line] = [line for line in stdout.splitlines() if line.startswith("import:")]
    return line


def test_import_stores_the_instances_of_a_folder_tree_and_reports_each_kind(
        make_gateway: object, tmp_path: Path) -> None:
    gw = make_gateway()  # type: ignore[operator]
    files = _tree(tmp_path / "old-archive")
    result = gw.cli("import", str(tmp_path / "old-archive"), "--no-progress")
    assert result.returncode == 1, result.stdout + result.stderr  # the truncated file failed
    summary = _summary(result.stdout)
    assert "8 files" in summary, summary
    assert f"{len(GOOD)} stored" in summary, summary
    assert "2 skipped" in summary and "1 failed" in summary, summary
    assert "0xC" in result.stdout  # the failure reason, by status
    for name in GOOD:
        stored = stored_path(gw.data, _sop(files[name]))
        assert stored is not None, f"{name} not stored"
        assert dataset_bytes(stored) == dataset_bytes(files[name]), f"{name} changed"
        assert files[name].exists(), "import must copy, never move, the originals"
    assert _indexed(gw) == {_sop(files[name]) for name in GOOD}
    assert stored_path(gw.data, _sop(files["truncated"])) is None
    assert partial_receptions(gw.data) == []

    # Re-running (an interrupted migration is simply restarted): nothing is written again.
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in gw.data.glob("*/*/*.dcm")}
    again = gw.cli("import", str(tmp_path / "old-archive"), "--no-progress")
    assert again.returncode == 1, again.stdout + again.stderr
    summary = _summary(again.stdout)
    assert f"{len(GOOD)} unchanged" in summary and "stored" not in summary, summary
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in gw.data.glob("*/*/*.dcm")} == before


def test_import_of_good_files_only_exits_0(make_gateway: object) -> None:
    gw = make_gateway()  # type: ignore[operator]
    paths = [str(pydicom_file(n)) for n in ("CT_small.dcm", "MR_small.dcm")]
    result = gw.cli("import", *paths, "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 stored" in _summary(result.stdout)


def test_reindex_rebuilds_a_lost_index_from_the_stored_files(make_gateway: object,
                                                            tmp_path: Path) -> None:
    gw = make_gateway()  # type: ignore[operator]
    files = _tree(tmp_path / "old-archive")
    gw.cli("import", str(tmp_path / "old-archive"), "--no-progress")
    studies = {str(pydicom.dcmread(files[n], stop_before_pixels=True).StudyInstanceUID): n
               for n in GOOD}
    expected = {uid: _study(gw, uid) for uid in studies}
    assert all(row[0] == 1 and row[1] == 1 for row in expected.values()), expected

    for leftover in gw.data.glob("index.sqlite*"):  # the database and its -wal/-shm files
        leftover.unlink()
    result = gw.cli("reindex", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(GOOD)} blobs, 0 failed" in result.stdout, result.stdout
    assert _indexed(gw) == {_sop(files[name]) for name in GOOD}
    assert {uid: _study(gw, uid) for uid in studies} == expected

    gw.start()
    status = requests.get(f"{gw.base_url}/api/status", timeout=10).json()
    assert status["counts"]["instances"] == len(GOOD)
    assert status["counts"]["studies"] == len(studies)
    assert status["counts"]["series"] == len(GOOD)


def test_study_counts_and_modalities_of_a_ct_and_an_mr_in_one_study(
        make_gateway: object, tmp_path: Path) -> None:
    """Two series of one study, from two modalities: NumberOfStudyRelatedSeries 2,
    NumberOfStudyRelatedInstances 2, ModalitiesInStudy CT\\MR (PS3.4 C.6.1.1.2; multiple
    values joined with a backslash as on the wire); and the same after a reindex."""
    gw = make_gateway()  # type: ignore[operator]
    study_uid = generate_uid()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        ds = pydicom.dcmread(pydicom_file(name))
        ds.StudyInstanceUID = study_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(tmp_path / name, enforce_file_format=True)
    result = gw.cli("import", str(tmp_path / "CT_small.dcm"), str(tmp_path / "MR_small.dcm"),
                    "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _study(gw, study_uid) == (2, 2, "CT\\MR")
    [(series_count,)] = _query(gw, "SELECT COUNT(*) FROM series JOIN study ON "
                                   "series.study_id = study.id WHERE StudyInstanceUID = ?",
                               study_uid)
    assert series_count == 2

    (gw.data / "index.sqlite").unlink()
    for leftover in gw.data.glob("index.sqlite-*"):
        leftover.unlink()
    assert gw.cli("reindex", "--no-progress").returncode == 0
    assert _study(gw, study_uid) == (2, 2, "CT\\MR")


def test_reindex_reports_a_blob_that_cannot_be_read(make_gateway: object) -> None:
    """A stored file damaged behind the gateway's back is reported (exit 1), not indexed, and
    does not stop the others from being indexed."""
    gw = make_gateway()  # type: ignore[operator]
    paths = [pydicom_file(n) for n in ("CT_small.dcm", "MR_small.dcm")]
    assert gw.cli("import", *map(str, paths), "--no-progress").returncode == 0
    damaged = stored_path(gw.data, _sop(paths[0]))
    assert damaged is not None
    damaged.write_bytes(damaged.read_bytes()[:-5000])
    result = gw.cli("reindex", "--no-progress")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 blobs, 1 failed" in result.stdout, result.stdout
    assert _indexed(gw) == {_sop(paths[1])}


def test_import_of_a_media_export_skips_its_dicomdir(make_gateway: object,
                                                    tmp_path: Path) -> None:
    """A CD/DVD/USB export (PS3.10 §8, PS3.11) holds a DICOMDIR: a Part 10 file of the Media
    Storage Directory SOP Class (1.2.840.10008.1.3.10), an index of the media, not an
    instance. Importing such a tree must store every image and skip the DICOMDIR, not count
    it as a failure (exit 0), or every import of a disc reports failure."""
    gw = make_gateway()  # type: ignore[operator]
    media = tmp_path / "TINY_ALPHA"
    shutil.copytree(pydicom_file("DICOMDIR").parent / "TINY_ALPHA", media)
    images = [p for p in media.rglob("IM*") if p.is_file()]  # beside them: DICOMDIR, README
    assert pydicom.dcmread(media / "DICOMDIR").file_meta.MediaStorageSOPClassUID == \
        "1.2.840.10008.1.3.10"
    result = gw.cli("import", str(media), "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = _summary(result.stdout)
    assert f"{len(images)} stored" in summary and "failed" not in summary, summary
    assert _indexed(gw) == {_sop(p) for p in images}


def test_import_of_a_path_that_does_not_exist_is_a_usage_error(make_gateway: object,
                                                              tmp_path: Path) -> None:
    """``imaging-gateway import /mnt/old-pacs`` with the disk not mounted must not report
    success: exit 2 (usage, gateway.cli) and one line on stderr naming the path."""
    gw = make_gateway()  # type: ignore[operator]
    missing = tmp_path / "not-mounted"
    result = gw.cli("import", str(missing), "--no-progress")
    assert result.returncode == 2, result.stdout + result.stderr
    assert str(missing) in result.stderr
