"""Crop geometry, and resizing and cutting an RGB image to the configured resolution.

Crop modes are looked up by name in :data:`CROPS` (config key ``preprocess.crop``). Each one is
pure geometry on the *source* size: it returns a :class:`CropBox`, the size to resize the
upright source image to and the offset of the cut in the resized image's coordinates (the SDXL
``crops_coords_top_left`` conditioning that :class:`Cropped` carries to the output). Every
decode path uses the same box: the exact path resizes the full image to it, the reduced-scale
JPEG path and the device path resize whatever they decoded to it, so the geometry never
depends on how the pixels were decoded.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image

from latentize.registry import Registry

__all__ = [
    "CROPS",
    "CropBox",
    "CropFn",
    "Cropped",
    "crop_box",
    "crop_resized",
    "crop_rng",
    "resize_and_crop",
    "upscaled_note",
]

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


class CropBox(NamedTuple):
    """Where one crop comes from, in the coordinates of the upright source image.

    Attributes:
        resize_to: ``(W, H)`` the whole source image is resized to (at least the target size).
        top: row of the cut's top edge in the resized image.
        left: column of the cut's left edge in the resized image.
    """

    resize_to: tuple[int, int]
    top: int
    left: int

    def upscales(self, source: tuple[int, int]) -> bool:
        """True when ``source`` (W, H) has to be enlarged in either dimension."""
        return self.resize_to[0] > source[0] or self.resize_to[1] > source[1]


#: A crop mode: ``(source (W, H), target (W, H), key, seed) -> CropBox``, pure geometry. The
#: box's ``resize_to`` is at least the target in both sides; the cut of the target size at
#: ``(top, left)`` lies inside it.
CropFn = Callable[[tuple[int, int], tuple[int, int], str, int], CropBox]

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


def _resize_window(img: Image.Image, box: CropBox, size: tuple[int, int]) -> Image.Image:
    """The ``size`` window at ``box``'s offset of ``img`` resized to ``box.resize_to``, resampled alone."""
    sx, sy = img.width / box.resize_to[0], img.height / box.resize_to[1]
    window = (box.left * sx, box.top * sy, (box.left + size[0]) * sx, (box.top + size[1]) * sy)
    return img.resize(size, _RESAMPLE, box=window, reducing_gap=None)


def crop_rng(seed: int, key: str) -> np.random.Generator:
    """A generator that depends on ``(seed, key)`` only: the same in every process and batch.

    Python's ``hash()`` is salted per process, so a stable digest is used instead.
    """
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


@CROPS.register("center")
def _center(source: tuple[int, int], size: tuple[int, int], key: str, seed: int) -> CropBox:
    nw, nh = _cover_size(source, size)
    return CropBox((nw, nh), (nh - size[1]) // 2, (nw - size[0]) // 2)


@CROPS.register("random")
def _random(source: tuple[int, int], size: tuple[int, int], key: str, seed: int) -> CropBox:
    nw, nh = _cover_size(source, size)
    rng = crop_rng(seed, key)
    top = int(rng.integers(0, nh - size[1] + 1))
    left = int(rng.integers(0, nw - size[0] + 1))
    return CropBox((nw, nh), top, left)


@CROPS.register("none")
def _stretch(source: tuple[int, int], size: tuple[int, int], key: str, seed: int) -> CropBox:
    return CropBox(size, 0, 0)


def crop_box(source: tuple[int, int], size: tuple[int, int], *, crop: str, key: str, seed: int) -> CropBox:
    """The crop geometry of one image: what to resize the source to, and where to cut.

    Args:
        source: ``(W, H)`` of the upright source image (after EXIF orientation), never the
            size of a reduced decode of it.
        size: target ``(W, H)``.
        crop: a name registered in :data:`CROPS` (``center``, ``random``, ``none``).
        key: the sample key; seeds the ``random`` crop together with ``seed``.
        seed: the ``random`` crop's seed (``preprocess.seed``).

    Returns:
        The :class:`CropBox`; a source already of size ``size`` gets ``(size, 0, 0)`` in every
        mode (passed through without resampling).

    Raises:
        ConfigError: ``crop`` is not a registered crop mode.
    """
    crop_fn = CROPS.get(crop)
    source = (int(source[0]), int(source[1]))
    size = (int(size[0]), int(size[1]))
    if source == size:
        return CropBox(size, 0, 0)
    return crop_fn(source, size, key, seed)


def upscaled_note(width: int, height: int) -> str:
    """The ``notes`` finding of an image of ``width x height`` that had to be enlarged."""
    return f"upscaled from {width}x{height}"


def crop_resized(
    img: Image.Image,
    box: CropBox,
    *,
    source: tuple[int, int],
    size: tuple[int, int],
    window_only: bool = False,
) -> Cropped:
    """Resizes ``img`` to ``box.resize_to`` and cuts the ``size`` window at the box's offset.

    Args:
        img: an ``RGB`` image: the upright source itself, or a reduced decode of it.
        box: the geometry from :func:`crop_box`, computed on ``source``.
        source: ``(W, H)`` of the upright source; ``width``, ``height`` and ``upscaled`` of the
            result are judged against it, not against ``img``.
        size: target ``(W, H)``.
        window_only: resample only the window that is kept (Pillow's ``box``): the same
            filter at the same positions, faster when much of the image is cut away, but
            its arithmetic differs in the last bit (pixels may differ by 1), so the exact
            path does not use it.

    Returns:
        :class:`Cropped` with ``pixels`` (H, W, 3) uint8, C-contiguous. An ``img`` already of
        size ``box.resize_to`` is cut without resampling.

    Raises:
        ValueError: ``img`` is not ``RGB``, or the box does not fit.
    """
    if img.mode != "RGB":
        raise ValueError(f"resize_and_crop expects an RGB image, got mode {img.mode}")
    tw, th = int(size[0]), int(size[1])
    top, left = box.top, box.left
    if window_only and img.size != box.resize_to:
        resized, top, left = _resize_window(img, box, (tw, th)), 0, 0
    else:
        resized = _resize(img, box.resize_to)
    arr = np.asarray(resized)[top : top + th, left : left + tw]
    if arr.shape != (th, tw, 3):
        raise ValueError(f"crop box {box} produced {arr.shape[1]}x{arr.shape[0]}, expected {tw}x{th}")
    # np.array copies: the slice is a strided, read-only view into Pillow's buffer.
    pixels = np.array(arr, dtype=np.uint8, order="C", copy=True)
    return Cropped(
        pixels=pixels,
        width=int(source[0]),
        height=int(source[1]),
        crop_top=box.top,
        crop_left=box.left,
        # Judged on the geometry, not the crop mode, so every mode (and a new one) agrees.
        upscaled=box.upscales(source),
    )


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
    CROPS.get(crop)
    if img.mode != "RGB":
        raise ValueError(f"resize_and_crop expects an RGB image, got mode {img.mode}")
    box = crop_box(img.size, size, crop=crop, key=key, seed=seed)
    return crop_resized(img, box, source=img.size, size=size)
