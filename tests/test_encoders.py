"""Parity tests of latentize.encoders against direct diffusers computations (docs/encoders.md).

Every expected value here is computed straight from diffusers in the test (pixels / 255 * 2 - 1,
``vae.encode(x).latent_dist``, ``vq.quantize(...)``), never through latentize, and the tiny
models carry non-default constants so that a forgotten shift, scale or mean/std fails.
Encoders run on CPU and are called directly (no Ray).
"""

from __future__ import annotations

import io
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import KL_MEAN, KL_SCALE, KL_SHIFT, KL_STD, VQ_CODES
from PIL import Image

from latentize.config import Config, load_config
from latentize.demo import photo_samples
from latentize.encoders import ENCODERS, KLEncoder, TorchEncoder, VQEncoder, stable_seed
from latentize.encoders.vq import index_dtype
from latentize.errors import ConfigError, LatentizeError
from latentize.hub import load_model_config
from latentize.preprocess import preprocess_sample

N = 6  # photos per batch: enough for batch-composition tests, small enough to stay fast
#: Tolerance of latents stored as float16 (|x| of a few units: ~1e-3 absolute rounding).
F16 = {"rtol": 1e-3, "atol": 2e-3}


# --- helpers -----------------------------------------------------------------------------------


def make_config(model: Path | str, resolution: Any = 64, output: dict | None = None, **encoder: Any) -> Config:
    """A CPU config for ``model``; ``encoder`` keys go to the encoder section."""
    return load_config(
        base={
            "encoder": {"model": str(model), "device": "cpu", **encoder},
            "preprocess": {"resolution": resolution},
            "output": {"path": "unused", **(output or {})},
        }
    )


def make_encoder(config: Config) -> TorchEncoder:
    cls = ENCODERS.get(config.encoder.type)
    spec = cls.inspect(config)
    return cls(config=config, spec=spec)


def encode(enc: TorchEncoder, pixels: np.ndarray, keys: list[str]):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return enc.encode(pixels, keys)


def to_input(pixels: np.ndarray) -> torch.Tensor:
    """The Stable Diffusion input convention, written out independently of latentize."""
    return torch.from_numpy(np.array(pixels)).permute(0, 3, 1, 2).float() / 255.0 * 2.0 - 1.0


def assert_close(actual: np.ndarray, expected: np.ndarray, **tol: float) -> None:
    np.testing.assert_allclose(actual.astype(np.float32), expected, **(tol or F16))


def assert_not_close(actual: np.ndarray, wrong: np.ndarray) -> None:
    assert not np.allclose(actual.astype(np.float32), wrong, **F16), "matches a wrong formula too"


@pytest.fixture(scope="module")
def photos() -> tuple[np.ndarray, list[str]]:
    """N real photos at 64x64 as a read-only uint8 (N, 64, 64, 3) batch (as Ray hands it over)."""
    samples = photo_samples(resolution=64)[:N]
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB")) for s in samples])
    pixels.setflags(write=False)
    assert pixels.shape == (N, 64, 64, 3) and pixels.dtype == np.uint8
    return pixels, [s.key for s in samples]


def diffusers_posterior(path: Path, pixels: np.ndarray) -> dict[str, np.ndarray]:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path).eval()
    with torch.no_grad():
        dist = vae.encode(to_input(pixels)).latent_dist
        return {
            "mode": dist.mode().numpy(),
            "mean": dist.mean.numpy(),
            "logvar": dist.logvar.numpy(),
            "std": dist.std.numpy(),
        }


@pytest.fixture(scope="module")
def kl_ref(tiny_models: dict[str, Path], photos) -> dict[str, np.ndarray]:
    return diffusers_posterior(tiny_models["kl"], photos[0])


@pytest.fixture(scope="module")
def kl_mode(tiny_models: dict[str, Path]) -> TorchEncoder:
    return make_encoder(make_config(tiny_models["kl"]))


@pytest.fixture(scope="module")
def kl_sample(tiny_models: dict[str, Path]) -> TorchEncoder:
    return make_encoder(make_config(tiny_models["kl"], sample="sample", seed=7))


# --- KL: mode --------------------------------------------------------------------------------


def test_kl_mode_matches_diffusers_shift_scale(kl_mode: TorchEncoder, kl_ref, photos) -> None:
    pixels, keys = photos
    result = encode(kl_mode, pixels, keys)
    stored = result.arrays["latent"]
    assert stored.dtype == np.float16 and stored.shape == (N, 4, 8, 8)
    assert result.errors == {} and result.reencoded_fp32 == 0

    mode = kl_ref["mode"]
    assert_close(stored, (mode - KL_SHIFT) * KL_SCALE)
    # A forgotten shift, a forgotten scale, the shift applied after scaling, or the raw
    # posterior mean must all be caught.
    assert_not_close(stored, mode * KL_SCALE)
    assert_not_close(stored, mode - KL_SHIFT)
    assert_not_close(stored, mode * KL_SCALE - KL_SHIFT)
    assert_not_close(stored, mode)


def test_kl_spec_describes_the_output(kl_mode: TorchEncoder, tiny_models) -> None:
    spec = kl_mode.spec
    assert spec.type == "kl" and spec.model_class == "AutoencoderKL"
    assert spec.columns == {"latent": ((4, 8, 8), "float16")}
    assert spec.downsample == 8 and spec.latent_channels == 4
    assert spec.input_range == "[-1, 1]"
    c = spec.constants
    assert c["scaling_factor"] == KL_SCALE and c["shift_factor"] == KL_SHIFT
    assert c["latents_mean"] is None and c["latents_std"] is None
    assert c["formula"] == "(z - shift_factor) * scaling_factor"
    assert c["applied"] is True
    # The weights are identified by content, for the manifest.
    assert spec.identity["model"] == str(tiny_models["kl"])
    assert spec.identity["weights_file"] == "diffusion_pytorch_model.safetensors"
    assert len(spec.identity["sha256"]) == 64


def test_kl_mode_float32_storage_is_exact(tiny_models, kl_ref, photos) -> None:
    pixels, keys = photos
    enc = make_encoder(make_config(tiny_models["kl"], output={"dtype": "float32"}))
    assert enc.spec.columns == {"latent": ((4, 8, 8), "float32")}
    stored = encode(enc, pixels, keys).arrays["latent"]
    assert stored.dtype == np.float32
    assert_close(stored, (kl_ref["mode"] - KL_SHIFT) * KL_SCALE, rtol=1e-5, atol=1e-5)


def test_kl_latents_mean_std_form(tiny_models, photos) -> None:
    pixels, keys = photos
    enc = make_encoder(make_config(tiny_models["kl_meanstd"]))
    c = enc.spec.constants
    assert c["latents_mean"] == KL_MEAN and c["latents_std"] == KL_STD
    assert c["formula"] == "(z - latents_mean) * scaling_factor / latents_std"

    stored = encode(enc, pixels, keys).arrays["latent"]
    mode = diffusers_posterior(tiny_models["kl_meanstd"], pixels)["mode"]
    mean = np.array(KL_MEAN, np.float32).reshape(1, 4, 1, 1)
    std = np.array(KL_STD, np.float32).reshape(1, 4, 1, 1)
    assert_close(stored, (mode - mean) * KL_SCALE / std)
    # Ignoring mean/std (shift-scale form), or using them the wrong way round, is caught.
    assert_not_close(stored, mode * KL_SCALE)
    assert_not_close(stored, (mode - mean) * KL_SCALE * std)
    assert_not_close(stored, (mode - mean) / std)


def test_config_constants_override_the_models(tiny_models, kl_ref, photos) -> None:
    pixels, keys = photos
    enc = make_encoder(make_config(tiny_models["kl"], scaling_factor=2.0, shift_factor=-0.3))
    assert enc.spec.constants["scaling_factor"] == 2.0
    assert enc.spec.constants["shift_factor"] == -0.3
    stored = encode(enc, pixels, keys).arrays["latent"]
    assert_close(stored, (kl_ref["mode"] + 0.3) * 2.0)
    assert_not_close(stored, (kl_ref["mode"] - KL_SHIFT) * KL_SCALE)


def test_config_scale_overrides_model_with_mean_std(tiny_models, photos) -> None:
    pixels, keys = photos
    enc = make_encoder(make_config(tiny_models["kl_meanstd"], scaling_factor=3.0))
    stored = encode(enc, pixels, keys).arrays["latent"]
    mode = diffusers_posterior(tiny_models["kl_meanstd"], pixels)["mode"]
    mean = np.array(KL_MEAN, np.float32).reshape(1, 4, 1, 1)
    std = np.array(KL_STD, np.float32).reshape(1, 4, 1, 1)
    assert_close(stored, (mode - mean) * 3.0 / std, rtol=1e-3, atol=5e-3)


def test_float16_on_cpu_computes_in_float32(tiny_models) -> None:
    enc = make_encoder(make_config(tiny_models["kl"], dtype="float16"))
    assert enc.dtype == torch.float32
    assert next(enc.model.parameters()).dtype == torch.float32


# --- KL: moments -----------------------------------------------------------------------------


def test_kl_moments_are_raw_mean_and_logvar(tiny_models, kl_ref, photos) -> None:
    pixels, keys = photos
    enc = make_encoder(make_config(tiny_models["kl"], sample="moments"))
    assert enc.spec.columns == {"mean": ((4, 8, 8), "float16"), "logvar": ((4, 8, 8), "float16")}
    # Stored unnormalised; the constants travel along for readers to apply after sampling.
    assert enc.spec.constants["applied"] is False
    assert enc.spec.constants["scaling_factor"] == KL_SCALE
    assert enc.spec.constants["shift_factor"] == KL_SHIFT

    arrays = encode(enc, pixels, keys).arrays
    assert set(arrays) == {"mean", "logvar"}
    assert_close(arrays["mean"], kl_ref["mean"])
    assert_close(arrays["logvar"], kl_ref["logvar"])
    assert_not_close(arrays["mean"], (kl_ref["mean"] - KL_SHIFT) * KL_SCALE)
    assert_not_close(arrays["logvar"], kl_ref["mean"])


# --- KL: sample ------------------------------------------------------------------------------


def test_sample_is_reproducible_across_instances(kl_sample, tiny_models, photos) -> None:
    pixels, keys = photos
    first = encode(kl_sample, pixels, keys).arrays["latent"]
    other = make_encoder(make_config(tiny_models["kl"], sample="sample", seed=7))
    second = encode(other, pixels, keys).arrays["latent"]
    assert first.tobytes() == second.tobytes()


def test_sample_independent_of_batch_order_and_composition(kl_sample, photos) -> None:
    pixels, keys = photos
    full = encode(kl_sample, pixels, keys).arrays["latent"]
    order = [4, 1, 5, 0, 3, 2]
    shuffled = encode(kl_sample, pixels[order], [keys[i] for i in order]).arrays["latent"]
    np.testing.assert_array_equal(shuffled, full[order])
    subset = [3, 0]
    alone = encode(kl_sample, pixels[subset], [keys[i] for i in subset]).arrays["latent"]
    np.testing.assert_array_equal(alone, full[subset])


def test_sample_across_batch_sizes_agrees_to_float16_rounding(tiny_models, kl_sample, photos) -> None:
    # Another batch size is another convolution shape, whose kernels may round differently:
    # the promise is agreement to float16 rounding (one unit in the last place), not identity.
    pixels, keys = photos
    full = encode(kl_sample, pixels, keys).arrays["latent"]
    chunked = make_encoder(make_config(tiny_models["kl"], sample="sample", seed=7, batch_size=2))
    result = encode(chunked, pixels, keys)
    assert result.chunk_size == 2
    assert result.arrays["latent"].dtype == np.float16
    np.testing.assert_array_max_ulp(result.arrays["latent"], full, maxulp=1)


def test_every_chunk_has_the_configured_shape(tiny_models, photos, monkeypatch) -> None:
    # Byte-identical reruns rest on this: whatever batch Ray hands over, the model only ever
    # sees batch_size images at once (a short chunk is padded, the padding dropped).
    pixels, keys = photos
    enc = make_encoder(make_config(tiny_models["kl"], sample="sample", seed=7, batch_size=4))
    reference = encode(enc, pixels, keys).arrays["latent"]
    original = enc._forward
    shapes: list[tuple[int, ...]] = []

    def forward(model, x, chunk_keys):
        shapes.append(tuple(x.shape))
        return original(model, x, chunk_keys)

    monkeypatch.setattr(enc, "_forward", forward)
    for start, stop in ((0, 1), (1, 4), (4, 6)):
        part = encode(enc, pixels[start:stop], keys[start:stop]).arrays["latent"]
        assert part.tobytes() == reference[start:stop].tobytes()
    assert {s[0] for s in shapes} == {4}


def test_sample_noise_depends_on_seed_and_key(tiny_models, kl_sample, photos) -> None:
    pixels, keys = photos
    base = encode(kl_sample, pixels, keys).arrays["latent"].astype(np.float32)
    reseeded = make_encoder(make_config(tiny_models["kl"], sample="sample", seed=8))
    other_seed = encode(reseeded, pixels, keys).arrays["latent"].astype(np.float32)
    assert not np.allclose(other_seed, base, atol=0.05)
    # The same image under another key draws other noise.
    renamed = encode(kl_sample, pixels, [k + "-b" for k in keys]).arrays["latent"].astype(np.float32)
    assert not np.allclose(renamed, base, atol=0.05)


def test_sample_is_a_draw_from_the_posterior(kl_sample, kl_ref, photos) -> None:
    pixels, keys = photos
    stored = encode(kl_sample, pixels, keys).arrays["latent"].astype(np.float32)
    mode_scaled = (kl_ref["mode"] - KL_SHIFT) * KL_SCALE
    assert_not_close(stored, mode_scaled)
    # Undo the normalisation: z = mean + std * eps with eps ~ N(0, 1) per element.
    z = stored / KL_SCALE + KL_SHIFT
    eps = (z - kl_ref["mean"]) / kl_ref["std"]
    assert np.abs(eps).max() < 6.0
    assert abs(float(eps.mean())) < 0.1
    assert 0.9 < float(eps.std()) < 1.1
    # The noise scales with the posterior std exp(0.5 * logvar), not with the variance or 1/std:
    # where the std is small and where it is large, eps has the same spread.
    std = kl_ref["std"]
    low, high = eps[std < 0.9], eps[std > 1.1]
    assert min(low.size, high.size) > 100
    assert 0.85 < float(high.std() / low.std()) < 1.15


def test_stable_seed_depends_only_on_seed_and_key() -> None:
    assert stable_seed(0, "000000001") == stable_seed(0, "000000001")
    assert stable_seed(0, "000000001") != stable_seed(0, "000000002")
    assert stable_seed(0, "000000001") != stable_seed(1, "000000001")
    assert 0 <= stable_seed(123, "k") < 2**63


# --- VQ --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vq(tiny_models) -> TorchEncoder:
    return make_encoder(make_config(tiny_models["vq"], type="vq"))


def test_vq_indices_match_diffusers(vq, tiny_models, photos) -> None:
    from diffusers import VQModel

    pixels, keys = photos
    result = encode(vq, pixels, keys)
    indices = result.arrays["indices"]
    assert indices.dtype == np.int16 and indices.shape == (N, 8, 8)
    assert result.errors == {}

    model = VQModel.from_pretrained(tiny_models["vq"]).eval()
    with torch.no_grad():
        h = model.encode(to_input(pixels)).latents
        expected = model.quantize(h)[2][2].reshape(N, 8, 8).numpy()
    np.testing.assert_array_equal(indices, expected)
    # Real content uses more than one code (a constant output would be a broken encoder).
    assert len(np.unique(indices)) > 1
    assert indices.min() >= 0 and indices.max() < VQ_CODES


def test_vq_spec(vq) -> None:
    spec = vq.spec
    assert isinstance(vq, VQEncoder)
    assert spec.type == "vq" and spec.model_class == "VQModel"
    assert spec.columns == {"indices": ((8, 8), "int16")}
    assert spec.constants == {"codebook_size": VQ_CODES, "embed_dim": 4}
    assert spec.downsample == 8


@pytest.mark.parametrize(
    ("codes", "dtype"),
    [
        (2, "uint8"),
        (256, "uint8"),
        (257, "int16"),
        (32768, "int16"),
        (32769, "int32"),
        (2**31, "int32"),
        (2**31 + 1, "int64"),
    ],
)
def test_index_dtype_is_the_smallest_that_holds_the_codebook(codes: int, dtype: str) -> None:
    assert index_dtype(codes) == dtype
    assert codes - 1 <= np.iinfo(dtype).max


def test_vq_nonfinite_prequant_latent_becomes_an_error(tiny_models, photos, monkeypatch) -> None:
    # NaN pre-quantisation latents still give an argmin index; they must not pass as data.
    pixels, keys = photos
    enc = make_encoder(make_config(tiny_models["vq"], type="vq"))
    clean = encode(enc, pixels, keys).arrays["indices"]
    original = enc.model.encode

    def nan_for_row_2(x: torch.Tensor):
        out = original(x)
        out.latents[2] = float("nan")
        return out

    monkeypatch.setattr(enc.model, "encode", nan_for_row_2)
    result = encode(enc, pixels, keys)
    assert list(result.errors) == [2]
    assert (result.arrays["indices"][2] == 0).all()
    np.testing.assert_array_equal(np.delete(result.arrays["indices"], 2, axis=0), np.delete(clean, 2, axis=0))


# --- geometry and model resolution -----------------------------------------------------------


def test_non_square_resolution_is_width_by_height(tiny_models) -> None:
    cfg = make_config(tiny_models["kl"], resolution=[96, 64])
    enc = make_encoder(cfg)
    # (C, H/f, W/f): 64 high, 96 wide.
    assert enc.spec.columns == {"latent": ((4, 8, 12), "float16")}
    photo = photo_samples(resolution=96)[0]
    crop = preprocess_sample(photo.image, key=photo.key, config=cfg.preprocess)
    assert crop.pixels.shape == (64, 96, 3)
    pixels = crop.pixels[None]
    stored = encode(enc, pixels, [photo.key]).arrays["latent"]
    assert stored.shape == (1, 4, 8, 12)
    mode = diffusers_posterior(tiny_models["kl"], pixels)["mode"]
    assert_close(stored, (mode - KL_SHIFT) * KL_SCALE)


@pytest.mark.parametrize("resolution", [60, [64, 60], [68, 64]])
@pytest.mark.parametrize("model", ["kl", "vq"])
def test_resolution_not_divisible_by_the_factor_is_refused(tiny_models, resolution, model) -> None:
    cfg = make_config(tiny_models[model], resolution=resolution, type=model)
    with pytest.raises(ConfigError, match="not divisible by the model's downsampling factor 8"):
        ENCODERS.get(model).inspect(cfg)


def test_missing_model_path_is_a_config_error(tmp_path) -> None:
    """A path that does not exist is no valid hub id either: the message says so (exit code 2)."""
    with pytest.raises(LatentizeError, match="neither an existing file or folder nor a hub id"):
        load_model_config(str(tmp_path / "no-such-model"), subfolder=None, revision=None)


def test_folder_without_config_json(tmp_path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(LatentizeError, match="no config.json"):
        load_model_config(str(tmp_path), subfolder=None, revision=None)
    # ... and through the encoder's driver-side check as well.
    with pytest.raises(LatentizeError, match="no config.json"):
        KLEncoder.inspect(make_config(tmp_path))


def test_subfolder_of_a_pipeline_folder(tiny_models, tmp_path) -> None:
    import shutil

    shutil.copytree(tiny_models["kl"], tmp_path / "pipe" / "vae")
    spec = KLEncoder.inspect(make_config(tmp_path / "pipe", subfolder="vae"))
    assert spec.columns == {"latent": ((4, 8, 8), "float16")}
    assert spec.constants["scaling_factor"] == KL_SCALE


def test_uncached_hub_id_offline_fails_fast_with_a_fix(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = make_config("latentize-tests/no-such-vae-4f2a9c")
    started = time.monotonic()
    with pytest.raises(LatentizeError) as exc:
        KLEncoder.inspect(cfg)
    assert time.monotonic() - started < 5.0
    msg = str(exc.value)
    assert "latentize-tests/no-such-vae-4f2a9c" in msg
    assert "HF_HUB_OFFLINE" in msg
    assert "--set encoder.model=" in msg


def test_unreachable_hub_fails_fast(monkeypatch) -> None:
    import latentize.hub as hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "reachable", lambda timeout_s=3.0: False)
    with pytest.raises(LatentizeError, match="unreachable.*--set encoder.model="):
        KLEncoder.inspect(make_config("latentize-tests/no-such-vae-4f2a9c"))


def test_empty_batch(kl_mode) -> None:
    result = kl_mode.encode(np.zeros((0, 64, 64, 3), np.uint8), [])
    assert result.arrays["latent"].shape == (0, 4, 8, 8)
    assert result.arrays["latent"].dtype == np.float16
    assert result.errors == {}


# --- non-finite policy -----------------------------------------------------------------------


def nan_forward(enc: TorchEncoder, bad_key: str, *, only_below_fp32: bool, calls: list) -> Any:
    """Wraps ``enc._forward`` so that ``bad_key``'s outputs are NaN (in low precision only)."""
    original = enc._forward

    def forward(model: torch.nn.Module, x: torch.Tensor, keys):
        out = original(model, x, keys)
        model_dtype = next(model.parameters()).dtype
        calls.append((model_dtype, list(keys)))
        if bad_key in keys and (model_dtype != torch.float32 or not only_below_fp32):
            out = {k: v.clone() for k, v in out.items()}
            for v in out.values():
                v[list(keys).index(bad_key)] = float("nan")
        return out

    return forward


@pytest.fixture()
def bf16(tiny_models) -> TorchEncoder:
    enc = make_encoder(make_config(tiny_models["kl"], dtype="bfloat16"))
    assert enc.dtype == torch.bfloat16
    return enc


def test_nonfinite_sample_is_reencoded_in_float32(bf16, photos, monkeypatch) -> None:
    pixels, keys = photos
    clean = encode(bf16, pixels, keys).arrays["latent"]
    calls: list = []
    monkeypatch.setattr(bf16, "_forward", nan_forward(bf16, keys[3], only_below_fp32=True, calls=calls))

    result = encode(bf16, pixels, keys)
    stored = result.arrays["latent"]
    assert result.reencoded_fp32 == 1
    assert result.errors == {}
    assert np.isfinite(stored).all()
    # Only the bad sample went through the float32 copy of the model.
    assert calls[-1] == (torch.float32, [keys[3]])
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    # Other rows are the bfloat16 results; the redone row agrees with them to bf16 precision.
    others = [i for i in range(N) if i != 3]
    np.testing.assert_array_equal(stored[others], clean[others])
    np.testing.assert_allclose(stored[3].astype(np.float32), clean[3].astype(np.float32), rtol=0.05, atol=0.05)


def test_nonfinite_even_in_float32_becomes_an_error_row(bf16, photos, monkeypatch) -> None:
    pixels, keys = photos
    clean = encode(bf16, pixels, keys).arrays["latent"]
    calls: list = []
    monkeypatch.setattr(bf16, "_forward", nan_forward(bf16, keys[1], only_below_fp32=False, calls=calls))

    result = encode(bf16, pixels, keys)
    assert result.reencoded_fp32 == 1
    assert set(result.errors) == {1}
    assert "non-finite" in result.errors[1]
    stored = result.arrays["latent"]
    assert (stored[1] == 0).all()
    others = [i for i in range(N) if i != 1]
    np.testing.assert_array_equal(stored[others], clean[others])


def test_nonfinite_in_float32_model_is_an_error_without_retry(tiny_models, photos, monkeypatch) -> None:
    pixels, keys = photos
    enc = make_encoder(make_config(tiny_models["kl"], sample="moments"))
    calls: list = []
    monkeypatch.setattr(enc, "_forward", nan_forward(enc, keys[0], only_below_fp32=False, calls=calls))
    result = encode(enc, pixels, keys)
    assert result.reencoded_fp32 == 0 and len(calls) == 1
    assert set(result.errors) == {0}
    assert (result.arrays["mean"][0] == 0).all() and (result.arrays["logvar"][0] == 0).all()
    assert np.isfinite(result.arrays["mean"]).all()


# --- chunking and out-of-memory --------------------------------------------------------------


def test_oom_halves_the_chunk_and_keeps_every_row(tiny_models, photos, monkeypatch) -> None:
    pixels, keys = photos
    cfg = make_config(tiny_models["kl"], batch_size=8)
    reference = encode(make_encoder(cfg), pixels, keys).arrays["latent"]

    enc = make_encoder(cfg)
    original = enc._forward
    sizes: list[int] = []

    def forward(model, x, chunk_keys):
        sizes.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(model, x, chunk_keys)

    monkeypatch.setattr(enc, "_forward", forward)
    result = encode(enc, pixels, keys)
    assert result.chunk_size == 2
    assert sizes == [8, 4, 2, 2, 2]  # 6 images padded to 8 -> 4 -> 2, then three chunks of 2
    assert result.errors == {}
    np.testing.assert_allclose(result.arrays["latent"].astype(np.float32), reference.astype(np.float32), atol=1e-3)
    # The halved chunk sticks for the next batches of this actor.
    assert encode(enc, pixels[:3], keys[:3]).chunk_size == 2


def test_oom_at_chunk_one_is_raised(tiny_models, photos, monkeypatch) -> None:
    pixels, keys = photos
    enc = make_encoder(make_config(tiny_models["kl"], batch_size=2))

    def forward(model, x, chunk_keys):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(enc, "_forward", forward)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        encode(enc, pixels[:2], keys[:2])
    assert enc.chunk_size == 1


# --- concurrency and batch size ----------------------------------------------------------------


def test_concurrent_calls_give_what_sequential_calls_give(tiny_models, photos) -> None:
    # Ray's threaded actor runs two calls at once; the model is serialised inside encode().
    from concurrent.futures import ThreadPoolExecutor

    pixels, keys = photos
    enc = make_encoder(make_config(tiny_models["kl"], sample="sample", seed=3, batch_size=2))
    halves = [(pixels[:3], keys[:3]), (pixels[3:], keys[3:])]
    sequential = [encode(enc, p, k).arrays["latent"] for p, k in halves]
    with ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            concurrent = list(pool.map(lambda pk: encode(enc, *pk).arrays["latent"], halves))
            for got, want in zip(concurrent, sequential, strict=True):
                assert got.tobytes() == want.tobytes()


def test_staged_and_tensor_inputs_encode_like_host_arrays(tiny_models, photos) -> None:
    pixels, keys = photos
    enc = make_encoder(make_config(tiny_models["kl"], batch_size=4))
    reference = encode(enc, pixels, keys).arrays["latent"]
    as_tensor = enc.encode(torch.from_numpy(np.array(pixels)), keys).arrays["latent"]
    staged = enc.encode(enc.stage(np.array(pixels)), keys).arrays["latent"]
    assert as_tensor.tobytes() == reference.tobytes() == staged.tobytes()


def test_default_batch_size_keeps_pixels_per_batch_constant(tiny_models) -> None:
    from latentize.encoders.base import default_batch_size

    assert [default_batch_size((r, r), "cuda") for r in (128, 256, 512, 1024, 2048)] == [1024, 256, 64, 16, 4]
    assert default_batch_size((1152, 896), "cuda") == 16
    assert default_batch_size((8192, 8192), "cuda") == 1
    assert [default_batch_size((r, r), "cpu") for r in (64, 256, 512)] == [256, 16, 4]
    enc = make_encoder(make_config(tiny_models["kl"], resolution=128))  # batch_size left null
    assert enc.chunk_size == default_batch_size((128, 128), "cpu") == 64
