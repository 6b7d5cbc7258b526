"""The typed configuration tree: YAML in, ``--set dotted.key=value`` overrides, validated.

One :class:`Config` describes a whole run. It is loaded from YAML with :func:`load_config`;
every key is checked against the dataclass fields below, so an unknown key or a value of the
wrong type fails at start with the key's full path (``encoder.batchsize: unknown key``). The
resolved config (defaults filled in, secrets redacted) is written into the run's manifest.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from latentize.errors import ConfigError

__all__ = [
    "AUTO_FIELD",
    "BucketGenerator",
    "Config",
    "EncoderConfig",
    "InputConfig",
    "OutputConfig",
    "PreprocessConfig",
    "RayConfig",
    "TextConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "fingerprint",
    "load_config",
    "redact",
]

#: Pillow's own hard limit (twice ``Image.MAX_IMAGE_PIXELS``): larger images are refused as
#: decompression bombs before they are decoded.
DEFAULT_MAX_PIXELS = 178_956_970
#: ``preprocess.resolution`` when nothing gives the size.
DEFAULT_RESOLUTION = 256

#: ``input.caption_field`` value meaning "the input format's default" (resolved per format).
AUTO_FIELD = "auto"


@dataclass
class InputConfig:
    """Where the image shards are and how to read them.

    ``urls`` takes one string or a list; each may be a local path or any fsspec URL, with globs
    (``s3://b/shards/*.tar``) and brace ranges (``{00000..00099}``).
    """

    urls: str | list[str] = field(default_factory=list)
    #: ``webdataset`` or ``parquet``; ``None`` infers it from the URLs' extensions.
    format: str | None = None
    #: WebDataset: member suffixes tried in order (``"jpg;png;webp"``); Parquet: the column.
    image_field: str = "jpg"
    #: Parquet: the column holding the sample key (WebDataset keys come from member names).
    key_field: str = "key"
    #: WebDataset member suffix or Parquet column carried through as ``caption``; null: none;
    #: ``auto`` (:data:`AUTO_FIELD`): the format's default, ``txt`` for WebDataset, for Parquet
    #: ``caption`` when the file has that column (img2dataset), else ``txt``. A run resolves it
    #: before it starts, so the manifest shows the column or member actually read.
    caption_field: str | None = "auto"
    #: WebDataset member suffix or Parquet column carried through as raw ``json`` text.
    json_field: str | None = "json"
    #: Passed to fsspec when opening the shards (credentials, endpoint_url, ...).
    storage_options: dict[str, Any] = field(default_factory=dict)
    #: Samples per block emitted by a read task; bounds read-side memory.
    rows_per_block: int = 64
    #: Retries (with exponential back-off) of a shard read after a transient storage error.
    retries: int = 5


@dataclass
class BucketGenerator:
    """Aspect-ratio buckets made from an area (the usual SDXL/kohya construction).

    Every ``(w, h)`` with ``w`` and ``h`` multiples of ``step``, ``w·h <= area``, each as large
    as the area allows for its ratio (for every width the largest height, and the transposes),
    with ``min_ratio <= w/h <= max_ratio``.
    """

    area: int
    step: int = 64
    min_ratio: float = 0.25
    max_ratio: float = 4.0


@dataclass
class PreprocessConfig:
    """Decode, resize and crop.

    ``resolution`` is one int (square) or ``[width, height]`` (256 when neither it,
    ``resolutions`` nor ``buckets`` is given); ``resolutions`` lists several, each written to
    its own folders in one pass; ``buckets`` replaces the fixed crop by aspect-ratio buckets.
    """

    resolution: int | list[int] | None = None
    #: Several resolutions in one pass (ints or ``[w, h]``); excludes ``resolution``.
    resolutions: list[int | list[int]] | None = None
    #: Aspect-ratio buckets: a list of ``[width, height]`` or a generator ``{area, step,
    #: min_ratio, max_ratio}``; null: one fixed size.
    buckets: list[list[int]] | BucketGenerator | None = None
    #: Also store the encoding of the horizontally flipped crop (``<column>_flipped``).
    flip: bool = False
    #: ``center``, ``random`` (seeded per key) or ``none`` (resize to exactly the resolution).
    crop: str = "center"
    #: Seed of the ``random`` crop; the offset depends on this seed and the key only.
    seed: int = 0
    #: Images with more pixels are refused as decompression bombs; null disables the check.
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    #: true: decode every image at full size and resize it with an exact antialiased bicubic
    #: filter (the reference path, bit for bit as before); false: JPEGs at least twice the
    #: target in both sides are decoded at a reduced DCT scale first (several times faster).
    exact: bool = False
    #: Where images are decoded: ``cpu`` (in the read tasks), ``gpu`` (nvJPEG in the encoder
    #: actors, bytes travel to them; what nvJPEG rejects falls back to the CPU path per sample)
    #: or ``auto`` (``gpu`` when the encoder actors have a CUDA device and the cluster has fewer
    #: than 16 CPUs per GPU, else ``cpu``; always ``cpu`` for runs of several crop sizes).
    decode: str = "auto"

    @property
    def targets(self) -> list[tuple[int, int]]:
        """``(width, height)`` of every resolution this run writes (one unless ``resolutions``)."""
        given = self.resolutions if self.resolutions is not None else [self.resolution or DEFAULT_RESOLUTION]
        return [(r, r) if isinstance(r, int) else (int(r[0]), int(r[1])) for r in given]

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the crop, when the run has one fixed size.

        Raises:
            ConfigError: the run writes several resolutions or aspect-ratio buckets.
        """
        if self.buckets is not None or len(self.targets) != 1:
            raise ConfigError("preprocess: this run has several sizes (resolutions or buckets); no single size")
        return self.targets[0]

    @property
    def reference_size(self) -> tuple[int, int]:
        """A size to describe the stored columns and the encoder batch by (both scale with the
        crop): the run's size when fixed, else its first resolution, its first listed bucket,
        or the square bucket of the generator's area."""
        if isinstance(self.buckets, list):
            return (int(self.buckets[0][0]), int(self.buckets[0][1]))
        if isinstance(self.buckets, BucketGenerator):
            side = max(self.buckets.step, int(self.buckets.area**0.5) // self.buckets.step * self.buckets.step)
            return (side, side)
        return self.targets[0]

    @property
    def fixed_size(self) -> bool:
        """One resolution and no buckets: every crop has the same shape."""
        return self.buckets is None and len(self.targets) == 1


@dataclass
class EncoderConfig:
    """Which autoencoder, and what to store from it.

    ``preset`` names a known family (``latentize models`` lists them) and fills ``type``,
    ``model``, ``subfolder`` and ``revision`` where they are left null. Without a preset, null
    ``type``/``model`` mean ``kl`` and ``stabilityai/sd-vae-ft-mse``.
    """

    #: A known encoder family: ``sd15``, ``sdxl``, ``flux1``, ``taef2``, ``vqgan-f16-16384``...
    preset: str | None = None
    #: ``kl`` (AutoencoderKL), ``vq`` (VQModel indices), ``tiny`` (TAESD family), ``dc``
    #: (AutoencoderDC), ``flux2`` (AutoencoderKLFlux2).
    type: str | None = None
    #: Hub id, local diffusers folder, or a single weights file (.safetensors, .ckpt, .pth).
    model: str | None = None
    subfolder: str | None = None
    revision: str | None = None
    #: ldm/taming YAML of a single-file checkpoint (null: a ``.yaml`` beside it, if any).
    original_config: str | None = None
    #: ``mode`` (posterior mean), ``sample`` (seeded per key) or ``moments`` (raw mean, logvar).
    sample: str = "mode"
    #: Compute dtype on the device: ``float32``, ``float16``, ``bfloat16`` or ``auto`` (bf16 on
    #: GPUs that support it, else fp16 for fp16-safe presets, else fp32 with TF32; fp32 on CPU).
    dtype: str = "auto"
    #: ``torch.compile`` the encoder once per actor (fixed input shape): true, false, or ``auto``
    #: (on CUDA for runs of one crop size; falls back to eager if compiling fails).
    compile: bool | str = "auto"
    #: Images per encoder call (also the Ray batch size of the encoder actors); null: the same
    #: pixels per batch at every resolution (256 images of 256² on a GPU, 16 on CPU).
    batch_size: int | None = None
    #: Seed of ``sample`` mode noise; the noise depends on this seed and the key only.
    seed: int = 0
    #: null: take the model config's value.
    scaling_factor: float | None = None
    #: null: take the model config's value (0 when it has none).
    shift_factor: float | None = None
    #: ``cuda``, ``cpu`` or null (CUDA when present).
    device: str | None = None


@dataclass
class OutputConfig:
    """Where and how the latents are written."""

    path: str = ""
    #: ``parquet`` or ``webdataset``.
    format: str = "parquet"
    #: Storage dtype of latents: ``float16`` or ``float32`` (VQ indices pick their own).
    dtype: str = "float16"
    #: Arrow layout of Parquet tensor columns: ``fixed_shape_tensor`` (the canonical extension
    #: type) or ``list`` (nested fixed-size lists, which readers without Arrow extension types,
    #: such as Hugging Face ``datasets``, polars and DuckDB, read with their shape).
    tensor_type: str = "fixed_shape_tensor"
    #: Passed to fsspec when writing (credentials, endpoint_url, ...).
    storage_options: dict[str, Any] = field(default_factory=dict)
    #: Parquet compression codec.
    compression: str = "zstd"
    #: Retries (with exponential back-off) of a write after a transient storage error.
    retries: int = 5
    #: Rows per staged part, which becomes one data file: fewer means shards commit sooner after
    #: their last row is encoded, more means fewer and larger data files.
    rows_per_part: int = 2048


@dataclass
class RayConfig:
    """How the job runs on Ray."""

    #: null: join the cluster of ``ray job submit`` / RAY_ADDRESS, else the one ``ray start``
    #: runs on this machine, else start a local Ray; ``local``: always start a local Ray;
    #: ``auto`` or ``HOST:PORT``: that cluster (as ``ray.init(address=...)``).
    address: str | None = None
    #: Encoder actors (one model replica each); on a GPU cluster, usually the number of GPUs.
    actors: int = 1
    gpus_per_actor: float = 1.0
    #: Shards committed in parallel by the driver's commit tasks.
    commit_parallelism: int = 4
    #: Local paths in ``input.urls`` and ``output.path`` are on a filesystem that every node
    #: mounts at the same path (NFS, Lustre, a FUSE-mounted bucket). Without it, a local path
    #: on a cluster of several nodes is refused at start: each node would see its own disk.
    shared_filesystem: bool = False
    #: Start Ray's dashboard when latentize starts a local Ray (no effect on a cluster it
    #: joins); it adds seconds of start-up, which small machines and short runs notice.
    dashboard: bool = False


@dataclass
class TextConfig:
    """Caption embeddings computed in the same pass as the latents (absent or null: no text).

    ``preset`` names the diffusers pipeline whose ``encode_prompt`` is reproduced (``latentize
    models --text`` lists them); only that pipeline's text encoders and tokenizers are loaded.
    """

    #: The pipeline family: ``sd15``, ``sd2``, ``sdxl``, ``sd3``, ``flux1``, ``pixart-sigma``,
    #: ``sana``, ``lumina2``, ``qwen-image``.
    preset: str
    #: Hub id or local diffusers pipeline folder (only its ``text_encoder*`` and ``tokenizer*``
    #: folders are read); null: the preset's hub id.
    model: str | None = None
    #: Hub revision of ``model``; null: the preset's (usually the default branch).
    revision: str | None = None
    #: ``padded``: exactly the pipeline's tensors; ``trimmed``: ``prompt_embeds`` cut to the
    #: attention mask's length, only for families whose denoiser masks padding.
    storage: str = "padded"
    #: Tokens of the T5 / Gemma / Qwen encoder; null: the pipeline's default (resolved at load).
    max_sequence_length: int | None = None
    #: Compute dtype, as ``encoder.dtype`` (``auto``: bf16 on GPUs that support it, else fp32).
    dtype: str = "auto"
    #: Distinct captions per text-encoder call (halved on CUDA out-of-memory); null: 64 on a
    #: GPU, 16 on CPU.
    batch_size: int | None = None
    #: Text-encoder replicas: their own Ray actor pool.
    actors: int = 1
    #: GPUs per text-encoder actor; a fraction shares a GPU with the image encoder.
    gpus_per_actor: float = 1.0


@dataclass
class Config:
    """One run of latentize."""

    input: InputConfig = field(default_factory=InputConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    #: Caption embeddings (null: none).
    text: TextConfig | None = None


# Choices checked at load time; the components themselves are looked up in registries later.
_CHOICES: dict[str, tuple[Any, ...]] = {
    "input.format": (None, "webdataset", "parquet"),
    "preprocess.crop": ("center", "random", "none"),
    "preprocess.decode": ("auto", "cpu", "gpu"),
    # Mirrors the encoder registry (a test keeps them equal) so config stays free of torch.
    "encoder.type": (
        None,
        "kl",
        "vq",
        "tiny",
        "dc",
        "flux2",
        "wan",
        "qwenimage",
        "hunyuanimage",
        "janus",
        "emu3",
        "chameleon",
    ),
    "encoder.sample": ("mode", "sample", "moments"),
    "encoder.dtype": ("float32", "float16", "bfloat16", "auto"),
    "encoder.compile": (True, False, "auto"),
    "encoder.device": (None, "cuda", "cpu"),
    "output.format": ("parquet", "webdataset"),
    "output.dtype": ("float16", "float32"),
    "output.tensor_type": ("fixed_shape_tensor", "list"),
}

# The same for the optional ``text`` section.
_TEXT_CHOICES: dict[str, tuple[Any, ...]] = {
    "storage": ("padded", "trimmed"),
    "dtype": ("float32", "float16", "bfloat16", "auto"),
}

#: Encoder types without a posterior to sample or store moments of: only ``encoder.sample: mode``.
_DETERMINISTIC_TYPES: tuple[str, ...] = ("vq", "tiny", "dc", "janus", "emu3", "chameleon")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Checks ``value`` against the annotation ``tp``; returns it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        specific = None
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                # A mapping meant for a section: its own message names the bad key.
                if isinstance(value, Mapping) and dataclasses.is_dataclass(arg):
                    specific = exc
        if specific is not None:
            raise specific
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}: expected null, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return _build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"{key_path}: unknown key (valid keys here: {', '.join(fields)})")
        tp = hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, key_path)
        else:
            kwargs[key] = _coerce(value, tp, key_path)
    missing = [
        f.name
        for f in fields.values()
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{path or 'config'}: missing key(s): {', '.join(missing)}")
    return cls(**kwargs)


#: What an encoder section without preset, type or model means: the Stable Diffusion VAE (ft-MSE).
DEFAULT_ENCODER_TYPE = "kl"
DEFAULT_MODEL = "stabilityai/sd-vae-ft-mse"


def _resolve_preset(enc: EncoderConfig) -> None:
    """Fills null ``type``/``model``/``subfolder``/``revision`` from ``enc.preset``; a preset
    whose weights ship with latentize (``taef2``) fills ``model`` with the packaged file."""
    if enc.preset is None:
        enc.type = enc.type or DEFAULT_ENCODER_TYPE
        enc.model = enc.model or DEFAULT_MODEL
        return
    from latentize.presets import PRESETS

    preset = PRESETS.get(enc.preset)
    if enc.type is not None and enc.type != preset.type:
        raise ConfigError(f"encoder.type: {enc.type!r} contradicts preset {preset.name!r} (type {preset.type!r})")
    enc.type = preset.type
    if enc.model is None and preset.model is None and preset.packaged is not None:
        from latentize.weights import packaged_weights

        # The absolute path, so that the manifest names the file that was read.
        enc.model = str(packaged_weights(preset.packaged))
    elif enc.model is None:
        if preset.model is None:
            raise ConfigError(
                f"encoder.model: preset {preset.name!r} has no public diffusers weights; set "
                f"encoder.model to its weights file ({preset.notes})"
            )
        enc.model = preset.model
        enc.subfolder = enc.subfolder if enc.subfolder is not None else preset.subfolder
        enc.revision = enc.revision if enc.revision is not None else preset.revision


def _validate(cfg: Config) -> None:
    _resolve_preset(cfg.encoder)
    flat = config_to_dict(cfg)
    for dotted, choices in _CHOICES.items():
        section, key = dotted.split(".")
        value = flat[section][key]
        if value not in choices:
            shown = ", ".join("null" if c is None else str(c) for c in choices)
            raise ConfigError(f"{dotted}: {value!r} is not one of: {shown}")
    _validate_sizes(cfg.preprocess)
    if cfg.text is not None:
        _validate_text(cfg.text)
    if cfg.encoder.batch_size is not None and cfg.encoder.batch_size < 1:
        raise ConfigError("encoder.batch_size: must be >= 1")
    if cfg.ray.actors < 1:
        raise ConfigError("ray.actors: must be >= 1")
    if cfg.input.rows_per_block < 1:
        raise ConfigError("input.rows_per_block: must be >= 1")
    if cfg.output.rows_per_part < 1:
        raise ConfigError("output.rows_per_part: must be >= 1")
    if cfg.encoder.type in _DETERMINISTIC_TYPES and cfg.encoder.sample != "mode":
        raise ConfigError(
            f"encoder.sample: {cfg.encoder.type} encoders are deterministic (VQ stores codebook "
            f"indices); only 'mode' applies (got {cfg.encoder.sample!r})"
        )


def _validate_text(text: TextConfig) -> None:
    """Checks the ``text`` section against its preset and fills ``model``, ``revision`` and
    ``max_sequence_length`` from it where null (the resolved config shows what was used)."""
    from latentize.encoders.text.presets import TEXT_PRESETS

    for key, choices in _TEXT_CHOICES.items():
        value = getattr(text, key)
        if value not in choices:
            raise ConfigError(f"text.{key}: {value!r} is not one of: {', '.join(str(c) for c in choices)}")
    preset = TEXT_PRESETS.get(text.preset)
    if text.storage == "trimmed" and not preset.masks_padding:
        raise ConfigError(
            f"text.storage: 'trimmed' is refused for preset {preset.name!r}: {preset.padding_reason} "
            "Dropping the padded positions would change what the model sees; use text.storage: padded."
        )
    if text.storage == "padded" and not preset.fixed_length:
        raise ConfigError(f"text.storage: 'padded' is refused for preset {preset.name!r}: {preset.padding_reason}")
    for key, value in (("batch_size", text.batch_size), ("max_sequence_length", text.max_sequence_length)):
        if value is not None and value < 1:
            raise ConfigError(f"text.{key}: must be >= 1")
    if text.actors < 1:
        raise ConfigError("text.actors: must be >= 1")
    if text.gpus_per_actor < 0:
        raise ConfigError("text.gpus_per_actor: must be >= 0 (0: the text encoder runs on CPU)")
    if text.max_sequence_length is not None and preset.max_sequence_length is None:
        raise ConfigError(
            f"text.max_sequence_length: preset {preset.name!r} encodes with CLIP only, whose length is fixed "
            f"by its tokenizer ({preset.clip_length} tokens); leave it null"
        )
    limit = preset.max_sequence_length_limit
    if text.max_sequence_length is not None and limit is not None and text.max_sequence_length > limit:
        raise ConfigError(
            f"text.max_sequence_length: {text.max_sequence_length} exceeds {limit}, the most the "
            f"{preset.pipeline_class} accepts"
        )
    text.model = text.model or preset.model
    if text.model == preset.model and text.revision is None:
        text.revision = preset.revision
    if text.max_sequence_length is None:
        text.max_sequence_length = preset.max_sequence_length


def _validate_sizes(pre: PreprocessConfig) -> None:
    if pre.resolution is not None and pre.resolutions is not None:
        raise ConfigError(
            "preprocess.resolutions: give either preprocess.resolution (one size) or preprocess.resolutions "
            "(several, in one pass), not both"
        )
    if pre.resolution is not None and pre.buckets is not None:
        raise ConfigError(
            "preprocess.buckets: the buckets give the sizes; leave preprocess.resolution unset, or use "
            "preprocess.resolutions to write the buckets at several resolutions"
        )
    if pre.resolutions is not None and not pre.resolutions:
        raise ConfigError("preprocess.resolutions: give at least one resolution")
    for name, given in (("resolution", [pre.resolution]), ("resolutions", pre.resolutions or [])):
        for value in given:
            if isinstance(value, list) and len(value) != 2:
                raise ConfigError(f"preprocess.{name}: give one int or [width, height], got {value}")
    if min(min(t) for t in pre.targets) < 8:
        raise ConfigError("preprocess.resolution: must be at least 8 pixels per side")
    if len(set(pre.targets)) != len(pre.targets):
        raise ConfigError(f"preprocess.resolutions: {pre.targets} repeats a resolution")
    if isinstance(pre.buckets, list):
        for pair in pre.buckets:
            if len(pair) != 2 or min(pair) < 8:
                raise ConfigError(f"preprocess.buckets: {pair} is not a [width, height] of at least 8 pixels")
        if not pre.buckets:
            raise ConfigError("preprocess.buckets: the list is empty; give [width, height] pairs or null")
    elif isinstance(pre.buckets, BucketGenerator):
        g = pre.buckets
        if g.step < 1 or g.area < g.step * g.step:
            raise ConfigError(f"preprocess.buckets: area {g.area} holds no {g.step}x{g.step} bucket")
        if not 0 < g.min_ratio <= 1 <= g.max_ratio:
            raise ConfigError("preprocess.buckets: need 0 < min_ratio <= 1 <= max_ratio")
    if pre.resolution is None and pre.resolutions is None and pre.buckets is None:
        pre.resolution = DEFAULT_RESOLUTION  # the resolved config shows what was used


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Builds and validates a :class:`Config` from plain data (a parsed YAML document)."""
    cfg = _build(Config, data, "")
    _validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain data (a deep copy), in field order."""
    return dataclasses.asdict(cfg)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    dotted, raw = item.split("=", 1)
    keys = [k for k in dotted.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set {item!r}: empty key")
    # YAML parses the value so that `--set encoder.batch_size=64` is an int and
    # `--set preprocess.resolution=[512,768]` a list, exactly as in the file.
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from None
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies ``dotted.key=value`` overrides to plain config data; returns a new dict."""
    out = copy.deepcopy(data)
    for item in overrides:
        keys, value = _parse_override(item)
        node = out
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {k} is not a section")
            node = nxt
        node[keys[-1]] = value
    return out


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    base: Mapping[str, Any] | None = None,
) -> Config:
    """Loads a YAML config file (or ``base`` data), applies ``--set`` overrides, validates.

    Raises:
        ConfigError: unreadable file, invalid YAML, unknown key or wrong type.
    """
    data: dict[str, Any] = copy.deepcopy(dict(base)) if base is not None else {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data.update(loaded or {})
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data)


_SECRET_HINTS = ("key", "secret", "token", "password", "passwd", "credential", "session", "auth")


def redact(value: Any) -> Any:
    """Deep copy of ``value`` with secret-looking mapping values replaced by ``"***"``.

    Used on everything that leaves the driver in text: manifest, markers, logs.
    """
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            lowered = str(k).lower()
            # ``*_field`` keys (``input.key_field``) name columns/members, never credentials.
            secret = any(h in lowered for h in _SECRET_HINTS) and not lowered.endswith("_field")
            if secret and not isinstance(v, Mapping):
                out[k] = "***" if v is not None else None
            else:
                out[k] = redact(v)
        return out
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def fingerprint(cfg: Config) -> str:
    """Hash of everything that decides what is written: the input list and the encoding
    semantics, not the output path, credentials, batch size or Ray sizing.

    The ``text`` section counts only when present (so outputs written without it keep their
    fingerprint), without its batch size and Ray sizing (``actors``, ``gpus_per_actor``).

    Two runs with equal fingerprints produce identical data rows, so a rerun into the same
    output may resume; a different fingerprint is refused there. The input URLs count because
    shard ids (and so the commit markers) are derived from the whole list.
    """
    data = config_to_dict(cfg)
    relevant = {
        "input": {k: v for k, v in data["input"].items() if k not in ("storage_options", "rows_per_block", "retries")},
        "preprocess": data["preprocess"],
        "encoder": {k: v for k, v in data["encoder"].items() if k not in ("batch_size", "device", "compile")},
        "output": {
            k: v for k, v in data["output"].items() if k not in ("path", "storage_options", "retries", "rows_per_part")
        },
    }
    if data["text"] is not None:
        relevant["text"] = {
            k: v for k, v in data["text"].items() if k not in ("batch_size", "actors", "gpus_per_actor")
        }
    blob = json.dumps(relevant, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
