"""Blob storage for Part 10 files.

A blob's key is ``<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` and is only ever
built by :func:`instance_key` from UIDs that passed :func:`is_valid_uid` (PS3.5 §9.1: digits and
dots, no leading zeros, at most 64 characters). So no received string can name a path outside the
storage root; :meth:`FileStorage.path_for` checks again anyway.

Writes are atomic and durable: the bytes go to a temporary file on the same file system, are
fsync'd, renamed into place, and the directory is fsync'd. A reader sees the old object, the new
object, or nothing; never a partial file.

Once a new blob is durable, its pages leave the operating system's page cache (unless
``cache_new_blobs``): see :func:`release_cached`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from gateway.errors import ConfigError, InvalidInstance, OutOfResources, StoreError

log = logging.getLogger("gateway.storage")

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

    def __init__(self, root: Path, *, fsync: bool = True,
                 fsync_directories: str = "always", cache_new_blobs: bool = False) -> None:
        self.root = root.resolve()
        self.fsync = fsync
        #: Whether a new blob's pages leave the page cache once it is durable
        #: (:func:`release_cached`).
        self.release_new = fsync and not cache_new_blobs
        self._staging = self.root / ".staging"
        self._root = str(self.root)
        #: Directories known to exist durably (as strings: the store path avoids pathlib).
        self._durable_dirs: set[str] = set()
        self._lock = threading.Lock()
        self._pool: StagingPool | None = None
        try:
            self._staging.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _resource_error(exc, f"creating {self._staging}") from exc
        #: Whether :meth:`sync` fsyncs a new blob's directory after the blob itself.
        self.fsync_new_directories = fsync_directories == "always" or \
            file_system_type(self._root) not in NAME_DURABLE_WITH_FILE

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

    def staging_pool(self) -> StagingPool:
        """The pool of empty staging files received data sets stream into (made on first
        use; see :class:`StagingPool`)."""
        with self._lock:
            if self._pool is None:
                self._pool = StagingPool(str(self._staging / StagingPool.SUBDIRECTORY))
            return self._pool

    def close(self) -> None:
        """Remove the staging pool's unused files (a clean stop leaves staging empty)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

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
                    _fsync_path(source, release=self.release_new)
                self._place(source, target, sync=sync)
            else:
                with open(source, "rb") as handle:
                    self._write_stream(target, iter(lambda: handle.read(1 << 20), b""),
                                       sync=sync)
        except OSError as exc:
            raise _resource_error(exc, f"storing {key}") from exc

    def sync(self, keys: Iterable[str]) -> dict[str, OutOfResources]:
        """Make newly named blobs durable: fsync each (its rename into place came first), then
        each of their directories once, unless the file system made the names durable with
        the blobs (:data:`NAME_DURABLE_WITH_FILE`); returns the keys that could not be made
        durable, with why."""
        failed: dict[str, OutOfResources] = {}
        if not self.fsync:
            return failed
        directories: dict[str, list[str]] = {}
        for key in keys:
            path = self.file_of(key)
            try:
                _fsync_path(path, release=self.release_new)
            except OSError as exc:
                failed[key] = _resource_error(exc, f"syncing {key}")
                continue
            directories.setdefault(os.path.dirname(path), []).append(key)
        if not self.fsync_new_directories:
            return failed
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
                    _make_durable(out.fileno(), release=self.release_new)
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

    def modified_at(self, key: str) -> float | None:
        """When the blob was last written (seconds since the epoch), ``None`` if absent."""
        try:
            return os.stat(self.file_of(key)).st_mtime
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        path = Path(self.file_of(key))
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

    def series_keys(self, study_uid: str, series_uid: str) -> list[str]:
        """The keys of every blob stored under one series (none if the UIDs are invalid)."""
        if not (is_valid_uid(study_uid) and is_valid_uid(series_uid)):
            return []
        try:
            names = os.listdir(f"{self._root}/{study_uid}/{series_uid}")
        except FileNotFoundError:
            return []
        keys = (f"{study_uid}/{series_uid}/{name}" for name in sorted(names))
        return [key for key in keys if _KEY_RE.match(key)]

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


#: S3 error codes that no retry mends: the bucket or the credentials are wrong.
_S3_REFUSALS = frozenset({"AccessDenied", "NoSuchBucket", "InvalidAccessKeyId",
                          "SignatureDoesNotMatch", "AllAccessDisabled", "InvalidBucketName"})


class S3Storage(FileStorage):
    """Blobs as objects in an S3 bucket (``<prefix><key>``), with a local read cache.

    The bucket holds the copy that counts: a blob is stored when its PUT is answered 200 (S3's
    own durability), and only then acknowledged. Locally, in ``<root>/s3-cache``
    (:data:`CACHE_DIRECTORY`, so that nothing else under ``root`` is ever taken for a cached
    copy), are the staging area (received data sets arrive there, as with
    :class:`FileStorage`) and a cache of blobs in the same layout: each stored blob stays there
    after its upload (a study is often read soon after it arrives), and a blob read when absent
    is downloaded there first, so every reader works on a local file (:meth:`path_for`). The
    cache only ever holds what the bucket holds (a copy is kept after its upload, or
    downloaded). It is trimmed to ``cache_max_bytes``, least recently used first; blobs used in
    the last :data:`CACHE_GRACE_SECONDS` are never trimmed, so a reader does not lose the file
    it was just given. Nothing in the cache is fsync'd: a lost cached file is downloaded again.

    Credentials come from boto3's usual chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
    a profile, a Kubernetes service account's web identity, an instance role).
    """

    CACHE_DIRECTORY = "s3-cache"
    #: A cached blob used this recently stays (see the class docstring).
    CACHE_GRACE_SECONDS = 120.0
    #: A hit refreshes the blob's use time (its file's mtime) when older than this: well
    #: inside the grace period, so a blob handed out has a minute and a half at least.
    TOUCH_SECONDS = 30.0
    #: Blobs up to this size go up in one PUT (the transfer manager's machinery costs more
    #: than it saves on an image); larger ones in parts.
    SINGLE_PUT_BYTES = 64 * 1024**2

    def __init__(self, root: Path, *, bucket: str, prefix: str = "",
                 endpoint_url: str | None = None, region: str | None = None,
                 cache_max_bytes: int = 10 * 1024**3) -> None:
        super().__init__(root / self.CACHE_DIRECTORY, fsync=False, cache_new_blobs=True)
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix
        self.cache_max_bytes = cache_max_bytes
        self._added = 0  # bytes added to the cache since it was last measured
        self._trimming = threading.Lock()
        # An S3-compatible store (endpoint_url) gets checksums only where S3 requires them:
        # boto3's default since 1.36 (a CRC trailer on every PUT, aws-chunked) is not spoken
        # by every such store, and a store refusing it would refuse every upload.
        checksums = {"request_checksum_calculation": "when_required",
                     "response_checksum_validation": "when_required"} if endpoint_url else {}
        self._client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region,
            config=Config(retries={"max_attempts": 3, "mode": "standard"},
                          connect_timeout=5, read_timeout=30, max_pool_connections=32,
                          s3={"addressing_style": "path" if endpoint_url else "auto"},
                          **checksums))
        where = f"{endpoint_url or 'AWS'}, bucket {bucket!r}"
        try:
            self._client.head_bucket(Bucket=bucket)
        except Exception as exc:
            raise ConfigError(f"storage.s3_bucket: {where} cannot be used (now): "
                              f"{_s3_reason(exc)}") from exc
        log.info("blobs go to S3 (%s, prefix %r); local cache %s, at most %d MB", where,
                 prefix, self.root, cache_max_bytes // 10**6)

    def _object(self, key: str) -> str:
        self.file_of(key)  # validates the key
        return self.prefix + key

    # -- writes ----------------------------------------------------------------------------------
    def put_file(self, key: str, source: Path | str, *, move: bool,
                 durable: bool = True) -> None:
        """Upload ``source`` as ``key`` (durable once S3 answers), then keep it in the cache
        (best effort: the bucket's copy is what counts)."""
        name = self._object(key)
        try:
            size = os.path.getsize(source)
            body = open(source, "rb")  # noqa: SIM115 (closed below)
        except OSError as exc:
            raise _resource_error(exc, f"reading {key} to upload it") from exc
        try:
            with body:
                if size <= self.SINGLE_PUT_BYTES:  # one request (botocore rewinds to retry)
                    self._client.put_object(Bucket=self.bucket, Key=name, Body=body,
                                            ContentType="application/dicom")
                else:  # in parts, several at once
                    self._client.upload_fileobj(body, self.bucket, name,
                                                ExtraArgs={"ContentType": "application/dicom"})
        except Exception as exc:  # botocore's network errors are OSErrors too
            raise _s3_store_error(exc, f"storing {key}") from exc
        self._keep(key, str(source), move=move)

    def _keep(self, key: str, source: str, *, move: bool) -> None:
        """A stored blob's copy into the cache (a newer one replaces an older one)."""
        target = self.file_of(key)
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if move:
                os.replace(source, target)
            else:
                fd, tmp = tempfile.mkstemp(dir=self._staging, suffix=".keep")
                os.close(fd)
                try:
                    shutil.copyfile(source, tmp)
                    os.replace(tmp, target)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
        except OSError as exc:
            log.warning("S3 cache: %s not kept locally (%s); it will be read from the bucket",
                        key, exc)
            if move:
                with contextlib.suppress(OSError):
                    os.unlink(source)
            return
        self._cached(target)

    def sync(self, keys: Iterable[str]) -> dict[str, OutOfResources]:
        """Nothing to do: a blob is durable once its upload was answered."""
        return {}

    # -- reads and deletes ------------------------------------------------------------------------
    def path_for(self, key: str) -> Path:
        """The cached file of ``key``, downloaded first when absent. The path names no file
        when the bucket has no such object; ``OSError`` when the bucket cannot be read."""
        path = super().path_for(key)
        try:
            used = os.stat(path).st_mtime
        except FileNotFoundError:
            self._download(key, str(path))
            return path
        now = time.time()
        if now - used > self.TOUCH_SECONDS:
            with contextlib.suppress(OSError):
                os.utime(path, (now, now))
        return path

    def _download(self, key: str, target: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=self._staging, suffix=".get")
        os.close(fd)
        try:
            try:
                answer = self._client.get_object(Bucket=self.bucket, Key=self._object(key))
                with answer["Body"] as body, open(tmp, "wb") as out:
                    shutil.copyfileobj(body, out, 1 << 20)
            except Exception as exc:
                if _s3_code(exc) in ("404", "NoSuchKey", "NotFound"):
                    return
                raise OSError(errno.EIO, f"object store unavailable while reading {key}: "
                                         f"{_s3_reason(exc)}") from exc
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:  # a link, not a rename: a copy placed meanwhile (a newer upload) stays
                os.link(tmp, target)
            except FileExistsError:
                return
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._cached(target)

    def exists(self, key: str) -> bool:
        return self.modified_at(key) is not None

    def modified_at(self, key: str) -> float | None:
        """The object's Last-Modified, by the store's clock (whole seconds)."""
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=self._object(key))
        except Exception as exc:
            if _s3_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise OSError(errno.EIO, f"object store unavailable: {_s3_reason(exc)}") from exc
        return float(head["LastModified"].timestamp())

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._object(key))
        except Exception as exc:
            raise OSError(errno.EIO, f"object store unavailable while deleting {key}: "
                                     f"{_s3_reason(exc)}") from exc
        super().delete(key)

    def keys(self) -> Iterator[str]:
        """Every stored key (from the bucket's listing, in its order: by key)."""
        yield from self._listed(self.prefix)

    def series_keys(self, study_uid: str, series_uid: str) -> list[str]:
        if not (is_valid_uid(study_uid) and is_valid_uid(series_uid)):
            return []
        return list(self._listed(f"{self.prefix}{study_uid}/{series_uid}/"))

    def _listed(self, prefix: str) -> Iterator[str]:
        """Keys of the objects under ``prefix``; ``OSError`` when the bucket cannot be listed."""
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                for item in page.get("Contents", ()):
                    key = item["Key"][len(self.prefix):]
                    if _KEY_RE.match(key):
                        yield key
        except Exception as exc:
            raise OSError(errno.EIO, f"object store unavailable while listing {prefix!r}: "
                                     f"{_s3_reason(exc)}") from exc

    # -- the cache --------------------------------------------------------------------------------
    def _cached(self, path: str) -> None:
        """Count a file into the cache; past a tenth of the limit, measure and trim it."""
        with contextlib.suppress(OSError):
            self._added += os.path.getsize(path)
        if self._added > self.cache_max_bytes // 10 and not self._trimming.locked():
            self._added = 0
            threading.Thread(target=self.trim_cache, name="s3-cache-trim", daemon=True).start()

    def trim_cache(self) -> int:
        """Remove cached blobs, least recently used first, until the cache holds at most
        ``cache_max_bytes`` (sparing those used in the grace period); returns how many. One
        trim at a time in a process (two would each remove what the other already did)."""
        with self._trimming:
            return self._trim()

    def _trim(self) -> int:
        blobs: list[tuple[float, int, str]] = []
        for directory, subdirectories, files in os.walk(self._root):
            if directory == self._root:
                subdirectories[:] = [d for d in subdirectories if d != self._staging.name]
            for name in files:
                if name.endswith(".dcm"):
                    path = os.path.join(directory, name)
                    with contextlib.suppress(OSError):
                        status = os.stat(path)
                        blobs.append((status.st_mtime, status.st_size, path))
        total = sum(size for _, size, _ in blobs)
        removed = 0
        spare_after = time.time() - self.CACHE_GRACE_SECONDS
        for used, size, path in sorted(blobs):
            if total <= self.cache_max_bytes or used > spare_after:
                break
            with contextlib.suppress(OSError):
                os.unlink(path)
                total -= size
                removed += 1
        if removed:
            log.info("S3 cache: %d blobs removed, %d MB kept", removed, total // 10**6)
        return removed


def _s3_code(exc: BaseException) -> str:
    """The S3 error code of a botocore ``ClientError`` (``""`` for anything else)."""
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def _s3_reason(exc: BaseException) -> str:
    code = _s3_code(exc)
    cause = exc.__cause__ or exc.__context__
    return f"{code}: {exc}" if code else f"{exc}" + (f" ({cause})" if cause else "")


def _s3_store_error(exc: BaseException, action: str) -> StoreError:
    """A failed upload: refused for good (wrong bucket or credentials: 0x0110, with what to
    check), otherwise out of resources (0xA700: the sender keeps its copy and retries)."""
    # boto3's S3UploadFailedError (multipart) names the ClientError only as its context
    inner = next((e for e in (exc, exc.__cause__, exc.__context__)
                  if e is not None and _s3_code(e)), exc)
    code = _s3_code(inner)
    if code in _S3_REFUSALS:  # what to check first: an Error Comment keeps 64 characters
        return StoreError(f"S3 {code}: check storage.s3_bucket and the S3 credentials "
                          f"({action}: {_s3_reason(inner)})", status=0x0110)
    return OutOfResources(f"object store unavailable while {action}: {_s3_reason(inner)}")


_STAGING_NAMES = itertools.count()


def new_staging_file(directory: str) -> tuple[str, int]:
    """Create an empty staging file in ``directory``: its path and a descriptor open for
    writing. Named by process id and a counter (cheaper than mkstemp's random names); a name
    left over from an earlier process with the same id is skipped, never reused."""
    for _ in range(1000):
        name = f"{directory}/{os.getpid()}-{next(_STAGING_NAMES)}.dcm"
        try:
            return name, os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free staging file name in {directory}")


class StagingPool:
    """Empty files made ahead of need, so that receiving a data set never waits for one.

    Creating a file costs far more than writing into one already open, and on some file
    systems much more: on this project's benchmark machine, 0.2 to 1.4 ms of system time per
    new file depending on the directory, against 0.05 ms to rename one. A C-STORE would pay
    that between its command and its first data byte, on the association's critical path. A
    daemon thread keeps ``size`` empty files created here; :meth:`take` opens one (cheap) and
    hands it out at once, or creates its own when the pool has run dry or cannot be filled
    (disk full, read-only: the taker's own attempt then reports the error exactly as before).

    The files live in ``<staging>/ready``; a taken one is written where it lies and moved
    into the store from there (a rename on the same file system). Pool files left by a
    stopped process are removed with the rest of staging at the next start.
    """

    SUBDIRECTORY = "ready"
    #: Files kept ready: enough for several associations' next data sets at once.
    SIZE = 8
    #: After a failure to create one, wait this long before trying again.
    RETRY_SECONDS = 1.0

    def __init__(self, directory: str, size: int = SIZE) -> None:
        self.directory = directory
        self.size = size
        #: Created and closed again: an idle pool holds no descriptor open for writing (a
        #: file system with files open for writing cannot be remounted read-only).
        self._ready: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def take(self) -> tuple[str, int]:
        """A new, empty staging file: its path and a descriptor open for writing. Raises
        ``OSError`` when none can be created (or opened: read-only storage)."""
        with self._cond:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._fill, name="staging-pool",
                                                daemon=True)
                self._thread.start()
            ready = self._ready.pop() if self._ready else None
            # The filler is woken when half the pool is gone and then refills it: one wake-up
            # per several files (on a busy machine a thread's wake-up costs a context switch
            # and a turn of the GIL, more than creating the file does).
            if len(self._ready) <= self.size // 2:
                self._cond.notify()
        if ready is None:
            return self._new_file()
        try:
            return ready, os.open(ready, os.O_WRONLY)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(ready)
            raise

    def close(self) -> None:
        """Stop filling and remove the files nobody took."""
        with self._cond:
            self._closed = True
            left, self._ready = self._ready, []
            self._cond.notify()
        for name in left:
            with contextlib.suppress(OSError):
                os.unlink(name)
        with contextlib.suppress(OSError):  # still in use by another process: it stays
            os.rmdir(self.directory)

    def _new_file(self) -> tuple[str, int]:
        try:
            return new_staging_file(self.directory)
        except FileNotFoundError:  # the first one (or staging was cleared meanwhile)
            os.makedirs(self.directory, exist_ok=True)
            return new_staging_file(self.directory)

    def _fill(self) -> None:
        while True:
            with self._cond:
                while not self._closed and len(self._ready) >= self.size:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                made, fd = self._new_file()
                os.close(fd)
            except OSError as exc:
                log.debug("staging pool: cannot create a file (%s); retrying later", exc)
                time.sleep(self.RETRY_SECONDS)
                continue
            with self._cond:
                self._ready.append(made)
                closed = self._closed
            if closed:  # closed while this one was being made: remove it too
                self.close()
                return


#: File systems on which fsync of a file also makes durable the rename that gave it its name,
#: so a directory fsync after it would only add a device flush. ext4 with a journal commits
#: the transaction that last changed the inode, and a rename changes it (its ctime); without
#: a journal, fsync of a file not yet synced since its creation writes its current parent
#: directory (ext4_sync_parent). XFS forces its log up to the inode's last change, the
#: rename included. Anything else gets the directory fsync POSIX asks for.
NAME_DURABLE_WITH_FILE = frozenset({"ext4", "xfs"})


def file_system_type(path: str) -> str:
    """The type of the file system ``path`` lies on (Linux ``/proc/self/mounts``; "" when it
    cannot be told)."""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as mounts:
            entries = [line.split() for line in mounts]
    except OSError:
        return ""
    target = os.path.realpath(path)
    best, kind = "", ""
    for fields in entries:
        if len(fields) < 3:
            continue
        # Mount points escape space, tab, newline and backslash as octal (\040 …).
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def _load_sync_file_range() -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        # The C library is already loaded into this process: its symbols are found through
        # the program's own handle (``find_library`` would run ``ldconfig`` to look for it).
        libc = ctypes.CDLL(None, use_errno=True)
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


def release_cached(fd: int) -> None:
    """Drop the cached pages of a file just made durable (``POSIX_FADV_DONTNEED``; they are
    clean after its fsync, so nothing is lost, only the copy in memory; a later read reads
    the disk). Failures are ignored: this is advice.

    Why the write path does it: ingest writes each image once and seldom reads it back soon,
    so its pages would only push out of the cache what is read often (the index, studies
    being retrieved), and the kernel would pay later to reclaim them. Released at once, the
    same memory serves the next image's writes: on the benchmark's virtual machine, writing a
    CT image (512 KiB) into memory the kernel has not used lately cost 0.5-1 ms of system
    time, into memory just released 0.15-0.2 ms (a write, fsync and release loop; the
    ``gateway-cached`` benchmark target keeps them). ``storage.cache_new_blobs`` keeps them."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _make_durable(fd: int, *, release: bool) -> None:
    """fsync ``fd``; ``release``: then drop its pages from the cache (:func:`release_cached`)."""
    os.fsync(fd)
    if release:
        release_cached(fd)


def _fsync_path(path: Path | str, *, release: bool = False) -> None:
    """:func:`_make_durable` of the file at ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _make_durable(fd, release=release)
    finally:
        os.close(fd)


def _fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
