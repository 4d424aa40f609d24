"""`vargpt ui`: a local web UI over `VARGPTPipeline` (gradio Blocks) with three tabs.

Contract
--------
* `build_ui(pipe) -> gr.Blocks`:
  - Chat: an image (optional) and a question; the answer streams in (`chat_stream`). Follow-up questions continue
    the conversation; a new image joins it (one ``<image>`` placeholder in that turn); Clear starts over.
  - Generate: prompt, seed, CFG, size ("64", or "80x40" as WIDTHxHEIGHT, checked by `vargpt.scales.resolve_size`;
    empty = the model's size), batch -> a gallery (image i uses seed + i), plus the coarse-to-fine preview of the
    first image: one picture per scale, streamed while it is sampled (the per-scale callback decodes the scales
    so far with the VAE).
  - Edit: an image and an instruction -> the result beside the original.
* `launch(pipe, host=..., port=...)`: serves it on 127.0.0.1 by default, with no share link, no telemetry and
  nothing fetched from the internet (system fonts; gradio serves its own scripts and styles).
* A problem the user can cause (`VargptError`: bad size, empty prompt, corrupt image) becomes a `gr.Error` pop-up
  with its one-line message. Anything else is a bug: the page says "Error", the terminal has the traceback.
* One model call at a time: every event that runs the model shares one gradio concurrency group (the model is not
  safe to drive from two threads, and one device runs one call at a time anyway).

Not here: logins (keep the default loopback address, or put an authenticating proxy in front), the HTTP API
(`vargpt serve`), masks for edits.
"""

from __future__ import annotations

import functools
import inspect
import io
import os
import queue
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from vargpt.errors import InputError, VargptError
from vargpt.imageio import load_image
from vargpt.pipeline import to_pil
from vargpt.processing import IMAGE_PLACEHOLDER
from vargpt.scales import resolve_size

try:
    import gradio as gr
except ModuleNotFoundError as e:  # an optional extra
    raise VargptError("the web UI needs gradio: pip install 'vargpt[ui]'") from e

if TYPE_CHECKING:
    from vargpt.pipeline import VARGPTPipeline

__all__ = ["build_ui", "launch"]

# Limits.
MAX_N = 8  # images per Generate click
DEFAULT_N = 4
MAX_NEW_TOKENS = 256  # per chat answer
MAX_UPLOAD = "16mb"  # per uploaded file (as `vargpt serve` caps a request)
DELETE_CACHE = (3600, 24 * 3600)  # every hour, delete generated and uploaded files older than a day

MODEL_EVENTS = "model"  # the concurrency group of every event that runs the model
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "DejaVu Sans", "Arial", "sans-serif"]
SYSTEM_MONO_FONTS = ["ui-monospace", "DejaVu Sans Mono", "Consolas", "monospace"]


# ----------------------------------------------------------------------------------------------- helpers


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with `VargptError` shown as a `gr.Error` pop-up (its one-line message, no traceback)."""
    if inspect.isgeneratorfunction(fn):  # gradio streams generator functions: keep the wrapper one

        @functools.wraps(fn)
        def stream(*args: Any) -> Iterator[Any]:
            try:
                yield from fn(*args)
            except VargptError as e:
                raise gr.Error(str(e), print_exception=False) from None

        return stream

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        try:
            return fn(*args)
        except VargptError as e:
            raise gr.Error(str(e), print_exception=False) from None

    return call


class PngFiles:
    """Streamed images as PNG files, each written once: gradio writes a PIL output to its cache again on every yield,
    racing the browser's download of the copy it sent before, while a file path it copies once, atomically."""

    def __init__(self, folder: str | Path) -> None:
        self.folder, self.paths = Path(folder), {}

    def __call__(self, image: Image.Image) -> str:
        if id(image) not in self.paths:  # the caller keeps every image alive for the whole stream
            path = self.folder / f"{len(self.paths)}.png"
            image.save(path, format="PNG")
            self.paths[id(image)] = str(path)
        return self.paths[id(image)]


def _upload(value: dict[str, Any] | None) -> str | None:
    """The path of an image upload as an event with ``preprocess=False`` gets it: unopened, so that `_load` judges the
    file (gradio's own preprocessing opens it with PIL first and answers a corrupt file with a bare "Error")."""
    return value["path"] if value else None


def _load(path: str) -> Image.Image:
    """An uploaded image as RGB; errors name the file as the user called it, not gradio's cache path."""
    data = io.BytesIO(Path(path).read_bytes())
    data.name = Path(path).name
    return load_image(data)


def _size(pipe: VARGPTPipeline, text: str | None) -> tuple[int, int] | None:
    """The size box as (height, width); empty = the model's own size."""
    text = (text or "").strip()
    return resolve_size(text, pipe.model.config.vae.stride) if text else None


def _cfg(value: float | None) -> float | None:
    return None if value is None else float(value)


def _seed(value: float | None) -> int:
    if value is None or value < 0 or value != int(value):
        raise InputError(f"seed {value}: use a whole number >= 0")
    return int(value)


# ----------------------------------------------------------------------------------------------- generate


def generate_with_previews(pipe: VARGPTPipeline, prompt: str, *, seed: int, cfg_scale: float | None,
                           size: tuple[int, int] | None, n: int) -> Iterator[tuple[list[Image.Image],
                                                                                 list[Image.Image]]]:
    """Yields ``(images, previews)``: ``previews`` grows by one picture of the first image per scale (the scales so
    far, decoded at full size) while sampling runs in a worker thread; ``images`` is empty until the last yield.
    Closing the iterator early interrupts the generation."""
    pipe.check_inputs([prompt], size, n)
    schedule = pipe.engine.schedule_for(size)
    events: queue.Queue[tuple[str, Any]] = queue.Queue()
    bits_so_far = []

    def on_scale(k: int, num_scales: int, bits_BhwD: Any) -> None:
        bits_so_far.append(bits_BhwD[:1])
        events.put(("preview", to_pil(pipe.model.vae.decode_bits(bits_so_far, schedule))[0]))

    def work() -> None:
        try:
            events.put(("done", pipe.generate(prompt, seed=seed, cfg_scale=cfg_scale, size=size, n=n,
                                              callback_on_scale=on_scale)))
        except BaseException as e:  # re-raised in the caller's thread
            events.put(("error", e))

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    previews: list[Image.Image] = []
    try:
        while True:
            kind, item = events.get()
            if kind == "error":
                raise item
            if kind == "done":
                yield item, previews
                return
            previews.append(item)
            yield [], previews
    finally:
        if worker.is_alive():  # the page went away mid-generation: free the model for the next event
            pipe.interrupt()
        worker.join()


# ----------------------------------------------------------------------------------------------- chat


@dataclass(frozen=True)
class ChatState:
    """One conversation: the model's messages, the images they refer to (paths, in order) and what the page shows."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    image_paths: list[str] = field(default_factory=list)
    shown: list[dict[str, Any]] = field(default_factory=list)


def chat_turn(pipe: VARGPTPipeline, state: ChatState, image_path: str | None,
              question: str) -> Iterator[tuple[list[dict[str, Any]], ChatState]]:
    """Yields ``(shown messages, state)`` while the answer streams; the last yield carries the finished turn."""
    question = (question or "").strip()
    if not question:
        raise InputError("the question is empty; ask something, e.g. 'What is in the image?'")
    content, paths, shown = question, list(state.image_paths), list(state.shown)
    if image_path and image_path not in paths:  # a new image joins the conversation in this turn
        _load(image_path)  # a corrupt file fails here, before anything changes
        paths.append(image_path)
        content = IMAGE_PLACEHOLDER + "\n" + question
        shown.append({"role": "user", "content": {"path": image_path}})
    messages = [*state.messages, {"role": "user", "content": content}]
    shown.append({"role": "user", "content": question})
    answer = ""
    for piece in pipe.chat_stream(messages, [_load(p) for p in paths], max_new_tokens=MAX_NEW_TOKENS):
        answer += piece
        yield [*shown, {"role": "assistant", "content": answer}], state
    shown.append({"role": "assistant", "content": answer})
    yield shown, replace(state, messages=[*messages, {"role": "assistant", "content": answer}], image_paths=paths,
                         shown=shown)


# ----------------------------------------------------------------------------------------------- the page


def build_ui(pipe: VARGPTPipeline) -> gr.Blocks:
    """The three tabs over ``pipe`` (see the module docstring)."""
    config = pipe.model.config
    default_cfg = config.sampling.cfg_scale if isinstance(config.sampling.cfg_scale, (int, float)) else None
    size_info = f"N (square) or WIDTHxHEIGHT in pixels, e.g. {config.image_size} or 80x40; empty = the model's size"
    model_events = dict(concurrency_limit=1, concurrency_id=MODEL_EVENTS)

    with gr.Blocks(title="VARGPT", analytics_enabled=False, delete_cache=DELETE_CACHE) as demo:
        gr.Markdown("## VARGPT: understand, generate and edit images")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                state = gr.State(ChatState())
                with gr.Row():
                    with gr.Column(scale=1):
                        chat_image = gr.Image(type="filepath", label="Image (optional)", height=300,
                                              sources=["upload", "clipboard"], elem_id="chat-image")
                    with gr.Column(scale=2):
                        chatbot = gr.Chatbot(label="Conversation", height=360, elem_id="chatbot")
                        question = gr.Textbox(label="Question", placeholder="What is in the image?",
                                              elem_id="chat-question")
                        with gr.Row():
                            ask = gr.Button("Ask", variant="primary", elem_id="chat-ask")
                            clear = gr.Button("Clear")

            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column(scale=1):
                        prompt = gr.Textbox(label="Prompt", lines=2, placeholder="A red circle above a blue square.",
                                            elem_id="gen-prompt")
                        with gr.Row():
                            gen_seed = gr.Number(0, label="Seed", precision=0, minimum=0, info="image i: seed + i")
                            gen_cfg = gr.Number(default_cfg, label="CFG", info="empty = the model's")
                        gen_size = gr.Textbox(str(config.image_size), label="Size", info=size_info,
                                              elem_id="gen-size")
                        gen_n = gr.Slider(1, MAX_N, value=DEFAULT_N, step=1, label="Images", elem_id="gen-n")
                        gen_button = gr.Button("Generate", variant="primary", elem_id="gen-button")
                    with gr.Column(scale=2):
                        gallery = gr.Gallery(label="Images", columns=4, height=300, object_fit="contain",
                                             elem_id="gen-gallery")
                        previews = gr.Gallery(label="Coarse to fine: the first image after each scale", columns=8,
                                              height=200, object_fit="contain", elem_id="gen-previews")

            with gr.Tab("Edit", id="edit"):
                with gr.Row():
                    edit_image = gr.Image(type="filepath", label="Before", height=320, sources=["upload", "clipboard"],
                                          elem_id="edit-before")
                    edited = gr.Image(label="After", format="png", height=320, interactive=False,
                                      elem_id="edit-after")
                instruction = gr.Textbox(label="Instruction", placeholder="Make the circle blue.",
                                         elem_id="edit-instruction")
                with gr.Row():
                    edit_seed = gr.Number(0, label="Seed", precision=0, minimum=0)
                    edit_cfg = gr.Number(default_cfg, label="CFG", info="empty = the model's")
                    edit_size = gr.Textbox("", label="Size", info=size_info)
                edit_button = gr.Button("Edit", variant="primary", elem_id="edit-button")

        @_user_errors
        def on_chat(image, text, chat_state):
            for shown, new_state in chat_turn(pipe, chat_state, _upload(image), text):
                yield shown, "", new_state

        @_user_errors
        def on_generate(text, seed, cfg, size_text, n):
            seed, size = _seed(seed), _size(pipe, size_text)
            grids = [f"{w}x{h}" for _, h, w in pipe.engine.schedule_for(size)]
            with tempfile.TemporaryDirectory(prefix="vargpt-ui-") as folder:
                png = PngFiles(folder)
                for images, steps in generate_with_previews(pipe, text, seed=seed, cfg_scale=_cfg(cfg), size=size,
                                                            n=int(n)):
                    yield ([(png(im), f"seed {seed + i}") for i, im in enumerate(images)] or None,
                           [(png(im), f"scale {k + 1}: {grids[k]}") for k, im in enumerate(steps)])

        @_user_errors
        def on_edit(image, text, seed, cfg, size_text):
            image_path = _upload(image)
            if not image_path:
                raise InputError("no image to edit; upload one first")
            return pipe.edit(_load(image_path), text, seed=_seed(seed), cfg_scale=_cfg(cfg),
                             size=_size(pipe, size_text))

        gr.on([ask.click, question.submit], on_chat, [chat_image, question, state], [chatbot, question, state],
              preprocess=False, **model_events)
        clear.click(lambda: ([], "", ChatState(), None), None, [chatbot, question, state, chat_image])
        gr.on([gen_button.click, prompt.submit], on_generate, [prompt, gen_seed, gen_cfg, gen_size, gen_n],
              [gallery, previews], **model_events)
        gr.on([edit_button.click, instruction.submit], on_edit,
              [edit_image, instruction, edit_seed, edit_cfg, edit_size], edited, preprocess=False, **model_events)
    return demo


def launch(pipe: VARGPTPipeline, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> gr.Blocks:
    """Serve `build_ui(pipe)` at http://host:port/ (``block``: until Ctrl-C; else return the running app, whose
    ``close()`` stops it)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # gradio's telemetry and version check read this
    demo = build_ui(pipe)
    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=SYSTEM_MONO_FONTS)
    try:
        demo.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block,
                    max_file_size=MAX_UPLOAD, ssr_mode=False, mcp_server=False, pwa=False, theme=theme,
                    footer_links=["api", "settings"], quiet=not block)
    except OSError:
        raise VargptError(f"cannot listen on {host}:{port} (the port is in use, or the address is not this "
                          "machine's); pick another --port or --host") from None
    return demo
