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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from latentize.config import Config
from latentize.encoders.base import ENCODERS, EncoderSpec, TorchEncoder
from latentize.encoders.files import FILE_LOADERS, is_single_file, load_state_dict
from latentize.encoders.kl import latent_size
from latentize.encoders.normalize import FORMULAS, Normalization
from latentize.errors import ConfigError, LatentizeError

if TYPE_CHECKING:
    import torch

    # diffusers' top-level names are dummy objects to type checkers; the classes live here.
    from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTiny
    from torch import nn

    from latentize.encoders.decoding import DecoderModel, DecoderParts

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
        "formula": FORMULAS["shift_scale"],
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
        self._normalization = _normalization(self.spec.constants)
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
        return {"latent": z if self._normalization.identity else self._normalization.forward(z)}

    @classmethod
    def decoder(cls, *, encoder: Mapping[str, Any], config: Config, override: str | None) -> DecoderParts:
        """An original ``*_encoder.pth`` decodes with its sibling ``*_decoder.pth`` (or
        ``--decoder``), a hub id / folder with ``AutoencoderTiny``; stored latents are first mapped
        back with ``z / scaling_factor + shift_factor`` when the config set them."""
        from latentize.encoders.decoding import encoder_source

        source = override
        if source is None:
            source = encoder_source(encoder, config)
            if (encoder.get("identity") or {}).get("source") == "file" or is_single_file(source):
                source = str(_sibling_decoder(source))
        norm = _normalization(encoder.get("constants") or {})
        if is_single_file(source):
            return _file_decoder(Path(source), encoder, norm)
        return _tiny_decoder(source, encoder, config, norm, override=override)


def _normalization(constants: Mapping[str, Any]) -> Normalization:
    """``(z - shift) * scale``, the identity (raw latents) unless the config set them."""
    return Normalization(
        "shift_scale", float(constants.get("scaling_factor", 1.0)), float(constants.get("shift_factor") or 0.0)
    )


def _sibling_decoder(encoder_file: str) -> Path:
    """The ``*_decoder.pth`` released beside an original encoder file, or a LatentizeError."""
    sibling = decoder_path_for(encoder_file)
    if sibling is None:
        path = Path(encoder_file)
        expected = path.with_name(path.stem.removesuffix("_encoder") + "_decoder" + path.suffix)
        raise LatentizeError(
            f"no TAESD decoder found for the encoder file {encoder_file} (looked for {expected}); "
            "pass --decoder /path/to/NAME_decoder.pth (the decoder file released with the encoder)"
        )
    return sibling


def _file_decoder(source: Path, encoder: Mapping[str, Any], norm: Normalization) -> DecoderParts:
    from latentize.encoders.decoding import DecoderParts, stored_column
    from latentize.encoders.taesd_net import load_tiny_decoder

    path = source.expanduser().resolve()
    module = load_tiny_decoder(path)
    channels = encoder.get("latent_channels")
    if channels is not None and module.latent_channels != int(channels):
        raise LatentizeError(
            f"--decoder {path} takes {module.latent_channels}-channel latents but the stored ones have "
            f"{channels}; pass the decoder released with the encoder"
        )
    column = stored_column(encoder)

    def file_step(model: DecoderModel, columns: Mapping[str, torch.Tensor]) -> torch.Tensor:
        z = columns[column]
        return model(z if norm.identity else norm.inverse(z))  # TaesdDecoder: raw latents -> [0, 1]

    return DecoderParts(module, file_step, f"TAESD decoder {path}")


def _tiny_decoder(
    source: str, encoder: Mapping[str, Any], config: Config, norm: Normalization, *, override: str | None
) -> DecoderParts:
    from latentize.encoders.decoding import DecoderParts, from_pretrained, stored_column, unit

    subfolder = None if override is not None else config.encoder.subfolder
    revision = None if override is not None else config.encoder.revision
    model = from_pretrained("AutoencoderTiny", source, subfolder=subfolder, revision=revision)
    column = stored_column(encoder)

    def tiny_step(model: DecoderModel, columns: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # AutoencoderTiny.decode returns [-1, 1] (DecoderTiny maps its [0, 1] output there).
        z = columns[column]
        return unit(model.decode(z if norm.identity else norm.inverse(z)).sample)

    where = f"{source} (subfolder {subfolder})" if subfolder else source
    return DecoderParts(model, tiny_step, f"AutoencoderTiny decoder of {where}")
