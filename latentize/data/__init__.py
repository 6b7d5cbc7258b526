"""Reading latentize outputs for training: a PyTorch ``IterableDataset`` of shuffled batches
(:class:`LatentDataset`) and Ray Datasets of the committed rows (:func:`read_latents` of one data
folder, :func:`read_latent_folders` of each); :func:`read_empty_prompt`: the empty prompt's
embeddings of an output with caption embeddings.

Neither imports Ray at import time; only committed files (those the commit markers list) are read.
"""

from latentize.data.dataset import LatentDataset
from latentize.data.ray_data import read_latent_folders, read_latents
from latentize.data.text import read_empty_prompt
from latentize.data.transforms import draw_latents, draw_seed, flip_choice

__all__ = [
    "LatentDataset",
    "draw_latents",
    "draw_seed",
    "flip_choice",
    "read_empty_prompt",
    "read_latent_folders",
    "read_latents",
]
