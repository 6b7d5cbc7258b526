"""The Hugging Face hub in one place: whether it may be asked, files from the local cache first
and then the hub, the identity of weights without downloading them, model configs read as
diffusers reads them, and ``from_pretrained`` from the cache first.

Used by the image encoders (:mod:`latentize.encoders.base`, the tokenizers), their decoders
(:mod:`latentize.encoders.decoding`, which the QA report's reconstructions load), and the text
encoders (:mod:`latentize.encoders.text`). A model may be a local folder too: every function
takes either.

Light: ``huggingface_hub`` is imported inside the functions and torch never, because the driver
plans with these (it reads configs, never weights, and must not import torch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlparse

from latentize.errors import LatentizeError

__all__ = [
    "DIFFUSERS_WEIGHTS",
    "HubRepo",
    "fetch",
    "from_pretrained",
    "hub_failure",
    "is_local",
    "load_model_config",
    "locate",
    "offline",
    "read_json",
    "reachable",
    "sha256_file",
    "snapshot_commit",
    "weights_identity",
]

logger = logging.getLogger(__name__)

#: diffusers' weights files of a model folder, in the order it prefers them.
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids asking the hub."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def reachable(timeout_s: float = 3.0) -> bool:
    """Whether the hub's endpoint accepts a connection: one attempt, so that an unreachable hub
    fails at once instead of after huggingface_hub's half a minute of retries."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def hub_failure() -> str | None:
    """Why the hub cannot be asked now, or None when it can."""
    if offline():
        return "HF_HUB_OFFLINE is set"
    if not reachable():
        return "the Hugging Face hub is unreachable"
    return None


def is_local(model: str) -> bool:
    """Whether ``model`` names a local file or folder (else it is a hub id)."""
    return Path(model).expanduser().exists()


def read_json(path: Path, *, what: str = "encoder.model") -> dict[str, Any]:
    """A JSON file; a broken one is the config key ``what``'s error."""
    try:
        return cast(dict[str, Any], json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LatentizeError(f"{what}: {path} is not a valid JSON file ({exc})") from None


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes: the identity of the weights actually loaded."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def snapshot_commit(path: str | Path) -> str | None:
    """The resolved commit of a file in the Hugging Face cache: its snapshot folder's name."""
    parts = Path(path).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def locate(
    model: str, name: str, *, subfolder: str | None, revision: str | None, download: bool, what: str = "encoder.model"
) -> Path | None:
    """A file of a local folder or hub repo: the local path, or None when the repo has no such file.

    Hub files come from the local cache first; ``download`` fetches a missing one (the driver
    fetches only small JSON files; weights are fetched in the actors)."""
    if is_local(model):
        path = Path(model).expanduser() / (subfolder or "") / name
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    filename = f"{subfolder}/{name}" if subfolder else name
    cached = try_to_load_from_cache(model, filename, revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    if not download:
        return None
    try:
        return Path(hf_hub_download(model, name, subfolder=subfolder, revision=revision))
    except EntryNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LatentizeError(f"{what}: cannot fetch {filename} of {model!r}: {exc}") from None


def fetch(model: str, name: str, *, subfolder: str | None, revision: str | None, accepted: str) -> Path:
    """A file (weights, in the actors) of a local folder or hub repo, from the cache first, else
    downloaded; raises when there is none (``accepted``: what the model may be instead)."""
    path = locate(model, name, subfolder=subfolder, revision=revision, download=False)
    if path is None and not is_local(model):
        why = hub_failure()
        if why is not None:
            raise LatentizeError(f"encoder.model: {name} of {model!r} is not in the local Hugging Face cache and {why}")
        path = locate(model, name, subfolder=subfolder, revision=revision, download=True)
    if path is None:
        raise LatentizeError(f"encoder.model: {model} has no {name}; accepted: {accepted}")
    return path


def load_model_config(
    model: str, *, subfolder: str | None, revision: str | None, weight_files: Sequence[str] = DIFFUSERS_WEIGHTS
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Loads a diffusers model config (no weights) from a local folder or a hub id.

    The file is read as diffusers' ``ConfigMixin.load_config`` reads it (the JSON as it is),
    without importing diffusers: its model classes pull in torch, which the driver never needs.

    Returns ``(config, identity)``; identity holds what names the weights (model, subfolder,
    revision, resolved commit, sha256 of the first of ``weight_files`` there is: diffusers' names
    by default; none for models whose weights the caller identifies itself).

    The hub is used only when the local Hugging Face cache lacks the config; when it is
    unreachable this raises at once (one connect attempt) instead of retrying for half a minute.
    """
    identity: dict[str, Any] = {"model": model, "subfolder": subfolder, "revision": revision}
    if is_local(model):
        folder = Path(model).expanduser() / (subfolder or "")
        if not (folder / "config.json").exists():
            raise LatentizeError(
                f"encoder.model: {folder} has no config.json; give a diffusers model folder "
                "(saved with save_pretrained) or a hub id"
            )
        config = read_json(folder / "config.json")
        for name in weight_files:
            if (folder / name).exists():
                identity["weights_file"] = name
                identity["sha256"] = sha256_file(folder / name)
                break
        return config, identity

    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    cfg_name = f"{subfolder}/config.json" if subfolder else "config.json"
    try:
        cached = try_to_load_from_cache(model, cfg_name, revision=revision)
    except ValueError as exc:  # HFValidationError: a missing path, or no valid hub id either
        raise LatentizeError(
            f"encoder.model: {model!r} is neither an existing file or folder nor a hub id ({exc})"
        ) from None
    local_only = isinstance(cached, str)
    why = None if local_only else hub_failure()
    if why is not None:
        raise LatentizeError(
            f"encoder.model: {model!r} is not in the local Hugging Face cache and {why}. "
            "Point the encoder at a local diffusers model folder instead, e.g. "
            "--set encoder.model=/path/to/vae (a folder with config.json and "
            "diffusion_pytorch_model.safetensors; add --set encoder.subfolder=vae for a "
            "pipeline folder), or download it first on a machine with network access."
        )
    try:
        # A cached config is read where it lies; only a missing one is downloaded.
        path = (
            cached
            if isinstance(cached, str)
            else hf_hub_download(model, "config.json", subfolder=subfolder, revision=revision)
        )
    except (OSError, ValueError, EntryNotFoundError) as exc:
        raise LatentizeError(f"encoder.model: cannot load the config of {model!r}: {exc}") from None
    config = read_json(Path(path))
    if local_only:
        # The snapshot folder is named after the resolved commit: the exact weights' identity.
        commit = snapshot_commit(str(cached))
        if commit is not None:
            identity["commit"] = commit
    identity.update(
        weights_identity(model, weight_files, subfolder=subfolder, revision=revision, local_only=local_only)
    )
    return config, identity


def weights_identity(
    model: str, names: Sequence[str], *, subfolder: str | None, revision: str | None, local_only: bool
) -> dict[str, Any]:
    """sha256 of a hub model's weights file without downloading it: the cached copy's hash, or
    the hub's LFS object id (which is the file's sha256) and the resolved commit. The first of
    ``names`` there is counts; empty when none can be told."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    for name in names:
        filename = f"{subfolder}/{name}" if subfolder else name
        cached = try_to_load_from_cache(model, filename, revision=revision)
        if isinstance(cached, str):
            return {"weights_file": name, "sha256": sha256_file(Path(cached))}
        if local_only:
            continue
        try:
            meta = get_hf_file_metadata(hf_hub_url(model, name, subfolder=subfolder, revision=revision))
        except Exception:  # noqa: BLE001 - absent file or no access: try the next name
            continue
        found = {"weights_file": name, "commit": meta.commit_hash}
        if meta.etag and len(meta.etag) == 64:
            found["sha256"] = meta.etag
        return found
    return {}


def from_pretrained(cls: Any, model: str | None, **kwargs: Any) -> Any:
    """``cls.from_pretrained(model, **kwargs)`` (a diffusers or transformers class) from a local
    folder or the local Hugging Face cache first, then the hub (in the actors: the driver
    checked the model before any weights were asked for)."""
    try:
        return cls.from_pretrained(model, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        where = f"{model}/{kwargs['subfolder']}" if kwargs.get("subfolder") else model
        logger.info("%s not fully cached; fetching from the hub", where)
        return cls.from_pretrained(model, **kwargs)


class HubRepo:
    """A hub repo's files, from the local Hugging Face cache first, then the hub (asked once
    whether it may be: ``HF_HUB_OFFLINE``, one connect attempt).

    Args:
        model: the hub id.
        revision: branch, tag or commit (None: the default branch).
        what: the config key that named it, for error messages (``text.model``).
        fix: what to do when a file is neither cached nor reachable, for error messages.

    Attributes:
        commit: the resolved commit, once a file has told it (a cache snapshot's name or the
            hub's metadata).
    """

    #: What :meth:`file_sha256` says of a file the repo does not have.
    MISSING = "missing"

    def __init__(self, model: str, revision: str | None, *, what: str, fix: str) -> None:
        self.model = model
        self.revision = revision
        self.what = what
        self.fix = fix
        self.commit: str | None = None
        self._online: bool | None = None

    def may_download(self) -> bool:
        if self._online is None:
            self._online = not offline() and reachable()
        return self._online

    def path(self, name: str, *, optional: bool) -> str | None:
        """A file's local path (downloaded when not cached); None for an ``optional`` file the
        repo lacks or that cannot be fetched."""
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
        from huggingface_hub.errors import EntryNotFoundError

        cached = try_to_load_from_cache(self.model, name, revision=self.revision)
        if isinstance(cached, str):
            self._note_commit(cached)
            return cached
        if optional and (cached is not None or not self.may_download()):
            # The cache knows the file does not exist, or cannot be asked beyond the cache.
            return None
        if not self.may_download():
            raise LatentizeError(
                f"{self.what}: {name} of {self.model!r} is not in the local Hugging Face cache and the hub is "
                f"unreachable (or HF_HUB_OFFLINE is set). {self.fix}"
            )
        try:
            path = hf_hub_download(self.model, name, revision=self.revision)
        except EntryNotFoundError:
            if optional:
                return None
            raise LatentizeError(f"{self.what}: {self.model!r} has no {name}") from None
        except (OSError, ValueError) as exc:
            raise LatentizeError(f"{self.what}: cannot read {name} of {self.model!r}: {exc}") from None
        self._note_commit(path)
        return str(path)

    def _note_commit(self, path: str) -> None:
        # The snapshot folder is named after the resolved commit: the exact files' identity.
        if self.commit is None:
            self.commit = snapshot_commit(path)

    def json(self, name: str, *, optional: bool = False) -> dict[str, Any] | None:
        path = self.path(name, optional=optional)
        return None if path is None else read_json(Path(path), what=self.what)

    def file_sha256(self, name: str, *, hash_file: Any = sha256_file) -> str | None:
        """The sha256 of a file without reading it from the hub: the cache's blob name (blobs of
        LFS files are named by their sha256; other cached files are hashed with ``hash_file``)
        or the hub's LFS object id; :data:`MISSING` when the file does not exist, None when it
        cannot be told (offline and not cached)."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

        cached = try_to_load_from_cache(self.model, name, revision=self.revision)
        if isinstance(cached, str):
            blob = Path(cached).resolve().name
            return blob if _is_sha256(blob) else str(hash_file(Path(cached)))
        if cached is not None:
            return self.MISSING
        if not self.may_download():
            return None
        try:
            meta = get_hf_file_metadata(hf_hub_url(self.model, name, revision=self.revision))
        except Exception:  # noqa: BLE001 - absent file (404) or no access: reported as missing
            return self.MISSING
        self.commit = self.commit or meta.commit_hash
        return meta.etag if meta.etag and _is_sha256(meta.etag) else None


def _is_sha256(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)
