"""Exception types shared by every stage.

Two kinds of failure exist in latentize and they must never be confused:

* :class:`LatentizeError` (and :class:`ConfigError`): the run cannot start or go on: a bad config,
  an unreachable model or path. Raised at start with a message that says how to fix it.
* :class:`SampleError`: one sample is bad (corrupt image, missing member). It never escapes a
  stage: the stage turns it into an error row carrying the key, the stage name and the message.
"""

from __future__ import annotations

__all__ = ["ConfigError", "LatentizeError", "SampleError"]


class LatentizeError(Exception):
    """A run-level problem; the message tells the user how to fix it."""


class ConfigError(LatentizeError):
    """The configuration is invalid (unknown key, wrong type, impossible combination)."""


class SampleError(Exception):
    """A single sample failed in ``stage`` (``read``, ``decode``, ``preprocess``, ``encode``)."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.message = message
