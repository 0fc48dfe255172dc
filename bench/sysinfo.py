"""What machine and which tool versions produced a set of figures (for the report header)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from bench.targets import dcmtk_env

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """stdout+stderr of ``cmd``, or "" if it cannot be run."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()


def _cpu_model() -> str:
    """The first ``model name`` in /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    """MemTotal from /proc/meminfo, in GiB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return 0.0


def _pkg_version(dist: str) -> str:
    """Installed version of a Python distribution, or "not installed"."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _dpkg_version(package: str) -> str:
    """Installed Debian version of ``package``, or "not installed"."""
    out = _run(["dpkg-query", "-W", "-f=${Version}", package])
    return out if out and "no packages found" not in out else "not installed"


def _dcmtk_version() -> str:
    """dcmtk version as storescu reports it, e.g. "3.6.7 (2022-04-22)"."""
    m = re.search(r"v(\d+\.\d+\.\d+)\s+(\S+)", _run(["storescu", "--version"], env=dcmtk_env()))
    return f"{m.group(1)} ({m.group(2)})" if m else "not installed"


def _orthanc_version() -> str:
    """First line of ``Orthanc --version``."""
    out = _run(["Orthanc", "--version"])
    return out.splitlines()[0] if out else "not installed"


def _git_commit() -> str:
    """Short HEAD commit of the repository (read-only), or "none"."""
    out = _run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    return out if re.fullmatch(r"[0-9a-f]{4,40}", out) else "none"


def machine_info() -> dict[str, str]:
    """Cores, memory, kernel, CPU model, OS and the date of the measurement (UTC)."""
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(len(os.sched_getaffinity(0))),
        "memory": f"{_mem_total_gib():.1f} GiB",
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "os": _os_release(),
    }


def _os_release() -> str:
    """PRETTY_NAME from /etc/os-release."""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def _sekmet_version() -> str:
    """The FHIR server of the publish and cohort measures (installed by scripts/test.sh)."""
    from bench import sekmet

    return sekmet.version() or "not installed"


def tool_versions() -> dict[str, str]:
    """Versions of every peer and library that shapes the figures."""
    return {
        "dcmtk": _dcmtk_version(),
        "Orthanc": _orthanc_version(),
        "orthanc-dicomweb": _dpkg_version("orthanc-dicomweb"),
        "sekmet-fhir": _sekmet_version(),
        "python": platform.python_version(),
        "pynetdicom": _pkg_version("pynetdicom"),
        "pydicom": _pkg_version("pydicom"),
        "numpy": _pkg_version("numpy"),
        "psutil": _pkg_version("psutil"),
        "imaging-gateway": _pkg_version("imaging-gateway"),
        "git commit": _git_commit(),
        "python executable": sys.executable,
    }
