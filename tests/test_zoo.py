"""The 2026 model zoo: Qwen-Image, Wan 2.1 / 2.2 and HunyuanImage 2.1 VAEs; Janus, Emu3 and
Chameleon tokenizers.

Parity is against each model's own library code on tiny random models saved as real model folders
(``conftest.build_zoo``): the diffusers VAE's ``encode`` plus the normalisation its pipelines
apply (written out here), and transformers' full multimodal model loaded with ``from_pretrained``,
its ``vqmodel.encode(...).image_tokens`` on what the model's own image processor makes of the
same pixels. Decoders are checked the same way, then one job per preset runs end to end.
"""

from __future__ import annotations

import inspect
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import HY_SCALE, KL_MEAN, KL_STD, ZOO_PROCESSORS

from latentize.config import Config, config_to_dict, load_config
from latentize.demo import photo_samples, write_webdataset_shard
from latentize.encoders import ENCODERS
from latentize.encoders.tokenizers import ChameleonEncoder, Emu3Encoder, JanusEncoder
from latentize.encoders.vq import index_dtype
from latentize.encoders.wan import WAN21_VAE
from latentize.errors import LatentizeError
from latentize.preprocess import preprocess_sample
from latentize.presets import PRESETS
from latentize.qa.recon import load_decoder

VAES = ["qwen-image", "wan2.1", "wan2.2", "hunyuanimage-2.1"]
TOKENIZERS = ["janus", "emu3", "chameleon"]
#: The 3-D VAEs: an image is one frame.
FRAMES = {"qwen-image", "wan2.1", "wan2.2"}


def make_config(preset: str, model: Path, *, resolution: int = 64, dtype: str = "float32", **encoder: Any) -> Config:
    subfolder = "vae" if preset in VAES else None
    return load_config(
        base={
            "encoder": {"preset": preset, "model": str(model), "subfolder": subfolder, "device": "cpu", **encoder},
            "preprocess": {"resolution": resolution},
            "output": {"path": "unused", "dtype": dtype},
        }
    )


def photos(n: int = 3, resolution: int = 64) -> tuple[np.ndarray, list[str]]:
    """(n, R, R, 3) uint8 crops of real photos, preprocessed as the pipeline does, and keys."""
    samples = [s for s in photo_samples() if s.image][:n]
    cfg = load_config(base={"preprocess": {"resolution": resolution}, "output": {"path": "unused"}})
    pixels = np.stack([preprocess_sample(s.image, key=s.key, config=cfg.preprocess).pixels for s in samples])
    return pixels, [s.key for s in samples]


def encode(cfg: Config, pixels: np.ndarray, keys: list[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Encodes as an actor does; returns the manifest's encoder section with the config, and the arrays."""
    assert cfg.encoder.type is not None
    cls = ENCODERS.get(cfg.encoder.type)
    spec = cls.inspect(cfg)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        result = cls(config=cfg, spec=spec).encode(pixels, keys)
    assert not result.errors
    manifest = {"config": config_to_dict(cfg), "encoder": {**spec.to_manifest(), "preset": cfg.encoder.preset}}
    return manifest, result.arrays


def to_signed(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 * 2 - 1


def diffusers_vae(preset: str, folder: Path) -> Any:
    import diffusers

    return getattr(diffusers, PRESETS.get(preset).model_class).from_pretrained(str(folder), subfolder="vae").eval()


def vae_reference(preset: str, vae: Any, pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw posterior mode, what the model's pipelines store) (n, C, h, w), written out from the
    diffusers pipelines: Qwen-Image and Wan ``(z - latents_mean) * (1 / latents_std)`` on the
    one-frame latent; HunyuanImage ``z * scaling_factor``."""
    x = to_signed(pixels)
    with torch.no_grad():
        if preset in FRAMES:
            raw = vae.encode(x.unsqueeze(2)).latent_dist.mode()[:, :, 0]
            c = vae.config.z_dim
            mean = torch.tensor(vae.config.latents_mean).view(1, c, 1, 1)
            inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, c, 1, 1)
            return raw, (raw - mean) * inv_std
        raw = vae.encode(x).latent_dist.mode()
        return raw, raw * vae.config.scaling_factor


# --- presets and registries ----------------------------------------------------------------------


def test_the_new_presets_resolve_to_their_types_hub_ids_and_geometry() -> None:
    want = {
        "qwen-image": ("qwenimage", "Qwen/Qwen-Image", "vae", 16, 8),
        "wan2.1": ("wan", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "vae", 16, 8),
        "wan2.2": ("wan", "Wan-AI/Wan2.2-TI2V-5B-Diffusers", "vae", 48, 16),
        "hunyuanimage-2.1": ("hunyuanimage", "hunyuanvideo-community/HunyuanImage-2.1-Diffusers", "vae", 64, 32),
        "janus": ("janus", "deepseek-community/Janus-Pro-1B", None, 8, 16),
        "emu3": ("emu3", "BAAI/Emu3-Gen-hf", None, 4, 8),
        "chameleon": ("chameleon", "facebook/chameleon-7b", None, 256, 16),
    }
    for name, (typ, model, subfolder, channels, factor) in want.items():
        preset = PRESETS.get(name)
        assert (preset.type, preset.model, preset.subfolder) == (typ, model, subfolder), name
        assert (preset.latent_channels, preset.downsample) == (channels, factor), name
        cfg = load_config(base={"encoder": {"preset": name}, "output": {"path": "x"}})
        assert (cfg.encoder.type, cfg.encoder.model, cfg.encoder.subfolder) == (typ, model, subfolder)
    # Indices in the smallest integer type: every released codebook here needs int16.
    assert {index_dtype(PRESETS.get(n).codebook_size or 0) for n in TOKENIZERS} == {"int16"}
    assert PRESETS.get("hunyuanimage-2.1").scaling_factor == 0.75289


def test_deterministic_tokenizers_accept_only_mode() -> None:
    from latentize.errors import ConfigError

    with pytest.raises(ConfigError, match="deterministic"):
        load_config(base={"encoder": {"preset": "janus", "sample": "sample"}, "output": {"path": "x"}})
    load_config(base={"encoder": {"preset": "wan2.1", "sample": "moments"}, "output": {"path": "x"}})


def test_config_defaults_mirror_the_libraries() -> None:
    """What a saved config may leave out is read with the library classes' own defaults."""
    import diffusers
    import transformers

    for cls in (diffusers.AutoencoderKLWan, diffusers.AutoencoderKLQwenImage):
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
        assert {k: defaults[k] for k in WAN21_VAE} == WAN21_VAE, cls.__name__
    for enc, config_cls, processor_cls in (
        (JanusEncoder, transformers.JanusVQVAEConfig, transformers.JanusImageProcessor),
        (Emu3Encoder, transformers.Emu3VQVAEConfig, transformers.Emu3ImageProcessor),
        (ChameleonEncoder, transformers.ChameleonVQVAEConfig, transformers.ChameleonImageProcessor),
    ):
        config = config_cls()
        assert {k: _plain(getattr(config, k)) for k in enc.vq_defaults} == enc.vq_defaults, enc.encoder_type
        processor = processor_cls()
        for key, value in enc.processor_defaults.items():
            assert _plain(getattr(processor, key)) == pytest.approx(value), (enc.encoder_type, key)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


# --- VAE parity ----------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", VAES)
def test_vae_latents_equal_the_models_encode_and_pipeline_normalisation(
    preset: str, zoo_models: dict[str, Path]
) -> None:
    pixels, keys = photos()
    manifest, arrays = encode(make_config(preset, zoo_models[preset]), pixels, keys)
    raw, want = vae_reference(preset, diffusers_vae(preset, zoo_models[preset]), pixels)
    got = arrays["latent"]
    factor = {"wan2.2": 16}.get(preset, 8)
    assert got.shape == (3, 4, 64 // factor, 64 // factor) and got.dtype == np.float32
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    # The normalisation is applied: the stored latents are not the raw ones.
    assert np.abs(got - raw.numpy()).max() > 0.1
    constants = manifest["encoder"]["constants"]
    if preset in FRAMES:
        assert constants["latents_mean"] == KL_MEAN and constants["latents_std"] == KL_STD
        assert constants["scaling_factor"] == 1.0
    else:
        assert constants["scaling_factor"] == HY_SCALE and constants["shift_factor"] == 0.0
    # float16 storage: the same latents to float16's precision.
    _, half = encode(make_config(preset, zoo_models[preset], dtype="float16"), pixels, keys)
    assert half["latent"].dtype == np.float16
    np.testing.assert_allclose(half["latent"].astype(np.float32), want.numpy(), rtol=1e-3, atol=1e-3)


def test_wan_moments_are_the_raw_one_frame_posterior(zoo_models: dict[str, Path]) -> None:
    pixels, keys = photos()
    manifest, arrays = encode(make_config("wan2.1", zoo_models["wan2.1"], sample="moments"), pixels, keys)
    vae = diffusers_vae("wan2.1", zoo_models["wan2.1"])
    with torch.no_grad():
        posterior = vae.encode(to_signed(pixels).unsqueeze(2)).latent_dist
    assert set(arrays) == {"mean", "logvar"} and arrays["mean"].shape == (3, 4, 8, 8)
    np.testing.assert_allclose(arrays["mean"], posterior.mean[:, :, 0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(arrays["logvar"], posterior.logvar[:, :, 0].numpy(), rtol=1e-5, atol=1e-5)
    assert manifest["encoder"]["constants"]["applied"] is False


@pytest.mark.parametrize("preset", VAES)
def test_vae_decoder_undoes_the_normalisation_and_decodes_one_frame(preset: str, zoo_models: dict[str, Path]) -> None:
    pixels, keys = photos()
    manifest, arrays = encode(make_config(preset, zoo_models[preset]), pixels, keys)
    decoder = load_decoder(manifest, device="cpu", batch_size=2)
    assert decoder.description.startswith(f"{PRESETS.get(preset).model_class} decoder of {zoo_models[preset]}")
    vae = diffusers_vae(preset, zoo_models[preset])
    raw, _ = vae_reference(preset, vae, pixels)
    with torch.no_grad():
        signed = vae.decode(raw.unsqueeze(2)).sample[:, :, 0] if preset in FRAMES else vae.decode(raw).sample
    want = ((signed + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    got = decoder.decode(arrays)
    assert got.shape == (3, 64, 64, 3)
    np.testing.assert_allclose(got, want, atol=1e-4)


# --- tokenizer parity ----------------------------------------------------------------------------


def tokenizer_reference(preset: str, folder: Path, pixels: np.ndarray) -> tuple[Any, np.ndarray, torch.Tensor]:
    """(the full model's ``vqmodel``, its ``image_tokens`` (n, h, w) of the processor's
    ``pixel_values`` of ``pixels``, the pixel_values), all through transformers' own loading."""
    import transformers

    model_cls, processor_cls = {
        "janus": ("JanusForConditionalGeneration", "JanusImageProcessor"),
        "emu3": ("Emu3ForConditionalGeneration", "Emu3ImageProcessor"),
        "chameleon": ("ChameleonForConditionalGeneration", "ChameleonImageProcessor"),
    }[preset]
    vq = getattr(transformers, model_cls).from_pretrained(str(folder)).eval().model.vqmodel
    processor = getattr(transformers, processor_cls).from_pretrained(str(folder))
    # Sizes are latentize's (the crops are the model's multiple already): no resize, pad or crop.
    skip = {"do_resize": False, "do_pad": False, "do_center_crop": False}
    values = processor(images=list(pixels), return_tensors="pt", **skip)["pixel_values"]
    n = len(pixels)
    with torch.no_grad():
        if preset == "emu3":
            sizes = torch.tensor([list(pixels.shape[1:3])] * n)
            tokens = torch.stack(list(vq.encode(values, sizes).image_tokens))
        else:
            tokens = vq.encode(values).image_tokens.reshape(n, -1)
    side = int(round(tokens[0].numel() ** 0.5))
    return vq, tokens.reshape(n, side, side).numpy(), values


def _tie_gap(vq: Any, preset: str, values: torch.Tensor, where: tuple[int, ...], got: int, want: int) -> float:
    """How much farther code ``got`` is than code ``want`` from the pre-quantisation vector at
    ``where``, relative to their distance: ~0 for a tie that float rounding may decide."""
    with torch.no_grad():
        if preset == "emu3":
            x = values.unsqueeze(1).repeat(1, vq.config.temporal_downsample_factor, 1, 1, 1)
            h = vq.quant_conv(vq.encoder(x).permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)[:, 0]
        else:
            h = vq.quant_conv(vq.encoder(values))
    n, i, j = where
    z = h[n, :, i, j]
    codes = vq.quantize.embedding.weight
    d_got, d_want = ((z - codes[got]) ** 2).sum(), ((z - codes[want]) ** 2).sum()
    return float((d_got - d_want).abs() / d_want.clamp_min(1e-12))


@pytest.mark.parametrize("preset", TOKENIZERS)
def test_tokenizer_indices_equal_the_models_own_image_tokens(preset: str, zoo_models: dict[str, Path]) -> None:
    pixels, keys = photos()
    manifest, arrays = encode(make_config(preset, zoo_models[preset]), pixels, keys)
    vq, want, values = tokenizer_reference(preset, zoo_models[preset], pixels)
    got = arrays["indices"]
    assert got.dtype == np.uint8 and got.shape == want.shape  # 64 codes: uint8
    # Exactly equal, apart from ties: a position whose two nearest codes are equally far, which
    # float rounding of another batch shape or memory layout may decide either way.
    for where in zip(*np.nonzero(got != want), strict=True):
        assert _tie_gap(vq, preset, values, where, int(got[where]), int(want[where])) < 1e-4, where
    assert (got == want).mean() > 0.99
    constants = manifest["encoder"]["constants"]
    # The processor's constants come from the model's preprocessor_config.json, not the class defaults.
    assert constants["image_mean"] == ZOO_PROCESSORS[preset]["image_mean"]
    assert constants["rescale_factor"] == pytest.approx(ZOO_PROCESSORS[preset]["rescale_factor"])
    assert constants["codebook_size"] == 64
    assert manifest["encoder"]["input_range"] == PRESETS.get(preset).input_range


def test_a_folder_of_the_tokenizer_alone_loads_like_the_full_model(
    zoo_models: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pixels, keys = photos()
    vq, want, _ = tokenizer_reference("janus", zoo_models["janus"], pixels)
    vq.save_pretrained(tmp_path / "vq")  # config of model_type janus_vqgan, tensors without a prefix
    shutil.copy(zoo_models["janus"] / "preprocessor_config.json", tmp_path / "vq")
    manifest, arrays = encode(make_config("janus", tmp_path / "vq"), pixels, keys)
    assert (arrays["indices"] == want).mean() > 0.99
    assert manifest["encoder"]["identity"]["weights_file"] == "model.safetensors"
    # Without a preprocessor_config.json the processor class's defaults apply, with a warning.
    (tmp_path / "vq" / "preprocessor_config.json").unlink()
    with caplog.at_level("WARNING", logger="latentize.encoders.tokenizers"):
        spec = ENCODERS.get("janus").inspect(make_config("janus", tmp_path / "vq"))
    assert "preprocessor_config.json" in caplog.text
    assert spec.constants["image_mean"] == JanusEncoder.processor_defaults["image_mean"]


def test_only_the_shards_holding_the_tokenizer_are_named(zoo_models: dict[str, Path]) -> None:
    index = json.loads((zoo_models["janus"] / "model.safetensors.index.json").read_text())["weight_map"]
    spec = ENCODERS.get("janus").inspect(make_config("janus", zoo_models["janus"]))
    named = set(spec.identity["weights_file"].split(", "))
    assert named == {f for k, f in index.items() if k.startswith("model.vqmodel.")}
    assert named < set(index.values())  # the text model's own shards are not read
    assert len(spec.identity["sha256"]) == 64


@pytest.mark.parametrize("preset", ["janus", "emu3"])
def test_tokenizer_decoder_decodes_the_stored_grid(preset: str, zoo_models: dict[str, Path]) -> None:
    pixels, keys = photos()
    manifest, arrays = encode(make_config(preset, zoo_models[preset]), pixels, keys)
    decoder = load_decoder(manifest, device="cpu")
    vq, _, _ = tokenizer_reference(preset, zoo_models[preset], pixels)
    indices = torch.from_numpy(arrays["indices"].astype(np.int64))
    with torch.no_grad():
        if preset == "janus":
            vq.quantize.quant_state_dims = list(indices.shape[1:])
            y = vq.decode(indices.reshape(len(indices), -1))
        else:
            y = vq.decode(indices)
    # Both processors normalise with mean 0.5, std 0.5: [0, 1] is y / 2 + 1 / 2.
    want = (y / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    got = decoder.decode(arrays)
    assert got.shape == (3, 64, 64, 3)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_chameleon_has_no_decoder_and_says_so(zoo_models: dict[str, Path]) -> None:
    pixels, keys = photos(n=1)
    manifest, _ = encode(make_config("chameleon", zoo_models["chameleon"]), pixels, keys)
    with pytest.raises(LatentizeError, match="no decoder"):
        load_decoder(manifest, device="cpu")


# --- single files ------------------------------------------------------------------------------------


def _wan_original_naming(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKLWan's *encoder* tensors under the original Wan names: the inverse,
    written out here, of the encoder half of diffusers' ``convert_wan_vae_to_diffusers``."""
    import re

    resnet = (("norm1.gamma", "residual.0.gamma"), ("conv1.", "residual.2."), ("norm2.gamma", "residual.3.gamma"))
    resnet += (("conv2.", "residual.6."), ("conv_shortcut.", "shortcut."))

    def block(rest: str) -> str:
        for ours, theirs in resnet:
            if rest.startswith(ours):
                return theirs + rest[len(ours) :]
        return rest  # resample / time_conv tensors keep their names

    renames = (
        ("quant_conv.", "conv1."),
        ("encoder.conv_in.", "encoder.conv1."),
        ("encoder.norm_out.", "encoder.head.0."),
        ("encoder.conv_out.", "encoder.head.2."),
        ("encoder.mid_block.attentions.0.", "encoder.middle.1."),
    )
    out = {}
    for key, value in state.items():
        new = next((theirs + key[len(ours) :] for ours, theirs in renames if key.startswith(ours)), None)
        if (m := re.match(r"encoder\.mid_block\.resnets\.(\d)\.(.*)", key)) is not None:
            new = f"encoder.middle.{2 * int(m[1])}.{block(m[2])}"
        elif (m := re.match(r"encoder\.down_blocks\.(\d+)\.(.*)", key)) is not None:
            new = f"encoder.downsamples.{m[1]}.{block(m[2])}"
        if new is not None:
            out[new] = value
    return out


def test_a_wan21_single_file_in_the_original_naming_encodes_like_the_folder(tmp_path: Path) -> None:
    from diffusers import AutoencoderKLWan
    from safetensors.torch import save_file

    torch.manual_seed(0)
    # The released 2.1 layout (16 channels, its statistics) at a tiny width.
    vae = AutoencoderKLWan(base_dim=8).eval()
    vae.save_pretrained(tmp_path / "folder")
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    save_file(_wan_original_naming(state), str(tmp_path / "wan_2.1_vae.safetensors"))
    pixels, keys = photos()
    single = make_config("wan2.1", tmp_path / "wan_2.1_vae.safetensors")
    manifest, from_file = encode(single, pixels, keys)
    folder = make_config("wan2.1", tmp_path / "folder")
    folder.encoder.subfolder = None
    _, from_folder = encode(folder, pixels, keys)
    np.testing.assert_array_equal(from_file["latent"], from_folder["latent"])
    assert manifest["encoder"]["constants"]["latents_mean"] == WAN21_VAE["latents_mean"]
    assert manifest["encoder"]["identity"]["source"] == "file"
    with pytest.raises(LatentizeError, match="no decoder weights"):
        load_decoder(manifest, device="cpu")


def test_single_files_of_other_models_are_refused_with_the_accepted_formats(
    zoo_models: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    wan22 = diffusers_vae("wan2.2", zoo_models["wan2.2"])
    save_file({k: v.contiguous() for k, v in wan22.state_dict().items()}, str(tmp_path / "wan2.2_vae.safetensors"))
    with pytest.raises(LatentizeError, match="not the Wan 2.1 / Qwen-Image layout.*accepted: a diffusers folder"):
        ENCODERS.get("wan").inspect(make_config("wan2.2", tmp_path / "wan2.2_vae.safetensors"))
    for preset in ("hunyuanimage-2.1", "janus"):
        cfg = make_config(preset, tmp_path / "wan2.2_vae.safetensors")
        assert cfg.encoder.type is not None
        with pytest.raises(LatentizeError, match="single weights file"):
            ENCODERS.get(cfg.encoder.type).inspect(cfg)


# --- end to end ------------------------------------------------------------------------------------


def _calibrate(preset: str, folder: Path, pixels: np.ndarray) -> dict[str, Any]:
    """Normalisation constants that give the tiny random VAE's latents of these images unit
    variance and zero mean (a released model's are measured the same way, over its training
    set): written into the model config (per-channel statistics), or returned as
    ``encoder.scaling_factor`` / ``shift_factor`` (HunyuanImage's config has no shift)."""
    raw, _ = vae_reference(preset, diffusers_vae(preset, folder), pixels)
    if preset not in FRAMES:
        return {"scaling_factor": float(1 / raw.std()), "shift_factor": float(raw.mean())}
    path = folder / "vae" / "config.json"
    config = json.loads(path.read_text())
    config["latents_mean"] = raw.mean(dim=(0, 2, 3)).tolist()
    config["latents_std"] = raw.std(dim=(0, 2, 3)).tolist()
    path.write_text(json.dumps(config))
    return {}


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("preset", VAES + TOKENIZERS)
def test_a_job_with_each_new_preset_and_a_local_folder_runs_and_its_qa_passes(
    preset: str, zoo_models: dict[str, Path], tmp_path: Path
) -> None:
    from latentize.pipeline import run
    from latentize.qa import QAOptions, run_qa

    samples = photo_samples()
    write_webdataset_shard(str(tmp_path / "in" / "00000.tar"), samples)
    model = tmp_path / "model"
    shutil.copytree(zoo_models[preset], model)
    pixels = np.stack(
        [preprocess_sample(s.image, key=s.key, config=make_config(preset, model).preprocess).pixels for s in samples]
    )
    encoder = {"preset": preset, "model": str(model), **({"subfolder": "vae"} if preset in VAES else {})}
    if preset in VAES:
        encoder.update(_calibrate(preset, model, pixels))
    cfg = load_config(
        base={
            "input": {"urls": str(tmp_path / "in" / "00000.tar")},
            "preprocess": {"resolution": 64},
            "encoder": encoder,
            "output": {"path": str(tmp_path / "out")},
        }
    )
    summary = run(cfg)
    assert summary.samples_ok == len(samples)
    # Random weights reconstruct nothing recognisable: the sample is decoded and scored with the
    # model's own decoder, but no PSNR threshold applies to them.
    result = run_qa(str(tmp_path / "out"), options=QAOptions(sample=4, min_psnr=0.0, report=str(tmp_path / "qa")))
    report = result.report
    checks = {c["name"]: c for c in report["checks"]}
    assert result.passed, report["checks"]
    if preset in VAES:
        assert checks["scale"]["status"] == "pass", checks["scale"]
    else:
        assert checks["codebook_range"]["status"] == "pass"
        assert report["codebook"]["codebook_size"] == 64 and report["codebook"]["used"] > 1
    recon = report["reconstruction"]
    if preset == "chameleon":
        assert checks["reconstruction"]["status"] == "skip" and "no decoder" in recon["skipped"]
    else:
        assert recon["decoder"].startswith(PRESETS.get(preset).model_class) and recon["sample"] == 4
        assert checks["reconstruction"]["status"] == "pass"
