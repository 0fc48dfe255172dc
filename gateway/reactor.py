"""Event-driven waits for pynetdicom's two polling reactors (pynetdicom 3.0.x).

pynetdicom runs two threads per association and both poll:

* the DUL reactor (``DULServiceProvider.run_reactor``) sleeps ``_run_loop_delay`` (1 ms) after
  every turn that found nothing to do, so a PDU arriving, or a response queued for sending,
  waits up to 1 ms before it is looked at;
* the association reactor (``Association._run_reactor``) sleeps 1 ms before every check for a
  decoded DIMSE message.

On a C-STORE stream from one sender these waits sit on the critical path up to three times per
instance (request seen, handler started, response sent), which is more than dcmtk's storescp
spends on a whole instance (≈2 ms). :func:`install` replaces exactly those two sleeps (and no
other) with waits that end as soon as there is work: ``select()`` on the association's socket
plus a wake-up pipe written when a primitive is queued for sending; and a wait on the DIMSE
message queue's condition. Each wait still times out after a few milliseconds, so every check
the reactors make after sleeping (timers, kill flags, release and abort requests) keeps running.

The association's reactor checkpoint (paused while another thread sends on the association) is
replaced by :class:`_Checkpoint`, which wakes the reactor at once and closes a race in which
the reactor stole the response a sender was waiting for.

The sleeps are found through the thread that calls them (each reactor is its own
``threading.Thread``), so nothing else in pynetdicom changes behaviour. The project pins
pynetdicom 3.0.4; ``tests/test_reactor.py`` fails if the patched internals move.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
import weakref
from typing import Any

from pynetdicom import association as _association
from pynetdicom import dul as _dul
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

_ASSOCIATION_POLL = 0.001  # the literal in Association._run_reactor
DUL_MAX_WAIT = 0.02
ASSOCIATION_MAX_WAIT = 0.01
_real_sleep = time.sleep
_installed = False


class _Wake:
    """A pipe the DUL reactor selects on; written whenever a primitive is queued for it."""

    def __init__(self, owner: object) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        weakref.finalize(owner, _close_fds, self.read_fd, self.write_fd)

    def set(self) -> None:
        # A full pipe is already signalled; a closed one belongs to a finished association.
        with contextlib.suppress(OSError):
            os.write(self.write_fd, b"\0")

    def clear(self) -> None:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _wake_of(dul: Any) -> _Wake:
    wake: _Wake | None = dul.__dict__.get("_gateway_wake")
    if wake is None:
        wake = dul.__dict__.setdefault("_gateway_wake", _Wake(dul))
    return wake


def _dul_wait(dul: Any) -> None:
    """Wait until the socket has data or a primitive is queued (or DUL_MAX_WAIT passes)."""
    wake = _wake_of(dul)
    if not dul.to_provider_queue.empty() or not dul.event_queue.empty():
        return
    transport = dul.socket
    sock = getattr(transport, "socket", None)
    waiting_on: list[Any] = [wake.read_fd]
    if sock is not None:
        pending = getattr(sock, "pending", None)  # TLS may hold decrypted bytes already
        if pending is not None and pending():
            return
        try:
            if sock.fileno() >= 0:
                waiting_on.append(sock)
        except OSError:
            pass
    try:
        select.select(waiting_on, [], [], DUL_MAX_WAIT)
    except (OSError, ValueError):
        _real_sleep(dul._run_loop_delay)
    wake.clear()


def _association_wait(assoc: Any) -> None:
    """Wait until a decoded DIMSE message is queued (or ASSOCIATION_MAX_WAIT passes)."""
    queue = assoc.dimse.msg_queue
    with queue.not_empty:
        if not queue._qsize() and not assoc._kill:
            queue.not_empty.wait(ASSOCIATION_MAX_WAIT)
        if queue._qsize():
            # Pass the wake-up on: a concurrent blocking get() on the same queue must not
            # miss the notification this wait may have consumed.
            queue.not_empty.notify()


class _Checkpoint(threading.Event):
    """``Association._reactor_checkpoint`` without its two races.

    A thread about to send on an association (``send_c_store`` of a C-MOVE sub-operation,
    ``release``…) clears the checkpoint and spins until the reactor says it is paused. With the
    waits above the reactor could sit in :func:`_association_wait` for its whole timeout first
    (10 ms a sub-operation), so :meth:`clear` wakes it. And the reactor could return from
    ``wait()`` on a set flag, be seen as "paused" by a sender that clears just then, and go on
    to take the sender's response off the DIMSE queue ("unexpected C-STORE service message",
    then a timeout): :meth:`wait` marks the reactor running *before* it re-checks the flag, and
    pauses again if the flag was cleared meanwhile.

    While parked, the reactor re-marks itself paused every ``ASSOCIATION_MAX_WAIT``: pynetdicom
    serves an N-EVENT-REPORT request on a thread of its own (``DIMSEServiceProvider.
    receive_primitive``), whose ``Association._serve_request`` sets ``_is_paused = True`` before
    the handler and ``False`` after it. That ``False`` can land after the reactor parked here, and
    a sender that cleared the checkpoint (``release()`` right after the report's handler ran)
    then spins on ``_is_paused`` forever while the reactor waits for a ``set()`` that only the
    sender would make. ``set()`` still wakes the reactor at once.
    """

    def __init__(self, assoc: Any) -> None:
        super().__init__()
        self._assoc = weakref.ref(assoc)

    def clear(self) -> None:
        super().clear()
        assoc = self._assoc()
        dimse = getattr(assoc, "dimse", None) if assoc is not None else None
        if dimse is not None:
            queue = dimse.msg_queue
            with queue.not_empty:
                queue.not_empty.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        assoc: Any = self._assoc()
        if assoc is None or threading.current_thread() is not assoc:
            return super().wait(timeout)
        reactor: Any = assoc  # the reactor thread itself
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if not self._parked(reactor, deadline):
                return False
            reactor._is_paused = False
            if self.is_set():
                return True
            reactor._is_paused = True

    def _parked(self, reactor: Any, deadline: float | None) -> bool:
        """Wait for the flag as the paused reactor, re-marking it paused at each turn (another
        thread may have overwritten ``_is_paused``, see the class doc); False on timeout."""
        while True:
            turn = ASSOCIATION_MAX_WAIT
            if deadline is not None:
                turn = min(turn, deadline - time.monotonic())
                if turn <= 0:
                    return self.is_set()
            if super().wait(turn):
                return True
            reactor._is_paused = True


class _TimeShim:
    """Stands in for the ``time`` module inside pynetdicom's dul and association modules."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        thread = threading.current_thread()
        if isinstance(thread, DULServiceProvider) and seconds == thread._run_loop_delay:
            _dul_wait(thread)
        elif isinstance(thread, Association) and seconds == _ASSOCIATION_POLL and \
                getattr(thread, "dimse", None) is not None:
            _association_wait(thread)
        else:
            _real_sleep(seconds)


def install() -> None:
    """Patch pynetdicom's reactors (idempotent, process-wide)."""
    global _installed
    if _installed:
        return
    shim = _TimeShim()
    setattr(_dul, "time", shim)  # noqa: B010
    setattr(_association, "time", shim)  # noqa: B010
    original_send_pdu = DULServiceProvider.send_pdu

    def send_pdu(self: Any, primitive: Any) -> None:
        original_send_pdu(self, primitive)
        _wake_of(self).set()

    DULServiceProvider.send_pdu = send_pdu  # type: ignore[method-assign]
    original_init = Association.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self._reactor_checkpoint = _Checkpoint(self)
        self._reactor_checkpoint.set()

    Association.__init__ = init  # type: ignore[method-assign]
    _installed = True
