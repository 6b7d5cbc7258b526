"""The QA report as files: ``report.json`` (the data) and ``report.html`` (the same, for people).

The HTML page is one self-contained file: inline CSS, one small inline script, and every plot or
image an ``<img>`` whose ``src`` is a ``data:image/png;base64,...`` URI. It references nothing
outside itself (no CDN, fonts or scripts), so it opens the same from a bucket, a laptop or an
air-gapped cluster, and a Content-Security-Policy in the page makes the browser refuse anything
else should a future edit add it.

The page is the Jinja2 template ``templates/report.html.j2`` (with one partial per section
under ``templates/sections/``) rendered from the typed sections :func:`latentize.qa.sections.build_page`
reads once out of the report; :mod:`latentize.qa.plots` draws its figures. Report text holds
keys, shard names and paths of the user's dataset: the template environment escapes every value
it outputs.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from latentize.qa.sections import build_page
from latentize.qa.values import is_number, json_ready, percent, status_class, text

if TYPE_CHECKING:
    import fsspec
    import jinja2

__all__ = ["json_ready", "render_html", "write_report"]

logger = logging.getLogger(__name__)

_PAGE_TEMPLATE = "report.html.j2"
_SCRIPT_TEMPLATE = "image_check.js"


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
    html_text = _render(clean, images or {})
    base = directory.rstrip("/")
    json_path = f"{base}/report.json"
    html_path = f"{base}/report.html"
    fs.makedirs(directory, exist_ok=True)
    fs.pipe_file(json_path, json_text.encode("utf-8"))
    fs.pipe_file(html_path, html_text.encode("utf-8"))
    logger.info("wrote QA report %s (%d bytes) and %s", json_path, len(json_text), html_path)
    return json_path, html_path


def render_html(
    report: Mapping[str, Any],
    *,
    images: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> str:
    """The report as one self-contained HTML document.

    Sections, in order (a section the report leaves out, or holds as ``None``, is not shown):
    header with the verdict and the checks, encoder, data folders, scale check, per-channel
    statistics, non-finite values and outliers, duplicates, alignment, codebook (VQ), caption
    embeddings (outputs with a text stage), reconstruction.

    Args:
        report: the report dict of :func:`latentize.qa.run_qa` (numpy values and NaN are
            allowed: the page shows the :func:`json_ready` values report.json holds).
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
    return _render(json_ready(report), images or {})


def _render(report: Mapping[str, Any], images: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """:func:`render_html` of a report that is :func:`json_ready` already."""
    page = build_page(report, images)
    document = _environment().get_template(_PAGE_TEMPLATE).render(page=page, csp=_content_security_policy())
    logger.debug("rendered QA report: %d bytes, %d sections", len(document), len(page.sections))
    return document


def _escape(value: Any) -> Any:
    """Every ``{{ value }}`` of the templates, escaped with :func:`html.escape`.

    Autoescaping would escape it too; this only keeps the page's long-standing entity spellings
    (``&#x27;`` and ``&quot;`` rather than MarkupSafe's ``&#39;`` and ``&#34;``). Markup (a macro's
    output) passes through, as autoescaping would pass it.
    """
    import markupsafe

    if hasattr(value, "__html__"):
        return value
    return markupsafe.Markup(html.escape(str(value), quote=True))


@functools.cache
def _environment() -> jinja2.Environment:
    # Imported here: `latentize` commands that never render a report skip Jinja's import.
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("latentize.qa", "templates"),
        # Every template is escaped, whatever its name: the CSS and script hold no expressions.
        autoescape=jinja2.select_autoescape(default_for_string=True, default=True),
        finalize=_escape,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["thousands"] = lambda n: f"{n:,}"
    env.filters["text"] = text
    env.filters["percent"] = percent
    env.filters["status_class"] = status_class
    env.tests["numeric"] = is_number
    return env


@functools.cache
def _content_security_policy() -> str:
    """Only data: images, inline style and the page's one script (by its hash) are allowed:
    anything else a future edit (or an escaping bug) adds is refused by the browser, not fetched."""
    script = _environment().get_template(_SCRIPT_TEMPLATE).render()
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"
    )
