"""The stand-in for the decoder side of an encoder-only checkpoint.

A module of its own because it subclasses ``torch.nn.Module``: :mod:`latentize.encoders.checkpoints`
is imported on the driver (the file-loader registry), which must not import torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from latentize.errors import LatentizeError

__all__ = ["MissingDecoder"]


class MissingDecoder(torch.nn.Module):
    """Stands in for the decoder side of an encoder-only file; using it is an error."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = str(path)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise LatentizeError(f"encoder.model: {self.path} has no decoder weights; it can encode only")
