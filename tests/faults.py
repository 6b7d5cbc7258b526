"""A fault-injecting HTTP proxy that sits between s3fs and moto's S3 server (both on loopback).

s3fs talks to the proxy as its ``endpoint_url``; the proxy forwards every request to moto and,
by rule, answers some of them itself: ``503 SlowDown`` (what S3 says when throttling), a reset
connection, or a permanent ``403 AccessDenied``. fsspec/s3fs themselves are never mocked.
"""

from __future__ import annotations

import http.client
import re
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

__all__ = ["FaultRule", "FaultyProxy"]

_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>'
)


@dataclass
class FaultRule:
    """Fail requests whose ``METHOD path`` matches ``pattern``.

    Attributes:
        pattern: regex searched in e.g. ``"GET /bucket/in/00001.tar"``.
        kind: ``slowdown`` (503), ``reset`` (connection closed with RST) or ``deny`` (403).
        times: how many matching requests fail (None: all of them).
        every: fail only every n-th matching request.
    """

    pattern: str
    kind: str
    times: int | None = None
    every: int = 1
    seen: int = 0
    failed: int = 0

    def fires(self, line: str) -> bool:
        if not re.search(self.pattern, line):
            return False
        self.seen += 1
        if self.times is not None and self.failed >= self.times:
            return False
        if self.seen % self.every:
            return False
        self.failed += 1
        return True


@dataclass
class FaultyProxy:
    """Threaded proxy in front of ``upstream`` (``http://host:port``) on an ephemeral port."""

    upstream: str
    rules: list[FaultRule] = field(default_factory=list)

    def __post_init__(self) -> None:
        target = urlparse(self.upstream)
        proxy = self
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _handle(self) -> None:
                body = b""
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    body = self.rfile.read(length)
                elif "chunked" in (self.headers.get("Transfer-Encoding") or ""):
                    body = self._read_chunked()
                line = f"{self.command} {self.path}"
                with lock:
                    rule = next((r for r in proxy.rules if r.fires(line)), None)
                if rule is not None and rule.kind == "reset":
                    # SO_LINGER 0 makes close() send RST: the client sees "connection reset".
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if rule is not None:
                    status, payload = (503, _SLOWDOWN) if rule.kind == "slowdown" else (403, _DENIED)
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":  # a HEAD response never has a body
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                # HEAD has no body, but its Content-Length is the object's size: keep upstream's.
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _read_chunked(self) -> bytes:
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def failures(self) -> Iterator[tuple[str, int]]:
        for rule in self.rules:
            yield rule.pattern, rule.failed
