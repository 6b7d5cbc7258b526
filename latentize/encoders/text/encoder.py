"""The actor side of the text stage: a diffusers pipeline's own ``encode_prompt`` over captions.

:class:`TextEncoder` loads only the text encoders and tokenizers of a pipeline (a hub id or a
local pipeline folder), builds the pipeline class around them (every other component None) and
calls that pipeline's ``encode_prompt`` on the distinct captions of a batch, in chunks that halve
on CUDA out-of-memory. What it returns is what the pipeline computes for one prompt with its own
defaults and no classifier-free guidance, cast to the storage dtype. torch, transformers and
diffusers are imported inside the methods that run in the actors, never on import.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from latentize.config import Config
from latentize.encoders.base import _inference_mode, pick_device
from latentize.encoders.text.presets import TEXT_PRESETS
from latentize.encoders.text.spec import LENGTH, MASK, TextSpec
from latentize.errors import LatentizeError
from latentize.hub import from_pretrained

if TYPE_CHECKING:
    import torch

__all__ = ["TextEncoder", "TextResult", "default_text_batch_size", "resolve_text_dtype"]

logger = logging.getLogger(__name__)

#: A row's outputs by stored column, or the reason it failed.
_Row = dict[str, np.ndarray] | str


@dataclass
class TextResult:
    """Output of :meth:`TextEncoder.encode` for N captions.

    ``arrays`` holds one entry per stored column: an (N, *shape) array for fixed-shape columns,
    a list of N (rows_i, width) arrays for a ``trimmed`` ``prompt_embeds`` (rows shared between
    repeated captions; treat them as read-only). Rows in ``errors`` (index -> reason) hold zeros
    (no rows) and must become error rows; ``notes`` has one entry per caption (None: nothing to
    say), e.g. an empty caption or a truncation.
    """

    arrays: dict[str, np.ndarray | list[np.ndarray]]
    notes: list[str | None]
    errors: dict[int, str]
    chunk_size: int
    #: Distinct captions encoded in this call.
    encoded: int


def default_text_batch_size(device: torch.device | str) -> int:
    """``text.batch_size`` when null: distinct captions per ``encode_prompt`` call, 64 on a GPU
    (a T5-XXL at 512 tokens in bf16 needs a few GB of activations for that), 16 on CPU."""
    kind = device if isinstance(device, str) else device.type
    return 64 if kind.split(":")[0] == "cuda" else 16


def resolve_text_dtype(name: str, device: torch.device) -> torch.dtype:
    """The text encoders' compute dtype for ``text.dtype``.

    ``auto``: bfloat16 on GPUs that support it, else float32 (T5 is known to overflow in
    float16, so no text family is treated as fp16-safe); float32 on CPU. float16 asked for on
    CPU computes in float32, as for the image encoder.
    """
    import torch

    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    dtype = cast("torch.dtype", getattr(torch, name))
    if device.type == "cpu" and dtype == torch.float16:
        logger.warning("text.dtype float16 is not supported on CPU; computing in float32")
        return torch.float32
    return dtype


class _CountingTokenizer:
    """A tokenizer that remembers, for each call that truncates, each text's untruncated length.

    The pipeline calls it exactly as it calls the tokenizer (everything is forwarded), so the
    counts are of the very text it tokenized: lower-cased (PixArt), behind an instruction (Sana)
    or a system prompt (Lumina 2), in a template (Qwen-Image).
    """

    def __init__(self, inner: Any) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "calls", [])

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        out = self._inner(text, *args, **kwargs)
        if kwargs.get("truncation") and kwargs.get("max_length") is not None:
            texts = [text] if isinstance(text, str) else list(text)
            full = self._inner(texts, add_special_tokens=kwargs.get("add_special_tokens", True), verbose=False)
            self.calls.append((int(kwargs["max_length"]), [len(ids) for ids in full["input_ids"]]))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)


class _DropTruncationWarnings(logging.Filter):
    """The pipelines log every truncation of a batch; each becomes the row's note instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "was truncated" not in record.getMessage()


_DROP_TRUNCATION = _DropTruncationWarnings()


class TextEncoder:
    """One replica of a pipeline's text encoders (one per Ray actor of the text pool).

    Args:
        config: the run's config (``text`` resolved by ``load_config``).
        spec: what :func:`~latentize.encoders.text.spec.inspect_text` returned on the driver.
        device: where the encoders run (default: CUDA when visible, else CPU).
    """

    def __init__(self, *, config: Config, spec: TextSpec, device: torch.device | None = None) -> None:
        if config.text is None:
            raise LatentizeError("TextEncoder needs a config with a text section")
        self.config = config
        self.text = config.text
        self.spec = spec
        self.preset = TEXT_PRESETS.get(spec.preset)
        self.device = device or pick_device(None)
        self.dtype = resolve_text_dtype(self.text.dtype, self.device)
        self.storage_dtype = config.output.dtype
        self.pipe, self._counters = self._load()
        self._kwargs = self._call_kwargs()
        self.chunk_size = self.text.batch_size or default_text_batch_size(self.device)
        # One pipeline call at a time: memory, chunk_size changes on OOM, the tokenizer counts.
        self._lock = threading.Lock()
        self._empty: dict[str, np.ndarray] | None = None
        logger.info("text encoders of %s on %s in %s", self.preset.pipeline_class, self.device, self.dtype)

    # -- loading ------------------------------------------------------------------------------
    def _load(self) -> tuple[Any, dict[str, _CountingTokenizer]]:
        """The pipeline built around its text components alone, and its counting tokenizers."""
        import diffusers
        import transformers

        encoders = {name for name, _ in self.preset.encoders}
        parts: dict[str, Any] = {}
        counters: dict[str, _CountingTokenizer] = {}
        for name, class_name in self.spec.components.items():
            cls = getattr(transformers, class_name, None)
            if cls is None:
                raise LatentizeError(f"text.model: {name} names {class_name!r}, which transformers does not have")
            if name in encoders:
                model = from_pretrained(
                    cls, self.text.model, subfolder=name, revision=self.text.revision, dtype=self.dtype
                )
                parts[name] = model.to(self.device).eval()
            else:
                counters[name] = parts[name] = _CountingTokenizer(
                    from_pretrained(cls, self.text.model, subfolder=name, revision=self.text.revision)
                )
        pipe_cls = getattr(diffusers, self.preset.pipeline_class)
        if _DROP_TRUNCATION not in logging.getLogger(pipe_cls.__module__).filters:
            logging.getLogger(pipe_cls.__module__).addFilter(_DROP_TRUNCATION)
        return _text_pipeline(pipe_cls, parts, dict(self.preset.init_kwargs)), counters

    def _call_kwargs(self) -> dict[str, Any]:
        """``encode_prompt``'s arguments: the ``__call__`` defaults the preset names (read from the
        installed pipeline's signature), the fixed ones (no guidance) and the driver's overrides."""
        call = inspect.signature(type(self.pipe).__call__).parameters
        accepted = inspect.signature(self.pipe.encode_prompt).parameters
        kwargs: dict[str, Any] = {}
        for name in self.preset.call_defaults:
            if name not in call or name not in accepted:
                raise LatentizeError(
                    f"text.preset {self.preset.name!r}: the installed {self.preset.pipeline_class} has no "
                    f"{name!r} in __call__ and encode_prompt; this diffusers version is not supported"
                )
            kwargs[name] = call[name].default
        kwargs.update(self.preset.call_kwargs)
        kwargs.update(self.spec.call_overrides)
        for name, modules in self.preset.optional_requirements.items():
            missing = [m for m in modules if importlib.util.find_spec(m) is None]
            if kwargs.get(name) and missing:
                raise LatentizeError(
                    f"text.preset {self.preset.name!r}: the driver found {', '.join(modules)} and so "
                    f"{self.preset.pipeline_class} runs with {name}=True, but this worker lacks "
                    f"{', '.join(missing)}; install them on every node (pip install beautifulsoup4 ftfy)"
                )
        return kwargs

    # -- encoding -----------------------------------------------------------------------------
    def encode(self, captions: Sequence[str | None], keys: Sequence[str]) -> TextResult:
        """Encodes one caption per sample.

        Args:
            captions: N captions; None (missing) and ``""`` are encoded as ``""`` with a note.
                Identical captions are encoded once.
            keys: the N sample keys (named in the log when a caption fails).

        Returns:
            A :class:`TextResult` in the stored dtypes: floats in ``output.dtype``, the mask as
            uint8 0/1, lengths as int32. A caption the pipeline fails on (or whose embeddings are
            not finite in the storage dtype) is an error for its row only.
        """
        notes: list[list[str]] = [[] for _ in captions]
        errors: dict[int, str] = {}
        slots: dict[str, int] = {}
        row_slot: list[int] = []
        for i, caption in enumerate(captions):
            prompt, note = _prompt(caption)
            if note:
                notes[i].append(note)
            if prompt is None:
                errors[i] = f"caption is a {type(caption).__name__}, not text"
                row_slot.append(-1)
                continue
            row_slot.append(slots.setdefault(prompt, len(slots)))
        with self._lock:
            rows, prompt_notes = self._encode_prompts(list(slots))
            chunk_size = self.chunk_size
        for i, slot in enumerate(row_slot):
            if slot < 0:
                continue
            notes[i].extend(prompt_notes[slot])
            if isinstance(rows[slot], str):
                errors[i] = cast(str, rows[slot])
                logger.warning("text encoder: sample %r failed: %s", keys[i], errors[i])
        arrays = self._assemble(rows, row_slot, errors)
        joined = ["; ".join(n) if n else None for n in notes]
        return TextResult(arrays, joined, errors, chunk_size, len(slots))

    def empty_prompt(self) -> dict[str, np.ndarray]:
        """The stored columns of ``""`` (one sample, no batch axis): what classifier-free-guidance
        dropout trains with, stored once in the output root. Computed once per encoder.

        Raises:
            LatentizeError: the pipeline cannot encode the empty prompt.
        """
        if self._empty is None:
            with self._lock:
                rows, _ = self._encode_prompts([""])
            if isinstance(rows[0], str):
                raise LatentizeError(f"text encoder: the empty prompt failed: {rows[0]}")
            self._empty = rows[0]
        return {k: v.copy() for k, v in self._empty.items()}

    def _encode_prompts(self, prompts: list[str]) -> tuple[list[_Row], list[list[str]]]:
        """Runs ``encode_prompt`` over distinct prompts in chunks of ``chunk_size``.

        On CUDA out-of-memory the chunk size is halved (and kept for the actor's life) and the
        chunk retried; out of memory with one prompt is raised (a rerun resumes). Any other
        failure of a chunk retries its prompts one at a time, so that a prompt that fails costs
        its own rows only.
        """
        import torch

        rows: list[_Row] = []
        notes: list[list[str]] = []
        start = 0
        while start < len(prompts):
            chunk = prompts[start : start + self.chunk_size]
            try:
                got, got_notes = self._call(chunk)
            except torch.cuda.OutOfMemoryError:
                if len(chunk) == 1:
                    raise
                torch.cuda.empty_cache()
                self.chunk_size = max(1, self.chunk_size // 2)
                logger.warning("CUDA out of memory; text-encoder chunk halved to %d", self.chunk_size)
                continue
            except Exception:  # noqa: BLE001 - isolate the prompt(s) that fail; see below
                logger.warning(
                    "text encoder: a chunk of %d prompts failed; retrying one by one", len(chunk), exc_info=True
                )
                got, got_notes = self._one_by_one(chunk)
            rows.extend(got)
            notes.extend(got_notes)
            start += len(chunk)
        return rows, notes

    def _one_by_one(self, prompts: list[str]) -> tuple[list[_Row], list[list[str]]]:
        import torch

        rows: list[_Row] = []
        notes: list[list[str]] = []
        for prompt in prompts:
            try:
                got, got_notes = self._call([prompt])
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - this prompt's failure is its row's error
                got, got_notes = [f"text encoder failed: {type(exc).__name__}: {exc}"], [[]]
            rows.extend(got)
            notes.extend(got_notes)
        return rows, notes

    @_inference_mode
    def _call(self, prompts: list[str]) -> tuple[list[_Row], list[list[str]]]:
        """One ``encode_prompt`` call: the stored rows of ``prompts`` and their truncation notes."""
        for counter in self._counters.values():
            counter.calls.clear()
        out = self.pipe.encode_prompt(prompt=prompts, device=self.device, num_images_per_prompt=1, **self._kwargs)
        if len(out) != len(self.preset.outputs):
            raise LatentizeError(
                f"{self.preset.pipeline_class}.encode_prompt returned {len(out)} values, not "
                f"{len(self.preset.outputs)}; this diffusers version is not supported"
            )
        named = {name: value for name, value in zip(self.preset.outputs, out, strict=True) if name is not None}
        return self._rows(named, len(prompts)), self._truncation_notes(len(prompts))

    def _rows(self, named: dict[str, torch.Tensor | None], n: int) -> list[_Row]:
        """Per-prompt stored columns from ``encode_prompt``'s batch outputs, or why a prompt
        cannot be stored (not finite in the compute dtype, or beyond the storage dtype)."""
        import torch

        floats = {k: v for k, v in named.items() if v is not None and v.is_floating_point()}
        finite = torch.ones(n, dtype=torch.bool, device=self.device)
        for value in floats.values():
            finite &= torch.isfinite(value.reshape(n, -1)).all(dim=1)
        stored_dtype = getattr(torch, self.storage_dtype)
        stored = {k: v.to(stored_dtype).cpu().numpy() for k, v in floats.items()}
        fits = np.ones(n, dtype=bool)
        for host in stored.values():
            fits &= np.isfinite(host.reshape(n, -1)).all(axis=1)
        embeds = stored["prompt_embeds"]
        mask_t = named.get(MASK)
        mask = mask_t.cpu().numpy() if mask_t is not None else np.ones(embeds.shape[:2], dtype=np.int64)
        lengths = mask.sum(axis=1)
        finite_host = finite.cpu().numpy()
        rows: list[_Row] = []
        for i in range(n):
            if not finite_host[i]:
                rows.append(f"non-finite text embeddings (NaN or Inf) in {str(self.dtype).removeprefix('torch.')}")
            elif not fits[i]:
                top = np.finfo(self.storage_dtype).max
                rows.append(f"text embeddings exceed {self.storage_dtype} (|x| > {top:g}); set output.dtype: float32")
            else:
                rows.append(self._row({k: v[i] for k, v in stored.items()}, mask[i], int(lengths[i])))
        return rows

    def _row(self, floats: dict[str, np.ndarray], mask: np.ndarray, length: int) -> _Row:
        if self.spec.storage == "padded":
            row = dict(floats)
            if MASK in self.spec.columns:
                row[MASK] = mask.astype(np.uint8)
            return row
        if not mask[:length].all():
            return "the attention mask is not a run of ones then zeros; text.storage trimmed cannot store it"
        row = {k: v for k, v in floats.items() if k != "prompt_embeds"}
        row["prompt_embeds"] = floats["prompt_embeds"][:length]
        row[LENGTH] = np.asarray(length, dtype=np.int32)
        return row

    def _truncation_notes(self, n: int) -> list[list[str]]:
        """Per prompt: which tokenizer cut it, from how many tokens to how many (grouped when
        several tokenizers cut it alike), and Qwen-Image's cut of the embedding rows."""
        cuts: list[dict[tuple[int, int], list[str]]] = [{} for _ in range(n)]
        for name, counter in self._counters.items():
            for max_length, lengths in counter.calls:
                if len(lengths) != n:
                    continue
                for i, count in enumerate(lengths):
                    if count > max_length:
                        cuts[i].setdefault((count, max_length), []).append(name)
        notes = [
            [
                f"caption truncated: {count} tokens, {kept} kept ({', '.join(names)})"
                for (count, kept), names in c.items()
            ]
            for c in cuts
        ]
        if self.preset.sliced_after is not None:
            self._slice_notes(notes)
        return notes

    def _slice_notes(self, notes: list[list[str]]) -> None:
        # Qwen-Image drops its template's first tokens, then keeps max_sequence_length rows.
        limit = self._kwargs.get("max_sequence_length")
        dropped = int(getattr(self.pipe, cast(str, self.preset.sliced_after)))
        for counter in self._counters.values():
            for _, lengths in counter.calls[:1]:
                for i, count in enumerate(lengths[: len(notes)]):
                    if limit is not None and count - dropped > limit:
                        notes[i].append(f"caption truncated: {count - dropped} embedding rows, {limit} kept")

    def _assemble(self, rows: list[_Row], row_slot: list[int], errors: dict[int, str]) -> dict[str, Any]:
        """The batch's columns: fixed-shape columns stacked, variable ones as lists of arrays."""
        n = len(row_slot)
        arrays: dict[str, Any] = {}
        for name, column in self.spec.columns.items():
            if column.variable:
                empty = np.zeros((0, *cast(tuple[int, ...], column.shape[1:])), dtype=column.dtype)
                arrays[name] = [
                    empty if i in errors else cast(dict, rows[slot])[name] for i, slot in enumerate(row_slot)
                ]
                continue
            out = np.zeros((n, *cast(tuple[int, ...], column.shape)), dtype=column.dtype)
            for i, slot in enumerate(row_slot):
                if i not in errors:
                    out[i] = cast(dict, rows[slot])[name]
            arrays[name] = out
        return arrays


def _prompt(caption: object) -> tuple[str | None, str | None]:
    """``(prompt, note)`` for one caption: None and ``""`` become ``""`` with a note; anything but
    text gives no prompt."""
    if caption is None:
        return "", 'missing caption: encoded as ""'
    if not isinstance(caption, str):
        return None, None
    if caption == "":
        return "", 'empty caption: encoded as ""'
    return caption, None


def _text_pipeline(pipe_cls: Any, parts: dict[str, Any], init_kwargs: dict[str, Any]) -> Any:
    """``pipe_cls`` with ``parts`` (its text components) and None for every other component:
    the pipeline's own ``encode_prompt`` then runs on exactly those components."""
    params = inspect.signature(pipe_cls.__init__).parameters
    kwargs: dict[str, Any] = {
        name: None
        for name, p in params.items()
        if name != "self" and p.default is inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD
    }
    kwargs.update(init_kwargs)
    kwargs.update(parts)
    return pipe_cls(**kwargs)
