"""The encoder pools' shape on a Ray cluster: resources per actor, the number of actors, torch
threads of CPU actors, where images are decoded and the batch size (:class:`Execution`); the
same for the text-encoder pool of a run with a ``text`` section (:class:`TextExecution`).

:func:`resolve_execution` asks the cluster Ray is connected to; :func:`execution_for` is the
decision itself, from ``ray.cluster_resources()`` alone (tests call it with made-up clusters);
:func:`text_execution_for` sizes the text pool with what the image pool leaves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from latentize.config import Config
from latentize.encoders.base import encoder_batch_size
from latentize.errors import LatentizeError

__all__ = [
    "CPU_DECODE_MIN_CPUS_PER_GPU",
    "MIXED_BATCH_CHUNKS",
    "Execution",
    "TextExecution",
    "execution_for",
    "pool_on_gpu",
    "resolve_execution",
    "resolve_text_execution",
    "text_execution_for",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Execution:
    """How the encoder pool runs, resolved against the cluster.

    Attributes:
        remote_args: Ray resources per encoder actor.
        actors: the pool size.
        cpu_threads: torch threads of a CPU actor (None on GPUs).
        gpu: the actors hold GPUs.
        decode: ``gpu`` (bytes go to the actors) or ``cpu`` (pixels do).
        batch_size: images per encoder call.
    """

    remote_args: dict[str, Any]
    actors: int
    cpu_threads: int | None
    gpu: bool
    decode: str
    batch_size: int

    def describe(self) -> dict[str, Any]:
        return {
            "actors": self.actors,
            "gpus_per_actor": self.remote_args.get("num_gpus", 0),
            "decode": self.decode,
            "batch_size": self.batch_size,
        }


#: With several crop sizes, a Ray batch holds this many encoder chunks at most, so that the
#: groups it splits into by shape stay near a chunk each (buckets are uneven: a few hold most).
MIXED_BATCH_CHUNKS = 8


def pool_on_gpu(config: Config, gpus: float) -> bool:
    """Whether the encoder actors run on GPUs in a cluster of ``gpus`` GPUs (else on CPU)."""
    per_actor = config.ray.gpus_per_actor
    return per_actor > 0 and gpus >= per_actor and config.encoder.device != "cpu"


def resolve_execution(config: Config, *, shapes: int = 1) -> Execution:
    """:func:`execution_for` the cluster Ray is connected to (and where its actors see CUDA)."""
    import ray

    resources = ray.cluster_resources()
    gpu = pool_on_gpu(config, resources.get("GPU", 0.0))
    asks = gpu and config.preprocess.decode == "auto" and config.preprocess.fixed_size
    gpu_decode = asks and _few_cpus_per_gpu(resources) and _actors_see_cuda(config.ray.gpus_per_actor)
    return execution_for(config, resources, shapes=shapes, gpu_decode=gpu_decode)


def execution_for(
    config: Config, resources: dict[str, float], *, shapes: int = 1, gpu_decode: bool = False
) -> Execution:
    """Ray resources per encoder actor, the pool size, torch threads for CPU actors, where to
    decode and the batch size (of ``shapes`` crop sizes: larger batches for several), for a
    cluster of ``resources`` (``ray.cluster_resources()``: ``GPU``, ``CPU``).

    Args:
        gpu_decode: what ``preprocess.decode: auto`` picks for a fixed-size run on GPUs: the
            actors' GPUs are CUDA devices and the cluster has few CPUs per GPU.

    Raises:
        LatentizeError: ``preprocess.decode: gpu`` in a run of several sizes.
    """
    gpus = resources.get("GPU", 0.0)
    per_actor = config.ray.gpus_per_actor
    actors = config.ray.actors
    cpu_threads: int | None = None
    gpu = pool_on_gpu(config, gpus)
    if gpu:
        fit = int(gpus // per_actor)
        if actors > fit:
            logger.warning("ray.actors=%d but the cluster has GPUs for %d; using %d", actors, fit, fit)
            actors = fit
        # num_cpus=0: Ray 2.60 would otherwise reserve a CPU per GPU actor, starving decode.
        remote_args: dict[str, Any] = {"num_gpus": per_actor, "num_cpus": 0}
    else:
        cpus = int(resources.get("CPU", 1))
        logger.warning(
            "no GPU for the encoder in the Ray cluster (GPU=%s): encoder actors run on CPU; "
            "this is slow for real models",
            gpus,
        )
        fit = max(1, cpus - 1)
        if actors > fit:
            logger.warning("ray.actors=%d but only %d CPU(s) are free for CPU encoders; using %d", actors, fit, fit)
            actors = fit
        remote_args, cpu_threads = {"num_gpus": 0, "num_cpus": 1}, max(1, cpus // actors)
    decode = config.preprocess.decode
    if decode == "gpu" and not config.preprocess.fixed_size:
        raise LatentizeError(
            "preprocess.decode: gpu decodes runs of one fixed size; with aspect-ratio buckets or several "
            "resolutions use preprocess.decode: cpu (what auto picks for them)"
        )
    if decode == "auto":
        decode = "gpu" if gpu and config.preprocess.fixed_size and gpu_decode else "cpu"
    batch_size = encoder_batch_size(config, gpu=gpu) * min(shapes, MIXED_BATCH_CHUNKS)
    return Execution(remote_args, actors, cpu_threads, gpu, decode, batch_size)


#: ``preprocess.decode: auto`` decodes on the CPU when the cluster has at least this many CPUs
#: per GPU. On an H200 node with 16 CPUs, CPU decode fed the SD-VAE encoder 1.16x (eager) and
#: 1.21x (compiled) as fast as nvJPEG in the encoder actor, which spends GPU time on decoding
#: (bench/RESULTS.md, "GPU run"); with fewer CPUs the read tasks may not keep up.
CPU_DECODE_MIN_CPUS_PER_GPU = 16


def _few_cpus_per_gpu(resources: dict[str, float]) -> bool:
    """Whether the cluster has too few CPUs per GPU to decode on the CPUs (see above)."""
    gpus = resources.get("GPU", 0.0)
    return gpus > 0 and resources.get("CPU", 0.0) / gpus < CPU_DECODE_MIN_CPUS_PER_GPU


def _actors_see_cuda(gpus: float) -> bool:
    """Whether a task given ``gpus`` GPUs sees a CUDA device (a GPU resource can be declared
    on a machine without one, as tests do)."""
    import ray

    def probe() -> bool:
        import torch

        return bool(torch.cuda.is_available())

    remote: Any = ray.remote(num_gpus=gpus, num_cpus=0)
    return bool(ray.get(remote(probe).remote()))


@dataclass(frozen=True)
class TextExecution:
    """How the text-encoder pool runs, resolved against the cluster and the image pool.

    Attributes:
        remote_args: Ray resources per text actor.
        actors: the pool size.
        cpu_threads: torch threads of a CPU actor (None on GPUs).
        gpu: the actors hold GPUs (or fractions of one).
        batch_size: rows per text-actor call (distinct captions per ``encode_prompt`` call are
            ``text.batch_size``, chunked inside the encoder).
    """

    remote_args: dict[str, Any]
    actors: int
    cpu_threads: int | None
    gpu: bool
    batch_size: int

    def describe(self) -> dict[str, Any]:
        return {
            "text_actors": self.actors,
            "text_gpus_per_actor": self.remote_args.get("num_gpus", 0),
            "text_batch_size": self.batch_size,
        }


def resolve_text_execution(config: Config, image: Execution) -> TextExecution:
    """:func:`text_execution_for` the cluster Ray is connected to."""
    import ray

    return text_execution_for(config, ray.cluster_resources(), image)


def text_execution_for(config: Config, resources: dict[str, float], image: Execution) -> TextExecution:
    """Ray resources per text actor, the pool size and torch threads, for a cluster of
    ``resources`` of which the image pool ``image`` holds its share.

    ``text.gpus_per_actor`` 0, a cluster without GPUs, or ``encoder.device: cpu``: CPU actors
    (one CPU each). Otherwise the text actors take the GPUs (or fractions: ``0.5`` shares a GPU
    with an image actor of ``ray.gpus_per_actor: 0.5``) that the image pool leaves; fewer
    actors than ``text.actors`` when fewer fit.

    Raises:
        LatentizeError: the image pool leaves no GPU room for a single text actor (both pools
            must run at once, or the job never starts).
    """
    text = config.text
    if text is None:
        raise LatentizeError("text_execution_for needs a config with a text section")
    gpus = resources.get("GPU", 0.0)
    per_actor = text.gpus_per_actor
    actors = text.actors
    batch_size = image.batch_size
    if per_actor > 0 and gpus > 0 and config.encoder.device != "cpu":
        taken = image.actors * float(image.remote_args.get("num_gpus", 0) or 0)
        # A little slack: fractions such as 1/3 do not add up exactly in floating point.
        fit = int((gpus - taken) / per_actor + 1e-6)
        if fit < 1:
            raise LatentizeError(
                f"no GPU left for the text encoder: the image encoder's {image.actors} actor(s) take {taken:g} of "
                f"the cluster's {gpus:g} GPU(s) and text.gpus_per_actor is {per_actor:g}. Lower ray.actors, share "
                "GPUs with fractions (ray.gpus_per_actor: 0.5, text.gpus_per_actor: 0.5), or set "
                "text.gpus_per_actor: 0 to encode captions on CPUs"
            )
        if actors > fit:
            logger.warning("text.actors=%d but the image pool leaves GPUs for %d; using %d", actors, fit, fit)
            actors = fit
        return TextExecution({"num_gpus": per_actor, "num_cpus": 0}, actors, None, True, batch_size)
    cpus = int(resources.get("CPU", 1))
    # CPU actors of the image pool hold a CPU each; leave one for reading and decoding.
    image_cpus = 0 if image.gpu else image.actors
    fit = max(1, cpus - image_cpus - 1)
    if actors > fit:
        logger.warning("text.actors=%d but only %d CPU(s) are free for CPU text encoders; using %d", actors, fit, fit)
        actors = fit
    if per_actor > 0:
        logger.warning("no GPU for the text encoder (GPU=%s): text actors run on CPU; slow for real models", gpus)
    threads = max(1, cpus // (actors + image_cpus))
    return TextExecution({"num_gpus": 0, "num_cpus": 1}, actors, threads, False, batch_size)
