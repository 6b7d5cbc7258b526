"""VQ autoencoders (diffusers ``VQModel``): codebook indices as an h×w grid.

``h = quant_conv(encoder(x))`` is the pre-quantisation latent (what ldm's
``VQModelInterface.encode`` returns); diffusers' own quantiser picks each position's nearest
codebook entry, so the stored indices equal ``model.quantize(h)``'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from latentize.config import Config
from latentize.encoders.base import ENCODERS, EncoderSpec, TorchEncoder
from latentize.encoders.kl import _latent_geometry

if TYPE_CHECKING:
    import torch

    # diffusers' top-level names are dummy objects to type checkers; the classes live here.
    from diffusers.models.autoencoders.vq_model import VQModel

    from latentize.encoders.decoding import DecoderModel, DecoderParts

__all__ = ["VQEncoder", "index_dtype"]


def index_dtype(codebook_size: int) -> str:
    """The smallest integer dtype that holds indices ``0 .. codebook_size - 1``."""
    for dtype in ("uint8", "int16", "int32"):
        if codebook_size - 1 <= np.iinfo(dtype).max:
            return dtype
    return "int64"


@ENCODERS.register("vq")
class VQEncoder(TorchEncoder):
    """diffusers ``VQModel``: ``indices`` (H/f, W/f) in the smallest integer dtype."""

    diffusers_class = "VQModel"

    @classmethod
    def spec_from(cls, model_config: dict[str, Any], config: Config, identity: dict[str, Any]) -> EncoderSpec:
        channels, factor, h, w = _latent_geometry(model_config, config)
        codes = int(model_config["num_vq_embeddings"])
        return EncoderSpec(
            type="vq",
            model_class=cls.diffusers_class,
            columns={"indices": ((h, w), index_dtype(codes))},
            constants={"codebook_size": codes, "embed_dim": model_config.get("vq_embed_dim") or channels},
            identity=identity,
            input_range="[-1, 1]",
            downsample=factor,
            latent_channels=channels,
            model_config=model_config,
        )

    def _forward(self, model: torch.nn.Module, x: torch.Tensor, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        import torch

        # nn.Module's attribute access is typed Tensor | Module; the model is diffusers' VQModel.
        vq = cast("VQModel", model)
        h = vq.encode(x).latents
        _, _, (_, _, indices) = vq.quantize(h)
        n, _, hh, ww = h.shape
        # NaN pre-quantisation latents still give an argmin; flag them so they are re-encoded.
        finite = torch.isfinite(h.reshape(n, -1)).all(dim=1)
        return {
            "indices": indices.reshape(n, hh, ww).to(torch.int64),
            "_finite": torch.where(finite, 0.0, float("nan")).cpu(),
        }

    @classmethod
    def decoder(cls, *, encoder: Mapping[str, Any], config: Config, override: str | None) -> DecoderParts:
        """Indices -> codebook vectors (``quantize.get_codebook_entry``) -> ``VQModel.decode``
        without quantising again."""
        from latentize.encoders.decoding import DecoderParts, load_diffusers, unit

        model, description = load_diffusers(cls, "vq", encoder=encoder, config=config, override=override)

        def step(model: DecoderModel, columns: Mapping[str, torch.Tensor]) -> torch.Tensor:
            indices = columns["indices"]  # (n, h, w) int64
            n, h, w = indices.shape
            shape = (n, h, w, model.quantize.embedding.embedding_dim)
            if model.config.lookup_from_codebook:
                # VQModel.decode looks the indices up itself when configured to.
                return unit(model.decode(indices, force_not_quantize=True, shape=shape).sample)
            quant = model.quantize.get_codebook_entry(indices.reshape(-1), shape)  # (n, D, h, w)
            # force_not_quantize: the codebook vectors are already quantised; decode them as they are.
            return unit(model.decode(quant, force_not_quantize=True).sample)

        return DecoderParts(model, step, description)
