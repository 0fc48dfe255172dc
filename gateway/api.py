"""The reader's API under ``/api`` (registered by :func:`gateway.web.create_app`): translation only;
the work is in :mod:`gateway.context` and :mod:`gateway.history`.

=========================================  ====================================================
``GET /api/studies/{uid}/context``         FHIR R4 ``searchset`` Bundle,
                                           ``application/fhir+json``
                                           (:meth:`ClinicalContext.study_context`)
``GET /api/patients/{id}/history``         JSON timeline, ``?since=&until=`` (``YYYY-MM-DD``,
                                           inclusive) (:func:`gateway.history.patient_history`)
=========================================  ====================================================

Errors, in one table (:func:`problem` bodies are ``{"status": …, "error": …}`` like the rest of
``/api``; FHIR failures answer with an OperationOutcome):

==========================================  ==================================================
a malformed UID, id or date                 400
:class:`~gateway.errors.NotFound`           404 (study not held, no such Patient)
:class:`~gateway.errors.FhirNotConfigured`  503 (``fhir.base_url`` unset)
:class:`~gateway.errors.FhirTransientError` 503 when the server is unavailable (no answer,
                                            429, 503; ``Retry-After`` passed on), else 502
:class:`~gateway.errors.FhirPermanentError` 502 (the server refused: 4xx, a bad scope, an
                                            ambiguous match)
==========================================  ==================================================

A FHIR failure answers with the server's own OperationOutcome when it sent one, else one the
gateway writes; never with a partial or empty context.
"""

from __future__ import annotations

import json
import re
from datetime import date
from typing import Any

from flask import Blueprint, Response, current_app, request

from gateway import history
from gateway.bootstrap import Services, mapping_options
from gateway.context import ClinicalContext
from gateway.errors import (
    FhirError,
    FhirNotConfigured,
    FhirTransientError,
    NotFound,
)
from gateway.fhir_http import FHIR_JSON
from gateway.storage import is_valid_uid

bp = Blueprint("api", __name__)
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")  # FHIR R4 datatypes.html#id


class BadRequest(ValueError):
    """A malformed path or query parameter (HTTP 400)."""


def problem(status: int, message: str) -> Response:
    """The ``/api`` error body: ``{"status": status, "error": message}``."""
    return Response(json.dumps({"status": status, "error": message}), status=status,
                    content_type="application/json")


def _context() -> ClinicalContext:
    services: Services = current_app.extensions["gateway"]
    if services.fhir is None:
        raise FhirNotConfigured("no FHIR server is configured (fhir.base_url): the clinical "
                                "context comes from the EMR's FHIR server")
    return ClinicalContext(services.index, services.fhir, mapping_options(services.settings),
                           services.settings.dicomweb_url)


def _date_arg(name: str) -> date | None:
    value = request.args.get(name)
    if value is None or value == "":
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise BadRequest(f"{name}: expected a date YYYY-MM-DD") from None


@bp.get("/studies/<study_uid>/context")
def study_context(study_uid: str) -> Response:
    """The study's clinical context: one FHIR Bundle (see :mod:`gateway.context`)."""
    if not is_valid_uid(study_uid):
        raise BadRequest("not a valid Study Instance UID")
    bundle = _context().study_context(study_uid)
    return Response(json.dumps(bundle, ensure_ascii=False), content_type=FHIR_JSON)


@bp.get("/patients/<patient_id>/history")
def patient_history(patient_id: str) -> Response:
    """The patient's imaging and clinical timeline, newest first."""
    if not _FHIR_ID.fullmatch(patient_id):
        raise BadRequest("not a FHIR resource id ([A-Za-z0-9-.]{1,64})")
    window = history.Window(since=_date_arg("since"), until=_date_arg("until"))
    if window.since and window.until and window.since > window.until:
        raise BadRequest("since is after until")
    timeline = history.patient_history(_context(), patient_id, window)
    return Response(json.dumps(timeline, ensure_ascii=False), content_type="application/json")


@bp.errorhandler(BadRequest)
def _bad_request(exc: BadRequest) -> Response:
    return problem(400, str(exc))


@bp.errorhandler(NotFound)
def _not_found(exc: NotFound) -> Response:
    return problem(404, str(exc))


@bp.errorhandler(FhirNotConfigured)
def _not_configured(exc: FhirNotConfigured) -> Response:
    return problem(503, str(exc))


def fhir_failure_status(exc: FhirError) -> int:
    """503 when the FHIR server is unavailable for now, 502 when it failed or refused."""
    if isinstance(exc, FhirTransientError) and exc.status in (None, 429, 503):
        return 503
    return 502


@bp.errorhandler(FhirError)
def _fhir_failed(exc: FhirError) -> Response:
    status = fhir_failure_status(exc)
    outcome: dict[str, Any] = exc.outcome or {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error",
                   "code": "transient" if isinstance(exc, FhirTransientError) else "exception",
                   "diagnostics": f"the FHIR server failed: {exc}"}]}
    response = Response(json.dumps(outcome, ensure_ascii=False), status=status,
                        content_type=FHIR_JSON)
    retry_after = getattr(exc, "retry_after", None)
    if status == 503 and retry_after is not None:
        response.headers["Retry-After"] = str(max(1, round(retry_after)))
    return response
