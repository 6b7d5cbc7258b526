"""Per-sample, per-epoch choices of the training reader: the posterior draw of ``moments``
outputs, the normalisation it needs, and the choice of a horizontally flipped twin.

Every random choice is a function of ``(seed, epoch, key)`` only, never of the rank, the worker,
the batch or the position in it, so that two readers of the same epoch agree on every sample.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from latentize.encoders.normalize import Normalization
from latentize.errors import LatentizeError

__all__ = ["draw_latents", "draw_seed", "flip_choice", "normalizer"]

_SEED_MASK = (1 << 63) - 1


def draw_seed(seed: int, epoch: int, key: str) -> int:
    """Seed of a sample's noise in one epoch: the first 8 bytes of
    ``sha256(f"draw\\0{seed}\\0{epoch}\\0{key}")``, little-endian, as a 63-bit integer."""
    digest = hashlib.sha256(f"draw\0{seed}\0{epoch}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & _SEED_MASK


def flip_choice(seed: int, epoch: int, key: str) -> bool:
    """Whether a sample is read from its flipped twin in one epoch: the lowest bit of the first
    byte of ``sha256(f"flip\\0{seed}\\0{epoch}\\0{key}")`` (probability 1/2 per sample and epoch)."""
    return bool(hashlib.sha256(f"flip\0{seed}\0{epoch}\0{key}".encode()).digest()[0] & 1)


def normalizer(constants: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(offset, scale)`` of the manifest's normalisation, per channel as (C, 1, 1) float32 arrays
    (or broadcastable scalars): ``z_stored = (z - offset) * scale``.

    ``latents_mean``/``latents_std`` present: offset ``latents_mean``, scale
    ``scaling_factor / latents_std``; otherwise offset ``shift_factor``, scale ``scaling_factor``.

    Raises:
        LatentizeError: the constants have no ``scaling_factor`` (FLUX.2 moments, whose
            normalisation lives in the checkpoint's BatchNorm statistics).
    """
    norm = Normalization.from_constants(constants)
    if norm is None:
        raise LatentizeError(
            "the manifest's encoder.constants have no scaling_factor, so the drawn latents cannot be "
            f"normalised ({constants.get('formula', 'no formula')}); read the raw moments with draw=False"
        )
    return norm.stored_map()


def draw_latents(
    mean: np.ndarray, logvar: np.ndarray, keys: list[str], *, seed: int, epoch: int, offset: Any, scale: Any
) -> np.ndarray:
    """``(mean + exp(logvar / 2) · ε - offset) · scale`` per sample, ε standard normal from
    ``np.random.default_rng(draw_seed(seed, epoch, key)).standard_normal(shape, dtype=float32)``.

    Args:
        mean, logvar: (B, C, h, w) raw posterior moments (any float dtype).
        keys: the B sample keys.
        offset, scale: from :func:`normalizer`.

    Returns:
        (B, C, h, w) float32 normalised latents.
    """
    shape = mean.shape[1:]
    eps = np.empty(mean.shape, dtype=np.float32)
    for i, key in enumerate(keys):
        eps[i] = np.random.default_rng(draw_seed(seed, epoch, key)).standard_normal(shape, dtype=np.float32)
    z = mean.astype(np.float32) + np.exp(0.5 * logvar.astype(np.float32)) * eps
    return ((z - offset) * scale).astype(np.float32, copy=False)
