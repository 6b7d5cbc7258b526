"""The sizes a run writes: one per resolution, fixed or chosen among aspect-ratio buckets.

Aspect-ratio bucketing (NovelAI's, kohya's, SDXL's training recipe) replaces one square crop by
the bucket whose aspect ratio is nearest the image's own, so that landscape and portrait photos
keep their sides. Every bucket is a size ``(width, height)`` whose sides are multiples of the
encoder's downsampling factor; each becomes its own data folder (``WxH``), a fixed-shape dataset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from latentize.config import BucketGenerator, PreprocessConfig
from latentize.errors import ConfigError

__all__ = ["Targets", "generate_buckets", "nearest_bucket", "resolve_targets"]

Size = tuple[int, int]


def generate_buckets(spec: BucketGenerator) -> list[Size]:
    """Every ``(w, h)``, multiples of ``spec.step``, with ``w·h <= spec.area``, each as large as
    the area allows: for every width the largest height, and the transposes (kohya-ss
    sd-scripts' ``make_bucket_resolutions``), within ``min_ratio <= w/h <= max_ratio``.

    Returns:
        The buckets sorted by aspect ratio ``w/h`` (tallest first).
    """
    step = spec.step
    found: set[Size] = set()
    width = step
    while width * step <= spec.area:
        height = spec.area // width // step * step
        for bucket in ((width, height), (height, width)):
            if spec.min_ratio <= bucket[0] / bucket[1] <= spec.max_ratio:
                found.add(bucket)
        width += step
    return sorted(found, key=lambda b: (b[0] / b[1], b[0]))


def nearest_bucket(source: Size, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is nearest ``source``'s in log space; ties: the larger.

    Args:
        source: ``(width, height)`` of the image after EXIF orientation.
    """
    ratio = math.log(source[0] / source[1])
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 12), -b[0] * b[1]))


@dataclass(frozen=True)
class Targets:
    """Per resolution, the candidate sizes of a crop: one (a fixed size) or a bucket list.

    Picklable; built once on the driver by :func:`resolve_targets` and shipped to the tasks.
    """

    per_resolution: tuple[tuple[Size, ...], ...]

    @property
    def fixed(self) -> bool:
        """One resolution, one size: every crop has the same shape."""
        return len(self.per_resolution) == 1 and len(self.per_resolution[0]) == 1

    @property
    def sizes(self) -> list[Size]:
        """Every size the run may write, in resolution then ratio order (no repeats)."""
        return list(dict.fromkeys(size for sizes in self.per_resolution for size in sizes))

    def for_source(self, source: Size) -> list[Size]:
        """The size of each resolution for an image of ``source`` ``(width, height)``."""
        return [sizes[0] if len(sizes) == 1 else nearest_bucket(source, sizes) for sizes in self.per_resolution]


def _scaled(buckets: list[Size], resolution: Size, factor: int) -> list[Size]:
    """A listed bucket set at another resolution: scaled by ``sqrt(area(resolution) / area of
    the list's largest bucket)``, each side rounded to a multiple of ``factor``."""
    largest = max(w * h for w, h in buckets)
    scale = math.sqrt(resolution[0] * resolution[1] / largest)
    out = [
        (max(factor, round(w * scale / factor) * factor), max(factor, round(h * scale / factor) * factor))
        for w, h in buckets
    ]
    return list(dict.fromkeys(out))


def resolve_targets(config: PreprocessConfig, factor: int) -> Targets:
    """The run's sizes, checked against the encoder's downsampling ``factor``.

    Without buckets every resolution is a fixed size. With buckets and one resolution (or
    none), the buckets are used as given (a list) or generated (``{area, ...}``). With buckets
    and ``resolutions``, each resolution ``r`` gets its own set: a generator is run with the
    area of ``r`` (step and ratio bounds kept); a list is scaled so that its largest bucket
    has the area of ``r``, sides rounded to multiples of ``factor``.

    Raises:
        ConfigError: a size whose sides are not multiples of ``factor`` (naming it), or a
            generator that yields no bucket.
    """
    several = config.resolutions is not None
    per_resolution: list[list[Size]] = []
    for target in config.targets if (several or config.buckets is None) else [None]:
        if config.buckets is None:
            assert target is not None
            sizes = [target]
        elif isinstance(config.buckets, BucketGenerator):
            spec = config.buckets
            if target is not None:
                spec = BucketGenerator(target[0] * target[1], spec.step, spec.min_ratio, spec.max_ratio)
            sizes = generate_buckets(spec)
            if not sizes:
                raise ConfigError(f"preprocess.buckets: {spec} yields no bucket; widen the ratio bounds")
        else:
            listed = [(int(w), int(h)) for w, h in config.buckets]
            sizes = _scaled(listed, target, factor) if target is not None else listed
        per_resolution.append(sizes)
    for sizes in per_resolution:
        for w, h in sizes:
            if w % factor or h % factor:
                key = "preprocess.buckets" if config.buckets is not None else "preprocess.resolution"
                raise ConfigError(
                    f"{key}: [{w}, {h}] is not a multiple of the model's downsampling factor {factor} in both sides"
                )
    return Targets(tuple(tuple(sizes) for sizes in per_resolution))
