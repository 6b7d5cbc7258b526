"""``latentize plan``: what a run would read, write and cost, found without writing anything.

The shard list, the output root's state and the encoder's latent shapes come from
:func:`latentize.pipeline.plan`, which reads the output root but writes nothing and starts no
Ray. Sample counts come, per shard, from img2dataset's ``_stats.json`` beside it, else from the
Parquet footer (up to a limit of shards), else from reading a few sampled shards to their end;
shards not counted are estimated from their size at the bytes per sample of those counted. The
sampled shards' first images are decoded with the configured preprocessing to time the CPU
decode. GPU-hours come from :data:`latentize.throughput.GPU_THROUGHPUT`, which holds only
measured figures (``None`` elsewhere); beside them, the encoder's CPU-measured cost relative to
the SD VAE's (:data:`latentize.throughput.CPU_COST`), never turned into GPU-hours.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq

from latentize.config import Config
from latentize.encoders.base import EncoderSpec
from latentize.encoders.text.spec import TextSpec
from latentize.preprocess.buckets import Targets
from latentize.sinks.layout import data_folder
from latentize.sources.inventory import ShardFile, shard_files

__all__ = ["MIN_BATCHES_PER_ACTOR", "TEXT_WARN_RATIO", "estimate_run", "local_resources"]

logger = logging.getLogger(__name__)

#: An encoder actor that loads its model for fewer batches than this spends more time starting
#: than encoding: the suggested ``ray.actors`` gives each at least this many.
MIN_BATCHES_PER_ACTOR = 16
# Fixed-width columns of a data row besides the tensors: width, height, crop_top, crop_left.
_FIXED_ROW_BYTES = 16
#: ``latentize plan`` warns when the text columns would take more than this many times the
#: latents' bytes (a T5-XXL's padded 512 x 4096 per caption dwarfs a 64 x 64 x 16 latent).
TEXT_WARN_RATIO = 10


@dataclass
class _Sample:
    """What reading and decoding the first rows of the sampled shards found."""

    shards: list[str] = field(default_factory=list)
    #: Samples read (data or error rows to be).
    rows: int = 0
    #: Samples that read and decoded (data rows to be).
    ok: int = 0
    decoded: int = 0
    decode_seconds: float = 0.0
    #: Data rows by data folder (one per resolution per sample; a bucket per sample and resolution).
    folder_rows: dict[str, int] = field(default_factory=dict)
    #: Bytes of the key, caption and json text of those data rows.
    sidecar_bytes: int = 0
    #: Shard index -> samples, for the shards read to their end.
    counted: dict[int, int] = field(default_factory=dict)


def _spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (first and last included), sorted."""
    if k <= 0 or n == 0:
        return []
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


def _read_rows(url: str, fmt: str, config: Config, *, limit: int, to_end: bool) -> tuple[list[Any], int | None]:
    """The first ``limit`` samples of a shard, and (with ``to_end``) how many it holds; the
    count is ``None`` when the shard could not be read to its end."""
    from latentize.sources import SOURCES

    rows: list[Any] = []
    count = 0
    try:
        with fsspec.open(url, "rb", **config.input.storage_options) as f:
            for sample in SOURCES.get(fmt)(f, config=config.input):
                count += 1
                if len(rows) < limit:
                    rows.append(sample)
                elif not to_end:
                    return rows, None
    except Exception as exc:  # noqa: BLE001 - a broken shard is the run's to report
        logger.warning("plan: reading %s stopped after %d samples (%s: %s)", url, count, type(exc).__name__, exc)
        return rows, None
    return rows, count if to_end else None


def _decode(rows: list[Any], config: Config, targets: Targets, sample: _Sample) -> None:
    """Decodes ``rows`` as the read tasks do (one batch through ``preprocess_batch``, cropped to
    every size of the run), timed; counts the data rows per folder."""
    from latentize.preprocess import preprocess_batch

    n = len(rows)
    if n == 0:
        return
    batch: dict[str, np.ndarray] = {}
    for name in ("key", "image", "caption", "json", "error", "notes"):
        batch[name] = np.empty(n, dtype=object)
        batch[name][:] = [getattr(r, name) for r in rows]
    batch["stage"] = np.array(["read" if r.error else None for r in rows], dtype=object)
    batch["total"] = np.full(n, -1, dtype=np.int64)
    started = time.perf_counter()
    out = preprocess_batch(batch, config=config.preprocess, targets=targets)
    sample.decode_seconds += time.perf_counter() - started
    sample.decoded += sum(r.error is None for r in rows)
    sample.rows += n
    # Error rows stay one row each; a good sample becomes one row per resolution.
    sample.ok += n - sum(e is not None for e in out["error"])
    for i, (error, folder) in enumerate(zip(out["error"], out["folder"], strict=True)):
        if error is None and folder is not None:
            sample.folder_rows[folder] = sample.folder_rows.get(folder, 0) + 1
            sample.sidecar_bytes += sum(len(str(out[c][i] or "").encode()) for c in ("key", "caption", "json"))


def _sample_shards(
    urls: list[str], picks: list[int], config: Config, fmt: str, *, targets: Targets, images: int, counted: set[int]
) -> _Sample:
    """Reads and decodes the first ``images`` samples of each picked shard; a WebDataset shard
    not counted otherwise is read to its end (a tar has no index to count from)."""
    sample = _Sample()
    for i in picks:
        to_end = fmt == "webdataset" and i not in counted
        rows, count = _read_rows(urls[i], fmt, config, limit=images, to_end=to_end)
        sample.shards.append(urls[i])
        if count is not None:
            sample.counted[i] = count
        _decode(rows, config, targets, sample)
    return sample


def _footer_counts(urls: list[str], indices: list[int], config: Config) -> dict[int, int]:
    counts: dict[int, int] = {}
    for i in indices:
        try:
            with fsspec.open(urls[i], "rb", **config.input.storage_options) as f:
                counts[i] = int(pq.ParquetFile(f).metadata.num_rows)
        except Exception as exc:  # noqa: BLE001 - estimated from its size instead
            logger.debug("no footer from %s (%s: %s)", urls[i], type(exc).__name__, exc)
    return counts


def _stats_counts(files: list[ShardFile], fmt: str) -> dict[int, int]:
    """Samples per shard from img2dataset's stats: a tar holds only the downloaded images
    (``successes``), its Parquet output a row per URL tried (``count``)."""
    key = "successes" if fmt == "webdataset" else "count"
    return {i: int(f.stats[key]) for i, f in enumerate(files) if f.stats and isinstance(f.stats.get(key), int)}


def _counts(
    files: list[ShardFile], fmt: str, config: Config, footer_limit: int
) -> tuple[dict[int, int], dict[str, int]]:
    """Known sample counts by shard index, and how many shards each way counted."""
    counts = _stats_counts(files, fmt)
    methods = {"_stats.json": len(counts)}
    if fmt == "parquet":
        rest = [i for i in range(len(files)) if i not in counts]
        picks = [rest[j] for j in _spread(len(rest), footer_limit)]
        footers = _footer_counts([f.url for f in files], picks, config)
        counts.update(footers)
        methods["parquet metadata"] = len(footers)
    return counts, methods


def _fill(files: list[ShardFile], counts: dict[int, int]) -> list[int]:
    """A count per shard: the known ones, the others from their size at the bytes per sample
    of the counted shards (their mean count when sizes are unknown)."""
    sized = [(counts[i], files[i].size) for i in counts if files[i].size]
    per_byte = sum(c for c, _ in sized) / sum(s for _, s in sized if s) if sized else None
    mean = sum(counts.values()) / len(counts) if counts else 0.0
    out = []
    for i, f in enumerate(files):
        if i in counts:
            out.append(counts[i])
        elif per_byte is not None and f.size:
            out.append(round(f.size * per_byte))
        else:
            out.append(round(mean))
    return out


def _preset_of(config: Config) -> str | None:
    """The preset a config uses: named, or the one whose hub weights it names."""
    from latentize.presets import PRESETS

    if config.encoder.preset:
        return config.encoder.preset
    for name in PRESETS.names():
        preset = PRESETS.get(name)
        if preset.model == config.encoder.model and preset.subfolder == config.encoder.subfolder:
            return name
    return None


def _gpu_figures(config: Config, pixels: float, samples: int, decode_ms: float | None) -> dict[str, Any]:
    """GPU-hours to encode ``pixels`` (every crop of ``samples`` samples), and the CPU cores that
    decode must keep busy to feed each GPU, where a throughput was measured."""
    from latentize.throughput import GPUS, relative_cost_for, throughput_for

    preset = _preset_of(config)
    hours: dict[str, float | None] = {}
    cpus: dict[str, float | None] = {}
    figures: dict[str, Any] = {}
    for gpu in GPUS:
        fig = throughput_for(preset, gpu)
        rate = fig.pixels_per_second if fig else None
        hours[gpu] = round(pixels / rate / 3600, 3) if rate and pixels else None
        if rate and pixels and decode_ms is not None:
            # Samples per second the GPU takes in, each decoded once for all its crops.
            cpus[gpu] = round(rate / (pixels / samples) * decode_ms / 1000, 1)
        else:
            cpus[gpu] = None
        figures[gpu] = fig.to_dict() if fig else None
    cost = relative_cost_for(preset)
    return {
        "preset": preset,
        "gpu_hours": hours,
        "decode_cpus_per_gpu": cpus,
        "throughput": figures,
        "encoder_cost": cost.to_dict() if cost else None,
    }


def local_resources() -> dict[str, float]:
    """What a local Ray started on this machine would advertise, found without starting one:
    ``GPU`` as Ray counts them (the devices ``CUDA_VISIBLE_DEVICES`` names, else NVML's count;
    0 when NVML cannot be loaded) and ``CPU`` (the cores this process may use)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        manager = get_accelerator_manager_for_resource("GPU")
        if manager is None:
            return {"GPU": 0.0, "CPU": float(cpus)}
        found = int(manager.get_current_node_num_accelerators())
        visible = manager.get_current_process_visible_accelerator_ids()
        gpus = found if visible is None else min(found, len(visible))
    except Exception as exc:  # noqa: BLE001 - Ray's accelerator API is private; no GPU then
        logger.debug("plan: could not count GPUs (%s: %s); assuming none", type(exc).__name__, exc)
        gpus = 0
    return {"GPU": float(gpus), "CPU": float(cpus)}


def _suggested(config: Config, rows: int, resources: dict[str, float]) -> dict[str, int]:
    """``ray.actors`` and ``encoder.batch_size`` for a cluster of ``resources``: the batch size
    the run would use there (GPU or CPU encoders by the rules of
    :func:`latentize.encoders.pool.execution_for`), and as many actors as fit, each with at least
    :data:`MIN_BATCHES_PER_ACTOR` encoder calls of the ``rows`` to encode."""
    from latentize.encoders.base import encoder_batch_size
    from latentize.encoders.pool import pool_on_gpu

    gpu = pool_on_gpu(config, resources.get("GPU", 0.0))
    batch = encoder_batch_size(config, gpu=gpu)
    room = int(resources["GPU"] // config.ray.gpus_per_actor) if gpu else max(1, int(resources.get("CPU", 1)) - 1)
    actors = min(room, max(1, math.ceil(rows / (batch * MIN_BATCHES_PER_ACTOR))))
    return {"ray.actors": actors, "encoder.batch_size": batch}


@dataclass(frozen=True)
class _Output:
    """The estimated data rows, bytes and encoded pixels of a number of samples."""

    rows: dict[str, int]
    bytes: dict[str, int]
    row_bytes: dict[str, dict[str, float]]
    pixels: float


def _output(
    spec: EncoderSpec, targets: Targets, sample: _Sample, samples: int, *, flip: bool, text_bytes: int = 0
) -> _Output:
    """Rows per folder in the sampled proportions; bytes per row from the encoder's columns at
    the folder's size (twice with ``flip``) plus the carried text, the geometry columns and,
    with a ``text`` section, the text encoder's columns (``text_bytes`` per row: every data row
    of a sample holds them)."""
    sizes = {data_folder(size): size for size in targets.sizes}
    text = sample.sidecar_bytes / sum(sample.folder_rows.values()) if sample.folder_rows else 0.0
    copies = 2 if flip else 1
    rows: dict[str, int] = {}
    row_bytes: dict[str, dict[str, float]] = {}
    pixels = 0.0
    for folder, seen in sorted(sample.folder_rows.items()):
        size = sizes[folder]
        rows[folder] = round(samples * seen / sample.rows)
        tensors = copies * sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in spec.columns_for(size).values())
        row_bytes[folder] = {"tensors": tensors, "key_caption_json": round(text, 1), "other": _FIXED_ROW_BYTES}
        if text_bytes:
            row_bytes[folder]["text_embeddings"] = text_bytes
        pixels += rows[folder] * size[0] * size[1] * copies
    folder_bytes = {f: round(rows[f] * sum(row_bytes[f].values())) for f in rows}
    return _Output(rows, folder_bytes, row_bytes, pixels)


def estimate_run(
    config: Config,
    *,
    sample_shards: int = 2,
    sample_images: int = 32,
    footer_limit: int = 256,
    gpus: int | None = None,
) -> dict[str, Any]:
    """The dry run of ``config``: counts, sizes and costs, as plain data (``latentize plan``).

    Writes nothing, starts no Ray. Keys: ``shards`` and ``shards_pending``; ``samples`` (all
    shards) and ``samples_pending``, with ``samples_exact`` and ``samples_counted_by``;
    ``input_bytes``; ``output_rows`` and ``output_bytes`` per data folder (uncompressed:
    tensors plus key, caption and json text; with several resolutions or aspect-ratio buckets,
    the folders in the proportions the sampled images fell into); ``decode_ms_per_image`` (CPU,
    the configured preprocessing, every crop of a sample included; ``None`` when no image was
    sampled); ``gpu_hours`` per GPU of the pending samples (``None`` where no throughput was
    measured); ``encoder_cost``, the encoder's cost per image relative to the SD VAE's measured on
    a CPU (``None`` where not measured); ``suggested`` ``ray.actors`` and ``encoder.batch_size``
    (what the run would use with ``gpus`` GPUs, or with this machine's when ``gpus`` is None), and
    ``suggested_for`` (``gpus``, ``cpus``, ``encoders``: ``gpu`` or ``cpu``, ``detected``: counted
    on this machine).

    Args:
        sample_shards: shards read for the decode timing (and, for WebDataset shards without
            img2dataset stats, counted to their end).
        sample_images: images decoded per sampled shard.
        footer_limit: Parquet shards at most whose footers are read for their row counts.
        gpus: GPUs the run will have; None: those of this machine, as a local Ray would count
            them (0 means CPU encoders, with CPU batch sizes).

    Raises:
        LatentizeError: as :func:`latentize.pipeline.plan` (bad config, unreadable input,
            another run in the output root).
    """
    from latentize.encoders.pool import pool_on_gpu
    from latentize.pipeline import plan

    p = plan(config)
    resources = local_resources()
    if gpus is not None:
        resources["GPU"] = float(gpus)
    cfg = p.config
    urls = [url for url, _ in p.shards]
    files = shard_files(urls, cfg.input.storage_options)
    counts, methods = _counts(files, p.fmt, cfg, footer_limit)
    picks = _spread(len(urls), sample_shards)
    sample = _sample_shards(urls, picks, cfg, p.fmt, targets=p.targets, images=sample_images, counted=set(counts))
    methods["scan"] = len(set(sample.counted) - set(counts))
    counts = {**sample.counted, **counts}
    per_shard = _fill(files, counts)
    pending = {shard for _, shard in p.pending}
    samples = sum(per_shard)
    samples_pending = sum(n for n, (_, shard) in zip(per_shard, p.shards, strict=True) if shard in pending)
    text_bytes = p.text.bytes_per_sample() if p.text is not None else 0
    out = _output(p.spec, p.targets, sample, samples, flip=cfg.preprocess.flip, text_bytes=text_bytes)
    todo = _output(p.spec, p.targets, sample, samples_pending, flip=cfg.preprocess.flip, text_bytes=text_bytes)
    decode_ms = round(1000 * sample.decode_seconds / sample.decoded, 2) if sample.decoded else None
    gpu = _gpu_figures(cfg, todo.pixels, samples_pending, decode_ms)
    return {
        "output": p.layout.url,
        "fresh": p.fresh,
        "format": p.fmt,
        "shards": len(p.shards),
        "shards_pending": len(p.pending),
        "samples": samples,
        "samples_pending": samples_pending,
        "samples_exact": len(counts) == len(files),
        "samples_counted_by": {**methods, "estimated from size": len(files) - len(counts)},
        "input_bytes": sum(f.size or 0 for f in files),
        "encoder": {"preset": gpu["preset"], "type": cfg.encoder.type, "model": cfg.encoder.model},
        "output_rows": out.rows,
        "output_row_bytes": out.row_bytes,
        "output_bytes": out.bytes,
        "text": _text_figures(p.text, out),
        "decode_ms_per_image": decode_ms,
        "decode_sample": {"shards": sample.shards, "samples": sample.rows, "ok": sample.ok},
        "gpu_hours": gpu["gpu_hours"],
        "decode_cpus_per_gpu": gpu["decode_cpus_per_gpu"],
        "throughput": gpu["throughput"],
        "encoder_cost": gpu["encoder_cost"],
        "suggested": _suggested(cfg, sum(todo.rows.values()), resources),
        "suggested_for": {
            "gpus": int(resources["GPU"]),
            "cpus": int(resources["CPU"]),
            "encoders": "gpu" if pool_on_gpu(cfg, resources["GPU"]) else "cpu",
            "detected": gpus is None,
        },
    }


def _text_figures(text: TextSpec | None, out: _Output) -> dict[str, Any] | None:
    """The text columns' share of the output (None without a ``text`` section): bytes per data
    row (for ``trimmed``, the most a caption can take: the maximum) and in total, beside the
    latents' total; ``warning`` when they exceed the latents' bytes :data:`TEXT_WARN_RATIO`-fold."""
    if text is None:
        return None
    per_row = text.bytes_per_sample()
    rows = sum(out.rows.values())
    total = per_row * rows
    latents = sum(round(out.rows[f] * out.row_bytes[f]["tensors"]) for f in out.rows)
    warning = None
    if latents and total > TEXT_WARN_RATIO * latents:
        warning = f"the text columns ({total / latents:.0f}x the latents' bytes) dominate the output; " + (
            "text.storage: trimmed stores only each caption's real tokens"
            if text.masks_padding and text.storage == "padded"
            else "check that the text preset and text.max_sequence_length are the ones you want"
        )
        logger.warning("latentize plan: %s", warning)
    return {
        "preset": text.preset,
        "storage": text.storage,
        "bytes_per_row": per_row,
        # Trimmed rows hold each caption's real tokens: the figures are the most they can be.
        "maximum": text.storage == "trimmed",
        "bytes": total,
        "latent_bytes": latents,
        "warning": warning,
    }
