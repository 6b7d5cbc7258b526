#!/usr/bin/env bash
# Set-up command 1: refresh .venv, then run the main job on its embedded default: sample
# WebDataset shards of real photos -> local Ray -> latents under ./demo_data/latents.
# Extra arguments go to the job, e.g. --set encoder.model=/path/to/local/vae
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
exec .venv/bin/python jobs/encode_laion.py "$@"
