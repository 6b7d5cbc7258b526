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
        return _write(table.select(order), compression)

    def merge(self, files: list[bytes], rows: list[int]) -> bytes:
        tables = [pq.read_table(pa.BufferReader(f)) for f in files]
        codec = pq.ParquetFile(pa.BufferReader(files[0])).metadata.row_group(0).column(0).compression
        return _write(pa.concat_tables(tables).take(pa.array(rows, pa.int64())), codec.lower())


def _write(table: pa.Table, compression: str) -> bytes:
    buf = io.BytesIO()
    # Small row groups keep readers' memory low and let them skip by key ranges.
    pq.write_table(table, buf, compression=compression, row_group_size=1024)
    return buf.getvalue()


SINKS.add("parquet", ParquetSink())
