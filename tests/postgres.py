"""A throwaway PostgreSQL server for the tests: Debian's postgresql (installed by
scripts/test.sh), a fresh cluster in a temporary directory on a free loopback port, trust
authentication, started once per session.

initdb and postgres refuse to run as root, so they run as the ``postgres`` user (the Debian
package creates it). ``fsync`` stays on: the gateway's durability promise is tested here too.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        pytest.fail("PostgreSQL is not installed: run scripts/test.sh (it installs it)")
    return found[-1]


def _as_postgres(*args: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else list(args)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """``host:port`` of a running PostgreSQL cluster with an empty database per test."""
    # Not under pytest's temporary directory: that one is private to root, and the server
    # runs as the postgres user.
    root = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    port = free_port()
    subprocess.run(_as_postgres(_bin("initdb"), "-D", str(data), "-U", "postgres",
                                "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"),
                   check=True, capture_output=True)
    subprocess.run(_as_postgres(
        _bin("pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
        "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {root}", "start"),
        check=True, capture_output=True)
    yield f"127.0.0.1:{port}"
    subprocess.run(_as_postgres(_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                                "stop"), capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


def new_database(server: str) -> str:
    """SQLAlchemy URL of a new, empty database on ``server`` (``host:port``)."""
    name = f"gw{uuid.uuid4().hex[:12]}"
    host, port = server.split(":")
    subprocess.run(_as_postgres(_bin("createdb"), "-h", host, "-p", port, "-U", "postgres",
                                name), check=True, capture_output=True)
    return f"postgresql+psycopg://postgres@{server}/{name}"


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A new, empty database on :func:`postgres_server`."""
    return new_database(postgres_server)
