"""The QA report's text pass: caption embeddings of an output with a text stage (the manifest's
``text`` entry, issue 21).

One streaming pass over the committed data files **on the driver**: each file is read in
blocks of :data:`~latentize.qa.scan.ROWS_PER_BLOCK` rows (Parquet row batches of the key and
text columns only; WebDataset tars member by member), so memory holds one block of embeddings
at a time, never the output's. It gathers:

* per stored text column: rows holding it, the mean, std, min and max of its finite values,
  and its non-finite values (with the rows and first keys holding them);
* token lengths: ``prompt_embeds_length`` (``storage: trimmed``) or the sums of
  ``prompt_attention_mask`` (padded, masked families) as a histogram; families without either
  (CLIP only) store no lengths;
* alignment: every data row must hold every text column (rows missing each are counted), a
  trimmed row's ``prompt_embeds`` rows must equal its ``prompt_embeds_length``, and
  ``_empty_prompt.npz`` must hold the manifest's columns.

The checks ``text_finite`` and ``text_aligned`` judge the result (:func:`text_checks`).
"""

from __future__ import annotations

import io
import logging
import math
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from latentize.encoders.text.spec import LENGTH, MASK
from latentize.qa.checks import Check
from latentize.qa.scan import ROWS_PER_BLOCK, DataFile
from latentize.sinks.base import is_ragged, is_tensor_type, tensor_numpy
from latentize.sinks.layout import EMPTY_PROMPT, OutputLayout
from latentize.tarnames import KEY_MEMBER

__all__ = ["ColumnFigures", "TextScan", "scan_text", "text_checks"]

logger = logging.getLogger(__name__)

#: Keys listed per finding.
KEY_LIMIT = 100


@dataclass
class ColumnFigures:
    """Mergeable figures of one stored text column.

    Attributes:
        dtype: the manifest's dtype of the column.
        rows: data rows holding the column.
        count, mean, m2: finite values, their mean and sum of squared deviations (Chan's merge).
        min, max: of the finite values (None before any).
        nonfinite: NaN or ±inf values; ``nonfinite_rows`` rows holding them, the first
            :data:`KEY_LIMIT` keys (sorted) in ``nonfinite_keys``.
    """

    dtype: str
    rows: int = 0
    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    min: float | None = None
    max: float | None = None
    nonfinite: int = 0
    nonfinite_rows: int = 0
    nonfinite_keys: list[str] = field(default_factory=list)

    def update(self, values: np.ndarray, row_of: np.ndarray, keys: list[str]) -> None:
        """Adds a block: ``values`` (V,) every stored value of the column in the block's rows,
        ``row_of`` (V,) the row (index into ``keys``) each belongs to."""
        self.rows += len(keys)
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        finite = np.isfinite(values)
        bad = int(values.size - np.count_nonzero(finite))
        if bad:
            rows = np.unique(np.asarray(row_of)[~finite])
            self.nonfinite += bad
            self.nonfinite_rows += int(rows.size)
            self.nonfinite_keys = sorted({*self.nonfinite_keys, *(keys[int(r)] for r in rows)})[:KEY_LIMIT]
            values = values[finite]
        if not values.size:
            return
        n, mean = int(values.size), float(values.mean())
        m2 = float(((values - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total
        low, high = float(values.min()), float(values.max())
        self.min = low if self.min is None else min(self.min, low)
        self.max = high if self.max is None else max(self.max, high)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "rows": self.rows,
            "count": self.count,
            "mean": self.mean if self.count else None,
            "std": math.sqrt(self.m2 / self.count) if self.count else None,
            "min": self.min,
            "max": self.max,
            "nonfinite": self.nonfinite,
            "nonfinite_rows": self.nonfinite_rows,
            "nonfinite_keys": list(self.nonfinite_keys),
        }


class TextScan:
    """What the text pass found (see the module docstring).

    Attributes:
        text: the manifest's ``text`` entry.
        columns: stored text column -> :class:`ColumnFigures`.
        rows: data rows read.
        missing: column -> data rows lacking it; ``missing_keys``: the first of those rows' keys.
        incomplete_rows: data rows lacking at least one text column.
        length_mismatch: trimmed rows whose ``prompt_embeds`` rows differ from their length.
        lengths: (L + 1,) rows per token length (None: the output stores no lengths).
    """

    def __init__(self, text: Mapping[str, Any]) -> None:
        self.text = dict(text)
        specs = dict(text.get("columns") or {})
        self.columns = {name: ColumnFigures(dtype=str(spec.get("dtype"))) for name, spec in specs.items()}
        self.rows = 0
        self.missing = dict.fromkeys(self.columns, 0)
        self.missing_keys: list[str] = []
        self.incomplete_rows = 0
        self.length_mismatch = 0
        self.length_source = LENGTH if LENGTH in specs else MASK if MASK in specs else None
        self.lengths: np.ndarray | None = np.zeros(0, np.int64) if self.length_source else None

    def update(self, keys: list[str], block: Mapping[str, list[np.ndarray | None]]) -> None:
        """Adds a block of ``keys`` rows: per text column each row's stored array (None: the
        row lacks it)."""
        n = len(keys)
        self.rows += n
        lacking = np.zeros(n, dtype=bool)
        for name, figures in self.columns.items():
            values = block.get(name) or [None] * n
            held = [i for i, v in enumerate(values) if v is not None]
            absent = n - len(held)
            if absent:
                self.missing[name] += absent
                lacking[[i for i, v in enumerate(values) if v is None]] = True
            if held:
                arrays = [np.asarray(values[i]).reshape(-1) for i in held]
                flat = np.concatenate(arrays)
                row_of = np.repeat(np.arange(len(held)), [a.size for a in arrays])
                figures.update(flat, row_of, [keys[i] for i in held])
        if lacking.any():
            self.incomplete_rows += int(lacking.sum())
            self.missing_keys = sorted({*self.missing_keys, *(keys[i] for i in np.flatnonzero(lacking))})[:KEY_LIMIT]
        self._lengths(block, n)

    def _lengths(self, block: Mapping[str, list[np.ndarray | None]], n: int) -> None:
        if self.length_source is None:
            return
        source = block.get(self.length_source) or [None] * n
        found = []
        embeds = block.get("prompt_embeds") or [None] * n
        for value, rows in zip(source, embeds, strict=True):
            if value is None:
                continue
            length = int(np.asarray(value).sum()) if self.length_source == MASK else int(value)
            found.append(length)
            if self.length_source == LENGTH and rows is not None and np.asarray(rows).shape[0] != length:
                self.length_mismatch += 1
        if found:
            counts = np.bincount(np.asarray(found, dtype=np.int64).clip(min=0))
            assert self.lengths is not None
            if counts.size > self.lengths.size:
                self.lengths = np.pad(self.lengths, (0, counts.size - self.lengths.size))
            self.lengths[: counts.size] += counts

    def lengths_section(self) -> dict[str, Any]:
        """The token-length histogram, or why there is none."""
        if self.lengths is None:
            rows = self.text.get("max_rows")
            return {
                "source": None,
                "note": "token lengths are not stored: every prompt is padded to "
                f"{rows if rows is not None else 'the family length'} tokens without a mask (CLIP-only family)",
                "histogram": None,
            }
        counts = self.lengths
        total = int(counts.sum())
        values = np.arange(counts.size)
        return {
            "source": self.length_source,
            "note": None,
            "rows": total,
            "min": int(values[counts > 0].min()) if total else None,
            "max": int(values[counts > 0].max()) if total else None,
            "mean": float((values * counts).sum() / total) if total else None,
            "histogram": {"lengths": values.tolist(), "counts": counts.tolist()},
        }


def _arrays(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray | None]:
    """A text column of one block -> each row's stored array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if is_tensor_type(column.type):
        return list(tensor_numpy(column))
    if is_ragged(column.type):
        rows = tensor_numpy(column.flatten()) if len(column) else np.zeros((0, 0))
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        return list(np.split(rows, np.cumsum(lengths)[:-1])) if len(lengths) else []
    return list(column.to_numpy(zero_copy_only=False))


def _parquet_blocks(layout: OutputLayout, data: DataFile, names: list[str]) -> Iterator[tuple[list[str], dict]]:
    with layout.fs.open(data.path, "rb") as f:
        pf = pq.ParquetFile(f)
        present = [n for n in names if n in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=ROWS_PER_BLOCK, columns=["key", *present]):
            table = pa.Table.from_batches([batch])
            keys = [str(k) for k in table.column("key").to_pylist()]
            block: dict[str, list[np.ndarray | None]] = {n: _arrays(table.column(n)) for n in present}
            for n in names:
                block.setdefault(n, [None] * len(keys))
            yield keys, block


def _tar_blocks(
    layout: OutputLayout, data: DataFile, names: list[str], tensors: list[str]
) -> Iterator[tuple[list[str], dict]]:
    """A tar's samples (consecutive members of one member key) that hold a tensor column: a
    data row; its text members by the known ``.<column>.npy`` suffixes."""
    wanted = {f"{n}.npy": n for n in names}
    # Longest first: a suffix that ends another (``latent.npy``, ``latent_flipped.npy``) loses.
    known = sorted([*wanted, *(f"{t}.npy" for t in tensors), KEY_MEMBER], key=len, reverse=True)
    keys: list[str] = []
    block: dict[str, list[np.ndarray | None]] = {n: [] for n in names}
    current: str | None = None
    sample: dict[str, Any] = {}
    is_data = False

    def finish() -> None:
        if current is None or not is_data:
            return
        keys.append(str(sample.pop(KEY_MEMBER, current)))
        for n in names:
            block[n].append(sample.get(n))

    with layout.fs.open(data.path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            found = next((s for s in known if member.name.endswith(f".{s}") and len(member.name) > len(s) + 1), None)
            if not member.isfile() or found is None:
                continue
            base = member.name[: -len(found) - 1]
            if base != current:
                finish()
                current, sample, is_data = base, {}, False
                if len(keys) >= ROWS_PER_BLOCK:
                    yield list(keys), {n: list(v) for n, v in block.items()}
                    keys.clear()
                    for v in block.values():
                        v.clear()
            extracted = tar.extractfile(member)
            assert extracted is not None
            if found == KEY_MEMBER:
                sample[KEY_MEMBER] = extracted.read().decode("utf-8")
            elif found in wanted:
                sample[wanted[found]] = np.load(io.BytesIO(extracted.read()), allow_pickle=False)
            else:
                is_data = True
    finish()
    if keys:
        yield keys, block


def scan_text(
    layout: OutputLayout, files: list[DataFile], *, fmt: str, text: Mapping[str, Any], tensors: list[str]
) -> TextScan:
    """The text pass over ``files`` (see the module docstring), on this process.

    Args:
        fmt: ``output.format`` (``parquet`` or ``webdataset``).
        text: the manifest's ``text`` entry.
        tensors: the stored latent columns (``encoder.columns``): a WebDataset sample holding
            one is a data row.
    """
    scan = TextScan(text)
    names = list(scan.columns)
    for data in files:
        blocks = _parquet_blocks(layout, data, names) if fmt == "parquet" else _tar_blocks(layout, data, names, tensors)
        for keys, block in blocks:
            scan.update(keys, block)
    return scan


def empty_prompt_section(layout: OutputLayout, text: Mapping[str, Any]) -> dict[str, Any]:
    """Whether ``_empty_prompt.npz`` is there and holds the manifest's text columns."""
    name = str(text.get("empty_prompt") or EMPTY_PROMPT)
    want = sorted((text.get("columns") or {}).keys())
    try:
        with np.load(io.BytesIO(layout.read_bytes(layout.join(name))), allow_pickle=False) as npz:
            held = sorted(npz.files)
            finite = all(np.isfinite(npz[k]).all() for k in held if np.issubdtype(npz[k].dtype, np.floating))
    except FileNotFoundError:
        return {"file": name, "present": False, "columns": [], "missing_columns": want, "finite": None}
    except (ValueError, OSError) as exc:  # not an .npz at all
        logger.warning("qa: %s: cannot read %s: %s", layout.url, name, exc)
        return {"file": name, "present": False, "columns": [], "missing_columns": want, "finite": None}
    return {
        "file": name,
        "present": True,
        "columns": held,
        "missing_columns": [c for c in want if c not in held],
        "finite": bool(finite),
    }


def text_section(scan: TextScan | None, text: Mapping[str, Any], empty: Mapping[str, Any]) -> dict[str, Any]:
    """The report's ``text`` section; ``scan`` None: the output holds no data file."""
    specs = dict(text.get("columns") or {})
    columns: dict[str, Any] = {}
    for name, spec in specs.items():
        figures = scan.columns[name].to_dict() if scan else ColumnFigures(dtype=str(spec.get("dtype"))).to_dict()
        columns[name] = {"shape": spec.get("shape"), **figures}
    return {
        "preset": text.get("preset"),
        "pipeline_class": text.get("pipeline_class"),
        "storage": text.get("storage"),
        "max_rows": text.get("max_rows"),
        "model": (text.get("identity") or {}).get("model"),
        "columns": columns,
        "nonfinite": {
            "values": {n: c["nonfinite"] for n, c in columns.items()},
            "rows": max((c["nonfinite_rows"] for c in columns.values()), default=0),
            "keys": sorted({k for c in columns.values() for k in c["nonfinite_keys"]})[:KEY_LIMIT],
        },
        "lengths": scan.lengths_section() if scan else TextScan(text).lengths_section(),
        "alignment": {
            "data_rows": scan.rows if scan else 0,
            "missing": dict(scan.missing) if scan else dict.fromkeys(specs, 0),
            "incomplete_rows": scan.incomplete_rows if scan else 0,
            "incomplete_keys": list(scan.missing_keys) if scan else [],
            "length_mismatch": scan.length_mismatch if scan else 0,
            "empty_prompt": dict(empty),
        },
    }


def text_checks(section: Mapping[str, Any]) -> list[Check]:
    """``text_finite``: every stored text value (and the empty prompt's) is finite;
    ``text_aligned``: every data row holds every text column, trimmed lengths agree with their
    rows, and the empty prompt holds every column."""
    nonfinite, align = section["nonfinite"], section["alignment"]
    empty = align["empty_prompt"]
    values = sum(nonfinite["values"].values())
    if values:
        bad = ", ".join(f"{n} {v}" for n, v in nonfinite["values"].items() if v)
        finite = Check.judge(
            "text_finite",
            False,
            f"{nonfinite['rows']} row(s) hold NaN or Inf text values ({bad}): {', '.join(nonfinite['keys'][:5])}",
        )
    elif empty["finite"] is False:
        finite = Check.judge("text_finite", False, f"the empty prompt's embeddings ({empty['file']}) hold NaN or Inf")
    else:
        finite = Check.judge("text_finite", True, "every stored text value is finite")
    problems = []
    missing = {n: v for n, v in align["missing"].items() if v}
    if missing:
        problems.append(
            f"{align['incomplete_rows']} of {align['data_rows']} data row(s) lack text columns ("
            + ", ".join(f"{n}: {v} rows" for n, v in missing.items())
            + (f"; e.g. {', '.join(align['incomplete_keys'][:5])})" if align["incomplete_keys"] else ")")
        )
    if align["length_mismatch"]:
        problems.append(f"{align['length_mismatch']} row(s) hold a prompt_embeds whose rows differ from {LENGTH}")
    if not empty["present"]:
        problems.append(f"{empty['file']} (the empty prompt's embeddings) is missing or unreadable")
    elif empty["missing_columns"]:
        problems.append(f"{empty['file']} lacks {', '.join(empty['missing_columns'])}")
    if problems:
        aligned = Check.judge("text_aligned", False, "; ".join(problems))
    else:
        aligned = Check.judge(
            "text_aligned", True, f"all {align['data_rows']} data row(s) hold every text column; the empty prompt too"
        )
    return [finite, aligned]
