#!/usr/bin/env python
"""The text stage: captions per second of :class:`~latentize.encoders.text.TextEncoder` against a
hand loop calling the pipeline's ``encode_prompt``, and the stored bytes per sample of every
text preset at the released models' sizes.

Speed: a FLUX.1 text stack (CLIP + T5) with random weights, small enough for a CPU yet not
trivial (CLIP 256 wide, 4 layers; T5 256 wide, 4 layers; T5 at FLUX's 512 tokens), saved as a
pipeline folder. Both sides encode the same synthetic captions (5-40 words) in batches of the
same size, on CPU in float32, storing float16: the hand loop calls ``FluxPipeline.encode_prompt``
on each batch (the pipeline loaded by diffusers' ``from_pretrained``) and casts the outputs to
float16 numpy; the text stage calls ``TextEncoder.encode`` on each batch. The two run batch by
batch back to back, the first alternating; the figures are the medians over the repeats. Two
caption sets: all distinct (the stage's overhead) and each caption twice within its batch (what
encoding repeats once saves).

Storage: the bytes of one sample's text columns with ``output.dtype`` float16, computed from the
presets' reference configs (the released models' widths and the pipelines' default lengths),
beside the latent of the family's native resolution.

    python bench/text.py [--captions 128] [--batch 16] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tokenizers of the test suite's tiny text pipelines

#: (latent channels, downsampling factor, native resolution) of each text preset's image side.
LATENTS = {
    "sd15": (4, 8, 512),
    "sd2": (4, 8, 768),
    "sdxl": (4, 8, 1024),
    "sd3": (16, 8, 1024),
    "flux1": (16, 8, 1024),
    "pixart-sigma": (4, 8, 1024),
    "sana": (32, 32, 1024),
    "lumina2": (16, 8, 1024),
    "qwen-image": (16, 8, 1024),
}

_WORDS = (
    "a photo of the cat dog on red blue green house tree in sky with and an painting city street night over "
    "under small large old new river mountain sunset portrait woman man child car road field flowers vintage "
    "poster illustration watercolor close up view beautiful modern wooden table lamp window light shadow"
).split()


def captions(count: int, seed: int) -> list[str]:
    """``count`` distinct LAION-like captions of 5 to 40 words."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < count:
        text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 40)))
        if text not in out:
            out.append(text)
    return out


def build_stack(folder: Path) -> Path:
    """A FLUX.1 pipeline folder with a CLIP (256 wide, 4 layers) and a T5 (256 wide, 4 layers)."""
    import torch
    from diffusers import FluxPipeline
    from text_models import clip_tokenizer, t5_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tok, t5_tok = clip_tokenizer(folder / "_vocab"), t5_tokenizer()
    torch.manual_seed(0)
    eos = clip_tok.eos_token_id
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=eos - 1,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    )
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_heads=4))
    parts = {"text_encoder": clip, "tokenizer": clip_tok, "text_encoder_2": t5, "tokenizer_2": t5_tok}
    FluxPipeline(scheduler=None, vae=None, transformer=None, **parts).save_pretrained(folder / "flux1")
    return folder / "flux1"


def speed(folder: Path, texts: list[str], batch: int, repeats: int) -> dict[str, Any]:
    """Captions per second of the text stage and of the hand loop, taking turns per repeat."""
    import torch
    from diffusers import FluxPipeline

    from latentize.config import load_config
    from latentize.encoders.text import TextEncoder, inspect_text

    torch.set_num_threads(2)
    cfg = load_config(base={"output": {"path": "x"}, "text": {"preset": "flux1", "model": str(folder)}})
    stage = TextEncoder(config=cfg, spec=inspect_text(cfg), device=torch.device("cpu"))
    pipe = FluxPipeline.from_pretrained(folder, scheduler=None, vae=None, transformer=None)
    batches = [texts[i : i + batch] for i in range(0, len(texts), batch)]

    def hand(b: list[str]) -> None:
        with torch.inference_mode():
            embeds, pooled, _ = pipe.encode_prompt(prompt=b, device="cpu", max_sequence_length=512)
            embeds.to(torch.float16).numpy(), pooled.to(torch.float16).numpy()

    def ours(b: list[str]) -> None:
        stage.encode(b, [str(i) for i in range(len(b))])

    def once(first: int) -> dict[str, float]:
        # Batch by batch, the two sides back to back (the first one alternating), so that the
        # shared machine's noise falls on both alike. CPU seconds of this process are counted
        # beside the wall time: other jobs on the machine disturb them less.
        wall = {"hand": 0.0, "stage": 0.0}
        cpu = {"hand": 0.0, "stage": 0.0}
        for i, b in enumerate(batches):
            pair = [("hand", hand), ("stage", ours)]
            for name, fn in pair if (i + first) % 2 == 0 else pair[::-1]:
                start, start_cpu = time.perf_counter(), time.process_time()
                fn(b)
                wall[name] += time.perf_counter() - start
                cpu[name] += time.process_time() - start_cpu
        return {
            "hand_captions_per_s": len(texts) / wall["hand"],
            "stage_captions_per_s": len(texts) / wall["stage"],
            "ratio": wall["hand"] / wall["stage"],
            "hand_captions_per_cpu_s": len(texts) / cpu["hand"],
            "stage_captions_per_cpu_s": len(texts) / cpu["stage"],
            "cpu_ratio": cpu["hand"] / cpu["stage"],
        }

    once(0)  # warm both (first calls allocate)
    runs = []
    for i in range(repeats):
        runs.append(once(i))
        r = runs[-1]
        print(
            f"  repeat {i}: hand {r['hand_captions_per_s']:.1f}/s, stage {r['stage_captions_per_s']:.1f}/s", flush=True
        )
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return {"runs": runs, "median": median}


def storage_table() -> list[dict[str, Any]]:
    """Bytes of one sample's text columns (float16) per preset and storage, at the released sizes."""
    from latentize.encoders.text import TEXT_PRESETS, TextSpec, stored_columns

    rows = []
    for name in TEXT_PRESETS.names():
        preset = TEXT_PRESETS.get(name)
        shapes = preset.reference_shapes()
        channels, factor, resolution = LATENTS[name]
        latent = channels * (resolution // factor) ** 2 * 2
        for storage in preset.storages:
            columns = stored_columns(shapes, storage, "float16")
            rows_max = shapes["prompt_embeds"][0] or preset.max_sequence_length
            spec = TextSpec(name, preset.pipeline_class, storage, columns, rows_max, None, preset.masks_padding, {}, {})
            width = shapes["prompt_embeds"][-1]
            rows.append(
                {
                    "preset": name,
                    "storage": storage,
                    "columns": {k: [d if d is not None else "N" for d in c.shape] for k, c in columns.items()},
                    "bytes_per_sample": spec.bytes_per_sample(),
                    "bytes_per_token": width * 2 if storage == "trimmed" else None,
                    "latent_resolution": resolution,
                    "latent_bytes": latent,
                    "text_over_latent": spec.bytes_per_sample() / latent,
                }
            )
    return rows


def _print_table(rows: list[dict[str, Any]]) -> None:
    print("\n| preset | storage | columns (per sample) | bytes per sample | per token | latent at | text ÷ latent |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cols = ", ".join(f"`{k}` {'×'.join(str(d) for d in v) or 'scalar'}" for k, v in r["columns"].items())
        most = "at most " if r["storage"] == "trimmed" else ""
        per_token = f"{r['bytes_per_token']:,} + 4" if r["bytes_per_token"] else "–"
        print(
            f"| `{r['preset']}` | {r['storage']} | {cols} | {most}{r['bytes_per_sample']:,} "
            f"({r['bytes_per_sample'] / 2**20:.2f} MiB) | {per_token} | {r['latent_resolution']}²: "
            f"{r['latent_bytes']:,} | {most}{r['text_over_latent']:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import torch

    distinct = captions(args.captions, seed=0)
    # Each caption twice in its batch: half of every batch repeats the other half.
    half = args.batch // 2
    repeated = [c for i in range(0, len(distinct) // 2, half) for c in distinct[i : i + half] * 2]
    figures: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "captions": args.captions,
        "batch": args.batch,
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_stack(Path(tmp))
        for label, texts in (("distinct", distinct), ("repeated", repeated)):
            print(f"{label} captions ({len(texts)}, {len(set(texts))} distinct):", flush=True)
            figures[label] = speed(folder, texts, args.batch, args.repeats)
            m = figures[label]["median"]
            print(
                f"  median: hand loop {m['hand_captions_per_s']:.1f} captions/s, text stage "
                f"{m['stage_captions_per_s']:.1f} captions/s, ratio {m['ratio']:.2f}; per CPU second "
                f"{m['hand_captions_per_cpu_s']:.1f} and {m['stage_captions_per_cpu_s']:.1f}, "
                f"ratio {m['cpu_ratio']:.2f}"
            )
    figures["storage"] = storage_table()
    _print_table(figures["storage"])
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=lambda o: np.asarray(o).tolist()))


if __name__ == "__main__":
    main()
