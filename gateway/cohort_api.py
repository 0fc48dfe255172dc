"""``/api/cohorts``: create, read, list, delete and export cohorts (:mod:`gateway.cohort`).
Translation only.

``POST /api/cohorts`` with ``{"name": …, "fhir": "Patient?…", "imaging": {"ModalitiesInStudy":
"CT", "StudyDate": "20240101-"}}`` answers 201 with the cohort: its id, member counts (patients,
studies, series, instances), the DICOMweb base URL scoped to it and the AE title scoped to it.
``GET /api/cohorts/{id}/export?format=json|csv``: per study its UIDs, DICOMweb URL and FHIR
ImagingStudy and Patient references. In the CSV a text that a spreadsheet would run as a
formula (it starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return: a Study
Description comes from whatever the modality sent) starts with an apostrophe, so it shows as
text (OWASP, CSV injection); the JSON has every value as stored. Errors are JSON with the
reason and, when the FHIR server refused the search, its OperationOutcome.

Every answer carries ``Server-Timing`` (:mod:`gateway.timing`): ``fhir`` (time waiting for
the FHIR server, and how many requests), ``index`` (index work) and ``total`` (the request
in the gateway), in milliseconds; ``total − fhir`` is the gateway's own time. ``fhir`` is
absent when the answer needed no FHIR request (members reused from the cache).
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from gateway import timing
from gateway.cohort import CohortError, Definition, ae_title_of, parse_definition

bp = Blueprint("cohorts", __name__)


@bp.before_request
def _start_timing() -> None:
    g.cohort_timing = timing.start()


@bp.after_request
def _server_timing(response: Response) -> Response:
    collected = timing.current()
    if collected is not None:
        response.headers["Server-Timing"] = collected.header()
    return response


@bp.teardown_request
def _stop_timing(_exc: BaseException | None) -> None:
    token = g.pop("cohort_timing", None)
    if token is not None:
        timing.stop(token)


def _services() -> Any:
    return current_app.extensions["gateway"]


def summary(cohort_id: int, definition: Definition) -> dict[str, Any]:
    """The cohort as the API shows it (members evaluated, or reused from the cache)."""
    services = _services()
    members = services.cohorts.members(cohort_id)
    return {
        "id": cohort_id, "name": definition.name, "fhir": definition.fhir_query,
        "imaging": dict(definition.imaging),
        "counts": {"patients": members.patients, "studies": members.studies,
                   "series": members.series, "instances": members.instances},
        "dicomweb": f"{services.settings.public_url}/cohorts/{cohort_id}/dicomweb",
        "ae_title": ae_title_of(services.settings.cohorts["ae_prefix"], cohort_id),
        "export": f"{services.settings.public_url}/api/cohorts/{cohort_id}/export",
    }


def error_response(exc: CohortError) -> Response:
    body: dict[str, Any] = {"status": exc.status, "error": str(exc)}
    if exc.outcome is not None:
        body["outcome"] = exc.outcome
    response = jsonify(body)
    response.status_code = exc.status
    return response


@bp.post("")
def create() -> tuple[Response, int]:
    definition = parse_definition(request.get_json(silent=True))
    cohort_id = _services().cohorts.create(definition)
    return jsonify(summary(cohort_id, definition)), 201


@bp.get("")
def listing() -> Response:
    cohorts = _services().cohorts
    return jsonify([summary(i, cohorts.definition(i)) for i in cohorts.ids()])


@bp.get("/<int:cohort_id>")
def read(cohort_id: int) -> Response:
    return jsonify(summary(cohort_id, _services().cohorts.definition(cohort_id)))


@bp.delete("/<int:cohort_id>")
def remove(cohort_id: int) -> Response:
    _services().cohorts.delete(cohort_id)
    return Response(status=204)


@bp.get("/<int:cohort_id>/export")
def export(cohort_id: int) -> Response:
    services = _services()
    rows = services.cohorts.export_rows(cohort_id, services.settings.dicomweb_url)
    if request.args.get("format", "json").lower() == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else [
            "StudyInstanceUID", "StudyDate", "ModalitiesInStudy", "StudyDescription",
            "PatientID", "IssuerOfPatientID", "dicomweb", "Patient", "ImagingStudy"])
        writer.writeheader()
        writer.writerows({key: _as_text(value) for key, value in row.items()} for row in rows)
        return Response(out.getvalue(), content_type="text/csv; charset=utf-8", headers={
            "Content-Disposition": f'attachment; filename="cohort-{cohort_id}.csv"'})
    return Response(json.dumps(rows, ensure_ascii=False), content_type="application/json")


#: What a spreadsheet takes for the start of a formula in a cell it opens.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _as_text(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text rather than running it."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


bp.register_error_handler(CohortError, error_response)
