#!/usr/bin/env python
"""Train a small diffusion model on a latentize output: no pixels, no autoencoder.

    python examples/train_on_latents.py OUT --steps 2000 --batch-size 64 --workers 4

The latents of ``OUT`` (written by ``latentize encode``) are read through
``latentize.data.LatentDataset``, reshuffled every epoch, and a small class-free diffusers
``UNet2DModel``, conditioned on the timestep only, learns to predict the noise that DDPM's
forward process adds (the epsilon objective, as Stable Diffusion trains). latentize stores
latents already normalised with the model's constants (``latentize qa`` checks they have std
about 1), so they go to the UNet as they are. The loss is logged every ``--log-every`` steps;
``--save DIR`` writes the UNet with ``save_pretrained``.

**Text-conditioned** when the output holds caption embeddings (``latentize encode`` with a
``text:`` section; the manifest's ``text``): the UNet is conditioned on one vector per caption
besides the timestep, ``pooled_prompt_embeds`` where the family stores one, else the mean of
``prompt_embeds`` over its real tokens (``prompt_attention_mask``; a trimmed output's batches
come zero-padded with that mask). A linear layer maps it to the timestep embedding's width and
adds it there (diffusers' ``class_embed_type="identity"``). Classifier-free guidance needs the
model to know the unconditional case too: each caption is replaced by the empty prompt's
embeddings (``LatentDataset.empty_prompt()``) with probability ``--cfg-dropout`` (0.1, as
Stable Diffusion and its peers train). ``--no-text`` trains unconditioned on such an output.

Several processes (``torchrun``) each read their own part: ``--rank`` and ``--world-size``
default to torch.distributed's environment variables. This example keeps the training loop
plain and single-device; wrap the model in DistributedDataParallel for real multi-GPU runs.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

# Run from a checkout without installing latentize.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentize.data import LatentDataset  # noqa: E402

__all__ = ["TextConditioned", "build_model", "condition_of", "latent_batches", "main", "train", "training_batches"]

logger = logging.getLogger("train_on_latents")


def build_model(channels: int, size: int, widths: Sequence[int] = (64, 128), *, conditioned: bool = False) -> Any:
    """A class-free, timestep-conditioned ``UNet2DModel`` for (N, channels, size, size) latents.

    One residual layer per level and no attention: small enough to train on a CPU. ``size``
    must be divisible by ``2 ** (len(widths) - 1)``. ``conditioned``: the UNet also adds a
    vector of the timestep embedding's width (``4 * widths[0]``) to it (``class_labels``).
    """
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(widths),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * len(widths),
        up_block_types=("UpBlock2D",) * len(widths),
        add_attention=False,
        norm_num_groups=8,
        class_embed_type="identity" if conditioned else None,
    )


class TextConditioned(torch.nn.Module):
    """A UNet of :func:`build_model` (``conditioned=True``) with a linear map of a caption
    vector (B, condition_dim) to its timestep embedding's width."""

    def __init__(self, unet: Any, condition_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.unet = unet
        self.project = torch.nn.Linear(condition_dim, embed_dim)

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy, t, class_labels=self.project(condition)).sample


def condition_of(embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
    """One float32 vector per caption, (B, width), from a batch's text columns (or the
    unbatched empty prompt's, which gives (width,)): ``pooled_prompt_embeds`` when stored, else
    ``prompt_embeds`` averaged over its real tokens (``prompt_attention_mask``, when there is one;
    padded rows of a trimmed output's batch are zeros and masked out)."""
    if "pooled_prompt_embeds" in embeddings:
        return embeddings["pooled_prompt_embeds"].float()
    embeds = embeddings["prompt_embeds"].float()  # (..., rows, width)
    mask = embeddings.get("prompt_attention_mask")
    weights = torch.ones(embeds.shape[:-1]) if mask is None else mask.float()
    weights = weights.unsqueeze(-1)
    # A caption of no real token (cannot happen with a tokenizer's BOS/EOS) would divide by 0.
    return (embeds * weights).sum(-2) / weights.sum(-2).clamp(min=1.0)


def _text_columns(dataset: LatentDataset) -> list[str]:
    """The text columns :func:`condition_of` reads of this output."""
    stored = set((dataset.text or {}).get("columns") or {})
    if "pooled_prompt_embeds" in stored:
        return ["pooled_prompt_embeds"]
    # A trimmed output builds its mask from the lengths; a padded one stores it (masked families).
    masked = "prompt_embeds_length" in stored or "prompt_attention_mask" in stored
    return ["prompt_embeds", *(["prompt_attention_mask"] if masked else [])]


def _dataset(
    root: str,
    batch_size: int,
    *,
    column: str,
    seed: int,
    rank: int,
    world_size: int,
    text: bool | None,
    storage_options: dict[str, Any] | None,
) -> tuple[LatentDataset, bool]:
    """The reader of ``column`` (and the caption columns when conditioned), and whether it is:
    ``text`` None conditions on captions when the output has them."""
    # One reader for every epoch: it reads the manifest and the commit markers once, and
    # set_epoch reseeds the shuffles (and the moments draws and flip choices).
    settings: dict[str, Any] = dict(
        shuffle=True, seed=seed, rank=rank, world_size=world_size, storage_options=storage_options
    )
    dataset = LatentDataset(root, batch_size, columns=[column], **settings)
    conditioned = dataset.text is not None if text is None else text
    if conditioned and dataset.text is None:
        raise ValueError(f"{root} holds no caption embeddings (its manifest has no text entry)")
    if conditioned:
        # The caption columns depend on what the manifest says the family stores.
        dataset = LatentDataset(root, batch_size, columns=[column, *_text_columns(dataset)], **settings)
    return dataset, conditioned


def training_batches(
    dataset: LatentDataset, *, column: str = "latent", conditioned: bool = False, workers: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Endless ``(latents, condition)`` batches of ``dataset``, epoch after epoch, each epoch in
    its own order (``set_epoch``): latents (B, C, h, w) float32, and (``conditioned``) each
    caption's vector (B, width) float32 (:func:`condition_of`), else None."""
    from torch.utils.data import DataLoader

    for epoch in itertools.count():
        dataset.set_epoch(epoch)
        empty = True
        for batch in DataLoader(dataset, batch_size=None, num_workers=workers):
            empty = False
            latents = batch[column]
            if not latents.is_floating_point():
                raise ValueError(f"column {column!r} holds {latents.dtype} values (VQ indices?); use float latents")
            yield latents.float(), condition_of(batch) if conditioned else None
        if empty:
            raise ValueError(f"no latents to train on (rank {dataset.rank} of {dataset.world_size})")


def latent_batches(
    root: str,
    batch_size: int,
    *,
    column: str = "latent",
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    storage_options: dict[str, Any] | None = None,
) -> Iterator[torch.Tensor]:
    """Endless float32 batches (B, C, h, w) of the ``column`` latents of ``root``, epoch after
    epoch, each epoch in its own order (``set_epoch``)."""
    dataset, _ = _dataset(
        root,
        batch_size,
        column=column,
        seed=seed,
        rank=rank,
        world_size=world_size,
        text=False,
        storage_options=storage_options,
    )
    for latents, _ in training_batches(dataset, column=column, workers=workers):
        yield latents


def train(
    root: str,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    workers: int = 0,
    seed: int = 0,
    column: str = "latent",
    device: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    log_every: int = 10,
    save: str | None = None,
    text: bool | None = None,
    cfg_dropout: float = 0.1,
    widths: Sequence[int] = (64, 128),
) -> list[float]:
    """Trains the UNet for ``steps`` optimiser steps; returns the loss of every step.

    ``text``: condition on the captions (None: when the output has caption embeddings);
    ``cfg_dropout``: the probability that a caption is replaced by the empty prompt's
    embeddings; ``widths``: the UNet's channels per level.
    """
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dataset, conditioned = _dataset(
        root,
        batch_size,
        column=column,
        seed=seed,
        rank=rank,
        world_size=world_size,
        text=text,
        storage_options=None,
    )
    batches = training_batches(dataset, column=column, conditioned=conditioned, workers=workers)
    first = next(batches)
    channels, height, width = first[0].shape[1:]
    if height != width:
        raise ValueError(f"this example trains on square latents; {root} holds {height}x{width}")
    unet = build_model(channels, height, widths, conditioned=conditioned)
    model: torch.nn.Module = unet
    empty: torch.Tensor | None = None
    if conditioned:
        assert first[1] is not None
        # The unconditional case: the empty prompt's vector, as the pipeline encodes "" at sampling.
        empty = condition_of(dataset.empty_prompt()).to(target)
        model = TextConditioned(unet, int(first[1].shape[1]), 4 * int(widths[0]))
    model = model.to(target).train()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    logger.info(
        "training on %s: latents %dx%dx%d, %s, %s",
        root,
        channels,
        height,
        width,
        f"text-conditioned (CFG dropout {cfg_dropout:g})" if conditioned else "unconditioned",
        target,
    )
    losses: list[float] = []
    for step, (latents, condition) in enumerate(itertools.chain([first], batches), start=1):
        latents = latents.to(target, non_blocking=True)
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=target)
        noisy = scheduler.add_noise(latents, noise, t)
        if condition is not None and empty is not None:
            condition = condition.to(target, non_blocking=True)
            dropped = torch.rand(condition.shape[0], device=target) < cfg_dropout
            condition = torch.where(dropped[:, None], empty[None, :], condition)
            predicted = model(noisy, t, condition)
        else:
            predicted = model(noisy, t).sample
        loss = torch.nn.functional.mse_loss(predicted, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == steps:
            logger.info("step %d/%d: loss %.4f", step, steps, sum(losses[-log_every:]) / len(losses[-log_every:]))
        if step >= steps:
            break
    if save:
        unet.save_pretrained(save)
        if isinstance(model, TextConditioned):
            torch.save(model.project.state_dict(), os.path.join(save, "condition_projection.pt"))
        logger.info("saved the UNet to %s", save)
    return losses


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a small diffusion UNet on the latents of a latentize output.")
    parser.add_argument("output", help="output root written by latentize encode (local path or fsspec URL)")
    parser.add_argument("--steps", type=int, default=1000, help="optimiser steps (default 1000)")
    parser.add_argument("--batch-size", type=int, default=32, help="latents per step (default 32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    parser.add_argument("--column", default="latent", help="latent column to train on (default latent)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, the noise and the shuffle")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)), help="this process's rank")
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)), help="processes")
    parser.add_argument("--log-every", type=int, default=10, help="steps between loss lines (default 10)")
    parser.add_argument("--save", metavar="DIR", help="save the trained UNet here (save_pretrained)")
    parser.add_argument(
        "--no-text", action="store_true", help="train unconditioned even when the output has caption embeddings"
    )
    parser.add_argument(
        "--cfg-dropout", type=float, default=0.1, help="rate of captions replaced by the empty prompt (default 0.1)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    train(
        args.output,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        workers=args.workers,
        seed=args.seed,
        column=args.column,
        device=args.device,
        rank=args.rank,
        world_size=args.world_size,
        log_every=args.log_every,
        save=args.save,
        text=False if args.no_text else None,
        cfg_dropout=args.cfg_dropout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
