"""What every encoder shares: model resolution, device and dtype, chunked OOM-safe encoding.

An encoder lives in two places:

* on the driver, :meth:`TorchEncoder.inspect` reads only the model's *config* (no weights) and
  returns an :class:`EncoderSpec`: output columns, constants, identity. This fails fast on a bad
  model id before any Ray work starts, and feeds the manifest.
* in each Ray actor, the encoder instance holds the weights on the device and turns uint8 pixel
  batches into output arrays with :meth:`TorchEncoder.encode`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, ParamSpec, TypeVar, cast

import numpy as np

from latentize import hub
from latentize.config import Config
from latentize.errors import LatentizeError
from latentize.registry import Registry

if TYPE_CHECKING:
    import torch

    from latentize.encoders.decoding import DecoderParts

__all__ = [
    "ENCODERS",
    "EncodeResult",
    "EncoderSpec",
    "Staged",
    "TorchEncoder",
    "default_batch_size",
    "encoder_batch_size",
    "pick_device",
    "resolve_dtype",
    "resolved_source",
    "stable_seed",
    "wants_compile",
]

logger = logging.getLogger(__name__)

#: Encoder classes by ``encoder.type``.
ENCODERS: Registry[type[TorchEncoder]] = Registry("encoder type", config_key="encoder.type")


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _inference_mode(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``@torch.inference_mode()`` that imports torch when called rather than when defined.

    The driver imports every encoder class (the registry) but only reads model configs: keeping
    torch (2-3 s and ~600 MB) out of it is start-up time on every run.
    """

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        import torch

        with torch.inference_mode():
            return fn(*args, **kwargs)

    return wrapper


def stable_seed(seed: int, key: str) -> int:
    """A 63-bit seed that depends only on ``seed`` and ``key`` (not on process or batch).

    Python's ``hash()`` is salted per process, so it cannot be used for reproducible noise.
    """
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def resolve_dtype(config: Config, device: torch.device) -> torch.dtype:
    """The compute dtype: ``encoder.dtype``, or for ``auto`` the policy of the precision issue.

    ``auto``: bfloat16 on GPUs that support it (the range of float32: no overflow), else
    float16 for presets known to be fp16-safe (fix-VAEs, the TAESD family), else float32;
    always float32 on CPU.
    """
    import torch

    name = config.encoder.dtype
    if name != "auto":
        return cast("torch.dtype", getattr(torch, name))
    if device.type != "cuda":
        return torch.float32
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16
    from latentize.presets import PRESETS

    preset = PRESETS.get(config.encoder.preset) if config.encoder.preset else None
    return torch.float16 if preset is not None and preset.fp16_safe else torch.float32


def resolved_source(config: Config) -> tuple[str, str]:
    """``(encoder.type, encoder.model)`` of a validated config (presets fill both in)."""
    kind, model = config.encoder.type, config.encoder.model
    if kind is None or model is None:
        raise LatentizeError("encoder.type and encoder.model are unresolved; load the config with load_config")
    return kind, model


def pick_device(requested: str | None) -> torch.device:
    """``cuda`` when present (or when asked), else ``cpu``."""
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise LatentizeError("encoder.device is 'cuda' but no CUDA device is visible to this actor")
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder will produce, known on the driver before any weights are loaded.

    Attributes:
        columns: output column name -> (per-sample shape, numpy dtype name) as *stored*.
        constants: normalisation constants applied (or, for ``moments``, to apply later).
        identity: model id, subfolder, revision, resolved commit / sha256 of the weights.
        model_class: the diffusers class name.
        input_range: pixel range fed to the encoder, e.g. ``"[-1, 1]"``.
    """

    type: str
    model_class: str
    columns: dict[str, tuple[tuple[int, ...], str]]
    constants: dict[str, Any]
    identity: dict[str, Any]
    input_range: str
    downsample: int
    latent_channels: int
    model_config: dict[str, Any] = field(default_factory=dict, compare=False)

    def columns_for(self, size: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], str]]:
        """The stored columns of crops of ``size`` ``(width, height)``: the last two dims of each
        shape are the latent grid, ``(height // downsample, width // downsample)``."""
        grid = (size[1] // self.downsample, size[0] // self.downsample)
        return {name: ((*shape[:-2], *grid), dtype) for name, (shape, dtype) in self.columns.items()}

    def to_manifest(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "model_class": self.model_class,
            "input_range": self.input_range,
            "downsample_factor": self.downsample,
            "latent_channels": self.latent_channels,
            "constants": self.constants,
            "identity": self.identity,
            "columns": {k: {"shape": list(s), "dtype": d} for k, (s, d) in self.columns.items()},
        }


@dataclass
class Staged:
    """Pixels on their way to the device: the device tensor, the event that marks the end of
    its copy (None when it is ready), and the pinned host buffer the copy reads from."""

    tensor: torch.Tensor
    ready: Any
    keep: torch.Tensor | None = None


def default_batch_size(size: tuple[int, int], device: torch.device | str) -> int:
    """``encoder.batch_size`` when null: the same pixels per batch at every resolution.

    On a GPU 256 images of 256² (64 of 512², 16 of 1024²: a power of two, 1 to 1024), enough
    to keep an 80 GB card busy with an SD-class encoder in bfloat16 while a CUDA out-of-memory
    still halves it; on CPU 16 of 256², since batches there only amortise Python overhead.
    """
    width, height = size
    kind = device if isinstance(device, str) else device.type
    images = (256 if kind.split(":")[0] == "cuda" else 16) * (256 * 256) / (width * height)
    return int(min(1024, max(1, 2 ** round(math.log2(max(images, 1.0))))))


def encoder_batch_size(config: Config, *, gpu: bool) -> int:
    """The images per encoder call a run uses: ``encoder.batch_size``, else
    :func:`default_batch_size` of the run's reference size on a GPU (``gpu``) or CPU encoder."""
    return config.encoder.batch_size or default_batch_size(config.preprocess.reference_size, "cuda" if gpu else "cpu")


@dataclass
class EncodeResult:
    """Output of :meth:`TorchEncoder.encode` for N images.

    ``arrays`` hold one array per output column, shape (N, *column shape), in the stored dtype;
    rows listed in ``errors`` (index -> reason) hold zeros and must become error rows.
    """

    arrays: dict[str, np.ndarray]
    errors: dict[int, str]
    chunk_size: int
    reencoded_fp32: int
    #: Positions of the samples re-encoded in float32.
    reencoded: list[int] = field(default_factory=list)


class TorchEncoder:
    """Base class: weight sources, device and dtype, chunking, OOM and NaN policy.

    Where the weights come from is resolved here for every encoder type: a hub id or a local
    diffusers folder loads with the subclass's ``diffusers_class``; a single weights file loads
    with the type's entry in :data:`~latentize.encoders.files.FILE_LOADERS`. Subclasses set
    ``diffusers_class`` and implement :meth:`spec_from` (geometry, columns, constants from a
    model config) and :meth:`_forward`.
    """

    #: Name of the diffusers model class (``AutoencoderKL``...) for hub ids and folders.
    diffusers_class: ClassVar[str] = ""

    def __init__(self, *, config: Config, spec: EncoderSpec, device: torch.device | None = None) -> None:
        import torch

        self.config = config
        self.spec = spec
        self.device = device or pick_device(config.encoder.device)
        dtype = resolve_dtype(config, self.device)
        if self.device.type == "cpu" and dtype == torch.float16:
            # Half-precision convolutions are slow or missing on CPU; results would not
            # improve by it, so compute in float32 there.
            logger.warning("encoder.dtype float16 is not supported on CPU; computing in float32")
            dtype = torch.float32
        self.dtype = dtype
        model = self._drop_decoder(self._load())
        self.memory_format = _memory_format(model, self.device)
        self.model = model.to(self.device, dtype=self.dtype).to(memory_format=self.memory_format).eval()
        self._model_fp32: torch.nn.Module | None = None
        self.chunk_size = config.encoder.batch_size or default_batch_size(config.preprocess.reference_size, self.device)
        # Runs of several crop sizes chunk by pixels: chunk_size images of the reference size.
        reference = config.preprocess.reference_size
        self.chunk_pixels = self.chunk_size * reference[0] * reference[1]
        # One model call at a time (memory, and chunk_size changes on OOM); copies run outside.
        self._lock = threading.Lock()
        self._local = threading.local()
        if self.device.type == "cuda" and self.dtype == torch.float32:
            # TF32 tensor cores for float32 convolutions and matmuls: the speed of fp16 math
            # with float32's range, within the VAE's own noise.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self._eager = self.model
        self._compiled = False
        #: ``encoder.compile: auto`` compiled the model: a failing first call falls back to eager.
        self._compile_may_fail = False
        if wants_compile(config, self.device):
            self.model = self._compile(self.model)
            self._compile_may_fail = config.encoder.compile == "auto"
        logger.info(
            "encoder %s on %s in %s%s",
            type(self).__name__,
            self.device,
            self.dtype,
            " (compiled)" if self._compiled else "",
        )

    def _compile(self, model: torch.nn.Module) -> torch.nn.Module:
        """Compiles the encoder network once for a fixed input shape (chunks are padded to it)."""
        import copy

        import torch

        self._compiled = True
        inner = getattr(model, "encoder", None)
        if not isinstance(inner, torch.nn.Module):
            return cast(torch.nn.Module, torch.compile(model, dynamic=False))
        compiled = copy.copy(model)  # a shallow copy: the eager model stays usable (fp32 redo)
        compiled._modules = dict(model._modules)
        compiled._modules["encoder"] = cast(torch.nn.Module, torch.compile(inner, dynamic=False))
        return compiled

    # -- subclass interface -------------------------------------------------------------
    @classmethod
    def spec_from(cls, model_config: dict[str, Any], config: Config, identity: dict[str, Any]) -> EncoderSpec:
        """The spec of a model with this (diffusers-style) config."""
        raise NotImplementedError  # pragma: no cover - abstract

    @classmethod
    def decoder(cls, *, encoder: Mapping[str, Any], config: Config, override: str | None) -> DecoderParts:
        """This type's decoder, for the QA report's reconstructions: the model that turns stored
        columns back into images, and the decode step (undo the stored normalisation, decode).

        Runs where torch is available (the QA's reconstruction step), never on a light driver.

        Args:
            encoder: the manifest's ``encoder`` section (type, constants, identity, columns).
            config: the run's resolved config.
            override: the user's ``--decoder`` (where the decoder weights are), or None.

        Raises:
            LatentizeError: no decoder can be found or loaded; the message says how to fix it.
        """
        raise NotImplementedError  # pragma: no cover - abstract

    @classmethod
    def _diffusers_cls(cls) -> Any:
        import diffusers

        return getattr(diffusers, cls.diffusers_class)

    @classmethod
    def inspect(cls, config: Config) -> EncoderSpec:
        """Reads the model's config (never its weights) and returns what encoding will produce."""
        from latentize.encoders.files import FILE_LOADERS, is_single_file

        enc = config.encoder
        kind, model = resolved_source(config)
        if is_single_file(model):
            path = Path(model).expanduser().resolve()
            if kind not in FILE_LOADERS:
                raise LatentizeError(
                    f"encoder.model: {model} is a single weights file, but {kind} models load from a model "
                    "folder (config.json beside the weights, as save_pretrained writes it) or a hub id only; "
                    f"single files are accepted for encoder.type {', '.join(FILE_LOADERS.names())}"
                )
            model_config = FILE_LOADERS.get(kind).read_config(path, config)
            identity = {"model": str(path), "source": "file", "sha256": hub.sha256_file(path)}
        else:
            model_config, identity = hub.load_model_config(model, subfolder=enc.subfolder, revision=enc.revision)
        return cls.spec_from(model_config, config, identity)

    def _load(self) -> torch.nn.Module:
        """The model with its weights, from wherever ``encoder.model`` points."""
        from latentize.encoders.files import FILE_LOADERS, is_single_file

        kind, model = resolved_source(self.config)
        if is_single_file(model):
            path = Path(model).expanduser().resolve()
            return FILE_LOADERS.get(kind).load(path, self.config, self.spec.model_config)
        enc = self.config.encoder
        return cast(
            "torch.nn.Module",
            hub.from_pretrained(
                self._diffusers_cls(), enc.model, subfolder=enc.subfolder, revision=enc.revision, torch_dtype=self.dtype
            ),
        )

    def _drop_decoder(self, model: torch.nn.Module) -> torch.nn.Module:
        """Encoding never decodes: replacing the decoder halves the actor's weight memory."""
        import torch

        if isinstance(getattr(model, "decoder", None), torch.nn.Module):
            model.decoder = torch.nn.Identity()
        return model

    def _forward(self, model: torch.nn.Module, x: torch.Tensor, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Encodes ``x`` (n, 3, H, W) in the model's dtype and input range.

        Returns float32 or integer tensors (n, ...) per output column, before storage casting.
        """
        raise NotImplementedError  # pragma: no cover - abstract

    # -- shared machinery ---------------------------------------------------------------
    def _to_input(self, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """uint8 (n, H, W, 3) on the device -> (n, 3, H, W) ``dtype`` in the encoder's range."""
        import torch

        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).to(torch.float32) / 255.0
        if self.spec.input_range == "[-1, 1]":
            x = x * 2.0 - 1.0
        return x.to(dtype).contiguous(memory_format=self.memory_format)

    def stage(self, pixels: np.ndarray | torch.Tensor) -> Staged:
        """Starts moving uint8 pixels (N, H, W, 3) to the device; returns at once on CUDA.

        On CUDA the host array is copied into a pinned buffer and sent on this thread's side
        stream, so that with two calls in flight (Ray's threaded actor) the copy of one batch
        overlaps the compute of the previous one. A tensor already on the device (decoded
        there) is used as it is.
        """
        import torch

        if isinstance(pixels, torch.Tensor) and pixels.device == self.device:
            return Staged(pixels, None)
        host = pixels if isinstance(pixels, torch.Tensor) else torch.as_tensor(np.asarray(pixels))
        if self.device.type != "cuda":
            return Staged(host.to(self.device), None)
        pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
        pinned.copy_(host)
        stream = self._side_stream()
        with torch.cuda.stream(stream):
            on_device = pinned.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        return Staged(on_device, ready, keep=pinned)

    def _side_stream(self) -> Any:
        import torch

        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(device=self.device)
        return stream

    @_inference_mode
    def _run(
        self,
        model: torch.nn.Module,
        dtype: torch.dtype,
        pixels: torch.Tensor,
        keys: Sequence[str],
        *,
        chunking: str = "fixed",
    ) -> dict[str, torch.Tensor]:
        """Runs the model over ``pixels`` (on the device) in chunks; halves the chunk on CUDA
        out-of-memory and retries. Returns the outputs on the device.

        ``chunking``:

        * ``fixed``: every chunk has exactly ``chunk_size`` images (a short last chunk is padded
          with copies of its last image): convolution kernels may round differently for
          another batch shape, so one fixed shape makes a sample's bytes independent of how
          Ray formed its batch;
        * ``one``: one image at a time (also one fixed shape);
        * ``mixed``: runs of several crop sizes (aspect buckets, resolutions): chunks of the
          same pixels whatever the size (``chunk_pixels``), not padded (padding every size's
          last chunk would waste up to a chunk per size and batch), except to a power of two
          when compiled (a few static shapes).
        """
        import torch

        outputs: list[dict[str, torch.Tensor]] = []
        start = 0
        n = pixels.shape[0]
        area = int(pixels.shape[1]) * int(pixels.shape[2])
        while start < n:
            size, shape = self._chunk(chunking, n - start, area)
            try:
                chunk = pixels[start : start + size]
                chunk_keys = list(keys[start : start + size])
                pad = shape - size
                if pad:
                    chunk = torch.cat([chunk, chunk[-1:].expand(pad, *chunk.shape[1:])])
                    chunk_keys += [chunk_keys[-1]] * pad
                x = self._to_input(chunk, dtype)
                out = {k: v[:size] for k, v in self._forward(model, x, chunk_keys).items()}
            except torch.cuda.OutOfMemoryError:
                if shape == 1:
                    raise
                torch.cuda.empty_cache()
                self.chunk_size = max(1, self.chunk_size // 2)
                self.chunk_pixels = max(1, self.chunk_pixels // 2)
                logger.warning("CUDA out of memory; encoder chunk halved to %d", self.chunk_size)
                continue
            outputs.append({k: v.detach() for k, v in out.items()})
            start += size
        return {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}

    def _chunk(self, chunking: str, remaining: int, area: int) -> tuple[int, int]:
        """``(images in this chunk, padded shape)``."""
        if chunking == "one":
            return 1, 1
        if chunking == "fixed":
            return min(self.chunk_size, remaining), self.chunk_size
        cap = max(1, self.chunk_pixels // max(area, 1))
        size = min(cap, remaining)
        return size, (min(cap, 1 << (size - 1).bit_length()) if self._compiled else size)

    def _fp32_model(self) -> torch.nn.Module:
        import torch

        if self._model_fp32 is None:
            import copy

            self._model_fp32 = copy.deepcopy(self._eager).to(torch.float32)
        return self._model_fp32

    # Inference mode for the whole call: ``_run`` returns inference tensors, and the float32
    # re-encode below writes into them in place (not allowed outside inference mode).
    @_inference_mode
    def encode(
        self, pixels: np.ndarray | torch.Tensor | Staged, keys: Sequence[str], *, mixed: bool = False
    ) -> EncodeResult:
        """Encodes uint8 pixels.

        Safe to call from several threads at once: the copies to and from the device run
        outside the lock that serialises the model, so they overlap another call's compute.

        Args:
            pixels: (N, H, W, 3) uint8, values 0..255: a host array (may be a read-only view),
                a tensor (on the device, e.g. decoded there), or what :meth:`stage` returned.
            keys: the N sample keys (seed the per-key noise of ``sample`` mode).
            mixed: the run has crops of several sizes; this call holds one of them (chunks of
                constant pixels, see :meth:`_run`).

        Returns:
            An :class:`EncodeResult`; samples whose outputs are not finite are re-encoded in
            float32 once, and become errors if they still are not.
        """
        import torch

        n = len(keys)
        if n == 0:
            return EncodeResult(self._empty(0), {}, self.chunk_size, 0)
        staged = pixels if isinstance(pixels, Staged) else self.stage(pixels)
        with self._lock:
            if staged.ready is not None:
                torch.cuda.current_stream(self.device).wait_event(staged.ready)
                staged.tensor.record_stream(torch.cuda.current_stream(self.device))
            out, reencoded, bad = self._encode_on_device(staged.tensor, keys, mixed=mixed)
            host, done = self._copy_back(out)
            chunk_size = self.chunk_size
        if done is not None:
            done.synchronize()
        errors = {int(i): "non-finite latent values (NaN or Inf) even in float32" for i in np.flatnonzero(bad)}
        arrays: dict[str, np.ndarray] = {}
        for name, (_, dtype) in self.spec.columns.items():
            value = host[name].numpy().astype(dtype, copy=False)
            if errors:
                value = value.copy()
                value[list(errors)] = 0
            arrays[name] = value
        return EncodeResult(arrays, errors, chunk_size, len(reencoded), reencoded)

    def _encode_on_device(
        self, tensor: torch.Tensor, keys: Sequence[str], *, mixed: bool = False
    ) -> tuple[dict[str, torch.Tensor], list[int], np.ndarray]:
        """The model over ``tensor``, then the float32 redo of non-finite samples.

        Returns the outputs (on the device), the positions re-encoded and a (N,) bool array of
        the samples still not finite.
        """
        import torch

        chunking = "mixed" if mixed else "fixed"
        try:
            out = self._run(self.model, self.dtype, tensor, keys, chunking=chunking)
        except Exception as exc:
            if not self._compile_may_fail or isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            # encoder.compile auto: a model that torch.compile cannot handle is encoded eagerly
            # (the compiler's error surfaces at the first call, not at torch.compile).
            logger.warning("torch.compile failed (%s: %s); encoding without it", type(exc).__name__, exc)
            self.model, self._compiled = self._eager, False
            out = self._run(self.model, self.dtype, tensor, keys, chunking=chunking)
        self._compile_may_fail = False
        bad = self._nonfinite(out)
        reencoded: list[int] = []
        if bad.any() and self.dtype != torch.float32:
            idx = torch.nonzero(bad).flatten()
            logger.warning("%d sample(s) gave non-finite latents in %s; re-encoding in float32", len(idx), self.dtype)
            # One at a time: a fixed shape whatever else failed in this batch (bad samples are rare).
            redo = self._run(
                self._fp32_model(), torch.float32, tensor[idx], [keys[i] for i in idx.tolist()], chunking="one"
            )
            for k in out:
                out[k][idx] = redo[k].to(out[k].dtype)
            reencoded = idx.tolist()
            bad = self._nonfinite(out)
        return out, reencoded, bad.cpu().numpy()

    def _copy_back(self, out: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
        """Starts copying the outputs to pinned host memory; returns them and an event to wait on
        (None when they are already on the host)."""
        import torch

        if self.device.type != "cuda":
            return out, None
        host = {}
        for name, value in out.items():
            host[name] = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            host[name].copy_(value, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        return host, done

    @staticmethod
    def _nonfinite(out: Mapping[str, torch.Tensor]) -> torch.Tensor:
        import torch

        bad = None
        for v in out.values():
            if not v.is_floating_point():
                continue
            b = ~torch.isfinite(v.reshape(v.shape[0], -1)).all(dim=1)
            bad = b if bad is None else bad | b
        if bad is None:
            first = next(iter(out.values()))
            bad = torch.zeros(first.shape[0], dtype=torch.bool)
        return bad

    def _empty(self, n: int) -> dict[str, np.ndarray]:
        return {name: np.zeros((n, *shape), dtype=dtype) for name, (shape, dtype) in self.spec.columns.items()}


def wants_compile(config: Config, device: torch.device) -> bool:
    """Whether the encoder is ``torch.compile``-d: ``encoder.compile`` true, or ``auto`` on a
    CUDA device in a run of one crop size (each new input shape compiles again, and a run of
    buckets or several resolutions has many).

    On an H200 the compiled SD-VAE encoder ran 2.3x the eager one at 256² and 512² in bf16 after
    a 12.5 s compile (bench/RESULTS.md, "GPU run"); on a CPU compiling takes minutes.
    """
    setting = config.encoder.compile
    if setting == "auto":
        return device.type == "cuda" and config.preprocess.fixed_size
    return bool(setting)


def _memory_format(model: torch.nn.Module, device: torch.device) -> torch.memory_format:
    """The layout the model and its inputs take on ``device``.

    Channels-last (NHWC) is what oneDNN's and cuDNN's fastest convolutions take: 1.5x on a
    2-core CPU for a small VAE. On CUDA, PyTorch's eager GroupNorm kernel works on NCHW and
    copies a channels-last input into it, so models with GroupNorm (the KL and VQ autoencoders)
    stay NCHW there: 1.33x (256²) and 1.36x (512²) the channels-last speed of the bf16 SD-VAE
    encoder on an H200 (bench/RESULTS.md, "GPU run"). Compiled, both layouts ran alike. Models
    with 3-D convolutions stay NCHW everywhere (channels-last is defined for 4-D tensors only).
    """
    import torch

    if any(isinstance(m, torch.nn.Conv3d) for m in model.modules()):
        # Channels-last is a 4-D layout; 3-D convolutions (the video VAEs, Emu3's tokenizer) take 5-D weights.
        return torch.contiguous_format
    if device.type == "cuda" and any(isinstance(m, torch.nn.GroupNorm) for m in model.modules()):
        return torch.contiguous_format
    return torch.channels_last
