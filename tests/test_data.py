"""latentize.data: the training reader over committed outputs built by the real staging and
commit code (tests/latent_outputs.py): exactly once across ranks × DataLoader workers, one shape
per batch, seeded shuffles, moments draws, flipped twins, mid-epoch resume, both tensor layouts,
and the Ray Dataset reader."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from latent_outputs import SHAPES, Built, build_output, text_length, text_of
from torch.utils.data import DataLoader

from latentize.data import LatentDataset, draw_seed, flip_choice, read_empty_prompt
from latentize.errors import LatentizeError

#: Eight shards over two data folders, uneven on purpose (partitions get different row counts).
SHARDS = {
    "a00": {"64x64": 7, "96x64": 5},
    "a01": {"64x64": 11},
    "a02": {"96x64": 9},
    "a03": {"64x64": 3, "96x64": 4},
    "a04": {"64x64": 13},
    "a05": {"96x64": 6},
    "a06": {"64x64": 2},
    "a07": {"64x64": 8, "96x64": 1},
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_output(str(tmp_path_factory.mktemp("data") / "out"), SHARDS)


def batches(ds: LatentDataset, workers: int = 0) -> list[dict[str, Any]]:
    if workers == 0:
        return list(ds)
    return list(DataLoader(ds, batch_size=None, num_workers=workers))


def keys_of(seq: list[dict[str, Any]]) -> list[str]:
    return [k for b in seq for k in b["key"]]


def check_batch(built: Built, batch: dict[str, Any], column: str = "latent") -> None:
    """One folder per batch, its shape, and the stored values of every row."""
    folder = batch["folder"]
    assert set(batch["key"]) <= set(built.keys[folder])
    assert tuple(batch[column].shape) == (len(batch["key"]), *SHAPES[folder])
    want = np.stack([built.tensors[column][k] for k in batch["key"]])
    np.testing.assert_array_equal(batch[column].numpy(), want)


# --- exactly once ----------------------------------------------------------------------------


def test_every_committed_key_once_across_two_ranks_and_two_workers(built: Built) -> None:
    for epoch in (0, 1):
        seen: list[str] = []
        for rank in (0, 1):
            ds = LatentDataset(built.layout.url, 4, rank=rank, world_size=2, buffer_size=10)
            ds.set_epoch(epoch)
            got = batches(ds, workers=2)
            assert len(got) == ds.num_batches()
            for batch in got:
                check_batch(built, batch)
                assert 1 <= len(batch["key"]) <= 4
                assert batch["width"].dtype == torch.int32 and len(batch["caption"]) == len(batch["key"])
                assert batch["caption"] == [f"caption {k}" for k in batch["key"]]
            seen += keys_of(got)
        # No stray (uncommitted) key, no error row, nothing twice, nothing missing.
        assert sorted(seen) == built.all_keys
        assert not any(k.startswith("stray") for k in seen)


def test_ranks_with_different_numbers_of_workers_still_read_every_key_once(built: Built) -> None:
    """Ranks choose num_workers for themselves (0, 1, 3 here): which rows a rank reads does not
    depend on any rank's workers; with drop_last every rank still yields as many batches."""
    for drop_last in (False, True):
        seen, counts = [], []
        for rank, workers in enumerate((0, 1, 3)):
            ds = LatentDataset(built.layout.url, 4, rank=rank, world_size=3, buffer_size=10, drop_last=drop_last)
            ds.set_epoch(1)
            got = batches(ds, workers=workers)
            assert len(got) == ds.num_batches()
            counts.append(len(got))
            seen += keys_of(got)
        if drop_last:
            assert len(set(counts)) == 1 and len(seen) == len(set(seen)) and set(seen) <= set(built.all_keys)
        else:
            assert sorted(seen) == built.all_keys


def test_a_state_of_batches_per_partition_resumes_with_any_number_of_workers(built: Built) -> None:
    def reader() -> LatentDataset:
        ds = LatentDataset(built.layout.url, 4, buffer_size=9, seed=5)
        ds.set_epoch(1)
        return ds

    ds = reader()
    it = iter(ds)
    first = [next(it)["key"] for _ in range(5)]
    resumed = reader()
    resumed.load_state_dict(json.loads(json.dumps(ds.state_dict())))
    rest = keys_of(batches(resumed, workers=3))
    assert sorted([k for b in first for k in b] + rest) == built.all_keys


def test_drop_last_gives_full_batches_and_the_same_count_on_every_rank(built: Built) -> None:
    counts, seen = [], []
    for rank in (0, 1):
        ds = LatentDataset(built.layout.url, 4, rank=rank, world_size=2, buffer_size=10, drop_last=True)
        got = batches(ds, workers=2)
        assert all(len(b["key"]) == 4 for b in got)
        for batch in got:
            check_batch(built, batch)
        counts.append(len(got))
        assert len(got) == ds.num_batches()
        seen += keys_of(got)
    assert counts[0] == counts[1] > 0
    assert len(seen) == len(set(seen)) and set(seen) <= set(built.all_keys)


def test_order_is_seeded_per_epoch_and_plain_without_shuffle(built: Built) -> None:
    def order(epoch: int, **kwargs: Any) -> list[str]:
        ds = LatentDataset(built.layout.url, 4, buffer_size=10, **kwargs)
        ds.set_epoch(epoch)
        return keys_of(batches(ds))

    assert order(0) == order(0)
    assert order(0) != order(1) and sorted(order(0)) == sorted(order(1)) == built.all_keys
    assert order(0) != order(0, seed=1)
    plain = order(0, shuffle=False)
    assert plain == order(5, shuffle=False)
    # File order within each folder: shards in name order, rows by index.
    for _folder, keys in built.keys.items():
        assert [k for k in plain if k in set(keys)] == sorted(keys)


def test_only_chosen_columns_are_yielded(built: Built) -> None:
    (batch, *_) = batches(LatentDataset(built.layout.url, 4, columns=["latent", "crop_left"]))
    assert set(batch) == {"key", "folder", "latent", "crop_left"}
    with pytest.raises(LatentizeError, match="unknown column"):
        LatentDataset(built.layout.url, 4, columns=["latents"])


def test_nested_list_layout_reads_the_same_rows(tmp_path: Path) -> None:
    nested = build_output(str(tmp_path / "out"), SHARDS, tensor_type="list")
    got = batches(LatentDataset(nested.layout.url, 5, buffer_size=7), workers=2)
    for batch in got:
        check_batch(nested, batch)
    assert sorted(keys_of(got)) == nested.all_keys


# --- moments and flips -----------------------------------------------------------------------

MEAN_STD = {
    "scaling_factor": 0.5,
    "shift_factor": 0.0,
    "latents_mean": [0.3, -0.2, 0.1, 0.05],
    "latents_std": [1.5, 0.8, 1.2, 2.0],
    "applied": False,
}
SCALE_SHIFT = {"scaling_factor": 0.3611, "shift_factor": 0.1159, "latents_mean": None, "latents_std": None}


def expected_draw(built: Built, key: str, *, seed: int, epoch: int, constants: dict[str, Any]) -> np.ndarray:
    """The documented draw, computed here from the formula (not from the reader's helpers)."""
    mean = built.tensors["mean"][key].astype(np.float32)
    logvar = built.tensors["logvar"][key].astype(np.float32)
    digest = hashlib.sha256(f"draw\0{seed}\0{epoch}\0{key}".encode()).digest()
    eps = np.random.default_rng(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)).standard_normal(
        mean.shape, dtype=np.float32
    )
    z = mean + np.exp(0.5 * logvar) * eps
    if constants.get("latents_mean") is not None:
        m = np.asarray(constants["latents_mean"], np.float32)[:, None, None]
        s = np.asarray(constants["latents_std"], np.float32)[:, None, None]
        return (z - m) * constants["scaling_factor"] / s
    return (z - constants["shift_factor"]) * constants["scaling_factor"]


@pytest.mark.parametrize("constants", [MEAN_STD, SCALE_SHIFT], ids=["latents_mean_std", "scale_shift"])
def test_moments_draw_equals_the_formula_per_epoch(tmp_path: Path, constants: dict[str, Any]) -> None:
    built = build_output(str(tmp_path / "out"), SHARDS, columns=("mean", "logvar"), constants=constants)
    ds = LatentDataset(built.layout.url, 6, seed=7)
    draws: dict[int, dict[str, np.ndarray]] = {}
    for epoch in (3, 4):
        ds.set_epoch(epoch)
        draws[epoch] = {}
        for batch in batches(ds):
            assert "mean" not in batch and "logvar" not in batch
            assert batch["latent"].dtype == torch.float32
            for key, value in zip(batch["key"], batch["latent"].numpy(), strict=True):
                want = expected_draw(built, key, seed=7, epoch=epoch, constants=constants)
                np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6)
                draws[epoch][key] = value
    assert sorted(draws[3]) == built.all_keys
    assert all(not np.array_equal(draws[3][k], draws[4][k]) for k in built.all_keys)
    assert draw_seed(7, 3, built.all_keys[0]) == draw_seed(7, 3, built.all_keys[0])

    # draw=False: the raw moments as stored.
    (raw, *_) = batches(LatentDataset(built.layout.url, 6, draw=False))
    assert "latent" not in raw
    check_batch(built, raw, "mean")
    check_batch(built, raw, "logvar")


def test_moments_without_constants_to_normalise_need_draw_false(tmp_path: Path) -> None:
    flux2 = {"patch_size": [2, 2], "formula": "patchify(z), then batch norm", "applied": False}
    built = build_output(str(tmp_path / "out"), {"a": {"64x64": 3}}, columns=("mean", "logvar"), constants=flux2)
    with pytest.raises(LatentizeError, match="draw=False"):
        LatentDataset(built.layout.url, 2)
    assert sorted(keys_of(batches(LatentDataset(built.layout.url, 2, draw=False)))) == built.all_keys


def test_flipped_twin_is_chosen_per_seed_epoch_and_key(tmp_path: Path) -> None:
    built = build_output(str(tmp_path / "out"), SHARDS, flipped=True)

    def choices(epoch: int, **kwargs: Any) -> dict[str, bool]:
        ds = LatentDataset(built.layout.url, kwargs.pop("batch_size", 4), seed=3, **kwargs)
        ds.set_epoch(epoch)
        out = {}
        for batch in batches(ds):
            assert "latent_flipped" not in batch
            for key, flipped, value in zip(
                batch["key"], batch["flipped"].tolist(), batch["latent"].numpy(), strict=True
            ):
                column = "latent_flipped" if flipped else "latent"
                np.testing.assert_array_equal(value, built.tensors[column][key])
                out[key] = flipped
        return out

    epoch0 = choices(0)
    # The same choice however the rows are split and batched, and as documented.
    assert choices(0, batch_size=3, buffer_size=5, shuffle=False) == epoch0
    assert {**choices(0, rank=0, world_size=2), **choices(0, rank=1, world_size=2)} == epoch0
    assert all(epoch0[k] == flip_choice(3, 0, k) for k in epoch0)
    assert all(epoch0[k] == bool(hashlib.sha256(f"flip\0{3}\0{0}\0{k}".encode()).digest()[0] & 1) for k in epoch0)
    assert 0.25 < sum(epoch0.values()) / len(epoch0) < 0.75
    assert choices(1) != epoch0
    (plain, *_) = batches(LatentDataset(built.layout.url, 4, flip=False))
    assert "flipped" not in plain
    check_batch(built, plain)


# --- resume ----------------------------------------------------------------------------------


@pytest.mark.parametrize("drop_last", [False, True])
def test_resume_in_process_yields_exactly_the_remaining_batches(built: Built, drop_last: bool) -> None:
    def reader() -> LatentDataset:
        ds = LatentDataset(built.layout.url, 4, buffer_size=9, drop_last=drop_last, seed=11)
        ds.set_epoch(2)
        return ds

    full = [b["key"] for b in batches(reader())]
    for k in (0, 1, len(full) // 2, len(full) - 1, len(full)):
        ds = reader()
        it = iter(ds)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(ds.state_dict()))
        resumed = LatentDataset(built.layout.url, 4, buffer_size=9, drop_last=drop_last, seed=11)
        resumed.load_state_dict(state)
        resumed.set_epoch(2)  # a training loop's usual call keeps the resumed epoch
        assert [b["key"] for b in batches(resumed)] == full[k:], k
        resumed.set_epoch(3)  # the next epoch starts afresh
        if not drop_last:
            assert sorted(keys_of(batches(resumed))) == built.all_keys


def test_resume_with_dataloader_workers_from_the_consumed_count(built: Built) -> None:
    def reader() -> LatentDataset:
        ds = LatentDataset(built.layout.url, 2, rank=1, world_size=2, buffer_size=8, seed=2, partitions_per_rank=2)
        ds.set_epoch(1)
        return ds

    full = [b["key"] for b in batches(reader(), workers=2)]
    totals = reader()._plan().totals[2:]  # rank 1's two partitions, one per worker
    assert max(totals) - min(totals) >= 2 and sum(totals) == len(full)
    # Mid-epoch after an odd count (the second worker's turn is next), and once the smaller
    # worker has finished (DataLoader then takes only from the other).
    for consumed in (3, 2 * min(totals) + 1):
        state = reader().state_dict(consumed=consumed)
        resumed = LatentDataset(built.layout.url, 2, rank=1, world_size=2, buffer_size=8, seed=2, partitions_per_rank=2)
        resumed.load_state_dict(state)
        assert [b["key"] for b in batches(resumed, workers=2)] == full[consumed:], consumed
    # A resumed run interrupted again: the count is the epoch's, before and after the first resume.
    resumed = LatentDataset(built.layout.url, 2, rank=1, world_size=2, buffer_size=8, seed=2, partitions_per_rank=2)
    resumed.load_state_dict(reader().state_dict(consumed=3))
    loader = DataLoader(resumed, batch_size=None, num_workers=2)
    assert [b["key"] for _, b in zip(range(2), loader, strict=False)] == full[3:5]
    again = LatentDataset(built.layout.url, 2, rank=1, world_size=2, buffer_size=8, seed=2, partitions_per_rank=2)
    again.load_state_dict(resumed.state_dict(consumed=5))
    assert [b["key"] for b in batches(again, workers=2)] == full[5:]


def test_resume_refuses_other_settings(built: Built) -> None:
    state = LatentDataset(built.layout.url, 4).state_dict(consumed=2)
    with pytest.raises(LatentizeError, match="batch_size: saved 4, now 5"):
        LatentDataset(built.layout.url, 5).load_state_dict(state)


# --- Ray and imports -------------------------------------------------------------------------


# --- caption embeddings (issue 21) -------------------------------------------------------------

TEXT_SHARDS = {"t00": {"64x64": 7, "96x64": 4}, "t01": {"64x64": 5}, "t02": {"96x64": 6}}


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Built]:
    """Outputs with caption embeddings: (storage, tensor_type) -> output."""
    root = tmp_path_factory.mktemp("text")
    return {
        (storage, tensor_type): build_output(
            str(root / f"{storage}-{tensor_type}"), TEXT_SHARDS, tensor_type=tensor_type, text=storage
        )
        for storage in ("padded", "trimmed")
        for tensor_type in ("fixed_shape_tensor", "list")
    }


@pytest.mark.parametrize("tensor_type", ["fixed_shape_tensor", "list"])
def test_padded_text_columns_are_yielded_as_stored(texts: dict[tuple[str, str], Built], tensor_type: str) -> None:
    built = texts[("padded", tensor_type)]
    ds = LatentDataset(built.layout.url, 4, buffer_size=5)
    assert ds.text is not None and ds.text["storage"] == "padded"
    got = batches(ds, workers=2)
    assert sorted(keys_of(got)) == built.all_keys
    for batch in got:
        check_batch(built, batch)
        for name, dtype in (("prompt_embeds", torch.float16), ("pooled_prompt_embeds", torch.float16)):
            assert batch[name].dtype == dtype
            want = np.stack([built.tensors[name][k] for k in batch["key"]])
            np.testing.assert_array_equal(batch[name].numpy(), want)
        mask = batch["prompt_attention_mask"]
        assert mask.dtype == torch.uint8 and tuple(mask.shape) == (len(batch["key"]), 6)
        assert mask.sum(1).tolist() == [text_length(k) for k in batch["key"]]


@pytest.mark.parametrize("tensor_type", ["fixed_shape_tensor", "list"])
def test_trimmed_prompt_embeds_are_padded_to_the_batch_longest_with_a_mask(
    texts: dict[tuple[str, str], Built], tensor_type: str
) -> None:
    built = texts[("trimmed", tensor_type)]
    got = batches(LatentDataset(built.layout.url, 4, buffer_size=5))
    assert sorted(keys_of(got)) == built.all_keys
    longest = set()
    for batch in got:
        check_batch(built, batch)
        lengths = [text_length(k) for k in batch["key"]]
        embeds, mask = batch["prompt_embeds"], batch["prompt_attention_mask"]
        assert tuple(embeds.shape) == (len(lengths), max(lengths), 8) and embeds.dtype == torch.float16
        assert mask.dtype == torch.bool and mask.sum(1).tolist() == lengths
        assert batch["prompt_embeds_length"].tolist() == lengths
        assert batch["prompt_embeds_length"].dtype == torch.int32
        for i, (key, n) in enumerate(zip(batch["key"], lengths, strict=True)):
            np.testing.assert_array_equal(embeds[i, :n].numpy(), built.tensors["prompt_embeds"][key])
            assert not embeds[i, n:].any() and bool(mask[i, :n].all()) and not bool(mask[i, n:].any())
        np.testing.assert_array_equal(
            batch["pooled_prompt_embeds"].numpy(),
            np.stack([built.tensors["pooled_prompt_embeds"][k] for k in batch["key"]]),
        )
        longest.add(max(lengths))
    assert len(longest) > 1  # the padding follows each batch, not the family's maximum


def test_text_columns_are_chosen_by_name(texts: dict[tuple[str, str], Built]) -> None:
    trimmed = texts[("trimmed", "fixed_shape_tensor")].layout.url
    (batch, *_) = batches(LatentDataset(trimmed, 4, columns=["latent", "prompt_embeds"]))
    assert set(batch) == {"key", "folder", "latent", "prompt_embeds", "prompt_attention_mask"}
    # The built mask alone reads the lengths only.
    (batch, *_) = batches(LatentDataset(trimmed, 4, columns=["prompt_attention_mask"]))
    assert set(batch) == {"key", "folder", "prompt_attention_mask"}
    assert batch["prompt_attention_mask"].sum(1).tolist() == [text_length(k) for k in batch["key"]]
    (batch, *_) = batches(LatentDataset(trimmed, 4, columns=["pooled_prompt_embeds"]))
    assert set(batch) == {"key", "folder", "pooled_prompt_embeds"}
    padded = texts[("padded", "list")].layout.url
    (batch, *_) = batches(LatentDataset(padded, 4, columns=["prompt_embeds", "prompt_attention_mask"]))
    assert set(batch) == {"key", "folder", "prompt_embeds", "prompt_attention_mask"}
    with pytest.raises(LatentizeError, match="unknown column"):
        LatentDataset(padded, 4, columns=["prompt_embeds_length"])


@pytest.mark.parametrize("storage", ["padded", "trimmed"])
def test_empty_prompt_reads_the_unbatched_embeddings_of_the_empty_caption(
    texts: dict[tuple[str, str], Built], storage: str, tmp_path: Path
) -> None:
    want = text_of(storage, "")
    built = texts[(storage, "list")]
    wds = build_output(str(tmp_path / "wds"), {"t00": {"64x64": 3}}, sink="webdataset", text=storage)
    for root in (built.layout.url, wds.layout.url, f"file://{built.layout.url}"):
        got = read_empty_prompt(root)
        assert list(got) == list(want)
        for name, value in want.items():
            assert got[name].shape == value.shape and got[name].dtype == value.dtype
            np.testing.assert_array_equal(got[name], value)
    tensors = LatentDataset(built.layout.url, 4).empty_prompt()
    np.testing.assert_array_equal(tensors["prompt_embeds"].numpy(), want["prompt_embeds"])
    if storage == "trimmed":
        assert tensors["prompt_attention_mask"].dtype == torch.bool
        assert tuple(tensors["prompt_attention_mask"].shape) == (int(want["prompt_embeds_length"]),)
    # The file is `_`-prefixed: plain pyarrow's discovery of the root reads the data files only.
    one = build_output(str(tmp_path / "one"), {"t00": {"64x64": 3}}, text=storage, stray=False)
    assert sorted(pq.read_table(one.layout.url).column("key").to_pylist()) == one.all_keys
    plain = build_output(str(tmp_path / "plain"), {"t00": {"64x64": 2}})
    with pytest.raises(LatentizeError, match="no caption embeddings"):
        read_empty_prompt(plain.layout.url)
    with pytest.raises(LatentizeError, match="no caption embeddings"):
        LatentDataset(plain.layout.url, 2).empty_prompt()
    assert LatentDataset(plain.layout.url, 2).text is None


def test_importing_latentize_data_does_not_import_ray() -> None:
    code = "import sys, latentize.data; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("tensor_type", ["fixed_shape_tensor", "list"])
def test_read_latents_reads_the_committed_rows_of_a_folder(tmp_path: Path, tensor_type: str) -> None:
    from latentize.data import read_latent_folders, read_latents

    built = build_output(str(tmp_path / "out"), SHARDS, tensor_type=tensor_type)
    # Two folders, two latent shapes: the message names them, their rows and shapes.
    with pytest.raises(LatentizeError, match="choose one with folder=") as refused:
        read_latents(built.layout.url)
    for folder, keys in built.keys.items():
        assert f"{folder}: {len(keys)} rows, latent {SHAPES[folder]}" in str(refused.value)
    assert "read_latent_folders(root)" in str(refused.value)
    each = read_latent_folders(built.layout.url, columns=["key"])
    assert list(each) == sorted(built.keys)
    for folder, ds in each.items():
        assert sorted(ds.take_batch(1000)["key"].tolist()) == sorted(built.keys[folder])
    ds = read_latents(built.layout.url, folder="96x64", columns=["key", "latent"])
    rows = ds.take_batch(1000, batch_format="numpy")
    assert Counter(rows["key"].tolist()) == Counter(built.keys["96x64"])
    assert rows["latent"].shape == (len(built.keys["96x64"]), *SHAPES["96x64"])
    want = np.stack([built.tensors["latent"][k] for k in rows["key"]])
    np.testing.assert_array_equal(rows["latent"], want)
    # The stray file of an uncommitted shard sits in 64x64 and is not read.
    keys = read_latents(built.layout.url, folder="64x64").take_batch(1000)["key"].tolist()
    assert sorted(keys) == sorted(built.keys["64x64"])


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_read_latents_reads_text_columns_of_both_storages(texts: dict[tuple[str, str], Built]) -> None:
    from latentize.data import read_latents

    for storage in ("padded", "trimmed"):
        built = texts[(storage, "list")]
        rows = read_latents(built.layout.url, folder="64x64").take_batch(1000, batch_format="numpy")
        keys = rows["key"].tolist()
        assert sorted(keys) == sorted(built.keys["64x64"])
        for name in text_of(storage, "x"):
            for key, value in zip(keys, rows[name], strict=True):
                np.testing.assert_array_equal(
                    np.stack(value) if value.dtype == object else value, built.tensors[name][key]
                )


def test_the_readers_names_of_text_columns_are_the_text_stages() -> None:
    # latentize.data repeats them so that reading does not import the text stage.
    from latentize.data import text
    from latentize.encoders.text import spec

    assert (text.MASK, text.LENGTH) == (spec.MASK, spec.LENGTH)
