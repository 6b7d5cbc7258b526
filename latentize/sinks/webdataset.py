"""WebDataset output: tars (one per staged part of an input shard) holding ``KEY.<column>.npy``
(latents and, with a ``text`` section, each text-encoder column) beside ``KEY.txt`` (caption),
``KEY.json`` and ``KEY.notes.txt``.

``KEY`` is the member key of the sample key (:func:`latentize.tarnames.member_key`): the key
itself, unless WebDataset's split at the first dot of a name would cut it (a dot in its last path
component, as in ``img.000.v2.jpg``), in which case dots (and ``%``) are percent-escaped and the
key itself is stored in ``KEY.key.txt``. WebDataset's reader, the sink's own merge and the QA read
the same samples under the same keys.
"""

from __future__ import annotations

import io
import tarfile
from typing import Any

import pyarrow as pa

from latentize.sinks.base import FIXED_SHAPE_TENSOR, SINKS, prompt_samples, tensor_numpy
from latentize.tarnames import KEY_MEMBER, base_plus_ext, member_key

__all__ = ["NOTES_MEMBER", "WebDatasetSink"]

#: The extension of the member holding a sample's ``notes`` (non-fatal findings), when it has any.
NOTES_MEMBER = "notes.txt"


class WebDatasetSink:
    """Samples in input order; each tensor column becomes ``KEY.<name>.npy`` (numpy format)."""

    extension = "tar"

    def serialize(
        self,
        table: pa.Table,
        *,
        tensor_columns: list[str],
        compression: str,
        tensor_type: str = FIXED_SHAPE_TENSOR,
        prompt_columns: list[str] | None = None,
    ) -> bytes:
        # ``tensor_type`` is a Parquet matter: tars hold each tensor as an .npy member.
        tensors: dict[str, Any] = {name: tensor_numpy(table.column(name)) for name in tensor_columns}
        # Text columns too, one .npy each: (*shape), (rows, width) when trimmed, 0-d lengths.
        tensors.update({name: prompt_samples(table.column(name)) for name in prompt_columns or []})
        text = {name: table.column(name).to_pylist() for name in ("key", "caption", "json", "notes")}
        return _tar(self._samples(tensors, text))

    @staticmethod
    def _samples(tensors: dict[str, Any], text: dict[str, list[Any]]) -> list[dict[str, Any]]:
        samples = []
        for i, key in enumerate(text["key"]):
            member = member_key(key)
            sample: dict[str, Any] = {"__key__": member}
            if member != key:
                sample[KEY_MEMBER] = key
            for name, values in tensors.items():
                sample[f"{name}.npy"] = values[i]
            for column, ext in (("caption", "txt"), ("json", "json"), ("notes", NOTES_MEMBER)):
                if text[column][i] is not None:
                    sample[ext] = text[column][i]
            samples.append(sample)
        return samples

    def merge(self, files: list[bytes], rows: list[int]) -> bytes:
        samples: list[dict[str, Any]] = []
        for data in files:
            mine: list[dict[str, Any]] = []  # per file: the same key may end one part and start the next
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for member in tar:
                    # WebDataset's own split: member keys are written so that it gives them back.
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
