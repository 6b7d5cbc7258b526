"""Single-file ldm / taming checkpoints (latentize.encoders.checkpoints).

The checkpoints are built here from random diffusers models by renaming their tensors to the
original ldm / taming naming with a mapping written in this file (independent of the loader's
code), so a loaded model must reproduce the diffusers model's latents / indices exactly.
"""

from __future__ import annotations

import io
import pickle
import re
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from latentize.config import Config
from latentize.encoders import checkpoints
from latentize.encoders.checkpoints import LdmVaeLoader, TamingVqLoader, infer_norm_groups
from latentize.encoders.files import FILE_LOADERS, load_state_dict
from latentize.errors import LatentizeError

# --- diffusers -> ldm/taming naming, written independently of the loader --------------------

_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _attn(prefix: str, rest: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    for new, old in _ATTN.items():
        if rest.startswith(new + "."):
            param = rest[len(new) + 1 :]
            if old != "norm" and param == "weight":
                value = value[:, :, None, None]  # ldm/taming attention projections are 1x1 convs
            return f"{prefix}.{old}.{param}", value
    raise AssertionError(rest)


def _resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def to_ldm(state: dict[str, torch.Tensor], n_levels: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL / VQModel state dict -> original ldm / taming names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        v = value.clone()
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            key = f"encoder.down.{m[1]}.block.{m[2]}.{_resnet(m[3])}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            key = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            key, v = _attn(f"encoder.down.{m[1]}.attn.{m[2]}", m[3], v)
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            key = f"decoder.up.{n_levels - 1 - int(m[1])}.block.{m[2]}.{_resnet(m[3])}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            key = f"decoder.up.{n_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            key, v = _attn(f"decoder.up.{n_levels - 1 - int(m[1])}.attn.{m[2]}", m[3], v)
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            key = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_resnet(m[3])}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
            key, v = _attn(f"{m[1]}.mid.attn_1", m[2], v)
        elif m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
            key = f"{m[1]}.norm_out.{m[2]}"
        elif not re.fullmatch(
            r"(encoder|decoder)\.conv_(in|out)\.\w+|(post_)?quant_conv\.\w+|quantize\.embedding\.weight", key
        ):
            raise AssertionError(f"unmapped diffusers key {key}")
        out[key] = v
    return out


# --- fixtures -------------------------------------------------------------------------------


def _config(**encoder: Any) -> Config:
    config = Config()
    for k, v in encoder.items():
        setattr(config.encoder, k, v)
    return config


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Real photographs, 64x64, as the encoders see them: (N, 3, 64, 64) in [-1, 1]."""
    from latentize.demo import photo_samples

    arrays = [np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB")) for s in photo_samples(resolution=64)]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    assert x.shape[0] >= 4 and x.shape[1:] == (3, 64, 64)
    return x * 2 - 1


@pytest.fixture(scope="module")
def kl_model(tiny_models: dict[str, Path]) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_models["kl"]).eval()


@pytest.fixture(scope="module")
def kl_ldm(kl_model: Any) -> dict[str, torch.Tensor]:
    state = to_ldm(kl_model.state_dict(), len(kl_model.config.block_out_channels))
    # Hand-picked original names: the mapping above really produces ldm naming.
    for key in (
        "encoder.down.0.block.0.norm1.weight",
        "encoder.mid.attn_1.q.weight",
        "quant_conv.weight",
        "encoder.norm_out.weight",
        "decoder.up.3.block.1.conv2.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "decoder.up.1.upsample.conv.weight",
        "encoder.down.0.downsample.conv.weight",
    ):
        assert key in state, key
    assert state["encoder.mid.attn_1.q.weight"].ndim == 4
    return state


def _kl_out(model: Any, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(x).latent_dist.parameters  # mean ‖ logvar


def _assert_kl_geometry(cfg: dict[str, Any]) -> None:
    assert cfg["block_out_channels"] == [8, 16, 32, 32]
    assert cfg["layers_per_block"] == 1
    assert cfg["latent_channels"] == 4
    assert (cfg["in_channels"], cfg["out_channels"]) == (3, 3)
    assert cfg["norm_num_groups"] == 8
    assert cfg["down_block_types"] == ["DownEncoderBlock2D"] * 4
    assert cfg["up_block_types"] == ["UpDecoderBlock2D"] * 4
    assert cfg["mid_block_add_attention"] is True
    assert cfg["use_quant_conv"] is True


# --- KL -------------------------------------------------------------------------------------


def test_registered() -> None:
    assert isinstance(FILE_LOADERS.get("kl"), LdmVaeLoader)
    assert isinstance(FILE_LOADERS.get("vq"), TamingVqLoader)


def test_ldm_safetensors_vae(
    tmp_path: Path, kl_model: Any, kl_ldm: dict[str, torch.Tensor], photos: torch.Tensor
) -> None:
    path = tmp_path / "vae.safetensors"
    save_file(kl_ldm, str(path))
    loader = LdmVaeLoader()
    cfg = loader.read_config(path, _config())
    _assert_kl_geometry(cfg)
    # No config value, no YAML: the constants are left to the caller.
    assert "scaling_factor" not in cfg and "shift_factor" not in cfg
    model = loader.load(path, _config(), cfg)
    assert not model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert torch.equal(_kl_out(model, photos), _kl_out(kl_model, photos))
    # the decoder was loaded too
    assert torch.equal(model.decoder.conv_out.weight, kl_model.decoder.conv_out.weight)


def test_full_sd_ckpt(tmp_path: Path, kl_model: Any, kl_ldm: dict[str, torch.Tensor], photos: torch.Tensor) -> None:
    state = {"first_stage_model." + k: v for k, v in kl_ldm.items()}
    state["model.diffusion_model.dummy"] = torch.randn(3, 3)
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(4)
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": state, "global_step": 7}, path)
    loader = LdmVaeLoader()
    cfg = loader.read_config(path, _config(scaling_factor=0.3, shift_factor=0.05))
    _assert_kl_geometry(cfg)
    assert (cfg["scaling_factor"], cfg["shift_factor"]) == (0.3, 0.05)
    model = loader.load(path, _config(), cfg)
    assert torch.equal(_kl_out(model, photos), _kl_out(kl_model, photos))


def test_diffusers_named_file_and_encoder_only(tmp_path: Path, kl_model: Any, photos: torch.Tensor) -> None:
    loader = LdmVaeLoader()
    full = tmp_path / "diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in kl_model.state_dict().items()}, str(full))
    cfg = loader.read_config(full, _config())
    _assert_kl_geometry(cfg)
    assert torch.equal(_kl_out(loader.load(full, _config(), cfg), photos), _kl_out(kl_model, photos))

    enc_only = tmp_path / "encoder_only.pt"
    ldm = to_ldm(kl_model.state_dict(), 4)
    torch.save({k: v for k, v in ldm.items() if not k.startswith(("decoder.", "post_quant_conv."))}, enc_only)
    cfg = loader.read_config(enc_only, _config())
    assert cfg["block_out_channels"] == [8, 16, 32, 32] and cfg["latent_channels"] == 4
    model = loader.load(enc_only, _config(), cfg)
    assert torch.equal(_kl_out(model, photos), _kl_out(kl_model, photos))
    with pytest.raises(LatentizeError, match="no decoder"):
        model.decode(torch.zeros(1, 4, 8, 8))


def _sd_yaml(path: Path, **dd: Any) -> Path:
    ddconfig = {
        "double_z": True,
        "z_channels": 4,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 8,
        "ch_mult": [1, 2, 4, 4],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
        **dd,
    }
    data = {
        "model": {
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "scale_factor": 0.18215,
                "first_stage_config": {
                    "target": "ldm.models.autoencoder.AutoencoderKL",
                    "params": {"embed_dim": 4, "ddconfig": ddconfig},
                },
            },
        }
    }
    path.write_text(yaml.safe_dump(data))
    return path


def test_kl_yaml(tmp_path: Path, kl_ldm: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "model.safetensors"
    save_file(kl_ldm, str(path))
    loader = LdmVaeLoader()
    # A full-LDM YAML beside the checkpoint supplies scale_factor; config values still win.
    _sd_yaml(tmp_path / "model.yaml")
    cfg = loader.read_config(path, _config())
    _assert_kl_geometry(cfg)
    assert cfg["scaling_factor"] == 0.18215 and "shift_factor" not in cfg
    assert cfg["sample_size"] == 256
    assert loader.read_config(path, _config(scaling_factor=0.5))["scaling_factor"] == 0.5
    # norm_num_groups in the ddconfig overrides the inference
    yml = _sd_yaml(tmp_path / "groups.yaml", norm_num_groups=4)
    assert loader.read_config(path, _config(original_config=str(yml)))["norm_num_groups"] == 4
    # A YAML that does not describe the weights is refused, naming the field.
    bad = _sd_yaml(tmp_path / "bad.yaml", ch=16)
    with pytest.raises(
        LatentizeError, match="block_out_channels: YAML \\[16, 32, 64, 64\\] vs weights \\[8, 16, 32, 32\\]"
    ):
        loader.read_config(path, _config(original_config=str(bad)))
    with pytest.raises(LatentizeError, match="does not exist"):
        loader.read_config(path, _config(original_config=str(tmp_path / "missing.yaml")))


def test_norm_groups_inference() -> None:
    assert infer_norm_groups([128, 256, 512, 512]) == 32  # every SD / SDXL / FLUX VAE
    assert infer_norm_groups([8, 16, 32, 32]) == 8
    assert infer_norm_groups([48, 96]) == 24
    assert infer_norm_groups([20, 40]) == 20


# --- VQ -------------------------------------------------------------------------------------

VQ_DDCONFIG = {
    "double_z": False,
    "z_channels": 4,
    "resolution": 64,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 8,
    "ch_mult": [1, 2, 2, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [8],
    "dropout": 0.0,
}


def _vq_yaml(path: Path, *, embed_dim: int = 3, n_embed: int = 300, **dd: Any) -> Path:
    data = {
        "model": {
            "base_learning_rate": 4.5e-6,
            "target": "taming.models.vqgan.VQModel",
            "params": {
                "embed_dim": embed_dim,
                "n_embed": n_embed,
                "ddconfig": {**VQ_DDCONFIG, **dd},
                "lossconfig": {
                    "target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                    "params": {"disc_start": 250001, "disc_weight": 0.8},
                },
            },
        }
    }
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def vq_model() -> Any:
    """A diffusers VQModel built as the taming ddconfig above describes: levels at 64, 32, 16, 8
    px, attention at 8 px = encoder level 3 = decoder up_blocks[0]."""
    from diffusers import VQModel

    torch.manual_seed(1)
    model = VQModel(
        block_out_channels=(8, 16, 16, 32),
        down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
        up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
        layers_per_block=2,
        latent_channels=4,
        vq_embed_dim=3,
        num_vq_embeddings=300,
        norm_num_groups=8,
    ).eval()
    # A codebook on the scale of the pre-quantisation latents, so the indices vary.
    with torch.no_grad():
        model.quantize.embedding.weight.normal_(0, 0.5)
    return model


class _FakeModelCheckpoint:  # pickled as pytorch_lightning's class, which is not installed
    pass


def _taming_ckpt(path: Path, state: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> Path:
    junk = {
        "loss.logvar": torch.zeros(()),
        "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4),
        "loss.perceptual_loss.lin0.model.1.weight": torch.randn(1, 64, 1, 1),
    }
    name = "pytorch_lightning.callbacks.model_checkpoint"
    with monkeypatch.context() as m:
        for mod in ("pytorch_lightning", "pytorch_lightning.callbacks", name):
            m.setitem(sys.modules, mod, types.ModuleType(mod))
        _FakeModelCheckpoint.__module__ = name
        _FakeModelCheckpoint.__qualname__ = _FakeModelCheckpoint.__name__ = "ModelCheckpoint"
        sys.modules[name].ModelCheckpoint = _FakeModelCheckpoint
        torch.save(
            {
                "epoch": 3,
                "global_step": 1000,
                "pytorch-lightning_version": "1.0.8",
                "callbacks": {_FakeModelCheckpoint: {"best_model_score": torch.tensor(0.5)}},
                "optimizer_states": [{"state": {}}],
                "lr_schedulers": [],
                "state_dict": {**state, **junk},
            },
            path,
        )
    return path


def _indices(model: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        h = model.encode(x).latents
        return h, model.quantize(h)[2][2]


def test_taming_vqgan(tmp_path: Path, vq_model: Any, photos: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    state = to_ldm(vq_model.state_dict(), 4)
    for key in (
        "encoder.down.3.attn.0.q.weight",
        "encoder.down.3.attn.1.proj_out.weight",
        "decoder.up.3.attn.2.k.weight",
        "encoder.mid.attn_1.v.weight",
        "quantize.embedding.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "decoder.up.3.block.2.conv1.weight",
    ):
        assert key in state, key
    assert not any(".attn." in k for k in state if k.startswith(("encoder.down.0", "decoder.up.0")))
    ckpt = _taming_ckpt(tmp_path / "last.ckpt", state, monkeypatch)
    _vq_yaml(tmp_path / "last.yaml")  # found beside the checkpoint
    # Plain weights_only loading refuses the Lightning bookkeeping class ...
    with pytest.raises(pickle.UnpicklingError, match="pytorch_lightning"):
        load_state_dict(ckpt)
    loader = TamingVqLoader()
    cfg = loader.read_config(ckpt, _config(type="vq"))
    assert cfg["block_out_channels"] == [8, 16, 16, 32]
    assert cfg["layers_per_block"] == 2
    assert cfg["down_block_types"] == ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]
    assert cfg["up_block_types"] == ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3
    assert (cfg["latent_channels"], cfg["vq_embed_dim"], cfg["num_vq_embeddings"]) == (4, 3, 300)
    assert cfg["norm_num_groups"] == 8 and cfg["mid_block_add_attention"] is True
    # ... the loader stubs it (never importing it) and keeps only tensors.
    model = loader.load(ckpt, _config(type="vq"), cfg)
    assert "pytorch_lightning" not in sys.modules
    h0, i0 = _indices(vq_model, photos)
    h1, i1 = _indices(model, photos)
    assert torch.equal(h1, h0)
    assert torch.equal(i1, i0)
    assert len(torch.unique(i0)) > 10  # the comparison is not between constant index maps


def test_taming_vq_without_level_attention(tmp_path: Path, tiny_models: dict[str, Path], photos: torch.Tensor) -> None:
    from diffusers import VQModel

    original = VQModel.from_pretrained(tiny_models["vq"]).eval()
    path = tmp_path / "vq.ckpt"
    torch.save({"state_dict": to_ldm(original.state_dict(), 4)}, path)
    yml = _vq_yaml(
        tmp_path / "elsewhere.yaml", embed_dim=4, ch_mult=[1, 2, 4, 4], num_res_blocks=1, attn_resolutions=[]
    )
    config = _config(type="vq", original_config=str(yml))
    cfg = TamingVqLoader().read_config(path, config)
    assert cfg["down_block_types"] == ["DownEncoderBlock2D"] * 4 and cfg["num_vq_embeddings"] == 300
    model = TamingVqLoader().load(path, config, cfg)
    assert torch.equal(_indices(model, photos)[0], _indices(original, photos)[0])
    assert torch.equal(_indices(model, photos)[1], _indices(original, photos)[1])


def test_vq_yaml_required_and_checked(tmp_path: Path, vq_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = _taming_ckpt(tmp_path / "model.ckpt", to_ldm(vq_model.state_dict(), 4), monkeypatch)
    loader = TamingVqLoader()
    with pytest.raises(LatentizeError, match="encoder.original_config"):
        loader.read_config(ckpt, _config(type="vq"))
    wrong = _vq_yaml(tmp_path / "wrong.yaml", n_embed=1024)
    with pytest.raises(LatentizeError, match="n_embed: YAML 1024 vs weights 300"):
        loader.read_config(ckpt, _config(type="vq", original_config=str(wrong)))
    wrong = _vq_yaml(tmp_path / "wrong_attn.yaml", attn_resolutions=[16])
    with pytest.raises(LatentizeError, match="encoder attention levels"):
        loader.read_config(ckpt, _config(type="vq", original_config=str(wrong)))
    remap = tmp_path / "remap.yaml"
    data = yaml.safe_load(_vq_yaml(remap).read_text())
    data["model"]["params"]["remap"] = "data/imagenet_codes.npy"
    remap.write_text(yaml.safe_dump(data))
    with pytest.raises(LatentizeError, match="remap"):
        loader.read_config(ckpt, _config(type="vq", original_config=str(remap)))
    # A VQ checkpoint given as kl, and a KL one given as vq, say which type to use.
    _vq_yaml(tmp_path / "model.yaml")
    with pytest.raises(LatentizeError, match="'vq'"):
        LdmVaeLoader().read_config(ckpt, _config())


# --- wrong layouts and unsafe pickles -----------------------------------------------------------


def test_wrong_layouts(tmp_path: Path, kl_ldm: dict[str, torch.Tensor]) -> None:
    unknown = tmp_path / "unknown.safetensors"
    save_file({"net.0.weight": torch.zeros(2, 2), "net.0.bias": torch.zeros(2)}, str(unknown))
    for loader in (LdmVaeLoader(), TamingVqLoader()):
        with pytest.raises(LatentizeError, match="net.0.weight"):
            loader.read_config(unknown, _config(original_config=str(_vq_yaml(tmp_path / "x.yaml"))))

    # An extra tensor inside a block: renamed by the converter, refused by the strict load.
    extra = tmp_path / "extra.safetensors"
    save_file({**kl_ldm, "encoder.down.0.block.0.extra.weight": torch.zeros(3)}, str(extra))
    cfg = LdmVaeLoader().read_config(extra, _config())
    with pytest.raises(LatentizeError, match="extra.weight"):
        LdmVaeLoader().load(extra, _config(), cfg)

    # A tensor the converter silently drops is still noticed and named.
    dropped = tmp_path / "dropped.safetensors"
    save_file({**kl_ldm, "encoder.weird.weight": torch.zeros(3)}, str(dropped))
    cfg = LdmVaeLoader().read_config(dropped, _config())
    with pytest.raises(LatentizeError, match="encoder.weird.weight"):
        LdmVaeLoader().load(dropped, _config(), cfg)

    # A missing tensor.
    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in kl_ldm.items() if k != "encoder.mid.block_1.conv1.weight"}, str(missing))
    cfg = LdmVaeLoader().read_config(missing, _config())
    with pytest.raises(LatentizeError, match="mid_block.resnets.0.conv1.weight"):
        LdmVaeLoader().load(missing, _config(), cfg)

    # Not a checkpoint at all.
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"<html>not found</html>")
    with pytest.raises(LatentizeError, match="garbage.ckpt"):
        LdmVaeLoader().read_config(garbage, _config())


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_code_payload_is_refused(tmp_path: Path, kl_ldm: dict[str, torch.Tensor]) -> None:
    # Control: the payload is live under a plain unpickler.
    control_marker = tmp_path / "control_ran"
    control = tmp_path / "control.ckpt"
    torch.save({"state_dict": kl_ldm, "hook": _Payload(control_marker)}, control)
    torch.load(control, weights_only=False)
    assert control_marker.read_text() == "pwned"

    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": kl_ldm, "hook": _Payload(marker)}, evil)
    with pytest.raises(pickle.UnpicklingError):
        load_state_dict(evil)
    for call in (
        lambda: LdmVaeLoader().read_config(evil, _config()),
        lambda: LdmVaeLoader().load(evil, _config(), {}),
        lambda: checkpoints.read_checkpoint(evil, mmap=True),
    ):
        with pytest.raises(LatentizeError, match="builtins.exec"):
            call()
    assert not marker.exists()

    # The legacy (pre-zip) pickle format is refused as well.
    legacy = tmp_path / "legacy.pt"
    torch.save({"state_dict": kl_ldm, "hook": _Payload(marker)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(LatentizeError, match="Unsupported global: GLOBAL exec"):
        LdmVaeLoader().read_config(legacy, _config())
    with pytest.raises(LatentizeError, match="refused"):
        LdmVaeLoader().load(legacy, _config(), {})
    assert not marker.exists()
