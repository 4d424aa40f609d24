"""Throughput of `vargpt serve` with request batching: the same 8 text-to-image requests sent concurrently (the
server groups them into few `generate` calls) and then one after another (one call each).

    python benchmarks/serve_batching.py [--model DIR] [--requests 8] [--size 64x64] [--repeats 1] [--json PATH]

Starts ``python -m vargpt serve`` on a free 127.0.0.1 port, warms it up with one request, then times each mode
(`--repeats` rounds, the best kept) and reads the batch sizes from the server's log lines ("batch of N image
request(s), M images"). Prints one JSON report.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from _serve import running_server  # this folder is on sys.path when a script here runs

BATCH_LINE = re.compile(r"batch of (\d+) image request\(s\), (\d+) images")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--size", default="64x64")
    ap.add_argument("--prompt", default="A red circle to the left of a blue square.")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "server.log"
        with running_server(["--model", args.model] if args.model else [], log_path) as (url, _):
            with httpx.Client(timeout=600) as client:
                def send(seed: int) -> float:
                    t = time.perf_counter()
                    r = client.post(url + "/v1/images/generations", json={
                        "prompt": args.prompt, "size": args.size, "n": 1, "seed": seed})
                    r.raise_for_status()
                    return time.perf_counter() - t

                def batches_since(offset: int) -> tuple[list[int], int]:
                    text = log_path.read_text()
                    return [int(m[1]) for m in BATCH_LINE.finditer(text[offset:])], len(text)

                send(0)  # warm-up
                _, offset = batches_since(0)
                report: dict = {"requests": args.requests, "size": args.size, "model": args.model or "embedded",
                                "cpu_count": os.cpu_count()}
                for mode in ("concurrent", "sequential"):
                    best = None
                    for _ in range(args.repeats):
                        t = time.perf_counter()
                        if mode == "concurrent":
                            with ThreadPoolExecutor(args.requests) as pool:
                                latencies = list(pool.map(send, range(args.requests)))
                        else:
                            latencies = [send(i) for i in range(args.requests)]
                        wall = time.perf_counter() - t
                        sizes, offset = batches_since(offset)
                        if best is None or wall < best["wall_s"]:
                            best = {"wall_s": round(wall, 3), "images_per_s": round(args.requests / wall, 3),
                                    "mean_latency_s": round(sum(latencies) / len(latencies), 3),
                                    "batch_sizes": sizes}
                    report[mode] = best
                report["speedup"] = round(report["sequential"]["wall_s"] / report["concurrent"]["wall_s"], 2)
                print(json.dumps(report, indent=2))
                if args.json:
                    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
