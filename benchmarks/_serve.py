"""A `vargpt serve` subprocess on a free 127.0.0.1 port, for the serving benchmarks (serve_batching.py, soak.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


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


@contextmanager
def running_server(args: list[str], log_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """``python -m vargpt serve ARGS`` on a free port, its output in ``log_path``; yields (base URL, process) once
    /health answers, and stops the server on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "vargpt", "serve", "--port", str(port), *args]
    with open(log_path, "w") as log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                      env=os.environ | {"PYTHONUNBUFFERED": "1"}) as server:
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, server)
            yield url, server
        finally:
            server.terminate()
            server.wait(30)
