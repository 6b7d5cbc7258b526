"""The text stage: every preset stores what its pipeline's ``encode_prompt`` gives, the config's
refusals, the fingerprint, the driver-side spec and identity, and the batch policies (repeats,
empty and missing captions, truncation, out-of-memory halving, per-caption failures)."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch

from latentize.config import fingerprint, load_config
from latentize.encoders.text import LENGTH, MASK, TEXT_PRESETS, TextEncoder, TextSpec, inspect_text
from latentize.errors import ConfigError, LatentizeError

CPU = torch.device("cpu")
LONG = " ".join(["a photo of a red cat on the blue house"] * 80)  # > 512 tokens for every tokenizer
CAPTIONS: list[str | None] = ["a photo of a cat", "a photo of a cat", "", None, LONG, "Café über 東京, 🐱!"]
KEYS = [f"k{i}" for i in range(len(CAPTIONS))]
DISTINCT = 4  # the cat, "" (also None), LONG, the non-ASCII one


def _tensor_outputs(out: Any, names: tuple[str | None, ...]) -> dict[str, torch.Tensor]:
    return {n: v for n, v in zip(names, out, strict=True) if n is not None and v is not None}


def _sd(pipe: Any, prompt: str) -> dict[str, torch.Tensor]:
    return _tensor_outputs(pipe.encode_prompt(prompt, CPU, 1, False), ("prompt_embeds", None))


def _sdxl(pipe: Any, prompt: str) -> dict[str, torch.Tensor]:
    out = pipe.encode_prompt(prompt, device=CPU, do_classifier_free_guidance=False)
    return _tensor_outputs(out, ("prompt_embeds", None, "pooled_prompt_embeds", None))


def _sd3(pipe: Any, prompt: str) -> dict[str, torch.Tensor]:
    out = pipe.encode_prompt(prompt, None, None, device=CPU, do_classifier_free_guidance=False)
    return _tensor_outputs(out, ("prompt_embeds", None, "pooled_prompt_embeds", None))


def _flux1(pipe: Any, prompt: str) -> dict[str, torch.Tensor]:
    return _tensor_outputs(pipe.encode_prompt(prompt, device=CPU), ("prompt_embeds", "pooled_prompt_embeds", None))


def _pixart(pipe: Any, prompt: str) -> dict[str, torch.Tensor]:
    # clean_caption=True is the pipeline __call__'s default; without bs4 and ftfy the pipeline
    # itself falls back to lower-casing and stripping.
    out = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, device=CPU, clean_caption=True)
    return _tensor_outputs(out, ("prompt_embeds", MASK, None, None))


def _sana(pipe: Any, prompt: str) -> dict[str, torch.Tensor]:
    chi = inspect.signature(diffusers.SanaPipeline.__call__).parameters["complex_human_instruction"].default
    out = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, device=CPU, complex_human_instruction=chi)
    return _tensor_outputs(out, ("prompt_embeds", MASK, None, None))


def _lumina2(pipe: Any, prompt: str) -> dict[str, torch.Tensor]:
    out = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, device=CPU)
    return _tensor_outputs(out, ("prompt_embeds", MASK, None, None))


def _qwen(pipe: Any, prompt: str) -> dict[str, torch.Tensor]:
    # 512: QwenImagePipeline.__call__'s default (encode_prompt's own is 1024).
    return _tensor_outputs(pipe.encode_prompt(prompt, device=CPU, max_sequence_length=512), ("prompt_embeds", MASK))


#: How a user's call of each pipeline encodes one prompt, written out by hand.
REFERENCE: dict[str, Callable[[Any, str], dict[str, torch.Tensor]]] = {
    "sd15": _sd,
    "sd2": _sd,
    "sdxl": _sdxl,
    "sd3": _sd3,
    "flux1": _flux1,
    "pixart-sigma": _pixart,
    "sana": _sana,
    "lumina2": _lumina2,
    "qwen-image": _qwen,
}
PRESETS = sorted(REFERENCE)
MASKED = ["lumina2", "pixart-sigma", "sana"]


def _config(preset: str, model: Path, **text: Any) -> Any:
    storage = "trimmed" if preset == "qwen-image" else "padded"
    section = {"preset": preset, "model": str(model), "storage": storage, **text}
    output = {"path": "x", "dtype": section.pop("output_dtype", "float16")}
    return load_config(base={"output": output, "text": section})


def _encoder(preset: str, pipelines: dict[str, Path], **text: Any) -> TextEncoder:
    cfg = _config(preset, pipelines[preset], **text)
    return TextEncoder(config=cfg, spec=inspect_text(cfg), device=CPU)


_REFERENCE_PIPES: dict[str, Any] = {}


def _reference_pipe(preset: str, folder: Path) -> Any:
    """The pipeline loaded by diffusers' own ``from_pretrained`` (its missing parts None)."""
    if preset not in _REFERENCE_PIPES:
        cls = getattr(diffusers, TEXT_PRESETS.get(preset).pipeline_class)
        index = json.loads((folder / "model_index.json").read_text())
        absent = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
        _REFERENCE_PIPES[preset] = cls.from_pretrained(folder, **absent)
    return _REFERENCE_PIPES[preset]


@torch.inference_mode()
def _expected(preset: str, folder: Path, prompt: str) -> dict[str, np.ndarray]:
    """``encode_prompt`` of one prompt on the same components, float32 (mask int64), no batch axis."""
    out = REFERENCE[preset](_reference_pipe(preset, folder), prompt)
    return {k: v[0].float().numpy() if v.is_floating_point() else v[0].numpy() for k, v in out.items()}


def _assert_storage_close(got: np.ndarray, want: np.ndarray, dtype: str) -> None:
    """Equal to ``want`` rounded to the storage dtype, within one unit in its last place."""
    assert got.dtype == np.dtype(dtype) and got.shape == want.shape
    rounded = want.astype(dtype).astype(np.float32)
    ulp = 2.0**-10 if dtype == "float16" else 2.0**-20
    np.testing.assert_allclose(got.astype(np.float32), rounded, rtol=ulp, atol=1e-6)


# --- exactness: every preset against its pipeline's encode_prompt ------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_stores_its_pipelines_encode_prompt(preset: str, tiny_text_pipelines: dict[str, Path]) -> None:
    folder = tiny_text_pipelines[preset]
    enc = _encoder(preset, tiny_text_pipelines)
    result = enc.encode(CAPTIONS, KEYS)
    assert result.errors == {}
    assert result.encoded == DISTINCT
    for i, caption in enumerate(CAPTIONS):
        want = _expected(preset, folder, caption or "")
        if enc.spec.storage == "trimmed":
            length = int(want[MASK].sum()) if MASK in want else want["prompt_embeds"].shape[0]
            assert result.arrays[LENGTH][i] == length
            want["prompt_embeds"] = want["prompt_embeds"][:length]
            want.pop(MASK, None)
        for name, column in enc.spec.columns.items():
            if name == LENGTH:
                continue
            got = result.arrays[name][i]
            if name == MASK:
                assert got.dtype == np.uint8
                np.testing.assert_array_equal(got, want[name])
            else:
                _assert_storage_close(got, want[name], "float16")
            assert column.variable or got.shape == column.shape
        assert set(want) <= set(enc.spec.columns)
    assert result.notes[:2] == [None, None] and result.notes[5] is None
    assert result.notes[2] == 'empty caption: encoded as ""'
    assert result.notes[3] == 'missing caption: encoded as ""'
    assert result.notes[4] is not None and result.notes[4].startswith("caption truncated: ")


@pytest.mark.parametrize("preset", MASKED)
def test_trimmed_storage_keeps_the_rows_the_mask_keeps(preset: str, tiny_text_pipelines: dict[str, Path]) -> None:
    folder = tiny_text_pipelines[preset]
    enc = _encoder(preset, tiny_text_pipelines, storage="trimmed")
    width = enc.spec.columns["prompt_embeds"].shape[1]
    assert enc.spec.columns["prompt_embeds"].shape == (None, width)
    assert enc.spec.columns[LENGTH].dtype == "int32" and MASK not in enc.spec.columns
    result = enc.encode(CAPTIONS, KEYS)
    for i, caption in enumerate(CAPTIONS):
        want = _expected(preset, folder, caption or "")
        length = int(want[MASK].sum())
        assert want[MASK][:length].all() and not want[MASK][length:].any()
        assert result.arrays[LENGTH][i] == length
        _assert_storage_close(result.arrays["prompt_embeds"][i], want["prompt_embeds"][:length], "float16")
    # The long caption is cut at the pipeline's length; the short ones are much shorter.
    assert result.arrays[LENGTH][4] == enc.spec.max_rows > result.arrays[LENGTH][0]


@pytest.mark.parametrize("preset", ["flux1", "sana"])
def test_float32_storage_is_encode_prompt_itself(preset: str, tiny_text_pipelines: dict[str, Path]) -> None:
    enc = _encoder(preset, tiny_text_pipelines, output_dtype="float32")
    result = enc.encode(CAPTIONS[:3], KEYS[:3])
    for i, caption in enumerate(CAPTIONS[:3]):
        want = _expected(preset, tiny_text_pipelines[preset], caption or "")
        got = result.arrays["prompt_embeds"][i]
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want["prompt_embeds"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", ["sdxl", "pixart-sigma"])
def test_empty_prompt_embeddings_are_encode_prompt_of_the_empty_string(
    preset: str, tiny_text_pipelines: dict[str, Path]
) -> None:
    enc = _encoder(preset, tiny_text_pipelines)
    empty = enc.empty_prompt()
    want = _expected(preset, tiny_text_pipelines[preset], "")
    assert set(empty) == set(enc.spec.columns)
    for name, value in empty.items():
        assert value.shape == enc.spec.columns[name].shape  # one sample, no batch axis
        if name == MASK:
            np.testing.assert_array_equal(value, want[name])
        else:
            _assert_storage_close(value, want[name], "float16")
    assert enc.empty_prompt()["prompt_embeds"].tobytes() == empty["prompt_embeds"].tobytes()


def test_pipeline_defaults_are_the_presets(tiny_text_pipelines: dict[str, Path]) -> None:
    """The presets' lengths are their pipelines' ``__call__`` defaults (which may differ from
    ``encode_prompt``'s: Qwen-Image's 512 against 1024), and every argument taken from ``__call__``
    is one that ``encode_prompt`` accepts."""
    for name in TEXT_PRESETS:
        preset = TEXT_PRESETS.get(name)
        cls = getattr(diffusers, preset.pipeline_class)
        call = inspect.signature(cls.__call__).parameters
        accepted = inspect.signature(cls.encode_prompt).parameters
        assert set(preset.call_defaults) <= set(call) & set(accepted), name
        if preset.max_sequence_length is not None:
            assert call["max_sequence_length"].default == preset.max_sequence_length, name
        else:
            assert "max_sequence_length" not in call, name
    assert inspect.signature(diffusers.PixArtSigmaPipeline.__call__).parameters["clean_caption"].default is True
    assert inspect.signature(diffusers.PixArtSigmaPipeline.encode_prompt).parameters["clean_caption"].default is False


# --- batches: repeats, notes, failures, memory --------------------------------------------------


def test_repeated_captions_are_encoded_once(tiny_text_pipelines: dict[str, Path], monkeypatch: Any) -> None:
    enc = _encoder("sd15", tiny_text_pipelines)
    seen: list[list[str]] = []
    original = enc.pipe.encode_prompt

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(list(kwargs["prompt"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(enc.pipe, "encode_prompt", spy)
    result = enc.encode(["x y", None, "x y", "", "z", "x y"], [str(i) for i in range(6)])
    assert seen == [["x y", "", "z"]]
    emb = result.arrays["prompt_embeds"]
    assert emb[0].tobytes() == emb[2].tobytes() == emb[5].tobytes()
    assert emb[1].tobytes() == emb[3].tobytes() != emb[0].tobytes()


def test_truncation_notes_give_the_token_counts(tiny_text_pipelines: dict[str, Path]) -> None:
    enc = _encoder("sd3", tiny_text_pipelines)
    ids = enc.pipe.tokenizer(LONG).input_ids
    t5_ids = enc.pipe.tokenizer_3(LONG).input_ids
    (note,) = enc.encode([LONG], ["k"]).notes
    assert note == (
        f"caption truncated: {len(ids)} tokens, 77 kept (tokenizer, tokenizer_2); "
        f"caption truncated: {len(t5_ids)} tokens, 256 kept (tokenizer_3)"
    )
    qwen = _encoder("qwen-image", tiny_text_pipelines)
    (qwen_note,) = qwen.encode([LONG], ["k"]).notes
    assert qwen_note is not None and qwen_note.endswith("embedding rows, 512 kept")


def test_a_failing_caption_costs_its_own_row(tiny_text_pipelines: dict[str, Path], monkeypatch: Any) -> None:
    enc = _encoder("flux1", tiny_text_pipelines)
    original = enc.pipe.encode_prompt

    def fragile(*args: Any, **kwargs: Any) -> Any:
        if "boom" in kwargs["prompt"]:
            raise RuntimeError("tokenizer exploded")
        return original(*args, **kwargs)

    monkeypatch.setattr(enc.pipe, "encode_prompt", fragile)
    result = enc.encode(["a cat", "boom", "a dog", 7], ["a", "b", "c", "d"])  # type: ignore[list-item]
    assert result.errors == {
        1: "text encoder failed: RuntimeError: tokenizer exploded",
        3: "caption is a int, not text",
    }
    assert not result.arrays["prompt_embeds"][1].any() and not result.arrays["prompt_embeds"][3].any()
    want = _expected("flux1", tiny_text_pipelines["flux1"], "a dog")["prompt_embeds"]
    _assert_storage_close(result.arrays["prompt_embeds"][2], want, "float16")


def test_cuda_out_of_memory_halves_the_chunk(tiny_text_pipelines: dict[str, Path], monkeypatch: Any) -> None:
    enc = _encoder("sd15", tiny_text_pipelines, batch_size=8)
    reference = enc.encode([f"a photo of {w}" for w in "abcdef"], list("abcdef")).arrays["prompt_embeds"]
    sizes: list[int] = []
    original = enc.pipe.encode_prompt

    def tight(*args: Any, **kwargs: Any) -> Any:
        sizes.append(len(kwargs["prompt"]))
        if len(kwargs["prompt"]) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(*args, **kwargs)

    monkeypatch.setattr(enc.pipe, "encode_prompt", tight)
    result = enc.encode([f"a photo of {w}" for w in "abcdef"], list("abcdef"))
    assert sizes == [6, 4, 2, 2, 2]
    assert result.chunk_size == enc.chunk_size == 2 and result.errors == {}
    np.testing.assert_allclose(result.arrays["prompt_embeds"], reference, rtol=2**-10, atol=1e-6)

    def exhausted(*args: Any, **kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(enc.pipe, "encode_prompt", exhausted)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        enc.encode(["a", "b"], ["a", "b"])
    assert enc.chunk_size == 1


def test_concurrent_calls_give_what_sequential_calls_give(tiny_text_pipelines: dict[str, Path]) -> None:
    # Ray's threaded actor may run two calls at once; the pipeline is serialised inside encode().
    from concurrent.futures import ThreadPoolExecutor

    enc = _encoder("pixart-sigma", tiny_text_pipelines, batch_size=2)
    halves = [(CAPTIONS[:3], KEYS[:3]), (CAPTIONS[3:], KEYS[3:])]
    sequential = [enc.encode(c, k).arrays["prompt_embeds"] for c, k in halves]
    with ThreadPoolExecutor(2) as pool:
        concurrent = list(pool.map(lambda ck: enc.encode(*ck).arrays["prompt_embeds"], halves))
    for got, want in zip(concurrent, sequential, strict=True):
        assert got.tobytes() == want.tobytes()


def test_values_beyond_the_storage_dtype_are_error_rows(tiny_text_pipelines: dict[str, Path]) -> None:
    enc = _encoder("sd15", tiny_text_pipelines)
    norm = enc.pipe.text_encoder.final_layer_norm
    with torch.no_grad():
        norm.weight.mul_(1e6)  # activations past float16's 65504
    result = enc.encode(["a cat"], ["k"])
    assert result.errors == {0: "text embeddings exceed float16 (|x| > 65504); set output.dtype: float32"}
    with torch.no_grad():
        norm.weight.fill_(float("nan"))
    assert enc.encode(["a cat"], ["k"]).errors == {0: "non-finite text embeddings (NaN or Inf) in float32"}


def test_caption_cleaning_must_match_the_drivers(tiny_text_pipelines: dict[str, Path]) -> None:
    """PixArt's pipeline cleans captions only where bs4 and ftfy are installed: the driver decides
    (recorded in the spec), and an actor that would clean differently refuses to start."""
    cfg = _config("pixart-sigma", tiny_text_pipelines["pixart-sigma"])
    spec = inspect_text(cfg)
    assert spec.call_overrides == {"max_sequence_length": 300, "clean_caption": False}  # no bs4 here
    TextEncoder(config=cfg, spec=spec, device=CPU)
    from dataclasses import replace

    driver_had_them = replace(spec, call_overrides={"max_sequence_length": 300})
    with pytest.raises(LatentizeError, match="beautifulsoup4 ftfy"):
        TextEncoder(config=cfg, spec=driver_had_them, device=CPU)


# --- driver side: spec, shapes, identity --------------------------------------------------------


def test_spec_columns_at_the_released_sizes() -> None:
    """What ``latentize models --text`` and the storage table show: FLUX.1's 512 x 4096 T5 states
    are 4 MiB per sample in float16, plus CLIP's pooled 768."""
    flux = TEXT_PRESETS.get("flux1").reference_shapes()
    assert flux == {"prompt_embeds": (512, 4096), "pooled_prompt_embeds": (768,)}
    assert TEXT_PRESETS.get("sd3").reference_shapes() == {"prompt_embeds": (333, 4096), "pooled_prompt_embeds": (2048,)}
    assert TEXT_PRESETS.get("sdxl").reference_shapes() == {"prompt_embeds": (77, 2048), "pooled_prompt_embeds": (1280,)}
    assert TEXT_PRESETS.get("sana").reference_shapes() == {"prompt_embeds": (300, 2304), MASK: (300,)}
    from latentize.encoders.text import TextColumn, stored_columns

    columns = stored_columns(flux, "padded", "float16")
    spec = TextSpec("flux1", "FluxPipeline", "padded", columns, 512, 512, False, {}, {})
    assert spec.bytes_per_sample() == 512 * 4096 * 2 + 768 * 2
    trimmed = stored_columns(TEXT_PRESETS.get("pixart-sigma").reference_shapes(), "trimmed", "float16")
    assert trimmed == {"prompt_embeds": TextColumn((None, 4096), "float16"), LENGTH: TextColumn((), "int32")}


@pytest.mark.parametrize("preset", PRESETS)
def test_identity_hashes_every_weight_and_tokenizer_file(preset: str, tiny_text_pipelines: dict[str, Path]) -> None:
    folder = tiny_text_pipelines[preset]
    spec = inspect_text(_config(preset, folder))
    files = spec.identity["files"]
    assert set(files) == {name for name, _ in TEXT_PRESETS.get(preset).components}
    for name in files:
        for file, digest in files[name].items():
            assert digest == hashlib.sha256((folder / name / file).read_bytes()).hexdigest()
    assert spec.identity["source"] == "local" and len(spec.identity["sha256"]) == 64
    assert spec.components == dict(TEXT_PRESETS.get(preset).components) | {
        k: v[1] for k, v in json.loads((folder / "model_index.json").read_text()).items() if k in files
    }


def test_other_weights_change_the_identity(tiny_text_pipelines: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "sd15"
    shutil.copytree(tiny_text_pipelines["sd15"], copy)
    before = inspect_text(_config("sd15", copy)).identity["sha256"]
    weights = copy / "text_encoder" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(1, 1))  # another mtime, whatever the clock's resolution
    assert inspect_text(_config("sd15", copy)).identity["sha256"] != before


def test_a_hub_id_is_read_from_the_cache_offline(
    tiny_text_pipelines: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the Hugging Face cache, blobs are named by their sha256: the identity takes it from
    there without reading the weights, and the commit from the snapshot's name."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-flux"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    source = tiny_text_pipelines["flux1"]
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copy(path, repo / "blobs" / digest)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(repo / "blobs" / digest)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = inspect_text(
        load_config(base={"output": {"path": "x"}, "text": {"preset": "flux1", "model": "acme/tiny-flux"}})
    )
    weights = (source / "text_encoder_2" / "model.safetensors").read_bytes()
    assert spec.identity["source"] == "hub" and spec.identity["commit"] == commit
    assert spec.identity["files"]["text_encoder_2"] == {"model.safetensors": hashlib.sha256(weights).hexdigest()}
    assert spec.columns["prompt_embeds"].shape == (512, 96)


def test_a_missing_component_or_model_fails_on_the_driver(tmp_path: Path, tiny_text_pipelines: dict[str, Path]) -> None:
    with pytest.raises(LatentizeError, match="text_encoder_2/config.json"):
        inspect_text(_config("sdxl", tiny_text_pipelines["sd15"]))
    cfg = load_config(base={"output": {"path": "x"}, "text": {"preset": "sd15", "model": "acme/not-cached"}})
    with pytest.raises(LatentizeError, match="not in the local Hugging Face cache"):
        inspect_text(cfg)


# --- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["sd15", "sd2", "sdxl", "sd3", "flux1"])
def test_trimmed_is_refused_where_the_denoiser_sees_padding(preset: str) -> None:
    with pytest.raises(ConfigError, match="attends") as info:
        load_config(base={"output": {"path": "x"}, "text": {"preset": preset, "storage": "trimmed"}})
    assert f"'trimmed' is refused for preset {preset!r}" in str(info.value) and "storage: padded" in str(info.value)


def test_the_text_section_is_validated_at_load() -> None:
    base: dict[str, Any] = {"output": {"path": "x"}}
    with pytest.raises(ConfigError, match="unknown text preset 'sdxxl'.*valid values: flux1, lumina2, pixart-sigma"):
        load_config(base={**base, "text": {"preset": "sdxxl"}})
    with pytest.raises(ConfigError, match="'padded' is refused for preset 'qwen-image'"):
        load_config(base={**base, "text": {"preset": "qwen-image"}})
    with pytest.raises(ConfigError, match="text.storage: 'packed' is not one of: padded, trimmed"):
        load_config(base={**base, "text": {"preset": "sana", "storage": "packed"}})
    with pytest.raises(ConfigError, match="text.dtype"):
        load_config(base={**base, "text": {"preset": "sana", "dtype": "fp8"}})
    with pytest.raises(ConfigError, match="CLIP only.*77 tokens"):
        load_config(base={**base, "text": {"preset": "sdxl", "max_sequence_length": 128}})
    with pytest.raises(ConfigError, match="exceeds 512"):
        load_config(base={**base, "text": {"preset": "flux1", "max_sequence_length": 1024}})
    with pytest.raises(ConfigError, match="text: missing key"):
        load_config(base={**base, "text": {"storage": "padded"}})
    with pytest.raises(ConfigError, match="text.actors"):
        load_config(base={**base, "text": {"preset": "sana", "actors": 0}})
    cfg = load_config(base={**base, "text": {"preset": "flux1"}})
    assert cfg.text is not None
    assert (cfg.text.model, cfg.text.max_sequence_length) == ("black-forest-labs/FLUX.1-schnell", 512)
    assert load_config(base={**base, "text": None}).text is None


def test_the_fingerprint_follows_what_the_text_stage_writes() -> None:
    base: dict[str, Any] = {"output": {"path": "x"}, "text": {"preset": "pixart-sigma"}}
    prints = {fingerprint(load_config(base=base))}
    for change in (
        "text.storage=trimmed",
        "text.max_sequence_length=120",
        "text.dtype=float32",
        "text.model=/elsewhere",
        "text.preset=sana",
    ):
        prints.add(fingerprint(load_config(base=base, overrides=[change])))
    assert len(prints) == 6
    same = fingerprint(load_config(base=base))
    for sizing in ("text.batch_size=7", "text.actors=3", "text.gpus_per_actor=0.25"):
        assert fingerprint(load_config(base=base, overrides=[sizing])) == same
    # A pipeline default given explicitly is the same run.
    assert fingerprint(load_config(base=base, overrides=["text.max_sequence_length=300"])) == same
    # Outputs without text keep the fingerprint they had before the text section existed.
    without = load_config(base={"output": {"path": "x"}})
    assert fingerprint(without) == fingerprint(load_config(base={"output": {"path": "x"}, "text": None}))
    assert fingerprint(without) != same


# --- latentize models ---------------------------------------------------------------------------


def test_models_lists_the_text_presets() -> None:
    run = [sys.executable, "-m", "latentize.cli", "models", "--text"]
    rows = {r["name"]: r for r in json.loads(subprocess.run([*run, "--json"], capture_output=True, check=True).stdout)}
    assert set(rows) == set(TEXT_PRESETS.names())
    assert rows["flux1"]["shapes"] == {"prompt_embeds": [512, 4096], "pooled_prompt_embeds": [768]}
    assert rows["flux1"]["masks_padding"] is False and rows["sana"]["masks_padding"] is True
    assert rows["qwen-image"]["storage"] == ["trimmed"] and rows["pixart-sigma"]["storage"] == ["padded", "trimmed"]
    table = subprocess.run([sys.executable, "-m", "latentize.cli", "models"], capture_output=True, text=True).stdout
    (flux_line,) = [line for line in table.splitlines() if line.startswith("flux1 ") and "T5" in line]
    assert "512x4096" in flux_line and "no" in flux_line.split()


def test_the_text_pool_takes_what_the_image_pool_leaves() -> None:
    """The text pool: GPUs (or fractions) the image pool leaves, else CPU actors; a cluster with
    no GPU left for one text actor is refused before the job could hang waiting for it."""
    from latentize.encoders.pool import execution_for, text_execution_for

    def pools(gpus: float, ray: dict[str, Any], text: dict[str, Any]) -> tuple[Any, Any]:
        cfg = load_config(base={"output": {"path": "x"}, "ray": ray, "text": {"preset": "sdxl", **text}})
        resources = {"GPU": gpus, "CPU": 16.0}
        image = execution_for(cfg, resources)
        return image, text_execution_for(cfg, resources, image)

    image, tex = pools(8, {"actors": 7}, {})
    assert (tex.actors, tex.gpu, tex.remote_args) == (1, True, {"num_gpus": 1.0, "num_cpus": 0})
    assert tex.batch_size == image.batch_size
    _, tex = pools(2, {"actors": 2, "gpus_per_actor": 0.5}, {"actors": 4, "gpus_per_actor": 0.5})
    assert (tex.actors, tex.remote_args["num_gpus"]) == (2, 0.5)  # 1 GPU left: two halves
    _, tex = pools(1, {}, {"gpus_per_actor": 0})
    assert (tex.gpu, tex.remote_args, tex.cpu_threads) == (False, {"num_gpus": 0, "num_cpus": 1}, 16)
    _, tex = pools(0, {}, {"actors": 2})  # no GPU at all: both pools on CPUs
    assert not tex.gpu and tex.actors == 2 and tex.cpu_threads == 16 // 3
    with pytest.raises(LatentizeError, match="no GPU left for the text encoder"):
        pools(1, {}, {})


def test_encode_runs_a_text_section(
    tmp_path: Path,
    tiny_models: dict[str, Path],
    tiny_text_pipelines: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The text section reaches the pipeline (the guard of phase 1 is gone): a run fails on what
    is wrong with it (here its input), not on having a text section."""
    from latentize.cli import main

    config = tmp_path / "cfg.yaml"
    config.write_text(
        f"input: {{urls: {tmp_path}/x.tar}}\noutput: {{path: {tmp_path}/out}}\n"
        f"encoder: {{model: {tiny_models['kl']}}}\ntext: {{preset: sdxl, model: {tiny_text_pipelines['sdxl']}}}\n"
    )
    assert main(["encode", str(config)]) == 2
    error = capsys.readouterr().err
    assert "x.tar" in error and "text" not in error.replace(str(tmp_path), "")
    assert not (tmp_path / "out").exists()
