"""Text presets: which diffusers pipeline's ``encode_prompt`` a ``text.preset`` reproduces.

A preset is pure data (importing this module imports no torch, transformers or diffusers): the
pipeline class, the hub id, the text components to load, how ``encode_prompt`` is called (no
classifier-free guidance, one image per prompt, the defaults of the pipeline's own ``__call__``)
and what its outputs are called, whether the denoiser masks padded tokens, and how the stored
shapes follow from the components' configs. The shapes of the released models (the ``reference``
configs) feed ``latentize models --text`` and ``bench/text.py``'s storage table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from latentize.registry import Registry

__all__ = ["TEXT_PRESETS", "ComponentConfigs", "Shapes", "TextPreset", "hidden_size", "text_preset_table"]

#: Component name (``text_encoder_2``, ``tokenizer``...) -> its config (``config.json`` of a text
#: encoder, ``tokenizer_config.json`` of a tokenizer), as plain JSON data.
ComponentConfigs = Mapping[str, Mapping[str, Any]]
#: Column name -> per-sample shape of the pipeline's output for one prompt; ``None`` marks a
#: length that varies per prompt.
Shapes = dict[str, tuple[int | None, ...]]


def hidden_size(config: Mapping[str, Any]) -> int:
    """Width of a text encoder's hidden states: ``hidden_size`` (CLIP, Gemma 2, Qwen 2.5-VL, also
    under ``text_config`` as transformers 5 saves it) or ``d_model`` (T5)."""
    for key in ("hidden_size", "d_model"):
        if key in config:
            return int(config[key])
    return hidden_size(config["text_config"])


def _clip_length(configs: ComponentConfigs, tokenizer: str = "tokenizer", encoder: str = "text_encoder") -> int:
    """The CLIP tokenizer's ``model_max_length`` (77), which the pipelines pad and truncate to;
    the encoder's ``max_position_embeddings`` where the tokenizer config does not say."""
    given = configs.get(tokenizer, {}).get("model_max_length")
    return int(given) if given is not None else int(configs[encoder]["max_position_embeddings"])


def _sd(configs: ComponentConfigs, max_len: int | None) -> Shapes:
    # The last hidden state (after the final layer norm), clip_skip None.
    return {"prompt_embeds": (_clip_length(configs), hidden_size(configs["text_encoder"]))}


def _sdxl(configs: ComponentConfigs, max_len: int | None) -> Shapes:
    # Penultimate hidden states of both CLIPs side by side; the projected pooled output of the second.
    width = hidden_size(configs["text_encoder"]) + hidden_size(configs["text_encoder_2"])
    return {
        "prompt_embeds": (_clip_length(configs), width),
        "pooled_prompt_embeds": (int(configs["text_encoder_2"]["projection_dim"]),),
    }


def _sd3(configs: ComponentConfigs, max_len: int | None) -> Shapes:
    # Both CLIPs' penultimate states, zero-padded to T5's width, then T5's states below them.
    assert max_len is not None
    pooled = int(configs["text_encoder"]["projection_dim"]) + int(configs["text_encoder_2"]["projection_dim"])
    return {
        "prompt_embeds": (_clip_length(configs) + max_len, hidden_size(configs["text_encoder_3"])),
        "pooled_prompt_embeds": (pooled,),
    }


def _flux1(configs: ComponentConfigs, max_len: int | None) -> Shapes:
    # T5's last hidden state; CLIP's pooled output (not projected).
    assert max_len is not None
    return {
        "prompt_embeds": (max_len, hidden_size(configs["text_encoder_2"])),
        "pooled_prompt_embeds": (hidden_size(configs["text_encoder"]),),
    }


def _masked(configs: ComponentConfigs, max_len: int | None) -> Shapes:
    # One encoder (T5 or Gemma 2) padded to max_len, with its attention mask.
    assert max_len is not None
    return {"prompt_embeds": (max_len, hidden_size(configs["text_encoder"])), "prompt_attention_mask": (max_len,)}


def _qwen_image(configs: ComponentConfigs, max_len: int | None) -> Shapes:
    # One prompt gives its own length (at most max_len rows), no padding.
    return {"prompt_embeds": (None, hidden_size(configs["text_encoder"]))}


@dataclass(frozen=True)
class TextPreset:
    """One pipeline's ``encode_prompt``.

    Attributes:
        name: the ``text.preset`` value.
        pipeline_class: the diffusers pipeline whose ``encode_prompt`` is called.
        model, revision: where its components are on the Hugging Face hub.
        encoders: ``(component, transformers class)`` of each text encoder, in pipeline order.
        tokenizers: ``(component, transformers class)`` of each tokenizer.
        outputs: the names of ``encode_prompt``'s return values in order (None: not stored, e.g.
            the negative embeddings, which are None without guidance, and FLUX's constant
            ``text_ids``).
        shapes: the per-prompt output shapes from the components' configs and the sequence length.
        masks_padding: whether the denoiser masks padded tokens (``storage: trimmed`` allowed).
        padding_reason: why ``storage: trimmed`` (or, for ``fixed_length`` False, ``padded``) is
            refused, stated for the error message.
        fixed_length: False when ``encode_prompt`` of one prompt has no padding at all (its length
            varies per prompt): only ``trimmed`` storage describes it.
        max_sequence_length: the pipeline ``__call__``'s default (None: CLIP only, 77 fixed).
        max_sequence_length_limit: the most the pipeline's ``check_inputs`` accepts.
        call_kwargs: fixed ``encode_prompt`` arguments (no classifier-free guidance...).
        call_defaults: ``encode_prompt`` arguments given the default of the pipeline's own
            ``__call__`` (read from its signature in the actor), which may differ from
            ``encode_prompt``'s own default (PixArt's ``clean_caption``, Sana's instruction).
        optional_requirements: call default -> modules without which the pipeline itself turns
            that default off (PixArt's caption cleaning needs bs4 and ftfy).
        init_kwargs: constructor arguments of the text-only pipeline (no safety checker...).
        sliced_after: name of the pipeline attribute giving the template tokens dropped before
            ``encode_prompt`` cuts the embeddings to ``max_sequence_length`` (a truncation the
            tokenizer does not see; Qwen-Image).
        reference: the released components' config fields (hub configs), for the shape table.
        encoder_names: the text encoders in words, for ``latentize models``.
    """

    name: str
    pipeline_class: str
    model: str
    encoders: tuple[tuple[str, str], ...]
    tokenizers: tuple[tuple[str, str], ...]
    outputs: tuple[str | None, ...]
    shapes: Callable[[ComponentConfigs, int | None], Shapes]
    masks_padding: bool
    padding_reason: str
    reference: Mapping[str, Mapping[str, Any]]
    encoder_names: str
    fixed_length: bool = True
    max_sequence_length: int | None = None
    max_sequence_length_limit: int | None = None
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)
    call_defaults: tuple[str, ...] = ()
    optional_requirements: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    init_kwargs: Mapping[str, Any] = field(default_factory=dict)
    sliced_after: str | None = None
    revision: str | None = None

    @property
    def components(self) -> tuple[tuple[str, str], ...]:
        """Every text component ``(name, class)``: encoders, then tokenizers."""
        return self.encoders + self.tokenizers

    @property
    def storages(self) -> tuple[str, ...]:
        """The ``text.storage`` values this family allows."""
        return (("padded",) if self.fixed_length else ()) + (("trimmed",) if self.masks_padding else ())

    @property
    def clip_length(self) -> int:
        """CLIP's padded length in the released tokenizers (77)."""
        return _clip_length(self.reference)

    def reference_shapes(self, max_sequence_length: int | None = None) -> Shapes:
        """The per-prompt output shapes of the released models."""
        return self.shapes(self.reference, max_sequence_length or self.max_sequence_length)


TEXT_PRESETS: Registry[TextPreset] = Registry("text preset", config_key="text.preset")

_NO_CFG = {"do_classifier_free_guidance": False}
_CLIP_L = {"hidden_size": 768, "projection_dim": 768, "max_position_embeddings": 77}
_CLIP_G = {"hidden_size": 1280, "projection_dim": 1280, "max_position_embeddings": 77}
_T5_XXL = {"d_model": 4096}
_GEMMA2_2B = {"hidden_size": 2304}
_CLIP_TOKENIZER = {"model_max_length": 77}
_UNET_PADDING = "its UNet cross-attends to all 77 CLIP positions, padding included (no attention mask)."

for _p in (
    TextPreset(
        "sd15",
        "StableDiffusionPipeline",
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        encoders=(("text_encoder", "CLIPTextModel"),),
        tokenizers=(("tokenizer", "CLIPTokenizer"),),
        outputs=("prompt_embeds", None),
        shapes=_sd,
        masks_padding=False,
        padding_reason=f"Stable Diffusion 1.x: {_UNET_PADDING}",
        reference={"text_encoder": _CLIP_L, "tokenizer": _CLIP_TOKENIZER},
        encoder_names="CLIP ViT-L/14",
        call_kwargs=_NO_CFG,
        call_defaults=("clip_skip",),
        init_kwargs={"requires_safety_checker": False},
    ),
    TextPreset(
        "sd2",
        "StableDiffusionPipeline",
        "stabilityai/stable-diffusion-2-1",
        encoders=(("text_encoder", "CLIPTextModel"),),
        tokenizers=(("tokenizer", "CLIPTokenizer"),),
        outputs=("prompt_embeds", None),
        shapes=_sd,
        masks_padding=False,
        padding_reason=f"Stable Diffusion 2.x: {_UNET_PADDING}",
        reference={
            "text_encoder": {"hidden_size": 1024, "projection_dim": 512, "max_position_embeddings": 77},
            "tokenizer": _CLIP_TOKENIZER,
        },
        encoder_names="OpenCLIP ViT-H/14 (23 layers)",
        call_kwargs=_NO_CFG,
        call_defaults=("clip_skip",),
        init_kwargs={"requires_safety_checker": False},
    ),
    TextPreset(
        "sdxl",
        "StableDiffusionXLPipeline",
        "stabilityai/stable-diffusion-xl-base-1.0",
        encoders=(("text_encoder", "CLIPTextModel"), ("text_encoder_2", "CLIPTextModelWithProjection")),
        tokenizers=(("tokenizer", "CLIPTokenizer"), ("tokenizer_2", "CLIPTokenizer")),
        outputs=("prompt_embeds", None, "pooled_prompt_embeds", None),
        shapes=_sdxl,
        masks_padding=False,
        padding_reason=f"SDXL: {_UNET_PADDING}",
        reference={
            "text_encoder": _CLIP_L,
            "text_encoder_2": _CLIP_G,
            "tokenizer": _CLIP_TOKENIZER,
            "tokenizer_2": _CLIP_TOKENIZER,
        },
        encoder_names="CLIP ViT-L/14 + OpenCLIP ViT-bigG/14",
        call_kwargs=_NO_CFG,
        call_defaults=("clip_skip",),
        init_kwargs={"add_watermarker": False},
    ),
    TextPreset(
        "sd3",
        "StableDiffusion3Pipeline",
        "stabilityai/stable-diffusion-3-medium-diffusers",
        encoders=(
            ("text_encoder", "CLIPTextModelWithProjection"),
            ("text_encoder_2", "CLIPTextModelWithProjection"),
            ("text_encoder_3", "T5EncoderModel"),
        ),
        tokenizers=(("tokenizer", "CLIPTokenizer"), ("tokenizer_2", "CLIPTokenizer"), ("tokenizer_3", "T5Tokenizer")),
        outputs=("prompt_embeds", None, "pooled_prompt_embeds", None),
        shapes=_sd3,
        masks_padding=False,
        padding_reason=(
            "SD3's transformer attends to every CLIP and T5 position, padding included (no attention mask)."
        ),
        reference={
            "text_encoder": _CLIP_L,
            "text_encoder_2": _CLIP_G,
            "text_encoder_3": _T5_XXL,
            "tokenizer": _CLIP_TOKENIZER,
            "tokenizer_2": _CLIP_TOKENIZER,
        },
        encoder_names="CLIP ViT-L/14 + OpenCLIP ViT-bigG/14 + T5-XXL",
        max_sequence_length=256,
        max_sequence_length_limit=512,
        call_kwargs={**_NO_CFG, "prompt_2": None, "prompt_3": None},
        call_defaults=("clip_skip", "max_sequence_length"),
    ),
    TextPreset(
        "flux1",
        "FluxPipeline",
        "black-forest-labs/FLUX.1-schnell",
        encoders=(("text_encoder", "CLIPTextModel"), ("text_encoder_2", "T5EncoderModel")),
        tokenizers=(("tokenizer", "CLIPTokenizer"), ("tokenizer_2", "T5Tokenizer")),
        outputs=("prompt_embeds", "pooled_prompt_embeds", None),
        shapes=_flux1,
        masks_padding=False,
        padding_reason=(
            "FLUX.1's transformer attends to the padded T5 positions (no attention mask), so they are part of "
            "what the model sees."
        ),
        reference={"text_encoder": _CLIP_L, "text_encoder_2": _T5_XXL, "tokenizer": _CLIP_TOKENIZER},
        encoder_names="CLIP ViT-L/14 (pooled) + T5-XXL",
        max_sequence_length=512,
        max_sequence_length_limit=512,
        call_defaults=("max_sequence_length",),
    ),
    TextPreset(
        "pixart-sigma",
        "PixArtSigmaPipeline",
        "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
        encoders=(("text_encoder", "T5EncoderModel"),),
        tokenizers=(("tokenizer", "T5Tokenizer"),),
        outputs=("prompt_embeds", "prompt_attention_mask", None, None),
        shapes=_masked,
        masks_padding=True,
        padding_reason="",
        reference={"text_encoder": _T5_XXL},
        encoder_names="T5-XXL (masked)",
        max_sequence_length=300,
        call_kwargs=_NO_CFG,
        call_defaults=("clean_caption", "max_sequence_length"),
        optional_requirements={"clean_caption": ("bs4", "ftfy")},
    ),
    TextPreset(
        "sana",
        "SanaPipeline",
        "Efficient-Large-Model/Sana_1600M_1024px_diffusers",
        encoders=(("text_encoder", "Gemma2Model"),),
        tokenizers=(("tokenizer", "GemmaTokenizer"),),
        outputs=("prompt_embeds", "prompt_attention_mask", None, None),
        shapes=_masked,
        masks_padding=True,
        padding_reason="",
        reference={"text_encoder": _GEMMA2_2B},
        encoder_names="Gemma 2 2B (masked, with the pipeline's instruction prefix)",
        max_sequence_length=300,
        call_kwargs=_NO_CFG,
        call_defaults=("clean_caption", "max_sequence_length", "complex_human_instruction"),
        optional_requirements={"clean_caption": ("bs4", "ftfy")},
    ),
    TextPreset(
        "lumina2",
        "Lumina2Pipeline",
        "Alpha-VLLM/Lumina-Image-2.0",
        encoders=(("text_encoder", "Gemma2Model"),),
        tokenizers=(("tokenizer", "GemmaTokenizer"),),
        outputs=("prompt_embeds", "prompt_attention_mask", None, None),
        shapes=_masked,
        masks_padding=True,
        padding_reason="",
        reference={"text_encoder": _GEMMA2_2B},
        encoder_names="Gemma 2 2B, penultimate layer (masked, with the pipeline's system prompt)",
        max_sequence_length=256,
        max_sequence_length_limit=512,
        call_kwargs=_NO_CFG,
        call_defaults=("system_prompt", "max_sequence_length"),
    ),
    TextPreset(
        "qwen-image",
        "QwenImagePipeline",
        "Qwen/Qwen-Image",
        encoders=(("text_encoder", "Qwen2_5_VLForConditionalGeneration"),),
        tokenizers=(("tokenizer", "Qwen2Tokenizer"),),
        # encode_prompt calls its mask prompt_embeds_mask (None when no prompt of the call is padded);
        # it only gives each prompt's length here.
        outputs=("prompt_embeds", "prompt_attention_mask"),
        shapes=_qwen_image,
        masks_padding=True,
        padding_reason=(
            "Qwen-Image's encode_prompt pads only to the longest prompt of its call, so one prompt has no "
            "padding and its length varies; use text.storage: trimmed."
        ),
        reference={"text_encoder": {"hidden_size": 3584}},
        encoder_names="Qwen2.5-VL 7B, last layer (with the pipeline's template)",
        fixed_length=False,
        max_sequence_length=512,
        max_sequence_length_limit=1024,
        call_defaults=("max_sequence_length",),
        sliced_after="prompt_template_encode_start_idx",
    ),
):
    TEXT_PRESETS.add(_p.name, _p)


def text_preset_table() -> list[dict[str, Any]]:
    """Every text preset as a plain dict, in name order (``latentize models --text``): pipeline,
    hub id, encoders, default length, whether the denoiser masks padding, and the per-prompt
    shapes of ``storage: padded`` at the released models' sizes (None: a length that varies)."""
    rows = []
    for name in TEXT_PRESETS.names():
        p = TEXT_PRESETS.get(name)
        rows.append(
            {
                "name": p.name,
                "pipeline_class": p.pipeline_class,
                "model": p.model,
                "revision": p.revision,
                "encoders": p.encoder_names,
                "components": dict(p.components),
                "max_sequence_length": p.max_sequence_length,
                "masks_padding": p.masks_padding,
                "storage": list(p.storages),
                "shapes": {k: list(v) for k, v in p.reference_shapes().items()},
            }
        )
    return rows
