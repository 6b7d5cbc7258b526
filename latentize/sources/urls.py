"""Turning ``input.urls`` into a concrete, checked list of shard URLs, and naming shards.

Brace ranges are expanded with :mod:`braceexpand` (the same rules WebDataset uses), globs are
listed through fsspec so that every fsspec back-end (local, s3, gcs, ...) works the same way.
"""

from __future__ import annotations

import functools
import logging
import posixpath
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from braceexpand import braceexpand
from fsspec.spec import AbstractFileSystem

from latentize.errors import LatentizeError

__all__ = ["expand_urls", "shard_ids"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_GLOB_CHARS = frozenset("*?[")
# HTTP has no directory listing and "?" starts its query string: never glob these.
_NO_GLOB_PROTOCOLS = ("http://", "https://")
# From this many listed files in one folder on, one listing is cheaper than one HEAD each
# (a brace range over 10k shards on S3 would otherwise cost 10k sequential requests).
_LIST_THRESHOLD = 8
# How many missing files a warning names; the count says how many there are in all.
_SHOW_MISSING = 5
_SHARD_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".parquet", ".pq")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def _is_glob(url: str) -> bool:
    if url.lower().startswith(_NO_GLOB_PROTOCOLS):
        return False
    return any(c in _GLOB_CHARS for c in url)


def _has_protocol(url: str) -> bool:
    return "://" in url or "::" in url


def _access(url: str, action: Callable[[], T]) -> T:
    """Runs one fsspec call for ``url``, turning back-end errors into a LatentizeError.

    The message names the URL and the original error, never the storage options (they may
    hold credentials).
    """
    try:
        return action()
    except LatentizeError:
        raise
    except Exception as exc:  # noqa: BLE001 - any back-end error (botocore, aiohttp, OSError)
        raise LatentizeError(
            f"input.urls: cannot access {url!r}: {type(exc).__name__}: {exc}; "
            "check the path and input.storage_options (credentials, endpoint_url)"
        ) from exc


def _url_to_fs(url: str, storage_options: dict[str, Any]) -> tuple[AbstractFileSystem, str]:
    return _access(url, lambda: fsspec.core.url_to_fs(url, **storage_options))


def _glob(url: str, storage_options: dict[str, Any]) -> list[str]:
    fs, pattern = _url_to_fs(url, storage_options)
    # detail=True gives each match's type from the listing itself: no extra request per file.
    found = _access(url, lambda: fs.glob(pattern, detail=True))
    files = sorted(p for p, info in found.items() if info.get("type") != "directory")
    if not files:
        raise LatentizeError(f"input.urls: no file matches {url!r}; check the path and input.storage_options")
    if not _has_protocol(url):
        # A plain local pattern gives plain (absolute) local paths: usable by any tool.
        return files
    # unstrip_protocol re-adds only the innermost protocol; keep a chain such as
    # "simplecache::" in front so the URLs open the way the user asked.
    chain = url.rsplit("::", 1)[0] + "::" if "::" in url else ""
    return [chain + fs.unstrip_protocol(p) for p in files]


def _exists_or_denied(fs: AbstractFileSystem, path: str) -> bool:
    try:
        return fs.exists(path)
    except PermissionError:
        # One unreadable shard is that shard's failure (recorded when it is read), not the
        # run's; when every listed shard is unreadable the caller still stops the run.
        return False


def _missing(urls: list[str], storage_options: dict[str, Any]) -> list[str]:
    """The URLs of ``urls`` that do not exist or may not be read, in the order of ``urls``.

    Raises:
        LatentizeError: the store cannot be reached at all (names the URL, never the options).
    """
    groups: dict[tuple[AbstractFileSystem, str], list[tuple[str, str]]] = defaultdict(list)
    for url in urls:
        fs, path = _url_to_fs(url, storage_options)
        groups[(fs, posixpath.dirname(path.rstrip("/")))].append((url, path))
    missing: set[str] = set()
    for (fs, parent), members in groups.items():
        listed: set[str] = set()
        if len(members) >= _LIST_THRESHOLD:
            try:
                listed = {p.rstrip("/") for p in fs.ls(parent, detail=False)}
            except Exception:  # noqa: BLE001 - fall back to per-file checks below
                logger.debug("listing %s failed; checking files one by one", parent, exc_info=True)
        for url, path in members:
            if path.rstrip("/") in listed:
                continue
            if not _access(url, functools.partial(_exists_or_denied, fs, path)):
                missing.add(url)
    return [url for url in urls if url in missing]


def _describe(missing: list[str]) -> str:
    shown = ", ".join(repr(u) for u in missing[:_SHOW_MISSING])
    more = len(missing) - _SHOW_MISSING
    return shown + (f" (and {more} more)" if more > 0 else "")


def expand_urls(urls: str | list[str], *, storage_options: dict[str, Any]) -> list[str]:
    """Expands brace ranges and globs into the concrete list of shard URLs.

    Each entry is brace-expanded (``{00000..00099}``); entries with glob characters
    (``*?[``) are listed with fsspec, sorted, and given back their protocol; other entries
    are kept as given (relative local paths stay relative) after checking they exist.
    Duplicates are dropped, keeping the first occurrence.

    A listed file that does not exist, while others do, is logged as a warning and **kept**:
    reading it fails, and the run records that shard as failed with its reason while the
    other shards complete (one lost object must not stop a run over thousands of shards).

    Raises:
        LatentizeError: no URLs, a glob matching nothing, none of the listed files existing
            (nothing to do: surely a wrong path), or an unreachable store (the message names
            the URL and the back-end's error).
    """
    items = [urls] if isinstance(urls, str) else list(urls)
    if not items:
        raise LatentizeError("input.urls: no input given; set input.urls to shard paths or globs")
    out: list[str] = []
    seen: set[str] = set()
    listed: list[str] = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise LatentizeError(f"input.urls: expected non-empty path strings, got {item!r}")
        for url in braceexpand(item):
            globbed = _is_glob(url)
            for match in _glob(url, storage_options) if globbed else [url]:
                if match in seen:
                    continue
                seen.add(match)
                out.append(match)
                if not globbed:
                    listed.append(match)
    missing = _missing(listed, storage_options)
    if missing and len(missing) == len(out):
        others = len(missing) - 1
        more = f" (and {others} other listed file(s))" if others else ""
        raise LatentizeError(
            f"input.urls: no input file can be read: {missing[0]!r} does not exist or access "
            f"is denied{more}; check the path and input.storage_options"
        )
    if missing:
        logger.warning(
            "input.urls: %d of %d listed file(s) do not exist or may not be read: %s; they will be recorded as "
            "failed shards, the others are encoded",
            len(missing),
            len(out),
            _describe(missing),
        )
    logger.info("input.urls: %d shard(s)", len(out))
    return out


def _strip_shard_suffix(name: str) -> str:
    lowered = name.lower()
    for suffix in _SHARD_SUFFIXES:
        if lowered.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _safe(name: str) -> str:
    name = _UNSAFE.sub("_", name)
    # Output files are named after shards; pyarrow ignores files starting with "_" or ".".
    if not name or name[0] in "_.":
        name = "s" + name
    return name


def _path_parts(url: str) -> list[str]:
    # Drop query strings and protocol chains; only the path names the shard.
    if "://" in url:
        url = url.split("?", 1)[0]
    url = url.rsplit("::", 1)[-1]
    url = url.split("://", 1)[-1]
    return [p for p in url.split("/") if p]


def shard_ids(urls: list[str]) -> list[str]:
    """A unique, filesystem-safe name per URL, in the order of ``urls``.

    Normally the basename without its shard suffix (``.../00001.tar`` -> ``00001``). URLs
    whose basenames collide are named by their path relative to the colliding URLs' common
    parent, ``/`` replaced by ``__`` (``a/00001.tar``, ``b/00001.tar`` -> ``a__00001``,
    ``b__00001``). Only ``[A-Za-z0-9._-]`` appear; a name never starts with ``_`` or ``.``.
    A URL listed twice gets ``-2``, ``-3``, ... appended to keep names unique.
    """
    parts = [_path_parts(u) or [u] for u in urls]
    names = [_safe(_strip_shard_suffix(p[-1])) for p in parts]
    by_name: dict[str, list[int]] = defaultdict(list)
    for i, name in enumerate(names):
        by_name[name].append(i)
    for indices in by_name.values():
        if len(indices) < 2:
            continue
        group = [parts[i] for i in indices]
        common = 0
        shortest = min(len(p) for p in group)
        while common < shortest - 1 and len({tuple(p[: common + 1]) for p in group}) == 1:
            common += 1
        for i in indices:
            rel = parts[i][common:]
            rel = rel[:-1] + [_strip_shard_suffix(rel[-1])]
            names[i] = _safe("__".join(rel))
    # Still equal (the same URL twice, or a relative name equal to another basename):
    # number the later ones, deterministic in list order.
    counts: Counter[str] = Counter()
    taken = set(names)
    result: list[str] = []
    for name in names:
        counts[name] += 1
        if counts[name] == 1:
            result.append(name)
            continue
        n = counts[name]
        while f"{name}-{n}" in taken:
            n += 1
        taken.add(f"{name}-{n}")
        result.append(f"{name}-{n}")
    return result
