"""Latent dataset QA: "are these latents right?" as a report people read and pipelines gate on.

Stages: :mod:`~latentize.qa.stats` (exact, mergeable statistics), :mod:`~latentize.qa.scan`
(the Ray Data passes over every data row), :mod:`~latentize.qa.checks` (scale check, alignment,
named pass/fail checks), :mod:`~latentize.qa.recon` (decoders, source images, PSNR/SSIM),
:mod:`~latentize.qa.report` (report.json, and report.html from the Jinja2 templates in
``templates/``, fed by :mod:`~latentize.qa.sections` with figures from :mod:`~latentize.qa.plots`);
:func:`run_qa` wires them: load, scan, checks, write.

:class:`QAOptions` imports nothing heavy; :func:`run_qa` and :class:`QAResult` load the report's
modules (Ray Data, the scans) on first use, so that ``latentize encode`` does not pay for them
when it builds its command line (0.4 s on the 2-core development machine).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from latentize.qa.options import QAOptions

if TYPE_CHECKING:
    from latentize.qa.run import QAResult, run_qa

__all__ = ["QAOptions", "QAResult", "run_qa"]


def __getattr__(name: str) -> Any:
    if name in ("QAResult", "run_qa"):
        from latentize.qa import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
