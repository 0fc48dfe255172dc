"""``imaging-gateway serve | import | reindex``: entry points that only translate.

Exit codes: 0 success; 1 the command ran but some instances failed; 2 bad configuration or
usage (one line on stderr naming the key).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from tqdm import tqdm

from gateway.config import Settings, load_settings, setup_logging
from gateway.errors import ConfigError, StoreError

if TYPE_CHECKING:
    from gateway.bootstrap import Services
    from gateway.workers import ReceiverPool

# gateway.bootstrap (with pydicom, pynetdicom and SQLAlchemy behind it: about a second) is
# imported where it is used, so that ``serve`` starts its receiver processes first and they
# load the same libraries meanwhile, on the other cores.

log = logging.getLogger("gateway")

#: At a stop, how long HTTP requests already running may take to finish.
DRAIN_SECONDS = 30


# -- serve ----------------------------------------------------------------------------------------
def _wait_for_signal() -> str:
    stop = threading.Event()
    received: list[str] = []

    def handler(signum: int, _frame: Any) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not stop.wait(0.5):
        pass
    return received[0]


_Listener = TypeVar("_Listener")


def _listening(section: Mapping[str, Any], name: str, start: Callable[[], _Listener]
               ) -> _Listener:
    """``start()`` (which binds ``section``'s host and port); a port that cannot be had (in
    use, not permitted) is a :class:`ConfigError` naming the setting, not a traceback."""
    try:
        return start()
    except OSError as exc:
        raise ConfigError(f"{name}.port: cannot listen on {section['host']}:{section['port']}: "
                          f"{exc.strerror or exc}") from exc


def _bound(section: Mapping[str, Any]) -> socket.socket:
    """A socket listening on ``section``'s host and port, bound here so that a port that
    cannot be had raises (:func:`_listening` names the setting) before anything serves."""
    family, kind, proto, _name, address = socket.getaddrinfo(
        section["host"], int(section["port"]), type=socket.SOCK_STREAM,
        flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _local_load() -> int:
    """The associations the main process serves itself (for :class:`ReceiverPool`)."""
    from gateway import receiver

    return len(receiver.active_associations())


def serve(settings: Settings) -> int:
    """Run the DICOM listener and the HTTP server until SIGTERM/SIGINT, then drain and exit."""
    from gateway import metrics
    from gateway.workers import ReceiverPool, ReceiverStartError

    forget_metrics = metrics.enable_multiprocess()  # before any process makes a metric
    pool: ReceiverPool | None = None
    try:
        if settings.dimse_workers > 1:  # first: they load their libraries while this one does
            pool = ReceiverPool(settings.dimse_workers - 1, local_load=_local_load)
        return _serve(settings, pool)
    except ReceiverStartError as exc:  # already stopped, with every other receiver
        log.error("%s", exc)
        return 1
    except BaseException:
        if pool is not None:  # e.g. the port is taken: the receivers go too
            pool.stop(0)
        raise
    finally:
        forget_metrics()


def _serve(settings: Settings, pool: ReceiverPool | None) -> int:
    """:func:`serve` once its receiver processes (if any) are launched."""
    from gateway import metrics
    from gateway.bootstrap import build_services, settle_heap
    from gateway.dimse import DimseNode
    from gateway.http_server import AccessLog, Server
    from gateway.web import create_app
    from gateway.workers import ReceiverStartError

    services = build_services(settings)
    metrics.prepare()
    leftovers = services.storage.clear_staging()
    if leftovers:
        log.info("removed %d unacknowledged partial receptions from staging", leftovers)
    if services.index.begin_running():
        recovered = services.ingest.recover()
        log.warning("the last run did not stop cleanly; %d stored instances whose index rows "
                    "were lost were indexed again", recovered)
    node = DimseNode(settings, services.ingest, services.cohorts)
    app = AccessLog(create_app(services))
    try:
        if pool is not None:  # the index exists now (a receiver opens it, never creates it)
            pool.start(settings)  # ReceiverStartError when one does not (all stopped)
            node.hand_off = pool.hand_off
        host, port = _listening(settings.dimse, "dimse", node.start)
        bound = _listening(settings.http, "http", lambda: _bound(settings.http))
        http = Server(app, bound, threads=settings.http["threads"],
                      read_timeout=settings.http["read_timeout"],
                      shutdown_timeout=DRAIN_SECONDS,
                      max_request_bytes=settings.http["max_request_bytes"])
        http.prepare()  # adopts the socket and starts the threads
    except (ConfigError, ReceiverStartError):  # nothing was received: a clean stop
        node.stop(drain_seconds=0)
        services.index.end_running()
        services.close()
        raise
    dimse_address = f"{host}:{port}"
    if services.publisher is not None:
        services.publisher.start()
        log.info("publishing to FHIR server %s", services.publisher.client.base_url)
    http_thread = threading.Thread(target=http.serve, name="http", daemon=True)
    http_thread.start()
    log.info("imaging-gateway ready: DICOM %s@%s (%d receiver process(es)), HTTP %s:%s, "
             "DICOMweb %s", settings.dimse["ae_title"], dimse_address,
             settings.dimse_workers, settings.http["host"], bound.getsockname()[1],
             settings.dicomweb_url)
    settle_heap()
    signame = _wait_for_signal()
    log.info("%s received: draining", signame)
    stopping = time.monotonic()
    http.stop()  # no new request; those running finish, cut off after DRAIN_SECONDS
    if time.monotonic() - stopping >= DRAIN_SECONDS:
        log.warning("HTTP requests still running after %d s were cut off", DRAIN_SECONDS)
    node.stop()
    if pool is not None:
        pool.stop()
    services.index.end_running()
    services.close()
    log.info("stopped")
    return 0


def _end_process(code: int) -> NoReturn:
    """Exit at once with ``code``, skipping the interpreter's teardown of every module and
    object: :func:`serve` has already closed what it opened (index, storage, receiver
    processes, publisher), and the teardown of a long-running server's heap took half a
    second of CPU that a restart waited for."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def load_settings_with(settings: Settings, section: str, key: str, value: Any) -> Settings:
    """A copy of ``settings`` with one value changed."""
    from dataclasses import replace

    changed = dict(getattr(settings, section))
    changed[key] = value
    return replace(settings, **{section: changed})


# -- import ---------------------------------------------------------------------------------------
def _candidate_files(paths: Sequence[str]) -> Iterator[Path]:
    for name in paths:
        root = Path(name)
        if root.is_file():
            yield root
        elif root.is_dir():
            for directory, subdirs, files in os.walk(root):
                subdirs.sort()
                for file in sorted(files):
                    yield Path(directory) / file
        else:
            log.warning("import: %s does not exist", root)


def _is_part10(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


#: Media Storage Directory Storage (PS3.4 Annex I, PS3.10 §8.6): a DICOMDIR, not an instance.
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


def _media_storage_sop_class(path: Path) -> str | None:
    from pydicom.filereader import read_file_meta_info

    try:
        return str(read_file_meta_info(path).get("MediaStorageSOPClassUID", "")) or None
    except Exception:  # unreadable meta: store_file reports it
        return None


def import_paths(services: Services, paths: Sequence[str], *, jobs: int, progress: bool) -> int:
    """Bulk-import a folder tree (what a site migrating from another archive does first).

    Files without a Part 10 header ('DICM' at byte 128) are skipped; re-running skips what is
    already stored (identical data set → "unchanged"). Returns the number of failures.
    """
    files = list(_candidate_files(paths))
    outcomes: Counter[str] = Counter()
    reasons: Counter[str] = Counter()

    def one(path: Path) -> None:
        if not _is_part10(path):
            outcomes["skipped (not a DICOM Part 10 file)"] += 1
            return
        if _media_storage_sop_class(path) == MEDIA_STORAGE_DIRECTORY:
            outcomes["skipped (DICOMDIR)"] += 1
            return
        try:
            result = services.ingest.store_file(path, move=False, source="import")
            outcomes[result.outcome] += 1
        except StoreError as exc:
            outcomes["failed"] += 1
            reasons[f"0x{exc.status:04X} {type(exc).__name__}"] += 1
            log.warning("import %s failed 0x%04X: %s", path, exc.status, exc)

    with tqdm(total=len(files), unit="file", disable=not progress, desc="import") as bar, \
            ThreadPoolExecutor(max_workers=jobs) as pool:
        for _ in pool.map(one, files):
            bar.update()
    print(f"import: {len(files)} files: " + ", ".join(f"{count} {name}" for name, count in
                                                      sorted(outcomes.items())))
    for reason, count in reasons.most_common():
        print(f"  failed {count}× {reason}")
    return outcomes["failed"]


def reindex(services: Services, *, progress: bool) -> int:
    """Rebuild the index from the stored blobs (run with the gateway stopped)."""
    services.storage.clear_staging()
    try:
        keys = list(services.storage.keys())
    except OSError as exc:  # e.g. an S3 bucket that cannot be listed now: nothing changed
        print(f"imaging-gateway: reindex: the stored blobs cannot be listed: {exc}",
              file=sys.stderr)
        return 1
    services.index.clear()
    failures = 0
    for key in tqdm(keys, unit="file", disable=not progress, desc="reindex"):
        try:
            services.ingest.index_blob(key)
        except (StoreError, OSError) as exc:
            failures += 1
            log.warning("reindex %s failed: %s", key, exc)
    counts = services.index.counts()
    print(f"reindex: {len(keys)} blobs, {failures} failed; index now holds "
          + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return failures


# -- main -----------------------------------------------------------------------------------------
def publish_command(services: Services, *, failed: bool, replay: bool,
                    study: str | None) -> int:
    """``imaging-gateway publish``: the operator's view of the FHIR outbox."""
    if replay:
        count = services.index.replay(study)
        print(f"{count} stud{'y' if count == 1 else 'ies'} queued for publishing; a running "
              "gateway publishes them within seconds")
        return 0
    if study is not None and not failed:
        if services.publisher is None:
            print("imaging-gateway: publish: fhir.base_url is not set", file=sys.stderr)
            return 2
        from fhir_maps import MappingError
        from gateway.errors import FhirError

        try:
            written = services.publisher.publish(study)
        except (FhirError, MappingError) as exc:
            print(f"imaging-gateway: publish: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(written, indent=2) if written else "nothing to publish or retract")
        return 0
    rows = services.index.outbox_rows(states=("failed",) if not study else None,
                                      study_uid=study)
    waiting = [r for r in services.index.outbox_rows(states=("pending",))
               if r["last_error"]] if not study else []
    for row in [*rows, *waiting]:
        print(f"{row['StudyInstanceUID']}  {row['state']:<10} attempts={row['attempts']}  "
              f"{row['last_error'] or ''}")
    if not rows and not waiting:
        print("no failed studies")
    return 1 if rows else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imaging-gateway", description=__doc__.split("\n")[0])
    parser.add_argument("--config", "-c", help="TOML configuration file")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the DICOM and HTTP servers")
    serve_cmd.add_argument("--config", "-c", dest="sub_config", help="TOML configuration file")
    imp = commands.add_parser("import", help="bulk-import a folder tree of DICOM files")
    imp.add_argument("--config", "-c", dest="sub_config", help="TOML configuration file")
    imp.add_argument("paths", nargs="+", help="files or folders to import")
    imp.add_argument("--jobs", "-j", type=int, default=4, help="parallel files (default 4)")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar")
    pub = commands.add_parser(
        "publish", help="FHIR publishing: list failures, replay them, publish a study now")
    pub.add_argument("--config", "-c", dest="sub_config", help="TOML configuration file")
    pub.add_argument("--failed", action="store_true",
                     help="list studies whose publishing failed (with the reason) or waits")
    pub.add_argument("--replay", action="store_true",
                     help="retry every failed study (or only --study) as soon as possible")
    pub.add_argument("--study", help="one Study Instance UID: with --replay, queue it; alone, "
                                     "publish it now and print the ImagingStudy")
    rei = commands.add_parser("reindex", help="rebuild the index from the stored files")
    rei.add_argument("--config", "-c", dest="sub_config", help="TOML configuration file")
    rei.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(getattr(args, "sub_config", None) or args.config)
    except ConfigError as exc:
        print(f"imaging-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "import":
        missing = [name for name in args.paths if not os.path.exists(name)]
        if missing:
            print(f"imaging-gateway: import: no such file or directory: {missing[0]}",
                  file=sys.stderr)
            return 2
    setup_logging(settings)
    try:
        if args.command == "serve":
            _end_process(serve(settings))
        from gateway.bootstrap import build_services

        services = build_services(settings)
        try:
            if args.command == "import":
                failed = import_paths(services, args.paths, jobs=max(1, args.jobs),
                                      progress=not args.no_progress)
            elif args.command == "publish":
                return publish_command(services, failed=args.failed, replay=args.replay,
                                       study=args.study)
            else:
                failed = reindex(services, progress=not args.no_progress)
        finally:
            services.close()
        return 1 if failed else 0
    except ConfigError as exc:
        print(f"imaging-gateway: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
