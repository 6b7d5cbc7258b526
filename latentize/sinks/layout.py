"""The output root's layout and its atomic, bulk file operations, on any fsspec filesystem.

```
OUT/_manifest.json                  run identity, resolved config, totals
OUT/_inputs.parquet                 the run's input shards: url, shard id
OUT/_ledger.parquet                 every commit marker in one file (rewritten by the driver)
OUT/<W>x<H>/<shard>-<first>.<ext>   data: one folder per latent shape; one file per staged part
OUT/_shards/<shard>.json            commit marker: written last, after the shard's files are durable
OUT/_errors/<shard>.parquet         one row per failed sample
OUT/_staging/<shard>/<W>x<H>/...    parts of shards in flight (and discard lists); pruned on resume
OUT/_empty_prompt.npz               with a ``text`` section: the text columns of the prompt ""
```
Names starting with ``_`` are skipped by pyarrow's dataset discovery, so ``pq.read_table(OUT)``
sees data files only. docs/architecture.md describes the commit protocol these paths serve.

Every operation that touches many objects is one bulk call (a listing, a concurrent ``cat``, a
bulk delete), never a loop of requests per shard: at 230,000 shards a serial request per shard
is hours of driver time.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from latentize.errors import LatentizeError
from latentize.retry import retry_call
from latentize.sinks.base import read_parquet_bytes

__all__ = ["OutputLayout", "data_folder", "final_name"]

logger = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
INPUTS = "_inputs.parquet"
LEDGER = "_ledger.parquet"
MARKERS = "_shards"
ERRORS = "_errors"
STAGING = "_staging"
#: The text columns of the prompt ``""`` (runs with a ``text`` section). ``_``-prefixed, as every
#: file at the root is, so that pyarrow's dataset discovery of ``OUT`` reads the data files only.
EMPTY_PROMPT = "_empty_prompt.npz"
#: Prefix of the discard lists written under ``_staging/`` before committed shards are redone.
DISCARD_PREFIX = "discard-"


def data_folder(size: tuple[int, int]) -> str:
    """Folder name of a latent shape, from the source crop size ``(width, height)``."""
    return f"{size[0]}x{size[1]}"


def final_name(shard: str, first: int, extension: str) -> str:
    """Data file name of a shard's part whose first row index is ``first``."""
    return f"{shard}-{first:09d}.{extension}"


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

    def relative(self, path: str) -> str:
        """``path`` relative to the root (as markers store it)."""
        return path[len(self.root) + 1 :]

    @property
    def manifest_path(self) -> str:
        return self.join(MANIFEST)

    def marker_path(self, shard: str) -> str:
        return self.join(MARKERS, f"{shard}.json")

    def errors_path(self, shard: str) -> str:
        return self.join(ERRORS, f"{shard}.parquet")

    def staging_dir(self, shard: str) -> str:
        return self.join(STAGING, shard)

    def staged_path(self, shard: str, folder: str, first: int, digest: str, extension: str) -> str:
        """Where a part is staged: named by its first row index and a digest of its indices, so
        a retried task rewrites the same part instead of adding one."""
        return self.join(STAGING, shard, folder, f"part-{first:09d}-{digest}.{extension}")

    def final_path(self, staged: str) -> str:
        """The data file a staged part becomes: ``OUT/<folder>/<shard>-<first>.<ext>``."""
        rel = self.relative(staged).split("/")
        if len(rel) != 4 or rel[0] != STAGING or not rel[3].startswith("part-"):
            raise ValueError(f"not a staged part: {staged}")
        _, shard, folder, name = rel
        first, rest = name[len("part-") :].split("-", 1)
        extension = rest.split(".", 1)[1]
        return self.join(folder, final_name(shard, int(first), extension))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    # -- single objects -----------------------------------------------------------------------
    def write_bytes(self, path: str, data: bytes) -> None:
        """Writes ``data`` so that readers see either nothing or the whole file.

        An object store's PUT is atomic already; a local file is written under a hidden
        temporary name in the same folder and renamed over the target.
        """
        if self.is_local:
            tmp = self._local_tmp(path)
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

    def publish(self, staged: str, final: str) -> None:
        """Makes a staged part visible under its final name without moving its bytes through
        this process: a hard link on a local filesystem, a server-side copy on object stores.

        The staged part stays where it is (the resume logic derives leftovers from it) until
        the shard's marker is written. Both are atomic: readers never see a partial file.
        """
        if self.is_local:
            tmp = self._local_tmp(final)
            try:
                os.link(staged, tmp)
            except OSError:
                # Filesystems without hard links (some network and FUSE mounts): copy instead.
                shutil.copyfile(staged, tmp)
            os.replace(tmp, final)
        else:
            retry_call(lambda: self.fs.cp_file(staged, final), attempts=self.retries, what=f"copy {staged}")

    def _local_tmp(self, path: str) -> str:
        parent = posixpath.dirname(path)
        os.makedirs(parent, exist_ok=True)
        return posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")

    # -- many objects ---------------------------------------------------------------------------
    def remove(self, paths: Iterable[str]) -> None:
        """Removes files or whole folders (each path recursively); missing ones are fine."""
        for p in paths:
            try:
                self.fs.rm(p, recursive=True)
            except FileNotFoundError:
                pass

    def remove_files(self, paths: Iterable[str]) -> None:
        """Removes files in bulk (S3 deletes up to 1,000 keys per request); missing ones are fine."""
        paths = sorted(set(paths))
        if not paths:
            return
        if self.is_local:
            for p in paths:
                try:
                    os.remove(p)
                except FileNotFoundError:
                    pass
            return
        try:
            retry_call(lambda: self.fs.rm(paths), attempts=self.retries, what=f"delete {len(paths)} objects")
        except FileNotFoundError:
            pass

    def list_files(self, folder: str) -> list[str]:
        """Every file under ``folder`` (a path under the root), from one paginated listing."""
        try:
            return sorted(self.fs.find(folder))
        except FileNotFoundError:
            return []

    def cat_many(self, paths: list[str]) -> dict[str, bytes]:
        """Reads many small files concurrently (s3fs and gcsfs issue the requests in parallel);
        files that vanished in between are left out."""
        if not paths:
            return {}
        found = retry_call(
            lambda: self.fs.cat(paths, on_error="omit"), attempts=self.retries, what=f"read {len(paths)} objects"
        )
        if isinstance(found, bytes):  # a single path comes back unwrapped
            found = {paths[0]: found}
        return {p: v for p, v in found.items() if isinstance(v, bytes)}

    def iter_contents(self, paths: list[str], *, chunk: int = 1000) -> Iterator[tuple[str, bytes]]:
        """``(path, bytes)`` of many small files, read concurrently ``chunk`` at a time (bounded
        memory), in the order of ``paths``; files that vanished in between are left out."""
        for start in range(0, len(paths), chunk):
            part = paths[start : start + chunk]
            found = self.cat_many(part)
            yield from ((p, found[p]) for p in part if p in found)

    def entries(self) -> list[str]:
        """Names directly under the root (empty when the root does not exist)."""
        try:
            return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            return []

    # -- run state ----------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest as parsed JSON (None when there is none); readers take it typed, through
        :func:`latentize.sinks.contract.read_manifest`."""
        return self.read_json(self.manifest_path)

    def write_inputs(self, shards: list[tuple[str, str]]) -> None:
        """Records the run's ``(url, shard id)`` list (``status`` counts pending shards from it)."""
        table = pa.table({"url": [u for u, _ in shards], "shard": [s for _, s in shards]})
        self.write_bytes(self.join(INPUTS), _parquet_bytes(table))

    def read_inputs(self) -> list[tuple[str, str]]:
        """The ``(url, shard id)`` list written by :meth:`write_inputs` (empty if absent)."""
        try:
            table = read_parquet_bytes(self.read_bytes(self.join(INPUTS)))
        except FileNotFoundError:
            return []
        return list(zip(table.column("url").to_pylist(), table.column("shard").to_pylist(), strict=True))

    def committed_shards(self) -> set[str]:
        """Shard ids with a commit marker, from one listing of ``_shards/``."""
        names = (posixpath.basename(p) for p in self.list_files(self.join(MARKERS)))
        return {n[: -len(".json")] for n in names if n.endswith(".json")}

    def read_markers(self) -> dict[str, dict[str, Any]]:
        """All commit markers as parsed JSON, by shard id (see :meth:`read_marker_texts`);
        readers take them typed, through :func:`latentize.sinks.contract.run_markers`."""
        return {s: json.loads(text) for s, text in self.read_marker_texts().items()}

    def read_marker_texts(self) -> dict[str, str]:
        """All commit markers as JSON text, by shard id: about a third of the memory of parsed
        markers, which matters on a driver that holds 230,000 of them.

        The ledger holds every marker known when the driver last wrote it; one listing of
        ``_shards/`` finds the markers committed since (by a crashed or running run) and those
        read concurrently. A marker file is the commit point: ledger entries whose marker file
        is gone (a shard being redone) do not count.
        """
        listed = self.committed_shards()
        texts = {s: t for s, t in self.read_ledger().items() if s in listed}
        missing = sorted(listed - set(texts))
        for path, data in self.iter_contents([self.marker_path(s) for s in missing]):
            texts[posixpath.basename(path)[: -len(".json")]] = data.decode()
        return texts

    def read_ledger(self) -> dict[str, str]:
        """The markers of ``_ledger.parquet`` as JSON text (empty when there is none)."""
        try:
            table = read_parquet_bytes(self.read_bytes(self.join(LEDGER)), columns=["shard", "marker"])
        except FileNotFoundError:
            return {}
        return dict(zip(table.column("shard").to_pylist(), table.column("marker").to_pylist(), strict=True))

    def write_ledger(self, markers: dict[str, str]) -> None:
        """Writes every marker (JSON text by shard id) into ``_ledger.parquet``: one object, so a
        rerun reads them all in one GET."""
        shards = sorted(markers)
        table = pa.table(
            {
                "shard": pa.array(shards, pa.string()),
                "marker": pa.array([markers[s] for s in shards], pa.string()),
            }
        )
        self.write_bytes(self.join(LEDGER), _parquet_bytes(table))

    def discard(self, shards: Iterable[str], markers: dict[str, str]) -> int:
        """Removes every trace of shards about to be (re)done, with a constant number of
        listings and bulk deletes; returns the number of objects removed.

        * Shards that were never committed: their staged parts, the data files those parts
          may already have become, and their errors files (found by listing ``_staging/`` and
          ``_errors/`` once each).
        * Committed shards being redone (``--retry-failed``): their files are written into a
          discard list under ``_staging/`` first, then their markers are removed, then the
          files; a crash in between leaves a list the next resume finishes.
        * Discard lists left by an earlier crash are finished too, for the shards whose
          marker is gone (a shard whose marker is still there was never discarded).

        Args:
            shards: the shard ids this run (re)does.
            markers: every commit marker of the output (as :meth:`read_marker_texts` returns them).
        """
        from latentize.sinks.contract import Marker

        shards = set(shards)
        redo = {s: Marker.loads(markers[s]) for s in shards if s in markers}
        doomed: set[str] = set()
        for path in self.list_files(self.join(STAGING)):
            rel = self.relative(path).split("/")
            if len(rel) == 2 and rel[1].startswith(DISCARD_PREFIX):
                listed: dict[str, list[str]] = json.loads(self.read_bytes(path))
                doomed.update(self.join(f) for s, files in listed.items() if s not in markers for f in files)
                doomed.add(path)
            elif len(rel) == 4 and rel[1] in shards:
                doomed.update((path, self.final_path(path)))
        for path in self.list_files(self.join(ERRORS)):
            if posixpath.basename(path)[: -len(".parquet")] in shards:
                doomed.add(path)
        discard_list = None
        if redo:
            files = {s: list(m.files) for s, m in redo.items()}
            discard_list = self.join(STAGING, f"{DISCARD_PREFIX}{uuid.uuid4().hex}.json")
            self.write_bytes(discard_list, json.dumps(files).encode())
            self.remove_files(self.marker_path(s) for s in redo)
            doomed.update(self.join(f) for listed_files in files.values() for f in listed_files)
        self.remove_files(doomed)
        if discard_list is not None:
            self.remove_files([discard_list])
        return len(doomed) + len(redo)

    def prune_staging(self) -> None:
        """Removes what is left of the staging area once no shard is in flight."""
        self.remove([self.join(STAGING)])


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()
