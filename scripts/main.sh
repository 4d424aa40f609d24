#!/usr/bin/env bash
# Install vargpt (CPU build of torch) and run the main job on the embedded default model (src/vargpt/assets/tiny):
# generate images from text, edit an image, answer questions about images, and score all three on held-out
# ShapesWorld records with the deterministic checker. Outputs (PNGs and JSON reports) go to $OUT (out/main).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0" -e .
out=${OUT:-out/main}
mkdir -p "$out"

echo "== text-to-image"
vargpt generate "A red circle." "A blue square above a green triangle." "Two yellow diamonds." \
    --seed 0 --out "$out/generated"
vargpt check --prompt "A red circle." "$out/generated/0000.png"

echo "== editing"
vargpt data shapesworld --out "$out/source" --n 1 --split test --size 64 --tasks edit > /dev/null
src="$out/source/images/000000_src.png"
instruction=$(python -c 'import json, sys; r = json.loads(open(sys.argv[1]).readline())
print(r["messages"][0]["content"].replace("<image>", "").strip())' "$out/source/records.jsonl")
echo "instruction: $instruction"
vargpt edit --image "$src" "$instruction" --seed 0 --out "$out/edited.png"
vargpt check --source "$src" --instruction "$instruction" "$out/edited.png"

echo "== understanding"
vargpt chat --image "$src" "Describe the image."

echo "== scores on held-out ShapesWorld records (checker): the README's table, re-measured (about 30 s)"
vargpt eval --n 64 --seeds 0,1,2 --json "$out/report.json" > /dev/null
cat "$out/report.md"  # sample sheets beside it: report_t2i.png, report_edit.png
echo "main job done: $out"
