"""A side experiment, not part of the product: the visual decoder conditioned on a class label instead of the LLM
(how fast does the tiny decoder learn positions and colours on its own?). Run from the repository root:

    python -m examples.class_decoder.train --out runs/cls --steps 2000
    python -m examples.class_decoder.evaluate --model runs/cls/model --vae runs/vae64 --samples-per-class 10
"""
