"""`vargpt serve`: live servers on 127.0.0.1 over the embedded default model, driven by the real `openai` client
(chat, streamed chat, generation, edits, models) and by raw HTTP for every bad request (status, OpenAI-style JSON
error body, and the server still answering afterwards); concurrent generations are batched; a queue that is full
answers 503; a failing generation fails only its own request; a short soak (benchmarks/soak.py runs the long one):
no errors below capacity, only 503s above it, and clients that hang up cancel their queued jobs."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from PIL import Image

from serve_load import below_capacity, burst, hang_up_while_busy, health, summary, wait_for
from vargpt.pipeline import VARGPTPipeline
from vargpt.server import ServerSettings, create_app, group_jobs

KEY = "test-key-123"


@contextmanager
def live_server(app) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread on a free 127.0.0.1 port; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def pipe() -> VARGPTPipeline:
    return VARGPTPipeline.from_pretrained(device="cpu", progress=False)


@pytest.fixture(scope="module")
def url(pipe) -> Iterator[str]:
    with live_server(create_app(pipe, ServerSettings(max_body_bytes=2**20))) as base:
        yield base


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def png_bytes(color=(200, 30, 30), size=64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def assert_error(r: httpx.Response, status: int, *, code: str | None = None, text: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and text in err["message"]
    assert code is None or err["code"] == code
    return err


def assert_alive(url: str) -> None:
    assert httpx.get(url + "/health").json()["status"] == "ok"


# ----------------------------------------------------------------------------------------------- openai client


def test_models_and_health(client, url):
    assert [m.id for m in client.models.list().data] == ["vargpt-tiny"]
    assert client.models.retrieve("vargpt-tiny").id == "vargpt-tiny"
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "vargpt-tiny"


def test_chat_plain_and_streamed_with_image(client, pipe):
    image = png_bytes()
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(image)}},
        {"type": "text", "text": "What colour is the background?"}]}]
    reply = client.chat.completions.create(model="vargpt-tiny", messages=messages, max_tokens=8)
    answer = reply.choices[0].message.content
    assert reply.choices[0].message.role == "assistant" and answer.strip()
    # the same as the pipeline answers directly
    expected = pipe.chat([{"role": "user", "content": "<image>What colour is the background?"}],
                         [Image.open(io.BytesIO(image))], max_new_tokens=8)
    assert answer == expected
    chunks = list(client.chat.completions.create(model="vargpt-tiny", messages=messages, max_tokens=8, stream=True))
    assert len(chunks) > 2 and chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer
    text_only = client.chat.completions.create(model="vargpt-tiny", max_tokens=4,
                                               messages=[{"role": "user", "content": "Describe a scene."}])
    assert isinstance(text_only.choices[0].message.content, str)


def test_image_generation_count_size_seed(client):
    kw = dict(model="vargpt-tiny", prompt="A red circle.", size="64x64", response_format="b64_json")
    res = client.images.generate(n=2, extra_body={"seed": 5}, **kw)
    images = [decode(d.b64_json) for d in res.data]
    assert len(images) == 2 and all(im.size == (64, 64) and im.format == "PNG" for im in images)
    again = decode(client.images.generate(n=1, extra_body={"seed": 6}, **kw).data[0].b64_json)
    assert np.abs(np.asarray(again, int) - np.asarray(images[1], int)).max() <= 1  # image i uses seed + i
    wide = decode(client.images.generate(n=1, **kw | {"size": "128x64"}).data[0].b64_json)
    assert wide.size == (128, 64)


def test_image_edit(client):
    res = client.images.edit(model="vargpt-tiny", image=("scene.png", png_bytes(), "image/png"),
                             prompt="Make the background blue.", size="64x64", n=1, extra_body={"seed": 1})
    assert len(res.data) == 1 and decode(res.data[0].b64_json).size == (64, 64)


# ----------------------------------------------------------------------------------------------- bad requests


def gen(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/images/generations", json={"prompt": "A red circle.", "size": "64x64"} | body,
                      timeout=60)


def chat_with(url: str, content, **body) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=60,
                      json={"model": "vargpt-tiny", "messages": [{"role": "user", "content": content}]} | body)


@pytest.mark.parametrize("n", [0, 10000, 17])
def test_bad_n(url, n):
    assert_error(gen(url, n=n), 400, text=f"n = {n}")
    assert_alive(url)


def test_unsupported_size_lists_valid_ones(url):
    err = assert_error(gen(url, size="100x100"), 400, code="unsupported_size")
    assert "64x64" in err["message"] and "128x128" in err["message"] and "128x64" in err["message"]
    assert_error(gen(url, size="big"), 400, code="unsupported_size")
    assert_alive(url)


def test_unknown_model(url):
    assert_error(gen(url, model="dall-e-3"), 404, code="model_not_found")
    assert_error(chat_with(url, "hi", model="gpt-4o"), 404, code="model_not_found")
    assert_error(httpx.get(url + "/v1/models/gpt-4o"), 404, code="model_not_found")
    assert_alive(url)


def test_non_image_data_urls(url):
    text_url = "data:text/plain;base64," + base64.b64encode(b"hello").decode()
    for bad in (text_url, data_url(b"not a png at all"), "https://example.com/cat.png",
                "data:image/png;base64,@@@"):
        part = [{"type": "image_url", "image_url": {"url": bad}}, {"type": "text", "text": "What is it?"}]
        assert_error(chat_with(url, part), 400)
    files = {"image": ("notes.txt", b"just text", "text/plain")}
    assert_error(httpx.post(url + "/v1/images/edits", data={"prompt": "Make it blue."}, files=files), 400)
    assert_error(httpx.post(url + "/v1/images/edits", data={"prompt": "Make it blue."}), 400, text="image")
    assert_alive(url)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_data_url_images_go_through_the_image_loader():
    """Without a server: what /v1/chat/completions and /v1/images/edits make of uploaded image bytes."""
    from bad_files import BROKEN, CONVERTIBLE, png_by_hand
    from vargpt.server import MAX_IMAGE_PIXELS, APIError, decode_data_url

    for kind, (raw, pixel) in CONVERTIBLE.items():
        img = decode_data_url(data_url(raw))
        assert img.mode == "RGB" and np.abs(np.subtract(img.getpixel((0, 0)), pixel)).max() <= 2, kind
    for kind, (raw, word) in BROKEN.items():
        with pytest.raises(APIError) as e:
            decode_data_url(data_url(raw))
        assert e.value.status_code == 400 and e.value.param == "image_url", kind
        assert word in e.value.detail and e.value.detail.startswith("image_url"), (kind, e.value.detail)
    with pytest.raises(APIError, match=f"over the limit of {MAX_IMAGE_PIXELS:,} pixels"):  # the server's own limit
        decode_data_url(data_url(png_by_hand(4097, 4096)))


def test_oversized_body(url):
    big = "x" * (2**20 + 10)
    assert_error(chat_with(url, big), 413, code="request_too_large")  # Content-Length known up front

    def chunks():  # no Content-Length: counted while the body is read
        yield b'{"model": "vargpt-tiny", "messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"x" * 2**16
        yield b'"}]}'

    r = httpx.post(url + "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, code="request_too_large")
    assert_alive(url)


def test_other_bad_requests(url):
    assert_error(httpx.post(url + "/v1/chat/completions", content=b"{not json",
                            headers={"content-type": "application/json"}), 400, text="body is not valid JSON")
    assert_error(httpx.post(url + "/v1/images/generations", content=b'{"prompt": "x\\ud800", "size": "64x64"}',
                            headers={"content-type": "application/json"}), 400, text="lone surrogate U+D800")
    assert_error(httpx.post(url + "/v1/chat/completions", json={"model": "vargpt-tiny"}), 400, text="messages")
    assert_error(chat_with(url, "hi", max_tokens=100000), 400, text="max_tokens")
    assert_error(chat_with(url, "hi", n=3), 400)
    assert_error(gen(url, prompt="   "), 400, text="prompt")
    assert_error(gen(url, response_format="url"), 400, text="b64_json")
    assert_error(gen(url, seed=-1), 400, text="seed")
    assert_error(httpx.get(url + "/v1/nothing-here"), 404)
    assert_alive(url)


# ----------------------------------------------------------------------------------------------- batching, failures


def test_concurrent_generations_are_batched(url, caplog):
    caplog.set_level(logging.INFO, logger="vargpt.server")
    before = httpx.get(url + "/health").json()
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: gen(url, seed=i, n=1), range(8)))
    assert [r.status_code for r in replies] == [200] * 8
    assert all(decode(r.json()["data"][0]["b64_json"]).size == (64, 64) for r in replies)
    after = httpx.get(url + "/health").json()
    assert after["image_requests"] - before["image_requests"] == 8
    assert after["engine_calls"] - before["engine_calls"] < 8  # fewer `generate` calls than requests
    batches = [int(m[1]) for m in re.finditer(r"batch of (\d+) image request\(s\), (\d+) images", caplog.text)]
    assert sum(batches) == 8 and len(batches) < 8, caplog.text  # the log shows the batch sizes


def test_group_jobs_by_key_and_cap():
    a, b, c, d, e = (SimpleNamespace(batch_key=k, n=n) for k, n in
                     [(("g", 64), 2), (("g", 128), 1), (("g", 64), 3), (None, 1), (("g", 64), 4)])
    assert group_jobs([a, b, c, d, e], max_images=5) == [[a, c], [b], [d], [e]]  # e would make 9 images with a, c


def test_failing_generation_is_500_and_server_keeps_serving(url, pipe, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated engine failure")

    monkeypatch.setattr(pipe, "generate", boom)
    err = assert_error(gen(url), 500, code="engine_error")
    assert err["type"] == "server_error"
    monkeypatch.undo()
    assert_alive(url)
    assert gen(url).status_code == 200


class GatedPipeline:
    """The real pipeline, except `generate`: it waits for `gate`, records its prompts, fails on "boom" and returns
    blank images (the queue and batching are under test here, not the model)."""

    def __init__(self, pipe: VARGPTPipeline) -> None:
        self._pipe, self.gate, self.entered, self.calls = pipe, threading.Event(), threading.Event(), []

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def generate(self, prompts, **kwargs):
        self.entered.set()
        assert self.gate.wait(60)
        self.calls.append(sorted(prompts))
        if any("boom" in p for p in prompts):
            raise RuntimeError("boom")
        return [Image.new("RGB", (64, 64)) for _ in prompts]


def test_full_queue_is_503_and_a_failure_in_a_batch_stays_with_its_request(pipe):
    gated = GatedPipeline(pipe)
    with live_server(create_app(gated, ServerSettings(queue_size=2))) as url, ThreadPoolExecutor(3) as pool:
        first = pool.submit(gen, url, prompt="first")
        assert gated.entered.wait(30)  # the engine is busy with "first"
        ok, bad = pool.submit(gen, url, prompt="ok"), pool.submit(gen, url, prompt="boom")
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").json()["queued"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = gen(url, prompt="one too many")
        assert_error(r, 503, code="queue_full")
        assert r.headers["retry-after"] == "1"
        gated.gate.set()
        assert first.result().status_code == 200 and ok.result().status_code == 200
        assert_error(bad.result(), 500, code="engine_error")
        assert gated.calls[1] == ["boom", "ok"]  # batched, then each alone
        assert sorted(gated.calls[2:]) == [["boom"], ["ok"]]
        assert_alive(url)


# ----------------------------------------------------------------------------------------------- load (short soak)


def test_short_soak_below_capacity_serves_everything(url):
    before = health(url)
    s = summary(asyncio.run(below_capacity(url, clients=2, seconds=3, model="vargpt-tiny", chat_every=2)))
    assert s["errors_by_status"] == {} and s["served"] == s["requests"] >= 2, s
    assert set(s["by_kind"]) == {"image", "chat"}, s  # client 1 starts with a chat
    after = health(url)
    assert (after["rejected"], after["cancelled"]) == (before["rejected"], before["cancelled"])


def test_burst_over_the_queue_gets_503s_with_retry_after_and_no_other_error(pipe):
    gated = GatedPipeline(pipe)
    with live_server(create_app(gated, ServerSettings(queue_size=4))) as url, ThreadPoolExecutor(2) as pool:
        first = pool.submit(gen, url, prompt="first")
        assert gated.entered.wait(30)  # the engine holds "first": the queue takes exactly 4 of the burst
        outcomes = pool.submit(asyncio.run, burst(url, 10, "vargpt-tiny"))
        assert wait_for(url, lambda h: h["rejected"] == 6)["rejected"] == 6
        gated.gate.set()
        assert Counter(o.status for o in outcomes.result()) == {200: 4, 503: 6}
        assert {o.retry_after for o in outcomes.result() if o.status == 503} == {"1"}
        assert first.result().status_code == 200


def test_clients_that_hang_up_cancel_their_queued_jobs(pipe, caplog):
    gated = GatedPipeline(pipe)
    with live_server(create_app(gated, ServerSettings())) as url, ThreadPoolExecutor(1) as pool:
        first = pool.submit(gen, url, prompt="first")
        assert gated.entered.wait(30)  # the engine is busy: the next requests wait in the queue
        assert hang_up_while_busy(url, 2, "vargpt-tiny") == 2
        gated.gate.set()
        assert first.result().status_code == 200 and gen(url, prompt="after").status_code == 200
        assert gated.calls == [["first"], ["after"]]  # the hung-up requests never reached the pipeline
        h = health(url)
        assert (h["cancelled"], h["image_requests"], h["queued"]) == (2, 2, 0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text  # a hang-up is no crash


# ----------------------------------------------------------------------------------------------- API key


def test_api_key(pipe):
    with live_server(create_app(pipe, ServerSettings(api_key=KEY))) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            assert_error(httpx.get(url + "/v1/models", headers=headers), 401, code="invalid_api_key")
            assert_error(httpx.post(url + "/v1/images/generations", headers=headers, json={"prompt": "x"}), 401)
        assert_alive(url)  # /health needs no key
        good = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in good.models.list().data] == ["vargpt-tiny"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_serve_binds_loopback_by_default(monkeypatch, tmp_path):
    from vargpt.cli import main

    seen = []
    monkeypatch.delenv("VARGPT_API_KEY", raising=False)
    monkeypatch.setattr(VARGPTPipeline, "from_pretrained", classmethod(lambda cls, path, **kw: path))
    monkeypatch.setattr("vargpt.server.serve", lambda pipe, settings: seen.append((pipe, settings)))
    main(["serve", "--port", "9123"])
    main(["serve", "--model", str(tmp_path / "my-model"), "--api-key", KEY, "--host", "0.0.0.0"])
    (p0, s0), (p1, s1) = seen
    assert p0 is None and (s0.host, s0.port, s0.api_key, s0.model_id) == ("127.0.0.1", 9123, None, "vargpt-tiny")
    assert p1 == tmp_path / "my-model" and (s1.host, s1.api_key, s1.model_id) == ("0.0.0.0", KEY, "my-model")
