"""`vargpt serve`: an OpenAI-compatible HTTP server over `VARGPTPipeline` (FastAPI + uvicorn).

Contract
--------
* ``POST /v1/chat/completions``: OpenAI's chat format; images as ``data:image/...;base64,`` URLs in ``image_url``
  content parts (this server fetches nothing); ``stream: true`` answers as server-sent events in OpenAI's chunk
  format, ending with ``data: [DONE]``.
* ``POST /v1/images/generations`` (JSON) and ``POST /v1/images/edits`` (multipart: ``image`` file + ``prompt``):
  ``b64_json`` PNGs; ``n``, ``size`` ("WIDTHxHEIGHT", e.g. "64x64"; "auto" = the model's default) and the
  extension fields ``seed`` (image i of a request uses seed + i, as in `VARGPTPipeline.generate`) and ``cfg``.
* ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health`` (never behind the API key: load balancers probe it).
* Every error is OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status.

How it runs: one engine thread owns the pipeline (the model is not safe to drive from two threads, and one device
runs one call at a time anyway). Requests become jobs on a bounded queue (full -> 503 + Retry-After). The engine
takes everything queued, groups text-to-image jobs with the same (size, cfg) into one `generate` call (one seeded
generator per image, so a batched image equals the one a lone request gets), and runs edits and chats one by one
(the pipeline edits one image per call). Inputs are validated in the request handler before queueing, so a bad
request never reaches the engine; if a batched call still raises, each of its jobs is retried alone so only the
culprit gets the 500. A client that disconnects before the engine starts its job cancels it: the engine skips it
(counted as ``cancelled`` in /health). A job the engine has started runs to the end and its answer is dropped (the
pipeline has no way to stop mid-call); a cancelled job keeps its queue slot until the engine next takes the queue.

Not here: ``response_format: "url"`` (there is nowhere to host files), masks for edits, tool calls, usage counts.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import json
import logging
import queue
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from vargpt.errors import VargptError
from vargpt.imageio import load_image
from vargpt.processing import IMAGE_PLACEHOLDER
from vargpt.scales import supported_sizes

if TYPE_CHECKING:
    from vargpt.pipeline import VARGPTPipeline

__all__ = ["ServerSettings", "create_app", "serve"]

log = logging.getLogger(__name__)

# Limits (each a `ServerSettings` field; these are the defaults).
MAX_BODY_BYTES = 16 * 2**20  # a request with a few full-size images as base64 fits
MAX_N = 16  # images per request
MAX_TOKENS = 1024  # new tokens per chat answer
MAX_CHAT_IMAGES = 8  # images per chat request
MAX_IMAGE_PIXELS = 4096 * 4096  # per uploaded image, refused from its header before decoding
QUEUE_SIZE = 64  # jobs waiting for the engine
MAX_BATCH_IMAGES = 32  # images in one engine call
BATCH_WINDOW_S = 0.025  # after the first job arrives, wait this long for others to join its batch
RETRY_AFTER_S = 1

Size = tuple[int, int]  # (height, width) in pixels, the pipeline's order
JobState = Literal["queued", "running", "cancelled"]


@dataclass(frozen=True)
class ServerSettings:
    """Everything `create_app` / `serve` need besides the pipeline."""

    model_id: str = "vargpt-tiny"
    api_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = MAX_BODY_BYTES
    max_n: int = MAX_N
    max_tokens: int = MAX_TOKENS
    queue_size: int = QUEUE_SIZE
    max_batch_images: int = MAX_BATCH_IMAGES
    batch_window_s: float = BATCH_WINDOW_S
    retry_after_s: int = RETRY_AFTER_S


# ----------------------------------------------------------------------------------------------- errors


class APIError(HTTPException):
    """An error answered in OpenAI's shape; an `HTTPException` so it also passes FastAPI's body parsing."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, headers)
        self.type, self.code, self.param = type, code, param


def error_response(status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                   param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _engine_error(exc: BaseException) -> APIError:
    """What a request sees of an exception raised in the engine."""
    if isinstance(exc, VargptError):
        return APIError(400, str(exc))
    return APIError(500, f"the engine failed on this request ({type(exc).__name__}); see the server log",
                    type="server_error", code="engine_error")


# ----------------------------------------------------------------------------------------------- engine

_END = object()  # end of a chat answer


class Channel:
    """Carries results from the engine thread to the request's event loop (thread-safe `put`, async `get`)."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._items: asyncio.Queue[Any] = asyncio.Queue()

    def put(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone (server shutting down): nobody is listening
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)

    async def get(self) -> Any:
        return await self._items.get()


@dataclass
class ImageJob:
    """One image request: text-to-image (``source`` None) or an edit of ``source``; answers a list of images."""

    prompt: str
    n: int
    seed: int
    size: Size | None
    cfg_scale: float | None
    source: Image.Image | None = None
    channel: Channel = field(default_factory=Channel)
    state: JobState = "queued"

    @property
    def batch_key(self) -> tuple[Any, ...] | None:
        """Jobs with the same key share one `generate` call; edits (None) run alone."""
        return None if self.source is not None else ("generate", self.size, self.cfg_scale)


@dataclass
class ChatJob:
    """One chat request; answers text pieces, then `_END`."""

    batch_key: ClassVar[None] = None  # runs alone
    messages: list[dict[str, Any]]
    images: list[Image.Image]
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    seed: int
    stream: bool
    channel: Channel = field(default_factory=Channel)
    state: JobState = "queued"


Job = ImageJob | ChatJob


def group_jobs(jobs: Sequence[Job], max_images: int) -> list[list[Job]]:
    """Engine calls for ``jobs``, in order of each call's first job: text-to-image jobs with the same batch key
    together (at most ``max_images`` images per call; a larger job runs alone), everything else alone."""
    groups: list[list[Job]] = []
    open_group: dict[tuple[Any, ...], list[Job]] = {}
    for job in jobs:
        key = job.batch_key
        group = open_group.get(key) if key is not None else None
        if group is not None and sum(j.n for j in group) + job.n <= max_images:
            group.append(job)
            continue
        groups.append([job])
        if key is not None:
            open_group[key] = groups[-1]
    return groups


@dataclass
class EngineStats:
    """Counters for /health and the serving benchmarks. The engine thread writes the work done; the event loop
    writes ``rejected`` (503s: queue full) and ``cancelled`` (clients gone before their job started)."""

    engine_calls: int = 0
    batches: int = 0
    image_requests: int = 0
    images: int = 0
    chats: int = 0
    rejected: int = 0
    cancelled: int = 0


class Engine:
    """The thread that owns the pipeline and drains the job queue (module docstring, "How it runs")."""

    def __init__(self, pipeline: VARGPTPipeline, settings: ServerSettings) -> None:
        self.pipeline = pipeline
        self.settings = settings
        self.stats = EngineStats()
        self.busy = False
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=settings.queue_size)
        self._state_lock = threading.Lock()  # a job is started by the engine or cancelled by its client, not both
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="vargpt-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.stats.rejected += 1
            raise APIError(503, f"the server is busy ({self.settings.queue_size} requests queued); retry shortly",
                           type="server_error", code="queue_full",
                           headers={"Retry-After": str(self.settings.retry_after_s)}) from None

    def cancel(self, job: Job) -> None:
        """Cancel ``job`` if the engine has not started it (it will be skipped); a started job runs to the end."""
        with self._state_lock:
            if job.state != "queued":
                return
            job.state = "cancelled"
            self.stats.cancelled += 1
        log.info("client gone before its %s request started: cancelled", type(job).__name__)

    def _start(self, group: list[Job]) -> list[Job]:
        """The jobs of ``group`` that are not cancelled, now marked running."""
        with self._state_lock:
            live = [j for j in group if j.state == "queued"]
            for j in live:
                j.state = "running"
        return live

    def _take(self) -> list[Job]:
        """Everything queued, after waiting `batch_window_s` for requests sent together with the first."""
        try:
            jobs = [self._queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        time.sleep(self.settings.batch_window_s)
        with contextlib.suppress(queue.Empty):
            while True:
                jobs.append(self._queue.get_nowait())
        return jobs

    def _loop(self) -> None:
        while not self._stop.is_set():
            for group in group_jobs(self._take(), self.settings.max_batch_images):
                group = self._start(group)
                if not group:
                    continue
                self.busy = True
                try:
                    self._run(group)
                finally:
                    self.busy = False

    def _run(self, group: list[Job]) -> None:
        first = group[0]
        if isinstance(first, ChatJob):
            self._chat(first)
            return
        try:
            results = self._generate(group) if first.source is None else [self._edit(first)]
        except Exception as exc:
            if len(group) > 1:  # find the culprit: each job alone
                log.warning("batched call failed (%s: %s); retrying its %d requests one by one",
                            type(exc).__name__, exc, len(group))
                for job in group:
                    self._run([job])
                return
            if not isinstance(exc, VargptError):
                log.exception("image request failed")
            first.channel.put(exc)
            return
        for job, images in zip(group, results, strict=True):
            job.channel.put(images)

    def _generate(self, jobs: list[ImageJob]) -> list[list[Image.Image]]:
        """One `generate` call for all of ``jobs``: prompts repeated n times, one generator per image."""
        prompts = [j.prompt for j in jobs for _ in range(j.n)]
        generators = [torch.Generator().manual_seed(j.seed + i) for j in jobs for i in range(j.n)]
        self._count(len(jobs), len(prompts), calls=1, what="generate", size=jobs[0].size)
        images = self.pipeline.generate(prompts, generator=generators, cfg_scale=jobs[0].cfg_scale, size=jobs[0].size)
        out, start = [], 0
        for j in jobs:
            out.append(images[start:start + j.n])
            start += j.n
        return out

    def _edit(self, job: ImageJob) -> list[Image.Image]:
        self._count(1, job.n, calls=job.n, what="edit", size=job.size)
        return [self.pipeline.edit(job.source, job.prompt, seed=job.seed + i, cfg_scale=job.cfg_scale, size=job.size)
                for i in range(job.n)]

    def _count(self, requests: int, images: int, *, calls: int, what: str, size: Size | None) -> None:
        shown = f"{size[1]}x{size[0]}" if size else "default size"
        log.info("batch of %d image request(s), %d images (%s, %s)", requests, images, what, shown)
        s = self.stats
        s.engine_calls, s.batches = s.engine_calls + calls, s.batches + 1
        s.image_requests, s.images = s.image_requests + requests, s.images + images

    def _chat(self, job: ChatJob) -> None:
        self.stats.chats += 1
        kw = dict(max_new_tokens=job.max_new_tokens, do_sample=job.do_sample, temperature=job.temperature,
                  top_p=job.top_p, seed=job.seed)
        try:
            if job.stream:
                for piece in self.pipeline.chat_stream(job.messages, job.images, **kw):
                    job.channel.put(piece)
            else:
                job.channel.put(self.pipeline.chat(job.messages, job.images, **kw))
        except Exception as exc:
            if not isinstance(exc, VargptError):
                log.exception("chat request failed")
            job.channel.put(exc)
            return
        job.channel.put(_END)


# ----------------------------------------------------------------------------------------------- requests


class _Body(BaseModel):
    """Request bodies: OpenAI's fields we do not use (user, quality, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")


class ImageURL(_Body):
    url: str


class ContentPart(_Body):
    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(_Body):
    model: str
    messages: list[ChatMessage]
    stream: bool = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    n: int = 1


class ImageRequest(_Body):
    prompt: str
    model: str | None = None
    n: int = 1
    size: str | None = None
    response_format: str | None = None
    seed: int | None = None
    cfg: float | None = None


def decode_data_url(url: str) -> Image.Image:
    """A ``data:image/...;base64,`` URL -> RGB image; anything else is a 400 (this server fetches no URLs)."""
    head, sep, payload = url.partition(",")
    if not url.startswith("data:") or not sep:
        raise APIError(400, "image_url must be a data: URL (data:image/png;base64,...); this server fetches no URLs",
                       param="image_url")
    mime, *params = head[len("data:"):].split(";")
    if not mime.startswith("image/") or "base64" not in params:
        raise APIError(400, f"the data URL holds {mime or 'untyped data'!r}, not a base64 image; send "
                       "data:image/png;base64,... (or image/jpeg)", param="image_url")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "the data URL's base64 payload is malformed", param="image_url") from None
    return _image_from_bytes(raw, "image_url")


def _image_from_bytes(raw: bytes, param: str) -> Image.Image:
    """Uploaded image bytes -> RGB (`load_image`: converted, or a 400 naming the problem; huge images are refused
    from their header, before decoding)."""
    data = io.BytesIO(raw)
    data.name = param  # errors say "image_url: not an image ..."
    try:
        return load_image(data, max_pixels=MAX_IMAGE_PIXELS)
    except VargptError as e:
        raise APIError(400, str(e), param=param) from None


def chat_inputs(messages: Sequence[ChatMessage]) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """OpenAI messages -> the pipeline's messages (an ``<image>`` placeholder where each image part was) + images."""
    out, images = [], []
    for m in messages:
        parts = [ContentPart(type="text", text=m.content)] if isinstance(m.content, str) else (m.content or [])
        text = ""
        for part in parts:
            if part.type == "text":
                text += part.text or ""
            elif part.type == "image_url" and part.image_url is not None:
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                images.append(decode_data_url(url))
                text += IMAGE_PLACEHOLDER
            else:
                raise APIError(400, f"content part of type {part.type!r}; use 'text' or 'image_url'",
                               param="messages")
        out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    if len(images) > MAX_CHAT_IMAGES:
        raise APIError(400, f"{len(images)} images in one chat; send at most {MAX_CHAT_IMAGES}", param="messages")
    return out, images


def format_sizes(sizes: Sequence[Size]) -> str:
    """Sizes as OpenAI writes them (WIDTHxHEIGHT), squares first."""
    ordered = sorted(sizes, key=lambda hw: (hw[0] != hw[1], hw[0] * hw[1], hw[1]))
    return ", ".join(f"{w}x{h}" for h, w in ordered)


def parse_size(text: str | None, valid: Sequence[Size]) -> Size | None:
    """OpenAI's ``"WIDTHxHEIGHT"`` -> (height, width); None / "auto" -> None (the model's default size)."""
    if text is None or text == "auto":
        return None
    w, sep, h = text.lower().partition("x")
    size = (int(h), int(w)) if sep and w.isdigit() and h.isdigit() else None
    if size not in valid:
        raise APIError(400, f"size {text!r} is not supported; valid sizes (WIDTHxHEIGHT): {format_sizes(valid)}",
                       param="size", code="unsupported_size")
    return size


# ----------------------------------------------------------------------------------------------- app


class BodyLimit:
    """ASGI middleware: bodies over ``limit`` bytes get 413 (by Content-Length up front, else while reading)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    def _too_large(self) -> APIError:
        return APIError(413, f"request body over {self.limit} bytes; send smaller images",
                        code="request_too_large")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            e = self._too_large()
            return await error_response(413, e.detail, code=e.code, headers={"Connection": "close"})(
                scope, receive, send)
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise self._too_large()
            return message

        await self.app(scope, limited, send)


def authorized(header: str | None, api_key: str) -> bool:
    """``Authorization: Bearer KEY`` matches ``api_key`` (constant-time comparison)."""
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def create_app(pipeline: VARGPTPipeline, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``pipeline`` (a `VARGPTPipeline`); its engine thread runs while the app does."""
    settings = settings or ServerSettings()
    engine = Engine(pipeline, settings)
    valid_sizes = supported_sizes(pipeline.model.config.vae.stride)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="vargpt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        default = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, str(exc.detail), type=getattr(exc, "type", default),
                              code=getattr(exc, "code", None), param=getattr(exc, "param", None),
                              headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":  # its loc is a character offset, not a field
            why = first.get("ctx", {}).get("error", first["msg"])
            return error_response(400, f"the request body is not valid JSON ({why} at character {first['loc'][-1]}); "
                                  "send a JSON object")
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return error_response(400, f"{where}: {first['msg']}" if where else first["msg"], param=where or None)

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled %s: %s", type(exc).__name__, exc)
        return error_response(500, "internal server error; see the server log", type="server_error")

    async def require_key(request: Request, call_next: Any) -> Any:
        """Runs outside `BodyLimit`, so a request without the key is refused before its body is read."""
        if request.url.path.startswith("/v1/") and not authorized(request.headers.get("authorization"),
                                                                   settings.api_key):
            return error_response(401, "missing or wrong API key; send 'Authorization: Bearer KEY'",
                                  code="invalid_api_key")
        return await call_next(request)

    if settings.api_key:
        app.middleware("http")(require_key)

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {settings.model_id!r}",
                           param="model", code="model_not_found")

    def check_n(n: int) -> None:
        if not 1 <= n <= settings.max_n:
            raise APIError(400, f"n = {n}: ask for 1 to {settings.max_n} images", param="n")

    def image_job(prompt: str, n: int, size: str | None, seed: int | None, cfg: float | None,
                  response_format: str | None, source: Image.Image | None = None) -> ImageJob:
        """Validate an image request completely (so the engine only sees runnable jobs) and make its job."""
        check_n(n)
        if response_format not in (None, "b64_json"):
            raise APIError(400, f"response_format {response_format!r}: this server answers b64_json only",
                           param="response_format")
        hw = parse_size(size, valid_sizes)
        try:
            pipeline.check_inputs([prompt], hw, n)
            pipeline.sampling_config(cfg)
        except VargptError as e:
            raise APIError(400, str(e)) from None
        if seed is not None and not 0 <= seed < 2**62:
            raise APIError(400, f"seed = {seed}: use 0 to 2**62 - 1", param="seed")
        seed = secrets.randbelow(2**31) if seed is None else seed
        return ImageJob(prompt=prompt, n=n, seed=seed, size=hw, cfg_scale=cfg, source=source)

    async def first_answer(job: Job, request: Request) -> Any:
        """Queue ``job`` and wait for its first result; a client that disconnects first cancels the job (module
        docstring, "How it runs"), as does this handler being cancelled."""
        engine.submit(job)
        answer = asyncio.ensure_future(job.channel.get())
        gone = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait((answer, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            hung_up = not answer.done()  # (or this handler was cancelled)
            if hung_up:
                answer.cancel()
                engine.cancel(job)
        if hung_up:  # nobody reads this answer
            raise APIError(499, "the client closed the connection before the answer", code="client_closed")
        return answer.result()

    async def run_image_job(job: ImageJob, request: Request) -> JSONResponse:
        result = await first_answer(job, request)
        if isinstance(result, BaseException):
            raise _engine_error(result)
        data = await asyncio.to_thread(lambda: [{"b64_json": _png_b64(im)} for im in result])
        return JSONResponse({"created": int(time.time()), "data": data})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_id, "queued": engine.queued, "queue_size": settings.queue_size,
                "busy": engine.busy, **vars(engine.stats)}

    def model_card() -> dict[str, Any]:
        return {"id": settings.model_id, "object": "model", "created": 0, "owned_by": "vargpt"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return model_card()

    @app.post("/v1/images/generations")
    async def images_generations(body: ImageRequest, request: Request) -> JSONResponse:
        check_model(body.model)
        return await run_image_job(image_job(body.prompt, body.n, body.size, body.seed, body.cfg,
                                             body.response_format), request)

    @app.post("/v1/images/edits")
    async def images_edits(request: Request) -> JSONResponse:
        form = await request.form(max_files=2, max_fields=32)
        files = [f for f in form.getlist("image") + form.getlist("image[]") if isinstance(f, UploadFile)]
        if len(files) != 1:
            raise APIError(400, "send exactly one image file in the 'image' field (multipart/form-data)",
                           param="image")
        if form.get("mask") is not None:
            raise APIError(400, "masks are not supported; the instruction says what to change", param="mask")
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        prompt = fields.get("prompt", "")
        check_model(fields.get("model"))
        source = _image_from_bytes(await files[0].read(), "image")
        job = image_job(prompt, _form_int(fields, "n", 1), fields.get("size"), _form_int(fields, "seed", None),
                        _form_float(fields, "cfg"), fields.get("response_format"), source=source)
        return await run_image_job(job, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        check_model(body.model)
        if body.n != 1:
            raise APIError(400, f"n = {body.n}: this server answers one choice per request", param="n")
        max_new = body.max_completion_tokens or body.max_tokens or 256
        if not 1 <= max_new <= settings.max_tokens:
            raise APIError(400, f"max_tokens = {max_new}: use 1 to {settings.max_tokens}", param="max_tokens")
        if not body.messages:
            raise APIError(400, "messages is empty; send at least one user message", param="messages")
        messages, images = chat_inputs(body.messages)
        temperature = body.temperature or 0.0  # 0 / absent: greedy, the tiny model's best answers
        job = ChatJob(messages=messages, images=images, max_new_tokens=max_new, do_sample=temperature > 0,
                      temperature=temperature or 1.0, top_p=body.top_p if body.top_p is not None else 1.0,
                      seed=body.seed or 0, stream=body.stream)
        first = await first_answer(job, request)  # the first piece (or error) decides the status code
        if isinstance(first, BaseException):
            raise _engine_error(first)
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            pieces, item = [], first
            while item is not _END:
                if isinstance(item, BaseException):
                    raise _engine_error(item)
                pieces.append(item)
                item = await job.channel.get()
            text = "".join(pieces)
            return {"id": reply_id, "object": "chat.completion", "created": created, "model": settings.model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}]}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            return "data: " + json.dumps({"id": reply_id, "object": "chat.completion.chunk", "created": created,
                                          "model": settings.model_id, "choices": [
                                              {"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"

        async def events() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""})
            item = first
            while item is not _END:
                if isinstance(item, BaseException):
                    e = _engine_error(item)
                    yield "data: " + json.dumps({"error": {"message": e.detail, "type": e.type, "code": e.code}})
                    yield "\n\n"
                    break
                yield chunk({"content": item})
                item = await job.channel.get()
            else:
                yield chunk({}, "stop")
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


async def disconnected(request: Request) -> None:
    """Returns when the client hangs up: its body has been read, so the next ASGI message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _form_int(fields: dict[str, str], name: str, default: int | None) -> int | None:
    value = fields.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise APIError(400, f"{name} = {value!r}: expected an integer", param=name) from None


def _form_float(fields: dict[str, str], name: str) -> float | None:
    value = fields.get(name)
    try:
        return None if value in (None, "") else float(value)
    except ValueError:
        raise APIError(400, f"{name} = {value!r}: expected a number", param=name) from None


def serve(pipeline: VARGPTPipeline, settings: ServerSettings) -> None:
    """Run the server in the foreground until Ctrl-C."""
    import uvicorn

    if settings.api_key is None and settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the model",
                    settings.host)
    uvicorn.run(create_app(pipeline, settings), host=settings.host, port=settings.port, log_level="info")
