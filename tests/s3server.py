"""moto's S3 server on loopback, with every request it answers recorded at the server.

Request budgets are checked where the requests arrive: a WSGI middleware in front of moto's
own application sees each one (from the driver and from every Ray worker alike), so nothing in
fsspec or s3fs is mocked or patched.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

__all__ = ["CountingS3Server", "Request"]


@dataclass(frozen=True)
class Request:
    """One S3 request as the server saw it."""

    method: str
    path: str
    query: dict[str, list[str]]
    body_bytes: int
    copy_source: str | None

    @property
    def kind(self) -> str:
        """``get``, ``head``, ``put``, ``copy``, ``list``, ``bulk_delete``, ``delete`` or ``other``."""
        bucket_only = self.path.strip("/").count("/") == 0
        if self.method == "GET" and bucket_only:
            return "list"
        if self.method == "POST" and "delete" in self.query:
            return "bulk_delete"
        if self.method == "PUT" and self.copy_source:
            return "copy"
        return {"GET": "get", "HEAD": "head", "PUT": "put", "DELETE": "delete"}.get(self.method, "other")


class CountingS3Server(ThreadedMotoServer):
    """A :class:`ThreadedMotoServer` on an ephemeral loopback port that records requests."""

    def __init__(self) -> None:
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self._lock = threading.Lock()
        self._requests: list[Request] = []

    def _server_entry(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server(
            self._ip_address, self._port, self._recording(app), True, request_handler=MotoRequestHandler
        )
        self._server_ready_event.set()
        self._server.serve_forever()

    def _recording(self, app: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            request = Request(
                method=environ["REQUEST_METHOD"],
                path=environ.get("PATH_INFO", ""),
                query=parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True),
                body_bytes=int(environ.get("CONTENT_LENGTH") or 0),
                copy_source=environ.get("HTTP_X_AMZ_COPY_SOURCE"),
            )
            with self._lock:
                self._requests.append(request)
            return app(environ, start_response)

        return wrapped

    @property
    def endpoint(self) -> str:
        host, port = self.get_host_and_port()
        return f"http://{host}:{port}"

    def requests(self) -> list[Request]:
        """The requests since the start or the last :meth:`reset`."""
        with self._lock:
            return list(self._requests)

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
