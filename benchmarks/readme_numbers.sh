#!/usr/bin/env bash
# Every number and picture the README gives for the embedded default, re-measured by one command:
#
#   bash benchmarks/readme_numbers.sh ROOT [MODEL] [OUT]
#
# ROOT is the build's run folder (scripts/build_embedded_default.sh's ROOT; the stage gains and loss curves need
# its stages), MODEL the model measured (default: src/vargpt/assets/tiny, the installed one: the build's final
# model, DPO's or the editing model's as its gate chose), OUT the results folder (default: out/readme). Two lanes, one
# thread each (about 15 min on 2 cores):
#   lane 1: the report of `vargpt eval` (64 records x 3 seeds, test; check.json), text-to-image and editing over
#           1,024 x 3, VQA over 1,024, the "relative" questions, the VAE ceilings (1,024), the red circle and the VQA
#           transcript. 1,024, not 256: a score near 0.95 has a binomial standard error of 1.4 points over 256
#           records, 0.7 over 1,024 (session 30: the same model answered 0.949 of the first 256 test questions and
#           0.958 of the first 1,024, which hold them)
#   lane 2: what each stage bought (stage_gains.py, 256 x 3), both unconditional branches, variety
# then prints a summary of the JSON reports. The README's figures come from OUT/figs (embedded_red_circle.png),
# OUT/report_t2i.png and OUT/report_edit.png (sample sheets) and OUT/losses.png.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:?usage: benchmarks/readme_numbers.sh ROOT [MODEL] [OUT]}
MODEL=${2:-src/vargpt/assets/tiny}
OUT=${3:-out/readme}
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$OUT/figs"
vargpt() { "$PYTHON" -m vargpt "$@"; }

lane1() {
    vargpt eval --model "$MODEL" --n 64 --seeds 0,1,2 --device cpu --json "$OUT/report.json"
    vargpt eval t2i --model "$MODEL" --n 1024 --seeds 0,1,2 --device cpu --json "$OUT/t2i.json"
    vargpt eval edit --model "$MODEL" --n 1024 --seeds 0,1,2 --device cpu --json "$OUT/edit.json"
    vargpt eval vqa --model "$MODEL" --n 1024 --device cpu --json "$OUT/vqa.json"
    "$PYTHON" benchmarks/vqa_relative.py --split test "$MODEL"
    "$PYTHON" benchmarks/vae_ceiling.py --model "$MODEL" --sizes 64 --n 1024
    "$PYTHON" benchmarks/embedded_figures.py --model "$MODEL" --out "$OUT/figs"
}
lane2() {
    "$PYTHON" benchmarks/stage_gains.py --root "$ROOT" --n 256 --seeds 0 1 2 --json "$OUT/stage_gains_256.json"
    "$PYTHON" benchmarks/uncond_branch.py --model "$MODEL" --n 64 --seeds 0 1 2 --json "$OUT/uncond_branch.json"
    "$PYTHON" benchmarks/variety.py --model "$MODEL" --n 20 --seeds 10 --json "$OUT/variety.json"
    "$PYTHON" benchmarks/plot_chain_losses.py --root "$ROOT" --out "$OUT/losses.png"
}
lane1 > "$OUT/lane1.log" 2>&1 &
pid1=$!
lane2 > "$OUT/lane2.log" 2>&1 || { echo "lane 2 failed: $OUT/lane2.log" >&2; exit 1; }
wait "$pid1" || { echo "lane 1 failed: $OUT/lane1.log" >&2; exit 1; }

"$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    return json.loads((out / name).read_text())
def seeds(score):
    return f"{score['mean']:.3f} ({score['min']:.3f}-{score['max']:.3f})"
t2i, edit, vqa = load("t2i.json"), load("edit.json"), load("vqa.json")
print("text-to-image 1024 x 3:", seeds(t2i["score"]), {k: round(v, 2) for k, v in t2i.get("by_group", {}).items()})
print("edit 1024 x 3:", seeds(edit["score"]), "applied", seeds(edit["satisfied"]), "preserved", seeds(edit["preserved"]),
      {k: round(v, 2) for k, v in edit.get("by_group", {}).items()})
print("VQA 1024:", round(vqa["accuracy"], 3), {k: round(v, 2) for k, v in vqa.get("by_group", {}).items()})
gains = load("stage_gains_256.json")
print("VQA by stage:", {s: round(v["accuracy"], 3) for s, v in gains["vqa"].items()})
for key in ("edit_sft", "dpo"):
    if key not in gains:  # a chain continued from a given model (CONTINUE_FROM) has no editing SFT of its own
        continue
    print(key, "before/after:", seeds(gains[key]["edit_before" if key == "dpo" else "before"]["score"]), "->",
          seeds(gains[key]["edit_after" if key == "dpo" else "after"]["score"]))
for s in [k for k in gains if k.startswith("edit") and k[4:].isdigit()]:
    print(s, "before/after:", seeds(gains[s]["before"]["score"]), "->", seeds(gains[s]["after"]["score"]))
print("unconditional branches:", json.dumps(load("uncond_branch.json"))[:300])
print("variety:", json.dumps(load("variety.json"))[:300])
PY
grep -h "pass the checker\|relative\|ceiling\|t2i\b" "$OUT/lane1.log" | tail -8
echo "readme numbers: $OUT"
