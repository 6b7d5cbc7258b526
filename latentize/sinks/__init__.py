"""Sinks by ``output.format`` plus the output layout and its commit protocol."""

from latentize.sinks import parquet as _parquet  # noqa: F401  (registers "parquet")
from latentize.sinks import webdataset as _webdataset  # noqa: F401  (registers "webdataset")
from latentize.sinks.base import SINKS, Sink, tensor_array, tensor_numpy
from latentize.sinks.commit import Committer, ShardTracker, commit_shard, stage_batch
from latentize.sinks.layout import OutputLayout, data_folder

__all__ = [
    "SINKS",
    "Committer",
    "OutputLayout",
    "ShardTracker",
    "Sink",
    "commit_shard",
    "data_folder",
    "stage_batch",
    "tensor_array",
    "tensor_numpy",
]
