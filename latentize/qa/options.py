"""The options of ``latentize qa`` (:class:`QAOptions`), in a module of their own: the CLI
builds its ``qa`` arguments from their defaults without importing the report's Ray passes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["QAOptions"]


@dataclass(frozen=True, kw_only=True)
class QAOptions:
    """What ``latentize qa`` checks, and against which tolerances.

    Attributes:
        sample: latents decoded for the reconstruction check (0: none).
        seed: seed of the reconstruction sample (the same seed picks the same keys).
        outlier_std: values farther than this many standard deviations from their channel's
            mean are outliers.
        scale_tolerance: allowed relative deviation of the normalised latents' std from 1.
        shift_tolerance: allowed |mean| of the normalised latents.
        min_psnr: the reconstruction check fails below this mean PSNR (dB).
        decoder: where the decoder weights are, when not beside the encoder's.
        report: folder (local or fsspec URL) for report.html / report.json; None: OUT/_qa.
        storage_options: fsspec options of the output root (and of ``report``).
        input_storage_options: fsspec options of the input shards (the manifest keeps none).
        device: torch device of the decoder (None: CUDA when present).
        strict: warnings fail the report too.
        ray_address: Ray cluster address (None: ``RAY_ADDRESS`` or a local Ray).
        dashboard: start Ray's dashboard with a local Ray; None: as the output's run did
            (its manifest's ``ray.dashboard``, false by default).
    """

    sample: int = 16
    seed: int = 0
    outlier_std: float = 6.0
    scale_tolerance: float = 0.35
    shift_tolerance: float = 0.5
    min_psnr: float = 18.0
    decoder: str | None = None
    report: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    input_storage_options: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    strict: bool = False
    ray_address: str | None = None
    dashboard: bool | None = None
