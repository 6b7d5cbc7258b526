"""Preprocess stage: encoded image bytes -> uint8 RGB pixels at the run's sizes.

:func:`preprocess_sizes` decodes one sample once and crops it to every size it is written at
(:func:`preprocess_sample`: to the one size of a fixed-size config); :func:`preprocess_row` is
the one place where a sample's failure becomes its error; :func:`preprocess_batch` is the Ray
Data batch function (``batch_format="numpy"``): one row per sample and resolution (a run of one
size is one resolution), always with its ``slot`` and data ``folder``, every bad sample an error
row instead of a failed task. ``latentize.preprocess.gpu`` does the same on a torch device
(nvJPEG) for runs of one size, falling back to :func:`preprocess_row` per sample.

Two CPU paths share one crop geometry (:func:`~latentize.preprocess.crop.crop_box`, computed
on the source size): the exact path (``preprocess.exact: true``) decodes every image at full
size; the default path decodes JPEGs at least twice the needed size in both sides at a reduced
DCT scale first (:data:`REDUCED_MIN_COVER`), several times faster on large sources.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from latentize.columns import join_notes, normalize_text, text_column, to_block
from latentize.config import PreprocessConfig
from latentize.errors import LatentizeError, SampleError
from latentize.preprocess.buckets import Targets, resolve_targets
from latentize.preprocess.crop import (
    CROPS,
    CropBox,
    Cropped,
    crop_box,
    crop_resized,
    resize_and_crop,
    upscaled_note,
)
from latentize.preprocess.decode import decode_image, decode_jpeg_reduced, to_rgb

#: Source ``(width, height)`` -> the sizes to crop it to.
SizesOf = Callable[[tuple[int, int]], list[tuple[int, int]]]

__all__ = [
    "CROPS",
    "REDUCED_MIN_COVER",
    "CropBox",
    "Cropped",
    "Targets",
    "as_bytes",
    "crop_box",
    "decode_image",
    "preprocess_batch",
    "preprocess_block",
    "preprocess_row",
    "preprocess_sample",
    "preprocess_sizes",
    "resize_and_crop",
    "resolve_targets",
    "to_rgb",
    "upscale_note",
]

logger = logging.getLogger(__name__)


# Several findings in one ``notes`` cell are joined like this (as the readers do).
def upscale_note(cropped: Cropped) -> str | None:
    """The ``notes`` finding for a preprocessed image: ``"upscaled from {w}x{h}"`` or None."""
    if not cropped.upscaled:
        return None
    return upscaled_note(cropped.width, cropped.height)


#: The default path decodes a JPEG at a reduced DCT scale only when the source is at least
#: twice the crop's resize size (the cover size) in both sides, and keeps the reduced image
#: at least this many times the cover size (Pillow reduces by 2, 4 or 8 only). Chosen by
#: measurement on LAION-like JPEGs at 256 px (``bench/decode.py --min-cover``): 1 gives about
#: 2x the exact path's speed on the mix and 3x on sources of 1 MP or more, at a PSNR against
#: the exact path of 40 dB median, 32 dB 10th percentile over the images it reduces; 2 reduces
#: far fewer images (only sources 4x the cover size), 48 / 38 dB, but gives only about 1.2x
#: and 1.7x.
REDUCED_MIN_COVER = 1


def _reduced_size(source: tuple[int, int], box: CropBox) -> tuple[int, int] | None:
    """The smallest reduced decode of ``source`` worth doing for ``box``; None: full size."""
    rw, rh = box.resize_to
    if source[0] < 2 * rw or source[1] < 2 * rh:
        return None
    return REDUCED_MIN_COVER * rw, REDUCED_MIN_COVER * rh


def _preprocess_reduced(data: bytes, *, key: str, config: PreprocessConfig, sizes_of: SizesOf) -> list[Cropped] | None:
    """The default path's reduced-scale JPEG decode; None where the exact path must run.

    One decode serves every size of the sample: it is reduced only as far as the largest
    crop allows.
    """

    def boxes(source: tuple[int, int]) -> list[tuple[CropBox, tuple[int, int]]]:
        return [
            (crop_box(source, size, crop=config.crop, key=key, seed=config.seed), size) for size in sizes_of(source)
        ]

    def min_size(source: tuple[int, int]) -> tuple[int, int] | None:
        largest = [box.resize_to for box, _ in boxes(source)]
        cover = CropBox((max(w for w, _ in largest), max(h for _, h in largest)), 0, 0)
        return _reduced_size(source, cover)

    decoded = decode_jpeg_reduced(data, max_pixels=config.max_pixels, min_size=min_size)
    if decoded is None:
        return None
    img, source = decoded
    try:
        return [crop_resized(img, box, source=source, size=size, window_only=True) for box, size in boxes(source)]
    except Exception as exc:
        logger.debug("reduced decode of %s unusable, decoding at full size: %s: %s", key, type(exc).__name__, exc)
        return None


def preprocess_sample(data: bytes, *, key: str, config: PreprocessConfig) -> Cropped:
    """Decodes, converts to RGB, resizes and crops one encoded image.

    Args:
        data: the encoded image file.
        key: the sample key (seeds the ``random`` crop).
        config: resolution, crop mode, seed, ``max_pixels`` and ``exact``.

    Returns:
        :class:`Cropped` with ``pixels`` (H, W, 3) uint8 at ``config.size``. With
        ``config.exact`` False, large JPEGs are decoded at a reduced DCT scale (see the module
        docstring); the geometry, the metadata and every error are the exact path's.

    Raises:
        SampleError: stage ``decode`` for unreadable data, ``preprocess`` for anything that
            fails afterwards.
        LatentizeError: a run-level problem, e.g. an unknown ``preprocess.crop`` (a bad
            config must stop the run, not turn every row into an error row).
    """
    size = config.size
    return preprocess_sizes(data, key=key, config=config, sizes_of=lambda _: [size])[0]


def preprocess_sizes(data: bytes, *, key: str, config: PreprocessConfig, sizes_of: SizesOf) -> list[Cropped]:
    """Decodes one encoded image once and crops it to every size ``sizes_of(source)`` names.

    Args:
        sizes_of: ``(width, height)`` of the upright source -> the target sizes (one per
            resolution; aspect-ratio buckets choose by the source's ratio).

    Returns:
        One :class:`Cropped` per size, in order (see :func:`preprocess_sample`).
    """
    if not config.exact and config.crop in CROPS:
        fast = _preprocess_reduced(data, key=key, config=config, sizes_of=sizes_of)
        if fast is not None:
            return fast
    img = decode_image(data, max_pixels=config.max_pixels)
    try:
        rgb = to_rgb(img)
        return [
            resize_and_crop(rgb, size=size, crop=config.crop, key=key, seed=config.seed) for size in sizes_of(rgb.size)
        ]
    except (SampleError, LatentizeError):
        raise
    except Exception as exc:
        raise SampleError("preprocess", f"{type(exc).__name__}: {exc}") from None


def as_bytes(value: Any) -> bytes:
    """Image cell -> bytes; readers may hand over bytes, bytearray, memoryview or uint8 arrays."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, np.ndarray):
        return value.tobytes()
    return bytes(value)


def preprocess_row(data: Any, *, key: str, config: PreprocessConfig, sizes_of: SizesOf) -> list[Cropped] | SampleError:
    """One sample's crops (:func:`preprocess_sizes`), or the :class:`SampleError` that becomes its
    error row: the one place where a sample's failure is caught (the batch function and the
    device decoder's CPU path both go through it).

    Args:
        data: the encoded image (anything :func:`as_bytes` takes), None when the sample has none.

    Raises:
        LatentizeError: a run-level problem (an unknown crop mode), never a sample's.
    """
    try:
        if data is None:
            raise SampleError("decode", "no image data in this sample (image is missing)")
        return preprocess_sizes(as_bytes(data), key=key, config=config, sizes_of=sizes_of)
    except SampleError as exc:
        logger.debug("sample %s failed in %s: %s", key, exc.stage, exc.message)
        return exc
    except LatentizeError:
        raise
    except Exception as exc:
        # A bug or an exotic failure in one sample must not take the batch down with it.
        logger.warning("sample %s: unexpected %s: %s", key, type(exc).__name__, exc)
        return SampleError("preprocess", f"{type(exc).__name__}: {exc}")


#: Geometry columns of a preprocessed row (-1 where the row holds no image).
_META = ("width", "height", "crop_top", "crop_left")

#: A row of the output: its source row, resolution slot (-1: none) and crop (None: none).
_Row = tuple[int, int, "Cropped | None"]


def preprocess_batch(
    batch: dict[str, np.ndarray], *, config: PreprocessConfig, targets: Targets | None = None
) -> dict[str, np.ndarray]:
    """Ray Data batch function: encoded images in, one row of pixels per sample and resolution out.

    Each sample is decoded once and cropped to the size each resolution gives it (``targets``:
    one size, or aspect-ratio buckets chosen by the source's ratio); a run of one size is one
    resolution of one size, so a sample is one row.

    Input columns (all length N): ``key`` (object, str), ``image`` (object, bytes or None),
    ``error``, ``stage`` and ``notes`` (object, str or None; ``notes`` may be absent, and an
    all-null column may arrive as float NaN), ``total`` (int64; ``>= 0`` marks an
    end-of-shard sentinel row, not an image), plus any other columns, passed through.
    The input arrays are never written to (Ray may hand over read-only zero-copy views).

    Args:
        targets: the run's sizes (:func:`~latentize.preprocess.buckets.resolve_targets`);
            None: the one fixed size of ``config``.

    Returns:
        The input columns (minus ``image``) in their order, repeated per output row, with
        ``error``/``stage``/``notes`` as new object arrays of str or None (``notes`` appended
        when it was absent), then ``pixels``, ``width``, ``height``, ``crop_top``,
        ``crop_left`` (int32, the upright source size and the crop offset; ``-1`` on rows
        without an image), ``slot`` (int32: the resolution's position in
        ``preprocess.resolutions``, 0 in a run of one; -1 on sentinel and error rows) and
        ``folder`` (the data folder ``WxH`` of the row's size, or None).
        ``pixels`` is (M, H, W, 3) uint8 when the run has one size (zeros where a row has no
        image): one dense array, the fast path Ray ships as a fixed-shape tensor; with several
        sizes an object array of (H, W, 3) uint8 arrays ((0, 0, 3) where a row has none), which
        Ray ships as variable-shaped tensors. Sentinel rows and rows already errored pass
        through as one row each; a sample that fails here stays one row, with ``error`` = the
        reason and ``stage`` = the failing stage. A row whose image had to be enlarged gets
        ``"upscaled from {w}x{h}"`` added to its ``notes`` (findings joined with ``"; "``).

    Raises:
        LatentizeError: only for run-level problems (unknown crop mode), never for a sample.
    """
    # Fail the whole task on a config typo up front rather than erroring every row.
    CROPS.get(config.crop)
    if targets is None:
        targets = Targets(((config.size,),))
    n = len(batch["key"])
    error = text_column(batch.get("error"), n)
    stage = text_column(batch.get("stage"), n)
    total = np.asarray(batch["total"]) if "total" in batch else np.full(n, -1, np.int64)
    keys, images = batch["key"], batch["image"]
    rows: list[_Row] = []
    failed = 0
    for i in range(n):
        if total[i] >= 0 or error[i] is not None:
            rows.append((i, -1, None))
            continue
        out = preprocess_row(images[i], key=str(keys[i]), config=config, sizes_of=targets.for_source)
        if isinstance(out, SampleError):
            error[i], stage[i] = out.message, out.stage
            rows.append((i, -1, None))
            failed += 1
            continue
        rows.extend((i, slot, cropped) for slot, cropped in enumerate(out))
    if failed:
        logger.debug("preprocess batch: %d of %d rows failed", failed, n)
    return normalize_text(_assemble(batch, rows, error, stage, targets))


def _assemble(
    batch: dict[str, np.ndarray], rows: list[_Row], error: np.ndarray, stage: np.ndarray, targets: Targets
) -> dict[str, Any]:
    """The output columns of :func:`preprocess_batch` from its rows (see there)."""
    from latentize.sinks.layout import data_folder

    n, m = len(batch["key"]), len(rows)
    notes = text_column(batch.get("notes"), n)
    if m == n:
        # One row per input row (a run of one resolution): the columns pass through as they are.
        result: dict[str, Any] = {name: col for name, col in batch.items() if name != "image"}
    else:
        src = np.array([r[0] for r in rows], dtype=np.int64)
        result = {name: np.asarray(col)[src] for name, col in batch.items() if name != "image"}
        error, stage, notes = error[src], stage[src], notes[src]
    result["error"], result["stage"], result["notes"] = error, stage, notes
    if targets.fixed:
        width, height = targets.sizes[0]
        pixels: np.ndarray = np.zeros((m, height, width, 3), dtype=np.uint8)
    else:
        pixels = np.empty(m, dtype=object)
        none = np.zeros((0, 0, 3), np.uint8)
        for j in range(m):
            pixels[j] = none
    meta = {name: np.full(m, -1, dtype=np.int32) for name in _META}
    folders = np.full(m, None, dtype=object)
    for j, (_, _, cropped) in enumerate(rows):
        if cropped is None:
            continue
        pixels[j] = cropped.pixels
        for name in _META:
            meta[name][j] = getattr(cropped, name)
        # The crop is at its target size: its folder is named after its shape.
        folders[j] = data_folder((cropped.pixels.shape[1], cropped.pixels.shape[0]))
        note = upscale_note(cropped)
        if note is not None:
            notes[j] = join_notes([notes[j], note])
    result["pixels"] = pixels
    result.update(meta)
    result["slot"] = np.array([r[1] for r in rows], dtype=np.int32)
    result["folder"] = folders
    return result


def preprocess_block(block: Any, *, config: PreprocessConfig, targets: Targets) -> Any:
    """Read-task transform: a Ray Data block (a ``pyarrow.Table``) of encoded samples -> a block
    of pixels, through :func:`preprocess_batch` (see there for the columns).

    It lives here, not beside the pipeline, so that a read worker unpickling it imports only
    the preprocess stage (Pillow, numpy), never torch or the encoders.
    """
    from ray.data.block import BlockAccessor

    batch = BlockAccessor.for_block(block).to_batch_format("numpy")
    # Fixed column types: a block of failed samples or end-of-shard rows only has null folders
    # and notes, which Ray would otherwise type as null (then float) in this block alone.
    return to_block(preprocess_batch(batch, config=config, targets=targets))
