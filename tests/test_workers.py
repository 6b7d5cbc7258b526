"""What the driver and Ray's read, staging and commit workers import: never torch.

Every such worker is a fresh process; webdataset's package imports torch (seconds of CPU and
hundreds of MB each), which a node with a hundred read workers would pay before its first image.
The driver only reads model configs; importing torch and diffusers there cost every run seconds
of start-up beside a starting Ray.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray.cloudpickle
from webdataset.tariterators import base_plus_ext as wds_base_plus_ext

from latentize.config import load_config
from latentize.demo import photo_samples, write_webdataset_shard
from latentize.preprocess import preprocess_block
from latentize.preprocess.buckets import resolve_targets
from latentize.sinks.commit import commit_shard, stage_batch
from latentize.sources.datasource import ShardDatasource
from latentize.tarnames import base_plus_ext, member_key, sample_key

NAMES = [
    "00001.jpg",
    "00001.seg.npy",
    "a/b/00001.latent.npy",
    "dir.with.dots/key.txt",
    "key",
    "dir/key",
    ".hidden",
    "a/.b.c",
    "k.",
    "k..json",
    "./k.jpg",
    "caf\u00e9 photo.JPEG",
]


@pytest.mark.parametrize("name", NAMES)
def test_tar_member_split_is_webdatasets(name: str) -> None:
    assert base_plus_ext(name) == wds_base_plus_ext(name)


AWKWARD_KEYS = ["img.000.v2.jpg", "dir.x/y.z", "a%2Eb", "trailing/", ".hidden", "k.", "caf\u00e9 1.png"]


@pytest.mark.parametrize("key", AWKWARD_KEYS)
def test_member_keys_survive_webdatasets_split(key: str) -> None:
    member = member_key(key)
    assert wds_base_plus_ext(f"{member}.latent.npy") == (member, "latent.npy")
    assert sample_key(member) == key
    assert member_key("000010004") == "000010004" and member_key("a/b_c-d") == "a/b_c-d"


UNPICKLE_AND_READ = """
import json, pickle, sys
read_task, stage, commit = pickle.load(open(sys.argv[1], "rb"))
rows = sum(block.num_rows for block in read_task())
heavy = sorted(m for m in ("torch", "webdataset", "diffusers") if m in sys.modules)
print(json.dumps({"rows": rows, "heavy": heavy}))
"""


def test_read_stage_and_commit_workers_never_import_torch(tmp_path: Path) -> None:
    samples = photo_samples()[:4]
    write_webdataset_shard(str(tmp_path / "00000.tar"), samples)
    cfg = load_config(base={"input": {"urls": str(tmp_path / "00000.tar")}, "output": {"path": str(tmp_path / "o")}})
    transform = functools.partial(
        preprocess_block, config=cfg.preprocess, targets=resolve_targets(cfg.preprocess, factor=8)
    )
    source = ShardDatasource(
        shards=[(str(tmp_path / "00000.tar"), "00000")], fmt="webdataset", config=cfg.input, transform=transform
    )
    # What Ray ships to the workers, pickled as Ray pickles it, opened in a fresh interpreter.
    payload = tmp_path / "tasks.pkl"
    payload.write_bytes(ray.cloudpickle.dumps((source.get_read_tasks(1)[0], stage_batch, commit_shard)))
    out = subprocess.run(
        [sys.executable, "-c", UNPICKLE_AND_READ, str(payload)], check=True, capture_output=True, text=True
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["rows"] == len(samples) + 1  # the images and the end-of-shard sentinel
    assert result["heavy"] == []


PLAN_IN_A_FRESH_DRIVER = """
import json, sys
from latentize.cli import main  # noqa: F401  (what `latentize encode` imports first)
from latentize.config import load_config
from latentize.pipeline import _versions, plan
cfg = load_config(base=json.loads(sys.argv[1]))
p = plan(cfg)
versions = _versions()
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "webdataset", "safetensors") if m in sys.modules)
print(json.dumps({"pending": len(p.pending), "columns": sorted(p.spec.columns), "heavy": heavy, "versions": versions}))
"""


@pytest.mark.parametrize("typ", ["kl", "vq"])
def test_the_driver_plans_a_diffusers_model_without_importing_torch(
    tmp_path: Path, tiny_models: dict[str, Path], typ: str
) -> None:
    write_webdataset_shard(str(tmp_path / "00000.tar"), photo_samples()[:2])
    base = {
        "input": {"urls": str(tmp_path / "*.tar")},
        "output": {"path": str(tmp_path / "o")},
        "encoder": {"model": str(tiny_models[typ]), "type": typ},
        "preprocess": {"resolution": 64},
    }
    out = subprocess.run(
        [sys.executable, "-c", PLAN_IN_A_FRESH_DRIVER, json.dumps(base)], check=True, capture_output=True, text=True
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["pending"] == 1
    assert result["columns"] == (["indices"] if typ == "vq" else ["latent"])
    assert result["heavy"] == []
    import diffusers
    import torch

    # Read from package metadata, they still name the installed builds (a local "+cu130" tag
    # appears in the metadata of PyTorch's own wheels, not in every build's).
    assert result["versions"]["torch"] in (torch.__version__, torch.__version__.split("+")[0])
    assert result["versions"]["diffusers"] == diffusers.__version__


INSPECT_TEXT_IN_A_FRESH_DRIVER = """
import json, sys
from latentize.cli import main  # noqa: F401  (what `latentize encode` imports first)
from latentize.config import load_config
from latentize.encoders.text import inspect_text
spec = inspect_text(load_config(base=json.loads(sys.argv[1])))
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "safetensors", "tokenizers") if m in sys.modules)
print(json.dumps({"columns": sorted(spec.columns), "heavy": heavy}))
"""


@pytest.mark.parametrize("preset", ["sdxl", "sana"])
def test_the_driver_inspects_text_encoders_without_importing_torch(
    tmp_path: Path, tiny_text_pipelines: dict[str, Path], preset: str
) -> None:
    base = {
        "output": {"path": str(tmp_path / "o")},
        "text": {"preset": preset, "model": str(tiny_text_pipelines[preset])},
    }
    out = subprocess.run(
        [sys.executable, "-c", INSPECT_TEXT_IN_A_FRESH_DRIVER, json.dumps(base)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["heavy"] == []
    want = ["pooled_prompt_embeds", "prompt_embeds"] if preset == "sdxl" else ["prompt_attention_mask", "prompt_embeds"]
    assert result["columns"] == want


@pytest.mark.parametrize(("preset", "column"), [("wan2.2", "latent"), ("janus", "indices")])
def test_the_driver_plans_the_new_zoo_without_importing_torch_or_transformers(
    tmp_path: Path, zoo_models: dict[str, Path], preset: str, column: str
) -> None:
    """A Wan VAE (diffusers) and a tokenizer inside a full transformers model (sharded): the
    driver reads their configs, shard index and processor config only."""
    write_webdataset_shard(str(tmp_path / "00000.tar"), photo_samples()[:2])
    base = {
        "input": {"urls": str(tmp_path / "*.tar")},
        "output": {"path": str(tmp_path / "o")},
        "encoder": {
            "model": str(zoo_models[preset]),
            "preset": preset,
            "subfolder": "vae" if preset == "wan2.2" else None,
        },
        "preprocess": {"resolution": 64},
    }
    out = subprocess.run(
        [sys.executable, "-c", PLAN_IN_A_FRESH_DRIVER, json.dumps(base)], check=True, capture_output=True, text=True
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["pending"] == 1 and result["columns"] == [column]
    assert result["heavy"] == []
