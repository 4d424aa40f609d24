#!/usr/bin/env bash
# Install vargpt (CPU build of torch) and run the main job.
# Until the embedded default model is built (scripts/build_embedded_default.sh), the main job exercises what
# exists end to end on ShapesWorld: write a test split, then score its text-to-image targets and its DPO pairs
# against their prompts with the deterministic checker (faithful renders score 1, corruptions 0).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0" -e .
out=${OUT:-out/main}
vargpt data shapesworld --out "$out/shapesworld" --n 24 --split test --size 128 --seed 0
python - "$out/shapesworld/records.jsonl" <<'PY'
import json, sys
from pathlib import Path
from vargpt.eval.checker import check_image
from vargpt.imageio import load_image

path = Path(sys.argv[1])
scores = {"t2i": [], "dpo chosen": [], "dpo rejected": []}
for line in path.read_text().splitlines():
    r = json.loads(line)
    prompt = r["messages"][0]["content"]
    if r["task"] == "t2i":
        scores["t2i"].append(check_image(load_image(path.parent / r["images"][0]), prompt)["score"])
    elif r["task"] == "dpo":
        for name, image in zip(("dpo chosen", "dpo rejected"), r["images"]):
            scores[name].append(check_image(load_image(path.parent / image), prompt)["score"])
for name, s in scores.items():
    print(f"checker score, {name:12s}: {sum(s) / len(s):.2f} over {len(s)} images")
PY
