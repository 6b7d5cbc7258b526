"""A fault-injecting HTTP proxy that sits between s3fs and moto's S3 server (both on loopback).

s3fs talks to the proxy as its ``endpoint_url``; the proxy forwards every request to moto and,
by rule, answers some of them itself: ``503 SlowDown`` (what S3 says when throttling), a reset
connection, or a permanent ``403 AccessDenied``. fsspec/s3fs themselves are never mocked.

Two ways to choose the requests that fail: :class:`FaultRule` patterns (a test's exact faults),
or :class:`Chaos` (a soak's seeded random faults at given rates, resets in the middle of a GET's
or a PUT's body, and delays).
"""

from __future__ import annotations

import hashlib
import http.client
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

__all__ = ["Chaos", "FaultRule", "FaultyProxy"]

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
class Chaos:
    """Seeded random faults at fixed rates.

    The fate of a request depends only on ``seed``, its ``METHOD path`` and how many times that
    line was seen before (its attempt), never on how requests from many processes interleave,
    so a rerun with the same seed meets the same faults on the same attempts.

    Attributes:
        seed: the seed.
        slowdown: share of requests answered ``503 SlowDown``.
        reset: share of GETs and PUTs whose connection is reset half-way through the body
            (a GET's response body; a PUT's request body).
        delay: share of requests held ``delay_s`` seconds before they are forwarded.
        counts: faults injected by kind (``slowdown``, ``reset_get``, ``reset_put``, ``delay``)
            and requests seen (``requests``).
    """

    seed: int
    slowdown: float = 0.05
    reset: float = 0.01
    delay: float = 0.02
    delay_s: float = 0.3
    counts: Counter[str] = field(default_factory=Counter)
    _attempts: Counter[str] = field(default_factory=Counter)

    def _draw(self, line: str) -> float:
        attempt = self._attempts[line]
        self._attempts[line] += 1
        digest = hashlib.sha256(f"{self.seed}\0{line}\0{attempt}".encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2**64

    def decide(self, method: str, line: str) -> str | None:
        """``slowdown``, ``reset_mid_body``, ``delay`` or None for one request (callers hold a lock)."""
        self.counts["requests"] += 1
        u = self._draw(line)
        if u < self.slowdown:
            self.counts["slowdown"] += 1
            return "slowdown"
        u -= self.slowdown
        if method in ("GET", "PUT") and u < self.reset:
            self.counts[f"reset_{method.lower()}"] += 1
            return "reset_mid_body"
        u -= self.reset
        if u < self.delay:
            self.counts["delay"] += 1
            return "delay"
        return None


@dataclass
class FaultyProxy:
    """Threaded proxy in front of ``upstream`` (``http://host:port``) on an ephemeral port."""

    upstream: str
    rules: list[FaultRule] = field(default_factory=list)
    chaos: Chaos | None = None

    def __post_init__(self) -> None:
        target = urlparse(self.upstream)
        proxy = self
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _reset(self) -> None:
                # SO_LINGER 0 makes close() send RST: the client sees "connection reset".
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _fault(self) -> str | None:
                line = f"{self.command} {self.path}"
                with lock:
                    rule = next((r for r in proxy.rules if r.fires(line)), None)
                    if rule is not None:
                        return rule.kind
                    return proxy.chaos.decide(self.command, line) if proxy.chaos is not None else None

            def _handle(self) -> None:
                fault = self._fault()
                length = int(self.headers.get("Content-Length") or 0)
                if fault == "reset_mid_body" and self.command == "PUT":
                    self.rfile.read(length // 2)  # the upload breaks half-way through its body
                    self._reset()
                    return
                body = b""
                if length:
                    body = self.rfile.read(length)
                elif "chunked" in (self.headers.get("Transfer-Encoding") or ""):
                    body = self._read_chunked()
                if fault == "reset":
                    self._reset()
                    return
                if fault == "delay" and proxy.chaos is not None:
                    time.sleep(proxy.chaos.delay_s)
                if fault in ("slowdown", "deny"):
                    status, payload = (503, _SLOWDOWN) if fault == "slowdown" else (403, _DENIED)
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":  # a HEAD response never has a body
                        self.wfile.write(payload)
                    return
                self._forward(body, cut=fault == "reset_mid_body")

            def _forward(self, body: bytes, *, cut: bool) -> None:
                """Sends the request to moto and its answer back; with ``cut`` (a chaos reset of
                a GET) the connection is reset half-way through the response body."""
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
                if cut and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self._reset()
                elif self.command != "HEAD":
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
