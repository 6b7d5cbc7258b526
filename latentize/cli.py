"""The ``latentize`` command line (and ``jobs/encode_laion.py``, which calls :func:`encode_main`).

``latentize encode [CONFIG] [--set dotted.key=value ...]`` runs the encode job; without CONFIG it
runs the embedded demo: sample shards built from the photos shipped in scikit-image and
scikit-learn, encoded with the TAEF2 weights that ship with latentize (no download), local Ray,
local folders, then the QA report of the latents.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from latentize.config import Config, load_config
from latentize.errors import LatentizeError

__all__ = ["DEMO_CONFIG", "encode_main", "main", "qa_main"]

logger = logging.getLogger("latentize")

#: Root of the demo's files (shards in, latents out), relative to the working directory.
DEMO_DIR = "demo_data"

#: The embedded default run (``latentize encode`` with no config file): TAEF2, whose weights ship
#: inside latentize, so the demo runs offline. ``--set encoder.preset=sd15`` switches it to the
#: Stable Diffusion VAE (from the hub).
DEMO_CONFIG: dict[str, Any] = {
    "input": {"urls": f"{DEMO_DIR}/shards/{{00000..00001}}.tar", "format": "webdataset", "image_field": "jpg;png;webp"},
    "preprocess": {"resolution": 256, "crop": "center"},
    "encoder": {"preset": "taef2", "batch_size": 4},
    "output": {"path": f"{DEMO_DIR}/latents", "format": "parquet", "dtype": "float16"},
    "ray": {"actors": 1},
}


# Help texts, written for users: argparse prints them as they are (no docstring markup).
_MAIN_DESCRIPTION = (
    "Turn image datasets into autoencoder latents on Ray, follow a run, and check its output. "
    "'latentize COMMAND --help' describes each command."
)
_ENCODE_DESCRIPTION = (
    "Encode image shards (WebDataset tars or Parquet files) into scaled VAE latents or VQ codebook "
    "indices on Ray, and write them to Parquet or WebDataset with a manifest. A rerun with the same "
    "config resumes where the last one stopped. Without a config file it runs the demo: sample "
    "shards of real photos encoded with the TAEF2 weights that ship with latentize, a local Ray, "
    "local folders, then the QA report of the latents. Exit code 0 when every shard is written "
    "(and, in the demo, every QA check passed), 1 when some could not be read, 2 on a "
    "configuration or access error."
)
_MODELS_DESCRIPTION = (
    "List the encoder presets (the values of encoder.preset): the weights each one loads, its "
    "encoder type, latent channels, downsampling factor, scaling and shift constants, input range "
    "and whether it is deterministic; then the text presets (the values of text.preset): the "
    "pipeline whose encode_prompt each reproduces, its text encoders, default sequence length, "
    "whether its denoiser masks padding, the storage it allows and the per-sample output shapes "
    "of the released models. --text lists only the text presets (with --json, as JSON)."
)
_PLAN_DESCRIPTION = (
    "Dry run: say what 'latentize encode CONFIG' would do, writing nothing and starting no Ray. "
    "Prints the shards (all and still to encode), the samples (from img2dataset's _stats.json, "
    "Parquet metadata, or reading a few shards), the input bytes, the estimated output bytes per "
    "data folder, the CPU decode time per image measured on a few sampled shards with the "
    "configured preprocessing, the GPU-hours where a throughput was measured for the encoder on "
    "that GPU, and the ray.actors and encoder.batch_size the run would use (on this machine's GPUs, "
    "or on --gpus N). Exit code 0, or 2 when the run "
    "could not start (the message says what to fix)."
)
_STATUS_DESCRIPTION = (
    "Show how far a run got: the shards of an output that are committed, failed or pending, and "
    "why shards failed. Exit code 0 when the output is complete, 1 otherwise."
)
_QA_DESCRIPTION = (
    "Write a QA report of a latent dataset (report.html and report.json): statistics per latent "
    "channel, a check of the scaling and shift constants, alignment of the rows with the commit "
    "markers, codebook usage of VQ indices, and decoded samples compared with their source "
    "images. Exit code 0 when every check passes, 1 when one fails, 2 when the report could not "
    "be made."
)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _add_encode_args(parser: argparse.ArgumentParser, *, config_flag: bool) -> None:
    if config_flag:
        parser.add_argument("--config", help="YAML config file; omitted: the embedded demo")
    else:
        parser.add_argument("config", nargs="?", help="YAML config file; omitted: the embedded demo")
    _add_set_arg(parser, "encoder.batch_size=64")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run made with another config")
    parser.add_argument("--retry-failed", action="store_true", help="redo shards whose reading failed")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _prepare_demo(cfg: Config) -> None:
    """Builds the demo shards when the run reads the demo's default input."""
    from latentize.demo import build_demo_shards
    from latentize.encoders import ENCODERS

    if cfg.encoder.type is None:  # load_config fills it in from the preset or the default
        raise LatentizeError("encoder.type is unresolved; load the config with load_config")
    # Check the model before writing anything, so an unreachable hub stops the demo at once.
    ENCODERS.get(cfg.encoder.type).inspect(cfg)
    if cfg.input.urls == DEMO_CONFIG["input"]["urls"]:
        urls = build_demo_shards(os.path.join(DEMO_DIR, "shards"), shards=2)
        logger.info("demo: %d sample shards of real photos in %s", len(urls), os.path.join(DEMO_DIR, "shards"))


def _demo_config(overrides: list[str]) -> Config:
    """The demo's config with ``overrides``; unless ``output.path`` is overridden, the latents go
    to ``demo_data/latents/<preset>``, so that demos of different encoders sit side by side
    instead of refusing each other's output."""
    cfg = load_config(None, overrides, base=DEMO_CONFIG)
    if cfg.output.path == DEMO_CONFIG["output"]["path"]:
        cfg.output.path = f"{DEMO_DIR}/latents/{cfg.encoder.preset or 'custom'}"
    return cfg


def _demo_qa(output: str) -> int:
    """The demo's last step: the QA report of its latents; prints the verdict and the mean
    reconstruction PSNR. Exit code 0 when every check passed."""
    from latentize.qa import run_qa as build_report

    result = build_report(output)
    _print_qa(result)
    recon = result.report.get("reconstruction") or {}
    psnr = ((recon.get("metrics") or {}).get("psnr") or {}).get("mean")
    if psnr is None:
        print(f"latentize demo: no reconstruction ({recon.get('skipped', 'no decoder')})")
    else:
        print(f"latentize demo: mean reconstruction PSNR {psnr:.2f} dB over {recon['sample']} decoded samples")
    return 0 if result.passed else 1


def run_encode(args: argparse.Namespace) -> int:
    from latentize.pipeline import run

    demo = args.config is None
    cfg = _demo_config(args.overrides) if demo else load_config(args.config, args.overrides)
    if demo:
        _prepare_demo(cfg)
    summary = run(cfg, overwrite=args.overwrite, retry_failed=args.retry_failed)
    if summary.nothing_to_do:
        print(f"latentize: nothing to do, all {summary.shards_total} shards already committed; wrote nothing")
    else:
        print(_run_line(summary))
        if summary.encoding_seconds and summary.encoder_start_seconds is not None:
            print(
                f"latentize: encoder start-up {summary.encoder_start_seconds:.1f} s; then "
                f"{summary.samples_ok_now / summary.encoding_seconds:.2f} img/s while encoding"
            )
    print(f"latentize: output holds {summary.samples_ok} samples ok, {summary.samples_failed} failed")
    if summary.shards_failed:
        print(
            f"latentize: {summary.shards_failed} shard(s) could not be read to the end; "
            f"`latentize status {summary.output}` lists them; rerun with --retry-failed"
        )
    print(f"latentize: latents in {summary.output}")
    if demo and summary.complete:
        return _demo_qa(summary.output)
    return 0 if summary.complete else 1


def _run_line(summary: Any) -> str:
    """What this run did: samples read, encoded and failed (by stage; read errors, such as
    failed downloads, were never encoded), shards, seconds and images encoded per second."""
    failed = ""
    if summary.samples_failed_now:
        stages = ", ".join(f"{n} {stage}" for stage, n in summary.failed_now_by_stage.items())
        failed = f", {summary.samples_failed_now} failed ({stages})"
    return (
        f"latentize: this run read {summary.samples_now} samples from {summary.shards_done_now} shard(s): "
        f"{summary.samples_ok_now} encoded{failed}, in {summary.seconds:.1f} s "
        f"({summary.images_per_second:.2f} img/s)"
    )


def encode_main(argv: Sequence[str] | None = None, *, prog: str = "encode_laion.py") -> int:
    """Entry point of ``jobs/encode_laion.py`` (``--config CFG`` form)."""
    parser = argparse.ArgumentParser(prog=prog, description=_ENCODE_DESCRIPTION)
    _add_encode_args(parser, config_flag=True)
    args = parser.parse_args(argv)
    return _guarded(run_encode, args)


def _guarded(fn: Any, args: argparse.Namespace) -> int:
    _setup_logging(getattr(args, "verbose", False))
    try:
        return fn(args)
    except LatentizeError as exc:
        print(f"latentize: error: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``latentize`` console script."""
    parser = argparse.ArgumentParser(prog="latentize", description=_MAIN_DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser(
        "encode", help="encode image shards into latents (no config: the demo)", description=_ENCODE_DESCRIPTION
    )
    _add_encode_args(enc, config_flag=False)
    enc.set_defaults(fn=run_encode)
    models = sub.add_parser(
        "models",
        help="list the encoder presets (encoder.preset) and the text presets (text.preset)",
        description=_MODELS_DESCRIPTION,
    )
    models.add_argument("--json", action="store_true", help="machine-readable output")
    models.add_argument("--text", action="store_true", help="only the text presets (text.preset)")
    models.set_defaults(fn=run_models)
    pl = sub.add_parser(
        "plan",
        help="dry run: shards, samples, bytes, decode time and GPU-hours of a config; writes nothing",
        description=_PLAN_DESCRIPTION,
    )
    _add_plan_args(pl)
    st = sub.add_parser(
        "status",
        help="show the shards of an output that are committed, failed or pending",
        description=_STATUS_DESCRIPTION,
    )
    st.add_argument("output", help="output root (local path or fsspec URL)")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument(
        "--storage-options", default="{}", metavar="YAML", help="fsspec options for the output, e.g. '{anon: true}'"
    )
    st.set_defaults(fn=run_status)
    qa = sub.add_parser(
        "qa",
        help="write a QA report of a latent dataset (statistics, scale check, alignment, reconstructions)",
        description=_QA_DESCRIPTION,
    )
    _add_qa_args(qa)
    args = parser.parse_args(argv)
    return _guarded(args.fn, args)


def run_models(args: argparse.Namespace) -> int:
    """``latentize models``: every preset with its weights, class, range, constants, geometry."""
    import json

    from latentize.encoders.text.presets import text_preset_table
    from latentize.presets import preset_table

    if args.text:
        if args.json:
            print(json.dumps(text_preset_table(), indent=2))
        else:
            _print_text_presets()
        return 0
    rows = preset_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = f"{'preset':<19} {'type':<12} {'C':>4} {'f':>3} {'scale':>8} {'shift':>7} {'input':<11} {'det':<4} model"
    print(header)
    for r in rows:
        scale = "-" if r["scaling_factor"] is None else f"{r['scaling_factor']:g}"
        shift = "-" if r["shift_factor"] is None else f"{r['shift_factor']:g}"
        where = r["model"] or (f"{r['packaged']} (packaged)" if r["packaged"] else "(set encoder.model to the file)")
        if r["subfolder"]:
            where += f" [{r['subfolder']}]"
        print(
            f"{r['name']:<19} {r['type']:<12} {r['latent_channels']:>4} {r['downsample']:>3} {scale:>8} {shift:>7} "
            f"{r['input_range']:<11} {'yes' if r['deterministic'] else 'no':<4} {where}"
        )
    print()
    _print_text_presets()
    return 0


def _print_text_presets() -> None:
    """The text presets: pipeline, sequence length, masking, storage, shapes, encoders."""
    from latentize.encoders.text.presets import text_preset_table

    print("text presets (text.preset); shapes per sample with storage: padded, N: varies per caption")
    print(f"{'preset':<13} {'pipeline':<26} {'len':>4} {'masks':<5} {'storage':<15} {'outputs':<50} encoders")
    for r in text_preset_table():
        shapes = ", ".join(f"{k} {'x'.join('N' if d is None else str(d) for d in v)}" for k, v in r["shapes"].items())
        length = "77" if r["max_sequence_length"] is None else str(r["max_sequence_length"])
        masks = "yes" if r["masks_padding"] else "no"
        print(
            f"{r['name']:<13} {r['pipeline_class']:<26} {length:>4} {masks:<5} {'/'.join(r['storage']):<15} "
            f"{shapes:<50} {r['encoders']}"
        )


def _add_set_arg(parser: argparse.ArgumentParser, example: str) -> None:
    """``--set KEY=VALUE`` (repeatable): config overrides, collected in ``overrides``."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config key, e.g. --set {example} (repeatable)",
    )


def _add_plan_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file, as for 'latentize encode'")
    _add_set_arg(parser, "preprocess.resolution=512")
    parser.add_argument(
        "--gpus",
        type=int,
        default=None,
        metavar="N",
        help="GPUs the run will have (default: this machine's, as a local Ray counts them; 0: CPU encoders)",
    )
    parser.add_argument(
        "--sample-shards",
        type=int,
        default=2,
        metavar="N",
        help="shards read to time decoding, and to count WebDataset shards without _stats.json (default 2)",
    )
    parser.add_argument(
        "--sample-images", type=int, default=32, metavar="N", help="images decoded per sampled shard (default 32)"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.set_defaults(fn=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    """``latentize plan CFG``: the dry run; exit code 0."""
    import json

    from latentize.estimate import estimate_run

    cfg = load_config(args.config, args.overrides)
    found = estimate_run(cfg, sample_shards=args.sample_shards, sample_images=args.sample_images, gpus=args.gpus)
    print(json.dumps(found, indent=2) if args.json else _format_plan(found))
    return 0


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _format_plan(found: dict[str, Any]) -> str:
    exact = "exact" if found["samples_exact"] else "estimated"
    counted = ", ".join(f"{k}: {v}" for k, v in found["samples_counted_by"].items() if v)
    decode = found["decode_ms_per_image"]
    lines = [
        f"latentize plan: {found['output']} ({'fresh' if found['fresh'] else 'existing'} output; nothing written)",
        f"  shards          {found['shards']} ({found['shards_pending']} to encode), {found['format']}",
        f"  samples         {found['samples']} ({found['samples_pending']} to encode), {exact} ({counted})",
        f"  input           {_size(found['input_bytes'])}",
    ]
    for folder, size in found["output_bytes"].items():
        lines.append(
            f"  output          {_size(size)} in {folder}/ ({found['output_rows'][folder]} rows, uncompressed)"
        )
    text = found.get("text")
    if text is not None:
        most = "at most " if text["maximum"] else ""
        lines.append(
            f"  text            {most}{_size(text['bytes_per_row'])} per row, {most}{_size(text['bytes'])} in all "
            f"({text['preset']}, {text['storage']}; included above)"
        )
        if text["warning"]:
            lines.append(f"  warning         {text['warning']}")
    lines.append("  decode          " + ("no image sampled" if decode is None else f"{decode:.2f} ms per image (CPU)"))
    for gpu, hours in found["gpu_hours"].items():
        shown = "no measured throughput for this encoder" if hours is None else f"{hours:.2f} GPU-hours"
        lines.append(f"  {gpu:<15} {shown}")
    cost = found.get("encoder_cost")
    if cost is not None:
        lines.append(
            f"  encoder cost    {cost['ratio']:.2f}x the SD VAE encoder's time per image on a CPU "
            f"({cost['flops_ratio']:.2f}x its FLOPs; {cost['source']}); not a GPU figure"
        )
    suggested = " ".join(f"--set {k}={v}" for k, v in found["suggested"].items())
    basis = found["suggested_for"]
    where = (
        f"{basis['gpus']} GPU(s) {'found on this machine' if basis['detected'] else 'given'}"
        if basis["encoders"] == "gpu"
        else f"CPU encoders: {basis['gpus']} GPU(s) {'found on this machine' if basis['detected'] else 'given'}"
    )
    lines.append(f"  suggested       {suggested} (for {where}; --gpus N plans for a cluster)")
    return "\n".join(lines)


def run_status(args: argparse.Namespace) -> int:
    """``latentize status OUT``: exit code 0 when the output is complete, 1 otherwise."""
    import json

    import yaml

    from latentize.sinks import OutputLayout
    from latentize.status import format_status, output_status

    options = yaml.safe_load(args.storage_options) or {}
    status = output_status(OutputLayout(args.output, storage_options=options))
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0 if status["complete"] else 1


def _add_qa_args(parser: argparse.ArgumentParser) -> None:
    from latentize.qa import QAOptions

    d = QAOptions()
    parser.add_argument("output", help="output root written by latentize encode (local path or fsspec URL)")
    parser.add_argument("--report", metavar="DIR", help="folder for report.html and report.json (default: OUTPUT/_qa)")
    parser.add_argument(
        "--sample",
        type=int,
        default=d.sample,
        metavar="N",
        help=f"latents decoded and compared with their source images (default {d.sample}; 0: none)",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the reconstruction sample")
    parser.add_argument(
        "--outlier-std",
        type=float,
        default=d.outlier_std,
        metavar="K",
        help=f"values beyond K std of their channel are outliers (default {d.outlier_std:g})",
    )
    parser.add_argument(
        "--scale-tolerance",
        type=float,
        default=d.scale_tolerance,
        metavar="T",
        help=f"allowed relative deviation of the normalised std from 1 (default {d.scale_tolerance:g})",
    )
    parser.add_argument(
        "--shift-tolerance",
        type=float,
        default=d.shift_tolerance,
        metavar="T",
        help=f"allowed |mean| of the normalised latents (default {d.shift_tolerance:g})",
    )
    parser.add_argument(
        "--min-psnr",
        type=float,
        default=d.min_psnr,
        metavar="DB",
        help=f"the reconstruction check fails below this mean PSNR (default {d.min_psnr:g} dB)",
    )
    parser.add_argument(
        "--decoder",
        help="decoder weights, when not found beside the encoder's "
        "(e.g. a TAESD *_decoder.pth, or a diffusers folder / hub id)",
    )
    parser.add_argument("--device", help="decoder device (default: cuda when present)")
    parser.add_argument("--storage-options", default="{}", metavar="YAML", help="fsspec options of the output root")
    parser.add_argument(
        "--input-storage-options",
        default="{}",
        metavar="YAML",
        help="fsspec options of the input shards (for the reconstruction's source images)",
    )
    parser.add_argument("--strict", action="store_true", help="warnings (outliers, duplicates) fail the report too")
    parser.add_argument(
        "--ray-address",
        help="Ray cluster address (default: RAY_ADDRESS, else a running `ray start` cluster, else a local Ray)",
    )
    parser.add_argument(
        "--dashboard",
        action="store_true",
        default=None,
        help="start Ray's dashboard with a local Ray (default: as the run's ray.dashboard, off unless set)",
    )
    parser.add_argument("--json", action="store_true", help="print report.json instead of the summary")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.set_defaults(fn=run_qa)


def run_qa(args: argparse.Namespace) -> int:
    """``latentize qa OUT``: exit code 0 when every check passes, 1 when one fails."""
    import json

    import yaml

    from latentize.qa import QAOptions
    from latentize.qa import run_qa as build_report

    options = QAOptions(
        sample=args.sample,
        seed=args.seed,
        outlier_std=args.outlier_std,
        scale_tolerance=args.scale_tolerance,
        shift_tolerance=args.shift_tolerance,
        min_psnr=args.min_psnr,
        decoder=args.decoder,
        report=args.report,
        storage_options=yaml.safe_load(args.storage_options) or {},
        input_storage_options=yaml.safe_load(args.input_storage_options) or {},
        device=args.device,
        strict=args.strict,
        ray_address=args.ray_address,
        dashboard=args.dashboard,
    )
    result = build_report(args.output, options=options)
    if args.json:
        print(json.dumps(result.report, indent=2))
    else:
        _print_qa(result)
    return 0 if result.passed else 1


def _print_qa(result: Any) -> None:
    """The QA report's checks, one line each, and its verdict."""
    marks = {"pass": "ok  ", "fail": "FAIL", "warn": "warn", "skip": "skip"}
    print(f"latentize qa: {result.report['output']}")
    for check in result.report["checks"]:
        print(f"  {marks.get(check['status'], check['status'])}  {check['name']:<15} {check['message']}")
    print(f"latentize qa: {'PASS' if result.passed else 'FAIL'}; report: {result.html_path}")


def qa_main(argv: Sequence[str] | None = None, *, prog: str = "qa_report.py") -> int:
    """Entry point of ``jobs/qa_report.py`` (the same arguments as ``latentize qa``)."""
    parser = argparse.ArgumentParser(prog=prog, description=_QA_DESCRIPTION)
    _add_qa_args(parser)
    args = parser.parse_args(argv)
    return _guarded(run_qa, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
