#!/usr/bin/env bash
# Build the embedded default model (src/vargpt/assets/tiny) from scratch with the project's own code:
#   ShapesWorld training data (64 and 128 px) -> tiny BPE tokenizer -> BSQ VAE (`vargpt train vae`, 2 steps at 64 px per step at 128 px)
#   -> recipes tiny_understanding -> tiny_3a_64px -> tiny_3b_128px -> tiny_dpo -> tiny_edit (each from the previous
#   stage's model/) -> checker scores on held-out records -> copy the final model into src/vargpt/assets/tiny.
#
#   scripts/build_embedded_default.sh                # full chain, outputs under runs/ (the recipes' own paths)
#   QUICK=1 scripts/build_embedded_default.sh        # smoke run: a few steps per stage on tiny data, a few minutes
#                                                    # on CPU, under runs/embedded_quick; never touches the assets
#
# Resumable: a stage whose final output exists is skipped; an interrupted training stage resumes from its newest
# checkpoint (--resume). Environment (defaults in brackets; QUICK changes the starred ones):
#   ROOT [runs*]  N_TRAIN [40000*] (64 px)  N_TRAIN128 [20000*]  training records per ShapesWorld size
#   TOK_N [2000*]  records per split for the tokenizer
#   VAE_DATA [shapesworld:5000*]  VAE_STEPS [10000*]  VAE_BATCH [64]  VAE_DEVICE [$DEVICE]
#   VAE_INIT ['']  start the VAE from an earlier `vargpt train vae` run (--init), e.g. a short GPU run
#   DEVICE [auto]  the trainer's --device (auto: the GPU when there is one; cpu)
#   STAGE_ARGS ['']  recipe overrides added to every stage, e.g. "max_steps=500 batch_size=8"
#   CHECK_N [16*]  held-out (test split) records per kind for the final check     PYTHON [python]
#   DPO_PAIRS [shapesworld]  onpolicy: DPO on the 3b model's own samples judged by the checker (`vargpt data
#     preferences`, PREF_N [1536*] prompts x 4, at DPO_SIZE [64]) with recipes/tiny_dpo_onpolicy.yaml instead of
#     ShapesWorld's render-vs-corruption pairs (docs/training.md, "On-policy DPO": measured from a 64 px SFT model)
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
    ROOT=${ROOT:-runs/embedded_quick}; N_TRAIN=${N_TRAIN:-100}; N_TRAIN128=${N_TRAIN128:-100}; TOK_N=${TOK_N:-300}
    VAE_DATA=${VAE_DATA:-shapesworld:64}; VAE_STEPS=${VAE_STEPS:-6}; CHECK_N=${CHECK_N:-2}
    PREF_N=${PREF_N:-8}; PREF_ARGS=(--render-chosen)  # a 3-step model's samples may all tie
    QUICK_ARGS=(max_steps=3 log_every=1 checkpoint.every=3 data.num_workers=0)
else
    ROOT=${ROOT:-runs}; N_TRAIN=${N_TRAIN:-40000}; N_TRAIN128=${N_TRAIN128:-20000}; TOK_N=${TOK_N:-2000}
    VAE_DATA=${VAE_DATA:-shapesworld:5000}; VAE_STEPS=${VAE_STEPS:-10000}; CHECK_N=${CHECK_N:-16}
    PREF_N=${PREF_N:-1536}; PREF_ARGS=()
    QUICK_ARGS=()
fi
DPO_PAIRS=${DPO_PAIRS:-shapesworld}
DPO_SIZE=${DPO_SIZE:-64}
[[ $DPO_PAIRS == shapesworld || $DPO_PAIRS == onpolicy ]] || { echo "DPO_PAIRS=$DPO_PAIRS: use shapesworld or onpolicy" >&2; exit 2; }
VAE_BATCH=${VAE_BATCH:-64}
DEVICE=${DEVICE:-auto}
VAE_DEVICE=${VAE_DEVICE:-$DEVICE}
PYTHON=${PYTHON:-python}
read -r -a EXTRA <<< "${STAGE_ARGS:-}"
DATA=$ROOT/data/shapesworld
TOK=$ROOT/tokenizer_tiny
VAE=$ROOT/vae_tiny
ASSETS=src/vargpt/assets/tiny
mkdir -p "$ROOT"
TIMES=$ROOT/timings.tsv
: > "$TIMES"  # this invocation's stages
echo "build_embedded_default: QUICK=$QUICK ROOT=$ROOT DEVICE=$DEVICE $(date -u +%FT%TZ)" | tee -a "$ROOT/build.log"

# run_stage NAME DONE_FILE COMMAND...: skip when DONE_FILE exists, else run and print the wall time.
run_stage() {
    local name=$1 done_file=$2 t0 secs
    shift 2
    if [[ -e $done_file ]]; then
        echo "== $name: done already ($done_file), skipped"
        printf '%s\tskipped\n' "$name" >> "$TIMES"
        return
    fi
    echo "== $name: $*"
    t0=$(date +%s.%N)
    "$@"
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    echo "== $name: ${secs} s"
    printf '%s\t%s\n' "$name" "$secs" >> "$TIMES"
}

model_done() { echo "$1/model/preprocessor_config.json"; }  # written last by save_pretrained

# ---- data
for size in 64 128; do
    n=$N_TRAIN; [[ $size == 128 ]] && n=$N_TRAIN128
    run_stage "data_train${size}" "$DATA/train$size/records.jsonl" \
        "$PYTHON" -m vargpt data shapesworld --out "$DATA/train$size" --n "$n" --split train --size "$size"
done

# ---- tokenizer, VAE
run_stage tokenizer "$TOK/tokenizer.json" "$PYTHON" -m vargpt.training.embedded tokenizer --out "$TOK" --n "$TOK_N"
run_stage vae "$VAE/model/config.json" \
    "$PYTHON" -m vargpt train vae --data "$VAE_DATA" --out "$VAE" --size 64,64,128 --batch-size "$VAE_BATCH" \
    --steps "$VAE_STEPS" --device "$VAE_DEVICE" --resume ${VAE_INIT:+--init "$VAE_INIT"}

# ---- the unified model, stage by stage (each from the previous stage's model/)
train_stage() {  # train_stage RECIPE DATA_DIR [overrides...]
    local name=$1 data=$2
    shift 2
    run_stage "$name" "$(model_done "$ROOT/$name")" \
        "$PYTHON" -m vargpt train --recipe "recipes/$name.yaml" --device "$DEVICE" --resume \
        "data.sources.0.path=$data" "out_dir=$ROOT/$name" "$@" "${QUICK_ARGS[@]}" "${EXTRA[@]}"
}
train_stage tiny_understanding "$DATA/train64" "model.tokenizer=$TOK" "model.vae=$VAE"
train_stage tiny_3a_64px "$DATA/train64" "model.checkpoint=$ROOT/tiny_understanding/model"
train_stage tiny_3b_128px "$DATA/train128" "model.checkpoint=$ROOT/tiny_3a_64px/model"
if [[ $DPO_PAIRS == onpolicy ]]; then
    run_stage preferences "$ROOT/prefs/records.jsonl" \
        "$PYTHON" -m vargpt data preferences --model "$ROOT/tiny_3b_128px/model" --out "$ROOT/prefs" --n "$PREF_N" \
        --samples 4 --size "$DPO_SIZE" --device "$DEVICE" "${PREF_ARGS[@]}"
    DPO=tiny_dpo_onpolicy
    train_stage "$DPO" "$ROOT/prefs" "model.checkpoint=$ROOT/tiny_3b_128px/model" "data.image_size=$DPO_SIZE"
else
    DPO=tiny_dpo
    train_stage "$DPO" "$DATA/train128" "model.checkpoint=$ROOT/tiny_3b_128px/model"
fi
train_stage tiny_edit "$DATA/train128" "model.checkpoint=$ROOT/$DPO/model" "data.sources.1.path=$DATA/train64"
FINAL=$ROOT/tiny_edit/model

# ---- check: generations, edits and answers on held-out records, scored by the ShapesWorld checker
run_stage check "$ROOT/check.json" "$PYTHON" -m vargpt.training.embedded check --model "$FINAL" \
    --n "$CHECK_N" --device "$DEVICE" --json "$ROOT/check.json"
cat "$ROOT/check.json"

# ---- install as the embedded default (not in QUICK mode), then load it the way users do
if [[ $QUICK != 1 ]]; then
    rm -rf "$ASSETS"
    mkdir -p "$ASSETS"
    cp "$FINAL"/* "$ROOT/check.json" "$ASSETS"/
    chmod a+r "$ASSETS"/*  # the weights are written 0600; the installed package must be readable by all
    "$PYTHON" -m vargpt generate "a red circle" --out "$ROOT/default_sample.png" --device "$DEVICE"
    "$PYTHON" -m vargpt check "$ROOT/default_sample.png" --prompt "a red circle"
    echo "embedded default installed in $ASSETS: $(du -sh "$ASSETS" | cut -f1)"
fi

# ---- timings: wall time per stage, and seconds per optimiser step measured in each training run
echo "== timings (this invocation; s/step from the run logs, first step excluded where logged)"
"$PYTHON" - "$ROOT" "$TIMES" <<'EOF'
import csv, sys
from pathlib import Path
root, times = Path(sys.argv[1]), Path(sys.argv[2])
for line in times.read_text().splitlines():
    name, secs = line.split("\t")
    rate = ""
    m = root / name / "metrics.csv"
    if m.is_file():
        rows = list(csv.DictReader(m.open()))
        (a, b) = (rows[0], rows[-1]) if len(rows) > 1 else (None, rows[-1])
        if a is not None and int(b["step"]) > int(a["step"]):
            s = (float(b["elapsed_s"]) - float(a["elapsed_s"])) / (int(b["step"]) - int(a["step"]))
        else:
            s = float(b["elapsed_s"]) / int(b["step"])
        rate = f"{s:.2f} s/step over {b['step']} steps"
    elif name == "vae" and (root / "vae_tiny" / "log.csv").is_file():
        rows = list(csv.reader((root / "vae_tiny" / "log.csv").open()))[1:]
        if rows:
            rate = f"{float(rows[-1][-1]) / int(rows[-1][0]):.2f} s/step over {rows[-1][0]} steps"
    print(f"{name:20s} {secs + ' s' if secs != 'skipped' else secs:>10s}  {rate}")
EOF
