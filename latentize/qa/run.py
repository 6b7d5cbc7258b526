"""``latentize qa OUT``: the whole QA report of one output root.

Reads the manifest, the input list, the commit markers and the errors tables on the driver;
runs the two Ray Data passes of :mod:`latentize.qa.scan` over the data files; decodes a seeded
sample of stored latents and scores them against their source images; writes ``report.json``
and a self-contained ``report.html``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from latentize import __version__
from latentize.config import config_from_dict
from latentize.errors import LatentizeError
from latentize.qa.checks import Check, alignment_check, normalization_map, scale_check
from latentize.qa.scan import (
    DataFilesDatasource,
    Findings,
    ScanState,
    TensorColumn,
    find_rows,
    list_files,
    scan_statistics,
)
from latentize.qa.stats import CodeUsage, LatentStats, affine_summary
from latentize.sinks import OutputLayout

__all__ = ["QAOptions", "QAResult", "run_qa"]

logger = logging.getLogger(__name__)

#: Name of the report folder inside the output root (``_`` keeps data readers away from it).
REPORT_FOLDER = "_qa"
#: Rows per partition of pass 2's shuffle (its rows are a key, a digest and a few numbers).
ROWS_PER_PARTITION = 1_000_000
#: Keys listed per finding in the report.
KEY_LIMIT = 100


@dataclass(frozen=True, kw_only=True)
class QAOptions:
    """What ``latentize qa`` checks, and against which tolerances.

    Attributes:
        sample: latents decoded for the reconstruction check (0: none).
        seed: seed of the reconstruction sample (the same seed picks the same keys).
        outlier_std: values farther than this many standard deviations from their channel's
            mean are outliers.
        scale_tolerance: allowed relative deviation of the normalised latents' std from 1.
        shift_tolerance: allowed |mean| of the normalised latents.
        min_psnr: the reconstruction check fails below this mean PSNR (dB).
        decoder: where the decoder weights are, when not beside the encoder's.
        report: folder (local or fsspec URL) for report.html / report.json; None: OUT/_qa.
        storage_options: fsspec options of the output root (and of ``report``).
        input_storage_options: fsspec options of the input shards (the manifest keeps none).
        device: torch device of the decoder (None: CUDA when present).
        strict: warnings fail the report too.
        ray_address: Ray cluster address (None: ``RAY_ADDRESS`` or a local Ray).
    """

    sample: int = 16
    seed: int = 0
    outlier_std: float = 6.0
    scale_tolerance: float = 0.35
    shift_tolerance: float = 0.5
    min_psnr: float = 18.0
    decoder: str | None = None
    report: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    input_storage_options: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    strict: bool = False
    ray_address: str | None = None


@dataclass
class QAResult:
    """The report and where it was written. ``passed``: no check failed."""

    report: dict[str, Any]
    html_path: str
    json_path: str

    @property
    def passed(self) -> bool:
        return bool(self.report["passed"])

    @property
    def failed_checks(self) -> list[dict[str, Any]]:
        return [c for c in self.report["checks"] if c["status"] == "fail"]


def _columns(encoder: dict[str, Any]) -> list[TensorColumn]:
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


def _unredacted(options: Any) -> Any:
    """``options`` without the values :func:`latentize.config.redact` replaced."""
    if isinstance(options, dict):
        return {k: _unredacted(v) for k, v in options.items() if v != "***"}
    return options


def _init_ray(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address)


def _read_errors(layout: OutputLayout, paths: dict[str, str]) -> pa.Table:
    tables = []
    for shard, path in sorted(paths.items()):
        table = pq.read_table(pa.BufferReader(layout.read_bytes(path)), columns=["key"])
        tables.append(table.append_column("shard", pa.array([shard] * table.num_rows, pa.string())))
    if not tables:
        return pa.table({"key": pa.array([], pa.string()), "shard": pa.array([], pa.string())})
    return pa.concat_tables(tables)


def _statistics(state: ScanState, columns: list[TensorColumn], encoder: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in columns:
        stats = state.stats[c.name]
        if not isinstance(stats, LatentStats):
            continue
        stored = stats.to_dict()
        norm = normalization_map(encoder, c.shape[0])
        raw = None
        if norm is not None and norm.applied:
            raw = affine_summary(stored, norm.scale, norm.offset)
        elif norm is not None:
            raw = stored  # raw moments are stored as they are
        counts, edges = stats.histogram()
        out[c.name] = {
            "dtype": c.dtype,
            "shape": list(c.shape),
            "stored": stored,
            "raw": raw,
            "normalization": None if norm is None else {"form": norm.form, "applied": norm.applied},
            "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        }
    return out


def _scan(
    layout: OutputLayout,
    manifest: dict[str, Any],
    options: QAOptions,
    columns: list[TensorColumn],
    files: list[Any],
    errors: pa.Table,
) -> tuple[ScanState, Findings | None]:
    import ray

    fmt = str((manifest.get("output") or {}).get("format") or "parquet")
    ds = ray.data.read_datasource(
        DataFilesDatasource(layout=layout, files=files, fmt=fmt, columns=columns),
        override_num_blocks=max(1, len(files)),
    )
    started = time.time()
    logger.info("qa: pass 1/2, statistics over %d data file(s)", len(files))
    state = scan_statistics(ds, columns=columns, sample=options.sample, seed=options.seed)
    logger.info("qa: pass 1/2 done in %.1f s (%d rows)", time.time() - started, sum(state.rows.values()))
    mean: dict[str, list[float]] = {}
    std: dict[str, list[float]] = {}
    for c in columns:
        stats = state.stats[c.name]
        if isinstance(stats, LatentStats):
            mean[c.name] = [float(v) if np.isfinite(v) else 0.0 for v in stats.mean]
            std[c.name] = [float(v) if np.isfinite(v) else 0.0 for v in stats.std]
    started = time.time()
    logger.info("qa: pass 2/2, outliers, identical latents and repeated keys")
    findings = find_rows(
        ds,
        errors,
        columns=columns,
        mean=mean,
        std=std,
        outlier_std=options.outlier_std,
        sampled=frozenset(k for k, _ in state.sampled),
        partitions=min(512, 1 + sum(state.rows.values()) // ROWS_PER_PARTITION),
    )
    logger.info("qa: pass 2/2 done in %.1f s", time.time() - started)
    return state, findings


def _fetch_in_parallel(
    *, shards: dict[str, str], wanted: dict[str, list[str]], **kwargs: Any
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """:func:`latentize.qa.recon.fetch_sources`, one Ray task per shard: a random sample of a
    large dataset touches about as many shards as it has keys, each read up to its keys."""
    import ray

    from latentize.qa.recon import fetch_sources

    fetch = ray.remote(num_cpus=1, max_retries=2)(fetch_sources)
    refs = [
        fetch.remote(shards={shard: shards[shard]} if shard in shards else {}, wanted={shard: keys}, **kwargs)
        for shard, keys in wanted.items()
    ]
    pixels: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}
    for done, ref in enumerate(refs, 1):
        got, missing = ray.get(ref)
        pixels.update(got)
        failed.update(missing)
        logger.info("qa: source images: %d of %d shard(s) read", done, len(refs))
    return pixels, failed


def _reconstruction(
    manifest: dict[str, Any],
    inputs: list[tuple[str, str]],
    state: ScanState,
    findings: Findings,
    columns: list[TensorColumn],
    options: QAOptions,
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]], Check]:
    """Decodes the sampled latents and scores them against their preprocessed sources."""
    from latentize.qa import recon
    from latentize.sources import infer_format

    section: dict[str, Any] = {
        "sample": 0,
        "seed": options.seed,
        "decoder": None,
        "metrics": None,
        "samples": [],
        "failed": {},
        "skipped": None,
    }
    order = [(k, s) for k, s in state.sampled if k in findings.samples]
    if options.sample <= 0 or not order:
        why = "--sample 0" if options.sample <= 0 else "no data rows"
        section["skipped"] = why
        return section, {}, Check.skipped("reconstruction", f"not run: {why}")
    try:
        decoder = recon.load_decoder(manifest, decoder=options.decoder, device=options.device)
    except LatentizeError as exc:
        section["skipped"] = str(exc)
        return section, {}, Check.skipped("reconstruction", f"no decoder: {exc}", severity="warning")
    section["decoder"] = decoder.description
    cfg = config_from_dict(manifest["config"])
    # The manifest's copy has its credentials redacted: keep its other settings (endpoint,
    # region), and let the caller's options fill in the rest.
    input_options = {**_unredacted(cfg.input.storage_options), **options.input_storage_options}
    input_cfg = dataclasses.replace(cfg.input, storage_options=input_options)
    urls = dict((shard, url) for url, shard in inputs)
    wanted: dict[str, list[str]] = {}
    for key, shard in order:
        wanted.setdefault(shard, []).append(key)
    fmt = cfg.input.format or infer_format([u for u, _ in inputs])
    logger.info("qa: reconstruction of %d sampled latents (%s)", len(order), decoder.description)
    pixels, failed = _fetch_in_parallel(
        shards=urls, wanted=wanted, fmt=fmt, input_config=input_cfg, preprocess_config=cfg.preprocess
    )
    section["failed"] = dict(failed)
    keys = [k for k, _ in order if k in pixels]
    if not keys:
        section["skipped"] = "no source image of the sample could be fetched"
        return (
            section,
            {},
            Check.judge(
                "reconstruction",
                False,
                "no source image of the sampled keys could be fetched "
                f"({len(failed)} failed; e.g. {next(iter(failed.values()), '')}); "
                "pass --input-storage-options for private buckets, or --sample 0 to skip",
            ),
        )
    arrays = {c.name: np.stack([findings.samples[k][1][c.name] for k in keys]) for c in columns}
    decoded = decoder.decode(arrays)
    originals = np.stack([pixels[k] for k in keys]).astype(np.float32) / 255.0
    psnr = recon.psnr(decoded, originals)
    ssim = recon.ssim(decoded, originals)
    lpips = recon.lpips_distance(decoded, originals)
    shard_of = dict(order)
    samples = []
    for i, key in enumerate(keys):
        samples.append(
            {
                "key": key,
                "shard": shard_of[key],
                "psnr": float(psnr[i]),
                "ssim": float(ssim[i]),
                "lpips": None if lpips is None else float(lpips[i]),
            }
        )
    # Worst first; identical images (infinite PSNR) last. json_ready writes inf as null.
    samples.sort(key=lambda s: (s["psnr"], s["key"]))

    def summary(values: np.ndarray | None) -> dict[str, float] | None:
        if values is None:
            return None
        finite = np.where(np.isfinite(values), values, 100.0)  # identical images: cap inf PSNR
        return {
            "mean": float(finite.mean()),
            "median": float(np.median(finite)),
            "min": float(finite.min()),
            "max": float(finite.max()),
        }

    section.update(
        {
            "sample": len(keys),
            "metrics": {"psnr": summary(psnr), "ssim": summary(ssim), "lpips": summary(lpips)},
            "samples": samples,
        }
    )
    images = {
        key: (pixels[key], np.clip(np.rint(decoded[i] * 255.0), 0, 255).astype(np.uint8)) for i, key in enumerate(keys)
    }
    mean_psnr = section["metrics"]["psnr"]["mean"]
    check = Check.judge(
        "reconstruction",
        mean_psnr >= options.min_psnr,
        f"mean PSNR {mean_psnr:.2f} dB, SSIM {section['metrics']['ssim']['mean']:.3f} over {len(keys)} sampled latents "
        f"decoded by the model's decoder (threshold {options.min_psnr:g} dB; worst {samples[0]['key']}: "
        f"{samples[0]['psnr']:.2f} dB)",
    )
    return section, images, check


def run_qa(output: str, *, options: QAOptions | None = None) -> QAResult:
    """Builds and writes the QA report of the output root ``output``.

    Raises:
        LatentizeError: ``output`` holds no latentize run, or the report cannot be written.
    """
    from latentize.qa.report import json_ready, write_report

    options = options or QAOptions()
    started = time.time()
    layout = OutputLayout(output, storage_options=options.storage_options)
    manifest = layout.read_manifest()
    if manifest is None:
        raise LatentizeError(
            f"{layout.url} holds no latentize run (no _manifest.json); give the output root of `latentize encode`"
        )
    encoder = manifest.get("encoder") or {}
    columns = _columns(encoder)
    inputs = layout.read_inputs()
    fp = manifest.get("fingerprint")
    markers = {s: m for s, m in layout.read_markers().items() if m.get("fingerprint") == fp}
    out_cfg = manifest.get("output") or {}
    files, orphans, error_paths = list_files(layout, markers, list(out_cfg.get("data_folders") or []))
    errors = _read_errors(layout, error_paths)
    error_rows: dict[str, int] = {}
    for shard in errors.column("shard").to_pylist():
        error_rows[shard] = error_rows.get(shard, 0) + 1
    logger.info(
        "qa: %s: %d committed shard(s), %d data file(s), %d error row(s)",
        layout.url,
        len(markers),
        len(files),
        errors.num_rows,
    )

    checks: list[Check] = []
    report: dict[str, Any] = {
        "format_version": 1,
        "output": layout.url,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "latentize_version": __version__,
        "options": {k: v for k, v in dataclasses.asdict(options).items() if "storage_options" not in k},
        "encoder": {
            "type": encoder.get("type"),
            "model": (encoder.get("identity") or {}).get("model"),
            "preset": encoder.get("preset"),
            "model_class": encoder.get("model_class"),
            "input_range": encoder.get("input_range"),
            "constants": encoder.get("constants"),
            "columns": encoder.get("columns"),
        },
    }
    state: ScanState | None = None
    findings: Findings | None = None
    if files:
        _init_ray(options.ray_address)
        state, findings = _scan(layout, manifest, options, columns, files, errors)

    data_rows = dict(state.rows) if state else {}
    report["rows"] = {"data": sum(data_rows.values()), "errors": errors.num_rows, "shards": len(inputs)}
    alignment, align_checks = alignment_check(
        manifest=manifest,
        inputs=inputs,
        markers=markers,
        data_rows=data_rows,
        error_rows=error_rows,
        orphans=orphans,
        duplicate_keys=findings.duplicate_keys if findings else [],
    )
    report["alignment"] = alignment
    checks += align_checks
    if not files:
        checks.append(Check.judge("data", False, "the output holds no committed data rows"))

    report["statistics"] = _statistics(state, columns, encoder) if state else {}
    float_columns = [c for c in columns if not c.is_index]
    index_columns = [c for c in columns if c.is_index]

    # Non-finite values.
    if state and float_columns:
        rows = keys_truncated = 0
        keys: list[str] = []
        for c in float_columns:
            stats = state.stats[c.name]
            assert isinstance(stats, LatentStats)
            rows = max(rows, stats.nonfinite_rows)
            keys = sorted(set(keys) | set(stats.nonfinite_keys))[:KEY_LIMIT]
            keys_truncated = keys_truncated or stats.nonfinite_keys_truncated
        values = {c.name: int(np.sum(state.stats[c.name].nonfinite)) for c in float_columns}  # type: ignore[union-attr]
        report["nonfinite"] = {"rows": rows, "values": values, "keys": keys, "truncated": bool(keys_truncated)}
        checks.append(
            Check.judge(
                "finite",
                rows == 0,
                "every stored value is finite"
                if rows == 0
                else f"{rows} row(s) hold NaN or Inf values ({sum(values.values())} values): {', '.join(keys[:5])}",
            )
        )

    # Outliers.
    if findings is not None and float_columns:
        report["outliers"] = {
            "threshold_std": options.outlier_std,
            "rows": findings.outlier_rows,
            "values": findings.outlier_values,
            "worst": findings.worst,
            "truncated": findings.outlier_rows > len(findings.worst),
        }
        n = report["rows"]["data"]
        checks.append(
            Check.judge(
                "outliers",
                findings.outlier_rows == 0,
                f"no value beyond {options.outlier_std:g} std of its channel"
                if findings.outlier_rows == 0
                else f"{findings.outlier_rows} of {n} row(s) hold {findings.outlier_values} value(s) "
                f"beyond {options.outlier_std:g} std "
                f"of their channel; most extreme: {findings.worst[0]['key']} ({findings.worst[0]['z']:.1f} std)",
                severity="warning",
            )
        )

    # Identical latents under different keys.
    if findings is not None:
        groups = findings.duplicate_latents
        report["duplicates"] = {
            "groups": len(groups),
            "rows": findings.duplicate_rows,
            "examples": [
                {"keys": [k for k, _ in g][:20], "shards": sorted({s for _, s in g})} for g in groups[:KEY_LIMIT]
            ],
            "truncated": len(groups) > KEY_LIMIT,
        }
        checks.append(
            Check.judge(
                "duplicates",
                not groups,
                "no two keys share identical latents"
                if not groups
                else f"{len(groups)} group(s) of keys share identical latents ({findings.duplicate_rows} rows), e.g. "
                + "; ".join(" = ".join(k for k, _ in g[:3]) for g in groups[:3])
                + " (duplicate source images, or latents written under the wrong keys)",
                severity="warning",
            )
        )

    # Scale check (the first float column: `latent`, or `mean` of moments).
    scale_section = None
    if state and float_columns:
        c = float_columns[0]
        stats_c = report["statistics"][c.name]
        norm = normalization_map(encoder, c.shape[0])
        scale_section, check = scale_check(
            stats_c["stored"], norm, encoder, tolerance=options.scale_tolerance, shift_tolerance=options.shift_tolerance
        )
        scale_section["column"] = c.name
        checks.append(check)
    report["scale"] = scale_section or {"applicable": False}

    # Codebook usage.
    report["codebook"] = None
    if state and index_columns:
        usage = state.stats[index_columns[0].name]
        assert isinstance(usage, CodeUsage)
        report["codebook"] = usage.to_dict()
        checks.append(
            Check.judge(
                "codebook_range",
                usage.out_of_range == 0,
                f"all indices lie in the codebook of {usage.counts.size}"
                if usage.out_of_range == 0
                else f"{usage.out_of_range} indices lie outside the codebook of {usage.counts.size}",
            )
        )
        checks.append(
            Check.judge(
                "codebook_usage",
                usage.used > 1,
                f"{usage.used} of {usage.counts.size} codes used ({usage.usage:.1%}), "
                f"perplexity {usage.perplexity:.1f}",
                severity="warning",
            )
        )

    # Reconstruction.
    images: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if state and findings:
        recon_section, images, check = _reconstruction(manifest, inputs, state, findings, columns, options)
        report["reconstruction"] = recon_section
        checks.append(check)
    else:
        report["reconstruction"] = None

    if options.strict:
        checks = [dataclasses.replace(c, status="fail", severity="error") if c.status == "warn" else c for c in checks]
    report["checks"] = [c.to_dict() for c in checks]
    report["passed"] = not any(c.status == "fail" for c in checks)
    report["seconds"] = round(time.time() - started, 2)

    if options.report:
        import fsspec

        fs, directory = fsspec.core.url_to_fs(options.report, **options.storage_options)
    else:
        fs, directory = layout.fs, layout.join(REPORT_FOLDER)
    report = json_ready(report)
    paths = write_report(report, fs=fs, directory=directory, images=images)
    html_path = next(p for p in paths if p.endswith(".html"))
    json_path = next(p for p in paths if p.endswith(".json"))
    logger.info(
        "qa: %s in %.1f s; report: %s", "PASS" if report["passed"] else "FAIL", time.time() - started, html_path
    )
    return QAResult(report=report, html_path=html_path, json_path=json_path)
