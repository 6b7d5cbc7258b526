"""TAESD family (tiny distilled autoencoders): ``encoder.type: tiny``.

Two ways to load the same family:

* a hub id / diffusers folder (``madebyollin/taesd``, ``taesdxl``, ``taesd3``, ``taef1``) loads
  diffusers' ``AutoencoderTiny``. Its ``encode`` takes pixels in **[-1, 1]** and maps them to
  [0, 1] itself (``EncoderTiny.forward``: ``x.add(1).div(2)``), so the spec says ``"[-1, 1]"``.
* an original ``*_encoder.pth`` file (madebyollin/taesd's release format: the state dict of a
  plain ``nn.Sequential``) loads into the modules below, which take pixels in **[0, 1]**.
  diffusers has no class for these files and none at all for TAEF2's global branches or
  TAESana's f32 layout, hence the hand-written architectures here.

Both give *raw* latents (scale 1, roughly within ±3; docs/encoders.md, "TAESD family"). The layouts follow
madebyollin/taesd's ``taesd.py`` (MIT) and were checked key by key and shape by shape against
the released TAEF2 and TAESana files; which layout a file holds is inferred from its keys and
shapes, never from its name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from latentize.config import Config
from latentize.encoders.base import ENCODERS, EncoderSpec, TorchEncoder
from latentize.encoders.files import FILE_LOADERS, load_state_dict
from latentize.encoders.kl import latent_size
from latentize.errors import ConfigError, LatentizeError

if TYPE_CHECKING:
    # diffusers' top-level names are dummy objects to type checkers; the classes live here.
    from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTiny

__all__ = [
    "SoftClamp",
    "TaesdBlock",
    "TaesdDecoder",
    "TaesdEncoder",
    "TaesdLayout",
    "TaesdPthLoader",
    "TinyEncoder",
    "build_decoder",
    "build_encoder",
    "decoder_path_for",
    "detect_layout",
    "load_tiny_decoder",
    "load_tiny_encoder",
    "tiny_constants",
]

logger = logging.getLogger(__name__)

#: Architecture variants, named as upstream's ``arch_variant``: ``taesd`` (TAESD, TAESDXL,
#: TAESD3, TAEF1: f8), ``flux_2`` (TAEF2: f8 with global branches), ``f32`` (TAESana).
VARIANTS = ("taesd", "flux_2", "f32")
_WIDTH = 64  # every f8 stage, and the f32 encoder after its stem, is 64 channels wide


# --- building blocks ------------------------------------------------------------------------


def _conv3(n_in: int, n_out: int, *, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


def _conv1(n_in: int, n_out: int) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 1, bias=False)


class SoftClamp(nn.Module):
    """``tanh(z / 3) * 3``: the decoders' first layer, a smooth clamp of raw latents to ±3."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z / 3) * 3


class TaesdBlock(nn.Module):
    """Residual block: conv3x3-ReLU-conv3x3-ReLU-conv3x3, plus a skip, then ReLU.

    The skip is a bias-free 1x1 conv when the width changes, else the identity. With
    ``global_branch`` (TAEF2), ``x + pool(x)`` is fed to both paths, where ``pool`` is a 1x1
    conv to 4x channels, GroupNorm(4), ReLU and a 1x1 conv back: GroupNorm normalises over all
    positions, so this branch carries image-wide statistics the 3x3 convs cannot see.

    Attribute names (``conv``, ``skip``, ``pool``) are those of the released state dicts.
    Shapes: (N, n_in, H, W) -> (N, n_out, H, W).
    """

    def __init__(self, n_in: int, n_out: int, *, global_branch: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv3(n_in, n_out), nn.ReLU(), _conv3(n_out, n_out), nn.ReLU(), _conv3(n_out, n_out))
        self.skip: nn.Module = _conv1(n_in, n_out) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        self.pool: nn.Module | None = None
        if global_branch:
            wide = 4 * n_in
            self.pool = nn.Sequential(_conv1(n_in, wide), nn.GroupNorm(4, wide), nn.ReLU(), _conv1(wide, n_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def _f8_encoder(latent_channels: int, image_channels: int, global_branch: bool) -> nn.Sequential:
    # conv, block, then three stages of (bias-free stride-2 conv, 3 blocks), then the latent conv:
    # 15 layers, strides at indices 2, 6, 10; TAEF2's global branches in blocks 11, 12, 13.
    layers: list[nn.Module] = [_conv3(image_channels, _WIDTH), TaesdBlock(_WIDTH, _WIDTH)]
    for stage in range(3):
        layers.append(_conv3(_WIDTH, _WIDTH, stride=2, bias=False))
        deepest = global_branch and stage == 2
        layers += [TaesdBlock(_WIDTH, _WIDTH, global_branch=deepest) for _ in range(3)]
    layers.append(_conv3(_WIDTH, latent_channels))
    return nn.Sequential(*layers)


def _f32_encoder(latent_channels: int, image_channels: int) -> nn.Sequential:
    # TAESana: a stem of two stride-2 convs with bias (3 -> 32 -> 64, each followed by ReLU)
    # replaces the first conv, giving 2 * 2**3 = 32x downsampling; the rest is the f8 body.
    # 18 layers, strides at indices 0, 2, 5, 9, 13.
    layers: list[nn.Module] = [
        _conv3(image_channels, 32, stride=2),
        nn.ReLU(),
        _conv3(32, _WIDTH, stride=2),
        nn.ReLU(),
        TaesdBlock(_WIDTH, _WIDTH),
    ]
    for _ in range(3):
        layers.append(_conv3(_WIDTH, _WIDTH, stride=2, bias=False))
        layers += [TaesdBlock(_WIDTH, _WIDTH) for _ in range(3)]
    layers.append(_conv3(_WIDTH, latent_channels))
    return nn.Sequential(*layers)


def _upsampling_decoder(
    latent_channels: int, image_channels: int, widths: Sequence[int], global_branch: bool
) -> nn.Sequential:
    # SoftClamp, conv, ReLU, then per stage (3 blocks, nearest x2 upsample, bias-free conv to the
    # next width), then one block and the image conv. f8: widths 64,64,64 (20 layers; TAEF2's
    # global branches in the first stage's blocks 3, 4, 5); f32: 256,128,64,64,64 (30 layers).
    layers: list[nn.Module] = [SoftClamp(), _conv3(latent_channels, widths[0]), nn.ReLU()]
    for stage, width in enumerate(widths):
        nxt = widths[stage + 1] if stage + 1 < len(widths) else _WIDTH
        first = global_branch and stage == 0
        layers += [TaesdBlock(width, width, global_branch=first) for _ in range(3)]
        layers += [nn.Upsample(scale_factor=2), _conv3(width, nxt, bias=False)]
    layers += [TaesdBlock(_WIDTH, _WIDTH), _conv3(_WIDTH, image_channels)]
    return nn.Sequential(*layers)


_ENCODER_BUILDERS: dict[str, tuple[int, Callable[[int, int], nn.Sequential]]] = {
    "taesd": (8, lambda c, i: _f8_encoder(c, i, global_branch=False)),
    "flux_2": (8, lambda c, i: _f8_encoder(c, i, global_branch=True)),
    "f32": (32, _f32_encoder),
}
_DECODER_BUILDERS: dict[str, tuple[int, Callable[[int, int], nn.Sequential]]] = {
    "taesd": (8, lambda c, i: _upsampling_decoder(c, i, (64, 64, 64), global_branch=False)),
    "flux_2": (8, lambda c, i: _upsampling_decoder(c, i, (64, 64, 64), global_branch=True)),
    "f32": (32, lambda c, i: _upsampling_decoder(c, i, (256, 128, 64, 64, 64), global_branch=False)),
}


def build_encoder(variant: str, latent_channels: int, image_channels: int = 3) -> nn.Sequential:
    """The original ``nn.Sequential`` encoder of ``variant`` (random weights)."""
    return _ENCODER_BUILDERS[variant][1](latent_channels, image_channels)


def build_decoder(variant: str, latent_channels: int, image_channels: int = 3) -> nn.Sequential:
    """The original ``nn.Sequential`` decoder of ``variant`` (random weights)."""
    return _DECODER_BUILDERS[variant][1](latent_channels, image_channels)


# --- layout detection -----------------------------------------------------------------------


class TaesdLayout:
    """What a TAESD-family state dict holds: role, variant, channels, scale factor."""

    def __init__(self, role: str, variant: str, latent_channels: int, image_channels: int, factor: int) -> None:
        self.role = role
        self.variant = variant
        self.latent_channels = latent_channels
        self.image_channels = image_channels
        self.factor = factor

    def __repr__(self) -> str:
        return (
            f"TaesdLayout(role={self.role!r}, variant={self.variant!r}, latent_channels={self.latent_channels}, "
            f"image_channels={self.image_channels}, factor={self.factor})"
        )


def _indices(state: Mapping[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        head, _, tail = key.partition(".")
        if not head.isdigit() or not tail:
            raise LatentizeError(f"not a TAESD-family nn.Sequential state dict (key {key!r})")
        out.setdefault(int(head), {})[tail] = value
    if not out:
        raise LatentizeError("not a TAESD-family state dict: it holds no tensors")
    return out


def _normalise_keys(state: Mapping[str, torch.Tensor], role: str) -> dict[str, torch.Tensor]:
    """Plain Sequential keys; accepts diffusers' single-file naming too.

    diffusers' ``AutoencoderTiny`` names the same layers ``encoder.layers.N`` (same N) and
    ``decoder.layers.N`` (N + 1: DecoderTiny applies the soft clamp in ``forward`` instead of as
    layer 0).
    """
    prefix = f"{role}.layers."
    if not any(k.startswith(prefix) for k in state):
        return dict(state)
    shift = 1 if role == "decoder" else 0
    out = {}
    for key, value in state.items():
        if key.startswith(prefix):
            index, _, tail = key[len(prefix) :].partition(".")
            out[f"{int(index) + shift}.{tail}"] = value
    return out


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def detect_layout(state: Mapping[str, torch.Tensor], role: str) -> TaesdLayout:
    """Infers variant, latent channels and scale factor of an encoder or decoder state dict.

    The channel counts are read off the first and last convs; the variant is the one whose
    architecture has exactly the file's keys with exactly its shapes.

    Raises:
        LatentizeError: the state dict is no known TAESD-family layout of ``role``, or it is
            the other role (a decoder file given as the encoder).
    """
    if role not in ("encoder", "decoder"):
        raise ValueError(f"role must be 'encoder' or 'decoder', not {role!r}")
    state = _normalise_keys(state, role)
    layers = _indices(state)
    first, last = min(layers), max(layers)
    looks = "encoder" if first == 0 else "decoder"
    if looks != role:
        raise LatentizeError(
            f"this state dict is a TAESD-family {looks}, not an {role} "
            f"(its first layer is index {first}); give the matching *_{role}.pth file"
        )
    try:
        if role == "encoder":
            image_channels = int(layers[first]["weight"].shape[1])
            latent_channels = int(layers[last]["weight"].shape[0])
        else:
            latent_channels = int(layers[first]["weight"].shape[1])
            image_channels = int(layers[last]["weight"].shape[0])
    except KeyError:
        raise LatentizeError(f"not a TAESD-family {role}: layers {first} and {last} are not convs") from None
    builders = _ENCODER_BUILDERS if role == "encoder" else _DECODER_BUILDERS
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for variant, (factor, build) in builders.items():
        with torch.device("meta"):
            candidate = build(latent_channels, image_channels)
        if _shapes(candidate) == shapes:
            return TaesdLayout(role, variant, latent_channels, image_channels, factor)
    raise LatentizeError(
        f"unrecognised TAESD-family {role} layout ({len(layers)} layers, {latent_channels} latent channels); "
        f"supported: {', '.join(VARIANTS)} (TAESD, TAESDXL, TAESD3, TAEF1, TAEF2, TAESana)"
    )


# --- loaded modules -------------------------------------------------------------------------


class TaesdEncoder(nn.Module):
    """An original TAESD-family encoder: pixels (N, 3, H, W) in [0, 1] -> raw latents
    (N, C, H/f, W/f), roughly within ±3. ``H`` and ``W`` must be multiples of ``f``.
    """

    def __init__(self, layout: TaesdLayout) -> None:
        super().__init__()
        self.layout = layout
        self.variant = layout.variant
        self.latent_channels = layout.latent_channels
        self.downsample_factor = layout.factor
        self.encoder = build_encoder(layout.variant, layout.latent_channels, layout.image_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class TaesdDecoder(nn.Module):
    """An original TAESD-family decoder: raw latents (N, C, h, w) -> images (N, 3, f*h, f*w)
    clamped to [0, 1].
    """

    def __init__(self, layout: TaesdLayout) -> None:
        super().__init__()
        self.layout = layout
        self.variant = layout.variant
        self.latent_channels = layout.latent_channels
        self.upsample_factor = layout.factor
        self.decoder = build_decoder(layout.variant, layout.latent_channels, layout.image_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).clamp(0, 1)


def _read_state(path: str | Path, role: str) -> tuple[dict[str, torch.Tensor], TaesdLayout]:
    """The ``role`` state dict of a weights file, keys normalised, and the layout it describes."""
    state = _normalise_keys(load_state_dict(Path(path).expanduser()), role)
    return state, detect_layout(state, role)


def load_tiny_encoder(path: str | Path) -> TaesdEncoder:
    """The encoder of an original ``*_encoder.pth`` (or diffusers single-file) state dict,
    float32 on the CPU, in eval mode. Input (N, 3, H, W) in [0, 1]; output raw latents.
    """
    state, layout = _read_state(path, "encoder")
    module = TaesdEncoder(layout)
    module.encoder.load_state_dict(state, strict=True)  # fp16 file -> float32 module (copy_ casts)
    return module.float().eval()


def load_tiny_decoder(path: str | Path) -> TaesdDecoder:
    """The decoder of an original ``*_decoder.pth`` (e.g. ``taef2_decoder.pth``), float32 on
    the CPU, in eval mode: raw latents (N, C, h, w) -> images (N, 3, f*h, f*w) in [0, 1].
    """
    state, layout = _read_state(path, "decoder")
    module = TaesdDecoder(layout)
    module.decoder.load_state_dict(state, strict=True)  # fp16 file -> float32 module (copy_ casts)
    return module.float().eval()


def decoder_path_for(encoder_path: str | Path) -> Path | None:
    """The sibling ``NAME_decoder.SUFFIX`` of ``NAME_encoder.SUFFIX`` when it exists, else None."""
    path = Path(encoder_path).expanduser()
    if not path.stem.endswith("_encoder"):
        return None
    sibling = path.with_name(path.stem[: -len("_encoder")] + "_decoder" + path.suffix)
    return sibling if sibling.is_file() else None


class TaesdPthLoader:
    """:class:`~latentize.encoders.files.FileLoader` for original TAESD-family files.

    ``read_config`` returns a small diffusers-style dict: ``latent_channels``,
    ``downsample_factor``, ``variant``, ``input_range`` ("[0, 1]") and ``in_channels``. The
    files are a few MB, so reading the state dict on the driver is cheap.
    """

    def read_config(self, path: Path, config: Config) -> dict[str, Any]:
        layout = detect_layout(load_state_dict(Path(path)), "encoder")
        if layout.image_channels != 3:
            raise LatentizeError(
                f"encoder.model: {path} takes {layout.image_channels}-channel images; only RGB encoders are supported"
            )
        return {
            "_class_name": "TAESD (original nn.Sequential state dict)",
            "variant": layout.variant,
            "in_channels": layout.image_channels,
            "latent_channels": layout.latent_channels,
            "downsample_factor": layout.factor,
            "input_range": "[0, 1]",
        }

    def load(self, path: Path, config: Config, model_config: dict[str, Any]) -> nn.Module:
        module = load_tiny_encoder(path)
        if module.variant != model_config.get("variant") or module.latent_channels != model_config.get(
            "latent_channels"
        ):
            raise LatentizeError(f"encoder.model: {path} changed since it was inspected")
        return module


FILE_LOADERS.add("tiny", TaesdPthLoader())


# --- the encoder ----------------------------------------------------------------------------


def tiny_constants(config: Config) -> dict[str, Any]:
    """Constants: raw latents (scale 1, shift 0) unless the config sets them."""
    enc = config.encoder
    scale = enc.scaling_factor if enc.scaling_factor is not None else 1.0
    shift = enc.shift_factor if enc.shift_factor is not None else 0.0
    return {
        "scaling_factor": float(scale),
        "shift_factor": float(shift),
        "latents_mean": None,
        "latents_std": None,
        "formula": "(z - shift_factor) * scaling_factor",
        "applied": True,
    }


def _check_mode(config: Config) -> None:
    if config.encoder.sample != "mode":
        raise ConfigError(
            "encoder.sample: TAESD-family encoders are deterministic (no posterior to sample or "
            f"store moments of); only 'mode' applies (got {config.encoder.sample!r})"
        )


@ENCODERS.register("tiny")
class TinyEncoder(TorchEncoder):
    """TAESD family: column ``latent`` (C, H/f, W/f) in ``output.dtype``, raw unless the config
    sets ``scaling_factor``/``shift_factor`` (then ``(z - shift) * scale``).

    Hub ids and diffusers folders load ``AutoencoderTiny`` (input [-1, 1]); original ``.pth``
    files load :class:`TaesdEncoder` (input [0, 1]). Only ``sample: mode`` is valid.
    """

    diffusers_class = "AutoencoderTiny"

    @classmethod
    def spec_from(cls, model_config: dict[str, Any], config: Config, identity: dict[str, Any]) -> EncoderSpec:
        _check_mode(config)
        channels = int(model_config["latent_channels"])
        if "downsample_factor" in model_config:
            factor = int(model_config["downsample_factor"])
        else:
            # AutoencoderTiny: stage 0 keeps the size, every further stage halves it.
            factor = 2 ** (len(model_config["encoder_block_out_channels"]) - 1)
        height, width = (side * factor for side in latent_size(config, factor))
        # Only the original files run without diffusers' internal [-1, 1] -> [0, 1] rescale.
        input_range = str(model_config.get("input_range", "[-1, 1]"))
        return EncoderSpec(
            type="tiny",
            model_class=str(model_config.get("_class_name") or cls.diffusers_class),
            columns={"latent": ((channels, height // factor, width // factor), config.output.dtype)},
            constants=tiny_constants(config),
            identity=identity,
            input_range=input_range,
            downsample=factor,
            latent_channels=channels,
            model_config=model_config,
        )

    def _load(self) -> nn.Module:
        _check_mode(self.config)
        self._scale = float(self.spec.constants["scaling_factor"])
        self._shift = float(self.spec.constants["shift_factor"])
        return super()._load()

    def _forward(self, model: nn.Module, x: torch.Tensor, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        # An original file's module has no ``encode``; ``torch.compile`` keeps the class.
        if isinstance(model, TaesdEncoder) or not hasattr(model, "encode"):
            z = model(x)  # x in [0, 1]
        else:
            # nn.Module's attribute access is typed Tensor | Module; the model is diffusers' AutoencoderTiny.
            z = cast("AutoencoderTiny", model).encode(x).latents  # x in [-1, 1], rescaled inside
        z = z.float()
        if self._shift != 0.0 or self._scale != 1.0:
            z = (z - self._shift) * self._scale
        return {"latent": z}
