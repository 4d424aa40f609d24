#!/usr/bin/env bash
# Issue 15's GPU checks in one call on a lent device machine, after `bash benchmarks/gpu_prepare.sh` here:
#     command: bash benchmarks/gpu_run.sh      carry: [".gpu"]      timeout_s: 590
# Steps, each under its own time limit so that one that hangs leaves the others' results:
#   1. `vargpt bench --preset official --dtype bf16` (full size, random weights, 512 px) beside the published code
#      (fp32, its default) on the same weights: $OUT/bench.json + bench.md (our rows are on disk before the
#      published side starts), its progress in bench.log, and profile.txt: one batch-1 call under torch.profiler
#      (kernel launches, device busy time against wall time, top kernels: what to speed up next);
#   2. benchmarks/gpu_psnr.py: bf16 against fp32 (the embedded default's whole text-to-image, the VAE decodes):
#      $OUT/psnr.json (its output in run.log).
# env.txt says what the machine had; run.log what ran and how it ended.
# A CPU dry run of the same steps (fixture weights; EXTRA_SITE: a folder with what the device image has and this
# Python lacks for the published side: einops, opencv-python-headless, timm, colorama, requests):
#     DEVICE=cpu PRESET=fixture PYTHON=.venv/bin/python OUT=out/gpu-dry EXTRA_SITE=/tmp/extra bash benchmarks/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
PY=$(command -v "${PYTHON:-python3}")
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-official}
RUNS=${RUNS:-5}
BENCH_S=${BENCH_S:-420}
PSNR_S=${PSNR_S:-120}
G=$PWD/.gpu
SITE=${SITE:-/tmp/vargpt_gpu_site}
mkdir -p "$OUT"
log() { echo "== $(date +%T) $*" | tee -a "$OUT/run.log"; }
[[ -d $G/whl_ours ]] || { log "no .gpu/ here: run benchmarks/gpu_prepare.sh first and carry .gpu"; exit 2; }

for side in ours published; do
    rm -rf "${SITE:?}/$side"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE/$side" \
            "$G"/whl_$side/*.whl >> "$OUT/run.log" 2>&1; then
        log "installing the $side wheels failed"; exit 1
    fi
done
# the published side's Python: the machine's torch, its own transformers first on the path
PUB_PY=$SITE/published_python
printf '#!/bin/sh\nPYTHONPATH=%s exec %s "$@"\n' "$SITE/published${EXTRA_SITE:+:$EXTRA_SITE}" "$PY" > "$PUB_PY"
chmod +x "$PUB_PY"
export PYTHONPATH=$PWD/src:$SITE/ours PYTHONUNBUFFERED=1
{
    nvidia-smi -L 2>&1
    "$PY" -c "import sys, torch, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda',
torch.cuda.is_available(), 'transformers', transformers.__version__)"
    "$PUB_PY" -c "import transformers, tokenizers; print('published side: transformers', transformers.__version__,
'tokenizers', tokenizers.__version__)"
} > "$OUT/env.txt" 2>&1
log "environment: $(tr '\n' ' ' < "$OUT/env.txt")"

log "1. bench: preset $PRESET on $DEVICE in bf16, the published code in fp32 beside it (limit ${BENCH_S} s)"
timeout "$BENCH_S" "$PY" -m vargpt bench --json "$OUT/bench.json" --preset "$PRESET" --device "$DEVICE" \
    --dtype bf16 --runs "$RUNS" --baseline-python "$PUB_PY" --baseline-src "$G/published_src" \
    --baseline-harness "$G/harness" --profile "$OUT/profile.txt" > "$OUT/bench.log" 2>&1
log "   bench exit $? (124: its time ran out; bench.json then holds our rows)"

log "2. bf16 against fp32 (limit ${PSNR_S} s)"
timeout "$PSNR_S" "$PY" benchmarks/gpu_psnr.py --device "$DEVICE" --json "$OUT/psnr.json" >> "$OUT/run.log" 2>&1
log "   psnr exit $?"
ls -la "$OUT" >> "$OUT/run.log"
