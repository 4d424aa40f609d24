"""What a VAE's reconstructions get wrong, by the checker: 128 val text-to-image targets + 128 val edit targets
rendered at 64 px, reconstructed, parsed, and compared object by object with the parse of the original.

    python benchmarks/vae_scene_errors.py [MODEL_OR_VAE_DIR]   # a full model or a `vargpt train vae` output
"""

import collections
import sys

import numpy as np
import torch

from vargpt.data.scene import Scene, render
from vargpt.engine import to_pil
from vargpt.eval.checker import parse_scene, scenes_match
from vargpt.eval.tasks import edit_cases, t2i_cases
from vargpt.models.vargpt import VARGPT
from vargpt.training.vae import load_vae


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "src/vargpt/assets/tiny"
    try:
        vae = load_vae(path)[0].eval()
    except Exception:  # a full model directory
        vae = VARGPT.from_pretrained(path).vae_local
    scenes = [Scene.from_dict(c.target) for c in t2i_cases(128, split="val") + edit_cases(128, split="val")]
    counts: collections.Counter[str] = collections.Counter()
    with torch.no_grad():
        for i in range(0, len(scenes), 32):
            originals = [render(s, 64) for s in scenes[i:i + 32]]
            x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in originals]).float() / 127.5 - 1
            for orig, rec in zip(originals, to_pil(vae.decode(vae.quantize(x).quantized_BDHW).float()), strict=True):
                want, got = parse_scene(orig), parse_scene(rec)
                counts["scenes"] += 1
                if scenes_match(want, got):
                    counts["match"] += 1
                elif len(want.objects) != len(got.objects):
                    counts["object count differs"] += 1
                else:
                    for a, b in zip(want.objects, got.objects, strict=True):
                        for attr in ("shape", "colour", "size"):
                            if getattr(a, attr) != getattr(b, attr):
                                counts[f"{attr} {a.size} {getattr(a, attr)} -> {getattr(b, attr)}"] += 1
    for key, n in counts.most_common():
        print(n, key)


if __name__ == "__main__":
    main()
