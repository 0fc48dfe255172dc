"""QIDO-RS (PS3.18 §10.6) under ``/dicomweb``: the six search resources. Translation only.

Query parameters become a :class:`gateway.query.Query` (the same engine C-FIND uses); the
matches come back as DICOM JSON (PS3.18 Annex F, ``application/dicom+json``) with the return
attributes PS3.18 Table 10.6.3-3 (study), 10.6.3-4 (series) and 10.6.3-5 (instance) require,
plus those matched on or named by ``includefield``.

Values: UIDs and code strings may list several values separated by ``,`` (or ``\\``);
dates/times take ranges ``a-b``; ``*``/``?`` are wildcards; ``fuzzymatching=true`` widens
person-name matching (see :mod:`gateway.query`). Paging: ``limit``/``offset``; without a limit,
at most ``http.qido_max_results`` matches are returned, and a ``Warning`` header says when an
answer was cut (PS3.18 §8.3.4.4 / §10.6.3.2).

Answers are DICOM JSON, or ``multipart/related; type="application/dicom+xml"`` (PS3.19 Native
DICOM Model, one part per match) when the Accept header prefers it.

Errors are 400 with a message naming the parameter; nothing is ever answered as an empty list
because a parameter was not understood.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable
from typing import Any

from flask import Response, current_app, request
from sqlalchemy import and_

from gateway.cohort import CohortError
from gateway.dicom_xml import to_xml
from gateway.dicomweb import DICOM_JSON, bp, problem, request_scope, service_base
from gateway.query import (
    Query,
    QueryError,
    Result,
    attributes_at,
    conditions_from_pairs,
    keyword_of,
    run,
    to_dicom_json,
    vr_of,
)
from gateway.storage import is_valid_uid

log = logging.getLogger("gateway.qido")

#: PS3.18 Table 10.6.3-3 (+ Study Description, which every viewer shows).
STUDY_RETURN = ("StudyDate", "StudyTime", "AccessionNumber", "InstanceAvailability",
                "ModalitiesInStudy", "ReferringPhysicianName", "TimezoneOffsetFromUTC",
                "RetrieveURL", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                "StudyInstanceUID", "StudyID", "NumberOfStudyRelatedSeries",
                "NumberOfStudyRelatedInstances", "StudyDescription")
#: PS3.18 Table 10.6.3-4.
SERIES_RETURN = ("Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber",
                 "NumberOfSeriesRelatedInstances", "PerformedProcedureStepStartDate",
                 "PerformedProcedureStepStartTime", "RequestAttributesSequence", "RetrieveURL",
                 "TimezoneOffsetFromUTC")
#: PS3.18 Table 10.6.3-5.
INSTANCE_RETURN = ("SOPClassUID", "SOPInstanceUID", "InstanceAvailability",
                   "TimezoneOffsetFromUTC", "RetrieveURL", "InstanceNumber", "Rows", "Columns",
                   "BitsAllocated", "NumberOfFrames")
#: The gateway's QIDO-RS extension: a FHIR search (``Patient?birthdate=le1980-01-01``,
#: ``Condition?code=…``) whose patients the answer is limited to, as an unsaved cohort.
FHIR_CRITERIA = "fhir-criteria"
#: Query parameters that are not attribute keys (PS3.18 Table 8.3.4-1).
_CONTROL = {"includefield", "fuzzymatching", "limit", "offset", "emptyvaluematching",
            "multiplevaluematching", FHIR_CRITERIA}
_LISTS = {"UI", "CS"}
DICOM_XML = "application/dicom+xml"


def _services() -> Any:
    return current_app.extensions["gateway"]


def _warning(text: str) -> str:
    return f'299 {request.host} "{text}"'


class _BadRequest(Exception):
    pass


#: The largest ``limit`` or ``offset`` taken (the database's integers end not far above).
_LARGEST_PAGE_NUMBER = 2**31 - 1


def _integer(name: str, default: int | None) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= _LARGEST_PAGE_NUMBER:
        raise _BadRequest(f"{name} must be an integer from 0 to {_LARGEST_PAGE_NUMBER}, "
                          f"not {raw!r}")
    return value


def _pairs(path_uids: dict[str, str]) -> list[tuple[str, list[str]]]:
    """(name, values) for every attribute parameter, path UIDs first."""
    pairs: list[tuple[str, list[str]]] = [(k, [v]) for k, v in path_uids.items()]
    seen: set[str] = set(path_uids)
    for name in request.args:
        if name.lower() in _CONTROL or name in _CONTROL:
            continue
        values = request.args.getlist(name)
        if len(values) > 1 or name in seen:
            raise _BadRequest(f"{name} is given more than once (PS3.18 §8.3.4.1: each "
                              "attribute at most once; list UIDs separated by commas)")
        seen.add(name)
        value = values[0]
        leaf = name.split(".")[-1]
        vr = vr_of(keyword_of(leaf)) if leaf else ""
        if vr in _LISTS:
            pairs.append((name, [v for v in value.replace("\\", ",").split(",")]))
        else:
            pairs.append((name, [value]))
    return pairs


def _includes(level: str) -> tuple[list[str], bool, list[str]]:
    """Keywords named by ``includefield``, whether ``all`` was asked, and names the index
    cannot return."""
    names: list[str] = []
    include_all = False
    for raw in request.args.getlist("includefield"):
        for name in raw.split(","):
            name = name.strip()
            if not name:
                continue
            if name.lower() == "all":
                include_all = True
            else:
                names.append(keyword_of(name.split(".")[0]))
    available = set(attributes_at(level))
    missing = [n for n in names if n not in available and n != "RetrieveURL"]
    return [n for n in names if n not in missing], include_all, missing


def _search(level: str, returned: Iterable[str], path_uids: dict[str, str]) -> Response:
    if _representation() is None:
        return _not_acceptable()
    services = _services()
    for name, uid in path_uids.items():
        if not is_valid_uid(uid):
            return problem(400, f"{name} in the path is not a valid UID: {uid[:80]!r}")
    try:
        limit = _integer("limit", None)
        offset = _integer("offset", 0) or 0
        conditions = conditions_from_pairs(_pairs(path_uids))
        includes, include_all, missing = _includes(level)
    except (_BadRequest, QueryError) as exc:
        return problem(400, str(exc))
    ceiling = services.settings.http["qido_max_results"]
    fuzzy = request.args.get("fuzzymatching", "false").lower() == "true"
    scope = request_scope()
    criteria = request.args.get(FHIR_CRITERIA)
    if criteria:
        try:
            adhoc = services.cohorts.adhoc_scope(criteria)
        except CohortError as exc:
            return cohort_problem(exc)
        scope = adhoc if scope is None else and_(scope, adhoc)
    query = Query(level, conditions, fuzzy=fuzzy,
                  limit=min(limit, ceiling) if limit is not None else ceiling,
                  offset=offset, scope=scope)
    try:
        result: Result = run(services.index, query)
    except QueryError as exc:
        return problem(400, str(exc))
    keywords = list(dict.fromkeys([
        *returned, *(c.keyword for c in conditions), *includes,
        *(attributes_at(level) if include_all else ())]))
    base = service_base()
    body = []
    for match in result.matches:
        match.values["RetrieveURL"] = _retrieve_url(base, level, match.values)
        body.append(to_dicom_json(match, keywords))
    if _representation() == "xml":
        response = _xml_parts(body)
    else:
        response = Response(json.dumps(body, ensure_ascii=False), status=200,
                            content_type=DICOM_JSON)
    warnings = []
    if result.more:
        warnings.append(_warning("The number of results exceeded the maximum supported by the "
                                 "server. Additional results can be requested."))
    for name in (*missing, *result.unsupported):
        warnings.append(_warning(f"{name} is not kept in the index; it is not returned"))
    for flag in ("emptyvaluematching", "multiplevaluematching"):
        if request.args.get(flag, "false").lower() == "true":
            warnings.append(_warning(f"{flag} is not supported; it was ignored"))
    if warnings:
        response.headers["Warning"] = ", ".join(warnings)
    return response


def cohort_problem(exc: CohortError) -> Response:
    """A cohort or FHIR-criterion failure, with the FHIR server's OperationOutcome."""
    response = problem(exc.status, str(exc))
    if exc.outcome is not None:
        payload = response.get_json()
        payload["outcome"] = exc.outcome
        response.set_data(json.dumps(payload))
    return response


def _retrieve_url(base: str, level: str, values: dict[str, Any]) -> str:
    """Retrieve URL (0008,1190): the WADO-RS resource of this match (PS3.18 §10.6.3.3)."""
    url = f"{base}/studies/{values['StudyInstanceUID']}"
    if level in {"SERIES", "IMAGE"}:
        url += f"/series/{values['SeriesInstanceUID']}"
    if level == "IMAGE":
        url += f"/instances/{values['SOPInstanceUID']}"
    return url


def _representation() -> str | None:
    """``json`` or ``xml`` (PS3.18 §8.7.5: DICOM JSON, or ``multipart/related;
    type="application/dicom+xml"``), as the Accept header prefers; None if neither."""
    ranges = []
    for position, item in enumerate((request.headers.get("Accept") or "*/*").split(",")):
        media, _, rest = item.strip().partition(";")
        params = dict(p.strip().partition("=")[::2] for p in rest.split(";") if "=" in p)
        try:
            q = float(params.get("q", "1"))
        except ValueError:
            q = 1.0
        ranges.append((-q, position, media.strip().lower(),
                       params.get("type", "").strip('"').lower()))
    for _q, _position, media, kind in sorted(ranges):
        if media in (DICOM_JSON, "application/json", "application/*", "*/*"):
            return "json"
        if media == DICOM_XML or (media == "multipart/related" and kind == DICOM_XML):
            return "xml"
    return None


def _not_acceptable() -> Response:
    return problem(406, f"QIDO-RS answers {DICOM_JSON} or multipart/related; "
                        f'type="{DICOM_XML}"; the request accepts only '
                        f"{request.headers.get('Accept')!r}")


def _xml_parts(body: list[dict[str, Any]]) -> Response:
    """PS3.18 §8.7.5: one ``application/dicom+xml`` part per match."""
    boundary = uuid.uuid4().hex
    chunks = []
    for dataset in body:
        chunks.append(f"--{boundary}\r\nContent-Type: {DICOM_XML}\r\n\r\n".encode())
        chunks.append(to_xml(dataset))
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return Response(b"".join(chunks), status=200, content_type=(
        f'multipart/related; type="{DICOM_XML}"; boundary={boundary}'))


@bp.get("/studies")
def search_studies() -> Response:
    return _search("STUDY", STUDY_RETURN, {})


@bp.get("/series")
def search_all_series() -> Response:
    return _search("SERIES", (*STUDY_RETURN, *SERIES_RETURN), {})


@bp.get("/studies/<study>/series")
def search_study_series(study: str) -> Response:
    return _search("SERIES", SERIES_RETURN, {"StudyInstanceUID": study})


@bp.get("/instances")
def search_all_instances() -> Response:
    return _search(
        "IMAGE", (*STUDY_RETURN, *SERIES_RETURN, *INSTANCE_RETURN), {})


@bp.get("/studies/<study>/instances")
def search_study_instances(study: str) -> Response:
    return _search("IMAGE", (*SERIES_RETURN, *INSTANCE_RETURN),
                                      {"StudyInstanceUID": study})


@bp.get("/studies/<study>/series/<series>/instances")
def search_series_instances(study: str, series: str) -> Response:
    return _search("IMAGE", INSTANCE_RETURN,
                                      {"StudyInstanceUID": study, "SeriesInstanceUID": series})
