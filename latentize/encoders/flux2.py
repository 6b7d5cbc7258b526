"""FLUX.2 (diffusers ``AutoencoderKLFlux2``): 2×2 patchify, then BatchNorm running statistics.

Exactly what diffusers' Flux2 pipeline does to image latents (``_patchify_latents`` and the
``vae.bn`` normalisation): the stored ``latent`` has 4·C channels at 1/16 of the resolution.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from latentize.config import Config
from latentize.encoders.base import ENCODERS, EncoderSpec, TorchEncoder
from latentize.encoders.kl import KLEncoder, latent_size
from latentize.errors import LatentizeError

if TYPE_CHECKING:
    import torch

    # diffusers' top-level names are dummy objects to type checkers; the classes live here.
    from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2

__all__ = ["Flux2Encoder", "patchify"]


def patchify(z: torch.Tensor, patch: tuple[int, int] = (2, 2)) -> torch.Tensor:
    """(n, C, h, w) -> (n, C·p·q, h/p, w/q), channel order as diffusers' ``_patchify_latents``."""
    n, c, h, w = z.shape
    p, q = patch
    z = z.view(n, c, h // p, p, w // q, q).permute(0, 1, 3, 5, 2, 4)
    return z.reshape(n, c * p * q, h // p, w // q)


@ENCODERS.register("flux2")
class Flux2Encoder(KLEncoder):
    """``latent`` (4C, H/16, W/16) normalised by the checkpoint's BatchNorm statistics;
    ``moments`` stores the raw, unpatchified ``mean``/``logvar`` (C, H/8, W/8)."""

    diffusers_class = "AutoencoderKLFlux2"

    @classmethod
    def spec_from(cls, model_config: dict[str, Any], config: Config, identity: dict[str, Any]) -> EncoderSpec:
        channels = int(model_config["latent_channels"])
        factor = 2 ** (len(model_config["block_out_channels"]) - 1)
        patch = tuple(model_config.get("patch_size") or (2, 2))
        moments = config.encoder.sample == "moments"
        stored_factor = factor if moments else factor * patch[0]
        h, w = latent_size(config, stored_factor)
        stored_channels = channels if moments else channels * patch[0] * patch[1]
        names = ("mean", "logvar") if moments else ("latent",)
        return EncoderSpec(
            type="flux2",
            model_class=cls.diffusers_class,
            columns={name: ((stored_channels, h, w), config.output.dtype) for name in names},
            constants={
                "patch_size": list(patch),
                "batch_norm_eps": float(model_config.get("batch_norm_eps", 1e-4)),
                "formula": "patchify(z), then (z - bn.running_mean) / sqrt(bn.running_var + batch_norm_eps)",
                "applied": not moments,
            },
            identity=identity,
            input_range="[-1, 1]",
            downsample=stored_factor,
            latent_channels=stored_channels,
            model_config=model_config,
        )

    def _load(self) -> torch.nn.Module:
        return TorchEncoder._load(self)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        import torch

        # nn.Module's attribute access is typed Tensor | Module; the model is diffusers' AutoencoderKLFlux2.
        bn = cast("AutoencoderKLFlux2", self.model).bn
        if bn.running_mean is None or bn.running_var is None:  # a BatchNorm without track_running_stats
            raise LatentizeError(f"encoder.model: {self.config.encoder.model} has no BatchNorm running statistics")
        z = patchify(z, tuple(self.spec.constants["patch_size"]))
        mean = bn.running_mean.float().view(1, -1, 1, 1).to(z.device)
        std = torch.sqrt(bn.running_var.float().view(1, -1, 1, 1) + self.spec.constants["batch_norm_eps"]).to(z.device)
        return (z - mean) / std
