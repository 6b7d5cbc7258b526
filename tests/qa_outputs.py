"""Builds output roots with chosen latents, in the exact layout `latentize encode` writes
(manifest, input list, commit markers, Parquet data files through the real sink, errors
tables), so QA tests can plant unscaled latents, NaNs or duplicates without an encoder."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from latentize.config import config_to_dict, load_config
from latentize.sinks import SINKS, OutputLayout
from latentize.sinks.base import tensor_array
from latentize.sinks.commit import ERROR_SCHEMA
from latentize.sinks.layout import final_name

FINGERPRINT = "synthetic-fp"


def kl_constants(scaling: float, shift: float = 0.0) -> dict[str, Any]:
    return {
        "scaling_factor": scaling,
        "shift_factor": shift,
        "latents_mean": None,
        "latents_std": None,
        "formula": "(z - shift_factor) * scaling_factor",
        "applied": True,
    }


def write_output(
    url: str,
    column: str,
    values: np.ndarray,
    *,
    constants: dict[str, Any],
    encoder_type: str = "kl",
    shards: int = 2,
    keys: list[str] | None = None,
    errors: dict[str, list[str]] | None = None,
    storage_options: dict[str, Any] | None = None,
    tensor_type: str = "fixed_shape_tensor",
) -> OutputLayout:
    """Writes ``values`` (N, *shape) as the stored ``column`` of a committed output at ``url``.

    Rows are split over ``shards`` shards in order; ``errors`` adds error rows (shard -> keys);
    ``tensor_type`` is the Parquet layout of the tensor column (``output.tensor_type``).
    """
    layout = OutputLayout(url, storage_options=storage_options)
    n = len(values)
    keys = keys or [f"{i // 1000:05d}{i:04d}" for i in range(n)]
    cfg = load_config(base={"input": {"urls": "/nonexistent/{00000..00001}.tar"}, "output": {"path": url}})
    folder = "64x64"
    split = np.array_split(np.arange(n), shards)
    inputs = [(f"/nonexistent/{s:05d}.tar", f"{s:05d}") for s in range(shards)]
    errors = errors or {}
    sink = SINKS.get("parquet")
    ok_total = failed_total = 0
    for (url_s, shard), rows in zip(inputs, split, strict=False):
        m = len(rows)
        table = pa.table(
            {
                "key": pa.array([keys[i] for i in rows], pa.string()),
                column: tensor_array(values[rows]),
                "caption": pa.array([None] * m, pa.string()),
                "json": pa.array([None] * m, pa.string()),
                "notes": pa.array([None] * m, pa.string()),
                "width": pa.array([64] * m, pa.int32()),
                "height": pa.array([64] * m, pa.int32()),
                "crop_top": pa.array([0] * m, pa.int32()),
                "crop_left": pa.array([0] * m, pa.int32()),
            }
        )
        files = []
        data_path = layout.join(folder, final_name(shard, 0, "parquet"))
        layout.write_bytes(
            data_path, sink.serialize(table, tensor_columns=[column], compression="zstd", tensor_type=tensor_type)
        )
        files.append(layout.relative(data_path))
        bad = errors.get(shard, [])
        if bad:
            buf = io.BytesIO()
            pq.write_table(
                pa.table(
                    {
                        "key": bad,
                        "shard": [shard] * len(bad),
                        "index": list(range(m, m + len(bad))),
                        "stage": ["decode"] * len(bad),
                        "error": ["cannot identify image file"] * len(bad),
                        "slot": [-1] * len(bad),
                    },
                    schema=ERROR_SCHEMA,
                ),
                buf,
            )
            layout.write_bytes(layout.errors_path(shard), buf.getvalue())
            files.append(f"_errors/{shard}.parquet")
        layout.write_json(
            layout.marker_path(shard),
            {
                "shard": shard,
                "url": url_s,
                "status": "ok",
                "error": None,
                "samples": m + len(bad),
                "ok": m,
                "failed": len(bad),
                "failed_by_stage": {"decode": len(bad)} if bad else {},
                "reencoded_fp32": 0,
                "files": files,
                "fingerprint": FINGERPRINT,
            },
        )
        ok_total += m
        failed_total += len(bad)
    layout.write_inputs(inputs)
    dtype = str(values.dtype)
    layout.write_json(
        layout.manifest_path,
        {
            "format_version": 1,
            "fingerprint": FINGERPRINT,
            "config": config_to_dict(cfg),
            "encoder": {
                "type": encoder_type,
                "model_class": "synthetic",
                "input_range": "[-1, 1]",
                "downsample_factor": 8,
                "latent_channels": int(values.shape[1]) if values.ndim == 4 else 0,
                "constants": constants,
                "identity": {"model": "synthetic"},
                "columns": {column: {"shape": list(values.shape[1:]), "dtype": dtype}},
                "preset": None,
                "dtype": "float32",
            },
            "output": {"format": "parquet", "dtype": dtype, "tensor_type": tensor_type, "data_folders": [folder]},
            "status": "complete",
            "shards": {"total": shards, "committed": shards, "failed": 0},
            "samples": {"ok": ok_total, "failed": failed_total, "reencoded_fp32": 0},
        },
    )
    return layout


def sd_like_raw(n: int, *, seed: int = 0, shape: tuple[int, ...] = (4, 8, 8)) -> np.ndarray:
    """Raw latents with SD-VAE-like spread: per-channel means near 0, std about 1 / 0.18215."""
    rng = np.random.default_rng(seed)
    means = np.array([0.8, -0.5, 0.3, 0.1])[: shape[0]] / 0.18215
    stds = np.array([1.0, 0.9, 1.1, 1.0])[: shape[0]] / 0.18215
    return rng.normal(size=(n, *shape)) * stds[:, None, None] + means[:, None, None]
