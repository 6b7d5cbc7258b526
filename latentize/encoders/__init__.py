"""Encoders by ``encoder.type``: ``kl`` (AutoencoderKL), ``vq`` (VQModel indices), ``tiny``
(TAESD family), ``dc`` (AutoencoderDC), ``flux2`` (AutoencoderKLFlux2); single weights files
load through the per-type loaders of :mod:`latentize.encoders.files`."""

from latentize.encoders import checkpoints as _checkpoints  # noqa: F401  (ldm/taming single files)
from latentize.encoders.base import ENCODERS, EncodeResult, EncoderSpec, TorchEncoder, stable_seed
from latentize.encoders.dc import DCEncoder
from latentize.encoders.flux2 import Flux2Encoder
from latentize.encoders.kl import KLEncoder
from latentize.encoders.taesd import TinyEncoder
from latentize.encoders.vq import VQEncoder

__all__ = [
    "ENCODERS",
    "DCEncoder",
    "EncodeResult",
    "EncoderSpec",
    "Flux2Encoder",
    "KLEncoder",
    "TinyEncoder",
    "TorchEncoder",
    "VQEncoder",
    "stable_seed",
]
