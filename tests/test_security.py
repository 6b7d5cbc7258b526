"""Weights never run code: a pickled ``.bin`` with a payload is refused, not executed."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from latentize.config import load_config
from latentize.encoders import ENCODERS


class _Payload:
    """Unpickling this would create ``path`` (the side effect an attacker wants)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (os.makedirs, (self.path,))


def test_pickled_weights_with_a_payload_are_refused(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    model = tmp_path / "evil-vae"
    model.mkdir()
    (model / "config.json").write_text((tiny_models["kl"] / "config.json").read_text())
    marker = tmp_path / "pwned"
    state = {"encoder.conv_in.weight": torch.zeros(1), "payload": _Payload(str(marker))}
    with open(model / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump(state, f)  # a legacy .bin is a pickle; torch.load(weights_only=True) must refuse it
    cfg = load_config(
        base={"encoder": {"model": str(model)}, "preprocess": {"resolution": 64}, "output": {"path": "x"}}
    )
    spec = ENCODERS.get("kl").inspect(cfg)
    # diffusers wraps torch.load(weights_only=True)'s refusal in an OSError.
    with pytest.raises(OSError, match="Unable to load weights"):
        ENCODERS.get("kl")(config=cfg, spec=spec)
    assert not marker.exists()
