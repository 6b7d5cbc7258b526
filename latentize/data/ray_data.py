"""``read_latents``: the committed rows of one data folder as a Ray Dataset, ``read_latent_folders``:
one per data folder (Ray imported on call)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from latentize.data.plan import OutputInfo, read_output
from latentize.errors import LatentizeError
from latentize.sinks.base import canonical_tensor
from latentize.sinks.layout import OutputLayout

__all__ = ["read_latent_folders", "read_latents"]


def read_latents(
    root: str,
    *,
    folder: str | None = None,
    columns: Sequence[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    **read_args: Any,
) -> Any:
    """A ``ray.data.Dataset`` of the committed data files of one data folder of ``root``.

    Only files listed in commit markers of the run's fingerprint are read, so a run in progress
    or a crashed one shows committed shards only. Tensor columns come as canonical Arrow tensors
    whatever ``output.tensor_type`` stored (nested lists are converted), so numpy batches hold
    (N, C, h, w) arrays.

    Args:
        root: the output root, a local path or any fsspec URL.
        folder: the data folder (``"256x256"``); None: the output's only folder with committed
            rows. An output of several folders (aspect-ratio buckets, several resolutions: one
            latent shape each, which one dataset cannot mix) needs one named, or
            :func:`read_latent_folders` for all of them.
        columns: columns to read (default: all).
        storage_options: fsspec options of the output root.
        read_args: passed to ``ray.data.read_parquet``.

    Raises:
        LatentizeError: no committed rows in the folder, or several folders and none chosen (the
            message lists them with their rows and latent shapes).
    """
    layout = OutputLayout(root, storage_options=storage_options)
    info = read_output(layout)
    if folder is None:
        if len(info.folders) != 1:
            raise LatentizeError(_choose_folder(layout, info))
        folder = info.folders[0]
    return _read_folder(layout, info, folder, columns, read_args)


def read_latent_folders(
    root: str,
    *,
    columns: Sequence[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    **read_args: Any,
) -> dict[str, Any]:
    """Every data folder of ``root`` with committed rows, as :func:`read_latents` reads one:
    ``{folder: ray.data.Dataset}`` in folder order (one latent shape per dataset), from one
    read of the markers.

    Raises:
        LatentizeError: ``root`` holds no latentize run, or a WebDataset output.
    """
    layout = OutputLayout(root, storage_options=storage_options)
    info = read_output(layout)
    return {folder: _read_folder(layout, info, folder, columns, read_args) for folder in info.folders}


def _choose_folder(layout: OutputLayout, info: OutputInfo) -> str:
    """Why ``read_latents`` needs a folder, and which there are (rows, stored shapes)."""
    if not info.folders:
        return f"{layout.url} has no committed rows yet"
    rows = {f: sum(u.rows for u in info.units if u.folder == f) for f in info.folders}
    specs = info.manifest.output.folders

    def shapes(folder: str) -> str:
        columns = specs[folder].columns if folder in specs else {}
        return ", ".join(f"{name} {c.shape}" for name, c in columns.items())

    listed = "; ".join(f"{f}: {rows[f]} rows" + (f", {shapes(f)}" if shapes(f) else "") for f in info.folders)
    return (
        f"{layout.url} has {len(info.folders)} data folders, one latent shape each ({listed}); "
        f"choose one with folder=, e.g. read_latents({layout.url!r}, folder={info.folders[0]!r}), "
        "or read each with read_latent_folders(root)"
    )


def _read_folder(
    layout: OutputLayout, info: OutputInfo, folder: str, columns: Sequence[str] | None, read_args: dict[str, Any]
) -> Any:
    import ray
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    paths = [layout.join(rel) for unit in info.units if unit.folder == folder for rel in unit.files]
    if not paths:
        raise LatentizeError(f"{layout.url} has no committed rows in {folder!r} (folders: {info.folders})")
    filesystem = None if layout.is_local else PyFileSystem(FSSpecHandler(layout.fs))
    ds = ray.data.read_parquet(paths, filesystem=filesystem, **read_args)
    if columns:
        # Ray pushes the projection into the read (its `columns=` argument is deprecated).
        ds = ds.select_columns(list(columns))
    with layout.fs.open(paths[0], "rb") as f:
        schema = pq.read_schema(f)
    nested = [field.name for field in schema if pa.types.is_fixed_size_list(field.type)]
    if columns:
        nested = [n for n in nested if n in columns]
    if nested:
        ds = ds.map_batches(_canonical, fn_kwargs={"names": tuple(nested)}, batch_format="pyarrow")
    return ds


def _canonical(table: pa.Table, names: tuple[str, ...] = ()) -> pa.Table:
    """Nested fixed-size list columns -> canonical Arrow tensors."""
    for name in names:
        table = table.set_column(table.schema.get_field_index(name), name, canonical_tensor(table.column(name)))
    return table
