"""The encoder actor: the body of each actor of the encoder pool, which holds one encoder
replica (the weights on its device) and turns the pixels of each batch into the stored tensor
columns.

Ray Data constructs it in every pool actor (:func:`latentize.pipeline.run` wires the pool,
:mod:`latentize.encoders.pool` sizes it). It imports torch only inside the actor, so the driver
that wires the pool imports this module without torch.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import numpy as np

from latentize.columns import ENCODE_STARTED, REENCODED, join_notes, text_column, to_block
from latentize.config import config_from_dict
from latentize.encoders.base import EncoderSpec, resolved_source
from latentize.sinks.layout import data_folder

__all__ = ["REENCODED_NOTE", "EncodeActor", "tensor_columns"]

logger = logging.getLogger(__name__)

#: The ``notes`` finding of a sample whose latents were not finite in the compute dtype.
REENCODED_NOTE = "re-encoded in float32 (non-finite in the compute dtype)"


class EncodeActor:
    """Ray actor body: holds one encoder replica; encodes the valid rows of each batch.

    Rows that are sentinels or already errors pass through with zero tensors; samples the
    encoder rejects (non-finite even in float32) become ``encode`` error rows. With
    ``decode="gpu"`` the batch carries encoded ``image`` bytes, decoded here on the actor's
    device (what the device decoder rejects goes through the CPU path, per sample).

    Safe under Ray's threaded actors: two calls in flight overlap one batch's copies and decode
    with the other's compute (:meth:`TorchEncoder.encode` serialises the model itself).
    """

    def __init__(
        self, *, config: dict[str, Any], spec: EncoderSpec, cpu_threads: int | None = None, decode: str = "cpu"
    ) -> None:
        import torch

        from latentize.encoders import ENCODERS

        if cpu_threads:
            # Ray pins a 1-CPU actor to one thread; a CPU-only encoder may use its share of cores.
            torch.set_num_threads(cpu_threads)
        # Batches are read-only zero-copy views, which the encoder never writes into. Set once
        # for the process: catch_warnings is not thread-safe, and calls run in two threads.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.config = config_from_dict(config)
        self.spec = spec
        self.decode = decode
        self.mixed = not self.config.preprocess.fixed_size
        self.flip = self.config.preprocess.flip
        self.encoder = ENCODERS.get(resolved_source(self.config)[0])(config=self.config, spec=spec)
        logger.info("encoder actor ready on %s (%s), decode on %s", self.encoder.device, self.encoder.dtype, decode)

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        """Encodes one numpy batch; returns its block (an Arrow table, columns at their fixed
        types: a batch of failed or end-of-shard rows only must not type them otherwise)."""
        called_at = time.time()
        n = len(batch["key"])
        errors = text_column(batch["error"], n)
        stages = text_column(batch["stage"], n)
        notes = text_column(batch.get("notes"), n)
        valid = (np.asarray(batch["total"]) < 0) & np.array([e is None for e in errors], dtype=bool)
        rows = np.flatnonzero(valid)
        keys = [str(k) for k in np.asarray(batch["key"], dtype=object)[rows]]
        out = {k: v for k, v in batch.items() if k not in ("pixels", "image")}
        if self.decode == "gpu":
            pixels, rows, keys = self._decode(batch, rows, keys, out, errors, stages, notes)
            groups = [(rows, pixels, keys)]
        else:
            groups = _by_shape(np.asarray(batch["pixels"]), rows, keys)
        columns = tensor_columns(self.spec, flip=self.flip)
        arrays: dict[str, dict[int, np.ndarray]] = {name: {} for name in columns}
        flagged = np.zeros(n, dtype=bool)
        for group_rows, pixels, group_keys in groups:
            values, reasons, reencoded = self._encode(pixels, group_keys)
            for name, column in values.items():
                for i, row in enumerate(group_rows):
                    arrays[name][int(row)] = column[i]
            for i, reason in reasons.items():
                errors[group_rows[i]], stages[group_rows[i]] = reason, "encode"
            for i in reencoded:
                # The flag for the marker's count, the note for readers of the data.
                flagged[group_rows[i]] = True
                notes[group_rows[i]] = join_notes([notes[group_rows[i]], REENCODED_NOTE])
        for name, (shape, dtype) in columns.items():
            out[name] = _tensor_column(arrays[name], n, shape, dtype, fixed=not self.mixed)
        out["error"] = errors
        out["stage"] = stages
        out["notes"] = notes
        out[REENCODED] = flagged
        # When this call began (epoch seconds): the driver's measure of the encoder's start-up
        # and of the steady state (see RunSummary). Staging reports it and never writes it.
        out[ENCODE_STARTED] = np.full(n, called_at)
        return to_block(out)

    def _encode(self, pixels: Any, keys: list[str]) -> tuple[dict[str, np.ndarray], dict[int, str], list[int]]:
        """Encodes one group of same-size crops and, with ``preprocess.flip``, their mirror
        images (which draw their own ``sample`` noise: another key). Returns the output columns,
        the errors by position (a sample fails when either encoding does) and the positions
        re-encoded in float32."""
        results = {"": self.encoder.encode(pixels, keys, mixed=self.mixed)}
        if self.flip:
            flipped_keys = [f"{k}\0flipped" for k in keys]
            results["_flipped"] = self.encoder.encode(_mirror(pixels), flipped_keys, mixed=self.mixed)
        values = {name + suffix: r.arrays[name] for suffix, r in results.items() for name in self.spec.columns}
        reasons = {pos: reason for r in results.values() for pos, reason in r.errors.items()}
        reencoded = sorted({pos for r in results.values() for pos in r.reencoded})
        return values, reasons, reencoded

    def _decode(
        self,
        batch: dict[str, np.ndarray],
        rows: np.ndarray,
        keys: list[str],
        out: dict[str, Any],
        errors: np.ndarray,
        stages: np.ndarray,
        notes: np.ndarray,
    ) -> tuple[Any, np.ndarray, list[str]]:
        """Decodes the valid rows' bytes on the device; fills the geometry, ``slot`` and ``folder``
        columns (as the read tasks' :func:`~latentize.preprocess.preprocess_batch` gives them: a
        run of one size, slot 0), the error rows and notes; returns the decoded pixels and the
        rows (and keys) that remain."""
        from latentize.preprocess.gpu import preprocess_on_device

        n = len(batch["key"])
        images = [None if v is None else bytes(v) for v in np.asarray(batch["image"], dtype=object)[rows]]
        decoded = preprocess_on_device(images, keys, config=self.config.preprocess, device=self.encoder.device)
        for name in ("width", "height", "crop_top", "crop_left"):
            column = np.full(n, -1, dtype=np.int32)
            column[rows] = getattr(decoded, name)
            out[name] = column
        for pos, note in enumerate(decoded.notes):
            if note:
                notes[rows[pos]] = join_notes([notes[rows[pos]], note])
        for pos, (stage, reason) in decoded.errors.items():
            errors[rows[pos]], stages[rows[pos]] = reason, stage
        import torch

        keep = np.array([pos not in decoded.errors for pos in range(len(rows))], dtype=bool)
        out["slot"] = np.full(n, -1, dtype=np.int32)
        out["slot"][rows[keep]] = 0
        out["folder"] = np.full(n, None, dtype=object)
        out["folder"][rows[keep]] = data_folder(self.config.preprocess.size)
        index = torch.as_tensor(np.flatnonzero(keep), device=decoded.pixels.device)
        return decoded.pixels[index], rows[keep], [k for k, ok in zip(keys, keep, strict=True) if ok]


def tensor_columns(spec: EncoderSpec, *, flip: bool) -> dict[str, tuple[tuple[int, ...], str]]:
    """The stored tensor columns: the encoder's, and with ``flip`` a ``<name>_flipped`` twin each."""
    columns = dict(spec.columns)
    if flip:
        columns.update({f"{name}_flipped": value for name, value in spec.columns.items()})
    return columns


def _by_shape(pixels: np.ndarray, rows: np.ndarray, keys: list[str]) -> list[tuple[np.ndarray, Any, list[str]]]:
    """Groups the valid ``rows`` by crop size: ``(rows, stacked pixels (n, H, W, 3), keys)``.

    A fixed-size run hands over one (N, H, W, 3) array, one group; a run of several sizes an
    object array of (H, W, 3) arrays, one group per size (the encoder never pads across sizes).
    """
    if pixels.dtype != object:
        return [(rows, pixels[rows], keys)] if len(rows) else []
    by_size: dict[tuple[int, ...], list[int]] = {}
    for pos, row in enumerate(rows):
        by_size.setdefault(tuple(pixels[row].shape), []).append(pos)
    return [
        (rows[positions], np.stack([pixels[rows[p]] for p in positions]), [keys[p] for p in positions])
        for positions in by_size.values()
    ]


def _mirror(pixels: Any) -> Any:
    """Horizontally flipped crops: (n, H, W, 3), numpy or torch."""
    if isinstance(pixels, np.ndarray):
        return np.ascontiguousarray(pixels[:, :, ::-1])
    import torch

    return torch.flip(pixels, dims=[2]).contiguous()


def _tensor_column(
    values: dict[int, np.ndarray], n: int, shape: tuple[int, ...], dtype: str, *, fixed: bool
) -> np.ndarray:
    """One output tensor column: (n, *shape) zeros-filled for a fixed-size run; else an object
    array of per-row arrays (empty ones where a row holds no latent)."""
    if fixed:
        column = np.zeros((n, *shape), dtype=dtype)
        for row, value in values.items():
            column[row] = value
        return column
    out = np.empty(n, dtype=object)
    empty = np.zeros((*shape[:-2], 0, 0), dtype=dtype)
    for row in range(n):
        out[row] = values.get(row, empty)
    return out
