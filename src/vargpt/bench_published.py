"""The published side of `vargpt bench`: times the published VARGPT-v1.1 code, unchanged, in its own environment.

Contract
--------
Run as a script by the published code's Python (transformers 4.46.1; ``../shared/official-harness/setup.sh``
builds one), never imported there from ``vargpt``: at module level this file needs only the standard library and
torch, so `vargpt.bench` also imports its shared pieces (the timing loop, the peak-memory probe, the random-weight
recipe and the weight signature), and both sides are timed and filled by the same code::

    PY bench_published.py --workload W.safetensors --harness DIR --src DIR \\
        [--weights FILE | --weights random:SEED] [--config tiny|full] [--runs 5] [--threads N] [--device cpu|cuda] \\
        [--variant fp32|autocast_bf16]

It builds the published model with the harness's ``official_env`` (``build_model``: the shims for flash-attn and
torchvision, the tiny builders; see the harness README) at the fixture's tiny config or at full size, loads the
given weights (the fixture's file, or the deterministic random recipe `fill_random_`, the one our side applies),
and times, on the inputs of the workload file that `vargpt.bench` wrote (so both sides see the same tensors):

* ``t2i_batch1``: ``model.generate`` with the published patched ``_sample`` (CFG 3, tau 0.5, top-k 900, top-p 0.97,
  the values its forward hard-codes), the first new token forced to ``<|image_gen_start|>`` as in the harness;
  batch 1 (the published forward asserts it). The VAE decode inside it and the PNG it writes with cv2 are timed
  apart (hooks on ``vae_local.decode`` and ``cv2.imwrite``).
* ``understanding``: greedy ``generate`` with an image, ``min_new_tokens = max_new_tokens`` (1 for the prefill row,
  N for the decode row) and ``<|image_gen_start|>`` suppressed, as the harness's GPU anchor does.
* ``vae_encode`` / ``vae_decode``: ``vae_local.encode(x, scale_schedule)`` / ``vae_local.decode(codes)``, batch 1.
* ``train_step``: the published training forward + backward + an AdamW step (tiny config only).

Prints one JSON object on stdout (the published code's own prints go to stderr). Warm-up runs are excluded,
the median of ``--runs`` is reported, in wall seconds and in process CPU seconds. Timed with ``time.perf_counter``
and ``time.process_time`` (the published forward seeds its sampler with ``time.time()``, which is frozen during
``generate`` as the harness does, so the sampled bits are the same run to run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import torch

if __name__ == "__main__":
    # Run as a script, Python puts this file's folder (src/vargpt) first on sys.path, where our imageio.py would
    # shadow the `imageio` package that the published VAE imports.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

RANDOM_BLOCK = 1_000_003  # prime: the tiled random values never line up with a tensor's rows
FROZEN_TIME = 1234.567  # time.time() during the published generate -> its sampler seed int(t * 1000) = 1234567
_MISSING = object()


# ----------------------------------------------------------------------------------------------- shared pieces


def _key_offset(name: str) -> int:
    return zlib.crc32(name.encode()) % RANDOM_BLOCK


@torch.no_grad()
def fill_random_(named_parameters: Iterable[tuple[str, torch.Tensor]], seed: int = 0) -> dict[str, Any]:
    """Overwrite every floating parameter with deterministic, well-scaled values that depend only on its name, shape
    and ``seed`` (not on the order of the parameters, the device or the torch version): one block of N(0, 1) draws
    from a CPU generator, tiled from an offset given by the name's CRC-32. ndim >= 2 -> / sqrt(fan_in); 1-d
    ``*weight`` -> 1 + 0.1 v; other 1-d -> 0.1 v (the statistics of the harness's ``randomize_``). Fast at 11 B
    parameters (the tiling runs on the parameter's device). Returns `weights_signature` of the float32 values."""
    block = torch.randn(RANDOM_BLOCK, generator=torch.Generator().manual_seed(seed))
    on_device: dict[torch.device, torch.Tensor] = {}
    sig = _Signature()
    for name, p in named_parameters:
        if not p.is_floating_point():
            continue
        b = on_device.setdefault(p.device, block.to(p.device))
        off, n = _key_offset(name), p.numel()
        reps = math.ceil((off + n) / RANDOM_BLOCK)
        v = b.repeat(reps)[off:off + n].view(p.shape) if reps > 1 else b[off:off + n].view(p.shape)
        if p.ndim >= 2:
            v = v / math.sqrt(math.prod(p.shape[1:]))
        elif name.endswith("weight"):
            v = 1 + 0.1 * v
        else:
            v = 0.1 * v
        sig.add(name, v)
        p.copy_(v.to(p.dtype))
    return sig.result()


class _Signature:
    def __init__(self) -> None:
        self.names: list[str] = []
        self.total = 0.0

    def add(self, name: str, t: torch.Tensor) -> None:
        self.names.append(f"{name}:{tuple(t.shape)}")
        self.total += (zlib.crc32(name.encode()) % 997 + 1) * float(t.detach().double().sum())

    def result(self) -> dict[str, Any]:
        return {"tensors": len(self.names), "names_crc32": zlib.crc32("\n".join(sorted(self.names)).encode()),
                "weighted_sum": self.total}


def weights_signature(named_parameters: Iterable[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """Names, shapes and a weighted float64 sum of the floating parameters: equal on both sides <=> same weights."""
    sig = _Signature()
    for name, p in named_parameters:
        if p.is_floating_point():
            sig.add(name, p.float())
    return sig.result()


def same_weights(a: dict[str, Any] | None, b: dict[str, Any] | None, rel: float = 1e-6) -> bool | None:
    """Whether two `weights_signature`s describe the same parameters (None if either is missing)."""
    if not a or not b:
        return None
    return (a["tensors"] == b["tensors"] and a["names_crc32"] == b["names_crc32"]
            and abs(a["weighted_sum"] - b["weighted_sum"]) <= rel * max(1.0, abs(b["weighted_sum"])))


class PeakMemory:
    """Peak memory of one measurement: CUDA ``max_memory_allocated``, or on CPU the resident-set peak (VmHWM, reset
    per measurement through /proc/self/clear_refs; where that fails, the process-lifetime ``ru_maxrss``)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.kind = "cuda_max_memory_allocated" if self.cuda else "rss_peak_per_row"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.kind = "rss_peak_process"

    def peak_bytes(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated())
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        import resource

        self.kind = "rss_peak_process"
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], dict[str, float] | None], *, runs: int, warmup: int, device: torch.device,
            memory: PeakMemory | None = None) -> dict[str, Any]:
    """``warmup`` untimed calls, then ``runs`` timed ones: median wall seconds and every run, the same in process
    CPU seconds (``cpu_median_s``: with one thread, what the run costs without the waits a loaded machine adds),
    the medians of the sub-times ``fn`` returns (e.g. the VAE decode inside a generation) and the peak memory of
    the timed runs."""
    for _ in range(warmup):
        fn()
    memory = memory or PeakMemory(device)
    memory.reset()
    times: list[float] = []
    cpu: list[float] = []
    parts: dict[str, list[float]] = {}
    for _ in range(runs):
        sync(device)
        t, c = time.perf_counter(), time.process_time()
        sub = fn() or {}
        sync(device)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        for k, v in sub.items():
            parts.setdefault(k, []).append(v)
    out: dict[str, Any] = {"median_s": statistics.median(times), "runs_s": [round(x, 6) for x in times],
                           "cpu_median_s": statistics.median(cpu), "cpu_runs_s": [round(x, 6) for x in cpu]}
    out.update({k: statistics.median(v) for k, v in parts.items()})
    out["peak_mem_bytes"] = memory.peak_bytes()
    out["peak_mem_kind"] = memory.kind
    return out


class SectionTimer:
    """Wraps ``obj.name`` (a method of an instance, or a module's function) to add up the wall and process CPU seconds
    spent in it; the original is back on exit."""

    def __init__(self, obj: Any, name: str, device: torch.device) -> None:
        self.obj, self.name, self.device, self.seconds, self.cpu_seconds, self.calls = obj, name, device, 0.0, 0.0, 0
        self._own = vars(obj).get(name, _MISSING)  # the object's own attribute (a module's function), if any

    def __enter__(self) -> SectionTimer:
        inner = getattr(self.obj, self.name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            sync(self.device)
            t, c = time.perf_counter(), time.process_time()
            out = inner(*args, **kwargs)
            sync(self.device)
            self.seconds += time.perf_counter() - t
            self.cpu_seconds += time.process_time() - c
            self.calls += 1
            return out

        setattr(self.obj, self.name, timed)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._own is not _MISSING:
            setattr(self.obj, self.name, self._own)
        elif self.name in vars(self.obj):
            delattr(self.obj, self.name)  # the class attribute (the original method) shows through again


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
            "cpu_model": cpu_model(), "python": platform.python_version()}


# ----------------------------------------------------------------------------------------------- the published side


def _build(E: Any, tiny: bool, device: torch.device) -> Any:
    """``official_env.build_model`` on ``device`` (GPU builds: Infinity draws ``cfg_uncond`` with an explicit CPU
    generator, drawn on CPU and copied, as the harness's gpu_anchor does)."""
    orig = torch.nn.init.trunc_normal_

    def trunc_normal_any_device(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):
        if generator is not None and generator.device != tensor.device:
            t = torch.empty(tensor.shape, dtype=tensor.dtype, device=generator.device)
            orig(t, mean, std, a, b, generator=generator)
            with torch.no_grad():
                return tensor.copy_(t)
        return orig(tensor, mean, std, a, b, generator=generator)

    torch.nn.init.trunc_normal_ = trunc_normal_any_device
    try:
        with torch.device(device):
            return E.build_model(tiny=tiny, seed=0)
    finally:
        torch.nn.init.trunc_normal_ = orig


def run_published(args: argparse.Namespace) -> dict[str, Any]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    os.environ["VARGPT_OFFICIAL_SRC"] = os.path.abspath(args.src)
    sys.path.insert(0, os.path.abspath(args.harness))
    import official_env as E  # noqa: E402  (needs VARGPT_OFFICIAL_SRC before import)
    from transformers import LogitsProcessor, LogitsProcessorList

    device = torch.device(args.device)
    work = load_file(args.workload)
    with safe_open(args.workload, "pt") as f:
        meta = json.loads(f.metadata()["bench"])
    tiny = args.config == "tiny"
    if meta.get("preset") not in ("fixture", "official"):
        raise SystemExit(f"the published code runs only at the fixture or the official config, not "
                         f"{meta.get('preset')!r}")
    ID = E.TINY_IDS if tiny else E.FULL_IDS

    t0 = time.perf_counter()
    model = _build(E, tiny, device)
    if args.weights.startswith("random:"):
        signature = fill_random_(model.named_parameters(), int(args.weights.split(":", 1)[1]))
    else:
        model.load_state_dict(load_file(args.weights, device=str(device)), strict=True)
        signature = weights_signature(model.named_parameters())
    model.eval().requires_grad_(False)
    E.patch_generation(model)
    build_s = time.perf_counter() - t0
    ctx = (torch.autocast(device.type, dtype=torch.bfloat16) if args.variant == "autocast_bf16"
           else contextlib.nullcontext())
    res: dict[str, Any] = {"implementation": "published VARGPT-v1.1", "variant": args.variant, "dtype": "fp32"
                           if args.variant == "fp32" else "fp32 weights, bf16 autocast",
                           "build_s": round(build_s, 3), "weights_signature": signature,
                           "flash_attn_shim": bool(getattr(sys.modules.get("flash_attn"), "__shim__", False)),
                           **environment(device)}
    import transformers

    res["transformers"] = transformers.__version__

    def dev(k: str) -> torch.Tensor:
        return work[k].to(device)

    class ForceFirst(LogitsProcessor):
        def __init__(self, n: int) -> None:
            self.n = n

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == self.n:
                scores = torch.full_like(scores, -float("inf"))
                scores[:, ID["image_gen_start"]] = 0
            return scores

    model.vargpt_gen_args.pn = meta["pn"]
    ids = dev("t2i_prompt_ids")
    vae = model.vae_local
    import cv2

    def t2i() -> dict[str, float]:
        t, c = time.perf_counter(), time.process_time()
        real = time.time
        time.time = lambda: FROZEN_TIME
        try:
            with SectionTimer(vae, "decode", device) as dec, SectionTimer(cv2, "imwrite", device) as png, \
                    torch.no_grad(), ctx:
                seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                     do_sample=False, pad_token_id=ID["endoftext"], eos_token_id=ID["im_end"],
                                     logits_processor=LogitsProcessorList([ForceFirst(ids.shape[1])]))
        finally:
            time.time = real
        if dec.calls != 1 or int(seq[0, ids.shape[1]]) != ID["image_gen_start"]:
            raise RuntimeError(f"the published generate made {dec.calls} image(s); expected one")
        total, total_cpu = time.perf_counter() - t, time.process_time() - c
        return {"vae_decode_s": dec.seconds, "excl_vae_s": total - dec.seconds, "png_write_s": png.seconds,
                "vae_decode_cpu_s": dec.cpu_seconds, "excl_vae_cpu_s": total_cpu - dec.cpu_seconds}

    def understand(n: int) -> Callable[[], None]:
        uid = dev("und_input_ids")

        def run() -> None:
            with torch.no_grad(), ctx:
                seq = model.generate(input_ids=uid, attention_mask=torch.ones_like(uid),
                                     pixel_values=dev("und_pixel_values"), image_grid_thw=dev("und_image_grid_thw"),
                                     max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                     suppress_tokens=[ID["image_gen_start"]], pad_token_id=ID["endoftext"],
                                     eos_token_id=ID["im_end"])
            if seq.shape[1] - uid.shape[1] != n:
                raise RuntimeError(f"the published generate made {seq.shape[1] - uid.shape[1]} tokens, not {n}")

        return run

    from visionllm.vargpt_qwen_v1_1.var_model.infinity.utils.dynamic_resolution import dynamic_resolution_h_w

    sched = [(1, h, w) for (_, h, w) in dynamic_resolution_h_w[1.0][meta["pn"]]["scales"]]
    x, codes = dev("vae_x"), dev("vae_codes")

    def vae_encode() -> None:
        with torch.no_grad(), ctx:
            vae.encode(x, scale_schedule=sched)

    def vae_decode() -> None:
        with torch.no_grad(), ctx:
            vae.decode(codes)

    runs, warm = args.runs, args.warmup
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("t2i_batch1", lambda: measure(t2i, runs=runs, warmup=warm, device=device)),
        ("understanding_prefill", lambda: measure(understand(1), runs=runs, warmup=warm, device=device)),
        ("understanding_full", lambda: measure(understand(meta["new_tokens"]), runs=runs, warmup=warm,
                                               device=device)),
        ("vae_encode", lambda: measure(vae_encode, runs=runs, warmup=warm, device=device)),
        ("vae_decode", lambda: measure(vae_decode, runs=runs, warmup=warm, device=device)),
    ]
    if "train_input_ids" in work and tiny and not args.skip_train:
        steps.append(("train_step", lambda: _train_step(model, work, device, runs, warm)))
    for name, step in steps:
        print(f"[published] {name} ...", file=sys.stderr, flush=True)
        try:
            res[name] = step()
        except Exception as e:  # one failing row must not lose the others
            res[name] = {"error": f"{type(e).__name__}: {e}"[:800]}
    res["understanding_prompt_tokens"] = int(work["und_input_ids"].shape[1])
    res["understanding_new_tokens"] = int(meta["new_tokens"])
    res["pn"] = meta["pn"]
    return res


def _train_step(model: Any, work: dict[str, torch.Tensor], device: torch.device, runs: int,
                warmup: int) -> dict[str, Any]:
    """The published training forward (``model(pixel_gen_values, input_ids, attention_mask, labels)``) + backward +
    AdamW, as its trainer runs it (condition dropout, DropPath and bitwise self-correction on)."""
    from visionllm.vargpt_qwen_v1_1.var_model.infinity.models.bitwise_self_correction import BitwiseSelfCorrection

    if getattr(model, "bitwise_self_correction", None) is None:
        model.bitwise_self_correction = BitwiseSelfCorrection(model.vae_local)
    model.requires_grad_(True).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch = {k: work[f"train_{k}"].to(device) for k in ("input_ids", "attention_mask", "labels")}
    px = work["train_gen_pixel_values"].to(device)

    def step() -> None:
        out = model(pixel_gen_values=px, **batch, return_dict=True)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        return measure(step, runs=runs, warmup=warmup, device=device) | {"optimizer": "AdamW",
                                                                         "batch": int(px.shape[0])}
    finally:
        model.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", required=True, help="safetensors written by vargpt.bench (inputs + metadata)")
    ap.add_argument("--harness", required=True, help="folder holding official_env.py")
    ap.add_argument("--src", required=True, help="the published source (holds VARGPT-family-training/)")
    ap.add_argument("--weights", default="random:0", help="a state-dict .safetensors or random:SEED")
    ap.add_argument("--config", choices=("tiny", "full"), default="tiny")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variant", choices=("fp32", "autocast_bf16"), default="fp32")
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    real_stdout = sys.stdout
    with tempfile.TemporaryDirectory(prefix="vargpt_published_png_") as png_dir, \
            contextlib.redirect_stdout(sys.stderr):
        os.environ["_OUTPUT_IMAGE_PATH"] = png_dir  # the published forward writes every image there
        res = run_published(args)
    real_stdout.write(json.dumps(res) + "\n")
    real_stdout.flush()


if __name__ == "__main__":
    main()
