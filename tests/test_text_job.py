"""Caption embeddings in the same pass as the latents: the real job through the session's local
Ray with tiny image and text models. Stored text columns equal the pipeline's ``encode_prompt``
in every data folder, a caption the text encoder fails on costs its sample (an error row, no data
row), the empty prompt is stored once per root, other text settings are refused on a rerun, and
blocks of rows without text still concatenate with the others."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_text import LONG, _assert_storage_close, _expected

from latentize.config import Config, load_config
from latentize.demo import ShardSample, write_webdataset_shard
from latentize.encoders.text import LENGTH, MASK, TextResult
from latentize.encoders.text.actor import EMPTY_PROMPT_FILE, TextActor
from latentize.errors import LatentizeError
from latentize.pipeline import plan, run
from latentize.sinks.base import prompt_samples

pytestmark = pytest.mark.usefixtures("ray_session")

#: Captions of the shards: repeats, empty, missing (no .txt member), over-long, non-ASCII.
CAPTIONS: list[str | None] = ["a photo of a cat", "a photo of a cat", "", None, LONG, "Café über 東京, 🐱!"]
FAIL = "a red car on the road"  # the caption the failing actor refuses


def _image(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (56, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _shards(root: Path, captions: Sequence[str | None], per_shard: int = 3) -> str:
    for s in range(0, len(captions), per_shard):
        samples = [
            ShardSample(key=f"{s // per_shard:05d}{i:04d}", image=_image(s + i), ext="png", caption=c)
            for i, c in enumerate(captions[s : s + per_shard])
        ]
        write_webdataset_shard(str(root / f"{s // per_shard:05d}.tar"), samples)
    return str(root / "*.tar")


def _config(urls: str, out: Path, image_model: Path, text: dict[str, Any], **extra: Any) -> Config:
    return load_config(
        base={
            "input": {"urls": urls, "image_field": "png"},
            "preprocess": extra.pop("preprocess", {"resolution": 32}),
            "encoder": {"model": str(image_model), "batch_size": 4},
            # CPU text actors: the session's one (faked) GPU is the image pool's.
            "text": {"gpus_per_actor": 0, "batch_size": 4, **text},
            "output": {"path": str(out), **extra.pop("output", {})},
        }
    )


def _keys(captions: Sequence[str | None], per_shard: int = 3) -> list[str]:
    return [f"{i // per_shard:05d}{i % per_shard:04d}" for i in range(len(captions))]


def test_sdxl_padded_columns_equal_encode_prompt_in_every_folder(
    tmp_path: Path, tiny_models: dict[str, Path], tiny_text_pipelines: dict[str, Path]
) -> None:
    folder = tiny_text_pipelines["sdxl"]
    urls = _shards(tmp_path / "in", CAPTIONS, per_shard=len(CAPTIONS))
    out = tmp_path / "out"
    cfg = _config(
        urls,
        out,
        tiny_models["kl"],
        {"preset": "sdxl", "model": str(folder)},
        preprocess={"resolutions": [32, 48]},
    )
    summary = run(cfg)
    assert summary.complete and (summary.samples_ok, summary.samples_failed) == (6, 0)

    keys = _keys(CAPTIONS, per_shard=len(CAPTIONS))
    want = {k: _expected("sdxl", folder, c or "") for k, c in zip(keys, CAPTIONS, strict=True)}
    for name in ("32x32", "48x48"):
        table = pq.read_table(out / name)
        assert table.column_names[:4] == ["key", "latent", "prompt_embeds", "pooled_prompt_embeds"]
        assert table.column_names[4:7] == ["caption", "json", "notes"]
        assert sorted(table.column("key").to_pylist()) == keys  # every key once per folder
        # Stored like the latents: the canonical tensor type, CLIP-L and CLIP-G side by side.
        assert isinstance(table.schema.field("prompt_embeds").type, pa.FixedShapeTensorType)
        assert table.column("prompt_embeds").type.shape == [77, 32 + 48]
        embeds = dict(zip(table.column("key").to_pylist(), prompt_samples(table.column("prompt_embeds")), strict=True))
        pooled = table.column("pooled_prompt_embeds").combine_chunks().to_numpy_ndarray()
        pooled_by_key = dict(zip(table.column("key").to_pylist(), pooled, strict=True))
        notes = dict(zip(table.column("key").to_pylist(), table.column("notes").to_pylist(), strict=True))
        for key in keys:
            _assert_storage_close(embeds[key], want[key]["prompt_embeds"], "float16")
            _assert_storage_close(pooled_by_key[key], want[key]["pooled_prompt_embeds"], "float16")
        assert notes[keys[3]] == 'missing caption: encoded as ""'
        assert notes[keys[2]] is not None and "encoded as" in notes[keys[2]]
        assert notes[keys[4]] is not None and "caption truncated: " in notes[keys[4]]
        assert notes[keys[0]] is None and notes[keys[5]] is None

    manifest = json.loads((out / "_manifest.json").read_text())
    text = manifest["text"]
    assert text["preset"] == "sdxl" and text["storage"] == "padded" and text["empty_prompt"] == EMPTY_PROMPT_FILE
    assert text["columns"]["prompt_embeds"] == {"shape": [77, 80], "dtype": "float16"}
    empty = np.load(out / EMPTY_PROMPT_FILE)
    assert sorted(empty.files) == ["pooled_prompt_embeds", "prompt_embeds"]
    want_empty = _expected("sdxl", folder, "")
    for name in empty.files:
        _assert_storage_close(empty[name], want_empty[name], "float16")

    # (c) Other text settings on this output are refused, naming the setting.
    other = _config(
        urls,
        out,
        tiny_models["kl"],
        {"preset": "sdxl", "model": str(folder), "dtype": "float32"},
        preprocess={"resolutions": [32, 48]},
    )
    with pytest.raises(LatentizeError, match=r"text\.dtype"):
        plan(other)
    # A rerun with the same settings finds everything committed and keeps the empty prompt.
    before = (out / EMPTY_PROMPT_FILE).read_bytes()
    assert run(cfg).nothing_to_do
    assert (out / EMPTY_PROMPT_FILE).read_bytes() == before


def _failing_actor(caption: str) -> type[TextActor]:
    """A text actor whose encoder fails on ``caption`` (test-only: it stands for a prompt the
    pipeline cannot encode)."""

    class FailOn(TextActor):
        def encode(self, captions: Sequence[str | None], keys: Sequence[str]) -> TextResult:
            result = super().encode(captions, keys)
            for i, c in enumerate(captions):
                if c == caption:
                    result.errors[i] = "text encoder failed: injected"
            return result

    return FailOn


def _tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(path.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member)
                assert data is not None
                samples.setdefault(key, {})[ext] = data.read()
    return samples


def test_pixart_trimmed_webdataset_with_a_failing_caption(
    tmp_path: Path, tiny_models: dict[str, Path], tiny_text_pipelines: dict[str, Path]
) -> None:
    folder = tiny_text_pipelines["pixart-sigma"]
    captions = ["a photo of a cat", FAIL, "", "a small old house"]
    urls = _shards(tmp_path / "in", captions, per_shard=2)
    out = tmp_path / "out"
    cfg = _config(
        urls,
        out,
        tiny_models["kl"],
        {"preset": "pixart-sigma", "model": str(folder), "storage": "trimmed"},
        output={"format": "webdataset"},
    )
    summary = run(cfg, text_actor=_failing_actor(FAIL))
    assert (summary.samples_ok, summary.samples_failed) == (3, 1)
    assert summary.failed_now_by_stage == {"text": 1}
    keys = _keys(captions, per_shard=2)
    samples = _tar_samples(out / "32x32")
    assert sorted(samples) == [k for k, c in zip(keys, captions, strict=True) if c != FAIL]
    errors = pq.read_table(out / "_errors").to_pylist()
    assert [(e["key"], e["stage"]) for e in errors] == [(keys[1], "text")]
    assert "injected" in errors[0]["error"]
    for key, caption in zip(keys, captions, strict=True):
        if caption == FAIL:
            continue
        sample = samples[key]
        assert {"latent.npy", "prompt_embeds.npy", LENGTH + ".npy"} <= set(sample)
        assert MASK + ".npy" not in sample
        embeds = np.load(io.BytesIO(sample["prompt_embeds.npy"]))
        length = np.load(io.BytesIO(sample[LENGTH + ".npy"]))
        want = _expected("pixart-sigma", folder, caption)
        assert length.dtype == np.int32 and length.shape == () and int(length) == int(want[MASK].sum())
        assert embeds.shape == (int(length), want["prompt_embeds"].shape[1])
        _assert_storage_close(embeds, want["prompt_embeds"][: int(length)], "float16")
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["text"]["columns"]["prompt_embeds"]["shape"] == [None, want["prompt_embeds"].shape[1]]
    empty = np.load(out / EMPTY_PROMPT_FILE)
    assert int(empty[LENGTH]) == empty["prompt_embeds"].shape[0]


@pytest.mark.parametrize("storage", ["padded", "trimmed"])
def test_blocks_without_text_rows_concatenate_with_the_others(
    storage: str, tmp_path: Path, tiny_text_pipelines: dict[str, Path]
) -> None:
    """(d) Blocks of end-of-shard rows only or of failed rows only get the text columns at the
    same Arrow types as blocks of real rows; Ray concatenates them, and staging reads them back."""
    from ray.data.block import BlockAccessor

    from latentize.columns import prompt_flight_type, to_block
    from latentize.config import config_to_dict
    from latentize.encoders.text import inspect_text
    from latentize.sinks import OutputLayout, stage_batch

    cfg = load_config(
        base={
            "output": {"path": str(tmp_path / "out")},
            "text": {"preset": "pixart-sigma", "model": str(tiny_text_pipelines["pixart-sigma"]), "storage": storage},
        }
    )
    spec = inspect_text(cfg)
    actor = TextActor(config=config_to_dict(cfg), spec=spec)

    def block(keys: list[str | None], captions: list[str | None], error: str | None, total: int) -> pa.Table:
        n = len(keys)
        return to_block(
            {
                "key": np.array(keys, dtype=object),
                "shard": np.array(["s"] * n, dtype=object),
                "index": np.arange(n) if total < 0 else np.full(n, -1),
                "caption": np.array(captions, dtype=object),
                "json": np.full(n, None, dtype=object),
                "notes": np.full(n, None, dtype=object),
                "error": np.full(n, error, dtype=object),
                "stage": np.full(n, "decode" if error else None, dtype=object),
                "total": np.full(n, total),
                "width": np.full(n, 8, dtype=np.int32),
                "height": np.full(n, 8, dtype=np.int32),
                "crop_top": np.zeros(n, dtype=np.int32),
                "crop_left": np.zeros(n, dtype=np.int32),
            }
        )

    sentinel = actor(block([None], [None], None, 3))
    failed = actor(block(["k0"], ["a photo of a cat"], "decode failed", -1))
    real = actor(block(["k1", "k2"], ["a photo of a cat", "a small old house"], None, -1))
    for name, column in spec.columns.items():
        want = prompt_flight_type(column.shape, column.dtype)
        assert (
            sentinel.schema.field(name).type == failed.schema.field(name).type == real.schema.field(name).type == want
        )
    # One sample real rows index 0 and 1; the failed row's index 2.
    real = real.set_column(real.schema.get_field_index("index"), "index", pa.array([0, 1], pa.int64()))
    failed = failed.set_column(failed.schema.get_field_index("index"), "index", pa.array([2], pa.int64()))
    merged = pa.concat_tables([sentinel, failed, real])
    batch = BlockAccessor.for_block(merged).to_numpy()
    layout = OutputLayout(str(tmp_path / "out"))
    report = stage_batch(
        batch,
        layout=layout,
        tensor_columns=[],
        folder="32x32",
        sink_name="parquet",
        compression="zstd",
        prompt_columns={name: (c.shape, c.dtype) for name, c in spec.columns.items()},
    ).to_pylist()
    assert [len(r["parts"]) for r in report] == [1] and report[0]["total"] == 3
    part = pq.read_table(report[0]["parts"][0]["path"])
    assert part.column("key").to_pylist() == ["k1", "k2"]
    stored = prompt_samples(part.column("prompt_embeds"))
    assert len(stored) == 2 and stored[0].dtype == np.float16
    if storage == "trimmed":
        lengths = part.column(LENGTH).to_pylist()
        assert [s.shape[0] for s in stored] == lengths and part.schema.field(LENGTH).type == pa.int32()
        assert part.schema.field("prompt_embeds").type == pa.list_(pa.list_(pa.float16(), 96))
    else:
        assert part.column(MASK).type.value_type == pa.uint8()
        # output.tensor_type: list nests the fixed-shape text columns as it nests the latents.
        listed = stage_batch(
            batch,
            layout=OutputLayout(str(tmp_path / "listed")),
            tensor_columns=[],
            folder="32x32",
            sink_name="parquet",
            compression="zstd",
            tensor_type="list",
            prompt_columns={name: (c.shape, c.dtype) for name, c in spec.columns.items()},
        ).to_pylist()
        nested = pq.read_table(listed[0]["parts"][0]["path"])
        assert nested.schema.field("prompt_embeds").type == pa.list_(pa.list_(pa.float16(), 96), 300)
        assert nested.schema.field(MASK).type == pa.list_(pa.uint8(), 300)
        for got, want in zip(prompt_samples(nested.column("prompt_embeds")), stored, strict=True):
            np.testing.assert_array_equal(got, want)
