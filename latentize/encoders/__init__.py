"""Encoders by ``encoder.type``: ``kl`` (AutoencoderKL), ``vq`` (VQModel indices), ``tiny``
(TAESD family), ``dc`` (AutoencoderDC), ``flux2`` (AutoencoderKLFlux2), ``wan`` / ``qwenimage``
(the Wan and Qwen-Image 3-D VAEs, one frame per image), ``hunyuanimage``
(AutoencoderKLHunyuanImage), and the transformers image tokenizers ``janus``, ``emu3`` and
``chameleon``; single weights files load through the per-type loaders of
:mod:`latentize.encoders.files`. Each type's module also holds its decoder (QA reconstructions)."""

from latentize.encoders import checkpoints as _checkpoints  # noqa: F401  (ldm/taming single files)
from latentize.encoders.base import ENCODERS, EncodeResult, EncoderSpec, TorchEncoder, stable_seed
from latentize.encoders.dc import DCEncoder
from latentize.encoders.flux2 import Flux2Encoder
from latentize.encoders.hunyuanimage import HunyuanImageEncoder
from latentize.encoders.kl import KLEncoder
from latentize.encoders.taesd import TinyEncoder
from latentize.encoders.tokenizers import ChameleonEncoder, Emu3Encoder, JanusEncoder
from latentize.encoders.vq import VQEncoder
from latentize.encoders.wan import QwenImageEncoder, WanEncoder

__all__ = [
    "ENCODERS",
    "ChameleonEncoder",
    "DCEncoder",
    "EncodeResult",
    "EncoderSpec",
    "Emu3Encoder",
    "Flux2Encoder",
    "HunyuanImageEncoder",
    "JanusEncoder",
    "KLEncoder",
    "QwenImageEncoder",
    "TinyEncoder",
    "TorchEncoder",
    "VQEncoder",
    "WanEncoder",
    "stable_seed",
]
