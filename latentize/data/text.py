"""Caption embeddings of an output with a text stage (the manifest's ``text`` entry): the empty
prompt's embeddings (``OUT/_empty_prompt.npz``) and the padding of ``storage: trimmed`` rows.

Stored text columns (``text.columns`` of the manifest, per sample):

* ``prompt_embeds``: (rows, width) float; ``storage: padded`` stores every row up to the
  family's length (a fixed-shape tensor column), ``storage: trimmed`` only the real tokens
  (``list<fixed_size_list<float, width>>`` in Parquet, rows varying per sample).
* ``pooled_prompt_embeds``: (width,) float, for families with one.
* ``prompt_attention_mask``: (rows,) uint8 0/1, ``storage: padded`` of masked families.
* ``prompt_embeds_length``: () int32, the rows of a trimmed ``prompt_embeds``.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from latentize.errors import LatentizeError
from latentize.sinks.base import is_ragged, tensor_numpy
from latentize.sinks.contract import read_manifest
from latentize.sinks.layout import EMPTY_PROMPT, OutputLayout

__all__ = ["EMPTY_PROMPT", "LENGTH", "MASK", "is_ragged", "pad_ragged", "read_empty_prompt"]

#: The attention-mask column (as :mod:`latentize.encoders.text.spec` names it; repeated here so
#: that reading an output does not import the text stage).
MASK = "prompt_attention_mask"
#: The real tokens of each prompt (``storage: trimmed``).
LENGTH = "prompt_embeds_length"


def pad_ragged(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A ragged column of ``B`` samples -> ``(values, lengths)``.

    ``values``: (B, L, *row_shape) in the stored dtype, each sample's rows first and zeros after
    them, ``L`` the most rows of any sample (0 when every sample has none); ``lengths``: (B,)
    int64, the rows of each sample.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    # flatten() honours a sliced array's offset (``.values`` would not).
    rows = tensor_numpy(column.flatten())  # (sum(lengths), *row_shape)
    longest = int(lengths.max()) if lengths.size else 0
    out = np.zeros((len(lengths), longest, *rows.shape[1:]), dtype=rows.dtype)
    sample = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if lengths.size else np.zeros(0, np.int64)
    position = np.arange(len(rows)) - np.repeat(starts, lengths)
    out[sample, position] = rows
    return out, lengths


def length_mask(lengths: np.ndarray, rows: int) -> np.ndarray:
    """(B,) lengths -> (B, rows) bool, True on each sample's first ``length`` rows."""
    return np.arange(rows)[None, :] < np.asarray(lengths)[:, None]


def read_empty_prompt(root: str, *, storage_options: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """The embeddings of the empty prompt ``""`` of an output with a text stage, for
    classifier-free-guidance dropout: one array per stored text column, per-sample shapes
    (unbatched, as one row of the data files holds them: ``prompt_embeds`` (rows, width), a
    trimmed output's with its own rows, ``prompt_embeds_length`` a 0-d int32 array).

    Read through fsspec like the manifest (``root``: a local path or any fsspec URL).

    Raises:
        LatentizeError: no latentize run at ``root``, an output without a text stage, or its
            empty-prompt file is missing.
    """
    layout = OutputLayout(root, storage_options=storage_options)
    manifest = read_manifest(layout)
    if manifest is None:
        raise LatentizeError(f"{layout.url} holds no latentize run (no _manifest.json)")
    if manifest.text is None:
        raise LatentizeError(f"{layout.url} has no caption embeddings (its manifest has no text entry)")
    name = str(manifest.text.get("empty_prompt") or EMPTY_PROMPT)
    try:
        data = layout.read_bytes(layout.join(name))
    except FileNotFoundError:
        raise LatentizeError(
            f"{layout.url}: the manifest names {name} for the empty prompt, which is missing"
        ) from None
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}
