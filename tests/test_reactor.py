"""gateway.reactor's association checkpoint, driven directly from threads."""

from __future__ import annotations

import inspect
import threading
import time

from pynetdicom import dimse as pynetdicom_dimse
from pynetdicom.association import Association

from gateway.reactor import _Checkpoint


class _Reactor(threading.Thread):
    """Stands in for an association's reactor thread: pauses once at the checkpoint as
    ``Association._run_reactor`` does (``_is_paused`` True, ``wait()``, ``_is_paused`` False)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self._is_paused = False
        self.dimse = None
        self.checkpoint = _Checkpoint(self)

    def run(self) -> None:
        self._is_paused = True
        self.checkpoint.wait()
        self._is_paused = False


def test_pynetdicom_serves_n_event_reports_on_a_thread_of_its_own() -> None:
    """The premise of the test below (pynetdicom 3.0.x)."""
    assert "threading.Thread(" in inspect.getsource(
        pynetdicom_dimse.DIMSEServiceProvider.receive_primitive)
    serve = inspect.getsource(Association._serve_request)
    assert "self._is_paused = True" in serve and "self._is_paused = False" in serve


def test_a_sender_sees_the_pause_after_an_n_event_report_thread_unmarked_it() -> None:
    reactor = _Reactor()
    reactor.checkpoint.clear()  # a sender (release()) pauses the reactor
    reactor.start()
    deadline = time.monotonic() + 5
    while not reactor._is_paused:
        assert time.monotonic() < deadline, "the reactor did not pause"
        time.sleep(0.0001)
    # The N-EVENT-REPORT thread's _serve_request ends (its `_is_paused = False`) after the
    # reactor has paused; the sender spins on _is_paused, as release() does.
    reactor._is_paused = False
    deadline = time.monotonic() + 2
    try:
        while not reactor._is_paused:
            assert time.monotonic() < deadline, "the sender would spin on _is_paused forever"
            time.sleep(0.0001)
    finally:
        reactor.checkpoint.set()  # the sender is done: the reactor runs on
        reactor.join(5)
    assert not reactor.is_alive()
    assert not reactor._is_paused


def test_a_timed_wait_on_the_reactor_thread_still_times_out() -> None:
    results: list[bool] = []
    reactor = _Reactor()
    reactor.run = lambda: results.append(reactor.checkpoint.wait(0.05))  # type: ignore[method-assign]
    reactor.checkpoint.clear()
    reactor.start()
    reactor.join(5)
    assert results == [False]  # timed out (nothing set the checkpoint), and returned
