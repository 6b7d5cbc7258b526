"""Sample shards built from real photos, shared by the demo and the tests.

The photos are the ones shipped inside scikit-image (``skimage/data``) and scikit-learn
(``sklearn/datasets/images``): real images of many sizes and modes (RGB, grayscale, RGBA) that
need no download. Both packages are optional (``pip install 'latentize[demo]'``) and imported
only when a photo is needed.
"""

from __future__ import annotations

import functools
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import fsspec
from PIL import Image, ImageOps

from latentize.errors import ConfigError, LatentizeError

__all__ = [
    "ShardSample",
    "build_demo_shards",
    "corrupt_samples",
    "failed_download",
    "img2dataset_meta",
    "laion_like_samples",
    "photo_images",
    "photo_samples",
    "write_img2dataset_shard",
    "write_parquet_shard",
    "write_webdataset_shard",
]

logger = logging.getLogger(__name__)

# The real photographs among skimage's bundled files (synthetic ones such as chessboard,
# phantom or color are left out); whichever exist in the installed version are used.
_SKIMAGE_PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "cell.png",
    "chelsea.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "logo.png",
    "microaneurysms.png",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "page.png",
    "retina.jpg",
    "rocket.jpg",
    "text.png",
)
_SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")

# Fixed tar member mtime (2024-01-01) so the same samples always give byte-identical shards.
_MTIME = 1_704_067_200


@dataclass
class ShardSample:
    """One sample to write into a test/demo shard (img2dataset layout).

    ``image=None`` writes no image member (a sample the reader must report as broken).
    """

    key: str
    image: bytes | None
    ext: str = "jpg"
    caption: str | None = None
    meta: dict[str, Any] | None = None


def _package_files(package: str, names: tuple[str, ...]) -> dict[str, bytes]:
    try:
        root = resources.files(package)
    except ModuleNotFoundError as exc:
        raise LatentizeError(
            f"the demo photos need {package.split('.')[0]} ({exc.name} is not installed); pip install 'latentize[demo]'"
        ) from exc
    out: dict[str, bytes] = {}
    for name in names:
        entry = root.joinpath(name)
        if entry.is_file():
            out[name.rsplit(".", 1)[0]] = entry.read_bytes()
    return out


@functools.lru_cache(maxsize=1)
def _photo_files() -> tuple[tuple[str, bytes], ...]:
    # File bytes are cached (a few MB), never PIL images: callers may mutate what they get.
    files = _package_files("skimage.data", _SKIMAGE_PHOTOS)
    files.update(_package_files("sklearn.datasets.images", _SKLEARN_PHOTOS))
    if not files:
        raise LatentizeError("no demo photos found in scikit-image / scikit-learn; pip install 'latentize[demo]'")
    return tuple(sorted(files.items()))


def photo_images() -> list[tuple[str, Image.Image]]:
    """The bundled photos as ``(name, image)`` pairs, sorted by name (the file stem).

    Images keep their own size and mode (``camera`` is grayscale, ``logo`` RGBA).

    Raises:
        LatentizeError: scikit-image / scikit-learn are not installed.
    """
    out = []
    for name, data in _photo_files():
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            out.append((name, im.copy()))
    return out


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels hold arbitrary colours; show them on white as a viewer would.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@functools.lru_cache(maxsize=256)
def _photo_jpeg(name: str, resolution: int | None) -> tuple[bytes, int, int, int, int]:
    """JPEG bytes, final width/height and original width/height of one photo."""
    data = dict(_photo_files())[name]
    with Image.open(io.BytesIO(data)) as im:
        image = _to_rgb(im)
    original = image.size
    if resolution is not None:
        image = ImageOps.fit(image, (resolution, resolution), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return (buf.getvalue(), image.width, image.height, original[0], original[1])


def _key(shard: int, index: int) -> str:
    # img2dataset's key: shard number (5 digits) then the index inside the shard (4 digits).
    return f"{shard:05d}{index:04d}"


def _meta(key: str, caption: str, name: str, size: tuple[int, int, int, int]) -> dict[str, Any]:
    width, height, original_width, original_height = size
    return {
        "url": f"https://example.com/photos/{name}.jpg",
        "caption": caption,
        "key": key,
        "status": "success",
        "error_message": None,
        "width": width,
        "height": height,
        "original_width": original_width,
        "original_height": original_height,
    }


def _samples(names: list[str], *, resolution: int | None, shard: int) -> list[ShardSample]:
    out = []
    for i, name in enumerate(names):
        jpeg, width, height, original_width, original_height = _photo_jpeg(name, resolution)
        key = _key(shard, i)
        caption = f"a photo: {name.replace('_', ' ')}"
        out.append(
            ShardSample(
                key=key,
                image=jpeg,
                ext="jpg",
                caption=caption,
                meta=_meta(key, caption, name, (width, height, original_width, original_height)),
            )
        )
    return out


def photo_samples(*, resolution: int | None = None, shard: int = 0) -> list[ShardSample]:
    """One JPEG sample (quality 95, RGB) per bundled photo, img2dataset style.

    Args:
        resolution: when given, each photo is center-cropped to a square and resized to exactly
            ``resolution x resolution`` before encoding (for exact-size test inputs).
        shard: the shard number used in the keys (``f"{shard:05d}{i:04d}"``).
    """
    names = [name for name, _ in _photo_files()]
    return _samples(names, resolution=resolution, shard=shard)


#: Megapixel range and median of :func:`laion_like_samples` (LAION-2B's images are mostly
#: 0.04-4 MP with a median near 0.28 MP).
LAION_MP_RANGE = (0.04, 4.0)
LAION_MP_MEDIAN = 0.28


def laion_like_samples(count: int, *, seed: int = 0, shard: int = 0) -> list[ShardSample]:
    """``count`` JPEGs of the bundled photos at the sizes and shapes of web-scraped data.

    Each sample crops a random window of a random photo to a random aspect ratio (1:2 to 2:1),
    resizes it to a log-normal pixel count with median :data:`LAION_MP_MEDIAN` clipped to
    :data:`LAION_MP_RANGE` (so larger sources are made from upscaled photos, as the bundled
    ones are at most about 2 MP), and saves it at JPEG quality 70-95 with 4:2:0 or 4:4:4 chroma.
    The same ``seed`` gives the same bytes.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    photos = [(name, _to_rgb(image)) for name, image in photo_images()]
    sigma = np.log(LAION_MP_RANGE[1] / LAION_MP_MEDIAN) / 2.5
    out = []
    for i in range(count):
        name, photo = photos[int(rng.integers(len(photos)))]
        ratio = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        mp = float(np.clip(np.exp(rng.normal(np.log(LAION_MP_MEDIAN), sigma)), *LAION_MP_RANGE))
        width = max(16, int(round((mp * 1e6 * ratio) ** 0.5)))
        height = max(16, int(round(width / ratio)))
        image = ImageOps.fit(photo, _fit_size(photo.size, ratio), Image.Resampling.BICUBIC)
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        subsampling = 0 if rng.random() < 0.2 else 2
        image.save(buf, format="JPEG", quality=int(rng.integers(70, 96)), subsampling=subsampling)
        key = _key(shard, i)
        caption = f"a photo: {name.replace('_', ' ')}"
        out.append(
            ShardSample(
                key=key,
                image=buf.getvalue(),
                caption=caption,
                meta=_meta(key, caption, name, (width, height, width, height)),
            )
        )
    return out


def _fit_size(size: tuple[int, int], ratio: float) -> tuple[int, int]:
    """The largest window of ``size`` with aspect ratio ``ratio`` (width / height)."""
    w, h = size
    return (w, max(1, int(w / ratio))) if w / h <= ratio else (max(1, int(h * ratio)), h)


def corrupt_samples(*, shard: int = 0) -> list[ShardSample]:
    """Three broken images: a truncated JPEG (60 % of a real one), zero bytes, HTML as ``.jpg``.

    Keys continue after :func:`photo_samples`' keys of the same shard, so both lists can go
    into one shard.
    """
    names = [name for name, _ in _photo_files()]
    start = len(names)
    jpeg = _photo_jpeg(names[0], None)[0]
    html = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body><h1>Not Found</h1></body></html>\n"
    broken = [
        ("truncated jpeg", jpeg[: int(len(jpeg) * 0.6)]),
        ("empty file", b""),
        ("html page", html),
    ]
    out = []
    for i, (what, data) in enumerate(broken, start=start):
        key = _key(shard, i)
        caption = f"a broken image: {what}"
        meta = {
            "url": f"https://example.com/broken/{what.replace(' ', '_')}.jpg",
            "caption": caption,
            "key": key,
            "status": "success",
            "error_message": None,
        }
        out.append(ShardSample(key=key, image=data, ext="jpg", caption=caption, meta=meta))
    return out


def _meta_bytes(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, ensure_ascii=False).encode("utf-8")


def write_webdataset_shard(
    path: str, samples: list[ShardSample], *, storage_options: dict[str, Any] | None = None
) -> str:
    """Writes ``samples`` as a WebDataset tar (``KEY.<ext>``, ``KEY.txt``, ``KEY.json``).

    ``path`` is any fsspec URL; a ``.tar.gz`` / ``.tgz`` path is gzip-compressed. Members have
    a fixed mtime, so equal samples give identical bytes (plain tar). Returns ``path``.
    """
    # Imported here: importing webdataset pulls in its whole pipeline stack.
    from webdataset import TarWriter

    compress = path.lower().endswith((".gz", ".tgz"))
    with fsspec.open(path, "wb", **(storage_options or {})) as f:
        # TarWriter takes any writable file object (it only hands it to tarfile); encoder=False
        # because every value is given as bytes already.
        with TarWriter(f, encoder=False, compress=compress, mtime=_MTIME) as writer:
            for sample in samples:
                record: dict[str, Any] = {"__key__": sample.key}
                if sample.image is not None:
                    record[sample.ext] = sample.image
                if sample.caption is not None:
                    record["txt"] = sample.caption.encode("utf-8")
                if sample.meta is not None:
                    record["json"] = _meta_bytes(sample.meta)
                writer.write(record)
    logger.debug("wrote %d samples to %s", len(samples), path)
    return path


def write_parquet_shard(path: str, samples: list[ShardSample], *, storage_options: dict[str, Any] | None = None) -> str:
    """Writes ``samples`` in img2dataset's parquet layout: ``key``, ``jpg``, ``txt``, ``json``.

    The image bytes go to the ``jpg`` column whatever their ``ext``. Returns ``path``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "key": pa.array([s.key for s in samples], pa.string()),
            "jpg": pa.array([s.image for s in samples], pa.binary()),
            "txt": pa.array([s.caption for s in samples], pa.string()),
            "json": pa.array(
                [None if s.meta is None else _meta_bytes(s.meta).decode("utf-8") for s in samples],
                pa.string(),
            ),
        }
    )
    with fsspec.open(path, "wb", **(storage_options or {})) as f:
        pq.write_table(table, f)
    logger.debug("wrote %d samples to %s", len(samples), path)
    return path


# --- img2dataset's own layout ---------------------------------------------------------------

#: img2dataset's metadata columns and Arrow types, in its order: ``caption`` and ``url`` come
#: from its input table, the rest from its downloader (``exif`` with extract_exif, ``sha256``
#: with compute_hash, both on by default). Its Parquet output appends the image column ``jpg``.
IMG2DATASET_SCHEMA: tuple[tuple[str, str], ...] = (
    ("caption", "string"),
    ("url", "string"),
    ("key", "string"),
    ("status", "string"),
    ("error_message", "string"),
    ("width", "int32"),
    ("height", "int32"),
    ("original_width", "int32"),
    ("original_height", "int32"),
    ("exif", "string"),
    ("sha256", "string"),
)
# img2dataset buffers 100 samples per Parquet write: one row group each.
_IMG2DATASET_ROW_GROUP = 100


def failed_download(
    key: str,
    *,
    caption: str | None = None,
    status: str = "failed_to_download",
    error_message: str = "HTTP Error 404: Not Found",
) -> ShardSample:
    """A sample img2dataset could not fetch (or resize): no image, its ``status`` and reason."""
    meta = {
        "url": f"https://example.com/missing/{key}.jpg",
        "caption": caption,
        "key": key,
        "status": status,
        "error_message": error_message,
    }
    return ShardSample(key=key, image=None, caption=caption, meta=meta)


def img2dataset_meta(sample: ShardSample) -> dict[str, Any]:
    """The sample's metadata as img2dataset writes it: every column of
    :data:`IMG2DATASET_SCHEMA`, in order (absent ones null; ``sha256`` of the image bytes and an
    empty ``exif`` object for downloaded images)."""
    import hashlib

    meta = dict(sample.meta or {})
    meta.setdefault("caption", sample.caption)
    meta.setdefault("key", sample.key)
    meta.setdefault("status", "success" if sample.image is not None else "failed_to_download")
    if sample.image is not None:
        meta.setdefault("exif", "{}")
        meta.setdefault("sha256", hashlib.sha256(sample.image).hexdigest())
    return {name: meta.get(name) for name, _ in IMG2DATASET_SCHEMA}


def _img2dataset_table(samples: list[ShardSample], *, with_image: bool) -> Any:
    import pyarrow as pa

    metas = [img2dataset_meta(s) for s in samples]
    columns = {name: pa.array([m[name] for m in metas], getattr(pa, tp)()) for name, tp in IMG2DATASET_SCHEMA}
    if with_image:
        columns["jpg"] = pa.array([s.image for s in samples], pa.binary())
    return pa.table(columns)


def _img2dataset_stats(samples: list[ShardSample]) -> dict[str, Any]:
    """img2dataset's ``NNNNN_stats.json``: counts by outcome and a counter of statuses and
    error messages (``"success"`` for downloaded images)."""
    from collections import Counter

    metas = [img2dataset_meta(s) for s in samples]
    status_dict = Counter(m["error_message"] if m["status"] != "success" else "success" for m in metas)
    return {
        "count": len(metas),
        "successes": sum(m["status"] == "success" for m in metas),
        "failed_to_download": sum(m["status"] == "failed_to_download" for m in metas),
        "failed_to_resize": sum(m["status"] == "failed_to_resize" for m in metas),
        "duration": 1.0,
        "start_time": float(_MTIME),
        "end_time": float(_MTIME + 1),
        "status_dict": dict(status_dict),
    }


def _write_parquet_table(path: str, table: Any, storage_options: dict[str, Any] | None) -> None:
    import pyarrow.parquet as pq

    with fsspec.open(path, "wb", **(storage_options or {})) as f:
        pq.write_table(table, f, row_group_size=_IMG2DATASET_ROW_GROUP)


def write_img2dataset_shard(
    folder: str,
    shard: int,
    samples: list[ShardSample],
    *,
    fmt: str = "webdataset",
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Writes one shard exactly as img2dataset lays it out, under ``folder`` (any fsspec URL).

    ``webdataset``: ``NNNNN.tar`` with ``KEY.jpg``, ``KEY.txt`` (the caption) and ``KEY.json``
    (the metadata, indented) for the downloaded samples only, ``NNNNN.parquet`` with the
    metadata of every sample (no image column) and ``NNNNN_stats.json``. ``parquet``:
    ``NNNNN.parquet`` with every sample, the image in ``jpg`` (null for failed ones; see
    :data:`IMG2DATASET_SCHEMA`), and ``NNNNN_stats.json``. Samples without an image are
    failed downloads (:func:`failed_download`).

    Returns:
        The URL of the data shard (``.tar`` or ``.parquet``).
    """
    from webdataset import TarWriter

    if fmt not in ("webdataset", "parquet"):
        raise ConfigError(f"img2dataset shard format {fmt!r}: valid values: parquet, webdataset")
    base = f"{folder.rstrip('/')}/{shard:05d}"
    with fsspec.open(f"{base}_stats.json", "w", **(storage_options or {})) as f:
        json.dump(_img2dataset_stats(samples), f, indent=4)
    if fmt == "parquet":
        _write_parquet_table(f"{base}.parquet", _img2dataset_table(samples, with_image=True), storage_options)
        return f"{base}.parquet"
    _write_parquet_table(f"{base}.parquet", _img2dataset_table(samples, with_image=False), storage_options)
    with fsspec.open(f"{base}.tar", "wb", **(storage_options or {})) as f:
        with TarWriter(f, mtime=_MTIME) as writer:
            for sample in samples:
                if sample.image is None:
                    continue
                meta = img2dataset_meta(sample)
                record = {"__key__": sample.key, "jpg": sample.image, "json": json.dumps(meta, indent=4)}
                record["txt"] = meta["caption"] if meta["caption"] is not None else ""
                writer.write(record)
    return f"{base}.tar"


_ShardWriter = Callable[..., str]
# Output extension and writer per demo shard format.
_DEMO_FORMATS: dict[str, tuple[str, _ShardWriter]] = {
    "webdataset": (".tar", write_webdataset_shard),
    "parquet": (".parquet", write_parquet_shard),
}


def build_demo_shards(
    out_dir: str,
    *,
    shards: int = 2,
    fmt: str = "webdataset",
    resolution: int | None = None,
    include_corrupt: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Splits the bundled photos over ``shards`` shards ``00000.tar``, ``00001.tar``, ... .

    Shards are written under ``out_dir`` (created; any fsspec URL) and rewritten when present.
    Keys follow img2dataset (``f"{shard:05d}{i:04d}"``, ``i`` counting inside each shard).

    Args:
        shards: how many shards (the photos are split in contiguous, near-equal parts).
        fmt: ``webdataset`` (``.tar``) or ``parquet`` (``.parquet``).
        resolution: see :func:`photo_samples`.
        include_corrupt: also append :func:`corrupt_samples` to the last shard.

    Returns:
        The shard URLs, in order.
    """
    if fmt not in _DEMO_FORMATS:
        valid = ", ".join(sorted(_DEMO_FORMATS))
        raise ConfigError(f"demo shard format {fmt!r}: valid values: {valid}")
    names = [name for name, _ in _photo_files()]
    if not 1 <= shards <= len(names):
        raise ConfigError(f"demo shards: between 1 and {len(names)} (one photo per shard at least)")
    suffix, write = _DEMO_FORMATS[fmt]
    fs, root = fsspec.core.url_to_fs(out_dir, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    urls = []
    per, extra = divmod(len(names), shards)
    start = 0
    for shard in range(shards):
        count = per + (1 if shard < extra else 0)
        samples = _samples(names[start : start + count], resolution=resolution, shard=shard)
        start += count
        if include_corrupt and shard == shards - 1:
            broken = corrupt_samples(shard=shard)
            for offset, sample in enumerate(broken, start=len(samples)):
                # Renumber so the keys continue right after this shard's photos.
                sample.key = _key(shard, offset)
                if sample.meta is not None:
                    sample.meta["key"] = sample.key
            samples += broken
        url = f"{out_dir.rstrip('/')}/{shard:05d}{suffix}"
        urls.append(write(url, samples, storage_options=storage_options))
    logger.info("wrote %d demo %s shard(s) under %s", shards, fmt, out_dir)
    return urls
