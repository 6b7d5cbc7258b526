"""Single-file ldm / taming autoencoder checkpoints -> diffusers ``AutoencoderKL`` / ``VQModel``.

Two :class:`~latentize.encoders.files.FileLoader` s, registered for ``encoder.type`` ``kl`` and
``vq``:

* :class:`LdmVaeLoader` (``kl``) reads

  - a standalone VAE in the original ldm naming (``encoder.down.0.block.0.norm1.weight``,
    ``encoder.mid.attn_1.q.weight``, ``quant_conv.weight``, ``decoder.up...``) as
    ``.safetensors``, ``.ckpt``, ``.pt`` or ``.pth``, also without ``quant_conv`` (FLUX/SD3-style)
    or without a decoder (encoder-only files);
  - a full Stable Diffusion checkpoint: the VAE is taken from under ``first_stage_model.`` (or
    ``vae.``) and everything else (``model.diffusion_model.*``, ``cond_stage_model.*``) is
    ignored;
  - a diffusers-named single file (``encoder.down_blocks.0.resnets.0...``), loaded as is.

* :class:`TamingVqLoader` (``vq``) reads a taming-transformers / ldm VQGAN checkpoint (a
  Lightning ``.ckpt`` with the weights under ``state_dict``; ``loss.*`` discriminator / LPIPS
  tensors are ignored) together with its YAML.

The geometry (``block_out_channels``, ``layers_per_block``, latent channels, attention levels,
codebook) is read from the tensor *shapes*: from a safetensors header without loading any
tensor, from a ``.ckpt`` memory-mapped. Key renaming uses diffusers' own
``convert_ldm_vae_checkpoint``; the attention blocks inside the down/up levels (taming's
``attn_resolutions``), which that converter leaves alone, and the codebook are renamed here.
Weights are then loaded strictly: every model tensor from the file and every autoencoder tensor
of the file into the model (only the decoder side may be absent from an encoder-only file).

``original_config`` YAML (``encoder.original_config``, else ``<checkpoint stem>.yaml`` /
``.yml`` next to the file): ``model.params.ddconfig`` (ldm autoencoder / taming VQGAN layout) or
``model.params.first_stage_config.params.ddconfig`` (full latent-diffusion layout), with
``model.params.embed_dim``, ``n_embed`` (VQ) and ``scale_factor`` (full LDM). Optional for
``kl`` (then it supplies ``scale_factor`` and is cross-checked against the shapes), required for
``vq``. A disagreement between YAML and weights is an error naming the fields.

GroupNorm group count: a GroupNorm's weights do not record it. ldm and taming hard-code
``GroupNorm(num_groups=32)``, so a file whose widths are all multiples of 32 gets 32; a file
with a width that is not cannot come from that code, and gets the largest group count <= 32
dividing every width (diffusers' models built with a smaller ``norm_num_groups``, such as
8 for widths (8, 16, 32, 32)), with a warning. An explicit ``norm_num_groups`` key in the YAML's
``ddconfig`` (ldm's and taming's Encoder ignore unknown keys) overrides the inference.

Checkpoints are never unpickled with code: ``torch.load(weights_only=True)`` throughout. Old
Lightning checkpoints pickle bookkeeping objects (the ``ModelCheckpoint`` class as a callbacks
key, omegaconf hyper-parameters, numpy scalars); globals from those packages only
(:data:`INERT_GLOBAL_PREFIXES`) are replaced by an inert stub class, never imported or called,
and only tensors are kept. Any other global (``builtins.exec``, ``os.system``...) refuses the
file.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import yaml

from latentize.config import Config
from latentize.encoders.files import FILE_LOADERS, load_state_dict
from latentize.errors import LatentizeError

if TYPE_CHECKING:
    import torch

__all__ = [
    "INERT_GLOBAL_PREFIXES",
    "LdmVaeLoader",
    "TamingVqLoader",
    "find_original_config",
    "infer_norm_groups",
    "read_checkpoint",
]

logger = logging.getLogger(__name__)

#: Prefixes under which full checkpoints keep the autoencoder (diffusers' ``LDM_VAE_KEYS``).
VAE_PREFIXES = ("first_stage_model.", "vae.")
#: Top-level modules of an autoencoder; anything else in the file (``loss.*``,
#: ``model_ema.*``, the UNet, text encoders) is ignored.
_SECTIONS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")
#: Model tensors an encoder-only file may lack.
_DECODER_SIDE = ("decoder.", "post_quant_conv.")
#: Pickle globals of training bookkeeping, replaced by an inert stub when a ``.ckpt`` holds them.
INERT_GLOBAL_PREFIXES = (
    "pytorch_lightning.",
    "lightning.",
    "lightning_fabric.",
    "omegaconf.",
    "numpy.",
    "argparse.Namespace",
    "typing.Any",
)
#: ldm's and taming's ``Normalize`` is ``GroupNorm(num_groups=32)``.
LDM_NORM_GROUPS = 32


# --- reading files without running code -----------------------------------------------------


def _few(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def _stub(full_name: str) -> type:
    """An inert class standing in for ``full_name``: accepts anything, does nothing."""

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def setstate(self: Any, state: Any) -> None:
        pass

    module, _, name = full_name.rpartition(".")
    return type(name or full_name, (), {"__init__": init, "__setstate__": setstate, "__module__": module})


def _stubs_for(path: Path) -> list[Callable[..., Any] | tuple[Callable[..., Any], str]]:
    """Stubs for the bookkeeping globals of ``path``; refuses any other non-tensor global."""
    import torch

    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # legacy (non-zip) format or unreadable: torch.load decides below
        return []
    refused = [g for g in unsafe if not g.startswith(INERT_GLOBAL_PREFIXES)]
    if refused:
        raise LatentizeError(
            f"encoder.model: {path} is refused: its pickle references {_few(refused)}, which "
            "could run code when loaded. Only tensors (and Lightning bookkeeping) are read from "
            ".ckpt files; convert the weights to .safetensors on a machine you trust."
        )
    return [(_stub(g), g) for g in unsafe]


def _tensors_of(data: Any) -> dict[str, torch.Tensor]:
    import torch

    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def read_checkpoint(path: Path, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (a Lightning ``state_dict`` level removed), code never run.

    safetensors go through :func:`~latentize.encoders.files.load_state_dict`; pickles through
    ``torch.load(weights_only=True)`` (memory-mapped when ``mmap``, so shapes cost no reads),
    with Lightning's bookkeeping globals stubbed (module docstring).

    Raises:
        LatentizeError: unreadable file, or a pickle that references code.
    """
    import torch

    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            return load_state_dict(path)
        stubs = _stubs_for(path)
        with torch.serialization.safe_globals(stubs):
            if mmap:
                try:
                    return _tensors_of(torch.load(str(path), map_location="cpu", weights_only=True, mmap=True))
                except RuntimeError as exc:
                    if "mmap" not in str(exc):  # legacy format: no mmap, read it whole
                        raise
            return load_state_dict(path)
    except LatentizeError:
        raise
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported [^\n]*?(?= was not| Please|\n|$)", str(exc))
        why = found.group(0) if found else type(exc).__name__
        raise LatentizeError(
            f"encoder.model: {path} is refused: it is not a plain tensor checkpoint and reading it "
            f"could run code ({why}). Convert the weights to .safetensors on a machine you trust."
        ) from None
    except Exception as exc:  # corrupt zip, truncated file, safetensors header error...
        raise LatentizeError(f"encoder.model: cannot read {path}: {type(exc).__name__}: {exc}") from None


def _read_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.Tensor]]:
    """Shapes of every tensor (safetensors: header only) and the few small tensors whose
    values the config needs (Playground's ``edm_mean`` / ``edm_std``)."""
    wanted = ("edm_mean", "edm_std")
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                values = {k: f.get_tensor(k) for k in wanted if k in shapes}
        except Exception as exc:
            raise LatentizeError(f"encoder.model: cannot read {path}: {type(exc).__name__}: {exc}") from None
        return shapes, values
    tensors = read_checkpoint(path, mmap=True)
    return {k: tuple(v.shape) for k, v in tensors.items()}, {k: tensors[k] for k in wanted if k in tensors}


# --- layout and geometry ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Where the autoencoder sits in a file and how its keys are named."""

    prefix: str  # "", "first_stage_model." or "vae."
    naming: str  # "ldm" or "diffusers"

    def strip(self, items: Mapping[str, Any]) -> dict[str, Any]:
        """The autoencoder's entries, prefix removed; everything else dropped."""
        n = len(self.prefix)
        return {k[n:]: v for k, v in items.items() if k.startswith(self.prefix) and k[n:].startswith(_SECTIONS)}


def _detect_layout(keys: Sequence[str], path: Path) -> _Layout:
    for prefix in (*VAE_PREFIXES, ""):
        sub = {k[len(prefix) :] for k in keys if k.startswith(prefix)}
        if "encoder.conv_in.weight" not in sub:
            continue
        if any(k.startswith("encoder.down_blocks.") for k in sub):
            return _Layout(prefix, "diffusers")
        if any(k.startswith("encoder.down.") for k in sub):
            return _Layout(prefix, "ldm")
    raise LatentizeError(
        f"encoder.model: {path} does not hold an ldm/taming autoencoder: expected keys like "
        "'encoder.conv_in.weight', 'encoder.down.0.block.0.norm1.weight', 'quant_conv.weight' "
        "(at the top level or under 'first_stage_model.'), or diffusers names like "
        f"'encoder.down_blocks.0.resnets.0.norm1.weight'; found {_few(keys)}"
    )


def _names(naming: str, n_levels: int) -> dict[str, Any]:
    if naming == "ldm":
        return {
            "resnet": lambda i, j: f"encoder.down.{i}.block.{j}.conv1.weight",
            "enc_attn": lambda i: f"encoder.down.{i}.attn.0.q.weight",
            "mid_attn": "encoder.mid.attn_1.q.weight",
            # diffusers' up_blocks[u] is ldm's up[n - 1 - u]
            "dec_resnet": lambda u, j: f"decoder.up.{n_levels - 1 - u}.block.{j}.conv1.weight",
            "dec_attn": lambda u: f"decoder.up.{n_levels - 1 - u}.attn.0.q.weight",
        }
    return {
        "resnet": lambda i, j: f"encoder.down_blocks.{i}.resnets.{j}.conv1.weight",
        "enc_attn": lambda i: f"encoder.down_blocks.{i}.attentions.0.to_q.weight",
        "mid_attn": "encoder.mid_block.attentions.0.to_q.weight",
        "dec_resnet": lambda u, j: f"decoder.up_blocks.{u}.resnets.{j}.conv1.weight",
        "dec_attn": lambda u: f"decoder.up_blocks.{u}.attentions.0.to_q.weight",
    }


def infer_norm_groups(channels: Sequence[int]) -> int:
    """GroupNorm groups of a model with these widths (the weights do not record it).

    32 (ldm's and taming's hard-coded value) when every width is a multiple of 32; otherwise
    the largest count <= 32 dividing every width (the file cannot come from ldm/taming code).
    """
    g = 0
    for c in channels:
        g = math.gcd(g, int(c))
    if g % LDM_NORM_GROUPS == 0:
        return LDM_NORM_GROUPS
    return max(d for d in range(1, LDM_NORM_GROUPS + 1) if g % d == 0)


@dataclass
class _Geometry:
    in_channels: int
    block_out_channels: list[int]
    layers_per_block: int
    enc_attn: list[bool]
    mid_attn: bool
    enc_out: int  # encoder.conv_out out channels (2 z for KL, z for VQ)
    quant_conv: tuple[int, ...] | None
    has_decoder: bool
    out_channels: int | None
    dec_attn: list[bool] | None  # in diffusers' up_blocks order
    has_post_quant_conv: bool
    codebook: tuple[int, ...] | None


def _geometry(shapes: Mapping[str, tuple[int, ...]], layout: _Layout, path: Path) -> _Geometry:
    sh = layout.strip(shapes)

    def need(key: str) -> tuple[int, ...]:
        if key not in sh:
            raise LatentizeError(f"encoder.model: {path} lacks {layout.prefix + key!r}; found {_few(sh)}")
        return sh[key]

    probe = _names(layout.naming, 0)
    n_levels = 0
    while probe["resnet"](n_levels, 0) in sh:
        n_levels += 1
    if n_levels == 0:
        raise LatentizeError(
            f"encoder.model: {path} has no encoder resnet blocks (expected {layout.prefix + probe['resnet'](0, 0)!r}); "
            f"found {_few(sh)}"
        )
    names = _names(layout.naming, n_levels)

    def count(level_key: Any, i: int) -> int:
        j = 0
        while level_key(i, j) in sh:
            j += 1
        return j

    layers = [count(names["resnet"], i) for i in range(n_levels)]
    if len(set(layers)) != 1:
        raise LatentizeError(
            f"encoder.model: {path} has {layers} resnet blocks in its encoder levels; diffusers "
            "needs the same number in every level"
        )
    conv_in = need("encoder.conv_in.weight")
    block_out = [int(sh[names["resnet"](i, 0)][0]) for i in range(n_levels)]
    has_decoder = any(k.startswith("decoder.") for k in sh)
    out_channels = dec_attn = None
    if has_decoder:
        out_channels = int(need("decoder.conv_out.weight")[0])
        dec_layers = [count(names["dec_resnet"], u) for u in range(n_levels)]
        if dec_layers != [layers[0] + 1] * n_levels:
            raise LatentizeError(
                f"encoder.model: {path}: the decoder has {dec_layers} resnet blocks per level; "
                f"an encoder with {layers[0]} per level needs {layers[0] + 1} in each"
            )
        dec_attn = [names["dec_attn"](u) in sh for u in range(n_levels)]
    return _Geometry(
        in_channels=int(conv_in[1]),
        block_out_channels=block_out,
        layers_per_block=layers[0],
        enc_attn=[names["enc_attn"](i) in sh for i in range(n_levels)],
        mid_attn=names["mid_attn"] in sh,
        enc_out=int(need("encoder.conv_out.weight")[0]),
        quant_conv=sh.get("quant_conv.weight"),
        has_decoder=has_decoder,
        out_channels=out_channels,
        dec_attn=dec_attn,
        has_post_quant_conv="post_quant_conv.weight" in sh,
        codebook=sh.get("quantize.embedding.weight"),
    )


def _block_types(geo: _Geometry) -> tuple[list[str], list[str]]:
    down = ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in geo.enc_attn]
    dec_attn = geo.dec_attn if geo.dec_attn is not None else list(reversed(geo.enc_attn))
    up = ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in dec_attn]
    return down, up


def _common_config(geo: _Geometry, groups_override: int | None, path: Path) -> dict[str, Any]:
    down, up = _block_types(geo)
    if groups_override is not None:
        groups = int(groups_override)
        bad = [c for c in geo.block_out_channels if c % groups]
        if bad:
            raise LatentizeError(f"encoder.original_config: norm_num_groups {groups} does not divide the widths {bad}")
    else:
        groups = infer_norm_groups(geo.block_out_channels)
        if groups != LDM_NORM_GROUPS:
            logger.warning(
                "%s: widths %s are not all multiples of 32 (ldm/taming's GroupNorm groups); "
                "assuming norm_num_groups=%d. Set ddconfig.norm_num_groups in encoder.original_config "
                "if that is wrong.",
                path,
                geo.block_out_channels,
                groups,
            )
    return {
        "in_channels": geo.in_channels,
        "out_channels": geo.out_channels if geo.out_channels is not None else geo.in_channels,
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": list(geo.block_out_channels),
        "layers_per_block": geo.layers_per_block,
        "norm_num_groups": groups,
        "mid_block_add_attention": geo.mid_attn,
    }


# --- original_config YAML ---------------------------------------------------------------------


@overload
def find_original_config(path: Path, config: Config, *, required: Literal[True]) -> Path: ...


@overload
def find_original_config(path: Path, config: Config, *, required: bool) -> Path | None: ...


def find_original_config(path: Path, config: Config, *, required: bool) -> Path | None:
    """``encoder.original_config`` if set, else ``<stem>.yaml`` / ``.yml`` next to ``path``."""
    explicit = getattr(config.encoder, "original_config", None)
    if explicit:
        found = Path(explicit).expanduser()
        if not found.is_file():
            raise LatentizeError(f"encoder.original_config: {found} does not exist")
        return found
    for suffix in (".yaml", ".yml"):
        sibling = Path(path).with_suffix(suffix)
        if sibling.is_file():
            return sibling
    if required:
        raise LatentizeError(
            f"encoder.model: {path} needs its taming/ldm YAML (model.params.ddconfig, embed_dim, "
            f"n_embed) and none was found beside it ({Path(path).with_suffix('.yaml').name}); "
            "set encoder.original_config to the YAML's path"
        )
    return None


@dataclass
class _Original:
    path: Path
    target: str
    ddconfig: dict[str, Any]
    params: dict[str, Any]  # the autoencoder's model.params (embed_dim, n_embed, remap...)
    scale_factor: float | None
    shift_factor: float | None


def _read_original(path: Path) -> _Original:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise LatentizeError(f"encoder.original_config: cannot read {path}: {exc}") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("params"), dict):
        raise LatentizeError(f"encoder.original_config: {path} has no model.params")
    params = model["params"]
    target = str(model.get("target", ""))
    ae_params = params
    if "ddconfig" not in params and isinstance(params.get("first_stage_config"), dict):
        first = params["first_stage_config"]
        target = str(first.get("target", ""))
        ae_params = first.get("params") or {}
    ddconfig = ae_params.get("ddconfig")
    if not isinstance(ddconfig, dict):
        raise LatentizeError(
            f"encoder.original_config: {path} has neither model.params.ddconfig nor "
            "model.params.first_stage_config.params.ddconfig"
        )
    for key in ("ch", "ch_mult", "num_res_blocks", "z_channels", "in_channels"):
        if key not in ddconfig:
            raise LatentizeError(f"encoder.original_config: {path}: ddconfig lacks {key!r}")

    def number(key: str) -> float | None:
        value = params.get(key)
        return float(value) if isinstance(value, (int, float)) else None

    return _Original(path, target, ddconfig, ae_params, number("scale_factor"), number("shift_factor"))


def _expected_from_yaml(orig: _Original) -> dict[str, Any]:
    """The geometry a ddconfig describes, in :class:`_Geometry`'s terms."""
    dd = orig.ddconfig
    mult = list(dd["ch_mult"])
    n = len(mult)
    resolution = dd.get("resolution")
    attn_res = set(dd.get("attn_resolutions") or [])
    # taming/ldm: level i runs at resolution / 2**i, with attention after each resnet there.
    enc_attn = [resolution is not None and resolution // 2**i in attn_res for i in range(n)]
    return {
        "in_channels": int(dd["in_channels"]),
        "block_out_channels": [int(dd["ch"]) * int(m) for m in mult],
        "layers_per_block": int(dd["num_res_blocks"]),
        "enc_attn": enc_attn,
        "dec_attn": list(reversed(enc_attn)),
        "mid_attn": dd.get("attn_type", "vanilla") != "none",
        "out_channels": int(dd["out_ch"]) if "out_ch" in dd else None,
    }


def _cross_check(orig: _Original, geo: _Geometry, extra: Mapping[str, tuple[Any, Any]], path: Path) -> None:
    expected = _expected_from_yaml(orig)
    found = {
        "in_channels": geo.in_channels,
        "block_out_channels": geo.block_out_channels,
        "layers_per_block": geo.layers_per_block,
        "enc_attn": geo.enc_attn,
        "mid_attn": geo.mid_attn,
        "dec_attn": geo.dec_attn,
        "out_channels": geo.out_channels,
    }
    labels = {
        "enc_attn": "encoder attention levels",
        "dec_attn": "decoder attention levels (up_blocks order)",
        "mid_attn": "mid-block attention",
    }
    diffs = []
    for key, want in expected.items():
        have = found[key]
        if have is None or want is None:
            continue  # absent from the file (no decoder) or from the YAML
        if have != want:
            diffs.append(f"{labels.get(key, key)}: YAML {want} vs weights {have}")
    for key, (want, have) in extra.items():
        if want is not None and have != want:
            diffs.append(f"{key}: YAML {want} vs weights {have}")
    if diffs:
        raise LatentizeError(f"encoder.original_config: {orig.path} does not describe {path}: " + "; ".join(diffs))


# --- key conversion and strict loading --------------------------------------------------------

_LEVEL_ATTN = re.compile(r"^(encoder\.down|decoder\.up)\.(\d+)\.attn\.")
_LEGACY_ATTN = ((".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0."))


def _ldm_to_diffusers(state: dict[str, torch.Tensor], n_levels: int) -> dict[str, torch.Tensor]:
    """ldm/taming names -> diffusers names (diffusers' converter plus the level attentions)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, update_vae_attentions_ldm_to_diffusers

    level_attn = {k for k in state if _LEVEL_ATTN.match(k)}
    codebook = {k for k in state if k.startswith("quantize.")}
    rest = {k: v for k, v in state.items() if k not in level_attn and k not in codebook}
    blocks = {"down_block_types": [None] * n_levels, "up_block_types": [None] * n_levels}
    out = convert_ldm_vae_checkpoint(rest, blocks)
    for i in range(n_levels):
        keys = [k for k in level_attn if k.startswith(f"encoder.down.{i}.attn.")]
        update_vae_attentions_ldm_to_diffusers(
            keys, out, state, mapping={"old": f"down.{i}.attn", "new": f"down_blocks.{i}.attentions"}
        )
        keys = [k for k in level_attn if k.startswith(f"decoder.up.{i}.attn.")]
        update_vae_attentions_ldm_to_diffusers(
            keys, out, state, mapping={"old": f"up.{i}.attn", "new": f"up_blocks.{n_levels - 1 - i}.attentions"}
        )
    for k in codebook:
        out[k] = state[k]
    return out


def _diffusers_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers names, with the pre-0.14 attention names (query/key/value/proj_attn) updated."""
    out = {}
    for k, v in state.items():
        if ".attentions." in k:
            for old, new in _LEGACY_ATTN:
                k = k.replace(old, new)
            if v.ndim == 4 and v.shape[2:] == (1, 1):  # 1x1 conv attention weights -> linear
                v = v[:, :, 0, 0]
        out[k] = v
    return out


def _build_and_load(cls: Any, model_config: Mapping[str, Any], path: Path) -> torch.nn.Module:
    """Builds ``cls`` from ``model_config``, loads the file's tensors strictly, float32 CPU eval."""
    import inspect

    import torch

    from latentize.encoders.missing import MissingDecoder

    tensors = read_checkpoint(path)
    layout = _detect_layout(list(tensors), path)
    state = layout.strip(tensors)
    if layout.naming == "ldm":
        n_levels = len(model_config["block_out_channels"])
        converted = _ldm_to_diffusers(state, n_levels)
    else:
        converted = _diffusers_names(state)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in model_config.items() if k in accepted and v is not None}
    model = cls(**kwargs)
    expected = set(model.state_dict())
    has_decoder = any(k.startswith("decoder.") for k in converted)
    missing = expected - set(converted)
    if not has_decoder:
        missing = {k for k in missing if not k.startswith(_DECODER_SIDE)}
    unexpected = set(converted) - expected
    if len(converted) != len(state):
        # diffusers' converter drops names it does not know; find the file's tensors it dropped.
        kept = {v.data_ptr() for v in converted.values()}
        dropped = [layout.prefix + k for k, v in state.items() if v.data_ptr() not in kept]
        unexpected |= set(dropped) or {f"({len(state) - len(converted)} unconvertible tensors)"}
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"model tensors missing from the file: {_few(missing)}")
        if unexpected:
            parts.append(f"file tensors the model has no place for: {_few(unexpected)}")
        raise LatentizeError(
            f"encoder.model: {path} ({layout.naming} naming) does not fit a {cls.__name__} "
            f"with the geometry read from it; " + "; ".join(parts)
        )
    try:
        model.load_state_dict(converted, strict=has_decoder)
    except RuntimeError as exc:
        raise LatentizeError(f"encoder.model: {path}: tensor shapes do not fit the model: {exc}") from None
    if not has_decoder:
        model.decoder = MissingDecoder(path)
        if not any(k.startswith("post_quant_conv.") for k in converted):
            model.post_quant_conv = MissingDecoder(path)
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in model.parameters()):
        torch.nn.Module.to(model, device="cpu", dtype=torch.float32)  # plain Module.to: no diffusers warning
    return model.eval()


# --- the loaders ------------------------------------------------------------------------------


def _groups_override(orig: _Original | None) -> int | None:
    if orig is None:
        return None
    value = orig.ddconfig.get("norm_num_groups", orig.ddconfig.get("num_groups"))
    return int(value) if value is not None else None


class LdmVaeLoader:
    """ldm / Stable Diffusion VAE single files -> diffusers ``AutoencoderKL`` (``encoder.type: kl``).

    ``read_config`` returns an ``AutoencoderKL`` config read from the tensor shapes, plus
    ``scaling_factor`` / ``shift_factor`` when known: ``encoder.scaling_factor`` /
    ``shift_factor`` if set, else the YAML's ``model.params.scale_factor`` / ``shift_factor``;
    absent otherwise (the caller's preset or default decides). Playground-style files with
    ``edm_mean`` / ``edm_std`` give ``latents_mean`` / ``latents_std`` (and, as diffusers does,
    ``scaling_factor`` 0.5 unless set).
    """

    def read_config(self, path: Path, config: Config) -> dict[str, Any]:
        path = Path(path)
        shapes, values = _read_shapes(path)
        layout = _detect_layout(list(shapes), path)
        geo = _geometry(shapes, layout, path)
        if geo.codebook is not None:
            raise LatentizeError(
                f"encoder.model: {path} holds a VQ autoencoder (it has a codebook "
                f"'{layout.prefix}quantize.embedding.weight'); set encoder.type to 'vq'"
            )
        if geo.enc_out % 2:
            raise LatentizeError(
                f"encoder.model: {path}: encoder.conv_out has {geo.enc_out} channels; a KL encoder "
                "outputs mean and logvar (an even count). Is this a VQ model? Set encoder.type to 'vq'"
            )
        latent = geo.enc_out // 2
        if geo.quant_conv is not None and tuple(geo.quant_conv[:2]) != (2 * latent, 2 * latent):
            raise LatentizeError(
                f"encoder.model: {path}: quant_conv maps {geo.quant_conv[1]} to {geo.quant_conv[0]} "
                f"channels; diffusers' AutoencoderKL needs embed_dim == z_channels ({2 * latent} to {2 * latent})"
            )
        orig_path = find_original_config(path, config, required=False)
        orig = _read_original(orig_path) if orig_path else None
        if orig is not None:
            embed = orig.params.get("embed_dim")
            _cross_check(
                orig,
                geo,
                {
                    "z_channels": (orig.ddconfig.get("z_channels"), latent),
                    "embed_dim": (embed if geo.quant_conv is not None else None, latent),
                },
                path,
            )
        model_config = {
            "_class_name": "AutoencoderKL",
            **_common_config(geo, _groups_override(orig), path),
            "latent_channels": latent,
            "use_quant_conv": geo.quant_conv is not None,
            "use_post_quant_conv": geo.has_post_quant_conv if geo.has_decoder else geo.quant_conv is not None,
        }
        if orig is not None and orig.ddconfig.get("resolution"):
            model_config["sample_size"] = int(orig.ddconfig["resolution"])
        if "edm_mean" in values and "edm_std" in values:
            model_config["latents_mean"] = [float(v) for v in values["edm_mean"].flatten()]
            model_config["latents_std"] = [float(v) for v in values["edm_std"].flatten()]
        enc = config.encoder
        scaling = enc.scaling_factor
        if scaling is None and orig is not None:
            scaling = orig.scale_factor
        if scaling is None and "latents_mean" in model_config:
            scaling = 0.5  # diffusers' PLAYGROUND_VAE_SCALING_FACTOR for edm_mean/std files
        shift = enc.shift_factor
        if shift is None and orig is not None:
            shift = orig.shift_factor
        if scaling is not None:
            model_config["scaling_factor"] = float(scaling)
        if shift is not None:
            model_config["shift_factor"] = float(shift)
        return model_config

    def load(self, path: Path, config: Config, model_config: dict[str, Any]) -> torch.nn.Module:
        from diffusers import AutoencoderKL

        return _build_and_load(AutoencoderKL, model_config, Path(path))


class TamingVqLoader:
    """taming-transformers / ldm VQGAN checkpoints -> diffusers ``VQModel`` (``encoder.type: vq``).

    Needs the model's YAML (``encoder.original_config``, else ``<stem>.yaml`` beside the
    checkpoint): ``model.params.ddconfig`` maps to the ``VQModel`` config (``block_out_channels
    = ch * ch_mult``, ``layers_per_block = num_res_blocks``, ``latent_channels = z_channels``,
    ``vq_embed_dim = embed_dim``, ``num_vq_embeddings = n_embed``, attention blocks at the levels
    whose resolution is in ``attn_resolutions``), checked against the weights' shapes.
    Gumbel / EMA quantisers and remapped codebooks (``remap``) are refused: diffusers'
    ``VectorQuantizer`` implements neither.
    """

    def read_config(self, path: Path, config: Config) -> dict[str, Any]:
        path = Path(path)
        orig = _read_original(find_original_config(path, config, required=True))
        cls_name = orig.target.rsplit(".", 1)[-1]
        if "gumbel" in cls_name.lower() or cls_name.upper().startswith("EMA"):
            raise LatentizeError(
                f"encoder.original_config: {orig.path}: {orig.target} uses a quantiser diffusers' "
                "VQModel does not implement (only taming's VectorQuantizer / ldm's VQModel are supported)"
            )
        if orig.params.get("remap"):
            raise LatentizeError(
                f"encoder.original_config: {orig.path}: remapped codebooks (remap: "
                f"{orig.params['remap']}) are not supported by diffusers' VQModel"
            )
        if orig.ddconfig.get("double_z"):
            raise LatentizeError(
                f"encoder.original_config: {orig.path}: ddconfig.double_z is true, which is a KL "
                "autoencoder; set encoder.type to 'kl'"
            )
        for key in ("embed_dim", "n_embed"):
            if key not in orig.params:
                raise LatentizeError(f"encoder.original_config: {orig.path}: model.params lacks {key!r}")
        shapes, _ = _read_shapes(path)
        layout = _detect_layout(list(shapes), path)
        geo = _geometry(shapes, layout, path)
        if geo.codebook is None:
            raise LatentizeError(
                f"encoder.model: {path} has no codebook ('quantize.embedding.weight'); a KL "
                "autoencoder? Set encoder.type to 'kl'"
            )
        if geo.quant_conv is None:
            raise LatentizeError(f"encoder.model: {path} lacks 'quant_conv.weight', which a VQModel needs")
        _cross_check(
            orig,
            geo,
            {
                "z_channels": (int(orig.ddconfig["z_channels"]), geo.enc_out),
                "embed_dim": (int(orig.params["embed_dim"]), int(geo.codebook[1])),
                "n_embed": (int(orig.params["n_embed"]), int(geo.codebook[0])),
                "quant_conv (embed_dim x z_channels)": (
                    (int(orig.params["embed_dim"]), int(orig.ddconfig["z_channels"])),
                    tuple(geo.quant_conv[:2]),
                ),
            },
            path,
        )
        model_config = {
            "_class_name": "VQModel",
            **_common_config(geo, _groups_override(orig), path),
            "latent_channels": int(orig.ddconfig["z_channels"]),
            "vq_embed_dim": int(orig.params["embed_dim"]),
            "num_vq_embeddings": int(orig.params["n_embed"]),
        }
        if orig.ddconfig.get("resolution"):
            model_config["sample_size"] = int(orig.ddconfig["resolution"])
        return model_config

    def load(self, path: Path, config: Config, model_config: dict[str, Any]) -> torch.nn.Module:
        from diffusers import VQModel

        return _build_and_load(VQModel, model_config, Path(path))


FILE_LOADERS.add("kl", LdmVaeLoader())
FILE_LOADERS.add("vq", TamingVqLoader())
