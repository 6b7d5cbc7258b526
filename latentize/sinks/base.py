"""Sink registry and the shared Arrow helpers of the final formats.

A sink turns one shard's committed rows (an Arrow table, rows in input order) into the bytes of
one file; where and when the file appears is the commit protocol's business
(:mod:`latentize.sinks.commit`), so every sink gets atomic, exactly-once files for free.

Tensor columns have two Arrow layouts (``output.tensor_type``): ``fixed_shape_tensor``, the
canonical extension type ``arrow.fixed_shape_tensor`` (pyarrow and Ray Data give back the
shape), and ``list``, nested fixed-size lists ``fixed_size_list<fixed_size_list<...>[w]>[h]>[C]``
(readers without Arrow extension types, such as Hugging Face ``datasets``, polars and DuckDB,
see the shape in the nesting). Every reader in latentize goes through :func:`tensor_numpy`,
which takes both.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from latentize.registry import Registry

__all__ = [
    "FIXED_SHAPE_TENSOR",
    "LIST",
    "SINKS",
    "TENSOR_TYPES",
    "Sink",
    "canonical_tensor",
    "is_ragged",
    "is_tensor_type",
    "prompt_array",
    "prompt_samples",
    "read_parquet_bytes",
    "tensor_array",
    "tensor_numpy",
]

#: ``output.tensor_type`` values: the canonical Arrow tensor extension type, nested fixed-size lists.
FIXED_SHAPE_TENSOR = "fixed_shape_tensor"
LIST = "list"
TENSOR_TYPES = (FIXED_SHAPE_TENSOR, LIST)


class Sink(Protocol):
    """Serialises a shard's data rows to one file's bytes.

    ``table`` columns: ``key``, one ``arrow.fixed_shape_tensor`` column per encoder output,
    ``caption``, ``json``, ``width``, ``height``, ``crop_top``, ``crop_left``.
    ``tensor_type`` is the layout the tensor columns get in the file (formats that store tensors
    otherwise, such as ``.npy`` members, ignore it). ``prompt_columns`` are the text encoder's
    columns (runs with a ``text`` section), as :func:`prompt_array` builds them: they follow the
    tensor columns.
    """

    extension: str

    def serialize(
        self,
        table: pa.Table,
        *,
        tensor_columns: list[str],
        compression: str,
        tensor_type: str = FIXED_SHAPE_TENSOR,
        prompt_columns: list[str] | None = None,
    ) -> bytes: ...

    def merge(self, files: list[bytes], rows: list[int]) -> bytes:
        """One file holding rows ``rows`` (positions in the concatenation of ``files``' samples,
        in that order): the rare repair of parts that retried tasks staged overlapping."""
        ...


SINKS: Registry[Sink] = Registry("output format", config_key="output.format")


def tensor_array(values: np.ndarray, tensor_type: str = FIXED_SHAPE_TENSOR) -> pa.Array:
    """(N, *shape) array -> an Arrow array of N tensors, readable without Ray.

    ``fixed_shape_tensor``: the canonical ``arrow.fixed_shape_tensor`` extension array;
    ``list``: nested fixed-size lists, one level per axis of ``shape``. Same values, same dtype.
    """
    values = np.ascontiguousarray(values)
    if tensor_type == FIXED_SHAPE_TENSOR:
        if len(values):
            return pa.FixedShapeTensorArray.from_numpy_ndarray(values)
        # pyarrow refuses an empty ndarray; an empty array of the same type is built from storage.
        value_type = pa.from_numpy_dtype(values.dtype)
        storage = pa.FixedSizeListArray.from_arrays(pa.array([], value_type), int(np.prod(values.shape[1:])))
        return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(value_type, list(values.shape[1:])), storage)
    if tensor_type != LIST:
        raise ValueError(f"unknown tensor type {tensor_type!r} (one of {', '.join(TENSOR_TYPES)})")
    array: pa.Array = pa.array(values.reshape(-1))
    for size in reversed(values.shape[1:]):
        array = pa.FixedSizeListArray.from_arrays(array, int(size))
    return array


def is_ragged(dtype: pa.DataType) -> bool:
    """Whether ``dtype`` is a column of varying rows per sample: a list of fixed-size lists
    (a trimmed ``prompt_embeds``)."""
    return (pa.types.is_list(dtype) or pa.types.is_large_list(dtype)) and pa.types.is_fixed_size_list(dtype.value_type)


def read_parquet_bytes(data: bytes, *, columns: list[str] | None = None) -> pa.Table:
    """The table of one Parquet file held in memory (``columns``: all when None).

    Read on the calling thread (``ParquetFile``, no Arrow threads), so that every reference to
    ``data`` is gone when this returns. ``pq.read_table`` goes through the dataset scanner,
    whose state holding ``data`` is sometimes released later on an Arrow pool thread; when that
    happens after the interpreter has begun to exit, the thread cannot take the GIL and the
    process aborts ("terminate called without an active exception", apache/arrow#34314). Short
    commands, such as a rerun with nothing to do, exit within milliseconds of such a read.
    """
    return pq.ParquetFile(pa.BufferReader(data)).read(columns=columns, use_threads=False)


def is_tensor_type(dtype: pa.DataType) -> bool:
    """Whether ``dtype`` is one of the two tensor layouts."""
    return isinstance(dtype, pa.FixedShapeTensorType) or pa.types.is_fixed_size_list(dtype)


def tensor_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A tensor column in either layout -> (N, *shape) numpy array (zero-copy where Arrow allows)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column.type, pa.FixedShapeTensorType):
        return column.to_numpy_ndarray()
    shape: list[int] = []
    dtype = column.type
    while pa.types.is_fixed_size_list(dtype):
        shape.append(dtype.list_size)
        dtype = dtype.value_type
    if not shape:
        raise TypeError(f"not a tensor column: {column.type}")
    return column.flatten(recursive=True).to_numpy(zero_copy_only=False).reshape(len(column), *shape)


def canonical_tensor(column: pa.ChunkedArray | pa.Array) -> pa.Array | pa.ChunkedArray:
    """A tensor column as ``arrow.fixed_shape_tensor`` (returned as it is when it is one)."""
    if isinstance(column.type, pa.FixedShapeTensorType):
        return column
    return tensor_array(tensor_numpy(column))


def prompt_array(values: np.ndarray | list[np.ndarray], shape: tuple[int | None, ...], dtype: str) -> pa.Array:
    """One stored text-encoder column of N samples, as the output holds it.

    Fixed shapes (``prompt_embeds`` padded, ``pooled_prompt_embeds``, the mask): an (N, *shape)
    array, stored like the latents (:func:`tensor_array`; sinks turn it into nested lists for
    ``output.tensor_type: list``). A scalar (``prompt_embeds_length``): an (N,) array, a plain
    numeric column. A varying number of rows (``trimmed`` ``prompt_embeds``, shape ``(None,
    width)``): N (rows_i, width) arrays, stored as ``list<fixed_size_list<dtype, width>>``.
    """
    if None not in shape:
        array = np.asarray(values, dtype=np.dtype(dtype))
        return tensor_array(array) if shape else pa.array(array, type=pa.from_numpy_dtype(array.dtype))
    width = int(shape[-1])  # type: ignore[arg-type]
    rows = [np.asarray(v, dtype=np.dtype(dtype)).reshape(-1, width) for v in values]
    offsets = np.concatenate([np.zeros(1, np.int32), np.cumsum([len(r) for r in rows], dtype=np.int32)])
    flat = np.concatenate(rows).reshape(-1) if rows else np.zeros(0, np.dtype(dtype))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.FixedSizeListArray.from_arrays(pa.array(flat), width))


def prompt_samples(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray]:
    """A stored text-encoder column (any layout :func:`prompt_array` or the list tensor layout
    gives) -> one numpy array per sample: (*shape), (rows_i, width), or a 0-d scalar."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if is_tensor_type(column.type):
        return list(tensor_numpy(column))
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        width = column.type.value_type.list_size
        flat = column.flatten().flatten().to_numpy(zero_copy_only=False)
        offsets = column.offsets.to_numpy() - column.offsets[0].as_py()
        return [flat[a * width : b * width].reshape(-1, width) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    return [np.asarray(v) for v in column.to_numpy(zero_copy_only=False)]
