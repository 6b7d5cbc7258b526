"""Unit tests of latentize.preprocess: decode, mode conversion, resize/crop, the batch function.

Real photos from scikit-image and scikit-learn are used wherever image content matters.
"""

from __future__ import annotations

import importlib.util
import io
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentize.config import PreprocessConfig
from latentize.errors import ConfigError, SampleError
from latentize.preprocess import (
    CROPS,
    Cropped,
    decode_image,
    preprocess_batch,
    preprocess_sample,
    resize_and_crop,
    to_rgb,
)
from latentize.preprocess.crop import crop_rng

# find_spec avoids importing the (slow) packages just to locate their data files.
SKIMAGE_DATA = Path(importlib.util.find_spec("skimage").origin).parent / "data"
SKLEARN_IMAGES = Path(importlib.util.find_spec("sklearn").origin).parent / "datasets" / "images"

BICUBIC = Image.Resampling.BICUBIC


def photo(name: str) -> Image.Image:
    """A shipped photo, loaded."""
    path = SKLEARN_IMAGES / name if name.endswith(".jpg") else SKIMAGE_DATA / name
    with Image.open(path) as img:
        img.load()
        return img.copy()


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# --- decode -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("orientation", "transpose"),
    [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)],
)
def test_exif_orientation_is_applied(orientation: int, transpose: Image.Transpose) -> None:
    src = photo("chelsea.png")  # 451x300, landscape
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(src, "JPEG", quality=95, exif=exif.tobytes())

    out = decode_image(data, max_pixels=None)

    assert out.mode == "RGB"
    assert out.size == (300, 451)
    right = np.asarray(src.transpose(transpose))
    wrong = np.asarray(src.transpose(Image.Transpose.ROTATE_180).transpose(transpose))
    assert mean_abs_diff(np.asarray(out), right) < 3.0
    assert mean_abs_diff(np.asarray(out), wrong) > 20.0


def test_cmyk_jpeg_decodes_to_matching_rgb() -> None:
    src = photo("china.jpg")
    data = encode(src.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"

    out = decode_image(data, max_pixels=None)

    assert out.mode == "RGB" and out.size == src.size
    assert mean_abs_diff(np.asarray(out), np.asarray(src)) < 4.0


def test_16bit_png_keeps_contrast() -> None:
    gray = np.asarray(photo("camera.png"))
    data = encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"

    out = np.asarray(decode_image(data, max_pixels=None))

    # v * 257 >> 8 == v: the photo comes back exactly, not clipped to white.
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)
    assert out.std() > 30


def test_grayscale_png_to_rgb() -> None:
    gray = np.asarray(photo("camera.png"))
    out = np.asarray(decode_image(encode(Image.fromarray(gray), "PNG"), max_pixels=None))
    assert out.shape == gray.shape + (3,)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_la_alpha_composited_on_white() -> None:
    gray = np.asarray(photo("camera.png"))
    alpha = np.full_like(gray, 255)
    alpha[:, :256] = 0
    la = Image.merge("LA", (Image.fromarray(gray), Image.fromarray(alpha)))

    out = np.asarray(decode_image(encode(la, "PNG"), max_pixels=None))

    assert (out[:, :256] == 255).all()
    np.testing.assert_array_equal(out[:, 256:, 0], gray[:, 256:])


def test_rgba_transparent_pixels_become_white() -> None:
    rgb = np.asarray(photo("chelsea.png"))
    alpha = np.full(rgb.shape[:2], 255, dtype=np.uint8)
    alpha[:100] = 0  # fully transparent band, colour underneath kept (not premultiplied)
    alpha[100:150] = 128
    rgba = Image.fromarray(np.dstack([rgb, alpha]))

    out = np.asarray(decode_image(encode(rgba, "PNG"), max_pixels=None))

    assert (out[:100] == 255).all()
    half = (rgb[100:150].astype(np.float64) * 128 + 255 * 127) / 255
    assert np.abs(out[100:150] - half).max() <= 1.0
    np.testing.assert_array_equal(out[150:], rgb[150:])


def test_palette_transparency_composited_on_white() -> None:
    pal = photo("chelsea.png").quantize(colors=32)
    index = pal.getpixel((0, 0))
    pal.info["transparency"] = index
    data = encode(pal, "PNG", transparency=index)
    reopened = Image.open(io.BytesIO(data))
    assert reopened.mode == "P" and "transparency" in reopened.info

    out = np.asarray(decode_image(data, max_pixels=None))

    idx = np.asarray(pal)
    assert (out[idx == index] == 255).all()
    # Other pixels keep their palette colour.
    ref = np.asarray(pal.convert("RGB"))
    np.testing.assert_array_equal(out[idx != index], ref[idx != index])


def test_animated_gif_gives_first_frame() -> None:
    size = (200, 150)
    first = photo("chelsea.png").resize(size)
    second = photo("coffee.png").resize(size)
    data = encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2

    out = np.asarray(decode_image(data, max_pixels=None))

    assert out.shape == (150, 200, 3)
    assert mean_abs_diff(out, np.asarray(first)) < 12.0
    assert mean_abs_diff(out, np.asarray(second)) > 40.0


def test_progressive_jpeg() -> None:
    src = photo("flower.jpg")
    data = encode(src, "JPEG", quality=95, progressive=True)
    assert Image.open(io.BytesIO(data)).info.get("progressive")

    out = decode_image(data, max_pixels=None)

    assert out.size == src.size
    assert mean_abs_diff(np.asarray(out), np.asarray(src)) < 3.0


def _decode_error(data: bytes, max_pixels: int | None = None) -> SampleError:
    with pytest.raises(SampleError) as info:
        decode_image(data, max_pixels=max_pixels)
    assert info.value.stage == "decode"
    return info.value


def test_empty_bytes() -> None:
    assert "empty image data (0 bytes)" in _decode_error(b"").message


def test_html_named_jpg_is_not_an_image() -> None:
    html = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head></html>\n"
    assert "not a recognised image format" in _decode_error(html).message


def test_random_bytes_are_not_an_image() -> None:
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert "not a recognised image format" in _decode_error(noise).message


def test_truncated_jpeg() -> None:
    data = (SKLEARN_IMAGES / "china.jpg").read_bytes()
    assert "truncated" in _decode_error(data[: len(data) // 2]).message.lower()


def test_decompression_bomb_refused_with_key_and_numbers() -> None:
    data = encode(photo("chelsea.png"), "PNG")  # 451 * 300 = 135300 pixels
    msg = _decode_error(data, max_pixels=100_000).message
    assert "preprocess.max_pixels" in msg and "135300" in msg and "100000" in msg
    assert decode_image(data, max_pixels=None).size == (451, 300)
    assert decode_image(data, max_pixels=135_300).size == (451, 300)


def _png_with_header_size(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width x height``; its pixel data is far too short."""
    data = bytearray(encode(photo("chelsea.png"), "PNG"))
    assert data[12:16] == b"IHDR"
    body = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = body
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + body))
    return bytes(data)


def test_bomb_checked_on_header_before_decoding_pixels() -> None:
    # 40000x40000 with almost no data: if pixels were decoded first this would be a
    # "truncated" error (after allocating 4.8 GB), not the size refusal.
    data = _png_with_header_size(40_000, 40_000)
    msg = _decode_error(data, max_pixels=178_956_970).message
    assert "preprocess.max_pixels" in msg and "1600000000" in msg


def test_pillow_global_limit_neither_blocks_nor_leaks(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(photo("chelsea.png"), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_image(data, max_pixels=None).size == (451, 300)
        assert decode_image(data, max_pixels=10**9).size == (451, 300)
    assert Image.MAX_IMAGE_PIXELS == 1000
    # Pillow's own refusal still names our config key.
    assert "preprocess.max_pixels" in _decode_error(data, max_pixels=100).message
    # Between Pillow's soft and hard limits: no warning escapes, our limit decides.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_image(data, max_pixels=200_000).size == (451, 300)


# --- to_rgb -----------------------------------------------------------------------------------


def test_to_rgb_other_modes() -> None:
    gray = np.asarray(photo("camera.png"))
    rgb = photo("chelsea.png")
    cases = {
        "1": (Image.fromarray(gray).convert("1"), None),
        "YCbCr": (rgb.convert("YCbCr"), np.asarray(rgb)),
        "I;16B": (Image.fromarray((gray.astype(np.uint16) * 257).astype(">u2")), gray),
        "I": (Image.fromarray(gray.astype(np.int32) * 257), gray),
        "F": (Image.fromarray(gray.astype(np.float32) / 255.0), gray),
        "RGB": (rgb, np.asarray(rgb)),
    }
    for mode, (img, expected) in cases.items():
        assert img.mode == mode
        out = to_rgb(img)
        assert out.mode == "RGB" and out.size == img.size, mode
        arr = np.asarray(out)
        if expected is None:
            assert set(np.unique(arr)) <= {0, 255}
        elif expected.ndim == 2:
            assert mean_abs_diff(arr[..., 1], expected) < 1.0, mode
        else:
            assert mean_abs_diff(arr, expected) < 2.0, mode
    assert to_rgb(rgb) is rgb


def test_to_rgb_wide_int_range_is_stretched_not_clipped() -> None:
    gray = np.asarray(photo("camera.png")).astype(np.int32)
    out = np.asarray(to_rgb(Image.fromarray(gray * 100_000 - 5_000_000)))
    # A linear map of the photo: perfectly correlated, full range used.
    assert out.min() == 0 and out.max() == 255
    assert np.corrcoef(out[..., 0].ravel(), gray.ravel())[0, 1] > 0.999


# --- resize / crop ----------------------------------------------------------------------------


@pytest.mark.parametrize("crop", ["center", "random", "none"])
def test_exact_size_passes_through_bit_identical(crop: str) -> None:
    img = photo("astronaut.png")
    out = resize_and_crop(img, size=(512, 512), crop=crop, key="k", seed=0)
    np.testing.assert_array_equal(out.pixels, np.asarray(img))
    assert (out.width, out.height, out.crop_top, out.crop_left) == (512, 512, 0, 0)


def test_center_crop_landscape() -> None:
    img = photo("china.jpg")  # 640x427
    out = resize_and_crop(img, size=(256, 256), crop="center", key="k", seed=0)
    assert isinstance(out, Cropped)
    assert out.pixels.shape == (256, 256, 3) and out.pixels.dtype == np.uint8
    assert out.pixels.flags.c_contiguous
    assert (out.width, out.height) == (640, 427)
    # 640x427 -> 384x256, then (384 - 256) // 2 = 64 columns off the left.
    assert (out.crop_top, out.crop_left) == (0, 64)
    ref = np.asarray(img.resize((384, 256), BICUBIC))[:, 64:320]
    np.testing.assert_array_equal(out.pixels, ref)


def test_center_crop_portrait() -> None:
    img = photo("china.jpg").transpose(Image.Transpose.ROTATE_90)  # 427x640
    out = resize_and_crop(img, size=(256, 256), crop="center", key="k", seed=0)
    assert (out.width, out.height) == (427, 640)
    assert (out.crop_top, out.crop_left) == (64, 0)
    ref = np.asarray(img.resize((256, 384), BICUBIC))[64:320]
    np.testing.assert_array_equal(out.pixels, ref)


def test_center_crop_non_square_resolution() -> None:
    img = photo("coffee.png")  # 600x400
    config = PreprocessConfig(resolution=[320, 192], crop="center")
    assert config.size == (320, 192)
    out = resize_and_crop(img, size=config.size, crop="center", key="k", seed=0)
    assert out.pixels.shape == (192, 320, 3)
    # scale = max(320/600, 192/400) -> 320x213, then (213 - 192) // 2 = 10 rows off the top.
    assert (out.crop_top, out.crop_left) == (10, 0)


def test_random_crop_reproducible_per_seed_and_key() -> None:
    img = photo("china.jpg")

    def offsets(key: str, seed: int) -> tuple[int, int]:
        out = resize_and_crop(img, size=(128, 128), crop="random", key=key, seed=seed)
        assert out.pixels.shape == (128, 128, 3)
        assert out.crop_top == 0 and 0 <= out.crop_left <= 192 - 128
        return out.crop_top, out.crop_left

    a = resize_and_crop(img, size=(128, 128), crop="random", key="shard-0/0001", seed=7)
    b = resize_and_crop(img, size=(128, 128), crop="random", key="shard-0/0001", seed=7)
    assert (a.crop_top, a.crop_left) == (b.crop_top, b.crop_left)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    keys = [f"shard-0/{i:04d}" for i in range(12)]
    assert len({offsets(k, 7) for k in keys}) > 3
    assert [offsets(k, 7) for k in keys] != [offsets(k, 8) for k in keys]


def test_random_crop_rng_is_stable_across_processes() -> None:
    code = "from latentize.preprocess.crop import crop_rng;print(crop_rng(3, 'shard-9/key').integers(0, 2**62))"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(other.stdout) == int(crop_rng(3, "shard-9/key").integers(0, 2**62))


def test_none_crop_stretches_to_exact_size() -> None:
    img = photo("coffee.png")
    out = resize_and_crop(img, size=(256, 256), crop="none", key="k", seed=0)
    assert out.pixels.shape == (256, 256, 3)
    assert (out.crop_top, out.crop_left, out.width, out.height) == (0, 0, 600, 400)
    np.testing.assert_array_equal(out.pixels, np.asarray(img.resize((256, 256), BICUBIC)))


def test_upscaling_a_tiny_image() -> None:
    tiny = photo("astronaut.png").resize((12, 9))
    out = resize_and_crop(tiny, size=(64, 64), crop="center", key="k", seed=0)
    assert out.pixels.shape == (64, 64, 3)
    assert (out.width, out.height) == (12, 9)
    assert out.pixels.std() > 10
    assert out.upscaled


@pytest.mark.parametrize(
    ("size", "crop", "upscaled"),
    [
        ((600, 400), "center", False),  # passed through as is
        ((256, 256), "center", False),  # shrunk
        ((256, 256), "none", False),
        ((500, 500), "center", True),  # the 400 side must grow to 500
        ((640, 300), "none", True),  # stretched wider only
        ((640, 300), "random", True),
    ],
)
def test_upscaled_flag(size: tuple[int, int], crop: str, upscaled: bool) -> None:
    img = photo("coffee.png")  # 600x400
    out = resize_and_crop(img, size=size, crop=crop, key="k", seed=0)
    assert out.upscaled is upscaled


def test_unknown_crop_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="preprocess.crop"):
        resize_and_crop(photo("coffee.png"), size=(64, 64), crop="middle", key="k", seed=0)
    assert CROPS.names() == ["center", "none", "random"]


# --- preprocess_sample / preprocess_batch -----------------------------------------------------


def test_preprocess_sample_wraps_unexpected_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    import latentize.preprocess as pre

    def boom(*args: object, **kwargs: object) -> Cropped:
        raise RuntimeError("boom")

    monkeypatch.setattr(pre, "resize_and_crop", boom)
    data = encode(photo("coffee.png"), "PNG")
    with pytest.raises(SampleError) as info:
        preprocess_sample(data, key="k", config=PreprocessConfig(resolution=64))
    assert info.value.stage == "preprocess"
    assert info.value.message == "RuntimeError: boom"


def _read_only(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for arr in batch.values():
        arr.flags.writeable = False
    return batch


def test_preprocess_batch_rows_errors_and_sentinels() -> None:
    config = PreprocessConfig(resolution=64, crop="center")
    good_jpg = (SKLEARN_IMAGES / "flower.jpg").read_bytes()
    good_png = encode(photo("camera.png"), "PNG")
    html = b"<html><body>not found</body></html>"

    def obj(values: list[object]) -> np.ndarray:
        arr = np.empty(len(values), dtype=object)
        arr[:] = values
        return arr

    keys = ["a", "bad", "end", "pre", "b", "missing"]
    batch = _read_only(
        {
            "key": obj(keys),
            "image": obj([good_jpg, html, None, None, good_png, None]),
            "error": obj([None, None, None, "member jpg missing", None, None]),
            "stage": obj([None, None, None, "read", None, None]),
            "total": np.array([-1, -1, 5, -1, -1, -1], dtype=np.int64),
            "shard": obj(["s0"] * 6),
            "index": np.arange(6, dtype=np.int64),
            "caption": obj(["x", "y", None, "z", "w", "v"]),
        }
    )

    out = preprocess_batch(batch, config=config)

    assert "image" not in out
    assert list(out["key"]) == keys
    np.testing.assert_array_equal(out["index"], np.arange(6))
    assert list(out["caption"]) == ["x", "y", None, "z", "w", "v"]
    for name in ("pixels", "width", "height", "crop_top", "crop_left", "error", "stage"):
        assert len(out[name]) == 6, name
    assert out["pixels"].shape == (6, 64, 64, 3) and out["pixels"].dtype == np.uint8
    for name in ("width", "height", "crop_top", "crop_left"):
        assert out[name].dtype == np.int32

    expected_a = preprocess_sample(good_jpg, key="a", config=config)
    np.testing.assert_array_equal(out["pixels"][0], expected_a.pixels)
    assert (out["width"][0], out["height"][0]) == (640, 427)
    assert (out["crop_top"][0], out["crop_left"][0]) == (0, expected_a.crop_left)
    gray = np.asarray(photo("camera.png").resize((64, 64), BICUBIC))
    np.testing.assert_array_equal(out["pixels"][4][..., 0], gray)
    assert out["error"][0] is None and out["error"][4] is None

    # Bad sample -> error row with the decode stage.
    assert out["stage"][1] == "decode" and "not a recognised image format" in out["error"][1]
    # Missing image without an earlier error is reported, not skipped silently.
    assert out["stage"][5] == "decode" and out["error"][5]
    # Sentinel and pre-errored rows are untouched.
    assert out["total"][2] == 5 and out["error"][2] is None and out["stage"][2] is None
    assert out["error"][3] == "member jpg missing" and out["stage"][3] == "read"
    for i in (1, 2, 3, 5):
        assert not out["pixels"][i].any(), i
        assert out["width"][i] == out["height"][i] == out["crop_top"][i] == -1, i
    # The input arrays were not modified.
    assert batch["error"][1] is None and batch["stage"][1] is None
    # No incoming notes column: one is added; these photos were all shrunk, nothing to note.
    assert out["notes"].dtype == object and list(out["notes"]) == [None] * 6


def _obj(values: list[object]) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def test_preprocess_batch_notes_merge_with_upscale() -> None:
    config = PreprocessConfig(resolution=64, crop="center")
    big = encode(photo("coffee.png"), "PNG")
    tiny = encode(photo("astronaut.png").resize((12, 9)), "PNG")
    sidecar = "caption is not valid UTF-8 (undecodable bytes replaced)"
    base = {
        "key": _obj(["big", "tiny", "tiny2", "err", "end"]),
        "image": _obj([big, tiny, tiny, None, None]),
        "error": _obj([None, None, None, "no image member", None]),
        "stage": _obj([None, None, None, "read", None]),
        "total": np.array([-1, -1, -1, -1, 4], dtype=np.int64),
    }
    with_notes = _read_only({**base, "notes": _obj([sidecar, sidecar, None, sidecar, None])})
    out = preprocess_batch(with_notes, config=config)
    assert list(out) == [
        "key",
        "error",
        "stage",
        "total",
        "notes",
        "pixels",
        "width",
        "height",
        "crop_top",
        "crop_left",
        "slot",
        "folder",
    ]
    assert list(out["notes"]) == [
        sidecar,
        f"{sidecar}; upscaled from 12x9",
        "upscaled from 12x9",
        sidecar,  # an error row keeps what the reader found
        None,
    ]
    assert with_notes["notes"][2] is None  # input untouched
    # Ray hands an all-null string column over as float NaN.
    nan_notes = _read_only({**base, "notes": np.full(5, np.nan)})
    out = preprocess_batch(nan_notes, config=config)
    assert list(out["notes"]) == [None, "upscaled from 12x9", "upscaled from 12x9", None, None]
    assert out["pixels"][1].std() > 10


def test_preprocess_batch_empty_and_bad_config() -> None:
    empty = {
        "key": np.empty(0, dtype=object),
        "image": np.empty(0, dtype=object),
        "error": np.empty(0, dtype=object),
        "stage": np.empty(0, dtype=object),
        "total": np.empty(0, dtype=np.int64),
    }
    out = preprocess_batch(empty, config=PreprocessConfig(resolution=[32, 16]))
    assert out["pixels"].shape == (0, 16, 32, 3)
    with pytest.raises(ConfigError):
        preprocess_batch(empty, config=PreprocessConfig(crop="middle"))
