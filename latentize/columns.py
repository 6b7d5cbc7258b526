"""Helpers for the nullable text columns of Ray numpy batches.

Ray hands an all-null string column of a block to numpy batch functions as a float array of
NaN, and a mixed one as an object array of ``str``/``None``; every stage normalises through
these helpers so that "no value" means ``None`` everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["NOTES_SEPARATOR", "TEXT_COLUMNS", "is_null", "join_notes", "normalize_text", "text_column"]

#: Joins the non-fatal findings of one sample in its ``notes`` column.
NOTES_SEPARATOR = "; "

#: The nullable string columns that travel between stages.
TEXT_COLUMNS = ("key", "shard", "caption", "json", "notes", "error", "stage")


def is_null(value: Any) -> bool:
    """True for ``None``, float NaN and the empty string."""
    return (
        value is None
        or (isinstance(value, (float, np.floating)) and value != value)
        or (isinstance(value, str) and value == "")
    )


def text_column(values: Iterable[Any] | None, n: int) -> np.ndarray:
    """A fresh (n,) object array of ``str`` or ``None`` from a batch column (absent: all None)."""
    out = np.empty(n, dtype=object)
    if values is not None:
        out[:] = [None if is_null(v) else str(v) for v in values]
    return out


def normalize_text(batch: dict[str, Any]) -> dict[str, Any]:
    """Returns ``batch`` with every present :data:`TEXT_COLUMNS` column as ``str``/``None``
    objects, so that blocks Ray builds from it always type them as strings (an all-NaN float
    column in one block and strings in the next cannot be concatenated)."""
    out = dict(batch)
    for name in TEXT_COLUMNS:
        if name in out:
            out[name] = text_column(out[name], len(out[name]))
    return out


def join_notes(notes: Iterable[str | None]) -> str | None:
    """Joins the non-empty findings with ``"; "``; ``None`` when there is none."""
    found = [n for n in notes if n]
    return NOTES_SEPARATOR.join(found) if found else None
