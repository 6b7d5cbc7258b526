"""The one normalisation module: every scheme's forward and inverse, on numpy and torch alike,
chosen from the constants the manifest records, and used by the encoders, the QA and the reader."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from latentize.data.transforms import normalizer
from latentize.encoders.normalize import FORMULAS, Normalization, batch_norm_forward, batch_norm_inverse
from latentize.qa.checks import normalization_map

MEAN = [0.3, -0.2, 0.1, 0.05]
STD = [1.5, 0.8, 1.2, 2.0]

CONSTANTS: dict[str, dict[str, Any]] = {
    "shift_scale": {"scaling_factor": 0.3611, "shift_factor": 0.1159, "latents_mean": None, "latents_std": None},
    "latents_mean_std": {"scaling_factor": 0.5, "shift_factor": 0.0, "latents_mean": MEAN, "latents_std": STD},
    "scale": {"scaling_factor": 0.41407},
}


def _raw(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.2, 3.0, (3, 4, 5, 6)).astype(np.float32)


def _by_hand(form: str, z: np.ndarray) -> np.ndarray:
    """The documented formulas, written out here independently of the module."""
    c = CONSTANTS[form]
    if form == "latents_mean_std":
        m = np.asarray(MEAN, np.float32)[:, None, None]
        s = np.asarray(STD, np.float32)[:, None, None]
        return (z - m) * c["scaling_factor"] / s
    if form == "shift_scale":
        return (z - c["shift_factor"]) * c["scaling_factor"]
    return z * c["scaling_factor"]


@pytest.mark.parametrize("form", sorted(CONSTANTS))
def test_forward_is_the_formula_and_inverse_undoes_it_on_numpy_and_torch(form: str) -> None:
    norm = Normalization.from_constants(CONSTANTS[form])
    assert norm is not None and norm.form == form and norm.formula == FORMULAS[form]
    z = _raw()
    stored = norm.forward(z)
    assert isinstance(stored, np.ndarray) and stored.dtype == np.float32
    np.testing.assert_allclose(stored, _by_hand(form, z), rtol=1e-6)
    np.testing.assert_allclose(norm.inverse(stored), z, rtol=1e-5, atol=1e-5)
    # The same map on a torch tensor: same values, a tensor back, per sample (C, h, w) too.
    tensor = norm.forward(torch.from_numpy(z))
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
    np.testing.assert_array_equal(tensor.numpy(), stored)
    np.testing.assert_array_equal(norm.forward(z[0]), stored[0])
    np.testing.assert_allclose(norm.inverse(tensor).numpy(), z, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", sorted(CONSTANTS))
def test_qa_and_reader_maps_agree_with_forward(form: str) -> None:
    norm = Normalization.from_constants(CONSTANTS[form])
    assert norm is not None
    z = _raw(1).astype(np.float64)
    stored = norm.forward(z)
    qa = normalization_map({"constants": CONSTANTS[form]}, channels=4)
    assert qa is not None and qa.form == form
    np.testing.assert_allclose(stored * qa.scale[:, None, None] + qa.offset[:, None, None], z, rtol=1e-9, atol=1e-9)
    offset, scale = normalizer(CONSTANTS[form])
    np.testing.assert_allclose((z - offset) * scale, stored, rtol=1e-6, atol=1e-6)


def test_constants_choose_the_scheme_and_flux2_has_none() -> None:
    assert Normalization.from_constants({"codebook_size": 16384}) is None  # VQ indices
    flux2 = {"patch_size": [2, 2], "batch_norm_eps": 1e-4, "formula": FORMULAS["batch_norm"]}
    assert Normalization.from_constants(flux2) is None
    raw = Normalization.from_constants({"scaling_factor": 1.0, "shift_factor": 0.0})
    assert raw is not None and raw.identity
    assert not Normalization("latents_mean_std", 1.0, latents_mean=(0.0,), latents_std=(1.0,)).identity


def test_batch_norm_forward_and_inverse() -> None:
    rng = np.random.default_rng(2)
    z = rng.normal(size=(2, 8, 3, 3)).astype(np.float32)
    mean = rng.normal(size=8).astype(np.float32)
    var = rng.uniform(0.5, 2.0, 8).astype(np.float32)
    stored = batch_norm_forward(z, mean, var, 1e-4)
    want = (z - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-4)
    np.testing.assert_allclose(stored, want, rtol=1e-6)
    t = batch_norm_forward(torch.from_numpy(z), torch.from_numpy(mean), torch.from_numpy(var), 1e-4)
    np.testing.assert_allclose(t.numpy(), stored, rtol=1e-6)
    np.testing.assert_allclose(batch_norm_inverse(stored, mean, var, 1e-4), z, rtol=1e-5, atol=1e-6)


def test_the_module_imports_no_torch() -> None:
    """The driver's QA checks use it without torch."""
    import subprocess
    import sys

    code = (
        "import sys; import latentize.encoders.normalize, latentize.qa.checks; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
