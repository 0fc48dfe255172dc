"""Shared fixtures: a real gateway process on loopback ports, and the sample files.

The gateway under test is always the real thing: ``imaging-gateway serve`` started as a child
process with its own configuration file, reached over TCP by real clients (dcmtk, pynetdicom,
dicomweb-client, requests).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

# dcmtk_env: TCP_NODELAY=1 and dcmtk's own programs first on PATH (pynetdicom installs Python
# scripts of the same names), for every dcmtk tool the tests start
from bench.targets import dcmtk_bin_dir
from bench.targets import dcmtk_env as dcmtk_env

# Real FHIR and OAuth2 servers (session fixtures), a client of sekmet, failure injection
from fhir_servers import (  # noqa: F401
    client_keys,
    failing,
    oauth_server,
    resource_server,
    sekmet,
    sekmet_fhir,
)

# Real PostgreSQL and an S3 endpoint (session fixtures), an empty database / bucket per test
from postgres import postgres_server, postgres_url  # noqa: F401
from s3 import s3_bucket, s3_server  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def require_dcmtk() -> None:
    if dcmtk_bin_dir() is None:
        pytest.fail("dcmtk is not installed: run scripts/test.sh (it installs it)")


@dataclass
class GatewayProcess:
    """A running ``imaging-gateway serve``."""

    root: Path
    dimse_port: int
    http_port: int
    ae_title: str = "IMAGING_GW"
    extra: dict[str, dict[str, object]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def data(self) -> Path:
        """The storage directory (``storage.path``)."""
        return Path(str(self.extra.get("storage", {}).get("path", self.root / "data")))

    @property
    def index_file(self) -> Path:
        """The SQLite index file (``index.url``, default inside the storage directory)."""
        url = str(self.extra.get("index", {}).get("url", ""))
        return Path(url.removeprefix("sqlite:///")) if url else self.data / "index.sqlite"

    @property
    def config(self) -> Path:
        return self.root / "gateway.toml"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.base_url}/dicomweb"

    @property
    def log(self) -> str:
        path = self.root / "gateway.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def write_config(self) -> None:
        sections: dict[str, dict[str, object]] = {
            "dimse": {"ae_title": self.ae_title, "host": "127.0.0.1", "port": self.dimse_port},
            "http": {"host": "127.0.0.1", "port": self.http_port},
            "storage": {"path": str(self.data)},
        }
        for section, values in self.extra.items():
            sections.setdefault(section, {}).update(values)
        lines: list[str] = []
        peers = sections["dimse"].pop("peers", None)
        for section, values in sections.items():
            lines.append(f"[{section}]")
            for key, value in values.items():
                lines.append(f"{key} = {_toml(value)}")
        if isinstance(peers, dict):
            for title, peer in peers.items():
                lines.append(f"[dimse.peers.{title}]")
                lines.extend(f"{k} = {_toml(v)}" for k, v in peer.items())
        self.config.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 30) -> GatewayProcess:
        self.write_config()
        with open(self.root / "gateway.log", "ab") as log:
            self.process = subprocess.Popen(
                [str(BIN / "imaging-gateway"), "serve", "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log}")
            try:
                # /readyz answers only after the DICOM listener is up (serve starts it first)
                if requests.get(f"{self.base_url}/readyz", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gateway not ready after {timeout} s:\n{self.log}")

    def stop(self, timeout: float = 40) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill9(self) -> None:
        """Kill the whole process group without warning (power-cut style)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        for line in subprocess.run(["pgrep", "-f", str(self.config)], capture_output=True,
                                   text=True).stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line), signal.SIGKILL)

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run another ``imaging-gateway`` command against the same configuration."""
        self.write_config()
        return subprocess.run(
            [str(BIN / "imaging-gateway"), args[0], "--config", str(self.config), *args[1:]],
            capture_output=True, text=True, timeout=timeout, env={**os.environ, **self.env})


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[object]:
    """Factory: ``make_gateway(extra={...}, env={...})`` → an unstarted :class:`GatewayProcess`
    (call ``.start()``). Every gateway made is stopped at the end of the test."""
    made: list[GatewayProcess] = []

    def factory(extra: dict[str, dict[str, object]] | None = None,
                env: dict[str, str] | None = None, name: str = "gw") -> GatewayProcess:
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        gateway = GatewayProcess(root, free_port(), free_port(), extra=extra or {},
                                 env=env or {})
        made.append(gateway)
        return gateway

    yield factory
    for gateway in made:
        if gateway.process is not None:
            gateway.stop()


@pytest.fixture
def gateway(make_gateway: object) -> GatewayProcess:
    """A started gateway with default settings."""
    return make_gateway().start()  # type: ignore[operator, no-any-return]


def partial_receptions(data: Path) -> list[Path]:
    """What the staging area of storage directory ``data`` holds besides the empty files its
    pool keeps ready (gateway.storage.StagingPool): received data that was not stored."""
    staging = data / ".staging"
    found = []
    for path in staging.rglob("*") if staging.exists() else ():
        try:
            if path.is_dir() or (path.parent == staging / "ready" and not path.stat().st_size):
                continue
        except FileNotFoundError:  # taken and moved away meanwhile
            continue
        found.append(path)
    return found


def pydicom_file(name: str) -> Path:
    """A file from pydicom's test data (pydicom-data installs the large ones offline)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(name)
    return Path(str(path))


def c_store(gateway: GatewayProcess, path: Path) -> Any:
    """One C-STORE of a file with pynetdicom, on its own association; the response's status
    data set."""
    import pydicom
    from pynetdicom import AE

    ds = pydicom.dcmread(path)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ds.SOPClassUID)
    assoc = ae.associate("127.0.0.1", gateway.dimse_port, ae_title=gateway.ae_title)
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


def c_store_all(gateway: GatewayProcess, files: list[Path]) -> str:
    """C-STORE each file (each must succeed); the first one's Study Instance UID."""
    import pydicom

    for path in files:
        assert c_store(gateway, path).Status == 0x0000
    return str(pydicom.dcmread(files[0]).StudyInstanceUID)
