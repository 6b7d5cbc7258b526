#!/usr/bin/env python
"""GPU throughput of latentize's SD-VAE encoder path, in images per second.

The encoder is the Stable Diffusion VAE's architecture (diffusers ``AutoencoderKL`` with SD's
configuration) with random weights, saved to a temporary folder and loaded through latentize's
own ``kl`` encoder, at 256² and 512², bfloat16 and float32, eager and ``torch.compile``-d, over a
batch sweep:

(a) ``encoder.encode`` on uint8 (N, H, W, 3) pixels already on the device (or from host memory
    where ``encode`` takes only NumPy arrays), with the bare ``model.encode`` on the same pixels
    beside it, so that the wrapper's overhead shows;
(b) GPU decode (``latentize.preprocess.gpu.preprocess_on_device``) + ``encode`` from real JPEG
    bytes (LAION-like sizes, carried in ``.gpu_data``), and the decode alone;
(c) the whole Ray pipeline (``latentize.pipeline.run``) over WebDataset tar shards, when Ray is
    importable: the whole run's seconds and the encoder actors' busy window.

(q) quality: bf16 against fp32 latents, GPU decode against the CPU path, the OOM halving;
(z) the bare encoders of the model zoo's architectures at 512²;
(k) knobs (``--sections k``): memory layout, cuDNN autotuning and compilation.

Sections run in order of importance, each point only while the time budget (``--budget-s``)
lasts: (k) when asked, bf16 eager 256² (a) and (b), (q), compiled 256², eager 512², (c), (z),
fp32, compiled 512², and the OOM halving last. Every point
is printed as it is measured and the JSON (``--json``; ``$OUT/gpu.json`` when OUT is set, else
``./gpu.json``) is rewritten after each, so a run cut short still leaves its figures.
``--smoke`` runs every section on the CPU with a tiny model at 64² in a minute or two.

On a GPU machine without network (Python 3.12 with CUDA torch, torchvision, pyarrow, pandas,
huggingface_hub, safetensors; no diffusers, Ray or webdataset), from the repository root:

    # here, where pip reaches PyPI (both folders are git-ignored):
    bash bench/gpu_wheels.sh                 # .whl/: diffusers, a slim Ray wheel, ... (~49 MB)
    python bench/gpu.py --make-data .gpu_data  # 160 LAION-like JPEGs in 2 tar shards (~10 MB)

    # there, one call carrying [".whl", ".gpu_data"] (58.8 MB with the 6.9 MB tree: under the
    # 64 MiB a call carries) with timeout_s 540; the JSON is rewritten after every point, so
    # figures survive a timeout. On an H200 (2026-12-04) the machine started in about 30 s and
    # --budget-s 400 ran in 370 s (bench/RESULTS.md, "GPU run"):
    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD &&
    PYTHONUNBUFFERED=1 python3 bench/gpu.py --budget-s 400 --json $OUT/gpu.json 2>&1 | tee $OUT/gpu.log

With ``bash bench/gpu_wheels.sh --split-ray`` (the unmodified Ray wheel in two 40 MB parts,
``.ray1/`` and ``.ray2/``), two calls instead; the second must start while the machine is still
warm (30 s after the first returns), since the first part waits in its /tmp:

    # call 1, carrying [".whl", ".gpu_data", ".ray1"], timeout_s 480: (a) and (b)
    set -o pipefail; cp .ray1/* /tmp/ && python3 -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD &&
    PYTHONUNBUFFERED=1 python3 bench/gpu.py --no-ray --budget-s 360 --json $OUT/gpu_ab.json 2>&1 | tee $OUT/ab.log
    # call 2, carrying [".whl", ".gpu_data", ".ray2"], timeout_s 240: (c) and its (a) reference
    set -o pipefail; cat /tmp/part.00 .ray2/part.01 > /tmp/$(cat /tmp/NAME) &&
    echo "$(cat /tmp/SHA256)  /tmp/$(cat /tmp/NAME)" | sha256sum -c - &&
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl /tmp/ray-*.whl && export PYTHONPATH=/tmp/site:$PWD &&
    PYTHONUNBUFFERED=1 python3 bench/gpu.py --sections c --budget-s 180 --json $OUT/gpu_c.json 2>&1 | tee $OUT/c.log
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import io
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Ray workers start from the driver's environment: they must import this checkout's latentize.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Random weights from a local folder: nothing may try the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

#: Stable Diffusion's VAE (sd-vae-ft-mse and SD 1.x/2.x) as diffusers configures it.
SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
#: The same architecture at a width that a CPU runs in milliseconds (--smoke).
TINY_VAE: dict[str, Any] = {
    **SD_VAE,
    "block_out_channels": (8, 16, 32, 32),
    "layers_per_block": 1,
    "norm_num_groups": 8,
}

#: Targets on one H100 (img/s of (a); ratios of (b) and (c) to (a)).
TARGETS = {"a_256_bf16": 1800.0, "a_512_bf16": 440.0, "b_ratio": 0.9, "c_ratio": 0.8}

_MTIME = 1_704_067_200  # fixed tar member mtime: the same data gives the same shard bytes


def say(text: str) -> None:
    print(text, flush=True)


# -- data -------------------------------------------------------------------------------------


def make_data(folder: Path, *, images: int, shards: int, seed: int = 0) -> list[Path]:
    """Writes ``images`` LAION-like JPEGs (0.04-4 MP, median 0.28 MP) into ``shards`` WebDataset
    tars ``folder/shards/NNNNN.tar`` in img2dataset's layout (``KEY.jpg``, ``KEY.txt``,
    ``KEY.json``), with plain ``tarfile`` (webdataset may be missing where they are read).

    Needs scikit-image and scikit-learn (the photos of :mod:`latentize.demo`).
    """
    from latentize.demo import laion_like_samples

    out = folder / "shards"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    per, extra = divmod(images, shards)
    for shard in range(shards):
        samples = laion_like_samples(per + (shard < extra), seed=seed + shard, shard=shard)
        path = out / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for s in samples:
                members = {"jpg": s.image, "txt": (s.caption or "").encode(), "json": json.dumps(s.meta).encode()}
                for ext, data in members.items():
                    if data is None:
                        continue
                    info = tarfile.TarInfo(f"{s.key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


@dataclasses.dataclass
class JpegSet:
    """Sample keys and JPEG bytes read from the shards, and the shard paths."""

    keys: list[str]
    jpegs: list[bytes]
    shards: list[Path]

    def take(self, n: int, offset: int = 0) -> tuple[list[str], list[bytes]]:
        """``n`` samples from ``offset`` on, cycling through the set."""
        idx = [(offset + i) % len(self.keys) for i in range(n)]
        return [f"{self.keys[i]}_{offset + k}" for k, i in enumerate(idx)], [self.jpegs[i] for i in idx]


def read_data(folder: Path) -> JpegSet:
    shards = sorted((folder / "shards").glob("*.tar"))
    keys, jpegs = [], []
    for path in shards:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".jpg"):
                    f = tar.extractfile(member)
                    if f is not None:
                        keys.append(member.name[: -len(".jpg")])
                        jpegs.append(f.read())
    return JpegSet(keys, jpegs, shards)


# -- measurement ------------------------------------------------------------------------------


class Budget:
    """Seconds left of ``total`` since construction."""

    def __init__(self, total: float) -> None:
        self.total = total
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.total - self.elapsed()


class Report:
    """Every measured point and the run's facts; rewritten as JSON after each point."""

    def __init__(self, path: Path, args: argparse.Namespace, budget: Budget) -> None:
        self.path = path
        self.budget = budget
        self.data: dict[str, Any] = {
            "benchmark": "bench/gpu.py",
            "smoke": bool(args.smoke),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "budget_s": args.budget_s,
            "args": {k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items()},
            "environment": {},
            "model": {},
            "points": [],
            "compile": [],
            "pipeline": None,
            "quality": {"bf16_vs_fp32": [], "nvjpeg_vs_cpu": [], "oom_halving": None},
            "ratios": {},
            "targets": {},
            # The two sizes measured: 256² and 512², or the smoke run's stand-ins for them.
            "resolutions": list(args.res),
            "skipped": [],
            "errors": [],
        }

    def add(self, point: dict[str, Any]) -> None:
        self.data["points"].append(point)
        say(format_point(point))
        self.save()

    def skip(self, what: str, why: str) -> None:
        self.data["skipped"].append({"what": what, "why": why})
        say(f"skipped: {what}: {why}")
        self.save()

    def error(self, what: str, exc: BaseException) -> None:
        self.data["errors"].append({"what": what, "error": f"{type(exc).__name__}: {exc}"})
        say(f"error in {what}: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        sys.stdout.flush()
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.budget.elapsed(), 2)
        self.data["ratios"], self.data["targets"] = ratios(self.data)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


def label(p: dict[str, Any]) -> str:
    """``section:path res dtype eager|compiled b=batch`` of a point."""
    mode = "compiled" if p["compiled"] else "eager"
    return f"{p['section']}:{p['path']} {p['res']} {p['dtype']} {mode} b={p['batch']}"


def format_point(p: dict[str, Any]) -> str:
    mode = "compiled" if p["compiled"] else "eager"
    head = f"({p['section']}) {p['res']:>4}² {p['dtype']:<8} {mode:<8} b={p['batch']:<4} {p['path']:<13}"
    if p["status"] != "ok":
        return f"{head} {p['status']}"
    extra = f"  ({p['images']} img, median {p['seconds']:.3f} s of {len(p['seconds_all'])})"
    for key in ("reencoded_fp32", "errors", "cpu_fallback"):
        if p.get(key):
            extra += f" {key}={p[key]}"
    return f"{head} {p['img_per_s']:>9.1f} img/s{extra}"


def timed(fn: Callable[[], Any], sync: Callable[[], None], *, warmup: int, repeats: int) -> tuple[float, list[float]]:
    """Median wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls; the
    device is synchronised before and after each timed call."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


@dataclasses.dataclass
class Bench:
    """What every section shares."""

    args: argparse.Namespace
    report: Report
    budget: Budget
    device: torch.device
    model_dir: Path
    work: Path
    data: JpegSet | None = None
    data_why: str = ""
    #: Whether ``TorchEncoder.encode`` takes a torch tensor on the device (None: not known yet).
    encode_takes_device_tensor: bool | None = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def repeats(self) -> int:
        return 2 if self.args.smoke else 3

    def images_for(self, res: int, batch: int) -> int:
        """Images per timed call: whole chunks, about a quarter second on the target GPU."""
        target = 4 if self.args.smoke else (512 if res <= 256 else 128)
        return batch * max(1, math.ceil(target / batch))


def encoder_config(b: Bench, *, res: int, dtype: str, batch: int, compiled: bool, **extra: Any) -> Any:
    from latentize.config import load_config

    base: dict[str, Any] = {
        "encoder": {
            "type": "kl",
            "model": str(b.model_dir),
            "dtype": dtype,
            "batch_size": batch,
            "compile": compiled,
            "device": b.device.type,
        },
        "preprocess": {"resolution": res},
        "output": {"path": str(b.work / "unused")},
    }
    for section, values in extra.items():
        base.setdefault(section, {}).update(values)
    return load_config(base=base)


_SPECS: dict[int, Any] = {}


def make_encoder(b: Bench, *, res: int, dtype: str, batch: int, compiled: bool) -> Any:
    """latentize's ``kl`` encoder for the saved SD-VAE, as an encoder actor builds it."""
    from latentize.encoders import ENCODERS

    cfg = encoder_config(b, res=res, dtype=dtype, batch=batch, compiled=compiled)
    cls = ENCODERS.get("kl")
    if res not in _SPECS:  # inspect hashes the weights file: once per resolution
        _SPECS[res] = cls.inspect(cfg)
    return cls(config=cfg, spec=_SPECS[res])


def free_cache() -> None:
    """Returns the cached blocks of a dropped encoder to the device (callers ``del`` it first)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def point(section: str, path: str, *, res: int, dtype: str, compiled: bool, batch: int, **rest: Any) -> dict[str, Any]:
    return {"section": section, "path": path, "res": res, "dtype": dtype, "compiled": compiled, "batch": batch, **rest}


def measure(
    b: Bench, base: dict[str, Any], fn: Callable[[], Any], *, images: int, encoder: Any = None, warmup: int = 1
) -> dict[str, Any]:
    """Times ``fn`` (``images`` per call) into a point; CUDA OOM and errors become its status."""
    out = dict(base, images=images)
    try:
        seconds, all_s = timed(fn, b.sync, warmup=warmup, repeats=b.repeats)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return dict(out, status="oom")
    except Exception as exc:  # noqa: BLE001 - one failing point must not end the run
        traceback.print_exc()
        return dict(out, status=f"error: {type(exc).__name__}: {exc}")
    out.update(status="ok", seconds=round(seconds, 5), seconds_all=[round(t, 5) for t in all_s])
    out["img_per_s"] = round(images / seconds, 2)
    if encoder is not None and encoder.chunk_size != base["batch"]:
        # The encoder halved its chunk after a CUDA OOM: the figure is not this batch size's.
        out["status"] = f"oom: chunk halved to {encoder.chunk_size}"
        encoder.chunk_size = base["batch"]
    return out


# -- (a) encoder only -------------------------------------------------------------------------


def random_pixels(b: Bench, n: int, res: int) -> torch.Tensor:
    """(n, res, res, 3) uint8 noise on the device."""
    gen = torch.Generator(device=b.device).manual_seed(0)
    return torch.randint(0, 256, (n, res, res, 3), dtype=torch.uint8, device=b.device, generator=gen)


def check_device_tensors(b: Bench, encoder: Any, pixels: torch.Tensor) -> bool:
    """Whether ``encode`` takes a device tensor (today it calls ``np.asarray`` on its input)."""
    if b.encode_takes_device_tensor is None:
        try:
            encoder.encode(pixels[:1], ["probe"])
            b.encode_takes_device_tensor = True
        except (TypeError, RuntimeError, ValueError) as exc:
            b.encode_takes_device_tensor = False
            b.report.data["environment"]["encode_device_tensor_error"] = f"{type(exc).__name__}: {exc}"
        b.report.data["environment"]["encode_takes_device_tensor"] = b.encode_takes_device_tensor
        say(f"encoder.encode takes a {b.device.type} tensor: {b.encode_takes_device_tensor}")
    return bool(b.encode_takes_device_tensor)


@torch.inference_mode()
def bare_encode(model: torch.nn.Module, pixels: torch.Tensor, chunk: int, dtype: torch.dtype) -> torch.Tensor:
    """The model alone on uint8 (n, H, W, 3) device pixels: to ``dtype`` in [-1, 1] (channels-last
    on CUDA, as latentize feeds it), ``encode``, posterior mean; latents stay on the device."""
    out = pixels
    for start in range(0, pixels.shape[0], chunk):
        x = pixels[start : start + chunk].permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
        x = x.to(dtype)
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        out = model.encode(x).latent_dist.mean  # type: ignore[operator]
    return out


def encode_points(
    b: Bench, encoder: Any, *, res: int, dtype: str, compiled: bool, batch: int, host_path: bool, warmup: int = 1
) -> dict[str, dict[str, Any]]:
    """(a) at one batch size: ``encode`` on device pixels (or host pixels), and the bare model."""
    n = b.images_for(res, batch)
    pixels = random_pixels(b, n, res)
    keys = [f"k{i:06d}" for i in range(n)]
    encoder.chunk_size = batch  # what encoder.batch_size sets; set here to keep the loaded weights
    base = point("a", "", res=res, dtype=dtype, compiled=compiled, batch=batch)
    out: dict[str, dict[str, Any]] = {}
    results: list[Any] = []

    def run_encode(x: Any) -> Callable[[], Any]:
        def go() -> None:
            results[:] = [encoder.encode(x, keys)]

        return go

    paths: list[tuple[str, Any]] = []
    if check_device_tensors(b, encoder, pixels):
        paths.append(("encode", pixels))
    if host_path or not b.encode_takes_device_tensor:
        paths.append(("encode_host", pixels.cpu().numpy()))
    if host_path and pixels.is_cuda:
        # The same host pixels in page-locked memory: what a pinned staging buffer would give.
        pinned = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        pinned.copy_(pixels)
        paths.append(("encode_pinned", pinned.numpy()))
    for name, x in paths:
        p = measure(b, dict(base, path=name), run_encode(x), images=n, encoder=encoder, warmup=warmup)
        if p["status"] == "ok" and results:
            p["reencoded_fp32"] = results[0].reencoded_fp32
            p["errors"] = len(results[0].errors)
        b.report.add(p)
        out[name] = p
    p = measure(
        b,
        dict(base, path="bare"),
        lambda: bare_encode(encoder.model, pixels, batch, encoder.dtype),
        images=n,
        warmup=warmup,
    )
    b.report.add(p)
    out["bare"] = p
    return out


def sweep_a(
    b: Bench, encoder: Any, *, res: int, dtype: str, batches: Sequence[int], host_path: bool, reserve: float
) -> int | None:
    """(a) over ``batches`` while the budget lasts; returns the fastest batch size (None: none ran)."""
    best: tuple[float, int] | None = None
    for batch in batches:
        if b.budget.left() < reserve:
            b.report.skip(f"(a) {res}² {dtype} eager b={batch}", "time budget")
            continue
        pts = encode_points(b, encoder, res=res, dtype=dtype, compiled=False, batch=batch, host_path=host_path)
        ref = reference(pts)
        if ref is not None and (best is None or ref["img_per_s"] > best[0]):
            best = (ref["img_per_s"], batch)
        if any(p["status"].startswith("oom") for p in pts.values()):
            break  # larger batches would not fit either
    return None if best is None else best[1]


def reference(pts: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The (a) figure that (b) and (c) are compared with: ``encode`` on device pixels, else host."""
    for name in _REFERENCE_PATHS:
        p = pts.get(name)
        if p is not None and p["status"] == "ok":
            return p
    return None


# -- (b) GPU decode + encoder -----------------------------------------------------------------


def _count(value: Any) -> int:
    if isinstance(value, bool | int):
        return int(value)
    try:
        return len(value)
    except TypeError:
        return int(value)


def decode_points(b: Bench, encoder: Any, *, res: int, dtype: str, compiled: bool, batch: int) -> None:
    """(b) at one batch size: ``preprocess_on_device`` + ``encode`` per batch, and decode alone."""
    from latentize.preprocess.gpu import preprocess_on_device  # type: ignore[import-not-found,unused-ignore]

    assert b.data is not None
    cfg = encoder_config(b, res=res, dtype=dtype, batch=batch, compiled=compiled).preprocess
    n = b.images_for(res, batch)
    chunks = [b.data.take(batch, offset=start) for start in range(0, n, batch)]
    encoder.chunk_size = batch
    stats: dict[str, int] = {}

    def decode(keys: list[str], jpegs: list[bytes]) -> Any:
        batch_out = preprocess_on_device(jpegs, keys, config=cfg, device=b.device)
        for name in ("errors", "gpu_decoded", "cpu_fallback"):
            value = getattr(batch_out, name, None)
            if value is not None:
                stats[name] = stats.get(name, 0) + _count(value)
        return batch_out

    def decode_only() -> None:
        stats.clear()
        for keys, jpegs in chunks:
            decode(keys, jpegs)

    def decode_and_encode() -> None:
        stats.clear()
        for keys, jpegs in chunks:
            pixels = decode(keys, jpegs).pixels
            if not b.encode_takes_device_tensor:
                pixels = pixels.cpu().numpy()
            encoder.encode(pixels, keys)

    path = "decode+encode" if b.encode_takes_device_tensor else "decode+host"
    base = point("b", "", res=res, dtype=dtype, compiled=compiled, batch=batch)
    for name, fn, enc in ((path, decode_and_encode, encoder), ("decode", decode_only, None)):
        p = measure(b, dict(base, path=name), fn, images=n, encoder=enc)
        if p["status"] == "ok":
            p.update(stats)
        b.report.add(p)


def gpu_decode_missing() -> str | None:
    try:
        importlib.import_module("latentize.preprocess.gpu")
    except ImportError as exc:
        return f"latentize.preprocess.gpu missing ({exc})"
    return None


def sweep_b(b: Bench, encoder: Any, *, res: int, dtype: str, compiled: bool, batches: Sequence[int]) -> None:
    why = gpu_decode_missing() or (None if b.data is not None else b.data_why)
    if why:
        b.report.skip(f"(b) {res}² {dtype}", why)
        return
    if b.encode_takes_device_tensor is None:
        check_device_tensors(b, encoder, random_pixels(b, 1, res))
    for batch in batches:
        if b.budget.left() < b.args.reserve_s:
            b.report.skip(f"(b) {res}² {dtype} b={batch}", "time budget")
            continue
        try:
            decode_points(b, encoder, res=res, dtype=dtype, compiled=compiled, batch=batch)
        except Exception as exc:  # noqa: BLE001 - an API mismatch must not end the run
            b.report.error(f"(b) {res}² {dtype} b={batch}", exc)
            return


# -- compiled ---------------------------------------------------------------------------------


def compiled_points(b: Bench, *, res: int, dtype: str, batch: int, with_b: bool, estimate_s: float) -> None:
    """Compiles the encoder for one batch size (timed apart), then (a) and, with ``with_b``, (b)."""
    what = f"compiled {res}² {dtype} b={batch}"
    if b.args.no_compile:
        b.report.skip(what, "--no-compile")
        return
    if b.budget.left() < estimate_s + b.args.reserve_s:
        b.report.skip(what, f"time budget ({b.budget.left():.0f} s left, compiling takes ~{estimate_s:.0f} s)")
        return
    encoder = make_encoder(b, res=res, dtype=dtype, batch=batch, compiled=True)
    n = b.images_for(res, batch)
    pixels = random_pixels(b, n, res)
    keys = [f"k{i:06d}" for i in range(n)]
    x: Any = pixels[:batch] if check_device_tensors(b, encoder, pixels) else pixels[:batch].cpu().numpy()
    try:
        start = time.perf_counter()
        encoder.encode(x, keys[:batch])
        b.sync()
        first = time.perf_counter() - start
        start = time.perf_counter()
        encoder.encode(x, keys[:batch])
        b.sync()
        steady = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - a compiler failure is a finding, not the end
        b.report.error(what, exc)
        del encoder
        free_cache()
        return
    entry = {
        "res": res,
        "dtype": dtype,
        "batch": batch,
        "first_call_s": round(first, 3),
        "compile_s": round(first - steady, 3),
    }
    b.report.data["compile"].append(entry)
    say(f"compile: {res}² {dtype} b={batch}: {entry['compile_s']:.1f} s")
    del pixels, x
    encode_points(b, encoder, res=res, dtype=dtype, compiled=True, batch=batch, host_path=False)
    if with_b:
        sweep_b(b, encoder, res=res, dtype=dtype, compiled=True, batches=[batch])
    del encoder
    free_cache()


# -- (q) quality: bf16 against fp32, nvJPEG against the CPU path, the OOM halving -------------


def _psnr(ref: np.ndarray, test: np.ndarray, peak: float) -> float:
    """PSNR in dB of ``test`` against ``ref`` for a signal of ``peak`` range (inf when equal)."""
    mse = float(np.mean((ref.astype(np.float64) - test.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def _summary(values: Sequence[float]) -> dict[str, float]:
    """Median, 10th percentile and minimum of finite values (equal pairs count as 99 dB)."""
    arr = np.array([min(v, 99.0) for v in values], dtype=np.float64)
    return {
        "median": round(float(np.median(arr)), 2),
        "p10": round(float(np.percentile(arr, 10)), 2),
        "min": round(float(arr.min()), 2),
    }


def cpu_pixels(b: Bench, res: int, *, exact: bool = False) -> tuple[list[str], np.ndarray]:
    """The carried photos through the CPU preprocess path: keys and (N, res, res, 3) uint8."""
    from latentize.errors import SampleError
    from latentize.preprocess import preprocess_sample

    assert b.data is not None
    cfg = encoder_config(b, res=res, dtype="float32", batch=1, compiled=False, preprocess={"exact": exact}).preprocess
    keys, rows = [], []
    for key, jpeg in zip(b.data.keys, b.data.jpegs, strict=True):
        try:
            rows.append(preprocess_sample(jpeg, key=key, config=cfg).pixels)
        except SampleError:
            continue
        keys.append(key)
    return keys, np.stack(rows)


def precision_point(b: Bench, *, res: int, batch: int) -> None:
    """bf16 latents against fp32 ones on the same photos: PSNR over the fp32 latents' range,
    per-channel mean and std shift in units of the fp32 channel std; the float16 storage of the
    fp32 latents beside it, as the floor that storage alone costs."""
    keys, pixels = cpu_pixels(b, res)
    latents: dict[str, np.ndarray] = {}
    for dtype in ("float32", "bfloat16"):
        cfg = encoder_config(b, res=res, dtype=dtype, batch=batch, compiled=False, output={"dtype": "float32"})
        from latentize.encoders import ENCODERS

        cls = ENCODERS.get("kl")
        enc = cls(config=cfg, spec=cls.inspect(cfg))
        latents[dtype] = enc.encode(pixels, keys).arrays["latent"].astype(np.float32)
        del enc
        free_cache()
    ref, test = latents["float32"], latents["bfloat16"]
    peak = float(ref.max() - ref.min())
    per_sample = [_psnr(r, t, peak) for r, t in zip(ref, test, strict=True)]
    mean32, std32 = ref.mean(axis=(0, 2, 3)), ref.std(axis=(0, 2, 3))
    mean16, std16 = test.mean(axis=(0, 2, 3)), test.std(axis=(0, 2, 3))
    stored = ref.astype(np.float16).astype(np.float32)
    result = {
        "res": res,
        "images": len(keys),
        "latent_range": round(peak, 4),
        "psnr_db": round(_psnr(ref, test, peak), 2),
        "psnr_per_image_db": _summary(per_sample),
        "max_abs_diff": round(float(np.abs(ref - test).max()), 5),
        "mean_shift_in_std": [round(float(v), 5) for v in (mean16 - mean32) / std32],
        "std_ratio": [round(float(v), 5) for v in std16 / std32],
        "fp32_channel_mean": [round(float(v), 4) for v in mean32],
        "fp32_channel_std": [round(float(v), 4) for v in std32],
        "float16_storage_psnr_db": round(_psnr(ref, stored, peak), 2),
    }
    b.report.data["quality"]["bf16_vs_fp32"].append(result)
    say(
        f"(q) {res}² bf16 vs fp32 latents over {len(keys)} photos: PSNR {result['psnr_db']} dB "
        f"(per image {result['psnr_per_image_db']}), mean shift {result['mean_shift_in_std']} std, "
        f"std ratio {result['std_ratio']}; float16 storage alone {result['float16_storage_psnr_db']} dB"
    )
    b.report.save()


def nvjpeg_point(b: Bench, *, res: int) -> None:
    """GPU decode (``preprocess_on_device``) against the CPU path on the same JPEGs: per-image
    PSNR of the uint8 pixels, against the default (reduced-DCT) and the ``exact`` CPU decode."""
    from latentize.preprocess.gpu import preprocess_on_device  # type: ignore[import-not-found,unused-ignore]

    assert b.data is not None
    cfg = encoder_config(b, res=res, dtype="bfloat16", batch=1, compiled=False).preprocess
    result: dict[str, Any] = {"res": res}
    for exact in (False, True):
        keys, cpu = cpu_pixels(b, res, exact=exact)
        jpegs = [b.data.jpegs[b.data.keys.index(k)] for k in keys]
        out = preprocess_on_device(jpegs, keys, config=cfg, device=b.device)
        gpu = out.pixels.cpu().numpy()
        scores = [_psnr(c, g, 255.0) for c, g in zip(cpu, gpu, strict=True)]
        name = "against_exact_cpu" if exact else "against_default_cpu"
        result[name] = _summary(scores)
        result.update(images=len(keys), gpu_decoded=out.gpu_decoded, cpu_fallback=out.cpu_fallback)
    b.report.data["quality"]["nvjpeg_vs_cpu"].append(result)
    say(
        f"(q) {res}² GPU decode vs CPU path, PSNR of pixels over {result['images']} photos "
        f"({result['gpu_decoded']} decoded on the device, {result['cpu_fallback']} fell back): "
        f"default CPU {result['against_default_cpu']}, exact CPU {result['against_exact_cpu']}"
    )
    b.report.save()


class _Warnings(logging.Handler):
    """Collects the encoder's log records (the OOM halving logs a warning per halving)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def oom_point(b: Bench, *, res: int, images: int) -> None:
    """Asks for a chunk of ``images`` images at ``res``² in bf16, which cannot fit: the encoder
    must halve it on CUDA OOM until it fits, and give the latents of a run at the final chunk
    size, byte for byte."""
    pixels = random_pixels(b, images, res)
    keys = [f"k{i:06d}" for i in range(images)]
    enc = make_encoder(b, res=res, dtype="bfloat16", batch=images, compiled=False)
    if b.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(b.device)
    handler = _Warnings()
    log = logging.getLogger("latentize.encoders.base")
    log.addHandler(handler)
    result: dict[str, Any] = {"res": res, "asked_chunk": images}
    b.report.data["quality"]["oom_halving"] = result
    try:
        start = time.perf_counter()
        first = enc.encode(pixels, keys)
        b.sync()
        result.update(
            seconds=round(time.perf_counter() - start, 2),
            final_chunk=enc.chunk_size,
            halvings=sum("halved" in m for m in handler.messages),
            peak_gib=round(torch.cuda.max_memory_allocated(b.device) / 2**30, 1) if b.device.type == "cuda" else None,
        )
        free_cache()
        start = time.perf_counter()
        again = enc.encode(pixels, keys)  # chunk_size stays at the size that fitted
        b.sync()
        result["seconds_at_final_chunk"] = round(time.perf_counter() - start, 2)
        result["identical_to_final_chunk_run"] = bool(np.array_equal(first.arrays["latent"], again.arrays["latent"]))
        result["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - what the halving does not catch is the finding
        result["status"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
        result["warnings"] = handler.messages[-5:]
        traceback.print_exc()
    finally:
        log.removeHandler(handler)
        del enc, pixels
        free_cache()
    say(f"(q) OOM halving at {res}², asked chunk {images}: {result}")
    b.report.save()


# -- (k) knobs: memory layout, cuDNN autotuning and compilation of the bare SD-VAE encoder ----


def knob_point(b: Bench, *, res: int, batch: int, layout: str, autotune: bool, compiled: bool) -> None:
    """The bare bf16 SD-VAE ``encode`` on device pixels with one setting of each knob:
    ``layout`` ``cl`` (channels-last, latentize's) or ``nchw``; ``autotune``
    (``torch.backends.cudnn.benchmark``); ``compiled`` (``torch.compile`` of the encoder
    network, as ``encoder.compile`` does), whose first call is timed apart."""
    from diffusers import AutoencoderKL

    torch.backends.cudnn.benchmark = autotune
    model: Any = AutoencoderKL.from_pretrained(b.model_dir, torch_dtype=torch.bfloat16)
    model.decoder = torch.nn.Identity()
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    model = model.to(b.device).to(memory_format=fmt).eval()
    if compiled:
        model.encoder = torch.compile(model.encoder, dynamic=False)
    n = b.images_for(res, batch)
    pixels = random_pixels(b, n, res)

    @torch.inference_mode()
    def go() -> None:
        for start in range(0, n, batch):
            x = pixels[start : start + batch].permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
            _ = model.encode(x.to(torch.bfloat16).contiguous(memory_format=fmt)).latent_dist.mean

    path = f"{layout}{'+autotune' if autotune else ''}"
    base = point("k", path, res=res, dtype="bfloat16", compiled=compiled, batch=batch)
    start = time.perf_counter()
    go()
    b.sync()
    first = time.perf_counter() - start
    p = measure(b, base, go, images=n)
    p["first_call_s"] = round(first, 2)
    b.report.add(p)


def knob_steps(b: Bench, *, reserve: float) -> None:
    r256, r512 = b.args.res
    small = 4 if b.args.smoke else None
    plan = [
        (r256, small or 128, "cl", False, False),
        (r256, small or 128, "cl", True, False),
        (r256, small or 128, "nchw", True, False),
        (r512, small or 32, "cl", False, False),
        (r512, small or 32, "cl", True, False),
        (r512, small or 32, "nchw", True, False),
        (r256, small or 128, "cl", True, True),
        (r256, small or 128, "nchw", True, True),
        (r512, small or 32, "cl", True, True),
        (r512, small or 32, "nchw", True, True),
    ]
    try:
        for res, batch, layout, autotune, compiled in plan:
            what = f"(k) {res}² b={batch} {layout} autotune={autotune} compiled={compiled}"
            if b.budget.left() < reserve + (40.0 if compiled else 10.0):
                b.report.skip(what, "time budget")
                continue
            guarded(
                b,
                what,
                functools.partial(
                    knob_point, b, res=res, batch=batch, layout=layout, autotune=autotune, compiled=compiled
                ),
            )
            free_cache()
    finally:
        torch.backends.cudnn.benchmark = False


# -- (z) the model zoo: the bare encoder of each architecture beside the SD VAE ---------------

#: Architectures whose encoder cost ``latentize plan`` may need: diffusers class, config (the
#: released models' own shapes), and whether it takes a frame axis (N, C, T=1, H, W).
ZOO: dict[str, tuple[str, dict[str, Any], bool]] = {
    "sd-vae": ("AutoencoderKL", SD_VAE, False),
    "flux1": (
        "AutoencoderKL",
        {**SD_VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False},
        False,
    ),
    "flux2": ("AutoencoderKLFlux2", {}, False),
    "taesd": ("AutoencoderTiny", {}, False),
    "dc-ae-f32c32": ("AutoencoderDC", {}, False),
    "qwen-image": ("AutoencoderKLQwenImage", {}, True),
    "wan2.1": ("AutoencoderKLWan", {}, True),
    "wan2.2": (
        "AutoencoderKLWan",
        {
            "base_dim": 160,
            "decoder_base_dim": 256,
            "z_dim": 48,
            "is_residual": True,
            "in_channels": 12,
            "out_channels": 12,
            "patch_size": 2,
            "scale_factor_spatial": 16,
            "latents_mean": [0.0] * 48,
            "latents_std": [1.0] * 48,
        },
        True,
    ),
    "hunyuanimage-2.1": (
        "AutoencoderKLHunyuanImage",
        {
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 64,
            "block_out_channels": (128, 256, 512, 512, 1024, 1024),
            "layers_per_block": 2,
            "spatial_compression_ratio": 32,
            "sample_size": 512,
        },
        False,
    ),
}


def zoo_point(b: Bench, name: str, *, res: int, batch: int) -> None:
    """The bare ``model.encode`` of one architecture (random weights, decoder dropped) in bf16
    on device pixels at ``res``², as :func:`bare_encode` times the SD VAE."""
    import diffusers

    cls_name, cfg, frames = ZOO[name]
    torch.manual_seed(0)
    with torch.device(b.device):
        model: Any = getattr(diffusers, cls_name)(**cfg)
    if isinstance(getattr(model, "decoder", None), torch.nn.Module):
        model.decoder = torch.nn.Identity()
    model = model.to(dtype=torch.bfloat16).eval()
    if not frames:
        model = model.to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in model.parameters())
    n = b.images_for(res, batch)
    gen = torch.Generator(device=b.device).manual_seed(0)
    x = (torch.rand((n, 3, res, res), generator=gen, device=b.device) * 2 - 1).to(torch.bfloat16)
    x = x.unsqueeze(2) if frames else x.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def go() -> None:
        for start in range(0, n, batch):
            model.encode(x[start : start + batch])

    base = point("z", name, res=res, dtype="bfloat16", compiled=False, batch=batch)
    p = measure(b, base, go, images=n)
    p["params_without_decoder"] = params
    b.report.add(p)


def zoo_steps(b: Bench, *, res: int, batch: int, reserve: float) -> None:
    for name in ZOO:
        if b.budget.left() < reserve + 10.0:
            b.report.skip(f"(z) {name}", "time budget")
            continue
        guarded(b, f"(z) {name}", functools.partial(zoo_point, b, name, res=res, batch=batch))
        free_cache()  # the model and its pixels went with zoo_point's frame


# -- (c) the Ray pipeline ---------------------------------------------------------------------


def ray_missing(b: Bench) -> str | None:
    if b.args.no_ray:
        return "--no-ray"
    for name in ("ray", "webdataset", "diffusers"):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            return f"{name} is not importable ({exc})"
    return None


def timed_actor(log_dir: Path) -> type:
    """An encoder actor that appends ``start end rows`` of every batch to a file per process."""
    from latentize.pipeline import EncodeActor

    class TimedEncodeActor(EncodeActor):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            start = time.time()
            out = super().__call__(batch)
            rows = int((np.asarray(batch["total"]) < 0).sum())
            with open(log_dir / f"{os.getpid()}.log", "a") as f:
                f.write(f"{start} {time.time()} {rows}\n")
            return out

    return TimedEncodeActor


def write_pipeline_shards(data: JpegSet, folder: Path, *, images: int, per_shard: int) -> list[str]:
    """Writes ``images`` samples (the carried JPEGs over and over) into tars of ``per_shard``
    samples, img2dataset style (``KEY.jpg``, ``KEY.txt``); returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for shard in range(math.ceil(images / per_shard)):
        path = folder / f"{shard:05d}.tar"
        count = min(per_shard, images - shard * per_shard)
        with tarfile.open(path, "w") as tar:
            for i in range(count):
                jpeg = data.jpegs[(shard * per_shard + i) % len(data.jpegs)]
                for ext, payload in (("jpg", jpeg), ("txt", f"a photo, copy {shard}".encode())):
                    info = tarfile.TarInfo(f"{shard:05d}{i:04d}.{ext}")
                    info.size, info.mtime, info.mode = len(payload), _MTIME, 0o644
                    tar.addfile(info, io.BytesIO(payload))
        urls.append(str(path))
    return urls


def pipeline_section(b: Bench, *, res: int, batch: int) -> None:
    """(c) ``latentize.pipeline.run`` over the shards, bf16 at ``res`` with ``batch``: once per
    ``--pipeline-decode`` mode (the first is ``pipeline`` in the JSON, the rest
    ``pipeline_<mode>``), all in one local Ray, while the budget lasts."""
    import ray
    from ray.data import DataContext

    assert b.data is not None
    images = b.args.pipeline_images
    # Shards of 500: as many read tasks at once as a 16-core machine runs.
    per_shard = max(1, min(500, images // 2))
    urls = write_pipeline_shards(b.data, b.work / "pipeline_in", images=images, per_shard=per_shard)
    cuda = b.device.type == "cuda"
    start = time.perf_counter()
    ray.init(
        num_cpus=2 if b.args.smoke else None,
        num_gpus=1 if cuda else 0,
        include_dashboard=False,
        logging_level=logging.WARNING,
    )
    ray_init_s = round(time.perf_counter() - start, 2)
    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        for i, decode in enumerate(b.args.pipeline_decode):
            if i and b.budget.left() < (5.0 if b.args.smoke else 45.0):
                b.report.skip(f"(c) pipeline decode={decode}", f"time budget ({b.budget.left():.0f} s left)")
                continue
            name = "pipeline" if i == 0 else f"pipeline_{decode}"
            run_one = functools.partial(pipeline_run, b, name, urls, res=res, batch=batch, decode=decode)
            guarded(b, f"(c) {name}", run_one)
            entry = b.report.data.setdefault(name, {"decode": decode, "status": "running"})
            entry["ray_init_s"] = ray_init_s
            if entry["status"] == "running":
                entry["status"] = "error (see errors)"
            b.report.save()
    finally:
        ray.shutdown()


def steady_rate(batches: list[tuple[float, ...]]) -> float | None:
    """Images per second of the encoder calls after the first one ends (the first call loads
    cuDNN's kernels, or compiles): rows of the calls that start after it, over the time from its
    end to the last call's end."""
    if len(batches) < 2:
        return None
    ordered = sorted(batches)
    first_end = ordered[0][1]
    later = [(s0, e, r) for s0, e, r in ordered[1:] if s0 >= first_end]
    span = max((e for _, e, _ in later), default=first_end) - first_end
    return round(sum(r for _, _, r in later) / span, 2) if span > 0 else None


def pipeline_run(b: Bench, name: str, urls: list[str], *, res: int, batch: int, decode: str) -> None:
    """One ``run`` of (c) into a fresh output, figures under ``name`` in the JSON."""
    import ray

    from latentize.pipeline import run

    log_dir = b.work / f"actor_logs_{name}"
    log_dir.mkdir(exist_ok=True)
    cuda = b.device.type == "cuda"
    cfg = encoder_config(
        b,
        res=res,
        dtype="bfloat16",
        batch=batch,
        compiled=b.args.pipeline_compile,
        input={"urls": urls},
        preprocess={"decode": decode},
        output={"path": str(b.work / f"out_{name}")},
        ray={"actors": 1, "gpus_per_actor": 1.0 if cuda else 0.0},
    )
    result: dict[str, Any] = {
        "res": res,
        "dtype": "bfloat16",
        "batch": batch,
        "compiled": b.args.pipeline_compile,
        "shards": len(urls),
        "decode": decode,
        "ray": ray.__version__,
        "status": "running",
    }
    b.report.data[name] = result
    start = time.perf_counter()
    summary = run(cfg, encode_actor=timed_actor(log_dir))
    result["run_s"] = round(time.perf_counter() - start, 2)
    batches = [tuple(map(float, line.split())) for f in log_dir.glob("*.log") for line in f.read_text().splitlines()]
    window = max(e for _, e, _ in batches) - min(s for s, _, _ in batches) if batches else float("nan")
    t0 = min((s0 for s0, _, _ in batches), default=0.0)
    result.update(
        status="ok" if summary.complete else "incomplete",
        images=summary.samples_now,
        samples_ok=summary.samples_ok,
        samples_failed=summary.samples_failed,
        run_summary_s=round(summary.seconds, 2),
        img_per_s_run=round(summary.samples_now / result["run_s"], 2),
        encode_batches=len(batches),
        encode_window_s=round(window, 3),
        encode_busy_s=round(sum(e - s for s, e, _ in batches), 3),
        img_per_s_window=round(summary.samples_now / window, 2) if window > 0 else None,
        img_per_s_after_first=steady_rate(batches),
        # (start, end, rows) of every encoder call, seconds from the first start: what a later
        # reading needs to tell the first (compiling) call from the steady state.
        batches=[(round(s0 - t0, 3), round(e - t0, 3), int(r)) for s0, e, r in sorted(batches)],
    )
    say(
        f"(c) {res}² bfloat16 b={batch} decode={decode}: {result['images']} img in {result['run_s']} s "
        f"({result['img_per_s_run']} img/s whole run; {result['img_per_s_window']} img/s over the "
        f"encoder's {result['encode_window_s']} s window)"
    )
    b.report.save()


# -- ratios and targets -----------------------------------------------------------------------


#: The (a) paths that other figures are compared with, preferred first: ``encode`` on device
#: pixels, else from pageable host memory (what a Ray actor hands it today).
_REFERENCE_PATHS = ("encode", "encode_host", "encode_pinned")


def _key(p: dict[str, Any]) -> tuple[Any, ...]:
    return (p["res"], p["dtype"], p["compiled"], p["batch"])


def ratios(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Ratios to the matching (a) point, and the targets with the best figures measured."""
    points = [p for p in data["points"] if p["status"] == "ok"]
    a_ref: dict[tuple[Any, ...], dict[str, Any]] = {}
    for p in points:
        if p["section"] == "a" and p["path"] in _REFERENCE_PATHS:
            held = a_ref.get(_key(p))
            if held is None or _REFERENCE_PATHS.index(p["path"]) < _REFERENCE_PATHS.index(held["path"]):
                a_ref[_key(p)] = p
    out: dict[str, Any] = {}
    for p in points:
        ref = a_ref.get(_key(p))
        if ref is None or p is ref:
            continue
        out[label(p)] = round(p["img_per_s"] / ref["img_per_s"], 3)

    def best_a(res: int, dtype: str, compiled: bool | None = None) -> dict[str, Any] | None:
        cands = [
            p for k, p in a_ref.items() if k[0] == res and k[1] == dtype and (compiled is None or k[2] == compiled)
        ]
        return max(cands, key=lambda p: p["img_per_s"], default=None)

    targets: dict[str, Any] = {}
    r256, r512 = data["resolutions"]
    for res, key in ((r256, "a_256_bf16"), (r512, "a_512_bf16")):
        best = best_a(res, "bfloat16")
        if best is not None:
            targets[key] = _target(best["img_per_s"], TARGETS[key], best)
    b_pts = [p for p in points if p["section"] == "b" and p["path"] != "decode" and p["res"] == r256]
    b_best = max(b_pts, key=lambda p: p["img_per_s"], default=None)
    a_best = best_a(r256, "bfloat16")
    if b_best is not None and a_best is not None:
        targets["b_ratio"] = _target(b_best["img_per_s"] / a_best["img_per_s"], TARGETS["b_ratio"], b_best)
    pipe = data.get("pipeline") or {}
    a_eager = best_a(r256, "bfloat16", compiled=False)
    if pipe.get("img_per_s_window") and a_eager is not None:
        same = a_ref.get((pipe["res"], "bfloat16", False, pipe["batch"]))
        ref = same or a_eager
        out[f"c:pipeline window vs {label(ref)}"] = round(pipe["img_per_s_window"] / ref["img_per_s"], 3)
        out[f"c:pipeline whole run vs {label(ref)}"] = round(pipe["img_per_s_run"] / ref["img_per_s"], 3)
        targets["c_ratio"] = _target(pipe["img_per_s_window"] / ref["img_per_s"], TARGETS["c_ratio"], ref)
    return out, targets


def _target(value: float, goal: float, at: dict[str, Any]) -> dict[str, Any]:
    return {"value": round(value, 3), "goal": goal, "met": value >= goal, "at": label(at)}


# -- environment and model --------------------------------------------------------------------


def _version(name: str) -> str | None:
    try:
        return str(importlib.import_module(name).__version__)
    except Exception:  # noqa: BLE001 - missing or broken: reported as absent
        return None


def environment(device: torch.device, *, no_ray: bool) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "diffusers": _version("diffusers"),
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "device": str(device),
        "cpu_count": os.cpu_count(),
    }
    env["ray"] = "not imported (--no-ray)" if no_ray else _version("ray")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
        )
    return env


def build_model(folder: Path, *, smoke: bool) -> dict[str, Any]:
    """Saves a random-weight SD-VAE (tiny with ``smoke``) to ``folder``; returns its config."""
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging

    # Each load says that no module needs float32 when cast with .to(): true, and noise here.
    diffusers_logging.set_verbosity_error()
    torch.manual_seed(0)
    arch = TINY_VAE if smoke else SD_VAE
    model: Any = AutoencoderKL(**arch)
    model.save_pretrained(folder)
    params = sum(p.numel() for p in model.encoder.parameters()) + sum(p.numel() for p in model.quant_conv.parameters())
    return {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()}, "encoder_params": params}


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="every section on the CPU, tiny model at 64²")
    parser.add_argument("--budget-s", type=float, default=420.0, help="seconds the whole run may take")
    parser.add_argument("--grace-s", type=float, default=60.0, help="seconds past the budget before a hard stop")
    parser.add_argument("--json", type=Path, help="figures file (default $OUT/gpu.json, else ./gpu.json)")
    parser.add_argument("--data", type=Path, default=REPO / ".gpu_data", help="folder of --make-data")
    parser.add_argument("--make-data", type=Path, metavar="DIR", help="write the JPEG shards to DIR and exit")
    parser.add_argument("--images", type=int, default=160, help="JPEGs that --make-data writes")
    parser.add_argument("--shards", type=int, default=2, help="tar shards that --make-data writes")
    parser.add_argument("--sections", default="a,b,c,q,z", help="comma-separated subset of a, b, c, k, q, z")
    parser.add_argument("--no-ray", action="store_true", help="never import Ray; skip (c)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile points")
    parser.add_argument("--pipeline-images", type=int, default=12000, help="images through the (c) pipeline")
    parser.add_argument(
        "--pipeline-decode",
        default="auto,cpu",
        help="(c) preprocess.decode modes, comma-separated (auto, cpu, gpu): one run each, in order",
    )
    parser.add_argument("--pipeline-compile", action="store_true", help="(c) with encoder.compile true")
    parser.add_argument("--device", default=None, help="torch device (default cuda when present, else cpu)")
    args = parser.parse_args(argv)
    args.sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    args.pipeline_decode = [d.strip() for d in args.pipeline_decode.split(",") if d.strip()]
    if not set(args.pipeline_decode) <= {"auto", "cpu", "gpu"}:
        parser.error(f"--pipeline-decode: {args.pipeline_decode} (auto, cpu, gpu)")
    if args.smoke:
        args.sweep256, args.sweep512 = [2, 4], [2]
        args.res, args.fp32_256, args.fp32_512 = (64, 96), [2], [2]
        args.pipeline_images = min(args.pipeline_images, args.images)
        args.reserve_s = 0.0
        args.compile_estimate = (60.0, 60.0)
    else:
        args.sweep256, args.sweep512 = [16, 32, 64, 128, 256], [8, 16, 32, 64]
        args.res, args.fp32_256, args.fp32_512 = (256, 512), [32, 128], [16, 32]
        args.reserve_s = 10.0
        args.compile_estimate = (100.0, 120.0)
    return args


def load_data(b: Bench) -> None:
    folder = b.args.data
    if not any((folder / "shards").glob("*.tar")):
        # The photos of latentize.demo come with scikit-image / scikit-learn; try them here.
        try:
            folder = b.work / "data"
            make_data(folder, images=b.args.images, shards=b.args.shards)
            say(f"no shards under {b.args.data}: made {b.args.images} JPEGs in {folder}")
        except Exception as exc:  # noqa: BLE001 - without data (b) and (c) are skipped
            b.data_why = f"no shards under {b.args.data} and none could be made ({type(exc).__name__}: {exc})"
            return
    b.data = read_data(folder)
    sizes = [len(j) for j in b.data.jpegs]
    b.report.data["data"] = {
        "folder": str(folder),
        "shards": len(b.data.shards),
        "images": len(sizes),
        "bytes_median": int(statistics.median(sizes)),
        "bytes_total": sum(sizes),
    }


def guarded(b: Bench, what: str, fn: Callable[[], Any]) -> Any:
    """Runs one step; an exception is reported and the later steps still run."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - reported in the JSON
        b.report.error(what, exc)
        free_cache()
        return None


def eager_sweep(
    b: Bench, *, res: int, dtype: str, batches: Sequence[int], host_path: bool, reserve: float
) -> int | None:
    """(a) over ``batches`` with one eager encoder; returns the fastest batch size."""
    enc = make_encoder(b, res=res, dtype=dtype, batch=batches[0], compiled=False)
    best = sweep_a(b, enc, res=res, dtype=dtype, batches=batches, host_path=host_path, reserve=reserve)
    del enc
    free_cache()
    return best


def first_steps(b: Bench, *, res: int) -> int | None:
    """bf16 eager at 256²: (a) over the sweep, then (b) on the same encoder."""
    args, secs = b.args, b.args.sections
    enc = make_encoder(b, res=res, dtype="bfloat16", batch=args.sweep256[0], compiled=False)
    # Known before any compiled encoder exists: probing one would compile it untimed.
    check_device_tensors(b, enc, random_pixels(b, 1, res))
    best = None
    if "a" in secs:
        best = sweep_a(b, enc, res=res, dtype="bfloat16", batches=args.sweep256, host_path=True, reserve=args.reserve_s)
    if "b" in secs:
        sweep_b(b, enc, res=res, dtype="bfloat16", compiled=False, batches=args.sweep256)
    del enc
    free_cache()
    return best


def pipeline_steps(b: Bench, *, res: int, batch: int) -> None:
    """(c), after its (a) point when (a) did not run."""
    if "a" not in b.args.sections:
        enc = make_encoder(b, res=res, dtype="bfloat16", batch=batch, compiled=False)
        encode_points(b, enc, res=res, dtype="bfloat16", compiled=False, batch=batch, host_path=False)
        del enc
        free_cache()
    try:
        pipeline_section(b, res=res, batch=batch)
    except Exception:
        if isinstance(b.report.data.get("pipeline"), dict):
            b.report.data["pipeline"]["status"] = "error (see errors)"
        raise


def run_sections(b: Bench) -> None:
    """The sections in order of importance, each step while the budget lasts: bf16 eager 256²
    (a) and (b), the quality checks, compiled 256², eager 512², the pipeline (c), float32,
    compiled 512², and last the OOM halving (a failure there may spoil the CUDA context)."""
    args, secs = b.args, b.args.sections
    r256, r512 = args.res
    c_why = None
    if "c" in secs:
        c_why = ray_missing(b) or (None if b.data is not None else b.data_why)
    # Seconds kept for the pipeline and the OOM check from the compiled and float32 steps.
    c_reserve = (15.0 if args.smoke else 75.0) if "c" in secs and c_why is None else 0.0
    q_reserve = (5.0 if args.smoke else 25.0) if "q" in secs else 0.0

    if "k" in secs:
        knob_steps(b, reserve=c_reserve)
    best256 = None
    if secs & {"a", "b"}:
        best256 = guarded(b, "bf16 eager 256", lambda: first_steps(b, res=r256))
    batch256 = best256 or args.sweep256[-2]
    if "q" in secs:
        quality_steps(b, res=r256, res2=r512)
    if secs & {"a", "b"}:
        compile_est = args.compile_estimate[0] + c_reserve + q_reserve
        guarded(
            b,
            "compiled 256",
            lambda: compiled_points(
                b, res=r256, dtype="bfloat16", batch=batch256, with_b="b" in secs, estimate_s=compile_est
            ),
        )
    best512 = None
    if "a" in secs:
        best512 = guarded(
            b,
            "bf16 eager 512",
            lambda: eager_sweep(
                b, res=r512, dtype="bfloat16", batches=args.sweep512, host_path=False, reserve=args.reserve_s
            ),
        )
    if "c" in secs:
        pipeline_or_skip(b, c_why, res=r256, batch=batch256, reserve=q_reserve)
    if "z" in secs:
        zoo_steps(b, res=r512, batch=4 if args.smoke else 32, reserve=q_reserve + 60.0)
    if "a" in secs:
        for res, batches in ((r256, args.fp32_256), (r512, args.fp32_512)):
            if b.budget.left() < q_reserve + 20.0:
                b.report.skip(f"(a) {res}² float32", "time budget (kept for the OOM check)")
                continue
            guarded(
                b,
                f"fp32 eager {res}",
                functools.partial(
                    eager_sweep,
                    b,
                    res=res,
                    dtype="float32",
                    batches=batches,
                    host_path=False,
                    reserve=args.reserve_s + q_reserve,
                ),
            )
        if best512 is not None:
            compile_est = args.compile_estimate[1] + q_reserve
            guarded(
                b,
                "compiled 512",
                lambda: compiled_points(
                    b, res=r512, dtype="bfloat16", batch=best512, with_b=False, estimate_s=compile_est
                ),
            )
    if "q" in secs:
        images = 8 if args.smoke else 1024
        guarded(b, "(q) OOM halving", lambda: oom_point(b, res=r512, images=images))


def quality_steps(b: Bench, *, res: int, res2: int) -> None:
    """bf16 against fp32 latents and GPU decode against the CPU path (needs the photos)."""
    if b.data is None:
        b.report.skip("(q) bf16 vs fp32, nvJPEG vs CPU", b.data_why)
        return
    guarded(b, f"(q) bf16 vs fp32 {res}", lambda: precision_point(b, res=res, batch=4 if b.args.smoke else 32))
    if gpu_decode_missing() is None:
        for r in (res, res2):
            guarded(b, f"(q) nvJPEG vs CPU {r}", functools.partial(nvjpeg_point, b, res=r))


def pipeline_or_skip(b: Bench, why: str | None, *, res: int, batch: int, reserve: float) -> None:
    """(c) when Ray is there and the budget allows it."""
    if why is not None:
        b.report.skip("(c) pipeline", why)
        b.report.data["pipeline"] = {"status": f"skipped: {why}"}
        b.report.save()
        return
    # Ray's start, the actor's model load and a few seconds of encoding at the least.
    least = (5.0 if b.args.smoke else 40.0) + reserve
    if b.budget.left() < least:
        b.report.skip("(c) pipeline", f"time budget ({b.budget.left():.0f} s left)")
        b.report.data["pipeline"] = {"status": "skipped: time budget"}
        b.report.save()
        return
    guarded(b, "(c) pipeline", lambda: pipeline_steps(b, res=res, batch=batch))


def watchdog(report: Report, seconds: float) -> None:
    """Ends the process ``seconds`` from now whatever it is doing (a hung compile or Ray run
    would otherwise hold the GPU machine until the call's limit); the JSON keeps the figures."""

    def stop() -> None:
        say(f"watchdog: {seconds:.0f} s passed; stopping (the JSON holds what was measured)")
        try:
            report.data["errors"].append({"what": "watchdog", "error": f"stopped after {seconds:.0f} s"})
            report.save()
        finally:
            os._exit(3)

    timer = threading.Timer(seconds, stop)
    timer.daemon = True
    timer.start()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        # Inductor's C++ code generation takes minutes on a small CPU; Dynamo's tracing (the
        # part that fails on an unsupported model) is what the smoke run must go through.
        torch.compile = functools.partial(torch.compile, backend="eager")
    if args.make_data is not None:
        paths = make_data(args.make_data, images=args.images, shards=args.shards)
        total = sum(p.stat().st_size for p in paths)
        say(f"wrote {args.images} JPEGs in {len(paths)} shards under {args.make_data} ({total / 1e6:.1f} MB)")
        return 0
    budget = Budget(args.budget_s)
    out = args.json or (Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else Path("gpu.json"))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    report = Report(out, args, budget)
    watchdog(report, args.budget_s + args.grace_s)
    report.data["environment"] = environment(device, no_ray=args.no_ray)
    say(json.dumps(report.data["environment"]))
    work = Path(tempfile.mkdtemp(prefix="latentize-gpu-"))
    try:
        start = time.perf_counter()
        report.data["model"] = build_model(work / "sd-vae", smoke=args.smoke)
        report.data["model"]["build_s"] = round(time.perf_counter() - start, 2)
        b = Bench(args, report, budget, device, work / "sd-vae", work)
        if args.sections & {"b", "c"}:
            load_data(b)
        report.save()
        run_sections(b)
    except Exception as exc:  # noqa: BLE001 - whatever was measured stays in the JSON
        report.error("run", exc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.save()
    say("\nratios to the (a) point of the same size, dtype, mode and batch:")
    for name, value in report.data["ratios"].items():
        say(f"  {value:>7.3f}  {name}")
    say("targets:")
    for name, t in report.data["targets"].items():
        say(f"  {name}: {t['value']} (goal {t['goal']}, {'met' if t['met'] else 'NOT met'}; {t['at']})")
    say(f"wrote {out} after {budget.elapsed():.0f} s")
    return 1 if report.data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
