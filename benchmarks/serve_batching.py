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
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

BATCH_LINE = re.compile(r"batch of (\d+) image request\(s\), (\d+) images")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not come up")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--size", default="64x64")
    ap.add_argument("--prompt", default="A red circle to the left of a blue square.")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "vargpt", "serve", "--port", str(port)] + (["--model", args.model] if args.model
                                                                             else [])
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "server.log"
        with open(log_path, "w") as log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                          env=os.environ | {"PYTHONUNBUFFERED": "1"}) as server:
            try:
                wait_healthy(url, server)
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
            finally:
                server.terminate()
                server.wait(30)


if __name__ == "__main__":
    main()
