"""Report values as JSON and as the plain text the HTML page shows.

:func:`json_ready` turns the QA's figures (numpy scalars and arrays, NaN, paths) into plain JSON
values, for ``report.json`` and for the page. The other helpers display such values: the page
escapes their text (nothing here is markup).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Mapping
from typing import Any, TypeGuard

import numpy as np

__all__ = [
    "is_finite",
    "is_number",
    "json_ready",
    "number",
    "percent",
    "sample_label",
    "status_class",
    "text",
]


def json_ready(obj: Any) -> Any:
    """A copy of ``obj`` that :func:`json.dumps` accepts with ``allow_nan=False``.

    Recursively turns NaN and ±inf into ``None``, numpy scalars and arrays into Python numbers and
    lists, tuples and sets into lists, path-likes into strings and dates into ISO strings. Mapping
    keys that JSON cannot hold become strings. The input is not modified.

    Other objects are returned unchanged, so :func:`json.dumps` still names a type it cannot
    serialise instead of the report silently holding its ``repr``.
    """
    if isinstance(obj, Mapping):
        return {_json_key(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, np.generic):
        return json_ready(obj.item())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        items = [json_ready(v) for v in obj]
        try:
            return sorted(items)
        except TypeError:  # mixed types: any order is as good as another
            return items
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (_dt.datetime, _dt.date)):
        return obj.isoformat()
    return obj


def _json_key(key: Any) -> Any:
    if isinstance(key, np.generic):
        key = key.item()
    if isinstance(key, str) or key is None or isinstance(key, (bool, int)):
        return key
    if isinstance(key, float) and math.isfinite(key):
        return key
    # json.dumps(allow_nan=False) rejects NaN keys and any non-scalar key.
    return str(key)


def is_number(value: object) -> TypeGuard[float]:
    """True for ints and floats (numpy's too, NaN included), False for booleans: the values the
    page right-aligns."""
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))


def number(value: object) -> float:
    """``value`` as a float for plotting; NaN for anything that is not a number (``None``)."""
    return float(value) if is_number(value) else math.nan


def is_finite(value: object) -> TypeGuard[float]:
    """True for a number (int or float, numpy's too) that is neither NaN nor ±inf."""
    return is_number(value) and math.isfinite(float(value))


def text(value: Any) -> str:
    """The plain text the page shows for one value.

    ``None`` -> ``—``, booleans -> ``yes``/``no``, integers (and integral floats) with thousands
    separators, other floats to 4 significant digits, NaN/inf spelt out (plot labels), mappings
    and lists as compact JSON cut at 400 characters, anything else as ``str``.
    """
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        if value.is_integer() and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:.4g}"
    if isinstance(value, (Mapping, list, tuple)):
        dumped = json.dumps(json_ready(value), separators=(", ", ": "))
        return dumped if len(dumped) <= 400 else dumped[:399] + "…"
    return str(value)


def percent(value: float | None) -> str:
    """A fraction in 0..1 as ``12.3 %``; ``—`` for None."""
    return f"{float(value) * 100:.1f} %" if value is not None else text(value)


# Status words mapped to a fixed set of CSS classes: the class attribute never carries report
# text, so an odd status cannot inject markup or style.
_STATUS_CLASS = {
    "pass": "pass",
    "ok": "pass",
    "passed": "pass",
    "committed": "pass",
    "fail": "fail",
    "failed": "fail",
    "error": "fail",
    "missing": "fail",
    "mismatch": "fail",
    "warn": "warn",
    "warning": "warn",
    "skip": "skip",
    "skipped": "skip",
    "pending": "warn",
}


def status_class(status: str | None) -> str:
    """The badge class (``pass``, ``fail``, ``warn`` or ``skip``) of a status word: ``skip``
    for none, ``warn`` for a word it does not know."""
    if status is None:
        return "skip"
    return _STATUS_CLASS.get(status.strip().lower(), "warn")


def sample_label(key: Any, folder: Any = None) -> str:
    """How the report names a sampled row: its key, and its data folder when the output has
    several (a key is then stored once per resolution)."""
    return str(key) if not folder else f"{key} ({folder})"
