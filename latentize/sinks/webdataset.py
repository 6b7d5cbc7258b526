"""WebDataset output: a tar per input shard with ``KEY.<column>.npy`` beside ``KEY.txt``/``KEY.json``."""

from __future__ import annotations

import io

import pyarrow as pa
import webdataset as wds

from latentize.sinks.base import SINKS, tensor_numpy

__all__ = ["WebDatasetSink"]


class WebDatasetSink:
    """Samples in input order; each tensor column becomes ``KEY.<name>.npy`` (numpy format)."""

    extension = "tar"

    def serialize(self, table: pa.Table, *, tensor_columns: list[str], compression: str) -> bytes:
        tensors = {name: tensor_numpy(table.column(name)) for name in tensor_columns}
        keys = table.column("key").to_pylist()
        captions = table.column("caption").to_pylist()
        jsons = table.column("json").to_pylist()
        buf = io.BytesIO()
        # A fixed mtime makes reruns produce byte-identical tars.
        with wds.TarWriter(buf, mtime=0.0) as sink:
            for i, key in enumerate(keys):
                sample = {"__key__": key}
                for name, values in tensors.items():
                    sample[f"{name}.npy"] = values[i]
                if captions[i] is not None:
                    sample["txt"] = captions[i]
                if jsons[i] is not None:
                    sample["json"] = jsons[i]
                sink.write(sample)
        return buf.getvalue()


SINKS.add("webdataset", WebDatasetSink())
