"""TAESD family (tiny distilled autoencoders): ``encoder.type: tiny``.

Two ways to load the same family:

* a hub id / diffusers folder (``madebyollin/taesd``, ``taesdxl``, ``taesd3``, ``taef1``) loads
  diffusers' ``AutoencoderTiny``. Its ``encode`` takes pixels in **[-1, 1]** and maps them to
  [0, 1] itself (``EncoderTiny.forward``: ``x.add(1).div(2)``), so the spec says ``"[-1, 1]"``.
* an original ``*_encoder.pth`` file (madebyollin/taesd's release format: the state dict of a
  plain ``nn.Sequential``) loads into the modules of :mod:`latentize.encoders.taesd_net`,
  which take pixels in **[0, 1]**. diffusers has no class for these files and none at all for
  TAEF2's global branches or TAESana's f32 layout, hence the hand-written architectures there.

Both give *raw* latents (scale 1, roughly within ±3; docs/encoders.md, "TAESD family"). The layouts follow
madebyollin/taesd's ``taesd.py`` (MIT) and were checked key by key and shape by shape against
the released TAEF2 and TAESana files; which layout a file holds is inferred from its keys and
shapes, never from its name.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from latentize.config import Config
from latentize.encoders.base import ENCODERS, EncoderSpec, TorchEncoder
from latentize.encoders.files import FILE_LOADERS, load_state_dict
from latentize.encoders.kl import latent_size
from latentize.errors import ConfigError, LatentizeError

if TYPE_CHECKING:
    import torch

    # diffusers' top-level names are dummy objects to type checkers; the classes live here.
    from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTiny
    from torch import nn

__all__ = ["TaesdPthLoader", "TinyEncoder", "decoder_path_for", "tiny_constants"]

logger = logging.getLogger(__name__)


def decoder_path_for(encoder_path: str | Path) -> Path | None:
    """The sibling ``NAME_decoder.SUFFIX`` of ``NAME_encoder.SUFFIX`` when it exists, else None."""
    path = Path(encoder_path).expanduser()
    if not path.stem.endswith("_encoder"):
        return None
    sibling = path.with_name(path.stem[: -len("_encoder")] + "_decoder" + path.suffix)
    return sibling if sibling.is_file() else None


class TaesdPthLoader:
    """:class:`~latentize.encoders.files.FileLoader` for original TAESD-family files.

    ``read_config`` returns a small diffusers-style dict: ``latent_channels``,
    ``downsample_factor``, ``variant``, ``input_range`` ("[0, 1]") and ``in_channels``. The
    files are a few MB, so reading the state dict on the driver is cheap.
    """

    def read_config(self, path: Path, config: Config) -> dict[str, Any]:
        from latentize.encoders.taesd_net import detect_layout

        layout = detect_layout(load_state_dict(Path(path)), "encoder")
        if layout.image_channels != 3:
            raise LatentizeError(
                f"encoder.model: {path} takes {layout.image_channels}-channel images; only RGB encoders are supported"
            )
        return {
            "_class_name": "TAESD (original nn.Sequential state dict)",
            "variant": layout.variant,
            "in_channels": layout.image_channels,
            "latent_channels": layout.latent_channels,
            "downsample_factor": layout.factor,
            "input_range": "[0, 1]",
        }

    def load(self, path: Path, config: Config, model_config: dict[str, Any]) -> nn.Module:
        from latentize.encoders.taesd_net import load_tiny_encoder

        module = load_tiny_encoder(path)
        if module.variant != model_config.get("variant") or module.latent_channels != model_config.get(
            "latent_channels"
        ):
            raise LatentizeError(f"encoder.model: {path} changed since it was inspected")
        return module


FILE_LOADERS.add("tiny", TaesdPthLoader())


# --- the encoder ----------------------------------------------------------------------------


def tiny_constants(config: Config) -> dict[str, Any]:
    """Constants: raw latents (scale 1, shift 0) unless the config sets them."""
    enc = config.encoder
    scale = enc.scaling_factor if enc.scaling_factor is not None else 1.0
    shift = enc.shift_factor if enc.shift_factor is not None else 0.0
    return {
        "scaling_factor": float(scale),
        "shift_factor": float(shift),
        "latents_mean": None,
        "latents_std": None,
        "formula": "(z - shift_factor) * scaling_factor",
        "applied": True,
    }


def _check_mode(config: Config) -> None:
    if config.encoder.sample != "mode":
        raise ConfigError(
            "encoder.sample: TAESD-family encoders are deterministic (no posterior to sample or "
            f"store moments of); only 'mode' applies (got {config.encoder.sample!r})"
        )


@ENCODERS.register("tiny")
class TinyEncoder(TorchEncoder):
    """TAESD family: column ``latent`` (C, H/f, W/f) in ``output.dtype``, raw unless the config
    sets ``scaling_factor``/``shift_factor`` (then ``(z - shift) * scale``).

    Hub ids and diffusers folders load ``AutoencoderTiny`` (input [-1, 1]); original ``.pth``
    files load :class:`TaesdEncoder` (input [0, 1]). Only ``sample: mode`` is valid.
    """

    diffusers_class = "AutoencoderTiny"

    @classmethod
    def spec_from(cls, model_config: dict[str, Any], config: Config, identity: dict[str, Any]) -> EncoderSpec:
        _check_mode(config)
        channels = int(model_config["latent_channels"])
        if "downsample_factor" in model_config:
            factor = int(model_config["downsample_factor"])
        else:
            # AutoencoderTiny: stage 0 keeps the size, every further stage halves it.
            factor = 2 ** (len(model_config["encoder_block_out_channels"]) - 1)
        height, width = (side * factor for side in latent_size(config, factor))
        # Only the original files run without diffusers' internal [-1, 1] -> [0, 1] rescale.
        input_range = str(model_config.get("input_range", "[-1, 1]"))
        return EncoderSpec(
            type="tiny",
            model_class=str(model_config.get("_class_name") or cls.diffusers_class),
            columns={"latent": ((channels, height // factor, width // factor), config.output.dtype)},
            constants=tiny_constants(config),
            identity=identity,
            input_range=input_range,
            downsample=factor,
            latent_channels=channels,
            model_config=model_config,
        )

    def _load(self) -> nn.Module:
        _check_mode(self.config)
        self._scale = float(self.spec.constants["scaling_factor"])
        self._shift = float(self.spec.constants["shift_factor"])
        return super()._load()

    def _forward(self, model: nn.Module, x: torch.Tensor, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        from latentize.encoders.taesd_net import TaesdEncoder

        # An original file's module has no ``encode``; ``torch.compile`` keeps the class.
        if isinstance(model, TaesdEncoder) or not hasattr(model, "encode"):
            z = model(x)  # x in [0, 1]
        else:
            # nn.Module's attribute access is typed Tensor | Module; the model is diffusers' AutoencoderTiny.
            z = cast("AutoencoderTiny", model).encode(x).latents  # x in [-1, 1], rescaled inside
        z = z.float()
        if self._shift != 0.0 or self._scale != 1.0:
            z = (z - self._shift) * self._scale
        return {"latent": z}
