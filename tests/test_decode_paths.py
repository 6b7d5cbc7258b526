"""The decode paths: exact, default (reduced-scale JPEG decode) and device (torchvision), on real photos.

* The exact path (``preprocess.exact: true``) is the reference: bit for bit what an independent
  restatement of the original decode-resize-crop gives.
* The default path decodes large JPEGs at a reduced DCT scale: same geometry, metadata and
  errors as the exact path, pixels within the stated PSNR.
* ``preprocess_on_device`` (run here on the CPU device: torchvision's libjpeg-turbo decoder and
  torch's resize) gives the CPU path's rows, geometry and errors; what it cannot decode takes
  the CPU path.

Photos come from scikit-image / scikit-learn through :mod:`latentize.demo`.
"""

from __future__ import annotations

import functools
import io
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from test_corpus import KINDS

import latentize.preprocess as pre
import latentize.preprocess.gpu as gpu
from latentize.config import PreprocessConfig
from latentize.demo import laion_like_samples, photo_images, photo_samples
from latentize.errors import ConfigError, SampleError
from latentize.preprocess import Cropped, crop_box, preprocess_batch, preprocess_sample
from latentize.preprocess.crop import CROPS, CropBox, crop_resized, crop_rng
from latentize.preprocess.decode import (
    OrientationUnclear,
    decode_image,
    decode_jpeg_reduced,
    open_image,
    upright_transpose,
)
from latentize.preprocess.gpu import DeviceBatch, preprocess_on_device

BICUBIC = Image.Resampling.BICUBIC
CPU = torch.device("cpu")
EXACT = {"exact": True}


# --------------------------------------------------------------------------- helpers


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def jpeg(img: Image.Image, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **{"quality": 90, **kwargs})
    return buf.getvalue()


@functools.lru_cache(maxsize=1)
def _photos() -> dict[str, Image.Image]:
    return {name: img.convert("RGB") for name, img in photo_images()}


def big_photo(name: str = "astronaut", size: tuple[int, int] = (1200, 900)) -> Image.Image:
    """A photo enlarged to a size the default path reduces at small resolutions."""
    return ImageOps.fit(_photos()[name], size, BICUBIC)


@functools.lru_cache(maxsize=1)
def laion() -> list[tuple[str, bytes]]:
    """LAION-like JPEGs: real photos at web-scraped sizes and qualities (a fixed seed)."""
    out = []
    for s in laion_like_samples(48, seed=11):
        assert s.image is not None
        out.append((s.key, s.image))
    return out


def reference_exact(data: bytes, size: tuple[int, int], crop: str, key: str, seed: int) -> Cropped:
    """The original preprocess, restated from Pillow calls for 8-bit RGB/L photos: full decode,
    EXIF transpose, exact antialiased bicubic to the cover size, cut."""
    img = Image.open(io.BytesIO(data))
    img.load()
    img = ImageOps.exif_transpose(img) or img
    img = img.convert("RGB")
    (w, h), (tw, th) = img.size, size
    if (w, h) == (tw, th):
        cover, top, left = (w, h), 0, 0
    elif crop == "none":
        cover, top, left = (tw, th), 0, 0
    else:
        scale = max(tw / w, th / h)
        cover = (max(tw, int(round(w * scale))), max(th, int(round(h * scale))))
        if crop == "center":
            top, left = (cover[1] - th) // 2, (cover[0] - tw) // 2
        else:
            rng = crop_rng(seed, key)
            top, left = int(rng.integers(0, cover[1] - th + 1)), int(rng.integers(0, cover[0] - tw + 1))
    resized = img if cover == img.size else img.resize(cover, BICUBIC, reducing_gap=None)
    pixels = np.ascontiguousarray(np.asarray(resized)[top : top + th, left : left + tw])
    upscaled = cover[0] > w or cover[1] > h
    return Cropped(pixels=pixels, width=w, height=h, crop_top=top, crop_left=left, upscaled=upscaled)


def outcome(data: bytes | None, key: str, config: PreprocessConfig) -> Cropped | tuple[str, str]:
    """``preprocess_sample``'s result, or its ``(stage, message)``."""
    if data is None:
        return ("decode", "no image data in this sample (image is missing)")
    try:
        return preprocess_sample(data, key=key, config=config)
    except SampleError as exc:
        return (exc.stage, exc.message)


def geometry(c: Cropped) -> tuple[int, int, int, int, bool]:
    return (c.width, c.height, c.crop_top, c.crop_left, c.upscaled)


def with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(img, exif=exif.tobytes())


def claims_size(data: bytes, width: int, height: int) -> bytes:
    """A JPEG whose SOF0 claims ``width x height`` (the scan data stays as it is)."""
    at = data.index(b"\xff\xc0")
    return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]


@pytest.fixture
def reduced_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Records ``(reduced image size, upright source size)`` of every reduced-scale decode."""
    calls: list[tuple[tuple[int, int], tuple[int, int]]] = []

    def spy(data: bytes, **kwargs: Any) -> tuple[Image.Image, tuple[int, int]] | None:
        out = decode_jpeg_reduced(data, **kwargs)
        if out is not None:
            calls.append((out[0].size, out[1]))
        return out

    monkeypatch.setattr(pre, "decode_jpeg_reduced", spy)
    return calls


# --------------------------------------------------------------------------- crop geometry


def test_crop_box_is_pure_geometry_on_the_source_size() -> None:
    assert crop_box((640, 427), (256, 256), crop="center", key="k", seed=0) == CropBox((384, 256), 0, 64)
    assert crop_box((427, 640), (256, 256), crop="center", key="k", seed=0) == CropBox((256, 384), 64, 0)
    assert crop_box((600, 400), (256, 256), crop="none", key="k", seed=0) == CropBox((256, 256), 0, 0)
    for crop in CROPS:
        assert crop_box((256, 256), (256, 256), crop=crop, key="k", seed=0) == CropBox((256, 256), 0, 0)
    rnd = [crop_box((640, 427), (128, 128), crop="random", key=f"k{i}", seed=7) for i in range(12)]
    assert {b.resize_to for b in rnd} == {(192, 128)} and len({b.left for b in rnd}) > 3
    assert CropBox((300, 200), 0, 0).upscales((299, 400)) and not CropBox((300, 200), 0, 0).upscales((300, 200))
    with pytest.raises(ConfigError, match="valid values: center, none, random"):
        crop_box((10, 10), (5, 5), crop="middle", key="k", seed=0)


def test_window_only_resize_is_the_full_resize_within_one_level() -> None:
    # The reduced path resamples only the kept window; the exact path the whole image.
    for name, crop in (("chelsea", "center"), ("coffee", "random"), ("rocket", "center"), ("brick", "none")):
        img = _photos()[name]
        for size in ((128, 128), (200, 96)):
            box = crop_box(img.size, size, crop=crop, key=name, seed=1)
            full = crop_resized(img, box, source=img.size, size=size)
            window = crop_resized(img, box, source=img.size, size=size, window_only=True)
            assert geometry(window) == geometry(full)
            diff = np.abs(window.pixels.astype(np.int16) - full.pixels.astype(np.int16))
            assert diff.max() <= 1 and diff.mean() < 0.01, (name, size)


# --------------------------------------------------------------------------- exact path


@pytest.mark.parametrize(("resolution", "crop"), [(256, "center"), ([320, 192], "random"), (64, "none")])
def test_exact_path_is_the_original_bit_for_bit(resolution: int | list[int], crop: str) -> None:
    config = PreprocessConfig(resolution=resolution, crop=crop, seed=5, **EXACT)
    photos = [(s.key, s.image) for s in photo_samples()]
    turned = [(f"o{o}", with_orientation(big_photo("chelsea", (700, 500)), o)) for o in (3, 6)]
    for key, data in laion()[:24] + photos + turned:
        assert data is not None
        got = preprocess_sample(data, key=key, config=config)
        ref = reference_exact(data, config.size, crop, key, 5)
        assert geometry(got) == geometry(ref), key
        np.testing.assert_array_equal(got.pixels, ref.pixels, err_msg=key)


# --------------------------------------------------------------------------- default path


@pytest.mark.parametrize(("resolution", "crop"), [(256, "center"), ([192, 320], "random"), (96, "none")])
def test_default_path_keeps_the_exact_geometry(
    resolution: int | list[int], crop: str, reduced_calls: list[tuple[tuple[int, int], tuple[int, int]]]
) -> None:
    exact = PreprocessConfig(resolution=resolution, crop=crop, seed=3, **EXACT)
    default = PreprocessConfig(resolution=resolution, crop=crop, seed=3)
    for key, data in laion():
        ref = preprocess_sample(data, key=key, config=exact)
        n = len(reduced_calls)
        got = preprocess_sample(data, key=key, config=default)
        assert geometry(got) == geometry(ref), key
        box = crop_box((ref.width, ref.height), default.size, crop=crop, key=key, seed=3)
        if len(reduced_calls) > n:
            (reduced, source) = reduced_calls[-1]
            assert source == (ref.width, ref.height)
            # Reduced only from at least twice the resize size, and never below it.
            assert source[0] >= 2 * box.resize_to[0] and source[1] >= 2 * box.resize_to[1]
            assert reduced[0] >= box.resize_to[0] and reduced[1] >= box.resize_to[1]
            assert reduced[0] < source[0]
        else:
            np.testing.assert_array_equal(got.pixels, ref.pixels, err_msg=key)
    assert len(reduced_calls) >= 8


def test_default_path_psnr_against_exact(reduced_calls: list[tuple[tuple[int, int], tuple[int, int]]]) -> None:
    exact = PreprocessConfig(resolution=256, **EXACT)
    default = PreprocessConfig(resolution=256)
    db = []
    for key, data in laion():
        fast = preprocess_sample(data, key=key, config=default).pixels
        db.append(psnr(fast, preprocess_sample(data, key=key, config=exact).pixels))
    reduced = [d for d in db if np.isfinite(d)]
    assert len(reduced) == len(reduced_calls) >= 10
    # The bound on the whole mix (images decoded at full size are identical), and a floor on
    # each reduced image.
    assert np.median(db) >= 40 and np.percentile(db, 10) >= 30
    assert np.median(reduced) >= 36 and min(reduced) >= 26


@pytest.mark.parametrize("orientation", range(1, 9))
def test_default_path_every_exif_orientation(
    orientation: int, reduced_calls: list[tuple[tuple[int, int], tuple[int, int]]]
) -> None:
    src = big_photo("chelsea", (960, 640))
    data = with_orientation(src, orientation)
    default, exact = PreprocessConfig(resolution=128), PreprocessConfig(resolution=128, **EXACT)
    got = preprocess_sample(data, key="k", config=default)
    ref = preprocess_sample(data, key="k", config=exact)
    assert reduced_calls and reduced_calls[0][1] == (ref.width, ref.height)
    sideways = orientation >= 5
    assert (ref.width, ref.height) == ((640, 960) if sideways else (960, 640))
    assert geometry(got) == geometry(ref)
    assert psnr(got.pixels, ref.pixels) >= 30
    other = preprocess_sample(with_orientation(src, 1 if orientation != 1 else 3), key="k", config=exact)
    if not sideways:
        assert psnr(got.pixels, other.pixels) < 20


def test_upright_transpose_agrees_with_decode_image_on_broken_exif() -> None:
    src = big_photo("coffee", (300, 200))
    good = Image.Exif()
    good[0x0112] = 6
    cases = {
        "rotated": with_orientation(src, 6),
        "garbage exif": jpeg(src, exif=b"Exif\x00\x00garbage that is no TIFF header"),
        "truncated exif": jpeg(src, exif=good.tobytes()[:14]),
        "orientation 9": with_orientation(src, 9),
        "xmp orientation": jpeg(src, xmp=b'<x:xmpmeta><rdf:Description tiff:Orientation="8"/></x:xmpmeta>'),
    }
    unclear = 0
    for name, data in cases.items():
        try:
            transpose = upright_transpose(open_image(data, max_pixels=None))
        except OrientationUnclear:
            unclear += 1  # the callers decode these the exact way
            continue
        expected = decode_image(data, max_pixels=None)
        stored = Image.open(io.BytesIO(data)).convert("RGB")
        turned = stored if transpose is None else stored.transpose(transpose)
        assert turned.size == expected.size, name
        assert psnr(np.asarray(turned), np.asarray(expected)) == float("inf"), name
    assert unclear <= 1


def _large_variants(bomb: bool = True) -> dict[str, bytes]:
    """Large JPEG kinds (reduced by the default path at small resolutions) and broken ones;
    ``bomb``: with one whose header claims 20000x20000 (only for a ``max_pixels`` that refuses it)."""
    src = big_photo("coffee", (1200, 800))
    good = jpeg(src)
    return {
        "baseline": good,
        "progressive": jpeg(src, progressive=True),
        "grayscale": jpeg(src.convert("L")),
        "cmyk": jpeg(src.convert("CMYK")),
        "444": jpeg(src, subsampling=0),
        "bad exif": jpeg(src, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff"),
        **{f"truncated {f}%": good[: len(good) * f // 100] for f in (5, 30, 70, 99)},
        "corrupt scan": good[:2000] + bytes(range(256)) * 4 + good[3024:],
        "header only": good[: good.index(b"\xff\xda") + 12],
        "empty": b"",
        **({"bomb": claims_size(good, 20_000, 20_000)} if bomb else {}),
    }


@pytest.mark.parametrize("max_pixels", [None, 900_000])
def test_default_path_errors_are_the_exact_paths(max_pixels: int | None) -> None:
    default = PreprocessConfig(resolution=64, max_pixels=max_pixels)
    exact = PreprocessConfig(resolution=64, max_pixels=max_pixels, **EXACT)
    errors = set()
    for name, data in _large_variants(bomb=max_pixels is not None).items():
        got, ref = outcome(data, "k", default), outcome(data, "k", exact)
        if isinstance(ref, tuple):
            assert got == ref, name
            errors.add(name)
        else:
            assert isinstance(got, Cropped) and geometry(got) == geometry(ref), name
            assert psnr(got.pixels, ref.pixels) >= 28, name
    assert {"truncated 5%", "truncated 70%", "header only", "empty"} <= errors
    if max_pixels is not None:
        assert {"bomb", "baseline"} <= errors  # the 1200x800 photos are over the limit too


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_corpus_default_path_same_outcomes_as_exact(kind: str, tmp_path: Path) -> None:
    # At 16 px the corpus' 64 px photos are reduced by the default path.
    default, exact = PreprocessConfig(resolution=16), PreprocessConfig(resolution=16, **EXACT)
    for key, data in _corpus_images(kind, tmp_path):
        got, ref = outcome(data, key, default), outcome(data, key, exact)
        if isinstance(ref, tuple):
            assert got == ref, key
        else:
            assert isinstance(got, Cropped) and geometry(got) == geometry(ref), key
            assert psnr(got.pixels, ref.pixels) >= 25, key


def _corpus_images(kind: str, tmp_path: Path) -> list[tuple[str, bytes | None]]:
    """The image bytes of one bad-input corpus kind, by key (None: a sample without an image)."""
    built = KINDS[kind](tmp_path)
    images: list[tuple[str, bytes | None]] = [(s.key, s.image) for s in built.samples]
    for name, data in built.members:
        stem, _, ext = name.rpartition(".")
        if ext in ("jpg", "png", "gif", "webp"):
            images.append((stem, data))
    return images


# --------------------------------------------------------------------------- device path


def run_device(images: list[bytes | None], config: PreprocessConfig, keys: list[str] | None = None) -> DeviceBatch:
    keys = keys or [f"k{i}" for i in range(len(images))]
    out = preprocess_on_device(images, keys, config=config, device=CPU)
    assert out.pixels.shape == (len(images), config.size[1], config.size[0], 3)
    assert out.pixels.dtype == torch.uint8 and out.pixels.is_contiguous() and out.pixels.device == CPU
    for name in ("width", "height", "crop_top", "crop_left"):
        assert getattr(out, name).dtype == np.int32 and getattr(out, name).shape == (len(images),)
    return out


def assert_same_rows(out: DeviceBatch, images: list[bytes | None], keys: list[str], config: PreprocessConfig) -> None:
    """Row for row, the device batch holds what the CPU path gives: errors, geometry, notes."""
    for i, (data, key) in enumerate(zip(images, keys, strict=True)):
        ref = outcome(data, key, config)
        if isinstance(ref, tuple):
            assert out.errors.get(i) == ref, key
            assert out.width[i] == out.height[i] == out.crop_top[i] == out.crop_left[i] == -1, key
            assert not out.pixels[i].any(), key
            continue
        assert i not in out.errors, (key, out.errors.get(i))
        row = (int(out.width[i]), int(out.height[i]), int(out.crop_top[i]), int(out.crop_left[i]))
        assert row == geometry(ref)[:4], key
        assert out.notes[i] == pre.upscale_note(ref), key
        assert psnr(out.pixels[i].numpy(), ref.pixels) >= 38, key


@pytest.mark.parametrize(("resolution", "crop"), [(64, "center"), ([320, 192], "random"), (1024, "none")])
def test_device_parity_with_the_exact_path_on_photos(resolution: int | list[int], crop: str) -> None:
    samples = photo_samples()
    images: list[bytes | None] = [s.image for s in samples]
    keys = [s.key for s in samples]
    exact = PreprocessConfig(resolution=resolution, crop=crop, seed=2, **EXACT)
    out = run_device(images, exact, keys)
    assert out.gpu_decoded == len(samples) and out.cpu_fallback == 0 and not out.errors
    assert_same_rows(out, images, keys, exact)
    # Photos smaller than the resolution carry the CPU path's note (checked row by row above).
    assert any(out.notes) == (resolution != 64)


@pytest.mark.parametrize("resolution", [64, 256])
def test_device_parity_with_the_default_path_on_photos(resolution: int) -> None:
    samples = photo_samples()
    default, exact = PreprocessConfig(resolution=resolution), PreprocessConfig(resolution=resolution, **EXACT)
    out = run_device([s.image for s in samples], default)
    assert out.gpu_decoded == len(samples)
    for i, s in enumerate(samples):
        assert s.image is not None
        fast = preprocess_sample(s.image, key=f"k{i}", config=default)
        full = preprocess_sample(s.image, key=f"k{i}", config=exact)
        row = (int(out.width[i]), int(out.height[i]), int(out.crop_top[i]), int(out.crop_left[i]))
        assert row == geometry(fast)[:4]
        device = out.pixels[i].numpy()
        # The device decodes at full size: the exact path's pixels; against the default path's
        # reduced-scale decode it is as close as that path is to the exact one.
        assert psnr(device, full.pixels) >= 38, s.key
        assert psnr(device, fast.pixels) >= min(38.0, psnr(fast.pixels, full.pixels) - 1), s.key


def test_device_float_resize_matches_pillow() -> None:
    # The float32 resize runs on CUDA devices; here its result is checked on the CPU.
    for name in ("astronaut", "coffee", "grass"):
        img = _photos()[name]
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
        for size in ((200, 130), (96, 96), (900, 700)):
            ref = np.asarray(img.resize(size, BICUBIC, reducing_gap=None))
            got = gpu._resize_float(x, size).permute(1, 2, 0).numpy()
            assert got.shape == ref.shape and psnr(got, ref) >= 45, (name, size)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_device_every_exif_orientation(orientation: int) -> None:
    src = big_photo("chelsea", (480, 320))
    data = with_orientation(src, orientation)
    config = PreprocessConfig(resolution=[96, 64], crop="random", **EXACT)
    out = run_device([data], config, ["key"])
    assert out.gpu_decoded == 1
    assert_same_rows(out, [data], ["key"], config)
    assert (out.width[0], out.height[0]) == ((320, 480) if orientation >= 5 else (480, 320))
    if orientation != 1:
        plain = preprocess_sample(with_orientation(src, 1), key="key", config=config)
        assert psnr(out.pixels[0].numpy(), plain.pixels) < 25


def test_device_bad_input_corpus_matches_the_cpu_path(tmp_path: Path) -> None:
    keys: list[str] = []
    images: list[bytes | None] = []
    for kind in sorted(KINDS):
        for key, data in _corpus_images(kind, tmp_path / kind):
            keys.append(f"{kind}/{key}")
            images.append(data)
    for config in (PreprocessConfig(resolution=64), PreprocessConfig(resolution=16, **EXACT)):
        out = run_device(images, config, keys)
        assert_same_rows(out, images, keys, config)
        assert out.gpu_decoded > 5 and out.cpu_fallback > 5
        assert out.gpu_decoded + out.cpu_fallback == sum(d is not None for d in images)


def test_device_large_variants_match_the_cpu_path() -> None:
    for max_pixels in (None, 900_000):
        variants = _large_variants(bomb=max_pixels is not None)
        images: list[bytes | None] = list(variants.values())
        keys = list(variants)
        config = PreprocessConfig(resolution=64, max_pixels=max_pixels, **EXACT)
        out = run_device(images, config, keys)
        assert_same_rows(out, images, keys, config)
        on_device = {"baseline", "progressive", "grayscale", "444", "bad exif"} if max_pixels is None else set()
        assert out.gpu_decoded == len(on_device)


def _routed_to_cpu(data: bytes) -> DeviceBatch:
    config = PreprocessConfig(resolution=64)
    out = run_device([data], config)
    assert out.gpu_decoded == 0 and out.cpu_fallback == 1
    assert_same_rows(out, [data], ["k0"], config)
    return out


def test_png_and_cmyk_jpeg_take_the_cpu_path() -> None:
    src = big_photo("coffee", (300, 200))
    buf = io.BytesIO()
    src.save(buf, "PNG")
    png, cmyk = buf.getvalue(), jpeg(src.convert("CMYK"))
    config = PreprocessConfig(resolution=64)
    out = run_device([png, jpeg(src), cmyk, None], config)
    assert (out.gpu_decoded, out.cpu_fallback) == (1, 2)
    assert out.errors == {3: ("decode", "no image data in this sample (image is missing)")}
    assert psnr(out.pixels[0].numpy(), out.pixels[1].numpy()) > 30  # the same photo either way
    assert psnr(out.pixels[2].numpy(), out.pixels[1].numpy()) > 25


def test_unusual_jpeg_codings_take_the_cpu_path() -> None:
    src = big_photo("coffee", (300, 200))
    _routed_to_cpu(jpeg(src, keep_rgb=True))  # RGB-coded, Adobe transform 0
    base = jpeg(src)
    # SOF9 (arithmetic coding) and 4:1:1 sampling (luma 4x1): the header still reads.
    _routed_to_cpu(base.replace(b"\xff\xc0", b"\xff\xc9", 1))
    at = base.index(b"\xff\xc0") + 11
    _routed_to_cpu(base[:at] + b"\x41" + base[at + 1 :])
    _routed_to_cpu(base + b"trailing bytes")  # no EOI at the end


def test_bomb_is_refused_from_the_header_without_a_device_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = gpu.decode_jpeg

    def spy(data: Any, **kwargs: Any) -> Any:
        seen.append(len(data) if isinstance(data, list) else 1)
        return real(data, **kwargs)

    monkeypatch.setattr(gpu, "decode_jpeg", spy)
    good = jpeg(big_photo("coffee", (300, 200)))
    bomb = claims_size(good, 20_000, 20_000)
    out = run_device([bomb, good], PreprocessConfig(resolution=64))
    assert seen == [1]  # one call, holding the good image only
    stage, reason = out.errors[0]
    assert stage == "decode" and "400000000" in reason and "preprocess.max_pixels" in reason


def test_failed_batch_decode_is_retried_per_image_then_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    samples = photo_samples()[:6]
    images: list[bytes | None] = [s.image for s in samples]
    config = PreprocessConfig(resolution=64, crop="random", **EXACT)
    expected = run_device(images, config)
    real = gpu.decode_jpeg
    bad = images[2]

    def flaky(data: Any, **kwargs: Any) -> Any:
        if isinstance(data, list):
            raise RuntimeError("nvjpeg batch failure")
        if bytes(data.numpy()) == bad:
            raise RuntimeError("this one fails alone too")
        return real(data, **kwargs)

    monkeypatch.setattr(gpu, "decode_jpeg", flaky)
    out = run_device(images, config)
    assert (out.gpu_decoded, out.cpu_fallback) == (5, 1)
    assert not out.errors
    for name in ("width", "height", "crop_top", "crop_left"):
        np.testing.assert_array_equal(getattr(out, name), getattr(expected, name))
    others = [0, 1, 3, 4, 5]
    torch.testing.assert_close(out.pixels[others], expected.pixels[others], atol=0, rtol=0)
    assert_same_rows(out, images, [f"k{i}" for i in range(6)], config)


def test_wrong_shape_from_the_decoder_takes_the_cpu_path(monkeypatch: pytest.MonkeyPatch) -> None:
    real: Callable[..., Any] = gpu.decode_jpeg

    def shrunk(data: Any, **kwargs: Any) -> Any:
        out = real(data, **kwargs)
        return [t[:, 1:] for t in out] if isinstance(out, list) else out[:, 1:]

    monkeypatch.setattr(gpu, "decode_jpeg", shrunk)
    data = jpeg(big_photo("coffee", (300, 200)))
    out = run_device([data], PreprocessConfig(resolution=64))
    assert (out.gpu_decoded, out.cpu_fallback) == (0, 1)
    assert_same_rows(out, [data], ["k0"], PreprocessConfig(resolution=64))


def test_device_batch_small_chunks_and_bad_config(monkeypatch: pytest.MonkeyPatch) -> None:
    samples = photo_samples()[:5]
    images: list[bytes | None] = [s.image for s in samples]
    config = PreprocessConfig(resolution=32)
    whole = run_device(images, config)
    monkeypatch.setattr(gpu, "DECODE_CHUNK_PIXELS", 1)  # one image per decode call
    torch.testing.assert_close(run_device(images, config).pixels, whole.pixels, atol=0, rtol=0)
    empty = run_device([], config)
    assert empty.pixels.shape == (0, 32, 32, 3) and empty.gpu_decoded == 0
    with pytest.raises(ConfigError, match="preprocess.crop"):
        preprocess_on_device(images, ["k"] * 5, config=PreprocessConfig(crop="middle"), device=CPU)
    with pytest.raises(ValueError, match="keys"):
        preprocess_on_device(images, ["k"], config=config, device=CPU)


def test_device_rows_match_preprocess_batch() -> None:
    samples = photo_samples()[:4]
    images: list[bytes | None] = [s.image for s in samples] + [b"<html>", None]
    keys = [s.key for s in samples] + ["html", "none"]
    config = PreprocessConfig(resolution=48, crop="random", seed=9)
    image_column = np.empty(len(images), dtype=object)
    image_column[:] = images
    batch: dict[str, np.ndarray] = {
        "key": np.array(keys, dtype=object),
        "image": image_column,
        "total": np.full(len(keys), -1, dtype=np.int64),
    }
    ref = preprocess_batch(batch, config=config)
    out = run_device(images, config, keys)
    for name in ("width", "height", "crop_top", "crop_left"):
        np.testing.assert_array_equal(getattr(out, name), ref[name])
    assert {i: reason for i, (_, reason) in out.errors.items()} == {
        i: e for i, e in enumerate(ref["error"]) if e is not None
    }
    assert [out.errors.get(i, (None,))[0] for i in range(len(keys))] == list(ref["stage"])


def test_decode_auto_keeps_decoding_on_the_cpus_when_there_are_16_per_gpu() -> None:
    from latentize.encoders.pool import CPU_DECODE_MIN_CPUS_PER_GPU, _few_cpus_per_gpu

    assert CPU_DECODE_MIN_CPUS_PER_GPU == 16  # what the H200 run measured (bench/RESULTS.md)
    assert _few_cpus_per_gpu({"CPU": 8.0, "GPU": 1.0})
    assert _few_cpus_per_gpu({"CPU": 120.0, "GPU": 8.0})  # 15 per GPU
    assert not _few_cpus_per_gpu({"CPU": 16.0, "GPU": 1.0})
    assert not _few_cpus_per_gpu({"CPU": 208.0, "GPU": 8.0})
    assert not _few_cpus_per_gpu({"CPU": 4.0})  # no GPU: nothing to decode on
