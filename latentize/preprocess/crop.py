"""Resize and crop an RGB image to the configured resolution.

Crop modes are looked up by name in :data:`CROPS` (config key ``preprocess.crop``). Each one
returns the resized image and the crop offset in the resized image's coordinates, which is the
SDXL ``crops_coords_top_left`` conditioning that :class:`Cropped` carries to the output.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from latentize.registry import Registry

__all__ = ["CROPS", "CropFn", "Cropped", "crop_rng", "resize_and_crop"]

logger = logging.getLogger(__name__)

_RESAMPLE = Image.Resampling.BICUBIC


@dataclass(frozen=True)
class Cropped:
    """One preprocessed image.

    Attributes:
        pixels: (H, W, 3) uint8, C-contiguous, values 0..255, at the configured resolution.
        width: source image width after EXIF orientation, before any resize.
        height: source image height after EXIF orientation, before any resize.
        crop_top: row of the crop's top edge in the resized image (0 when nothing was cut).
        crop_left: column of the crop's left edge in the resized image.
        upscaled: the image had to be enlarged (in either dimension) to reach the resolution,
            so its pixels hold less detail than the resolution suggests; the batch function
            records it in the row's ``notes``.
    """

    pixels: np.ndarray
    width: int
    height: int
    crop_top: int
    crop_left: int
    upscaled: bool = False


#: A crop mode: ``(rgb_image, (W, H), key, seed) -> (resized_image, crop_top, crop_left)``.
#: The returned image is exactly ``(W, H)`` once cut at ``(crop_top, crop_left)``; it may be
#: larger than ``(W, H)``, and :func:`resize_and_crop` does the cut.
CropFn = Callable[[Image.Image, tuple[int, int], str, int], tuple[Image.Image, int, int]]

CROPS: Registry[CropFn] = Registry("crop", config_key="preprocess.crop")


def _cover_size(src: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """Smallest aspect-preserving size of ``src`` that covers ``size`` (both ``(W, H)``)."""
    (w, h), (tw, th) = src, size
    scale = max(tw / w, th / h)
    # The max() guards against rounding one side to a pixel short of the target.
    return max(tw, int(round(w * scale))), max(th, int(round(h * scale)))


def _resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    if img.size == size:
        return img
    # reducing_gap=None: an exact (antialiased when shrinking) bicubic filter over the whole
    # image, not Pillow's faster reduce-then-resize approximation.
    return img.resize(size, _RESAMPLE, reducing_gap=None)


def crop_rng(seed: int, key: str) -> np.random.Generator:
    """A generator that depends on ``(seed, key)`` only: the same in every process and batch.

    Python's ``hash()`` is salted per process, so a stable digest is used instead.
    """
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


@CROPS.register("center")
def _center(img: Image.Image, size: tuple[int, int], key: str, seed: int) -> tuple[Image.Image, int, int]:
    resized = _resize(img, _cover_size(img.size, size))
    nw, nh = resized.size
    return resized, (nh - size[1]) // 2, (nw - size[0]) // 2


@CROPS.register("random")
def _random(img: Image.Image, size: tuple[int, int], key: str, seed: int) -> tuple[Image.Image, int, int]:
    resized = _resize(img, _cover_size(img.size, size))
    nw, nh = resized.size
    rng = crop_rng(seed, key)
    top = int(rng.integers(0, nh - size[1] + 1))
    left = int(rng.integers(0, nw - size[0] + 1))
    return resized, top, left


@CROPS.register("none")
def _stretch(img: Image.Image, size: tuple[int, int], key: str, seed: int) -> tuple[Image.Image, int, int]:
    return _resize(img, size), 0, 0


def resize_and_crop(img: Image.Image, *, size: tuple[int, int], crop: str, key: str, seed: int) -> Cropped:
    """Resizes ``img`` to cover ``size`` and cuts it out with the crop mode ``crop``.

    Args:
        img: an ``RGB`` image (see :func:`~latentize.preprocess.decode.to_rgb`).
        size: target ``(W, H)``.
        crop: a name registered in :data:`CROPS` (``center``, ``random``, ``none``).
        key: the sample key; seeds the ``random`` crop together with ``seed``.
        seed: the ``random`` crop's seed (``preprocess.seed``).

    Returns:
        :class:`Cropped` with ``pixels`` of shape (H, W, 3) uint8. An image already of size
        ``size`` is passed through without resampling, offsets 0. ``upscaled`` is True when
        the resized image is larger than ``img`` in width or height.

    Raises:
        ConfigError: ``crop`` is not a registered crop mode.
        ValueError: ``img`` is not ``RGB``.
    """
    crop_fn = CROPS.get(crop)
    if img.mode != "RGB":
        raise ValueError(f"resize_and_crop expects an RGB image, got mode {img.mode}")
    tw, th = int(size[0]), int(size[1])
    width, height = img.size
    if (width, height) == (tw, th):
        resized, top, left = img, 0, 0
    else:
        resized, top, left = crop_fn(img, (tw, th), key, seed)
    arr = np.asarray(resized)[top : top + th, left : left + tw]
    if arr.shape != (th, tw, 3):
        raise ValueError(f"crop {crop!r} produced {arr.shape[1]}x{arr.shape[0]}, expected {tw}x{th}")
    # np.array copies: the slice is a strided, read-only view into Pillow's buffer.
    pixels = np.array(arr, dtype=np.uint8, order="C", copy=True)
    # Judged on the resized image, not the crop mode, so every mode (and a new one) agrees.
    upscaled = resized.width > width or resized.height > height
    return Cropped(
        pixels=pixels,
        width=width,
        height=height,
        crop_top=top,
        crop_left=left,
        upscaled=upscaled,
    )
