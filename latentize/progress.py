"""Live progress of a run: a driver thread that logs where the run stands at a steady interval.

The driver spends the run inside Ray Data's iterator, which hands over stage reports only as
shards' rows are staged: nothing arrives while the encoder pool starts (a process per actor,
torch, the weights), nor while a long shard is read. A thread of its own therefore logs, from
the start of the execution and every ``every_s`` seconds: shards committed of those to do,
samples staged so far (encoded and failed), images encoded per second since the start, and the
time left at the pace of the shards committed so far.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

__all__ = ["Progress", "ProgressSource", "format_duration"]

logger = logging.getLogger(__name__)


class ProgressSource(Protocol):
    """What the progress line reads (:class:`latentize.sinks.Committer` provides it)."""

    shards_done: int

    def staged(self) -> tuple[int, int]:
        """Samples encoded and failed so far."""
        ...


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Logs a progress line every ``every_s`` seconds from :meth:`start` until :meth:`stop`.

    Args:
        source: the counters (read from this thread; plain integers, so a line may be a
            moment behind, never wrong by more).
        shards: shards this run has to commit.
        every_s: seconds between lines.
    """

    def __init__(self, source: ProgressSource, *, shards: int, every_s: float) -> None:
        self._source = source
        self._shards = shards
        self._every_s = every_s
        self._started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="latentize-progress", daemon=True)

    def start(self) -> None:
        self._started = time.time()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def line(self, now: float | None = None) -> str:
        """The progress line at ``now`` (epoch seconds; default: now)."""
        elapsed = max((now if now is not None else time.time()) - self._started, 1e-9)
        encoded, failed = self._source.staged()
        done = self._source.shards_done
        if done >= self._shards:
            eta = "0s"
        elif done:
            eta = format_duration(elapsed / done * (self._shards - done))
        else:
            eta = "unknown (no shard committed yet)"
        return (
            f"progress: {done}/{self._shards} shards committed, {encoded + failed} samples "
            f"({encoded} encoded, {failed} failed), {encoded / elapsed:.1f} img/s, "
            f"{format_duration(elapsed)} elapsed, ETA {eta}"
        )

    def _loop(self) -> None:
        while not self._stop.wait(self._every_s):
            logger.info("%s", self.line())
