"""Image tokenizers of autoregressive image models, through transformers: Janus (LlamaGen's VQ-16),
Emu3 and Chameleon (``JanusVQVAE``, ``Emu3VQVAE``, ``ChameleonVQVAE``).

The stored ``indices`` are the model's own ``encode(pixel_values).image_tokens`` as an h × w grid
(``image_tokens`` is the codebook index of each position, before any mapping to the language
model's vocabulary), in the smallest integer dtype that holds the codebook.

Pixels are prepared as the model's image processor prepares them, with the constants of its
``preprocessor_config.json`` (else the processor class's defaults): ``(x - image_mean /
rescale_factor) / (image_std / rescale_factor)`` on uint8 values, the fused form transformers'
torch image processors compute, so the values equal theirs. Resizing is latentize's own
(``preprocess``); the crop must be a multiple of the tokenizer's downsampling factor (16 for Janus
and Chameleon, 8 for Emu3), the resolution multiple their processors round to.

Where the weights are: these tokenizers ship inside the full multimodal model (``model.vqmodel``),
whose other weights are billions of parameters. ``encoder.model`` may name that model (a hub id
or a folder saved with ``save_pretrained``) and only the VQ part loads: its config is the
``vq_config`` of the model's ``config.json``, and its tensors are read, under the prefix
``model.vqmodel.`` (or ``vqmodel.``, older checkpoints), from the safetensors shards that hold
them, no others downloaded or read. transformers loads a sub-model only from a checkpoint of its
own, hence this loader. A folder of the tokenizer alone (``JanusVQVAE.save_pretrained``) loads
too.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np

from latentize.config import Config
from latentize.encoders.base import ENCODERS, EncoderSpec, TorchEncoder, resolved_source
from latentize.encoders.files import is_single_file
from latentize.encoders.kl import latent_size
from latentize.encoders.vq import index_dtype
from latentize.errors import LatentizeError
from latentize.hub import fetch, load_model_config, locate, sha256_file, weights_identity

if TYPE_CHECKING:
    import torch

    from latentize.encoders.decoding import DecoderModel, DecoderParts

__all__ = ["ChameleonEncoder", "Emu3Encoder", "JanusEncoder", "TransformersVQEncoder", "processor_constants"]

logger = logging.getLogger(__name__)

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_PROCESSOR = "preprocessor_config.json"
_PIXEL_KEYS = ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")
#: Where the VQ model's tensors are in a full model's checkpoint, most recent layout first; ""
#: is a checkpoint of the tokenizer alone.
_PREFIXES = ("model.vqmodel.", "vqmodel.", "")
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_ACCEPTED = (
    "a hub id or a folder saved with transformers' save_pretrained: the full model (config.json with a "
    "vq_config, model.safetensors or sharded with model.safetensors.index.json) or the tokenizer alone"
)


# --- the image processor's constants -------------------------------------------------------------


def processor_constants(processor_config: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``do_rescale``, ``rescale_factor``, ``do_normalize``, ``image_mean``, ``image_std``: the
    model's ``preprocessor_config.json`` over the processor class's ``defaults``."""
    found = dict(processor_config or {})
    out: dict[str, Any] = {}
    for key in _PIXEL_KEYS:
        value = found.get(key, defaults[key])
        if key in ("image_mean", "image_std"):
            value = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * 3
        out[key] = value
    out["rescale_factor"] = float(out["rescale_factor"])
    out["do_rescale"], out["do_normalize"] = bool(out["do_rescale"]), bool(out["do_normalize"])
    return out


def _affine(constants: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(offset, divisor)`` per channel, (3,) float64: model input = (uint8 value - offset) / divisor."""
    rescale = constants["rescale_factor"] if constants["do_rescale"] else 1.0
    mean = np.asarray(constants["image_mean"], np.float64) if constants["do_normalize"] else np.zeros(3)
    std = np.asarray(constants["image_std"], np.float64) if constants["do_normalize"] else np.ones(3)
    return mean / rescale, std / rescale


def _input_range(constants: Mapping[str, Any]) -> str:
    """The value range pixels 0..255 map to: ``[lo, hi]``, per channel when the channels differ."""
    offset, divisor = _affine(constants)
    lo, hi = (0 - offset) / divisor, (255 - offset) / divisor
    if np.allclose(lo, lo[0]) and np.allclose(hi, hi[0]):
        return f"[{lo[0]:.4g}, {hi[0]:.4g}]"
    return "[" + ", ".join(f"{a:.4g}..{b:.4g}" for a, b in zip(lo, hi, strict=True)) + "] per channel"


def to_model_input(x: torch.Tensor, constants: Mapping[str, Any]) -> torch.Tensor:
    """uint8 values as float32 (n, 3, H, W) -> the processor's ``pixel_values``, computed as
    transformers' torch image processors do (rescale fused into the mean and std when both apply:
    ``(x - mean * (1 / rescale)) / (std * (1 / rescale))``, with float32 constants)."""
    import torch

    if constants["do_normalize"]:
        mean = torch.tensor(constants["image_mean"], device=x.device)
        std = torch.tensor(constants["image_std"], device=x.device)
        if constants["do_rescale"]:
            mean, std = mean * (1.0 / constants["rescale_factor"]), std * (1.0 / constants["rescale_factor"])
        return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return x * constants["rescale_factor"] if constants["do_rescale"] else x


def from_model_input(y: torch.Tensor, constants: Mapping[str, Any]) -> torch.Tensor:
    """A decoder's output in the processor's space (n, 3, H, W) -> [0, 1] (unclamped): the inverse
    of :func:`to_model_input` divided by 255, as the processors' ``postprocess`` unnormalises."""
    import torch

    offset, divisor = (torch.as_tensor(a, dtype=y.dtype, device=y.device).view(1, -1, 1, 1) for a in _affine(constants))
    return (y * divisor + offset) / 255.0


# --- where the VQ tensors are ----------------------------------------------------------------------


def _vq_config(model_config: Mapping[str, Any], cls: type[TransformersVQEncoder]) -> dict[str, Any]:
    """The tokenizer's config (a full model's ``vq_config``, or the config itself) over the
    transformers config class's defaults."""
    model_type = model_config.get("model_type")
    if model_type == cls.model_type and isinstance(model_config.get("vq_config"), Mapping):
        found = dict(model_config["vq_config"])
    elif model_type == cls.vq_model_type:
        found = {k: v for k, v in model_config.items() if k != "_latentize"}
    else:
        raise LatentizeError(
            f"encoder.model: its config.json is of model_type {model_type!r}, not a {cls.model_type} model "
            f"({cls.model_type!r} with a vq_config) or its tokenizer ({cls.vq_model_type!r}); accepted: {_ACCEPTED}"
        )
    return {**cls.vq_defaults, **found}


def _prefix(keys: Sequence[str]) -> str:
    """The prefix of the VQ model's tensors among a checkpoint's ``keys``."""
    names = set(keys)
    for prefix in _PREFIXES:
        # The codebook: one tensor every one of these tokenizers has under this name.
        if prefix + "quantize.embedding.weight" in names:
            return prefix
    raise LatentizeError(f"encoder.model: the checkpoint holds no VQ tokenizer tensors ({_ACCEPTED})")


def _safetensors_keys(path: Path) -> list[str]:
    """Tensor names of a safetensors file from its header (8-byte length, then JSON): no import of
    safetensors or torch on the driver."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return [k for k in header if k != "__metadata__"]


def _weight_files(model: str, *, subfolder: str | None, revision: str | None) -> tuple[list[str], str | None]:
    """The safetensors files that hold the tokenizer's tensors, and their prefix when the shard
    index names it (a single file's keys are read where it is loaded)."""
    index = locate(model, _INDEX, subfolder=subfolder, revision=revision, download=True)
    if index is None:
        return [_SINGLE], None
    weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    prefix = _prefix(list(weight_map))
    return sorted({f for k, f in weight_map.items() if k.startswith(prefix)}), prefix


def _identity(model: str, files: Sequence[str], *, subfolder: str | None, revision: str | None) -> dict[str, Any]:
    """sha256 of the files holding the tokenizer: one file's own, or of ``name sha256`` lines."""
    import hashlib

    digests: dict[str, str] = {}
    found: dict[str, Any] = {}
    for name in files:
        path = locate(model, name, subfolder=subfolder, revision=revision, download=False)
        if path is not None:
            digests[name] = sha256_file(path)
            continue
        got = weights_identity(model, [name], subfolder=subfolder, revision=revision, local_only=False)
        if "sha256" not in got:
            return {"weights_file": ", ".join(files)}
        digests[name] = got["sha256"]
        found.setdefault("commit", got.get("commit"))
    if len(files) == 1:
        return {**found, "weights_file": files[0], "sha256": digests[files[0]]}
    lines = "".join(f"{name} {digests[name]}\n" for name in files)
    return {**found, "weights_file": ", ".join(files), "sha256": hashlib.sha256(lines.encode()).hexdigest()}


def _read_tensors(paths: Sequence[Path]) -> dict[str, torch.Tensor]:
    """The tokenizer's tensors (prefix removed) from the files that hold them."""
    from safetensors import safe_open

    keys = [k for p in paths for k in _safetensors_keys(p)]
    prefix = _prefix(keys)
    out: dict[str, torch.Tensor] = {}
    for path in paths:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                if key.startswith(prefix):
                    out[key[len(prefix) :]] = f.get_tensor(key)
    return out


# --- the encoders ----------------------------------------------------------------------------------


class TransformersVQEncoder(TorchEncoder):
    """A transformers VQ tokenizer: ``indices`` (H/f, W/f) in the smallest integer dtype.

    Subclasses name the transformers class, the model types, the config key of the codebook size,
    and the config and processor defaults of their transformers classes (which the saved configs
    may leave out), and implement :meth:`_tokens`.
    """

    #: transformers' class of the tokenizer (``JanusVQVAE``...).
    transformers_class: ClassVar[str] = ""
    encoder_type: ClassVar[str] = ""
    #: ``model_type`` of the full model (whose config holds a ``vq_config``) and of the tokenizer alone.
    model_type: ClassVar[str] = ""
    vq_model_type: ClassVar[str] = ""
    #: The config key of the number of codes.
    codebook_key: ClassVar[str] = "num_embeddings"
    #: The transformers config class's defaults of the keys read here.
    vq_defaults: ClassVar[dict[str, Any]] = {}
    #: The transformers image processor class's defaults.
    processor_defaults: ClassVar[dict[str, Any]] = {}

    @classmethod
    def inspect(cls, config: Config) -> EncoderSpec:
        """Reads ``config.json``, the shard index and ``preprocessor_config.json`` (never weights)."""
        enc = config.encoder
        _, model = resolved_source(config)
        if is_single_file(model):
            raise LatentizeError(
                f"encoder.model: {model} is a single weights file; {cls.encoder_type} takes {_ACCEPTED}"
            )
        model_config, identity = load_model_config(
            model, subfolder=enc.subfolder, revision=enc.revision, weight_files=()
        )
        files, prefix = _weight_files(model, subfolder=enc.subfolder, revision=enc.revision)
        identity.update(_identity(model, files, subfolder=enc.subfolder, revision=enc.revision))
        processor = locate(model, _PROCESSOR, subfolder=enc.subfolder, revision=enc.revision, download=True)
        processor_config = None if processor is None else json.loads(processor.read_text(encoding="utf-8"))
        if processor_config is None:
            logger.warning(
                "%s has no %s: pixels are prepared with the %s image processor's defaults",
                model,
                _PROCESSOR,
                cls.encoder_type,
            )
        extra = {"weight_files": files, "weight_prefix": prefix, "preprocessor_config": processor_config}
        return cls.spec_from({**model_config, "_latentize": extra}, config, identity)

    @classmethod
    def spec_from(cls, model_config: dict[str, Any], config: Config, identity: dict[str, Any]) -> EncoderSpec:
        vq = _vq_config(model_config, cls)
        codes = int(vq[cls.codebook_key])
        factor = 2 ** (len(vq["channel_multiplier"]) - 1)
        h, w = latent_size(config, factor)
        processor = processor_constants(
            (model_config.get("_latentize") or {}).get("preprocessor_config"), cls.processor_defaults
        )
        return EncoderSpec(
            type=cls.encoder_type,
            model_class=cls.transformers_class,
            columns={"indices": ((h, w), index_dtype(codes))},
            constants={"codebook_size": codes, "embed_dim": int(vq["embed_dim"]), **processor},
            identity=identity,
            input_range=_input_range(processor),
            downsample=factor,
            latent_channels=int(vq["embed_dim"]),
            model_config=model_config,
        )

    # -- actor side -----------------------------------------------------------------------------
    @classmethod
    def _load_model(
        cls, model: str, model_config: Mapping[str, Any], *, subfolder: str | None, revision: str | None
    ) -> torch.nn.Module:
        """The tokenizer (float32, CPU, eval) from the files that hold its tensors."""
        import transformers

        files = (model_config.get("_latentize") or {}).get("weight_files") or [_SINGLE]
        paths = [fetch(model, name, subfolder=subfolder, revision=revision, accepted=_ACCEPTED) for name in files]
        tensors = _read_tensors(paths)
        model_cls = getattr(transformers, cls.transformers_class)
        vq_config = model_cls.config_class.from_dict(_vq_config(model_config, cls))
        module = model_cls(vq_config)
        missing, unexpected = module.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise LatentizeError(
                f"encoder.model: {model}'s tokenizer tensors do not fit {cls.transformers_class}: "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        return cast("torch.nn.Module", module.float().eval())

    def _load(self) -> torch.nn.Module:
        enc = self.config.encoder
        model = self._load_model(str(enc.model), self.spec.model_config, subfolder=enc.subfolder, revision=enc.revision)
        constants = self.spec.constants
        self._pixel_constants = {k: constants[k] for k in _PIXEL_KEYS}
        return model

    def _to_input(self, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """uint8 (n, H, W, 3) -> the processor's ``pixel_values`` (n, 3, H, W) in ``dtype``."""
        import torch

        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).to(torch.float32)
        return to_model_input(x, self._pixel_constants).to(dtype).contiguous(memory_format=self.memory_format)

    def _tokens(self, model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image_tokens (n, h, w) int64, the encoder's hidden states)`` of ``x`` (n, 3, H, W)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _forward(self, model: torch.nn.Module, x: torch.Tensor, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        import torch

        tokens, hidden = self._tokens(model, x)
        n = x.shape[0]
        # Non-finite hidden states still give an argmin; flag them so they are re-encoded.
        finite = torch.isfinite(hidden.reshape(n, -1)).all(dim=1)
        return {"indices": tokens.to(torch.int64), "_finite": torch.where(finite, 0.0, float("nan")).cpu()}

    # -- the decoder ----------------------------------------------------------------------------
    @classmethod
    def decoder(cls, *, encoder: Mapping[str, Any], config: Config, override: str | None) -> DecoderParts:
        """The tokenizer's own decoder (``decode`` of the stored indices), its output mapped back
        from the processor's value range to [0, 1]."""
        from latentize.encoders.decoding import DecoderParts, encoder_source

        source = override if override is not None else encoder_source(encoder, config)
        subfolder = None if override is not None else config.encoder.subfolder
        revision = None if override is not None else config.encoder.revision
        model_config, _ = load_model_config(source, subfolder=subfolder, revision=revision, weight_files=())
        files, prefix = _weight_files(source, subfolder=subfolder, revision=revision)
        extra = {"weight_files": files, "weight_prefix": prefix}
        model = cls._load_model(source, {**model_config, "_latentize": extra}, subfolder=subfolder, revision=revision)
        constants = dict(encoder.get("constants") or {})

        def step(model: DecoderModel, columns: Mapping[str, torch.Tensor]) -> torch.Tensor:
            return from_model_input(cls._decode_tokens(model, columns["indices"]), constants)

        where = f"{source} (subfolder {subfolder})" if subfolder else source
        return DecoderParts(model, step, f"{cls.transformers_class} decoder of {where}")

    @staticmethod
    def _decode_tokens(model: DecoderModel, indices: torch.Tensor) -> torch.Tensor:
        """Indices (n, h, w) int64 -> images (n, 3, H, W) in the processor's value range."""
        raise NotImplementedError  # pragma: no cover - abstract


@ENCODERS.register("janus")
class JanusEncoder(TransformersVQEncoder):
    """Janus / Janus-Pro's generation tokenizer (``JanusVQVAE``, LlamaGen's VQ-16): 16384 codes of
    8 dimensions at f = 16."""

    transformers_class = "JanusVQVAE"
    encoder_type = "janus"
    model_type = "janus"
    vq_model_type = "janus_vqgan"
    vq_defaults: ClassVar[dict[str, Any]] = {
        "embed_dim": 8,
        "num_embeddings": 16384,
        "channel_multiplier": [1, 1, 2, 2, 4],
    }
    processor_defaults: ClassVar[dict[str, Any]] = {
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": _CLIP_MEAN,
        "image_std": _CLIP_STD,
    }

    def _tokens(self, model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = cast(Any, model).encode(x)
        n, _, height, width = x.shape
        f = self.spec.downsample
        return out.image_tokens.reshape(n, height // f, width // f), out.last_hidden_state

    @staticmethod
    def _decode_tokens(model: DecoderModel, indices: torch.Tensor) -> torch.Tensor:
        n, h, w = indices.shape
        # JanusVQVAE.decode reshapes to quant_state_dims (the config's num_patches square); the
        # stored grid is the crop's, so it decodes at that.
        model.quantize.quant_state_dims = [h, w]
        return cast("torch.Tensor", model.decode(indices.reshape(n, h * w)))


@ENCODERS.register("chameleon")
class ChameleonEncoder(JanusEncoder):
    """Chameleon's tokenizer (``ChameleonVQVAE``): 8192 codes of 256 dimensions at f = 16.

    transformers ships its encoder only, so the QA report cannot reconstruct from its indices.
    """

    transformers_class = "ChameleonVQVAE"
    encoder_type = "chameleon"
    model_type = "chameleon"
    vq_model_type = "chameleon_vqgan"
    vq_defaults: ClassVar[dict[str, Any]] = {
        "embed_dim": 256,
        "num_embeddings": 8192,
        "channel_multiplier": [1, 1, 2, 2, 4],
    }
    processor_defaults: ClassVar[dict[str, Any]] = {
        "do_rescale": True,
        "rescale_factor": 0.0078,
        "do_normalize": True,
        "image_mean": [1.0, 1.0, 1.0],
        "image_std": [1.0, 1.0, 1.0],
    }

    @classmethod
    def decoder(cls, *, encoder: Mapping[str, Any], config: Config, override: str | None) -> DecoderParts:
        raise LatentizeError(
            "transformers' ChameleonVQVAE has no decoder (the converted Chameleon checkpoints keep the "
            "tokenizer's encoder only), so Chameleon indices cannot be reconstructed"
        )


@ENCODERS.register("emu3")
class Emu3Encoder(TransformersVQEncoder):
    """Emu3's vision tokenizer (``Emu3VQVAE``): 32768 codes of 4 dimensions at f = 8; an image is
    the model's video of ``temporal_downsample_factor`` equal frames, as ``encode`` makes it."""

    transformers_class = "Emu3VQVAE"
    encoder_type = "emu3"
    model_type = "emu3"
    vq_model_type = "emu3_vqgan"
    codebook_key = "codebook_size"
    vq_defaults: ClassVar[dict[str, Any]] = {"embed_dim": 4, "codebook_size": 32768, "channel_multiplier": [1, 2, 2, 4]}
    processor_defaults: ClassVar[dict[str, Any]] = {
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": _CLIP_MEAN,
        "image_std": _CLIP_STD,
    }

    def _tokens(self, model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        n, _, height, width = x.shape
        sizes = torch.tensor([[height, width]] * n, device=x.device)
        out = cast(Any, model).encode(x, sizes)
        return torch.stack(list(out.image_tokens)), out.last_hidden_state

    @staticmethod
    def _decode_tokens(model: DecoderModel, indices: torch.Tensor) -> torch.Tensor:
        return cast("torch.Tensor", model.decode(indices))
