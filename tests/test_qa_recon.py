"""Reconstruction QA (latentize.qa.recon): decoders undo exactly what encoding stored, metrics
match their references, sources come back exactly as the encoder saw them.

Expected decodes are computed straight from diffusers (``vae.encode(x).latent_dist.mean`` ->
``vae.decode``), never through latentize; the tiny models carry non-default constants, so a
normalisation that is not undone exactly fails.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_dc
from PIL import Image, ImageFilter

from latentize.config import Config, config_to_dict, load_config
from latentize.demo import ShardSample, photo_samples, write_webdataset_shard
from latentize.encoders import ENCODERS
from latentize.encoders.base import TorchEncoder
from latentize.encoders.flux2 import patchify, unpatchify
from latentize.errors import ConfigError, LatentizeError
from latentize.preprocess import preprocess_sample
from latentize.qa import recon
from latentize.qa.recon import (
    fetch_sources,
    load_decoder,
    lpips_distance,
    psnr,
    ssim,
)
from latentize.weights import TAEF2_DECODER, packaged_weights

#: Decodes of float32-stored latents must equal diffusers' own to this.
ATOL = 1e-4


# --- helpers -----------------------------------------------------------------------------------


def make_config(resolution: int = 64, **encoder: Any) -> Config:
    """A CPU config storing float32 latents (so only the normalisation, not fp16 rounding, counts)."""
    return load_config(
        base={
            "encoder": {"device": "cpu", **encoder},
            "preprocess": {"resolution": resolution},
            "output": {"path": "unused", "dtype": "float32"},
        }
    )


def photos(resolution: int = 64, n: int = 3) -> tuple[np.ndarray, list[str]]:
    """(n, R, R, 3) uint8 pixels of real photos, preprocessed as the pipeline does, and keys."""
    samples = [s for s in photo_samples() if s.image][:n]
    cfg = make_config(resolution)
    pixels = np.stack([preprocess_sample(s.image, key=s.key, config=cfg.preprocess).pixels for s in samples])
    return pixels, [s.key for s in samples]


def encode_run(cfg: Config, pixels: np.ndarray, keys: list[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Encodes like the pipeline; returns a manifest as the pipeline writes it, and the stored arrays."""
    cls = ENCODERS.get(cfg.encoder.type)
    spec = cls.inspect(cfg)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        result = cls(config=cfg, spec=spec).encode(pixels, keys)
    assert not result.errors
    manifest = {
        "config": config_to_dict(cfg),
        "encoder": {**spec.to_manifest(), "preset": cfg.encoder.preset, "dtype": cfg.encoder.dtype},
    }
    return manifest, result.arrays


def to_signed(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> float32 (n, 3, H, W) in [-1, 1], as diffusers' pipelines feed VAEs."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 * 2 - 1


def to_images(signed: torch.Tensor) -> np.ndarray:
    """A diffusers decode (n, 3, H, W) in [-1, 1] -> (n, H, W, 3) in [0, 1]."""
    return ((signed + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def as_unit(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32) / 255


# --- metrics -----------------------------------------------------------------------------------


def test_psnr_matches_the_formula_and_is_inf_for_identical_images() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((3, 16, 20, 3))
    b = np.clip(a + rng.normal(0, [[[[0.01]]], [[[0.05]]], [[[0.2]]]], a.shape), 0, 1)
    want = np.array([10 * np.log10(1 / np.mean((a[i] - b[i]) ** 2)) for i in range(3)])
    np.testing.assert_allclose(psnr(a, b), want, rtol=1e-12)
    assert psnr(a, b)[0] > psnr(a, b)[1] > psnr(a, b)[2]
    same = psnr(a, a.copy())
    assert same.shape == (3,) and np.all(np.isinf(same))
    with pytest.raises(ValueError):
        psnr(a, b[:, :, :10])


def _distortions(image: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """(H, W, 3) uint8 -> named distorted copies as float in [0, 1]."""
    unit = as_unit(image)
    pil = Image.fromarray(image)
    return {
        "noise": np.clip(unit + rng.normal(0, 0.08, unit.shape), 0, 1),
        "blur": as_unit(np.asarray(pil.filter(ImageFilter.GaussianBlur(2)))),
        "jpeg": as_unit(np.asarray(Image.open(_jpeg(pil, 20)).convert("RGB"))),
        "darker": unit * 0.7,
    }


def _jpeg(image: Image.Image, quality: int) -> io.BytesIO:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return buf


def test_ssim_matches_scikit_image_on_real_photos() -> None:
    structural_similarity = pytest.importorskip("skimage.metrics").structural_similarity
    rng = np.random.default_rng(0)
    pixels, _ = photos(resolution=96, n=4)
    refs, dists, want = [], [], []
    for image in pixels:
        for distorted in _distortions(image, rng).values():
            ref = as_unit(image)
            refs.append(ref)
            dists.append(distorted)
            want.append(
                structural_similarity(
                    ref.astype(np.float64),
                    distorted.astype(np.float64),
                    channel_axis=-1,
                    gaussian_weights=True,
                    sigma=1.5,
                    use_sample_covariance=False,
                    data_range=1.0,
                )
            )
    got = ssim(np.stack(refs), np.stack(dists))
    np.testing.assert_allclose(got, np.array(want), atol=1e-4)
    assert np.ptp(want) > 0.2  # the distortions span a real range of scores
    np.testing.assert_allclose(ssim(np.stack(refs), np.stack(refs)), 1.0, atol=1e-12)


def test_ssim_of_non_square_images_matches_scikit_image() -> None:
    structural_similarity = pytest.importorskip("skimage.metrics").structural_similarity
    rng = np.random.default_rng(1)
    a = rng.random((1, 23, 40, 3))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    want = structural_similarity(
        a[0], b[0], channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
    )
    np.testing.assert_allclose(ssim(a, b), [want], atol=1e-6)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[:, :10], b[:, :10])


def test_lpips_is_an_array_or_none_never_an_error() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((2, 64, 64, 3))
    out = lpips_distance(a, a)
    assert out is None or (out.shape == (2,) and np.all(out < 1e-3))
    again = lpips_distance(a, np.clip(a + 0.1, 0, 1))
    assert (out is None) == (again is None)  # decided once per process


def test_lpips_without_the_package_is_none_and_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import sys

    monkeypatch.setattr(recon, "_LPIPS", {})
    monkeypatch.setitem(sys.modules, "lpips", None)  # import lpips -> ImportError
    a = np.zeros((1, 32, 32, 3))
    with caplog.at_level(logging.INFO, logger="latentize.qa.recon"):
        assert lpips_distance(a, a) is None
        assert lpips_distance(a, a) is None
    assert sum("LPIPS" in r.getMessage() for r in caplog.records) == 1


def test_lpips_feeds_unit_range_images_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The array path, with a stand-in for the ``lpips`` package (not installed here)."""
    import sys
    import types

    calls: list[tuple[tuple[int, ...], bool]] = []

    class FakeLPIPS(torch.nn.Module):
        def __init__(self, net: str, verbose: bool) -> None:
            super().__init__()

        def forward(self, x: torch.Tensor, y: torch.Tensor, normalize: bool = False) -> torch.Tensor:
            calls.append((tuple(x.shape), normalize))
            return (x - y).abs().mean(dim=(1, 2, 3), keepdim=True)

    monkeypatch.setattr(recon, "_LPIPS", {})
    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLPIPS))
    rng = np.random.default_rng(0)
    a = rng.random((10, 16, 16, 3))
    b = np.clip(a + 0.05, 0, 1)
    out = lpips_distance(a, b)
    assert out is not None and out.shape == (10,)
    np.testing.assert_allclose(out, np.abs(a - b).mean(axis=(1, 2, 3)), rtol=1e-5)
    assert calls == [((8, 3, 16, 16), True), ((2, 3, 16, 16), True)]


# --- flux2 patches -----------------------------------------------------------------------------


def test_unpatchify_inverts_patchify() -> None:
    torch.manual_seed(0)
    z = torch.randn(2, 5, 8, 12)
    packed = patchify(z)
    assert packed.shape == (2, 20, 4, 6)
    assert torch.equal(unpatchify(packed), z)
    y = torch.randn(3, 16, 4, 4)
    assert torch.equal(patchify(unpatchify(y)), y)
    # Channel order: channel c's 2x2 offsets are channels 4c..4c+3 (diffusers' _unpatchify_latents).
    assert torch.equal(unpatchify(packed)[:, 1, 0::2, 1::2], packed[:, 5])


# --- registry and errors -----------------------------------------------------------------------


def test_a_decoder_per_encoder_type_and_unknown_types_list_the_valid_ones() -> None:
    # Each type's decoder lives beside its encoder, found through the one registry.
    assert all(ENCODERS.get(t).decoder.__func__ is not TorchEncoder.decoder.__func__ for t in ENCODERS.names())
    manifest = {"config": config_to_dict(make_config()), "encoder": {"type": "vae"}}
    with pytest.raises(
        ConfigError, match="valid values: chameleon, dc, emu3, flux2, hunyuanimage, janus, kl, qwenimage"
    ):
        load_decoder(manifest, device="cpu")


def test_uncached_hub_model_offline_says_to_pass_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manifest = {
        "config": config_to_dict(make_config(model="latentize-test/not-a-cached-model")),
        "encoder": {
            "type": "kl",
            "constants": {"scaling_factor": 0.18215, "applied": True},
            "identity": {"model": "latentize-test/not-a-cached-model"},
            "columns": {"latent": {"shape": [4, 8, 8], "dtype": "float16"}},
        },
    }
    with pytest.raises(LatentizeError, match="--decoder"):
        load_decoder(manifest, device="cpu")


# --- kl ----------------------------------------------------------------------------------------


def _kl_reference(path: Path, pixels: np.ndarray) -> tuple[Any, torch.Tensor, np.ndarray]:
    """(vae, raw posterior mean, diffusers' decode of it as (n, H, W, 3) in [0, 1])."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(path)).eval()
    with torch.no_grad():
        raw = vae.encode(to_signed(pixels)).latent_dist.mean
        return vae, raw, to_images(vae.decode(raw).sample)


@pytest.mark.parametrize("name", ["kl", "kl_meanstd"])
def test_kl_decoder_undoes_the_normalisation_exactly(name: str, tiny_models: dict[str, Path]) -> None:
    pixels, keys = photos()
    manifest, arrays = encode_run(make_config(model=str(tiny_models[name])), pixels, keys)
    decoder = load_decoder(manifest, device="cpu", batch_size=2)  # 3 rows: two chunks
    assert decoder.description == f"AutoencoderKL decoder of {tiny_models[name]}"
    got = decoder.decode({**arrays, "key": np.array(keys, dtype=object)})  # non-latent columns pass
    vae, raw, want = _kl_reference(tiny_models[name], pixels)
    assert got.shape == (3, 64, 64, 3) and got.dtype == np.float32
    assert got.min() >= 0 and got.max() <= 1
    np.testing.assert_allclose(got, want, atol=ATOL)
    # The stored latents really are normalised: decoding them as if raw gives other images.
    with torch.no_grad():
        naive = to_images(vae.decode(torch.from_numpy(arrays["latent"])).sample)
    assert np.abs(naive - want).max() > 100 * ATOL


def test_kl_moments_decode_the_raw_mean(tiny_models: dict[str, Path]) -> None:
    pixels, keys = photos()
    manifest, arrays = encode_run(make_config(model=str(tiny_models["kl"]), sample="moments"), pixels, keys)
    assert set(arrays) == {"mean", "logvar"} and manifest["encoder"]["constants"]["applied"] is False
    got = load_decoder(manifest, device="cpu").decode(arrays)
    np.testing.assert_allclose(got, _kl_reference(tiny_models["kl"], pixels)[2], atol=ATOL)


def test_kl_float16_storage_decodes_close_to_the_reference(tiny_models: dict[str, Path]) -> None:
    pixels, keys = photos()
    cfg = make_config(model=str(tiny_models["kl"]))
    cfg.output.dtype = "float16"
    manifest, arrays = encode_run(cfg, pixels, keys)
    assert arrays["latent"].dtype == np.float16
    got = load_decoder(manifest, device="cpu").decode(arrays)
    np.testing.assert_allclose(got, _kl_reference(tiny_models["kl"], pixels)[2], atol=1e-2)


def test_kl_single_file_with_and_without_decoder(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    _, _, want = _kl_reference(tiny_models["kl"], photos()[0])
    state = {k: v.contiguous() for k, v in AutoencoderKL.from_pretrained(str(tiny_models["kl"])).state_dict().items()}
    full = tmp_path / "full.safetensors"
    save_file(state, str(full))
    encoder_only = tmp_path / "encoder_only.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith(("decoder.", "post_quant_conv."))}, str(encoder_only))

    pixels, keys = photos()
    manifest, arrays = encode_run(make_config(model=str(full), scaling_factor=0.5, shift_factor=0.1), pixels, keys)
    decoder = load_decoder(manifest, device="cpu")
    assert decoder.description == f"AutoencoderKL decoder of {full.resolve()}"
    np.testing.assert_allclose(decoder.decode(arrays), want, atol=ATOL)

    manifest, arrays = encode_run(
        make_config(model=str(encoder_only), scaling_factor=0.5, shift_factor=0.1), pixels, keys
    )
    with pytest.raises(LatentizeError, match="no decoder weights.*--decoder"):
        load_decoder(manifest, device="cpu")
    # --decoder points at the full model (here its diffusers folder).
    override = load_decoder(manifest, decoder=str(tiny_models["kl"]), device="cpu")
    np.testing.assert_allclose(override.decode(arrays), want, atol=ATOL)


# --- vq ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("index_dtype", [None, "int32"])
def test_vq_indices_decode_like_diffusers_quantise_then_decode(
    tiny_models: dict[str, Path], index_dtype: str | None
) -> None:
    from diffusers import VQModel

    pixels, keys = photos()
    manifest, arrays = encode_run(make_config(type="vq", model=str(tiny_models["vq"])), pixels, keys)
    assert arrays["indices"].dtype == np.int16  # 300 codes
    if index_dtype is not None:
        arrays = {"indices": arrays["indices"].astype(index_dtype)}
    got = load_decoder(manifest, device="cpu").decode(arrays)
    vq = VQModel.from_pretrained(str(tiny_models["vq"])).eval()
    with torch.no_grad():
        h = vq.encode(to_signed(pixels)).latents
        want = to_images(vq.decode(h).sample)  # force_not_quantize=False: quantise, then decode
        unquantised = to_images(vq.decode(h, force_not_quantize=True).sample)
    np.testing.assert_allclose(got, want, atol=ATOL)
    assert np.abs(unquantised - want).max() > 100 * ATOL  # quantisation matters for this model


# --- dc, flux2, AutoencoderTiny folders (random weights) -------------------------------------


def test_dc_decoder_divides_by_the_scaling_factor(tmp_path: Path) -> None:
    dc = tiny_dc()
    dc.save_pretrained(tmp_path / "dc")
    pixels, keys = photos()
    manifest, arrays = encode_run(make_config(type="dc", model=str(tmp_path / "dc")), pixels, keys)
    got = load_decoder(manifest, device="cpu").decode(arrays)
    with torch.no_grad():
        want = to_images(dc.decode(dc.encode(to_signed(pixels)).latent).sample)
    np.testing.assert_allclose(got, want, atol=ATOL)


@pytest.mark.parametrize("sample", ["mode", "moments"])
def test_flux2_decoder_undoes_batchnorm_and_patchify(tmp_path: Path, sample: str) -> None:
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16, 32, 32), norm_num_groups=8, latent_channels=4).eval()
    vae.bn.running_mean.uniform_(-1, 1)
    vae.bn.running_var.uniform_(0.5, 2.0)
    vae.save_pretrained(tmp_path / "f2")
    pixels, keys = photos()
    manifest, arrays = encode_run(make_config(type="flux2", model=str(tmp_path / "f2"), sample=sample), pixels, keys)
    got = load_decoder(manifest, device="cpu").decode(arrays)
    with torch.no_grad():
        want = to_images(vae.decode(vae.encode(to_signed(pixels)).latent_dist.mode()).sample)
    # The encoder runs its batch padded to a fixed chunk shape and channels-last, so its fp32
    # latents differ from this unpadded NCHW reference by convolution rounding (~4e-5), which this
    # random decoder amplifies to ~2e-4. Skipping the batch-norm undo is off by up to 1.0.
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_autoencoder_tiny_folder_decodes_to_unit_range(tmp_path: Path) -> None:
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    tiny = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8)).eval()
    with torch.no_grad():
        for p in tiny.parameters():
            p.mul_(1.5)  # default init decodes to near-constant images
    tiny.save_pretrained(tmp_path / "tiny")
    pixels, keys = photos()
    manifest, arrays = encode_run(
        make_config(type="tiny", model=str(tmp_path / "tiny"), scaling_factor=2.0, shift_factor=0.25), pixels, keys
    )
    decoder = load_decoder(manifest, device="cpu")
    assert decoder.description == f"AutoencoderTiny decoder of {tmp_path / 'tiny'}"
    got = decoder.decode(arrays)
    with torch.no_grad():
        want = to_images(tiny.decode(tiny.encode(to_signed(pixels)).latents).sample)
    np.testing.assert_allclose(got, want, atol=ATOL)


# --- tiny: original .pth files -----------------------------------------------------------------


def _random_taesd_files(folder: Path, *, decoder: bool) -> Path:
    """A random f8 TAESD encoder (and sibling decoder) saved as original state dicts."""
    from latentize.encoders.taesd_net import build_decoder, build_encoder

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(build_encoder("taesd", 4).state_dict(), folder / "rand_encoder.pth")
    if decoder:
        torch.save(build_decoder("taesd", 4).state_dict(), folder / "rand_decoder.pth")
    return folder / "rand_encoder.pth"


def test_taesd_file_decoder_is_found_beside_the_encoder(tmp_path: Path) -> None:
    from latentize.encoders.taesd_net import load_tiny_decoder

    encoder = _random_taesd_files(tmp_path / "w", decoder=True)
    pixels, keys = photos()
    manifest, arrays = encode_run(make_config(type="tiny", model=str(encoder)), pixels, keys)
    decoder = load_decoder(manifest, device="cpu")
    sibling = (tmp_path / "w" / "rand_decoder.pth").resolve()
    assert decoder.description == f"TAESD decoder {sibling}"
    with torch.no_grad():
        want = load_tiny_decoder(sibling)(torch.from_numpy(arrays["latent"])).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(decoder.decode(arrays), want, atol=1e-6)


def test_taesd_file_without_sibling_decoder_asks_for_decoder(tmp_path: Path) -> None:
    encoder = _random_taesd_files(tmp_path / "alone", decoder=False)
    pixels, keys = photos(n=1)
    manifest, arrays = encode_run(make_config(type="tiny", model=str(encoder)), pixels, keys)
    with pytest.raises(LatentizeError, match="rand_decoder.pth.*--decoder"):
        load_decoder(manifest, device="cpu")
    # --decoder names one elsewhere.
    other = _random_taesd_files(tmp_path / "elsewhere", decoder=True).with_name("rand_decoder.pth")
    decoded = load_decoder(manifest, decoder=str(other), device="cpu").decode(arrays)
    assert decoded.shape == (1, 64, 64, 3)


@pytest.mark.slow
def test_taef2_reconstructs_real_photos() -> None:
    pixels, keys = photos(resolution=256, n=6)
    cfg = make_config(256, preset="taef2", batch_size=3)  # the packaged weights
    cfg.output.dtype = "float16"  # what a real run stores
    manifest, arrays = encode_run(cfg, pixels, keys)
    decoder = load_decoder(manifest, device="cpu", batch_size=3)
    assert decoder.description == f"TAESD decoder {packaged_weights(TAEF2_DECODER)}"
    images = decoder.decode(arrays)
    scores = psnr(images, as_unit(pixels))
    # Real photos through TAEF2 at 256² score about 25-36 dB (docs/encoders.md, "TAESD family").
    assert scores.mean() >= 24.0 and scores.min() >= 20.0, scores
    assert np.all(ssim(images, as_unit(pixels)) > 0.5)


# --- sources -----------------------------------------------------------------------------------


def test_fetch_sources_returns_the_pixels_the_encoder_saw(tmp_path: Path) -> None:
    samples = [s for s in photo_samples() if s.image][:6]
    samples.append(ShardSample(key="broken", image=b"not an image", caption="x"))
    url = write_webdataset_shard(str(tmp_path / "00000.tar"), samples)
    cfg = make_config(48)
    wanted = [samples[4].key, samples[0].key, samples[2].key]
    pixels, missing = fetch_sources(
        shards={"00000": url},
        wanted={"00000": [*wanted, "no-such-key", "broken"], "00009": ["elsewhere"]},
        fmt="webdataset",
        input_config=cfg.input,
        preprocess_config=cfg.preprocess,
    )
    assert sorted(pixels) == sorted(wanted)
    for sample in samples[:6]:
        if sample.key in wanted:
            expected = preprocess_sample(sample.image, key=sample.key, config=cfg.preprocess).pixels
            assert pixels[sample.key].dtype == np.uint8 and pixels[sample.key].shape == (48, 48, 3)
            np.testing.assert_array_equal(pixels[sample.key], expected)
    assert set(missing) == {"no-such-key", "broken", "elsewhere"}
    assert "not found in shard 00000" in missing["no-such-key"]
    assert missing["broken"].startswith("decode:")
    assert "not among" in missing["elsewhere"]


def test_fetch_sources_stops_reading_once_all_keys_are_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import latentize.sources.datasource as datasource

    samples = [s for s in photo_samples() if s.image][:8]
    url = write_webdataset_shard(str(tmp_path / "00000.tar"), samples)
    cfg = make_config(32)
    cfg.input.rows_per_block = 2
    blocks: list[int] = []
    real = datasource.read_shard

    def counting(**kwargs: Any):
        for table in real(**kwargs):
            blocks.append(table.num_rows)
            yield table

    monkeypatch.setattr(datasource, "read_shard", counting)
    pixels, missing = fetch_sources(
        shards={"00000": url},
        wanted={"00000": [samples[1].key]},
        fmt="webdataset",
        input_config=cfg.input,
        preprocess_config=cfg.preprocess,
    )
    assert list(pixels) == [samples[1].key] and not missing
    assert blocks == [2]  # the first block held the key; the other three were never read
