"""What the training reader reads and who reads it: the committed units of an output root,
their deterministic split over ranks × workers per epoch, the batches each partition yields,
and the order of the batches inside one shuffle window.

Everything here is metadata (commit markers, the manifest, row counts): no latent is read, so
every rank and worker computes the same plan without talking to the others.
"""

from __future__ import annotations

import heapq
import logging
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from latentize.errors import LatentizeError
from latentize.sinks.contract import Manifest, Marker, read_manifest, run_markers
from latentize.sinks.layout import OutputLayout

__all__ = [
    "Event",
    "OutputInfo",
    "Unit",
    "assign",
    "batch_counts",
    "read_output",
    "round_robin",
    "trim",
    "window_events",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    """The committed rows of one input shard in one data folder: the unit of work that is
    assigned to one partition (its data files are read in the order listed)."""

    shard: str
    folder: str
    #: Data files relative to the output root, in name order (their first row index).
    files: tuple[str, ...]
    rows: int


@dataclass(frozen=True)
class OutputInfo:
    """What the reader needs of an output root, read once on the process that builds the reader."""

    layout: OutputLayout
    manifest: Manifest
    #: Every committed unit, sorted by (folder, shard): the order the seeded permutations start from.
    units: list[Unit]
    #: Data folders holding committed rows, sorted.
    folders: list[str] = field(default_factory=list)

    @property
    def encoder(self) -> dict[str, Any]:
        """The manifest's ``encoder`` entry."""
        return self.manifest.encoder

    @property
    def rows(self) -> int:
        return sum(u.rows for u in self.units)


def read_output(layout: OutputLayout) -> OutputInfo:
    """Reads the manifest and the commit markers of ``layout``; only committed files count.

    Markers of another run (another fingerprint) are ignored, as ``latentize status`` does.
    Markers without per-folder ``rows`` (written before they existed) get their row counts from
    the Parquet footers of their files.

    Raises:
        LatentizeError: no manifest, or an output format other than Parquet.
    """
    manifest = read_manifest(layout)
    if manifest is None:
        raise LatentizeError(f"{layout.url} holds no latentize run (no _manifest.json)")
    fmt = manifest.output.format
    if fmt != "parquet":
        raise LatentizeError(
            f"{layout.url} holds {fmt} output; latentize.data reads Parquet outputs "
            "(read WebDataset tars with the webdataset package)"
        )
    units: list[Unit] = []
    for shard, marker in sorted(run_markers(layout, manifest).items()):
        units.extend(_units(layout, shard, marker))
    units.sort(key=lambda u: (u.folder, u.shard))
    folders = sorted({u.folder for u in units})
    logger.info(
        "%s: %d committed unit(s), %d row(s) in %s", layout.url, len(units), sum(u.rows for u in units), folders
    )
    return OutputInfo(layout=layout, manifest=manifest, units=units, folders=folders)


def _units(layout: OutputLayout, shard: str, marker: Marker) -> list[Unit]:
    by_folder: dict[str, list[str]] = {}
    for rel in marker.files:
        folder = posixpath.dirname(rel)
        if rel.endswith(".parquet") and folder and not folder.startswith("_"):
            by_folder.setdefault(folder, []).append(rel)
    rows = marker.rows
    out = []
    for folder, files in sorted(by_folder.items()):
        if rows is not None:
            n = rows.get(folder, 0)
        else:
            n = sum(_footer_rows(layout, f) for f in files)
        if n > 0:
            out.append(Unit(shard=shard, folder=folder, files=tuple(sorted(files)), rows=n))
    return out


def _footer_rows(layout: OutputLayout, rel: str) -> int:
    with layout.fs.open(layout.join(rel), "rb") as f:
        return int(pq.read_metadata(f).num_rows)


def rng(*words: int) -> np.random.Generator:
    """A generator seeded by a tuple of non-negative integers (numpy's SeedSequence entropy)."""
    return np.random.default_rng([int(w) for w in words])


#: First words of the seed tuples, so the permutations of one (seed, epoch) are independent.
UNITS, ROW_GROUPS, WINDOWS = 0, 1, 2


def assign(units: Sequence[Unit], partitions: int, *, seed: int, epoch: int, shuffle: bool) -> list[list[int]]:
    """Splits the units over ``partitions`` partitions: every unit in exactly one.

    Shuffled, units are taken in a seeded permutation of ``(seed, epoch)``, each given to the
    partition holding the fewest rows so far (ties: the lowest index), so partitions differ by
    at most one unit's rows. Not shuffled, each partition takes a contiguous run of the units
    in their (folder, shard) order, cut where the rows are shared out most evenly (a unit goes
    where its middle row falls), so that reading the partitions one after the other reads the
    files in order. Returns each partition's unit indices in the order it reads them.
    """
    parts: list[list[int]] = [[] for _ in range(partitions)]
    if not shuffle:
        total = sum(u.rows for u in units)
        before = 0
        for i, unit in enumerate(units):
            middle = before + unit.rows / 2
            parts[min(partitions - 1, int(partitions * middle / max(total, 1)))].append(i)
            before += unit.rows
        return parts
    order = rng(UNITS, seed, epoch).permutation(len(units))
    heap = [(0, p) for p in range(partitions)]
    for i in order.tolist():
        load, p = heapq.heappop(heap)
        parts[p].append(i)
        heapq.heappush(heap, (load + units[i].rows, p))
    return parts


def batch_counts(units: Sequence[Unit], part: Sequence[int], batch_size: int, *, drop_last: bool) -> int:
    """Batches one partition yields before trimming: per data folder, its rows divided by the
    batch size, rounded up (a last, smaller batch) or down (``drop_last``)."""
    rows: dict[str, int] = {}
    for i in part:
        rows[units[i].folder] = rows.get(units[i].folder, 0) + units[i].rows
    if drop_last:
        return sum(n // batch_size for n in rows.values())
    return sum(-(-n // batch_size) for n in rows.values())


def trim(counts: Sequence[int], target: int) -> list[int]:
    """Caps that bring ``counts`` down to sum ``target``, taking from the largest first (a
    water level; the surplus at the level comes off the highest-indexed partitions)."""
    if sum(counts) <= target:
        return list(counts)
    lo, hi = 0, max(counts)
    while lo < hi:  # the smallest level whose capped sum reaches the target
        mid = (lo + hi) // 2
        if sum(min(c, mid) for c in counts) >= target:
            hi = mid
        else:
            lo = mid + 1
    caps = [min(c, lo) for c in counts]
    surplus = sum(caps) - target
    for p in reversed(range(len(caps))):
        if surplus and caps[p] == lo:
            caps[p] -= 1
            surplus -= 1
    return caps


def round_robin(totals: Sequence[int], consumed: int) -> tuple[list[int], int]:
    """Batches taken from each worker after ``consumed`` batches of a ``DataLoader`` that
    visits its workers in turn (``in_order=True``, the default) and skips exhausted ones:
    each round takes one batch from every worker with batches left, in worker order.

    Returns:
        The batches taken per worker, and the worker whose turn is next (a worker with none
        left passes its turn on).

    Raises:
        LatentizeError: more batches consumed than the workers yield.
    """
    if consumed > sum(totals):
        raise LatentizeError(f"{consumed} batches consumed, but this rank's workers yield only {sum(totals)}")
    lo, hi = 0, max(totals, default=0)
    while lo < hi:  # the most complete rounds that fit in `consumed`
        mid = (lo + hi + 1) // 2
        if sum(min(t, mid) for t in totals) <= consumed:
            lo = mid
        else:
            hi = mid - 1
    taken = [min(t, lo) for t in totals]
    left = consumed - sum(taken)
    turn = 0
    for w, t in enumerate(totals):
        if left and t > lo:
            taken[w] += 1
            left -= 1
            turn = (w + 1) % len(totals)
    return taken, turn


@dataclass(frozen=True)
class Event:
    """One batch completed in a shuffle window: its folder code, whether it starts with the
    rows its folder carried over from earlier windows, and its new rows (window positions)."""

    folder: int
    carry: bool
    rows: np.ndarray


def window_events(
    folders: np.ndarray, order: np.ndarray, carried: Mapping[int, int], batch_size: int
) -> tuple[list[Event], dict[int, tuple[bool, np.ndarray]]]:
    """Which batches a window completes, and in which order.

    The window's rows are walked in ``order``; each folder collects its rows after the ones it
    carried over, and a batch is complete as soon as its folder has ``batch_size`` rows. Batches
    come out in the order they complete, so folders interleave as their rows do.

    Args:
        folders: (n,) folder code of each window row, in window order.
        order: (n,) the walk: a permutation of ``range(n)``.
        carried: rows each folder carries into the window (fewer than ``batch_size``).

    Returns:
        The events in completion order, and per folder what it carries out: ``(keep, rows)``,
        where ``keep`` says whether the carried-in rows are still carried (no batch of the folder
        completed) and ``rows`` are the window positions carried out after them.
    """
    walk = folders[order]
    timed: list[tuple[int, Event]] = []
    leftover: dict[int, tuple[bool, np.ndarray]] = {}
    for f in sorted(set(np.unique(walk).tolist()) | set(carried)):
        times = np.flatnonzero(walk == f)
        rows = order[times]
        c = int(carried.get(f, 0))
        complete = (c + rows.size) // batch_size
        for j in range(complete):
            lo, hi = max(0, j * batch_size - c), (j + 1) * batch_size - c
            timed.append((int(times[hi - 1]), Event(folder=f, carry=j == 0 and c > 0, rows=rows[lo:hi])))
        leftover[f] = (complete == 0, rows[complete * batch_size - c :] if complete else rows)
    timed.sort(key=lambda item: item[0])
    return [e for _, e in timed], leftover
