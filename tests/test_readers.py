"""The user guide's reader table (docs/guide.md, "Reading the latents"), cell by cell: each cell
loads a data folder of a committed output in a fresh process where neither latentize nor (but for
Ray Data) Ray is imported, and must give exactly the latents that were written, with their shape."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from latent_outputs import SHAPES, TEXT_WIDTH, Built, build_output, text_length

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide.md"
READERS = ["pyarrow", "Ray Data", "HF `datasets`", "polars", "DuckDB", "webdataset (`output.format: webdataset`)"]
LAYOUTS = ["fixed_shape_tensor", "list"]
FOLDER = "96x64"


def reader_table() -> dict[str, dict[str, str]]:
    """reader -> {"import", "fixed_shape_tensor", "list"}: the cells of the guide's table."""
    section = GUIDE.read_text().split("## Reading the latents", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, dict[str, str]] = {}
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| reader") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) == 4:
            code = [re.fullmatch(r"`(.*)`", c) for c in cells[1:]]
            rows[cells[0]] = {
                "import": code[0].group(1) if code[0] else "",
                "fixed_shape_tensor": code[1].group(1) if code[1] else "",
                "list": code[2].group(1) if code[2] else "",
            }
    return rows


def test_the_table_has_a_row_per_reader() -> None:
    assert list(reader_table()) == READERS


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    """The same rows as Parquet in both layouts and as WebDataset tars; no stray file (these
    readers read whole folders, as the guide says)."""
    root = tmp_path_factory.mktemp("readers")
    shards = {"s0": {FOLDER: 9}, "s1": {FOLDER: 4, "64x64": 3}, "s2": {FOLDER: 7}}
    out = {t: build_output(str(root / t), shards, tensor_type=t, stray=False) for t in LAYOUTS}
    out["webdataset"] = build_output(str(root / "wds"), shards, sink="webdataset", stray=False)
    return out


CASES = [
    pytest.param(reader, layout, marks=[pytest.mark.slow] if reader == "Ray Data" else [])
    for reader in READERS
    for layout in LAYOUTS
]


@pytest.mark.parametrize(("reader", "layout"), CASES)
def test_reader_row_reads_the_written_latents(
    outputs: dict[str, Built], tmp_path: Path, reader: str, layout: str
) -> None:
    row = reader_table()[reader]
    code = row[layout] if row[layout] else row["fixed_shape_tensor"]  # "the same"
    built = outputs["webdataset" if reader.startswith("webdataset") else layout]
    result = tmp_path / "got.npy"
    banned = ["latentize"] if reader == "Ray Data" else ["latentize", "ray"]
    snippet = "\n".join(
        [
            "import glob, sys",
            "import numpy as np",
            row["import"],
            f"D = {built.layout.join(FOLDER)!r}",
            f"shape = {SHAPES[FOLDER]!r}",
            f"got = np.asarray({code})",
            f"loaded = [m for m in {banned!r} if m in sys.modules]",
            "assert not loaded, f'imported {loaded}'",
            f"np.save({str(result)!r}, got)",
        ]
    )
    subprocess.run([sys.executable, "-c", snippet], check=True, cwd=tmp_path, timeout=300)
    got = np.load(result)
    want = np.stack([built.tensors["latent"][k] for k in built.keys[FOLDER]])
    assert got.shape == want.shape
    # Row order is the reader's business (DuckDB promises none): compare the rows as a multiset,
    # in the stored dtype (DuckDB widens float16 to float32, which converts back exactly).
    assert sorted(r.tobytes() for r in got.astype(want.dtype)) == sorted(r.tobytes() for r in want)


@pytest.mark.parametrize("storage", ["padded", "trimmed"])
def test_plain_readers_read_the_text_columns_as_the_contract_stores_them(tmp_path: Path, storage: str) -> None:
    """Caption embeddings without latentize: pyarrow reads the Parquet columns (a trimmed
    ``prompt_embeds`` as lists of ``width``-long rows), webdataset the ``KEY.<column>.npy``
    members (a trimmed ``prompt_embeds`` as (rows, width))."""
    import glob

    import pyarrow.parquet as pq
    import webdataset as wds

    shards = {"s0": {FOLDER: 5}, "s1": {FOLDER: 4}}
    parquet = build_output(str(tmp_path / "pq"), shards, tensor_type="list", text=storage, stray=False)
    table = pq.read_table(parquet.layout.join(FOLDER))
    assert table.column_names[:5] == ["key", "latent", "prompt_embeds", "pooled_prompt_embeds", table.column_names[4]]
    for key, embeds in zip(table.column("key").to_pylist(), table.column("prompt_embeds").to_pylist(), strict=True):
        got = np.asarray(embeds, dtype=np.float16)
        rows = text_length(key) if storage == "trimmed" else 6
        assert got.shape == (rows, TEXT_WIDTH)
        np.testing.assert_array_equal(got, parquet.tensors["prompt_embeds"][key])
    tars = build_output(str(tmp_path / "wds"), shards, sink="webdataset", text=storage, stray=False)
    paths = sorted(glob.glob(tars.layout.join(FOLDER, "*.tar")))
    samples = list(wds.WebDataset(paths, shardshuffle=False).decode())
    assert sorted(s["__key__"] for s in samples) == sorted(tars.keys[FOLDER])
    for sample in samples:
        key = sample["__key__"]
        for name, value in tars.tensors.items():
            if name != "latent":
                np.testing.assert_array_equal(sample[f"{name}.npy"], value[key])
