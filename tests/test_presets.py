"""Model zoo: presets against the constants table of docs/encoders.md, preset resolution, the hub
cache path, encoder identity, DC-AE and FLUX.2 parity, the precision policy and torch.compile."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_dc

import latentize
from latentize.config import load_config
from latentize.encoders import ENCODERS
from latentize.encoders.base import resolve_dtype
from latentize.encoders.flux2 import patchify
from latentize.errors import ConfigError, LatentizeError
from latentize.presets import PRESETS

ENCODERS_DOC = Path(__file__).resolve().parents[1] / "docs" / "encoders.md"

# The constants table's family names -> presets that must carry that row's constants.
_ROWS = {
    "SD 1.x / 2.x (sd-vae-ft-mse, sd-vae-ft-ema)": ["sd15", "sd2"],
    "SDXL": ["sdxl", "sdxl-fp16-fix"],
    "SD3 / 3.5": ["sd3"],
    "FLUX.1": ["flux1"],
    "FLUX.2": ["flux2"],
    "Playground v2.5": ["playground-v2.5"],
    "DC-AE f32c32 (Sana 1.0)": ["dc-ae-f32c32-sana"],
    "TAESD / TAESDXL": ["taesd", "taesdxl"],
    "TAESD3 / TAEF1": ["taesd3", "taef1"],
    "TAEF2": ["taef2"],
    "TAESana": ["taesana"],
    "VQGAN f16 (taming)": ["vqgan-f16-1024", "vqgan-f16-16384"],
    "LDM VQ-f4": ["ldm-vq-f4"],
    "LDM VQ-f8": ["ldm-vq-f8"],
    "Qwen-Image": ["qwen-image"],
    "Wan 2.1": ["wan2.1"],
    "Wan 2.2": ["wan2.2"],
    "HunyuanImage 2.1": ["hunyuanimage-2.1"],
    "Janus (LlamaGen VQ-16)": ["janus"],
    "Emu3": ["emu3"],
    "Chameleon": ["chameleon"],
}


def _constants_rows() -> dict[str, list[str]]:
    """The rows of the table under docs/encoders.md's "## Constants" heading, by family."""
    lines = ENCODERS_DOC.read_text().splitlines()
    start = lines.index("## Constants")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    rows = {}
    for line in lines[start:end]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in _ROWS:
            rows[cells[0]] = cells
    return rows


def _number(cell: str) -> float | None:
    match = re.match(r"^[\d.]+", cell)
    return float(match.group()) if match else None


def test_every_preset_matches_the_constants_table() -> None:
    rows = _constants_rows()
    assert set(rows) == set(_ROWS), "docs/encoders.md's constants table changed: update the presets"
    covered = [name for names in _ROWS.values() for name in names]
    assert sorted(covered) == PRESETS.names(), "every preset needs exactly one row in the constants table"
    for family, (_, channels, factor, scale, shift, notes) in rows.items():
        for name in _ROWS[family]:
            preset = PRESETS.get(name)
            assert preset.scaling_factor == _number(scale), name
            assert preset.shift_factor == _number(shift), name
            if family == "FLUX.2":  # "32 (128 after patchify)", "8 (16)": stored after patchify
                assert (preset.latent_channels, preset.downsample) == (128, 16)
            else:  # VQ rows: "256-dim codes" is the code vector size
                assert preset.latent_channels == _number(channels), name
                assert preset.downsample == int(factor), name
            if preset.codebook_size is not None:  # "1024 or 16384 codes"
                assert str(preset.codebook_size) in re.findall(r"\d+", notes), name
            if family.startswith("TAE"):
                assert preset.input_range == "[0, 1]" and preset.deterministic


def test_unknown_preset_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(base={"encoder": {"preset": "sd-xl"}, "output": {"path": "x"}})
    for name in ("sd15", "sdxl", "flux1", "taef2", "vqgan-f16-16384"):
        assert name in str(err.value)


def test_preset_fills_what_is_left_null_and_explicit_keys_win(tiny_models: dict[str, Path]) -> None:
    cfg = load_config(base={"encoder": {"preset": "sd3"}, "output": {"path": "x"}})
    assert (cfg.encoder.type, cfg.encoder.model, cfg.encoder.subfolder) == (
        "kl",
        "stabilityai/stable-diffusion-3-medium-diffusers",
        "vae",
    )
    cfg = load_config(base={"encoder": {"preset": "sdxl", "model": str(tiny_models["kl"])}, "output": {"path": "x"}})
    assert cfg.encoder.model == str(tiny_models["kl"]) and cfg.encoder.subfolder is None
    with pytest.raises(ConfigError, match="taesana_encoder.pth"):
        load_config(base={"encoder": {"preset": "taesana"}, "output": {"path": "x"}})
    # TAEF2's weights ship with latentize: the preset alone finds them.
    taef2 = load_config(base={"encoder": {"preset": "taef2"}, "output": {"path": "x"}})
    packaged = Path(latentize.__file__).parent / "weights" / "taef2" / "taef2_encoder.pth"
    assert (taef2.encoder.type, taef2.encoder.model) == ("tiny", str(packaged.resolve()))
    assert packaged.is_file() and (packaged.parent / "LICENSE").is_file()
    with pytest.raises(ConfigError, match="contradicts"):
        load_config(base={"encoder": {"preset": "sdxl", "type": "vq"}, "output": {"path": "x"}})
    default = load_config(base={"output": {"path": "x"}})
    assert (default.encoder.type, default.encoder.model) == ("kl", "stabilityai/sd-vae-ft-mse")


def test_models_command_prints_every_preset() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "latentize.cli", "models", "--json"], capture_output=True, text=True, check=True
    )
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert set(rows) == set(PRESETS.names())
    assert rows["sdxl"]["scaling_factor"] == 0.13025 and rows["flux1"]["shift_factor"] == 0.1159
    table = subprocess.run(
        [sys.executable, "-m", "latentize.cli", "models"], capture_output=True, text=True, check=True
    ).stdout
    assert all(name in table for name in PRESETS.names())
    assert rows["taef2"]["model"] is None and rows["taef2"]["packaged"].endswith("taef2/taef2_encoder.pth")
    (taef2_line,) = [line for line in table.splitlines() if line.startswith("taef2 ")]
    assert taef2_line.endswith("taef2_encoder.pth (packaged)")


def test_hub_id_loads_from_the_local_cache_offline_with_its_identity(
    tmp_path: Path, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub id whose files are in the Hugging Face cache loads with HF_HUB_OFFLINE set; the
    identity names the resolved commit and the weights' sha256."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-vae"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(tiny_models["kl"], snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    cfg = load_config(
        base={"encoder": {"model": "acme/tiny-vae"}, "preprocess": {"resolution": 64}, "output": {"path": "x"}}
    )
    spec = ENCODERS.get("kl").inspect(cfg)
    import hashlib

    weights = (snapshot / "diffusion_pytorch_model.safetensors").read_bytes()
    assert spec.identity["commit"] == commit
    assert spec.identity["sha256"] == hashlib.sha256(weights).hexdigest()
    assert spec.constants["scaling_factor"] == 0.5


def _pixels(n: int = 3, size: int = 64) -> tuple[np.ndarray, torch.Tensor]:
    import io

    from PIL import Image

    from latentize.demo import photo_samples

    arrays = np.stack(
        [np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB")) for s in photo_samples(resolution=size)[:n]]
    )
    return arrays, torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255 * 2 - 1


def _encode(typ: str, model: Path, **encoder: Any) -> np.ndarray:
    cfg = load_config(
        base={
            "encoder": {"type": typ, "model": str(model), **encoder},
            "preprocess": {"resolution": 64},
            "output": {"path": "x", "dtype": "float32"},
        }
    )
    spec = ENCODERS.get(typ).inspect(cfg)
    pixels, _ = _pixels()
    return ENCODERS.get(typ)(config=cfg, spec=spec).encode(pixels, ["a", "b", "c"]).arrays["latent"]


def test_dc_ae_parity(tmp_path: Path) -> None:
    dc = tiny_dc()
    dc.save_pretrained(tmp_path / "dc")
    got = _encode("dc", tmp_path / "dc")
    with torch.no_grad():
        want = dc.encode(_pixels()[1]).latent * 0.41407
    assert got.shape == (3, 8, 16, 16)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    assert not np.allclose(got, want.numpy() / 0.41407, atol=1e-3)  # the scale is applied


def test_flux2_patchify_and_batchnorm_parity(tmp_path: Path) -> None:
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16, 32, 32), norm_num_groups=8, latent_channels=4).eval()
    vae.bn.running_mean.uniform_(-1, 1)
    vae.bn.running_var.uniform_(0.5, 2.0)
    vae.save_pretrained(tmp_path / "f2")
    got = _encode("flux2", tmp_path / "f2")
    with torch.no_grad():
        mode = vae.encode(_pixels()[1]).latent_dist.mode()
        # What diffusers' Flux2 pipeline does to image latents, written out independently.
        n, c, h, w = mode.shape
        z = mode.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, c * 4, h // 2, w // 2)
        want = (z - vae.bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + 1e-4)
    assert got.shape == (3, 16, 4, 4)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
    assert torch.equal(patchify(mode), z)


def test_auto_dtype_is_float32_on_cpu_and_explicit_dtypes_pass_through() -> None:
    auto = load_config(base={"encoder": {"preset": "sdxl-fp16-fix", "dtype": "auto"}, "output": {"path": "x"}})
    assert resolve_dtype(auto, torch.device("cpu")) == torch.float32
    bf16 = load_config(base={"encoder": {"dtype": "bfloat16"}, "output": {"path": "x"}})
    assert resolve_dtype(bf16, torch.device("cpu")) == torch.bfloat16


def _cfg(**sections: Any) -> Any:
    return load_config(base={"output": {"path": "x"}, **sections})


def test_compile_auto_compiles_on_cuda_for_runs_of_one_size_only() -> None:
    from latentize.encoders.base import wants_compile

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _cfg().encoder.compile == "auto"
    assert wants_compile(_cfg(), cuda)
    assert not wants_compile(_cfg(), cpu)
    buckets = _cfg(preprocess={"resolutions": [256, 512]})
    assert not wants_compile(buckets, cuda)  # every crop size would compile again
    assert wants_compile(_cfg(encoder={"compile": True}), cpu)
    assert not wants_compile(_cfg(encoder={"compile": False}), cuda)
    with pytest.raises(ConfigError, match="encoder.compile"):
        _cfg(encoder={"compile": "always"})


def test_groupnorm_models_stay_nchw_on_cuda_and_others_are_channels_last() -> None:
    from latentize.encoders.base import _memory_format

    with_groupnorm = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(4, 8))
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    assert _memory_format(with_groupnorm, torch.device("cuda")) == torch.contiguous_format
    assert _memory_format(plain, torch.device("cuda")) == torch.channels_last
    assert _memory_format(with_groupnorm, torch.device("cpu")) == torch.channels_last


class _BrokenCompile(torch.nn.Module):
    """Stands in for a compiled encoder network whose compilation fails at the first call."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("BackendCompilerFailed: no kernel for this op")


def _broken_compile_encoder(model: Path, setting: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    from latentize.encoders.base import TorchEncoder

    def broken(self: TorchEncoder, model: torch.nn.Module) -> torch.nn.Module:
        self._compiled = True
        shallow = __import__("copy").copy(model)
        shallow._modules = dict(model._modules, encoder=_BrokenCompile())
        return shallow

    monkeypatch.setattr(TorchEncoder, "_compile", broken)
    # The CPU never compiles under auto: force the decision, keep the setting's fallback rule.
    monkeypatch.setattr("latentize.encoders.base.wants_compile", lambda config, device: True)
    cfg = load_config(
        base={
            "encoder": {"type": "kl", "model": str(model), "compile": setting},
            "preprocess": {"resolution": 64},
            "output": {"path": "x", "dtype": "float32"},
        }
    )
    return ENCODERS.get("kl")(config=cfg, spec=ENCODERS.get("kl").inspect(cfg))


def test_compile_auto_falls_back_to_eager_when_the_first_compiled_call_fails(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    eager = _encode("kl", tiny_models["kl"], compile=False)
    encoder = _broken_compile_encoder(tiny_models["kl"], "auto", monkeypatch)
    pixels, _ = _pixels()
    with caplog.at_level("WARNING", logger="latentize.encoders.base"):
        got = encoder.encode(pixels, ["a", "b", "c"]).arrays["latent"]
    np.testing.assert_array_equal(got, eager)
    assert "torch.compile failed (RuntimeError: BackendCompilerFailed" in caplog.text
    assert encoder.model is encoder._eager and not encoder._compiled


def test_an_explicit_compile_true_that_fails_is_raised(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = _broken_compile_encoder(tiny_models["kl"], True, monkeypatch)
    pixels, _ = _pixels()
    with pytest.raises(RuntimeError, match="BackendCompilerFailed"):
        encoder.encode(pixels, ["a", "b", "c"])


@pytest.mark.slow
def test_compiled_encoder_gives_the_same_latents(tiny_models: dict[str, Path]) -> None:
    eager = _encode("kl", tiny_models["kl"], batch_size=2)
    compiled = _encode("kl", tiny_models["kl"], batch_size=2, compile=True)  # 3 images: last chunk padded
    np.testing.assert_allclose(compiled, eager, atol=1e-4)  # fused kernels reorder float sums


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_rerun_with_other_weights_is_refused(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    from latentize.demo import photo_samples, write_webdataset_shard
    from latentize.pipeline import run

    model = tmp_path / "vae"
    shutil.copytree(tiny_models["kl"], model)
    write_webdataset_shard(str(tmp_path / "in" / "00000.tar"), photo_samples(resolution=64)[:3])
    cfg = load_config(
        base={
            "input": {"urls": str(tmp_path / "in" / "00000.tar")},
            "preprocess": {"resolution": 64},
            "encoder": {"model": str(model)},
            "output": {"path": str(tmp_path / "out")},
        }
    )
    first = run(cfg)
    assert first.samples_ok == 3
    # Same config, same path, other weights (a checkpoint overwritten in place).
    shutil.copy(
        tiny_models["kl_meanstd"] / "diffusion_pytorch_model.safetensors", model / "diffusion_pytorch_model.safetensors"
    )
    with pytest.raises(LatentizeError, match="other weights"):
        run(cfg)
    replaced = run(cfg, overwrite=True)
    assert replaced.samples_ok == 3 and not replaced.nothing_to_do
