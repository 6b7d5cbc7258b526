"""KL autoencoders (diffusers ``AutoencoderKL``): scaled latents, per-key samples or raw moments.

Semantics follow the Stable Diffusion sources: pixels in [-1, 1]; the posterior
is a diagonal Gaussian whose ``mode`` is its mean; normalisation is
``(z - latents_mean) * scaling_factor / latents_std`` when the model config carries
``latents_mean``/``latents_std`` (Playground v2.5), else ``(z - shift_factor) * scaling_factor``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, cast

from latentize.config import Config
from latentize.encoders.base import ENCODERS, EncoderSpec, TorchEncoder, stable_seed
from latentize.encoders.normalize import FORMULAS, Normalization
from latentize.errors import ConfigError
from latentize.presets import PRESETS

if TYPE_CHECKING:
    import torch

    from latentize.encoders.decoding import DecoderModel, DecoderParts

__all__ = ["KLEncoder", "kl_constants", "latent_size"]

logger = logging.getLogger(__name__)


def kl_constants(model_config: dict[str, Any], config: Config) -> dict[str, Any]:
    """The normalisation constants to apply.

    Precedence: ``encoder.scaling_factor``/``shift_factor`` > the model's own config > the
    preset (single files carry no config). A model config that disagrees with the preset is
    used, with a warning: the weights are what they are.

    Raises:
        ConfigError: a single file with neither preset nor explicit constants.
    """
    enc = config.encoder
    preset = PRESETS.get(enc.preset) if enc.preset else None
    scaling = model_config.get("scaling_factor")
    shift = model_config.get("shift_factor")
    if preset is not None and scaling is not None and preset.scaling_factor is not None:
        if abs(float(scaling) - preset.scaling_factor) > 1e-6 or float(shift or 0.0) != float(
            preset.shift_factor or 0.0
        ):
            logger.warning(
                "the model config's constants (scale %s, shift %s) differ from preset %s's (%s, %s); using the model's",
                scaling,
                shift,
                preset.name,
                preset.scaling_factor,
                preset.shift_factor,
            )
    if scaling is None and preset is not None:
        scaling, shift = preset.scaling_factor, preset.shift_factor
    if enc.scaling_factor is not None:
        scaling = enc.scaling_factor
    if enc.shift_factor is not None:
        shift = enc.shift_factor
    if scaling is None:
        raise ConfigError(
            f"encoder.scaling_factor: {enc.model} carries no constants; set encoder.preset "
            "(e.g. sd15, sdxl, sd3, flux1) or encoder.scaling_factor / encoder.shift_factor"
        )
    mean = model_config.get("latents_mean")
    std = model_config.get("latents_std")
    per_channel = mean is not None and std is not None
    return {
        "scaling_factor": float(scaling),
        "shift_factor": float(shift) if shift is not None else 0.0,
        "latents_mean": [float(v) for v in mean or ()] if per_channel else None,
        "latents_std": [float(v) for v in std or ()] if per_channel else None,
        "formula": FORMULAS["latents_mean_std" if per_channel else "shift_scale"],
        # Raw moments are stored unnormalised; readers apply the formula after sampling.
        "applied": enc.sample != "moments",
    }


def latent_size(config: Config, factor: int) -> tuple[int, int]:
    """``(h, w)`` of the stored latent for the crop size (the reference size of a run with
    several sizes, whose every size the pipeline checks) and downsampling ``factor``."""
    width, height = config.preprocess.reference_size
    if config.preprocess.fixed_size and (width % factor or height % factor):
        raise ConfigError(
            f"preprocess.resolution: {width}x{height} is not divisible by the model's downsampling factor {factor}"
        )
    return height // factor, width // factor


def _latent_geometry(model_config: dict[str, Any], config: Config) -> tuple[int, int, int, int]:
    channels = int(model_config["latent_channels"])
    factor = 2 ** (len(model_config["block_out_channels"]) - 1)
    h, w = latent_size(config, factor)
    return channels, factor, h, w


@ENCODERS.register("kl")
class KLEncoder(TorchEncoder):
    """diffusers ``AutoencoderKL``: ``latent`` (mode / sample) or ``mean`` + ``logvar`` (moments).

    Output columns, per sample: ``latent`` (C, H/f, W/f) or ``mean``/``logvar`` of that shape,
    stored in ``output.dtype``. ``sample`` noise is drawn per key from ``stable_seed(seed, key)``,
    so it does not depend on batch composition or on the worker.
    """

    diffusers_class = "AutoencoderKL"
    #: The ``encoder.type`` the class is registered under (subclasses of other KL models set theirs).
    encoder_type: ClassVar[str] = "kl"

    @classmethod
    def geometry(cls, model_config: Mapping[str, Any]) -> tuple[int, int]:
        """``(latent channels, downsampling factor)`` of a model config; f = 2^(levels - 1)."""
        return int(model_config["latent_channels"]), 2 ** (len(model_config["block_out_channels"]) - 1)

    @classmethod
    def constants(cls, model_config: dict[str, Any], config: Config) -> dict[str, Any]:
        """The normalisation constants to apply (:func:`kl_constants`)."""
        return kl_constants(model_config, config)

    @classmethod
    def spec_from(cls, model_config: dict[str, Any], config: Config, identity: dict[str, Any]) -> EncoderSpec:
        channels, factor = cls.geometry(model_config)
        h, w = latent_size(config, factor)
        names = ("mean", "logvar") if config.encoder.sample == "moments" else ("latent",)
        return EncoderSpec(
            type=cls.encoder_type,
            model_class=cls.diffusers_class,
            columns={name: ((channels, h, w), config.output.dtype) for name in names},
            constants=cls.constants(model_config, config),
            identity=identity,
            input_range="[-1, 1]",
            downsample=factor,
            latent_channels=channels,
            model_config=model_config,
        )

    def _load(self) -> torch.nn.Module:
        self._normalization = Normalization.from_constants(self.spec.constants)
        return super()._load()

    def _noise(self, keys: Sequence[str], shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        seed = self.config.encoder.seed
        gens = [torch.Generator().manual_seed(stable_seed(seed, k)) for k in keys]
        return torch.stack([torch.randn(shape, generator=g) for g in gens])

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Applies the stored normalisation to raw latents ``z`` (n, C, h, w) float32."""
        assert self._normalization is not None  # kl_constants always sets a scaling_factor
        return self._normalization.forward(z)

    def _moments(self, model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's ``(mean, logvar)``, each (n, C, h, w) float32, of ``x`` (n, 3, H, W)."""
        posterior = cast(Any, model).encode(x).latent_dist
        return posterior.mean.float(), posterior.logvar.float()

    def _forward(self, model: torch.nn.Module, x: torch.Tensor, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        import torch

        mean, logvar = self._moments(model, x)
        mode = self.config.encoder.sample
        if mode == "moments":
            return {"mean": mean, "logvar": logvar}
        z = mean
        if mode == "sample":
            eps = self._noise(keys, tuple(mean.shape[1:])).to(mean.device)
            z = mean + torch.exp(0.5 * logvar) * eps
        return {"latent": self.normalize(z)}

    @classmethod
    def decoder(cls, *, encoder: Mapping[str, Any], config: Config, override: str | None) -> DecoderParts:
        """``AutoencoderKL.decode`` of the stored latents after the inverse normalisation
        (``moments`` rows decode their raw ``mean``); hub id, diffusers folder, or an ldm single
        file that includes the decoder."""
        from latentize.encoders.decoding import DecoderParts, load_diffusers, normalised, stored_column, unit

        model, description = load_diffusers(cls, cls.encoder_type, encoder=encoder, config=config, override=override)
        column = stored_column(encoder)
        norm = Normalization.from_constants(encoder.get("constants") or {}) if normalised(encoder, column) else None

        def step(model: DecoderModel, columns: Mapping[str, torch.Tensor]) -> torch.Tensor:
            z = columns[column]
            return unit(cls._decode(model, norm.inverse(z) if norm is not None else z))

        return DecoderParts(model, step, description)

    @staticmethod
    def _decode(model: DecoderModel, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (n, C, h, w) -> the model's decode, (n, 3, H, W) in [-1, 1]."""
        return cast("torch.Tensor", model.decode(z).sample)
