"""An img2dataset output folder as img2dataset 1.47 lays it out, with the shards that broke runs.

``write_output(root, fmt)`` writes, through :func:`latentize.demo.write_img2dataset_shard`
(``NNNNN.tar`` + sidecar ``NNNNN.parquet`` + ``NNNNN_stats.json``, or ``NNNNN.parquet`` with
every URL tried + ``NNNNN_stats.json``):

- ``00000``: real photos of assorted aspect ratios, a dead link and an HTML page saved as
  ``.jpg`` (img2dataset's ``resize_mode: no`` keeps whatever the server sent);
- ``00001``: every download failed: a tar with no sample (its sidecar lists the failures), or a
  Parquet shard whose rows all lack an image;
- ``00002``: a single photo;
- ``00003``: exactly ``ROWS_PER_BLOCK`` photos, so that the end-of-shard row is a block of its own;
- ``00004``: HTML pages only (every sample fails to decode).

Read with ``input.rows_per_block = ROWS_PER_BLOCK`` (and Ray Data's ``preserve_order``), the
all-failed shards give blocks in which every nullable column is null, which Ray types by what
the block holds unless every stage fixes their Arrow types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from latentize.demo import ShardSample, failed_download, photo_samples, write_img2dataset_shard

#: ``input.rows_per_block`` of the runs over this layout.
ROWS_PER_BLOCK = 2

_HTML = b"<!DOCTYPE html>\n<html><head><title>Just a moment...</title></head><body>checking</body></html>\n"


def _key(shard: int, index: int) -> str:
    return f"{shard:05d}{index:04d}"


def _photo(shard: int, index: int, source: ShardSample) -> ShardSample:
    key = _key(shard, index)
    meta = dict(source.meta or {}, key=key)
    return ShardSample(key=key, image=source.image, caption=source.caption, meta=meta)


def _html(shard: int, index: int) -> ShardSample:
    key = _key(shard, index)
    meta = {"url": f"https://example.com/page/{key}.jpg", "caption": "not an image", "key": key}
    return ShardSample(key=key, image=_HTML, caption="not an image", meta=meta)


def _dead(shard: int, index: int) -> ShardSample:
    return failed_download(_key(shard, index), caption="a photo that is gone")


@dataclass
class Layout:
    """What was written and what a run over it must give.

    Attributes:
        urls: the glob a run reads (``*.tar`` or ``*.parquet``).
        ok: keys of the samples that decode (one data row per resolution each).
        read_errors: keys the run reads without an image (Parquet's failed downloads).
        decode_errors: keys whose bytes are not an image.
        shards: shard ids.
    """

    urls: str
    ok: list[str] = field(default_factory=list)
    read_errors: list[str] = field(default_factory=list)
    decode_errors: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)


def shard_samples() -> list[list[ShardSample]]:
    """The samples of each shard, failed downloads included."""
    # Portrait, landscape and wide photos, so that aspect-ratio buckets get several folders.
    photos = [photo_samples()[i] for i in (3, 4, 19, 22, 5, 6, 7)]
    return [
        [*(_photo(0, i, photos[i]) for i in range(4)), _dead(0, 4), _html(0, 5)],
        [_dead(1, i) for i in range(9)],
        [_photo(2, 0, photos[4])],
        [_photo(3, i, photos[5 + i]) for i in range(ROWS_PER_BLOCK)],
        [_html(4, i) for i in range(9)],
    ]


def write_output(root: Path, fmt: str) -> Layout:
    """Writes img2dataset's output folder in ``fmt`` (``webdataset`` or ``parquet``) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    suffix = "tar" if fmt == "webdataset" else "parquet"
    layout = Layout(urls=str(root / f"*.{suffix}"))
    for shard, samples in enumerate(shard_samples()):
        write_img2dataset_shard(str(root), shard, samples, fmt=fmt)
        layout.shards.append(f"{shard:05d}")
        for s in samples:
            if s.image is None:
                if fmt == "parquet":  # a tar holds the downloaded images only
                    layout.read_errors.append(s.key)
            elif s.image == _HTML:
                layout.decode_errors.append(s.key)
            else:
                layout.ok.append(s.key)
    return layout
