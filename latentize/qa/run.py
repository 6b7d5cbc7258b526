"""``latentize qa OUT``: the whole QA report of one output root.

Four steps: *load* reads the manifest, the input list, the commit markers and the errors tables
on the driver; *scan* runs the two Ray Data passes of :mod:`latentize.qa.scan` over the data
files, then decodes a seeded sample of stored latents and scores them against their source
images (:func:`latentize.qa.recon.reconstruct`); *assess* builds the report's sections and runs
the named checks of :mod:`latentize.qa.checks` on them; an output with caption embeddings (the
manifest's ``text``) gets a ``text`` section and the ``text_finite`` and ``text_aligned`` checks
from a streaming pass on the driver (:mod:`latentize.qa.text`); *write* writes ``report.json`` and a
self-contained ``report.html``.

An output of several data folders (aspect-ratio buckets, several resolutions: the manifest's
``output.folders``) gets a ``folders`` section too: per folder its rows, statistics, scale
verdict and reconstruction scores; the other sections stay totals over every folder. An output
of one folder gets the same report as before folders existed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from latentize import __version__
from latentize.errors import LatentizeError
from latentize.qa.checks import (
    Check,
    FolderCounts,
    alignment_section,
    codebook_range_check,
    codebook_usage_check,
    complete_check,
    counts_check,
    data_check,
    distinct_samples,
    duplicates_check,
    finite_check,
    keys_unique_check,
    normalization_map,
    outliers_check,
    reconstruction_check,
    scale_check,
)
from latentize.qa.options import QAOptions
from latentize.qa.scan import (
    DataFile,
    DataFilesDatasource,
    Findings,
    ScanState,
    TensorColumn,
    find_rows,
    list_files,
    scan_statistics,
)
from latentize.qa.stats import CodeUsage, LatentStats, affine_summary
from latentize.qa.text import TextScan, empty_prompt_section, scan_text, text_checks, text_section
from latentize.raystart import init_ray
from latentize.sinks import OutputLayout
from latentize.sinks.contract import FolderSpec, Manifest, Marker, read_errors, read_manifest, run_markers

if TYPE_CHECKING:
    from latentize.qa.recon import Reconstruction

__all__ = ["QAOptions", "QAResult", "run_qa"]

logger = logging.getLogger(__name__)

#: Name of the report folder inside the output root (``_`` keeps data readers away from it).
REPORT_FOLDER = "_qa"
#: Rows per partition of pass 2's shuffle (its rows are a key, a digest and a few numbers).
ROWS_PER_PARTITION = 1_000_000
#: Keys listed per finding in the report.
KEY_LIMIT = 100


@dataclass
class QAResult:
    """The report and where it was written. ``passed``: no check failed."""

    report: dict[str, Any]
    html_path: str
    json_path: str

    @property
    def passed(self) -> bool:
        return bool(self.report["passed"])


def run_qa(output: str, *, options: QAOptions | None = None) -> QAResult:
    """Builds and writes the QA report of the output root ``output``.

    Raises:
        LatentizeError: ``output`` holds no latentize run, or the report cannot be written.
    """
    options = options or QAOptions()
    started = time.time()
    loaded = _load(output, options)
    scanned = _scan(loaded, options)
    report = _assess(loaded, scanned, options)
    report["seconds"] = round(time.time() - started, 2)
    result = _write(report, scanned, loaded.layout, options)
    logger.info(
        "qa: %s in %.1f s; report: %s", "PASS" if result.passed else "FAIL", time.time() - started, result.html_path
    )
    return result


# --------------------------------------------------------------------------- load


@dataclass(frozen=True)
class _Loaded:
    """What the driver reads of an output root before any pass over its data rows.

    Attributes:
        layout: the output root.
        manifest: ``_manifest.json``.
        columns: the stored tensor columns (from the manifest's ``encoder.columns``).
        inputs: the run's ``(url, shard)`` list.
        markers: commit markers of this run's fingerprint, by shard.
        files: the committed data files.
        orphans: data or error files no marker lists.
        errors: the rows of the errors tables (``key``, ``shard``, ``slot``: the resolution
            slot an error row stands for, -1 for the whole sample).
    """

    layout: OutputLayout
    manifest: Manifest
    columns: list[TensorColumn]
    inputs: list[tuple[str, str]]
    markers: dict[str, Marker]
    files: list[DataFile]
    orphans: list[str]
    errors: pa.Table

    @property
    def encoder(self) -> dict[str, Any]:
        """The manifest's ``encoder`` entry."""
        return self.manifest.encoder

    @property
    def folders(self) -> dict[str, FolderSpec]:
        """The manifest's ``output.folders`` (empty for outputs written before folders were
        recorded)."""
        return self.manifest.output.folders

    @property
    def float_columns(self) -> list[TensorColumn]:
        return [c for c in self.columns if not c.is_index]

    @property
    def index_columns(self) -> list[TensorColumn]:
        return [c for c in self.columns if c.is_index]

    @property
    def multi(self) -> bool:
        """Several data folders (declared, or holding data): the report gets per-folder parts."""
        return len(self.folders) > 1 or len({f.folder for f in self.files}) > 1

    @property
    def slot_of(self) -> dict[str, int]:
        """Data folder -> its resolution slot (folders the manifest does not name: 0)."""
        return self.manifest.slot_of

    @property
    def slots(self) -> int:
        """How many resolutions the run wrote."""
        return 1 + max(self.slot_of.values(), default=0)

    def error_rows(self) -> dict[str, int]:
        """Error rows by shard."""
        counts: dict[str, int] = {}
        for shard in self.errors.column("shard").to_pylist():
            counts[shard] = counts.get(shard, 0) + 1
        return counts

    def error_slots(self) -> dict[str, dict[int, int]]:
        """Error rows by shard, then the slot they stand for (-1: the whole sample)."""
        counts: dict[str, dict[int, int]] = {}
        for shard, slot in zip(
            self.errors.column("shard").to_pylist(), self.errors.column("slot").to_pylist(), strict=True
        ):
            by_slot = counts.setdefault(shard, {})
            by_slot[int(slot)] = by_slot.get(int(slot), 0) + 1
        return counts


def _load(output: str, options: QAOptions) -> _Loaded:
    """Reads the manifest, input list, commit markers and errors tables of ``output``."""
    layout = OutputLayout(output, storage_options=options.storage_options)
    manifest = read_manifest(layout)
    if manifest is None:
        raise LatentizeError(
            f"{layout.url} holds no latentize run (no _manifest.json); give the output root of `latentize encode`"
        )
    markers = run_markers(layout, manifest)
    # A run of several sizes lists its data folders only when it ends: look in the declared ones.
    names = sorted(set(manifest.output.data_folders) | set(manifest.output.folders))
    files, orphans, error_paths = list_files(layout, markers, names)
    loaded = _Loaded(
        layout=layout,
        manifest=manifest,
        columns=_columns(manifest.encoder),
        inputs=layout.read_inputs(),
        markers=markers,
        files=files,
        orphans=orphans,
        errors=_read_errors(layout, error_paths, manifest.slot_of),
    )
    logger.info(
        "qa: %s: %d committed shard(s), %d data file(s), %d error row(s)",
        layout.url,
        len(markers),
        len(files),
        loaded.errors.num_rows,
    )
    return loaded


def _columns(encoder: Mapping[str, Any]) -> list[TensorColumn]:
    constants = encoder.get("constants") or {}
    out = []
    for name, spec in (encoder.get("columns") or {}).items():
        dtype = str(spec["dtype"])
        is_index = np.issubdtype(np.dtype(dtype), np.integer)
        codes = int(constants["codebook_size"]) if is_index and "codebook_size" in constants else None
        if is_index and codes is None:
            raise LatentizeError(f"the manifest's integer column {name!r} has no codebook_size in encoder.constants")
        out.append(
            TensorColumn(name=name, shape=tuple(int(s) for s in spec["shape"]), dtype=dtype, codebook_size=codes)
        )
    if not out:
        raise LatentizeError("the manifest lists no stored columns (encoder.columns)")
    return out


def _read_errors(layout: OutputLayout, paths: dict[str, str], slot_of: Mapping[str, int]) -> pa.Table:
    """``key``, ``shard`` and ``slot`` of every error row (``slot``: -1 for the whole sample,
    else the resolution whose row failed; :func:`~latentize.sinks.contract.read_errors` gives
    it to tables written before they had the column)."""
    tables = []
    shard_of = {path: shard for shard, path in paths.items()}
    for path, data in layout.iter_contents(sorted(shard_of, key=shard_of.__getitem__)):
        tables.append(read_errors(data, shard=shard_of[path], slot_of=slot_of).select(["key", "shard", "slot"]))
    if not tables:
        return pa.table(
            {"key": pa.array([], pa.string()), "shard": pa.array([], pa.string()), "slot": pa.array([], pa.int32())}
        )
    return pa.concat_tables(tables)


# --------------------------------------------------------------------------- scan


@dataclass(frozen=True)
class _Scanned:
    """The passes over the data rows; all None when the output holds no data file.

    Attributes:
        state: pass 1 (statistics, rows per shard, the reconstruction sample's keys).
        findings: pass 2 (outliers, identical latents, repeated keys, the sample's arrays).
        reconstruction: the decoded and scored sample.
        text: the text pass (outputs with caption embeddings).
    """

    state: ScanState | None = None
    findings: Findings | None = None
    reconstruction: Reconstruction | None = None
    text: TextScan | None = None

    @property
    def data_rows(self) -> dict[str, int]:
        """Data rows by shard."""
        return dict(self.state.rows) if self.state else {}


def _scan(loaded: _Loaded, options: QAOptions) -> _Scanned:
    """Runs the two Ray Data passes over the data files, then decodes and scores the sample."""
    if not loaded.files:
        return _Scanned()
    import ray

    from latentize.qa import recon

    dashboard = options.dashboard
    if dashboard is None:
        dashboard = bool(loaded.manifest.setting("ray.dashboard", False))
    init_ray(address=options.ray_address, dashboard=dashboard)
    fmt = loaded.manifest.output.format
    ds = ray.data.read_datasource(
        DataFilesDatasource(layout=loaded.layout, files=loaded.files, fmt=fmt, columns=loaded.columns),
        override_num_blocks=max(1, len(loaded.files)),
    )
    state = _pass1(ds, loaded, options)
    findings = _pass2(ds, state, loaded, options)
    text = _text_pass(loaded)
    sample = list(dict.fromkeys((k, f, s) for k, f, s in state.sampled if (k, f) in findings.samples))
    reconstruction = recon.reconstruct(
        loaded.manifest,
        loaded.inputs,
        sample,
        {row: arrays for row, (_, arrays) in findings.samples.items()},
        requested=options.sample,
        seed=options.seed,
        decoder=options.decoder,
        device=options.device,
        input_storage_options=options.input_storage_options,
        by_folder=loaded.multi,
    )
    return _Scanned(state, findings, reconstruction, text)


def _pass1(ds: Any, loaded: _Loaded, options: QAOptions) -> ScanState:
    started = time.time()
    logger.info("qa: pass 1/2, statistics over %d data file(s)", len(loaded.files))
    state = scan_statistics(ds, columns=loaded.columns, sample=options.sample, seed=options.seed)
    logger.info("qa: pass 1/2 done in %.1f s (%d rows)", time.time() - started, sum(state.rows.values()))
    return state


def _text_pass(loaded: _Loaded) -> TextScan | None:
    """The caption embeddings' pass (None without them). It streams the files on the driver:
    its figures are a few numbers per column, and reading the text columns alone is cheap
    beside the latents' passes."""
    text = loaded.manifest.text
    if text is None:
        return None
    started = time.time()
    logger.info("qa: text pass over %d data file(s)", len(loaded.files))
    scan = scan_text(
        loaded.layout,
        loaded.files,
        fmt=loaded.manifest.output.format,
        text=text,
        tensors=[c.name for c in loaded.columns],
    )
    logger.info("qa: text pass done in %.1f s (%d rows)", time.time() - started, scan.rows)
    return scan


def _pass2(ds: Any, state: ScanState, loaded: _Loaded, options: QAOptions) -> Findings:
    mean: dict[str, list[float]] = {}
    std: dict[str, list[float]] = {}
    for c in loaded.float_columns:
        stats = state.stats[c.name]
        assert isinstance(stats, LatentStats)
        mean[c.name] = [float(v) if np.isfinite(v) else 0.0 for v in stats.mean]
        std[c.name] = [float(v) if np.isfinite(v) else 0.0 for v in stats.std]
    started = time.time()
    logger.info("qa: pass 2/2, outliers, identical latents and repeated keys")
    findings = find_rows(
        ds,
        loaded.errors,
        columns=loaded.columns,
        mean=mean,
        std=std,
        outlier_std=options.outlier_std,
        sampled=frozenset((k, f) for k, f, _ in state.sampled),
        partitions=min(512, 1 + sum(state.rows.values()) // ROWS_PER_PARTITION),
        slot_of=loaded.slot_of,
        slots=loaded.slots,
    )
    logger.info("qa: pass 2/2 done in %.1f s", time.time() - started)
    return findings


# --------------------------------------------------------------------------- checks


#: One part of the report: its sections (in report order) and its checks.
_Part = tuple[dict[str, Any], list[Check]]


def _assess(loaded: _Loaded, scanned: _Scanned, options: QAOptions) -> dict[str, Any]:
    """The report: its sections, the checks that apply to this output, and the verdict."""
    report = _header(loaded, options)
    checks: list[Check] = []
    for part in (_alignment, _values, _codebook, _reconstruction, _folders, _text):
        sections, found = part(loaded, scanned, options)
        report.update(sections)
        checks += found
    if options.strict:
        checks = [dataclasses.replace(c, status="fail", severity="error") if c.status == "warn" else c for c in checks]
    report["checks"] = [c.to_dict() for c in checks]
    report["passed"] = not any(c.status == "fail" for c in checks)
    return report


def _alignment(loaded: _Loaded, scanned: _Scanned, options: QAOptions) -> _Part:
    """Row counts and the alignment of data rows, error rows, markers and manifest."""
    data_rows = scanned.data_rows
    duplicate_keys = scanned.findings.duplicate_keys if scanned.findings else []
    folders = _folder_counts(loaded, scanned) if loaded.multi else None
    alignment = alignment_section(
        manifest=loaded.manifest,
        inputs=loaded.inputs,
        markers=loaded.markers,
        data_rows=data_rows,
        error_rows=loaded.error_rows(),
        orphans=loaded.orphans,
        duplicate_keys=duplicate_keys,
        folders=folders,
    )
    checks = [
        complete_check(loaded.inputs, loaded.markers),
        counts_check(alignment),
        keys_unique_check(duplicate_keys),
    ]
    if not loaded.files:
        checks.append(data_check())
    rows = {"data": sum(data_rows.values()), "errors": loaded.errors.num_rows, "shards": len(loaded.inputs)}
    if folders is not None:
        rows["samples"] = alignment["totals"]["data_samples"]
    return {"rows": rows, "alignment": alignment}, checks


def _folder_counts(loaded: _Loaded, scanned: _Scanned) -> FolderCounts:
    """Rows per folder and distinct samples per shard (pass 1's rows, pass 2's irregular keys)."""
    state, findings = scanned.state, scanned.findings
    irregular = findings.irregular if findings else {}
    return FolderCounts(
        rows=dict(state.folder_rows) if state else {},
        samples=distinct_samples(scanned.data_rows, irregular, slots=loaded.slots),
        errors=loaded.error_slots(),
        slot_of=loaded.slot_of,
        slots=loaded.slots,
        missing=findings.missing_keys if findings else {},
    )


def _values(loaded: _Loaded, scanned: _Scanned, options: QAOptions) -> _Part:
    """Statistics of the float columns, and what is wrong with their values: non-finite values,
    outliers, identical latents under different keys, the scale."""
    state, findings, floats = scanned.state, scanned.findings, loaded.float_columns
    sections: dict[str, Any] = {"statistics": _statistics(state, loaded) if state else {}}
    checks = []
    if state and floats:
        sections["nonfinite"] = _nonfinite(state, floats)
        checks.append(finite_check(sections["nonfinite"]))
    if findings and floats:
        sections["outliers"] = _outliers(findings, options.outlier_std)
        data_rows = sum(scanned.data_rows.values())
        checks.append(outliers_check(findings, data_rows=data_rows, outlier_std=options.outlier_std))
    if findings:
        sections["duplicates"] = _duplicates(findings)
        checks.append(duplicates_check(findings))
    sections["scale"] = {"applicable": False}
    if state and floats:
        sections["scale"], check = _scale(sections["statistics"], floats[0], loaded.encoder, options)
        checks.append(check)
    return sections, checks


def _codebook(loaded: _Loaded, scanned: _Scanned, options: QAOptions) -> _Part:
    """Codebook usage of the first VQ index column."""
    if not scanned.state or not loaded.index_columns:
        return {"codebook": None}, []
    usage = scanned.state.stats[loaded.index_columns[0].name]
    assert isinstance(usage, CodeUsage)
    return {"codebook": usage.to_dict()}, [codebook_range_check(usage), codebook_usage_check(usage)]


def _reconstruction(loaded: _Loaded, scanned: _Scanned, options: QAOptions) -> _Part:
    """The decoded sample against its source images."""
    recon = scanned.reconstruction
    if recon is None:
        return {"reconstruction": None}, []
    return {"reconstruction": recon.section}, [reconstruction_check(recon, min_psnr=options.min_psnr)]


def _text(loaded: _Loaded, scanned: _Scanned, options: QAOptions) -> _Part:
    """Caption embeddings: per-column statistics, non-finite values, token lengths, alignment."""
    text = loaded.manifest.text
    if text is None:
        return {"text": None}, []
    section = text_section(scanned.text, text, empty_prompt_section(loaded.layout, text))
    return {"text": section}, text_checks(section)


def _header(loaded: _Loaded, options: QAOptions) -> dict[str, Any]:
    encoder = loaded.encoder
    return {
        "format_version": 1,
        "output": loaded.layout.url,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "latentize_version": __version__,
        "options": {k: v for k, v in dataclasses.asdict(options).items() if "storage_options" not in k},
        "encoder": {
            "type": encoder.get("type"),
            "model": loaded.manifest.identity.get("model"),
            "preset": encoder.get("preset"),
            "model_class": encoder.get("model_class"),
            "input_range": encoder.get("input_range"),
            "constants": encoder.get("constants"),
            "columns": encoder.get("columns"),
        },
    }


def _statistics(state: ScanState, loaded: _Loaded) -> dict[str, Any]:
    """Per float column: stored and raw statistics, the normalisation and the histogram."""
    out: dict[str, Any] = {}
    totals = state.stats
    for c in loaded.float_columns:
        stats = totals[c.name]
        assert isinstance(stats, LatentStats)
        counts, edges = stats.histogram()
        out[c.name] = {
            **_column_statistics(stats, c, loaded.encoder, shape=_common_shape(loaded, c)),
            "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        }
    return out


def _column_statistics(
    stats: LatentStats, column: TensorColumn, encoder: dict[str, Any], *, shape: list[int] | None
) -> dict[str, Any]:
    """One float column's dtype, shape, stored and raw statistics and normalisation."""
    stored = stats.to_dict()
    norm = normalization_map(encoder, column.shape[0])
    raw = None
    if norm is not None and norm.applied:
        raw = affine_summary(stored, norm.scale, norm.offset)
    elif norm is not None:
        raw = stored  # raw moments are stored as they are
    return {
        "dtype": column.dtype,
        "shape": shape,
        "stored": stored,
        "raw": raw,
        "normalization": None if norm is None else {"form": norm.form, "applied": norm.applied},
    }


def _common_shape(loaded: _Loaded, column: TensorColumn) -> list[int] | None:
    """The column's per-row shape over the whole output; None when its folders differ."""
    shapes = {spec.columns[column.name].shape for spec in loaded.folders.values() if column.name in spec.columns}
    if len(shapes) > 1:
        return None
    return list(shapes.pop()) if shapes else list(column.shape)


def _nonfinite(state: ScanState, columns: list[TensorColumn]) -> dict[str, Any]:
    """Rows with NaN/inf (the most over the float columns), values per column, the first keys."""
    rows = 0
    truncated = False
    keys: list[str] = []
    values: dict[str, int] = {}
    for c in columns:
        stats = state.stats[c.name]
        assert isinstance(stats, LatentStats)
        rows = max(rows, stats.nonfinite_rows)
        keys = sorted(set(keys) | set(stats.nonfinite_keys))[:KEY_LIMIT]
        truncated = truncated or stats.nonfinite_keys_truncated
        values[c.name] = int(np.sum(stats.nonfinite))
    return {"rows": rows, "values": values, "keys": keys, "truncated": bool(truncated)}


def _outliers(findings: Findings, outlier_std: float) -> dict[str, Any]:
    return {
        "threshold_std": outlier_std,
        "rows": findings.outlier_rows,
        "values": findings.outlier_values,
        "worst": findings.worst,
        "truncated": findings.outlier_rows > len(findings.worst),
    }


def _duplicates(findings: Findings) -> dict[str, Any]:
    groups = findings.duplicate_latents
    return {
        "groups": len(groups),
        "rows": findings.duplicate_rows,
        "examples": [{"keys": [k for k, _ in g][:20], "shards": sorted({s for _, s in g})} for g in groups[:KEY_LIMIT]],
        "truncated": len(groups) > KEY_LIMIT,
    }


def _scale(
    statistics: dict[str, Any], column: TensorColumn, encoder: dict[str, Any], options: QAOptions
) -> tuple[dict[str, Any], Check]:
    """The scale section and check of ``column`` (the first float column: ``latent``, or
    ``mean`` of moments)."""
    section, check = scale_check(
        statistics[column.name]["stored"],
        normalization_map(encoder, column.shape[0]),
        encoder,
        tolerance=options.scale_tolerance,
        shift_tolerance=options.shift_tolerance,
    )
    section["column"] = column.name
    return section, check


def _folders(loaded: _Loaded, scanned: _Scanned, options: QAOptions) -> _Part:
    """Per data folder of an output of several: its rows, statistics, scale verdict and
    reconstruction scores (nothing for an output of one folder)."""
    if not loaded.multi:
        return {}, []
    state = scanned.state
    stats = state.folders if state else {}
    recon = (scanned.reconstruction.section.get("folders") or {}) if scanned.reconstruction else {}
    names = sorted(set(loaded.folders) | set(stats))
    out = {}
    for name in names:
        spec = loaded.folders.get(name)
        entry: dict[str, Any] = {
            "size": spec.to_json()["size"] if spec else None,
            "resolution": spec.to_json()["resolution"] if spec else None,
            "slot": loaded.slot_of.get(name, 0),
            "rows": sum(by_folder.get(name, 0) for by_folder in (state.folder_rows.values() if state else [])),
            "marker_rows": sum((m.rows or {}).get(name, 0) for m in loaded.markers.values()),
            "columns": spec.to_json()["columns"] if spec else None,
        }
        entry.update(_folder_values(stats.get(name), spec, loaded, options))
        found = recon.get(name)
        entry["reconstruction"] = None
        if found and found.get("metrics"):
            metrics = found["metrics"]
            entry["reconstruction"] = {
                "sample": found["sample"],
                "psnr": metrics["psnr"]["mean"],
                "ssim": metrics["ssim"]["mean"],
            }
        out[name] = entry
    return {"folders": out}, []


def _folder_values(
    stats: dict[str, LatentStats | CodeUsage] | None, spec: FolderSpec | None, loaded: _Loaded, options: QAOptions
) -> dict[str, Any]:
    """A folder's statistics (stored and raw, no histograms), codebook usage and scale verdict."""
    out: dict[str, Any] = {"statistics": {}, "codebook": None, "scale": None}
    if not stats:
        return out
    shapes = spec.columns if spec else {}
    for c in loaded.float_columns:
        column = stats[c.name]
        assert isinstance(column, LatentStats)
        shape = list(shapes[c.name].shape) if c.name in shapes else None
        out["statistics"][c.name] = _column_statistics(column, c, loaded.encoder, shape=shape)
    if loaded.index_columns:
        usage = stats[loaded.index_columns[0].name]
        assert isinstance(usage, CodeUsage)
        out["codebook"] = {
            "used": usage.used,
            "usage": usage.usage,
            "perplexity": usage.perplexity,
            "out_of_range": usage.out_of_range,
        }
    if loaded.float_columns:
        first = loaded.float_columns[0]
        section, check = _scale(out["statistics"], first, loaded.encoder, options)
        out["scale"] = {
            "column": first.name,
            "status": check.status,
            "normalized_mean": section["normalized_mean"],
            "normalized_std": section["normalized_std"],
            "message": check.message,
        }
    return out


# --------------------------------------------------------------------------- write


def _write(report: dict[str, Any], scanned: _Scanned, layout: OutputLayout, options: QAOptions) -> QAResult:
    """Writes report.json and report.html to ``options.report`` (default: ``OUT/_qa``)."""
    from latentize.qa.report import json_ready, write_report

    if options.report:
        import fsspec

        fs, directory = fsspec.core.url_to_fs(options.report, **options.storage_options)
    else:
        fs, directory = layout.fs, layout.join(REPORT_FOLDER)
    report = json_ready(report)
    images = scanned.reconstruction.images if scanned.reconstruction else {}
    json_path, html_path = write_report(report, fs=fs, directory=directory, images=images)
    return QAResult(report=report, html_path=html_path, json_path=json_path)
