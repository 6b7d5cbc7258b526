"""HunyuanImage 2.1's VAE (diffusers ``AutoencoderKLHunyuanImage``): a 2-D KL autoencoder with 64
latent channels at f = 32.

Its pipeline decodes ``latents / vae.config.scaling_factor`` and its refiner encodes
``latent * vae.config.scaling_factor``: no shift, no per-channel statistics. That is the
``shift_scale`` form with shift 0, with ``scaling_factor`` read from the model config
(:func:`~latentize.encoders.kl.kl_constants`, as for the other KL autoencoders). The encoder is
deterministic in the mean (``mode``); ``sample`` and ``moments`` work as for ``kl``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from latentize.encoders.base import ENCODERS
from latentize.encoders.kl import KLEncoder

__all__ = ["HunyuanImageEncoder"]


@ENCODERS.register("hunyuanimage")
class HunyuanImageEncoder(KLEncoder):
    """``latent`` (C, H/f, W/f) = ``(mean - shift) * scaling_factor``; f =
    ``spatial_compression_ratio`` (32 in the released model), C = ``latent_channels`` (64).

    Hub ids and diffusers folders only: diffusers has no single-file converter for this VAE.
    """

    diffusers_class = "AutoencoderKLHunyuanImage"
    encoder_type: ClassVar[str] = "hunyuanimage"

    @classmethod
    def geometry(cls, model_config: Mapping[str, Any]) -> tuple[int, int]:
        return int(model_config["latent_channels"]), int(model_config["spatial_compression_ratio"])
