"""Shared fixtures: tiny random diffusers models and text pipelines, one local Ray per session, a
moto S3 server.

Models are real diffusers classes with small widths, saved with ``save_pretrained`` so the real
loading paths run, and given non-default constants so a forgotten shift or scale fails parity.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Loopback test clusters: Ray >= 2.59 would otherwise require token auth for `ray start`.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Never join a cluster that `ray start` runs on this machine (someone else's, or a RAY_ADDRESS
# left in the shell): the session's Ray, and every run or QA a test starts in a subprocess,
# start a local Ray of their own. Tests that use a cluster of their own give its address.
os.environ["RAY_ADDRESS"] = "local"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

S3_BUCKET = "latentize-test"

#: Constants of the tiny KL model; deliberately unlike any real VAE's.
KL_SCALE = 0.5
KL_SHIFT = 0.1
KL_MEAN = [0.3, -0.2, 0.1, 0.05]
KL_STD = [1.5, 0.8, 1.2, 2.0]
VQ_CODES = 300

_ARCH = {
    "block_out_channels": (8, 16, 32, 32),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "norm_num_groups": 8,
    "latent_channels": 4,
}


def build_models(root: Path) -> dict[str, Path]:
    """Saves the tiny models under ``root``; returns name -> folder."""
    import torch
    from diffusers import AutoencoderKL, VQModel

    torch.manual_seed(0)
    paths = {name: root / name for name in ("kl", "kl_meanstd", "vq")}
    AutoencoderKL(**_ARCH, scaling_factor=KL_SCALE, shift_factor=KL_SHIFT).save_pretrained(paths["kl"])
    AutoencoderKL(**_ARCH, scaling_factor=KL_SCALE, latents_mean=KL_MEAN, latents_std=KL_STD).save_pretrained(
        paths["kl_meanstd"]
    )
    VQModel(**_ARCH, num_vq_embeddings=VQ_CODES, vq_embed_dim=4).save_pretrained(paths["vq"])
    return paths


def tiny_dc() -> Any:
    """A tiny random ``AutoencoderDC`` (8 latent channels, f4) with Sana's scaling factor."""
    import torch
    from diffusers import AutoencoderDC

    torch.manual_seed(0)
    return AutoencoderDC(
        latent_channels=8,
        encoder_block_out_channels=(8, 16, 16),
        decoder_block_out_channels=(8, 16, 16),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        encoder_qkv_multiscales=((), (), ()),
        decoder_qkv_multiscales=((), (), ()),
        attention_head_dim=8,
        scaling_factor=0.41407,
    ).eval()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("models"))


#: Processor constants of the tiny tokenizers: the released Janus-Pro and Emu3 repos' (unlike
#: their processor classes' CLIP defaults, so a config that is not read fails parity) and
#: Chameleon's.
ZOO_PROCESSORS: dict[str, dict[str, Any]] = {
    "janus": {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255},
    "emu3": {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255},
    "chameleon": {"image_mean": [1.0, 1.0, 1.0], "image_std": [1.0, 1.0, 1.0], "rescale_factor": 0.0078},
}
#: HunyuanImage's tiny model's scaling factor (the released one is 0.75289).
HY_SCALE = 0.6
TOKENS = 64

_TEXT = {
    "vocab_size": 100,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}


def build_zoo(root: Path) -> dict[str, Path]:
    """The 2026 zoo's tiny random models, saved as real model folders: the diffusers VAEs (their
    ``vae`` subfolder, as the released pipelines are laid out) and the full multimodal models of
    the tokenizers (text model, vision tower and VQ model; Janus's in shards) with their
    processors' ``preprocessor_config.json``. Returns preset name -> folder."""
    import torch
    import transformers
    from diffusers import AutoencoderKLHunyuanImage, AutoencoderKLQwenImage, AutoencoderKLWan

    torch.manual_seed(0)
    paths = {name: root / name for name in ("qwen-image", "wan2.1", "wan2.2", "hunyuanimage-2.1")}
    stats = {"latents_mean": KL_MEAN, "latents_std": KL_STD}
    AutoencoderKLQwenImage(base_dim=8, z_dim=4, **stats).save_pretrained(paths["qwen-image"] / "vae")
    AutoencoderKLWan(base_dim=8, z_dim=4, **stats).save_pretrained(paths["wan2.1"] / "vae")
    wan22 = {"is_residual": True, "in_channels": 12, "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16}
    AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=4, **wan22, **stats).save_pretrained(paths["wan2.2"] / "vae")
    AutoencoderKLHunyuanImage(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        spatial_compression_ratio=8,
        sample_size=64,
        scaling_factor=HY_SCALE,
    ).save_pretrained(paths["hunyuanimage-2.1"] / "vae")

    janus = transformers.JanusConfig(
        text_config=transformers.LlamaConfig(**_TEXT),
        vision_config=transformers.JanusVisionConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
            intermediate_size=32,
            projection_dim=16,
        ),  # fmt: skip
        vq_config={
            "embed_dim": 4,
            "num_embeddings": TOKENS,
            "latent_channels": 32,
            "base_channels": 32,
            "channel_multiplier": [1, 1, 2],
            "num_res_blocks": 1,
            "projection_dim": 16,
            "image_token_embed_dim": 16,
        },  # fmt: skip
        image_token_id=5,
    )
    emu3_vocab = {"<image>": 3, "<|image start|>": 4, "<|image end|>": 5, "<|image token|>": 6}
    emu3_vocab.update({f"<|visual token {i:06d}|>": 10 + i for i in range(TOKENS)})
    emu3 = transformers.Emu3Config(
        vq_config={
            "codebook_size": TOKENS,
            "embed_dim": 4,
            "latent_channels": 4,
            "base_channels": 32,
            "channel_multiplier": [1, 2, 2],
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "temporal_downsample_factor": 4,
            "hidden_size": 64,
            "num_attention_heads": 1,
        },  # fmt: skip
        text_config=_TEXT,
        vocabulary_map=emu3_vocab,
    )
    chameleon_vocab = {"<image>": 3, **{f"IMGIMG{chr(65 + i // 26)}{chr(65 + i % 26)}Z": 10 + i for i in range(TOKENS)}}
    chameleon = transformers.ChameleonConfig(
        **_TEXT,
        vocabulary_map=chameleon_vocab,
        vq_config={
            "embed_dim": 4,
            "num_embeddings": TOKENS,
            "latent_channels": 32,
            "resolution": 64,
            "base_channels": 32,
            "channel_multiplier": [1, 2],
            "num_res_blocks": 1,
            "attn_resolutions": None,
        },  # fmt: skip
    )
    for name, config, model_cls, processor_cls, shard in (
        ("janus", janus, "JanusForConditionalGeneration", "JanusImageProcessor", "200KB"),
        ("emu3", emu3, "Emu3ForConditionalGeneration", "Emu3ImageProcessor", None),
        ("chameleon", chameleon, "ChameleonForConditionalGeneration", "ChameleonImageProcessor", None),
    ):
        paths[name] = root / name
        model = getattr(transformers, model_cls)(config).eval()
        model.save_pretrained(paths[name], **({"max_shard_size": shard} if shard else {}))
        getattr(transformers, processor_cls)(**ZOO_PROCESSORS[name]).save_pretrained(paths[name])
    return paths


@pytest.fixture(scope="session")
def zoo_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def tiny_text_pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One diffusers pipeline folder of tiny random text encoders and tokenizers per text preset
    (``tests/text_models.py``)."""
    from text_models import build_text_pipelines

    return build_text_pipelines(tmp_path_factory.mktemp("text_pipelines"))


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the whole session, its own (``address="local"``: never a cluster that
    ``ray start`` runs on this machine); ``num_gpus=1`` is faked so the production
    ``num_gpus=1`` actor request schedules on this GPU-less machine (it runs on CPU)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Makes this process look unconnected to Ray and records every attempt to start or stop
    Ray (``"init"``, ``"shutdown"``) instead of making it."""
    ray = pytest.importorskip("ray")
    calls: list[str] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append("init"))
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: calls.append("shutdown"))
    return calls


@pytest.fixture(scope="session")
def s3_server() -> Iterator[Any]:
    """moto's S3 server on loopback with a bucket; it records every request it answers."""
    pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("s3fs")
    from s3server import CountingS3Server

    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            mp.setenv(name, "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        server = CountingS3Server()
        server.start()
        try:
            boto3.client(
                "s3",
                endpoint_url=server.endpoint,
                region_name="us-east-1",
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
            ).create_bucket(Bucket=S3_BUCKET)
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def s3(s3_server: Any) -> dict[str, Any]:
    """fsspec storage options of a real S3 API (moto's server on loopback) with a bucket."""
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"},
    }
