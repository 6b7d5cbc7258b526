"""DC-AE (diffusers ``AutoencoderDC``): deterministic, ``encode(x).latent * scaling_factor``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from latentize.config import Config
from latentize.encoders.base import ENCODERS, EncoderSpec, TorchEncoder
from latentize.encoders.kl import latent_size
from latentize.encoders.normalize import FORMULAS, Normalization

if TYPE_CHECKING:
    import torch

    # diffusers' top-level names are dummy objects to type checkers; the classes live here.
    from diffusers.models.autoencoders.autoencoder_dc import AutoencoderDC

    from latentize.encoders.decoding import DecoderModel, DecoderParts

__all__ = ["DCEncoder"]


@ENCODERS.register("dc")
class DCEncoder(TorchEncoder):
    """``latent`` (C, H/f, W/f) = ``encode(x).latent * scaling_factor``; f = 2^(levels - 1)."""

    diffusers_class = "AutoencoderDC"

    @classmethod
    def spec_from(cls, model_config: dict[str, Any], config: Config, identity: dict[str, Any]) -> EncoderSpec:
        channels = int(model_config["latent_channels"])
        factor = 2 ** (len(model_config["encoder_block_out_channels"]) - 1)
        h, w = latent_size(config, factor)
        scale = config.encoder.scaling_factor
        if scale is None:
            scale = model_config.get("scaling_factor", 1.0)
        return EncoderSpec(
            type="dc",
            model_class=cls.diffusers_class,
            columns={"latent": ((channels, h, w), config.output.dtype)},
            constants={
                "scaling_factor": float(scale),
                "shift_factor": 0.0,
                "formula": FORMULAS["scale"],
                "applied": True,
            },
            identity=identity,
            input_range="[-1, 1]",
            downsample=factor,
            latent_channels=channels,
            model_config=model_config,
        )

    def _forward(self, model: torch.nn.Module, x: torch.Tensor, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        # nn.Module's attribute access is typed Tensor | Module; the model is diffusers' AutoencoderDC.
        z = cast("AutoencoderDC", model).encode(x).latent.float()
        return {"latent": _normalization(self.spec.constants).forward(z)}

    @classmethod
    def decoder(cls, *, encoder: Mapping[str, Any], config: Config, override: str | None) -> DecoderParts:
        """``AutoencoderDC.decode`` of ``stored / scaling_factor``."""
        from latentize.encoders.decoding import DecoderParts, load_diffusers, stored_column, unit

        model, description = load_diffusers(cls, "dc", encoder=encoder, config=config, override=override)
        column = stored_column(encoder)
        norm = _normalization(encoder.get("constants") or {})

        def step(model: DecoderModel, columns: Mapping[str, torch.Tensor]) -> torch.Tensor:
            return unit(model.decode(norm.inverse(columns[column])).sample)

        return DecoderParts(model, step, description)


def _normalization(constants: Mapping[str, Any]) -> Normalization:
    """DC-AE's ``z * scaling_factor`` (no shift, whatever the constants say of one)."""
    return Normalization("scale", float(constants.get("scaling_factor", 1.0)))
