"""The text stage: caption embeddings exactly as a diffusers pipeline's ``encode_prompt`` makes them.

* :mod:`~latentize.encoders.text.presets`: the pipelines by ``text.preset`` (pure data);
* :mod:`~latentize.encoders.text.spec`: the driver side, :func:`inspect_text` (configs only);
* :mod:`~latentize.encoders.text.encoder`: the actor side, :class:`TextEncoder`.

Importing this package imports no torch, transformers or diffusers.
"""

from latentize.encoders.text.encoder import TextEncoder, TextResult, default_text_batch_size, resolve_text_dtype
from latentize.encoders.text.presets import TEXT_PRESETS, TextPreset, text_preset_table
from latentize.encoders.text.spec import LENGTH, MASK, TextColumn, TextSpec, inspect_text, stored_columns

__all__ = [
    "LENGTH",
    "MASK",
    "TEXT_PRESETS",
    "TextColumn",
    "TextEncoder",
    "TextPreset",
    "TextResult",
    "TextSpec",
    "default_text_batch_size",
    "inspect_text",
    "resolve_text_dtype",
    "stored_columns",
    "text_preset_table",
]
