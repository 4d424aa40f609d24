"""What the NaN/inf check on loaded weights costs on the shipped tiny model: `load_state_dict_files` and the whole
`VARGPT.from_pretrained` with and without ``check_finite`` (interleaved runs), and the check alone.

Plain load times overstate it: safetensors tensors are memory-mapped, so without the check their pages are read
later (by the first forward pass), with it during the check. ``load_and_page_in`` (every page read once, no check)
vs ``load_and_check`` is the check's own cost.

    python benchmarks/nan_check_cost.py [--repeats 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch

import vargpt.models.vargpt as vargpt_module
from vargpt.models.vargpt import VARGPT
from vargpt.pipeline import default_model_dir
from vargpt.weights import count_nonfinite, load_state_dict_files


def _ms(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = default_model_dir()
    sd = load_state_dict_files(path)
    tensors = [t for t in sd.values() if t.is_floating_point()]
    with_check, without = [], []
    for _ in range(args.repeats):  # interleaved: both see the same machine load
        with_check += _ms(lambda: load_state_dict_files(path, check_finite=True), 1)
        without += _ms(lambda: load_state_dict_files(path, check_finite=False), 1)
    check_only = _ms(lambda: [count_nonfinite(t) for t in tensors], args.repeats)

    def touched() -> None:  # what any first use pays: every page of the memory-mapped weights read once
        for t in load_state_dict_files(path, check_finite=False).values():
            if t.numel():
                t.view(-1)[::1024].sum()

    paged_in, checked = [], []
    for _ in range(args.repeats):
        paged_in += _ms(touched, 1)
        checked += _ms(lambda: load_state_dict_files(path, check_finite=True), 1)
    full, full_unchecked = [], []
    for _ in range(max(5, args.repeats // 4)):  # the whole load, where every tensor is touched anyway
        full += _ms(lambda: VARGPT.from_pretrained(path), 1)
        vargpt_module.load_state_dict_files = functools.partial(load_state_dict_files, check_finite=False)
        try:
            full_unchecked += _ms(lambda: VARGPT.from_pretrained(path), 1)
        finally:
            vargpt_module.load_state_dict_files = load_state_dict_files
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    res = {
        "model": str(path), "tensors": len(tensors), "bytes": nbytes,
        "load_ms_median": {"check": statistics.median(with_check), "no_check": statistics.median(without)},
        "load_ms_min": {"check": min(with_check), "no_check": min(without)},
        "check_only_ms": {"median": statistics.median(check_only), "min": min(check_only)},
        "load_and_page_in_ms": {"median": statistics.median(paged_in), "min": min(paged_in)},
        "load_and_check_ms": {"median": statistics.median(checked), "min": min(checked)},
        "check_GB_per_s": nbytes / (min(check_only) / 1e3) / 1e9,
        "from_pretrained_ms_median": {"check": statistics.median(full), "no_check": statistics.median(full_unchecked)},
        "from_pretrained_ms_min": {"check": min(full), "no_check": min(full_unchecked)},
    }
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
