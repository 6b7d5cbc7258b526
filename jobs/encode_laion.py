#!/usr/bin/env python
"""Encode image shards into latents: the entry point for `ray job submit`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/encode_laion.py --config configs/laion-sd15-256.yaml --set encoder.batch_size=64

Run as a plain process it starts a local Ray; under `ray job submit` it joins the cluster.
Without --config it runs the embedded demo (sample shards of real photos, local folders).
"""

import os
import sys

# `ray job submit --working-dir .` uploads the repository without installing it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from latentize.cli import encode_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(encode_main(sys.argv[1:]))
