"""Measured encoder throughput per preset and GPU, from which ``latentize plan`` estimates
GPU-hours.

Only figures a benchmark measured go here, each with where it was recorded; everything else is
``None`` and ``latentize plan`` then says it cannot estimate. No figure has been measured on a
GPU yet, so every entry is ``None``.

How an entry gets filled: on a machine with that GPU, run ``latentize encode`` with the preset
over LAION-like shards (``latentize.demo.laion_like_samples``, or real ones) large enough that
the run lasts minutes, at one resolution, with the default ``encoder.batch_size`` and
``encoder.dtype: auto``; its manifest's last ``runs`` entry holds ``samples`` and
``encoding_seconds`` (first encoder call to last part staged: the steady state, without the
pool's start-up and the commit tail), whose ratio is the images per second of one encoder actor
when ``ray.actors`` is 1. Record the figure with the machine, versions and date in
bench/RESULTS.md, then add it here as a :class:`Throughput` naming that section.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from latentize.presets import PRESETS

__all__ = ["GPUS", "GPU_THROUGHPUT", "Throughput", "throughput_for"]


@dataclass(frozen=True)
class Throughput:
    """One measured figure.

    Attributes:
        images_per_second: images encoded per second by one encoder actor on one GPU (decode
            included as the run did it), over a whole run.
        resolution: ``(width, height)`` of the crops it encoded.
        dtype: the compute dtype the run resolved (``bfloat16``...).
        batch_size: images per encoder call.
        source: where the measurement is recorded (a section of bench/RESULTS.md).
    """

    images_per_second: float
    resolution: tuple[int, int]
    dtype: str
    batch_size: int
    source: str

    @property
    def pixels_per_second(self) -> float:
        """Crop pixels encoded per second: how the figure carries to other sizes, as the cost of
        a convolutional encoder is, to first order, proportional to its pixels."""
        return self.images_per_second * self.resolution[0] * self.resolution[1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The GPUs the table has a column for.
GPUS: tuple[str, ...] = ("H100", "H200", "A100-80GB")

#: Images per second per preset and GPU; ``None``: not measured (see the module docstring).
GPU_THROUGHPUT: dict[str, dict[str, Throughput | None]] = {name: dict.fromkeys(GPUS, None) for name in PRESETS.names()}


def throughput_for(preset: str | None, gpu: str) -> Throughput | None:
    """The measured figure of ``preset`` on ``gpu``, or ``None`` when there is none."""
    if preset is None:
        return None
    return GPU_THROUGHPUT.get(preset, {}).get(gpu)
