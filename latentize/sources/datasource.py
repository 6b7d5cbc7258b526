"""Ray Data datasource: one read task per input shard, streaming fixed-schema sample blocks.

Each read task opens its shard through fsspec, runs the format's reader (``SOURCES``) and yields
Arrow blocks of at most ``input.rows_per_block`` samples (raw image bytes, not decoded: decoding
is the preprocess stage's job and runs in its own tasks). After the last sample it yields one
*end-of-shard sentinel* row whose ``total`` is the number of samples read; the commit protocol
(:mod:`latentize.sinks.commit`) needs it to know when a shard is complete. A shard that cannot be
read to its end keeps the samples read so far and reports why on the sentinel's ``error``;
transient object-store errors reopen the shard (with back-off) and skip what was emitted.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from latentize.columns import FLIGHT_TYPES
from latentize.config import InputConfig
from latentize.errors import ConfigError
from latentize.retry import backoff_delay, is_transient

__all__ = ["SAMPLE_SCHEMA", "BlockTransform", "ShardDatasource", "read_shard"]

logger = logging.getLogger(__name__)

#: Schema of every block the datasource yields (types from :data:`latentize.columns.FLIGHT_TYPES`):
#: ``total`` is -1 on sample rows and the number of samples on the end sentinel row, which alone
#: has a ``read_node`` (recorded in the commit marker).
_SAMPLE_COLUMNS = ("key", "shard", "index", "image", "caption", "json", "notes", "error", "stage", "total", "read_node")
SAMPLE_SCHEMA = pa.schema([(name, FLIGHT_TYPES[name]) for name in _SAMPLE_COLUMNS])


#: A function applied to every block inside the read task (e.g. decoding), returning a block.
BlockTransform = Callable[[pa.Table], Any]


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _block(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)


def read_shard(*, url: str, shard: str, fmt: str, config: InputConfig) -> Iterator[pa.Table]:
    """Streams one shard as Arrow blocks (see :data:`SAMPLE_SCHEMA`), ending with its sentinel."""
    from latentize.sources import SOURCES

    reader = SOURCES.get(fmt)
    rows: list[dict[str, Any]] = []
    index = 0  # samples emitted so far (yielded or buffered)
    shard_error = None
    attempt = 0
    while True:
        try:
            with fsspec.open(url, "rb", **config.storage_options) as f:
                for position, sample in enumerate(reader(f, config=config)):
                    if position < index:
                        continue  # emitted before a transient failure; the reread skips it
                    rows.append(
                        {
                            "key": sample.key,
                            "shard": shard,
                            "index": index,
                            "image": sample.image,
                            "caption": sample.caption,
                            "json": sample.json,
                            "notes": sample.notes,
                            "error": sample.error,
                            "stage": "read" if sample.error else None,
                            "total": -1,
                        }
                    )
                    index += 1
                    if len(rows) >= config.rows_per_block:
                        yield _block(rows)
                        rows = []
            break
        except ConfigError:
            # A config problem (e.g. a missing image column) is the run's, not this shard's.
            raise
        except Exception as exc:  # noqa: BLE001 - any failure ends this shard, never the job
            if is_transient(exc) and attempt < config.retries:
                delay = backoff_delay(attempt)
                attempt += 1
                logger.warning(
                    "shard %s: transient error after %d samples (%s: %s); retry %d/%d in %.1fs",
                    shard,
                    index,
                    type(exc).__name__,
                    exc,
                    attempt,
                    config.retries,
                    delay,
                )
                time.sleep(delay)
                continue
            shard_error = f"{type(exc).__name__}: {exc}"
            logger.warning("shard %s: reading stopped after %d samples: %s", shard, index, shard_error)
            break
    rows.append(
        {
            "key": None,
            "shard": shard,
            "index": -1,
            "image": None,
            "caption": None,
            "json": None,
            "notes": None,
            "error": shard_error,
            "stage": "read" if shard_error else None,
            "total": index,
            "read_node": _node_id(),
        }
    )
    yield _block(rows)


def _read_transformed(
    *, url: str, shard: str, fmt: str, config: InputConfig, transform: BlockTransform | None
) -> Iterator[Any]:
    for block in read_shard(url=url, shard=shard, fmt=fmt, config=config):
        yield block if transform is None else transform(block)


class ShardDatasource(Datasource):
    """One :class:`ReadTask` per shard (shards are the unit of commit, so never split).

    Args:
        shards: ``(url, shard id)`` pairs to read.
        fmt: the ``input.format`` (a key of ``SOURCES``).
        config: the input section (reader options, storage options, block size).
        transform: applied to each block in the read task itself, so that work such as decoding
            runs where the bytes are, without another operator hop; ``None`` yields blocks of
            :data:`SAMPLE_SCHEMA`.
    """

    def __init__(
        self,
        *,
        shards: list[tuple[str, str]],
        fmt: str,
        config: InputConfig,
        transform: BlockTransform | None = None,
    ) -> None:
        self._shards = shards
        self._fmt = fmt
        self._config = config
        self._transform = transform

    def get_name(self) -> str:
        return f"Shards({self._fmt})"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(
        self,
        parallelism: int,
        per_task_row_limit: int | None = None,
        data_context: Any = None,
    ) -> list[ReadTask]:
        tasks = []
        schema = SAMPLE_SCHEMA if self._transform is None else None
        for url, shard in self._shards:
            fn = functools.partial(
                _read_transformed, url=url, shard=shard, fmt=self._fmt, config=self._config, transform=self._transform
            )
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=(url,))
            tasks.append(ReadTask(fn, meta, schema=schema, per_task_row_limit=per_task_row_limit))
        return tasks
