#!/usr/bin/env python
"""Latent dataset QA report of an output root: the entry point for `ray job submit`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/qa_report.py s3://bucket/latents --sample 64

Run as a plain process it starts a local Ray; under `ray job submit` it joins the cluster. The
same arguments as `latentize qa`; the exit code is 1 when a check fails.
"""

import os
import sys

# `ray job submit --working-dir .` uploads the repository without installing it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from latentize.cli import qa_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(qa_main(sys.argv[1:]))
