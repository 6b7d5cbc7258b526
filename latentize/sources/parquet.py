"""Reader for Parquet shards (img2dataset's parquet output, Hugging Face ``datasets`` exports).

The file is read in record batches of ``input.rows_per_block`` rows and only the needed columns,
so memory is bounded by one row group's worth of those columns, never the whole file.

img2dataset's Parquet output holds one row per URL it tried: ``caption, url, key, status,
error_message, width, height, original_width, original_height, exif, sha256, jpg``, with ``jpg``
null where ``status`` is not ``success``. Those rows become read-stage error rows that name
img2dataset's status and message, so failed downloads are counted and explained in the output.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from latentize.columns import join_notes
from latentize.config import AUTO_FIELD, InputConfig
from latentize.errors import ConfigError
from latentize.sources.base import (
    SOURCES,
    RawSample,
    caption_text,
    duplicate_key_error,
    json_text,
    resolve_caption_field,
    unsafe_key,
)

__all__ = ["ERROR_MESSAGE_COLUMN", "STATUS_COLUMN", "SUCCESS", "parquet_schema_findings", "read_parquet"]

logger = logging.getLogger(__name__)

#: img2dataset's per-row outcome columns: ``status`` is ``success`` for a downloaded image, else
#: ``failed_to_download`` or ``failed_to_resize`` with the reason in ``error_message``.
STATUS_COLUMN = "status"
ERROR_MESSAGE_COLUMN = "error_message"
SUCCESS = "success"

# Converts one column of a record batch to Python values, chosen once per file from its type.
_Column = Callable[[pa.Array], list[Any]]
# The same for a sidecar column: (values, notes), a note (or None) per row saying what was
# wrong with that row's value (see RawSample.notes).
_NotedColumn = Callable[[pa.Array], tuple[list[Any], list[Any]]]


def _is_binary(tp: pa.DataType) -> bool:
    # The *_view types only exist in newer pyarrow releases.
    view = getattr(pa.types, "is_binary_view", lambda _: False)
    return pa.types.is_binary(tp) or pa.types.is_large_binary(tp) or pa.types.is_fixed_size_binary(tp) or view(tp)


def _is_string(tp: pa.DataType) -> bool:
    view = getattr(pa.types, "is_string_view", lambda _: False)
    return pa.types.is_string(tp) or pa.types.is_large_string(tp) or view(tp)


def _image_column(field: pa.Field, available: list[str]) -> tuple[_Column, _Column | None]:
    """Getters for the image bytes and (for HF Image structs) the ``path`` of each row."""
    tp = field.type
    if _is_binary(tp):
        return (lambda arr: arr.to_pylist()), None
    if pa.types.is_struct(tp) and tp.get_field_index("bytes") >= 0 and _is_binary(tp.field("bytes").type):
        has_path = tp.get_field_index("path") >= 0
        # pc.struct_field (unlike StructArray.field) keeps the struct's own nulls.
        return (
            lambda arr: pc.struct_field(arr, "bytes").to_pylist(),
            (lambda arr: pc.struct_field(arr, "path").to_pylist()) if has_path else None,
        )
    raise ConfigError(
        f"input.image_field: column {field.name!r} has type {tp}; expected binary image bytes "
        "or a struct with a 'bytes' field (Hugging Face Image); available columns: " + ", ".join(available)
    )


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _text_column(tp: pa.DataType) -> _Column:
    if _is_string(tp):
        return lambda arr: arr.to_pylist()
    return lambda arr: [_as_text(v) for v in arr.to_pylist()]


def _unnoted(column: _Column) -> _NotedColumn:
    return lambda arr: (column(arr), [None] * len(arr))


def _binary_twin(tp: pa.DataType) -> pa.DataType:
    """The binary type with the same memory layout as the string type ``tp``."""
    if pa.types.is_large_string(tp):
        return pa.large_binary()
    if not pa.types.is_string(tp):
        return pa.binary_view()  # string_view, the only other string type
    return pa.binary()


def _per_value(check: Callable[[Any], tuple[str | None, str | None]], tp: pa.DataType) -> _NotedColumn:
    """Runs ``check`` on each value's raw bytes.

    A string column is viewed as binary first (zero-copy): Parquet writers do not all
    validate UTF-8, and one bad cell would otherwise raise in ``to_pylist`` and end the shard.
    """
    twin = _binary_twin(tp) if _is_string(tp) else None

    def read(arr: pa.Array) -> tuple[list[Any], list[Any]]:
        raw = arr.view(twin) if twin is not None else arr
        pairs = [check(v) for v in raw.to_pylist()]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    return read


def _caption_column(tp: pa.DataType) -> _NotedColumn:
    if _is_binary(tp) or _is_string(tp):
        return _per_value(caption_text, tp)
    # Numbers and other scalars: their text form, nothing to note.
    return _unnoted(_text_column(tp))


def _json_value(value: Any, *, is_map: bool) -> str | None:
    if value is None:
        return None
    if is_map:
        # Arrow maps come back as lists of (key, value) pairs.
        value = dict(value)
    return json.dumps(value, ensure_ascii=False, default=str)


def _json_column(tp: pa.DataType) -> _NotedColumn:
    if _is_string(tp) or _is_binary(tp):
        # Text as written by whoever made the shard: carried raw, checked that it parses.
        return _per_value(json_text, tp)
    # Structured columns (struct, map, list) are serialised here, so always valid JSON.
    is_map = pa.types.is_map(tp)
    return _unnoted(lambda arr: [_json_value(v, is_map=is_map) for v in arr.to_pylist()])


def _optional(name: str | None, schema: pa.Schema) -> str | None:
    # Missing optional columns are reported once per run by the driver (resolve_input_fields);
    # here, in thousands of read tasks, they are only logged for debugging.
    if not name:
        return None
    if name in schema.names:
        return name
    logger.debug("column %r is not in this parquet file; its field is None on every row", name)
    return None


def _status_columns(schema: pa.Schema) -> tuple[str | None, str | None]:
    """img2dataset's ``status`` and ``error_message`` columns, when the file has them as text."""

    def text(name: str) -> str | None:
        return name if name in schema.names and _is_string(schema.field(name).type) else None

    return text(STATUS_COLUMN), text(ERROR_MESSAGE_COLUMN)


def parquet_schema_findings(config: InputConfig, columns: list[str]) -> list[str]:
    """What a Parquet shard with these columns lacks for ``config``: one message per missing
    optional column (key, caption, json), for the driver to log once per run.

    ``caption_field: auto`` is not reported: without a ``caption`` or ``txt`` column it means
    no caption.
    """
    found: list[str] = []
    shown = ", ".join(columns)
    if config.key_field not in columns:
        found.append(
            f"input.key_field: no column {config.key_field!r} in the parquet files (columns: {shown}); "
            "using each row's index in its file as the key"
        )
    optional = {"caption_field": config.caption_field, "json_field": config.json_field}
    for what, name in optional.items():
        if name and name != AUTO_FIELD and name not in columns:
            found.append(
                f"input.{what}: column {name!r} is not in the parquet files (columns: {shown}); "
                f"carrying no {what.removesuffix('_field')}"
            )
    return found


def _row_error(
    key: str | None, *, row: int, keyed: bool, seen: dict[str, int], status: str | None, message: str | None
) -> tuple[str, str | None]:
    """``(key, read-stage error or None)`` of one row, before its image is looked at.

    In order: a null key (named by its row index), an unsafe key, a repeated key (the first
    occurrence keeps its data), a failed img2dataset download.
    """
    if key is None:
        return f"{row:09d}", "null key" if keyed else None
    unsafe = unsafe_key(key)
    if unsafe is not None:
        return key, unsafe
    seen[key] = seen.get(key, 0) + 1
    if seen[key] > 1:
        return key, duplicate_key_error(seen[key])
    if status is not None and status != SUCCESS:
        return key, f"img2dataset: {status}" + (f": {message}" if message else "")
    return key, None


@SOURCES.register("parquet")
def read_parquet(fileobj: BinaryIO, /, *, config: InputConfig) -> Iterator[RawSample]:
    """Streams the rows of one Parquet shard as :class:`RawSample` records.

    The image column (``config.image_field``) may be binary or a Hugging Face Image struct
    (``{bytes, path}``). Keys come from ``config.key_field``; without that column a row's key is
    its index in the file (``000000042``). ``caption_field: auto`` reads ``caption`` (as
    img2dataset writes it) or else ``txt``. Missing caption / json columns give ``None``.

    Error rows: a null key or image; a key unsafe as a path
    (:func:`~latentize.sources.base.unsafe_key`); a key seen before in the file (the second is
    the error); a row of img2dataset whose ``status`` is not ``success`` (a failed download or
    resize: ``"img2dataset: failed_to_download: <its error_message>"``). A caption that is not
    UTF-8 or a json text that does not parse (or is not UTF-8) is kept and recorded in ``notes``.

    Raises:
        ConfigError: the image column is missing or not binary (lists the available columns).
        pyarrow.ArrowInvalid: not a Parquet file, or a damaged one; raised after the rows
            read before the damage were yielded.
    """
    # pre_buffer (on by default) coalesces the reads of *all* row groups that iter_batches
    # will visit into one up-front read: the whole file in memory. Off, each row group's
    # column chunks are read when their batches are reached.
    pf = pq.ParquetFile(fileobj, pre_buffer=False)
    schema = pf.schema_arrow
    readers, sidecars = _getters(schema, config)
    specs = [*readers.values(), *sidecars.values()]
    columns = list(dict.fromkeys(spec[0] for spec in specs if spec))
    keyed = readers["key"] is not None
    seen: dict[str, int] = {}
    row = 0
    for batch in pf.iter_batches(batch_size=config.rows_per_block, columns=columns):
        n = batch.num_rows
        values = {field: spec[1](batch.column(spec[0])) if spec else [None] * n for field, spec in readers.items()}
        noted = {
            field: spec[1](batch.column(spec[0])) if spec else ([None] * n, [None] * n)
            for field, spec in sidecars.items()
        }
        (captions, caption_notes), (metas, json_notes) = noted["caption"], noted["json"]
        for i in range(n):
            key, error = _row_error(
                values["key"][i],
                row=row + i,
                keyed=keyed,
                seen=seen,
                status=values["status"][i],
                message=values["message"][i],
            )
            image = values["image"][i]
            if image is None and error is None:
                path = values["path"][i]
                error = "null image" + (f" (path only: {path})" if path else "")
            yield RawSample(
                key=key,
                image=None if error else image,
                caption=captions[i],
                json=metas[i],
                error=error,
                notes=join_notes([caption_notes[i], json_notes[i]]),
            )
        row += n


def _getters(
    schema: pa.Schema, config: InputConfig
) -> tuple[dict[str, tuple[str, _Column] | None], dict[str, tuple[str, _NotedColumn] | None]]:
    """``(column, getter)`` per sample field, chosen once per file from its schema; ``None``:
    the field is None on every row. The second mapping holds the sidecar fields, whose getters
    also say what was wrong with each value."""
    available = list(schema.names)
    if config.image_field not in available:
        raise ConfigError(
            f"input.image_field: no column {config.image_field!r} in the parquet file; "
            f"available columns: {', '.join(available)}"
        )
    get_image, get_path = _image_column(schema.field(config.image_field), available)
    key_col = _optional(config.key_field, schema)
    caption_col = _optional(resolve_caption_field(config.caption_field, "parquet", available), schema)
    json_col = _optional(config.json_field, schema)
    status_col, message_col = _status_columns(schema)
    plain = _text_column(pa.string())
    readers: dict[str, tuple[str, _Column] | None] = {
        "image": (config.image_field, get_image),
        "path": (config.image_field, get_path) if get_path else None,
        "key": (key_col, _text_column(schema.field(key_col).type)) if key_col else None,
        "status": (status_col, plain) if status_col else None,
        "message": (message_col, plain) if message_col else None,
    }
    sidecars: dict[str, tuple[str, _NotedColumn] | None] = {
        "caption": (caption_col, _caption_column(schema.field(caption_col).type)) if caption_col else None,
        "json": (json_col, _json_column(schema.field(json_col).type)) if json_col else None,
    }
    return readers, sidecars
