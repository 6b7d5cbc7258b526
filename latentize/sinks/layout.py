"""The output root's layout and its atomic writes, on any fsspec filesystem.

What readers may rely on is docs/architecture.md, "Output contract".

```
OUT/_manifest.json          run identity, resolved config, totals
OUT/_inputs.parquet         the run's input shards: url, shard id
OUT/<W>x<H>/<shard>.<ext>   data: one folder per latent shape (named for its source size)
OUT/_shards/<shard>.json    commit marker: written last, after the shard's files are durable
OUT/_errors/<shard>.parquet one row per failed sample
OUT/_staging/<shard>/...    parts of shards in flight; discarded on resume
```
Names starting with ``_`` are skipped by pyarrow's dataset discovery, so ``pq.read_table(OUT)``
sees data files only.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import uuid
from collections.abc import Iterable
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from latentize.errors import LatentizeError
from latentize.retry import retry_call

__all__ = ["OutputLayout", "data_folder"]

logger = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
INPUTS = "_inputs.parquet"
MARKERS = "_shards"
ERRORS = "_errors"
STAGING = "_staging"


def data_folder(size: tuple[int, int]) -> str:
    """Folder name of a latent shape, from the source crop size ``(width, height)``."""
    return f"{size[0]}x{size[1]}"


class OutputLayout:
    """Paths and atomic file operations under one output root.

    Picklable (fsspec filesystems are), so Ray tasks receive it as an argument.

    Args:
        path: local path or fsspec URL of the output root.
        storage_options: fsspec options (credentials stay in memory; never written out).
        retries: retries of an object-store read or write after a transient error.
    """

    def __init__(self, path: str, *, storage_options: dict[str, Any] | None = None, retries: int = 5) -> None:
        self.retries = retries
        if not path:
            raise LatentizeError("output.path is empty; set it to a local folder or an fsspec URL")
        if "://" not in path:
            path = os.path.abspath(os.path.expanduser(path))
        self.url = path.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        except (ImportError, ValueError) as exc:
            raise LatentizeError(f"output.path {self.url!r}: {exc}") from None
        self.root = self.root.rstrip("/")

    # -- paths ------------------------------------------------------------------------------
    def join(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    @property
    def manifest_path(self) -> str:
        return self.join(MANIFEST)

    def marker_path(self, shard: str) -> str:
        return self.join(MARKERS, f"{shard}.json")

    def errors_path(self, shard: str) -> str:
        return self.join(ERRORS, f"{shard}.parquet")

    def staging_dir(self, shard: str) -> str:
        return self.join(STAGING, shard)

    def data_path(self, folder: str, shard: str, extension: str) -> str:
        return self.join(folder, f"{shard}.{extension}")

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    # -- writes -----------------------------------------------------------------------------
    def write_bytes(self, path: str, data: bytes) -> None:
        """Writes ``data`` so that readers see either nothing or the whole file.

        An object store's PUT is atomic already; a local file is written under a hidden
        temporary name in the same folder and renamed over the target.
        """
        parent = posixpath.dirname(path)
        if self.is_local:
            os.makedirs(parent, exist_ok=True)
            tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            retry_call(lambda: self.fs.pipe_file(path, data), attempts=self.retries, what=f"write {path}")

    def read_bytes(self, path: str) -> bytes:
        """Reads a whole file, retrying transient object-store errors."""
        return retry_call(lambda: self.fs.cat_file(path), attempts=self.retries, what=f"read {path}")

    def write_json(self, path: str, data: Any) -> None:
        self.write_bytes(path, json.dumps(data, indent=2, sort_keys=False, default=str).encode())

    def read_json(self, path: str) -> Any | None:
        try:
            return json.loads(self.read_bytes(path))
        except FileNotFoundError:
            return None

    def remove(self, paths: Iterable[str]) -> None:
        for p in paths:
            try:
                self.fs.rm(p, recursive=True)
            except FileNotFoundError:
                pass

    # -- state --------------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any] | None:
        return self.read_json(self.manifest_path)

    def write_inputs(self, shards: list[tuple[str, str]]) -> None:
        """Records the run's ``(url, shard id)`` list (``status`` counts pending shards from it)."""
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        table = pa.table({"url": [u for u, _ in shards], "shard": [s for _, s in shards]})
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(self.join(INPUTS), buf.getvalue())

    def read_inputs(self) -> list[tuple[str, str]]:
        """The ``(url, shard id)`` list written by :meth:`write_inputs` (empty if absent)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(pa.BufferReader(self.read_bytes(self.join(INPUTS))))
        except FileNotFoundError:
            return []
        return list(zip(table.column("url").to_pylist(), table.column("shard").to_pylist(), strict=False))

    def read_markers(self) -> dict[str, dict[str, Any]]:
        """All commit markers, by shard id."""
        try:
            paths = self.fs.glob(self.join(MARKERS, "*.json"))
        except FileNotFoundError:
            return {}
        markers: dict[str, dict[str, Any]] = {}
        for p in paths:
            data = self.read_json(p)
            if data is not None:
                markers[posixpath.basename(p)[: -len(".json")]] = data
        return markers

    def entries(self) -> list[str]:
        """Names directly under the root (empty when the root does not exist)."""
        try:
            return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            return []

    def prune_staging(self) -> None:
        """Removes the staging folder once no shard is in flight (object stores have no
        empty folders, so it may already be gone)."""
        path = self.join(STAGING)
        try:
            if not self.fs.ls(path, detail=False):
                self.remove([path])
        except FileNotFoundError:
            pass

    def discard_shard(self, shard: str, *, data_files: Iterable[str] = ()) -> None:
        """Removes every trace of an uncommitted (or to-be-redone) shard.

        The marker goes first, so that a crash half-way leaves a shard that reads as pending.
        """
        self.remove([self.marker_path(shard)])
        self.remove([self.staging_dir(shard), self.errors_path(shard), *data_files])
