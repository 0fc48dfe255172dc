"""The HTTP server (gateway.http_server) against RFC 9112 §9 (connection management), on a real
gateway process: persistent connections, what an early answer does to a connection whose
request body is still unread, the access log, and a stop with idle connections open."""

from __future__ import annotations

import http.client
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pydicom

from conftest import GatewayProcess
from samples import fresh_copies, stored_path


def _get(conn: http.client.HTTPConnection, path: str) -> http.client.HTTPResponse:
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    return response


def test_an_http11_connection_persists_across_requests(gateway: GatewayProcess) -> None:
    """RFC 9112 §9.3: HTTP/1.1 connections persist unless either side says close. A viewer's
    QIDO-RS and WADO-RS requests reuse one connection instead of paying a new one each."""
    conn = http.client.HTTPConnection("127.0.0.1", gateway.http_port, timeout=10)
    try:
        first = _get(conn, "/healthz")
        sock = conn.sock
        assert first.status == 200 and not first.will_close
        assert (first.getheader("Connection") or "").lower() != "close"
        second = _get(conn, "/dicomweb/studies")
        assert second.status == 200 and not second.will_close
        assert conn.sock is sock  # the same socket: http.client did not reconnect
    finally:
        conn.close()


def test_a_client_asking_to_close_gets_the_connection_closed(gateway: GatewayProcess) -> None:
    """RFC 9112 §9.6: a request with "Connection: close" is the last on its connection."""
    with socket.create_connection(("127.0.0.1", gateway.http_port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" in answer.lower()


def test_an_early_answer_to_a_large_unread_upload_closes_the_connection(
        gateway: GatewayProcess) -> None:
    """A STOW-RS of the wrong media type is answered 415 without reading its body. The server
    must not read the rest of a large declared body just to keep the connection (RFC 9112
    §9.6 lets it close instead): the answer comes at once, says close, and the connection
    ends, however much the client claimed it would send."""
    declared = 200 * 1024 * 1024
    head = (f"POST /dicomweb/studies HTTP/1.1\r\nHost: gw\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {declared}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", gateway.http_port), timeout=10) as sock:
        sock.sendall(head + b"x" * 65536)
        started = time.monotonic()
        answer = _read_until_closed(sock)  # a socket timeout here fails the test
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 415 "), answer[:200]
    assert b"connection: close" in answer.lower()
    assert waited < 5, f"the server waited {waited:.1f} s for a body it did not need"


def test_an_early_answer_to_a_small_upload_keeps_the_connection(
        gateway: GatewayProcess) -> None:
    """The same 415 to a body that has fully arrived: the server reads past it (RFC 9112 §9.3
    needs the next request to start where this body ends) and the connection stays open."""
    conn = http.client.HTTPConnection("127.0.0.1", gateway.http_port, timeout=10)
    try:
        conn.request("POST", "/dicomweb/studies", body=b"x" * 300_000,
                     headers={"Content-Type": "text/plain"})
        refused = conn.getresponse()
        refused.read()
        sock = conn.sock
        assert refused.status == 415 and not refused.will_close
        assert _get(conn, "/healthz").status == 200
        assert conn.sock is sock
    finally:
        conn.close()


def test_each_request_is_logged_once_answered(gateway: GatewayProcess) -> None:
    """The access log: client, request line, status, bytes sent, milliseconds."""
    conn = http.client.HTTPConnection("127.0.0.1", gateway.http_port, timeout=10)
    try:
        _get(conn, "/healthz?probe=1")
        _get(conn, "/no/such/path")  # 404
    finally:
        conn.close()
    deadline = time.monotonic() + 5
    while '"GET /no/such/path HTTP/1.1" 404' not in gateway.log \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in gateway.log.splitlines() if "gateway.http" in line]
    assert any('127.0.0.1 "GET /healthz?probe=1 HTTP/1.1" 200 ' in line and line.endswith(" ms")
               for line in lines), lines[-5:]
    assert any('"GET /no/such/path HTTP/1.1" 404' in line for line in lines)


def test_a_stop_does_not_wait_for_idle_keep_alive_connections(gateway: GatewayProcess) -> None:
    """An idle persistent connection holds no request: SIGTERM ends the gateway at once, and
    the idle client sees its connection closed."""
    conn = http.client.HTTPConnection("127.0.0.1", gateway.http_port, timeout=10)
    try:
        assert _get(conn, "/healthz").status == 200
        started = time.monotonic()
        assert gateway.stop() == 0
        assert time.monotonic() - started < 5
        assert conn.sock is not None and conn.sock.recv(1) == b""
    finally:
        conn.close()


def test_a_stop_lets_a_request_in_progress_finish(gateway: GatewayProcess,
                                                 tmp_path: Path) -> None:
    """SIGTERM stops taking requests but lets those running finish: a STOW-RS upload half
    sent when the signal comes is completed, answered 200 and stored."""
    (path,) = fresh_copies(tmp_path, 1)
    boundary = "gw-stop-test"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode())
    head = (f"POST /dicomweb/studies HTTP/1.1\r\nHost: gw\r\nContent-Type: multipart/related; "
            f'type="application/dicom"; boundary={boundary}\r\n'
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", gateway.http_port), timeout=30) as sock:
        sock.sendall(head + body[:1000])
        time.sleep(0.3)  # the request is being served (its body is being read)
        stopping = threading.Thread(target=gateway.stop)
        stopping.start()
        deadline = time.monotonic() + 10
        while "received: draining" not in gateway.log and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "received: draining" in gateway.log
        time.sleep(1.5)  # a stop takes ~0.15 s when nothing holds it
        sock.sendall(body[1000:])
        answer = _read_until_closed(sock)
        stopping.join(60)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert gateway.process is not None and gateway.process.returncode == 0
    sop_uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    assert stored_path(gateway.data, sop_uid) is not None
    with sqlite3.connect(gateway.index_file) as db:
        assert db.execute("SELECT 1 FROM instance WHERE SOPInstanceUID = ?",
                          (sop_uid,)).fetchone() is not None


def _read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)
