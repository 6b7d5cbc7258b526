"""The pytest warnings policy of pyproject.toml: latentize's deprecations fail, Ray's are ignored."""

from __future__ import annotations

import warnings

import pytest


@pytest.mark.parametrize("category", [DeprecationWarning, PendingDeprecationWarning, FutureWarning])
def test_a_deprecation_issued_in_latentize_fails(category: type[Warning]) -> None:
    with pytest.raises(category):
        warnings.warn_explicit("old API", category, "latentize/pipeline.py", 1, module="latentize.pipeline")


def test_a_deprecation_issued_in_ray_is_ignored() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn_explicit("old API", DeprecationWarning, "ray/data/context.py", 1, module="ray.data.context")
    assert seen == []


def test_a_deprecation_issued_elsewhere_is_reported_not_raised() -> None:
    with pytest.warns(DeprecationWarning, match="old API"):
        warnings.warn_explicit("old API", DeprecationWarning, "elsewhere.py", 1, module="elsewhere")
