"""Raw image bytes -> an upright RGB :class:`PIL.Image.Image`.

Every way a sample's bytes can be unusable (empty, not an image, truncated, a decompression
bomb) becomes a :class:`~latentize.errors.SampleError` with stage ``"decode"`` and a reason a
person can act on; nothing else escapes :func:`decode_image`.
"""

from __future__ import annotations

import io
import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from latentize.errors import LatentizeError, SampleError

__all__ = [
    "decode_image",
    "decode_jpeg_reduced",
    "load_pixels",
    "OrientationUnclear",
    "open_image",
    "pillow_guard",
    "to_rgb",
    "transposed_size",
    "upright_transpose",
]

logger = logging.getLogger(__name__)

_WHITE = (255, 255, 255, 255)

# Pillow's bomb guard is one process-wide global, read on every open and every frame seek.
# When the configured limit is above Pillow's own (or disabled), it has to be lifted for the
# duration of one decode; this lock keeps concurrent decodes in threaded workers from
# restoring each other's value, and it is only taken on that rare path.
_LIMIT_LOCK = threading.Lock()


def _pillow_hard_limit() -> int | None:
    """Pixels above which Pillow itself raises ``DecompressionBombError``; None: no limit."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


@contextmanager
def _pillow_limit_at_least(max_pixels: int | None) -> Iterator[None]:
    """Lets Pillow open images up to ``max_pixels`` (None: any size) inside the block.

    Pillow's global is only touched when its own hard limit would refuse images that the
    config accepts; it is restored on exit, so nothing leaks to other users of Pillow.
    """
    hard = _pillow_hard_limit()
    if hard is None or (max_pixels is not None and max_pixels <= hard):
        yield
        return
    with _LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _bomb_message(width: int, height: int, max_pixels: int | None) -> str:
    return (
        f"image is {width}x{height} = {width * height} pixels, more than "
        f"preprocess.max_pixels = {max_pixels} (decompression bomb guard); raise "
        "preprocess.max_pixels, or set it to null to disable the check"
    )


def _pillow_bomb_message(exc: Exception, max_pixels: int | None) -> str:
    # Pillow's message carries the image's pixel count; ours adds the limit and the key.
    return (
        f"{exc} (preprocess.max_pixels = {max_pixels}); raise preprocess.max_pixels, or set "
        "it to null to disable the check"
    )


@contextmanager
def pillow_guard(max_pixels: int | None) -> Iterator[None]:
    """The block in which an image is opened and decoded under the ``max_pixels`` guard.

    Lifts Pillow's own limit where it is below ``max_pixels`` (see
    :func:`_pillow_limit_at_least`) and silences its warning between its soft and hard limits:
    the size check of :func:`open_image` is the one that decides.
    """
    with _pillow_limit_at_least(max_pixels), warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def open_image(data: bytes, *, max_pixels: int | None) -> Image.Image:
    """Opens ``data`` and checks its size against ``max_pixels``; no pixel is decoded yet.

    Call inside :func:`pillow_guard`. The image's ``size`` is the size as stored (before EXIF
    orientation); ``format``, ``mode`` and ``info`` (EXIF included) are read from the header.

    Raises:
        SampleError: stage ``"decode"``: unknown format, unreadable header, or more pixels
            than ``max_pixels``.
    """
    try:
        # Image.open only parses the header: no pixel data is decoded yet.
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise SampleError(
            "decode",
            f"not a recognised image format ({len(data)} bytes starting {data[:16]!r})",
        ) from None
    except Image.DecompressionBombError as exc:
        # Only reached when Pillow's own limit is below ours, i.e. ours is exceeded too.
        raise SampleError("decode", _pillow_bomb_message(exc, max_pixels)) from None
    except Exception as exc:
        raise SampleError(
            "decode",
            f"truncated or corrupt image header ({type(exc).__name__}: {exc})",
        ) from None

    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise SampleError("decode", _bomb_message(width, height, max_pixels))
    return img


def load_pixels(img: Image.Image, *, max_pixels: int | None) -> None:
    """Decodes the pixels of an image from :func:`open_image` (frame 0), inside :func:`pillow_guard`.

    Raises:
        SampleError: stage ``"decode"``: truncated or corrupt pixel data.
    """
    try:
        # Forces the full decode now so that truncation surfaces here, as a decode error,
        # and not later inside a resize. ImageFile.LOAD_TRUNCATED_IMAGES stays off on
        # purpose: a half-grey image is worse than a recorded error.
        img.load()
    except Image.DecompressionBombError as exc:
        raise SampleError("decode", _pillow_bomb_message(exc, max_pixels)) from None
    except Exception as exc:
        raise SampleError("decode", f"truncated or corrupt image data ({type(exc).__name__}: {exc})") from None


def _open_and_load(data: bytes, max_pixels: int | None) -> Image.Image:
    """Opens ``data``, checks its size against ``max_pixels``, then decodes frame 0's pixels."""
    with pillow_guard(max_pixels):
        img = open_image(data, max_pixels=max_pixels)
        load_pixels(img, max_pixels=max_pixels)
    return img


def _upright(img: Image.Image) -> Image.Image:
    """Applies the EXIF orientation; a malformed EXIF block leaves the image as stored."""
    try:
        out = ImageOps.exif_transpose(img)
    except Exception as exc:
        # Broken EXIF is common in scraped data and the pixels are still good; refusing the
        # image over metadata would lose it for nothing.
        logger.debug("ignoring unreadable EXIF orientation: %s: %s", type(exc).__name__, exc)
        return img
    return img if out is None else out


# EXIF orientation -> the transposition that makes the image upright (what exif_transpose does).
_ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# A 2x2 stand-in whose four pixels differ, so that each orientation leaves its own pattern.
_PROBE = np.arange(4, dtype=np.uint8).reshape(2, 2)
_TRANSPOSE_BY_PATTERN = {Image.fromarray(_PROBE).transpose(t).tobytes(): t for t in Image.Transpose}


# Where Image.getexif finds an orientation (TIFF files also carry it in their own tags).
_ORIENTATION_SOURCES = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


class OrientationUnclear(ValueError):
    """The EXIF orientation cannot be told from the header alone; decode with :func:`decode_image`."""


def upright_transpose(img: Image.Image) -> Image.Transpose | None:
    """The transposition :func:`decode_image` will apply to ``img`` to make it upright.

    ``img`` comes from :func:`open_image`: only the header is read, no pixel is decoded.

    Returns:
        The ``Image.Transpose`` to apply, or None (no EXIF orientation, orientation 1, or EXIF
        that cannot be read: the image is used as stored).

    Raises:
        OrientationUnclear: malformed EXIF where the answer could differ from
            :func:`decode_image`'s; the caller must decode the exact way.
    """
    if not hasattr(img, "tag_v2") and not any(key in img.info for key in _ORIENTATION_SOURCES):
        return None
    try:
        # The same (cached) EXIF object that exif_transpose reads after the full decode.
        stated = _ORIENTATIONS.get(img.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:
        stated = None
    # exif_transpose can still fail after choosing (rewriting the EXIF of the turned copy),
    # and then decode_image keeps the image as stored. Running the very same code on a 2x2
    # stand-in that carries img's metadata shows the outcome without decoding a pixel.
    probe = Image.fromarray(_PROBE)
    probe.info = dict(img.info)
    applied = _TRANSPOSE_BY_PATTERN.get(_upright(probe).tobytes())
    if applied != stated:
        raise OrientationUnclear(f"EXIF orientation states {stated}, but {applied} would be applied")
    return stated


def transposed_size(size: tuple[int, int], transpose: Image.Transpose | None) -> tuple[int, int]:
    """``size`` (W, H) after ``transpose``: swapped by the four that turn the image on its side."""
    if transpose in _SIDEWAYS:
        return size[1], size[0]
    return size[0], size[1]


_SIDEWAYS = (
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_270,
    Image.Transpose.TRANSPOSE,
    Image.Transpose.TRANSVERSE,
)


def decode_jpeg_reduced(
    data: bytes,
    *,
    max_pixels: int | None,
    min_size: Callable[[tuple[int, int]], tuple[int, int] | None],
) -> tuple[Image.Image, tuple[int, int]] | None:
    """Decodes a JPEG at a reduced DCT scale (1/2, 1/4 or 1/8: libjpeg-turbo via Pillow's draft).

    Only baseline and progressive JPEGs (``format == "JPEG"``) are reduced; the decode sees
    the same header checks as :func:`decode_image` (the ``max_pixels`` guard on the stored
    size, before any pixel), and the same EXIF orientation (:func:`upright_transpose`).

    Args:
        data: the encoded file.
        max_pixels: as for :func:`decode_image`.
        min_size: ``upright source (W, H) -> (W, H)``: the smallest upright size the reduced
            image may have, or None to decode at full size.

    Returns:
        ``(image, source)``: the upright ``RGB`` reduced image, at least ``min_size(source)``
        in both sides, and the upright ``(W, H)`` of the full image. None wherever the exact
        path has to do the work: not a JPEG, no reduction asked for or possible, and every
        failure (bad header, over ``max_pixels``, truncated data...), so that the exact path
        reports it with its own message.
    """
    if not data:
        return None
    try:
        with pillow_guard(max_pixels):
            img = open_image(data, max_pixels=max_pixels)
            if img.format != "JPEG":
                return None
            try:
                transpose = upright_transpose(img)
            except OrientationUnclear:
                return None
            stored = img.size
            source = transposed_size(stored, transpose)
            want = min_size(source)
            if want is None:
                return None
            img.draft(None, transposed_size(want, transpose))
            if img.size == stored:
                return None
            load_pixels(img, max_pixels=max_pixels)
        if transpose is not None:
            img = img.transpose(transpose)
        return to_rgb(img), source
    except SampleError:
        return None
    except Exception as exc:
        logger.debug("reduced decode failed, decoding at full size: %s: %s", type(exc).__name__, exc)
        return None


def decode_image(data: bytes, *, max_pixels: int | None) -> Image.Image:
    """Decodes raw encoded image bytes into an upright RGB image.

    Args:
        data: the encoded file (JPEG, PNG, WebP, GIF, TIFF, ... anything Pillow reads).
        max_pixels: refuse images with more than this many pixels, checked on the header
            before any pixel is decoded; None disables the check (Pillow's own included).

    Returns:
        A loaded ``RGB`` image (8 bits per channel) with the EXIF orientation applied; its
        ``size`` is the upright ``(width, height)``. Animated images give their first frame;
        alpha is composited on white (see :func:`to_rgb`).

    Raises:
        SampleError: stage ``"decode"``: empty data, unknown format, truncated or corrupt
            data, or more pixels than ``max_pixels``.
    """
    if not data:
        raise SampleError("decode", "empty image data (0 bytes)")
    img = _open_and_load(data, max_pixels)
    img = _upright(img)
    try:
        return to_rgb(img)
    except (SampleError, LatentizeError):
        raise
    except Exception as exc:
        raise SampleError("decode", f"cannot convert mode {img.mode} to RGB ({type(exc).__name__}: {exc})") from None


# --- mode -> RGB converters -------------------------------------------------------------------


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    """``RGBA`` -> ``RGB`` over an opaque white background (fully transparent -> 255)."""
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    """(H, W) uint8 -> RGB image with the value repeated in all three channels."""
    return Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8)).convert("RGB")


def _from_16bit(img: Image.Image) -> Image.Image:
    """``I;16*`` (unsigned 16-bit, 0..65535) -> RGB by keeping the high byte.

    ``convert("L")`` would clip every value above 255 to white, losing the whole image.
    """
    arr = np.asarray(img).astype(np.uint16, copy=False)
    return _gray_to_rgb((arr >> 8).astype(np.uint8))


def _stretch(arr: np.ndarray) -> np.ndarray:
    """Any real array -> uint8 by mapping its finite min..max onto 0..255 (NaN -> 0)."""
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _from_int32(img: Image.Image) -> Image.Image:
    """``I`` (signed 32-bit) -> RGB.

    Values inside 0..65535 are taken as 16-bit data (what ``I`` holds from 16-bit PNG/TIFF
    in older Pillow and most tools), high byte kept; anything wider is stretched min..max.
    """
    arr = np.asarray(img).astype(np.int64)
    if arr.size and arr.min() >= 0 and arr.max() <= 0xFFFF:
        return _gray_to_rgb((arr >> 8).astype(np.uint8))
    return _gray_to_rgb(_stretch(arr))


def _from_float(img: Image.Image) -> Image.Image:
    """``F`` (32-bit float) -> RGB: 0..1 data is scaled by 255, 0..255 kept, else stretched."""
    arr = np.nan_to_num(np.asarray(img).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo >= 0.0 and hi <= 1.0:
        return _gray_to_rgb(np.round(arr * 255.0).astype(np.uint8))
    if lo >= 0.0 and hi <= 255.0:
        return _gray_to_rgb(np.round(arr).astype(np.uint8))
    return _gray_to_rgb(_stretch(arr))


def _generic(img: Image.Image) -> Image.Image:
    """Every 8-bit mode Pillow converts itself (L, P, LA, PA, RGBA, CMYK, YCbCr, 1, ...).

    Modes with an alpha band, and any image carrying a ``transparency`` key (palette or
    single-colour tRNS), go through RGBA so that transparency becomes white, not black or
    the palette's hidden colour.
    """
    if "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info:
        return _composite_on_white(img.convert("RGBA"))
    return img.convert("RGB")


def _identity(img: Image.Image) -> Image.Image:
    return img


_CONVERTERS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "RGB": _identity,
    "I;16": _from_16bit,
    "I;16L": _from_16bit,
    "I;16B": _from_16bit,
    "I;16N": _from_16bit,
    "I": _from_int32,
    "F": _from_float,
}


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts an image of any Pillow mode to 8-bit ``RGB``.

    * 8-bit modes (L, P, CMYK, YCbCr, 1, ...) use Pillow's conversion.
    * Alpha (RGBA, LA, PA, palette or tRNS transparency) is composited on white.
    * 16-bit ``I;16*`` keeps the high byte (``value >> 8``); ``I`` and ``F`` are scaled by
      their range (see :func:`_from_int32`, :func:`_from_float`), never clipped.

    Returns:
        ``img`` itself when it is already ``RGB`` without a transparency key, else a new
        ``RGB`` image of the same size.
    """
    if img.mode == "RGB" and "transparency" in img.info:
        return _generic(img)
    return _CONVERTERS.get(img.mode, _generic)(img)
