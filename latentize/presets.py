"""Encoder presets: the common autoencoders by name, with the constants their pipelines use.

``encoder.preset: sdxl`` fills ``encoder.type``, ``encoder.model`` (hub id), ``subfolder`` and
``revision``; any of those set explicitly wins (``encoder.model`` may point at a local folder or a
single ``.safetensors``/``.ckpt``/``.pth`` file of the same family). Constants come from the
model's own config when it has one (diffusers folders and hub ids); the preset's constants apply
to single files, which carry none, and are checked against the model config otherwise.

Pure data: importing this module imports no torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from latentize.registry import Registry

__all__ = ["PRESETS", "Preset", "preset_table"]


@dataclass(frozen=True)
class Preset:
    """One encoder family.

    Attributes:
        name: the ``encoder.preset`` value.
        type: the ``encoder.type`` (encoder class) it uses.
        model, subfolder, revision: where the weights are on the Hugging Face hub (``model``
            None: no public diffusers weights; ``encoder.model`` must name a file).
        model_class: the model class that runs it.
        input_range: pixel range the original model expects.
        latent_channels, downsample: latent geometry as stored (after any patchify).
        scaling_factor, shift_factor: normalisation constants (None: not used).
        deterministic: whether the encoder is deterministic (no posterior to sample).
        fp16_safe: whether float16 is known not to overflow (``encoder.dtype: auto`` uses it).
        codebook_size: VQ codebook entries.
        notes: one line for ``latentize models``.
        packaged: a weights file shipped inside latentize (``latentize.weights``), used when
            ``encoder.model`` is null and there are no hub weights.
    """

    name: str
    type: str
    model: str | None
    model_class: str
    input_range: str
    latent_channels: int
    downsample: int
    scaling_factor: float | None = None
    shift_factor: float | None = None
    subfolder: str | None = None
    revision: str | None = None
    deterministic: bool = False
    fp16_safe: bool = False
    codebook_size: int | None = None
    notes: str = ""
    packaged: str | None = None


PRESETS: Registry[Preset] = Registry("encoder preset", config_key="encoder.preset")

_KL = "AutoencoderKL"
_TINY = "AutoencoderTiny / original TAESD .pth"

for _p in (
    Preset(
        "sd15",
        "kl",
        "stabilityai/sd-vae-ft-mse",
        _KL,
        "[-1, 1]",
        4,
        8,
        0.18215,
        fp16_safe=True,
        notes="Stable Diffusion 1.x VAE (ft-MSE)",
    ),
    Preset(
        "sd2",
        "kl",
        "stabilityai/sd-vae-ft-ema",
        _KL,
        "[-1, 1]",
        4,
        8,
        0.18215,
        fp16_safe=True,
        notes="Stable Diffusion 2.x VAE (ft-EMA, as shipped with SD 2)",
    ),
    Preset(
        "sdxl",
        "kl",
        "stabilityai/sdxl-vae",
        _KL,
        "[-1, 1]",
        4,
        8,
        0.13025,
        notes="SDXL VAE; overflows in float16 (use sdxl-fp16-fix, fp32 or bf16)",
    ),
    Preset(
        "sdxl-fp16-fix",
        "kl",
        "madebyollin/sdxl-vae-fp16-fix",
        _KL,
        "[-1, 1]",
        4,
        8,
        0.13025,
        fp16_safe=True,
        notes="SDXL VAE finetuned to stay finite in float16",
    ),
    Preset(
        "sd3",
        "kl",
        "stabilityai/stable-diffusion-3-medium-diffusers",
        _KL,
        "[-1, 1]",
        16,
        8,
        1.5305,
        0.0609,
        subfolder="vae",
        notes="SD3 / SD3.5 VAE (gated repo: accept its licence on the hub)",
    ),
    Preset(
        "flux1",
        "kl",
        "black-forest-labs/FLUX.1-schnell",
        _KL,
        "[-1, 1]",
        16,
        8,
        0.3611,
        0.1159,
        subfolder="vae",
        notes="FLUX.1 VAE (identical in dev and schnell)",
    ),
    Preset(
        "flux2",
        "flux2",
        "black-forest-labs/FLUX.2-dev",
        "AutoencoderKLFlux2",
        "[-1, 1]",
        128,
        16,
        subfolder="vae",
        notes="FLUX.2 VAE: 32ch f8, 2x2 patchify, BatchNorm running stats (gated repo)",
    ),
    Preset(
        "playground-v2.5",
        "kl",
        "playgroundai/playground-v2.5-1024px-aesthetic",
        _KL,
        "[-1, 1]",
        4,
        8,
        0.5,
        subfolder="vae",
        notes="SDXL-architecture VAE normalised with latents_mean / latents_std",
    ),
    Preset(
        "dc-ae-f32c32-sana",
        "dc",
        "mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers",
        "AutoencoderDC",
        "[-1, 1]",
        32,
        32,
        0.41407,
        deterministic=True,
        notes="DC-AE f32c32 (Sana 1.0)",
    ),
    Preset(
        "qwen-image",
        "qwenimage",
        "Qwen/Qwen-Image",
        "AutoencoderKLQwenImage",
        "[-1, 1]",
        16,
        8,
        subfolder="vae",
        notes="Qwen-Image VAE: 3-D causal, one frame per image; per-channel latents_mean / latents_std",
    ),
    Preset(
        "wan2.1",
        "wan",
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        "AutoencoderKLWan",
        "[-1, 1]",
        16,
        8,
        subfolder="vae",
        notes="Wan 2.1 VAE: 3-D causal, one frame per image; per-channel latents_mean / latents_std",
    ),
    Preset(
        "wan2.2",
        "wan",
        "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
        "AutoencoderKLWan",
        "[-1, 1]",
        48,
        16,
        subfolder="vae",
        notes="Wan 2.2 VAE: 48 channels, 2x2 input patchify, f16; per-channel latents_mean / latents_std",
    ),
    Preset(
        "hunyuanimage-2.1",
        "hunyuanimage",
        "hunyuanvideo-community/HunyuanImage-2.1-Diffusers",
        "AutoencoderKLHunyuanImage",
        "[-1, 1]",
        64,
        32,
        0.75289,
        subfolder="vae",
        notes="HunyuanImage 2.1 VAE: 64 channels at f32",
    ),
    Preset(
        "janus",
        "janus",
        "deepseek-community/Janus-Pro-1B",
        "JanusVQVAE",
        "[-1, 1]",
        8,
        16,
        deterministic=True,
        codebook_size=16384,
        notes="Janus-Pro image tokenizer (LlamaGen VQ-16); only the VQ part of the model loads; 384² native",
    ),
    Preset(
        "emu3",
        "emu3",
        "BAAI/Emu3-Gen-hf",
        "Emu3VQVAE",
        "[-1, 1]",
        4,
        8,
        deterministic=True,
        codebook_size=32768,
        notes="Emu3 vision tokenizer; only the VQ part of the model loads; 512²-1024² native",
    ),
    Preset(
        "chameleon",
        "chameleon",
        "facebook/chameleon-7b",
        "ChameleonVQVAE",
        "[-1, 0.989]",
        256,
        16,
        deterministic=True,
        codebook_size=8192,
        notes="Chameleon image tokenizer (encoder only: no reconstructions; gated repo); 512² native",
    ),
    Preset(
        "taesd",
        "tiny",
        "madebyollin/taesd",
        _TINY,
        "[0, 1]",
        4,
        8,
        1.0,
        deterministic=True,
        fp16_safe=True,
        notes="tiny SD 1.x/2.x encoder; raw latents",
    ),
    Preset(
        "taesdxl",
        "tiny",
        "madebyollin/taesdxl",
        _TINY,
        "[0, 1]",
        4,
        8,
        1.0,
        deterministic=True,
        fp16_safe=True,
        notes="tiny SDXL encoder; raw latents",
    ),
    Preset(
        "taesd3",
        "tiny",
        "madebyollin/taesd3",
        _TINY,
        "[0, 1]",
        16,
        8,
        1.0,
        deterministic=True,
        fp16_safe=True,
        notes="tiny SD3 encoder; raw latents",
    ),
    Preset(
        "taef1",
        "tiny",
        "madebyollin/taef1",
        _TINY,
        "[0, 1]",
        16,
        8,
        1.0,
        deterministic=True,
        fp16_safe=True,
        notes="tiny FLUX.1 encoder; raw latents",
    ),
    Preset(
        "taef2",
        "tiny",
        None,
        _TINY,
        "[0, 1]",
        32,
        8,
        1.0,
        deterministic=True,
        fp16_safe=True,
        notes="tiny FLUX.2 encoder; its weights ship with latentize (MIT)",
        packaged="taef2/taef2_encoder.pth",
    ),
    Preset(
        "taesana",
        "tiny",
        None,
        _TINY,
        "[0, 1]",
        32,
        32,
        1.0,
        deterministic=True,
        fp16_safe=True,
        notes="tiny Sana (DC-AE f32) encoder; set encoder.model to taesana_encoder.pth",
    ),
    Preset(
        "vqgan-f16-1024",
        "vq",
        None,
        "VQModel (taming VQGAN)",
        "[-1, 1]",
        256,
        16,
        deterministic=True,
        codebook_size=1024,
        notes="taming VQGAN ImageNet f16; set encoder.model to its last.ckpt (+ YAML)",
    ),
    Preset(
        "vqgan-f16-16384",
        "vq",
        None,
        "VQModel (taming VQGAN)",
        "[-1, 1]",
        256,
        16,
        deterministic=True,
        codebook_size=16384,
        notes="taming VQGAN ImageNet f16; set encoder.model to its last.ckpt (+ YAML)",
    ),
    Preset(
        "ldm-vq-f4",
        "vq",
        "CompVis/ldm-celebahq-256",
        "VQModel",
        "[-1, 1]",
        3,
        4,
        subfolder="vqvae",
        deterministic=True,
        codebook_size=8192,
        notes="latent-diffusion VQ-f4",
    ),
    Preset(
        "ldm-vq-f8",
        "vq",
        None,
        "VQModel",
        "[-1, 1]",
        4,
        8,
        deterministic=True,
        codebook_size=16384,
        notes="latent-diffusion VQ-f8; set encoder.model to its model.ckpt (+ YAML)",
    ),
):
    PRESETS.add(_p.name, _p)


def preset_table() -> list[dict[str, Any]]:
    """Every preset as a plain dict, in name order (``latentize models``); ``packaged`` is the
    absolute path of the weights file that ships with latentize, or None."""
    from latentize.weights import packaged_weights

    rows = []
    for name in PRESETS.names():
        row = asdict(PRESETS.get(name))
        if row["packaged"]:
            row["packaged"] = str(packaged_weights(row["packaged"]))
        rows.append(row)
    return rows
