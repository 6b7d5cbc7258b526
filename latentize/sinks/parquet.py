"""Parquet output: one file per staged part and latent shape, tensors in either Arrow layout, zstd."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from latentize.sinks.base import FIXED_SHAPE_TENSOR, SINKS, read_parquet_bytes, tensor_array, tensor_numpy

__all__ = ["ParquetSink"]


class ParquetSink:
    """Writes ``key``, the tensor columns, the text encoder's columns, then passthrough
    (``caption``, ``json``, ``notes``) and geometry columns; tensor columns (and fixed-shape text
    columns) as canonical Arrow tensors or, with ``tensor_type`` ``list``, as nested fixed-size
    lists."""

    extension = "parquet"

    def serialize(
        self,
        table: pa.Table,
        *,
        tensor_columns: list[str],
        compression: str,
        tensor_type: str = FIXED_SHAPE_TENSOR,
        prompt_columns: list[str] | None = None,
    ) -> bytes:
        prompts = list(prompt_columns or [])
        if tensor_type != FIXED_SHAPE_TENSOR:
            # Text columns of fixed shape are tensors like the latents; lengths and trimmed
            # embeddings keep their own types.
            fixed = [n for n in prompts if isinstance(table.schema.field(n).type, pa.FixedShapeTensorType)]
            for name in [*tensor_columns, *fixed]:
                converted = tensor_array(tensor_numpy(table.column(name)), tensor_type)
                table = table.set_column(table.schema.get_field_index(name), name, converted)
        order = [
            "key",
            *tensor_columns,
            *prompts,
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
        tables = [read_parquet_bytes(f) for f in files]
        codec = pq.ParquetFile(pa.BufferReader(files[0])).metadata.row_group(0).column(0).compression
        return _write(pa.concat_tables(tables).take(pa.array(rows, pa.int64())), codec.lower())


def _write(table: pa.Table, compression: str) -> bytes:
    buf = io.BytesIO()
    # Small row groups keep readers' memory low and let them skip by key ranges.
    pq.write_table(table, buf, compression=compression, row_group_size=1024)
    return buf.getvalue()


SINKS.add("parquet", ParquetSink())
