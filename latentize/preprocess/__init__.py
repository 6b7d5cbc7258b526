"""Preprocess stage: encoded image bytes -> fixed-size uint8 RGB pixels.

:func:`preprocess_sample` handles one sample; :func:`preprocess_batch` is the Ray Data batch
function (``batch_format="numpy"``) that applies it row by row and turns every bad sample into
an error row instead of failing the task. ``latentize.preprocess.gpu`` does the same on a
torch device (nvJPEG), falling back to :func:`preprocess_sample` per sample.

Two CPU paths share one crop geometry (:func:`~latentize.preprocess.crop.crop_box`, computed
on the source size): the exact path (``preprocess.exact: true``) decodes every image at full
size; the default path decodes JPEGs at least twice the needed size in both sides at a reduced
DCT scale first (:data:`REDUCED_MIN_COVER`), several times faster on large sources.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from latentize.columns import join_notes, normalize_text, text_column
from latentize.config import PreprocessConfig
from latentize.errors import LatentizeError, SampleError
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

__all__ = [
    "CROPS",
    "REDUCED_MIN_COVER",
    "CropBox",
    "Cropped",
    "as_bytes",
    "crop_box",
    "decode_image",
    "preprocess_batch",
    "preprocess_sample",
    "resize_and_crop",
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


def _preprocess_reduced(data: bytes, *, key: str, config: PreprocessConfig) -> Cropped | None:
    """The default path's reduced-scale JPEG decode; None where the exact path must run."""

    def box_of(source: tuple[int, int]) -> CropBox:
        return crop_box(source, config.size, crop=config.crop, key=key, seed=config.seed)

    decoded = decode_jpeg_reduced(
        data,
        max_pixels=config.max_pixels,
        min_size=lambda source: _reduced_size(source, box_of(source)),
    )
    if decoded is None:
        return None
    img, source = decoded
    try:
        return crop_resized(img, box_of(source), source=source, size=config.size, window_only=True)
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
    if not config.exact and config.crop in CROPS:
        fast = _preprocess_reduced(data, key=key, config=config)
        if fast is not None:
            return fast
    img = decode_image(data, max_pixels=config.max_pixels)
    try:
        rgb = to_rgb(img)
        return resize_and_crop(rgb, size=config.size, crop=config.crop, key=key, seed=config.seed)
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


def preprocess_batch(batch: dict[str, np.ndarray], *, config: PreprocessConfig) -> dict[str, np.ndarray]:
    """Ray Data batch function: encoded images in, fixed-size pixels out, one row per row.

    Input columns (all length N): ``key`` (object, str), ``image`` (object, bytes or None),
    ``error``, ``stage`` and ``notes`` (object, str or None; ``notes`` may be absent, and an
    all-null column may arrive as float NaN), ``total`` (int64; ``>= 0`` marks an
    end-of-shard sentinel row, not an image), plus any other columns, passed through.
    The input arrays are never written to (Ray may hand over read-only zero-copy views).

    Returns:
        The same columns in the same order minus ``image``, with ``error``/``stage``/``notes``
        as new (N,) object arrays of str or None (``notes`` appended when it was absent),
        plus ``pixels`` (N, H, W, 3) uint8 (zeros where a row has no image) and
        ``width``, ``height``, ``crop_top``, ``crop_left`` (N,) int32 (``-1`` there).
        Rows already errored and sentinel rows are passed through untouched; a row that
        fails here gets ``error`` = the reason and ``stage`` = the failing stage. A row whose
        image had to be enlarged gets ``"upscaled from {w}x{h}"`` added to its ``notes``
        (findings are joined with ``"; "``).

    Raises:
        LatentizeError: only for run-level problems (unknown crop mode), never for a sample.
    """
    # Fail the whole task on a config typo up front rather than erroring every row.
    CROPS.get(config.crop)
    width_px, height_px = config.size
    keys = batch["key"]
    n = len(keys)
    images = batch["image"]
    error = text_column(batch.get("error"), n)
    stage = text_column(batch.get("stage"), n)
    notes = text_column(batch.get("notes"), n)
    total = np.asarray(batch["total"]) if "total" in batch else np.full(n, -1, np.int64)

    pixels = np.zeros((n, height_px, width_px, 3), dtype=np.uint8)
    meta = {name: np.full(n, -1, dtype=np.int32) for name in ("width", "height", "crop_top", "crop_left")}

    failed = 0
    for i in range(n):
        if total[i] >= 0 or error[i] is not None:
            continue
        key = str(keys[i])
        try:
            if images[i] is None:
                raise SampleError("decode", "no image data in this sample (image is missing)")
            out = preprocess_sample(as_bytes(images[i]), key=key, config=config)
        except SampleError as exc:
            error[i], stage[i] = exc.message, exc.stage
            failed += 1
            logger.debug("sample %s failed in %s: %s", key, exc.stage, exc.message)
            continue
        except LatentizeError:
            raise
        except Exception as exc:
            # A bug or an exotic failure in one sample must not take the batch down with it.
            error[i], stage[i] = f"{type(exc).__name__}: {exc}", "preprocess"
            failed += 1
            logger.warning("sample %s: unexpected %s: %s", key, type(exc).__name__, exc)
            continue
        pixels[i] = out.pixels
        meta["width"][i] = out.width
        meta["height"][i] = out.height
        meta["crop_top"][i] = out.crop_top
        meta["crop_left"][i] = out.crop_left
        note = upscale_note(out)
        if note is not None:
            notes[i] = join_notes([notes[i], note])

    if failed:
        logger.debug("preprocess batch: %d of %d rows failed", failed, n)

    result: dict[str, np.ndarray] = {}
    for name, column in batch.items():
        if name == "image":
            continue
        result[name] = column
    result["error"] = error
    result["stage"] = stage
    result["notes"] = notes
    result["pixels"] = pixels
    result.update(meta)
    return normalize_text(result)
