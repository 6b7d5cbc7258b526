"""Aspect-ratio buckets and several resolutions: the bucket generator, the nearest-ratio rule,
the size checks and the per-size preprocessing (no Ray)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentize.config import BucketGenerator, load_config
from latentize.demo import laion_like_samples, photo_images
from latentize.errors import ConfigError
from latentize.preprocess import preprocess_batch, preprocess_sample
from latentize.preprocess.buckets import Targets, generate_buckets, nearest_bucket, resolve_targets

# kohya-ss sd-scripts' `make_bucket_resolutions((1024, 1024), min_size=512, max_size=2048,
# divisible=64)` (library/model_util.py): for every width the largest height with w·h <= 1024²,
# and the transposes. Portrait half (w < h); the landscape half is its transposes.
KOHYA_SDXL_PORTRAIT = [
    (512, 2048), (512, 1984), (512, 1920), (512, 1856),
    (576, 1792), (576, 1728), (576, 1664),
    (640, 1600), (640, 1536),
    (704, 1472), (704, 1408),
    (768, 1344), (768, 1280),
    (832, 1216), (896, 1152), (960, 1088),
]  # fmt: skip
# The training buckets of the SDXL paper (Podell et al. 2023, "SDXL: Improving Latent Diffusion
# Models for High-Resolution Image Synthesis", appendix, multi-aspect training table), portrait
# half as (width, height): kohya's list plus four buckets that are not the largest for their width.
SDXL_PAPER_EXTRA_PORTRAIT = [(704, 1344), (832, 1152), (896, 1088), (960, 1024)]


def _both(portrait: list[tuple[int, int]]) -> set[tuple[int, int]]:
    return set(portrait) | {(h, w) for w, h in portrait} | {(1024, 1024)}


def test_generator_reproduces_the_published_sdxl_buckets() -> None:
    made = generate_buckets(BucketGenerator(area=1024 * 1024, step=64, min_ratio=0.25, max_ratio=4.0))
    assert set(made) == _both(KOHYA_SDXL_PORTRAIT) and len(made) == 33
    paper = _both(KOHYA_SDXL_PORTRAIT + SDXL_PAPER_EXTRA_PORTRAIT)
    assert set(made) <= paper and len(paper - set(made)) == 8
    for w, h in made:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024
        # As large as the area allows: one more step in either side overflows it.
        assert (w + 64) * h > 1024 * 1024 or w * (h + 64) > 1024 * 1024
    ratios = [w / h for w, h in made]
    assert ratios == sorted(ratios) and min(ratios) == 0.25 and max(ratios) == 4.0


def _reference_nearest(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The rule written out plainly: smallest |log(bucket ratio) - log(image ratio)|; among
    equally near buckets the one with the larger area."""
    best: tuple[int, int] | None = None
    best_distance = math.inf
    for bucket in buckets:
        distance = abs(math.log(bucket[0] / bucket[1]) - math.log(size[0] / size[1]))
        if distance < best_distance - 1e-12 or (
            abs(distance - best_distance) <= 1e-12 and best is not None and bucket[0] * bucket[1] > best[0] * best[1]
        ):
            best, best_distance = bucket, distance
    assert best is not None
    return best


def test_nearest_bucket_equals_the_reference_rule_on_real_photos() -> None:
    buckets = generate_buckets(BucketGenerator(area=1024 * 1024))
    sizes = [img.size for _, img in photo_images()]
    sizes += [Image.open(io.BytesIO(s.image)).size for s in laion_like_samples(120, seed=3)]
    assert len({round(w / h, 2) for w, h in sizes}) > 40  # assorted shapes, not a handful
    for size in sizes:
        assert nearest_bucket(size, buckets) == _reference_nearest(size, buckets), size


def test_ties_go_to_the_larger_bucket() -> None:
    assert nearest_bucket((300, 300), [(128, 64), (64, 128)]) in {(128, 64), (64, 128)}
    assert nearest_bucket((300, 300), [(64, 64), (128, 128)]) == (128, 128)
    assert nearest_bucket((300, 300), [(128, 64), (96, 192)]) == (96, 192)  # equally far, larger


def _pre(**preprocess: object):
    return load_config(base={"output": {"path": "x"}, "preprocess": preprocess}).preprocess


def test_sizes_not_multiple_of_the_downsampling_factor_are_refused_with_the_pair() -> None:
    with pytest.raises(ConfigError, match=r"^preprocess\.buckets: \[100, 64\] is not a multiple of .* factor 8"):
        resolve_targets(_pre(buckets=[[64, 64], [100, 64]]), 8)
    with pytest.raises(ConfigError, match=r"^preprocess\.resolution: \[100, 100\]"):
        resolve_targets(_pre(resolutions=[64, 100]), 8)
    assert resolve_targets(_pre(buckets=[[64, 64], [96, 64]]), 32).per_resolution  # 96 % 32 == 0


def test_buckets_per_resolution_are_scaled_as_documented() -> None:
    made = resolve_targets(_pre(resolutions=[256, 512], buckets={"area": 1024 * 1024, "step": 64}), 8)
    assert made.per_resolution[0] == tuple(generate_buckets(BucketGenerator(area=256 * 256, step=64)))
    assert made.per_resolution[1] == tuple(generate_buckets(BucketGenerator(area=512 * 512, step=64)))
    listed = resolve_targets(_pre(resolutions=[256, 512], buckets=[[1024, 1024], [1152, 896]]), 8)
    assert listed.per_resolution == (((256, 256), (288, 224)), ((512, 512), (576, 448)))
    assert resolve_targets(_pre(resolution=256), 8) == Targets((((256, 256),),))


def _jpeg(size: tuple[int, int], seed: int = 0) -> bytes:
    name, img = photo_images()[seed]
    buf = io.BytesIO()
    img.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _batch(images: list[bytes | None]) -> dict[str, np.ndarray]:
    n = len(images)
    return {
        "key": np.array([f"k{i}" for i in range(n)], dtype=object),
        "index": np.arange(n, dtype=np.int64),
        "image": np.array(images, dtype=object),
        "error": np.full(n, None, dtype=object),
        "stage": np.full(n, None, dtype=object),
        "total": np.full(n, -1, dtype=np.int64),
    }


def test_an_image_at_its_buckets_size_passes_untouched(tmp_path: Path) -> None:
    config = _pre(buckets=[[64, 64], [96, 64], [64, 96]])
    targets = resolve_targets(config, 8)
    data = _jpeg((96, 64))
    out = preprocess_batch(_batch([data]), config=config, targets=targets)
    assert list(out["folder"]) == ["96x64"] and list(out["slot"]) == [0]
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(out["pixels"][0], decoded)
    assert (out["crop_top"][0], out["crop_left"][0], out["width"][0], out["height"][0]) == (0, 0, 96, 64)


def test_several_resolutions_decode_once_into_one_row_each() -> None:
    config = _pre(resolutions=[64, [96, 64]], exact=True)
    targets = resolve_targets(config, 8)
    images = [_jpeg((300, 200), 1), None, _jpeg((120, 240), 2)]
    out = preprocess_batch(_batch(images), config=config, targets=targets)
    # Each good sample gives a row per resolution; the missing image is one error row.
    assert list(out["key"]) == ["k0", "k0", "k1", "k2", "k2"]
    assert list(out["slot"]) == [0, 1, -1, 0, 1]
    assert list(out["folder"]) == ["64x64", "96x64", None, "64x64", "96x64"]
    assert out["error"][2] and out["stage"][2] == "decode" and out["pixels"][2].shape == (0, 0, 3)
    # Each row equals the single-size path at that size.
    for row, size in ((0, 64), (1, (96, 64)), (4, (96, 64))):
        single = _pre(resolution=size if isinstance(size, int) else list(size), exact=True)
        want = preprocess_sample(images[0 if row < 2 else 2], key=out["key"][row], config=single)
        np.testing.assert_array_equal(out["pixels"][row], want.pixels)
        assert (out["crop_top"][row], out["crop_left"][row]) == (want.crop_top, want.crop_left)
