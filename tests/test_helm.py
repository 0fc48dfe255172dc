"""The Helm chart (helm/imaging-gateway), rendered by a real ``helm`` (installed by
scripts/test.sh into .infra/bin): it lints strictly, and the gateway.toml it renders is one
the gateway accepts, holding what the values say: the defaults, and a deployment keeping its
blobs in S3 with credentials from a Secret and a service account."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "imaging-gateway"
HELM = ROOT / ".infra" / "bin" / "helm"


def _helm(*args: str) -> str:
    if not HELM.exists():
        pytest.fail("helm is not installed: run scripts/test.sh (it installs it)")
    done = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _render(tmp_path: Path, values: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """``helm template`` of the chart: kind → the rendered object."""
    args = ["template", "pacs", str(CHART)]
    if values is not None:
        given = tmp_path / "values.yaml"
        given.write_text(yaml.safe_dump(values))
        args += ["-f", str(given)]
    return {doc["kind"]: doc for doc in yaml.safe_load_all(_helm(*args)) if doc}


def _gateway_toml(rendered: dict[str, dict[str, Any]], tmp_path: Path) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(rendered["ConfigMap"]["data"]["gateway.toml"])
    return path


def test_the_chart_lints_strictly() -> None:
    _helm("lint", "--strict", str(CHART))


def test_the_default_chart_renders_a_configuration_the_gateway_accepts(tmp_path: Path) -> None:
    rendered = _render(tmp_path)
    settings = load_settings(_gateway_toml(rendered, tmp_path), environ={})
    assert settings.dimse["host"] == "0.0.0.0" and settings.http["host"] == "0.0.0.0"
    assert settings.dimse["ae_title"] == "IMAGING_GW" and settings.dimse["port"] == 11112
    assert str(settings.storage_path) == "/var/lib/imaging-gateway"
    assert settings.storage["backend"] == "files"
    (container,) = rendered["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert "env" not in container and "envFrom" not in container


def test_blobs_in_s3_with_credentials_from_a_secret_and_peers_render_as_configured(
        tmp_path: Path) -> None:
    values = {
        "config": {
            "dimse": {"ae_title": "HOSP_GW", "port": 104, "host": "10.0.0.1",
                      "allowed_callers": ["CT1", "MR 2"],
                      "peers": {"PACS": {"host": "pacs.example.org", "port": 11112},
                                "VIEWER 1": {"host": "10.1.2.3", "port": 4242}}},
            "http": {"port": 8080, "public_url": "https://imaging.example.org"},
            "storage": {"path": "/var/lib/imaging-gateway", "backend": "s3",
                        "s3_bucket": "hospital-imaging", "s3_region": "eu-central-1",
                        "s3_prefix": "archive/", "cache_max_bytes": 21474836480},
            "publish": {"quiet_seconds": 30.5},
        },
        "envFrom": [{"secretRef": {"name": "imaging-gateway-s3"}}],
        "env": [{"name": "GATEWAY_INDEX_URL",
                 "valueFrom": {"secretKeyRef": {"name": "db", "key": "url"}}}],
        "serviceAccountName": "imaging-gateway",
    }
    rendered = _render(tmp_path, values)
    settings = load_settings(_gateway_toml(rendered, tmp_path), environ={})
    assert settings.dimse["host"] == "0.0.0.0"  # the pod listens on every interface
    assert settings.dimse["ae_title"] == "HOSP_GW" and settings.dimse["port"] == 104
    assert list(settings.dimse["allowed_callers"]) == ["CT1", "MR 2"]
    assert {title: (peer.host, peer.port) for title, peer in settings.peers.items()} == {
        "PACS": ("pacs.example.org", 11112), "VIEWER 1": ("10.1.2.3", 4242)}
    assert settings.storage["backend"] == "s3"
    assert settings.storage["s3_bucket"] == "hospital-imaging"
    assert settings.storage["s3_prefix"] == "archive/"
    assert settings.storage["cache_max_bytes"] == 21474836480
    assert settings.publish["quiet_seconds"] == 30.5
    pod = rendered["Deployment"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "imaging-gateway"
    (container,) = pod["containers"]
    assert container["envFrom"] == values["envFrom"] and container["env"] == values["env"]
