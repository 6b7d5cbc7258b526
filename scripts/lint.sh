#!/usr/bin/env bash
# The lint and type gate, with the tools of .venv (scripts/venv.sh installs them): ruff check,
# ruff format --check and mypy. Runs all three, then fails if any failed. CI runs this too.
set -uo pipefail
cd "$(dirname "$0")/.."

failed=()
run() {
  echo "lint: $*" >&2
  "$@" || failed+=("$*")
}
run .venv/bin/ruff check .
run .venv/bin/ruff format --check .
run .venv/bin/mypy

if [ "${#failed[@]}" -gt 0 ]; then
  printf 'lint: failed: %s\n' "${failed[@]}" >&2
  exit 1
fi
