"""The text-encoder actor: the body of each actor of the text pool, which holds one replica of a
pipeline's text encoders and adds the stored text columns to each block.

The pool runs after the image encoder's pool, in the same Ray Data job
(:func:`latentize.pipeline.run` wires it, :func:`latentize.encoders.pool.text_execution_for`
sizes it), on the rows the read tasks fanned out to every resolution. Placed there rather than
on the read rows: the read tasks decode and fan out in one step (decoding never leaves them, see
``docs/architecture.md``), and a T5 ``prompt_embeds`` (512 x 4096) outweighs most latents, so
it would otherwise travel through the image encoder's pool and back. The rows of one key at
several resolutions share its caption, and :meth:`TextEncoder.encode` encodes identical
captions of a batch once.

Blocks come and go as Arrow tables (``batch_format="pyarrow"``): the latents pass through
untouched (no numpy round trip), and the text columns get the types
:func:`latentize.columns.prompt_flight_type` fixes, whatever the block holds.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow as pa

from latentize.columns import FLIGHT_TYPES, flight_array, join_notes, prompt_flight_array
from latentize.config import config_from_dict
from latentize.encoders.text.spec import TextSpec
from latentize.sinks.layout import EMPTY_PROMPT, OutputLayout

if TYPE_CHECKING:
    from latentize.encoders.text.encoder import TextEncoder, TextResult

__all__ = ["EMPTY_PROMPT_FILE", "TEXT_STAGE", "TextActor", "empty_prompt_bytes"]

logger = logging.getLogger(__name__)

#: The output root's file of the empty prompt's stored columns (classifier-free-guidance dropout).
EMPTY_PROMPT_FILE = EMPTY_PROMPT

#: The ``stage`` of an error row whose caption the text encoder failed on.
TEXT_STAGE = "text"


def empty_prompt_bytes(columns: dict[str, np.ndarray]) -> bytes:
    """``np.savez`` of the empty prompt's columns: one array per stored column, per-sample shape
    (no batch axis); a ``trimmed`` ``prompt_embeds`` holds its real rows only."""
    buf = io.BytesIO()
    np.savez(buf, **columns)  # type: ignore[arg-type]
    return buf.getvalue()


class TextActor:
    """Ray actor body: holds one :class:`TextEncoder`; encodes the captions of each block's
    valid rows and appends the stored text columns.

    Rows that are end-of-shard rows or already errors get zeros (no rows) and keep their error.
    A caption the encoder fails on turns its row into a ``text`` error row (the tracker treats
    it as a failure of the whole sample: none of its resolutions is stored without text). The
    encoder's notes (empty caption, truncation) join the row's ``notes``.

    Args:
        config: the run's config as ``config_to_dict`` writes it.
        spec: the driver's :func:`~latentize.encoders.text.spec.inspect_text`.
        cpu_threads: torch threads of a CPU actor (None on a GPU).
        gpu: the actor holds a GPU (else it computes on the CPU, even where CUDA is visible).
        layout: the output root; the actor writes :data:`EMPTY_PROMPT_FILE` there once, before
            its first batch (so before any commit), unless the root has it (a resumed run keeps it).
    """

    def __init__(
        self,
        *,
        config: dict[str, Any],
        spec: TextSpec,
        cpu_threads: int | None = None,
        gpu: bool = False,
        layout: OutputLayout | None = None,
    ) -> None:
        import torch

        from latentize.encoders.text.encoder import TextEncoder

        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.config = config_from_dict(config)
        self.spec = spec
        self.encoder: TextEncoder = TextEncoder(
            config=self.config, spec=spec, device=None if gpu else torch.device("cpu")
        )
        if layout is not None:
            self._write_empty_prompt(layout)

    def _write_empty_prompt(self, layout: OutputLayout) -> None:
        # Every actor of the pool may get here at once: each writes the same columns of the same
        # weights atomically, and the first to finish wins; a root that has the file keeps it.
        path = layout.join(EMPTY_PROMPT_FILE)
        if layout.fs.exists(path):
            return
        layout.write_bytes(path, empty_prompt_bytes(self.encoder.empty_prompt()))
        logger.info("wrote %s", path)

    def encode(self, captions: Sequence[str | None], keys: Sequence[str]) -> TextResult:
        """One :meth:`TextEncoder.encode` call (tests override it to inject failures)."""
        return self.encoder.encode(captions, keys)

    def __call__(self, block: pa.Table) -> pa.Table:
        """Adds the text columns (:attr:`TextSpec.columns`, at their flight types) to one block
        and turns the rows whose caption failed into error rows."""
        n = block.num_rows
        errors = block.column("error").to_pylist()
        stages = block.column("stage").to_pylist()
        notes = block.column("notes").to_pylist() if "notes" in block.column_names else [None] * n
        totals = np.asarray(block.column("total").to_numpy(zero_copy_only=False))
        captions = block.column("caption").to_pylist() if "caption" in block.column_names else [None] * n
        keys = block.column("key").to_pylist()
        rows = [i for i in range(n) if totals[i] < 0 and errors[i] is None]
        values: dict[str, Any] = {}
        for name, column in self.spec.columns.items():
            shape = cast(tuple[int, ...], column.shape[1:] if column.variable else column.shape)
            if column.variable:
                values[name] = [np.zeros((0, *shape), dtype=column.dtype)] * n
            else:
                values[name] = np.zeros((n, *shape), dtype=column.dtype)
        if rows:
            result = self.encode([captions[i] for i in rows], [str(keys[i]) for i in rows])
            for name, got in result.arrays.items():
                if isinstance(values[name], list):
                    for pos, row in enumerate(rows):
                        values[name][row] = got[pos]
                else:
                    values[name][rows] = got
            for pos, row in enumerate(rows):
                notes[row] = join_notes([notes[row], result.notes[pos]])
            for pos, reason in result.errors.items():
                errors[rows[pos]], stages[rows[pos]] = reason, TEXT_STAGE
        out = block
        for name, column_values in (("error", errors), ("stage", stages), ("notes", notes)):
            out = _set_column(out, name, flight_array(np.array(column_values, dtype=object), FLIGHT_TYPES[name]))
        for name, column in self.spec.columns.items():
            out = _set_column(out, name, prompt_flight_array(values[name], column.shape, column.dtype))
        return out


def _set_column(table: pa.Table, name: str, array: pa.Array) -> pa.Table:
    index = table.schema.get_field_index(name)
    if index < 0:
        return table.append_column(name, array)
    return table.set_column(index, name, array)
