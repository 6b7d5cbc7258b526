"""Preprocess on a torch device: JPEGs decoded in batches by nvJPEG, resized and cropped there.

:func:`preprocess_on_device` is the device twin of
:func:`~latentize.preprocess.preprocess_batch`: the same rows, the same geometry
(:func:`~latentize.preprocess.crop.crop_box` on the source size), the same error rows. The CPU
reads each header first (Pillow parses headers without decoding pixels): the
``preprocess.max_pixels`` guard, the EXIF orientation and the JPEG's coding are all settled
there. Plain 8-bit baseline or progressive JPEGs, YCbCr or grayscale, go to
``torchvision.io.decode_jpeg`` (nvJPEG on CUDA; torchvision's libjpeg-turbo decoder on a CPU
device, which is how the tests run this code); everything else (PNG, WebP, CMYK, RGB-coded,
arithmetic-coded, unusual chroma sampling, a stream that does not end in an EOI marker, any
image the decoder rejects) goes through :func:`~latentize.preprocess.preprocess_row` one by
one and is moved to the device, so the output does not depend on which way a sample went.

``preprocess.exact`` has no effect here: the device decodes every image at full size (torchvision
has no DCT-scaled decode), which is the exact path's decode; the resize is torch's antialiased
bicubic, Pillow's filter within rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg  # type: ignore[import-untyped]

from latentize.config import PreprocessConfig
from latentize.errors import SampleError
from latentize.preprocess import as_bytes, preprocess_row, upscale_note
from latentize.preprocess.crop import CROPS, CropBox, crop_box, upscaled_note
from latentize.preprocess.decode import (
    OrientationUnclear,
    open_image,
    pillow_guard,
    transposed_size,
    upright_transpose,
)

__all__ = ["DeviceBatch", "preprocess_on_device"]

logger = logging.getLogger(__name__)

#: Pixels (as stored) decoded per ``decode_jpeg`` call: bounds the device memory that one
#: call's full-size uint8 images take (3 bytes each) before they are resized.
DECODE_CHUNK_PIXELS = 64 * 2**20

_MISSING = "no image data in this sample (image is missing)"

# SOF markers: 0xC0 baseline, 0xC1 extended sequential, 0xC2 progressive (all Huffman-coded,
# what nvJPEG decodes); the others are lossless, hierarchical or arithmetic-coded.
_DEVICE_FRAMES = frozenset({0xC0, 0xC1, 0xC2})
_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM and the restart markers.
_BARE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
_RGB_COMPONENT_IDS = (ord("R"), ord("G"), ord("B"))

_TRANSPOSES: dict[Image.Transpose, Callable[[torch.Tensor], torch.Tensor]] = {
    Image.Transpose.FLIP_LEFT_RIGHT: lambda x: x.flip(-1),
    Image.Transpose.FLIP_TOP_BOTTOM: lambda x: x.flip(-2),
    Image.Transpose.ROTATE_180: lambda x: x.flip(-2, -1),
    Image.Transpose.ROTATE_90: lambda x: torch.rot90(x, 1, (-2, -1)),
    Image.Transpose.ROTATE_270: lambda x: torch.rot90(x, -1, (-2, -1)),
    Image.Transpose.TRANSPOSE: lambda x: x.transpose(-2, -1),
    Image.Transpose.TRANSVERSE: lambda x: x.transpose(-2, -1).flip(-2, -1),
}


@dataclass
class DeviceBatch:
    """Preprocessed images of one batch, on the device.

    Attributes:
        pixels: (N, H, W, 3) uint8 on the device, C-contiguous, values 0..255, at the
            configured resolution; zeros for failed rows.
        width: (N,) int32 upright source width; -1 for failed rows.
        height: (N,) int32 upright source height; -1 for failed rows.
        crop_top: (N,) int32 crop offset in the resized image; -1 for failed rows.
        crop_left: (N,) int32; -1 for failed rows.
        notes: per row, ``"upscaled from {w}x{h}"`` where the image had to be enlarged, else
            None (as :func:`~latentize.preprocess.preprocess_batch` writes it).
        errors: row -> ``(stage, reason)`` of each failed row, the CPU path's stages and reasons.
        gpu_decoded: rows decoded on the device.
        cpu_fallback: rows that went through the CPU path (failed ones included); rows
            without image data count in neither.
    """

    pixels: torch.Tensor
    width: np.ndarray
    height: np.ndarray
    crop_top: np.ndarray
    crop_left: np.ndarray
    notes: list[str | None]
    errors: dict[int, tuple[str, str]] = field(default_factory=dict)
    gpu_decoded: int = 0
    cpu_fallback: int = 0

    def set_row(self, row: int, pixels: torch.Tensor, source: tuple[int, int], box: CropBox) -> None:
        """Stores one preprocessed row: ``pixels`` (H, W, 3) uint8 and its geometry."""
        self.pixels[row] = pixels
        self.width[row], self.height[row] = source
        self.crop_top[row], self.crop_left[row] = box.top, box.left
        self.notes[row] = upscaled_note(*source) if box.upscales(source) else None


@dataclass(frozen=True)
class _Job:
    """One JPEG the device decodes: its bytes, its stored and upright sizes, its geometry."""

    row: int
    data: bytes
    stored: tuple[int, int]
    transpose: Image.Transpose | None
    source: tuple[int, int]
    box: CropBox


def _frame_marker(data: bytes) -> int | None:
    """The SOFn marker (second byte) of a JPEG stream; None if none comes before the first scan."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _FRAMES:
            return marker
        elif marker == 0xDA:
            return None
        elif marker in _BARE_MARKERS:
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _ycbcr_or_gray(img: Image.Image) -> bool:
    """True for grayscale and YCbCr-coded colour (libjpeg's rules); False for RGB-coded or CMYK."""
    if img.mode == "L":
        return True
    if img.mode != "RGB":
        return False
    info = img.info
    if "jfif" in info:
        return True
    if "adobe" in info:
        return info.get("adobe_transform") == 1
    ids = tuple(layer[0] for layer in getattr(img, "layer", ()))
    return ids != _RGB_COMPONENT_IDS


def _plain_sampling(img: Image.Image) -> bool:
    """Luma sampled 1 or 2 in each direction, chroma 1: 4:4:4, 4:4:0, 4:2:2 or 4:2:0."""
    layers = list(getattr(img, "layer", ()))
    if img.mode == "L":
        return len(layers) == 1
    if len(layers) != 3:
        return False
    (_, h, v, _), *chroma = layers
    return h in (1, 2) and v in (1, 2) and all(c[1] == 1 and c[2] == 1 for c in chroma)


def _device_header(data: bytes, *, max_pixels: int | None) -> tuple[Image.Image, Image.Transpose | None] | None:
    """Header checks on the CPU: ``(header_image, transpose)`` for a JPEG the device decodes.

    Returns None for every sample the CPU path must take: not a JPEG (or a multi-picture
    one), unreadable header, more pixels than ``max_pixels``, not 8-bit YCbCr or grayscale,
    not baseline/extended/progressive Huffman coding, chroma sampling other than 4:4:4,
    4:4:0, 4:2:2 or 4:2:0, no EOI marker at the end (a truncated stream, which nvJPEG may not
    notice), or an EXIF orientation only the full decode can settle.
    """
    if not data.endswith(b"\xff\xd9"):
        return None
    try:
        with pillow_guard(max_pixels):
            img = open_image(data, max_pixels=max_pixels)
        if img.format != "JPEG" or not _ycbcr_or_gray(img) or not _plain_sampling(img):
            return None
        if _frame_marker(data) not in _DEVICE_FRAMES:
            return None
        return img, upright_transpose(img)
    except (SampleError, OrientationUnclear):
        return None
    except Exception as exc:
        logger.debug("header check failed, CPU path: %s: %s", type(exc).__name__, exc)
        return None


def _plan(row: int, data: bytes, key: str, config: PreprocessConfig) -> _Job | None:
    header = _device_header(data, max_pixels=config.max_pixels)
    if header is None:
        return None
    img, transpose = header
    stored = (int(img.size[0]), int(img.size[1]))
    source = transposed_size(stored, transpose)
    box = crop_box(source, config.size, crop=config.crop, key=key, seed=config.seed)
    return _Job(row=row, data=data, stored=stored, transpose=transpose, source=source, box=box)


def _chunks(jobs: list[_Job]) -> Iterator[list[_Job]]:
    """Consecutive runs of jobs holding at most :data:`DECODE_CHUNK_PIXELS` (at least one job)."""
    chunk: list[_Job] = []
    pixels = 0
    for job in jobs:
        size = job.stored[0] * job.stored[1]
        if chunk and pixels + size > DECODE_CHUNK_PIXELS:
            yield chunk
            chunk, pixels = [], 0
        chunk.append(job)
        pixels += size
    if chunk:
        yield chunk


def _decode_one(encoded: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        out = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except Exception as exc:
        logger.debug("device decode failed, CPU path: %s: %s", type(exc).__name__, exc)
        return None
    assert isinstance(out, torch.Tensor)
    return out


def _decode(jobs: list[_Job], device: torch.device) -> list[torch.Tensor | None]:
    """(3, H, W) uint8 device tensors as stored, in ``jobs`` order; None where decoding failed.

    One batched call; if it raises, each image is retried alone so that one bad image costs
    only itself.
    """
    encoded = [torch.from_numpy(np.frombuffer(job.data, dtype=np.uint8).copy()) for job in jobs]
    try:
        batch = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        decoded: list[torch.Tensor | None] = list(batch)
    except Exception as exc:
        logger.info("batch decode of %d JPEGs failed (%s: %s); decoding one by one", len(jobs), type(exc).__name__, exc)
        decoded = [_decode_one(t, device) for t in encoded]
    out: list[torch.Tensor | None] = []
    for job, image in zip(jobs, decoded, strict=True):
        if image is not None and tuple(image.shape) != (3, job.stored[1], job.stored[0]):
            logger.debug("device decode of row %d gave %s, expected %s; CPU path", job.row, image.shape, job.stored)
            image = None
        out.append(image)
    return out


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, h, w) uint8 -> (3, H, W) uint8 for ``size`` = (W, H): antialiased bicubic.

    Pillow's filter (bicubic, a = -0.5, widened when shrinking) in both variants. On a CPU
    device torch's uint8 kernel runs (Pillow's own integer algorithm, and an order of
    magnitude faster there than the float one); elsewhere :func:`_resize_float`.
    """
    if (image.shape[-1], image.shape[-2]) == size:
        return image
    if image.device.type == "cpu":
        out = F.interpolate(image.unsqueeze(0), size=(size[1], size[0]), mode="bicubic", antialias=True)
        return out.squeeze(0)
    return _resize_float(image, size)


def _resize_float(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """:func:`_resize` in float32, rounded and clamped back to uint8 (CUDA has no uint8 kernel)."""
    x = image.unsqueeze(0).to(torch.float32)
    y = F.interpolate(x, size=(size[1], size[0]), mode="bicubic", align_corners=False, antialias=True)
    return y.squeeze(0).round_().clamp_(0, 255).to(torch.uint8)


def _finish(image: torch.Tensor, job: _Job, size: tuple[int, int]) -> torch.Tensor:
    """A decoded (3, H, W) uint8 image -> the (H, W, 3) uint8 crop at ``size`` (W, H)."""
    if job.transpose is not None:
        image = _TRANSPOSES[job.transpose](image)
    resized = _resize(image, job.box.resize_to)
    top, left = job.box.top, job.box.left
    crop = resized[:, top : top + size[1], left : left + size[0]]
    if tuple(crop.shape) != (3, size[1], size[0]):
        raise ValueError(f"crop box {job.box} produced {tuple(crop.shape)}, expected {size}")
    return crop.permute(1, 2, 0)


def _on_cpu(batch: DeviceBatch, row: int, data: bytes, key: str, config: PreprocessConfig) -> None:
    """The CPU path for one row; failures become error rows exactly as in ``preprocess_batch``
    (both go through :func:`~latentize.preprocess.preprocess_row`)."""
    batch.cpu_fallback += 1
    size = config.size
    found = preprocess_row(data, key=key, config=config, sizes_of=lambda _: [size])
    if isinstance(found, SampleError):
        batch.errors[row] = (found.stage, found.message)
        return
    (out,) = found
    batch.pixels[row] = torch.from_numpy(out.pixels).to(batch.pixels.device)
    batch.width[row], batch.height[row] = out.width, out.height
    batch.crop_top[row], batch.crop_left[row] = out.crop_top, out.crop_left
    batch.notes[row] = upscale_note(out)


def preprocess_on_device(
    images: Sequence[Any],
    keys: Sequence[str],
    *,
    config: PreprocessConfig,
    device: torch.device | str,
) -> DeviceBatch:
    """Decodes, resizes and crops a batch of encoded images on ``device``.

    Args:
        images: N encoded image files (bytes, or anything
            :func:`~latentize.preprocess.as_bytes` takes), None where a sample has no image.
        keys: N sample keys (seed the ``random`` crop).
        config: resolution, crop mode, seed and ``max_pixels`` (``exact`` only matters for
            the samples that take the CPU path).
        device: where the pixels are decoded and returned; ``cuda`` uses nvJPEG.

    Returns:
        :class:`DeviceBatch`: row ``i`` is image ``i``; a row without image data is the
        ``decode`` error ``preprocess_batch`` gives it.

    Raises:
        LatentizeError: only for run-level problems (an unknown crop mode), never for a sample.
        ValueError: ``images`` and ``keys`` differ in length.
    """
    CROPS.get(config.crop)
    if len(images) != len(keys):
        raise ValueError(f"{len(images)} images but {len(keys)} keys")
    device = torch.device(device)
    n = len(images)
    width_px, height_px = config.size
    batch = DeviceBatch(
        pixels=torch.zeros((n, height_px, width_px, 3), dtype=torch.uint8, device=device),
        width=np.full(n, -1, dtype=np.int32),
        height=np.full(n, -1, dtype=np.int32),
        crop_top=np.full(n, -1, dtype=np.int32),
        crop_left=np.full(n, -1, dtype=np.int32),
        notes=[None] * n,
    )
    jobs: list[_Job] = []
    cpu_rows: list[tuple[int, bytes]] = []
    for row, (image, key) in enumerate(zip(images, keys, strict=True)):
        if image is None:
            batch.errors[row] = ("decode", _MISSING)
            continue
        data = as_bytes(image)
        job = _plan(row, data, str(key), config)
        if job is None:
            cpu_rows.append((row, data))
        else:
            jobs.append(job)

    for chunk in _chunks(jobs):
        for job, image in zip(chunk, _decode(chunk, device), strict=True):
            if image is None:
                cpu_rows.append((job.row, job.data))
                continue
            try:
                batch.set_row(job.row, _finish(image, job, config.size), job.source, job.box)
            except Exception as exc:
                logger.warning("device resize of %s failed, CPU path: %s: %s", keys[job.row], type(exc).__name__, exc)
                cpu_rows.append((job.row, job.data))
                continue
            batch.gpu_decoded += 1

    for row, data in sorted(cpu_rows):
        _on_cpu(batch, row, data, str(keys[row]), config)
    logger.debug(
        "device preprocess: %d rows, %d decoded on %s, %d on the CPU, %d failed",
        n,
        batch.gpu_decoded,
        device,
        batch.cpu_fallback,
        len(batch.errors),
    )
    return batch
