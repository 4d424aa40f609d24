#!/usr/bin/env bash
# Prepare issue 15's GPU checks for a lent device machine, which reaches no package registry: run this HERE, then
# hand the machine one call (docs/bench.md, "On a lent GPU machine"):
#     command: bash benchmarks/gpu_run.sh      carry: [".gpu"]      timeout_s: 590
# It writes .gpu/ (git-ignored, about 32 MB, travels with `carry`):
#   whl_ours/        transformers (and regex) for our side: the machine's transformers is older than pyproject's floor
#   whl_published/   the published code's pins: transformers 4.46.1, tokenizers 0.20.3, huggingface_hub 0.36.2,
#                    accelerate 1.1.1, pytz (everything else it imports is on the machine)
#   published_src/   the three folders of VARGPT-family/VARGPT-v1.1 the harness runs, unchanged
#   harness/         ../shared/official-harness (../shared does not travel)
# Usage: VARGPT_OFFICIAL_GIT=/path/to/VARGPT-v1.1.git [PYTHON=.venv/bin/python] bash benchmarks/gpu_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
GIT=${VARGPT_OFFICIAL_GIT:?set VARGPT_OFFICIAL_GIT to the git dir of a copy of VARGPT-family/VARGPT-v1.1}
HARNESS=${VARGPT_HARNESS:-../shared/official-harness}
PYTHON=${PYTHON:-.venv/bin/python}
TARGET_PY=${GPU_PYTHON_VERSION:-3.12}  # the device image's Python (KINDS.md)
[[ -f $HARNESS/official_env.py ]] || { echo "error: $HARNESS has no official_env.py; set VARGPT_HARNESS" >&2; exit 2; }
version() { "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))"; }
download() {  # DIR SPEC...: binary wheels for the device (x86-64 Linux, CPython $TARGET_PY), no dependencies
    local dir=$1; shift
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PY" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$dir" "$@"
}
rm -rf .gpu
mkdir -p .gpu/whl_ours .gpu/whl_published .gpu/published_src .gpu/harness
download .gpu/whl_ours "transformers==$(version transformers)" "regex==$(version regex)"
download .gpu/whl_published transformers==4.46.1 tokenizers==0.20.3 huggingface_hub==0.36.2 accelerate==1.1.1 pytz
git --git-dir="$GIT" archive HEAD VARGPT-family-training/visionllm inference_v1_1 patching_utils |
    tar -x -C .gpu/published_src
cp "$HARNESS"/*.py .gpu/harness/
ls .gpu/whl_ours .gpu/whl_published
echo "ready: $(du -sh .gpu | cut -f1) in .gpu/ (the working tree and what is carried must stay under 64 MiB);"
echo "device call: command 'bash benchmarks/gpu_run.sh', carry ['.gpu'], timeout_s 590"
