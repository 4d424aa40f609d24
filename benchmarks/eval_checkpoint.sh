#!/usr/bin/env bash
# benchmarks/eval_checkpoint.sh CKPT_DIR BASE_MODEL_DIR TASK [vargpt eval args]: score a trainer checkpoint (its weights
# (the trainable modules only) over the base model's, the base's config; source_condition turned on when the
# checkpoint has source_embed; the run's recipe config_overrides applied) on the val split; prints the score and its groups. Written to /tmp/ckm.
set -e
ck=$1; base=$2; task=$3; shift 3
d=/tmp/ckm/$(echo $ck | tr '/' '_'); mkdir -p $d
cd "$(dirname "$0")/.."; [[ -f .venv/bin/activate ]] && . .venv/bin/activate
python - $ck $base $d <<'PY'
import sys, json, os
from safetensors.torch import load_file, save_file
ck, base, d = sys.argv[1:]
sd = load_file(f"{base}/model.safetensors"); sd.update(load_file(f"{ck}/model.safetensors"))
save_file(sd, f"{d}/model.safetensors")
c = json.load(open(f"{base}/config.json"))
if any(k.startswith("vargpt_gen.source_embed") for k in sd): c["decoder"]["source_condition"] = True
recipe = os.path.join(ck, "..", "..", "recipe.yaml")  # the run's config overrides (e.g. decoder.source_input)
if os.path.exists(recipe):
    import yaml
    for part, over in ((yaml.safe_load(open(recipe)).get("model") or {}).get("config_overrides") or {}).items():
        if isinstance(over, dict):
            c.setdefault(part, {}).update(over)
        else:  # a top-level field (e.g. text_loss_mean)
            c[part] = over
json.dump(c, open(f"{d}/config.json", "w"))
for f in ("tokenizer.json", "preprocessor_config.json"):
    if not os.path.exists(f"{d}/{f}"): os.symlink(os.path.realpath(f"{base}/{f}"), f"{d}/{f}")
PY
OMP_NUM_THREADS=1 python -m vargpt eval $task --model $d --json $d/$task.json --split val --device cpu "$@" 2>&1 | tail -1 | grep -i error || true
python - $d/$task.json <<'PY'
import json,sys; r=json.load(open(sys.argv[1]))
print({k:(round(v['mean'],3) if isinstance(v,dict) and 'mean' in v else v) for k,v in r.items() if k in ('score','satisfied','preserved','accuracy')}, {k:round(v,2) for k,v in r.get('by_group',{}).items()})
PY
