"""Sink registry and the shared Arrow helpers of the final formats.

A sink turns one shard's committed rows (an Arrow table, rows in input order) into the bytes of
one file; where and when the file appears is the commit protocol's business
(:mod:`latentize.sinks.commit`), so every sink gets atomic, exactly-once files for free.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pyarrow as pa

from latentize.registry import Registry

__all__ = ["SINKS", "Sink", "tensor_array", "tensor_numpy"]


class Sink(Protocol):
    """Serialises a shard's data rows to one file's bytes.

    ``table`` columns: ``key``, one ``arrow.fixed_shape_tensor`` column per encoder output,
    ``caption``, ``json``, ``width``, ``height``, ``crop_top``, ``crop_left``.
    """

    extension: str

    def serialize(self, table: pa.Table, *, tensor_columns: list[str], compression: str) -> bytes: ...

    def merge(self, files: list[bytes], rows: list[int]) -> bytes:
        """One file holding rows ``rows`` (positions in the concatenation of ``files``' samples,
        in that order): the rare repair of parts that retried tasks staged overlapping."""
        ...


SINKS: Registry[Sink] = Registry("output format", config_key="output.format")


def tensor_array(values: np.ndarray) -> pa.Array:
    """(N, *shape) array -> canonical ``arrow.fixed_shape_tensor`` array (readable without Ray)."""
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(values))


def tensor_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-shape tensor column -> (N, *shape) numpy array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.to_numpy_ndarray()
