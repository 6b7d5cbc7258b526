"""The bad-input corpus: every odd or broken input kind a scraped image set holds, each with its
stated outcome, made from real photos (scikit-image / scikit-learn via :mod:`latentize.demo`).

Each kind is driven through the path a real run takes: a WebDataset shard on disk, the
datasource's :func:`~latentize.sources.datasource.read_shard` (which runs the registered
``webdataset`` reader), Ray's own Arrow -> numpy batch conversion, then
:func:`~latentize.preprocess.preprocess_batch`. Outcomes are either *encoded* (a data row whose
pixels are checked against a reference) or an *error row* with its stage and a clear reason;
non-fatal findings land in the ``notes`` column. The slow test at the end puts the whole corpus
through the real job (local Ray) and checks exactly-once, the outcomes, the notes column and that
nothing is written outside the output root.
"""

from __future__ import annotations

import functools
import glob
import io
import json
import pickle
import struct
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from latentize.config import InputConfig, PreprocessConfig, load_config
from latentize.demo import ShardSample, photo_images, write_webdataset_shard
from latentize.preprocess import preprocess_batch, resize_and_crop

RES = 64
IMAGE_FIELD = "jpg;png;gif;webp"
BICUBIC = Image.Resampling.BICUBIC
CAPTION_NOTE = "caption is not valid UTF-8 (undecodable bytes replaced)"
JSON_NOTE = "json sidecar is not valid JSON: "


# --------------------------------------------------------------------------- real photos


@functools.lru_cache(maxsize=1)
def _photos() -> dict[str, Image.Image]:
    return dict(photo_images())


def _photo(name: str) -> Image.Image:
    """A bundled photo in its own size and mode (a copy: callers may change it)."""
    return _photos()[name].copy()


def _fit(name: str, size: tuple[int, int] = (RES, RES)) -> Image.Image:
    """A photo cut and resized to exactly ``size`` (W, H), keeping its mode."""
    return ImageOps.fit(_photo(name), size, BICUBIC)


def _rgb(name: str, size: tuple[int, int] = (RES, RES)) -> Image.Image:
    return _fit(name, size).convert("RGB")


def _encode(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _jpeg(img: Image.Image, **kwargs: Any) -> bytes:
    return _encode(img, "JPEG", quality=95, **kwargs)


# Mean absolute error a quality-95 JPEG of a detailed 64x64 photo stays under (chroma
# subsampling costs more on small images); a wrong image is far above it.
JPEG_TOL = 6.0


def _mad(a: np.ndarray | Image.Image, b: np.ndarray | Image.Image) -> float:
    """Mean absolute difference of two uint8 images."""
    return float(np.abs(np.asarray(a).astype(np.int16) - np.asarray(b).astype(np.int16)).mean())


# --------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Outcome:
    """What must become of one sample.

    ``stage`` None: encoded (a data row); else an error row of that stage whose message
    contains ``reason``. ``note``: a substring the row's ``notes`` must hold (None: no notes).
    """

    stage: str | None = None
    reason: str | None = None
    note: str | None = None


OK = Outcome()


@dataclass
class Kind:
    """One corpus kind: the samples of a shard and each one's outcome, in shard order.

    ``samples`` are written with :func:`latentize.demo.write_webdataset_shard`; ``members`` are
    raw tar members for what that writer cannot express (non-UTF-8 sidecars, extra pickle
    members, a NUL in a key), written with PAX path records. A kind uses one of the two.
    ``ref`` holds the references its unit test compares against.
    """

    outcomes: list[tuple[str, Outcome]]
    samples: list[ShardSample] = field(default_factory=list)
    members: list[tuple[str, bytes]] = field(default_factory=list)
    ref: dict[str, Any] = field(default_factory=dict)


def _meta(key: str) -> dict[str, Any]:
    return {"url": f"https://example.com/{key}.jpg", "key": key, "status": "success"}


def _sample(key: str, data: bytes | None, ext: str = "jpg") -> ShardSample:
    return ShardSample(key=key, image=data, ext=ext, caption=f"a photo: {key}", meta=_meta(key))


def _one(key: str, data: bytes | None, outcome: Outcome, ext: str = "jpg", **ref: Any) -> Kind:
    return Kind(outcomes=[(key, outcome)], samples=[_sample(key, data, ext)], ref=ref)


class _Trap:
    """Unpickling this creates ``path``: proof that something unpickled a shard member."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def _trap_pickle(path: Path) -> bytes:
    return pickle.dumps(_Trap(str(path)))


def _claims_size(png: bytes, width: int, height: int) -> bytes:
    """``png`` with an IHDR that claims ``width x height`` (CRC fixed; the data stays small)."""
    data = bytearray(png)
    assert data[12:16] == b"IHDR"
    body = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = body
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + body))
    return bytes(data)


def cmyk_jpeg(tmp: Path) -> Kind:
    src = _rgb("china")
    data = _jpeg(src.convert("CMYK"))
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    return _one("cmyk_jpeg", data, OK, src=src)


def png_16bit(tmp: Path) -> Kind:
    gray = np.asarray(_fit("camera").convert("L"))
    data = _encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    return _one("png_16bit", data, OK, ext="png", gray=gray)


def grayscale(tmp: Path) -> Kind:
    gray = np.asarray(_fit("coins").convert("L"))
    return _one("grayscale", _encode(Image.fromarray(gray), "PNG"), OK, ext="png", gray=gray)


def palette_transparency(tmp: Path) -> Kind:
    pal = _rgb("chelsea").quantize(colors=32)
    index = pal.getpixel((0, 0))
    data = _encode(pal, "PNG", transparency=index)
    assert "transparency" in Image.open(io.BytesIO(data)).info
    return _one("palette_transparency", data, OK, ext="png", pal=pal, index=index)


def rgba(tmp: Path) -> Kind:
    rgb = np.asarray(_rgb("astronaut"))
    alpha = np.full(rgb.shape[:2], 255, dtype=np.uint8)
    alpha[:16] = 0  # fully transparent; the colour underneath is kept (not premultiplied)
    alpha[16:24] = 128
    data = _encode(Image.fromarray(np.dstack([rgb, alpha])), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "RGBA"
    return _one("rgba", data, OK, ext="png", rgb=rgb)


def exif_rotated(tmp: Path) -> Kind:
    src = _rgb("chelsea", (96, 64))  # landscape as stored; the EXIF tag says "rotate 90 cw"
    exif = Image.Exif()
    exif[0x0112] = 6
    return _one("exif_rotated", _jpeg(src, exif=exif.tobytes()), OK, src=src)


def _frames() -> tuple[Image.Image, Image.Image]:
    return _rgb("chelsea"), _rgb("coffee")


def animated_gif(tmp: Path) -> Kind:
    first, second = _frames()
    data = _encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    return _one("animated_gif", data, OK, ext="gif", first=first, second=second)


def animated_webp(tmp: Path) -> Kind:
    first, second = _frames()
    data = _encode(first, "WEBP", save_all=True, append_images=[second], duration=100, loop=0, lossless=True)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    return _one("animated_webp", data, OK, ext="webp", first=first, second=second)


def progressive_jpeg(tmp: Path) -> Kind:
    src = _rgb("flower")
    data = _jpeg(src, progressive=True)
    assert Image.open(io.BytesIO(data)).info.get("progressive")
    return _one("progressive_jpeg", data, OK, src=src)


def tiny_upscaled(tmp: Path) -> Kind:
    tiny = _photo("astronaut").resize((12, 9), BICUBIC)
    note = Outcome(note="upscaled from 12x9")
    return _one("tiny_upscaled", _encode(tiny, "PNG"), note, ext="png", tiny=tiny)


def caption_not_utf8(tmp: Path) -> Kind:
    src = _rgb("coffee")
    key = "caption_not_utf8"
    members = [
        (f"{key}.jpg", _jpeg(src)),
        (f"{key}.txt", "caf\u00e9 au lait".encode("latin-1") + b" \xff"),
        (f"{key}.json", json.dumps(_meta(key)).encode()),
    ]
    return Kind(outcomes=[(key, Outcome(note=CAPTION_NOTE))], members=members, ref={"src": src})


def json_corrupt(tmp: Path) -> Kind:
    src = _rgb("rocket")
    key = "json_corrupt"
    raw = b'{"url": "https://example.com/rocket.jpg", "caption": "a rock'  # cut off
    members = [(f"{key}.jpg", _jpeg(src)), (f"{key}.txt", b"a rocket"), (f"{key}.json", raw)]
    return Kind(outcomes=[(key, Outcome(note=JSON_NOTE))], members=members, ref={"src": src, "raw": raw})


def json_not_utf8(tmp: Path) -> Kind:
    src = _rgb("motorcycle_left")
    key = "json_not_utf8"
    raw = b'{"caption": "caf\xe9"}'  # latin-1, as some scrapers write it
    members = [(f"{key}.jpg", _jpeg(src)), (f"{key}.json", raw)]
    return Kind(outcomes=[(key, Outcome(note=JSON_NOTE + "not UTF-8"))], members=members, ref={"src": src})


def truncated_jpeg(tmp: Path) -> Kind:
    data = _jpeg(_photo("china").convert("RGB"))
    return _one("truncated_jpeg", data[: int(len(data) * 0.6)], Outcome("decode", "truncated"))


def zero_bytes(tmp: Path) -> Kind:
    return _one("zero_bytes", b"", Outcome("decode", "empty image data (0 bytes)"))


def random_bytes(tmp: Path) -> Kind:
    noise = np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8).tobytes()
    return _one("random_bytes", noise, Outcome("decode", "not a recognised image format"))


def html_as_jpg(tmp: Path) -> Kind:
    html = (
        b"<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head>"
        b"<body><h1>Forbidden</h1><p>You don't have permission.</p></body></html>\n"
    )
    return _one("html_as_jpg", html, Outcome("decode", "not a recognised image format"))


def decompression_bomb(tmp: Path) -> Kind:
    # A real PNG whose header claims 20000x20000 = 4e8 pixels, over the default limit
    # (preprocess.max_pixels = 178956970): refused from the header, before any allocation.
    data = _claims_size(_encode(_rgb("chelsea"), "PNG"), 20_000, 20_000)
    return _one(
        "decompression_bomb",
        data,
        Outcome("decode", "preprocess.max_pixels"),
        ext="png",
        real=_encode(_rgb("astronaut"), "PNG"),
    )


def no_image_member(tmp: Path) -> Kind:
    return _one("no_image_member", None, Outcome("read", "no image member"))


def duplicate_key(tmp: Path) -> Kind:
    first, between, second = _rgb("astronaut"), _rgb("brick"), _rgb("coffee")
    return Kind(
        outcomes=[
            ("duplicate_key", OK),
            ("between_duplicates", OK),
            ("duplicate_key", Outcome("read", "duplicate key in shard: second occurrence")),
        ],
        samples=[
            _sample("duplicate_key", _jpeg(first)),
            _sample("between_duplicates", _jpeg(between)),
            _sample("duplicate_key", _jpeg(second)),
        ],
        ref={"first": first, "second": second},
    )


def pickle_members(tmp: Path) -> Kind:
    marker = tmp / "markers" / "unpickled"
    src = _rgb("grass")
    key = "pickle_members"
    members = [(f"{key}.jpg", _jpeg(src))] + [
        (f"{key}.{ext}", _trap_pickle(marker)) for ext in ("pth", "pkl", "pickle")
    ]
    return Kind(outcomes=[(key, OK)], members=members, ref={"marker": marker, "src": src})


UNSAFE_KEYS = ("../../escape", "/abs", "a\x00b")


def unsafe_keys(tmp: Path) -> Kind:
    data = _jpeg(_rgb("gravel"))
    reasons = ("has a '..' path component", "absolute path", "contains a NUL byte")
    return Kind(
        outcomes=[(k, Outcome("read", f"unsafe key: {r}")) for k, r in zip(UNSAFE_KEYS, reasons, strict=False)],
        members=[(f"{k}.jpg", data) for k in UNSAFE_KEYS],
    )


def directory_key(tmp: Path) -> Kind:
    src = _rgb("hubble_deep_field")
    return _one("sub/dir/k1", _jpeg(src), OK, src=src)


#: Every corpus kind by name; each has its unit test below and goes into the end-to-end run.
KINDS: dict[str, Callable[[Path], Kind]] = {
    fn.__name__: fn
    for fn in (
        cmyk_jpeg,
        png_16bit,
        grayscale,
        palette_transparency,
        rgba,
        exif_rotated,
        animated_gif,
        animated_webp,
        progressive_jpeg,
        tiny_upscaled,
        caption_not_utf8,
        json_corrupt,
        json_not_utf8,
        truncated_jpeg,
        zero_bytes,
        random_bytes,
        html_as_jpg,
        decompression_bomb,
        no_image_member,
        duplicate_key,
        pickle_members,
        unsafe_keys,
        directory_key,
    )
}


# --------------------------------------------------------------------------- the real path


def _write_members(path: Path, members: list[tuple[str, bytes]]) -> str:
    """A tar of exactly these members, names in PAX ``path`` records (any character survives,
    a NUL included, which the ustar name field would cut)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, (name, data) in enumerate(members):
            info = tarfile.TarInfo(f"member{i}")
            info.size = len(data)
            info.mtime = 1_704_067_200
            info.pax_headers = {"path": name}
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return str(path)


def _write_kind(kind: Kind, path: Path) -> str:
    if kind.samples:
        return write_webdataset_shard(str(path), kind.samples)
    return _write_members(path, kind.members)


def _through_pipeline(url: str, config: PreprocessConfig | None = None) -> list[dict[str, Any]]:
    """Reads one shard as a run does and preprocesses it; returns the sample rows in order.

    Arrow blocks from the datasource are turned into the numpy batch Ray hands to
    ``map_batches`` by Ray's own converter.
    """
    from ray.data.block import BlockAccessor

    from latentize.sources.datasource import read_shard

    blocks = list(read_shard(url=url, shard="corpus", fmt="webdataset", config=InputConfig(image_field=IMAGE_FIELD)))
    batch = BlockAccessor.for_block(pa.concat_tables(blocks)).to_batch_format("numpy")
    out = preprocess_batch(batch, config=config or PreprocessConfig(resolution=RES))
    rows = [{name: column[i] for name, column in out.items()} for i in range(len(out["key"]))]
    (end,) = [r for r in rows if r["total"] >= 0]
    samples = [r for r in rows if r["total"] < 0]
    assert end["error"] is None and end["total"] == len(samples)
    return samples


def _check(row: dict[str, Any], outcome: Outcome) -> None:
    key = row["key"]
    if outcome.stage is None:
        assert row["error"] is None, (key, row["error"])
        assert row["pixels"].shape == (RES, RES, 3) and row["width"] > 0, key
    else:
        assert row["stage"] == outcome.stage, (key, row["stage"], row["error"])
        assert outcome.reason is not None and outcome.reason in row["error"], (key, row["error"])
        assert not row["pixels"].any() and row["width"] == -1, key
    if outcome.note is None:
        assert row["notes"] is None, (key, row["notes"])
    else:
        assert row["notes"] is not None and outcome.note in row["notes"], (key, row["notes"])


def run_kind(name: str, tmp_path: Path, config: PreprocessConfig | None = None) -> tuple[Kind, list[dict[str, Any]]]:
    """Builds kind ``name``, writes its shard, runs it through read + preprocess, checks the
    stated outcome of every sample; returns the kind and its rows."""
    kind = KINDS[name](tmp_path)
    url = _write_kind(kind, tmp_path / f"{name}.tar")
    rows = _through_pipeline(url, config)
    assert [r["key"] for r in rows] == [k for k, _ in kind.outcomes]
    for row, (_, outcome) in zip(rows, kind.outcomes, strict=False):
        _check(row, outcome)
    return kind, rows


# --------------------------------------------------------------------------- encoded correctly


def test_cmyk_jpeg_is_close_to_the_rgb_original(tmp_path: Path) -> None:
    kind, (row,) = run_kind("cmyk_jpeg", tmp_path)
    assert _mad(row["pixels"], kind.ref["src"]) < JPEG_TOL


def test_16bit_png_keeps_its_contrast(tmp_path: Path) -> None:
    kind, (row,) = run_kind("png_16bit", tmp_path)
    # v * 257 >> 8 == v: the photo comes back exactly, not clipped to white.
    for c in range(3):
        np.testing.assert_array_equal(row["pixels"][..., c], kind.ref["gray"])
    assert row["pixels"].std() > 30


def test_grayscale_gives_three_equal_channels(tmp_path: Path) -> None:
    kind, (row,) = run_kind("grayscale", tmp_path)
    for c in range(3):
        np.testing.assert_array_equal(row["pixels"][..., c], kind.ref["gray"])


def test_palette_with_transparency_is_white_where_transparent(tmp_path: Path) -> None:
    kind, (row,) = run_kind("palette_transparency", tmp_path)
    index, pal = kind.ref["index"], kind.ref["pal"]
    idx = np.asarray(pal)
    assert (idx == index).any() and (idx != index).any()
    assert (row["pixels"][idx == index] == 255).all()
    ref = np.asarray(pal.convert("RGB"))
    np.testing.assert_array_equal(row["pixels"][idx != index], ref[idx != index])


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    kind, (row,) = run_kind("rgba", tmp_path)
    rgb, pixels = kind.ref["rgb"], row["pixels"]
    assert rgb[:16].mean() < 200  # the hidden colour is not white by itself
    assert (pixels[:16] == 255).all()
    half = (rgb[16:24].astype(np.float64) * 128 + 255 * 127) / 255
    assert np.abs(pixels[16:24] - half).max() <= 1.0
    np.testing.assert_array_equal(pixels[24:], rgb[24:])


def test_exif_rotated_jpeg_is_upright(tmp_path: Path) -> None:
    kind, (row,) = run_kind("exif_rotated", tmp_path)
    upright = kind.ref["src"].transpose(Image.Transpose.ROTATE_270)  # 64 wide, 96 tall
    assert (row["width"], row["height"]) == (64, 96)
    assert (row["crop_top"], row["crop_left"]) == (16, 0)  # center crop of the upright image
    right = np.asarray(upright)[16:80]
    wrong = np.asarray(kind.ref["src"].transpose(Image.Transpose.ROTATE_90))[16:80]
    assert _mad(row["pixels"], right) < JPEG_TOL
    assert _mad(row["pixels"], wrong) > 20.0


@pytest.mark.parametrize("name", ["animated_gif", "animated_webp"])
def test_animated_image_gives_its_first_frame(name: str, tmp_path: Path) -> None:
    kind, (row,) = run_kind(name, tmp_path)
    # GIF quantises to a 256-colour palette; lossless WebP is exact.
    assert _mad(row["pixels"], kind.ref["first"]) < (12.0 if name == "animated_gif" else 0.5)
    assert _mad(row["pixels"], kind.ref["second"]) > 40.0


def test_progressive_jpeg(tmp_path: Path) -> None:
    kind, (row,) = run_kind("progressive_jpeg", tmp_path)
    assert _mad(row["pixels"], kind.ref["src"]) < JPEG_TOL


def test_tiny_image_is_upscaled_and_flagged(tmp_path: Path) -> None:
    kind, (row,) = run_kind("tiny_upscaled", tmp_path)
    assert row["notes"] == "upscaled from 12x9"
    assert (row["width"], row["height"]) == (12, 9)
    ref = resize_and_crop(kind.ref["tiny"].convert("RGB"), size=(RES, RES), crop="center", key="k", seed=0)
    np.testing.assert_array_equal(row["pixels"], ref.pixels)
    assert row["pixels"].std() > 10


def test_caption_not_utf8_encodes_and_is_noted(tmp_path: Path) -> None:
    kind, (row,) = run_kind("caption_not_utf8", tmp_path)
    assert row["notes"] == CAPTION_NOTE
    assert row["caption"] == "caf\ufffd au lait \ufffd"
    assert json.loads(row["json"])["key"] == "caption_not_utf8"
    assert _mad(row["pixels"], kind.ref["src"]) < JPEG_TOL


def test_corrupt_json_sidecar_encodes_and_is_noted(tmp_path: Path) -> None:
    kind, (row,) = run_kind("json_corrupt", tmp_path)
    assert row["json"] == kind.ref["raw"].decode()  # carried raw, as found
    assert row["notes"].startswith(JSON_NOTE) and "char" in row["notes"]
    assert row["caption"] == "a rocket"
    assert _mad(row["pixels"], kind.ref["src"]) < JPEG_TOL


def test_non_utf8_json_sidecar_encodes_and_is_noted(tmp_path: Path) -> None:
    kind, (row,) = run_kind("json_not_utf8", tmp_path)
    assert row["json"] == '{"caption": "caf\ufffd"}'
    assert row["notes"].startswith(JSON_NOTE + "not UTF-8")
    assert _mad(row["pixels"], kind.ref["src"]) < JPEG_TOL


# --------------------------------------------------------------------------- error rows


def test_truncated_jpeg_is_a_decode_error(tmp_path: Path) -> None:
    _, (row,) = run_kind("truncated_jpeg", tmp_path)
    assert row["error"].startswith("truncated or corrupt image data")


def test_zero_bytes_is_a_decode_error(tmp_path: Path) -> None:
    _, (row,) = run_kind("zero_bytes", tmp_path)
    assert row["error"] == "empty image data (0 bytes)"


def test_random_bytes_are_a_decode_error(tmp_path: Path) -> None:
    run_kind("random_bytes", tmp_path)


def test_html_saved_as_jpg_is_a_decode_error(tmp_path: Path) -> None:
    _, (row,) = run_kind("html_as_jpg", tmp_path)
    assert "b'<!DOCTYPE html>" in row["error"]  # the message shows what the bytes were


def test_decompression_bomb_over_the_configured_limit(tmp_path: Path) -> None:
    kind, (row,) = run_kind("decompression_bomb", tmp_path)
    assert "400000000" in row["error"] and "178956970" in row["error"]
    # The limit is the config's: a real 64x64 photo passes by default, and is refused once
    # preprocess.max_pixels is below its 4096 pixels.
    url = write_webdataset_shard(str(tmp_path / "real.tar"), [_sample("real", kind.ref["real"], "png")])
    (ok,) = _through_pipeline(url)
    assert ok["error"] is None
    (refused,) = _through_pipeline(url, PreprocessConfig(resolution=RES, max_pixels=4000))
    assert refused["stage"] == "decode"
    assert "4096 pixels" in refused["error"] and "preprocess.max_pixels = 4000" in refused["error"]


def test_sample_without_image_member_is_a_read_error(tmp_path: Path) -> None:
    _, (row,) = run_kind("no_image_member", tmp_path)
    expected = ", ".join(IMAGE_FIELD.split(";"))
    assert row["error"] == f"no image member (expected one of: {expected}); found: json, txt"
    assert row["caption"] == "a photo: no_image_member"  # carried for the error row


def test_duplicate_key_second_occurrence_is_an_error_row(tmp_path: Path) -> None:
    kind, (first, _, second) = run_kind("duplicate_key", tmp_path)
    assert _mad(first["pixels"], kind.ref["first"]) < JPEG_TOL
    assert _mad(first["pixels"], kind.ref["second"]) > 20.0
    assert second["index"] == 2


# --------------------------------------------------------------------------- security


def test_pickle_members_are_never_unpickled(tmp_path: Path) -> None:
    # The payload is live: unpickling it does create its file.
    control = tmp_path / "control"
    pickle.loads(_trap_pickle(control))
    assert control.exists()

    kind, (row,) = run_kind("pickle_members", tmp_path)
    assert not kind.ref["marker"].exists()
    assert not kind.ref["marker"].parent.exists()
    assert _mad(row["pixels"], kind.ref["src"]) < JPEG_TOL


def test_unsafe_keys_are_read_errors(tmp_path: Path) -> None:
    _, rows = run_kind("unsafe_keys", tmp_path)
    assert [r["key"] for r in rows] == list(UNSAFE_KEYS)
    assert all(r["stage"] == "read" for r in rows)


def test_directory_key_is_an_ordinary_sample(tmp_path: Path) -> None:
    kind, (row,) = run_kind("directory_key", tmp_path)
    assert row["key"] == "sub/dir/k1"
    assert _mad(row["pixels"], kind.ref["src"]) < JPEG_TOL


def test_the_corpus_is_complete(tmp_path: Path) -> None:
    assert len(KINDS) >= 15
    errors = {o.stage for build in KINDS.values() for _, o in build(tmp_path).outcomes}
    assert errors == {None, "read", "decode"}


# --------------------------------------------------------------------------- end to end


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _wds_keys(folder: Path) -> list[str]:
    """Sample keys of every WebDataset tar under ``folder`` (one per sample, via its latent)."""
    keys = []
    for tar_path in sorted(folder.rglob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                assert not member.name.startswith("/") and ".." not in member.name.split("/")
                if member.name.endswith(".latent.npy"):
                    keys.append(member.name[: -len(".latent.npy")])
    return keys


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_corpus_end_to_end(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    from latentize.pipeline import run

    kinds = [build(tmp_path) for build in KINDS.values()]
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_webdataset_shard(str(inputs / "00000.tar"), [s for k in kinds for s in k.samples])
    _write_members(inputs / "00001.tar", [m for k in kinds for m in k.members])
    expected: dict[str, list[Outcome]] = {}
    for kind in kinds:
        for key, outcome in kind.outcomes:
            expected.setdefault(key, []).append(outcome)
    (marker,) = [k.ref["marker"] for k in kinds if "marker" in k.ref]

    def config(out: Path, fmt: str) -> Any:
        return load_config(
            base={
                "input": {"urls": str(inputs / "*.tar"), "image_field": IMAGE_FIELD},
                "preprocess": {"resolution": RES},
                "encoder": {"model": str(tiny_models["kl"]), "batch_size": 8},
                "output": {"path": str(out), "format": fmt},
                "ray": {"actors": 1},
            }
        )

    # Deep output roots: a key's "../../" would land inside tmp_path, where it is seen.
    out_wds = tmp_path / "deep" / "er" / "wds"
    out_pq = tmp_path / "deep" / "er" / "pq"
    before = _files(tmp_path)
    outside_before = set(glob.glob("/abs*"))

    summary = run(config(out_wds, "webdataset"))
    n_ok = sum(o.stage is None for outcomes in expected.values() for o in outcomes)
    n_samples = sum(len(outcomes) for outcomes in expected.values())
    assert (summary.samples_ok, summary.samples_failed) == (n_ok, n_samples - n_ok)
    assert summary.complete

    data_keys = _wds_keys(out_wds)
    errors = pq.read_table(out_wds / "_errors")
    error_keys = errors.column("key").to_pylist()
    # Exactly once: every input sample is one data row or one error row.
    assert Counter(data_keys + error_keys) == Counter({k: len(v) for k, v in expected.items()})
    by_key: dict[str, list[tuple[str | None, str | None]]] = {k: [] for k in expected}
    for key in data_keys:
        by_key[key].append((None, None))
    stages, messages = errors.column("stage").to_pylist(), errors.column("error").to_pylist()
    for key, stage, message in zip(error_keys, stages, messages, strict=False):
        by_key[key].append((stage, message))
    for key, outcomes in expected.items():
        got = sorted(by_key[key], key=lambda sm: (sm[0] or "", sm[1] or ""))
        want = sorted(outcomes, key=lambda o: (o.stage or "", o.reason or ""))
        for (stage, message), outcome in zip(got, want, strict=False):
            assert stage == outcome.stage, (key, stage, message)
            if outcome.stage is not None:
                assert outcome.reason in message, (key, message)

    summary = run(config(out_pq, "parquet"))
    assert summary.samples_ok == n_ok
    table = pq.read_table(out_pq)
    assert table.schema.field("notes").type == pa.string()
    assert table.column_names.index("notes") == table.column_names.index("json") + 1
    notes = dict(zip(table.column("key").to_pylist(), table.column("notes").to_pylist(), strict=False))
    assert len(notes) == n_ok  # one data row per encoded sample (the duplicate: its first)
    for key, note in notes.items():
        want_note = next(o.note for o in expected[key] if o.stage is None)
        if want_note is None:
            assert note is None, (key, note)
        else:
            assert note is not None and want_note in note, (key, note)
    assert notes["tiny_upscaled"] == "upscaled from 12x9"
    assert notes["caption_not_utf8"] == CAPTION_NOTE

    # Nothing outside the output roots: no escaped key, no unpickled marker.
    new = _files(tmp_path) - before
    assert new and all(p.is_relative_to(out_wds) or p.is_relative_to(out_pq) for p in new), sorted(
        str(p) for p in new if not (p.is_relative_to(out_wds) or p.is_relative_to(out_pq))
    )
    assert not marker.exists()
    assert set(glob.glob("/abs*")) == outside_before
