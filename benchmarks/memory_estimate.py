"""Peak accelerator memory of one official-preset text-to-image call (512 px, bf16), estimated on CPU.

What CUDA's ``max_memory_allocated`` would report is the weights plus the peak of every other live tensor. The
weights come from the full-size model built on the meta device (no memory). The rest is measured: the same call
(random prompt ids, the published sampling settings, `fill_random_` weights) runs on CPU at reduced depth (LLM
layers, decoder blocks) and full width, under a dispatch mode that adds up the bytes of every tensor storage an op
creates until its last tensor dies (parameters and buffers excluded), separately for the scale loop and the VAE
decode. The KV caches grow linearly with depth, so two depths give the per-layer cost and the full-depth peak by
extrapolation. Left out: the CUDA context (not allocated by PyTorch) and kernel workspaces.

    python benchmarks/memory_estimate.py [--batch 1] [--json out/memory_estimate.json]

Measured (2-core CPU, torch 2.13, 3 min): weights 20.39 GiB; loop peak 0.215 GiB at 1 LLM layer + 1 decoder
block, 0.311 GiB at 3 + 3 (0.048 GiB a pair: the bf16 KV caches of both CFG rows, 2,521 image tokens), VAE decode
peak 0.381 GiB; so ~1.67 GiB in the loop at full depth and ~22.06 GiB at batch 1. Of the weights, `sos_embedding`
is 0.58 GiB of which one row is ever read (the released layout keeps them all).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vargpt.bench_published import fill_random_
from vargpt.config import SamplingConfig, VARGPTConfig, official_config
from vargpt.engine import Engine
from vargpt.models.vargpt import VARGPT
from vargpt.processing import ByteTokenizer

GIB = 2**30


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created under this mode and still referenced; the peak per ``phase``."""

    def __init__(self, skip: set[int]) -> None:
        super().__init__()
        self.skip, self.refs, self.size = skip, {}, {}
        self.live, self.phase, self.peaks = 0, "loop", {}

    def _release(self, ptr: int) -> None:
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            self.live -= self.size.pop(ptr)
            del self.refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0 or ptr in self.skip:
                continue
            if ptr not in self.refs:
                self.refs[ptr], self.size[ptr] = 0, storage.nbytes()
                self.live += storage.nbytes()
                self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.live)
            self.refs[ptr] += 1
            weakref.finalize(t, self._release, ptr)
        return out


def shallow(cfg: VARGPTConfig, depth: int) -> VARGPTConfig:
    """``cfg`` with ``depth`` LLM layers and decoder blocks and one vision block (text-to-image never runs it)."""
    return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, num_hidden_layers=depth),
                               decoder=dataclasses.replace(cfg.decoder, depth=depth, block_chunks=1),
                               vision=dataclasses.replace(cfg.vision, depth=1))


def weight_bytes(cfg: VARGPTConfig, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of every top-level module's parameters and buffers at ``dtype`` (built on the meta device)."""
    with torch.device("meta"):
        model = VARGPT(cfg, device="meta", dtype=dtype, tokenizer=ByteTokenizer(cfg.tokens))
    return {name: sum(t.numel() * t.element_size() for t in [*mod.parameters(), *mod.buffers()])
            for name, mod in model.named_children()}


def measure(cfg: VARGPTConfig, batch: int, size: int) -> dict[str, float]:
    """Peak live non-weight bytes of one text-to-image call at ``cfg``'s size, per phase (loop, decode), in GiB."""
    model = VARGPT(cfg, device="cpu", dtype=torch.bfloat16, tokenizer=ByteTokenizer(cfg.tokens)).eval()
    with torch.no_grad():
        fill_random_(model.named_parameters(), seed=0)
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    engine = Engine(model)
    ids = torch.randint(0, 1000, (batch, 30), generator=torch.Generator().manual_seed(0))
    mode = LiveBytes(skip)
    decode = engine.decode

    def timed_decode(tokens):  # the same call, marked as the decode phase
        mode.phase = "decode"
        return decode(tokens)

    engine.decode = timed_decode
    with mode:
        engine.generate_images(input_ids=ids, attention_mask=torch.ones_like(ids), size=size, seed=0,
                               sampling=SamplingConfig(**dataclasses.asdict(cfg.sampling)))
    return {k: v / GIB for k, v in mode.peaks.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    full = official_config()
    weights = weight_bytes(full, torch.bfloat16)
    t0 = time.perf_counter()
    shallow_peaks = {d: measure(shallow(full, d), args.batch, args.size) for d in (1, 3)}
    per_layer = (shallow_peaks[3]["loop"] - shallow_peaks[1]["loop"]) / 2  # one LLM layer + one decoder block
    # the LLM and the decoder differ in depth: the per-pair cost is split by their cache widths (KV heads x head_dim
    # of the LLM, the decoder's width), which is what grows
    llm_w = 2 * full.llm.num_key_value_heads * (full.llm.hidden_size // full.llm.num_attention_heads)
    dec_w = 2 * full.decoder.embed_dim
    llm_share = llm_w / (llm_w + dec_w)
    loop = shallow_peaks[1]["loop"] + per_layer * (llm_share * (full.llm.num_hidden_layers - 1)
                                                   + (1 - llm_share) * (full.decoder.depth - 1))
    w = sum(weights.values()) / GIB
    report = {"batch": args.batch, "size": args.size, "dtype": "bfloat16",
              "weights_gib": round(w, 3), "weights_by_module_gib": {k: round(v / GIB, 3) for k, v in weights.items()},
              "measured_shallow_gib": {str(d): {k: round(v, 3) for k, v in peaks.items()}
                                       for d, peaks in shallow_peaks.items()},
              "loop_per_layer_pair_gib": round(per_layer, 4), "loop_full_depth_gib": round(loop, 3),
              "decode_gib": round(shallow_peaks[1]["decode"], 3),
              "peak_estimate_gib": round(w + max(loop, shallow_peaks[1]["decode"]), 3),
              "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
