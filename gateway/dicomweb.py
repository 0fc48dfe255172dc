"""DICOMweb (PS3.18) under ``/dicomweb``: the blueprint, STOW-RS and DELETE. Translation only.

QIDO-RS lives in :mod:`gateway.qido`, on this blueprint. ``DELETE`` of a study, series or
instance (as Orthanc and dcm4chee offer; not part of PS3.18) goes through
:meth:`gateway.ingest.Ingest.delete`.

STOW-RS (PS3.18 §10.5): ``POST /studies`` and ``POST /studies/{StudyInstanceUID}`` with
``multipart/related; type="application/dicom"``, one Part 10 instance per part. The body is
parsed as a stream: each part goes to a file in the staging area and through the single write
path (:meth:`gateway.ingest.Ingest.store_file`), so request size is bounded by disk, not memory.

Response (PS3.18 Annex I, ``application/dicom+json``): Retrieve URL (0008,1190) of the study,
Referenced SOP Sequence (0008,1199) for stored instances, Failed SOP Sequence (0008,1198) with
Failure Reason (0008,1197) for the others. HTTP status: 200 all stored; 202 some stored; 409
none stored; 400 malformed request; 413 too large; 415 unsupported media type; 503 nothing
stored because the gateway is out of resources (retry later).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from flask import Blueprint, Response, current_app, g, jsonify, request
from pydicom.dataset import Dataset
from python_multipart.multipart import MultipartParser
from werkzeug.http import parse_options_header

from gateway.errors import StoreError
from gateway.ingest import Ingest
from gateway.storage import is_valid_uid

log = logging.getLogger("gateway.dicomweb")

bp = Blueprint("dicomweb", __name__)

DICOM_JSON = "application/dicom+json"


def cohort_values(endpoint: str | None, values: dict[str, Any] | None) -> None:
    """URL value preprocessor of the DICOMweb blueprints: under
    ``/cohorts/<cohort_id>/dicomweb`` (the same blueprints registered a second time) every
    query and retrieve sees only the cohort's studies (:func:`request_scope`) and Retrieve
    URLs point into the cohort's base (:func:`service_base`)."""
    cohort_id = values.pop("cohort_id", None) if values else None
    if cohort_id is None:
        return
    services = current_app.extensions["gateway"]
    g.scope = services.cohorts.scope(int(cohort_id))  # CohortError → JSON error (web.py)
    g.dicomweb_base = f"{services.settings.public_url}/cohorts/{cohort_id}/dicomweb"


def request_scope() -> Any:
    """The SQL condition limiting this request to a cohort's studies, or None."""
    return g.get("scope")


def service_base() -> str:
    """The DICOMweb service base of this request (the gateway's, or a cohort's)."""
    base = g.get("dicomweb_base")
    if isinstance(base, str):
        return base
    return current_app.extensions["gateway"].settings.dicomweb_url  # type: ignore[no-any-return]


def problem(status: int, message: str) -> Response:
    """An error response a person can act on (JSON with the reason)."""
    response = jsonify({"status": status, "error": message})
    response.status_code = status
    return response


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    handle: IO[bytes] | None = None
    size: int = 0


class _PartCollector:
    """Callbacks for python-multipart's streaming parser: one staging file per part."""

    def __init__(self, staging: Path) -> None:
        # One directory per request: whatever happens, removing it removes every part.
        self.staging = Path(tempfile.mkdtemp(dir=staging, prefix="stow-"))
        self.parts: list[_Part] = []
        self._field = b""
        self._value = b""

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_part_data": self._data,
            "on_part_end": self._end,
        }

    def _begin(self) -> None:
        fd, name = tempfile.mkstemp(dir=self.staging, suffix=".stow")
        self.parts.append(_Part(path=Path(name), handle=os.fdopen(fd, "wb")))

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self.parts[-1].headers[name] = self._value.decode("latin-1").strip()
        self._field = self._value = b""

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self.parts[-1]
        assert part.handle is not None
        part.handle.write(data[start:end])
        part.size += end - start

    def _end(self) -> None:
        part = self.parts[-1]
        if part.handle is not None:
            part.handle.close()
            part.handle = None

    def cleanup(self) -> None:
        for part in self.parts:
            if part.handle is not None:
                part.handle.close()
        shutil.rmtree(self.staging, ignore_errors=True)


def _ingest() -> Ingest:
    return current_app.extensions["gateway"].ingest  # type: ignore[no-any-return]


def _dicomweb_url() -> str:
    return current_app.extensions["gateway"].settings.dicomweb_url  # type: ignore[no-any-return]


def _identify(path: Path) -> tuple[str | None, str | None]:
    """Best-effort SOP Class/Instance UIDs of a part that failed, for its Failed SOP item."""
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                             specific_tags=["SOPClassUID", "SOPInstanceUID"])
        sop_class, sop_uid = ds.get("SOPClassUID"), ds.get("SOPInstanceUID")
        return (str(sop_class) if is_valid_uid(str(sop_class)) else None,
                str(sop_uid) if is_valid_uid(str(sop_uid)) else None)
    except Exception:
        return None, None


@bp.post("/studies")
@bp.post("/studies/<study_uid>")
def stow(study_uid: str | None = None) -> Response:
    """STOW-RS Store Instances (PS3.18 §10.5)."""
    if study_uid is not None and not is_valid_uid(study_uid):
        return problem(400, f"Study Instance UID in the URL is not a valid UID: {study_uid[:80]!r}")
    mimetype, options = parse_options_header(request.headers.get("Content-Type", ""))
    mimetype = mimetype.lower()  # RFC 9110 §8.3.1: media types are case-insensitive
    if mimetype != "multipart/related":
        return problem(415, "STOW-RS needs Content-Type multipart/related; "
                            'type="application/dicom" (got ' f"{mimetype or 'none'})")
    part_type = options.get("type", "application/dicom").strip().lower()
    if part_type != "application/dicom":
        return problem(415, f'multipart/related type="{part_type}" is not supported; send '
                            'Part 10 instances as type="application/dicom"')
    boundary = options.get("boundary")
    if not boundary:
        return problem(400, "multipart/related Content-Type has no boundary parameter")
    accept = request.accept_mimetypes  # RFC 9110 §12.5.1: media ranges and q-values
    if accept.provided and accept.best_match([DICOM_JSON, "application/json"]) is None:
        return problem(406, f"STOW-RS responses are {DICOM_JSON}; Accept was "
                            f"{request.headers.get('Accept', '')!r}")
    limit = current_app.extensions["gateway"].settings.http["max_request_bytes"]
    if request.content_length is not None and request.content_length > limit:
        return problem(413, f"request of {request.content_length} bytes exceeds the limit of "
                            f"{limit} bytes (http.max_request_bytes); send fewer instances per "
                            "request")
    ingest = _ingest()
    collector = _PartCollector(ingest.storage.staging_dir())
    try:
        parser = MultipartParser(boundary.encode("latin-1"),
                                 collector.callbacks())  # type: ignore[arg-type]
        received = 0
        stream = request.stream
        delimiter = b"--" + boundary.encode("latin-1")
        preamble: bytes | None = b""  # None once the first delimiter was found
        while chunk := stream.read(1 << 20):
            received += len(chunk)
            if received > limit:
                return problem(413, f"request exceeds the limit of {limit} bytes "
                                    "(http.max_request_bytes)")
            if preamble is not None:
                preamble += chunk
                start = _first_delimiter(preamble, delimiter)
                if start is None and len(preamble) <= _MAX_PREAMBLE:
                    continue
                chunk, preamble = preamble[start or 0:], None
            parser.write(chunk)
        if preamble:
            parser.write(preamble)  # no delimiter at all: let the parser say what is wrong
        parser.finalize()
        if not collector.parts:
            return problem(400, "the multipart/related body has no parts")
        if collector.parts[-1].handle is not None:
            return problem(400, "the multipart/related body ends in the middle of a part "
                                "(no closing boundary)")
        return _store_parts(ingest, collector.parts, study_uid)
    except StoreError as exc:
        return problem(503, str(exc))
    except Exception as exc:  # python-multipart raises its own errors on malformed bodies
        if type(exc).__module__.startswith("python_multipart"):
            return problem(400, f"malformed multipart/related body: {exc}")
        raise
    finally:
        collector.cleanup()


_MAX_PREAMBLE = 64 * 1024


def _first_delimiter(data: bytes, delimiter: bytes) -> int | None:
    """Offset of the first boundary delimiter line: RFC 2046 §5.1.1 lets a preamble precede
    it, to be ignored (python-multipart does not skip one)."""
    if data.startswith(delimiter):
        return 0
    found = data.find(b"\r\n" + delimiter)
    return None if found < 0 else found + 2


def _store_parts(ingest: Ingest, parts: list[_Part], study_uid: str | None) -> Response:
    base = _dicomweb_url()
    referenced: list[Dataset] = []
    failed: list[Dataset] = []
    statuses: list[int] = []
    studies: set[str] = set()
    for number, part in enumerate(parts, start=1):
        assert part.path is not None
        media = parse_options_header(
            part.headers.get("content-type", "application/dicom"))[0].lower()
        if media != "application/dicom":
            statuses.append(0xC000)
            failed.append(_failed_item(None, None, 0xC000))
            log.warning("STOW-RS part %d has media type %r; only application/dicom is stored",
                        number, media)
            continue
        try:
            result = ingest.store_file(part.path, move=True, expected_study_uid=study_uid,
                                       source="STOW-RS")
        except StoreError as exc:
            sop_class, sop_uid = _identify(part.path)
            log.warning("STOW-RS part %d failed 0x%04X: SOP Instance %s: %s", number, exc.status,
                        sop_uid, exc)
            statuses.append(exc.status)
            failed.append(_failed_item(sop_class, sop_uid, exc.status))
            continue
        item = Dataset()
        item.ReferencedSOPClassUID = result.sop_class_uid
        item.ReferencedSOPInstanceUID = result.sop_uid
        item.RetrieveURL = (f"{base}/studies/{result.study_uid}/series/{result.series_uid}"
                            f"/instances/{result.sop_uid}")
        referenced.append(item)
        studies.add(result.study_uid)
    response = Dataset()
    target = study_uid or (next(iter(studies)) if len(studies) == 1 else None)
    if target:
        response.RetrieveURL = f"{base}/studies/{target}"
    if referenced:
        response.ReferencedSOPSequence = referenced
    if failed:
        response.FailedSOPSequence = failed
    if not failed:
        status = 200
    elif referenced:
        status = 202
    elif all(0xA700 <= s <= 0xA7FF for s in statuses):
        status = 503
    else:
        status = 409
    body = Response(response=_to_json(response), status=status, mimetype=DICOM_JSON)
    if status == 503:
        body.headers["Retry-After"] = "30"
    return body


@bp.delete("/studies/<study>")
@bp.delete("/studies/<study>/series/<series>")
@bp.delete("/studies/<study>/series/<series>/instances/<sop>")
def delete(study: str, series: str | None = None, sop: str | None = None) -> Response:
    """Remove a study, series or instance (blobs, index rows) and queue the FHIR update.
    204 when something was deleted, 404 when nothing matched, 405 if ``http.allow_delete`` is
    off."""
    services = current_app.extensions["gateway"]
    if not services.settings.http["allow_delete"]:
        return problem(405, "deletion is disabled on this gateway (http.allow_delete = false)")
    for name, uid in (("study", study), ("series", series), ("instance", sop)):
        if uid is not None and not is_valid_uid(uid):
            return problem(400, f"the {name} UID in the path is not a valid UID: {uid[:80]!r}")
    try:
        count = services.ingest.delete(study, series, sop)
    except StoreError as exc:
        return problem(503, f"nothing deleted: {exc}")
    if count == 0:
        return problem(404, "no such study, series or instance")
    log.info("DELETE %s removed %d instances", request.path, count)
    return Response(status=204)


def _failed_item(sop_class: str | None, sop_uid: str | None, reason: int) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class or ""
    item.ReferencedSOPInstanceUID = sop_uid or ""
    item.FailureReason = reason
    return item


def _to_json(ds: Dataset) -> str:
    return str(ds.to_json())


bp.url_value_preprocessor(cohort_values)


@bp.before_request
def _read_only_in_a_cohort() -> Response | None:
    if request_scope() is not None and request.method not in ("GET", "HEAD"):
        return problem(405, "a cohort's DICOMweb service is read-only: store and delete "
                            "through /dicomweb")
    return None
