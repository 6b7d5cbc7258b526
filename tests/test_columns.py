"""Every column that crosses a stage has one Arrow type whatever the block holds: blocks of
end-of-shard rows only, of failed samples only, of one sample, through the read transform and
the encoder actor, for fixed sizes, buckets, resolutions and flip (no Ray cluster: the stage
functions and Ray's own block conversion and concatenation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from ray.data._internal.arrow_ops.transform_pyarrow import concat
from ray.data.block import BlockAccessor

from latentize.columns import FLIGHT_TYPES, to_block
from latentize.config import Config, config_to_dict, load_config
from latentize.demo import photo_samples
from latentize.encoders import ENCODERS
from latentize.encoders.base import resolved_source
from latentize.pipeline import EncodeActor
from latentize.preprocess import preprocess_block
from latentize.preprocess.buckets import resolve_targets
from latentize.sources.datasource import SAMPLE_SCHEMA

_MODES: dict[str, dict[str, Any]] = {
    "fixed": {"resolution": 64},
    "buckets-flip": {"buckets": [[64, 64], [96, 64], [64, 96]], "flip": True},
    "resolutions": {"resolutions": [64, 96]},
}


def _row(index: int, *, image: bytes | None = None, error: str | None = None, total: int = -1) -> dict[str, Any]:
    return {
        "key": None if total >= 0 else f"k{index}",
        "shard": "00000",
        "index": index,
        "image": image,
        "caption": None,
        "json": None,
        "notes": None,
        "error": error,
        "stage": "read" if error else None,
        "total": total,
        "read_node": "node" if total >= 0 else None,
    }


def _blocks() -> dict[str, pa.Table]:
    """Read blocks of the kinds that a shard ends with or consists of."""
    photo = photo_samples(resolution=64)[0].image
    kinds = {
        "end-of-shard only": [_row(-1, total=3)],
        "failed only": [_row(i, error="img2dataset: failed_to_download") for i in range(3)],
        "undecodable only": [_row(i, image=b"<html></html>") for i in range(3)],
        "one sample": [_row(0, image=photo)],
        "samples and end": [_row(0, image=photo), _row(1, image=photo), _row(-1, total=2)],
    }
    return {name: pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA) for name, rows in kinds.items()}


def _config(model: Path, preprocess: dict[str, Any]) -> Config:
    return load_config(
        base={
            "input": {"urls": "unused"},
            "preprocess": preprocess,
            "encoder": {"model": str(model), "batch_size": 2, "device": "cpu"},
            "output": {"path": "unused"},
        }
    )


def _assert_flight_types(block: pa.Table, where: str) -> None:
    for field in block.schema:
        if field.name in FLIGHT_TYPES:
            assert field.type == FLIGHT_TYPES[field.name], f"{where}: {field.name} is {field.type}"


def test_to_block_types_all_null_columns_by_name() -> None:
    batch = {
        "folder": np.array([None, None], dtype=object),
        "notes": np.array([np.nan, np.nan], dtype=np.float32),  # how Ray hands over a null column
        "slot": np.array([-1, -1], dtype=np.int32),
        "pixels": np.zeros((2, 4, 4, 3), np.uint8),
    }
    block = to_block(batch)
    assert block.column_names == ["folder", "notes", "slot", "pixels"]
    assert block.schema.field("folder").type == pa.string() and block.column("notes").null_count == 2
    assert BlockAccessor.for_block(block).to_batch_format("numpy")["pixels"].shape == (2, 4, 4, 3)


@pytest.mark.parametrize("mode", sorted(_MODES))
def test_every_stage_types_its_columns_whatever_the_block_holds(mode: str, tiny_models: dict[str, Path]) -> None:
    cfg = _config(tiny_models["kl"], _MODES[mode])
    spec = ENCODERS.get(resolved_source(cfg)[0]).inspect(cfg)
    targets = resolve_targets(cfg.preprocess, spec.downsample)
    actor = EncodeActor(config=config_to_dict(cfg), spec=spec)
    decoded, encoded = [], []
    for kind, block in _blocks().items():
        pixels = preprocess_block(block, config=cfg.preprocess, targets=targets)
        _assert_flight_types(pixels, f"read transform, {kind}")
        decoded.append(pixels)
        # The actor gets the numpy batch of that block alone: an all-null column arrives as NaN.
        out = actor(BlockAccessor.for_block(pixels).to_batch_format("numpy"))
        _assert_flight_types(out, f"encoder, {kind}")
        encoded.append(out)
    # Ray concatenates blocks of any kinds when it forms the next stage's batches.
    for blocks in (decoded, encoded):
        merged = concat(blocks)
        _assert_flight_types(merged, "concatenated")
        assert merged.num_rows == sum(b.num_rows for b in blocks)


def test_a_run_of_one_size_gives_every_row_its_slot_and_folder_whichever_way_it_decodes(
    tiny_models: dict[str, Path],
) -> None:
    # One preprocess path: a run of one size is one resolution, one folder. The encoder actor
    # that decodes on its device (bytes in) gives the rows what the read tasks give them.
    cfg = _config(tiny_models["kl"], _MODES["fixed"])
    spec = ENCODERS.get(resolved_source(cfg)[0]).inspect(cfg)
    targets = resolve_targets(cfg.preprocess, spec.downsample)
    on_cpu = EncodeActor(config=config_to_dict(cfg), spec=spec)
    on_device = EncodeActor(config=config_to_dict(cfg), spec=spec, decode="gpu")
    compared = ("key", "index", "error", "stage", "slot", "folder", "width", "height", "crop_top", "crop_left")
    for kind, block in _blocks().items():
        pixels = preprocess_block(block, config=cfg.preprocess, targets=targets)
        errors, totals = pixels.column("error").to_pylist(), pixels.column("total").to_pylist()
        decoded = [e is None and t < 0 for e, t in zip(errors, totals, strict=True)]
        assert pixels.column("slot").to_pylist() == [0 if d else -1 for d in decoded], kind
        assert pixels.column("folder").to_pylist() == ["64x64" if d else None for d in decoded], kind
        cpu = on_cpu(BlockAccessor.for_block(pixels).to_batch_format("numpy"))
        device = on_device(BlockAccessor.for_block(block).to_batch_format("numpy"))
        _assert_flight_types(device, f"encoder decoding on its device, {kind}")
        assert device.select(compared).to_pylist() == cpu.select(compared).to_pylist(), kind
