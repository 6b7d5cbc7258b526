"""TAESD family (``encoder.type: tiny``): original .pth layouts, real-weight reconstructions,
diffusers ``AutoencoderTiny`` parity.

The real-weight tests use the TAEF2 encoder and decoder that ship inside latentize
(``latentize/weights/taef2``, MIT); the TAESana encoder is not shipped, so its tests read
../shared/weights/taesd beside the repository and skip when it is absent. Reconstruction quality is the check
that the architecture *and* the input range are right: TAEF2 round trips of real photos at 256²
score ~25-36 dB PSNR, while feeding [-1, 1] instead of [0, 1] drops to ~10 dB (docs/encoders.md).
Everything runs on CPU, without Ray.
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from latentize.config import Config, load_config
from latentize.demo import photo_images
from latentize.encoders.base import ENCODERS, EncodeResult, TorchEncoder
from latentize.encoders.files import load_state_dict
from latentize.encoders.taesd import TaesdPthLoader, TinyEncoder, decoder_path_for
from latentize.encoders.taesd_net import TaesdBlock, detect_layout, load_tiny_decoder, load_tiny_encoder
from latentize.errors import ConfigError, LatentizeError
from latentize.weights import TAEF2_DECODER, TAEF2_ENCODER, packaged_weights

TAEF2_ENC = packaged_weights(TAEF2_ENCODER)
TAEF2_DEC = packaged_weights(TAEF2_DECODER)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "weights" / "taesd"
TAESANA_ENC = SHARED / "taesana_encoder.pth"

needs_taesana = pytest.mark.skipif(not TAESANA_ENC.is_file(), reason=f"TAESana weights not found in {SHARED}")

#: Colour photographs among the demo images (grayscale and RGBA ones are left out).
PHOTOS = ("astronaut", "chelsea", "china", "coffee", "flower", "motorcycle_left", "retina", "rocket")
#: Real photos at 256² score 25-36 dB (mean ~31); anything below this is a broken encoder.
MIN_PSNR = 24.0


# --- helpers -----------------------------------------------------------------------------------


def square(image: Image.Image, size: int) -> np.ndarray:
    """Center-crop to a square and resize (PIL bicubic): uint8 (size, size, 3)."""
    image = image.convert("RGB")
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return np.asarray(image.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC))


def photos(size: int) -> tuple[np.ndarray, list[str]]:
    found = {name: im for name, im in photo_images() if name in PHOTOS}
    if len(found) < 6:
        pytest.skip(f"only {len(found)} of the colour demo photos are installed (need 6)")
    names = sorted(found)
    return np.stack([square(found[n], size) for n in names]), names


def tiny_config(model: Path | str, resolution: int = 256, **encoder: Any) -> Config:
    return load_config(
        base={
            "encoder": {"type": "tiny", "model": str(model), "device": "cpu", **encoder},
            "preprocess": {"resolution": resolution},
            "output": {"path": "unused"},
        }
    )


def run(enc: TorchEncoder, pixels: np.ndarray, keys: list[str]) -> EncodeResult:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return enc.encode(pixels, keys)


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (N, 3, H, W) images in [0, 1]."""
    mse = ((images - reference) ** 2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(1.0 / mse)


def block_indices(seq: torch.nn.Sequential, *, with_branch: bool) -> list[int]:
    return [i for i, m in enumerate(seq) if isinstance(m, TaesdBlock) and (m.pool is not None) == with_branch]


def stride2_indices(seq: torch.nn.Sequential) -> list[int]:
    return [i for i, m in enumerate(seq) if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]


# --- the original files ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "role", "variant", "channels", "factor", "layers"),
    [
        (TAEF2_ENC, "encoder", "flux_2", 32, 8, 15),
        (TAEF2_DEC, "decoder", "flux_2", 32, 8, 20),
        pytest.param(TAESANA_ENC, "encoder", "f32", 32, 32, 18, marks=needs_taesana),
    ],
    ids=["taef2-encoder", "taef2-decoder", "taesana-encoder"],
)
def test_pth_loads_strictly_with_inferred_layout(
    path: Path, role: str, variant: str, channels: int, factor: int, layers: int, tmp_path: Path
) -> None:
    state = load_state_dict(path)
    layout = detect_layout(state, role)
    assert (layout.variant, layout.latent_channels, layout.factor, layout.image_channels) == (
        variant,
        channels,
        factor,
        3,
    )

    module = load_tiny_encoder(path) if role == "encoder" else load_tiny_decoder(path)
    seq = getattr(module, role)
    assert len(seq) == layers
    result = seq.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in seq.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, state[key].float(), rtol=0, atol=0)

    # The layout comes from keys and shapes: a misleading file name changes nothing.
    renamed = tmp_path / f"taesd_{role}.pth"
    shutil.copyfile(path, renamed)
    again = detect_layout(load_state_dict(renamed), role)
    assert (again.variant, again.latent_channels, again.factor) == (variant, channels, factor)


def test_architecture_facts() -> None:
    enc = load_tiny_encoder(TAEF2_ENC).encoder
    dec = load_tiny_decoder(TAEF2_DEC).decoder
    # TAEF2: global branches in the three deepest encoder blocks and the first three decoder ones.
    assert block_indices(enc, with_branch=True) == [11, 12, 13]
    assert block_indices(enc, with_branch=False) == [1, 3, 4, 5, 7, 8, 9]
    assert block_indices(dec, with_branch=True) == [3, 4, 5]
    assert block_indices(dec, with_branch=False) == [8, 9, 10, 13, 14, 15, 18]
    assert stride2_indices(enc) == [2, 6, 10]
    assert [i for i, m in enumerate(dec) if isinstance(m, torch.nn.Upsample)] == [6, 11, 16]
    branch = enc[11].pool
    assert isinstance(branch[1], torch.nn.GroupNorm) and branch[1].num_groups == 4 and branch[1].num_channels == 256

    with torch.no_grad():
        img = load_tiny_decoder(TAEF2_DEC)(torch.randn(1, 32, 3, 5) * 4)
    assert img.shape == (1, 3, 24, 40)
    assert 0.0 <= img.min() and img.max() <= 1.0


@needs_taesana
def test_taesana_architecture_facts() -> None:
    sana = load_tiny_encoder(TAESANA_ENC).encoder
    assert block_indices(sana, with_branch=True) == []
    assert stride2_indices(sana) == [0, 2, 5, 9, 13]
    with torch.no_grad():
        z = load_tiny_encoder(TAESANA_ENC)(torch.rand(1, 3, 64, 96))
    assert z.shape == (1, 32, 2, 3)


def test_wrong_role_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LatentizeError, match="decoder, not an encoder"):
        detect_layout(load_state_dict(TAEF2_DEC), "encoder")
    with pytest.raises(LatentizeError, match="encoder, not an decoder|encoder, not a decoder"):
        load_tiny_decoder(TAEF2_ENC)
    with pytest.raises(LatentizeError):
        ENCODERS.get("tiny").inspect(tiny_config(TAEF2_DEC))
    truncated = tmp_path / "broken_encoder.pth"
    state = load_state_dict(TAEF2_ENC)
    torch.save({k: v for k, v in state.items() if not k.startswith("12.")}, truncated)
    with pytest.raises(LatentizeError, match="unrecognised"):
        load_tiny_encoder(truncated)


def test_read_config_and_decoder_path(tmp_path: Path) -> None:
    cfg = tiny_config(TAEF2_ENC)
    info = TaesdPthLoader().read_config(TAEF2_ENC, cfg)
    assert info["latent_channels"] == 32 and info["downsample_factor"] == 8
    assert info["variant"] == "flux_2" and info["input_range"] == "[0, 1]"
    assert decoder_path_for(TAEF2_ENC) == TAEF2_DEC
    assert decoder_path_for(str(tmp_path / "taesana_encoder.pth")) is None  # no decoder beside it
    assert decoder_path_for(TAEF2_DEC) is None
    assert decoder_path_for(tmp_path / "x_encoder.pth") is None


# --- real photos through the pipeline's encoder ---------------------------------------------


@pytest.fixture(scope="module")
def taef2_round_trip() -> dict[str, Any]:
    """Encodes the photos through TinyEncoder (right and wrong range) and decodes them."""
    pixels, names = photos(256)
    cfg = tiny_config(TAEF2_ENC)
    cls = ENCODERS.get("tiny")
    spec = cls.inspect(cfg)
    right = run(cls(config=cfg, spec=spec), pixels, names)
    # The same file fed [-1, 1]: what a forgotten input-range special case would store.
    wrong_spec = dataclasses.replace(spec, input_range="[-1, 1]")
    wrong = run(cls(config=cfg, spec=wrong_spec), pixels, names)
    decoder = load_tiny_decoder(TAEF2_DEC)
    reference = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        out = {
            name: psnr(decoder(torch.from_numpy(result.arrays["latent"]).float()), reference)
            for name, result in (("right", right), ("wrong", wrong))
        }
    return {"spec": spec, "right": right, "wrong": wrong, "psnr": out, "names": names}


def test_taef2_spec(taef2_round_trip: dict[str, Any]) -> None:
    spec = taef2_round_trip["spec"]
    assert spec.type == "tiny"
    assert spec.input_range == "[0, 1]"
    assert (spec.latent_channels, spec.downsample) == (32, 8)
    assert spec.columns == {"latent": ((32, 32, 32), "float16")}
    assert spec.constants["scaling_factor"] == 1.0 and spec.constants["shift_factor"] == 0.0
    assert spec.identity["source"] == "file" and len(spec.identity["sha256"]) == 64


def test_taef2_reconstructs_real_photos(taef2_round_trip: dict[str, Any]) -> None:
    result: EncodeResult = taef2_round_trip["right"]
    scores = taef2_round_trip["psnr"]["right"]
    names = taef2_round_trip["names"]
    print(
        "TAEF2 PSNR [0, 1] input:",
        {n: round(float(s), 2) for n, s in zip(names, scores, strict=False)},
        f"mean {scores.mean():.2f} dB",
    )
    assert not result.errors
    latent = result.arrays["latent"]
    assert latent.shape == (len(names), 32, 32, 32) and latent.dtype == np.float16
    assert scores.mean() >= MIN_PSNR
    assert scores.min() >= MIN_PSNR - 4
    # Raw latents: roughly ±3 (the decoder soft-clamps at 3); a sane, non-degenerate spread.
    z = latent.astype(np.float32)
    assert 1.5 < np.abs(z).max() < 8.0
    assert 0.3 < z.std() < 2.0
    lo, hi = np.quantile(z, [0.001, 0.999])
    assert -4.5 < lo < -1.0 and 1.0 < hi < 4.5


def test_wrong_input_range_is_caught(taef2_round_trip: dict[str, Any]) -> None:
    right = taef2_round_trip["psnr"]["right"].mean()
    wrong = taef2_round_trip["psnr"]["wrong"].mean()
    print(f"TAEF2 PSNR: [0, 1] input {right:.2f} dB, [-1, 1] input {wrong:.2f} dB")
    assert wrong < MIN_PSNR - 6
    assert right - wrong > 10


@needs_taesana
def test_taesana_encodes_photos() -> None:
    pixels, names = photos(256)
    pixels, names = pixels[:3], names[:3]
    cfg = tiny_config(TAESANA_ENC)
    spec = TinyEncoder.inspect(cfg)
    assert spec.columns == {"latent": ((32, 8, 8), "float16")}
    assert (spec.downsample, spec.input_range, spec.model_config["variant"]) == (32, "[0, 1]", "f32")
    result = run(TinyEncoder(config=cfg, spec=spec), pixels, names)
    latent = result.arrays["latent"]
    assert not result.errors
    assert latent.shape == (3, 32, 8, 8)
    assert np.isfinite(latent).all() and latent.std() > 0.1


@needs_taesana
def test_resolution_must_divide_by_factor() -> None:
    with pytest.raises(ConfigError, match="downsampling factor 32"):
        TinyEncoder.inspect(tiny_config(TAESANA_ENC, resolution=240))


# --- diffusers AutoencoderTiny --------------------------------------------------------------


def _autoencoder_tiny(**kwargs: Any) -> Any:
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    model = AutoencoderTiny(**kwargs).eval()
    # Default init leaves outputs near zero; widen the weights so parity is not trivially met.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    return model


@pytest.mark.parametrize("channels", [4, 16])
def test_sequential_layout_matches_diffusers(channels: int, tmp_path: Path) -> None:
    """The plain f8 layout (TAESD, TAESDXL, TAESD3, TAEF1) equals diffusers' EncoderTiny and
    DecoderTiny with the same weights: the files' layout, checked without those files."""
    from safetensors.torch import save_file

    model = _autoencoder_tiny(latent_channels=channels)
    path = tmp_path / "taesd_single_file.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    encoder = load_tiny_encoder(path)
    decoder = load_tiny_decoder(path)
    assert (encoder.variant, encoder.latent_channels, encoder.downsample_factor) == ("taesd", channels, 8)
    assert (decoder.variant, decoder.latent_channels, decoder.upsample_factor) == ("taesd", channels, 8)
    x = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        z = encoder(x)
        expected = model.encode(x * 2 - 1).latents
        torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)
        img = decoder(z)
        expected_img = ((model.decode(z).sample + 1) / 2).clamp(0, 1)
        torch.testing.assert_close(img, expected_img, rtol=1e-5, atol=1e-5)
    assert z.shape == (2, channels, 8, 6) and img.shape == (2, 3, 64, 48)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("autoencoder_tiny")
    _autoencoder_tiny(
        latent_channels=4,
        encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    ).save_pretrained(folder)
    return folder


def _direct_latents(folder: Path, pixels: np.ndarray) -> torch.Tensor:
    from diffusers import AutoencoderTiny

    model = AutoencoderTiny.from_pretrained(str(folder)).eval()
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0 * 2 - 1
    with torch.no_grad():
        return model.encode(x).latents


def test_diffusers_folder_parity(tiny_folder: Path) -> None:
    pixels, names = photos(64)
    cfg = tiny_config(tiny_folder, resolution=64, batch_size=3)
    cfg.output.dtype = "float32"
    spec = ENCODERS.get("tiny").inspect(cfg)
    assert spec.model_class == "AutoencoderTiny"
    assert spec.input_range == "[-1, 1]"  # AutoencoderTiny.encode rescales to [0, 1] itself
    assert spec.columns == {"latent": ((4, 8, 8), "float32")}
    assert spec.identity["weights_file"].startswith("diffusion_pytorch_model")
    result = run(TinyEncoder(config=cfg, spec=spec), pixels, names)
    expected = _direct_latents(tiny_folder, pixels)
    assert float(expected.abs().max()) > 0.05
    np.testing.assert_allclose(result.arrays["latent"], expected.numpy(), rtol=1e-5, atol=1e-5)


def test_configured_constants_are_applied(tiny_folder: Path) -> None:
    pixels, names = photos(64)
    cfg = tiny_config(tiny_folder, resolution=64, scaling_factor=2.0, shift_factor=0.25)
    cfg.output.dtype = "float32"
    spec = TinyEncoder.inspect(cfg)
    assert spec.constants["scaling_factor"] == 2.0 and spec.constants["shift_factor"] == 0.25
    result = run(TinyEncoder(config=cfg, spec=spec), pixels[:2], names[:2])
    expected = (_direct_latents(tiny_folder, pixels[:2]) - 0.25) * 2.0
    np.testing.assert_allclose(result.arrays["latent"], expected.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sample", ["moments", "sample"])
def test_only_mode_is_valid(sample: str, tiny_folder: Path) -> None:
    with pytest.raises(ConfigError, match="mode"):
        ENCODERS.get("tiny").inspect(tiny_config(tiny_folder, resolution=64, sample=sample))
    # The encoder's own guard, whatever the config validation lets through.
    cfg = tiny_config(tiny_folder, resolution=64)
    cfg.encoder.sample = sample
    with pytest.raises(ConfigError, match="deterministic"):
        TinyEncoder.spec_from({"latent_channels": 4, "encoder_block_out_channels": [16] * 4}, cfg, {})
