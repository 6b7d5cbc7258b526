"""What every input reader yields, the registry of readers, and format inference.

A reader turns one open shard (a binary file object from fsspec) into a stream of
:class:`RawSample` records. Readers never decode images: they only pull bytes out of the
container, so that the read stage stays cheap and bounded in memory.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from latentize.config import AUTO_FIELD, InputConfig
from latentize.errors import ConfigError
from latentize.registry import Registry

__all__ = [
    "CAPTION_DEFAULTS",
    "RawSample",
    "Reader",
    "SOURCES",
    "caption_text",
    "duplicate_key_error",
    "infer_format",
    "json_text",
    "resolve_caption_field",
    "unsafe_key",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawSample:
    """One sample as read from a shard, before any decoding.

    Attributes:
        key: the sample key (WebDataset member prefix or the Parquet key column).
        image: the encoded image bytes; ``None`` whenever ``error`` is set.
        caption: caption text carried through, or ``None``.
        json: raw JSON metadata text carried through, or ``None``.
        error: a read-stage problem with this sample (``"no image member (expected one of:
            jpg)"``, ``"duplicate key in shard: second occurrence"``, ``"null image"``,
            ``"unsafe key: ..."``); ``None`` for a good sample.
        notes: non-fatal findings about the sample's sidecars (a caption that is not UTF-8, a
            json member that does not parse), joined with ``"; "``; ``None`` when there are
            none. The sample still encodes; the note travels to the output's ``notes`` column.
    """

    key: str
    image: bytes | None
    caption: str | None = None
    json: str | None = None
    error: str | None = None
    notes: str | None = None


# --- shared per-sample checks of the readers ---------------------------------------------------

# Keys become member names of WebDataset output (and may become file names in whatever a user
# extracts them to): a backslash is a separator on Windows, so ".." is refused behind either.
_KEY_PARTS = re.compile(r"[/\\]")
# A reason quoted in a note is cut here: the note is for people, the sidecar is still carried.
_REASON_CHARS = 120


def unsafe_key(key: str) -> str | None:
    """Why ``key`` must not name anything on a filesystem, or ``None`` when it is safe.

    Unsafe: empty, containing a NUL byte, absolute (starts with ``/``), or having a ``..``
    path component (split on ``/`` and ``\\``). Ordinary sub-folders (``sub/dir/k1``) are safe:
    img2dataset-style WebDataset keys may carry them.

    Returns:
        ``"unsafe key: <reason>"``, ready to be a read-stage error, or ``None``.
    """
    if not key:
        return "unsafe key: empty"
    if "\x00" in key:
        return "unsafe key: contains a NUL byte"
    if key.startswith("/"):
        return "unsafe key: absolute path (starts with '/')"
    if ".." in _KEY_PARTS.split(key):
        return "unsafe key: has a '..' path component (would point outside the output folder)"
    return None


_ORDINALS = {2: "second", 3: "third"}

#: What ``input.caption_field: auto`` reads, per input format, in order of preference: the first
#: of these columns that a Parquet file has (img2dataset's Parquet output names it ``caption``);
#: WebDataset members cannot be known before reading, so the first is the one.
CAPTION_DEFAULTS: dict[str, tuple[str, ...]] = {"webdataset": ("txt",), "parquet": ("caption", "txt")}


def resolve_caption_field(field: str | None, fmt: str, columns: Collection[str] | None = None) -> str | None:
    """The caption member suffix or column that ``input.caption_field`` means for ``fmt``.

    Anything but ``auto`` is returned as given (``None``: no caption). ``auto`` becomes the
    first of :data:`CAPTION_DEFAULTS` present in ``columns`` (``None`` when none is), or the
    first of them when ``columns`` is not known (WebDataset).
    """
    if field != AUTO_FIELD:
        return field
    candidates = CAPTION_DEFAULTS.get(fmt, ("txt",))
    if columns is None:
        return candidates[0]
    return next((c for c in candidates if c in columns), None)


def duplicate_key_error(occurrence: int) -> str:
    """The read-stage error of the ``occurrence``-th (2 or more) sample of one key in a shard."""
    nth = _ORDINALS.get(occurrence)
    if nth:
        return f"duplicate key in shard: {nth} occurrence"
    return f"duplicate key in shard: occurrence {occurrence}"


def _short(text: str) -> str:
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


def caption_text(data: bytes | None) -> tuple[str | None, str | None]:
    """A caption member's bytes -> ``(text, note)``.

    Invalid UTF-8 must not cost the sample: the text is kept with the bad bytes replaced
    (U+FFFD) and the note says so.
    """
    if data is None:
        return None, None
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return (
            data.decode("utf-8", errors="replace"),
            "caption is not valid UTF-8 (undecodable bytes replaced)",
        )


def json_text(data: bytes | str | None) -> tuple[str | None, str | None]:
    """A json sidecar (bytes or text) -> ``(raw text, note)``.

    The raw text is carried as it is (decoded with replacement when not UTF-8); when it is
    not valid JSON the note names why, in a short reason (``"json sidecar is not valid JSON:
    Expecting value: line 1 column 1 (char 0)"``), so a reader of the output can tell.
    """
    if data is None:
        return None, None
    if isinstance(data, str):
        text = data
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            reason = f"not UTF-8 ({exc.reason} at byte {exc.start})"
            return data.decode("utf-8", errors="replace"), f"json sidecar is not valid JSON: {reason}"
    try:
        json.loads(text)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        return text, f"json sidecar is not valid JSON: {_short(str(exc))}"
    except RecursionError:
        # Deeply nested arrays: valid JSON in principle, but not something anyone can load.
        return text, "json sidecar is not valid JSON: nested too deeply to parse"
    return text, None


class Reader(Protocol):
    """A shard reader: streams the samples of one open shard.

    It must stream: memory stays independent of the shard's size. A shard-level failure
    (truncated archive, not a tar / parquet file) is raised *after* the samples read so far
    were yielded; the caller records it against the shard.
    """

    def __call__(self, fileobj: BinaryIO, /, *, config: InputConfig) -> Iterator[RawSample]: ...


#: Input readers by ``input.format`` name.
SOURCES: Registry[Reader] = Registry("input format", config_key="input.format")

# Longest suffixes first so that ".tar.gz" wins over a hypothetical ".gz" entry.
_SUFFIX_FORMATS: tuple[tuple[str, str], ...] = (
    (".tar.gz", "webdataset"),
    (".tgz", "webdataset"),
    (".tar", "webdataset"),
    (".parquet", "parquet"),
    (".pq", "parquet"),
)


def _format_of(url: str) -> str | None:
    path = url
    # A query string (signed https URLs) is not part of the file name.
    if "://" in path and "?" in path:
        path = path.split("?", 1)[0]
    path = path.lower()
    for suffix, fmt in _SUFFIX_FORMATS:
        if path.endswith(suffix):
            return fmt
    return None


def infer_format(urls: list[str]) -> str:
    """The input format implied by the URLs' extensions.

    ``.tar`` / ``.tar.gz`` / ``.tgz`` are ``webdataset``; ``.parquet`` / ``.pq`` are ``parquet``.

    Raises:
        ConfigError: no URLs, an unknown extension, or a mix of formats.
    """
    if not urls:
        raise ConfigError("input.urls: no input files; cannot infer input.format")
    found: dict[str, str] = {}
    for url in urls:
        fmt = _format_of(url)
        if fmt is None:
            raise ConfigError(
                f"input.format: cannot infer the format of {url!r} from its extension "
                "(known: .tar, .tar.gz, .tgz, .parquet, .pq); set input.format to one of: "
                + ", ".join(SOURCES.names() or ["webdataset", "parquet"])
            )
        found.setdefault(fmt, url)
    if len(found) > 1:
        shown = "; ".join(f"{fmt} (e.g. {url!r})" for fmt, url in sorted(found.items()))
        raise ConfigError(f"input.urls: the files mix input formats ({shown}); one run reads one format")
    (fmt,) = found
    logger.debug("inferred input.format=%s from %d URL(s)", fmt, len(urls))
    return fmt
