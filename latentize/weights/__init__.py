"""Model weights that ship inside the package.

``taef2/``: the TAEF2 encoder and decoder (tiny FLUX.2 autoencoder, MIT; ``taef2/LICENSE`` and
``taef2/README.md`` give the licence and attribution). ``encoder.preset: taef2`` uses them when
``encoder.model`` is null, so the demo and the tests need no download.
"""

from __future__ import annotations

from pathlib import Path

from latentize.errors import LatentizeError

__all__ = ["TAEF2_DECODER", "TAEF2_ENCODER", "packaged_weights"]

_ROOT = Path(__file__).resolve().parent

#: Names of the packaged TAEF2 files, relative to this package.
TAEF2_ENCODER = "taef2/taef2_encoder.pth"
TAEF2_DECODER = "taef2/taef2_decoder.pth"


def packaged_weights(name: str) -> Path:
    """The absolute path of a packaged weights file (``TAEF2_ENCODER``...).

    Raises:
        LatentizeError: the file is not installed (a package built without its package data).
    """
    path = _ROOT / name
    if not path.is_file():
        raise LatentizeError(
            f"packaged weights {name} are missing from {_ROOT}; reinstall latentize (the wheel ships them) "
            "or set encoder.model to the file"
        )
    return path
