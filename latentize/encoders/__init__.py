"""Encoders by ``encoder.type``: ``kl`` (AutoencoderKL latents) and ``vq`` (VQModel indices)."""

from latentize.encoders.base import ENCODERS, EncodeResult, EncoderSpec, TorchEncoder, stable_seed
from latentize.encoders.kl import KLEncoder
from latentize.encoders.vq import VQEncoder

__all__ = ["ENCODERS", "EncodeResult", "EncoderSpec", "KLEncoder", "TorchEncoder", "VQEncoder", "stable_seed"]
