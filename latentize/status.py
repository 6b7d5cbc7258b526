"""What an output root holds: shards committed / failed / pending, samples, error reasons.

Computed from the output alone (manifest, input list, markers, errors tables), so it works for
a run in progress, a crashed run or a finished one, from any machine that can read the output.
"""

from __future__ import annotations

import logging
import posixpath
from collections import Counter
from typing import Any

from latentize.errors import LatentizeError
from latentize.sinks.contract import read_errors, read_manifest, run_markers
from latentize.sinks.layout import ERRORS, OutputLayout

__all__ = ["output_status", "format_status"]

logger = logging.getLogger(__name__)

#: Error reasons listed by ``status`` (the most frequent first).
TOP_REASONS = 20


def output_status(layout: OutputLayout) -> dict[str, Any]:
    """Summarises the run in ``layout``.

    Returns:
        A JSON-ready dict: ``shards`` (total, committed, failed, pending, plus the failed and
        pending shard ids with reasons), ``samples`` (ok, failed), ``reencoded_fp32`` (of the
        ok samples, those re-encoded in float32: non-finite in the compute dtype), ``folders``
        (data rows per data folder ``WxH``, by name: one folder per aspect-ratio bucket and
        resolution, where a sample has a row in a folder of each resolution), ``errors``
        (reason -> count, most frequent first, and by stage), ``complete`` and the manifest's
        ``status``.

    Raises:
        LatentizeError: the root holds no latentize run.
    """
    manifest = read_manifest(layout)
    if manifest is None:
        raise LatentizeError(f"{layout.url} holds no latentize run (no _manifest.json)")
    inputs = layout.read_inputs()
    markers = run_markers(layout, manifest)
    committed = [s for s, m in markers.items() if m.succeeded]
    failed = {s: m.error for s, m in markers.items() if not m.succeeded}
    pending = [shard for _, shard in inputs if shard not in markers]
    folders: Counter[str] = Counter()
    for m in markers.values():
        folders.update(m.rows or {})
    reasons, stages = _error_counts(layout, manifest.slot_of)
    return {
        "output": layout.url,
        "status": manifest.status,
        "complete": not pending and not failed,
        "shards": {
            "total": len(inputs),
            "committed": len(committed),
            "failed": len(failed),
            "pending": len(pending),
            "failed_shards": failed,
            "pending_shards": pending,
        },
        "samples": {"ok": sum(m.ok for m in markers.values()), "failed": sum(m.failed for m in markers.values())},
        "reencoded_fp32": sum(m.reencoded_fp32 for m in markers.values()),
        "folders": dict(sorted(folders.items())),
        "errors": {"by_reason": reasons, "by_stage": stages},
    }


def _error_counts(layout: OutputLayout, slot_of: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """Error reasons and stages over every errors table (one listing, concurrent reads)."""
    paths = [p for p in layout.list_files(layout.join(ERRORS)) if p.endswith(".parquet")]
    reasons: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    for path, data in layout.iter_contents(paths):
        table = read_errors(data, shard=posixpath.basename(path)[: -len(".parquet")], slot_of=slot_of)
        reasons.update(table.column("error").to_pylist())
        stages.update(table.column("stage").to_pylist())
    return dict(reasons.most_common(TOP_REASONS)), dict(stages.most_common())


def format_status(status: dict[str, Any]) -> str:
    """The status as a few human-readable lines."""
    sh, sa = status["shards"], status["samples"]
    lines = [
        f"output:   {status['output']}",
        f"complete: {'yes' if status['complete'] else 'no'} (run status: {status['status']})",
        f"shards:   {sh['committed']} committed, {sh['failed']} failed, {sh['pending']} pending, of {sh['total']}",
        f"samples:  {sa['ok']} ok, {sa['failed']} failed",
    ]
    if status.get("reencoded_fp32"):
        lines.append(f"          {status['reencoded_fp32']} of the ok samples re-encoded in float32")
    if status.get("folders"):
        lines.append("data rows per folder:")
        width = max(len(name) for name in status["folders"])
        lines += [f"  {name:<{width}}  {rows:>8}" for name, rows in sorted(status["folders"].items())]
    for shard, reason in list(sh["failed_shards"].items())[:10]:
        lines.append(f"  failed shard {shard}: {reason}")
    if status["errors"]["by_reason"]:
        lines.append("error reasons:")
        for reason, count in status["errors"]["by_reason"].items():
            lines.append(f"  {count:>8}  {reason}")
    return "\n".join(lines)
