"""What the input fields of a run mean, settled once on the driver before the run starts.

``input.caption_field: auto`` depends on the input format and, for Parquet, on the columns the
files have; the run's manifest and fingerprint must show the member or column actually read, so
the driver resolves it from the first Parquet shard's footer (one small read, however many
shards there are). The same look at the schema reports missing optional columns once per run,
instead of once per read task.
"""

from __future__ import annotations

import dataclasses
import logging

import fsspec
import pyarrow.parquet as pq

from latentize.config import Config, InputConfig
from latentize.errors import ConfigError
from latentize.sources.base import resolve_caption_field
from latentize.sources.parquet import parquet_schema_findings

__all__ = ["parquet_columns", "resolve_input_fields"]

logger = logging.getLogger(__name__)

#: Shards tried for a schema: a first shard that cannot be read (missing, damaged) is that
#: shard's failure, recorded when the run reads it; the next one describes the input as well.
_SCHEMA_TRIES = 3


def parquet_columns(urls: list[str], config: InputConfig) -> list[str] | None:
    """The column names of the first readable Parquet shard of ``urls`` (its footer only), or
    ``None`` when none of the first few can be read."""
    for url in urls[:_SCHEMA_TRIES]:
        try:
            with fsspec.open(url, "rb", **config.storage_options) as f:
                return list(pq.ParquetFile(f).schema_arrow.names)
        except Exception as exc:  # noqa: BLE001 - that shard's own read reports it
            logger.debug("no schema from %s (%s: %s)", url, type(exc).__name__, exc)
    return None


def resolve_input_fields(config: Config, urls: list[str], fmt: str) -> Config:
    """``config`` with ``input.caption_field`` resolved for ``fmt`` (a copy; ``config`` is not
    changed); logs each optional column the Parquet input lacks, once.

    ``auto`` becomes ``txt`` for WebDataset; for Parquet, ``caption`` when the first shard has
    that column (img2dataset's Parquet output), else ``txt`` when it has that, else null (no
    caption). Call it on the driver with the run's expanded shard URLs, before the manifest and
    the fingerprint are made; the readers resolve an unresolved ``auto`` per file the same way.

    Raises:
        ConfigError: the Parquet input has no ``input.image_field`` column (names the columns
            it has), found here rather than in the first read task.
    """
    columns: list[str] | None = None
    if fmt == "parquet":
        columns = parquet_columns(urls, config.input)
        if columns is None:
            logger.warning("input: none of the first %d parquet shard(s) could be read to check columns", _SCHEMA_TRIES)
            return config
        if config.input.image_field not in columns:
            raise ConfigError(
                f"input.image_field: no column {config.input.image_field!r} in the parquet files; "
                f"available columns: {', '.join(columns)}"
            )
        for message in parquet_schema_findings(config.input, columns):
            logger.warning(message)
    caption = resolve_caption_field(config.input.caption_field, fmt, columns)
    if caption != config.input.caption_field:
        logger.info("input.caption_field: auto reads %s for %s input", repr(caption) if caption else "nothing", fmt)
    return dataclasses.replace(config, input=dataclasses.replace(config.input, caption_field=caption))
