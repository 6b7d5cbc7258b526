"""Retry with exponential back-off for transient object-store errors.

Object stores fail transiently (connection resets, 503 SlowDown, 500 InternalError, request
timeouts) at LAION scale every few thousand requests; such errors are retried, while permanent
ones (missing object, access denied, corrupt data) fail at once so they can be recorded.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["is_transient", "backoff_delay", "retry_call"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_TRANSIENT_TYPES = (ConnectionError, TimeoutError)
# Exception class names of aiohttp / botocore / urllib3 that mean "the connection broke".
_TRANSIENT_NAMES = {
    "ClientConnectionError",
    "ClientOSError",
    "ServerDisconnectedError",
    "ClientPayloadError",
    "ServerTimeoutError",
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "ResponseStreamingError",
    "IncompleteReadError",
    "ProtocolError",
}
# Error codes / messages of S3-compatible stores that ask the client to try again.
_TRANSIENT_TEXT = (
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "Throttl",
    "RequestLimitExceeded",
    "503",
    "Connection reset",
    "Server disconnected",
)


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it wraps) is worth retrying."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _PERMANENT):
            return False
        if isinstance(current, _TRANSIENT_TYPES) or type(current).__name__ in _TRANSIENT_NAMES:
            return True
        if isinstance(current, OSError) and any(t in str(current) for t in _TRANSIENT_TEXT):
            return True
        current = current.__cause__ or current.__context__
    return False


def backoff_delay(attempt: int, *, base_s: float = 0.5, max_s: float = 30.0) -> float:
    """Full-jitter exponential back-off: uniform in [0, min(max_s, base_s * 2**attempt)]."""
    return random.uniform(0, min(max_s, base_s * (2**attempt)))


def retry_call(fn: Callable[[], T], *, attempts: int, what: str, base_s: float = 0.5) -> T:
    """Calls ``fn``; on a transient error retries up to ``attempts`` more times with back-off."""
    for attempt in range(attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if attempt == attempts or not is_transient(exc):
                raise
            delay = backoff_delay(attempt, base_s=base_s)
            logger.warning(
                "%s: transient error (%s: %s); retry %d/%d in %.1fs",
                what,
                type(exc).__name__,
                exc,
                attempt + 1,
                attempts,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
