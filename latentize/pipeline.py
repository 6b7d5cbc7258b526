"""Wires the stages onto Ray Data: read -> preprocess (CPU tasks) -> encode (actor pool) -> stage
(tasks) -> commit (driver-tracked tasks).

Everything that can be checked before Ray starts is checked first (model config, input URLs,
output root, config fingerprint), so that a bad run fails in seconds with a message saying what
to fix, and a finished run is recognised without starting Ray at all: Ray starts only once the
plan has passed and left shards to do.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any

from latentize import __version__
from latentize.config import Config, config_to_dict, fingerprint, redact
from latentize.encoders import ENCODERS, EncoderSpec
from latentize.encoders.actor import EncodeActor, tensor_columns
from latentize.encoders.base import resolved_source
from latentize.encoders.pool import Execution, TextExecution, resolve_execution, resolve_text_execution
from latentize.encoders.text.actor import EMPTY_PROMPT_FILE, TextActor
from latentize.encoders.text.spec import TextSpec, inspect_text
from latentize.errors import LatentizeError
from latentize.preprocess import preprocess_block
from latentize.preprocess.buckets import Targets, resolve_targets
from latentize.progress import Progress
from latentize.raystart import init_ray
from latentize.sinks import SINKS, Committer, OutputLayout, data_folder, stage_batch
from latentize.sinks.contract import (
    ColumnSpec,
    FolderSpec,
    Manifest,
    Marker,
    OutputSection,
    ShardTotals,
    Totals,
    read_manifest,
)
from latentize.sources import SOURCES, expand_urls, infer_format, resolve_input_fields, shard_ids

__all__ = ["EncodeActor", "RunSummary", "TextActor", "plan", "run"]

logger = logging.getLogger(__name__)

#: Seconds between progress lines (logged from the start of the execution).
PROGRESS_EVERY_S = 10.0


@dataclass
class RunSummary:
    """What a run did. ``samples_ok`` and ``samples_failed`` count the whole output (earlier
    runs included); ``samples_now`` counts the samples this run read, of which it stored
    ``samples_ok_now`` and recorded ``samples_failed_now`` as error rows (by stage in
    ``failed_now_by_stage``: ``read`` errors, such as img2dataset's failed downloads, were never
    encoded)."""

    output: str
    shards_total: int
    shards_done_now: int
    shards_failed: int
    samples_ok: int
    samples_failed: int
    samples_now: int
    seconds: float
    nothing_to_do: bool
    #: Seconds of the Ray execution alone (first read to last commit); 0 when nothing ran.
    execution_seconds: float = 0.0
    #: Seconds from the execution's start to the first encoder call: the encoder pool's
    #: start-up (a process per actor, torch and the model's imports, the weights); None when
    #: nothing was encoded.
    encoder_start_seconds: float | None = None
    #: Seconds from the first encoder call to the last part staged: the run's steady state,
    #: without the encoder's start-up and the commit tail; None when nothing was encoded.
    encoding_seconds: float | None = None
    samples_ok_now: int = 0
    samples_failed_now: int = 0
    failed_now_by_stage: dict[str, int] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        """Images this run encoded (stored) per second of the whole run."""
        return self.samples_ok_now / self.seconds if self.seconds > 0 else 0.0

    @property
    def complete(self) -> bool:
        return self.shards_failed == 0


@dataclass
class Plan:
    """The resolved, checked run: everything known before Ray starts."""

    config: Config
    spec: EncoderSpec
    layout: OutputLayout
    fmt: str
    shards: list[tuple[str, str]]
    pending: list[tuple[str, str]]
    folder: str
    fingerprint: str
    manifest: Manifest
    #: Commit markers already in the output as JSON text, by shard id (empty for a fresh output).
    markers: dict[str, str]
    #: The output held no run before: nothing to discard, no markers to read.
    fresh: bool
    #: The sizes the run writes (per resolution: one, or the aspect-ratio buckets).
    targets: Targets
    #: What the text stage stores (None: a run without a ``text`` section).
    text: TextSpec | None = None


def _absolute(url: str) -> str:
    # Ray workers may run in another working directory (``ray job submit --working-dir``).
    return url if "://" in url else os.path.abspath(os.path.expanduser(url))


def _versions() -> dict[str, str]:
    """Versions of what produced the output. Read from package metadata: importing torch and
    diffusers here would cost the driver seconds and ~600 MB for two strings."""
    from importlib.metadata import version

    import pyarrow
    import ray

    return {
        "latentize": __version__,
        "python": platform.python_version(),
        "torch": version("torch"),
        "diffusers": version("diffusers"),
        "transformers": version("transformers"),  # the image tokenizers' library
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
    }


def _folders(config: Config, spec: EncoderSpec, targets: Targets) -> dict[str, FolderSpec]:
    """Every data folder the run may write: its crop size, resolution and stored shapes."""
    out: dict[str, FolderSpec] = {}
    columns_of = tensor_columns(spec, flip=config.preprocess.flip)
    for slot, sizes in enumerate(targets.per_resolution):
        for size in sizes:
            grid = spec.columns_for(size)
            out[data_folder(size)] = FolderSpec(
                size=size,
                resolution=config.preprocess.targets[slot] if config.preprocess.resolutions else None,
                slot=slot,
                columns={
                    name: ColumnSpec(grid[name.removesuffix("_flipped")][0], dtype)
                    for name, (_, dtype) in columns_of.items()
                },
            )
    return out


def _text_manifest(text: TextSpec | None) -> dict[str, Any] | None:
    """The manifest's ``text`` entry: the text spec and the root's empty-prompt file."""
    return None if text is None else {**text.to_manifest(), "empty_prompt": EMPTY_PROMPT_FILE}


def _manifest(
    config: Config, spec: EncoderSpec, fp: str, targets: Targets, shards: int, text: TextSpec | None = None
) -> Manifest:
    columns = tensor_columns(spec, flip=config.preprocess.flip)
    encoder = {**spec.to_manifest(), "preset": config.encoder.preset, "dtype": config.encoder.dtype}
    encoder["columns"] = {name: ColumnSpec(shape, dtype).to_json() for name, (shape, dtype) in columns.items()}
    folders = _folders(config, spec, targets)
    return Manifest(
        fingerprint=fp,
        config=redact(config_to_dict(config)),
        encoder=encoder,
        preprocess={
            "size": list(targets.sizes[0]) if targets.fixed else None,
            "buckets": [[list(size) for size in sizes] for sizes in targets.per_resolution]
            if config.preprocess.buckets is not None
            else None,
            "resolutions": [list(t) for t in config.preprocess.targets],
            "crop": config.preprocess.crop,
            "flip": config.preprocess.flip,
            "decode": "Pillow, EXIF transpose, RGB (alpha on white)",
            "resize": "to cover the crop (aspect kept), bicubic, antialiased; nearest aspect bucket by log ratio",
        },
        output=OutputSection(
            format=config.output.format,
            dtype=config.output.dtype,
            tensor_type=config.output.tensor_type,
            data_folders=sorted(folders) if targets.fixed else [],
            folders=folders,
        ),
        versions=_versions(),
        status="running",
        shards=ShardTotals(total=shards),
        text=_text_manifest(text),
    )


def plan(config: Config, *, overwrite: bool = False, retry_failed: bool = False) -> Plan:
    """Checks the run and works out which shards are left to do. Starts no Ray.

    Raises:
        LatentizeError: model, input or output problems, or a different run in the output root.
    """
    spec = ENCODERS.get(resolved_source(config)[0]).inspect(config)
    # The text components' configs only (no weights): a bad text.model fails here too.
    text = inspect_text(config) if config.text is not None else None
    SINKS.get(config.output.format)  # an unknown format fails here, before any work
    urls = [_absolute(u) for u in expand_urls(config.input.urls, storage_options=config.input.storage_options)]
    fmt = config.input.format or infer_format(urls)
    SOURCES.get(fmt)
    # caption_field auto -> the member or column actually read, before the fingerprint and the
    # manifest are made; missing optional Parquet columns are logged here, once per run.
    config = resolve_input_fields(config, urls, fmt)
    shards = list(zip(urls, shard_ids(urls), strict=False))
    layout = OutputLayout(
        config.output.path, storage_options=config.output.storage_options, retries=config.output.retries
    )
    targets = resolve_targets(config.preprocess, spec.downsample)
    folder = data_folder(targets.sizes[0])
    fp = fingerprint(config)

    existing = read_manifest(layout)
    if existing is None:
        # A fresh output costs two requests, however many shards: no markers can exist.
        leftovers = layout.entries()
        if leftovers:
            raise LatentizeError(
                f"output.path {layout.url} is not empty and holds no latentize run "
                f"(found: {', '.join(leftovers[:5])}); choose an empty or new folder"
            )
    else:
        conflict = _conflict(existing, spec, fp, config=config, text=text)
        if conflict is not None:
            if not overwrite:
                raise LatentizeError(
                    f"output.path {layout.url} holds a run made {conflict}. Rerun with --overwrite "
                    "to replace it, or choose another output.path"
                )
            logger.warning("--overwrite: removing the earlier run in %s (made %s)", layout.url, conflict)
            layout.remove([layout.join(name) for name in layout.entries()])
            existing = None

    markers = layout.read_marker_texts() if existing is not None else {}
    done = {shard for shard, text in markers.items() if _done(Marker.loads(text), fp, retry_failed=retry_failed)}
    pending = [(url, shard) for url, shard in shards if shard not in done]
    manifest = existing or _manifest(config, spec, fp, targets, len(shards), text)
    return Plan(
        config, spec, layout, fmt, shards, pending, folder, fp, manifest, markers, existing is None, targets, text
    )


def _done(marker: Marker, fp: str, *, retry_failed: bool) -> bool:
    """Whether a committed shard stays as it is (``--retry-failed`` redoes the retryable)."""
    return marker.fingerprint == fp and not (retry_failed and marker.retryable)


#: The text settings that change what the text stage stores, named when a rerun changes one.
_TEXT_SETTINGS = ("preset", "model", "revision", "storage", "dtype", "max_sequence_length")


def _conflict(
    manifest: Manifest,
    spec: EncoderSpec,
    fp: str,
    *,
    config: Config | None = None,
    text: TextSpec | None = None,
) -> str | None:
    """Why the run in an output root may not be continued by this one (None: it may).

    A different configuration, or other weights under the same configuration (a checkpoint
    overwritten in place, a moved hub revision), would mix two encodings in one dataset; so
    would other text settings or text-encoder weights, which the reason names.
    """
    if config is not None:
        changed = _text_change(manifest.setting("text"), config)
        if changed is not None:
            return changed
    if manifest.fingerprint != fp:
        return f"with a different configuration (fingerprint {manifest.fingerprint} there, {fp} now)"
    before = manifest.identity
    for field_name in ("sha256", "commit"):
        old, new = before.get(field_name), spec.identity.get(field_name)
        if old and new and old != new:
            return f"by other weights ({field_name} {old[:12]} there, {new[:12]} now)"
    text_before = (manifest.text or {}).get("identity") or {}
    if text is not None:
        for field_name in ("sha256", "commit"):
            old, new = text_before.get(field_name), text.identity.get(field_name)
            if old and new and old != new:
                return f"by other text-encoder weights (text {field_name} {old[:12]} there, {new[:12]} now)"
    return None


def _text_change(before: Any, config: Config) -> str | None:
    """The text setting that differs between the root's run (its config's ``text``) and this one."""
    now = config_to_dict(config)["text"]
    if before is None and now is None:
        return None
    if before is None or now is None:
        there = "no text section" if before is None else f"text.preset {before.get('preset')}"
        here = "no text section" if now is None else f"text.preset {now.get('preset')}"
        return f"with other text settings ({there} there, {here} now)"
    for name in _TEXT_SETTINGS:
        if before.get(name) != now.get(name):
            return f"with other text settings (text.{name} {before.get(name)} there, {now.get(name)} now)"
    return None


def _build_dataset(
    p: Plan,
    *,
    encode_actor: type[EncodeActor] = EncodeActor,
    execution: Execution | None = None,
    text_actor: type[TextActor] = TextActor,
    text_execution: TextExecution | None = None,
) -> Any:
    """The Ray Data pipeline: read + decode (one task per shard) -> encode (actor pool) ->
    [text (actor pool), with a ``text`` section] -> stage.

    Decoding runs inside the read tasks. Ray never fuses a read into a downstream batch-sized
    map (a read may change the row count), so decoding can never end up inside the encoder
    actors, and uint8 pixels are what travels to them.
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from latentize.sources.datasource import ShardDatasource

    ctx = DataContext.get_current()
    try:
        from ray.data._internal.tensor_extensions.arrow import FixedShapeTensorFormat

        # Canonical Arrow tensors in flight too (the V2 default needs Ray to read back).
        ctx.arrow_fixed_shape_tensor_format = FixedShapeTensorFormat.ARROW_NATIVE
    except ImportError:  # pragma: no cover - older Ray
        pass
    cfg = p.config
    ex = execution or resolve_execution(cfg, shapes=len(p.targets.sizes))
    # Bytes travel to the actors when they decode; else the read tasks decode to uint8 pixels.
    transform = (
        functools.partial(preprocess_block, config=cfg.preprocess, targets=p.targets) if ex.decode == "cpu" else None
    )
    source = ShardDatasource(shards=p.pending, fmt=p.fmt, config=cfg.input, transform=transform)
    ds = ray.data.read_datasource(source, override_num_blocks=len(p.pending))
    ds = ds.map_batches(
        encode_actor,
        fn_constructor_kwargs={
            "config": config_to_dict(cfg),
            "spec": p.spec,
            "cpu_threads": ex.cpu_threads,
            "decode": ex.decode,
        },
        # Four batches queued per actor keep it fed; two calls at once overlap one batch's
        # copies (and GPU decode) with the other's compute, the encoder serialising the model.
        compute=ActorPoolStrategy(
            size=ex.actors,
            max_tasks_in_flight_per_actor=4,
            max_concurrent_calls_per_actor=2,
            enable_true_multi_threading=ex.gpu,
        ),
        batch_size=ex.batch_size,
        batch_format="numpy",
        **ex.remote_args,
    )
    prompt_columns = None
    if p.text is not None:
        # After the image encoder, on rows already fanned out to every resolution: decoding and
        # the fan-out happen in one step inside the read tasks, and the big text tensors (a T5's
        # 512 x 4096 per caption) then never travel through the image pool. The rows of one key
        # share a caption; the encoder encodes a batch's identical captions once.
        tex = text_execution or resolve_text_execution(cfg, ex)
        ds = ds.map_batches(
            text_actor,
            fn_constructor_kwargs={
                "config": config_to_dict(cfg),
                "spec": p.text,
                "cpu_threads": tex.cpu_threads,
                "gpu": tex.gpu,
                "layout": p.layout,
            },
            compute=ActorPoolStrategy(
                size=tex.actors,
                max_tasks_in_flight_per_actor=4,
                # One call at a time: the encoder serialises encode_prompt anyway.
                max_concurrent_calls_per_actor=1,
            ),
            batch_size=tex.batch_size,
            # Arrow in, Arrow out: the latents pass through without a numpy round trip.
            batch_format="pyarrow",
            **tex.remote_args,
        )
        prompt_columns = {name: (c.shape, c.dtype) for name, c in p.text.columns.items()}
    return ds.map_batches(
        stage_batch,
        fn_kwargs={
            "layout": p.layout,
            "tensor_columns": list(tensor_columns(p.spec, flip=cfg.preprocess.flip)),
            "folder": p.folder,
            "sink_name": cfg.output.format,
            "compression": cfg.output.compression,
            "tensor_type": cfg.output.tensor_type,
            "name_folders": not p.targets.fixed,
            "prompt_columns": prompt_columns,
        },
        batch_format="numpy",
        batch_size=cfg.output.rows_per_part,
        # Staging is I/O (one Parquet or tar part per shard and batch): it must not wait for a
        # CPU that a read task holds, or the encoder's output backs up behind decoding.
        num_cpus=0,
    )


def _totals(markers: dict[str, str], shards: list[tuple[str, str]], fp: str) -> Totals:
    """What the output holds for ``shards``, from markers the driver already has in memory."""
    parsed = (Marker.loads(t) for _, shard in shards if (t := markers.get(shard)) is not None)
    return Totals.of(m for m in parsed if m.fingerprint == fp)


def _check_nodes(config: Config, layout: OutputLayout, urls: list[str]) -> None:
    """Refuses local paths on a cluster of several nodes unless they are declared shared.

    Each node would read and write its own disk: shards missing on one node, output scattered
    over several, markers the driver never sees.
    """
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) <= 1 or config.ray.shared_filesystem:
        return
    checks = (("output.path", layout.is_local), ("input.urls", _any_local(urls)))
    local = [what for what, is_local in checks if is_local]
    if local:
        raise LatentizeError(
            f"{' and '.join(local)}: local paths on a Ray cluster of {len(alive)} nodes; each node would "
            "see its own disk. Use object storage (s3://, gs://, ...) or a filesystem every node mounts at "
            "the same path, and then declare it with --set ray.shared_filesystem=true"
        )


def _any_local(urls: list[str]) -> bool:
    return any("://" not in u or u.startswith("file://") for u in urls)


def run(
    config: Config,
    *,
    overwrite: bool = False,
    retry_failed: bool = False,
    encode_actor: type[EncodeActor] = EncodeActor,
    text_actor: type[TextActor] = TextActor,
) -> RunSummary:
    """Encodes every pending shard of ``config`` and commits it; returns the run's summary.

    Object-store requests before Ray starts do not grow with the number of shards: a fresh
    output costs a constant few, a resume one listing per prefix and bulk deletes.

    Args:
        encode_actor: the encoder actor class (a subclass of :class:`EncodeActor`), for
            instrumentation and fault-injection tests.
        text_actor: the text-encoder actor class (a subclass of :class:`TextActor`), for the
            same tests; used only with a ``text`` section.

    Raises:
        LatentizeError: the run cannot start (see :func:`plan`, and local paths on a cluster
            of several nodes).
    """
    started = time.time()
    # No Ray yet: a plan error or a run with nothing left to do must not start (and stop) one.
    p = plan(config, overwrite=overwrite, retry_failed=retry_failed)
    if not p.pending:
        if p.manifest.status == "running":
            t = _close_interrupted(p)
        else:
            t = _totals(p.markers, p.shards, p.fingerprint)
        logger.info("nothing to do: all %d shards of %s are committed", len(p.shards), p.layout.url)
        return RunSummary(p.layout.url, len(p.shards), 0, t.failed_shards, t.ok, t.failed, 0, 0.0, True)
    ex, tex = _prepare(p)
    execution_started = time.time()
    committer = _execute(p, ex, encode_actor=encode_actor, text_actor=text_actor, text_execution=tex)
    execution_s = time.time() - execution_started
    timing = _RunTiming.of(committer, execution_started=execution_started, execution_s=execution_s)
    t = _finish(p, committer, ex, tex, started=started, timing=timing)
    return RunSummary(
        p.layout.url,
        len(p.shards),
        committer.shards_done,
        t.failed_shards,
        t.ok,
        t.failed,
        committer.samples_done,
        time.time() - started,
        False,
        execution_s,
        timing.encoder_start_seconds,
        timing.encoding_seconds,
        committer.ok_done,
        committer.failed_done,
        dict(sorted(committer.failed_by_stage.items())),
    )


@dataclass(frozen=True)
class _RunTiming:
    """Where the execution's seconds went (see :class:`RunSummary`)."""

    execution_seconds: float
    encoder_start_seconds: float | None
    encoding_seconds: float | None

    @classmethod
    def of(cls, committer: Committer, *, execution_started: float, execution_s: float) -> _RunTiming:
        first, last = committer.first_encode_started, committer.last_staged_at
        if first is None or last is None:
            return cls(execution_s, None, None)
        # Clocks of other nodes may be a little off; a negative span is reported as 0.
        return cls(execution_s, max(0.0, first - execution_started), max(0.0, last - first))

    def describe(self) -> dict[str, Any]:
        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 3)

        return {
            "execution_seconds": round(self.execution_seconds, 3),
            "encoder_start_seconds": rounded(self.encoder_start_seconds),
            "encoding_seconds": rounded(self.encoding_seconds),
        }


def _prepare(p: Plan) -> tuple[Execution, TextExecution | None]:
    """Joins Ray, checks the cluster, readies the output for this run; nothing per shard.
    Returns how the encoder pool and the text pool (None without a ``text`` section) run."""
    config, layout = p.config, p.layout
    logger.info(
        "%d of %d shards to encode into %s (%s, %s)",
        len(p.pending),
        len(p.shards),
        layout.url,
        config.encoder.type,
        config.encoder.model,
    )
    init_ray(address=config.ray.address, dashboard=config.ray.dashboard)
    _check_nodes(config, layout, [url for url, _ in p.pending])
    ex = resolve_execution(config, shapes=len(p.targets.sizes))
    logger.info("encoder pool: %s", ex.describe())
    tex = resolve_text_execution(config, ex) if p.text is not None else None
    if tex is not None:
        logger.info("text-encoder pool: %s", tex.describe())
    if p.fresh:
        layout.write_inputs(p.shards)
    else:
        removed = layout.discard({shard for _, shard in p.pending}, p.markers)
        logger.info("resume: removed %d leftover object(s) of uncommitted shards", removed)
    p.manifest = p.manifest.with_status("running")
    layout.write_json(layout.manifest_path, p.manifest.to_json())
    return ex, tex


def _execute(
    p: Plan,
    ex: Execution,
    *,
    encode_actor: type[EncodeActor],
    text_actor: type[TextActor] = TextActor,
    text_execution: TextExecution | None = None,
) -> Committer:
    """Runs the Ray Data pipeline and commits every shard; returns the finished Committer."""
    pending = {shard for _, shard in p.pending}
    committer = Committer(
        layout=p.layout,
        urls={shard: url for url, shard in p.pending},
        markers={s: m for s, m in p.markers.items() if s not in pending},
        parallelism=p.config.ray.commit_parallelism,
        sink_name=p.config.output.format,
        fingerprint=p.fingerprint,
        slots=len(p.targets.per_resolution),
    )
    # From the start of the execution: the first reports come only once the encoder pool is up
    # and shards' rows are staged, and a shard commits only once all of its rows are.
    progress = Progress(committer, shards=len(p.pending), every_s=PROGRESS_EVERY_S)
    progress.start()
    try:
        dataset = _build_dataset(
            p, encode_actor=encode_actor, execution=ex, text_actor=text_actor, text_execution=text_execution
        )
        for reports in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            committer.add(reports)
        committer.finish()
    finally:
        progress.stop()
    p.layout.prune_staging()
    return committer


def _finish(
    p: Plan,
    committer: Committer,
    ex: Execution,
    tex: TextExecution | None = None,
    *,
    started: float,
    timing: _RunTiming,
) -> Totals:
    """Rewrites the manifest with the totals of the markers the driver holds, and this run."""
    p.manifest = p.manifest.with_run(
        {
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "shards": committer.shards_done,
            "samples": committer.samples_done,
            "seconds": round(time.time() - started, 3),
            **timing.describe(),
            **ex.describe(),
            **(tex.describe() if tex is not None else {}),
        }
    )
    return _write_totals(p, committer.markers)


def _close_interrupted(p: Plan) -> Totals:
    """Closes an output whose last run was killed after its last commit (every shard has a
    marker, the manifest still says running): its leftover staged parts go, and the ledger and
    the manifest's totals are written as that run would have written them. No Ray is needed."""
    logger.info("the last run of %s ended after its last commit: removing its staging area", p.layout.url)
    p.layout.prune_staging()
    p.layout.write_ledger(p.markers)
    return _write_totals(p, p.markers)


def _write_totals(p: Plan, markers: dict[str, str]) -> Totals:
    """Writes the manifest with the status and totals of ``markers`` (JSON texts by shard)."""
    t = _totals(markers, p.shards, p.fingerprint)
    updated_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    p.manifest = p.manifest.with_totals(t, shards=len(p.shards), updated_at=updated_at)
    p.layout.write_json(p.layout.manifest_path, p.manifest.to_json())
    return t
