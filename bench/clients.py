"""A minimal keep-alive HTTP client for the DICOMweb measures.

``http.client`` on one persistent connection (as a viewer would hold one), timing each request
from sending it to the last byte of its body. Bodies of retrievals are read into one reused
1 MiB buffer and counted, not kept, so the client's own cost stays small next to the server's.
"""

from __future__ import annotations

import http.client
import time
from dataclasses import dataclass, field

from bench.targets import HOST


@dataclass
class Reply:
    """One answer: status, selected headers, body (or only its length), seconds taken."""

    status: int
    content_type: str
    body: bytes
    length: int
    seconds: float
    headers: dict[str, str] = field(default_factory=dict)
    """every response header, names in lower case"""


class HttpClient:
    """One keep-alive connection to 127.0.0.1:``port``; reconnects once if the server closed it."""

    def __init__(self, port: int, timeout: float = 120.0) -> None:
        self.port = port
        self.timeout = timeout
        self.conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
        self._buffer = bytearray(1 << 20)

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    def get(self, path: str, accept: str | None = None, *, keep_body: bool = True) -> Reply:
        """GET ``path``; the body is kept (``keep_body``) or only counted."""
        return self.request("GET", path, headers={"Accept": accept} if accept else {},
                            keep_body=keep_body)

    def request(self, method: str, path: str, *, body: bytes | None = None,
                headers: dict[str, str] | None = None, keep_body: bool = True) -> Reply:
        """``method`` ``path`` with ``body``; the answer's body is kept or only counted."""
        headers = headers or {}
        for attempt in (1, 2):
            t0 = time.perf_counter()
            try:
                self.conn.request(method, path, body=body, headers=headers)
                resp = self.conn.getresponse()
                if keep_body:
                    body = resp.read()
                    length = len(body)
                else:
                    body, length = b"", self._drain(resp)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                self.conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
                if attempt == 2:
                    raise
                continue
            seconds = time.perf_counter() - t0
            if resp.will_close:
                self.conn.close()
                self.conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
            return Reply(resp.status, resp.getheader("Content-Type", ""), body, length, seconds,
                         {k.lower(): v for k, v in resp.getheaders()})
        raise AssertionError("unreachable")

    def _drain(self, resp: http.client.HTTPResponse) -> int:
        """Read the whole body into the reused buffer; return its length."""
        view = memoryview(self._buffer)
        total = 0
        while True:
            n = resp.readinto(view)
            if not n:
                return total
            total += n
