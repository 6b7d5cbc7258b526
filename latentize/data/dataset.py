"""``LatentDataset``: the committed rows of an output root as shuffled training batches, exactly
once per epoch across ranks × workers, resumable mid-epoch, from any fsspec URL.

How an epoch is read (``P = world_size × partitions_per_rank`` partitions; rank ``r`` reads
partitions ``r × partitions_per_rank + k``, its DataLoader worker ``w`` of ``W`` those with
``k ≡ w (mod W)``, one after the other):

1. **Units.** The unit of work is one input shard's rows in one data folder (its files, as the
   shard's commit marker lists them, and its row count from the marker). Files of shards without
   a marker are never read.
2. **Partitions.** The units are permuted with ``(seed, epoch)`` and dealt to the partition with
   the fewest rows so far: every unit goes to exactly one partition, and partitions differ by at
   most one unit's rows. Every rank and worker computes the same split from the markers alone;
   it does not depend on how many DataLoader workers any rank has, so ranks may differ in
   ``num_workers``.
3. **Row groups.** A partition reads its units in that order, each unit's row groups in a seeded
   order of ``(seed, epoch, unit)``.
4. **Shuffle windows.** Consecutive row groups are gathered until they hold ``buffer_size`` rows
   (a window); the window's rows are walked in a seeded order of ``(seed, epoch, partition,
   window)``. Each data folder collects its rows and a batch is emitted as soon as a folder has
   ``batch_size`` of them, so a batch never mixes folders (latent shapes) and folders interleave
   as their rows do. Rows short of a batch carry over to the next window. Memory: one window
   (at most ``buffer_size`` rows plus one row group) and fewer than ``batch_size`` carried rows per
   folder.
5. **End of the partition.** Each folder's carried rows make one last, smaller batch (in folder
   name order), unless ``drop_last``.

Without ``shuffle`` the same steps run with identity orders: units in (folder, shard) order,
each partition a contiguous run of them (so one reader of all partitions reads the files in
order), row groups and rows in file order, the same split every epoch.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from latentize.data.plan import (
    ROW_GROUPS,
    WINDOWS,
    OutputInfo,
    assign,
    batch_counts,
    read_output,
    rng,
    round_robin,
    trim,
    window_events,
)
from latentize.data.text import LENGTH, MASK, is_ragged, length_mask, pad_ragged, read_empty_prompt
from latentize.data.transforms import draw_latents, flip_choice, normalizer
from latentize.errors import LatentizeError
from latentize.sinks.base import is_tensor_type, tensor_numpy
from latentize.sinks.layout import OutputLayout

__all__ = ["LatentDataset"]

logger = logging.getLogger(__name__)

#: Suffix of a tensor column's horizontally flipped twin (``latent_flipped``).
FLIPPED = "_flipped"
#: Settings a saved state must share with the reader that loads it, or the order differs.
_STATE_KEYS = (
    "seed",
    "shuffle",
    "batch_size",
    "buffer_size",
    "drop_last",
    "rank",
    "world_size",
    "partitions_per_rank",
)


@dataclass(frozen=True)
class _RowGroup:
    """One row group in a partition's reading order: its position ``seq`` in that order."""

    seq: int
    file: str
    index: int
    rows: int
    folder: int


@dataclass(frozen=True)
class _Plan:
    """One epoch's split for one worker count: each partition's units and how many batches it yields."""

    parts: list[list[int]]
    totals: list[int]
    #: Batches a partition stops after (drop_last only; None: all of them).
    caps: list[int] | None


class _Files:
    """The Parquet files a partition reads, a few open at a time (each footer read once per open)."""

    def __init__(self, layout: OutputLayout, keep: int = 4) -> None:
        self._layout = layout
        self._keep = keep
        self._open: OrderedDict[str, tuple[Any, pq.ParquetFile]] = OrderedDict()

    def get(self, rel: str) -> pq.ParquetFile:
        if rel in self._open:
            self._open.move_to_end(rel)
            return self._open[rel][1]
        handle = self._layout.fs.open(self._layout.join(rel), "rb")
        self._open[rel] = (handle, pq.ParquetFile(handle))
        if len(self._open) > self._keep:
            _, (old, _) = self._open.popitem(last=False)
            old.close()
        return self._open[rel][1]

    def close(self) -> None:
        for handle, _ in self._open.values():
            handle.close()
        self._open.clear()


class LatentDataset(IterableDataset[dict[str, Any]]):
    """Training batches from a latentize output root; use as
    ``DataLoader(ds, batch_size=None, num_workers=W)`` and call :meth:`set_epoch` before each epoch.

    A batch is a dict: ``key`` (list of B str), ``folder`` (its data folder, e.g. ``"256x256"``),
    each tensor column as a torch tensor of (B, *shape) in its stored dtype (``latent`` (B, C, h,
    w) float16 by default, VQ ``indices`` (B, h, w) integers), integer columns (``width``,
    ``height``, ``crop_top``, ``crop_left``) as (B,) int32 tensors, text columns (``caption``,
    ``json``, ``notes``) as lists of str or None, and ``flipped`` ((B,) bool) when the output has
    flipped twins. All rows of a batch come from one data folder, so they share one shape.

    **Caption embeddings.** An output with a text stage (the manifest's ``text``, also
    :attr:`text`) yields its text columns as tensors: ``prompt_embeds`` (B, rows, width) and
    ``pooled_prompt_embeds`` (B, width) in the stored float dtype, and for ``storage: padded``
    ``prompt_attention_mask`` (B, rows) uint8 0/1 as stored. A ``storage: trimmed``
    ``prompt_embeds`` (each sample's real tokens only) is padded with zeros to the batch's
    longest (``rows`` varies from batch to batch), and ``prompt_attention_mask`` (B, rows)
    bool, True on real tokens, is built from ``prompt_embeds_length`` ((B,) int32, yielded too).
    :meth:`empty_prompt` gives the embeddings of ``""`` for classifier-free-guidance dropout.

    **Exactly once.** Without ``drop_last`` every committed row is yielded exactly once per epoch
    across all ranks and workers; each partition ends with up to one smaller batch per data
    folder, and partitions, hence ranks, may yield different numbers of batches (their rows differ
    by at most one unit, a shard's rows in one folder). With ``drop_last`` every batch has
    ``batch_size`` rows and every rank yields the same number of batches (:meth:`num_batches`):
    each partition drops its rows short of a full batch per folder, then ranks with more batches
    than the smallest rank stop their largest partitions early. Each row is then yielded at most
    once; the rows left out change with the epoch. Neither depends on ``num_workers``, which
    each rank chooses for itself: a rank's rows and batches are those of its
    ``partitions_per_rank`` partitions, which its workers share out (with more workers than
    partitions, the extra workers get none).

    **Moments.** For ``encoder.sample: moments`` outputs (``mean``, ``logvar``) and ``draw``,
    ``latent`` is a fresh draw ``mean + exp(logvar / 2) · ε`` per sample and epoch, ε seeded by
    ``(seed, epoch, key)`` (:func:`~latentize.data.transforms.draw_latents`), normalised with the
    manifest's ``encoder.constants`` (``(z - latents_mean) · scaling_factor / latents_std``, or
    ``(z - shift_factor) · scaling_factor``), float32. ``mean`` and ``logvar`` are yielded too only
    when ``columns`` names them.

    **Flipped twins.** When a tensor column ``X`` has a twin ``X_flipped`` (the latents of the
    horizontally flipped crop) and ``flip``, each sample comes from the twin with probability 1/2
    per epoch, chosen by ``(seed, epoch, key)`` (:func:`~latentize.data.transforms.flip_choice`),
    the same choice for all its columns; ``flipped`` says which. With ``flip=False`` the twins
    are not read.

    **Resuming.** :meth:`state_dict` records the epoch and the batches consumed;
    :meth:`load_state_dict` on a new reader with the same settings (and, resuming from a
    ``consumed`` count, the same ``num_workers``) then yields exactly the rows not yet yielded
    that epoch, in the order the interrupted epoch would have yielded them (a state of batches
    per partition resumes with any number of workers, in their order). Progress is counted in batches per
    partition: every order above is a function of the seed, the epoch and the markers, so a
    partition that skips ``k`` batches recomputes them from row counts alone and reads only the
    row groups of the rows it still has to yield (and of rows carried over to them).

    Args:
        root: the output root, a local path or any fsspec URL.
        batch_size: rows per batch (B).
        shuffle: shuffle units, row groups and rows per epoch; False reads in file order.
        seed: seed of every random choice (order, draws, flips).
        rank, world_size: this process's rank among ``world_size`` training processes.
        columns: the columns to yield besides ``key`` (default: every stored column; for moments
            outputs ``latent``, the draw, instead of ``mean`` and ``logvar``). Text columns are
            chosen by name; a trimmed output's ``prompt_attention_mask`` (built, not stored)
            may be named too.
        storage_options: fsspec options (credentials, endpoint) of the output root.
        drop_last: full batches only, and the same number of batches on every rank (above).
        buffer_size: rows of a shuffle window (memory bound of a worker's reading).
        draw: draw normalised latents from moments outputs; False yields the raw ``mean`` and
            ``logvar`` instead.
        flip: choose flipped twins at random; False always yields the unflipped column.
        partitions_per_rank: partitions each rank reads (shared out over its DataLoader
            workers: at least as many as the workers, or some idle). Every rank must use the
            same value; more mean more small last batches (one per folder and partition) and,
            with ``drop_last``, more rows left out per epoch.

    Raises:
        LatentizeError: no latentize output at ``root``, a WebDataset output, an unknown column,
            or a moments draw the manifest's constants cannot normalise (FLUX.2 moments: pass
            ``draw=False``).
    """

    def __init__(
        self,
        root: str,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        columns: Sequence[str] | None = None,
        storage_options: dict[str, Any] | None = None,
        drop_last: bool = False,
        buffer_size: int = 8192,
        draw: bool = True,
        flip: bool = True,
        partitions_per_rank: int = 8,
    ) -> None:
        super().__init__()
        if batch_size < 1 or buffer_size < 1 or partitions_per_rank < 1:
            raise LatentizeError(
                f"batch_size ({batch_size}), buffer_size ({buffer_size}) and partitions_per_rank "
                f"({partitions_per_rank}) must be >= 1"
            )
        if not 0 <= rank < world_size:
            raise LatentizeError(f"rank {rank} is not in range(world_size={world_size})")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.buffer_size = buffer_size
        self.flip = flip
        self.partitions_per_rank = partitions_per_rank
        self.epoch = 0
        self._storage_options = dict(storage_options or {})
        self._info: OutputInfo = read_output(OutputLayout(root, storage_options=storage_options))
        self._folders = self._info.folders
        stored = self._stored_names()
        tensors = set(self._info.manifest.columns)
        self._draw = draw and {"mean", "logvar"} <= tensors
        self._normalizer = normalizer(self._info.manifest.constants) if self._draw else None
        #: A trimmed output builds its mask from the lengths: it may be named though not stored.
        self._built_mask = LENGTH in stored and MASK not in stored
        self._columns = self._choose_columns(stored, columns)
        self._read = self._read_columns(stored)
        self._resume: dict[str, Any] | None = None
        self._partitions: int | None = None
        self._progress: dict[str, int] = {}

    # -- columns ------------------------------------------------------------------------------
    def _stored_names(self) -> list[str]:
        """Column names of the data files (from the first committed file's footer)."""
        if not self._info.units:
            return []
        layout = self._info.layout
        with layout.fs.open(layout.join(self._info.units[0].files[0]), "rb") as f:
            return list(pq.read_schema(f).names)

    def _choose_columns(self, stored: list[str], columns: Sequence[str] | None) -> list[str]:
        twins = {n for n in stored if n.endswith(FLIPPED) and n[: -len(FLIPPED)] in stored}
        if columns is None:
            chosen = [n for n in stored if n != "key" and n not in twins]
            if self._draw:
                chosen = ["latent" if n == "mean" else n for n in chosen if n != "logvar"]
            return chosen
        known = set(stored) | ({"latent"} if self._draw else set()) | ({MASK} if self._built_mask else set())
        unknown = [c for c in columns if c not in known]
        if unknown and stored:
            raise LatentizeError(f"unknown column(s) {unknown}; the data files hold {stored}")
        return [c for c in columns if c != "key"]

    @property
    def text(self) -> dict[str, Any] | None:
        """The manifest's ``text`` entry (preset, storage, columns with their shapes...); None
        for an output without caption embeddings."""
        return self._info.manifest.text

    def empty_prompt(self) -> dict[str, torch.Tensor]:
        """The embeddings of the empty prompt ``""`` (``OUT/_empty_prompt.npz``), one tensor per
        stored text column in its stored dtype, per-sample shapes (no batch axis):
        ``prompt_embeds`` (rows, width), ``pooled_prompt_embeds`` (width,), a padded output's
        ``prompt_attention_mask`` (rows,) uint8, a trimmed output's ``prompt_embeds_length``
        () int32 and its ``prompt_attention_mask`` (rows,) bool, all True. Replace a sample's
        condition by these at a rate for classifier-free-guidance dropout.

        Raises:
            LatentizeError: the output has no caption embeddings.
        """
        arrays = read_empty_prompt(self._info.layout.url, storage_options=self._storage_options)
        out = {name: torch.from_numpy(np.array(value)) for name, value in arrays.items()}
        if LENGTH in out and MASK not in out and "prompt_embeds" in out:
            out[MASK] = torch.ones(out["prompt_embeds"].shape[0], dtype=torch.bool)
        return out

    def _read_columns(self, stored: list[str]) -> list[str]:
        wanted = ["key", *(c for c in self._columns if not (self._draw and c == "latent"))]
        if self._built_mask and MASK in wanted:
            wanted.remove(MASK)
            if LENGTH not in wanted and "prompt_embeds" not in wanted:
                wanted.append(LENGTH)
        if self._draw:
            wanted += [c for c in ("mean", "logvar") if c not in wanted]
        twins = [f"{c}{FLIPPED}" for c in wanted if f"{c}{FLIPPED}" in stored] if self.flip else []
        return wanted + twins

    # -- epochs and state ---------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch of the next iteration (its order, draws and flips). Call it before
        each epoch; with ``persistent_workers=True`` DataLoader workers keep the epoch they
        started with, so use the default (workers re-created per epoch)."""
        if self._resume is not None and self._resume["epoch"] != epoch:
            self._resume = None
            self._progress = {}
        elif self._resume is None and epoch != self.epoch:
            self._progress = {}
        self.epoch = epoch

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """The reader's position, to resume the epoch with :meth:`load_state_dict`.

        Args:
            consumed: batches of the current epoch this rank has taken from its DataLoader, in
                all (those before an earlier resume included). Give
                it when the reader runs in DataLoader worker processes (``num_workers > 0``): the
                copy in the training process never sees the batches, but DataLoader takes one
                batch from each worker in turn, skipping finished ones, so the count tells every
                worker how far it got. Without it, the state counts the batches this object's own
                iterations yielded (``num_workers=0``, or a loader that saves each worker's state).

        Returns:
            Plain data (JSON-ready): the settings that decide the order, ``epoch``, and either
            ``consumed`` or ``partitions`` with ``batches`` (batches yielded per partition).
        """
        state: dict[str, Any] = {key: getattr(self, key) for key in _STATE_KEYS}
        state["epoch"] = self.epoch
        if consumed is not None:
            state["consumed"] = int(consumed)
        else:
            state["partitions"] = self._partitions
            state["batches"] = dict(self._progress)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resumes from :meth:`state_dict`: the next iteration of ``state["epoch"]`` yields exactly
        the batches not consumed yet; :meth:`set_epoch` with another epoch starts afresh.

        Raises:
            LatentizeError: the state was saved with other settings.
        """
        differ = [k for k in _STATE_KEYS if k in state and state[k] != getattr(self, k)]
        if differ:
            shown = ", ".join(f"{k}: saved {state[k]!r}, now {getattr(self, k)!r}" for k in differ)
            raise LatentizeError(f"the saved reader state has other settings ({shown}); resuming would not be exact")
        self.epoch = int(state["epoch"])
        self._resume = dict(state)
        self._partitions = state.get("partitions")
        self._progress = {str(k): int(v) for k, v in (state.get("batches") or {}).items()}

    def num_batches(self) -> int:
        """Batches this rank yields in the current epoch, whatever its ``num_workers`` (without
        ``drop_last`` the count may differ between ranks and epochs)."""
        k = self.partitions_per_rank
        return sum(self._plan().totals[self.rank * k : (self.rank + 1) * k])

    # -- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        k = self.partitions_per_rank
        if worker == 0 and workers > k:
            logger.warning(
                "num_workers=%d but partitions_per_rank=%d: %d worker(s) have nothing to read; "
                "raise partitions_per_rank (on every rank) to use them",
                workers,
                k,
                workers - k,
            )
        plan = self._plan()
        role, skips = self._resume_point(plan, workers, worker)
        mine = [self.rank * k + j for j in range(role, k, workers)]
        self._partitions = self.world_size * k
        self._progress = {str(p): skips.get(p, 0) for p in mine}
        for partition in mine:
            cap = plan.caps[partition] if plan.caps is not None else None
            parts = self._batches(plan.parts[partition], partition, self.world_size * k, skips.get(partition, 0), cap)
            for folder, table in parts:
                self._progress[str(partition)] += 1
                yield self._to_batch(table, folder)

    def _plan(self) -> _Plan:
        units = self._info.units
        k = self.partitions_per_rank
        parts = assign(units, self.world_size * k, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle)
        totals = [batch_counts(units, part, self.batch_size, drop_last=self.drop_last) for part in parts]
        if not self.drop_last:
            return _Plan(parts, totals, None)
        ranks = [totals[r * k : (r + 1) * k] for r in range(self.world_size)]
        target = min(sum(r) for r in ranks)
        caps = [c for r in ranks for c in trim(r, target)]
        return _Plan(parts, caps, caps)

    def _resume_point(self, plan: _Plan, workers: int, worker: int) -> tuple[int, dict[int, int]]:
        """This worker's role (which of the rank's partitions it reads: those ``k ≡ role (mod
        workers)``) and the batches of each already consumed in a resumed epoch.

        Resuming from a consumed count, the roles rotate so that the worker a new DataLoader
        asks first reads the partitions whose turn was next: the batches then come in the order
        the interrupted epoch would have yielded them. Resuming from batches per partition, any
        number of workers takes up each partition where it stopped.
        """
        state = self._resume
        if state is None or state["epoch"] != self.epoch:
            return worker, {}
        k = self.partitions_per_rank
        first = self.rank * k
        if "consumed" in state:
            roles = [list(range(first + r, first + k, workers)) for r in range(workers)]
            taken, turn = round_robin([sum(plan.totals[p] for p in ps) for ps in roles], int(state["consumed"]))
            role = (worker + turn) % workers
            skips, left = {}, taken[role]
            for p in roles[role]:
                skips[p] = min(plan.totals[p], left)
                left -= skips[p]
            return role, skips
        batches = state.get("batches") or {}
        if batches and state.get("partitions") != self.world_size * k:
            raise LatentizeError(
                f"the saved state has {state.get('partitions')} partitions (world_size × partitions_per_rank), "
                f"this reader {self.world_size * k}: resume with the same settings"
            )
        return worker, {int(p): int(n) for p, n in batches.items()}

    def _row_groups(self, part: list[int], files: _Files) -> Iterator[_RowGroup]:
        """The partition's row groups in reading order (footers read as units are reached)."""
        seq = 0
        for u in part:
            unit = self._info.units[u]
            groups = []
            for rel in unit.files:
                meta = files.get(rel).metadata
                groups += [(rel, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
            if sum(n for _, _, n in groups) != unit.rows:
                raise LatentizeError(
                    f"shard {unit.shard}: its marker says {unit.rows} rows in {unit.folder}, its files hold "
                    f"{sum(n for _, _, n in groups)}"
                )
            if self.shuffle:
                groups = [groups[j] for j in rng(ROW_GROUPS, self.seed, self.epoch, u).permutation(len(groups))]
            for rel, i, n in groups:
                if n:
                    yield _RowGroup(seq, rel, i, n, self._folders.index(unit.folder))
                    seq += 1

    def _windows(self, groups: Iterator[_RowGroup]) -> Iterator[list[_RowGroup]]:
        window: list[_RowGroup] = []
        rows = 0
        for group in groups:
            window.append(group)
            rows += group.rows
            if rows >= self.buffer_size:
                yield window
                window, rows = [], 0
        if window:
            yield window

    def _batches(
        self, part: list[int], partition: int, partitions: int, skip: int, cap: int | None
    ) -> Iterator[tuple[str, pa.Table]]:
        """The partition's batches after the first ``skip`` (of at most ``cap``), as Arrow tables.

        Skipped windows cost their footers only: the rows each folder carries over are tracked
        by identity ``(seq, row)``, and read back when yielding starts.
        """
        files = _Files(self._info.layout)
        carried: dict[int, np.ndarray] = {}  # folder -> (k, 2) ids (row group seq, row)
        tables: dict[int, pa.Table] = {}  # folder -> the carried rows, once yielding has started
        seen: dict[int, _RowGroup] = {}
        emitted, live = 0, False
        try:
            for w, window in enumerate(self._windows(self._row_groups(part, files))):
                if cap is not None and emitted >= cap:
                    return
                seen.update((g.seq, g) for g in window)
                folders = np.concatenate([np.full(g.rows, g.folder) for g in window])
                ids = np.concatenate([np.stack([np.full(g.rows, g.seq), np.arange(g.rows)], axis=1) for g in window])
                order = np.arange(len(ids))
                if self.shuffle:
                    order = rng(WINDOWS, self.seed, self.epoch, partition, partitions, w).permutation(len(ids))
                events, leftover = window_events(
                    folders, order, {f: len(v) for f, v in carried.items()}, self.batch_size
                )
                if live or emitted + len(events) > skip:
                    if not live:
                        tables = {f: self._read_ids(files, seen, v) for f, v in carried.items()}
                        live = True
                    data = [self._read_group(files, g) for g in window]
                    starts = np.cumsum([0, *(g.rows for g in window)])[:-1]
                    for event in events:
                        if cap is not None and emitted >= cap:
                            return
                        if emitted >= skip:
                            new = _gather(data, starts, event.rows)
                            yield (
                                self._folders[event.folder],
                                _concat([tables[event.folder], new] if event.carry else [new]),
                            )
                        emitted += 1
                    for f, (keep, rows) in leftover.items():
                        pieces = [tables[f]] if keep and f in tables else []
                        if rows.size:
                            pieces.append(_gather(data, starts, rows))
                        _put(tables, f, _concat(pieces) if pieces else None)
                else:
                    emitted += len(events)
                for f, (keep, rows) in leftover.items():
                    kept = [carried[f]] if keep and f in carried else []
                    _put(carried, f, np.concatenate([*kept, ids[rows]]) if kept or rows.size else None)
            if self.drop_last:
                return
            for f in sorted(carried):
                if cap is not None and emitted >= cap:
                    return
                if emitted >= skip:
                    table = tables[f] if live else self._read_ids(files, seen, carried[f])
                    yield self._folders[f], table
                emitted += 1
        finally:
            files.close()

    def _read_group(self, files: _Files, group: _RowGroup) -> pa.Table:
        pf = files.get(group.file)
        names = set(pf.schema_arrow.names)
        missing = [c for c in self._read if c not in names and not c.endswith(FLIPPED)]
        if missing:
            raise LatentizeError(f"{group.file} has no column(s) {missing}")
        return pf.read_row_group(group.index, columns=[c for c in self._read if c in names])

    def _read_ids(self, files: _Files, seen: dict[int, _RowGroup], ids: np.ndarray) -> pa.Table:
        """The rows ``ids`` ((k, 2): row group seq, row), in that order, read back from their files."""
        groups = np.unique(ids[:, 0])
        data = [self._read_group(files, seen[int(s)]) for s in groups]
        starts = np.cumsum([0, *(t.num_rows for t in data)])[:-1]
        positions = starts[np.searchsorted(groups, ids[:, 0])] + ids[:, 1]
        return _gather(data, starts, positions)

    # -- batches ------------------------------------------------------------------------------
    def _to_batch(self, table: pa.Table, folder: str) -> dict[str, Any]:
        keys = [str(k) for k in table.column("key").to_pylist()]
        arrays = {
            n: tensor_numpy(table.column(n)) for n in table.column_names if is_tensor_type(table.schema.field(n).type)
        }
        lengths = None
        for n in table.column_names:
            if is_ragged(table.schema.field(n).type):
                arrays[n], lengths = pad_ragged(table.column(n))
        if self._built_mask and (lengths is not None or MASK in self._columns):
            if lengths is None:
                lengths = table.column(LENGTH).to_numpy().astype(np.int64)
                rows = int(lengths.max()) if lengths.size else 0
            else:
                rows = arrays["prompt_embeds"].shape[1]
            arrays[MASK] = length_mask(lengths, rows)
        batch: dict[str, Any] = {"key": keys, "folder": folder}
        twins = [n for n in arrays if n.endswith(FLIPPED)]
        if twins:
            flipped = np.array([flip_choice(self.seed, self.epoch, k) for k in keys], dtype=bool)
            for twin in twins:
                base = twin[: -len(FLIPPED)]
                mask = flipped.reshape(-1, *([1] * (arrays[base].ndim - 1)))
                arrays[base] = np.where(mask, arrays.pop(twin), arrays[base])
        if self._draw:
            assert self._normalizer is not None
            offset, scale = self._normalizer
            arrays["latent"] = draw_latents(
                arrays["mean"], arrays["logvar"], keys, seed=self.seed, epoch=self.epoch, offset=offset, scale=scale
            )
        names = list(self._columns)
        if MASK in arrays and MASK not in names:
            names.append(MASK)  # a trimmed prompt_embeds is padded: its mask says which rows are real
        for name in names:
            if name in arrays:
                # A copy: Arrow's buffers are read-only, and training may write into a batch.
                batch[name] = torch.from_numpy(np.array(arrays[name]))
            elif pa.types.is_integer(table.schema.field(name).type) or pa.types.is_floating(
                table.schema.field(name).type
            ):
                batch[name] = torch.from_numpy(table.column(name).to_numpy().copy())
            else:
                batch[name] = table.column(name).to_pylist()
        if twins:
            batch["flipped"] = torch.from_numpy(flipped)
        return batch


def _put(mapping: dict[int, Any], key: int, value: Any) -> None:
    """Sets ``mapping[key]``, or removes the key when ``value`` is None."""
    if value is None:
        mapping.pop(key, None)
    else:
        mapping[key] = value


def _concat(tables: list[pa.Table]) -> pa.Table:
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")


def _gather(tables: list[pa.Table], starts: np.ndarray, positions: np.ndarray) -> pa.Table:
    """Rows at ``positions`` of the concatenation of ``tables`` (``starts``: their first
    positions), in that order, as a new table (a copy: the source tables can be let go)."""
    which = np.searchsorted(starts, positions, side="right") - 1
    pieces, placed = [], []
    for t in np.unique(which).tolist():
        sel = np.flatnonzero(which == t)
        pieces.append(tables[t].take(pa.array(positions[sel] - starts[t])))
        placed.append(sel)
    table = _concat(pieces)
    if len(pieces) == 1:
        return table
    return table.take(pa.array(np.argsort(np.concatenate(placed), kind="stable")))
