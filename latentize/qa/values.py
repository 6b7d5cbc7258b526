"""Tolerant reading and plain-text display of report values.

A report dict may come from a file, an older version or a hand edit: any part may be missing,
``None``, the wrong type, a numpy scalar or NaN. These helpers read such values without raising
and turn them into the text the HTML page shows (the page escapes it; nothing here is markup).
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
    "as_list",
    "as_mapping",
    "is_finite",
    "is_number",
    "json_ready",
    "number",
    "percent",
    "percentile",
    "sample_label",
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


def as_mapping(value: Any) -> Mapping[str, Any]:
    """``value`` if it is a mapping, else an empty one."""
    return value if isinstance(value, Mapping) else {}


def as_list(value: Any) -> list[Any]:
    """``value`` as a list if it is a list, tuple or numpy array (with ndim ≥ 1), else ``[]``."""
    # numpy arrays too: the page may be rendered from a report that has not been through json_ready.
    if isinstance(value, np.ndarray):
        return value.tolist() if value.ndim else []
    return list(value) if isinstance(value, (list, tuple)) else []


def is_number(value: Any) -> bool:
    """True for ints and floats (numpy's too, NaN included), False for booleans."""
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))


def number(value: Any) -> float:
    """``value`` as a float for plotting; NaN for anything that is not a number."""
    return float(value) if is_number(value) else math.nan


def is_finite(value: Any) -> TypeGuard[float]:
    """True for a number (int or float, numpy's too) that is neither NaN nor ±inf."""
    return is_number(value) and math.isfinite(float(value))


def text(value: Any) -> str:
    """The plain text the page shows for one value.

    ``None`` -> ``—``, booleans -> ``yes``/``no``, integers (and integral floats) with thousands
    separators, other floats to 4 significant digits, NaN/inf spelt out, mappings and lists as
    compact JSON cut at 400 characters, anything else as ``str``.
    """
    if isinstance(value, (np.generic, np.ndarray)):
        value = value.tolist()
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


def percent(value: Any) -> str:
    """A fraction in 0..1 as ``12.3 %``; :func:`text` of anything that is not a finite number."""
    return f"{float(value) * 100:.1f} %" if is_finite(value) else text(value)


def percentile(percentiles: Any, q: float) -> Any:
    """The value of percentile ``q`` in a ``{q: value}`` mapping whichever way its key is spelt
    (``"1"``, ``"1.0"``, ``1``); None when absent."""
    for key, value in as_mapping(percentiles).items():
        try:
            if float(key) == q:
                return value
        except (TypeError, ValueError):
            continue
    return None


def sample_label(key: Any, folder: Any = None) -> str:
    """How the report names a sampled row: its key, and its data folder when the output has
    several (a key is then stored once per resolution)."""
    return str(key) if not folder else f"{key} ({folder})"
