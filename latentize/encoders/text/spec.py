"""The driver side of the text stage: what a ``text:`` section will store, from configs only.

:func:`inspect_text` reads the text components' *configs* (``config.json`` of each text encoder,
``tokenizer_config.json`` of each tokenizer, ``model_index.json``) from a local pipeline folder
or the hub, never their weights, and returns a :class:`TextSpec`: the stored columns with their
per-sample shapes and dtypes, and the identity of the weights. It imports no torch, transformers
or diffusers, so a bad model id fails before Ray starts at the cost of a few small files.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from latentize.config import Config, TextConfig
from latentize.encoders.text.presets import TEXT_PRESETS, Shapes, TextPreset
from latentize.errors import LatentizeError
from latentize.hub import HubRepo, read_json, sha256_file

__all__ = ["LENGTH", "MASK", "TextColumn", "TextSpec", "inspect_text", "stored_columns"]

logger = logging.getLogger(__name__)

#: The attention-mask column (``storage: padded`` of the masked families), 0/1 as uint8.
MASK = "prompt_attention_mask"
#: The real tokens of each prompt (``storage: trimmed``): rows of its ``prompt_embeds``.
LENGTH = "prompt_embeds_length"

# Weight files of a transformers model folder, in the order transformers prefers them.
_WEIGHTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


@dataclass(frozen=True)
class TextColumn:
    """One stored text column: per-sample ``shape`` (None marks the varying number of rows of a
    ``trimmed`` column) and numpy ``dtype`` name."""

    shape: tuple[int | None, ...]
    dtype: str

    @property
    def variable(self) -> bool:
        return None in self.shape


@dataclass(frozen=True)
class TextSpec:
    """What the text stage will store, known on the driver before any weights load.

    Attributes:
        preset: the ``text.preset``.
        pipeline_class: the diffusers pipeline whose ``encode_prompt`` is reproduced.
        storage: ``padded`` or ``trimmed``.
        columns: stored column name -> :class:`TextColumn`.
        max_rows: rows of ``prompt_embeds`` at most (all of them when padded).
        max_sequence_length: the T5 / Gemma / Qwen length passed to ``encode_prompt`` (None: CLIP only).
        masks_padding: whether the denoiser masks padded tokens.
        components: text component -> transformers class loaded for it.
        identity: source, revision, resolved commit, sha256 of each weight and tokenizer file and
            one ``sha256`` over them all.
        call_overrides: ``encode_prompt`` arguments decided on the driver (the sequence length;
            a default the pipeline itself turns off where a module is missing).
        dtype: ``text.dtype`` (the compute dtype is resolved per actor).
    """

    preset: str
    pipeline_class: str
    storage: str
    columns: dict[str, TextColumn]
    max_rows: int | None
    max_sequence_length: int | None
    masks_padding: bool
    components: dict[str, str]
    identity: dict[str, Any]
    call_overrides: dict[str, Any] = field(default_factory=dict)
    dtype: str = "auto"

    def bytes_per_sample(self, rows: int | None = None) -> int:
        """Stored bytes of one sample, before compression: ``rows`` rows of a trimmed
        ``prompt_embeds`` (default: ``max_rows``, the most it can take)."""
        total = 0
        for column in self.columns.values():
            count = 1
            for dim in column.shape:
                count *= (rows if rows is not None else (self.max_rows or 0)) if dim is None else dim
            total += count * np.dtype(column.dtype).itemsize
        return total

    def to_manifest(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "pipeline_class": self.pipeline_class,
            "storage": self.storage,
            "dtype": self.dtype,
            "max_sequence_length": self.max_sequence_length,
            "max_rows": self.max_rows,
            "masks_padding": self.masks_padding,
            "components": self.components,
            "call_overrides": self.call_overrides,
            "identity": self.identity,
            "columns": {k: {"shape": list(c.shape), "dtype": c.dtype} for k, c in self.columns.items()},
        }


def stored_columns(shapes: Shapes, storage: str, float_dtype: str) -> dict[str, TextColumn]:
    """The stored columns of a pipeline's per-prompt output ``shapes``.

    ``padded``: every output as it is (floats in ``float_dtype``, the mask as uint8 0/1).
    ``trimmed``: ``prompt_embeds`` as (rows, width) with rows varying per sample, the mask
    replaced by ``prompt_embeds_length`` (int32), other outputs as they are.
    """
    columns: dict[str, TextColumn] = {}
    for name, shape in shapes.items():
        if name == MASK:
            if storage == "padded":
                columns[name] = TextColumn(shape, "uint8")
            continue
        if name == "prompt_embeds" and storage == "trimmed":
            shape = (None, shape[-1])
        columns[name] = TextColumn(shape, float_dtype)
    if storage == "trimmed":
        columns[LENGTH] = TextColumn((), "int32")
    return columns


def _text_config(config: Config) -> TextConfig:
    if config.text is None or config.text.model is None:
        raise LatentizeError("the config has no resolved text section; load it with load_config")
    return config.text


def inspect_text(config: Config) -> TextSpec:
    """Reads the text components' configs (never their weights) and returns what the text stage
    will store.

    Raises:
        LatentizeError: the model is neither a local folder nor a hub id the cache or the hub
            has, or it lacks a text component of the preset.
    """
    text = _text_config(config)
    preset = TEXT_PRESETS.get(text.preset)
    source = _open_source(cast(str, text.model), text.revision)
    index = source.json("model_index.json", optional=True) or {}
    if index.get("_class_name") not in (None, preset.pipeline_class):
        logger.warning(
            "text.model %s holds a %s; preset %r reproduces %s.encode_prompt with its text components",
            text.model,
            index.get("_class_name"),
            preset.name,
            preset.pipeline_class,
        )
    configs: dict[str, dict[str, Any]] = {}
    for name, _ in preset.encoders:
        configs[name] = cast(dict[str, Any], source.json(f"{name}/config.json"))
    for name, _ in preset.tokenizers:
        configs[name] = source.json(f"{name}/tokenizer_config.json", optional=True) or {}
    shapes = preset.shapes(configs, text.max_sequence_length)
    rows = shapes["prompt_embeds"][0]
    return TextSpec(
        preset=preset.name,
        pipeline_class=preset.pipeline_class,
        storage=text.storage,
        columns=stored_columns(shapes, text.storage, config.output.dtype),
        max_rows=rows if rows is not None else text.max_sequence_length,
        max_sequence_length=text.max_sequence_length,
        masks_padding=preset.masks_padding,
        components=_component_classes(preset, index),
        identity=source.identity(preset),
        call_overrides=_call_overrides(preset, text),
        dtype=text.dtype,
    )


def _component_classes(preset: TextPreset, index: dict[str, Any]) -> dict[str, str]:
    """Each component's transformers class: the one ``model_index.json`` names (as diffusers'
    loader takes it), else the preset's."""
    classes = {}
    for name, default in preset.components:
        entry = index.get(name)
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers":
            classes[name] = str(entry[1])
        else:
            classes[name] = default
    return classes


def _call_overrides(preset: TextPreset, text: TextConfig) -> dict[str, Any]:
    """``encode_prompt`` arguments fixed on the driver and recorded in the manifest.

    A ``__call__`` default that needs optional modules (PixArt's ``clean_caption`` needs bs4 and
    ftfy) is turned off where the driver lacks them, as the pipeline itself would do there; an
    actor whose environment lacks them while the driver has them refuses to start (its captions
    would be cleaned differently).
    """
    overrides: dict[str, Any] = {}
    if text.max_sequence_length is not None:
        overrides["max_sequence_length"] = text.max_sequence_length
    for name, modules in preset.optional_requirements.items():
        if not all(importlib.util.find_spec(m) is not None for m in modules):
            overrides[name] = False
    return overrides


# -- sources: a local pipeline folder or a hub id -------------------------------------------------


class _Local:
    """A local diffusers pipeline folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def json(self, name: str, *, optional: bool = False) -> dict[str, Any] | None:
        path = self.root / name
        if not path.exists():
            if optional:
                return None
            raise LatentizeError(
                f"text.model: {self.root} has no {name}; give a diffusers pipeline folder with the preset's "
                "text components (text_encoder*/, tokenizer*/) or a hub id"
            )
        return _read_json(path)

    def identity(self, preset: TextPreset) -> dict[str, Any]:
        components: dict[str, Any] = {}
        for name, _ in preset.encoders:
            files = _local_weight_files(self.root / name)
            components[name] = {f: _sha256_cached(self.root / name / f) for f in files}
        for name, _ in preset.tokenizers:
            folder = self.root / name
            names = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
            components[name] = {f: _sha256_cached(folder / f) for f in names}
        return _identity(str(self.root.resolve()), None, "local", None, components)


def _local_weight_files(folder: Path) -> list[str]:
    for index, single in _WEIGHTS:
        if (folder / single).exists():
            return [single]
        if (folder / index).exists():
            return sorted(set(_read_json(folder / index)["weight_map"].values()))
    raise LatentizeError(f"text.model: {folder} holds no model.safetensors or pytorch_model.bin (nor a sharded index)")


class _Hub(HubRepo):
    """A hub id: files from the local Hugging Face cache first, then the hub."""

    def __init__(self, model: str, revision: str | None) -> None:
        super().__init__(
            model,
            revision,
            what="text.model",
            fix="Point text.model at a local diffusers pipeline folder (its text_encoder*/ and tokenizer*/ are "
            "enough), or download them first on a machine with network access.",
        )

    def identity(self, preset: TextPreset) -> dict[str, Any]:
        components: dict[str, Any] = {}
        for name, _ in preset.encoders:
            components[name] = self._weights(name)
        # Tokenizer files are small and not content-addressed on the hub: the commit names them.
        return _identity(self.model, self.revision, "hub", self.commit, components)

    def _weights(self, component: str) -> dict[str, str | None]:
        for index, single in _WEIGHTS:
            listed = self.json(f"{component}/{index}", optional=True)
            if listed:
                return {
                    n: self.file_sha256(f"{component}/{n}", hash_file=_sha256_cached)
                    for n in sorted(set(listed["weight_map"].values()))
                }
            digest = self.file_sha256(f"{component}/{single}", hash_file=_sha256_cached)
            if digest != self.MISSING:
                return {single: digest}
        raise LatentizeError(f"text.model: {self.model!r} has no weights in {component}/")


def _open_source(model: str, revision: str | None) -> _Local | _Hub:
    local = Path(model).expanduser()
    return _Local(local) if local.exists() else _Hub(model, revision)


def _identity(
    model: str, revision: str | None, source: str, commit: str | None, components: dict[str, Any]
) -> dict[str, Any]:
    """The manifest's text identity; ``sha256`` digests every file hash, so comparing it compares
    all of the weights and (for local folders) tokenizer files at once."""
    blob = json.dumps(components, sort_keys=True).encode()
    return {
        "model": model,
        "revision": revision,
        "source": source,
        "commit": commit,
        "files": components,
        "sha256": hashlib.sha256(blob).hexdigest(),
    }


def _sha256_cached(path: Path) -> str:
    stat = path.stat()
    return _sha256_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, once per (path, size, mtime) in a process: a T5-XXL's 9.5 GB take about
    ten seconds to hash."""
    return sha256_file(Path(path))


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path, what="text.model")
