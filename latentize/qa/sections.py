"""What report.html shows: typed sections, read once from the report the QA built.

:func:`build_page` reads the report dict of :mod:`latentize.qa.run` (after
:func:`~latentize.qa.values.json_ready`: NaN and ±inf are ``None``) into a :class:`Page` of frozen
dataclasses, one per section, with their figures drawn (:mod:`latentize.qa.plots`); the templates
under ``templates/`` lay them out and escape every value. A field named like a key of the report
holds that key's value (:func:`_read`), the others are derived for the page. A top-level part the
QA did not write (absent or ``None``: no codebook for float latents...) is left out of the page.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from latentize.qa.checks import Check
from latentize.qa.plots import (
    BLUE,
    MAX_HISTOGRAMS,
    ORANGE,
    Plot,
    codebook_plot,
    histogram_plot,
    length_plot,
    mean_std_plot,
    pair_image,
    scale_plot,
)
from latentize.qa.values import sample_label, status_class, text

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "CHANNELS_COLLAPSE",
    "FOLDERS_COLLAPSE",
    "KEY_LIST_CAP",
    "MAX_PAIRS",
    "SHARDS_COLLAPSE",
    "Alignment",
    "Codebook",
    "ColumnStats",
    "DuplicateGroup",
    "Duplicates",
    "Encoder",
    "Figures",
    "FolderRow",
    "Folders",
    "KeyList",
    "Nonfinite",
    "NonfiniteBlock",
    "Outliers",
    "Page",
    "Pair",
    "Reconstruction",
    "Rows",
    "Sample",
    "Scale",
    "Section",
    "Shard",
    "Statistics",
    "StatsPart",
    "Text",
    "TextColumnRow",
    "build_page",
]

logger = logging.getLogger(__name__)

#: At most this many keys (non-finite rows, dead codes, duplicates...) are listed per list.
KEY_LIST_CAP = 50
#: The per-shard alignment table collapses into a ``<details>`` above this many shards.
SHARDS_COLLAPSE = 20
#: Per-channel tables collapse into a ``<details>`` above this many channels.
CHANNELS_COLLAPSE = 32
#: The per-folder table collapses into a ``<details>`` above this many data folders.
FOLDERS_COLLAPSE = 40
#: At most this many reconstruction pairs are drawn (the worst ones).
MAX_PAIRS = 64

Report = Mapping[str, Any]
Images = Mapping[str, tuple[np.ndarray, np.ndarray]]
_D = TypeVar("_D", bound="DataclassInstance")


def _read(cls: type[_D], part: Mapping[str, Any], **derived: Any) -> _D:
    """A ``cls`` whose fields named like keys of ``part`` hold their values, the others
    ``derived``. A key the QA always writes is required; a field with a default reads a key it
    writes only sometimes (``folder`` of a sample: outputs of several folders only)."""
    for f in dataclasses.fields(cls):
        if f.name not in derived and (f.name in part or f.default is dataclasses.MISSING):
            derived[f.name] = part[f.name]
    return cls(**derived)


def _get(part: Mapping[str, Any] | None, key: str) -> Any:
    """``part[key]``; None for a part the report holds as None (no codebook, no scores...)."""
    return None if part is None else part[key]


def _collapse(count: int, limit: int, what: str) -> str | None:
    """The ``<details>`` summary of a table of ``count`` rows; None (shown open) up to ``limit``."""
    return f"{count} {what}" if count > limit else None


@dataclass(frozen=True, kw_only=True)
class KeyList:
    """Keys shown as chips: the first :data:`KEY_LIST_CAP`, how many more there are, and
    ``kept`` (how many the QA run kept) when it kept only some."""

    shown: list[str]
    more: int
    kept: int | None = None
    what: str = "keys"

    @classmethod
    def of(
        cls, keys: Sequence[Any], *, total: int | None = None, truncated: bool = False, what: str = "keys"
    ) -> KeyList:
        """``keys`` as the report lists them; ``total``: how many there are in all."""
        shown = [str(k) for k in keys[:KEY_LIST_CAP]]
        more = max(len(keys), total or 0) - len(shown)
        return cls(shown=shown, more=more, kept=len(keys) if truncated else None, what=what)


# --------------------------------------------------------------------------- the page


@dataclass(frozen=True, kw_only=True)
class Rows:
    """The header's row counts: data rows, error rows, input shards."""

    data: int
    errors: int
    shards: int


@dataclass(frozen=True, kw_only=True)
class Section:
    """One ``<section>``: anchor id, title, and its view or the error that kept it from being built."""

    id: str
    title: str
    view: object | None = None
    error: str | None = None


@dataclass(frozen=True, kw_only=True)
class Page:
    """Everything report.html shows: the header (verdict, facts about the run, the checks) and
    the sections, in page order. ``passed`` None: the report holds no verdict."""

    passed: bool | None = None
    output: str | None = None
    generated_at: str | None = None
    latentize_version: str | None = None
    format_version: int | None = None
    rows: Rows | None
    checks: list[Check]
    sections: list[Section]

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed is True else "FAIL" if self.passed is False else "UNKNOWN"

    @property
    def verdict_class(self) -> str:
        return self.verdict.lower()


def build_page(report: Report, images: Images) -> Page:
    """The page of a :func:`~latentize.qa.values.json_ready` report, with ``images`` (key ->
    original and decoded (H, W, 3) arrays) for the reconstruction section. A section whose
    builder raises is kept with its error: one part the page cannot show loses no other."""
    builders: list[tuple[str, str, Callable[[], object | None]]] = [
        ("encoder", "Encoder", lambda: Encoder.read(report)),
        ("folders", "Data folders", lambda: Folders.read(report)),
        ("scale", "Scale check", lambda: Scale.read(report)),
        ("statistics", "Per-channel statistics", lambda: Statistics.read(report)),
        ("nonfinite", "Non-finite values and outliers", lambda: Nonfinite.read(report)),
        ("duplicates", "Duplicates", lambda: Duplicates.read(report)),
        ("alignment", "Alignment", lambda: Alignment.read(report)),
        ("codebook", "Codebook", lambda: Codebook.read(report)),
        ("text", "Caption embeddings", lambda: Text.read(report)),
        ("reconstruction", "Reconstruction", lambda: Reconstruction.read(report, images)),
    ]
    sections = []
    for sid, title, build in builders:
        try:
            view = build()
        except Exception as exc:  # noqa: BLE001 - one section that cannot be drawn must not lose the report
            logger.exception("QA report: section %r could not be rendered", sid)
            sections.append(Section(id=sid, title=title, error=repr(exc)))
            continue
        if view is not None:
            sections.append(Section(id=sid, title=title, view=view))
    rows, checks = report.get("rows"), [Check(**c) for c in report.get("checks") or []]
    return _read(Page, report, rows=_read(Rows, rows) if rows else None, checks=checks, sections=sections)


# --------------------------------------------------------------------------- encoder, scale


@dataclass(frozen=True, kw_only=True)
class Encoder:
    """The encoder the latents came from, as the manifest names it; its normalisation constants
    (None: the manifest records none); the stored columns as (name, shape, dtype)."""

    type: str | None
    model: str | None
    preset: str | None
    model_class: str | None
    input_range: str | None
    constants: dict[str, Any] | None
    columns: list[tuple[str, str, str]]

    @classmethod
    def read(cls, report: Report) -> Encoder | None:
        enc = report.get("encoder")
        if not enc:
            return None
        columns = [(name, " × ".join(map(str, c["shape"])), c["dtype"]) for name, c in enc["columns"].items()]
        return _read(cls, enc, columns=columns)


#: The scale section's figures, in the order the page lists them.
_SCALE_FIGURES = (
    "normalized_std",
    "normalized_mean",
    "stored_std",
    "stored_mean",
    "raw_std",
    "raw_mean",
    "tolerance",
    "shift_tolerance",
)


@dataclass(frozen=True, kw_only=True)
class Scale:
    """The scale check: its verdict sentence, a plot of the normalised std and mean against
    their accepted bands, the manifest's constants beside the recommended ones (name, manifest,
    recommended), and the figures. ``applicable`` False (VQ indices, no data): only ``message``,
    when the report gives one."""

    applicable: bool
    message: str | None = None
    plot: Plot | None = None
    constants: list[tuple[str, Any, Any]] | None = None
    figures: dict[str, float | None] | None = None

    @classmethod
    def read(cls, report: Report) -> Scale | None:
        scale = report.get("scale")
        if not scale:
            return None
        if not scale["applicable"]:
            return _read(cls, scale)  # no figures: at most a message
        manifest, recommended = scale["manifest"], scale["recommended"]
        plot = scale_plot(
            manifest=manifest,
            recommended=recommended,
            std=scale["normalized_std"],
            mean=scale["normalized_mean"],
            tolerance=scale["tolerance"],
            shift_tolerance=scale["shift_tolerance"],
        )
        names = dict.fromkeys([*manifest, *recommended])
        constants = [(n, manifest.get(n), recommended.get(n)) for n in names]
        return _read(cls, scale, plot=plot, constants=constants, figures={k: scale[k] for k in _SCALE_FIGURES})


# --------------------------------------------------------------------------- folders


@dataclass(frozen=True, kw_only=True)
class FolderRow:
    """One row of the folders table: a data folder's, or the whole output's (``total``).
    ``pooled``: per stored float column, the mean and std of its stored values over channels;
    ``scale``: the scale verdict."""

    name: str
    total: bool = False
    size: str
    resolution: str
    rows: int | None
    marker_rows: int | None
    pooled: list[tuple[float | None, float | None]]
    codes_used: int | None
    perplexity: float | None
    scale: str | None
    normalized_std: float | None
    sampled: int | None
    psnr: float | None
    ssim: float | None

    @classmethod
    def folder(cls, name: str, entry: Mapping[str, Any], columns: Sequence[str]) -> FolderRow:
        """A ``folders`` entry of the report; a folder without data rows has no statistics."""
        book, scale, rec = entry["codebook"], entry["scale"], entry["reconstruction"]
        return _read(
            cls,
            entry,
            name=name,
            size=_size_text(entry["size"]),
            resolution=_size_text(entry["resolution"]),
            pooled=[_pooled(entry["statistics"].get(c)) for c in columns],
            codes_used=_get(book, "used"),
            perplexity=_get(book, "perplexity"),
            scale=_get(scale, "status"),
            normalized_std=_get(scale, "normalized_std"),
            sampled=_get(rec, "sample"),
            psnr=_get(rec, "psnr"),
            ssim=_get(rec, "ssim"),
        )

    @classmethod
    def whole(cls, report: Report, folders: Sequence[FolderRow], columns: Sequence[str]) -> FolderRow:
        """The whole output's row, from the report's totals."""
        markers = [f.marker_rows for f in folders]
        book, rec = report["codebook"], report["reconstruction"]
        metrics = _get(rec, "metrics")
        verdicts = [c["status"] for c in report["checks"] if c["name"] == "scale"]
        return cls(
            name="all",
            total=True,
            size="",
            resolution="",
            rows=report["rows"]["data"],
            marker_rows=None if None in markers else sum(m for m in markers if m is not None),
            pooled=[_pooled(report["statistics"][c]) for c in columns],
            codes_used=_get(book, "used"),
            perplexity=_get(book, "perplexity"),
            scale=verdicts[0] if verdicts else None,
            normalized_std=report["scale"].get("normalized_std"),  # written when the check applies
            sampled=_get(rec, "sample"),
            psnr=metrics["psnr"]["mean"] if metrics else None,
            ssim=metrics["ssim"]["mean"] if metrics else None,
        )


def _size_text(size: Sequence[int] | None) -> str:
    return " × ".join(text(v) for v in size) if size else "—"


def _pooled(column: Mapping[str, Any] | None) -> tuple[float | None, float | None]:
    """Mean and std of a column's stored values over channels (None, None: no statistics)."""
    if column is None:
        return None, None
    pooled = column["stored"]["all"]
    return pooled["mean"], pooled["std"]


@dataclass(frozen=True, kw_only=True)
class Folders:
    """One row per data folder (an aspect-ratio bucket or a resolution) and one for the whole
    output: rows, stored mean and std per column, codebook use (VQ), the scale verdict and
    reconstruction scores."""

    columns: list[str]
    codebook: bool
    rows: list[FolderRow]
    summary: str | None

    @property
    def headers(self) -> list[str]:
        pooled = [f"{c} {figure}" for c in self.columns for figure in ("mean", "std")]
        codebook = ["codes used", "perplexity"] if self.codebook else []
        first = ["folder", "size", "resolution", "rows", "marker rows"]
        return [*first, *pooled, *codebook, "scale", "normalised std", "sampled", "PSNR (dB)", "SSIM"]

    @classmethod
    def read(cls, report: Report) -> Folders | None:
        folders = report.get("folders")
        if not folders:
            return None
        columns = list(dict.fromkeys(c for f in folders.values() for c in f["statistics"]))
        rows = [FolderRow.folder(name, f, columns) for name, f in folders.items()]
        return cls(
            columns=columns,
            codebook=any(f["codebook"] for f in folders.values()),
            rows=[*rows, FolderRow.whole(report, rows, columns)],
            summary=_collapse(len(rows), FOLDERS_COLLAPSE, "data folders"),
        )


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True, kw_only=True)
class Figures:
    """One row of a per-channel table: a channel's figures, or (``label`` ``all``) the pooled
    ones, which count no non-finite values."""

    label: int | str
    count: int
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    p1: float | None
    p50: float | None
    p99: float | None
    nonfinite: int | None = None

    @classmethod
    def read(cls, label: int | str, figures: Mapping[str, Any]) -> Figures:
        p = figures["percentiles"]  # keyed f"{level:g}" (LatentStats.to_dict)
        return _read(cls, figures, label=label, p1=p["1"], p50=p["50"], p99=p["99"])


#: A column's parts: title and plot colour.
_PARTS = {"stored": ("stored values (as written)", BLUE), "raw": ("raw values (before normalisation)", ORANGE)}


@dataclass(frozen=True, kw_only=True)
class StatsPart:
    """Stored or raw values of one column: rows, rows holding NaN/inf, the per-channel figures
    and the pooled ones, and a plot of each channel's mean ± std."""

    title: str
    rows: int
    nonfinite_rows: int
    channels: list[Figures]
    pooled: Figures
    plot: Plot | None
    summary: str | None

    @classmethod
    def read(cls, column: str, kind: str, part: Mapping[str, Any]) -> StatsPart:
        title, colour = _PARTS[kind]
        channels = [Figures.read(c["channel"], c) for c in part["channels"]]
        plot = mean_std_plot(
            [c.mean for c in channels],
            [c.std for c in channels],
            labels=[str(c.label) for c in channels],
            title=f"{column}: per-channel mean ± std, {title}",
            colour=colour,
            targets=kind == "stored",
        )
        return _read(
            cls,
            part,
            title=title.capitalize(),
            channels=channels,
            pooled=Figures.read("all", part["all"]),
            plot=plot,
            summary=_collapse(len(channels), CHANNELS_COLLAPSE, "channels"),
        )


@dataclass(frozen=True, kw_only=True)
class ColumnStats:
    """One stored float column: its stored and raw parts (raw only when the manifest's
    constants map stored values back), and its per-channel histograms (``channels``: how many;
    at most :data:`~latentize.qa.plots.MAX_HISTOGRAMS` are drawn)."""

    name: str
    parts: list[StatsPart]
    histogram: Plot | None
    channels: int

    @classmethod
    def read(cls, name: str, column: Mapping[str, Any]) -> ColumnStats:
        parts = [StatsPart.read(name, kind, column[kind]) for kind in _PARTS if column[kind] is not None]
        counts = column["histogram"]["counts"]
        histogram = histogram_plot(
            column["histogram"]["edges"],
            counts,
            labels=[str(c["channel"]) for c in column["stored"]["channels"]],
            title=f"{name}: per-channel histograms (stored values, log counts)",
        )
        return cls(name=name, parts=parts, histogram=histogram, channels=len(counts))


@dataclass(frozen=True, kw_only=True)
class Statistics:
    """Per-channel statistics of every stored float column."""

    columns: list[ColumnStats]
    max_histograms: int = MAX_HISTOGRAMS

    @classmethod
    def read(cls, report: Report) -> Statistics | None:
        stats = report.get("statistics")
        return cls(columns=[ColumnStats.read(name, c) for name, c in stats.items()]) if stats else None


# --------------------------------------------------------------------------- findings


@dataclass(frozen=True, kw_only=True)
class NonfiniteBlock:
    """Rows of one column's stored or raw values (``kind``) that hold NaN or ±inf."""

    column: str
    kind: str
    rows: int
    keys: KeyList


@dataclass(frozen=True, kw_only=True)
class Outliers:
    """Values farther than ``threshold_std`` standard deviations from their channel's mean:
    the rows and values holding them, and the worst as (key, channel, value, z), worst first
    (``truncated``: the QA run kept only the worst)."""

    threshold_std: float
    rows: int
    values: int
    worst: list[tuple[str, int, float | None, float | None]]
    more: int
    truncated: bool


@dataclass(frozen=True, kw_only=True)
class Nonfinite:
    """Non-finite values per column and part, then the outliers."""

    blocks: list[NonfiniteBlock]
    outliers: Outliers | None

    @classmethod
    def read(cls, report: Report) -> Nonfinite | None:
        blocks = [
            NonfiniteBlock(
                column=name,
                kind=kind,
                rows=part["nonfinite_rows"],
                keys=KeyList.of(
                    part["nonfinite_keys"], total=part["nonfinite_rows"], truncated=part["nonfinite_keys_truncated"]
                ),
            )
            for name, column in (report.get("statistics") or {}).items()
            for kind in _PARTS
            if (part := column[kind]) is not None
        ]
        found = report.get("outliers")
        if not blocks and not found:
            return None
        outliers = None
        if found:
            worst = [(w["key"], w["channel"], w["value"], w["z"]) for w in found["worst"]]
            more = max(0, len(worst) - KEY_LIST_CAP)
            outliers = _read(Outliers, found, worst=worst[:KEY_LIST_CAP], more=more)
        return cls(blocks=blocks, outliers=outliers)


@dataclass(frozen=True, kw_only=True)
class DuplicateGroup:
    """Rows whose latents are identical. ``digest``: the first 16 characters of their digest,
    when the report names it (the QA's report does not: the column stays blank)."""

    digest: str
    keys: KeyList
    rows: int


@dataclass(frozen=True, kw_only=True)
class Duplicates:
    """Groups of rows whose latents are identical (a repeated source image, or latents written
    under the wrong keys): how many, and the first groups' keys. ``none_found``: no group."""

    groups: int
    rows: int
    examples: list[DuplicateGroup]
    more: int
    truncated: bool

    @property
    def none_found(self) -> bool:
        return self.groups == 0 and not self.examples

    @classmethod
    def read(cls, report: Report) -> Duplicates | None:
        dup = report.get("duplicates")
        if not dup:
            return None
        examples = [
            DuplicateGroup(digest=_short(e.get("digest", "")), keys=KeyList.of(e["keys"]), rows=len(e["keys"]))
            for e in dup["examples"][:KEY_LIST_CAP]
        ]
        return _read(cls, dup, examples=examples, more=max(0, len(dup["examples"]) - KEY_LIST_CAP))


def _short(digest: str) -> str:
    return digest[:16] + ("…" if len(digest) > 16 else "")


# --------------------------------------------------------------------------- alignment, codebook


@dataclass(frozen=True, kw_only=True)
class Shard:
    """One input shard's row of the alignment table: its commit status, its data and error
    rows (and distinct samples, in an output of several folders) and what its marker says."""

    shard: str
    status: str
    data_rows: int
    data_samples: int | None = None
    error_rows: int
    marker_ok: int | None
    marker_failed: int | None


@dataclass(frozen=True, kw_only=True)
class Alignment:
    """Do data rows, error rows, commit markers and the manifest tell one story: the totals,
    one sentence per disagreement, and one row per input shard. ``samples``: the shard rows
    count distinct samples too (an output of several folders)."""

    totals: dict[str, int | None]
    problems: list[str]
    shards: list[Shard]
    samples: bool
    summary: str | None

    @classmethod
    def read(cls, report: Report) -> Alignment | None:
        align = report.get("alignment")
        if not align:
            return None
        shards = [_read(Shard, s) for s in align["shards"]]
        bad = sum(1 for s in shards if status_class(s.status) != "pass")
        summary = f"{len(shards):,} shards ({bad:,} not ok)" if len(shards) > SHARDS_COLLAPSE else None
        samples = any("data_samples" in s for s in align["shards"])
        return _read(cls, align, shards=shards, samples=samples, summary=summary)


@dataclass(frozen=True, kw_only=True)
class Codebook:
    """VQ code usage: the figures (codebook size, indices counted and out of range, codes used,
    dead codes, perplexity, entropy against its maximum), a plot of the code frequencies, the
    most used codes as (code, count, fraction) and the dead ones."""

    codebook_size: int
    total: int
    out_of_range: int
    used: int
    usage: float | None
    dead: int
    perplexity: float | None
    entropy_bits: float | None
    plot: Plot | None
    top: list[tuple[int, int, float | None]]
    dead_codes: KeyList | None

    @property
    def max_entropy_bits(self) -> float | None:
        return round(math.log2(self.codebook_size), 3) if self.codebook_size > 0 else None

    @classmethod
    def read(cls, report: Report) -> Codebook | None:
        cb = report.get("codebook")
        if not cb:
            return None
        dead = None
        if cb["dead_codes"]:
            dead = KeyList.of(cb["dead_codes"], total=cb["dead"], truncated=cb["dead_codes_truncated"], what="codes")
        return _read(
            cls,
            cb,
            plot=codebook_plot(cb["counts"], total=cb["total"]) if cb["counts"] else None,
            top=[(t["code"], t["count"], t["fraction"]) for t in cb["top"][:KEY_LIST_CAP]],
            dead_codes=dead,
        )


# --------------------------------------------------------------------------- caption embeddings


@dataclass(frozen=True, kw_only=True)
class TextColumnRow:
    """One stored text column: its per-sample shape (``rows`` varying: a trimmed
    ``prompt_embeds``), dtype, the data rows holding it, the mean, std, min and max of its
    finite values and its non-finite values."""

    name: str
    shape: str
    dtype: str
    rows: int
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    nonfinite: int


@dataclass(frozen=True, kw_only=True)
class Text:
    """Caption embeddings (issue 21): the text stage as the manifest names it, one row per
    stored column, the rows holding NaN/inf, the token lengths (a histogram, or ``length_note``
    saying why there is none) and the alignment of text columns with data rows (rows lacking
    each column, trimmed lengths that disagree with their rows, the empty prompt's file)."""

    preset: str | None
    pipeline_class: str | None
    storage: str | None
    model: str | None
    columns: list[TextColumnRow]
    nonfinite_rows: int
    nonfinite_keys: KeyList
    lengths: list[tuple[str, Any]]
    length_plot: Plot | None
    length_note: str | None
    data_rows: int
    missing: list[tuple[str, int]]
    incomplete_rows: int
    incomplete_keys: KeyList
    length_mismatch: int
    empty_prompt: list[tuple[str, Any]]

    @classmethod
    def read(cls, report: Report) -> Text | None:
        text = report.get("text")
        if not text:
            return None
        columns = [
            _read(
                TextColumnRow,
                c,
                name=name,
                shape=" × ".join("rows" if d is None else str(d) for d in c["shape"]) or "scalar",
            )
            for name, c in text["columns"].items()
        ]
        lengths, align = text["lengths"], text["alignment"]
        histogram = lengths["histogram"]
        plot = None
        facts: list[tuple[str, Any]] = []
        if histogram:
            plot = length_plot(histogram["lengths"], histogram["counts"], title=f"token lengths ({lengths['source']})")
            facts = [("from", lengths["source"]), *((k, lengths[k]) for k in ("rows", "min", "mean", "max"))]
        empty = align["empty_prompt"]
        return cls(
            preset=text["preset"],
            pipeline_class=text["pipeline_class"],
            storage=text["storage"],
            model=text["model"],
            columns=columns,
            nonfinite_rows=text["nonfinite"]["rows"],
            nonfinite_keys=KeyList.of(text["nonfinite"]["keys"], total=text["nonfinite"]["rows"]),
            lengths=facts,
            length_plot=plot,
            length_note=lengths["note"],
            data_rows=align["data_rows"],
            missing=list(align["missing"].items()),
            incomplete_rows=align["incomplete_rows"],
            incomplete_keys=KeyList.of(align["incomplete_keys"], total=align["incomplete_rows"]),
            length_mismatch=align["length_mismatch"],
            empty_prompt=[
                ("file", empty["file"]),
                ("present", "yes" if empty["present"] else "no"),
                ("columns", ", ".join(empty["columns"]) or "—"),
                ("missing columns", ", ".join(empty["missing_columns"]) or "none"),
            ],
        )


# --------------------------------------------------------------------------- reconstruction


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One decoded row: its key, shard (and data folder, in an output of several) and scores."""

    key: str
    shard: str
    folder: str | None = None
    psnr: float | None
    ssim: float | None
    lpips: float | None

    @property
    def label(self) -> str:
        """The name its images go by (:func:`~latentize.qa.values.sample_label`)."""
        return sample_label(self.key, self.folder)

    @property
    def caption(self) -> str:
        parts = (
            f"PSNR {text(self.psnr)} dB",
            f"SSIM {text(self.ssim)}",
            f"LPIPS {text(self.lpips)}" if self.lpips is not None else "",
            f"shard {self.shard}",
            f"folder {self.folder}" if self.folder else "",
        )
        return " · ".join(p for p in parts if p)


@dataclass(frozen=True, kw_only=True)
class Pair:
    """An original beside its decode, with the sample's key and metrics."""

    image: Plot
    key: str
    caption: str


@dataclass(frozen=True, kw_only=True)
class Reconstruction:
    """Decoded latents against their source images: why nothing was decoded (``skipped``),
    the sample, the metrics' summaries (a metric whose package is missing is None), image
    pairs worst PSNR first (at most :data:`MAX_PAIRS` of ``images``; ``undrawable``: keys whose
    arrays are not images), every scored sample, and the keys whose source could not be read
    as (key, reason)."""

    skipped: str | None
    sample: int
    seed: int
    decoder: str | None
    metrics: dict[str, dict[str, float | None] | None] | None
    pairs: list[Pair]
    images: int
    undrawable: list[str]
    samples: list[Sample]
    folders: bool
    failed: list[tuple[str, str]]
    failed_more: int
    max_pairs: int = MAX_PAIRS

    @property
    def metric_stats(self) -> list[str]:
        """The metric summaries' columns (``mean``, ``median``...)."""
        return list(dict.fromkeys(k for m in (self.metrics or {}).values() if m for k in m))

    @classmethod
    def read(cls, report: Report, images: Images) -> Reconstruction | None:
        rec = report.get("reconstruction")
        if not rec:
            return None
        samples = [_read(Sample, s) for s in rec["samples"]]
        # Worst first (identical images, written as null PSNR, last); a stable sort keeps ties.
        samples.sort(key=lambda s: (0, s.psnr) if s.psnr is not None else (1, 0.0))
        pairs, undrawable = _pairs(samples, images)
        failed = list(rec["failed"].items())
        return _read(
            cls,
            rec,
            pairs=pairs,
            images=len(images),
            undrawable=undrawable,
            samples=samples,
            folders=any(s.folder is not None for s in samples),
            failed=failed[:KEY_LIST_CAP],
            failed_more=max(0, len(failed) - KEY_LIST_CAP),
        )


def _pairs(samples: Sequence[Sample], images: Images) -> tuple[list[Pair], list[str]]:
    """The drawn pairs (scored samples worst first, then any images without scores) and the
    keys whose arrays are not images."""
    by_label = {s.label: s for s in samples}
    order = [label for label in by_label if label in images] + [k for k in images if k not in by_label]
    pairs: list[Pair] = []
    undrawable: list[str] = []
    for label in order:
        if len(pairs) >= MAX_PAIRS:
            break
        original, decoded = images[label]
        try:
            image = pair_image(original, decoded, alt=f"original and decoded {label}")
        except ValueError as exc:
            logger.warning("QA report: cannot draw reconstruction of %r: %s", label, exc)
            undrawable.append(label)
            continue
        caption = by_label[label].caption if label in by_label else "no metrics"
        pairs.append(Pair(image=image, key=label, caption=caption))
    return pairs, undrawable
