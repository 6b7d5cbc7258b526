"""Encoders by ``encoder.type``: ``kl`` (AutoencoderKL latents) and ``vq`` (VQModel indices)."""

from latentize.encoders.base import ENCODERS, EncodeResult, EncoderSpec, TorchEncoder, stable_seed
try:  # single-file loaders (ldm / taming checkpoints)
    from latentize.encoders import checkpoints as _checkpoints  # noqa: F401
except ImportError:  # pragma: no cover - during development of that module
    pass
from latentize.encoders.dc import DCEncoder
from latentize.encoders.flux2 import Flux2Encoder
from latentize.encoders.kl import KLEncoder
from latentize.encoders.vq import VQEncoder

try:  # the TAESD family (hand-written modules for the original .pth files)
    from latentize.encoders.taesd import TinyEncoder
except ImportError:  # pragma: no cover - during development of that module
    TinyEncoder = None  # type: ignore[assignment,misc]

__all__ = [
    "ENCODERS", "DCEncoder", "EncodeResult", "EncoderSpec", "Flux2Encoder", "KLEncoder",
    "TinyEncoder", "TorchEncoder", "VQEncoder", "stable_seed",
]
