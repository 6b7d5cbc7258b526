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

__all__ = ["build_model", "latent_batches", "main", "train"]

logger = logging.getLogger("train_on_latents")


def build_model(channels: int, size: int, widths: Sequence[int] = (64, 128)) -> Any:
    """A class-free, timestep-conditioned ``UNet2DModel`` for (N, channels, size, size) latents.

    One residual layer per level and no attention: small enough to train on a CPU. ``size``
    must be divisible by ``2 ** (len(widths) - 1)``.
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
    )


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
    from torch.utils.data import DataLoader

    # One reader for every epoch: it reads the manifest and the commit markers once, and
    # set_epoch reseeds the shuffles (and the moments draws and flip choices).
    dataset = LatentDataset(
        root,
        batch_size,
        shuffle=True,
        seed=seed,
        rank=rank,
        world_size=world_size,
        columns=[column],
        storage_options=storage_options,
    )
    for epoch in itertools.count():
        dataset.set_epoch(epoch)
        empty = True
        for batch in DataLoader(dataset, batch_size=None, num_workers=workers):
            empty = False
            latents = batch[column]
            if not latents.is_floating_point():
                raise ValueError(f"column {column!r} holds {latents.dtype} values (VQ indices?); use float latents")
            yield latents.float()
        if empty:
            raise ValueError(f"{root}: no latents to train on (rank {rank} of {world_size})")


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
) -> list[float]:
    """Trains the UNet for ``steps`` optimiser steps; returns the loss of every step."""
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batches = latent_batches(
        root, batch_size, column=column, seed=seed, rank=rank, world_size=world_size, workers=workers
    )
    first = next(batches)
    channels, height, width = first.shape[1:]
    if height != width:
        raise ValueError(f"this example trains on square latents; {root} holds {height}x{width}")
    model = build_model(channels, height).to(target).train()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    logger.info("training on %s: latents %dx%dx%d, %s", root, channels, height, width, target)
    losses: list[float] = []
    for step, latents in enumerate(itertools.chain([first], batches), start=1):
        latents = latents.to(target, non_blocking=True)
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=target)
        noisy = scheduler.add_noise(latents, noise, t)
        loss = torch.nn.functional.mse_loss(model(noisy, t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == steps:
            logger.info("step %d/%d: loss %.4f", step, steps, sum(losses[-log_every:]) / len(losses[-log_every:]))
        if step >= steps:
            break
    if save:
        model.save_pretrained(save)
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
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
