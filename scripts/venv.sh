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
  # torch and torchvision first, pinned as a matching pair (torchvision's GPU JPEG decoder is
  # built against one torch release), so pip picks neither a newer multi-GB build nor a
  # mismatched pair. Set LATENTIZE_TORCH to choose another pair (e.g. from the PyTorch index).
  torch_pair=${LATENTIZE_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
  if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    # shellcheck disable=SC2086 # the pair is two requirement specifiers
    .venv/bin/python -m pip install -q $torch_pair
  fi
  .venv/bin/python -m pip install -q -e ".[demo,test,s3,cluster,dev]"
  echo "$want" > "$stamp"
fi
