"""VQA accuracy of a model when the text after the image is moved by DELTA M-RoPE positions (same tokens, position
ids only): how much its answers depend on where the question sits.

    python benchmarks/vqa_position_shift.py MODEL_DIR   # val split, 96 questions, DELTA in 0 1 2 4 8 20
"""

import statistics
import sys

from vargpt.eval.checker import score_answer
from vargpt.eval.tasks import vqa_cases
from vargpt.pipeline import VARGPTPipeline


def main() -> None:
    pipe = VARGPTPipeline.from_pretrained(sys.argv[1], device="cpu")
    pipe.progress = False
    inner = pipe.model.vlm.model
    rope_index = inner.get_rope_index
    image_id = pipe.model.vlm.config.image_token_id
    delta = 0

    def shifted(input_ids, *args, **kwargs):  # the positions after each row's last image token move by delta
        pos, deltas = rope_index(input_ids, *args, **kwargs)
        for b in range(input_ids.shape[0]):
            idx = (input_ids[b] == image_id).nonzero()
            if delta and len(idx):
                pos[:, b, int(idx[-1]) + 1:] += delta
        return pos, deltas + delta

    inner.get_rope_index = shifted  # this script's instance only
    cases = vqa_cases(96, split="val")
    for delta in (0, 1, 2, 4, 8, 20):
        acc = statistics.fmean(score_answer(pipe.chat(c.question, c.image, max_new_tokens=8), c.answer) for c in cases)
        print(f"delta {delta:2d}: accuracy {acc:.3f}", flush=True)


if __name__ == "__main__":
    main()
