#!/usr/bin/env bash
# Fetch, on a machine with a package registry, the wheels that benchmarks/gpu_check.py needs on a GPU
# machine that has Python 3.12 and torch (with pandas, pyarrow, PyYAML, safetensors, tqdm, matplotlib,
# pytest) but no registry: pydantic and its dependencies, and tensorboardX. The versions are the ones
# this checkout's virtual environment runs, so the GPU machine runs what CI tests. They land in .whl/
# (ignored by git): carry that folder, then install it there with
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
mapfile -t pins < <("$python" - <<'PY'
from importlib.metadata import version
for name in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "tensorboardX"):
    print(f"{name}=={version(name)}")
PY
)
rm -rf .whl && mkdir .whl
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$tag")
done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${pins[@]}"
ls -l .whl
echo "carry .whl to the GPU machine ($(du -sh .whl | cut -f1)); see README, 'Checking a GPU machine'"
