"""The QA report as files: ``report.json`` (the data) and ``report.html`` (the same, for people).

The HTML page is one self-contained file: inline CSS, one small inline script, and every plot or
image an ``<img>`` whose ``src`` is a ``data:image/png;base64,...`` URI. It references nothing
outside itself (no CDN, fonts or scripts), so it opens the same from a bucket, a laptop or an
air-gapped cluster, and a Content-Security-Policy in the page makes the browser refuse anything
else should a future edit add it.

Plots are drawn with matplotlib ``Figure`` objects on the Agg canvas directly, never through
``pyplot``: pyplot keeps a global registry of open figures (a leak unless every figure is closed)
and its state is shared between threads, while a bare ``Figure`` is owned by the call that made
it. Everything in the report dict is treated as untrusted text (keys come from the user's
dataset) and goes through :func:`html.escape`; every section tolerates missing or ``None`` data.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import html
import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import fsspec
    from matplotlib.figure import Figure

__all__ = ["json_ready", "render_html", "write_report"]

logger = logging.getLogger(__name__)

#: At most this many keys (non-finite rows, dead codes, duplicates...) are listed per list.
KEY_LIST_CAP = 50
#: The per-shard alignment table collapses into a ``<details>`` above this many shards.
SHARDS_COLLAPSE = 20
#: Per-channel tables collapse into a ``<details>`` above this many channels.
CHANNELS_COLLAPSE = 32
#: Reconstruction thumbnails fit in a square of this many pixels.
THUMB_MAX = 256
#: At most this many reconstruction pairs are drawn (the worst ones).
MAX_PAIRS = 64
#: At most this many per-channel histograms are drawn.
MAX_HISTOGRAMS = 128

_DPI = 96
_GREEN = "#1a7f37"
_RED = "#cf222e"
_AMBER = "#9a6700"
_GREY = "#6e7781"
_BLUE = "#0969da"
_ORANGE = "#bc4c00"

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

_IMAGE_CHECK_SCRIPT = """\
window.addEventListener("load", function () {
  var images = document.images, ok = 0;
  for (var i = 0; i < images.length; i++) {
    var im = images[i];
    if (im.complete && im.naturalWidth > 0) { ok++; } else { im.classList.add("img-failed"); }
  }
  var failed = images.length - ok;
  document.body.dataset.imagesLoaded = ok + "/" + images.length;
  document.body.dataset.imagesFailed = String(failed);
  if (failed > 0) {
    var note = document.getElementById("img-failures");
    note.textContent = failed + " of " + images.length + " images failed to load";
    note.hidden = false;
  }
});
"""

_CSS = """\
:root { --green: #1a7f37; --red: #cf222e; --amber: #9a6700; --grey: #6e7781; --line: #d0d7de; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans",
  sans-serif; color: #1f2328; background: #f6f8fa; }
main { max-width: 1240px; margin: 0 auto; padding: 16px 24px 48px; }
h1 { font-size: 24px; margin: 8px 0 12px; }
h2 { font-size: 19px; margin: 0 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 18px 0 8px; }
h4 { font-size: 14px; margin: 14px 0 6px; }
section, header { background: #fff; border: 1px solid var(--line); border-radius: 6px;
  padding: 14px 18px; margin: 14px 0; }
nav { font-size: 13px; margin: 6px 0 0; }
nav a { margin-right: 12px; color: #0969da; text-decoration: none; }
.verdict { font-size: 28px; font-weight: 700; color: #fff; padding: 14px 20px; border-radius: 6px;
  margin: 10px 0 14px; letter-spacing: 0.04em; }
.verdict.v-pass { background: var(--green); }
.verdict.v-fail { background: var(--red); }
.verdict.v-unknown { background: var(--grey); }
table { border-collapse: collapse; margin: 6px 0 10px; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.all td { font-weight: 600; background: #f6f8fa; }
table.kv th { width: 14em; }
.status { display: inline-block; min-width: 4.2em; text-align: center; border-radius: 10px;
  padding: 0 8px; color: #fff; font-weight: 600; font-size: 12px; }
.status.s-pass { background: var(--green); }
.status.s-fail { background: var(--red); }
.status.s-warn { background: var(--amber); }
.status.s-skip { background: var(--grey); }
.good { color: var(--green); }
.bad { color: var(--red); font-weight: 600; }
.note { color: #57606a; }
.notice { border-left: 4px solid var(--amber); background: #fff8c5; padding: 6px 10px; }
.section-error { border-left: 4px solid var(--red); background: #ffebe9; padding: 6px 10px; }
ul.problems li { color: var(--red); }
.keys code, td code { background: #f6f8fa; border: 1px solid #eaeef2; border-radius: 4px;
  padding: 0 4px; margin: 0 4px 4px 0; display: inline-block; word-break: break-all; }
img.plot { max-width: 100%; height: auto; display: block; margin: 8px 0; }
.pairs { display: grid; grid-template-columns: repeat(auto-fill, minmax(380px, 1fr)); gap: 12px; }
figure.pair { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 6px; }
figure.pair img { max-width: 100%; height: auto; display: block; }
figure.pair figcaption { font-size: 12px; margin-top: 4px; }
details > summary { cursor: pointer; color: #0969da; margin: 6px 0; }
img.img-failed { outline: 4px dashed var(--red); min-width: 6em; min-height: 3em; }
.img-failures { background: var(--red); color: #fff; font-weight: 700; padding: 8px 12px;
  border-radius: 6px; }
footer { color: #57606a; font-size: 12px; margin-top: 20px; }
"""


class _Html(str):
    """Markup built here (already escaped); table cells insert it as is."""


# --------------------------------------------------------------------------- JSON


def json_ready(obj: Any) -> Any:
    """A copy of ``obj`` that :func:`json.dumps` accepts with ``allow_nan=False``.

    Recursively turns NaN and ±inf into ``None``, numpy scalars and arrays into Python numbers and
    lists, tuples and sets into lists, path-likes into strings and dates into ISO strings. Mapping
    keys that JSON cannot hold become strings. The input is not modified.

    Other objects are returned unchanged, so :func:`json.dumps` still names a type it cannot
    serialise instead of the report silently holding its ``repr``.
    """
    if isinstance(obj, Mapping):
        return {_json_key(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, np.generic):
        return json_ready(obj.item())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        items = [json_ready(v) for v in obj]
        try:
            return sorted(items)
        except TypeError:  # mixed types: any order is as good as another
            return items
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (_dt.datetime, _dt.date)):
        return obj.isoformat()
    return obj


def _json_key(key: Any) -> Any:
    if isinstance(key, np.generic):
        key = key.item()
    if isinstance(key, str) or key is None or isinstance(key, (bool, int)):
        return key
    if isinstance(key, float) and math.isfinite(key):
        return key
    # json.dumps(allow_nan=False) rejects NaN keys and any non-scalar key.
    return str(key)


# --------------------------------------------------------------------------- files


def write_report(
    report: Mapping[str, Any],
    *,
    fs: fsspec.AbstractFileSystem,
    directory: str,
    images: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[str, str]:
    """Writes ``directory/report.json`` and ``directory/report.html`` through ``fs``.

    The JSON is ``json.dumps(json_ready(report), indent=2, allow_nan=False)``: NaN/inf become
    ``null``, so any JSON reader accepts it. The HTML is :func:`render_html` of the same cleaned
    dict. Both are rendered before either is written, so a rendering error leaves no half report.

    Args:
        report: the QA report dict.
        fs: the filesystem of ``directory`` (``fsspec.filesystem("file")``, s3fs, ...).
        directory: the folder to write into; created if missing.
        images: key -> (original, decoded) uint8 (H, W, 3) arrays for the reconstruction grid.

    Returns:
        ``(json_path, html_path)``.
    """
    clean = json_ready(report)
    json_text = json.dumps(clean, indent=2, allow_nan=False)
    html_text = render_html(clean, images=images)
    base = directory.rstrip("/")
    json_path = f"{base}/report.json"
    html_path = f"{base}/report.html"
    fs.makedirs(directory, exist_ok=True)
    fs.pipe_file(json_path, json_text.encode("utf-8"))
    fs.pipe_file(html_path, html_text.encode("utf-8"))
    logger.info("wrote QA report %s (%d bytes) and %s", json_path, len(json_text), html_path)
    return json_path, html_path


# --------------------------------------------------------------------------- HTML


def render_html(
    report: Mapping[str, Any],
    *,
    images: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> str:
    """The report as one self-contained HTML document.

    Sections, in order (a section whose data is absent or ``None`` is left out): header with the
    verdict and the checks, encoder, scale check, per-channel statistics, non-finite values and
    outliers, duplicates, alignment, codebook (VQ), reconstruction.

    Args:
        report: the ``report.json`` dict; any part may be missing or ``None``.
        images: key -> (original, decoded) arrays, (H, W, 3) uint8, drawn side by side in the
            reconstruction section (worst PSNR first); thumbnails are at most 256 px.

    Returns:
        The HTML text. It loads nothing from outside itself: plots and images are
        ``data:image/png;base64`` URIs, CSS and the script are inline.

    Raises:
        TypeError: ``report`` is not a mapping.
    """
    if not isinstance(report, Mapping):
        raise TypeError(f"report must be a mapping, got {type(report).__name__}")
    images = images or {}
    sections: list[tuple[str, str, str]] = []
    builders: list[tuple[str, str, Callable[[], str | None]]] = [
        ("encoder", "Encoder", lambda: _encoder_section(report)),
        ("scale", "Scale check", lambda: _scale_section(report)),
        ("statistics", "Per-channel statistics", lambda: _statistics_section(report)),
        ("nonfinite", "Non-finite values and outliers", lambda: _nonfinite_section(report)),
        ("duplicates", "Duplicates", lambda: _duplicates_section(report)),
        ("alignment", "Alignment", lambda: _alignment_section(report)),
        ("codebook", "Codebook", lambda: _codebook_section(report)),
        ("reconstruction", "Reconstruction", lambda: _reconstruction_section(report, images)),
    ]
    for sid, title, build in builders:
        try:
            body = build()
        except Exception as exc:  # noqa: BLE001 - one malformed section must not lose the report
            logger.exception("QA report: section %r could not be rendered", sid)
            body = f'<p class="section-error">This section could not be rendered: {_esc(repr(exc))}</p>'
        if body is not None:
            sections.append((sid, title, body))

    passed = report.get("passed")
    # Only a real boolean decides the banner: 1, "yes" or a missing verdict show UNKNOWN.
    if isinstance(passed, (bool, np.bool_)):
        verdict, vclass = ("PASS", "pass") if passed else ("FAIL", "fail")
    else:
        verdict, vclass = "UNKNOWN", "unknown"
    output = report.get("output")
    nav = " ".join(f'<a href="#{sid}">{_esc(title)}</a>' for sid, title, _ in [("summary", "Summary", "")] + sections)
    script_hash = base64.b64encode(hashlib.sha256(_IMAGE_CHECK_SCRIPT.encode("utf-8")).digest()).decode("ascii")
    # Only data: images, inline style and this exact script may run; anything else a future
    # edit (or an escaping bug) adds is refused by the browser rather than fetched.
    csp = (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{script_hash}'; base-uri 'none'; form-action 'none'"
    )
    title = f"latentize QA — {verdict}" + (f" — {output}" if output else "")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_esc(csp)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title>",
        f"<style>\n{_CSS}</style>",
        "</head>",
        f'<body data-verdict="{vclass}">',
        "<main>",
        _header(report, verdict=verdict, vclass=vclass, nav=nav),
    ]
    for sid, title_, body in sections:
        parts.append(f'<section id="{sid}">\n<h2>{_esc(title_)}</h2>\n{body}\n</section>')
    parts += [
        f"<footer>latentize QA report, format {_esc(_fmt(report.get('format_version')))}; "
        "a self-contained page: every image is embedded, nothing is loaded from elsewhere.</footer>",
        "</main>",
        f"<script>{_IMAGE_CHECK_SCRIPT}</script>",
        "</body>",
        "</html>",
    ]
    document = "\n".join(parts) + "\n"
    logger.debug("rendered QA report: %d bytes, %d sections", len(document), len(sections))
    return document


# --------------------------------------------------------------------------- formatting


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    # numpy arrays too: render_html may get a report that has not been through json_ready.
    if isinstance(value, np.ndarray):
        return value.tolist() if value.ndim else []
    return list(value) if isinstance(value, (list, tuple)) else []


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))


def _num(value: Any) -> float:
    """``value`` as a float for plotting; NaN for anything that is not a number."""
    return float(value) if _is_number(value) else math.nan


def _finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(float(value))


def _fmt(value: Any) -> str:
    """Plain text for one value (escape it before use)."""
    if isinstance(value, (np.generic, np.ndarray)):
        value = value.tolist()
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        if value.is_integer() and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:.4g}"
    if isinstance(value, (Mapping, list, tuple)):
        text = json.dumps(json_ready(value), separators=(", ", ": "))
        return text if len(text) <= 400 else text[:399] + "…"
    return str(value)


def _pct(value: Any) -> str:
    return f"{float(value) * 100:.1f} %" if _finite(value) else _fmt(value)


def _cell(value: Any, tag: str = "td") -> str:
    if isinstance(value, _Html):
        return f"<{tag}>{value}</{tag}>"
    cls = ' class="num"' if _is_number(value) else ""
    return f"<{tag}{cls}>{_esc(_fmt(value))}</{tag}>"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, row_classes: Sequence[str] | None = None) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(_cell(v) for v in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _kv_table(pairs: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th>{_cell(v)}</tr>" for k, v in pairs)
    return f'<table class="kv"><tbody>{rows}</tbody></table>' if rows else ""


def _status(status: Any) -> _Html:
    word = str(status) if status is not None else "—"
    cls = _STATUS_CLASS.get(word.strip().lower(), "skip" if status is None else "warn")
    return _Html(f'<span class="status s-{cls}">{_esc(word)}</span>')


def _code(value: Any) -> _Html:
    return _Html(f"<code>{_esc(value)}</code>")


def _collapsible(summary: str, content: str, *, collapse: bool) -> str:
    if not collapse:
        return content
    return f"<details><summary>{_esc(summary)}</summary>\n{content}\n</details>"


def _key_list(keys: Any, *, total: Any = None, truncated: Any = False, what: str = "keys") -> str:
    """Up to :data:`KEY_LIST_CAP` keys as ``<code>`` chips, then "… and N more"."""
    items = [str(k) for k in _list(keys)]
    shown = items[:KEY_LIST_CAP]
    known = max(len(items), int(total) if _finite(total) else 0)
    more = known - len(shown)
    out = ""
    if shown:
        out += '<div class="keys">' + " ".join(f"<code>{_esc(k)}</code>" for k in shown) + "</div>"
    if more > 0:
        out += f'<p class="note">… and {more:,} more</p>'
    if truncated:
        out += f'<p class="note">(the QA run kept only the first {len(items):,} {_esc(what)})</p>'
    return out


def _percentile(percentiles: Any, q: float) -> Any:
    """The value of percentile ``q`` whichever way its key is spelt ("1", "1.0", 1)."""
    for key, value in _dict(percentiles).items():
        try:
            if float(key) == q:
                return value
        except (TypeError, ValueError):
            continue
    return None


# --------------------------------------------------------------------------- plots


def _figure(width: float, height: float, **kwargs: Any) -> Figure:
    # Imported here: `latentize` commands that never render a report skip matplotlib's import.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained", **kwargs)


def _png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure_img(fig: Figure, *, alt: str) -> _Html:
    """``fig`` as an ``<img class="plot">`` with an embedded PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attaches the Agg canvas to this figure only; no global backend switch
    buf = io.BytesIO()
    # No "Software" text chunk: the same report gives byte-identical PNGs across versions.
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None}, facecolor="white")
    width, height = (int(round(v)) for v in fig.get_size_inches() * _DPI)
    return _Html(
        f'<img class="plot" src="{_png_data_uri(buf.getvalue())}" alt="{_esc(alt)}" width="{width}" height="{height}">'
    )


def _small_axes(ax: Any, *, size: float = 8) -> None:
    ax.tick_params(labelsize=size)
    ax.grid(True, axis="y", alpha=0.3)


def _scale_plot(scale: Mapping[str, Any]) -> _Html | None:
    manifest, recommended = _dict(scale.get("manifest")), _dict(scale.get("recommended"))
    factors = ("scaling_factor", "shift_factor")
    have_factors = any(_finite(d.get(f)) for d in (manifest, recommended) for f in factors)
    # The check judges the normalised latents (for raw moments, after applying the constants).
    std = scale.get("normalized_std", scale.get("stored_std"))
    mean = scale.get("normalized_mean", scale.get("stored_mean"))
    panels = [p for p, ok in (("factors", have_factors), ("std", _finite(std)), ("mean", _finite(mean))) if ok]
    if not panels:
        return None
    fig = _figure(4.2 * len(panels), 2.9)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=False):
        if panel == "factors":
            x = np.arange(len(factors))
            for offset, (label, source, colour) in zip(
                (-0.2, 0.2), (("manifest", manifest, _GREY), ("recommended", recommended, _BLUE)), strict=False
            ):
                values = [_num(source.get(f)) for f in factors]
                bars = ax.bar(x + offset, np.nan_to_num(values), width=0.38, label=label, color=colour)
                ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=7, padding=2)
            ax.set_xticks(x, list(factors))
            ax.axhline(0, color="black", linewidth=0.6)
            ax.set_title("manifest vs recommended constants", fontsize=9)
            ax.legend(fontsize=7, loc="best")
            ax.margins(y=0.2)
        else:
            value = float(std if panel == "std" else mean)
            target = 1.0 if panel == "std" else 0.0
            tol_key = "tolerance" if panel == "std" else "shift_tolerance"
            tol = scale.get(tol_key)
            inside = True
            if _finite(tol):
                tol = abs(float(tol))
                # The std band is a ratio band (1/(1+t) .. 1+t): too wide and too narrow alike.
                lo, hi = (1.0 / (1.0 + tol), 1.0 + tol) if panel == "std" else (target - tol, target + tol)
                ax.axvspan(lo, hi, color=_GREEN, alpha=0.15, label=f"accepted {_fmt(lo)} .. {_fmt(hi)}")
                inside = lo <= value <= hi
            ax.barh([0], [value], height=0.5, color=_GREEN if inside else _RED)
            ax.axvline(target, color="black", linestyle="--", linewidth=1, label=f"target {_fmt(target)}")
            ax.text(
                value,
                0.3,
                _fmt(value),
                ha="center",
                va="bottom",
                fontsize=8,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
            )
            span = max(abs(value - target), abs(tol) if _finite(tol) else 0.0, 0.5) * 1.25
            if panel == "std":  # a std is never negative: the axis starts at 0
                ax.set_xlim(min(0.0, value), target + span)
            else:
                ax.set_xlim(target - span, target + span)
            ax.set_ylim(-0.6, 0.7)
            ax.set_yticks([])
            ax.set_title(f"normalised {'std' if panel == 'std' else 'mean'} vs target {_fmt(target)}", fontsize=9)
            ax.legend(fontsize=7, loc="lower right")
        ax.tick_params(labelsize=8)
    return _figure_img(fig, alt="scale check: constants and stored std/mean against their targets")


def _mean_std_plot(channels: list[Mapping[str, Any]], *, title: str, colour: str, targets: bool) -> _Html | None:
    means = np.array([_num(c.get("mean")) for c in channels])
    stds = np.array([_num(c.get("std")) for c in channels])
    if not np.isfinite(means).any():
        return None
    n = len(channels)
    labels = [str(c.get("channel", i)) for i, c in enumerate(channels)]
    fig = _figure(min(16.0, max(6.0, 0.32 * n + 2.5)), 3.2)
    ax = fig.subplots()
    x = np.arange(n)
    ax.bar(x, np.nan_to_num(means), color=colour, alpha=0.8, label="mean")
    ax.errorbar(
        x,
        means,
        yerr=np.where(np.isfinite(stds), stds, 0),
        fmt="none",
        ecolor="black",
        elinewidth=1,
        capsize=3 if n <= 48 else 0,
        label="± std",
    )
    ax.axhline(0, color="black", linewidth=0.6)
    if targets:
        # The targets of normalised latents: the band a correctly scaled channel sits in.
        for y in (-1.0, 1.0):
            ax.axhline(y, color=_GREY, linestyle=":", linewidth=1)
    if n <= 48:
        ax.set_xticks(x, labels)
    ax.set_xlabel("channel", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    _small_axes(ax)
    return _figure_img(fig, alt=title)


def _histogram_plot(histogram: Mapping[str, Any], *, labels: Sequence[str], title: str) -> _Html | None:
    edges = np.asarray([_num(e) for e in _list(histogram.get("edges"))], dtype=float)
    counts = _list(histogram.get("counts"))
    if counts and not isinstance(counts[0], (list, tuple)):
        counts = [counts]  # one channel stored flat
    if edges.size < 2 or not counts or not np.isfinite(edges).all():
        return None
    n = min(len(counts), MAX_HISTOGRAMS)
    ncols = min(8, n)
    nrows = math.ceil(n / ncols)
    fig = _figure(1.95 * ncols + 0.3, 1.45 * nrows + 0.45)
    fig.suptitle(title, fontsize=9)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    widths = np.diff(edges)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        values = np.asarray([_num(v) for v in _list(counts[i])], dtype=float)
        label = labels[i] if i < len(labels) else str(i)
        ax.set_title(f"ch {label}", fontsize=7, pad=2)
        ax.tick_params(labelsize=6)
        if values.size != edges.size - 1 or not (np.nan_to_num(values) > 0).any():
            ax.text(0.5, 0.5, "no data", ha="center", va="center", fontsize=7, transform=ax.transAxes)
            continue
        values = np.nan_to_num(values)
        ax.bar(edges[:-1], values, width=widths, align="edge", color=_BLUE, linewidth=0)
        # Log counts: the tails (outliers, saturation) are what a QA reader looks for.
        ax.set_yscale("log")
        ax.set_xlim(edges[0], edges[-1])
    return _figure_img(fig, alt=title)


def _codebook_plot(counts: Sequence[Any], *, total: Any) -> _Html | None:
    values = np.asarray([_num(c) for c in counts], dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    fig = _figure(11.0, 3.4)
    left, right = fig.subplots(1, 2)
    ranked = np.sort(values)[::-1]
    positive = ranked[ranked > 0]
    dead = int((ranked <= 0).sum())
    if positive.size:
        left.plot(np.arange(1, positive.size + 1), positive, color=_BLUE, drawstyle="steps-post")
        left.set_yscale("log")
    left.set_xlim(0, max(len(ranked), 1))
    left.axvline(positive.size, color=_RED, linestyle=":", linewidth=1)
    left.set_title(f"code frequency, sorted (codes after rank {positive.size:,}: {dead:,} dead)", fontsize=9)
    left.set_xlabel("rank", fontsize=8)
    left.set_ylabel("count", fontsize=8)
    _small_axes(left)
    right.hist(values, bins=min(60, max(10, int(np.sqrt(values.size)))), color=_ORANGE, log=True)
    if _finite(total) and values.size:
        uniform = float(total) / values.size
        right.axvline(uniform, color="black", linestyle="--", linewidth=1, label=f"uniform {uniform:.3g}")
        right.legend(fontsize=7)
    right.set_title("histogram of counts per code", fontsize=9)
    right.set_xlabel("count of a code", fontsize=8)
    right.set_ylabel("codes", fontsize=8)
    _small_axes(right)
    return _figure_img(fig, alt="codebook usage: sorted code frequencies and histogram of counts per code")


# --------------------------------------------------------------------------- images


def _as_rgb_uint8(array: Any) -> np.ndarray:
    """(H, W, 3) uint8 from what a caller may pass: gray, RGBA, float in [0, 1] or [0, 255]."""
    a = np.asarray(array)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"expected an (H, W, 3) image, got shape {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    a = a[..., :3]
    if a.dtype != np.uint8:
        f = np.nan_to_num(a.astype(np.float64))
        if f.size and f.max() <= 1.0:
            f = f * 255.0
        a = np.clip(np.rint(f), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def _pair_png(original: Any, decoded: Any) -> tuple[bytes, int, int]:
    """Original and decode side by side, each fitted into THUMB_MAX²; PNG bytes, width, height."""
    thumbs = []
    for array in (original, decoded):
        im = Image.fromarray(_as_rgb_uint8(array), mode="RGB")
        im.thumbnail((THUMB_MAX, THUMB_MAX), Image.Resampling.LANCZOS)
        thumbs.append(im)
    gap = 4
    width = thumbs[0].width + gap + thumbs[1].width
    height = max(t.height for t in thumbs)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(thumbs[0], (0, 0))
    canvas.paste(thumbs[1], (thumbs[0].width + gap, 0))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue(), width, height


# --------------------------------------------------------------------------- sections


def _header(report: Mapping[str, Any], *, verdict: str, vclass: str, nav: str) -> str:
    rows = _dict(report.get("rows"))
    facts = [
        ("output", report.get("output")),
        ("generated", report.get("generated_at")),
        ("latentize version", report.get("latentize_version")),
    ]
    facts += [(f"rows: {k}", rows[k]) for k in ("data", "errors", "shards") if k in rows]
    checks = [c for c in _list(report.get("checks")) if isinstance(c, Mapping)]
    if checks:
        check_table = _table(
            ["check", "status", "severity", "message"],
            [[c.get("name"), _status(c.get("status")), c.get("severity"), c.get("message")] for c in checks],
        )
    else:
        check_table = '<p class="note">No checks recorded.</p>'
    return (
        '<header id="summary">\n'
        "<h1>latentize QA report</h1>\n"
        f"<nav>{nav}</nav>\n"
        '<div id="img-failures" class="img-failures" hidden></div>\n'
        f'<div class="verdict v-{vclass}">{verdict}</div>\n'
        f"{_kv_table(facts)}\n"
        f"<h3>Checks</h3>\n{check_table}\n"
        "</header>"
    )


def _encoder_section(report: Mapping[str, Any]) -> str | None:
    enc = _dict(report.get("encoder"))
    if not enc:
        return None
    first = ("type", "model", "preset", "model_class")
    facts = [(k, enc[k]) for k in first if k in enc]
    facts += [(k, v) for k, v in enc.items() if k not in first and k not in ("constants", "columns")]
    out = _kv_table(facts)
    constants = _dict(enc.get("constants"))
    if constants:
        out += "<h3>Constants</h3>\n" + _kv_table(constants.items())
    columns = _dict(enc.get("columns"))
    if columns:
        extra: list[str] = []
        for spec in columns.values():
            extra += [k for k in _dict(spec) if k not in ("shape", "dtype") and k not in extra]
        rows = []
        for name, spec in columns.items():
            spec = _dict(spec)
            shape = spec.get("shape")
            shape_text = " × ".join(str(s) for s in shape) if isinstance(shape, (list, tuple)) else shape
            rows.append([_code(name), shape_text, spec.get("dtype"), *[spec.get(k) for k in extra]])
        out += "<h3>Stored columns</h3>\n" + _table(["column", "shape", "dtype", *extra], rows)
    return out


def _scale_section(report: Mapping[str, Any]) -> str | None:
    scale = _dict(report.get("scale"))
    if not scale:
        return None
    message = scale.get("message")
    if scale.get("applicable") is False:
        return '<p class="note">The scale check does not apply to this output.</p>' + (
            f"<p>{_esc(message)}</p>" if message else ""
        )
    out = f"<p>{_esc(message)}</p>" if message else ""
    plot = _scale_plot(scale)
    if plot:
        out += plot
    manifest, recommended = _dict(scale.get("manifest")), _dict(scale.get("recommended"))
    names = list(dict.fromkeys([*manifest, *recommended]))
    if names:
        rows = [[n, manifest.get(n), recommended.get(n)] for n in names]
        out += _table(["constant", "manifest", "recommended"], rows)
    out += _kv_table(
        (k, scale.get(k))
        for k in (
            "normalized_std",
            "normalized_mean",
            "stored_std",
            "stored_mean",
            "raw_std",
            "raw_mean",
            "tolerance",
            "shift_tolerance",
        )
        if k in scale
    )
    out += (
        '<p class="note">Normalised latents should have std ≈ 1 and mean ≈ 0; the shaded bands are '
        "what the check accepts: std within 1/(1 + tolerance) .. 1 + tolerance, |mean| within the shift "
        "tolerance.</p>"
    )
    return out


def _stats_rows(part: Mapping[str, Any]) -> tuple[list[list[Any]], list[str]]:
    rows, classes = [], []
    channels = [c for c in _list(part.get("channels")) if isinstance(c, Mapping)]
    for i, c in enumerate(channels):
        p = c.get("percentiles")
        rows.append(
            [
                c.get("channel", i),
                c.get("count"),
                c.get("mean"),
                c.get("std"),
                c.get("min"),
                c.get("max"),
                _percentile(p, 1),
                _percentile(p, 50),
                _percentile(p, 99),
                c.get("nonfinite"),
            ]
        )
        classes.append("")
    total = _dict(part.get("all"))
    if total:
        p = total.get("percentiles")
        rows.append(
            [
                "all",
                total.get("count"),
                total.get("mean"),
                total.get("std"),
                total.get("min"),
                total.get("max"),
                _percentile(p, 1),
                _percentile(p, 50),
                _percentile(p, 99),
                total.get("nonfinite"),
            ]
        )
        classes.append("all")
    return rows, classes


def _statistics_section(report: Mapping[str, Any]) -> str | None:
    stats = _dict(report.get("statistics"))
    blocks = []
    headers = ["channel", "count", "mean", "std", "min", "max", "p1", "p50", "p99", "non-finite"]
    for column, col in stats.items():
        col = _dict(col)
        if not col:
            continue
        out = f"<h3>Column <code>{_esc(column)}</code></h3>\n"
        labels: list[str] = []
        for kind, title, colour in (
            ("stored", "stored values (as written)", _BLUE),
            ("raw", "raw values (before normalisation)", _ORANGE),
        ):
            part = _dict(col.get(kind))
            if not part:
                continue
            channels = [c for c in _list(part.get("channels")) if isinstance(c, Mapping)]
            if kind == "stored" or not labels:
                labels = [str(c.get("channel", i)) for i, c in enumerate(channels)]
            rows, classes = _stats_rows(part)
            out += f"<h4>{_esc(title.capitalize())}</h4>\n"
            out += _kv_table((k, part.get(k)) for k in ("rows", "nonfinite_rows") if k in part)
            if rows:
                out += _collapsible(
                    f"{len(channels)} channels",
                    _table(headers, rows, row_classes=classes),
                    collapse=len(channels) > CHANNELS_COLLAPSE,
                )
            if channels:
                plot = _mean_std_plot(
                    channels,
                    title=f"{column}: per-channel mean ± std, {title}",
                    colour=colour,
                    targets=kind == "stored",
                )
                out += plot or ""
        histogram = _dict(col.get("histogram"))
        if histogram:
            plot = _histogram_plot(
                histogram, labels=labels, title=f"{column}: per-channel histograms (stored values, log counts)"
            )
            if plot:
                out += "<h4>Histograms</h4>\n" + plot
                shown = len(_list(histogram.get("counts")))
                if shown > MAX_HISTOGRAMS:
                    out += f'<p class="note">First {MAX_HISTOGRAMS} of {shown} channels shown.</p>'
        blocks.append(out)
    return "\n".join(blocks) if blocks else None


def _nonfinite_section(report: Mapping[str, Any]) -> str | None:
    blocks = []
    for column, col in _dict(report.get("statistics")).items():
        for kind in ("stored", "raw"):
            part = _dict(_dict(col).get(kind))
            if not part or ("nonfinite_rows" not in part and "nonfinite_keys" not in part):
                continue
            n = part.get("nonfinite_rows")
            cls = "bad" if _finite(n) and n > 0 else "good"
            out = (
                f"<h3><code>{_esc(column)}</code> ({kind}): "
                f'<span class="{cls}">rows with NaN/inf: {_esc(_fmt(n))}</span></h3>'
            )
            out += _key_list(part.get("nonfinite_keys"), total=n, truncated=part.get("nonfinite_keys_truncated"))
            blocks.append(out)
    outliers = _dict(report.get("outliers"))
    if outliers:
        out = "<h3>Outliers</h3>\n" + _kv_table(
            [
                ("threshold (std)", outliers.get("threshold_std")),
                ("rows", outliers.get("rows")),
                ("values", outliers.get("values")),
            ]
        )
        worst = [w for w in _list(outliers.get("worst")) if isinstance(w, Mapping)]
        if worst:
            out += _table(
                ["key", "channel", "value", "z"],
                [[_code(w.get("key")), w.get("channel"), w.get("value"), w.get("z")] for w in worst[:KEY_LIST_CAP]],
            )
            if len(worst) > KEY_LIST_CAP:
                out += f'<p class="note">… and {len(worst) - KEY_LIST_CAP:,} more</p>'
        if outliers.get("truncated"):
            out += '<p class="note">(the QA run kept only the worst outliers)</p>'
        blocks.append(out)
    return "\n".join(blocks) if blocks else None


def _duplicates_section(report: Mapping[str, Any]) -> str | None:
    dup = _dict(report.get("duplicates"))
    if not dup:
        return None
    out = _kv_table([("groups", dup.get("groups")), ("rows", dup.get("rows"))])
    examples = [e for e in _list(dup.get("examples")) if isinstance(e, Mapping)]
    if not examples:
        groups = dup.get("groups")
        if groups == 0:
            out += '<p class="good">No two rows share identical latents.</p>'
        return out
    rows = []
    for e in examples[:KEY_LIST_CAP]:
        digest = str(e.get("digest") or "")
        keys = _list(e.get("keys"))
        rows.append([_code(digest[:16] + ("…" if len(digest) > 16 else "")), len(keys), _Html(_key_list(keys))])
    out += _table(["digest", "rows", "keys"], rows)
    if len(examples) > KEY_LIST_CAP:
        out += f'<p class="note">… and {len(examples) - KEY_LIST_CAP:,} more groups</p>'
    if dup.get("truncated"):
        out += '<p class="note">(the QA run kept only the first groups)</p>'
    return out


def _alignment_section(report: Mapping[str, Any]) -> str | None:
    align = _dict(report.get("alignment"))
    if not align:
        return None
    out = ""
    totals = _dict(align.get("totals"))
    if totals:
        out += "<h3>Totals</h3>\n" + _kv_table(totals.items())
    problems = _list(align.get("problems"))
    if problems:
        out += (
            '<h3 class="bad">Problems</h3>\n<ul class="problems">'
            + "".join(f"<li>{_esc(p)}</li>" for p in problems)
            + "</ul>"
        )
    elif "problems" in align:
        out += '<p class="good">No alignment problems: every sample is one data row or one error row.</p>'
    shards = [s for s in _list(align.get("shards")) if isinstance(s, Mapping)]
    if shards:
        columns = list(dict.fromkeys(k for s in shards for k in s))
        rows = [[_status(s.get(c)) if c == "status" else s.get(c) for c in columns] for s in shards]
        bad = sum(1 for s in shards if _STATUS_CLASS.get(str(s.get("status")).lower()) != "pass")
        table = _table(columns, rows)
        out += "<h3>Shards</h3>\n" + _collapsible(
            f"{len(shards):,} shards ({bad:,} not ok)", table, collapse=len(shards) > SHARDS_COLLAPSE
        )
    return out or None


def _codebook_section(report: Mapping[str, Any]) -> str | None:
    cb = _dict(report.get("codebook"))
    if not cb:
        return None
    size = cb.get("codebook_size")
    oor = cb.get("out_of_range")
    oor_cell = None
    if oor is not None:
        oor_cell = _Html(f'<span class="{"bad" if _finite(oor) and oor > 0 else "good"}">{_esc(_fmt(oor))}</span>')
    facts = [
        ("codebook size", size),
        ("indices counted", cb.get("total")),
        ("out of range", oor_cell),
        ("codes used", cb.get("used")),
        ("usage", _pct(cb.get("usage"))),
        ("dead codes", cb.get("dead")),
        ("perplexity", cb.get("perplexity")),
        ("entropy (bits)", cb.get("entropy_bits")),
    ]
    if _finite(size) and size > 0:
        facts.append(("max entropy (bits)", round(math.log2(float(size)), 3)))
    out = _kv_table(facts)
    counts = _list(cb.get("counts"))
    if counts:
        plot = _codebook_plot(counts, total=cb.get("total"))
        out += plot or ""
    top = [t for t in _list(cb.get("top")) if isinstance(t, Mapping)]
    if top:
        out += "<h3>Most used codes</h3>\n" + _table(
            ["code", "count", "fraction"],
            [[t.get("code"), t.get("count"), _pct(t.get("fraction"))] for t in top[:KEY_LIST_CAP]],
        )
    dead_codes = _list(cb.get("dead_codes"))
    if dead_codes:
        out += "<h3>Dead codes</h3>\n" + _key_list(
            dead_codes, total=cb.get("dead"), truncated=cb.get("dead_codes_truncated"), what="codes"
        )
    return out


def _sample_sort_key(sample: Mapping[str, Any]) -> tuple[int, float]:
    psnr = sample.get("psnr")
    return (0, float(psnr)) if _finite(psnr) else (1, 0.0)


def _reconstruction_section(
    report: Mapping[str, Any], images: Mapping[str, tuple[np.ndarray, np.ndarray]]
) -> str | None:
    rec = _dict(report.get("reconstruction"))
    if not rec and not images:
        return None
    out = ""
    if rec.get("skipped"):
        out += f'<p class="notice">Reconstruction skipped: {_esc(rec.get("skipped"))}</p>'
    out += _kv_table((k, rec.get(k)) for k in ("sample", "seed", "decoder") if k in rec)
    metrics = _dict(rec.get("metrics"))
    if metrics:
        stat_names = list(dict.fromkeys(k for m in metrics.values() for k in _dict(m)))
        rows = []
        for name, m in metrics.items():
            if isinstance(m, Mapping):
                rows.append([str(name).upper(), *[m.get(s) for s in stat_names]])
            else:  # e.g. "lpips": null when the metric's package is missing
                filler = ["not computed", *[None] * (len(stat_names) - 1)] if stat_names else []
                rows.append([str(name).upper(), *filler])
        out += "<h3>Metrics</h3>\n" + _table(["metric", *stat_names], rows)
    # Worst first whatever order the report holds them in (a stable sort keeps ties as given).
    samples = sorted((s for s in _list(rec.get("samples")) if isinstance(s, Mapping)), key=_sample_sort_key)
    pairs = []
    by_key = {str(s.get("key")): s for s in samples}
    # Scored samples worst first, then any images the report holds no metrics for.
    order = list(by_key) + [str(k) for k in images if str(k) not in by_key]
    image_lookup = {str(k): v for k, v in images.items()}
    bad_images = []
    for key in order:
        if key not in image_lookup or len(pairs) >= MAX_PAIRS:
            continue
        try:
            original, decoded = image_lookup[key]
            data, width, height = _pair_png(original, decoded)
        except (ValueError, TypeError) as exc:
            logger.warning("QA report: cannot draw reconstruction of %r: %s", key, exc)
            bad_images.append(key)
            continue
        s = by_key.get(key, {})
        caption = " · ".join(
            part
            for part in (
                f"PSNR {_fmt(s.get('psnr'))} dB" if "psnr" in s else "",
                f"SSIM {_fmt(s.get('ssim'))}" if "ssim" in s else "",
                f"LPIPS {_fmt(s.get('lpips'))}" if s.get("lpips") is not None else "",
                f"shard {s.get('shard')}" if s.get("shard") is not None else "",
            )
            if part
        )
        pairs.append(
            '<figure class="pair">'
            f'<img src="{_png_data_uri(data)}" alt="original and decoded {_esc(key)}" '
            f'width="{width}" height="{height}">'
            f"<figcaption><code>{_esc(key)}</code><br>{_esc(caption or 'no metrics')}</figcaption>"
            "</figure>"
        )
    if pairs:
        out += (
            "<h3>Originals and decodes</h3>\n"
            '<p class="note">Each pair: original (left), decoded (right); lowest PSNR first.</p>\n'
            f'<div class="pairs">{"".join(pairs)}</div>'
        )
        with_images = sum(1 for k in order if k in image_lookup)
        if with_images > MAX_PAIRS:
            out += f'<p class="note">The worst {MAX_PAIRS} of {with_images} pairs are shown.</p>'
    if bad_images:
        listed = ", ".join(f"<code>{_esc(k)}</code>" for k in bad_images)
        out += f'<p class="notice">Images could not be drawn for: {listed}</p>'
    if samples:
        columns = list(dict.fromkeys(k for s in samples for k in s))
        label = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS"}
        rows = [[_code(s.get(c)) if c == "key" else s.get(c) for c in columns] for s in samples]
        out += f"<h3>Worst {len(samples)} samples</h3>\n" + _table([label.get(c, c) for c in columns], rows)
    failed = _dict(rec.get("failed"))
    if failed:
        items = list(failed.items())
        out += "<h3>Failed samples</h3>\n" + _table(["key", "reason"], [[_code(k), v] for k, v in items[:KEY_LIST_CAP]])
        if len(items) > KEY_LIST_CAP:
            out += f'<p class="note">… and {len(items) - KEY_LIST_CAP:,} more</p>'
    return out or '<p class="note">No reconstruction data.</p>'
