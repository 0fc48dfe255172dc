"""The HTTP application: DICOMweb under ``/dicomweb``, the gateway's API under ``/api`` (the
reader's clinical context in :mod:`gateway.api`),
``/healthz`` (the process answers), ``/readyz`` (index reachable, storage writable) and
``/metrics`` (Prometheus, :mod:`gateway.metrics`), and the small UI under ``/ui/``."""

from __future__ import annotations

import os
import time
from pathlib import Path

from flask import Flask, Response, g, jsonify, redirect, request, send_from_directory
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as WerkzeugResponse

from gateway import (  # noqa: F401  (qido registers its routes on dicomweb.bp)
    api,
    cohort_api,
    dicomweb,
    metrics,
    qido,
    wado,
    wado_uri,
)
from gateway.bootstrap import Services
from gateway.cohort import CohortError
from gateway.storage import is_valid_uid

#: The small UI's static files.
UI = Path(__file__).with_name("ui")


def create_app(services: Services) -> Flask:
    """Build the Flask application around already-constructed services."""
    app = Flask("gateway")
    app.extensions["gateway"] = services
    app.config["MAX_CONTENT_LENGTH"] = None  # STOW-RS enforces http.max_request_bytes itself
    app.register_blueprint(dicomweb.bp, url_prefix="/dicomweb")
    app.register_blueprint(wado.bp, url_prefix="/dicomweb")
    # The same DICOMweb services, limited to one cohort's studies (gateway.dicomweb.cohort_values)
    app.register_blueprint(dicomweb.bp, url_prefix="/cohorts/<int:cohort_id>/dicomweb",
                           name="cohort_dicomweb")
    app.register_blueprint(wado.bp, url_prefix="/cohorts/<int:cohort_id>/dicomweb",
                           name="cohort_wado")
    app.register_blueprint(cohort_api.bp, url_prefix="/api/cohorts")
    app.register_error_handler(CohortError, cohort_api.error_response)
    app.register_blueprint(wado_uri.uri_bp, url_prefix="/wado")
    app.register_blueprint(api.bp, url_prefix="/api")  # study context, patient history

    @app.before_request
    def started() -> Response | None:
        g.started = time.perf_counter()
        # A page of another site must not make a browser here change anything (replay,
        # cohorts, STOW-RS, DELETE): browsers say where a request comes from; DICOMweb and
        # API clients that are not browsers send no Sec-Fetch-Site and are not affected.
        if request.method not in ("GET", "HEAD", "OPTIONS") and \
                request.headers.get("Sec-Fetch-Site") == "cross-site":
            response = jsonify({"status": 403, "error": "a request from another site's page "
                                                        "cannot change anything here"})
            response.status_code = 403
            return response
        return None

    @app.after_request
    def counted(response: Response) -> Response:
        began = g.get("started")
        if began is not None:
            metrics.http_request(request.method, request.endpoint or "unmatched",
                                 response.status_code, time.perf_counter() - began)
        return response

    @app.get("/metrics")
    def prometheus() -> Response:
        """Prometheus text exposition (gateway.metrics)."""
        body, content_type = metrics.exposition(services, request.headers.get("Accept", ""))
        return Response(body, content_type=content_type)

    @app.get("/")
    def home() -> WerkzeugResponse:
        return redirect("/ui/")

    @app.get("/ui/")
    @app.get("/ui/<path:name>")
    def ui(name: str = "index.html") -> Response:
        """The small UI (gateway/ui: static files over the API and DICOMweb)."""
        return send_from_directory(UI, name)

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz() -> tuple[Response, int]:
        checks = {
            "index": services.index.ping(),
            "storage": os.access(services.storage.staging_dir(), os.W_OK),
        }
        ready = all(checks.values())
        return jsonify({"status": "ready" if ready else "not ready", "checks": checks}), (
            200 if ready else 503)

    @app.get("/api/status")
    def status() -> Response:
        return jsonify({"ae_title": services.settings.dimse["ae_title"],
                        "dicomweb": services.settings.dicomweb_url,
                        "counts": services.index.counts()})

    @app.get("/api/publish")
    def publish_status() -> Response:
        """The FHIR outbox: what waits, what failed and why (``imaging-gateway publish``)."""
        rows = services.index.outbox_rows()
        return jsonify({
            "enabled": services.publisher is not None,
            "pending": sum(1 for r in rows if r["state"] in ("pending", "publishing")),
            "failed": [{"study": r["StudyInstanceUID"], "attempts": r["attempts"],
                        "error": r["last_error"]} for r in rows if r["state"] == "failed"],
            "retrying": [{"study": r["StudyInstanceUID"], "attempts": r["attempts"],
                          "error": r["last_error"]} for r in rows
                         if r["state"] != "failed" and r["last_error"]],
        })

    @app.post("/api/publish/replay")
    def publish_replay() -> Response:
        """Retry every failed study, or ``{"study": uid}`` only."""
        if not request.is_json:  # (so no plain cross-site form can post it)
            response = jsonify({"status": 415, "error": 'send JSON: {} for every failed study, '
                                                        '{"study": uid} for one'})
            response.status_code = 415
            return response
        body = request.get_json(silent=True) or {}
        study = body.get("study") if isinstance(body, dict) else None
        if study is not None and not is_valid_uid(study):
            response = jsonify({"status": 400, "error": "study is not a valid UID"})
            response.status_code = 400
            return response
        return jsonify({"queued": services.index.replay(study)})

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        response = jsonify({"status": exc.code, "error": exc.description})
        response.status_code = exc.code or 500
        return response

    return app
