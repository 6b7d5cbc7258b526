#!/usr/bin/env bash
# Downloads the wheels that bench/gpu.py needs on a GPU machine that has CUDA torch, torchvision,
# pyarrow, pandas, huggingface_hub, safetensors, pyyaml and the like, but no diffusers, Ray or
# webdataset, and no network. Run it where pip reaches PyPI. It writes .whl/ (git-ignored):
#
#   diffusers and the small wheels beside it (about 7 MB), and a slim Ray wheel (about 45 MB):
#   Ray's own wheel less its Java jar, RLlib, Serve, Ray LLM and the dashboard's web client,
#   none of which a local Ray Data run imports. The slim wheel keeps everything in one device
#   call, whose working tree may carry at most 64 MiB.
#
# With --split-ray it leaves Ray out of .whl/ and splits the unmodified wheel (79 MB) into two
# 40 MB parts, .ray1/ and .ray2/, for two consecutive calls (bench/gpu.py's header says how).
#
# Versions are pinned to the project's virtualenv at the time of writing; the GPU machine runs
# Python 3.12 on x86-64 (manylinux). Set PYTHON to the interpreter whose pip downloads.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
py_version=${WHEEL_PYTHON:-3.12}
split_ray=false
if [ "${1:-}" = "--split-ray" ]; then
  split_ray=true
fi
dest=.whl

pure=(
  # diffusers (the GPU image has its requirements: huggingface_hub >= 1.32, safetensors, regex,
  # requests, filelock, Pillow; importlib_metadata is imported on Python < 3.8 alone).
  diffusers==0.42.1
  # latentize.pipeline imports the WebDataset reader and writer.
  webdataset==1.0.2
  braceexpand==0.1.7
  # Ray's requirements that the GPU image lacks (it has click, msgpack, protobuf, pyyaml,
  # requests, filelock, packaging, attrs, pandas, fsspec).
  jsonschema==4.26.0
  jsonschema-specifications==2025.9.1
  referencing==0.37.0
)
binary=(
  rpds-py==2026.9.1
)
ray_pin=ray==2.60.0

platforms=(
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64
)
download() {
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$py_version" \
    --implementation cp "$@"
}

rm -rf "$dest" .ray1 .ray2
mkdir -p "$dest"
download --platform any -d "$dest" "${pure[@]}"
download "${platforms[@]}" -d "$dest" "${binary[@]}"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
download "${platforms[@]}" -d "$scratch" "$ray_pin"
ray_wheel=$(basename "$(ls "$scratch"/ray-*.whl)")

if $split_ray; then
  mkdir -p .ray1 .ray2
  # The joined file must keep the wheel's own name: pip reads the tags from it.
  echo "$ray_wheel" > .ray1/NAME
  sha256sum "$scratch/$ray_wheel" | cut -d' ' -f1 > .ray1/SHA256
  split -b 40M -d "$scratch/$ray_wheel" "$scratch/part."
  mv "$scratch/part.00" .ray1/
  mv "$scratch/part.01" .ray2/
  if ls "$scratch"/part.* >/dev/null 2>&1; then
    echo "gpu_wheels: the Ray wheel needs more than two 40 MB parts" >&2
    exit 1
  fi
else
  # Every other member is copied (recompressed alike); RECORD loses the dropped files' lines so
  # that pip's hash check of the wheel still holds.
  "$python" - "$scratch/$ray_wheel" "$dest/$ray_wheel" <<'EOF'
import shutil
import sys
import zipfile

DROP = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/", "ray/dashboard/client/")
src, dst = sys.argv[1:]
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
    for info in zin.infolist():
        name = info.filename
        if name.startswith(DROP):
            continue
        if name.endswith(".dist-info/RECORD"):
            lines = zin.read(name).decode().splitlines(keepends=True)
            zout.writestr(info, "".join(line for line in lines if not line.startswith(DROP)))
            continue
        with zin.open(info) as f, zout.open(info, "w") as g:
            shutil.copyfileobj(f, g, 1 << 20)
EOF
fi

ls -l "$dest" .ray1 .ray2 2>/dev/null || true
du -ch "$dest" | tail -1 | sed 's/total/.whl in all/'
if $split_ray; then
  du -ch .ray1 .ray2 | tail -1 | sed "s/total/$ray_wheel in two parts/"
fi
