"""What every input reader yields, the registry of readers, and format inference.

A reader turns one open shard (a binary file object from fsspec) into a stream of
:class:`RawSample` records. Readers never decode images: they only pull bytes out of the
container, so that the read stage stays cheap and bounded in memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Protocol

from latentize.config import InputConfig
from latentize.errors import ConfigError
from latentize.registry import Registry

__all__ = ["RawSample", "Reader", "SOURCES", "infer_format"]

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
            jpg)"``, ``"duplicate key in shard: second occurrence"``, ``"null image"``);
            ``None`` for a good sample.
    """

    key: str
    image: bytes | None
    caption: str | None = None
    json: str | None = None
    error: str | None = None


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
        raise ConfigError(
            f"input.urls: the files mix input formats ({shown}); one run reads one format"
        )
    (fmt,) = found
    logger.debug("inferred input.format=%s from %d URL(s)", fmt, len(urls))
    return fmt
