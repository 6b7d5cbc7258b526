"""Single-file weights (``encoder.model`` pointing at a ``.safetensors``/``.ckpt``/``.pth`` file).

Hub ids and diffusers folders load through diffusers' ``from_pretrained``; a single file needs
a loader that knows its naming (ldm / taming / the original TAESD ``nn.Sequential``) and turns
it into the diffusers-style module the encoder runs. Loaders are registered per encoder type.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from latentize.config import Config
from latentize.registry import Registry

if TYPE_CHECKING:
    import torch

__all__ = ["FILE_LOADERS", "FileLoader", "SINGLE_FILE_SUFFIXES", "is_single_file", "load_state_dict"]

#: Suffixes that mark ``encoder.model`` as a single weights file.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class FileLoader(Protocol):
    """Reads one weights file for one encoder type.

    ``read_config`` runs on the driver and must be cheap where the format allows (a safetensors
    header); ``load`` runs in each actor and returns the module in float32 on the CPU.
    """

    def read_config(self, path: Path, config: Config) -> dict[str, Any]:
        """A diffusers-style config of the model in ``path`` (geometry and constants)."""
        ...

    def load(self, path: Path, config: Config, model_config: dict[str, Any]) -> torch.nn.Module:
        """The model with the file's weights loaded (strictly: no key missing or unexpected)."""
        ...


#: Single-file loaders by ``encoder.type``.
FILE_LOADERS: Registry[FileLoader] = Registry("single-file loader", config_key="encoder.type")


def is_single_file(model: str) -> bool:
    """True when ``model`` names an existing file with a weights suffix."""
    path = Path(model).expanduser()
    return path.suffix.lower() in SINGLE_FILE_SUFFIXES and path.is_file()


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file without ever running pickled code.

    safetensors files are read as such; everything else goes through
    ``torch.load(weights_only=True)``. Lightning/ldm checkpoints nest the weights under
    ``state_dict``; that level is removed.
    """
    import torch

    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    data = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
