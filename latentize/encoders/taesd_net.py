"""The TAESD family's original networks (``nn.Sequential`` layouts of madebyollin/taesd, MIT).

Kept apart from :mod:`latentize.encoders.taesd` because they subclass ``torch.nn.Module``:
the encoder registry is imported on the driver, which must not import torch (2-3 s and
~600 MB per process); only actors and the QA report, which run these networks, import this.

Shapes: encoders take pixels (N, 3, H, W) in [0, 1] and give raw latents (N, C, H/f, W/f),
roughly within ±3; decoders give images (N, 3, f*h, f*w) clamped to [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from latentize.encoders.files import load_state_dict
from latentize.errors import LatentizeError

__all__ = [
    "VARIANTS",
    "SoftClamp",
    "TaesdBlock",
    "TaesdDecoder",
    "TaesdEncoder",
    "TaesdLayout",
    "build_decoder",
    "build_encoder",
    "detect_layout",
    "load_tiny_decoder",
    "load_tiny_encoder",
]

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
