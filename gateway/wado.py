"""WADO-RS (PS3.18 §10.4) under ``/dicomweb`` and WADO-URI (PS3.18 §9) at ``/wado``.

Translation only: parse the path, the query and the Accept header, ask
:mod:`gateway.retrieve` and :mod:`gateway.render`, build the response.

WADO-RS resources (``{s}``/``{se}``/``{i}`` are Study/Series/SOP Instance UIDs):

* ``/studies/{s}[/series/{se}[/instances/{i}]]``: ``multipart/related;
  type="application/dicom"``, one Part 10 instance per part (§10.4.1.1.1);
* ``…/metadata``: ``application/dicom+json`` (§10.4.1.1.2, Annex F);
* ``…/instances/{i}/frames/{list}``: ``multipart/related; type="application/octet-stream"``
  or the stored code streams as ``image/jpeg``, ``image/jls``, ``image/jp2``… (§10.4.1.1.4);
* ``…/instances/{i}/bulkdata/{tag path}``: the targets of the metadata's BulkDataURIs;
* ``…/rendered``, ``…/frames/{list}/rendered``: ``image/jpeg`` (default), ``image/png``,
  ``image/gif``; several images as ``multipart/related`` (§10.4.1.1.3);
* ``…/thumbnail``, ``…/frames/{list}/thumbnail``: one small image (§10.4.1.1.6).

Negotiation (PS3.18 §8.7): the Accept header (or the ``accept`` query parameter, which takes
its place, §8.3.3.1) is a list of media ranges with q-values. For instances each range may
name a ``transfer-syntax`` (a UID or ``*``: "any"); without one the default is Explicit VR
Little Endian (§8.7.3.5), except for instances whose pixel data is only available lossy
compressed, which are then sent as stored (§8.7.3, Note on lossy data). Implicit VR Little
Endian and Explicit VR Big Endian are never sent (§8.7.3). The stored bytes go out unchanged
whenever the stored syntax is acceptable.

Statuses: 200; 206 when some instances of a study/series could not be sent (a ``Warning:
299`` header says which and why); 400 malformed UID or parameter; 404 nothing there; 406
nothing acceptable (the JSON body lists what is ``offered``); 500 the index lists an instance
whose stored file is gone.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from flask import Blueprint, Response, current_app, jsonify, request, stream_with_context
from werkzeug.http import parse_options_header

from gateway import render, retrieve
from gateway.bootstrap import Services
from gateway.dicomweb import cohort_values, problem, request_scope, service_base
from gateway.errors import InstanceMissing, RetrieveError, TranscodeError
from gateway.retrieve import EXPLICIT_VR_LITTLE_ENDIAN, Located
from gateway.storage import is_valid_uid

log = logging.getLogger("gateway.wado")

#: WADO-RS routes, registered under ``/dicomweb`` beside the STOW-RS blueprint.
bp = Blueprint("wado", __name__)
bp.url_value_preprocessor(cohort_values)  # /cohorts/<id>/dicomweb: the cohort's studies only

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET_STREAM = "application/octet-stream"
#: PS3.18 §8.7.3: not to be used with web services.
WEB_EXCLUDED = frozenset({retrieve.IMPLICIT_VR_LITTLE_ENDIAN, retrieve.EXPLICIT_VR_BIG_ENDIAN})
DEFAULT = "default"  # "no transfer-syntax parameter": resolved per instance by _resolve()

#: PS3.18 Table 8.7.3-5: media type of each compressed transfer syntax's frames.
FRAME_MEDIA_TYPES: dict[str, str] = {
    **dict.fromkeys(("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
                     "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"), "image/jpeg"),
    **dict.fromkeys(("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"), "image/jls"),
    **dict.fromkeys(("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"), "image/jp2"),
    **dict.fromkeys(("1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93"), "image/jpx"),
    **dict.fromkeys(("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                     "1.2.840.10008.1.2.4.203"), "image/jphc"),
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
#: Spellings clients use for the same types (dicomweb-client sends the x- forms too).
_ALIASES = {"image/x-jls": "image/jls", "image/x-dicom-rle": "image/dicom-rle",
            "image/jph": "image/jphc"}


# -- Accept ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Wanted:
    """One media range of the Accept header, unpacked: ``multipart`` True for
    ``multipart/related`` (``media_type`` is then its ``type`` parameter), None for ``*/*``
    (either), False for a single-part type."""

    multipart: bool | None
    media_type: str
    transfer_syntax: str | None
    q: float


def _split_ranges(header: str) -> list[str]:
    ranges, current, quoted = [], "", False
    for char in header:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            ranges.append(current)
            current = ""
        else:
            current += char
    return [*ranges, current]


def parse_accept(header: str | None) -> list[Wanted]:
    """The acceptable representations, most preferred first (RFC 9110 §12.5.1: q-values,
    ``q=0`` excludes; an absent or empty header accepts anything). Media types are compared
    case-insensitively (RFC 9110 §8.3.1)."""
    if not header or not header.strip():
        return [Wanted(None, "*/*", None, 1.0)]
    found: list[Wanted] = []
    for text in _split_ranges(header):
        mimetype, options = parse_options_header(text.strip())
        mimetype = mimetype.lower()
        if not mimetype or "/" not in mimetype:
            continue
        params = {k.lower(): v for k, v in options.items()}
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 1.0
        if q <= 0:
            continue
        syntax = params.get("transfer-syntax") or None
        if mimetype == "multipart/related":
            inner = _ALIASES.get(params.get("type", "*/*").lower(), params.get("type", "*/*")
                                 .lower())
            found.append(Wanted(True, inner, syntax, q))
        elif mimetype in ("*/*", "multipart/*"):
            found.append(Wanted(None, "*/*", syntax, q))
        else:
            found.append(Wanted(False, _ALIASES.get(mimetype, mimetype), syntax, q))
    return sorted(found, key=lambda w: -w.q)  # stable: equal q keep header order


def _accept() -> list[Wanted]:
    return parse_accept(request.args.get("accept") or request.headers.get("Accept"))


def _matches(pattern: str, media_type: str) -> bool:
    if pattern in ("*/*", "*"):
        return True
    if pattern.endswith("/*"):
        return media_type.startswith(pattern[:-1])
    return pattern == media_type


def _groups(wanted: list[Wanted]) -> Iterator[list[Wanted]]:
    """The ranges grouped by q-value, best first."""
    group: list[Wanted] = []
    for item in wanted:
        if group and item.q != group[0].q:
            yield group
            group = []
        group.append(item)
    if group:
        yield group


# -- responses -------------------------------------------------------------------------------------
def _services() -> Services:
    return current_app.extensions["gateway"]  # type: ignore[no-any-return]


def _base() -> str:
    return service_base()


def _instance_url(item: Located) -> str:
    return (f"{_base()}/studies/{item.study_uid}/series/{item.series_uid}"
            f"/instances/{item.sop_uid}")


def not_acceptable(message: str, offered: Iterable[str]) -> Response:
    """406 with what the client could ask for instead (PS3.18 §8.7.5)."""
    response = jsonify({"status": 406, "error": message, "offered": list(offered),
                        "accept": request.args.get("accept") or request.headers.get("Accept",
                                                                                    "")})
    response.status_code = 406
    return response


@dataclass
class _Part:
    content_type: str
    location: str | None
    body: Callable[[], Iterable[bytes]]


def _constant(data: bytes) -> Callable[[], list[bytes]]:
    return lambda: [data]


def _multipart(first: _Part, rest: Iterator[_Part | None], boundary: str) -> Iterator[bytes]:
    """RFC 2387 ``multipart/related`` body, produced part by part (a study is never held in
    memory). ``rest`` may yield None for an item that failed after the response started: it is
    left out (and was logged)."""
    def head(part: _Part) -> bytes:
        lines = [f"--{boundary}", f"Content-Type: {part.content_type}"]
        if part.location:
            lines.append(f"Content-Location: {part.location}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    yield head(first)
    yield from first.body()
    yield b"\r\n"
    for part in rest:
        if part is None:
            continue
        yield head(part)
        yield from part.body()
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("latin-1")


def _multipart_response(inner: str, first: _Part, rest: Iterator[_Part | None], *,
                        transfer_syntax: str | None = None, left_out: Sequence[str] = (),
                        location: str | None = None) -> Response:
    boundary = f"wado-{uuid.uuid4().hex}"
    content_type = f'multipart/related; type="{inner}"'
    if transfer_syntax:
        content_type += f"; transfer-syntax={transfer_syntax}"
    content_type += f"; boundary={boundary}"
    # stream_with_context: the parts are produced after the view returned, and use the app.
    response = Response(stream_with_context(_multipart(first, rest, boundary)),
                        status=206 if left_out else 200,
                        content_type=content_type, direct_passthrough=True)
    if location:
        response.headers["Content-Location"] = location
    if left_out:
        response.headers["Warning"] = warning(left_out)
    return response


def warning(left_out: Sequence[str]) -> str:
    """A ``Warning: 299`` header value (RFC 7234 §5.5) naming what a 206 response left out;
    ASCII only, as header values must be."""
    text = "; ".join(left_out)[:2000].replace('"', "'").replace("\r", " ").replace("\n", " ")
    text = text.encode("ascii", "replace").decode("ascii")
    return f'299 imaging-gateway "{len(left_out)} left out: {text}"'


def _uids(*pairs: tuple[str, str | None]) -> Response | None:
    for name, uid in pairs:
        if uid is not None and not is_valid_uid(uid):
            return problem(400, f"{name} in the URL is not a valid UID: {uid[:80]!r}")
    return None


def _locate(study_uid: str, series_uid: str | None = None,
            sop_uid: str | None = None) -> list[Located] | Response:
    bad = _uids(("Study Instance UID", study_uid), ("Series Instance UID", series_uid),
                ("SOP Instance UID", sop_uid))
    if bad is not None:
        return bad
    items = retrieve.locate(_services().index, study_uid, series_uid, sop_uid,
                            where=request_scope())
    if not items:
        what = (f"SOP Instance {sop_uid}" if sop_uid else f"Series {series_uid}" if series_uid
                else f"Study {study_uid}")
        return problem(404, f"{what} is not stored here" + (
            f" (in study {study_uid}" + (f", series {series_uid})" if series_uid else ")")
            if sop_uid or series_uid else ""))
    return items


def _resource_url(study_uid: str, series_uid: str | None, sop_uid: str | None) -> str:
    url = f"{_base()}/studies/{study_uid}"
    if series_uid:
        url += f"/series/{series_uid}"
    if sop_uid:
        url += f"/instances/{sop_uid}"
    return url


# -- retrieve instances -----------------------------------------------------------------------
def _resolve(syntax: str, item: Located) -> str:
    """A requested transfer syntax for ``item``: the default is Explicit VR Little Endian,
    unless the pixel data is only available lossy compressed (PS3.18 §8.7.3)."""
    if syntax != DEFAULT:
        return syntax
    if item.is_image and item.transfer_syntax_uid in retrieve.LOSSY_SYNTAXES:
        return item.transfer_syntax_uid
    return EXPLICIT_VR_LITTLE_ENDIAN


def _choose(item: Located, groups: list[list[str]]) -> str | None:
    for group in groups:
        chosen = retrieve.select_transfer_syntax(
            item.transfer_syntax_uid, [_resolve(s, item) for s in group],
            has_pixels=item.is_image, excluded=WEB_EXCLUDED)
        if chosen is not None:
            return chosen
    return None


def _instance_groups(wanted: list[Wanted], single: bool) -> tuple[list[list[str]], bool]:
    """Acceptable transfer syntaxes per q-group for ``application/dicom`` and whether the
    client takes multipart (else single part, only for one instance)."""
    groups: list[list[str]] = []
    multipart = False
    for group in _groups(wanted):
        syntaxes = []
        for w in group:
            if not _matches(w.media_type, DICOM):
                continue
            if w.multipart is False and not (single and w.media_type == DICOM):
                continue
            multipart = multipart or w.multipart is not False
            syntaxes.append(w.transfer_syntax or DEFAULT)
        if syntaxes:
            groups.append(syntaxes)
    return groups, multipart


def _retrieve(study_uid: str, series_uid: str | None = None,
              sop_uid: str | None = None) -> Response:
    located = _locate(study_uid, series_uid, sop_uid)
    if isinstance(located, Response):
        return located
    groups, multipart = _instance_groups(_accept(), single=sop_uid is not None)
    if not groups:
        return not_acceptable("instances are offered as multipart/related; "
                              'type="application/dicom"', _dicom_offers(located[0]))
    services = _services()
    chosen: list[tuple[Located, str]] = []
    left_out: list[str] = []
    for item in located:
        syntax = _choose(item, groups)
        if syntax is None:
            left_out.append(f"{item.sop_uid}: not available in an acceptable transfer syntax")
        elif not _exists(item):  # checked now, so that the status can say so
            log.error("WADO-RS: SOP Instance %s is indexed but its stored file is missing",
                      item.sop_uid)
            left_out.append(f"{item.sop_uid}: stored file missing")
        else:
            chosen.append((item, syntax))
    if not chosen and any(text.endswith("stored file missing") for text in left_out):
        return problem(500, "the stored files of the requested instances are missing (index "
                            "and storage disagree; `imaging-gateway reindex` rebuilds the "
                            "index from storage): " + "; ".join(left_out)[:1000])
    if not chosen:
        return not_acceptable("no acceptable transfer syntax for "
                              f"{'this instance' if sop_uid else 'any instance'}",
                              _dicom_offers(located[0]))
    first: retrieve.Part10 | None = None
    while chosen and first is None:  # prepare the first part now: its errors get a status
        item, syntax = chosen.pop(0)
        try:
            first = retrieve.prepare(services.storage, item, syntax)
        except InstanceMissing as exc:
            log.error("WADO-RS: %s", exc)
            left_out.append(f"{item.sop_uid}: stored file missing")
        except TranscodeError as exc:
            log.warning("WADO-RS: %s", exc)
            left_out.append(f"{item.sop_uid}: {exc}")
            if sop_uid:
                return not_acceptable(str(exc), _dicom_offers(item, transcode=False))
    if first is None:
        return problem(500, "the stored files of the requested instances are missing (index "
                            "and storage disagree; see the gateway log): "
                            + "; ".join(left_out)[:1000])
    syntaxes = {first.transfer_syntax, *(s for _, s in chosen)}
    if not multipart:  # single part application/dicom: one instance
        return Response(first.chunks(), content_type=DICOM, direct_passthrough=True,
                        headers={"Content-Location": _instance_url(first.item)})

    def part(prepared: retrieve.Part10) -> _Part:
        return _Part(f"{DICOM}; transfer-syntax={prepared.transfer_syntax}",
                     _instance_url(prepared.item), prepared.chunks)

    def rest() -> Iterator[_Part | None]:
        for item, syntax in chosen:
            try:
                yield part(retrieve.prepare(services.storage, item, syntax))
            except RetrieveError as exc:
                log.error("WADO-RS: SOP Instance %s left out of the response: %s",
                          item.sop_uid, exc)
                yield None

    return _multipart_response(DICOM, part(first), rest(),
                               transfer_syntax=syntaxes.pop() if len(syntaxes) == 1 else None,
                               left_out=left_out,
                               location=_resource_url(study_uid, series_uid, sop_uid))


def _dicom_offers(item: Located, *, transcode: bool = True) -> list[str]:
    syntaxes = (retrieve.offered_syntaxes(item.transfer_syntax_uid, has_pixels=item.is_image,
                                          excluded=WEB_EXCLUDED)
                if transcode else [item.transfer_syntax_uid])
    return [f'multipart/related; type="{DICOM}"; transfer-syntax={s}' for s in syntaxes]


@bp.get("/studies/<study_uid>")
def retrieve_study(study_uid: str) -> Response:
    """Retrieve Study (PS3.18 §10.4.1.1.1)."""
    return _retrieve(study_uid)


@bp.get("/studies/<study_uid>/series/<series_uid>")
def retrieve_series(study_uid: str, series_uid: str) -> Response:
    """Retrieve Series (PS3.18 §10.4.1.1.1)."""
    return _retrieve(study_uid, series_uid)


@bp.get("/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>")
def retrieve_instance(study_uid: str, series_uid: str, sop_uid: str) -> Response:
    """Retrieve Instance (PS3.18 §10.4.1.1.1)."""
    return _retrieve(study_uid, series_uid, sop_uid)


# -- metadata --------------------------------------------------------------------------------------
def _metadata(study_uid: str, series_uid: str | None = None,
              sop_uid: str | None = None) -> Response:
    located = _locate(study_uid, series_uid, sop_uid)
    if isinstance(located, Response):
        return located
    wanted = _accept()
    if not any(w.multipart is not True and (_matches(w.media_type, DICOM_JSON)
                                            or w.media_type == "application/json")
               for w in wanted):
        return not_acceptable("metadata is offered as application/dicom+json",
                              [DICOM_JSON, "application/json"])
    services = _services()
    present = [item for item in located if _exists(item)]
    left_out = [f"{item.sop_uid}: stored file missing" for item in located
                if item not in present]
    for text in left_out:
        log.error("WADO-RS metadata: %s", text)
    if not present:
        return problem(500, "the stored files of the requested instances are missing (index "
                            "and storage disagree): " + "; ".join(left_out)[:1000])

    def body() -> Iterator[bytes]:
        yield b"["
        first = True
        for item in present:
            try:
                obj = retrieve.metadata(services.storage, item,
                                        _prefixer(_instance_url(item) + "/bulkdata/"))
            except RetrieveError as exc:
                log.error("WADO-RS metadata: SOP Instance %s left out: %s", item.sop_uid, exc)
                continue
            yield (b"" if first else b",") + json.dumps(obj).encode("utf-8")
            first = False
        yield b"]"

    response = Response(stream_with_context(body()), status=206 if left_out else 200,
                        content_type=DICOM_JSON,
                        direct_passthrough=True)
    response.headers["Content-Location"] = _resource_url(study_uid, series_uid, sop_uid) \
        + "/metadata"
    if left_out:
        response.headers["Warning"] = warning(left_out)
    return response


def _prefixer(prefix: str) -> Callable[[str], str]:
    return lambda path: prefix + path


def _exists(item: Located) -> bool:
    try:
        retrieve.blob_path(_services().storage, item)
    except InstanceMissing:
        return False
    return True


@bp.get("/studies/<study_uid>/metadata")
def study_metadata(study_uid: str) -> Response:
    """Retrieve Study Metadata (PS3.18 §10.4.1.1.2, Annex F)."""
    return _metadata(study_uid)


@bp.get("/studies/<study_uid>/series/<series_uid>/metadata")
def series_metadata(study_uid: str, series_uid: str) -> Response:
    """Retrieve Series Metadata (PS3.18 §10.4.1.1.2, Annex F)."""
    return _metadata(study_uid, series_uid)


@bp.get("/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>/metadata")
def instance_metadata(study_uid: str, series_uid: str, sop_uid: str) -> Response:
    """Retrieve Instance Metadata (PS3.18 §10.4.1.1.2, Annex F)."""
    return _metadata(study_uid, series_uid, sop_uid)


# -- frames and bulk data --------------------------------------------------------------------------
_FRAME_LIST_RE = re.compile(r"^[0-9]{1,9}(,[0-9]{1,9})*$")


def parse_frame_list(text: str) -> list[int]:
    """``"1,3,5"`` → [1, 3, 5] (PS3.18 §10.4.1.1.4: frames numbered from 1); ValueError."""
    if not _FRAME_LIST_RE.match(text):
        raise ValueError(f"frame list must be comma-separated frame numbers: {text[:80]!r}")
    numbers = [int(n) for n in text.split(",")]
    if 0 in numbers:
        raise ValueError("frames are numbered from 1")
    return numbers


def _pixel_representation(info: retrieve.PixelInfo, item: Located,
                          wanted: list[Wanted]) -> str | None:
    """``"native"`` (octet-stream, Explicit VR Little Endian), ``"stored"`` (the stored code
    streams in their image media type), or None: nothing acceptable."""
    stored_type = FRAME_MEDIA_TYPES.get(info.transfer_syntax) if info.encapsulated else None
    native_ok = not info.encapsulated or retrieve.can_decode(info.transfer_syntax)
    for w in wanted:
        if w.multipart is False and w.media_type != "*/*":
            continue  # frames and bulk data are multipart (PS3.18 §8.6.1)
        syntax = w.transfer_syntax
        if syntax == "*":  # "any": the stored form
            if stored_type and (_matches(w.media_type, stored_type)
                                or w.media_type == OCTET_STREAM):
                return "stored"
            if _matches(w.media_type, OCTET_STREAM) and native_ok:
                return "native"
            continue
        if stored_type and w.media_type != "*/*" and _matches(w.media_type, stored_type) \
                and syntax in (None, info.transfer_syntax):
            return "stored"
        if _matches(w.media_type, OCTET_STREAM) and syntax in (None, EXPLICIT_VR_LITTLE_ENDIAN):
            if w.media_type == "*/*" and stored_type and syntax is None \
                    and info.transfer_syntax in retrieve.LOSSY_SYNTAXES:
                return "stored"  # default for data only available lossy (PS3.18 §8.7.3)
            if native_ok:
                return "native"
            if w.media_type == "*/*" and stored_type:
                return "stored"
    return None


def _pixel_offers(info: retrieve.PixelInfo) -> list[str]:
    offers = []
    if not info.encapsulated or retrieve.can_decode(info.transfer_syntax):
        offers.append(f'multipart/related; type="{OCTET_STREAM}"; '
                      f"transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}")
    stored_type = FRAME_MEDIA_TYPES.get(info.transfer_syntax)
    if info.encapsulated and stored_type:
        offers.append(f'multipart/related; type="{stored_type}"; '
                      f"transfer-syntax={info.transfer_syntax}")
    return offers


def _pixel_response(item: Located, info: retrieve.PixelInfo, numbers: list[int], *,
                    whole: bool) -> Response:
    """Frames (``whole`` False: one part per frame) or the Pixel Data bulk data (``whole``:
    native → one part, stored compressed → one part per frame)."""
    storage = _services().storage
    representation = _pixel_representation(info, item, _accept())
    if representation is None:
        return not_acceptable("pixel data is not available in an acceptable media type",
                              _pixel_offers(info))
    base = _instance_url(item)
    if representation == "stored":
        media = FRAME_MEDIA_TYPES.get(info.transfer_syntax, OCTET_STREAM)
        chunks = retrieve.compressed_frames(storage, item, info, numbers)
        content_type = f"{media}; transfer-syntax={info.transfer_syntax}"
        syntax = info.transfer_syntax
    else:
        media, syntax = OCTET_STREAM, EXPLICIT_VR_LITTLE_ENDIAN
        chunks = retrieve.native_frames(storage, item, info, numbers)
        content_type = f"{OCTET_STREAM}; transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}"
    try:
        first = next(chunks)  # decode the first now: a failure still gets a status
    except TranscodeError as exc:
        log.warning("WADO-RS frames: %s", exc)
        return not_acceptable(str(exc), [o for o in _pixel_offers(info)
                                         if OCTET_STREAM not in o])
    except (InstanceMissing, retrieve.MalformedPixelData) as exc:
        log.error("WADO-RS: SOP Instance %s: %s", item.sop_uid, exc)
        return problem(500, str(exc))
    if whole and representation == "native":  # one part: the frames one after the other
        return _multipart_response(media, _Part(content_type, f"{base}/bulkdata/7FE00010",
                                                lambda: itertools.chain([first], chunks)),
                                   iter(()), transfer_syntax=syntax)
    location = f"{base}/frames/"

    def rest() -> Iterator[_Part | None]:
        for number, data in zip(numbers[1:], chunks, strict=False):
            yield _Part(content_type, f"{location}{number}", _constant(data))

    return _multipart_response(media, _Part(content_type, f"{location}{numbers[0]}",
                                            lambda: [first]), rest(), transfer_syntax=syntax)


def _instance_pixels(study_uid: str, series_uid: str,
                     sop_uid: str) -> tuple[Located, retrieve.PixelInfo] | Response:
    located = _locate(study_uid, series_uid, sop_uid)
    if isinstance(located, Response):
        return located
    item = located[0]
    try:
        info = retrieve.pixel_info(_services().storage, item)
    except (InstanceMissing, retrieve.MalformedPixelData) as exc:
        log.error("WADO-RS: SOP Instance %s: %s", sop_uid, exc)
        return problem(500, str(exc))
    if info is None:
        return problem(404, f"SOP Instance {sop_uid} has no pixel data")
    return item, info


@bp.get("/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>/frames/<frame_list>")
def retrieve_frames(study_uid: str, series_uid: str, sop_uid: str, frame_list: str) -> Response:
    """Retrieve Frames (PS3.18 §10.4.1.1.4): native pixels or the stored code streams."""
    try:
        numbers = parse_frame_list(frame_list)
    except ValueError as exc:
        return problem(400, str(exc))
    found = _instance_pixels(study_uid, series_uid, sop_uid)
    if isinstance(found, Response):
        return found
    item, info = found
    missing = [n for n in numbers if n > info.frames]
    if missing:
        return problem(404, f"frame {missing[0]} does not exist: the instance has "
                            f"{info.frames} frame{'s' if info.frames != 1 else ''}")
    return _pixel_response(item, info, numbers, whole=False)


@bp.get("/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>/bulkdata/"
        "<path:tag_path>")
def retrieve_bulkdata(study_uid: str, series_uid: str, sop_uid: str, tag_path: str) -> Response:
    """Retrieve Bulkdata (PS3.18 §10.4.1.1.5): the target of a BulkDataURI from /metadata."""
    try:
        path = retrieve.parse_tag_path(tag_path.upper())
    except ValueError as exc:
        return problem(400, str(exc))
    if len(path) == 1 and path[0] == 0x7FE00010:
        found = _instance_pixels(study_uid, series_uid, sop_uid)
        if isinstance(found, Response):
            return found
        item, info = found
        return _pixel_response(item, info, list(range(1, info.frames + 1)), whole=True)
    located = _locate(study_uid, series_uid, sop_uid)
    if isinstance(located, Response):
        return located
    item = located[0]
    if not any(w.multipart is not False and _matches(w.media_type, OCTET_STREAM)
               for w in _accept()):
        return not_acceptable("bulk data is offered as multipart/related; "
                              f'type="{OCTET_STREAM}"', [f'multipart/related; '
                                                         f'type="{OCTET_STREAM}"'])
    try:
        found_value = retrieve.element_value(_services().storage, item, path)
    except InstanceMissing as exc:
        log.error("WADO-RS: %s", exc)
        return problem(500, str(exc))
    if found_value is None:
        return problem(404, f"SOP Instance {sop_uid} has no bulk data element at {tag_path}")
    data = found_value[1]
    return _multipart_response(OCTET_STREAM, _Part(
        f"{OCTET_STREAM}; transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}",
        f"{_instance_url(item)}/bulkdata/{tag_path.upper()}", lambda: [data]), iter(()),
        transfer_syntax=EXPLICIT_VR_LITTLE_ENDIAN)


# -- rendered and thumbnail ------------------------------------------------------------------------
def _render_options(*, thumbnail: bool) -> render.RenderOptions | Response:
    """PS3.18 §8.3.5.1 parameters ``window``, ``viewport``, ``quality`` (``annotation`` and
    ``iccprofile`` are accepted and not applied)."""
    args = request.args
    try:
        window = render.parse_window(args["window"]) if "window" in args else None
        viewport = render.parse_viewport(args["viewport"]) if "viewport" in args else None
        quality = render.parse_quality(args["quality"]) if "quality" in args else None
    except ValueError as exc:
        return problem(400, str(exc))
    if viewport is None and thumbnail:
        viewport = render.Viewport(render.THUMBNAIL_SIZE, render.THUMBNAIL_SIZE)
    return render.RenderOptions(quality=quality, viewport=viewport, window=window)


def _rendered_type(wanted: list[Wanted], *, many: bool) -> tuple[str, bool] | None:
    """(image media type, multipart?) for a rendered response, or None (406)."""
    for w in wanted:
        if w.multipart is False and many:
            continue
        for media in render.MEDIA_TYPES:  # image/jpeg first: the default (§8.7.4)
            if _matches(w.media_type, media):
                return media, many or w.multipart is True
    return None


def _render_one(item: Located, number: int, options: render.RenderOptions) -> bytes:
    storage = _services().storage
    header = retrieve.read_dataset(storage, item, stop_before_pixels=True)
    return render.render(retrieve.frame_array(storage, item, number), header, options)


def _rendered(targets: list[tuple[Located, int]], options: render.RenderOptions, *,
              many: bool, location: str) -> Response:
    if not targets:
        return problem(404, "nothing to render: no instance with pixel data")
    chosen = _rendered_type(_accept(), many=many)
    if chosen is None:
        offers = ([f'multipart/related; type="{m}"' for m in render.MEDIA_TYPES] if many
                  else list(render.MEDIA_TYPES))
        return not_acceptable("rendered images are offered as " + ", ".join(offers), offers)
    media, multipart = chosen
    options = render.RenderOptions(media, options.quality, options.viewport, options.window,
                                   options.region)
    try:
        first = _render_one(*targets[0], options)
    except InstanceMissing as exc:
        log.error("WADO-RS rendered: %s", exc)
        return problem(500, str(exc))
    except (TranscodeError, ValueError) as exc:
        log.warning("WADO-RS rendered: %s", exc)
        return not_acceptable(f"cannot render SOP Instance {targets[0][0].sop_uid}: {exc}", [])
    if not multipart:
        return Response(first, content_type=media, headers={"Content-Location": location})

    def part_location(item: Located, number: int) -> str:
        return f"{_instance_url(item)}/frames/{number}/rendered"

    def rest() -> Iterator[_Part | None]:
        for item, number in targets[1:]:
            try:
                data = _render_one(item, number, options)
            except (RetrieveError, ValueError) as exc:
                log.error("WADO-RS rendered: SOP Instance %s frame %d left out: %s",
                          item.sop_uid, number, exc)
                yield None
                continue
            yield _Part(media, part_location(item, number), _constant(data))

    return _multipart_response(media, _Part(media, part_location(*targets[0]), lambda: [first]),
                               rest(), location=location)


def _render_targets(study_uid: str, series_uid: str | None, sop_uid: str | None,
                    frame_list: str | None) -> list[tuple[Located, int]] | Response:
    numbers = [1]
    if frame_list is not None:
        try:
            numbers = parse_frame_list(frame_list)
        except ValueError as exc:
            return problem(400, str(exc))
    located = _locate(study_uid, series_uid, sop_uid)
    if isinstance(located, Response):
        return located
    images = [item for item in located if item.is_image]
    if sop_uid is not None and frame_list is not None and images:
        frames = images[0].number_of_frames or 1
        missing = [n for n in numbers if n > frames]
        if missing:
            return problem(404, f"frame {missing[0]} does not exist: the instance has "
                                f"{frames} frame{'s' if frames != 1 else ''}")
        return [(images[0], n) for n in numbers]
    return [(item, 1) for item in images]


def _rendered_route(study_uid: str, series_uid: str | None = None, sop_uid: str | None = None,
                    frame_list: str | None = None, *, thumbnail: bool = False) -> Response:
    options = _render_options(thumbnail=thumbnail)
    if isinstance(options, Response):
        return options
    targets = _render_targets(study_uid, series_uid, sop_uid, frame_list)
    if isinstance(targets, Response):
        return targets
    location = request.base_url
    if thumbnail:  # one representative image: the middle image of the first series
        if targets:
            first_series = [t for t in targets if t[0].series_uid == targets[0][0].series_uid]
            targets = [first_series[(len(first_series) - 1) // 2]]
        return _rendered(targets, options, many=False, location=location)
    many = sop_uid is None or len(targets) > 1
    return _rendered(targets, options, many=many, location=location)


@bp.get("/studies/<study_uid>/rendered")
@bp.get("/studies/<study_uid>/series/<series_uid>/rendered")
@bp.get("/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>/rendered")
@bp.get("/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>/frames/<frame_list>"
        "/rendered")
def retrieve_rendered(study_uid: str, series_uid: str | None = None, sop_uid: str | None = None,
                      frame_list: str | None = None) -> Response:
    """Retrieve Rendered (PS3.18 §10.4.1.1.3): an instance or frame as one image; a study,
    a series or several frames as multipart/related, one image per instance (its first
    frame) or frame."""
    return _rendered_route(study_uid, series_uid, sop_uid, frame_list)


@bp.get("/studies/<study_uid>/thumbnail")
@bp.get("/studies/<study_uid>/series/<series_uid>/thumbnail")
@bp.get("/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>/thumbnail")
@bp.get("/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>/frames/<frame_list>"
        "/thumbnail")
def retrieve_thumbnail(study_uid: str, series_uid: str | None = None, sop_uid: str | None = None,
                       frame_list: str | None = None) -> Response:
    """Retrieve Thumbnail (PS3.18 §10.4.1.1.6): one small representative image (viewport
    128×128 unless given)."""
    return _rendered_route(study_uid, series_uid, sop_uid, frame_list, thumbnail=True)
