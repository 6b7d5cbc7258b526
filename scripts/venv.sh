#!/usr/bin/env bash
# Creates or refreshes the project's virtualenv (.venv): latentize in editable mode with the
# demo, test, S3, cluster and dev (lint and type check) extras. Fast when nothing changed (keyed
# on pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "latentize: creating .venv with $($python --version)" >&2
  "$python" -m venv .venv
fi

stamp=.venv/.latentize-installed
want=$(cat pyproject.toml scripts/venv.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "latentize: installing dependencies into .venv (first run takes a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and pinned, so pip does not pick a newer multi-GB build. Set LATENTIZE_TORCH
  # to choose another (e.g. a CUDA build from the PyTorch index on a GPU machine).
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q "${LATENTIZE_TORCH:-torch==2.13.0}"
  fi
  .venv/bin/python -m pip install -q -e ".[demo,test,s3,cluster,dev]"
  echo "$want" > "$stamp"
fi
