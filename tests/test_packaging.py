"""The package metadata builds with the installed setuptools without deprecation warnings:
``project.license`` is an SPDX expression (PEP 639), not the deprecated table."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_BUILD = "from setuptools import build_meta; print(build_meta.prepare_metadata_for_build_wheel('meta'))"


def test_metadata_builds_without_setuptools_deprecations(tmp_path: Path) -> None:
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("license expressions need setuptools >= 77 (pyproject.toml's build requirement)")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / "latentize").mkdir()
    (tmp_path / "latentize" / "__init__.py").write_text("")
    (tmp_path / "meta").mkdir()
    proc = subprocess.run(
        [sys.executable, "-W", "always", "-c", _BUILD], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Deprecation" not in proc.stderr, proc.stderr[-3000:]
    (info,) = (tmp_path / "meta").glob("*.dist-info")
    assert "License-Expression: Apache-2.0" in (info / "METADATA").read_text().splitlines()
