"""What the encoder types' decoders share: finding the weights, loading them, and the pieces of a
decode step. Each type's decoder itself lives beside its encoder (``TorchEncoder.decoder``), so a
new encoder type is one file; the QA report (:mod:`latentize.qa.recon`) calls them through the
encoder registry.

A module of its own because it imports torch: the encoder modules are imported on the driver
(the registry), which must not import torch; they import this one inside ``decoder``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from latentize.config import Config
from latentize.errors import LatentizeError
from latentize.hub import hub_failure

if TYPE_CHECKING:
    from latentize.encoders.base import TorchEncoder

__all__ = [
    "DecodeFn",
    "DecoderModel",
    "DecoderParts",
    "encoder_source",
    "from_pretrained",
    "load_diffusers",
    "normalised",
    "require_decoder",
    "stored_column",
    "unit",
]

logger = logging.getLogger(__name__)

#: A decoder-carrying model as the decode steps use it: a diffusers autoencoder, a transformers
#: VQ model or a TAESD module, its class picked by name at run time. Their ``decode``/
#: ``quantize``/``bn``/``config`` differ per class, and ``torch.nn.Module``'s typing
#: (``__getattr__`` -> ``Tensor | Module``) cannot see them.
DecoderModel = Any

#: A type's decode step: (model, stored columns as float32 / int64 tensors on the model's
#: device) -> (n, 3, H, W) float32 images in [0, 1].
DecodeFn = Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]


class DecoderParts(NamedTuple):
    """What an encoder type's ``decoder`` returns.

    Attributes:
        model: the decoder-carrying module, float32 on the CPU.
        step: the type's :data:`DecodeFn`.
        description: what decodes, for the report (``"AutoencoderKL decoder of ..."``).
    """

    model: torch.nn.Module
    step: DecodeFn
    description: str


def unit(signed: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images (what diffusers' decoders return) -> [0, 1], clamped."""
    return ((signed + 1) / 2).clamp(0, 1)


def stored_column(encoder: Mapping[str, Any]) -> str:
    """The stored column that decodes: ``latent``, or the raw ``mean`` of ``moments`` rows."""
    columns = encoder.get("columns") or {}
    for name in ("latent", "mean"):
        if name in columns:
            return name
    raise LatentizeError(f"the manifest's encoder columns ({', '.join(columns) or 'none'}) hold no latent to decode")


def normalised(encoder: Mapping[str, Any], column: str) -> bool:
    """Whether ``column`` holds normalised latents: ``moments`` store raw mean/logvar; only a
    ``latent`` column carries the normalisation (unless the constants say it was not applied)."""
    return column == "latent" and bool(encoder.get("constants", {}).get("applied", True))


def encoder_source(encoder: Mapping[str, Any], config: Config) -> str:
    """Where the encoder's weights were: the resolved path of a single file, else the model."""
    identity = encoder.get("identity") or {}
    if identity.get("source") == "file" and identity.get("model"):
        return str(identity["model"])
    return str(config.encoder.model)


def from_pretrained(class_name: str, model: str, *, subfolder: str | None, revision: str | None) -> torch.nn.Module:
    """A full diffusers model (decoder included) in float32: local folder, HF cache, then hub.

    Unlike :func:`latentize.hub.from_pretrained` (the actors', whose model the driver checked),
    every way it can fail says what to pass instead: the QA report runs it on any machine."""
    import diffusers

    cls = getattr(diffusers, class_name)
    kwargs: dict[str, Any] = {"subfolder": subfolder, "revision": revision, "torch_dtype": torch.float32}
    fix = "pass --decoder with a local diffusers folder (config.json and diffusion_pytorch_model.safetensors)"
    try:
        return cls.from_pretrained(model, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        if Path(model).expanduser().exists():
            raise LatentizeError(f"cannot load the {class_name} decoder from {model}: {exc}; {fix}") from None
    why = hub_failure()
    if why is not None:
        raise LatentizeError(f"the decoder {model!r} is not in the local Hugging Face cache and {why}; {fix}")
    try:
        return cls.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as exc:
        raise LatentizeError(f"cannot load the {class_name} decoder of {model!r}: {exc}; {fix}") from None


def require_decoder(model: torch.nn.Module, path: Path) -> None:
    """Raises when a single file was encoder-only (its loader put stand-ins on the decoder side)."""
    from latentize.encoders.missing import MissingDecoder

    if any(isinstance(getattr(model, name, None), MissingDecoder) for name in ("decoder", "post_quant_conv")):
        raise LatentizeError(
            f"{path} holds no decoder weights (an encoder-only checkpoint); pass --decoder with the "
            "full autoencoder (a diffusers folder, a hub id or a checkpoint that includes the decoder)"
        )


def load_diffusers(
    cls: type[TorchEncoder], kind: str, *, encoder: Mapping[str, Any], config: Config, override: str | None
) -> tuple[DecoderModel, str]:
    """The full model of an encoder type with a diffusers class: ``(model, description)``.

    Single files load through the type's :data:`~latentize.encoders.files.FILE_LOADERS` entry;
    hub ids and folders through diffusers (``override`` replaces the encoder's model, its
    subfolder and revision).
    """
    from latentize.encoders.files import FILE_LOADERS, is_single_file

    class_name = cls.diffusers_class
    source = override if override is not None else encoder_source(encoder, config)
    if is_single_file(source):
        if kind not in FILE_LOADERS:
            raise LatentizeError(
                f"{source}: {kind} decoders load from diffusers folders or hub ids only; pass --decoder with one"
            )
        path = Path(source).expanduser().resolve()
        loader = FILE_LOADERS.get(kind)
        model = loader.load(path, config, loader.read_config(path, config))
        require_decoder(model, path)
        return model, f"{class_name} decoder of {path}"
    subfolder = None if override is not None else config.encoder.subfolder
    revision = None if override is not None else config.encoder.revision
    model = from_pretrained(class_name, source, subfolder=subfolder, revision=revision)
    where = f"{source} (subfolder {subfolder})" if subfolder else source
    return model, f"{class_name} decoder of {where}"
