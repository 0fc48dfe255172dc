"""The HTTP server: cheroot's thread pool serving the WSGI application on the gateway's socket.

Why not werkzeug's server (Flask's development server, which the gateway used before): it
closes every connection after one response, so each QIDO-RS or WADO-RS request of a viewer
paid a new TCP connection and a new thread (1 ms of a 5-6 ms QIDO-RS answer here), and it
starts a thread per connection without limit. cheroot (CherryPy's server) keeps HTTP/1.1
connections alive (an idle one waits in a selector, not in a thread), serves requests from a
bounded pool (``http.threads``), and streams request and response bodies (STOW-RS uploads go
to staging as they arrive; WADO-RS answers leave as they are read from disk).

Three adjustments, each small:

* **the socket**: the gateway binds it itself, so a taken port is a configuration error
  (:func:`gateway.cli._bound`); :class:`Server` adopts it instead of binding its own.
* **writes**: a response chunk goes out with one ``socket.sendall``. cheroot's own writer
  copies its whole pending buffer again after every partial send, which a 1 MiB WADO-RS chunk
  meets on every call (the socket buffer is smaller): WADO-RS took ~20% longer with it.
* **an unread request body**: to keep a connection open after answering early (415 on a
  STOW-RS of the wrong type, 413 on one too large), cheroot reads whatever of the body is
  left into memory at once, up to its declared length, however large. :class:`_Gateway`
  instead reads and discards it a MiB at a time, for as long as it keeps arriving (each read
  waits at most :data:`DRAIN_PATIENCE`) and up to ``http.max_request_bytes`` plus
  :data:`DRAIN_SLACK`; then answers. A client still sending thus sees the answer, not a
  connection reset (closing with unread data resets it, and the reset can overtake the
  answer). A body that stops arriving, goes on past that or is declared longer (not read at
  all) closes the connection after the answer.

Each request is logged (logger ``gateway.http``, INFO) once its answer is sent: client,
request line, status, bytes and milliseconds.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from cheroot import server as cheroot_server
from cheroot import wsgi
from cheroot.makefile import MakeFile

log = logging.getLogger("gateway.http")

#: Idle keep-alive connections kept open at once (cheroot's default is 10); more are closed
#: after their response, and their clients simply connect again.
KEEP_ALIVE_CONNECTIONS = 256
#: Longest wait for more of a request body being discarded (see the module docstring).
DRAIN_PATIENCE = 2.0
#: Discarded beyond ``http.max_request_bytes``, so that a body refused as too large (413)
#: is still read to its end when it is only somewhat larger.
DRAIN_SLACK = 64 * 1024 * 1024


class _SendallWriter:
    """The response side of a connection: each write is one ``sendall`` (see the module
    docstring); counts what it wrote, as cheroot's statistics expect."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.bytes_written = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        self._sock.sendall(data)
        self.bytes_written += len(data)
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered."""

    def close(self) -> None:
        self.closed = True


def _make_file(sock: socket.socket, mode: str, bufsize: int) -> Any:
    """cheroot's reader, and :class:`_SendallWriter` in place of its writer."""
    return MakeFile(sock, mode, bufsize) if "r" in mode else _SendallWriter(sock)


class _Connection(cheroot_server.HTTPConnection):
    def __init__(self, server: Any, sock: socket.socket, makefile: Any = None) -> None:
        super().__init__(server, sock, _make_file)


class _Gateway(wsgi.Gateway_10):
    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Callable[[bytes], None]:
        write = super().start_response(status, headers, exc_info)
        if _body_left(self.req) and not _discard_body(self.req, self.req.server.drain_limit):
            self.req.close_connection = True
        return write  # type: ignore[no-any-return]


def _body_left(request: Any) -> bool:
    """Whether the application answers before it has read the whole request body."""
    body = request.rfile
    if request.chunked_read:
        return not getattr(body, "closed", True)
    return bool(getattr(body, "remaining", 0))


def _discard_body(request: Any, limit: int) -> bool:
    """Read and drop the rest of the request body while it keeps arriving, up to ``limit``
    bytes; True once all of it is read. A body declared longer is not read at all."""
    if getattr(request.rfile, "remaining", 0) > limit:
        return False
    sock = request.conn.socket
    timeout = sock.gettimeout()
    sock.settimeout(DRAIN_PATIENCE)
    dropped = 0
    try:
        while dropped < limit:
            data = request.rfile.read(min(1 << 20, limit - dropped))
            if not data:
                break
            dropped += len(data)
    except Exception:  # a timeout, a reset, a malformed chunk: stop reading
        return False
    finally:
        sock.settimeout(timeout)
    return not _body_left(request)


class Server(wsgi.Server):
    """cheroot's WSGI server on an already bound, listening socket."""

    def __init__(self, app: Callable[..., Iterable[bytes]], sock: socket.socket, *,
                 threads: int, read_timeout: int, shutdown_timeout: int,
                 max_request_bytes: int) -> None:
        super().__init__(sock.getsockname()[:2], app, numthreads=threads,
                         server_name="imaging-gateway", timeout=read_timeout,
                         shutdown_timeout=shutdown_timeout, request_queue_size=128)
        self._bound = sock
        #: The most of an unread request body discarded after an early answer.
        self.drain_limit = max_request_bytes + DRAIN_SLACK
        self.gateway = _Gateway
        self.ConnectionClass = _Connection
        self.keep_alive_conn_limit = KEEP_ALIVE_CONNECTIONS

    def bind(self, family: int, type: int, proto: int = 0) -> socket.socket:
        """Adopt the gateway's socket (cheroot would create and bind its own)."""
        self._bound.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket = self._bound
        return self._bound

    def error_log(self, msg: str = "", level: int = logging.INFO,
                  traceback: bool = False) -> None:
        log.log(level, "%s", msg, exc_info=traceback)


class AccessLog:
    """WSGI middleware: one log line per request once its answer is sent."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        started = time.perf_counter()
        status = ["-"]
        sent = 0

        def recording(status_line: str, headers: list[tuple[str, str]],
                      exc_info: Any = None) -> Any:
            status[0] = status_line.split(" ", 1)[0]
            return start_response(status_line, headers, exc_info)

        answer = self.app(environ, recording)
        try:
            for chunk in answer:
                sent += len(chunk)
                yield chunk
        finally:
            if hasattr(answer, "close"):  # WSGI: the server closes what the app returned
                answer.close()
            path = environ.get("PATH_INFO", "")
            if environ.get("QUERY_STRING"):
                path += "?" + environ["QUERY_STRING"]
            log.info('%s "%s %s %s" %s %d %.1f ms', environ.get("REMOTE_ADDR", "-"),
                     environ.get("REQUEST_METHOD", "-"), path,
                     environ.get("SERVER_PROTOCOL", "-"), status[0], sent,
                     (time.perf_counter() - started) * 1000)
