"""Tiny random text encoders and tokenizers saved as real diffusers pipeline folders (no hub).

Each preset's folder is written by the pipeline's own ``save_pretrained`` from a pipeline built
around its text components alone (every other component None): ``model_index.json`` plus
``text_encoder*/`` and ``tokenizer*/`` as diffusers writes them. The encoders are transformers'
own classes with small widths; the tokenizers are built from a small vocabulary (CLIP's byte
alphabet and BPE merges written as ``vocab.json``/``merges.txt``, a T5 Unigram model, Gemma and
Qwen byte-level BPEs), with merges for the words the tests and the pipelines' own prompt
prefixes use, so that sequences stay short and the encoders fast on CPU.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

#: Widths deliberately unlike each other, so a wrong concatenation or pooled output shows.
CLIP_L_WIDTH, CLIP_G_WIDTH, T5_WIDTH, GEMMA_WIDTH, QWEN_WIDTH = 32, 48, 96, 40, 24
CLIP_L_PROJECTION, CLIP_G_PROJECTION = 24, 40

_WORDS = (
    "a photo of the cat dog on red blue green house tree in sky with and an painting city street night "
    "over under small large old new river mountain sunset portrait woman man child car road field flowers"
)


def _bytes_to_unicode() -> dict[int, str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def _merge_words(words: list[list[str]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Left-to-right merges that build each word (a list of symbols) into one token."""
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for parts in words:
        parts = list(parts)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            parts = [pair[0] + pair[1], *parts[2:]]
    return merges


def _prompt_words() -> list[str]:
    """The words of the test captions and of the pipelines' own prefixes (Sana's instruction,
    Lumina 2's system prompt, Qwen-Image's template)."""
    import diffusers

    chi = inspect.signature(diffusers.SanaPipeline.__call__).parameters["complex_human_instruction"].default
    extra = " ".join(chi) + " You are an assistant designed to generate superior images degree alignment based textual"
    extra += " prompts user Prompt Start system Describe image by detailing color shape size texture quantity"
    extra += " text spatial relationships objects background assistant"
    return sorted(set(_WORDS.split()) | set(re.findall(r"[A-Za-z]+", extra)))


def clip_tokenizer(folder: Path) -> Any:
    """A CLIP BPE tokenizer from a ``vocab.json`` and ``merges.txt`` written here: the 256 byte
    symbols (alone and word-final), merges for a few words, the two special tokens; 77 tokens."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    words = [[*w.lower()[:-1], w.lower()[-1] + "</w>"] for w in _prompt_words() if len(w) > 1]
    merges = _merge_words(words, vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)


def t5_tokenizer() -> Any:
    """A T5 Unigram tokenizer: whole words, single characters, the three special pieces; 512."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -3.0) for w in _prompt_words()]
    pieces += [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;'-()?!é"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def gemma_tokenizer() -> Any:
    """A Gemma BPE tokenizer with byte fallback (every text encodes), merges for the words."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    vocab.update({f"<0x{i:02X}>": 5 + i for i in range(256)})
    for c in "\u2581abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;'-()?!\n":
        vocab.setdefault(c, len(vocab))
    merges = _merge_words([["\u2581", *w] for w in _prompt_words()], vocab)
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def qwen_tokenizer() -> Any:
    """A Qwen2 byte-level BPE tokenizer with the chat template's special tokens."""
    from transformers import Qwen2Tokenizer

    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars.values())}
    space = chars[ord(" ")]
    merges = _merge_words([[space, *w] for w in _prompt_words()] + [list(w) for w in _prompt_words()], vocab)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for special in specials:
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    return tokenizer


def _clip(vocab: int, width: int, projection: int | None, eos: int, seed: int) -> Any:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection or width,
        bos_token_id=eos - 1,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    cls = CLIPTextModel if projection is None else CLIPTextModelWithProjection
    return cls(config).eval()


def _t5(vocab: int, seed: int) -> Any:
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab, d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    return T5EncoderModel(config).eval()


def _gemma(vocab: int, seed: int) -> Any:
    import torch
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    config = Gemma2Config(
        vocab_size=vocab,
        hidden_size=GEMMA_WIDTH,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=10,
        max_position_embeddings=2048,
        sliding_window=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    return Gemma2Model(config).eval()


def _qwen(vocab: int, seed: int) -> Any:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    text = {
        "vocab_size": vocab,
        "hidden_size": QWEN_WIDTH,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 1]},
        "bos_token_id": None,
        "eos_token_id": vocab - 1,
        "pad_token_id": vocab - 3,
    }
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": QWEN_WIDTH}
    config = Qwen2_5_VLConfig(text_config=text, vision_config={**vision, "fullatt_block_indexes": [0]})
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _save(pipeline_class: str, folder: Path, parts: dict[str, Any], **init: Any) -> Path:
    """Saves a pipeline of ``parts`` (every other component None) with its ``save_pretrained``."""
    import diffusers

    cls = getattr(diffusers, pipeline_class)
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {n: None for n, p in params.items() if n != "self" and p.default is p.empty}
    kwargs.update(init)
    kwargs.update(parts)
    cls(**kwargs).save_pretrained(folder)
    return folder


def build_text_pipelines(root: Path) -> dict[str, Path]:
    """One pipeline folder per text preset under ``root``; returns preset name -> folder."""
    clip_tok = clip_tokenizer(root / "_clip_vocab")
    t5_tok, gemma_tok, qwen_tok = t5_tokenizer(), gemma_tokenizer(), qwen_tokenizer()
    eos = clip_tok.eos_token_id
    clip_l = _clip(len(clip_tok), CLIP_L_WIDTH, None, eos, seed=1)
    clip_l_proj = _clip(len(clip_tok), CLIP_L_WIDTH, CLIP_L_PROJECTION, eos, seed=2)
    clip_g = _clip(len(clip_tok), CLIP_G_WIDTH, CLIP_G_PROJECTION, eos, seed=3)
    t5 = _t5(len(t5_tok), seed=4)
    gemma = _gemma(len(gemma_tok), seed=5)
    qwen = _qwen(len(qwen_tok), seed=6)
    clip_parts = {"text_encoder": clip_l, "tokenizer": clip_tok}
    no_checker = {"requires_safety_checker": False}
    return {
        "sd15": _save("StableDiffusionPipeline", root / "sd15", clip_parts, **no_checker),
        "sd2": _save("StableDiffusionPipeline", root / "sd2", clip_parts, **no_checker),
        "sdxl": _save(
            "StableDiffusionXLPipeline",
            root / "sdxl",
            {**clip_parts, "text_encoder_2": clip_g, "tokenizer_2": clip_tok},
            add_watermarker=False,
        ),
        "sd3": _save(
            "StableDiffusion3Pipeline",
            root / "sd3",
            {
                "text_encoder": clip_l_proj,
                "tokenizer": clip_tok,
                "text_encoder_2": clip_g,
                "tokenizer_2": clip_tok,
                "text_encoder_3": t5,
                "tokenizer_3": t5_tok,
            },
        ),
        "flux1": _save("FluxPipeline", root / "flux1", {**clip_parts, "text_encoder_2": t5, "tokenizer_2": t5_tok}),
        "pixart-sigma": _save("PixArtSigmaPipeline", root / "pixart", {"text_encoder": t5, "tokenizer": t5_tok}),
        "sana": _save("SanaPipeline", root / "sana", {"text_encoder": gemma, "tokenizer": gemma_tok}),
        "lumina2": _save("Lumina2Pipeline", root / "lumina2", {"text_encoder": gemma, "tokenizer": gemma_tok}),
        "qwen-image": _save("QwenImagePipeline", root / "qwen", {"text_encoder": qwen, "tokenizer": qwen_tok}),
    }
