"""Receiver processes (``dimse.workers`` > 1): more than one core for DICOM storage.

Python runs one thread at a time per process, so one process serves at most about one core's
worth of associations. With ``dimse.workers = N`` the gateway runs N - 1 receiver processes
beside the main one. The main process still accepts every connection and routes it
(:meth:`gateway.dimse.DimseNode._route`); a storage association (nothing proposed but
Verification and Storage SOP classes) goes to whichever process, the main one included, has
the fewest associations open: its socket is passed over a UNIX socket pair (``SCM_RIGHTS``),
untouched (the A-ASSOCIATE-RQ is still unread, the called AE title already checked), and the
receiving process serves it with the lean Upper Layer exactly as the main one would. Every
process writes the one index (writers queue across processes, see ``gateway.index``) and the
one storage, through the same write path. Query/retrieve and Storage Commitment stay in the
main process, so a receiver process loads only the write path (less memory per process).

Why hand sockets over instead of letting each process accept on a shared port
(``SO_REUSEPORT``): the kernel spreads connections by a hash of their addresses, so four
associations from one modality could all land on the same process; the least-busy choice
spreads them evenly.

A receiver process is ``python -m gateway.workers NAME FD`` (started with ``subprocess``, not
``multiprocessing``, whose spawn start method adds a resource-tracker process). The control
protocol on its socket pair (``SOCK_SEQPACKET``: one message per packet): the parent sends the
pickled :class:`~gateway.config.Settings`; the worker answers ``R`` once its write path is
open; then the parent sends ``A`` + JSON address with the socket attached, or ``S`` to stop
(finish open associations, then exit); the worker answers ``D`` for each association ended.
A worker that reads end-of-file (the main process died) aborts its associations and exits,
so no receiver outlives the gateway. Workers ignore SIGTERM and SIGINT (a service manager or a
terminal signals every process of the gateway at once): stopping is the main process's call.

The main process launches its workers before it loads its own libraries (``gateway.cli``),
and sends the settings once it has opened the index: both processes load meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.config import Settings, setup_logging

log = logging.getLogger("gateway.workers")


@dataclass
class _Worker:
    name: str
    process: Any
    control: socket.socket
    open: int = 0
    alive: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)


class ReceiverStartError(RuntimeError):
    """A receiver process could not be launched or did not open its write path."""


class ReceiverPool:
    """The N - 1 receiver processes of the main one, and the choice of who serves what."""

    def __init__(self, count: int, local_load: Any) -> None:
        """Launch ``count`` receiver processes (they load their libraries at once, then wait
        for :meth:`start`); ``local_load()`` is the number of associations the main process
        has open."""
        self.local_load = local_load
        self._lock = threading.Lock()
        self._turn = 0
        self.workers: list[_Worker] = []
        for number in range(count):
            name = f"dimse-{number + 1}"
            parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                process = subprocess.Popen([sys.executable, "-m", "gateway.workers", name,
                                            str(child.fileno())], pass_fds=[child.fileno()])
            except OSError as exc:
                parent.close()
                self.stop(0)
                raise ReceiverStartError(f"receiver process {name} could not be started: {exc}") \
                    from exc
            finally:
                child.close()
            self.workers.append(_Worker(name, process, parent))

    def start(self, settings: Settings) -> None:
        """Hand each receiver process the settings (once the index exists: a receiver opens
        it, never creates it) and wait until each has opened its write path. Raises
        ``ReceiverStartError`` (after stopping them all) when one does not."""
        for worker in self.workers:
            reply = b""
            with contextlib.suppress(OSError):
                worker.control.sendall(pickle.dumps(settings))
                worker.control.settimeout(_START_TIMEOUT)
                reply = worker.control.recv(16)
                worker.control.settimeout(None)
            if reply != b"R":
                self.stop(0)
                raise ReceiverStartError(f"receiver process {worker.name} did not start (exit "
                                         f"code {worker.process.poll()}); see its log lines "
                                         "above")
        for worker in self.workers:
            threading.Thread(target=self._listen, args=(worker,), daemon=True,
                             name=f"{worker.name}-control").start()

    def _listen(self, worker: _Worker) -> None:
        """Count the associations ``worker`` reports ended; notice when it dies."""
        while True:
            try:
                data = worker.control.recv(4096)
            except OSError:
                data = b""
            if not data:
                with self._lock:
                    worker.alive = False
                    worker.open = 0
                if worker.process.poll() not in (None, 0):
                    log.error("receiver process %s exited with %s", worker.name,
                              worker.process.returncode)
                return
            with self._lock:
                worker.open = max(0, worker.open - 1)

    def hand_off(self, sock: socket.socket, address: tuple[str, int]) -> bool:
        """Give ``sock`` to the least busy receiver process; False when that is the main
        process (or no worker can take it): it then serves the association itself."""
        with self._lock:
            # Least busy first; among equals, take turns (so sequential associations, each
            # finished before the next, spread too). None stands for the main process.
            candidates: list[_Worker | None] = [None, *(w for w in self.workers if w.alive)]
            self._turn = (self._turn + 1) % len(candidates)
            turns = candidates[self._turn:] + candidates[:self._turn]
            local = self.local_load()
            chosen = min(turns, key=lambda w: local if w is None else w.open)
            if chosen is None:
                return False
            chosen.open += 1
        payload = b"A" + json.dumps([address[0], address[1]]).encode()
        try:
            with chosen.lock:
                socket.send_fds(chosen.control, [payload], [sock.fileno()])
        except OSError as exc:
            log.warning("could not hand an association to %s (%s); serving it here",
                        chosen.name, exc)
            with self._lock:
                chosen.open -= 1
            return False
        sock.close()  # the worker has its own descriptor now
        return True

    def stop(self, drain_seconds: float = 30.0) -> None:
        """Let every worker finish its open associations (up to ``drain_seconds``), then
        make sure each has exited."""
        for worker in self.workers:
            with contextlib.suppress(OSError), worker.lock:
                worker.control.sendall(b"S")
        deadline = time.monotonic() + drain_seconds + 10
        for worker in self.workers:
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("receiver process %s still running; terminating it", worker.name)
                worker.process.terminate()
                try:
                    worker.process.wait(5)
                except subprocess.TimeoutExpired:
                    worker.process.kill()
                    worker.process.wait()
            worker.control.close()


_START_TIMEOUT = 60.0


#: Libraries pydicom loads when it can, for pixel data and downloads, that a receiver process
#: never needs (about 20 MB a process): kept out of receiver processes.
NOT_IN_RECEIVERS = ("numpy", "PIL", "requests")


def _without_optional_libraries() -> None:
    """Make importing :data:`NOT_IN_RECEIVERS` fail in this process, as if they were not
    installed (pydicom then runs without them, as it supports)."""
    for module in NOT_IN_RECEIVERS:
        if module not in sys.modules:
            sys.modules[module] = None  # type: ignore[assignment]


def _worker_main(name: str, control: socket.socket) -> None:
    """A receiver process: serve each storage association handed over until told to stop."""
    import multiprocessing

    _without_optional_libraries()
    multiprocessing.current_process().name = name  # %(processName)s in its log lines
    # Stopping is the main process's to decide (it sends S, then waits for the drain): a
    # service manager or a terminal signals every process of the gateway at once, and a
    # receiver dying on it would abort the associations it is draining.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Loaded before the settings come: meanwhile the main process loads its own and opens
    # the index (receiver processes start first, see ``gateway.cli.serve``).
    from gateway import metrics, receiver
    from gateway.bootstrap import build_write_path, settle_heap

    pickled = control.recv(1 << 20)
    if not pickled or pickled == b"S":  # the main process gave up starting (or died)
        return
    settings: Settings = pickle.loads(pickled)  # from our own parent
    setup_logging(settings)
    storage, index, ingest = build_write_path(settings, create_schema=False)
    metrics.prepare()
    receiver.ReceiveSink.stage_into(storage)
    # The main process has checked the called AE title (ours or a cohort's) before handing over.
    policy = receiver.Policy.of(settings.dimse, receiver.storage_contexts(),
                                check_called_ae=False)
    store = receiver.storing_into(ingest, index_after_response=True)
    send_lock = threading.Lock()
    threads: list[threading.Thread] = []

    def serve(sock: socket.socket, address: tuple[str, int]) -> None:
        try:
            receiver.serve_association(sock, address, policy, store)
        finally:
            with contextlib.suppress(OSError), send_lock:
                control.sendall(b"D")

    settle_heap()
    control.sendall(b"R")
    while True:
        try:
            message, fds, _flags, _addr = socket.recv_fds(control, 4096, 1)
        except OSError:
            message, fds = b"", []
        if not message:  # the main process is gone: nobody will wait for us
            log.warning("main process gone; aborting %d open associations",
                        len(receiver.active_associations()))
            receiver.abort_all()
            break
        if message == b"S":
            break
        if message.startswith(b"A") and fds:
            host, port = json.loads(message[1:])
            sock = socket.socket(fileno=fds[0])
            thread = threading.Thread(target=serve, args=(sock, (host, int(port))),
                                      name=f"assoc-{host}:{port}", daemon=True)
            thread.start()
            threads = [t for t in threads if t.is_alive()] + [thread]
        else:
            for fd in fds:
                with contextlib.suppress(OSError):
                    socket.socket(fileno=fd).close()
    deadline = time.monotonic() + 30
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    receiver.abort_all()
    index.close()
    storage.close()


if __name__ == "__main__":
    _worker_main(sys.argv[1], socket.socket(fileno=int(sys.argv[2])))
    # Everything is closed: skip the interpreter's teardown (the main process waits for it).
    logging.shutdown()
    os._exit(0)
