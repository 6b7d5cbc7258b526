"""The QA report's caption embeddings (issue 21): the text pass's figures against numpy on
outputs built by the real staging and commit code (tests/latent_outputs.py, padded and trimmed,
Parquet and WebDataset), the ``text_finite`` and ``text_aligned`` checks on planted faults, the
typed section in report.html, and (slow) the whole report through Ray."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from latent_outputs import Built, build_output, text_length

from latentize.qa.report import render_html
from latentize.qa.scan import list_files
from latentize.qa.text import TextScan, empty_prompt_section, scan_text, text_checks, text_section
from latentize.sinks.contract import read_manifest, run_markers

SHARDS = {"q00": {"64x64": 6, "96x64": 3}, "q01": {"64x64": 4}, "q02": {"96x64": 5}}
CASES = [("parquet", "trimmed", "fixed_shape_tensor"), ("parquet", "padded", "list"), ("webdataset", "trimmed", "list")]
CASES += [("webdataset", "padded", "fixed_shape_tensor")]


def build(root: Path, sink: str, storage: str, tensor_type: str) -> Built:
    return build_output(str(root), SHARDS, sink=sink, text=storage, tensor_type=tensor_type, stray=False)


def section_of(built: Built) -> dict[str, Any]:
    """The report's ``text`` section of ``built``, as run_qa builds it (without Ray)."""
    layout = built.layout
    manifest = read_manifest(layout)
    assert manifest is not None and manifest.text is not None
    files, _, _ = list_files(layout, run_markers(layout, manifest), sorted(built.keys))
    scan = scan_text(layout, files, fmt=manifest.output.format, text=manifest.text, tensors=["latent"])
    return text_section(scan, manifest.text, empty_prompt_section(layout, manifest.text))


def statuses(section: dict[str, Any]) -> dict[str, str]:
    return {c.name: c.status for c in text_checks(section)}


@pytest.mark.parametrize(("sink", "storage", "tensor_type"), CASES)
def test_text_figures_equal_numpy_and_a_clean_output_passes(
    tmp_path: Path, sink: str, storage: str, tensor_type: str
) -> None:
    built = build(tmp_path / "out", sink, storage, tensor_type)
    section = section_of(built)
    assert statuses(section) == {"text_finite": "pass", "text_aligned": "pass"}
    keys = built.all_keys
    for name, column in section["columns"].items():
        values = np.concatenate([built.tensors[name][k].reshape(-1).astype(np.float64) for k in keys])
        assert column["rows"] == len(keys) and column["count"] == values.size
        assert column["mean"] == pytest.approx(values.mean(), rel=1e-9, abs=1e-12)
        assert column["std"] == pytest.approx(values.std(), rel=1e-9)
        assert (column["min"], column["max"]) == (values.min(), values.max())
        assert column["nonfinite"] == 0
    lengths = section["lengths"]
    assert lengths["source"] == ("prompt_embeds_length" if storage == "trimmed" else "prompt_attention_mask")
    want = np.bincount([text_length(k) for k in keys])
    assert lengths["histogram"]["counts"] == want.tolist() and lengths["rows"] == len(keys)
    align = section["alignment"]
    assert align["data_rows"] == len(keys) and align["incomplete_rows"] == 0 and align["length_mismatch"] == 0
    assert align["empty_prompt"]["present"] and not align["empty_prompt"]["missing_columns"]
    if storage == "trimmed":
        assert section["columns"]["prompt_embeds"]["shape"] == [None, 8]


def _rewrite(built: Built, folder: str, change: Any) -> list[str]:
    """Rewrites the committed Parquet files of ``folder`` with ``change(table) -> table``;
    returns their keys."""
    keys: list[str] = []
    for path in sorted(Path(built.layout.join(folder)).glob("*.parquet")):
        table = pq.read_table(path)
        keys += table.column("key").to_pylist()
        pq.write_table(change(table), path)
    return keys


def test_a_nan_in_a_text_column_fails_text_finite_with_its_key(tmp_path: Path) -> None:
    built = build(tmp_path / "out", "parquet", "trimmed", "fixed_shape_tensor")

    def poison(table: pa.Table) -> pa.Table:
        from latentize.sinks.base import tensor_array, tensor_numpy

        pooled = tensor_numpy(table.column("pooled_prompt_embeds")).copy()
        pooled[0, 3] = np.nan
        i = table.schema.get_field_index("pooled_prompt_embeds")
        return table.set_column(i, "pooled_prompt_embeds", tensor_array(pooled))

    path = sorted(Path(built.layout.join("96x64")).glob("*.parquet"))[0]
    first = pq.read_table(path).column("key")[0].as_py()
    pq.write_table(poison(pq.read_table(path)), path)
    section = section_of(built)
    checks = {c.name: c for c in text_checks(section)}
    assert checks["text_finite"].status == "fail" and first in checks["text_finite"].message
    assert checks["text_aligned"].status == "pass"
    assert section["columns"]["pooled_prompt_embeds"]["nonfinite"] == 1
    assert section["nonfinite"] == {
        "values": {"prompt_embeds": 0, "pooled_prompt_embeds": 1, "prompt_embeds_length": 0},
        "rows": 1,
        "keys": [first],
    }
    # The statistics leave the NaN out.
    assert section["columns"]["pooled_prompt_embeds"]["count"] == 12 * len(built.all_keys) - 1


def test_a_folder_without_text_columns_fails_text_aligned(tmp_path: Path) -> None:
    built = build(tmp_path / "out", "parquet", "padded", "fixed_shape_tensor")
    text = ["prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask"]
    lacking = _rewrite(built, "96x64", lambda t: t.drop_columns(text))
    section = section_of(built)
    checks = {c.name: c for c in text_checks(section)}
    assert checks["text_aligned"].status == "fail" and checks["text_finite"].status == "pass"
    assert f"{len(lacking)} of {len(built.all_keys)} data row(s) lack text columns" in checks["text_aligned"].message
    assert section["alignment"]["missing"] == dict.fromkeys(text, len(lacking))
    assert section["alignment"]["incomplete_keys"] == sorted(lacking)
    # The rows that have them still count.
    assert section["columns"]["prompt_embeds"]["rows"] == len(built.all_keys) - len(lacking)


def test_a_missing_empty_prompt_or_wrong_lengths_fail_text_aligned(tmp_path: Path) -> None:
    built = build(tmp_path / "out", "parquet", "trimmed", "list")

    def lie(table: pa.Table) -> pa.Table:
        i = table.schema.get_field_index("prompt_embeds_length")
        return table.set_column(i, "prompt_embeds_length", pa.array([7] * table.num_rows, pa.int32()))

    lied = _rewrite(built, "64x64", lie)
    Path(built.layout.join("_empty_prompt.npz")).unlink()
    section = section_of(built)
    message = {c.name: c for c in text_checks(section)}["text_aligned"].message
    assert f"{len(lied)} row(s) hold a prompt_embeds whose rows differ" in message
    assert "_empty_prompt.npz (the empty prompt's embeddings) is missing" in message


def test_clip_only_families_say_lengths_are_not_stored() -> None:
    text = {"storage": "padded", "max_rows": 77, "columns": {"prompt_embeds": {"shape": [77, 768], "dtype": "float16"}}}
    scan = TextScan(text)
    scan.update(["a", "b"], {"prompt_embeds": [np.zeros((77, 768), np.float16), np.ones((77, 768), np.float16)]})
    lengths = scan.lengths_section()
    assert lengths["histogram"] is None and "not stored" in lengths["note"] and "77 tokens" in lengths["note"]
    figures = scan.columns["prompt_embeds"].to_dict()
    assert (figures["mean"], figures["std"], figures["min"], figures["max"]) == (0.5, 0.5, 0.0, 1.0)


def test_the_page_shows_the_text_section(tmp_path: Path) -> None:
    built = build(tmp_path / "out", "webdataset", "trimmed", "list")
    section = section_of(built)
    report = {"passed": True, "checks": [c.to_dict() for c in text_checks(section)], "text": section}
    html = render_html(report)
    assert '<section id="text">' in html and "Caption embeddings" in html
    assert "prompt_embeds_length" in html and "rows × 8" in html and "<img" in html
    assert re.search(r"text_aligned.*pass", html, re.S)
    # Without text the page has no such section; a CLIP-only section says why it has no histogram.
    assert 'id="text"' not in render_html({"passed": True, "checks": [], "text": None})
    clip = dict(section, lengths=TextScan({"max_rows": 77, "columns": {}}).lengths_section())
    assert "lengths are not stored" in render_html({"text": clip})


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_the_report_of_an_output_with_text_fails_on_a_nan_caption_embedding(tmp_path: Path) -> None:
    from latentize.qa import QAOptions, run_qa

    built = build(tmp_path / "out", "parquet", "trimmed", "fixed_shape_tensor")
    result = run_qa(built.layout.url, options=QAOptions(sample=0))
    checks = {c["name"]: c["status"] for c in result.report["checks"]}
    assert result.passed and checks["text_finite"] == "pass" and checks["text_aligned"] == "pass", result.report[
        "checks"
    ]
    assert 'id="text"' in Path(result.html_path).read_text()

    def poison(table: pa.Table) -> pa.Table:
        embeds = table.column("prompt_embeds").combine_chunks()
        values = embeds.flatten().flatten().to_numpy(zero_copy_only=False).copy()
        values[0] = np.inf
        inner = pa.FixedSizeListArray.from_arrays(pa.array(values), 8)
        i = table.schema.get_field_index("prompt_embeds")
        return table.set_column(i, "prompt_embeds", pa.ListArray.from_arrays(embeds.offsets, inner))

    _rewrite(built, "64x64", poison)
    failed = run_qa(built.layout.url, options=QAOptions(sample=0))
    assert not failed.passed
    assert {c["name"]: c["status"] for c in failed.report["checks"]}["text_finite"] == "fail"
    assert '"text_finite"' in Path(failed.json_path).read_text()


@pytest.mark.parametrize("sink", ["parquet", "webdataset"])
def test_status_of_an_output_with_text_columns_is_unchanged(
    tmp_path: Path, sink: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from latentize.cli import main
    from latentize.sinks import OutputLayout
    from latentize.status import output_status

    built = build(tmp_path / "out", sink, "trimmed", "list")
    status = output_status(OutputLayout(built.layout.url))
    assert status["complete"] and status["samples"]["ok"] == len(built.all_keys)
    assert main(["status", built.layout.url]) == 0
    assert "complete: yes" in capsys.readouterr().out
