"""The servers a benchmark talks to, each started fresh on 127.0.0.1 in its own temp directory.

A :class:`Target` knows how to configure, start, probe and count what one kind of server
stored; :class:`RunningTarget` owns one started instance (its process tree, log and ports)
and stops it with SIGTERM, then SIGKILL after a grace period.

Targets: ``gateway`` (imaging-gateway itself), ``storescp`` (dcmtk, writes files: the
reference), ``storescp-ignore`` (dcmtk ``--ignore``: receives and discards, the protocol
limit), ``orthanc`` (Debian's Orthanc 1.10 + DICOMweb plugin, SQLite index, fsync per file)
and ``pynetdicom-min`` (bench/pynetdicom_scp.py: the pure-Python floor).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import psutil  # type: ignore[import-untyped]

HOST = "127.0.0.1"
DCMTK_ENV = {"TCP_NODELAY": "1"}
"""Debian's dcmtk leaves Nagle on unless TCP_NODELAY=1 is in its environment (infra.md)."""

REPO_ROOT = Path(__file__).resolve().parent.parent
GATEWAY_BIN = Path(os.environ.get("IMAGING_GATEWAY_BIN", REPO_ROOT / ".venv/bin/imaging-gateway"))
ORTHANC_DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
SYNC_BETWEEN_RUNS = True
"""Flush dirty pages after each run (``--no-sync`` turns it off), so runs don't interfere."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def http_and_echo_ok(ep: Endpoint, path: str) -> bool:
    """True when the target answers HTTP ``path`` and a C-ECHO."""
    try:
        http_json(f"http://{HOST}:{ep.http_port}{path}")
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return echo_ok(ep.aet, ep.dimse_port)


def dcmtk_bin_dir() -> str | None:
    """The first PATH directory holding dcmtk's own ``storescu``, or None.

    pynetdicom (3.0 and later) installs Python scripts named ``storescp``, ``storescu``,
    ``findscu``... that take other options; in an activated virtual environment they come
    first on PATH. dcmtk's tools are compiled programs, so the first ELF ``storescu`` marks
    the directory to use.
    """
    for folder in os.get_exec_path():
        candidate = Path(folder) / "storescu"
        try:
            with open(candidate, "rb") as fh:
                if fh.read(4) == b"\x7fELF" and os.access(candidate, os.X_OK):
                    return folder
        except OSError:
            continue
    return None


def dcmtk_env() -> dict[str, str]:
    """The current environment for any dcmtk tool: TCP_NODELAY=1 and dcmtk's directory
    first on PATH (subprocess looks a program up on the PATH of the ``env`` it is given)."""
    env = {**os.environ, **DCMTK_ENV}
    folder = dcmtk_bin_dir()
    if folder is not None:
        env["PATH"] = folder + os.pathsep + env.get("PATH", "")
    return env


def echo_ok(aet: str, port: int, timeout: int = 2) -> bool:
    """Whether a C-ECHO to ``aet`` at 127.0.0.1:``port`` succeeds (dcmtk echoscu)."""
    cmd = ["echoscu", "-to", str(timeout), "-ta", str(timeout), "-aec", aet, HOST, str(port)]
    try:
        done = subprocess.run(cmd, env=dcmtk_env(), capture_output=True, timeout=timeout + 3)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def count_part10_files(root: Path) -> int:
    """Number of DICOM Part-10 files (``DICM`` at offset 128) anywhere under ``root``."""
    count = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            try:
                with open(os.path.join(dirpath, name), "rb") as fh:
                    head = fh.read(132)
            except OSError:
                continue
            if len(head) == 132 and head[128:] == b"DICM":
                count += 1
    return count


def http_json(url: str, timeout: float = 2.0) -> object:
    """GET ``url`` and decode its JSON body (raises on any HTTP or network error)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def storescu_push(aet: str, port: int, files: list[Path], root: Path, logdir: Path,
                  assocs: int = 1, calling: str = "BENCHSCU") -> None:
    """Send ``files`` (paths under ``root``) with ``assocs`` parallel dcmtk storescu processes.

    Raises ``RuntimeError`` naming the first sender that failed (with its log tail).
    """
    parts = max(1, min(assocs, len(files)))
    chunk = -(-len(files) // parts)
    procs = []
    for i in range(parts):
        part = files[i * chunk:(i + 1) * chunk]
        log = logdir / f"load-storescu-{i}.log"
        cmd = ["storescu", "-aet", calling, "-aec", aet, HOST, str(port),
               *(str(p.relative_to(root)) for p in part)]
        with open(log, "wb") as fh:
            procs.append((subprocess.Popen(cmd, cwd=root, env=dcmtk_env(),
                                           stdin=subprocess.DEVNULL, stdout=fh,
                                           stderr=subprocess.STDOUT), log))
    errors = []
    for proc, log in procs:
        try:
            code = proc.wait(timeout=max(300.0, len(files) / 5))
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        if code != 0:
            tail = " | ".join(log.read_text(errors="replace").splitlines()[-3:])
            errors.append(f"storescu exit {code}: {tail}")
    if errors:
        raise RuntimeError(errors[0])


@dataclass
class Endpoint:
    """Where one started target listens and keeps its files."""

    workdir: Path
    aet: str
    dimse_port: int
    http_port: int | None = None
    #: C-MOVE destinations the target must know: AE title -> (host, port).
    peers: dict[str, tuple[str, int]] = field(default_factory=dict)


class Target:
    """One kind of server. Subclasses fill in the command, config and probes."""

    name: ClassVar[str]
    description: ClassVar[str]
    aet: ClassVar[str]
    uses_http: ClassVar[bool] = False
    ready_timeout: ClassVar[float] = 30.0
    #: Folder under the work dir where the target writes Part-10 files (None: it keeps none).
    output_dir: ClassVar[str | None] = None
    #: Whether what it receives takes disk space (the ingest measure's room for kept runs).
    stores: ClassVar[bool] = True
    #: Whether it answers QIDO/WADO-RS and C-FIND/C-MOVE/C-GET (the query/retrieve measures).
    serves_qr: ClassVar[bool] = False
    #: Path of the DICOMweb root on its HTTP port (QIDO-RS, WADO-RS), when it has one.
    dicomweb_root: ClassVar[str] = ""
    #: Not a server: the ingest measure does its work in the harness (FsyncFloorTarget).
    in_process: ClassVar[bool] = False
    #: How :meth:`RunningTarget.stop` ends it. Every figure is taken before the stop and a
    #: stopped target's files are never used again, so a target slow to exit on SIGTERM may
    #: be killed instead (the run only waits less).
    stop_signal: ClassVar[int] = signal.SIGTERM

    def unavailable_reason(self) -> str | None:
        """Why this target cannot run on this machine, or None if it can."""
        return None

    def prepare(self, ep: Endpoint) -> None:
        """Write whatever config the target needs into ``ep.workdir``."""

    def command(self, ep: Endpoint) -> list[str]:
        """The argv that starts the target."""
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        """The environment to start the target in."""
        return dict(os.environ)

    def is_ready(self, ep: Endpoint) -> bool:
        """Whether the target accepts work (default: a C-ECHO succeeds)."""
        return echo_ok(ep.aet, ep.dimse_port)

    def stored_count(self, ep: Endpoint) -> int | None:
        """How many instances the target has stored, or None if it cannot be told."""
        return None if self.output_dir is None else count_part10_files(ep.workdir /
                                                                      self.output_dir)

    def verification(self) -> str:
        """How a run's completeness is checked, for the report."""
        if self.output_dir is None:
            return "storescu exit codes only"
        return "exit codes + Part-10 files written"

    def load(self, ep: Endpoint, files: list[Path], root: Path, logdir: Path) -> None:
        """Put ``files`` (all under ``root``) into the running target by its fastest bulk path.

        Only for targets that :attr:`serves_qr`; raises ``RuntimeError`` when loading fails.
        """
        raise NotImplementedError(f"{self.name} cannot be loaded for query/retrieve")

    def indexed_count(self, ep: Endpoint) -> int | None:
        """How many instances the target can answer queries about (default: stored count)."""
        return self.stored_count(ep)


def _which(tool: str) -> str | None:
    """Why dcmtk's ``tool`` is missing, or None if it is there."""
    folder = dcmtk_bin_dir()
    if folder is not None and shutil.which(tool, path=folder):
        return None
    return f"dcmtk's {tool} not found (run scripts/install_bench_deps.sh)"


class StorescpTarget(Target):
    """dcmtk storescp in its default single-process mode, writing each instance to a file."""

    name = "storescp"
    description = "dcmtk storescp, writes files (reference = 1.00)"
    aet = "STORESCP"
    output_dir: ClassVar[str | None] = "out"

    def unavailable_reason(self) -> str | None:
        return _which("storescp")

    def command(self, ep: Endpoint) -> list[str]:
        out = ep.workdir / "out"
        out.mkdir(parents=True, exist_ok=True)
        return ["storescp", "-aet", self.aet, "+xa", "-od", str(out), str(ep.dimse_port)]

    def env(self) -> dict[str, str]:
        return dcmtk_env()


class StorescpIgnoreTarget(StorescpTarget):
    """dcmtk storescp --ignore: receives every byte, stores nothing (the protocol limit)."""

    name = "storescp-ignore"
    description = "dcmtk storescp --ignore, stores nothing (protocol limit)"

    output_dir = None
    stores = False

    def command(self, ep: Endpoint) -> list[str]:
        return ["storescp", "-aet", self.aet, "+xa", "--ignore", str(ep.dimse_port)]


class StorescpFsyncTarget(StorescpTarget):
    """dcmtk storescp made durable: each file fsync'd before its C-STORE response.

    storescp has no fsync option; ``--exec-on-reception 'sync #p/#f' --exec-sync`` runs
    coreutils ``sync FILE`` (an fsync of that file) in the foreground after each file is
    written, before the response goes out. It is what a dcmtk user gets who asks for the
    acknowledgement the gateway gives ("acknowledged = durable"), with the cost of one
    process per instance on top of the fsync itself."""

    name = "storescp-fsync"
    description = ("dcmtk storescp + `sync` of each file before its response (durable; "
                   "a process per file)")

    def unavailable_reason(self) -> str | None:
        return super().unavailable_reason() or (
            None if shutil.which("sync") else "coreutils sync not found")

    def command(self, ep: Endpoint) -> list[str]:
        return [*super().command(ep)[:-1], "--exec-on-reception", "sync #p/#f", "--exec-sync",
                str(ep.dimse_port)]


class FsyncFloorTarget(Target):
    """Not a DICOM server: the harness itself writes each file of the dataset to a new file
    and fsyncs it, one thread per association, as a receiver that acknowledges only durable
    files must at the least (no network, no parsing, no index). Its inst/s is the most such a
    receiver can reach on this machine's disk (see :func:`bench.ingest.run_once`)."""

    name = "fsync-floor"
    description = ("no DICOM: each file written and fsync'd by the harness, a thread per "
                   "association (the durable limit of this disk)")
    aet = "-"
    output_dir = "out"
    #: Run by the harness in-process (:func:`bench.ingest.write_durably`), not started.
    in_process = True

    def verification(self) -> str:
        return "Part-10 files written, counted"


class OrthancTarget(Target):
    """Debian's Orthanc 1.10 with the DICOMweb plugin and default settings (fsync per file)."""

    name = "orthanc"
    description = "Orthanc 1.10 + DICOMweb plugin (SQLite, files, fsync per file)"
    aet = "ORTHANC"
    uses_http = True
    serves_qr = True
    dicomweb_root = "/dicom-web"
    #: Orthanc 1.10 takes 2.4 s to exit on SIGTERM here (a fifth of a quick run's ingest).
    stop_signal = signal.SIGKILL

    def unavailable_reason(self) -> str | None:
        if shutil.which("Orthanc") is None:
            return "Orthanc not found (run scripts/install_bench_deps.sh)"
        return None

    def prepare(self, ep: Endpoint) -> None:
        plugins = [str(ORTHANC_DICOMWEB_PLUGIN)] if ORTHANC_DICOMWEB_PLUGIN.exists() else []
        config = {
            "Name": "BENCH",
            "StorageDirectory": str(ep.workdir / "storage"),
            "IndexDirectory": str(ep.workdir / "index"),
            "DicomAet": self.aet,
            "DicomPort": ep.dimse_port,
            "HttpPort": ep.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "Plugins": plugins,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            # Query/retrieve from the harness's SCUs, which Orthanc does not know by AE title
            # (1.9.0+ refuses C-FIND/C-GET/C-MOVE from unknown modalities by default).
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "DicomModalities": {ae: [ae, host, port] for ae, (host, port) in ep.peers.items()},
        }
        (ep.workdir / "orthanc.json").write_text(json.dumps(config, indent=2))

    def command(self, ep: Endpoint) -> list[str]:
        return ["Orthanc", str(ep.workdir / "orthanc.json")]

    def env(self) -> dict[str, str]:
        # Orthanc's DICOM server is Debian's libdcmnet: without TCP_NODELAY=1 every
        # C-STORE-RSP waits for a delayed ACK (~20 inst/s instead of ~150).
        return dcmtk_env()

    def is_ready(self, ep: Endpoint) -> bool:
        return http_and_echo_ok(ep, "/system")

    def stored_count(self, ep: Endpoint) -> int | None:
        stats = http_json(f"http://{HOST}:{ep.http_port}/statistics", timeout=10)
        assert isinstance(stats, dict)
        return int(stats["CountInstances"])

    def verification(self) -> str:
        return "exit codes + /statistics CountInstances"

    def load(self, ep: Endpoint, files: list[Path], root: Path, logdir: Path) -> None:
        """C-STORE with two parallel storescu (Orthanc's fastest bulk path measured here)."""
        storescu_push(self.aet, ep.dimse_port, files, root, logdir, assocs=2)


class PynetdicomTarget(Target):
    """bench/pynetdicom_scp.py with pynetdicom's defaults: the pure-Python floor."""

    name = "pynetdicom-min"
    description = "minimal pynetdicom 3.0 SCP writing files (pure-Python floor)"
    aet = "PYNETDICOM"
    output_dir: ClassVar[str | None] = "out"

    def command(self, ep: Endpoint) -> list[str]:
        extra = os.environ.get("BENCH_PYNETDICOM_ARGS", "").split()
        return [
            sys.executable, "-m", "bench.pynetdicom_scp", "--port", str(ep.dimse_port),
            "--out", str(ep.workdir / "out"), "--aet", self.aet, *extra,
        ]

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}



class GatewayTarget(Target):
    """imaging-gateway itself (``imaging-gateway serve --config``), possibly with workers."""

    name = "gateway"
    description = "imaging-gateway (this project; default configuration: one process per core)"
    aet = "IMAGING_GW"
    uses_http = True
    output_dir: ClassVar[str | None] = "data"  # the [storage] path
    ready_timeout = 60.0
    serves_qr = True
    dicomweb_root = "/dicomweb"
    #: Extra TOML appended to the configuration (the scale measure points [index] elsewhere).
    extra_config: str = ""

    def unavailable_reason(self) -> str | None:
        if not (GATEWAY_BIN.is_file() and os.access(GATEWAY_BIN, os.X_OK)):
            return f"not available ({GATEWAY_BIN} missing)"
        return None

    def prepare(self, ep: Endpoint) -> None:
        (ep.workdir / "data").mkdir(parents=True, exist_ok=True)
        (ep.workdir / "gateway.toml").write_text(
            "[dimse]\n"
            f'ae_title = "{self.aet}"\n'
            f'host = "{HOST}"\n'
            f"port = {ep.dimse_port}\n"
            "[http]\n"
            f'host = "{HOST}"\n'
            f"port = {ep.http_port}\n"
            "[storage]\n"
            f'path = "{ep.workdir / "data"}"\n'
            + "".join(f'[dimse.peers.{ae}]\nhost = "{host}"\nport = {port}\n'
                      for ae, (host, port) in ep.peers.items())
            + self.extra_config
        )

    def command(self, ep: Endpoint) -> list[str]:
        return [str(GATEWAY_BIN), "serve", "--config", str(ep.workdir / "gateway.toml")]

    def is_ready(self, ep: Endpoint) -> bool:
        # Both listeners: the DICOM one starts first, HTTP a moment later (gateway/cli.py).
        return http_and_echo_ok(ep, "/healthz")

    def verification(self) -> str:
        return "exit codes + Part-10 files under [storage] path"

    def load(self, ep: Endpoint, files: list[Path], root: Path, logdir: Path) -> None:
        """``imaging-gateway import`` of the dataset folder beside the running gateway."""
        cmd = [str(GATEWAY_BIN), "import", "--config", str(ep.workdir / "gateway.toml"),
               "--no-progress", "--jobs", "2", str(root)]
        log = logdir / "import.log"
        with open(log, "wb") as fh:
            done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=fh,
                                  stderr=subprocess.STDOUT, timeout=max(300, len(files) / 5))
        if done.returncode != 0:
            tail = " | ".join(log.read_text(errors="replace").splitlines()[-3:])
            raise RuntimeError(f"imaging-gateway import exited {done.returncode}: {tail}")

    def indexed_count(self, ep: Endpoint) -> int | None:
        status = http_json(f"http://{HOST}:{ep.http_port}/api/status", timeout=10)
        assert isinstance(status, dict)
        return int(status["counts"]["instances"])


class GatewaySingleProcessTarget(GatewayTarget):
    """The gateway with ``dimse.workers = 1``: one process serves every association (the
    default runs one process per core; ingest only, query/retrieve is measured on
    ``gateway``)."""

    name = "gateway-1p"
    description = "imaging-gateway, dimse.workers = 1 (the main process alone)"
    serves_qr = False

    def env(self) -> dict[str, str]:
        return {**os.environ, "GATEWAY_DIMSE_WORKERS": "1"}


class GatewayCachedTarget(GatewayTarget):
    """The gateway with ``storage.cache_new_blobs = true``: stored blobs stay in the page
    cache, as storescp's files do (the default releases them once durable; ingest only)."""

    name = "gateway-cached"
    description = "imaging-gateway, storage.cache_new_blobs = true (blobs kept in the page cache)"
    serves_qr = False

    def env(self) -> dict[str, str]:
        return {**os.environ, "GATEWAY_STORAGE_CACHE_NEW_BLOBS": "true"}


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        GatewayTarget(),
        GatewaySingleProcessTarget(),
        GatewayCachedTarget(),
        StorescpTarget(),
        StorescpIgnoreTarget(),
        StorescpFsyncTarget(),
        FsyncFloorTarget(),
        OrthancTarget(),
        PynetdicomTarget(),
    )
}
"""Every known target by name, in report order."""


class TargetStartError(RuntimeError):
    """The target exited or did not become ready in time (message ends with its log tail)."""


class RunningTarget:
    """One started target: ``with RunningTarget(target, workroot) as rt: ...`` stops it after."""

    STOP_GRACE = 20.0

    def __init__(self, target: Target, workroot: Path,
                 peers: dict[str, tuple[str, int]] | None = None) -> None:
        self.target = target
        workroot.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=f"{target.name}-", dir=workroot))
        self.ep = Endpoint(
            workdir=workdir,
            aet=target.aet,
            dimse_port=free_port(),
            http_port=free_port() if target.uses_http else None,
            peers=dict(peers or {}),
        )
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0

    def __enter__(self) -> RunningTarget:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        """PID of the target's root process."""
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the target's combined stdout/stderr."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> None:
        """Configure and launch the target, then wait until it answers or fail."""
        self.target.prepare(self.ep)
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.target.command(self.ep),
                cwd=self.ep.workdir,
                env=self.target.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = t0 + self.target.ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise TargetStartError(
                    f"{self.target.name} exited with {self.proc.returncode} before it was ready:"
                    f"\n{self.log_tail()}"
                )
            if self.target.is_ready(self.ep):
                break
            if time.perf_counter() > deadline:
                self.stop()
                raise TargetStartError(
                    f"{self.target.name} not ready after {self.target.ready_timeout:.0f} s:"
                    f"\n{self.log_tail()}"
                )
            time.sleep(0.1)
        self.startup_s = time.perf_counter() - t0

    def stop(self) -> None:
        """Signal the root (the target's :attr:`Target.stop_signal`), SIGKILL the tree after
        :attr:`STOP_GRACE` s; idempotent."""
        if self.proc is None:
            return
        try:  # Process objects remember create_time, so a reused pid is never signalled
            leftovers = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            leftovers = []
        if self.proc.poll() is None:
            self.proc.send_signal(self.target.stop_signal)
            try:
                self.proc.wait(timeout=self.STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for proc in leftovers:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                continue
        _gone, alive = psutil.wait_procs(leftovers, timeout=5)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                continue
        self.proc = None

    def sync(self) -> None:
        """If :data:`SYNC_BETWEEN_RUNS`, flush dirty pages (the run's files stay)."""
        if SYNC_BETWEEN_RUNS:
            os.sync()

    def cleanup(self) -> None:
        """Delete the target's directory and, if :data:`SYNC_BETWEEN_RUNS`, flush dirty pages.

        Without the sync, the kernel writes the previous run's ~1 GB back to disk during the
        next run and slows whichever target comes next (storescp drops from ~700 to ~450
        inst/s on the full dataset here).
        """
        shutil.rmtree(self.ep.workdir, ignore_errors=True)
        if SYNC_BETWEEN_RUNS:
            os.sync()
