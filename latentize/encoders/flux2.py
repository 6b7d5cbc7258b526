"""FLUX.2 (diffusers ``AutoencoderKLFlux2``): 2×2 patchify, then BatchNorm running statistics.

Exactly what diffusers' Flux2 pipeline does to image latents (``_patchify_latents`` and the
``vae.bn`` normalisation): the stored ``latent`` has 4·C channels at 1/16 of the resolution.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from latentize.config import Config
from latentize.encoders.base import ENCODERS, EncoderSpec, TorchEncoder
from latentize.encoders.kl import KLEncoder, latent_size
from latentize.encoders.normalize import FORMULAS, batch_norm_forward, batch_norm_inverse
from latentize.errors import LatentizeError

if TYPE_CHECKING:
    import torch

    # diffusers' top-level names are dummy objects to type checkers; the classes live here.
    from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2

    from latentize.encoders.decoding import DecoderModel, DecoderParts

__all__ = ["Flux2Encoder", "patchify", "unpatchify"]


def patchify(z: torch.Tensor, patch: tuple[int, int] = (2, 2)) -> torch.Tensor:
    """(n, C, h, w) -> (n, C·p·q, h/p, w/q), channel order as diffusers' ``_patchify_latents``."""
    n, c, h, w = z.shape
    p, q = patch
    z = z.view(n, c, h // p, p, w // q, q).permute(0, 1, 3, 5, 2, 4)
    return z.reshape(n, c * p * q, h // p, w // q)


def unpatchify(z: torch.Tensor, patch: tuple[int, int] = (2, 2)) -> torch.Tensor:
    """Inverse of :func:`patchify`: (n, C·p·q, h, w) -> (n, C, h·p, w·q).

    The channel order is diffusers' ``Flux2Pipeline._unpatchify_latents``'s (channel-major,
    then the p×q offsets).
    """
    n, cpq, h, w = z.shape
    p, q = patch
    c = cpq // (p * q)
    z = z.reshape(n, c, p, q, h, w).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(n, c, h * p, w * q)


@ENCODERS.register("flux2")
class Flux2Encoder(KLEncoder):
    """``latent`` (4C, H/16, W/16) normalised by the checkpoint's BatchNorm statistics;
    ``moments`` stores the raw, unpatchified ``mean``/``logvar`` (C, H/8, W/8)."""

    diffusers_class = "AutoencoderKLFlux2"
    encoder_type = "flux2"

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
                "formula": FORMULAS["batch_norm"],
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
        # nn.Module's attribute access is typed Tensor | Module; the model is diffusers' AutoencoderKLFlux2.
        bn = cast("AutoencoderKLFlux2", self.model).bn
        if bn.running_mean is None or bn.running_var is None:  # a BatchNorm without track_running_stats
            raise LatentizeError(f"encoder.model: {self.config.encoder.model} has no BatchNorm running statistics")
        z = patchify(z, tuple(self.spec.constants["patch_size"]))
        mean, var = bn.running_mean.float().to(z.device), bn.running_var.float().to(z.device)
        return batch_norm_forward(z, mean, var, self.spec.constants["batch_norm_eps"])

    @classmethod
    def decoder(cls, *, encoder: Mapping[str, Any], config: Config, override: str | None) -> DecoderParts:
        """The checkpoint's BatchNorm statistics undone (``z * sqrt(running_var + eps) +
        running_mean``), :func:`unpatchify`, then ``AutoencoderKLFlux2.decode``; ``moments`` rows
        decode their raw (unpatchified) ``mean``."""
        from latentize.encoders.decoding import DecoderParts, load_diffusers, normalised, stored_column, unit

        model, description = load_diffusers(cls, "flux2", encoder=encoder, config=config, override=override)
        column = stored_column(encoder)
        is_normalised = normalised(encoder, column)
        constants = dict(encoder.get("constants") or {})
        patch_h, patch_w = constants.get("patch_size") or model.config.patch_size
        patch = (int(patch_h), int(patch_w))
        eps = float(constants.get("batch_norm_eps", model.config.batch_norm_eps))

        def step(model: DecoderModel, columns: Mapping[str, torch.Tensor]) -> torch.Tensor:
            z = columns[column]
            if is_normalised:
                # The checkpoint's BatchNorm running statistics, as diffusers' Flux2 pipeline undoes them.
                stats = (model.bn.running_mean.float(), model.bn.running_var.float())
                z = unpatchify(batch_norm_inverse(z, *stats, eps), patch)
            return unit(model.decode(z).sample)

        return DecoderParts(model, step, description)
