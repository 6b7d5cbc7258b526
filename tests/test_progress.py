"""The live progress line: its figures, and a thread that logs it at a steady interval."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import pytest

from latentize.progress import Progress, format_duration


@dataclass
class _Counters:
    shards_done: int = 0
    encoded: int = 0
    failed: int = 0

    def staged(self) -> tuple[int, int]:
        return self.encoded, self.failed


def test_durations_read_as_a_person_would() -> None:
    assert [format_duration(s) for s in (0.4, 42, 185, 7620)] == ["0s", "42s", "3m05s", "2h07m"]


def test_line_gives_shards_samples_rate_and_eta() -> None:
    counters = _Counters()
    progress = Progress(counters, shards=4, every_s=10)
    start = progress._started
    assert progress.line(start + 5) == (
        "progress: 0/4 shards committed, 0 samples (0 encoded, 0 failed), 0.0 img/s, 5s elapsed, "
        "ETA unknown (no shard committed yet)"
    )
    counters.shards_done, counters.encoded, counters.failed = 1, 90, 10
    # One shard in 60 s: three more take three minutes.
    assert progress.line(start + 60) == (
        "progress: 1/4 shards committed, 100 samples (90 encoded, 10 failed), 1.5 img/s, 1m00s elapsed, ETA 3m00s"
    )
    counters.shards_done = 4
    assert progress.line(start + 80).endswith("ETA 0s")


def test_lines_come_at_a_steady_interval_before_anything_happens(caplog: pytest.LogCaptureFixture) -> None:
    progress = Progress(_Counters(), shards=2, every_s=0.05)
    with caplog.at_level(logging.INFO, logger="latentize.progress"):
        progress.start()
        deadline = time.time() + 10
        while len(caplog.records) < 3 and time.time() < deadline:
            time.sleep(0.01)
        progress.stop()
    assert len(caplog.records) >= 3
    assert all(r.getMessage().startswith("progress: 0/2 shards committed") for r in caplog.records)
    count = len(caplog.records)
    time.sleep(0.2)
    assert len(caplog.records) == count  # stopped
