"""Tests of latentize.sources (URL expansion, shard naming, readers) and the demo shard writers.

Local files use tmp_path; the S3 tests talk to a real S3 API (moto's server on loopback)
through s3fs, exactly as a run would.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import random
import re
import tarfile
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import S3_BUCKET

from latentize.config import Config, InputConfig, load_config
from latentize.demo import (
    IMG2DATASET_SCHEMA,
    ShardSample,
    build_demo_shards,
    corrupt_samples,
    failed_download,
    photo_images,
    photo_samples,
    write_img2dataset_shard,
    write_parquet_shard,
    write_webdataset_shard,
)
from latentize.errors import ConfigError, LatentizeError
from latentize.sources import SOURCES, RawSample, expand_urls, infer_format, resolve_input_fields, shard_ids

# --------------------------------------------------------------------------- helpers


def _touch(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return str(path)


def _read(fmt: str, url: str, storage_options: dict[str, Any] | None = None, **cfg: Any) -> list[RawSample]:
    config = InputConfig(**cfg)
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        return list(SOURCES.get(fmt)(f, config=config))


def _read_until_error(fmt: str, data: bytes, **cfg: Any) -> tuple[list[RawSample], Exception | None]:
    out: list[RawSample] = []
    try:
        for sample in SOURCES.get(fmt)(io.BytesIO(data), config=InputConfig(**cfg)):
            out.append(sample)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return out, exc
    return out, None


def _write_tar(path: Path, members: list[tuple[str, bytes | None]]) -> bytes:
    """A tar with exactly these members (None: a directory member)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.mtime = 0
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


class _CountingReader(io.RawIOBase):
    """A seekable file over bytes that counts how many bytes were read."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, b: Any) -> int:
        data = self._f.read(len(b))
        b[: len(data)] = data
        self.bytes_read += len(data)
        return len(data)


@pytest.fixture(scope="module")
def small_photos() -> list[ShardSample]:
    # Exact-size photos keep the shards small and the tests fast.
    return photo_samples(resolution=32)[:5]


# --------------------------------------------------------------------------- expand_urls


def test_brace_expansion_keeps_listed_paths_as_given(tmp_path: Path) -> None:
    for i in range(3):
        _touch(tmp_path / "a" / f"{i:05d}.tar")
    urls = expand_urls(f"{tmp_path}/a/{{00000..00002}}.tar", storage_options={})
    assert urls == [f"{tmp_path}/a/{i:05d}.tar" for i in range(3)]


def test_relative_local_paths_stay_relative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _touch(tmp_path / "a" / "00000.tar")
    monkeypatch.chdir(tmp_path)
    assert expand_urls(["a/00000.tar"], storage_options={}) == ["a/00000.tar"]
    # A relative glob gives paths that open from anywhere.
    (match,) = expand_urls("a/*.tar", storage_options={})
    assert Path(match).is_absolute() and Path(match).exists()


def test_glob_sorted_deduplicated_and_skips_directories(tmp_path: Path) -> None:
    for name in ("00002.tar", "00000.tar", "00001.tar"):
        _touch(tmp_path / "a" / name)
    _touch(tmp_path / "b" / "00000.tar")
    (tmp_path / "a" / "dir.tar").mkdir()
    urls = expand_urls(
        [f"{tmp_path}/{{a,b}}/*.tar", f"{tmp_path}/a/0000[01].tar", f"{tmp_path}/a/00001.tar"],
        storage_options={},
    )
    assert urls == [
        f"{tmp_path}/a/00000.tar",
        f"{tmp_path}/a/00001.tar",
        f"{tmp_path}/a/00002.tar",
        f"{tmp_path}/b/00000.tar",
    ]


def test_glob_keeps_protocol(tmp_path: Path) -> None:
    _touch(tmp_path / "00000.tar")
    urls = expand_urls(f"file://{tmp_path}/*.tar", storage_options={})
    assert urls == [f"file://{tmp_path}/00000.tar"]


def test_glob_without_match_is_an_error(tmp_path: Path) -> None:
    pattern = f"{tmp_path}/nothing/*.tar"
    with pytest.raises(LatentizeError, match=re.escape(f"no file matches {pattern!r}")) as err:
        expand_urls(pattern, storage_options={})
    assert "input.storage_options" in str(err.value)


@pytest.mark.parametrize("count", [3, 12], ids=["exists-per-file", "one-listing"])
def test_missing_listed_file_is_kept_and_named_in_a_warning(
    tmp_path: Path, count: int, caplog: pytest.LogCaptureFixture
) -> None:
    # One lost shard must not stop the run: it is kept, so reading it fails and records the
    # shard as failed, while the others are encoded.
    for i in range(count):
        if i != 1:
            _touch(tmp_path / f"{i:05d}.tar")
    with caplog.at_level(logging.WARNING, logger="latentize.sources.urls"):
        urls = expand_urls(f"{tmp_path}/{{00000..{count - 1:05d}}}.tar", storage_options={})
    assert urls == [f"{tmp_path}/{i:05d}.tar" for i in range(count)]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"1 of {count} listed file(s) do not exist" in warning
    assert f"{tmp_path}/00001.tar" in warning


def test_many_missing_files_are_counted_and_the_first_few_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _touch(tmp_path / "00000.tar")
    with caplog.at_level(logging.WARNING, logger="latentize.sources.urls"):
        urls = expand_urls(f"{tmp_path}/{{00000..00009}}.tar", storage_options={})
    assert len(urls) == 10
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "9 of 10 listed file(s) do not exist" in warning
    assert f"{tmp_path}/00001.tar" in warning and "(and 4 more)" in warning
    assert f"{tmp_path}/00009.tar" not in warning


@pytest.mark.parametrize("count", [1, 3, 12])
def test_nothing_existing_is_an_error(tmp_path: Path, count: int) -> None:
    with pytest.raises(LatentizeError, match="does not exist") as err:
        expand_urls(f"{tmp_path}/{{00000..{count - 1:05d}}}.tar", storage_options={})
    assert f"{tmp_path}/00000.tar" in str(err.value)
    assert "input.storage_options" in str(err.value)


def test_all_present_with_many_files_in_one_folder(tmp_path: Path) -> None:
    for i in range(20):
        _touch(tmp_path / f"{i:05d}.tar")
    urls = expand_urls(f"{tmp_path}/{{00000..00019}}.tar", storage_options={})
    assert len(urls) == 20


def test_backend_errors_name_the_url_not_the_secrets() -> None:
    with pytest.raises(LatentizeError) as err:
        expand_urls("nosuchproto://bucket/x.tar", storage_options={"secret": "hunter2-secret"})
    assert "nosuchproto://bucket/x.tar" in str(err.value)
    assert "hunter2-secret" not in str(err.value)


def test_empty_urls_are_an_error() -> None:
    with pytest.raises(LatentizeError, match="input.urls"):
        expand_urls([], storage_options={})


# --------------------------------------------------------------------------- shard_ids, infer_format

_SAFE = re.compile(r"^[A-Za-z0-9-][A-Za-z0-9._-]*$")


def test_shard_ids_strip_known_suffixes() -> None:
    urls = [
        "s3://b/x/00000.tar",
        "s3://b/x/00001.tar.gz",
        "gs://b/x/00002.tgz",
        "/data/part.snappy.parquet",
        "data/p.pq",
        "https://host/shards/00003.tar?sig=abc",
    ]
    assert shard_ids(urls) == ["00000", "00001", "00002", "part.snappy", "p", "00003"]


def test_shard_ids_resolve_collisions_by_relative_path() -> None:
    urls = ["s3://b/x/00000.tar", "s3://b/y/00000.tar", "s3://b/x/00001.tar", "s3://c/00000.tar"]
    ids = shard_ids(urls)
    assert ids == ["b__x__00000", "b__y__00000", "00001", "c__00000"]
    assert shard_ids(["s3://b/x/00000.tar", "s3://b/y/00000.tar"]) == ["x__00000", "y__00000"]


def test_shard_ids_are_safe_unique_and_never_hidden() -> None:
    urls = [
        "s3://b/my shard#1.tar",
        "/d/_hidden.tar",
        "/d/.dot.tar",
        "/d/.tar",
        "/d/ü.tar",
        "/d/a.tar",
        "/d/a.tar",
        "/d/a-2.tar",
    ]
    ids = shard_ids(urls)
    assert ids[:3] == ["my_shard_1", "s_hidden", "s.dot"]
    assert len(set(ids)) == len(ids)
    for name in ids:
        assert _SAFE.match(name), name


@pytest.mark.parametrize(
    ("urls", "fmt"),
    [
        (["a/0.tar", "b/1.TAR"], "webdataset"),
        (["a/0.tar.gz", "a/1.tgz"], "webdataset"),
        (["s3://b/0.parquet", "s3://b/1.pq"], "parquet"),
    ],
)
def test_infer_format(urls: list[str], fmt: str) -> None:
    assert infer_format(urls) == fmt


def test_infer_format_errors() -> None:
    with pytest.raises(ConfigError, match="input.format"):
        infer_format(["a/0.zip"])
    with pytest.raises(ConfigError, match="mix"):
        infer_format(["a/0.tar", "a/1.parquet"])


# --------------------------------------------------------------------------- demo


def test_photo_images_are_real_photos_in_sorted_order() -> None:
    photos = photo_images()
    names = [name for name, _ in photos]
    assert names == sorted(names)
    assert {"astronaut", "camera", "chelsea", "china", "flower", "coffee"} <= set(names)
    modes = {name: image.mode for name, image in photos}
    assert modes["camera"] == "L" and modes["astronaut"] == "RGB"


def test_photo_samples_exact_size_and_img2dataset_metadata() -> None:
    from PIL import Image

    samples = photo_samples(resolution=48, shard=3)
    first = samples[0]
    assert first.key == "000030000" and samples[1].key == "000030001"
    assert first.caption == "a photo: astronaut"
    assert first.meta is not None
    assert first.meta["key"] == first.key and first.meta["status"] == "success"
    assert (first.meta["width"], first.meta["height"]) == (48, 48)
    assert (first.meta["original_width"], first.meta["original_height"]) == (512, 512)
    for sample in samples:
        assert sample.image is not None
        with Image.open(io.BytesIO(sample.image)) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (48, 48))


def test_corrupt_samples_keys_continue_after_photos() -> None:
    photos = photo_samples(shard=1)
    broken = corrupt_samples(shard=1)
    assert [s.key for s in broken] == [f"00001{len(photos) + i:04d}" for i in range(3)]
    truncated, empty, html = (s.image for s in broken)
    assert truncated is not None and truncated.startswith(b"\xff\xd8")
    assert not truncated.endswith(b"\xff\xd9")
    assert empty == b""
    assert html is not None and b"<html>" in html


def test_build_demo_shards_is_idempotent(tmp_path: Path) -> None:
    urls = build_demo_shards(str(tmp_path / "shards"), shards=3, resolution=16)
    assert urls == [str(tmp_path / "shards" / f"0000{i}.tar") for i in range(3)]
    first = [Path(u).read_bytes() for u in urls]
    assert build_demo_shards(str(tmp_path / "shards"), shards=3, resolution=16) == urls
    assert [Path(u).read_bytes() for u in urls] == first
    keys = [s.key for u in urls for s in _read("webdataset", u)]
    assert len(keys) == len(photo_images())
    assert keys[0] == "000000000" and any(k.startswith("00002") for k in keys)
    (purl,) = build_demo_shards(str(tmp_path / "pq"), shards=1, fmt="parquet", include_corrupt=True, resolution=16)
    rows = _read("parquet", purl)
    assert len(rows) == len(photo_images()) + 3
    assert len({r.key for r in rows}) == len(rows)
    with pytest.raises(ConfigError):
        build_demo_shards(str(tmp_path / "x"), fmt="zip")


# --------------------------------------------------------------------------- webdataset reader


def test_webdataset_round_trip(tmp_path: Path, small_photos: list[ShardSample]) -> None:
    url = write_webdataset_shard(str(tmp_path / "00000.tar"), small_photos)
    rows = _read("webdataset", url)
    assert [r.key for r in rows] == [s.key for s in small_photos]
    for row, sample in zip(rows, small_photos, strict=False):
        assert row.error is None
        assert row.image == sample.image
        assert row.caption == sample.caption
        assert row.json is not None and json.loads(row.json) == sample.meta


def test_webdataset_gzip_and_skipped_fields(tmp_path: Path, small_photos: list[ShardSample]) -> None:
    url = write_webdataset_shard(str(tmp_path / "00000.tar.gz"), small_photos)
    with open(url, "rb") as f:
        assert f.read(2) == b"\x1f\x8b"
    rows = _read("webdataset", url, caption_field=None, json_field=None)
    assert [r.image for r in rows] == [s.image for s in small_photos]
    assert all(r.caption is None and r.json is None for r in rows)


def test_webdataset_image_field_fallback_order(tmp_path: Path, small_photos: list[ShardSample]) -> None:
    png = ShardSample(key="k_png", image=b"PNGDATA", ext="png", caption="p")
    jpg = ShardSample(key="k_jpg", image=b"JPGDATA", ext="jpg", caption="j")
    url = write_webdataset_shard(str(tmp_path / "s.tar"), [png, jpg])
    rows = _read("webdataset", url, image_field="png;jpg")
    assert [(r.key, r.image, r.error) for r in rows] == [
        ("k_png", b"PNGDATA", None),
        ("k_jpg", b"JPGDATA", None),
    ]
    # Only the listed suffixes count as images.
    rows = _read("webdataset", url, image_field="jpg")
    assert rows[0].image is None
    assert rows[0].error is not None and "expected one of: jpg" in rows[0].error
    # With both present, the first listed suffix wins.
    both = tmp_path / "both.tar"
    _write_tar(both, [("k.jpg", b"J"), ("k.png", b"P")])
    assert _read("webdataset", str(both), image_field="png;jpg")[0].image == b"P"
    assert _read("webdataset", str(both), image_field=" JPG ; png")[0].image == b"J"


def test_webdataset_missing_image_and_duplicate_key(tmp_path: Path, small_photos: list[ShardSample]) -> None:
    a, b, c = small_photos[:3]
    no_image = ShardSample(key="000009999", image=None, caption="lost", meta={"key": "000009999"})
    duplicate = ShardSample(key=a.key, image=c.image, caption="again")
    url = write_webdataset_shard(str(tmp_path / "s.tar"), [a, no_image, b, duplicate, c])
    rows = _read("webdataset", url)
    assert [r.key for r in rows] == [a.key, "000009999", b.key, a.key, c.key]
    assert rows[0].error is None and rows[0].image == a.image
    assert rows[1].image is None
    assert rows[1].error == "no image member (expected one of: jpg); found: json, txt"
    assert rows[1].caption == "lost"  # carried through for the error row
    assert rows[3].image is None and rows[3].error == "duplicate key in shard: second occurrence"
    assert rows[4].error is None and rows[4].image == c.image


def test_webdataset_member_names(tmp_path: Path) -> None:
    path = tmp_path / "odd.tar"
    _write_tar(
        path,
        [
            ("__index__", b"index"),
            ("sub", None),
            ("sub/dir/k1.JPG", b"img1"),
            ("sub/dir/k1.txt", "caf\u00e9 \xff".encode("latin-1")),
            ("sub/dir/k1.pth", b"\x80\x04not a pickle to load"),
            ("sub/dir/._k1.jpg", b"appledouble"),
            ("./k2.jpg", b"img2"),
            ("./k2.seg.png", b"mask"),
            ("noext", b"ignored"),
            ("k3.seg.jpg", b"not the image"),
            ("k4.jpg", b"img4"),
            ("k4.jpg", b"img4 again"),
        ],
    )
    rows = {r.key: r for r in _read("webdataset", str(path))}
    assert list(rows) == ["sub/dir/k1", "k2", "k3", "k4"]
    assert rows["sub/dir/k1"].image == b"img1" and rows["sub/dir/k1"].error is None
    assert rows["sub/dir/k1"].caption == "caf\ufffd \ufffd"  # invalid UTF-8 replaced, not fatal
    assert rows["sub/dir/k1"].notes == "caption is not valid UTF-8 (undecodable bytes replaced)"
    assert rows["k2"].notes is None
    assert rows["k2"].image == b"img2"
    assert rows["k3"].image is None and rows["k3"].error is not None
    assert "seg.jpg" in rows["k3"].error
    assert rows["k4"].image is None and rows["k4"].error == "duplicate member(s) in sample: jpg"


def _pax_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar whose member names go in PAX ``path`` records, so they may hold any character
    (a NUL included, which a plain ustar name field would cut)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, (name, data) in enumerate(members):
            info = tarfile.TarInfo(f"placeholder{i}.bin")
            info.size = len(data)
            info.pax_headers = {"path": name}
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


def test_webdataset_unsafe_keys_are_error_rows(tmp_path: Path) -> None:
    path = tmp_path / "keys.tar"
    names = ["../../escape", "/abs", "a\x00b", "a/../../b", "sub/dir/k1", "sub/x-1_a"]
    members = [(f"{n}.jpg", b"img") for n in names]
    members.insert(names.index("sub/dir/k1") + 1, ("sub/dir/k1.txt", b"ok"))  # contiguous
    _pax_tar(path, members)
    rows = {r.key: r for r in _read("webdataset", str(path))}
    assert list(rows) == names
    for name in names[:4]:
        row = rows[name]
        assert row.image is None and row.error is not None, name
        assert row.error.startswith("unsafe key: "), name
    assert "'..'" in rows["../../escape"].error and "NUL" in rows["a\x00b"].error
    assert "absolute" in rows["/abs"].error
    # Sub-folders and dots inside a name are ordinary keys.
    assert rows["sub/dir/k1"].error is None and rows["sub/dir/k1"].image == b"img"
    assert rows["sub/dir/k1"].caption == "ok"
    assert rows["sub/x-1_a"].error is None


def test_webdataset_sidecar_problems_are_notes(tmp_path: Path) -> None:
    path = tmp_path / "sidecars.tar"
    _write_tar(
        path,
        [
            ("k1.jpg", b"img1"),
            ("k1.txt", b"caption \xff\xfe"),
            ("k1.json", b'{"a": 1'),
            ("k2.jpg", b"img2"),
            ("k2.json", b'{"caption": "caf\xe9"}'),
            ("k3.jpg", b"img3"),
            ("k3.txt", "d\u00e9j\u00e0 vu".encode()),
            ("k3.json", b'{"w": 3}'),
            ("k4.jpg", b"img4"),
            ("k4.json", b""),
        ],
    )
    rows = {r.key: r for r in _read("webdataset", str(path))}
    assert all(r.error is None and r.image for r in rows.values())
    assert rows["k1"].caption == "caption \ufffd\ufffd"
    assert rows["k1"].json == '{"a": 1'  # carried raw
    assert rows["k1"].notes == (
        "caption is not valid UTF-8 (undecodable bytes replaced); json sidecar is not valid "
        "JSON: Expecting ',' delimiter: line 1 column 8 (char 7)"
    )
    assert rows["k2"].json == '{"caption": "caf\ufffd"}'
    assert rows["k2"].notes is not None and rows["k2"].notes.startswith("json sidecar is not valid JSON: not UTF-8")
    assert (rows["k3"].caption, rows["k3"].json, rows["k3"].notes) == ("d\u00e9j\u00e0 vu", '{"w": 3}', None)
    assert rows["k4"].notes == "json sidecar is not valid JSON: Expecting value: line 1 column 1 (char 0)"


def test_webdataset_streams(tmp_path: Path) -> None:
    samples = [ShardSample(key=f"k{i}", image=random.Random(i).randbytes(40_000)) for i in range(10)]
    url = write_webdataset_shard(str(tmp_path / "s.tar"), samples)
    data = Path(url).read_bytes()
    reader = _CountingReader(data)
    rows = SOURCES.get("webdataset")(reader, config=InputConfig())  # type: ignore[arg-type]
    assert next(rows).image == samples[0].image
    assert reader.bytes_read < len(data) / 2


def _member_offsets(data: bytes) -> dict[str, tuple[int, int]]:
    """Header and data offsets of each member."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


def test_webdataset_truncated_in_data_raises_after_earlier_samples(
    tmp_path: Path, small_photos: list[ShardSample]
) -> None:
    data = Path(write_webdataset_shard(str(tmp_path / "s.tar"), small_photos)).read_bytes()
    _, data_start = _member_offsets(data)[f"{small_photos[3].key}.jpg"]
    rows, exc = _read_until_error("webdataset", data[: data_start + 10])
    assert isinstance(exc, tarfile.ReadError)
    assert [r.key for r in rows] == [s.key for s in small_photos[:3]]
    assert all(r.error is None for r in rows)


def test_webdataset_truncated_at_member_boundary_is_detected(tmp_path: Path, small_photos: list[ShardSample]) -> None:
    data = Path(write_webdataset_shard(str(tmp_path / "s.tar"), small_photos)).read_bytes()
    header, _ = _member_offsets(data)[f"{small_photos[3].key}.jpg"]
    for cut in (header, header + 100):
        rows, exc = _read_until_error("webdataset", data[:cut])
        assert isinstance(exc, tarfile.ReadError), cut
        # The sample being read when the data stopped is not yielded: it may lack members.
        assert [r.key for r in rows] == [s.key for s in small_photos[:2]]


def test_webdataset_not_a_tar_raises() -> None:
    rows, exc = _read_until_error("webdataset", b"<html>this is not a tar</html>" * 40)
    assert rows == [] and isinstance(exc, tarfile.ReadError)


# --------------------------------------------------------------------------- parquet reader


def test_parquet_round_trip_img2dataset_layout(tmp_path: Path, small_photos: list[ShardSample]) -> None:
    url = write_parquet_shard(str(tmp_path / "00000.parquet"), small_photos)
    schema = pq.read_schema(url)
    assert schema.names == ["key", "jpg", "txt", "json"]
    rows = _read("parquet", url)
    assert [r.key for r in rows] == [s.key for s in small_photos]
    for row, sample in zip(rows, small_photos, strict=False):
        assert (row.image, row.caption, row.error) == (sample.image, sample.caption, None)
        assert row.json is not None and json.loads(row.json) == sample.meta


def test_parquet_streams_in_batches(tmp_path: Path, small_photos: list[ShardSample]) -> None:
    table = pa.table(
        {
            "key": [f"k{i}" for i in range(10)],
            # Incompressible bytes, so the file is as large as the images.
            "jpg": [random.Random(i).randbytes(40_000) for i in range(10)],
            "txt": [f"c{i}" for i in range(10)],
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=2)
    data = buf.getvalue()
    rows = list(SOURCES.get("parquet")(io.BytesIO(data), config=InputConfig(rows_per_block=3)))
    assert [r.key for r in rows] == [f"k{i}" for i in range(10)]
    assert [r.image for r in rows] == table.column("jpg").to_pylist()
    # The first sample comes after reading the footer and the first row group, not the file.
    reader = _CountingReader(data)
    it = SOURCES.get("parquet")(reader, config=InputConfig(rows_per_block=1))  # type: ignore[arg-type]
    assert next(it).key == "k0"
    assert reader.bytes_read < len(data) / 2


def test_parquet_hf_image_struct_without_key_column(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array(
                [
                    {"bytes": b"img0", "path": "a.jpg"},
                    {"bytes": None, "path": "b.jpg"},
                    None,
                    {"bytes": b"img3", "path": None},
                ],
                image_type,
            ),
            "text": ["zero", "one", None, "three"],
            "meta": pa.array([{"w": 1}, {"w": 2}, None, {"w": 4}], pa.struct([("w", pa.int64())])),
        }
    )
    path = tmp_path / "hf.parquet"
    pq.write_table(table, path)
    with caplog.at_level(logging.DEBUG, logger="latentize.sources"):
        rows = _read(
            "parquet",
            str(path),
            image_field="image",
            key_field="id_not_here",
            caption_field="text",
            json_field="meta",
            rows_per_block=3,
        )
    assert [r.key for r in rows] == ["000000000", "000000001", "000000002", "000000003"]
    # A read task only logs the missing key column for debugging; the driver reports it once.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "id_not_here" in caplog.text
    assert (rows[0].image, rows[0].caption, rows[0].error) == (b"img0", "zero", None)
    assert json.loads(rows[0].json or "") == {"w": 1}
    assert rows[1].image is None and rows[1].error == "null image (path only: b.jpg)"
    assert rows[2].image is None and rows[2].error == "null image" and rows[2].json is None
    assert rows[3].image == b"img3"


def test_parquet_optional_columns_map_json_and_int_keys(tmp_path: Path) -> None:
    table = pa.table(
        {
            "id": pa.array([7, 8], pa.int64()),
            "jpg": pa.array([b"a", b"b"], pa.large_binary()),
            "json": pa.array([[("x", 1)], [("y", 2)]], pa.map_(pa.string(), pa.int64())),
        }
    )
    path = tmp_path / "m.parquet"
    pq.write_table(table, path)
    rows = _read("parquet", str(path), key_field="id")
    assert [r.key for r in rows] == ["7", "8"]
    assert [r.caption for r in rows] == [None, None]  # no "txt" column
    assert [json.loads(r.json or "") for r in rows] == [{"x": 1}, {"y": 2}]


def test_parquet_unsafe_keys_and_sidecar_notes(tmp_path: Path) -> None:
    # A string column written without UTF-8 validation (some writers do that): one bad cell
    # must become a note, not end the shard.
    captions = pa.array([b"ok", b"caf\xe9", None, b"c", b"d"], pa.binary()).view(pa.string())
    table = pa.table(
        {
            "key": ["good", "../up", "", "a\x00b", "/abs", "x\\..\\win", "fine..name"],
            "jpg": [b"img"] * 7,
            "txt": pa.concat_arrays([captions, pa.array([None, None], pa.string())]),
            "json": ['{"a": 1}', "{not json", None, "[1, 2]", "nan?", None, None],
        }
    )
    path = tmp_path / "k.parquet"
    pq.write_table(table, path)
    rows = _read("parquet", str(path))
    assert [r.key for r in rows] == ["good", "../up", "", "a\x00b", "/abs", "x\\..\\win", "fine..name"]
    assert rows[0].error is None and rows[0].image == b"img" and rows[0].notes is None
    assert rows[6].error is None and rows[6].image == b"img"  # dots inside a name are fine
    for row in rows[1:6]:
        assert row.image is None and row.error is not None and row.error.startswith("unsafe key: ")
    assert rows[2].error == "unsafe key: empty"
    assert rows[1].caption == "caf\ufffd"
    assert rows[1].notes is not None
    assert rows[1].notes.startswith("caption is not valid UTF-8 (undecodable bytes replaced); json sidecar")
    assert rows[3].notes is None and rows[3].json == "[1, 2]"
    assert rows[4].notes is not None and "not valid JSON" in rows[4].notes


def test_parquet_binary_sidecars(tmp_path: Path) -> None:
    table = pa.table(
        {
            "key": ["k0", "k1"],
            "jpg": [b"a", b"b"],
            "txt": pa.array([b"fine", b"\xff"], pa.large_binary()),
            "json": pa.array([b'{"x": 1}', b'{"x": \xff}'], pa.binary()),
        }
    )
    path = tmp_path / "b.parquet"
    pq.write_table(table, path)
    rows = _read("parquet", str(path))
    assert (rows[0].caption, rows[0].json, rows[0].notes) == ("fine", '{"x": 1}', None)
    assert rows[1].caption == "\ufffd" and rows[1].json == '{"x": \ufffd}'
    assert rows[1].notes is not None and rows[1].notes.count("; ") == 1
    assert "json sidecar is not valid JSON: not UTF-8" in rows[1].notes


def test_parquet_missing_or_wrong_image_column(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"key": ["a"], "image": [b"x"], "n": [1]}), path)
    with pytest.raises(ConfigError, match="available columns: key, image, n"):
        _read("parquet", str(path), image_field="jpg")
    with pytest.raises(ConfigError, match="'n' has type int64"):
        _read("parquet", str(path), image_field="n")


def test_parquet_not_a_parquet_file_raises() -> None:
    rows, exc = _read_until_error("parquet", b"definitely not parquet" * 10)
    assert rows == [] and isinstance(exc, pa.ArrowInvalid)


def test_parquet_duplicate_keys_the_second_is_the_error(tmp_path: Path) -> None:
    table = pa.table(
        {
            "key": ["a", "b", "a", None, "c", "a", "b"],
            "jpg": [b"a1", b"b1", b"a2", b"n", b"c1", b"a3", b"b2"],
            "txt": ["first a", "b", "again", "null", "c", "third", "b again"],
        }
    )
    path = tmp_path / "dup.parquet"
    pq.write_table(table, path)
    rows = _read("parquet", str(path), rows_per_block=2)  # the duplicates span record batches
    assert [r.key for r in rows] == ["a", "b", "a", "000000003", "c", "a", "b"]
    assert [r.error for r in rows] == [
        None,
        None,
        "duplicate key in shard: second occurrence",
        "null key",
        None,
        "duplicate key in shard: third occurrence",
        "duplicate key in shard: second occurrence",
    ]
    assert rows[0].image == b"a1" and rows[1].image == b"b1"  # the first occurrence keeps its data
    assert all(r.image is None for r in rows if r.error)
    assert rows[2].caption == "again"  # carried with the error row
    # Keys are per shard: another file may hold the same keys.
    other = tmp_path / "other.parquet"
    pq.write_table(table.slice(0, 2), other)
    assert [r.error for r in _read("parquet", str(other))] == [None, None]


# --------------------------------------------------------------------------- img2dataset's layout


@pytest.fixture(scope="module")
def img2dataset_samples(small_photos: list[ShardSample]) -> list[ShardSample]:
    """Three downloads, a failed download and a failed resize, in img2dataset's key order."""
    ok = [dataclasses.replace(s, meta=dict(s.meta or {})) for s in small_photos[:3]]
    lost = failed_download("000000003", caption="a lost photo")
    unresizable = failed_download(
        "000000004", caption="an odd photo", status="failed_to_resize", error_message="image too large"
    )
    return [ok[0], lost, ok[1], unresizable, ok[2]]


def test_img2dataset_parquet_keeps_captions_and_names_failed_downloads(
    tmp_path: Path, img2dataset_samples: list[ShardSample]
) -> None:
    url = write_img2dataset_shard(str(tmp_path), 0, img2dataset_samples, fmt="parquet")
    assert url == str(tmp_path / "00000.parquet")
    schema = pq.read_schema(url)
    # Exactly img2dataset's columns and types (its writer's schema, the image column last).
    assert schema.names == [
        "caption",
        "url",
        "key",
        "status",
        "error_message",
        "width",
        "height",
        "original_width",
        "original_height",
        "exif",
        "sha256",
        "jpg",
    ]
    assert [str(schema.field(n).type) for n, _ in IMG2DATASET_SCHEMA] == [tp for _, tp in IMG2DATASET_SCHEMA]
    assert schema.field("jpg").type == pa.binary()
    stats = json.loads((tmp_path / "00000_stats.json").read_text())
    assert (stats["count"], stats["successes"], stats["failed_to_download"], stats["failed_to_resize"]) == (5, 3, 1, 1)

    rows = _read("parquet", url)  # caption_field: auto
    assert [r.key for r in rows] == [s.key for s in img2dataset_samples]
    good = [r for r in rows if r.error is None]
    assert [r.caption for r in good] == [s.caption for s in img2dataset_samples if s.image is not None]
    assert [r.image for r in good] == [s.image for s in img2dataset_samples if s.image is not None]
    lost, odd = rows[1], rows[3]
    assert lost.image is None and lost.error == "img2dataset: failed_to_download: HTTP Error 404: Not Found"
    assert odd.image is None and odd.error == "img2dataset: failed_to_resize: image too large"
    assert (lost.caption, odd.caption) == ("a lost photo", "an odd photo")
    # An explicit caption column still wins over auto; null carries none.
    assert [r.caption for r in _read("parquet", url, caption_field="url")][0].startswith("https://")
    assert {r.caption for r in _read("parquet", url, caption_field=None)} == {None}


def test_img2dataset_webdataset_layout(tmp_path: Path, img2dataset_samples: list[ShardSample]) -> None:
    url = write_img2dataset_shard(str(tmp_path), 3, img2dataset_samples)
    assert url == str(tmp_path / "00003.tar")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00003.parquet", "00003.tar", "00003_stats.json"]
    with tarfile.open(url) as tar:
        names = tar.getnames()
    downloaded = [s for s in img2dataset_samples if s.image is not None]
    assert names == [f"{s.key}.{ext}" for s in downloaded for ext in ("jpg", "json", "txt")]
    # Failed downloads are only in the metadata Parquet beside the tar, which has no image column.
    meta = pq.read_table(tmp_path / "00003.parquet")
    assert meta.column_names == [name for name, _ in IMG2DATASET_SCHEMA]
    assert meta.column("status").to_pylist().count("success") == 3

    rows = _read("webdataset", url)  # caption_field: auto
    assert [(r.key, r.caption, r.error) for r in rows] == [(s.key, s.caption, None) for s in downloaded]
    first = json.loads(rows[0].json or "")
    assert list(first) == [name for name, _ in IMG2DATASET_SCHEMA]
    assert first["status"] == "success" and first["caption"] == downloaded[0].caption


# --------------------------------------------------------------------------- input fields, once per run


def _config(urls: list[str], **input_cfg: Any) -> Config:
    return load_config(base={"input": {"urls": urls, **input_cfg}, "output": {"path": "unused"}})


def test_caption_field_auto_resolves_per_format(tmp_path: Path, img2dataset_samples: list[ShardSample]) -> None:
    i2d = write_img2dataset_shard(str(tmp_path / "i2d"), 0, img2dataset_samples, fmt="parquet")
    hf = str(tmp_path / "hf.parquet")
    pq.write_table(pa.table({"key": ["k"], "jpg": [b"x"], "txt": ["t"]}), hf)
    bare = str(tmp_path / "bare.parquet")
    pq.write_table(pa.table({"key": ["k"], "jpg": [b"x"]}), bare)
    assert _config([i2d]).input.caption_field == "auto"
    cases = [([i2d], "parquet", "caption"), ([hf], "parquet", "txt"), ([bare], "parquet", None)]
    cases.append(([str(tmp_path / "x.tar")], "webdataset", "txt"))
    for urls, fmt, expected in cases:
        cfg = _config(urls)
        resolved = resolve_input_fields(cfg, urls, fmt)
        assert resolved.input.caption_field == expected, (urls, fmt)
        assert cfg.input.caption_field == "auto"  # the caller's config is left as it was
    # What the user set is kept, whatever the files hold.
    assert resolve_input_fields(_config([i2d], caption_field="url"), [i2d], "parquet").input.caption_field == "url"
    assert resolve_input_fields(_config([i2d], caption_field=None), [i2d], "parquet").input.caption_field is None
    # A first shard that cannot be read: the next one tells.
    missing = str(tmp_path / "gone.parquet")
    assert resolve_input_fields(_config([i2d]), [missing, i2d], "parquet").input.caption_field == "caption"


def test_missing_optional_columns_are_logged_once_per_run(
    tmp_path: Path, img2dataset_samples: list[ShardSample], caplog: pytest.LogCaptureFixture
) -> None:
    urls = [
        write_img2dataset_shard(str(tmp_path), i, img2dataset_samples, fmt="parquet", storage_options=None)
        for i in range(4)
    ]
    cfg = _config(urls, key_field="id", caption_field="auto")
    with caplog.at_level(logging.WARNING, logger="latentize.sources"):
        resolved = resolve_input_fields(cfg, urls, "parquet")
        for url in urls:  # what the read tasks do: nothing more is logged
            with fsspec.open(url, "rb") as f:
                assert len(list(SOURCES.get("parquet")(f, config=resolved.input))) == 5
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    # img2dataset's Parquet has no json column (its metadata are columns) and no "id" here.
    assert len(warnings) == 2, warnings
    assert "input.key_field: no column 'id'" in warnings[0] and "row's index" in warnings[0]
    assert "input.json_field: column 'json' is not in the parquet files" in warnings[1]
    assert "caption, url, key, status" in warnings[1]
    with pytest.raises(ConfigError, match="no column 'image'.*available columns: caption, url"):
        resolve_input_fields(_config(urls, image_field="image"), urls, "parquet")


# --------------------------------------------------------------------------- real S3 API (moto)

_BUCKET = S3_BUCKET


def test_s3_expand_and_read_webdataset(s3: dict[str, Any], small_photos: list[ShardSample]) -> None:
    urls = [
        write_webdataset_shard(f"s3://{_BUCKET}/wds/{i:05d}.tar", small_photos[i * 2 : i * 2 + 2], storage_options=s3)
        for i in range(2)
    ]
    assert expand_urls(f"s3://{_BUCKET}/wds/{{00000..00001}}.tar", storage_options=s3) == urls
    assert expand_urls(f"s3://{_BUCKET}/wds/*.tar", storage_options=s3) == urls
    assert shard_ids(urls) == ["00000", "00001"]
    rows = [r for url in urls for r in _read("webdataset", url, s3)]
    expected = [(s.key, s.image, s.caption) for s in small_photos[:4]]
    assert [(r.key, r.image, r.caption) for r in rows] == expected


def test_s3_expand_errors(s3: dict[str, Any], small_photos: list[ShardSample]) -> None:
    write_webdataset_shard(f"s3://{_BUCKET}/errs/00000.tar", small_photos[:1], storage_options=s3)
    no_match = re.escape(f"no file matches 's3://{_BUCKET}/errs/*.parquet'")
    with pytest.raises(LatentizeError, match=no_match):
        expand_urls(f"s3://{_BUCKET}/errs/*.parquet", storage_options=s3)
    # Some listed objects missing: kept (recorded as failed shards when read).
    urls = expand_urls(f"s3://{_BUCKET}/errs/{{00000..00001}}.tar", storage_options=s3)
    assert urls == [f"s3://{_BUCKET}/errs/00000.tar", f"s3://{_BUCKET}/errs/00001.tar"]
    # None of them there: nothing to do, surely a wrong path.
    missing = re.escape(f"'s3://{_BUCKET}/errs/00001.tar' does not exist")
    with pytest.raises(LatentizeError, match=missing):
        expand_urls(f"s3://{_BUCKET}/errs/{{00001..00002}}.tar", storage_options=s3)


def test_s3_brace_range_over_many_shards(s3: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    tiny = [ShardSample(key="000000000", image=b"x")]
    for i in range(10):
        if i != 6:
            write_webdataset_shard(f"s3://{_BUCKET}/many/{i:05d}.tar", tiny, storage_options=s3)
    urls = expand_urls(f"s3://{_BUCKET}/many/{{00000..00005}}.tar", storage_options=s3)
    assert urls == [f"s3://{_BUCKET}/many/{i:05d}.tar" for i in range(6)]
    with caplog.at_level(logging.WARNING, logger="latentize.sources.urls"):
        urls = expand_urls(f"s3://{_BUCKET}/many/{{00000..00009}}.tar", storage_options=s3)
    assert urls == [f"s3://{_BUCKET}/many/{i:05d}.tar" for i in range(10)]
    assert f"'s3://{_BUCKET}/many/00006.tar'" in caplog.text and "1 of 10" in caplog.text


def test_s3_read_parquet(s3: dict[str, Any], small_photos: list[ShardSample]) -> None:
    url = write_parquet_shard(f"s3://{_BUCKET}/pq/00000.parquet", small_photos, storage_options=s3)
    (found,) = expand_urls(f"s3://{_BUCKET}/pq/*.parquet", storage_options=s3)
    assert found == url
    rows = _read("parquet", url, s3, rows_per_block=2)
    expected = [(s.key, s.image, s.caption) for s in small_photos]
    assert [(r.key, r.image, r.caption) for r in rows] == expected
