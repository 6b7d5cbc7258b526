"""Latent dataset QA: "are these latents right?" as a report people read and pipelines gate on.

Stages: :mod:`~latentize.qa.stats` (exact, mergeable statistics), :mod:`~latentize.qa.scan`
(the Ray Data passes over every data row), :mod:`~latentize.qa.checks` (scale check, alignment,
named pass/fail checks), :mod:`~latentize.qa.recon` (decoders, source images, PSNR/SSIM),
:mod:`~latentize.qa.report` (report.json, and report.html from the Jinja2 templates in
``templates/``, fed by :mod:`~latentize.qa.sections` with figures from :mod:`~latentize.qa.plots`);
:func:`run_qa` wires them: load, scan, checks, write.
"""

from latentize.qa.run import QAOptions, QAResult, run_qa

__all__ = ["QAOptions", "QAResult", "run_qa"]
