"""Client-side load on a running `vargpt serve` (tests/test_server.py's short soak, benchmarks/soak.py's long one).

* `below_capacity`: ``clients`` loops, each sending requests one after another until ``seconds`` have passed
  (the request in flight then finishes): text-to-image (64x64, n=1, a new prompt and seed each time) and, every
  ``chat_every``-th, a short chat. With fewer clients than the server's queue holds, none may fail.
* `burst`: ``n`` text-to-image requests at once; with more than the queue holds, some must be 503 + Retry-After.
* `hang_up_while_busy`: while the engine is busy (the caller's doing), clients send requests, wait until they
  are queued and close their connections without reading the answer; the server must cancel their jobs.

Each request gives an `Outcome` (status 0: no HTTP answer); `summary` counts statuses and takes latency
percentiles.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

PROMPTS = [f"A {colour} {shape} {where}." for colour in ("red", "blue", "green", "yellow")
           for shape in ("circle", "square", "triangle") for where in ("on the left", "in the middle", "at the top")]
REQUEST_TIMEOUT_S = 600  # a request may wait behind a full queue on a slow CPU


@dataclass(frozen=True)
class Outcome:
    kind: str  # "image" or "chat"
    status: int  # the HTTP status; 0 when no answer came (connection refused or reset)
    latency_s: float
    retry_after: str | None = None


def request_body(kind: str, i: int, model: str) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) of request number ``i``: a prompt and seed that vary with ``i``."""
    prompt = PROMPTS[i % len(PROMPTS)]
    if kind == "chat":
        return "/v1/chat/completions", {"model": model, "max_tokens": 8, "seed": i, "messages": [
            {"role": "user", "content": f"Describe a picture of this: {prompt}"}]}
    return "/v1/images/generations", {"model": model, "prompt": prompt, "size": "64x64", "n": 1, "seed": i}


async def send(client: httpx.AsyncClient, kind: str, i: int, model: str) -> Outcome:
    path, body = request_body(kind, i, model)
    t = time.perf_counter()
    try:
        r = await client.post(path, json=body)
    except httpx.TransportError:
        return Outcome(kind, 0, time.perf_counter() - t)
    return Outcome(kind, r.status_code, time.perf_counter() - t, r.headers.get("retry-after"))


def _client(url: str, connections: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S,
                             limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))


async def below_capacity(url: str, clients: int, seconds: float, model: str, chat_every: int = 5) -> list[Outcome]:
    """``clients`` concurrent loops for ``seconds``; client c's i-th request is a chat when (c + i) % chat_every
    is chat_every - 1, so a short run with as many clients as chat_every has at least one of each kind."""
    deadline = time.monotonic() + seconds

    async def loop(c: int) -> list[Outcome]:
        out: list[Outcome] = []
        while time.monotonic() < deadline:
            i = len(out)
            kind = "chat" if (c + i) % chat_every == chat_every - 1 else "image"
            out.append(await send(client, kind, c + clients * i, model))
        return out

    async with _client(url, clients) as client:
        per_client = await asyncio.gather(*(loop(c) for c in range(clients)))
    return [o for outcomes in per_client for o in outcomes]


async def burst(url: str, n: int, model: str) -> list[Outcome]:
    """``n`` text-to-image requests sent at once, each on its own connection."""
    async with _client(url, n) as client:
        return list(await asyncio.gather(*(send(client, "image", i, model) for i in range(n))))


def health(url: str) -> dict[str, Any]:
    return httpx.get(url + "/health", timeout=30).json()


def wait_for(url: str, ok: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
    """/health once ``ok`` holds for it (or the last one seen when ``timeout`` passes)."""
    deadline = time.monotonic() + timeout
    while not ok(h := health(url)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return h


def hang_up_while_busy(url: str, n: int, model: str, timeout: float = 60) -> int:
    """With the engine busy: ``n`` raw-socket clients send a text-to-image request each, wait until all are
    queued and hang up (close without reading). Returns how many jobs the server counted as cancelled (n if
    every hang-up cancelled its queued job) once it has counted n or ``timeout`` has passed."""
    before = health(url)
    where = urlsplit(url)
    socks = []
    try:
        for i in range(n):
            path, body = request_body("image", 10**6 + i, model)
            raw = json.dumps(body).encode()
            s = socket.create_connection((where.hostname, where.port))
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: {where.netloc}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
            socks.append(s)
        wait_for(url, lambda h: h["queued"] >= before["queued"] + n, timeout)
    finally:
        for s in socks:
            s.close()
    after = wait_for(url, lambda h: h["cancelled"] >= before["cancelled"] + n, timeout)
    return after["cancelled"] - before["cancelled"]


def percentiles(latencies: list[float]) -> dict[str, float]:
    """p50/p95/p99 and max of ``latencies`` (s)."""
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {"p50_s": round(q[49], 3), "p95_s": round(q[94], 3), "p99_s": round(q[98], 3),
            "max_s": round(max(latencies), 3)}


def summary(outcomes: list[Outcome], wall_s: float | None = None) -> dict[str, Any]:
    """Requests, served (200), errors by status, latency percentiles of the served ones (all, and by kind) and
    throughput."""
    served = [o for o in outcomes if o.status == 200]
    errors = Counter(o.status for o in outcomes if o.status != 200)
    out: dict[str, Any] = {"requests": len(outcomes), "served": len(served),
                           "by_kind": dict(Counter(o.kind for o in served)),
                           "errors_by_status": {str(s): c for s, c in sorted(errors.items())}}
    if served:
        out["latency"] = percentiles([o.latency_s for o in served])
        out["latency_by_kind"] = {kind: percentiles([o.latency_s for o in served if o.kind == kind])
                                  for kind in out["by_kind"]}
    if wall_s:
        out |= {"wall_s": round(wall_s, 1), "served_per_s": round(len(served) / wall_s, 3)}
    return out
