"""Reading latentize outputs for training: a PyTorch ``IterableDataset`` of shuffled batches
(:class:`LatentDataset`) and a Ray Dataset of the committed rows (:func:`read_latents`).

Neither imports Ray at import time; only committed files (those the commit markers list) are read.
"""

from latentize.data.dataset import LatentDataset
from latentize.data.ray_data import read_latents
from latentize.data.transforms import draw_latents, draw_seed, flip_choice

__all__ = ["LatentDataset", "draw_latents", "draw_seed", "flip_choice", "read_latents"]
