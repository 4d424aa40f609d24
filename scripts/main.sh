#!/usr/bin/env bash
# Install vargpt (CPU build of torch) and run the main job on the embedded default.
# Today the main job builds a small ShapesWorld dataset and scores it with the deterministic checker;
# it grows into generate -> check as the embedded model lands (see the issues).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0" -e .
out=${OUT:-out/main}
vargpt data shapesworld --out "$out/shapesworld" --n 24 --split test --size 128 --seed 0
