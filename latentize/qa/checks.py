"""The QA report's named checks, and the pure functions behind them.

Every function here works on small, already-aggregated figures (statistics summaries, counts,
the manifest, the report's sections), never on latents, so they test without Ray and run on the
driver. Each ``*_check`` function decides one named line of the report (:class:`Check`).

Normalisation: a stored value ``s`` of channel ``c`` relates to the encoder's raw latent ``z`` by
an affine map ``z = s * a[c] + b[c]``, whose constants the manifest records
(:meth:`latentize.encoders.normalize.Normalization.raw_map`; docs/encoders.md has the
normalisation formulas of every encoder family):

* ``(z - shift_factor) * scaling_factor``: ``a = 1 / scaling_factor``, ``b = shift_factor``;
* ``(z - latents_mean) * scaling_factor / latents_std``: ``a = latents_std / scaling_factor``,
  ``b = latents_mean``;
* ``z * scaling_factor`` (DC-AE): ``a = 1 / scaling_factor``, ``b = 0``;
* stored raw (``moments``, constants not applied): ``a = 1``, ``b = 0``;
* FLUX.2's BatchNorm statistics live in the checkpoint, not the manifest: no raw map.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from latentize.encoders.normalize import Normalization
from latentize.qa.stats import affine_summary
from latentize.qa.values import sample_label

if TYPE_CHECKING:
    from latentize.qa.recon import Reconstruction
    from latentize.qa.scan import Findings
    from latentize.qa.stats import CodeUsage
    from latentize.sinks.contract import Manifest, Marker

__all__ = [
    "Check",
    "FolderCounts",
    "NormalizationMap",
    "alignment_section",
    "codebook_range_check",
    "codebook_usage_check",
    "complete_check",
    "counts_check",
    "data_check",
    "distinct_samples",
    "duplicates_check",
    "finite_check",
    "keys_unique_check",
    "normalization_map",
    "outliers_check",
    "reconstruction_check",
    "scale_check",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Check:
    """One named pass/fail line of the report.

    Attributes:
        name: stable identifier (``scale``, ``finite``, ``keys_unique``...).
        status: ``pass``, ``fail``, ``warn`` (a failed check of severity ``warning``) or
            ``skip`` (not applicable to this output, with the reason as message).
        severity: ``error`` (a failure fails the report) or ``warning`` (reported only).
        message: one human-readable sentence with the figures behind the verdict.
    """

    name: str
    status: str
    severity: str
    message: str

    @classmethod
    def judge(cls, name: str, ok: bool, message: str, *, severity: str = "error") -> Check:
        """``pass`` when ``ok``; else ``fail`` (severity ``error``) or ``warn`` (``warning``)."""
        status = "pass" if ok else ("fail" if severity == "error" else "warn")
        return cls(name, status, severity, message)

    @classmethod
    def skipped(cls, name: str, why: str, *, severity: str = "error") -> Check:
        """A check that could not run, with the reason as its message."""
        return cls(name, "skip", severity, why)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class NormalizationMap:
    """``raw = stored * scale + offset`` per channel, and whether ``stored`` is normalised.

    Attributes:
        scale: (C,) float64, > 0.
        offset: (C,) float64.
        applied: True when the stored values are the normalised latents (False: raw moments).
        form: ``shift_scale``, ``latents_mean_std``, ``scale`` or ``raw``.
    """

    scale: np.ndarray
    offset: np.ndarray
    applied: bool
    form: str
    constants: dict[str, Any] = field(default_factory=dict)


def normalization_map(encoder: Mapping[str, Any], channels: int) -> NormalizationMap | None:
    """The stored-to-raw map of a float latent column from the manifest's ``encoder`` entry.

    Returns None when the manifest cannot say (VQ indices; FLUX.2, whose BatchNorm statistics
    are in the checkpoint).
    """
    constants = dict(encoder.get("constants") or {})
    norm = Normalization.from_constants(constants)
    if norm is None or not norm.scaling_factor > 0:
        return None
    applied = bool(constants.get("applied", True))
    a, b = norm.raw_map(channels)
    form = norm.form
    if a.shape != (channels,) or b.shape != (channels,):
        logger.warning("manifest constants have %d channels, the latents %d: no raw statistics", a.size, channels)
        return None
    if not applied:
        return NormalizationMap(np.ones(channels), np.zeros(channels), False, form, constants)
    return NormalizationMap(a, b, True, form, constants)


def scale_check(
    stored: Mapping[str, Any],
    norm: NormalizationMap | None,
    encoder: Mapping[str, Any],
    *,
    tolerance: float,
    shift_tolerance: float,
) -> tuple[dict[str, Any], Check]:
    """Do the constants in the manifest make the latents unit-variance and centred?

    Diffusion training assumes normalised latents with std about 1 and mean about 0; that is
    what ``scaling_factor`` (``1 / std`` of raw latents) and ``shift_factor`` (their mean) are
    for. Unscaled latents under a manifest that says 0.18215 have std ≈ 5.5, doubly scaled ones
    ≈ 0.18, a forgotten shift moves the mean: all fall outside the tolerance.

    Args:
        stored: ``LatentStats.to_dict()`` of the stored column.
        norm: its stored-to-raw map (None: only the stored values are judged).
        encoder: the manifest's ``encoder`` entry (type, preset, constants).
        tolerance: allowed relative deviation of the normalised std from 1 (0.35: 0.74..1.35).
        shift_tolerance: allowed |mean| of the normalised latents.

    Returns:
        The report's ``scale`` section and the ``scale`` check.
    """

    def pooled(summary: Mapping[str, Any]) -> tuple[float, float]:
        figures = summary["all"]
        return tuple(math.nan if figures[k] is None else float(figures[k]) for k in ("mean", "std"))  # type: ignore[return-value]

    s_mean, s_std = pooled(stored)
    raw: Mapping[str, Any] | None = None
    normalized: Mapping[str, Any] = stored
    if norm is not None and not norm.applied:
        # Raw moments: judge the latents the manifest's constants would produce.
        raw = stored
        base = normalization_map({"constants": {**norm.constants, "applied": True}}, len(stored["channels"]))
        if base is not None:
            normalized = affine_summary(stored, 1.0 / base.scale, -base.offset / base.scale)
    elif norm is not None:
        raw = affine_summary(stored, norm.scale, norm.offset)
    norm_mean, norm_std = pooled(normalized)
    raw_mean, raw_std = pooled(raw) if raw is not None else (math.nan, math.nan)
    per_channel_norm = [(c["mean"], c["std"]) for c in normalized["channels"]]
    constants = dict(encoder.get("constants") or {})
    manifest = {
        k: constants.get(k) for k in ("scaling_factor", "shift_factor", "latents_mean", "latents_std") if k in constants
    }
    recommended: dict[str, Any] = {}
    form = norm.form if norm is not None else None
    if raw is not None and math.isfinite(raw_std) and raw_std > 0:
        if form == "latents_mean_std":
            scaling = float(constants["scaling_factor"])
            recommended = {
                "latents_mean": [c["mean"] for c in raw["channels"]],
                "latents_std": [c["std"] * scaling for c in raw["channels"]],
            }
        else:
            recommended = {"scaling_factor": 1.0 / raw_std, "shift_factor": raw_mean if form == "shift_scale" else 0.0}
    lo, hi = 1.0 / (1.0 + tolerance), 1.0 + tolerance
    std_ok = math.isfinite(norm_std) and lo <= norm_std <= hi
    mean_ok = math.isfinite(norm_mean) and abs(norm_mean) <= shift_tolerance
    raw_by_design = (
        encoder.get("type") == "tiny"
        and not constants.get("latents_mean")
        and float(constants.get("scaling_factor", 1.0)) == 1.0
        and float(constants.get("shift_factor") or 0.0) == 0.0
    )
    section = {
        "applicable": True,
        "form": form,
        "manifest": manifest,
        "recommended": recommended,
        "stored_mean": s_mean,
        "stored_std": s_std,
        "normalized_mean": norm_mean,
        "normalized_std": norm_std,
        "raw_mean": raw_mean,
        "raw_std": raw_std,
        "tolerance": tolerance,
        "shift_tolerance": shift_tolerance,
        "per_channel": [{"channel": i, "mean": m, "std": s} for i, (m, s) in enumerate(per_channel_norm)],
    }
    if std_ok and mean_ok:
        message = (
            f"normalised latents have std {norm_std:.3f} and mean {norm_mean:+.3f} "
            f"(within {lo:.2f}..{hi:.2f} and ±{shift_tolerance:g})"
        )
    else:
        problems = []
        if not std_ok:
            problems.append(f"std {norm_std:.4g} is outside {lo:.2f}..{hi:.2f}")
            if math.isfinite(norm_std) and norm_std > 0:
                guess = _scale_diagnosis(norm_std, constants)
                if guess:
                    problems.append(guess)
        if not mean_ok:
            problems.append(f"mean {norm_mean:+.4g} is beyond ±{shift_tolerance:g} (a missing or wrong shift_factor?)")
        message = "normalised latents: " + "; ".join(problems)
        if recommended.get("scaling_factor") is not None:
            message += (
                f". Recommended scaling_factor {recommended['scaling_factor']:.5g}, shift_factor "
                f"{recommended['shift_factor']:.4g}; the manifest says "
                f"{manifest.get('scaling_factor')}, {manifest.get('shift_factor')}"
            )
    severity = "error"
    if raw_by_design:
        # TAESD-family presets store raw latents on purpose; say what they would need, don't fail.
        severity = "warning"
        if not (std_ok and mean_ok):
            message += " (TAESD-family latents are stored raw by design)"
    section["message"] = message
    return section, Check.judge("scale", std_ok and mean_ok, message, severity=severity)


def _scale_diagnosis(std: float, constants: Mapping[str, Any]) -> str | None:
    """Names the likely mistake behind a normalised std far from 1."""
    scaling = constants.get("scaling_factor")
    if not scaling or scaling == 1.0:
        return None
    # Unscaled latents read through a manifest that says `scaling_factor` look 1/scaling times
    # too wide; doubly scaled ones `scaling` times too narrow.
    if abs(math.log(std * scaling)) < 0.5:
        return f"looks unscaled: std × scaling_factor {scaling:g} = {std * scaling:.3f} ≈ 1"
    if abs(math.log(std / scaling)) < 0.5:
        return f"looks scaled twice: std / scaling_factor {scaling:g} = {std / scaling:.3f} ≈ 1"
    return None


# --------------------------------------------------------------------------- alignment


@dataclass(frozen=True)
class FolderCounts:
    """What an output of several data folders (aspect-ratio buckets, several resolutions) adds
    to the alignment: there a sample is one data row in a folder of each resolution.

    Attributes:
        rows: data rows by shard, then data folder.
        samples: distinct samples with data rows, by shard (:func:`distinct_samples`; None
            where the rows do not add up to whole samples).
        errors: error rows by shard, then the resolution slot they stand for (-1: every slot,
            a sample that failed as a whole).
        slot_of: data folder -> its resolution slot (position in ``preprocess.resolutions``).
        slots: how many resolutions the run wrote.
        missing: key -> the resolution slots it has data rows but no row at all for (a lost
            row: a resolution that failed writes an error row).
    """

    rows: Mapping[str, Mapping[str, int]]
    samples: Mapping[str, int | None]
    errors: Mapping[str, Mapping[int, int]]
    slot_of: Mapping[str, int]
    slots: int
    missing: Mapping[str, Sequence[int]] = field(default_factory=dict)


def distinct_samples(
    rows: Mapping[str, int], irregular: Mapping[str, tuple[int, int]], *, slots: int
) -> dict[str, int | None]:
    """Distinct samples with data rows, by shard, from row counts.

    A sample whose rows are regular has one data row per resolution slot, so a shard's regular
    rows are ``slots`` per sample; the others (repeated or partial keys) are counted one by one
    by pass 2.

    Args:
        rows: data rows by shard.
        irregular: shard -> (keys, data rows) of the irregular keys.
        slots: how many resolutions the run wrote.

    Returns:
        Samples by shard; None where the regular rows are not a multiple of ``slots``.
    """
    out: dict[str, int | None] = {}
    for shard, n in rows.items():
        keys, irregular_rows = irregular.get(shard, (0, 0))
        regular = int(n) - irregular_rows
        out[shard] = None if regular < 0 or regular % slots else keys + regular // slots
    return out


def alignment_section(
    *,
    manifest: Manifest,
    inputs: Sequence[tuple[str, str]],
    markers: Mapping[str, Marker],
    data_rows: Mapping[str, int],
    error_rows: Mapping[str, int],
    orphans: Sequence[str],
    duplicate_keys: Sequence[Sequence[str]],
    folders: FolderCounts | None = None,
) -> dict[str, Any]:
    """Do data rows, error rows, commit markers and manifest totals tell one story?

    Args:
        manifest: ``_manifest.json``.
        inputs: the run's ``(url, shard)`` list (``_inputs.parquet``).
        markers: committed markers of this run's fingerprint, by shard.
        data_rows: data rows counted in the data files, by shard.
        error_rows: rows of ``_errors/<shard>.parquet``, by shard.
        orphans: data or error files that no marker lists (a crashed commit's leftovers are
            in ``_staging``, never here, so these should not exist).
        duplicate_keys: groups ``[key, shard, shard, ...]`` of rows (data and error) that share
            a key; the first 100 are listed.
        folders: the per-folder counts of an output of several data folders (None: one
            folder). Then each shard's data rows are compared per folder with its marker's
            ``rows``, its distinct samples with ``ok``, and each resolution's data and error
            rows with the samples read; the manifest's ``rows_by_folder`` with the data; and
            keys without a row at some resolution are named (``missing_keys``).

    Returns:
        The report's ``alignment`` section: ``totals`` (with ``marker_reencoded_fp32``, the
        stored samples the markers count as re-encoded in float32), ``problems`` (one sentence per
        disagreement, judged by :func:`counts_check`), ``shards`` (one row per input shard),
        ``duplicate_keys`` and, with ``folders``, ``missing_keys`` (``[key, slot, ...]``).
    """
    shards = []
    problems: list[str] = []
    for _, shard in inputs:
        m = markers.get(shard)
        data, errors = int(data_rows.get(shard, 0)), int(error_rows.get(shard, 0))
        if folders is None:
            row, found = _shard_alignment(shard, m, data, errors)
        else:
            row, found = _shard_folder_alignment(shard, m, data, errors, folders)
        shards.append(row)
        problems += found
    known = {shard for _, shard in inputs}
    for shard in sorted(set(data_rows) - known):
        problems.append(f"data rows of shard {shard}, which is not an input of this run")
    for path in orphans:
        problems.append(f"file {path} is listed by no commit marker")
    samples = manifest.samples
    totals = {
        "data_rows": sum(int(v) for v in data_rows.values()),
        "error_rows": sum(int(v) for v in error_rows.values()),
        "marker_ok": sum(m.ok for m in markers.values()),
        "marker_failed": sum(m.failed for m in markers.values()),
        "marker_reencoded_fp32": sum(m.reencoded_fp32 for m in markers.values()),
        "manifest_ok": samples.ok if samples else None,
        "manifest_failed": samples.failed if samples else None,
        "shards_total": len(inputs),
        "shards_committed": sum(1 for _, s in inputs if s in markers),
        "shards_failed": sum(1 for _, s in inputs if s in markers and not markers[s].succeeded),
    }
    if samples and (samples.ok, samples.failed) != (totals["marker_ok"], totals["marker_failed"]):
        problems.append(
            f"the manifest says {samples.ok} ok / {samples.failed} failed, "
            f"the markers {totals['marker_ok']} / {totals['marker_failed']}"
        )
    section: dict[str, Any] = {"totals": totals, "problems": problems, "shards": shards}
    section["duplicate_keys"] = list(duplicate_keys[:100])
    if folders is not None:
        totals["data_samples"] = sum(int(n) for n in folders.samples.values() if n is not None)
        problems += _manifest_folder_rows(manifest, folders)
        problems += _missing_keys_problem(folders)
        section["missing_keys"] = [[key, *map(int, slots)] for key, slots in list(folders.missing.items())[:100]]
    return section


def _shard_alignment(shard: str, marker: Marker | None, data: int, errors: int) -> tuple[dict[str, Any], list[str]]:
    """One shard's row of the alignment table, and its disagreements with its marker."""
    row = {
        "shard": shard,
        "status": "pending" if marker is None or marker.status is None else marker.status,
        "data_rows": data,
        "error_rows": errors,
        "marker_ok": None if marker is None else marker.ok,
        "marker_failed": None if marker is None else marker.failed,
    }
    if marker is None:
        return row, [
            f"shard {shard}: {data} data and {errors} error rows but no commit marker"
        ] if data or errors else []
    problems = []
    if data != row["marker_ok"]:
        problems.append(f"shard {shard}: {data} data rows, its marker says {row['marker_ok']} ok")
    if errors != row["marker_failed"]:
        problems.append(f"shard {shard}: {errors} error rows, its marker says {row['marker_failed']} failed")
    if marker.samples is not None and marker.samples != data + errors:
        problems.append(f"shard {shard}: {data + errors} rows in all, its marker says {marker.samples} samples read")
    return row, problems


def _shard_folder_alignment(
    shard: str, marker: Marker | None, data: int, errors: int, folders: FolderCounts
) -> tuple[dict[str, Any], list[str]]:
    """:func:`_shard_alignment` of an output of several data folders."""
    samples = folders.samples.get(shard, 0 if not data else None)
    row, found = _shard_alignment(shard, marker, data, errors)
    # The same row with the distinct samples beside the data rows.
    row = {**dict(list(row.items())[:3]), "data_samples": samples, **dict(list(row.items())[3:])}
    if marker is None:
        return row, found
    problems = []
    rows = folders.rows.get(shard, {})
    said = marker.rows or {}
    for folder in sorted(set(rows) | set(said)):
        if int(rows.get(folder, 0)) != said.get(folder, 0):
            problems.append(
                f"shard {shard}: {rows.get(folder, 0)} data rows in {folder}, its marker says {said.get(folder, 0)}"
            )
    if samples is None:
        problems.append(f"shard {shard}: its {data} data rows are not whole samples of {folders.slots} resolutions")
    elif samples != row["marker_ok"]:
        problems.append(f"shard {shard}: {samples} samples with data rows, its marker says {row['marker_ok']} ok")
    if errors != row["marker_failed"]:
        problems.append(f"shard {shard}: {errors} error rows, its marker says {row['marker_failed']} failed")
    read = marker.samples
    shard_errors = folders.errors.get(shard, {})
    for slot in range(folders.slots):
        in_slot = sum(int(n) for f, n in rows.items() if folders.slot_of.get(f, 0) == slot)
        failed = int(shard_errors.get(slot, 0)) + int(shard_errors.get(-1, 0))
        if read is not None and in_slot + failed != int(read):
            problems.append(
                f"shard {shard}: resolution {slot} holds {in_slot} data and {failed} error rows, "
                f"its marker says {read} samples read"
            )
    return row, problems


def _missing_keys_problem(folders: FolderCounts) -> list[str]:
    """One sentence naming the keys that lack a row (data or error) at some resolution."""
    if not folders.missing:
        return []
    names: dict[int, list[str]] = {}
    for folder, slot in sorted(folders.slot_of.items()):
        names.setdefault(slot, []).append(folder)

    def where(slot: int) -> str:
        return f"resolution {slot} ({', '.join(names.get(slot, [])) or 'no folder'})"

    listed = "; ".join(
        f"{key} at {', '.join(where(s) for s in slots)}" for key, slots in list(folders.missing.items())[:5]
    )
    return [f"{len(folders.missing)} key(s) have data rows but no row, data or error, at some resolution: {listed}"]


def _manifest_folder_rows(manifest: Manifest, folders: FolderCounts) -> list[str]:
    """The manifest's ``output.rows_by_folder`` against the data rows per folder."""
    said = manifest.output.rows_by_folder
    if said is None:
        return []
    found: dict[str, int] = {}
    for by_folder in folders.rows.values():
        for folder, n in by_folder.items():
            found[folder] = found.get(folder, 0) + int(n)
    return [
        f"folder {folder}: {found.get(folder, 0)} data rows, the manifest says {said.get(folder, 0)}"
        for folder in sorted(set(found) | set(said))
        if found.get(folder, 0) != said.get(folder, 0)
    ]


def complete_check(inputs: Sequence[tuple[str, str]], markers: Mapping[str, Marker]) -> Check:
    """``complete``: was every input shard read to the end and committed?

    Args:
        inputs: the run's ``(url, shard)`` list.
        markers: committed markers of this run's fingerprint, by shard (``status`` ``ok``: the
            shard was read to its end).
    """
    pending = [s for _, s in inputs if s not in markers]
    failed = [s for _, s in inputs if s in markers and not markers[s].succeeded]
    if not pending and not failed:
        return Check.judge("complete", True, f"all {len(inputs)} shard(s) committed")
    return Check.judge(
        "complete",
        False,
        f"{len(pending)} shard(s) pending, {len(failed)} failed to read to the end, of {len(inputs)} "
        f"(e.g. {', '.join((failed + pending)[:3])}); `latentize status` has the reasons",
    )


def counts_check(alignment: Mapping[str, Any]) -> Check:
    """``counts``: do data rows, error rows, commit markers and the manifest agree?

    Args:
        alignment: the report's ``alignment`` section (:func:`alignment_section`).
    """
    problems, totals = alignment["problems"], alignment["totals"]
    if not problems:
        return Check.judge(
            "counts",
            True,
            f"data rows ({totals['data_rows']}), error rows ({totals['error_rows']}), "
            "commit markers and manifest agree",
        )
    return Check.judge("counts", False, f"{len(problems)} disagreement(s): " + "; ".join(problems[:3]))


def keys_unique_check(duplicate_keys: Sequence[Sequence[str]]) -> Check:
    """``keys_unique``: is every key stored once, as one data row or one error row?

    Args:
        duplicate_keys: groups ``[key, shard, shard, ...]`` of rows that share a key (pass 2).
    """
    if not duplicate_keys:
        return Check.judge("keys_unique", True, "every key is one data row or one error row, once")
    sample = "; ".join(", ".join(g[:3]) for g in duplicate_keys[:3])
    return Check.judge("keys_unique", False, f"{len(duplicate_keys)} key(s) stored more than once: {sample}")


def data_check() -> Check:
    """``data``: listed (failed) only when the output holds no committed data file, since then
    no other check of the latents can run."""
    return Check.judge("data", False, "the output holds no committed data rows")


# --------------------------------------------------------------------------- values


def finite_check(nonfinite: Mapping[str, Any]) -> Check:
    """``finite``: is every stored float value finite?

    Args:
        nonfinite: the report's ``nonfinite`` section: ``rows`` holding NaN or ±inf, ``values``
            (non-finite values by column) and the first ``keys``.
    """
    rows, values, keys = nonfinite["rows"], nonfinite["values"], nonfinite["keys"]
    if rows == 0:
        return Check.judge("finite", True, "every stored value is finite")
    return Check.judge(
        "finite", False, f"{rows} row(s) hold NaN or Inf values ({sum(values.values())} values): {', '.join(keys[:5])}"
    )


def outliers_check(findings: Findings, *, data_rows: int, outlier_std: float) -> Check:
    """``outliers`` (a warning): does any value lie beyond ``outlier_std`` standard deviations of
    its channel's mean?

    Args:
        findings: pass 2's findings (exact outlier counts, the most extreme rows first).
        data_rows: data rows in the output.
        outlier_std: the threshold, in standard deviations.
    """
    if findings.outlier_rows == 0:
        return Check.judge("outliers", True, f"no value beyond {outlier_std:g} std of its channel", severity="warning")
    worst = findings.worst[0]
    return Check.judge(
        "outliers",
        False,
        f"{findings.outlier_rows} of {data_rows} row(s) hold {findings.outlier_values} value(s) "
        f"beyond {outlier_std:g} std of their channel; most extreme: {worst['key']} ({worst['z']:.1f} std)",
        severity="warning",
    )


def duplicates_check(findings: Findings) -> Check:
    """``duplicates`` (a warning): do different keys hold byte-identical latents?

    Args:
        findings: pass 2's findings (groups of ``(key, shard)`` with identical latents).
    """
    groups = findings.duplicate_latents
    if not groups:
        return Check.judge("duplicates", True, "no two keys share identical latents", severity="warning")
    examples = "; ".join(" = ".join(k for k, _ in g[:3]) for g in groups[:3])
    return Check.judge(
        "duplicates",
        False,
        f"{len(groups)} group(s) of keys share identical latents ({findings.duplicate_rows} rows), e.g. {examples} "
        "(duplicate source images, or latents written under the wrong keys)",
        severity="warning",
    )


# --------------------------------------------------------------------------- codebook


def codebook_range_check(usage: CodeUsage) -> Check:
    """``codebook_range``: does every stored VQ index lie in ``0 .. codebook_size - 1``?"""
    size = usage.counts.size
    if usage.out_of_range == 0:
        return Check.judge("codebook_range", True, f"all indices lie in the codebook of {size}")
    return Check.judge("codebook_range", False, f"{usage.out_of_range} indices lie outside the codebook of {size}")


def codebook_usage_check(usage: CodeUsage) -> Check:
    """``codebook_usage`` (a warning): are more than one of the codebook's codes used? A single
    used code is a collapsed quantiser (or constant input); usage and perplexity are reported."""
    return Check.judge(
        "codebook_usage",
        usage.used > 1,
        f"{usage.used} of {usage.counts.size} codes used ({usage.usage:.1%}), perplexity {usage.perplexity:.1f}",
        severity="warning",
    )


# --------------------------------------------------------------------------- reconstruction


def reconstruction_check(recon: Reconstruction, *, min_psnr: float) -> Check:
    """``reconstruction``: do the sampled latents decode back to their source images?

    Skipped (an error-severity skip) with ``--sample 0`` or no data rows; skipped as a warning
    when no decoder can be loaded; failed when no source image of the sample can be fetched,
    or when the mean PSNR is below ``min_psnr``.

    Args:
        recon: the reconstruction step's outcome and the report's ``reconstruction`` section.
        min_psnr: the mean PSNR (dB) the decodes must reach.
    """
    section = recon.section
    if recon.outcome == "not_run":
        return Check.skipped("reconstruction", f"not run: {section['skipped']}")
    if recon.outcome == "no_decoder":
        return Check.skipped("reconstruction", f"no decoder: {section['skipped']}", severity="warning")
    if recon.outcome == "no_sources":
        failed = section["failed"]
        return Check.judge(
            "reconstruction",
            False,
            "no source image of the sampled keys could be fetched "
            f"({len(failed)} failed; e.g. {next(iter(failed.values()), '')}); "
            "pass --input-storage-options for private buckets, or --sample 0 to skip",
        )
    metrics, worst = section["metrics"], section["samples"][0]
    mean_psnr = metrics["psnr"]["mean"]
    return Check.judge(
        "reconstruction",
        mean_psnr >= min_psnr,
        f"mean PSNR {mean_psnr:.2f} dB, SSIM {metrics['ssim']['mean']:.3f} over {section['sample']} sampled latents "
        f"decoded by the model's decoder (threshold {min_psnr:g} dB; "
        f"worst {sample_label(worst['key'], worst.get('folder'))}: {worst['psnr']:.2f} dB)",
    )
