"""WebDataset output: tars (one per staged part of an input shard) holding ``KEY.<column>.npy``
beside ``KEY.txt``/``KEY.json``."""

from __future__ import annotations

import io
import tarfile
from typing import Any

import numpy as np
import pyarrow as pa

from latentize.sinks.base import FIXED_SHAPE_TENSOR, SINKS, tensor_numpy
from latentize.tarnames import base_plus_ext

__all__ = ["WebDatasetSink"]


class WebDatasetSink:
    """Samples in input order; each tensor column becomes ``KEY.<name>.npy`` (numpy format)."""

    extension = "tar"

    def serialize(
        self, table: pa.Table, *, tensor_columns: list[str], compression: str, tensor_type: str = FIXED_SHAPE_TENSOR
    ) -> bytes:
        # ``tensor_type`` is a Parquet matter: tars hold each tensor as an .npy member.
        tensors = {name: tensor_numpy(table.column(name)) for name in tensor_columns}
        keys = table.column("key").to_pylist()
        captions = table.column("caption").to_pylist()
        jsons = table.column("json").to_pylist()
        return _tar(self._samples(tensors, keys, captions, jsons))

    @staticmethod
    def _samples(
        tensors: dict[str, np.ndarray], keys: list[str], captions: list[str | None], jsons: list[str | None]
    ) -> list[dict[str, Any]]:
        samples = []
        for i, key in enumerate(keys):
            sample: dict[str, Any] = {"__key__": key}
            for name, values in tensors.items():
                sample[f"{name}.npy"] = values[i]
            if captions[i] is not None:
                sample["txt"] = captions[i]
            if jsons[i] is not None:
                sample["json"] = jsons[i]
            samples.append(sample)
        return samples

    def merge(self, files: list[bytes], rows: list[int]) -> bytes:
        samples: list[dict[str, Any]] = []
        for data in files:
            mine: list[dict[str, Any]] = []  # per file: the same key may end one part and start the next
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for member in tar:
                    key, ext = base_plus_ext(member.name)
                    if ext is None:
                        raise ValueError(f"staged tar member without an extension: {member.name!r}")
                    if not mine or mine[-1]["__key__"] != key:
                        mine.append({"__key__": key})
                    extracted = tar.extractfile(member)
                    # Member bytes as they are: TarWriter writes bytes values unchanged.
                    mine[-1][ext] = extracted.read() if extracted is not None else b""
            samples.extend(mine)
        return _tar([samples[i] for i in rows])


def _tar(samples: list[dict[str, Any]]) -> bytes:
    # Imported here: webdataset imports torch, which staging and commit workers otherwise never load.
    import webdataset as wds

    buf = io.BytesIO()
    # A fixed mtime makes reruns produce byte-identical tars.
    with wds.TarWriter(buf, mtime=0.0) as sink:
        for sample in samples:
            sink.write(sample)
    return buf.getvalue()


SINKS.add("webdataset", WebDatasetSink())
