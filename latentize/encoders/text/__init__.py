"""The text stage: caption embeddings exactly as a diffusers pipeline's ``encode_prompt`` makes them.

* :mod:`~latentize.encoders.text.presets`: the pipelines by ``text.preset`` (pure data).

Importing this package imports no torch, transformers or diffusers.
"""

from latentize.encoders.text.presets import TEXT_PRESETS, TextPreset, text_preset_table

__all__ = ["TEXT_PRESETS", "TextPreset", "text_preset_table"]
