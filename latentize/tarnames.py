"""WebDataset's key/extension split of tar member names, without importing webdataset, and the
member keys under which latentize writes sample keys that the split would cut.

WebDataset readers split a member name at the first dot of its last path component: the key is
what comes before, the extension what comes after (``img.000.v2.jpg.latent.npy`` -> key ``img``).
A sample key with a dot in its last component therefore cannot be a member key as it is: the
WebDataset sink writes :func:`member_key` instead (``%`` and such dots percent-escaped, so
``urllib.parse.unquote`` gives the key back) and records the key itself in a ``KEY.key.txt``
member whenever the two differ; :func:`sample_key` is the reverse.

``webdataset/__init__`` imports torch (about 2.5 s and 600 MB in a fresh process), and every Ray
worker that reads a shard, stages a part or commits a shard would pay that at start: on a node
with a hundred read workers that is minutes of CPU before the first image is decoded. The rule is
one regular expression, kept identical to :func:`webdataset.tariterators.base_plus_ext` (a test
compares the two on awkward names).
"""

from __future__ import annotations

import re

__all__ = ["KEY_MEMBER", "base_plus_ext", "member_key", "sample_key"]

_SPLIT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")

#: The extension of the member holding a sample's key when its member key differs from it.
KEY_MEMBER = "key.txt"


def base_plus_ext(path: str) -> tuple[str | None, str | None]:
    """Splits ``path`` into (key, extensions): the extension is everything after the first dot
    of the basename (``a/b.seg.npy`` -> ``("a/b", "seg.npy")``); ``(None, None)`` without one."""
    match = _SPLIT.match(path)
    if not match:
        return None, None
    return match.group(1), match.group(2)


def member_key(key: str) -> str:
    """The tar member key of a sample key: the key itself unless WebDataset's split would cut it.

    ``%`` becomes ``%25`` everywhere, a ``.`` in the last path component ``%2E`` and trailing
    slashes ``%2F`` (an empty last component has no key to split off), so that
    ``base_plus_ext(member_key(key) + ".latent.npy") == (member_key(key), "latent.npy")`` and
    ``urllib.parse.unquote(member_key(key)) == key``. Keys of digits, letters, ``_``, ``-`` and
    ``/`` (img2dataset's, WebDataset inputs') are unchanged.
    """
    escaped = key.replace("%", "%25")
    stripped = escaped.rstrip("/")
    head, sep, last = stripped.rpartition("/")
    return head + sep + last.replace(".", "%2E") + "%2F" * (len(escaped) - len(stripped))


def sample_key(member: str) -> str:
    """The sample key of a member key written by :func:`member_key` (its reverse)."""
    from urllib.parse import unquote

    return unquote(member)
