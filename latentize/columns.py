"""Helpers for the nullable text columns of Ray numpy batches.

Ray hands an all-null string column of a block to numpy batch functions as a float array of
NaN, and a mixed one as an object array of ``str``/``None``; every stage normalises through
these helpers so that "no value" means ``None`` everywhere.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

__all__ = ["is_null", "text_column"]


def is_null(value: Any) -> bool:
    """True for ``None``, float NaN and the empty string."""
    return value is None or (isinstance(value, (float, np.floating)) and value != value) or (isinstance(value, str) and value == "")


def text_column(values: Iterable[Any] | None, n: int) -> np.ndarray:
    """A fresh (n,) object array of ``str`` or ``None`` from a batch column (absent: all None)."""
    out = np.empty(n, dtype=object)
    if values is not None:
        out[:] = [None if is_null(v) else str(v) for v in values]
    return out
