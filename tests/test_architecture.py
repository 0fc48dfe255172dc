"""The design's dependency rules (docs/design.md): fhir_maps is pure and never imports gateway;
entry points sit on top, adapters below."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_fhir_maps_never_imports_gateway_or_io_libraries() -> None:
    forbidden = ("gateway", "requests", "sqlalchemy", "pynetdicom", "flask", "boto3")
    for path in (ROOT / "fhir_maps").rglob("*.py"):
        for name in imports_of(path):
            assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"


def test_adapters_do_not_import_entry_points() -> None:
    entry_points = {"gateway.dimse", "gateway.dicomweb", "gateway.web", "gateway.cli"}
    for module in ("storage", "index", "records", "ingest", "config", "errors", "credentials",
                   "fhir_client", "fhir_http", "oauth_client", "timing", "upper_layer",
                   "dicom_binary"):
        names = imports_of(ROOT / "gateway" / f"{module}.py")
        assert not names & entry_points, f"gateway.{module} imports {names & entry_points}"


def test_retrieve_and_render_are_protocol_neutral() -> None:
    """gateway.retrieve serves WADO today and C-MOVE/C-GET later; gateway.render serves WADO-RS
    and WADO-URI: neither knows HTTP or DIMSE."""
    forbidden = {"flask", "werkzeug", "pynetdicom", "requests"}
    for module in ("retrieve", "render"):
        names = imports_of(ROOT / "gateway" / f"{module}.py")
        assert not {n.split(".")[0] for n in names} & forbidden, f"gateway.{module}"
        assert not names & {"gateway.dimse", "gateway.dicomweb", "gateway.wado", "gateway.web",
                            "gateway.cli"}, f"gateway.{module} imports an entry point"


def test_the_readers_views_are_services_not_http() -> None:
    """gateway.context and gateway.history read FHIR and the index; gateway.api translates."""
    for module in ("context", "history"):
        names = imports_of(ROOT / "gateway" / f"{module}.py")
        assert not {n.split(".")[0] for n in names} & {"flask", "werkzeug"}, f"gateway.{module}"
        assert not names & {"gateway.api", "gateway.web", "gateway.cli", "gateway.bootstrap"}, \
            f"gateway.{module} imports an entry point"


def test_the_lean_upper_layer_borrows_only_pynetdicoms_encoders() -> None:
    """The lean Upper Layer (receiver, upper_layer, qr_lean, dicom_binary) reuses pynetdicom's
    PDU codecs, negotiation and data set codec, never its association state machine, DUL or
    DIMSE providers: those are what it replaces."""
    allowed = {"pynetdicom.pdu", "pynetdicom.pdu_primitives", "pynetdicom.presentation",
               "pynetdicom.dsutils"}
    for module in ("receiver", "upper_layer", "qr_lean", "dicom_binary"):
        names = {n for n in imports_of(ROOT / "gateway" / f"{module}.py")
                 if n.split(".")[0] == "pynetdicom"}
        assert names <= allowed, f"gateway.{module} imports {names - allowed}"
