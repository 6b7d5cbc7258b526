"""What each part of report.html shows, as plain data for the page's template.

:func:`build_page` reads a report dict and returns a :class:`Page`: for the header and every
section a small frozen dataclass of text, numbers, tables (:class:`Table` of :class:`Cell`),
key lists and :class:`~latentize.qa.plots.Plot` images. Nothing here is markup: values are
turned into display text (:func:`latentize.qa.values.text`) and the template escapes it all.

The report dict is untrusted (keys come from the user's dataset) and may be partial: every
builder tolerates missing, ``None`` or mistyped parts, and a section whose data is absent is
None (left out of the page).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from latentize.qa.plots import (
    BLUE,
    MAX_HISTOGRAMS,
    ORANGE,
    Plot,
    codebook_plot,
    histogram_plot,
    mean_std_plot,
    pair_image,
    scale_plot,
)
from latentize.qa.values import (
    as_list,
    as_mapping,
    is_finite,
    is_number,
    percent,
    percentile,
    sample_label,
    text,
)

__all__ = [
    "CHANNELS_COLLAPSE",
    "FOLDERS_COLLAPSE",
    "KEY_LIST_CAP",
    "MAX_PAIRS",
    "SHARDS_COLLAPSE",
    "AlignmentView",
    "Cell",
    "CodebookView",
    "ColumnStats",
    "DuplicatesView",
    "EncoderView",
    "Facts",
    "FoldersView",
    "Header",
    "KeyList",
    "NonfiniteBlock",
    "NonfiniteView",
    "OutliersView",
    "Page",
    "Pair",
    "ReconstructionView",
    "Row",
    "ScaleView",
    "Section",
    "StatisticsView",
    "StatsPart",
    "Table",
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

Images = Mapping[str, tuple[np.ndarray, np.ndarray]]

# Status words mapped to a fixed set of CSS classes: the class attribute never carries report
# text, so an odd status cannot inject markup or style.
_STATUS_CLASS = {
    "pass": "pass",
    "ok": "pass",
    "passed": "pass",
    "committed": "pass",
    "fail": "fail",
    "failed": "fail",
    "error": "fail",
    "missing": "fail",
    "mismatch": "fail",
    "warn": "warn",
    "warning": "warn",
    "skip": "skip",
    "skipped": "skip",
    "pending": "warn",
}


# --------------------------------------------------------------------------- building blocks


@dataclass(frozen=True)
class KeyList:
    """Keys shown as chips: the first :data:`KEY_LIST_CAP`, how many more there are, and
    ``kept`` (how many the QA run kept) when it kept only some."""

    shown: list[str]
    more: int = 0
    kept: int | None = None
    what: str = "keys"


CellKind = Literal["text", "num", "code", "status", "flag", "keys"]


@dataclass(frozen=True)
class Cell:
    """One table cell.

    Attributes:
        text: what the cell shows.
        kind: ``text``; ``num`` (right-aligned); ``code`` (a key or name); ``status`` (a
            coloured badge, ``css`` one of pass/fail/warn/skip); ``flag`` (``css`` good/bad);
            ``keys`` (the chips of ``keys``).
    """

    text: str = ""
    kind: CellKind = "text"
    css: str = ""
    keys: KeyList | None = None

    @classmethod
    def of(cls, value: Any) -> Cell:
        """A value as display text; numbers (ints and floats, not booleans) right-aligned."""
        return cls(text(value), "num" if is_number(value) else "text")

    @classmethod
    def code(cls, value: Any) -> Cell:
        return cls(str(value), "code")

    @classmethod
    def status(cls, value: Any) -> Cell:
        word = str(value) if value is not None else "—"
        return cls(word, "status", _STATUS_CLASS.get(word.strip().lower(), "skip" if value is None else "warn"))

    @classmethod
    def flag(cls, value: Any, *, bad: bool) -> Cell:
        return cls(text(value), "flag", "bad" if bad else "good")


@dataclass(frozen=True)
class Row:
    cells: list[Cell]
    css: str = ""


@dataclass(frozen=True)
class Table:
    """A table; with ``summary`` set it is folded into a ``<details>`` under that summary."""

    headers: list[str]
    rows: list[Row]
    summary: str | None = None


#: A key-value table's rows: label and cell.
Facts = list[tuple[str, Cell]]


def _facts(pairs: Iterable[tuple[str, Any]]) -> Facts:
    return [(label, value if isinstance(value, Cell) else Cell.of(value)) for label, value in pairs]


def _row(values: Sequence[Any], *, css: str = "") -> Row:
    return Row([v if isinstance(v, Cell) else Cell.of(v) for v in values], css)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, summary: str | None = None) -> Table:
    return Table(list(headers), [_row(row) for row in rows], summary)


def _key_list(keys: Any, *, total: Any = None, truncated: Any = False, what: str = "keys") -> KeyList:
    items = [str(k) for k in as_list(keys)]
    shown = items[:KEY_LIST_CAP]
    known = max(len(items), int(total) if is_finite(total) else 0)
    return KeyList(shown, known - len(shown), len(items) if truncated else None, what)


# --------------------------------------------------------------------------- the page


@dataclass(frozen=True)
class Header:
    """The summary at the top: facts about the run and the checks table (None: no checks)."""

    facts: Facts
    checks: Table | None


@dataclass(frozen=True)
class Section:
    """One ``<section>``: its anchor id, title and view (one of the ``*View`` classes, chosen
    by ``id``), or the error that kept it from being built."""

    id: str
    title: str
    view: Any = None
    error: str | None = None


@dataclass(frozen=True)
class Page:
    """Everything report.html shows.

    Attributes:
        verdict: ``PASS``, ``FAIL`` or ``UNKNOWN`` (the report's ``passed`` is not a boolean).
        verdict_class: ``pass``, ``fail`` or ``unknown``.
        output: the output root the report is about, if it says.
        format_version: the report format, as text.
    """

    verdict: str
    verdict_class: str
    output: str | None
    format_version: str
    header: Header
    sections: list[Section] = field(default_factory=list)


def build_page(report: Mapping[str, Any], images: Images) -> Page:
    """The page of a report dict.

    Args:
        report: the ``report.json`` dict; any part may be missing or ``None``.
        images: key -> (original, decoded) (H, W, 3) images for the reconstruction section.

    Returns:
        The page; sections in a fixed order, those without data left out. A section whose
        builder raises is kept with its error, so one malformed part does not lose the page.
    """
    builders: list[tuple[str, str, Callable[[], Any]]] = [
        ("encoder", "Encoder", lambda: _encoder_view(report)),
        ("folders", "Data folders", lambda: _folders_view(report)),
        ("scale", "Scale check", lambda: _scale_view(report)),
        ("statistics", "Per-channel statistics", lambda: _statistics_view(report)),
        ("nonfinite", "Non-finite values and outliers", lambda: _nonfinite_view(report)),
        ("duplicates", "Duplicates", lambda: _duplicates_view(report)),
        ("alignment", "Alignment", lambda: _alignment_view(report)),
        ("codebook", "Codebook", lambda: _codebook_view(report)),
        ("reconstruction", "Reconstruction", lambda: _reconstruction_view(report, images)),
    ]
    sections = []
    for sid, title, build in builders:
        try:
            view = build()
        except Exception as exc:  # noqa: BLE001 - one malformed section must not lose the report
            logger.exception("QA report: section %r could not be rendered", sid)
            sections.append(Section(sid, title, error=repr(exc)))
            continue
        if view is not None:
            sections.append(Section(sid, title, view))
    passed = report.get("passed")
    # Only a real boolean decides the banner: 1, "yes" or a missing verdict show UNKNOWN.
    if isinstance(passed, (bool, np.bool_)):
        verdict, verdict_class = ("PASS", "pass") if passed else ("FAIL", "fail")
    else:
        verdict, verdict_class = "UNKNOWN", "unknown"
    output = report.get("output")
    return Page(
        verdict=verdict,
        verdict_class=verdict_class,
        output=str(output) if output else None,
        format_version=text(report.get("format_version")),
        header=_header_view(report),
        sections=sections,
    )


def _header_view(report: Mapping[str, Any]) -> Header:
    rows = as_mapping(report.get("rows"))
    facts = [
        ("output", report.get("output")),
        ("generated", report.get("generated_at")),
        ("latentize version", report.get("latentize_version")),
    ]
    facts += [(f"rows: {k}", rows[k]) for k in ("data", "errors", "shards") if k in rows]
    checks = [c for c in as_list(report.get("checks")) if isinstance(c, Mapping)]
    table = None
    if checks:
        table = _table(
            ["check", "status", "severity", "message"],
            [[c.get("name"), Cell.status(c.get("status")), c.get("severity"), c.get("message")] for c in checks],
        )
    return Header(_facts(facts), table)


# --------------------------------------------------------------------------- encoder, scale


@dataclass(frozen=True)
class EncoderView:
    facts: Facts
    constants: Facts
    columns: Table | None


def _encoder_view(report: Mapping[str, Any]) -> EncoderView | None:
    enc = as_mapping(report.get("encoder"))
    if not enc:
        return None
    first = ("type", "model", "preset", "model_class")
    facts = [(k, enc[k]) for k in first if k in enc]
    facts += [(k, v) for k, v in enc.items() if k not in first and k not in ("constants", "columns")]
    columns = as_mapping(enc.get("columns"))
    table = None
    if columns:
        extra: list[str] = []
        for spec in columns.values():
            extra += [k for k in as_mapping(spec) if k not in ("shape", "dtype") and k not in extra]
        rows = []
        for name, spec in columns.items():
            spec = as_mapping(spec)
            shape = spec.get("shape")
            shape_text = " × ".join(str(s) for s in shape) if isinstance(shape, (list, tuple)) else shape
            rows.append([Cell.code(name), shape_text, spec.get("dtype"), *[spec.get(k) for k in extra]])
        table = _table(["column", "shape", "dtype", *extra], rows)
    return EncoderView(_facts(facts), _facts(as_mapping(enc.get("constants")).items()), table)


@dataclass(frozen=True)
class ScaleView:
    """``applicable`` False: the check does not apply (VQ indices); only ``message`` is set."""

    applicable: bool
    message: str | None
    plot: Plot | None = None
    constants: Table | None = None
    figures: Facts = field(default_factory=list)


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


def _scale_view(report: Mapping[str, Any]) -> ScaleView | None:
    scale = as_mapping(report.get("scale"))
    if not scale:
        return None
    message = scale.get("message")
    message_text = str(message) if message else None
    if scale.get("applicable") is False:
        return ScaleView(False, message_text)
    manifest, recommended = as_mapping(scale.get("manifest")), as_mapping(scale.get("recommended"))
    names = list(dict.fromkeys([*manifest, *recommended]))
    constants = None
    if names:
        constants = _table(
            ["constant", "manifest", "recommended"], [[n, manifest.get(n), recommended.get(n)] for n in names]
        )
    figures = _facts((k, scale.get(k)) for k in _SCALE_FIGURES if k in scale)
    return ScaleView(True, message_text, scale_plot(scale), constants, figures)


# --------------------------------------------------------------------------- folders


@dataclass(frozen=True)
class FoldersView:
    """One row per data folder (an aspect-ratio bucket or a resolution) and one for the whole
    output: rows, stored mean and std per column, the scale verdict, reconstruction scores."""

    table: Table


def _size_text(size: Any) -> str:
    values = as_list(size)
    return " × ".join(text(v) for v in values) if values else "—"


def _folders_view(report: Mapping[str, Any]) -> FoldersView | None:
    entries = [(str(name), as_mapping(f)) for name, f in as_mapping(report.get("folders")).items()]
    entries = [(name, f) for name, f in entries if f]
    if not entries:
        return None
    columns = list(dict.fromkeys(c for _, f in entries for c in as_mapping(f.get("statistics"))))
    codebook = any(as_mapping(f.get("codebook")) for _, f in entries)
    headers = ["folder", "size", "resolution", "rows", "marker rows"]
    for c in columns:
        headers += [f"{c} mean", f"{c} std"]
    if codebook:
        headers += ["codes used", "perplexity"]
    headers += ["scale", "normalised std", "sampled", "PSNR (dB)", "SSIM"]
    rows = []
    for name, f in entries:
        stats = as_mapping(f.get("statistics"))
        pooled = [as_mapping(as_mapping(as_mapping(stats.get(c)).get("stored")).get("all")) for c in columns]
        book, scale, rec = (as_mapping(f.get(k)) for k in ("codebook", "scale", "reconstruction"))
        row: list[Any] = [Cell.code(name), _size_text(f.get("size")), _size_text(f.get("resolution"))]
        row += [f.get("rows"), f.get("marker_rows")]
        row += [v for p in pooled for v in (p.get("mean"), p.get("std"))]
        row += [book.get("used"), book.get("perplexity")] if codebook else []
        row += [Cell.status(scale.get("status")), scale.get("normalized_std")]
        row += [rec.get("sample"), rec.get("psnr"), rec.get("ssim")]
        rows.append(_row(row))
    rows.append(_row(_folders_total(report, entries, columns, codebook), css="all"))
    summary = f"{len(entries)} data folders" if len(entries) > FOLDERS_COLLAPSE else None
    return FoldersView(Table(headers, rows, summary))


def _folders_total(
    report: Mapping[str, Any], entries: list[tuple[str, Mapping[str, Any]]], columns: list[str], codebook: bool
) -> list[Any]:
    """The whole output's row of the folders table, from the report's total sections."""
    stats = as_mapping(report.get("statistics"))
    markers = [f.get("marker_rows") for _, f in entries]
    row: list[Any] = ["all", "", "", as_mapping(report.get("rows")).get("data")]
    row.append(sum(int(m) for m in markers if is_finite(m)) if all(is_finite(m) for m in markers) else None)
    for c in columns:
        pooled = as_mapping(as_mapping(as_mapping(stats.get(c)).get("stored")).get("all"))
        row += [pooled.get("mean"), pooled.get("std")]
    if codebook:
        book = as_mapping(report.get("codebook"))
        row += [book.get("used"), book.get("perplexity")]
    checks = [c for c in as_list(report.get("checks")) if isinstance(c, Mapping) and c.get("name") == "scale"]
    verdict = checks[0].get("status") if checks else None
    row += [Cell.status(verdict), as_mapping(report.get("scale")).get("normalized_std")]
    rec = as_mapping(report.get("reconstruction"))
    metrics = as_mapping(rec.get("metrics"))
    row += [rec.get("sample"), as_mapping(metrics.get("psnr")).get("mean"), as_mapping(metrics.get("ssim")).get("mean")]
    return row


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class StatsPart:
    """Stored or raw values of one column: row counts, the per-channel table, mean ± std plot."""

    title: str
    facts: Facts
    table: Table | None
    plot: Plot | None


@dataclass(frozen=True)
class ColumnStats:
    """``channels``: how many channels the histogram data holds (at most
    :data:`~latentize.qa.plots.MAX_HISTOGRAMS` are drawn)."""

    name: str
    parts: list[StatsPart]
    histogram: Plot | None
    channels: int


@dataclass(frozen=True)
class StatisticsView:
    columns: list[ColumnStats]
    max_histograms: int = MAX_HISTOGRAMS


_STATS_HEADERS = ["channel", "count", "mean", "std", "min", "max", "p1", "p50", "p99", "non-finite"]


def _stats_row(label: Any, figures: Mapping[str, Any]) -> list[Any]:
    p = figures.get("percentiles")
    return [
        label,
        *(figures.get(k) for k in ("count", "mean", "std", "min", "max")),
        percentile(p, 1),
        percentile(p, 50),
        percentile(p, 99),
        figures.get("nonfinite"),
    ]


def _stats_table(part: Mapping[str, Any], channels: list[Mapping[str, Any]]) -> Table | None:
    rows = [Row([Cell.of(v) for v in _stats_row(c.get("channel", i), c)]) for i, c in enumerate(channels)]
    total = as_mapping(part.get("all"))
    if total:
        rows.append(Row([Cell.of(v) for v in _stats_row("all", total)], css="all"))
    if not rows:
        return None
    summary = f"{len(channels)} channels" if len(channels) > CHANNELS_COLLAPSE else None
    return Table(_STATS_HEADERS, rows, summary)


def _column_stats(column: str, col: Mapping[str, Any]) -> ColumnStats:
    parts: list[StatsPart] = []
    labels: list[str] = []
    for kind, title, colour in (
        ("stored", "stored values (as written)", BLUE),
        ("raw", "raw values (before normalisation)", ORANGE),
    ):
        part = as_mapping(col.get(kind))
        if not part:
            continue
        channels = [c for c in as_list(part.get("channels")) if isinstance(c, Mapping)]
        if kind == "stored" or not labels:
            labels = [str(c.get("channel", i)) for i, c in enumerate(channels)]
        plot = None
        if channels:
            plot = mean_std_plot(
                channels, title=f"{column}: per-channel mean ± std, {title}", colour=colour, targets=kind == "stored"
            )
        facts = _facts((k, part.get(k)) for k in ("rows", "nonfinite_rows") if k in part)
        parts.append(StatsPart(title.capitalize(), facts, _stats_table(part, channels), plot))
    histogram = as_mapping(col.get("histogram"))
    plot = None
    if histogram:
        title = f"{column}: per-channel histograms (stored values, log counts)"
        plot = histogram_plot(histogram, labels=labels, title=title)
    return ColumnStats(str(column), parts, plot, len(as_list(histogram.get("counts"))))


def _statistics_view(report: Mapping[str, Any]) -> StatisticsView | None:
    columns = [
        _column_stats(column, as_mapping(col))
        for column, col in as_mapping(report.get("statistics")).items()
        if as_mapping(col)
    ]
    return StatisticsView(columns) if columns else None


# --------------------------------------------------------------------------- findings


@dataclass(frozen=True)
class NonfiniteBlock:
    """Rows of one column (``kind``: stored or raw) that hold NaN or ±inf."""

    column: str
    kind: str
    rows: str
    bad: bool
    keys: KeyList


@dataclass(frozen=True)
class OutliersView:
    facts: Facts
    worst: Table | None
    more: int
    truncated: bool


@dataclass(frozen=True)
class NonfiniteView:
    blocks: list[NonfiniteBlock]
    outliers: OutliersView | None


def _outliers_view(outliers: Mapping[str, Any]) -> OutliersView:
    facts = _facts(
        [
            ("threshold (std)", outliers.get("threshold_std")),
            ("rows", outliers.get("rows")),
            ("values", outliers.get("values")),
        ]
    )
    worst = [w for w in as_list(outliers.get("worst")) if isinstance(w, Mapping)]
    table = None
    if worst:
        table = _table(
            ["key", "channel", "value", "z"],
            [[Cell.code(w.get("key")), w.get("channel"), w.get("value"), w.get("z")] for w in worst[:KEY_LIST_CAP]],
        )
    return OutliersView(facts, table, max(0, len(worst) - KEY_LIST_CAP), bool(outliers.get("truncated")))


def _nonfinite_view(report: Mapping[str, Any]) -> NonfiniteView | None:
    blocks = []
    for column, col in as_mapping(report.get("statistics")).items():
        for kind in ("stored", "raw"):
            part = as_mapping(as_mapping(col).get(kind))
            if not part or ("nonfinite_rows" not in part and "nonfinite_keys" not in part):
                continue
            n = part.get("nonfinite_rows")
            keys = _key_list(part.get("nonfinite_keys"), total=n, truncated=part.get("nonfinite_keys_truncated"))
            blocks.append(NonfiniteBlock(str(column), kind, text(n), is_finite(n) and n > 0, keys))
    outliers = as_mapping(report.get("outliers"))
    if not blocks and not outliers:
        return None
    return NonfiniteView(blocks, _outliers_view(outliers) if outliers else None)


@dataclass(frozen=True)
class DuplicatesView:
    """``none_found``: the report says there are no groups (and lists none)."""

    facts: Facts
    none_found: bool
    groups: Table | None
    more: int
    truncated: bool


def _duplicates_view(report: Mapping[str, Any]) -> DuplicatesView | None:
    dup = as_mapping(report.get("duplicates"))
    if not dup:
        return None
    facts = _facts([("groups", dup.get("groups")), ("rows", dup.get("rows"))])
    examples = [e for e in as_list(dup.get("examples")) if isinstance(e, Mapping)]
    if not examples:
        return DuplicatesView(facts, bool(dup.get("groups") == 0), None, 0, False)
    rows = []
    for e in examples[:KEY_LIST_CAP]:
        digest = str(e.get("digest") or "")
        keys = as_list(e.get("keys"))
        short = digest[:16] + ("…" if len(digest) > 16 else "")
        rows.append([Cell.code(short), len(keys), Cell(kind="keys", keys=_key_list(keys))])
    table = _table(["digest", "rows", "keys"], rows)
    return DuplicatesView(facts, False, table, max(0, len(examples) - KEY_LIST_CAP), bool(dup.get("truncated")))


# --------------------------------------------------------------------------- alignment, codebook


@dataclass(frozen=True)
class AlignmentView:
    """``clean``: the report checked for problems and found none."""

    totals: Facts
    problems: list[str]
    clean: bool
    shards: Table | None


def _alignment_view(report: Mapping[str, Any]) -> AlignmentView | None:
    align = as_mapping(report.get("alignment"))
    if not align:
        return None
    totals = _facts(as_mapping(align.get("totals")).items())
    problems = [str(p) for p in as_list(align.get("problems"))]
    shards = [s for s in as_list(align.get("shards")) if isinstance(s, Mapping)]
    table = None
    if shards:
        columns = list(dict.fromkeys(k for s in shards for k in s))
        rows = [[Cell.status(s.get(c)) if c == "status" else s.get(c) for c in columns] for s in shards]
        bad = sum(1 for s in shards if _STATUS_CLASS.get(str(s.get("status")).lower()) != "pass")
        summary = f"{len(shards):,} shards ({bad:,} not ok)" if len(shards) > SHARDS_COLLAPSE else None
        table = _table(columns, rows, summary=summary)
    clean = not problems and "problems" in align
    if not totals and not problems and not clean and table is None:
        return None
    return AlignmentView(totals, problems, clean, table)


@dataclass(frozen=True)
class CodebookView:
    facts: Facts
    plot: Plot | None
    top: Table | None
    dead: KeyList | None


def _codebook_view(report: Mapping[str, Any]) -> CodebookView | None:
    cb = as_mapping(report.get("codebook"))
    if not cb:
        return None
    size = cb.get("codebook_size")
    oor = cb.get("out_of_range")
    facts = [
        ("codebook size", size),
        ("indices counted", cb.get("total")),
        ("out of range", None if oor is None else Cell.flag(oor, bad=is_finite(oor) and oor > 0)),
        ("codes used", cb.get("used")),
        ("usage", percent(cb.get("usage"))),
        ("dead codes", cb.get("dead")),
        ("perplexity", cb.get("perplexity")),
        ("entropy (bits)", cb.get("entropy_bits")),
    ]
    if is_finite(size) and size > 0:
        facts.append(("max entropy (bits)", round(math.log2(float(size)), 3)))
    counts = as_list(cb.get("counts"))
    top = [t for t in as_list(cb.get("top")) if isinstance(t, Mapping)]
    top_table = None
    if top:
        top_table = _table(
            ["code", "count", "fraction"],
            [[t.get("code"), t.get("count"), percent(t.get("fraction"))] for t in top[:KEY_LIST_CAP]],
        )
    dead_codes = as_list(cb.get("dead_codes"))
    dead = None
    if dead_codes:
        dead = _key_list(dead_codes, total=cb.get("dead"), truncated=cb.get("dead_codes_truncated"), what="codes")
    plot = codebook_plot(counts, total=cb.get("total")) if counts else None
    return CodebookView(_facts(facts), plot, top_table, dead)


# --------------------------------------------------------------------------- reconstruction


@dataclass(frozen=True)
class Pair:
    """An original beside its decode, with the sample's key and metrics."""

    image: Plot
    key: str
    caption: str


@dataclass(frozen=True)
class ReconstructionView:
    """``images``: keys with an image pair (at most :data:`MAX_PAIRS` are drawn);
    ``undrawable``: keys whose images are not images; ``empty``: nothing else is set."""

    skipped: str | None
    facts: Facts
    metrics: Table | None
    pairs: list[Pair]
    images: int
    undrawable: list[str]
    samples: Table | None
    failed: Table | None
    failed_more: int
    max_pairs: int = MAX_PAIRS

    @property
    def empty(self) -> bool:
        return not (
            self.skipped or self.facts or self.metrics or self.pairs or self.undrawable or self.samples or self.failed
        )


def _sample_sort_key(sample: Mapping[str, Any]) -> tuple[int, float]:
    psnr = sample.get("psnr")
    return (0, float(psnr)) if is_finite(psnr) else (1, 0.0)


def _metrics_table(metrics: Mapping[str, Any]) -> Table | None:
    if not metrics:
        return None
    stat_names = list(dict.fromkeys(k for m in metrics.values() for k in as_mapping(m)))
    rows = []
    for name, m in metrics.items():
        if isinstance(m, Mapping):
            rows.append([str(name).upper(), *[m.get(s) for s in stat_names]])
        else:  # e.g. "lpips": null when the metric's package is missing
            filler = ["not computed", *[None] * (len(stat_names) - 1)] if stat_names else []
            rows.append([str(name).upper(), *filler])
    return _table(["metric", *stat_names], rows)


def _caption(sample: Mapping[str, Any]) -> str:
    parts = (
        f"PSNR {text(sample.get('psnr'))} dB" if "psnr" in sample else "",
        f"SSIM {text(sample.get('ssim'))}" if "ssim" in sample else "",
        f"LPIPS {text(sample.get('lpips'))}" if sample.get("lpips") is not None else "",
        f"shard {sample.get('shard')}" if sample.get("shard") is not None else "",
        f"folder {sample.get('folder')}" if sample.get("folder") else "",
    )
    return " · ".join(p for p in parts if p) or "no metrics"


def _pairs(samples: list[Mapping[str, Any]], images: Images) -> tuple[list[Pair], int, list[str]]:
    """The drawn pairs (worst first), how many keys have images, and the undrawable keys.
    A sample and its images go by :func:`~latentize.qa.values.sample_label` (the key, and its
    folder when the output has several)."""
    by_key = {sample_label(s.get("key"), s.get("folder")): s for s in samples}
    # Scored samples worst first, then any images the report holds no metrics for.
    order = list(by_key) + [str(k) for k in images if str(k) not in by_key]
    lookup = {str(k): v for k, v in images.items()}
    pairs: list[Pair] = []
    undrawable: list[str] = []
    for key in order:
        if key not in lookup or len(pairs) >= MAX_PAIRS:
            continue
        try:
            original, decoded = lookup[key]
            image = pair_image(original, decoded, alt=f"original and decoded {key}")
        except (ValueError, TypeError) as exc:
            logger.warning("QA report: cannot draw reconstruction of %r: %s", key, exc)
            undrawable.append(key)
            continue
        pairs.append(Pair(image, key, _caption(by_key.get(key, {}))))
    return pairs, sum(1 for k in order if k in lookup), undrawable


def _reconstruction_view(report: Mapping[str, Any], images: Images) -> ReconstructionView | None:
    rec = as_mapping(report.get("reconstruction"))
    if not rec and not images:
        return None
    skipped = rec.get("skipped")
    facts = _facts((k, rec.get(k)) for k in ("sample", "seed", "decoder") if k in rec)
    # Worst first whatever order the report holds them in (a stable sort keeps ties as given).
    samples = sorted((s for s in as_list(rec.get("samples")) if isinstance(s, Mapping)), key=_sample_sort_key)
    pairs, with_images, undrawable = _pairs(samples, images)
    samples_table = None
    if samples:
        columns = list(dict.fromkeys(k for s in samples for k in s))
        label = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS"}
        rows = [[Cell.code(s.get(c)) if c == "key" else s.get(c) for c in columns] for s in samples]
        samples_table = _table([label.get(c, c) for c in columns], rows)
    failed = list(as_mapping(rec.get("failed")).items())
    failed_table = None
    if failed:
        failed_table = _table(["key", "reason"], [[Cell.code(k), v] for k, v in failed[:KEY_LIST_CAP]])
    return ReconstructionView(
        skipped=str(skipped) if skipped else None,
        facts=facts,
        metrics=_metrics_table(as_mapping(rec.get("metrics"))),
        pairs=pairs,
        images=with_images,
        undrawable=undrawable,
        samples=samples_table,
        failed=failed_table,
        failed_more=max(0, len(failed) - KEY_LIST_CAP),
    )
