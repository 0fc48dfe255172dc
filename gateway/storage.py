"""Blob storage for Part 10 files.

A blob's key is ``<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` and is only ever
built by :func:`instance_key` from UIDs that passed :func:`is_valid_uid` (PS3.5 §9.1: digits and
dots, no leading zeros, at most 64 characters). So no received string can name a path outside the
storage root; :meth:`FileStorage.path_for` checks again anyway.

Writes are atomic and durable: the bytes go to a temporary file on the same file system, are
fsync'd, renamed into place, and the directory is fsync'd. A reader sees the old object, the new
object, or nothing; never a partial file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from gateway.errors import InvalidInstance, OutOfResources

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_UID = r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*"
#: study/series/instance.dcm, each component a syntactically valid UID: no "..", no "/".
_KEY_RE = re.compile(rf"^{_UID}/{_UID}/{_UID}\.dcm$")

def is_valid_uid(value: object) -> bool:
    """True when ``value`` is a UID per PS3.5 §9.1 (no leading zeros in components, ≤ 64 chars)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.match(value))


def instance_key(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """The storage key of one instance; raises :class:`InvalidInstance` for an invalid UID."""
    for name, uid in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid),
                      ("SOPInstanceUID", sop_uid)):
        if not is_valid_uid(uid):
            raise InvalidInstance(f"{name} is missing or not a valid UID: {str(uid)[:80]!r}")
    return f"{study_uid}/{series_uid}/{sop_uid}.dcm"


def _resource_error(exc: OSError, action: str) -> OutOfResources:
    return OutOfResources(f"storage unavailable while {action}: {exc.strerror or exc}")


class FileStorage:
    """Blobs as files under ``root`` (the default backend)."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root.resolve()
        self.fsync = fsync
        self._staging = self.root / ".staging"
        self._root = str(self.root)
        #: Directories known to exist durably (as strings: the store path avoids pathlib).
        self._durable_dirs: set[str] = set()
        self._lock = threading.Lock()
        try:
            self._staging.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _resource_error(exc, f"creating {self._staging}") from exc

    # -- paths -----------------------------------------------------------------------------------
    def path_for(self, key: str) -> Path:
        """The file of ``key``; raises ``ValueError`` for a key that is not an instance key."""
        # The pattern admits only digits and single dots between '/', so the joined path
        # cannot leave the root (tests/test_storage.py checks this for any string).
        return Path(self.file_of(key))

    def file_of(self, key: str) -> str:
        """:meth:`path_for` as a string (the per-instance store path avoids pathlib)."""
        if not _KEY_RE.match(key) or max(len(part) for part in key.split("/")) > 68:
            raise ValueError(f"not a storage key: {key[:200]!r}")
        return f"{self._root}/{key}"

    def staging_dir(self) -> Path:
        return self._staging

    # -- writes ----------------------------------------------------------------------------------
    def put_file(self, key: str, source: Path | str, *, move: bool,
                 durable: bool = True) -> None:
        """Store ``source`` under ``key``. With ``durable=False`` the caller makes it durable
        later with :meth:`sync` (several blobs at once) before it relies on it."""
        target = self.file_of(key)
        sync = self.fsync and durable
        try:
            if move:
                if sync:
                    _fsync_path(source)
                self._place(source, target, sync=sync)
            else:
                with open(source, "rb") as handle:
                    self._write_stream(target, iter(lambda: handle.read(1 << 20), b""),
                                       sync=sync)
        except OSError as exc:
            raise _resource_error(exc, f"storing {key}") from exc

    def sync(self, keys: Iterable[str]) -> dict[str, OutOfResources]:
        """fsync each blob, then each of their directories once; returns the keys that could
        not be made durable, with why."""
        failed: dict[str, OutOfResources] = {}
        if not self.fsync:
            return failed
        directories: dict[str, list[str]] = {}
        for key in keys:
            path = self.file_of(key)
            try:
                _fsync_path(path)
            except OSError as exc:
                failed[key] = _resource_error(exc, f"syncing {key}")
                continue
            directories.setdefault(os.path.dirname(path), []).append(key)
        for directory, members in directories.items():
            try:
                _fsync_dir(directory)
            except OSError as exc:
                for key in members:
                    failed[key] = _resource_error(exc, f"syncing {directory}")
        return failed

    def _write_stream(self, target: str, chunks: Iterable[bytes], *,
                      sync: bool = True) -> None:
        fd, tmp_name = tempfile.mkstemp(dir=self._staging, suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
                out.flush()
                if self.fsync and sync:
                    os.fsync(out.fileno())
            self._place(tmp, target, sync=sync)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _place(self, tmp: Path | str, target: str, *, sync: bool = True) -> None:
        """Rename a complete file into place and (``sync``) make the rename durable."""
        directory = os.path.dirname(target)
        if directory not in self._durable_dirs:
            self._make_dirs(directory)
        os.replace(tmp, target)
        if self.fsync and sync:
            _fsync_dir(directory)

    def _make_dirs(self, directory: str) -> None:
        created: list[Path] = []
        probe = Path(directory)
        while not probe.exists():
            created.append(probe)
            probe = probe.parent
        os.makedirs(directory, exist_ok=True)
        if self.fsync:
            for made in created:
                _fsync_dir(made.parent)
        with self._lock:
            self._durable_dirs.add(directory)
            if len(self._durable_dirs) > 100_000:
                self._durable_dirs.clear()

    # -- reads and deletes ------------------------------------------------------------------------
    def open(self, key: str) -> BinaryIO:
        return open(self.path_for(key), "rb")

    def exists(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def delete(self, key: str) -> None:
        path = self.path_for(key)
        path.unlink(missing_ok=True)
        for directory in (path.parent, path.parent.parent):
            try:
                directory.rmdir()
            except OSError:
                break
            with self._lock:
                self._durable_dirs.discard(str(directory))

    def keys(self) -> Iterator[str]:
        """Every stored key, in a stable order (used by ``reindex``)."""
        for study in sorted(p for p in self.root.iterdir() if p.is_dir() and p != self._staging):
            for series in sorted(p for p in study.iterdir() if p.is_dir()):
                for blob in sorted(series.glob("*.dcm")):
                    key = f"{study.name}/{series.name}/{blob.name}"
                    if _KEY_RE.match(key):
                        yield key

    def clear_staging(self) -> int:
        """Remove leftovers of interrupted receptions (never acknowledged); returns the count."""
        count = 0
        for leftover in self._staging.iterdir():
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            count += 1
        return count

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free


def _load_sync_file_range() -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` of ``fd`` to disk now,
    without waiting (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; nothing elsewhere).

    Durability still comes only from the fsync before the acknowledgement: this just moves
    most of that fsync's work into the time the rest of the object is still arriving, so the
    final fsync has little left to wait for. Failures are ignored (the fsync reports them)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # type: ignore[operator]


def _fsync_path(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
