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

Beside the GPU table, :data:`CPU_COST` holds each zoo encoder's cost per image relative to the SD
VAE encoder's, measured side by side on a CPU (``bench/zoo.py``). ``latentize plan`` prints it so
that a run with an encoder no GPU figure exists for can be sized against the SD VAE; it never
derives GPU-hours from it (:class:`RelativeCost` says why).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from latentize.presets import PRESETS

__all__ = ["CPU_COST", "GPUS", "GPU_THROUGHPUT", "RelativeCost", "Throughput", "relative_cost_for", "throughput_for"]


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


@dataclass(frozen=True)
class RelativeCost:
    """An encoder's cost per image as a multiple of the SD VAE encoder's, measured side by side on
    one CPU (``bench/zoo.py``: released architecture, random weights, one batch each).

    This is not a GPU throughput and GPU-hours are never derived from it: the zoo encoders that
    were measured both ways cost other multiples of the SD VAE on the H200 than on the CPU
    (Qwen-Image's VAE 1.35x the SD VAE there, 1.86x here; DC-AE 0.78x there, 1.32x here:
    bench/RESULTS.md, "Model zoo encoders on the CPU"), and the H200's zoo ratios were taken eager
    in a memory layout latentize no longer runs the SD VAE in. ``latentize plan`` shows it beside
    the GPU-hours it cannot give, to size a run's cost against the SD VAE's.

    Attributes:
        ratio: seconds per image of the encoder ÷ the SD VAE encoder's, same pixels, same machine.
        flops_ratio: the same for their floating-point operations (``FlopCounterMode``): the
            noise-free figure beside the timed one.
        resolution: ``(width, height)`` of the measurement.
        source: where it is recorded (a section of bench/RESULTS.md).
    """

    ratio: float
    flops_ratio: float
    resolution: tuple[int, int]
    source: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_ZOO_CPU = "bench/RESULTS.md, Model zoo encoders on the CPU (dev machine, 256², float32)"

#: ``bench/zoo.py`` on the 2-core development machine (2026-12-04): the median of 5 pairs of timed
#: batches (2 images at 256², float32) of the encoder and the SD VAE back to back; FLOPs counted
#: at 256² (SD VAE: 270.6 GFLOP per image).
CPU_COST: dict[str, RelativeCost] = {
    name: RelativeCost(ratio, flops, (256, 256), _ZOO_CPU)
    for name, (ratio, flops) in {
        "qwen-image": (1.86, 1.61),
        "wan2.1": (1.84, 1.61),
        "wan2.2": (1.08, 1.12),
        "hunyuanimage-2.1": (1.28, 1.14),
        "janus": (0.75, 0.51),
        "emu3": (11.22, 12.98),
        "chameleon": (0.74, 0.51),
        "dc-ae-f32c32-sana": (1.32, 1.20),
        "taesd": (0.10, 0.11),
    }.items()
}


def relative_cost_for(preset: str | None) -> RelativeCost | None:
    """The CPU-measured cost of ``preset``'s encoder relative to the SD VAE's, or ``None``."""
    if preset is None:
        return None
    if preset in _SD_VAE_ARCHITECTURE:
        return RelativeCost(1.0, 1.0, (256, 256), "the SD VAE's own encoder architecture")
    return CPU_COST.get(preset)
