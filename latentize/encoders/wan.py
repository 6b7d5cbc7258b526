"""Wan 2.1 / 2.2 and Qwen-Image VAEs (diffusers ``AutoencoderKLWan``, ``AutoencoderKLQwenImage``).

Both are 3-D causal video VAEs; an image is encoded as a video of one frame, ``(n, 3, 1, H, W)``,
exactly as the Qwen-Image and Wan image-to-video pipelines do (``image.unsqueeze(2)``), and the
latent's single frame is stored per image as ``(C, h, w)``.

Normalisation is what those pipelines apply to VAE latents, per channel with the model config's
``latents_mean`` and ``latents_std``: ``(z - latents_mean) / latents_std`` (the pipelines multiply
by ``1 / latents_std``), recorded in the manifest as the ``latents_mean_std`` form with
``scaling_factor`` 1.

Geometry: Wan 2.1 and Qwen-Image have 16 channels at f = 8 (three spatial downsamplings); Wan 2.2's
VAE patchifies its input 2 × 2 first (``patch_size`` 2, 12 input channels) and has 48 channels at
f = 16 (``scale_factor_spatial``).

Single files (ComfyUI's ``wan_2.1_vae.safetensors``, ``qwen_image_vae.safetensors``: the original
Wan naming) are converted with diffusers' own ``convert_wan_vae_to_diffusers`` into the class's
default architecture, which is the released Wan 2.1 / Qwen-Image VAE's; the normalisation
constants then are the class defaults (the released models' own). Qwen-Image's VAE has the Wan
2.1 VAE's layer names, so the same converter applies.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

from latentize.config import Config
from latentize.encoders.base import ENCODERS
from latentize.encoders.files import FILE_LOADERS
from latentize.encoders.kl import KLEncoder
from latentize.encoders.normalize import FORMULAS
from latentize.errors import ConfigError, LatentizeError

if TYPE_CHECKING:
    import torch

    from latentize.encoders.decoding import DecoderModel

__all__ = ["QwenImageEncoder", "WAN21_VAE", "WanEncoder", "WanFileLoader", "mean_std_constants"]

logger = logging.getLogger(__name__)

#: The released Wan 2.1 VAE's config: diffusers' ``AutoencoderKLWan`` defaults, which
#: ``AutoencoderKLQwenImage`` shares for these keys (``tests/test_zoo.py`` compares them). A
#: single file carries no config, so these are what it is read with.
WAN21_VAE: dict[str, Any] = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "latents_mean": [
        -0.7571,
        -0.7089,
        -0.9113,
        0.1075,
        -0.1745,
        0.9653,
        -0.1517,
        1.5508,
        0.4134,
        -0.0715,
        0.5517,
        -0.3632,
        -0.1922,
        -0.9497,
        0.2503,
        -0.2921,
    ],
    "latents_std": [
        2.8184,
        1.4541,
        2.3275,
        2.6558,
        1.2196,
        1.7708,
        2.6052,
        2.0743,
        3.2687,
        2.1526,
        2.8652,
        1.5579,
        1.6382,
        1.1253,
        2.8251,
        1.9160,
    ],
}


def mean_std_constants(model_config: Mapping[str, Any], config: Config, channels: int) -> dict[str, Any]:
    """``(z - latents_mean) * scaling_factor / latents_std`` with the model config's per-channel
    statistics and ``scaling_factor`` 1 (``encoder.scaling_factor`` may set another).

    Raises:
        ConfigError: the config lacks the statistics, or has the wrong number of them; or
            ``encoder.shift_factor`` is set (this form has no shift).
    """
    enc = config.encoder
    mean, std = model_config.get("latents_mean"), model_config.get("latents_std")
    if mean is None or std is None or len(mean) != channels or len(std) != channels:
        raise ConfigError(
            f"encoder.model: {enc.model} has no latents_mean / latents_std of {channels} channels in its "
            "config; give the model's diffusers folder (its vae/config.json carries them)"
        )
    if enc.shift_factor is not None:
        raise ConfigError(
            "encoder.shift_factor: these latents are normalised per channel with latents_mean / "
            "latents_std; a shift does not apply"
        )
    return {
        "scaling_factor": float(enc.scaling_factor if enc.scaling_factor is not None else 1.0),
        "shift_factor": 0.0,
        "latents_mean": [float(v) for v in mean],
        "latents_std": [float(v) for v in std],
        "formula": FORMULAS["latents_mean_std"],
        # Raw moments are stored unnormalised; readers apply the formula after sampling.
        "applied": enc.sample != "moments",
    }


@ENCODERS.register("wan")
class WanEncoder(KLEncoder):
    """diffusers ``AutoencoderKLWan`` (Wan 2.1, Wan 2.2): one frame per image.

    Output columns, per sample: ``latent`` (C, H/f, W/f) or ``mean``/``logvar`` of that shape,
    in ``output.dtype``; C = ``z_dim`` (16 or 48), f = ``scale_factor_spatial`` (8 or 16).
    """

    diffusers_class = "AutoencoderKLWan"
    encoder_type: ClassVar[str] = "wan"

    @classmethod
    def geometry(cls, model_config: Mapping[str, Any]) -> tuple[int, int]:
        """``(z_dim, f)``; f from ``scale_factor_spatial``, else 2^(levels - 1) × ``patch_size``."""
        channels = int(model_config.get("z_dim", WAN21_VAE["z_dim"]))
        factor = model_config.get("scale_factor_spatial")
        if factor is None:
            levels = len(model_config.get("dim_mult", WAN21_VAE["dim_mult"]))
            factor = 2 ** (levels - 1) * int(model_config.get("patch_size") or 1)
        return channels, int(factor)

    @classmethod
    def constants(cls, model_config: dict[str, Any], config: Config) -> dict[str, Any]:
        return mean_std_constants(model_config, config, cls.geometry(model_config)[0])

    def _moments(self, model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # One frame: (n, 3, 1, H, W) in, (n, C, 1, h, w) moments out; the frame axis is dropped.
        posterior = cast(Any, model).encode(x.unsqueeze(2)).latent_dist
        return posterior.mean[:, :, 0].float(), posterior.logvar[:, :, 0].float()

    @staticmethod
    def _decode(model: DecoderModel, z: torch.Tensor) -> torch.Tensor:
        # The latent as one frame; the decoded video's single frame is the image.
        return cast("torch.Tensor", model.decode(z.unsqueeze(2)).sample[:, :, 0])


@ENCODERS.register("qwenimage")
class QwenImageEncoder(WanEncoder):
    """diffusers ``AutoencoderKLQwenImage`` (Qwen-Image): 16 channels at f = 8, one frame per image."""

    diffusers_class = "AutoencoderKLQwenImage"
    encoder_type: ClassVar[str] = "qwenimage"

    @classmethod
    def geometry(cls, model_config: Mapping[str, Any]) -> tuple[int, int]:
        """``(z_dim, 2^(levels - 1))``: three spatial downsamplings in the released model."""
        levels = len(model_config.get("dim_mult", WAN21_VAE["dim_mult"]))
        return int(model_config.get("z_dim", WAN21_VAE["z_dim"])), 2 ** (levels - 1)


# --- single files ------------------------------------------------------------------------------

#: A key only the original Wan naming has (diffusers' own ``CHECKPOINT_KEY_NAMES["wan_vae"]``).
_ORIGINAL_KEY = "decoder.middle.0.residual.0.gamma"
_ENCODER_ORIGINAL_KEY = "encoder.middle.0.residual.0.gamma"
_DIFFUSERS_KEY = "encoder.mid_block.resnets.0.norm1.gamma"
_ACCEPTED = (
    "a diffusers folder or hub id (any Wan / Qwen-Image VAE), or a single .safetensors file of the "
    "Wan 2.1 or Qwen-Image VAE in the original Wan naming (ComfyUI's wan_2.1_vae.safetensors, "
    "qwen_image_vae.safetensors) or in diffusers naming"
)


def _prefix(keys: list[str], path: Path) -> tuple[str, str]:
    """``(prefix, naming)`` of the VAE's tensors in a file: ``original`` or ``diffusers``."""
    for marker, naming in ((_ENCODER_ORIGINAL_KEY, "original"), (_DIFFUSERS_KEY, "diffusers")):
        for key in keys:
            if key.endswith(marker):
                return key[: -len(marker)], naming
    raise LatentizeError(f"encoder.model: {path} holds no Wan-family VAE; accepted: {_ACCEPTED}")


class WanFileLoader:
    """:class:`~latentize.encoders.files.FileLoader` for single Wan 2.1 / Qwen-Image VAE files.

    Only the released 2.1 architecture (RGB input, no patchify, 16 latent channels; the width is
    read from the file, 96 in the released models) is accepted: a file carries no config, and that
    is the one whose config (and normalisation) diffusers' class defaults hold. Wan 2.2's VAE and
    anything else load from diffusers folders or hub ids.
    """

    def __init__(self, *, class_name: str) -> None:
        self.class_name = class_name

    def read_config(self, path: Path, config: Config) -> dict[str, Any]:
        from latentize.encoders.checkpoints import _read_shapes

        shapes, _ = _read_shapes(Path(path))
        prefix, naming = _prefix(list(shapes), path)
        conv_in = shapes.get(prefix + ("encoder.conv1.weight" if naming == "original" else "encoder.conv_in.weight"))
        quant = shapes.get(prefix + ("conv1.weight" if naming == "original" else "quant_conv.weight"))
        if conv_in is None or quant is None:
            raise LatentizeError(
                f"encoder.model: {path} lacks the encoder's first or last convolution; accepted: {_ACCEPTED}"
            )
        base_dim, in_channels, z_dim = int(conv_in[0]), int(conv_in[1]), int(quant[0]) // 2
        if (in_channels, z_dim) != (3, WAN21_VAE["z_dim"]):
            raise LatentizeError(
                f"encoder.model: {path} is a Wan-family VAE with {in_channels} input and {z_dim} latent "
                f"channels, not the Wan 2.1 / Qwen-Image layout (3 and 16) single files are read as (Wan "
                f"2.2's VAE is one such); accepted: {_ACCEPTED}"
            )
        return {"_class_name": self.class_name, "naming": naming, "prefix": prefix, **WAN21_VAE, "base_dim": base_dim}

    def load(self, path: Path, config: Config, model_config: dict[str, Any]) -> torch.nn.Module:
        import diffusers
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        from latentize.encoders.checkpoints import read_checkpoint

        prefix = str(model_config.get("prefix") or "")
        tensors = {k[len(prefix) :]: v for k, v in read_checkpoint(Path(path)).items() if k.startswith(prefix)}
        if model_config.get("naming") == "original":
            tensors = convert_wan_vae_to_diffusers(tensors)
        # The released 2.1 architecture (the class defaults), at the file's width.
        model = getattr(diffusers, self.class_name)(base_dim=int(model_config["base_dim"]))
        _load_strict(model, tensors, path)
        return cast("torch.nn.Module", model).eval()


def _load_strict(model: Any, tensors: dict[str, Any], path: Path) -> None:
    """Loads every tensor; a file without the decoder side gets a stand-in that refuses to decode."""
    from latentize.encoders.missing import MissingDecoder

    expected = set(model.state_dict())
    has_decoder = any(k.startswith("decoder.") for k in tensors)
    decoder_side = ("decoder.", "post_quant_conv.")
    missing = {k for k in expected - set(tensors) if has_decoder or not k.startswith(decoder_side)}
    unexpected = set(tensors) - expected
    if missing or unexpected:
        raise LatentizeError(
            f"encoder.model: {path} does not fit {type(model).__name__}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}; accepted: {_ACCEPTED}"
        )
    try:
        model.load_state_dict(tensors, strict=has_decoder)
    except RuntimeError as exc:
        raise LatentizeError(f"encoder.model: {path}: tensor shapes do not fit the model: {exc}") from None
    if not has_decoder:
        model.decoder = MissingDecoder(path)
        model.post_quant_conv = MissingDecoder(path)
    model.float()


FILE_LOADERS.add("wan", WanFileLoader(class_name="AutoencoderKLWan"))
FILE_LOADERS.add("qwenimage", WanFileLoader(class_name="AutoencoderKLQwenImage"))
