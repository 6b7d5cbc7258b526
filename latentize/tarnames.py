"""WebDataset's key/extension split of tar member names, without importing webdataset.

``webdataset/__init__`` imports torch (about 2.5 s and 600 MB in a fresh process), and every Ray
worker that reads a shard, stages a part or commits a shard would pay that at start: on a node
with a hundred read workers that is minutes of CPU before the first image is decoded. The rule is
one regular expression, kept identical to :func:`webdataset.tariterators.base_plus_ext` (a test
compares the two on awkward names).
"""

from __future__ import annotations

import re

__all__ = ["base_plus_ext"]

_SPLIT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def base_plus_ext(path: str) -> tuple[str | None, str | None]:
    """Splits ``path`` into (key, extensions): the extension is everything after the first dot
    of the basename (``a/b.seg.npy`` -> ``("a/b", "seg.npy")``); ``(None, None)`` without one."""
    match = _SPLIT.match(path)
    if not match:
        return None, None
    return match.group(1), match.group(2)
