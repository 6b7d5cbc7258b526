"""Latent normalisation, forward and inverse, for every scheme the encoders use.

One place for what used to be written four times (the encoders' forward maps, the QA report's
raw statistics, its reconstructions and the training reader's draws). The functions take numpy
arrays or torch tensors alike and import neither torch nor any model library: the driver, the
QA checks and the training reader run them without torch, the encoders and decoders with it.

Per-channel constants broadcast over the channel axis, the third from last: ``(C, h, w)`` per
sample or ``(N, C, h, w)`` per batch.

Schemes (``form``), as the manifest's ``encoder.constants`` record them:

* ``shift_scale``: ``stored = (z - shift_factor) * scaling_factor`` (SD, SDXL, SD3, FLUX.1,
  HunyuanImage 2.1 with shift 0, the TAESD family with 1 and 0);
* ``latents_mean_std``: ``stored = (z - latents_mean) * scaling_factor / latents_std`` per
  channel (Playground v2.5; Qwen-Image and Wan with ``scaling_factor`` 1);
* ``scale``: ``stored = z * scaling_factor`` (DC-AE);
* batch-norm statistics (FLUX.2): ``stored = (z - running_mean) / sqrt(running_var + eps)``,
  whose statistics live in the checkpoint, not in the manifest: :func:`batch_norm_forward` and
  :func:`batch_norm_inverse` take them as arrays.

The inverse maps are ``z = stored * latents_std / scaling_factor + latents_mean``,
``z = stored / scaling_factor + shift_factor`` and ``z = stored / scaling_factor``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "FORMULAS",
    "Normalization",
    "batch_norm_forward",
    "batch_norm_inverse",
]

#: The manifest's ``formula`` text of each scheme.
FORMULAS: dict[str, str] = {
    "shift_scale": "(z - shift_factor) * scaling_factor",
    "latents_mean_std": "(z - latents_mean) * scaling_factor / latents_std",
    "scale": "z * scaling_factor",
    "batch_norm": "patchify(z), then (z - bn.running_mean) / sqrt(bn.running_var + batch_norm_eps)",
}

#: A numpy array or a torch tensor (any float dtype; torch is never imported here).
A = TypeVar("A")


def _channels(values: Sequence[float] | np.ndarray | Any, like: Any) -> Any:
    """Per-channel ``values`` shaped ``(C, 1, 1)`` to broadcast over ``like`` (numpy or torch),
    in ``like``'s float dtype and (for a tensor) on its device."""
    if isinstance(like, np.ndarray):
        return np.asarray(values, dtype=like.dtype if like.dtype.kind == "f" else np.float32)[:, None, None]
    # A torch tensor: new_tensor keeps its dtype and device without importing torch here.
    return like.new_tensor(np.asarray(values, dtype=np.float64)).view(-1, 1, 1)


def _sqrt(x: Any) -> Any:
    return np.sqrt(x) if isinstance(x, np.ndarray) else x.sqrt()


@dataclass(frozen=True)
class Normalization:
    """One affine normalisation: ``stored = forward(z)``, ``z = inverse(stored)``.

    Attributes:
        form: ``shift_scale``, ``latents_mean_std`` or ``scale`` (see the module docstring).
        scaling_factor: > 0.
        shift_factor: the ``shift_scale`` offset (0 for the other forms).
        latents_mean, latents_std: per-channel constants of ``latents_mean_std``, else None.
    """

    form: str
    scaling_factor: float
    shift_factor: float = 0.0
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    @classmethod
    def from_constants(cls, constants: Mapping[str, Any]) -> Normalization | None:
        """The scheme the manifest's (or a spec's) ``constants`` describe, or None when they carry
        no ``scaling_factor`` (VQ indices; FLUX.2, whose statistics are in the checkpoint).

        ``latents_mean`` and ``latents_std`` both present: ``latents_mean_std``; else a
        ``shift_factor`` key (even 0): ``shift_scale``; else ``scale``.
        """
        scaling = constants.get("scaling_factor")
        if scaling is None:
            return None
        mean, std = constants.get("latents_mean"), constants.get("latents_std")
        if mean is not None and std is not None:
            return cls(
                "latents_mean_std",
                float(scaling),
                latents_mean=tuple(float(v) for v in mean),
                latents_std=tuple(float(v) for v in std),
            )
        if "shift_factor" in constants:
            return cls("shift_scale", float(scaling), float(constants.get("shift_factor") or 0.0))
        return cls("scale", float(scaling))

    @property
    def formula(self) -> str:
        """The forward map as the manifest writes it."""
        return FORMULAS[self.form]

    @property
    def identity(self) -> bool:
        """True when the map changes nothing (raw latents: scale 1, no offset)."""
        return self.form != "latents_mean_std" and self.scaling_factor == 1.0 and self.shift_factor == 0.0

    def forward(self, z: A) -> A:
        """Raw latents ``z`` (..., C, h, w) float -> stored values, same type, dtype and device.

        The operations run in the order the formula is written (a per-channel subtraction, then
        the scale, then the division by ``latents_std``), so every encoder and reader gets the
        same bytes from the same raw latents.
        """
        x: Any = z
        if self.form == "latents_mean_std":
            assert self.latents_mean is not None and self.latents_std is not None
            out = (x - _channels(self.latents_mean, x)) * self.scaling_factor / _channels(self.latents_std, x)
        elif self.form == "shift_scale":
            out = (x - self.shift_factor) * self.scaling_factor
        else:
            out = x * self.scaling_factor
        return out

    def inverse(self, stored: A) -> A:
        """Stored values (..., C, h, w) float -> raw latents, same type, dtype and device."""
        s: Any = stored
        if self.form == "latents_mean_std":
            assert self.latents_mean is not None and self.latents_std is not None
            out = s * _channels(self.latents_std, s) / self.scaling_factor + _channels(self.latents_mean, s)
        elif self.form == "shift_scale":
            out = s / self.scaling_factor + self.shift_factor
        else:
            out = s / self.scaling_factor
        return out

    def raw_map(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """``(a, b)``, (C,) float64 each, with ``z = stored * a + b`` per channel: the inverse as
        an affine map of statistics (the QA report's raw means and standard deviations)."""
        if self.form == "latents_mean_std":
            assert self.latents_mean is not None and self.latents_std is not None
            return (
                np.asarray(self.latents_std, dtype=np.float64) / self.scaling_factor,
                np.asarray(self.latents_mean, dtype=np.float64),
            )
        return np.full(channels, 1.0 / self.scaling_factor), np.full(channels, float(self.shift_factor))

    def stored_map(self) -> tuple[Any, Any]:
        """``(offset, scale)`` with ``stored = (z - offset) * scale``: (C, 1, 1) float32 arrays for
        ``latents_mean_std`` (scale ``scaling_factor / latents_std``), float32 scalars otherwise."""
        if self.form == "latents_mean_std":
            assert self.latents_mean is not None and self.latents_std is not None
            offset = np.asarray(self.latents_mean, dtype=np.float32)[:, None, None]
            return offset, (self.scaling_factor / np.asarray(self.latents_std, dtype=np.float32))[:, None, None]
        return np.float32(self.shift_factor), np.float32(self.scaling_factor)


def batch_norm_forward(z: A, mean: Any, var: Any, eps: float) -> A:
    """FLUX.2's ``(z - running_mean) / sqrt(running_var + eps)`` per channel.

    Args:
        z: (..., C, h, w) float, already patchified (C = 4 × the VAE's latent channels).
        mean, var: the checkpoint's BatchNorm running statistics, (C,), same kind as ``z``.
        eps: ``batch_norm_eps`` of the model config.
    """
    x: Any = z
    std = _sqrt(var.reshape(-1, 1, 1) + eps)
    return (x - mean.reshape(-1, 1, 1)) / std


def batch_norm_inverse(stored: A, mean: Any, var: Any, eps: float) -> A:
    """The inverse of :func:`batch_norm_forward`: ``stored * sqrt(var + eps) + mean``."""
    s: Any = stored
    std = _sqrt(var.reshape(-1, 1, 1) + eps)
    return s * std + mean.reshape(-1, 1, 1)
