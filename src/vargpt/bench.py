"""`vargpt bench`: how fast our implementation generates, understands, encodes and trains, next to the published one.

Contract
--------
`run_bench(BenchConfig) -> dict` times, on one preset's weights, warm-up excluded and the median of ``runs``:

* text-to-image latency at batch 1 and throughput (images/s) at batch 1, 4 and 16 (``quick``: batch 1 only), each
  with and without the VAE decode (timed apart inside the same call);
* understanding: prefill tokens/s (prompt tokens / time of a 1-token answer, vision tower included) and decode
  tokens/s ((N - 1) / (time of an N-token answer - time of a 1-token answer)), greedy, the end token suppressed so
  that every answer has exactly N tokens;
* the VAE alone: encode (to multi-scale bits) and decode (codes -> pixels) images/s at batch 1;
* one training step (`training_losses` + backward + AdamW, batch 1; on the official preset forward + backward only:
  the optimiser state of 11 B parameters does not fit beside them);

and records device, dtype, threads, torch version, CPU model and the peak memory of every row (CUDA
``max_memory_allocated``, or the resident-set peak on CPU). Every row is timed in wall seconds and in process CPU
seconds (``derived_cpu``, ``speedup_vs_published_cpu_time``: on a loaded CPU with one thread, what a run costs
without the waits other work adds). It writes the JSON report and a markdown table beside it (same name, ``.md``).

Presets: ``tiny`` (default) = the embedded default model (or ``model_dir``) at its own size; ``fixture`` = the
conformance fixtures' tiny random weights (../shared/fixtures/official) with the fixture's own prompts and inputs at
256 px, the published code's 0.06M schedule; ``official`` = the released architecture at full size with deterministic
random weights (`vargpt.bench_published.fill_random_`), 512 px (0.25M), meant for a GPU.

The published baseline (``baseline_python`` + ``baseline_src``): `vargpt.bench_published` run as a subprocess by
the published code's own Python, on the same weights (fixture: the same file; official: the same random recipe,
checked by a signature of names, shapes and values) and the same inputs (a workload file this module writes).
The published code generates one image at a time: its throughput is 1 / its latency. ``speedup_vs_published``
divides its times by ours (> 1: ours is faster).

For the official preset the report adds the lower bound of one 512 px image (`image_bound`: matmul FLOPs and
weight bytes from the config sizes and the token counts, at a GPU's peak) and how far each row is from it.

The model is called only in the adapter section below (`Engine`, `vargpt.training.objective` and the VAE),
so the rest does not depend on how the model is run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vargpt.bench_published import PeakMemory, SectionTimer, environment, measure, same_weights, sync
from vargpt.config import VARGPTConfig, official_config, official_fixture_config
from vargpt.errors import InputError, VargptError
from vargpt.runtime import resolve_device, resolve_dtype
from vargpt.scales import PIXEL_BUDGETS, padded_tokens, schedule_for_size

__all__ = ["BenchConfig", "GPU_PEAKS", "image_bound", "markdown_table", "run_bench"]

PRESETS = ("tiny", "fixture", "official")
BATCHES = (1, 4, 16)
PUBLISHED_SEED = 1234567  # the published sampler's seed under the harness's frozen clock (fixture (b))
# bf16 dense matmul FLOP/s and memory bytes/s (vendor peak figures); the bound uses the device's or --peak's
GPU_PEAKS: dict[str, tuple[float, float]] = {
    "H100": (989.4e12, 3.35e12), "H200": (989.4e12, 4.8e12), "A100": (312e12, 2.039e12),
    "L40S": (362e12, 0.864e12), "4090": (165e12, 1.008e12),
}
DEFAULT_PEAK = "H100"
REPO = Path(__file__).resolve().parents[2]
DEFAULT_FIXTURES = REPO.parent / "shared" / "fixtures" / "official"
DEFAULT_HARNESS = REPO.parent / "shared" / "official-harness"
PUBLISHED_SCRIPT = Path(__file__).resolve().parent / "bench_published.py"


@dataclass
class BenchConfig:
    """What `vargpt bench` runs (its options; see the module docstring and docs/bench.md)."""

    json_path: Path
    preset: str = "tiny"
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None  # None: torch's default
    runs: int = 5
    warmup: int = 1
    quick: bool = False  # batch 1 only, 8 answer tokens
    size: int | None = None  # tiny: the model's; fixture 256; official 512
    new_tokens: int | None = None  # understanding answer length (32; official 64; quick 8)
    model_dir: Path | None = None  # tiny preset: a model directory instead of the embedded default
    fixtures: Path | None = None
    baseline_python: Path | None = None
    baseline_src: Path | None = None
    baseline_harness: Path | None = None
    baseline_variant: str = "fp32"
    baseline_timeout: float | None = None  # seconds; past it the report says so and keeps our rows
    peak: str | None = None  # a GPU_PEAKS name or "TFLOPS,TB/s"
    skip_train: bool = False
    profile: Path | None = None  # a torch.profiler summary of one batch-1 text-to-image call, written here
    progress: bool = True

    def validate(self) -> BenchConfig:
        if self.preset not in PRESETS:
            raise InputError(f"--preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
        if self.runs < 1 or self.warmup < 0:
            raise InputError("--runs must be >= 1 and --warmup >= 0")
        if (self.baseline_python is None) != (self.baseline_src is None):
            raise InputError("the baseline needs both --baseline-python PY and --baseline-src DIR")
        if self.baseline_python is not None:
            if not Path(self.baseline_python).exists():
                raise InputError(f"--baseline-python {self.baseline_python}: no such file (the published code's "
                                 "environment; build one with ../shared/official-harness/setup.sh)")
            if not Path(self.baseline_src).is_dir():
                raise InputError(f"--baseline-src {self.baseline_src}: no such directory")
            harness = self.harness_dir()
            if not (harness / "official_env.py").is_file():
                raise InputError(f"{harness} has no official_env.py; pass --baseline-harness DIR (the official "
                                 "harness folder)")
        if self.baseline_timeout is not None and self.baseline_timeout <= 0:
            raise InputError(f"--baseline-timeout must be > 0 seconds, got {self.baseline_timeout}")
        if self.baseline_variant not in ("fp32", "autocast_bf16"):
            raise InputError(f"--baseline-variant {self.baseline_variant!r}: fp32 or autocast_bf16")
        return self

    def harness_dir(self) -> Path:
        return Path(self.baseline_harness) if self.baseline_harness is not None else DEFAULT_HARNESS

    def fixtures_dir(self) -> Path:
        d = Path(self.fixtures) if self.fixtures is not None else DEFAULT_FIXTURES
        if not (d / "tiny_config.json").is_file():
            raise InputError(f"{d}: no conformance fixture set (tiny_config.json); pass --fixtures DIR")
        return d


@dataclass
class Workload:
    """The inputs both sides run on (written to a safetensors file for the published side)."""

    preset: str
    size: int
    pn: str | None  # the published code's pixel budget for this size (None: not one of its schedules)
    new_tokens: int
    seed: int
    tensors: dict[str, Tensor]
    prompt_text: str | None = None  # tiny: the prompt goes through the model's own chat template
    notes: list[str] = field(default_factory=list)

    def save(self, path: Path) -> Path:
        from safetensors.torch import save_file

        meta = {"preset": self.preset, "size": self.size, "pn": self.pn, "new_tokens": self.new_tokens,
                "seed": self.seed}
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(path), metadata={"bench": json.dumps(meta)})
        return path


# ----------------------------------------------------------------------------------------------- adapter
# The only code that calls the model: loading, text-to-image, understanding, the VAE, one training step.


def load_model(cfg: BenchConfig, device: torch.device, dtype: torch.dtype) -> tuple[Any, dict | None]:
    """The model of the preset on ``device`` in ``dtype`` and, for random weights, their signature."""
    if cfg.preset == "tiny":
        from vargpt.pipeline import VARGPTPipeline

        return VARGPTPipeline.from_pretrained(cfg.model_dir, device=device, dtype=dtype, progress=False).model, None
    from vargpt.models.vargpt import VARGPT

    if cfg.preset == "fixture":
        d = cfg.fixtures_dir()
        return VARGPT.from_pretrained(d, config=official_fixture_config(d / "tiny_config.json"),
                                      weights=d / "tiny_weights.safetensors", device=device, dtype=dtype), None
    from vargpt.bench_published import fill_random_
    from vargpt.processing import ByteTokenizer

    config = official_config()
    # byte tokenizer: only token ids go in, and generate() wants a processor to turn its answer into text
    model = VARGPT(config, device=device, dtype=dtype, tokenizer=ByteTokenizer(config.tokens))
    return model.eval(), fill_random_(model.named_parameters(), seed=0)


def model_config(model: Any) -> VARGPTConfig:
    return model.config


def model_processor(model: Any) -> Any:
    return model.require_processor()


def t2i(model: Any, work: Workload, batch: int, device: torch.device) -> Callable[[], dict[str, float]]:
    """One call of `Engine.generate_images` for ``batch`` images; returns its VAE decode seconds and the rest."""
    from vargpt.config import SamplingConfig
    from vargpt.engine import Engine

    engine = Engine(model)

    sampling = SamplingConfig(**dataclasses.asdict(model.config.sampling))
    kwargs: dict[str, Any] = dict(size=work.size, seed=work.seed, sampling=sampling)
    if work.prompt_text is not None:
        kwargs["prompts"] = [work.prompt_text] * batch
    else:
        kwargs["input_ids"] = work.tensors["t2i_prompt_ids"].repeat(batch, 1).to(device)

    def run() -> dict[str, float]:
        t, c = time.perf_counter(), time.process_time()
        with SectionTimer(model.vae_local, "decode", device) as dec:
            out = engine.generate_images(**kwargs)
        total, total_cpu = time.perf_counter() - t, time.process_time() - c
        if dec.calls == 0:
            raise RuntimeError("no VAE decode seen inside generate_images: re-point vargpt.bench.t2i at the engine's "
                               "decode step")
        if out.images.shape[0] != batch:
            raise RuntimeError(f"generate_images made {out.images.shape[0]} images, not {batch}")
        return {"vae_decode_s": dec.seconds, "excl_vae_s": total - dec.seconds, "vae_decode_cpu_s": dec.cpu_seconds,
                "excl_vae_cpu_s": total_cpu - dec.cpu_seconds}

    return run


def understand(model: Any, work: Workload, new_tokens: int, device: torch.device) -> Callable[[], None]:
    """A greedy answer of exactly ``new_tokens`` tokens (end token suppressed) about the workload's image."""
    from transformers import LogitsProcessor

    from vargpt.engine import Engine

    engine, im_end = Engine(model), model.config.tokens.im_end

    class NoEnd(LogitsProcessor):
        def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
            scores[:, im_end] = -float("inf")
            return scores

    w = work.tensors
    ids = w["und_input_ids"].to(device)

    def run() -> None:
        engine.generate_text(ids, torch.ones_like(ids), w["und_pixel_values"].to(device),
                             w["und_image_grid_thw"].to(device), max_new_tokens=new_tokens, images=False,
                             logits_processor=[NoEnd()])

    return run


def vae_encode(model: Any, work: Workload, device: torch.device) -> Callable[[], None]:
    x = work.tensors["vae_x"].to(device=device, dtype=model.dtype)

    def run() -> None:
        with torch.no_grad():
            model.vae_local.encode(x)

    return run


def vae_decode(model: Any, work: Workload, device: torch.device) -> Callable[[], None]:
    """The VAE decode as `Engine.decode` runs it (channels-last activations)."""
    z = work.tensors["vae_codes"].to(device=device, dtype=model.dtype)

    def run() -> None:
        with torch.no_grad():
            model.vae_local.decode(z, channels_last=True)

    return run


def train_step(model: Any, work: Workload, device: torch.device, optimizer: bool) -> Callable[[], None]:
    """What the trainer does per step: `vargpt.training.objective.training_losses` + backward (+ AdamW step)."""
    from vargpt.training.objective import training_losses

    batch = {k: work.tensors[f"train_{k}"].to(device) for k in ("input_ids", "attention_mask", "labels")}
    batch["gen_pixel_values"] = work.tensors["train_gen_pixel_values"].to(device=device, dtype=model.dtype)
    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5) if optimizer else None

    def run() -> None:
        training_losses(model, batch)["loss"].backward()
        if opt is not None:
            opt.step()
        model.zero_grad(set_to_none=True)

    return run


def vae_cost(config: VARGPTConfig, size: int) -> dict[str, float]:
    """Matmul/conv FLOPs of one VAE encode and decode at ``size`` px and the decoder's parameter count, counted on
    the meta device (no memory, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vargpt.models.vae import BSQVAE

    with torch.device("meta"):
        vae = BSQVAE(config.vae)
    grid = size // config.vae.stride
    with FlopCounterMode(display=False) as dec:
        vae.decoder(torch.empty(1, config.vae.codebook_dim, grid, grid, device="meta"))
    with FlopCounterMode(display=False) as enc:
        vae.encoder(torch.empty(1, config.vae.in_channels, size, size, device="meta"))
    return {"decode_flops": float(dec.get_total_flops()), "encode_flops": float(enc.get_total_flops()),
            "decoder_params": float(sum(p.numel() for p in vae.decoder.parameters()))}


# ----------------------------------------------------------------------------------------------- workloads


def synth_image(h: int, w: int, seed: int) -> np.ndarray:
    """A deterministic RGB test image (gradients, a few rectangles, light noise), uint8 HWC."""
    rs = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([255 * x / max(1, w - 1), 255 * y / max(1, h - 1), 127 + 100 * np.sin((x + y) / 9.0)], -1)
    for _ in range(4):
        y0, x0 = rs.randint(0, h // 2), rs.randint(0, w // 2)
        img[y0:y0 + h // 3, x0:x0 + w // 3] = rs.randint(0, 256, size=3)
    img += rs.randn(h, w, 3) * 8
    return np.clip(img, 0, 255).astype(np.uint8)


def _pixels(img: np.ndarray) -> Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)[None].float().div(127.5).sub(1)


def _pn(size: int, stride: int) -> str | None:
    n = len(schedule_for_size(size, size, stride))
    return next((name for name, k in PIXEL_BUDGETS.items() if k == n), None)


def _codes(config: VARGPTConfig, size: int) -> Tensor:
    g = torch.Generator().manual_seed(0)
    D, grid = config.vae.codebook_dim, size // config.vae.stride
    return (torch.randint(0, 2, (1, D, grid, grid), generator=g).float() * 2 - 1) / math.sqrt(D)


def build_workload(cfg: BenchConfig, config: VARGPTConfig, processor: Any | None) -> Workload:
    from safetensors.torch import load_file

    quick_tokens = 8 if cfg.quick else None
    if cfg.preset == "fixture":
        d = cfg.fixtures_dir()
        a, b, c, dd = (load_file(d / f"{n}.safetensors") for n in ("a_understanding", "b_t2i", "c_vae", "d_train"))
        size = cfg.size or 256
        t = {"t2i_prompt_ids": b["input_ids"], "und_input_ids": a["input_ids"], "und_pixel_values": a["pixel_values"],
             "und_image_grid_thw": a["image_grid_thw"], "vae_x": c["x"], "vae_codes": c["quantized_summed"],
             "train_input_ids": dd["input_ids"], "train_attention_mask": dd["attention_mask"],
             "train_labels": dd["labels"], "train_gen_pixel_values": dd["pixel_gen_values"]}
        if size != 256:
            t["vae_x"], t["vae_codes"] = _pixels(synth_image(size, size, 2)), _codes(config, size)
            for k in [k for k in t if k.startswith("train_")]:
                del t[k]  # the fixture's training sample is a 256 px one
        return Workload("fixture", size, _pn(size, config.vae.stride), cfg.new_tokens or quick_tokens or 32,
                        PUBLISHED_SEED, t,
                        notes=["fixture prompts and inputs: (b) t2i prompt, (a) understanding image + question, (c) "
                               "VAE image and codes, (d) training sample"])
    if cfg.preset == "official":
        from vargpt.processing import ByteTokenizer, VARGPTProcessor

        size = cfg.size or 512
        tok = config.tokens
        proc = processor or VARGPTProcessor(ByteTokenizer(tok), config)
        g = torch.Generator().manual_seed(1)
        # ordinary text ids below the special tokens (150000 at full size), as the harness's gpu_anchor
        body = torch.randint(0, min(150000, tok.endoftext), (24,), generator=g).tolist()
        prompt = [tok.im_start] + body + [tok.im_end, tok.im_start] + body[:3]
        pix = proc.preprocess_images([Image.fromarray(synth_image(448, 448, 1))])
        n_img = int(pix["image_grid_thw"].prod()) // config.vision.spatial_merge_size ** 2
        und = ([tok.im_start, 10, 20, tok.vision_start] + [tok.image_pad] * n_img
               + [tok.vision_end, 30, 40, tok.im_end, tok.im_start, 50])
        slots = padded_tokens(schedule_for_size(size, size, config.vae.stride), config.decoder.pad_to_multiplier)
        train = prompt + [tok.image_gen_start] + [tok.image_gen_pad] * slots + [tok.image_gen_end, tok.im_end]
        train_ids = torch.tensor([train])
        t = {"t2i_prompt_ids": torch.tensor([prompt]), "und_input_ids": torch.tensor([und]),
             "und_pixel_values": pix["pixel_values"], "und_image_grid_thw": pix["image_grid_thw"],
             "vae_x": _pixels(synth_image(size, size, 2)), "vae_codes": _codes(config, size),
             "train_input_ids": train_ids, "train_attention_mask": torch.ones_like(train_ids),
             "train_labels": train_ids.clone(), "train_gen_pixel_values": _pixels(synth_image(size, size, 3))}
        return Workload("official", size, _pn(size, config.vae.stride), cfg.new_tokens or quick_tokens or 64,
                        PUBLISHED_SEED, t, notes=["official: random prompt ids and a 448 px image, as the harness's "
                                                  "gpu_anchor; deterministic random weights"])
    # tiny: the embedded default through its own tokenizer and chat template
    from vargpt.processing import VARGPTProcessor

    size = cfg.size or config.image_size
    und = processor("<image>\nDescribe the image.", [Image.fromarray(synth_image(64, 64, 1))])
    schedule = schedule_for_size(size, size, config.vae.stride)
    train_proc = VARGPTProcessor(processor.tokenizer, dataclasses.replace(
        config, image_gen_token_num=padded_tokens(schedule, config.decoder.pad_to_multiplier)))
    target = Image.fromarray(synth_image(size, size, 3))
    sample = train_proc.pad([train_proc.training_inputs(
        [{"role": "user", "content": "a red circle"}, {"role": "assistant", "content": "<image_gen>"}], [target])],
        padding_side="right")
    t = {"und_input_ids": und["input_ids"], "und_pixel_values": und["pixel_values"],
         "und_image_grid_thw": und["image_grid_thw"], "vae_x": _pixels(synth_image(size, size, 2)),
         "vae_codes": _codes(config, size), "train_input_ids": sample["input_ids"],
         "train_attention_mask": sample["attention_mask"], "train_labels": sample["labels"],
         "train_gen_pixel_values": _pixels(np.array(target))}
    return Workload("tiny", size, _pn(size, config.vae.stride), cfg.new_tokens or quick_tokens or 32, 0, t,
                    prompt_text="a red circle")


# ----------------------------------------------------------------------------------------------- the bound


def resolve_peak(spec: str | None, device_name: str) -> dict[str, Any]:
    """Peak FLOP/s and bytes/s for the bound: ``spec`` (a GPU_PEAKS name or "TFLOPS,TB/s"), else the device's name
    if known, else H100 (the figure the acceptance quotes)."""
    if spec:
        if spec in GPU_PEAKS:
            return {"name": spec, "flops": GPU_PEAKS[spec][0], "bytes_per_s": GPU_PEAKS[spec][1]}
        try:
            tf, tb = (float(v) for v in spec.split(","))
        except ValueError:
            raise InputError(f"--peak {spec!r}: a GPU name ({', '.join(GPU_PEAKS)}) or TFLOPS,TB/s") from None
        return {"name": "custom", "flops": tf * 1e12, "bytes_per_s": tb * 1e12}
    name = next((k for k in GPU_PEAKS if k in device_name), DEFAULT_PEAK)
    return {"name": name, "flops": GPU_PEAKS[name][0], "bytes_per_s": GPU_PEAKS[name][1]}


def image_bound(config: VARGPTConfig, size: int, prompt_tokens: int, *, peak: dict[str, Any],
                bytes_per_param: int = 2, cfg_rows: int = 2, vae: dict[str, float] | None = None,
                understanding: tuple[int, int] | None = None) -> dict[str, Any]:
    """Lower bounds of one ``size`` px image (docs/bench.md, "The bound").

    FLOPs: every matmul the computation needs, 2 per multiply-add: the LLM over the prompt once and over the L image
    tokens of every scale in ``cfg_rows`` rows (conditional + unconditional), the projectors and the visual decoder
    (self-attention, cross-attention query/output, FFN, head) over the same tokens, the attention scores and
    values (causal within a scale in the LLM as published, the published unconditional branch sees only its own
    scale; the decoder attends to every earlier scale and the whole current one), and the VAE decode. Norms,
    activations, sampling and the KV cache traffic are left out (a lower bound).
    Weight bytes: every scale must read the LLM layers, the projectors and the decoder blocks once (the batch and
    both CFG rows share the read); the cross-attention K/V projections and the VAE decoder are read once.
    Time >= max(FLOPs / peak FLOP/s, bytes / peak bandwidth); at batch B the FLOPs scale with B, the weight bytes
    do not. ``understanding`` = (prompt tokens, image patches) adds the prefill and per-token decode bounds.
    """
    llm, dec, vis = config.llm, config.decoder, config.vision
    H, I = llm.hidden_size, llm.intermediate_size
    hd = H // llm.num_attention_heads
    kv = llm.num_key_value_heads * hd
    llm_w = llm.num_hidden_layers * (2 * H * H + 2 * H * kv + 3 * H * I)  # q, o; k, v; gate, up, down
    C, F, D = dec.embed_dim, dec.ffn_hidden, config.vae.codebook_dim
    dec_w = dec.depth * (4 * C * C + 2 * C * C + 2 * C * F)  # self-attn qkv + proj, cross q + proj, FFN
    dec_ctx_w = dec.depth * 2 * C * C  # cross-attention K/V of the context, once per image
    proj_w = (C * C + C * H) + (H * H + H * C)  # image_gen_projector (C -> H) and image_gen_projector_out (H -> C)
    head_w = C * 2 * D + D * C  # bit head (2 logits per bit) and the next-scale input embedding
    per_token_w = llm_w + dec_w + proj_w + head_w
    schedule = schedule_for_size(size, size, config.vae.stride)
    n = [h * w for _, h, w in schedule]
    L, K, P = sum(n), len(n), prompt_tokens
    offsets = [sum(n[:k]) for k in range(K)]
    # attention: query-key pairs (x 4 x width x layers FLOPs: scores and weighted values)
    llm_pairs = P * (P + 1) / 2 + sum(m * (P + o) + m * (m + 1) / 2 for m, o in zip(n, offsets, strict=True))
    llm_pairs_uncond = sum(m * (m + 1) / 2 for m in n) * (cfg_rows - 1)
    dec_pairs = cfg_rows * sum(m * (o + m) for m, o in zip(n, offsets, strict=True))
    vae = vae or {"decode_flops": 0.0, "encode_flops": 0.0, "decoder_params": 0.0}
    flops = {
        "llm_matmul": 2.0 * llm_w * (P + cfg_rows * L),
        "llm_attention": 4.0 * H * llm.num_hidden_layers * (llm_pairs + llm_pairs_uncond),
        "decoder_matmul": 2.0 * ((dec_w + proj_w + head_w) * cfg_rows * L + (dec_ctx_w + H * H + H * C) * P * cfg_rows),
        "decoder_attention": 4.0 * C * dec.depth * (dec_pairs + cfg_rows * L * P),
        "vae_decode": vae["decode_flops"],
    }
    flops_excl_vae = sum(v for k, v in flops.items() if k != "vae_decode")
    flops_total = flops_excl_vae + flops["vae_decode"]
    bytes_excl_vae = bytes_per_param * (K * per_token_w + dec_ctx_w)
    bytes_total = bytes_excl_vae + bytes_per_param * vae["decoder_params"]
    pf, bw = peak["flops"], peak["bytes_per_s"]

    def per_batch(b: int, fl: float, by: float) -> float:  # seconds for a batch of b images
        return max(b * fl / pf, by / bw)

    out: dict[str, Any] = {
        "assumptions": {"peak": peak, "bytes_per_param": bytes_per_param, "size": size, "scales": K,
                        "image_tokens": L, "prompt_tokens": P, "cfg_rows": cfg_rows,
                        "weights_read_per_scale": per_token_w},
        "flops": flops | {"total": flops_total, "total_excl_vae": flops_excl_vae},
        "weight_bytes": {"per_batch": bytes_total, "per_batch_excl_vae": bytes_excl_vae},
        "t2i_batch1_s": per_batch(1, flops_total, bytes_total),
        "t2i_batch1_excl_vae_s": per_batch(1, flops_excl_vae, bytes_excl_vae),
        "t2i_batch1_flop_s": flops_total / pf, "t2i_batch1_bytes_s": bytes_total / bw,
        "images_per_s": {str(b): b / per_batch(b, flops_total, bytes_total) for b in BATCHES},
        "images_per_s_excl_vae": {str(b): b / per_batch(b, flops_excl_vae, bytes_excl_vae) for b in BATCHES},
        "vae_decode_images_per_s": pf / vae["decode_flops"] if vae["decode_flops"] else None,
        "vae_encode_images_per_s": pf / vae["encode_flops"] if vae["encode_flops"] else None,
    }
    if understanding is not None:
        prompt, patches = understanding
        E = vis.embed_dim
        vit_w = vis.depth * (4 * E * E + 2 * E * round(E * vis.mlp_ratio))
        m2 = vis.spatial_merge_size ** 2
        merger_w = (m2 * E) ** 2 + m2 * E * H
        prefill = 2.0 * (vit_w * patches + merger_w * patches / m2 + llm_w * prompt + H * llm.vocab_size)
        out["understanding_prefill_tokens_per_s"] = prompt / max(prefill / pf, bytes_per_param * (
            vit_w + merger_w + llm_w + H * llm.vocab_size) / bw)
        out["understanding_decode_tokens_per_s"] = bw / (bytes_per_param * (llm_w + H * llm.vocab_size))
    return out


# ----------------------------------------------------------------------------------------------- running


def _log(cfg: BenchConfig, msg: str) -> None:
    if cfg.progress:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _row(cfg: BenchConfig, name: str, fn: Callable[[], Any], device: torch.device,
         memory: PeakMemory) -> dict[str, Any]:
    _log(cfg, f"{name} ...")
    try:
        return measure(fn, runs=cfg.runs, warmup=cfg.warmup, device=device, memory=memory)
    except Exception as e:  # one failing row must not lose the others
        if isinstance(e, VargptError):
            raise
        return {"error": f"{type(e).__name__}: {e}"[:800]}


def measure_ours(cfg: BenchConfig, model: Any, work: Workload, device: torch.device) -> dict[str, Any]:
    memory = PeakMemory(device)
    batches = (1,) if cfg.quick else BATCHES
    rows: dict[str, Any] = {}
    with torch.no_grad():
        for b in batches:
            rows[f"t2i_batch{b}"] = _row(cfg, f"t2i batch {b}", t2i(model, work, b, device), device, memory)
        rows["understanding_prefill"] = _row(cfg, "understanding prefill", understand(model, work, 1, device), device,
                                             memory)
        rows["understanding_full"] = _row(cfg, f"understanding {work.new_tokens} tokens",
                                          understand(model, work, work.new_tokens, device), device, memory)
        rows["vae_encode"] = _row(cfg, "VAE encode", vae_encode(model, work, device), device, memory)
        rows["vae_decode"] = _row(cfg, "VAE decode", vae_decode(model, work, device), device, memory)
    if not cfg.skip_train and "train_input_ids" in work.tensors:
        optimizer = cfg.preset != "official"
        rows["train_step"] = _row(cfg, "training step", train_step(model, work, device, optimizer), device, memory)
        rows["train_step"]["optimizer"] = "AdamW" if optimizer else "none (forward + backward)"
        rows["train_step"]["batch"] = int(work.tensors["train_input_ids"].shape[0])
    return rows


def write_profile(path: Path, fn: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """One warmed-up call of ``fn`` under torch.profiler: a summary (wall and CPU seconds, operator calls, kernel
    launches, the device's busy time: wall minus busy is launch and host overhead, what CUDA graphs would remove) and
    the top operators by device (on CPU: CPU) time, written to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t, c = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
    averages = prof.key_averages()
    busy_us = sum(getattr(e, "self_device_time_total", 0) for e in averages) if cuda else 0.0
    summary = {"wall_s": round(wall, 4), "process_cpu_s": round(cpu, 4),
               "operator_calls": sum(e.count for e in averages if e.key.startswith("aten::")),
               "kernel_launches": sum(e.count for e in averages if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                                              "cudaLaunchKernelExC")),
               "device_busy_s": round(busy_us / 1e6, 4)}
    table = averages.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=40)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("one text-to-image call, batch 1, after one warm-up: " + json.dumps(summary) + "\n\n" + table)
    return summary


def derive(rows: dict[str, Any], prompt_tokens: int, new_tokens: int, clock: str = "wall") -> dict[str, Any]:
    """Latencies, images/s and tokens/s from the timed rows (the same for both sides), by ``clock``: "wall" (the
    medians of elapsed time) or "cpu" (the medians of process CPU time)."""
    med, sub = ("median_s", "_s") if clock == "wall" else ("cpu_median_s", "_cpu_s")

    def ok(name: str) -> dict[str, Any] | None:
        r = rows.get(name)
        return r if isinstance(r, dict) and med in r else None

    out: dict[str, Any] = {"t2i": {}}
    for name in [k for k in rows if k.startswith("t2i_batch")]:
        r = ok(name)
        if r is None:
            continue
        b, vae = int(name.removeprefix("t2i_batch")), r.get(f"vae_decode{sub}")
        excl = r.get(f"excl_vae{sub}", r[med] - (vae or 0.0))
        out["t2i"][str(b)] = {"latency_s": r[med] / b, "latency_excl_vae_s": excl / b, "vae_decode_s": vae,
                              "images_per_s": b / r[med], "images_per_s_excl_vae": b / excl if excl > 0 else None}
    pre, full = ok("understanding_prefill"), ok("understanding_full")
    und: dict[str, Any] = {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens}
    if pre:
        und["prefill_tokens_per_s"] = prompt_tokens / pre[med]
    if pre and full and new_tokens > 1 and full[med] > pre[med]:
        und["decode_tokens_per_s"] = (new_tokens - 1) / (full[med] - pre[med])
    out["understanding"] = und
    for name in ("vae_encode", "vae_decode"):
        r = ok(name)
        out[f"{name}_images_per_s"] = 1.0 / r[med] if r else None
    r = ok("train_step")
    out["train_step_s"] = r[med] if r else None
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def speedups(ours: dict[str, Any], pub: dict[str, Any] | None) -> dict[str, float | None]:
    """Published time / our time for each comparable row (> 1: ours is faster). The published code makes one image
    per call, so its throughput at any batch is 1 / its batch-1 latency."""
    keys = ("t2i_batch1", "t2i_batch1_excl_vae", "t2i_batch16_throughput", "t2i_batch16_throughput_excl_vae",
            "understanding_prefill", "understanding_decode", "vae_encode", "vae_decode", "train_step")
    if not pub:
        return dict.fromkeys(keys)
    o1, p1 = ours["t2i"].get("1", {}), pub["t2i"].get("1", {})
    o16 = ours["t2i"].get("16", {})
    ou, pu = ours["understanding"], pub["understanding"]
    return {
        "t2i_batch1": _ratio(p1.get("latency_s"), o1.get("latency_s")),
        "t2i_batch1_excl_vae": _ratio(p1.get("latency_excl_vae_s"), o1.get("latency_excl_vae_s")),
        "t2i_batch16_throughput": _ratio(o16.get("images_per_s"), p1.get("images_per_s")),
        "t2i_batch16_throughput_excl_vae": _ratio(o16.get("images_per_s_excl_vae"), p1.get("images_per_s_excl_vae")),
        "understanding_prefill": _ratio(ou.get("prefill_tokens_per_s"), pu.get("prefill_tokens_per_s")),
        "understanding_decode": _ratio(ou.get("decode_tokens_per_s"), pu.get("decode_tokens_per_s")),
        "vae_encode": _ratio(ours.get("vae_encode_images_per_s"), pub.get("vae_encode_images_per_s")),
        "vae_decode": _ratio(ours.get("vae_decode_images_per_s"), pub.get("vae_decode_images_per_s")),
        "train_step": _ratio(pub.get("train_step_s"), ours.get("train_step_s")),
    }


def run_baseline(cfg: BenchConfig, work: Workload, device: torch.device, tmp: Path) -> dict[str, Any]:
    """`vargpt.bench_published` under the published code's Python; its JSON (stdout's last line)."""
    wpath = work.save(tmp / "workload.safetensors")
    weights = (str(cfg.fixtures_dir() / "tiny_weights.safetensors") if cfg.preset == "fixture" else "random:0")
    cmd = [str(cfg.baseline_python), str(PUBLISHED_SCRIPT), "--workload", str(wpath),
           "--harness", str(cfg.harness_dir()), "--src", str(cfg.baseline_src), "--weights", weights,
           "--config", "full" if cfg.preset == "official" else "tiny", "--runs", str(cfg.runs),
           "--warmup", str(cfg.warmup), "--threads", str(cfg.threads or 0), "--device", str(device),
           "--variant", cfg.baseline_variant] + (["--skip-train"] if cfg.skip_train else [])
    _log(cfg, "published baseline: " + " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.baseline_timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the published baseline ran past --baseline-timeout {cfg.baseline_timeout:g} s and was "
                           "stopped; give it more time, or --runs fewer") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-1500:]
        raise RuntimeError(f"the published baseline failed (exit {proc.returncode}): {tail}")
    return json.loads(lines[-1])


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Time ours (and the published code), write ``cfg.json_path`` and the markdown table beside it."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    t0 = time.perf_counter()
    _log(cfg, f"loading the {cfg.preset} model on {device} ({str(dtype).removeprefix('torch.')})")
    model, signature = load_model(cfg, device, dtype)
    config = model_config(model)
    load_s = time.perf_counter() - t0
    processor = model_processor(model) if cfg.preset == "tiny" else None
    work = build_workload(cfg, config, processor)
    if cfg.preset in ("fixture", "official") and signature is None:
        from vargpt.bench_published import weights_signature

        signature = weights_signature(model.named_parameters())
    rows = measure_ours(cfg, model, work, device)
    if cfg.profile is not None:
        write_profile(cfg.profile, t2i(model, work, 1, device), device)
        _log(cfg, f"wrote {cfg.profile}")
    prompt_tokens = int(work.tensors["und_input_ids"].shape[1])
    ours = {"implementation": "vargpt", "dtype": str(dtype).removeprefix("torch."), "load_s": round(load_s, 3),
            "weights_signature": signature, "rows": rows}
    ours["derived"] = derive(rows, prompt_tokens, work.new_tokens)
    ours["derived_cpu"] = derive(rows, prompt_tokens, work.new_tokens, clock="cpu")
    env = environment(device) | {"dtype": ours["dtype"], "peak_mem_kind": PeakMemory(device).kind}
    del model  # the published side may need the memory (full size, fp32: 44 GB)
    if device.type == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()

    t2i_tokens = int(work.tensors["t2i_prompt_ids"].shape[1]) + 1 if "t2i_prompt_ids" in work.tensors else None
    path = Path(cfg.json_path)
    notes = work.notes + ["times are medians of the timed runs, warm-up excluded; excl_vae = the call minus the VAE "
                          "decode timed inside it"]

    def write(published: dict[str, Any] | None, baseline_error: str | None) -> dict[str, Any]:
        """The report with what is known so far, as JSON and markdown."""
        report: dict[str, Any] = {
            "preset": cfg.preset,
            "settings": {"size": work.size, "pn": work.pn, "runs": cfg.runs, "warmup": cfg.warmup, "quick": cfg.quick,
                         "batches": [int(k.removeprefix("t2i_batch")) for k in rows if k.startswith("t2i_batch")],
                         "seed": work.seed, "sampling": dataclasses.asdict(config.sampling),
                         "t2i_prompt_tokens": t2i_tokens, "understanding_prompt_tokens": prompt_tokens,
                         "understanding_new_tokens": work.new_tokens},
            "environment": env,
            "ours": ours,
            "published": published,
            "baseline_error": baseline_error,
            "same_weights": same_weights(signature, (published or {}).get("weights_signature")),
            "speedup_vs_published": speedups(ours["derived"], (published or {}).get("derived")),
            # the same from process CPU time: on a loaded CPU with one thread, the cost without the waits
            "speedup_vs_published_cpu_time": speedups(ours["derived_cpu"], (published or {}).get("derived_cpu")),
            "notes": notes,
        }
        if cfg.preset == "official":
            patches = int(work.tensors["und_image_grid_thw"].prod())
            report["bound"] = image_bound(config, work.size, t2i_tokens or 32,
                                          peak=resolve_peak(cfg.peak, env["device_name"]),
                                          bytes_per_param=torch.empty((), dtype=dtype).element_size(),
                                          vae=vae_cost(config, work.size), understanding=(prompt_tokens, patches))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
        path.with_suffix(".md").write_text(markdown_table(report))
        _log(cfg, f"wrote {path} and {path.with_suffix('.md')} in {time.perf_counter() - t0:.0f} s")
        return report

    published, baseline_error = None, None
    if cfg.baseline_python is not None:
        # our rows on disk first: a baseline that crashes or runs past its time loses only its own
        write(None, "not finished: the published baseline was still running when this was written")
        with tempfile.TemporaryDirectory(prefix="vargpt_bench_") as tmp:
            try:
                published = run_baseline(cfg, work, device, Path(tmp))
            except (RuntimeError, OSError, json.JSONDecodeError) as e:
                baseline_error = str(e)
        if published is not None:
            counts = (int(published.get("understanding_prompt_tokens", prompt_tokens)),
                      int(published.get("understanding_new_tokens", work.new_tokens)))
            published["derived"] = derive(published, *counts)
            published["derived_cpu"] = derive(published, *counts, clock="cpu")
    report = write(published, baseline_error)
    if baseline_error is not None:
        raise VargptError(f"{baseline_error}\n(our measurements are in {path})")
    return report


# ----------------------------------------------------------------------------------------------- the table


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def _table(report: dict[str, Any], clock: str) -> list[str]:
    """One row per measurement: ours / published / speedup; by wall time also the peak memory (and the bound and how
    far ours is from it: times ours / bound, rates bound / ours)."""
    wall = clock == "wall"
    o = report["ours"]["derived" if wall else "derived_cpu"]
    pub = report.get("published") or {}
    p = pub.get("derived" if wall else "derived_cpu") or {"t2i": {}, "understanding": {}}
    s = report["speedup_vs_published" if wall else "speedup_vs_published_cpu_time"]
    bound = (report.get("bound") or {}) if wall else {}

    def mem(rows: dict[str, Any], key: str | None) -> str:
        r = rows.get(key) if key else None
        return _fmt(r["peak_mem_bytes"] / 2**30) if isinstance(r, dict) and "peak_mem_bytes" in r else ""

    t1, p1 = o["t2i"].get("1", {}), p["t2i"].get("1", {})
    # (measurement, unit, ours, published, speedup, bound, row key for the peak memory)
    table: list[tuple[str, str, Any, Any, Any, Any, str | None]] = [
        ("text-to-image, batch 1", "s/image", t1.get("latency_s"), p1.get("latency_s"), s["t2i_batch1"],
         bound.get("t2i_batch1_s"), "t2i_batch1"),
        ("text-to-image, batch 1, excl. VAE decode", "s/image", t1.get("latency_excl_vae_s"),
         p1.get("latency_excl_vae_s"), s["t2i_batch1_excl_vae"], bound.get("t2i_batch1_excl_vae_s"), None),
        ("VAE decode inside text-to-image, batch 1", "s", t1.get("vae_decode_s"), p1.get("vae_decode_s"),
         _ratio(p1.get("vae_decode_s"), t1.get("vae_decode_s")), None, None)]
    for b, r in o["t2i"].items():
        for excl in ("", "_excl_vae"):
            ours_v, pub_v = r[f"images_per_s{excl}"], p1.get(f"images_per_s{excl}")
            table.append((f"text-to-image throughput, batch {b}" + (", excl. VAE decode" if excl else ""), "images/s",
                          ours_v, pub_v, _ratio(ours_v, pub_v), bound.get(f"images_per_s{excl}", {}).get(b),
                          None if excl else f"t2i_batch{b}"))
    ou, pu = o["understanding"], p["understanding"]
    table += [
        (f"understanding prefill ({ou['prompt_tokens']} tokens, vision tower incl.)", "tokens/s",
         ou.get("prefill_tokens_per_s"), pu.get("prefill_tokens_per_s"), s["understanding_prefill"],
         bound.get("understanding_prefill_tokens_per_s"), "understanding_prefill"),
        (f"understanding decode ({ou['new_tokens']}-token answer, greedy)", "tokens/s", ou.get("decode_tokens_per_s"),
         pu.get("decode_tokens_per_s"), s["understanding_decode"], bound.get("understanding_decode_tokens_per_s"),
         "understanding_full"),
        ("VAE encode, batch 1", "images/s", o["vae_encode_images_per_s"], p.get("vae_encode_images_per_s"),
         s["vae_encode"], bound.get("vae_encode_images_per_s"), "vae_encode"),
        ("VAE decode, batch 1", "images/s", o["vae_decode_images_per_s"], p.get("vae_decode_images_per_s"),
         s["vae_decode"], bound.get("vae_decode_images_per_s"), "vae_decode"),
        ("training step, batch 1", "s", o["train_step_s"], p.get("train_step_s"), s["train_step"], None,
         "train_step")]
    head = ["measurement", "unit", "ours", "published", "speedup"] + (["peak GiB ours", "peak GiB published"]
                                                                        if wall else [])
    if bound:
        head += [f"bound ({bound['assumptions']['peak']['name']})", "ours / bound"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, unit, ours_v, pub_v, sp, bnd, key in table:
        cells = [name, unit, _fmt(ours_v), _fmt(pub_v), f"{sp:.2f}x" if sp else "-"]
        cells += [mem(report["ours"]["rows"], key), mem(pub, key)] if wall else []
        if bound:
            far = (ours_v / bnd if unit.startswith("s") else bnd / ours_v) if bnd and ours_v else None
            cells += [_fmt(bnd), f"{far:.1f}x" if far else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_table(report: dict[str, Any]) -> str:
    """The report in markdown: the settings, the table by wall time and, on CPU, the same by process CPU time."""
    env, st = report["environment"], report["settings"]
    pub = report.get("published") or {}
    png = (pub.get("t2i_batch1") or {}).get("png_write_s")
    out = [f"# vargpt bench: preset {report['preset']}, {st['size']} px" + (f" ({st['pn']})" if st.get("pn") else ""),
           "",
           f"Device {env['device']} ({env['device_name']}); ours {env['dtype']}"
           + (f", published {pub.get('dtype')} (transformers {pub.get('transformers')})" if pub else "")
           + f"; {env['threads']} thread(s); torch {env['torch']}; CPU {env['cpu_model']}. Median of {st['runs']} "
           f"timed run(s) after {st['warmup']} warm-up; same weights on both sides: {report.get('same_weights')}. "
           f"Peak memory: {env['peak_mem_kind']}.",
           "",
           "Speedup = published time / ours (> 1: ours is faster). The published code makes one image per call, so "
           "its throughput is 1 / its batch-1 latency at every batch"
           + (f"; its text-to-image time includes writing its PNG ({png * 1e3:.1f} ms)." if png else "."), ""]
    if report.get("baseline_error"):
        out += [f"Baseline failed: {report['baseline_error'][:300]}", ""]
    out += ["## Wall time", ""] + _table(report, "wall")
    if env["device"] == "cpu":
        out += ["", "## Process CPU time", "",
                "The same runs measured in CPU seconds of each process: with one thread, the cost without the waits "
                "that other work on a loaded machine adds to wall time.", ""] + _table(report, "cpu")
    return "\n".join(out) + "\n"
