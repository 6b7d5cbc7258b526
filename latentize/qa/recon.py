"""Reconstruction QA: decode stored latents, fetch the same keys' sources, score the pair.

The QA report decodes a seeded sample of *stored* rows with the model's own decoder (after
undoing the normalisation the manifest says was applied), preprocesses the source images of
the same keys exactly as encoding did, and scores the two with PSNR, SSIM and, when the
``lpips`` package and its weights are available, LPIPS.

Each encoder type's decoder lives beside its encoder (``ENCODERS.get(type).decoder``, e.g.
:meth:`latentize.encoders.kl.KLEncoder.decoder`): it loads the model and undoes the stored
normalisation (:mod:`latentize.encoders.normalize`); this module batches its decode steps,
fetches the sources and scores the pairs.

Decoding runs in float32 under ``torch.inference_mode``, ``batch_size`` rows at a time.

Outputs of several data folders (aspect-ratio buckets, several resolutions) are sampled by data
row ``(key, folder)``: each source is preprocessed once to every size its run cropped it to, and
each folder's rows are decoded together at that folder's shape and scored against the crop of
their own resolution, with scores per folder as well as in total.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
import torch

from latentize.config import Config, InputConfig, PreprocessConfig, config_from_dict
from latentize.encoders.decoding import DecodeFn
from latentize.errors import LatentizeError, SampleError
from latentize.preprocess.buckets import Targets
from latentize.qa.values import sample_label
from latentize.sinks.contract import Manifest

__all__ = [
    "Decoder",
    "Outcome",
    "Reconstruction",
    "TorchDecoder",
    "fetch_crops",
    "fetch_sources",
    "load_decoder",
    "lpips_distance",
    "psnr",
    "reconstruct",
    "ssim",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


# --- the decoder interface --------------------------------------------------------------------


class Decoder(Protocol):
    """Turns stored latent columns back into images."""

    #: What decodes, e.g. ``"AutoencoderKL decoder of stabilityai/sd-vae-ft-mse"``.
    description: str

    def decode(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """Decodes N stored rows.

        Args:
            arrays: the stored columns of N rows as read from the output, e.g.
                ``{"latent": (N, C, h, w) float16}``, ``{"mean": ..., "logvar": ...}`` for
                moments, ``{"indices": (N, h, w) uint8/int16/int32}`` for VQ. Extra columns
                are ignored.

        Returns:
            (N, H, W, 3) float32 images in [0, 1].
        """
        ...


class TorchDecoder:
    """A loaded decoder model plus its type's decode step; implements :class:`Decoder`.

    Args:
        model: the decoder-carrying module (float32).
        step: the type's :data:`DecodeFn`.
        description: what decodes, for the report.
        device: where to run.
        batch_size: rows per forward pass (bounds memory).
    """

    def __init__(
        self, *, model: torch.nn.Module, step: DecodeFn, description: str, device: torch.device, batch_size: int
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        self.model = model.to(device=device, dtype=torch.float32).eval()
        self.step = step
        self.description = description
        self.device = device
        self.batch_size = batch_size

    def _tensor(self, value: np.ndarray) -> torch.Tensor:
        array = np.asarray(value)
        # Stored floats are float16/float32 (computed in float32 here); indices become int64,
        # the dtype embedding lookups take.
        dtype = torch.float32 if np.issubdtype(array.dtype, np.floating) else torch.int64
        return torch.as_tensor(np.ascontiguousarray(array)).to(self.device, dtype=dtype)

    @torch.inference_mode()
    def decode(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """See :meth:`Decoder.decode`: (N, H, W, 3) float32 images in [0, 1]."""
        # Only numeric columns can be latents; keys or captions passed along are left alone.
        numeric = {k: np.asarray(v) for k, v in arrays.items() if np.asarray(v).dtype.kind in "biuf"}
        lengths = {len(v) for v in numeric.values()}
        if len(lengths) != 1:
            raise ValueError(
                f"expected numeric columns of one length, got { ({k: v.shape for k, v in numeric.items()}) }"
            )
        (n,) = lengths
        outputs: list[np.ndarray] = []
        for start in range(0, n, self.batch_size):
            chunk = {k: self._tensor(v[start : start + self.batch_size]) for k, v in numeric.items()}
            images = self.step(self.model, chunk).float().clamp(0, 1)
            outputs.append(images.permute(0, 2, 3, 1).cpu().numpy())
        if not outputs:
            return np.zeros((0, 0, 0, 3), dtype=np.float32)
        return np.concatenate(outputs).astype(np.float32, copy=False)


def load_decoder(
    manifest: Manifest | Mapping[str, Any],
    *,
    decoder: str | None = None,
    device: str | None = None,
    batch_size: int = 8,
) -> Decoder:
    """The decoder of the run described by ``manifest``.

    Args:
        manifest: ``OUT/_manifest.json`` (or its parsed JSON): ``config`` (the resolved config)
            and ``encoder`` (type, constants, identity, columns).
        decoder: where the decoder weights are when not beside the encoder's: a diffusers
            folder or hub id (kl, vq, dc, flux2, tiny) or a single file (an ldm/taming
            checkpoint for kl/vq, a TAESD ``*_decoder.pth`` for tiny).
        device: ``cuda``, ``cpu`` or None (CUDA when present).
        batch_size: rows per forward pass.

    Raises:
        LatentizeError: no decoder can be found or loaded (the message says how to fix it).
    """
    from latentize.encoders import ENCODERS
    from latentize.encoders.base import pick_device

    if not isinstance(manifest, Manifest):
        manifest = Manifest.from_json(manifest)
    for name, value in (("encoder", manifest.encoder), ("config", manifest.config)):
        if not value:
            raise LatentizeError(f"the manifest lacks {name!r}; is this a latentize output root?")
    encoder = manifest.encoder
    config = config_from_dict(manifest.config)
    model, step, description = ENCODERS.get(str(encoder["type"])).decoder(
        encoder=encoder, config=config, override=decoder
    )
    result = TorchDecoder(
        model=model, step=step, description=description, device=pick_device(device), batch_size=batch_size
    )
    logger.info("reconstructions with the %s on %s", description, result.device)
    return result


# --- metrics ----------------------------------------------------------------------------------


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected two (N, H, W, 3) arrays of one shape, got {a.shape} and {b.shape}")
    return a, b


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Peak signal-to-noise ratio per image.

    Args:
        a, b: (N, H, W, 3) float images in [0, 1].

    Returns:
        (N,) float64 dB, ``10 log10(1 / MSE)``; ``inf`` where the images are identical.
    """
    a, b = _pair(a, b)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return np.where(mse > 0, 10.0 * np.log10(1.0 / np.maximum(mse, np.finfo(np.float64).tiny)), np.inf)


#: SSIM's Gaussian window (Wang et al. 2004): sigma 1.5 truncated at 3.5 sigma -> 11 taps.
_SSIM_SIGMA = 1.5
_SSIM_RADIUS = int(3.5 * _SSIM_SIGMA + 0.5)
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03


def _gaussian_taps() -> torch.Tensor:
    x = torch.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (x / _SSIM_SIGMA) ** 2)
    return taps / taps.sum()


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Structural similarity per image: mean over channels of each channel's mean SSIM.

    Gaussian-weighted statistics (sigma 1.5, 11×11 window), population covariances, K1 0.01,
    K2 0.03, data range 1: the values of ``skimage.metrics.structural_similarity(...,
    channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1.0)``. skimage filters with reflected borders and then drops the 5-pixel
    strip the padding touched, so only windows wholly inside the image count: exactly a
    "valid" convolution, which is what this computes.

    Args:
        a, b: (N, H, W, 3) float images in [0, 1], H and W at least 11.

    Returns:
        (N,) float64 in [-1, 1]; 1 for identical images.
    """
    a, b = _pair(a, b)
    size = 2 * _SSIM_RADIUS + 1
    if min(a.shape[1:3]) < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size} pixels, got {a.shape[2]}x{a.shape[1]}")
    taps = _gaussian_taps()
    rows, cols = taps.view(1, 1, -1, 1), taps.view(1, 1, 1, -1)
    c1 = _SSIM_K1**2
    c2 = _SSIM_K2**2
    out = np.empty(len(a), dtype=np.float64)
    # One image at a time: the five float64 statistic maps of a large batch would not fit.
    for i in range(len(a)):
        x = torch.from_numpy(a[i]).permute(2, 0, 1).unsqueeze(1)  # (3, 1, H, W)
        y = torch.from_numpy(b[i]).permute(2, 0, 1).unsqueeze(1)
        stack = torch.cat([x, y, x * x, y * y, x * y])  # (15, 1, H, W)
        filtered = torch.nn.functional.conv2d(torch.nn.functional.conv2d(stack, rows), cols)
        ux, uy, uxx, uyy, uxy = filtered.split(3)
        vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
        out[i] = float(s.flatten(1).mean(dim=1).mean())
    return out


_LPIPS: dict[str, Any] = {}


def _lpips_model() -> Any:
    """The LPIPS (AlexNet) model, or None when it cannot be had; tried once per process."""
    if "model" not in _LPIPS:
        model = None
        try:
            import lpips

            model = lpips.LPIPS(net="alex", verbose=False).eval()
        except Exception as exc:  # noqa: BLE001 - any failure (missing package, no weights) means "no LPIPS"
            logger.info("LPIPS is not reported: %s: %s", type(exc).__name__, exc)
        _LPIPS["model"] = model
    return _LPIPS["model"]


def lpips_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """LPIPS (AlexNet) distance per image, or None when ``lpips`` or its weights are unavailable.

    Args:
        a, b: (N, H, W, 3) float images in [0, 1].

    Returns:
        (N,) float64 (0 for identical images, larger is more different) or None.
    """
    a, b = _pair(a, b)
    model = _lpips_model()
    if model is None:
        return None
    out = []
    with torch.inference_mode():
        for start in range(0, len(a), 8):
            x = torch.from_numpy(a[start : start + 8]).permute(0, 3, 1, 2).float()
            y = torch.from_numpy(b[start : start + 8]).permute(0, 3, 1, 2).float()
            out.append(model(x, y, normalize=True).flatten().double().numpy())  # normalize: [0, 1] in
    return np.concatenate(out) if out else np.zeros(0)


# --- sources ----------------------------------------------------------------------------------


def fetch_sources(
    *,
    shards: dict[str, str],
    wanted: dict[str, list[str]],
    fmt: str,
    input_config: InputConfig,
    preprocess_config: PreprocessConfig,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The pixels the encoder saw for some keys, re-read from the input shards.

    Each shard with wanted keys is streamed once with
    :func:`~latentize.sources.datasource.read_shard` and reading stops as soon as all its
    wanted keys are found; each found image is preprocessed with
    :func:`~latentize.preprocess.preprocess_sample` and ``preprocess_config``.

    Args:
        shards: shard id -> input URL.
        wanted: shard id -> keys to fetch from it.
        fmt: the input format (``webdataset`` or ``parquet``).
        input_config: the run's input section (fields, storage options).
        preprocess_config: the run's preprocess section.

    Returns:
        ``(pixels, missing)``: key -> (H, W, 3) uint8 pixels (0..255) exactly as encoded, and
        key -> why it could not be fetched or decoded.

    Raises:
        LatentizeError: a run-level problem (e.g. an unknown format or crop mode).
    """
    from latentize.preprocess import preprocess_sample

    def pixels(data: bytes, key: str) -> np.ndarray:
        return preprocess_sample(data, key=key, config=preprocess_config).pixels

    return _read_wanted(shards=shards, wanted=wanted, fmt=fmt, input_config=input_config, convert=pixels)


def fetch_crops(
    *,
    shards: dict[str, str],
    wanted: dict[str, list[str]],
    fmt: str,
    input_config: InputConfig,
    preprocess_config: PreprocessConfig,
    targets: Targets,
) -> tuple[dict[str, list[np.ndarray]], dict[str, str]]:
    """:func:`fetch_sources` for runs of several sizes: each image is decoded once and cropped
    to the size of each resolution (``targets.for_source``, aspect-ratio buckets included),
    as :func:`~latentize.preprocess.preprocess_sizes` did when encoding.

    Returns:
        ``(crops, missing)``: key -> one (H, W, 3) uint8 array per resolution slot, and key ->
        why it could not be fetched or decoded.
    """
    from latentize.preprocess import preprocess_sizes

    def crops(data: bytes, key: str) -> list[np.ndarray]:
        out = preprocess_sizes(data, key=key, config=preprocess_config, sizes_of=targets.for_source)
        return [c.pixels for c in out]

    return _read_wanted(shards=shards, wanted=wanted, fmt=fmt, input_config=input_config, convert=crops)


def _read_wanted(
    *,
    shards: dict[str, str],
    wanted: dict[str, list[str]],
    fmt: str,
    input_config: InputConfig,
    convert: Callable[[bytes, str], _T],
) -> tuple[dict[str, _T], dict[str, str]]:
    """Streams each shard with wanted keys until they are all found; ``convert(bytes, key)``
    preprocesses each found image (a :class:`SampleError` makes the key missing)."""
    from latentize.sources.datasource import read_shard

    found: dict[str, _T] = {}
    missing: dict[str, str] = {}
    for shard, keys in wanted.items():
        remaining = {str(k) for k in keys}
        if not remaining:
            continue
        url = shards.get(shard)
        if url is None:
            for key in remaining:
                missing[key] = f"shard {shard!r} is not among the run's input shards"
            continue
        shard_error = None
        blocks = read_shard(url=url, shard=shard, fmt=fmt, config=input_config)
        # A generator (annotated as an Iterator): closing it stops reading the shard.
        assert isinstance(blocks, Generator)
        with contextlib.closing(blocks):
            for table in blocks:
                row_keys = table.column("key").to_pylist()
                for i, key in enumerate(row_keys):
                    if key is None:  # the end-of-shard sentinel
                        shard_error = table.column("error")[i].as_py()
                        continue
                    if key not in remaining:
                        continue
                    remaining.discard(key)
                    error = table.column("error")[i].as_py()
                    image = table.column("image")[i].as_py()
                    if error is not None:
                        missing[key] = f"read: {error}"
                    elif image is None:
                        missing[key] = "read: the sample has no image"
                    else:
                        try:
                            found[key] = convert(image, key)
                        except SampleError as exc:
                            missing[key] = f"{exc.stage}: {exc.message}"
                if not remaining:
                    break  # closing the generator closes the shard: no need to read on
        for key in remaining:
            tail = f" (reading stopped: {shard_error})" if shard_error else ""
            missing[key] = f"key not found in shard {shard} ({url}){tail}"
    logger.info("fetched %d source image(s); %d could not be fetched", len(found), len(missing))
    return found, missing


# --- the QA sample: fetch, decode, score -------------------------------------------------------

#: Why a reconstruction has scores or not: ``not_run`` (no sample asked for, or no data row),
#: ``no_decoder`` (none could be loaded), ``no_sources`` (no source image of the sample could be
#: fetched) or ``scored``.
Outcome = Literal["not_run", "no_decoder", "no_sources", "scored"]


@dataclass(frozen=True)
class Reconstruction:
    """The reconstruction step's result.

    Attributes:
        section: the report's ``reconstruction`` section: ``sample`` (rows scored), ``seed``,
            ``decoder``, ``metrics`` (mean/median/min/max of ``psnr``, ``ssim``, ``lpips``),
            ``samples`` (key, shard and metrics per row, worst PSNR first), ``failed`` (key ->
            why its source could not be fetched) and ``skipped`` (why nothing was scored).
        images: key -> (original, decoded) (H, W, 3) uint8 images for the report's grid.
        outcome: see :data:`Outcome`.
    """

    section: dict[str, Any]
    images: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    outcome: Outcome = "scored"


def reconstruct(
    manifest: Manifest,
    inputs: Sequence[tuple[str, str]],
    sample: Sequence[tuple[str, str, str]],
    stored: Mapping[tuple[str, str], Mapping[str, np.ndarray]],
    *,
    requested: int,
    seed: int,
    decoder: str | None = None,
    device: str | None = None,
    input_storage_options: Mapping[str, Any] | None = None,
    by_folder: bool = False,
) -> Reconstruction:
    """Decodes the QA sample's stored latents and scores them against their source images.

    The sources are re-read from the input shards (one Ray task per shard) and preprocessed as
    encoding did; each data folder's rows are decoded together (one shape per folder) and
    scored with PSNR, SSIM and, when available, LPIPS.

    Args:
        manifest: ``_manifest.json`` (``encoder``, ``config``, ``preprocess``, ``output.folders``).
        inputs: the run's ``(url, shard)`` list.
        sample: ``(key, folder, shard)`` of the sampled rows, in sample order; each
            ``(key, folder)`` is in ``stored``.
        stored: ``(key, folder)`` -> stored column name -> that row's stored array (as written).
        requested: the sample size asked for (0 or less: not run).
        seed: the sample's seed, for the report.
        decoder: where the decoder weights are, when not beside the encoder's.
        device: torch device of the decoder (None: CUDA when present).
        input_storage_options: fsspec options of the input shards, over the manifest's.
        by_folder: the output has several data folders: samples name their folder, the
            section has scores per folder (``folders``) and images are keyed by
            :func:`~latentize.qa.values.sample_label`.

    Returns:
        The section, the image pairs and the outcome; a missing decoder or unreachable sources
        are outcomes, not exceptions.
    """
    section: dict[str, Any] = {
        "sample": 0,
        "seed": seed,
        "decoder": None,
        "metrics": None,
        "samples": [],
        "failed": {},
        "skipped": None,
    }
    if requested <= 0 or not sample:
        section["skipped"] = "--sample 0" if requested <= 0 else "no data rows"
        return Reconstruction(section, outcome="not_run")
    try:
        model = load_decoder(manifest, decoder=decoder, device=device)
    except LatentizeError as exc:
        section["skipped"] = str(exc)
        return Reconstruction(section, outcome="no_decoder")
    section["decoder"] = model.description
    logger.info("qa: reconstruction of %d sampled latents (%s)", len(sample), model.description)
    pixels, failed = _fetch_sample(manifest, inputs, sample, input_storage_options or {}, by_folder=by_folder)
    section["failed"] = dict(failed)
    rows = [(k, f, s) for k, f, s in sample if (k, f) in pixels]
    if not rows:
        section["skipped"] = "no source image of the sample could be fetched"
        return Reconstruction(section, outcome="no_sources")
    scored: list[_Scored] = []
    images: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for folder in dict.fromkeys(f for _, f, _ in rows):
        mine = [(k, s) for k, f, s in rows if f == folder]
        keys = [k for k, _ in mine]
        columns = list(stored[(keys[0], folder)])
        decoded = model.decode({c: np.stack([stored[(k, folder)][c] for k in keys]) for c in columns})
        originals = np.stack([pixels[(k, folder)] for k in keys]).astype(np.float32) / 255.0
        scored.append(_Scored(folder, mine, *_metric_values(decoded, originals)))
        for i, k in enumerate(keys):
            label = sample_label(k, folder) if by_folder else k
            images[label] = (pixels[(k, folder)], np.clip(np.rint(decoded[i] * 255.0), 0, 255).astype(np.uint8))
    section.update(_scores(scored, by_folder=by_folder))
    return Reconstruction(section, images)


@dataclass(frozen=True)
class _Scored:
    """One data folder's decoded rows: ``(key, shard)`` and (N,) float64 metrics each."""

    folder: str
    rows: list[tuple[str, str]]
    psnr: np.ndarray
    ssim: np.ndarray
    lpips: np.ndarray | None


def _metric_values(decoded: np.ndarray, originals: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """PSNR, SSIM and LPIPS (None when unavailable) of decodes against originals, both
    (N, H, W, 3) float32 in [0, 1]."""
    return psnr(decoded, originals), ssim(decoded, originals), lpips_distance(decoded, originals)


def _metrics(groups: Sequence[_Scored]) -> dict[str, Any]:
    lpips = [g.lpips for g in groups if g.lpips is not None]
    lpips_values = np.concatenate(lpips) if len(lpips) == len(groups) else None
    return {
        "psnr": _summary(np.concatenate([g.psnr for g in groups])),
        "ssim": _summary(np.concatenate([g.ssim for g in groups])),
        "lpips": _summary(lpips_values),
    }


def _scores(groups: list[_Scored], *, by_folder: bool) -> dict[str, Any]:
    """``sample``, ``metrics`` and ``samples`` (worst PSNR first) of the scored folders; with
    ``by_folder`` each sample names its folder and ``folders`` holds each folder's figures."""
    samples = []
    for g in groups:
        for i, (key, shard) in enumerate(g.rows):
            sample: dict[str, Any] = {"key": key, "shard": shard}
            if by_folder:
                sample["folder"] = g.folder
            sample.update(
                psnr=float(g.psnr[i]), ssim=float(g.ssim[i]), lpips=None if g.lpips is None else float(g.lpips[i])
            )
            samples.append(sample)
    # Worst first; identical images (infinite PSNR) last. json_ready writes inf as null.
    samples.sort(key=lambda s: (s["psnr"], s["key"], s.get("folder") or ""))
    out: dict[str, Any] = {"sample": len(samples), "metrics": _metrics(groups), "samples": samples}
    if by_folder:
        out["folders"] = {
            g.folder: {"sample": len(g.rows), "metrics": _metrics([g])} for g in sorted(groups, key=lambda g: g.folder)
        }
    return out


def _summary(values: np.ndarray | None) -> dict[str, float] | None:
    if values is None:
        return None
    finite = np.where(np.isfinite(values), values, 100.0)  # identical images: cap inf PSNR
    return {
        "mean": float(finite.mean()),
        "median": float(np.median(finite)),
        "min": float(finite.min()),
        "max": float(finite.max()),
    }


def _unredacted(options: Any) -> Any:
    """``options`` without the values :func:`latentize.config.redact` replaced."""
    if isinstance(options, dict):
        return {k: _unredacted(v) for k, v in options.items() if v != "***"}
    return options


def _fetch_sample(
    manifest: Manifest,
    inputs: Sequence[tuple[str, str]],
    sample: Sequence[tuple[str, str, str]],
    input_storage_options: Mapping[str, Any],
    *,
    by_folder: bool,
) -> tuple[dict[tuple[str, str], np.ndarray], dict[str, str]]:
    """:func:`fetch_crops` of the sample, one Ray task per shard: a random sample of a large
    dataset touches about as many shards as it has keys, each read only up to its keys.

    Returns:
        ``(pixels, failed)``: ``(key, folder)`` -> (H, W, 3) uint8, the crop of the folder's
        resolution; and why a row has none, by key (by :func:`sample_label` with ``by_folder``).
    """
    import ray

    from latentize.sources import infer_format

    cfg = config_from_dict(manifest.config)
    # The manifest's copy has its credentials redacted: keep its other settings (endpoint,
    # region), and let the caller's options fill in the rest.
    options = {**_unredacted(cfg.input.storage_options), **input_storage_options}
    input_cfg = dataclasses.replace(cfg.input, storage_options=options)
    fmt = cfg.input.format or infer_format([u for u, _ in inputs])
    urls = {shard: url for url, shard in inputs}
    wanted: dict[str, list[str]] = {}
    for key, _, shard in sample:
        keys = wanted.setdefault(shard, [])
        if key not in keys:
            keys.append(key)
    targets = _targets(manifest, cfg)
    fetch = ray.remote(num_cpus=1, max_retries=2)(_fetch_shard)
    refs = [
        fetch.remote(shard, urls.get(shard), keys, fmt, input_cfg, cfg.preprocess, targets)
        for shard, keys in wanted.items()
    ]
    crops: dict[str, list[np.ndarray]] = {}
    missing: dict[str, str] = {}
    for done, ref in enumerate(refs, 1):
        got, lost = ray.get(ref)
        crops.update(got)
        missing.update(lost)
        logger.info("qa: source images: %d of %d shard(s) read", done, len(refs))
    folders = manifest.output.folders
    pixels: dict[tuple[str, str], np.ndarray] = {}
    failed: dict[str, str] = {}
    for key, folder, _ in sample:
        label = sample_label(key, folder) if by_folder else key
        if key not in crops:
            failed[label] = missing.get(key, "not fetched")
            continue
        spec = folders.get(folder)
        crop = crops[key][spec.slot if spec else 0]
        size = spec.size if spec else None
        if size is not None and crop.shape[:2] != (size[1], size[0]):
            # The source's bucket at this resolution is another one: not what the run stored.
            failed[label] = f"the source now crops to {crop.shape[1]}x{crop.shape[0]}, not to its folder {folder}"
            continue
        pixels[(key, folder)] = crop
    return pixels, failed


def _targets(manifest: Manifest, config: Config) -> Targets:
    """The sizes the run cropped to, per resolution: the manifest's resolved buckets, else its
    resolutions, else (outputs written before these were recorded) the one fixed size."""
    per_resolution = manifest.sizes() or [[config.preprocess.size]]
    return Targets(tuple(tuple(sizes) for sizes in per_resolution))


def _fetch_shard(
    shard: str,
    url: str | None,
    keys: list[str],
    fmt: str,
    input_config: InputConfig,
    preprocess_config: PreprocessConfig,
    targets: Targets,
) -> tuple[dict[str, list[np.ndarray]], dict[str, str]]:
    """:func:`fetch_crops` of one shard, with positional arguments: Ray types remote functions
    by their positional parameters."""
    return fetch_crops(
        shards={} if url is None else {shard: url},
        wanted={shard: keys},
        fmt=fmt,
        input_config=input_config,
        preprocess_config=preprocess_config,
        targets=targets,
    )
