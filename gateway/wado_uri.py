"""WADO-URI (PS3.18 chapter 9): ``GET /wado?requestType=WADO&studyUID=…&seriesUID=…&objectUID=…``,
answered as ``application/dicom`` (with ``transferSyntax``) or a rendered image. Translation
only; the retrieval and rendering are the WADO-RS ones (:mod:`gateway.wado`)."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, request
from werkzeug.http import parse_options_header

from gateway import render, retrieve
from gateway.dicomweb import problem
from gateway.errors import InstanceMissing, TranscodeError
from gateway.retrieve import Located
from gateway.storage import is_valid_uid
from gateway.wado import (
    DEFAULT,
    DICOM,
    WEB_EXCLUDED,
    _instance_url,
    _locate,
    _matches,
    _render_one,
    _resolve,
    _services,
    _split_ranges,
    not_acceptable,
    parse_accept,
)

log = logging.getLogger("gateway.wado_uri")

#: Registered at the top level (``/wado``) where viewers expect it.
uri_bp = Blueprint("wado_uri", __name__)


# -- WADO-URI -----------------------------------------------------------------------------------
_URI_REFUSED = {
    "anonymize": "de-identification on retrieval (anonymize) is not supported",
    "presentationUID": "presentation states are not applied (presentationUID)",
    "presentationSeriesUID": "presentation states are not applied (presentationSeriesUID)",
}


def _uri_int(name: str, minimum: int = 1) -> int | None:
    text = request.args.get(name)
    if text is None:
        return None
    if not text.strip().isdigit() or len(text.strip()) > 9 or int(text) < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {text[:40]!r}")
    return int(text)


def _uri_content_types(item: Located) -> list[tuple[str, dict[str, str]]]:
    """The requested contentType list (PS3.18 §9.1.2.1.2), or the default: image/jpeg for a
    single-frame image, application/dicom otherwise (§9.1.2.1.2 / §7)."""
    text = request.args.get("contentType")
    if not text:
        single = item.is_image and (item.number_of_frames or 1) == 1
        return [("image/jpeg", {}) if single else (DICOM, {})]
    found = []
    for part in _split_ranges(text):
        mimetype, options = parse_options_header(part.strip())
        if mimetype:
            found.append((mimetype.lower(), {k.lower(): v for k, v in options.items()}))
    return found


@uri_bp.get("")
@uri_bp.get("/")
def wado_uri() -> Response:
    """WADO-URI (PS3.18 §9): ``?requestType=WADO&studyUID=…&seriesUID=…&objectUID=…`` with
    ``contentType`` (``application/dicom`` with ``transferSyntax``, or a rendered
    ``image/jpeg``/``png``/``gif`` with ``frameNumber``, ``rows``, ``columns``, ``region``,
    ``windowCenter``/``windowWidth`` and ``imageQuality``)."""
    args = request.args
    if args.get("requestType") != "WADO":
        return problem(400, "requestType=WADO is required (PS3.18 §9.1.2.1.1)")
    uids = {name: args.get(name) for name in ("studyUID", "seriesUID", "objectUID")}
    for name, uid in uids.items():
        if not uid:
            return problem(400, f"{name} is required (PS3.18 §9.1.2.1)")
        if not is_valid_uid(uid):
            return problem(400, f"{name} is not a valid UID: {uid[:80]!r}")
    for name, reason in _URI_REFUSED.items():
        if args.get(name) and not (name == "anonymize" and args[name].lower() == "no"):
            return problem(400, f"{reason}; ask without it")
    located = _locate(str(uids["studyUID"]), uids["seriesUID"], uids["objectUID"])
    if isinstance(located, Response):
        return located
    item = located[0]
    accepted = parse_accept(request.headers.get("Accept"))
    for media, options in _uri_content_types(item):
        if not any(_matches(w.media_type, media) for w in accepted if w.multipart is not True):
            continue
        if media == DICOM:
            return _uri_dicom(item, options.get("transfer-syntax") or args.get("transferSyntax"))
        if media in render.MEDIA_TYPES and item.is_image:
            return _uri_rendered(item, media)
    offered = [DICOM, *(render.MEDIA_TYPES if item.is_image else ())]
    return not_acceptable("none of the requested content types can be returned for this "
                          "object (and allowed by Accept)", offered)


def _uri_dicom(item: Located, requested: str | None) -> Response:
    wanted = requested.strip() if requested else DEFAULT
    if wanted not in (DEFAULT, "*") and not is_valid_uid(wanted):
        return problem(400, f"transferSyntax is not a UID: {wanted[:80]!r}")
    syntax = retrieve.select_transfer_syntax(
        item.transfer_syntax_uid, [_resolve(wanted, item)], has_pixels=item.is_image,
        excluded=WEB_EXCLUDED)
    offers = retrieve.offered_syntaxes(item.transfer_syntax_uid, has_pixels=item.is_image,
                                       excluded=WEB_EXCLUDED)
    if syntax is None:
        return not_acceptable(f"SOP Instance {item.sop_uid} is not available in transfer "
                              f"syntax {wanted}", [f"{DICOM}; transfer-syntax={s}"
                                                   for s in offers])
    try:
        part = retrieve.prepare(_services().storage, item, syntax)
    except InstanceMissing as exc:
        log.error("WADO-URI: %s", exc)
        return problem(500, str(exc))
    except TranscodeError as exc:
        return not_acceptable(str(exc), [f"{DICOM}; transfer-syntax={item.transfer_syntax_uid}"])
    return Response(part.chunks(), content_type=DICOM, direct_passthrough=True,
                    headers={"Content-Location": _instance_url(item)})


def _uri_rendered(item: Located, media: str) -> Response:
    args = request.args
    try:
        frame = _uri_int("frameNumber") or 1
        rows, columns = _uri_int("rows"), _uri_int("columns")
        quality = render.parse_quality(args["imageQuality"]) if "imageQuality" in args else None
        region = render.parse_region(args["region"]) if "region" in args else None
        window = None
        if "windowCenter" in args or "windowWidth" in args:
            if "windowCenter" not in args or "windowWidth" not in args:
                raise ValueError("windowCenter and windowWidth go together")
            window = render.parse_window(f"{args['windowCenter']},{args['windowWidth']}")
    except ValueError as exc:
        return problem(400, str(exc))
    frames = item.number_of_frames or 1
    if frame > frames:
        return problem(404, f"frameNumber {frame} does not exist: the object has {frames} "
                            f"frame{'s' if frames != 1 else ''}")
    viewport = render.Viewport(columns, rows) if rows or columns else None
    options = render.RenderOptions(media, quality, viewport, window, region)
    try:
        data = _render_one(item, frame, options)
    except InstanceMissing as exc:
        log.error("WADO-URI: %s", exc)
        return problem(500, str(exc))
    except (TranscodeError, ValueError) as exc:
        return not_acceptable(f"cannot render SOP Instance {item.sop_uid}: {exc}", [DICOM])
    return Response(data, content_type=media)
