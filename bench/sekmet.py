"""sekmet-fhir, the FHIR R4 server of the tests and of the publish benchmark, as a child process.

sekmet-fhir 0.1.1 (FastAPI + SQLite) is installed by ``scripts/_env.sh install_sekmet`` (which
scripts/test.sh runs) into the git-ignored ``.infra/sekmet-venv``. :func:`start` writes its
settings (YAML is a superset of JSON) into a directory, runs ``sekmet serve`` there with its
output in ``sekmet.log`` (uvicorn's access log: one line per request) and waits until
``[base]/metadata`` answers; :func:`stop_process` ends it.

Two configurations use it: the tests' (``tests/fhir_servers.py``: HTTPS, SMART Backend
Services clients, scopes enforced) and the benchmark's, :func:`plain_settings` (plain HTTP on
loopback, no authentication), so that what is measured is FHIR publishing rather than TLS.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
SEKMET_VENV = REPO_ROOT / ".infra" / "sekmet-venv"
SEKMET_BIN = SEKMET_VENV / "bin" / "sekmet"
LOG_NAME = "sekmet.log"


class SekmetError(RuntimeError):
    """sekmet is not installed, exited, or did not answer in time (message ends with its log)."""


def missing_reason() -> str | None:
    """Why sekmet cannot be started here, or None when it is installed."""
    if SEKMET_BIN.exists():
        return None
    return f"sekmet-fhir is not installed ({SEKMET_BIN} missing): run scripts/test.sh " \
           "(install_sekmet in scripts/_env.sh)"


def version() -> str:
    """The installed sekmet-fhir version, or "" when it is not installed."""
    stamps = sorted(SEKMET_VENV.glob(".installed-*"))
    return stamps[-1].name.removeprefix(".installed-") if stamps else ""


def plain_settings(root: Path, port: int) -> dict[str, Any]:
    """Plain HTTP on 127.0.0.1:``port``, no authentication, fresh data under ``root``.

    The simulator (which answers orders by itself) and the traffic log (every request and
    response stored in the database) are off, as for the tests.
    """
    return {"base_url": f"http://127.0.0.1:{port}/fhir", "host": "127.0.0.1", "port": port,
            "data_dir": str(root / "data"), "own_private_key_path": str(root / "own.pem"),
            "simulator": {"enabled": False}, "log_inbound": False}


def start(settings: Mapping[str, Any], root: Path, *, verify: bool | str = True,
          timeout: float = 60.0) -> subprocess.Popen[bytes]:
    """Run ``sekmet serve`` with ``settings`` in ``root``; return once ``/metadata`` answers.

    Raises
    ------
    SekmetError
        sekmet is not installed, exited during start-up or did not answer within ``timeout``.
    """
    reason = missing_reason()
    if reason is not None:
        raise SekmetError(reason)
    root.mkdir(parents=True, exist_ok=True)
    config = root / "settings.yaml"
    config.write_text(json.dumps(dict(settings)))
    log = root / LOG_NAME
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [str(SEKMET_BIN), "serve", "-c", str(config)], stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=root,
            env={k: v for k, v in os.environ.items() if not k.startswith("SEKMET_")})
    url = f"{str(settings['base_url']).rstrip('/')}/metadata"
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise SekmetError(f"sekmet exited with {process.returncode}:\n{log.read_text()}")
        try:
            if requests.get(url, timeout=2, verify=verify).ok:
                return process
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            stop_process(process)
            raise SekmetError(f"sekmet not ready after {timeout:.0f} s:\n{log.read_text()}")
        time.sleep(0.1)


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM; SIGINT after 2 s (uvicorn otherwise waits for the idle keep-alive connections
    of clients still open, and forces its exit on a SIGINT that follows); SIGKILL last."""
    if process is None or process.poll() is not None:
        return
    for signum, grace in ((signal.SIGTERM, 2), (signal.SIGINT, 10), (signal.SIGKILL, 10)):
        process.send_signal(signum)
        try:
            process.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue
