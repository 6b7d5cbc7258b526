"""What the input shards are before any is read: their sizes and img2dataset's ``_stats.json``.

img2dataset writes ``NNNNN_stats.json`` beside each shard (``NNNNN.tar`` or ``NNNNN.parquet``):
``count`` (URLs tried), ``successes`` (images downloaded), ``failed_to_download``,
``failed_to_resize``, ``duration``, ``status_dict``. Sizes come from one listing per folder and
the stats files from one bulk read, so the driver's requests do not grow one by one with the
shard count.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.spec import AbstractFileSystem

__all__ = ["ShardFile", "shard_files", "stats_path"]

logger = logging.getLogger(__name__)

_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".parquet", ".pq")


@dataclass(frozen=True)
class ShardFile:
    """One input shard as listed.

    Attributes:
        url: the shard's URL, as the run reads it.
        size: its size in bytes; ``None`` when the store would not say (missing, no access).
        stats: img2dataset's ``_stats.json`` beside it, parsed; ``None`` when there is none.
    """

    url: str
    size: int | None
    stats: dict[str, Any] | None


def stats_path(path: str) -> str:
    """The ``_stats.json`` img2dataset writes beside the shard ``path`` (``00001.tar`` ->
    ``00001_stats.json``)."""
    lowered = path.lower()
    for suffix in _SUFFIXES:
        if lowered.endswith(suffix):
            return path[: -len(suffix)] + "_stats.json"
    return path + "_stats.json"


def _listing(fs: AbstractFileSystem, parent: str) -> dict[str, int] | None:
    try:
        entries = fs.ls(parent, detail=True)
    except Exception as exc:  # noqa: BLE001 - no listing (HTTP, denied): ask per file
        logger.debug("cannot list %s (%s: %s)", parent, type(exc).__name__, exc)
        return None
    return {str(e["name"]).rstrip("/"): int(e.get("size") or 0) for e in entries if e.get("type") != "directory"}


def _size(fs: AbstractFileSystem, path: str) -> int | None:
    try:
        return int(fs.size(path))
    except Exception as exc:  # noqa: BLE001 - a missing shard is the run's to report
        logger.debug("no size for %s (%s: %s)", path, type(exc).__name__, exc)
        return None


def _parse_stats(path: str, data: bytes) -> dict[str, Any] | None:
    try:
        stats = json.loads(data)
    except ValueError:
        logger.warning("input: %s is not valid JSON; its shard is counted another way", path)
        return None
    return stats if isinstance(stats, dict) and isinstance(stats.get("count"), int) else None


def _folder(fs: AbstractFileSystem, parent: str, paths: list[str]) -> dict[str, tuple[int | None, Any]]:
    """Size and parsed stats of each of ``paths`` (all in ``parent``)."""
    listed = _listing(fs, parent)
    if listed is None:
        sizes = {p: _size(fs, p) for p in paths}
        wanted = [stats_path(p) for p in paths]
    else:
        sizes = {p: listed.get(p.rstrip("/")) for p in paths}
        wanted = [stats_path(p) for p in paths if stats_path(p) in listed]
    found: dict[str, bytes] = {}
    if wanted:
        try:
            found = fs.cat(wanted, on_error="omit")
        except Exception as exc:  # noqa: BLE001 - counted another way
            logger.debug("cannot read stats files in %s (%s: %s)", parent, type(exc).__name__, exc)
    out: dict[str, tuple[int | None, Any]] = {}
    for p in paths:
        data = found.get(stats_path(p))
        out[p] = (sizes[p], _parse_stats(stats_path(p), data) if isinstance(data, bytes) else None)
    return out


def shard_files(urls: list[str], storage_options: dict[str, Any]) -> list[ShardFile]:
    """Size and img2dataset stats of each shard URL, in the order of ``urls``.

    One listing per folder gives the sizes and which stats files exist; those are read in one
    bulk call per folder. Where a folder cannot be listed (HTTP), each file is asked for its
    size and its stats file is tried. Never raises for a missing or unreadable shard.
    """
    groups: dict[tuple[AbstractFileSystem, str], list[tuple[str, str]]] = defaultdict(list)
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
        groups[(fs, posixpath.dirname(path.rstrip("/")))].append((url, path))
    by_url: dict[str, ShardFile] = {}
    for (fs, parent), members in groups.items():
        info = _folder(fs, parent, [path for _, path in members])
        for url, path in members:
            size, stats = info[path]
            by_url[url] = ShardFile(url, size, stats)
    return [by_url[url] for url in urls]
