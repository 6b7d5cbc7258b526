"""Measured encoder throughput per preset and GPU, from which ``latentize plan`` estimates
GPU-hours.

Only figures a benchmark measured go here, each with where it was recorded; everything else is
``None`` and ``latentize plan`` then says it cannot estimate. Measured so far: one H200, with the
Stable Diffusion VAE's encoder architecture, which the ``kl`` presets below share layer for
layer (only the latent channels of the last convolution differ: 4 or 16, and the H200 ran both
at the same speed).

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

#: ``bench/gpu.py`` section (c) on an H200 (16 CPUs, 2026-12-04): the whole Ray pipeline over
#: 16,000 LAION-like JPEGs in 32 tar shards, the SD-VAE encoder compiled, decoded on the CPUs
#: (what ``auto`` picks there). The encoder actor's busy window includes its first call, so
#: this is a lower bound; the compiled encoder alone ran 1,324 img/s.
_H200_SD_VAE = Throughput(
    images_per_second=990.3,
    resolution=(256, 256),
    dtype="bfloat16",
    batch_size=128,
    source="bench/RESULTS.md, GPU run (H200): (c) compiled, CPU decode",
)

#: Presets whose encoder is the SD VAE's architecture (block widths 128-256-512-512, two layers
#: per block, mid-block attention).
_SD_VAE_ARCHITECTURE = ("sd15", "sd2", "sdxl", "sdxl-fp16-fix", "sd3", "flux1", "playground-v2.5")

#: Images per second per preset and GPU; ``None``: not measured (see the module docstring).
GPU_THROUGHPUT: dict[str, dict[str, Throughput | None]] = {name: dict.fromkeys(GPUS, None) for name in PRESETS.names()}
for _name in _SD_VAE_ARCHITECTURE:
    GPU_THROUGHPUT[_name]["H200"] = _H200_SD_VAE


def throughput_for(preset: str | None, gpu: str) -> Throughput | None:
    """The measured figure of ``preset`` on ``gpu``, or ``None`` when there is none."""
    if preset is None:
        return None
    return GPU_THROUGHPUT.get(preset, {}).get(gpu)
