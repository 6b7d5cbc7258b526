"""Parquet output: one file per input shard and latent shape, canonical Arrow tensors, zstd."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from latentize.sinks.base import SINKS

__all__ = ["ParquetSink"]


class ParquetSink:
    """Writes ``key``, the tensor columns, then passthrough (``caption``, ``json``, ``notes``)
    and geometry columns."""

    extension = "parquet"

    def serialize(self, table: pa.Table, *, tensor_columns: list[str], compression: str) -> bytes:
        order = [
            "key",
            *tensor_columns,
            "caption",
            "json",
            "notes",
            "width",
            "height",
            "crop_top",
            "crop_left",
        ]
        buf = io.BytesIO()
        # Small row groups keep readers' memory low and let them skip by key ranges.
        pq.write_table(table.select(order), buf, compression=compression, row_group_size=1024)
        return buf.getvalue()


SINKS.add("parquet", ParquetSink())
