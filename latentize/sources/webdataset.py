"""Reader for img2dataset-style WebDataset tar shards.

A shard holds members ``KEY.jpg`` (or png, webp, ...), ``KEY.txt``, ``KEY.json``; the members of
one key are contiguous. The key/extension split is WebDataset's own
(:func:`webdataset.tariterators.base_plus_ext`, as :mod:`latentize.tarnames` repeats it without
importing webdataset: the extension is everything after the first dot of the basename), so keys
match what any WebDataset pipeline would see.

The tar loop itself is hand-written on :mod:`tarfile` rather than taken from
``webdataset.tariterators.tar_file_iterator`` / ``group_by_keys`` because this reader needs three
things they do not give: members we do not use are skipped without being read (while their keys
still count, so a sample without an image becomes an error row instead of vanishing), duplicate
keys become error rows instead of exceptions, and a tar cut at a header boundary is detected as
truncated instead of ending quietly.
"""

from __future__ import annotations

import logging
import posixpath
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

from latentize.columns import join_notes
from latentize.config import InputConfig
from latentize.sources.base import (
    SOURCES,
    RawSample,
    caption_text,
    duplicate_key_error,
    json_text,
    resolve_caption_field,
    unsafe_key,
)
from latentize.tarnames import base_plus_ext

__all__ = ["read_webdataset"]

logger = logging.getLogger(__name__)


def _suffixes(field: str | None) -> list[str]:
    if not field:
        return []
    return [s.strip().lower().lstrip(".") for s in field.split(";") if s.strip()]


class _Sample:
    """The members of one key collected so far (only the ones the config asks for)."""

    def __init__(self, key: str, occurrence: int) -> None:
        self.key = key
        self.occurrence = occurrence
        self.members: dict[str, bytes] = {}
        self.found: list[str] = []
        self.repeated: list[str] = []

    def _error(self, image: bytes | None, image_exts: list[str]) -> str | None:
        """This sample's read-stage error, or ``None``.

        The unsafe-key check comes first: whatever else is wrong, such a key must never name
        an output.
        """
        unsafe = unsafe_key(self.key)
        if unsafe is not None:
            return unsafe
        if self.occurrence > 1:
            return duplicate_key_error(self.occurrence)
        if self.repeated:
            return f"duplicate member(s) in sample: {', '.join(sorted(set(self.repeated)))}"
        if image is None:
            found = ", ".join(self.found) or "none"
            return f"no image member (expected one of: {', '.join(image_exts)}); found: {found}"
        return None

    def finish(self, *, image_exts: list[str], caption_ext: str | None, json_ext: str | None) -> RawSample:
        # A bad sidecar must not cost the sample: its text is kept and the problem noted.
        caption, caption_note = caption_text(self.members.get(caption_ext) if caption_ext else None)
        meta, json_note = json_text(self.members.get(json_ext) if json_ext else None)
        image = next((self.members[e] for e in image_exts if e in self.members), None)
        error = self._error(image, image_exts)
        if error is not None:
            image = None
        return RawSample(
            key=self.key,
            image=image,
            caption=caption,
            json=meta,
            error=error,
            notes=join_notes([caption_note, json_note]),
        )


def _check_clean_end(tar: tarfile.TarFile) -> None:
    """Raises when the archive ended inside a header instead of at its end-of-archive block.

    tarfile (stream mode) ends quietly when the data stops at or inside a member header, so a
    shard cut at a member boundary would look complete. A proper end is a full 512-byte zero
    block: the stream then stands one block past the last member's end; a cut one stands short.
    """
    consumed = tar.fileobj.tell() - tar.offset
    if consumed < tarfile.BLOCKSIZE:
        raise tarfile.ReadError(
            f"unexpected end of data: the tar ends {consumed} bytes into a member header (truncated shard?)"
        )


@SOURCES.register("webdataset")
def read_webdataset(fileobj: BinaryIO, /, *, config: InputConfig) -> Iterator[RawSample]:
    """Streams the samples of one WebDataset tar shard (plain or gzip-compressed).

    Yields one :class:`RawSample` per key, in archive order. ``config.image_field`` lists the
    image suffixes in order of preference (``"jpg;png;webp"``); ``caption_field`` (``auto``:
    ``txt``) and ``json_field`` name the text members (``None``: not read). Non-regular members and names
    starting with ``__`` or ``.`` are skipped; members of other suffixes are skipped unread (so
    ``.pth`` / ``.pkl`` / ``.pickle`` members are never unpickled, nor even read). A key without
    an image member, seen again after other keys, or unsafe as a path (empty, NUL, absolute,
    ``..``; see :func:`~latentize.sources.base.unsafe_key`) becomes an error row. A caption
    that is not UTF-8 or a json member that does not parse is kept and recorded in ``notes``.

    Raises:
        tarfile.ReadError: not a tar, or truncated; raised after the complete samples before
            the damage were yielded (the sample being read at that point is not yielded).
    """
    image_exts = _suffixes(config.image_field)
    caption_ext = next(iter(_suffixes(resolve_caption_field(config.caption_field, "webdataset"))), None)
    json_ext = next(iter(_suffixes(config.json_field)), None)
    wanted = set(image_exts) | {e for e in (caption_ext, json_ext) if e}
    occurrences: dict[str, int] = {}
    current: _Sample | None = None

    tar = tarfile.open(fileobj=fileobj, mode="r|*")
    try:
        while (info := tar.next()) is not None:
            # Stream mode still appends every TarInfo to .members; drop them so memory stays
            # flat over a shard of any size (webdataset does the same).
            tar.members = []  # type: ignore[attr-defined]  # CPython's list, missing from typeshed
            if not info.isreg():
                continue
            name = info.name
            while name.startswith("./"):
                name = name[2:]
            if posixpath.basename(name).startswith(("__", ".")):
                continue
            key, ext = base_plus_ext(name)
            if key is None or ext is None:
                continue  # no extension: not a sample member
            ext = ext.lower()
            if current is None or key != current.key:
                if current is not None:
                    yield current.finish(image_exts=image_exts, caption_ext=caption_ext, json_ext=json_ext)
                occurrences[key] = occurrences.get(key, 0) + 1
                current = _Sample(key, occurrences[key])
            if ext in current.found:
                current.repeated.append(ext)
                continue
            current.found.append(ext)
            if ext in wanted and current.occurrence == 1:
                member = tar.extractfile(info)
                if member is not None:
                    current.members[ext] = member.read()
        _check_clean_end(tar)
    finally:
        tar.close()
    if current is not None:
        yield current.finish(image_exts=image_exts, caption_ext=caption_ext, json_ext=json_ext)
