"""The columns that travel between stages: one Arrow type each, whatever a block holds.

Ray types a block built from numpy by what it holds: a column whose values are all ``None``
becomes Arrow's ``null`` type, which Ray hands to the next numpy batch function as a float
array of NaN; returned as it is, that column is ``float`` in one block and ``string`` in the
next, and Ray cannot concatenate the two ("Unable to merge: Field folder has incompatible
types"). Blocks of end-of-shard rows only, or of failed samples only, are such blocks. So every
stage returns its batch through :func:`to_block`, which gives each column of
:data:`FLIGHT_TYPES` its one type (tensor columns keep Ray's conversion), and reads text
columns through :func:`text_column`, so that "no value" means ``None`` everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = [
    "ENCODE_STARTED",
    "FLIGHT_TYPES",
    "NOTES_SEPARATOR",
    "REENCODED",
    "TEXT_COLUMNS",
    "flight_array",
    "is_null",
    "join_notes",
    "normalize_text",
    "prompt_flight_array",
    "prompt_flight_type",
    "prompt_values",
    "text_column",
    "to_block",
]

#: Joins the non-fatal findings of one sample in its ``notes`` column.
NOTES_SEPARATOR = "; "

#: The flight column in which the encoder actor stamps when each call began (epoch seconds).
ENCODE_STARTED = "encode_started"

#: The flight column that flags a sample the encoder re-encoded in float32 (its latents were
#: not finite in the compute dtype): staging counts these per part, for the marker's
#: ``reencoded_fp32``. Never stored: the sample's ``notes`` say it to readers of the data.
REENCODED = "reencoded_fp32"

#: The Arrow type of every column other than pixels and tensors that crosses a stage. A new
#: column that travels between stages belongs here (``tests/test_columns.py`` checks every
#: stage's output against it).
FLIGHT_TYPES: dict[str, pa.DataType] = {
    "key": pa.string(),
    "shard": pa.string(),
    # Position of the sample in its shard; -1 on the end-of-shard row.
    "index": pa.int64(),
    # Encoded image bytes (read blocks; the encoder actors' input when they decode).
    "image": pa.binary(),
    "caption": pa.string(),
    "json": pa.string(),
    "notes": pa.string(),
    "error": pa.string(),
    "stage": pa.string(),
    # -1 on sample rows; the number of samples read on the end-of-shard row.
    "total": pa.int64(),
    # The Ray node that read the shard (end-of-shard row only).
    "read_node": pa.string(),
    # Runs of several sizes: the resolution (-1: none) and data folder (None) of each row.
    "slot": pa.int32(),
    "folder": pa.string(),
    "width": pa.int32(),
    "height": pa.int32(),
    "crop_top": pa.int32(),
    "crop_left": pa.int32(),
    # When the encoder call that made the row began (epoch seconds).
    ENCODE_STARTED: pa.float64(),
    # The encoder re-encoded the row in float32 (set by the encoder actor).
    REENCODED: pa.bool_(),
}

#: The nullable string columns that travel between stages.
TEXT_COLUMNS = tuple(name for name, dtype in FLIGHT_TYPES.items() if pa.types.is_string(dtype))


def is_null(value: Any) -> bool:
    """True for ``None``, float NaN and the empty string."""
    return (
        value is None
        or (isinstance(value, (float, np.floating)) and value != value)
        or (isinstance(value, str) and value == "")
    )


def text_column(values: Iterable[Any] | None, n: int) -> np.ndarray:
    """A fresh (n,) object array of ``str`` or ``None`` from a batch column (absent: all None)."""
    out = np.empty(n, dtype=object)
    if values is not None:
        out[:] = [None if is_null(v) else str(v) for v in values]
    return out


def normalize_text(batch: dict[str, Any]) -> dict[str, Any]:
    """Returns ``batch`` with every present :data:`TEXT_COLUMNS` column as ``str``/``None``
    objects, so that blocks Ray builds from it always type them as strings (an all-NaN float
    column in one block and strings in the next cannot be concatenated)."""
    out = dict(batch)
    for name in TEXT_COLUMNS:
        if name in out:
            out[name] = text_column(out[name], len(out[name]))
    return out


def join_notes(notes: Iterable[str | None]) -> str | None:
    """Joins the non-empty findings with ``"; "``; ``None`` when there is none."""
    found = [n for n in notes if n]
    return NOTES_SEPARATOR.join(found) if found else None


def flight_array(values: Any, dtype: pa.DataType) -> pa.Array:
    """One batch column as an Arrow array of ``dtype``: text through :func:`text_column`, bytes
    with ``None`` (or NaN) as null, numbers cast (NaN becomes null)."""
    if pa.types.is_string(dtype):
        return pa.array(text_column(values, len(values)), type=dtype)
    if pa.types.is_binary(dtype):
        return pa.array([None if v is None or isinstance(v, float) else bytes(v) for v in values], type=dtype)
    return pa.array(np.asarray(values), type=dtype, from_pandas=True)


def to_block(batch: Mapping[str, Any]) -> pa.Table:
    """A stage's output batch as the Ray Data block it returns: every :data:`FLIGHT_TYPES`
    column at its type, the other columns (pixels, tensors) as Ray converts them, in the
    batch's column order."""
    from ray.data.block import BlockAccessor

    others = {name: values for name, values in batch.items() if name not in FLIGHT_TYPES}
    converted = BlockAccessor.for_block(BlockAccessor.batch_to_block(others)).to_arrow() if others else None
    columns: dict[str, Any] = {}
    for name, values in batch.items():
        if name in FLIGHT_TYPES:
            columns[name] = flight_array(values, FLIGHT_TYPES[name])
        else:
            assert converted is not None
            columns[name] = converted.column(name)
    return pa.table(columns)


# -- the text encoder's columns ------------------------------------------------------------------
#
# The text actor appends one column per stored text column (``prompt_embeds``, ...) to every
# block it returns, rows without text (errors, end-of-shard rows) holding zeros (no rows). Their
# types are built here, never left to Ray: a block of end-of-shard or failed rows only would
# otherwise give a ``trimmed`` column of empty arrays another type than a block of real rows.


def prompt_flight_type(shape: tuple[int | None, ...], dtype: str) -> pa.DataType:
    """The one Arrow type of a text column in flight, for its per-sample ``shape`` and ``dtype``.

    Fixed shapes: the canonical ``arrow.fixed_shape_tensor`` (as the latents travel); a scalar
    (``prompt_embeds_length``): the plain numeric type; a varying number of rows (``trimmed``
    ``prompt_embeds``, shape ``(None, width)``): ``large_list<dtype>`` of the row-major values
    (64-bit offsets: a staging batch of long prompts can pass 2**31 values), which Ray hands to
    numpy batches as one 1-D array per row (:func:`prompt_values` reshapes them).
    """
    value_type = pa.from_numpy_dtype(np.dtype(dtype))
    if None in shape:
        return pa.large_list(value_type)
    if not shape:
        return value_type
    return pa.fixed_shape_tensor(value_type, [int(d) for d in shape])  # type: ignore[arg-type]


def prompt_flight_array(values: Any, shape: tuple[int | None, ...], dtype: str) -> pa.Array:
    """A text column's values (N, *shape) array, or N per-row (rows_i, width) arrays for a
    varying shape) as an Arrow array of :func:`prompt_flight_type`."""
    dtype_ = np.dtype(dtype)
    target = prompt_flight_type(shape, dtype)
    if None in shape:
        rows = [np.asarray(v, dtype=dtype_).reshape(-1) for v in values]
        lengths = np.array([r.size for r in rows], dtype=np.int64)
        offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths, dtype=np.int64)])
        flat = np.concatenate(rows) if rows else np.zeros(0, dtype_)
        return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat, type=target.value_type))
    array = np.ascontiguousarray(np.asarray(values, dtype=dtype_))
    if not shape:
        return pa.array(array.reshape(-1), type=target)
    flat_values = pa.array(array.reshape(-1), type=target.value_type)
    storage = pa.FixedSizeListArray.from_arrays(flat_values, int(np.prod(array.shape[1:])))
    return pa.ExtensionArray.from_storage(target, storage)


def prompt_values(column: Any, shape: tuple[int | None, ...], dtype: str) -> Any:
    """A text column of a numpy batch back in per-sample form: the (N, *shape) array for fixed
    shapes; for a varying number of rows, a list of N (rows_i, width) arrays."""
    if None not in shape:
        return np.asarray(column, dtype=np.dtype(dtype))
    width = int(shape[-1])  # type: ignore[arg-type]
    return [np.asarray(v, dtype=np.dtype(dtype)).reshape(-1, width) for v in column]
