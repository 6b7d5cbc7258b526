#!/usr/bin/env python
"""CPU cost of the model zoo's encoders at their released sizes, as a ratio to the SD VAE's.

Each architecture is built with its released configuration and random weights (the decoder
dropped, as latentize drops it), in float32 on the CPU with latentize's memory layout
(channels-last, NCHW for models with 3-D convolutions), and one batch of random pixels in its
input range goes through its bare encode: a diffusers VAE's ``encode(x).latent_dist.mean``
(one frame, ``(n, 3, 1, H, W)``, for the 3-D VAEs), a transformers tokenizer's
``encode(x).image_tokens``. After one warm-up batch of each, ``--repeats`` pairs of timed batches
alternate the SD VAE and the model, each pair back to back under about the same load from the
machine's other work; the ratio is the median of the pairs' ratios.

    python bench/zoo.py                       # every architecture, 256², batches of 2, 5 pairs
    python bench/zoo.py --only janus,emu3 --resolution 256 --batch 2 --json zoo.json

A pair's ratio is the model's seconds per image ÷ the SD VAE's: 2.0 means twice the SD VAE's
cost. ``dc-ae-f32c32``, ``taesd``, ``qwen-image`` and ``wan2.1`` were also measured
on an H200 (bench/RESULTS.md, "GPU run"), so their CPU ratios show how far CPU ratios carry to a
GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import SD_VAE, ZOO  # noqa: E402  (the released configurations of the VAEs)

from latentize.encoders.base import _memory_format  # noqa: E402

#: The tokenizers' released configurations: transformers' config classes' defaults are the
#: released models' (LlamaGen VQ-16 for Janus, Emu3-VisionTokenizer's, Chameleon's).
TOKENIZERS: dict[str, str] = {"janus": "JanusVQVAE", "emu3": "Emu3VQVAE", "chameleon": "ChameleonVQVAE"}
#: Input ranges: the SD VAE and the diffusers VAEs take [-1, 1], TAESD's AutoencoderTiny too
#: (it rescales inside), the tokenizers their processors' (Janus, Emu3 [-1, 1]; Chameleon ~[-1, 0.99]).
ORDER = ("qwen-image", "wan2.1", "wan2.2", "hunyuanimage-2.1", "janus", "emu3", "chameleon", "dc-ae-f32c32", "taesd")


def build(name: str) -> tuple[torch.nn.Module, Callable[[torch.Tensor], Any], bool]:
    """``(encoder-only model, its encode call on (n, 3, H, W) float32, takes one frame)``."""
    torch.manual_seed(0)
    if name in TOKENIZERS:
        import transformers

        cls = getattr(transformers, TOKENIZERS[name])
        model: Any = cls(cls.config_class())
        if name == "emu3":

            def call(x: torch.Tensor) -> Any:
                sizes = torch.tensor([list(x.shape[-2:])] * x.shape[0])
                return model.encode(x, sizes).image_tokens

        else:

            def call(x: torch.Tensor) -> Any:
                return model.encode(x).image_tokens

        frames = False
    else:
        import diffusers

        cls_name, cfg, frames = ZOO[name] if name != "sd-vae" else ("AutoencoderKL", SD_VAE, False)
        model = getattr(diffusers, cls_name)(**cfg)

        def call(x: torch.Tensor) -> Any:
            out = model.encode(x.unsqueeze(2) if frames else x)
            # KL models give a posterior (its mean); DC-AE gives ``latent``, AutoencoderTiny ``latents``.
            for attr in ("latent_dist", "latent", "latents"):
                if getattr(out, attr, None) is not None:
                    found = getattr(out, attr)
                    return found.mean if attr == "latent_dist" else found
            raise TypeError(f"{type(out).__name__} holds no latents")

    if isinstance(getattr(model, "decoder", None), torch.nn.Module):
        model.decoder = torch.nn.Identity()
    model = model.float().eval()
    fmt = _memory_format(model, torch.device("cpu"))
    model.to(memory_format=fmt)
    return model, call, frames


def timed(call: Callable[[torch.Tensor], Any], x: torch.Tensor) -> float:
    """Seconds of one call."""
    with torch.inference_mode():
        started = time.perf_counter()
        call(x)
        return time.perf_counter() - started


def gflop(call: Callable[[torch.Tensor], Any], x: torch.Tensor) -> float:
    """GFLOP of one call (``FlopCounterMode``: a multiply-add counts as two), per image."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        call(x)
    return counter.get_total_flops() / 1e9 / x.shape[0]


def warm(call: Callable[[torch.Tensor], Any], x: torch.Tensor) -> None:
    """One untimed call of the same shape (oneDNN builds its kernels on the first)."""
    with torch.inference_mode():
        call(x)


def pixels(n: int, res: int, fmt: torch.memory_format) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return (torch.rand((n, 3, res, res), generator=gen) * 2 - 1).contiguous(memory_format=fmt)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--only", default=",".join(ORDER), help="comma-separated names")
    parser.add_argument("--repeats", type=int, default=5, help="timed SD / model pairs per model")
    parser.add_argument("--flops", action="store_true", help="count GFLOP per image instead of timing")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    sd, sd_call, _ = build("sd-vae")
    sd_x = pixels(args.batch, args.resolution, torch.channels_last)
    rows = []
    meta = {
        "resolution": args.resolution,
        "batch": args.batch,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "sd_vae_params_m": round(sum(p.numel() for p in sd.parameters()) / 1e6, 1),
    }
    if args.flops:
        return count_flops(args, sd_call, meta)
    print(f"{'encoder':<18} {'params (M)':>10} {'min s/img':>9} {'SD min':>7} {'ratio':>7}  (each pair)", flush=True)
    for name in args.only.split(","):
        model, call, _ = build(name)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        x = pixels(args.batch, args.resolution, _memory_format(model, torch.device("cpu")))
        warm(sd_call, sd_x)
        warm(call, x)
        pairs = []
        for _ in range(args.repeats):
            sd_seconds = timed(sd_call, sd_x) / args.batch
            pairs.append((timed(call, x) / args.batch, sd_seconds))
        # The median of the pairs' ratios: each pair ran back to back, under about the same load.
        ratios = sorted(m / s for m, s in pairs)
        row = {
            "name": name,
            "params_m": round(params, 1),
            "s_per_image": [round(m, 3) for m, _ in pairs],
            "sd_s_per_image": [round(s, 3) for _, s in pairs],
            "ratio": statistics.median(ratios),
            "ratio_range": [ratios[0], ratios[-1]],
        }
        best, sd_best = min(m for m, _ in pairs), min(s for _, s in pairs)
        rows.append(row)
        shown = " / ".join(f"{m / s:.2f}" for m, s in pairs)
        print(f"{name:<18} {params:>10.1f} {best:>9.2f} {sd_best:>7.2f} {row['ratio']:>7.2f}  ({shown})", flush=True)
        if args.json:  # after every model: a run cut short keeps its figures
            args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        del model, call
    return 0


def count_flops(args: argparse.Namespace, sd_call: Callable[[torch.Tensor], Any], meta: dict[str, Any]) -> int:
    """``--flops``: each encoder's GFLOP per image at the resolution, and its ratio to the SD VAE's."""
    sd = gflop(sd_call, pixels(1, args.resolution, torch.channels_last))
    rows = [{"name": "sd-vae", "gflop": round(sd, 1), "ratio": 1.0}]
    print(f"{'encoder':<18} {'GFLOP/img':>10} {'ratio':>7}\n{'sd-vae':<18} {sd:>10.1f} {1.0:>7.2f}", flush=True)
    for name in args.only.split(","):
        model, call, _ = build(name)
        flops = gflop(call, pixels(1, args.resolution, _memory_format(model, torch.device("cpu"))))
        rows.append({"name": name, "gflop": round(flops, 1), "ratio": flops / sd})
        print(f"{name:<18} {flops:>10.1f} {flops / sd:>7.2f}", flush=True)
        del model, call
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
