"""Input shards: URL expansion, shard naming and the readers registered in :data:`SOURCES`.

Importing this package registers every built-in reader (``webdataset``, ``parquet``).
"""

from __future__ import annotations

# Imported for their side effect: each module registers its reader in SOURCES.
from latentize.sources import parquet as _parquet  # noqa: F401
from latentize.sources import webdataset as _webdataset  # noqa: F401
from latentize.sources.base import SOURCES, RawSample, Reader, infer_format
from latentize.sources.resolve import resolve_input_fields
from latentize.sources.urls import expand_urls, shard_ids

__all__ = ["RawSample", "Reader", "SOURCES", "expand_urls", "infer_format", "resolve_input_fields", "shard_ids"]
