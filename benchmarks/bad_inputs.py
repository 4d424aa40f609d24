"""Every bad input we know of, through every interface, and what the user sees: writes the table in
docs/reliability.md (between its ``bad-inputs`` markers), so the table is produced, not written by hand.

Interfaces: the command line (``vargpt ...`` in-process: exit code and stderr), Python (the library call and the
exception's one line), HTTP (`vargpt serve`'s app through a test client: status and OpenAI-style error message),
data loading (records files read and loaded for training) and recipes / checkpoints. The embedded default model
serves the cases that need one. A row is "ok" when the user gets a one-line error of ours (`VargptError`, a 4xx
with a message, exit code 2), a counted skip, or the documented conversion; anything else (a traceback, a silent
result, a 500) is flagged ``NO`` and listed after the table.

    python benchmarks/bad_inputs.py [--doc docs/reliability.md] [--json out.json]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import bad_files  # noqa: E402

BEGIN, END = "<!-- bad-inputs:begin -->", "<!-- bad-inputs:end -->"


@dataclass
class Outcome:
    seen: str  # what the user sees, one line
    ok: bool


@dataclass
class Case:
    interface: str
    what: str
    run: Callable[[], Outcome]


# ----------------------------------------------------------------------------------------------- interfaces


def cli(*argv: str) -> Outcome:
    """``vargpt ARGV`` in-process: the exit code and the last stderr line (or stdout when it succeeded)."""
    from vargpt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv) + ["--device", "cpu"] * (argv[0] in ("generate", "edit", "chat")))
            code = 0
        except SystemExit as e:
            code = e.code
    lines = [x for x in err.getvalue().splitlines() if x.strip()]
    shown = lines[-1] if lines else (out.getvalue().strip().splitlines() or [""])[-1]
    one_line = len(lines) <= 1 and "Traceback" not in err.getvalue()
    return Outcome(f"exit {code}: {shown}", code == 2 and one_line and shown.startswith("error: ")
                   and "--debug" not in shown)


def python(fn: Callable[[], object], *, expect_error: bool = True) -> Outcome:
    """A library call: the exception's line (ours: `VargptError`), or what it returned."""
    from vargpt.errors import VargptError

    try:
        result = fn()
    except VargptError as e:
        return Outcome(f"{type(e).__name__}: {e}", expect_error and "\n" not in str(e))
    except Exception as e:  # a crash is what this table exists to find
        return Outcome(f"CRASH {type(e).__name__}: {e} ({traceback.extract_tb(e.__traceback__)[-1].name})", False)
    return Outcome(f"no error: {result}", not expect_error)


def http(client, method: str, path: str, **kw) -> Outcome:
    r = client.request(method, path, **kw)
    try:
        message = r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = r.text[:200]
    return Outcome(f"HTTP {r.status_code}: {message}", 400 <= r.status_code < 500 and "\n" not in message)


# ----------------------------------------------------------------------------------------------- the cases


def cases(tmp: Path, pipe, client) -> list[Case]:
    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file

    from vargpt.data.records import RecordDataset, read_records
    from vargpt.imageio import load_image
    from vargpt.pipeline import default_model_dir
    from vargpt.training.checkpoint import latest_checkpoint, save_checkpoint

    files = {}
    for name, (data, _) in bad_files.BROKEN.items():
        files[name] = tmp / (re.sub(r"\W+", "_", name).strip("_")[:40] + ".png")
        files[name].write_bytes(data)
    good = tmp / "good.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(good)

    def model_dir(name: str, edit: Callable[[Path], None]) -> Path:
        d = tmp / name
        shutil.copytree(default_model_dir(), d)
        edit(d)
        return d

    def nan_weights(d: Path) -> None:
        sd = load_file(d / "model.safetensors")
        sd["vargpt_gen.head.weight" if "vargpt_gen.head.weight" in sd else sorted(sd)[0]].view(-1)[3] = float("nan")
        save_file(sd, d / "model.safetensors")

    def pickled(d: Path) -> None:
        torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
        (d / "model.safetensors").unlink()

    def truncated(d: Path) -> None:
        blob = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(blob[: len(blob) // 3])

    def half_written(d: Path) -> None:
        (d / "model.safetensors").unlink()

    def mismatched(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg["decoder"]["embed_dim"] *= 2
        (d / "config.json").write_text(json.dumps(cfg))

    def garbage_config(d: Path) -> None:
        (d / "config.json").write_bytes(b"\xff\xfe{not json")

    def records(name: str, *rows: object, raw: bytes | None = None) -> Path:
        d = tmp / name
        (d / "images").mkdir(parents=True)
        Image.new("RGB", (64, 64), "blue").save(d / "images" / "ok.png")
        body = raw if raw is not None else b"\n".join(json.dumps(r).encode() for r in rows)
        (d / "records.jsonl").write_bytes(body + b"\n")
        return d

    def t2i(image: str) -> dict:
        return {"messages": [{"role": "user", "content": "Draw."}, {"role": "assistant", "content": "<image_gen>"}],
                "images": [image]}

    def load_and_skip(d: Path) -> Outcome:
        """A training read: the records, then one sample (a bad image is skipped, logged and counted)."""
        from vargpt.errors import VargptError

        log = io.StringIO()
        handler = logging.StreamHandler(log)
        logging.getLogger("vargpt.data").addHandler(handler)
        try:
            recs = read_records(d)
            item = RecordDataset(recs, pipe.processor, image_size=64, stride=pipe.model.config.vae.stride)[0]
        except VargptError as e:
            return Outcome(f"{type(e).__name__}: {e}", True)
        finally:
            logging.getLogger("vargpt.data").removeHandler(handler)
        warned = log.getvalue().strip().splitlines()
        return Outcome(f"skipped {item['skipped']} and counted; log: {warned[-1] if warned else '(nothing)'}",
                       bool(item["skipped"]) and bool(warned))

    outside = tmp / "secret.png"
    Image.new("RGB", (64, 64), "red").save(outside)
    symlinked = records("symlinked", t2i("images/link.png"), t2i("images/ok.png"))
    (symlinked / "images" / "link.png").symlink_to(outside)
    missing = records("missing", t2i("images/nope.png"), t2i("images/ok.png"))
    corrupt = records("corrupt", t2i("images/bad.png"), t2i("images/ok.png"))
    (corrupt / "images" / "bad.png").write_bytes(bad_files.BROKEN["truncated PNG"][0])

    def recipe_file(name: str, text: bytes) -> Path:
        path = tmp / name
        path.write_bytes(text)
        return path

    def optimizer_trap() -> Outcome:
        ck = save_checkpoint(tmp / "run", 4, model_state={"w": torch.zeros(2)}, optimizer_state={"m": 1})
        (ck.path / "optimizer.pt").write_bytes(b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03.")
        return python(lambda: latest_checkpoint(tmp / "run").optimizer_state())

    def disk_full() -> Outcome:
        import errno

        from vargpt.training import checkpoint

        real = checkpoint.save_file

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        checkpoint.save_file = full
        try:
            return python(lambda: save_checkpoint(tmp / "run", 8, model_state={"w": torch.zeros(2)}))
        finally:
            checkpoint.save_file = real

    long_prompt = "a red circle " * 1500
    fits_alone = "a red circle " * 1240  # ~3,700 tokens: fits the LLM alone, not with the image after it
    nan_image = torch.full((32, 32, 3), float("nan"))

    def data_url(raw: bytes) -> str:
        return "data:image/png;base64," + base64.b64encode(raw).decode()

    def chat_image(raw: bytes) -> Outcome:
        return http(client, "POST", "/v1/chat/completions", json={"model": "vargpt-tiny", "max_tokens": 2, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(raw)}},
                                         {"type": "text", "text": "What is it?"}]}]})

    def gen(**body) -> Outcome:
        return http(client, "POST", "/v1/images/generations", json={"prompt": "a red circle", "size": "64x64"} | body)

    def converted(kind: str) -> Outcome:
        data, pixel = bad_files.CONVERTIBLE[kind]
        img = load_image(io.BytesIO(data))
        return Outcome(f"loads as {img.mode} {img.size[0]}x{img.size[1]}, pixel (0,0) = {img.getpixel((0, 0))} "
                       f"(expected {pixel})", img.mode == "RGB")

    b = bad_files.BROKEN
    c = [
        # --- image files through the CLI
        Case("CLI", "`check` a text file named .png", lambda: cli("check", "--prompt", "a red circle",
                                                                   str(files["text file"]))),
        Case("CLI", "`check` a truncated PNG", lambda: cli("check", "--prompt", "a red circle",
                                                            str(files["truncated PNG"]))),
        Case("CLI", "`check` an empty file", lambda: cli("check", "--prompt", "a red circle",
                                                          str(files["empty file"]))),
        Case("CLI", "`check` a 0x0 PNG", lambda: cli("check", "--prompt", "a red circle",
                                                      str(files["zero-sized PNG (0x0)"]))),
        Case("CLI", "`edit --image` a decompression bomb (100000x100000 header)",
             lambda: cli("edit", "make it blue", "--image",
                         str(files["decompression bomb (100000x100000 PNG header)"]), "--out", str(tmp / "o.png"))),
        Case("CLI", "`chat --image` a 9000x9000 PNG (over the 64 Mpx limit)",
             lambda: cli("chat", "What is it?", "--image", str(files["over the limit (9000x9000 PNG header)"]))),
        Case("CLI", "`chat --image` a float (mode F) TIFF",
             lambda: cli("chat", "What is it?", "--image", str(files["float (mode F) TIFF"]))),
        Case("CLI", "`edit --image` a missing file", lambda: cli("edit", "make it blue", "--image",
                                                                  str(tmp / "nope.png"), "--out", str(tmp / "o.png"))),
        Case("CLI", "`edit --image` a directory", lambda: cli("edit", "make it blue", "--image", str(tmp),
                                                               "--out", str(tmp / "o.png"))),
        # --- prompts through the CLI
        Case("CLI", "`generate` an empty prompt", lambda: cli("generate", "  ", "--out", str(tmp / "o.png"))),
        Case("CLI", "`generate` a prompt with non-UTF-8 bytes (b'caf\\xe9')",
             lambda: cli("generate", os.fsdecode(b"caf\xe9"), "--out", str(tmp / "o.png"))),
        Case("CLI", "`chat` a 4,500-token question", lambda: cli("chat", long_prompt)),
        Case("CLI", "`generate --size 100` (no scale schedule)", lambda: cli("generate", "a red circle", "--size",
                                                                             "100", "--out", str(tmp / "o.png"))),
        # --- checkpoints through the CLI
        Case("CLI", "`generate --model` a directory that does not exist",
             lambda: cli("generate", "a red circle", "--model", str(tmp / "none"), "--out", str(tmp / "o.png"))),
        Case("CLI", "`generate --model` weights as a pickled pytorch_model.bin",
             lambda: cli("generate", "a red circle", "--model", str(model_dir("pickled", pickled)), "--out",
                         str(tmp / "o.png"))),
        Case("CLI", "`generate --model` weights holding a NaN",
             lambda: cli("generate", "a red circle", "--model", str(model_dir("nan", nan_weights)), "--out",
                         str(tmp / "o.png"))),
        Case("CLI", "`generate --model` a truncated model.safetensors",
             lambda: cli("generate", "a red circle", "--model", str(model_dir("truncated", truncated)), "--out",
                         str(tmp / "o.png"))),
        Case("CLI", "`generate --model` a half-written directory (config.json, no weights)",
             lambda: cli("generate", "a red circle", "--model", str(model_dir("half", half_written)), "--out",
                         str(tmp / "o.png"))),
        Case("CLI", "`generate --model` whose config does not match its weights",
             lambda: cli("generate", "a red circle", "--model", str(model_dir("mismatch", mismatched)), "--out",
                         str(tmp / "o.png"))),
        Case("CLI", "`generate --model` whose config.json is not UTF-8 JSON",
             lambda: cli("generate", "a red circle", "--model", str(model_dir("garbage", garbage_config)), "--out",
                         str(tmp / "o.png"))),
        # --- recipes
        Case("recipes", "`train --recipe` a file that is not UTF-8",
             lambda: cli("train", "--recipe", str(recipe_file("latin1.yaml", b"name: caf\xe9\n")))),
        Case("recipes", "`train --recipe` with an unknown field",
             lambda: cli("train", "--recipe", str(recipe_file("typo.yaml", b"optim: {learning_rate: 1}\n")))),
        Case("recipes", "`train --recipe` with data.image_size = 60",
             lambda: cli("train", "--recipe", str(recipe_file("size.yaml", (
                 f"out_dir: {tmp / 'r'}\ndata: {{image_size: 60, sources: [{{path: {missing}}}]}}\n").encode())))),
        Case("recipes", "`train --recipe` that is not valid YAML",
             lambda: cli("train", "--recipe", str(recipe_file("bad.yaml", b"a: [\n")))),
        Case("recipes", "`train --recipe` whose data leave the data root",
             lambda: cli("train", "--recipe", str(recipe_file("escape.yaml", (
                 f"model: {{preset: tiny}}\nout_dir: {tmp / 'r'}\ndata: {{sources: [{{path: "
                 f"{records('escape', t2i('../secret.png'))}}}]}}\n").encode())))),
        # --- image files and tensors in Python
        *[Case("Python", f"`load_image` {kind}", lambda kind=kind: converted(kind))
          for kind in ("CMYK JPEG", "P + transparency", "I;16 (16-bit grey PNG)", "16-bit RGB PNG", "LA (grey + alpha)",
                       "RGBA (half alpha)", "EXIF-rotated JPEG")],
        Case("Python", "`load_image` with `max_pixels=100` on a 64x64 image",
             lambda: python(lambda: load_image(good, max_pixels=100))),
        Case("Python", "`pipe.generate` an empty prompt", lambda: python(lambda: pipe.generate(["  "]))),
        Case("Python", "`pipe.generate` a 4,500-token prompt", lambda: python(lambda: pipe.generate([long_prompt]))),
        Case("Python", "`pipe.generate` a 3,740-token prompt (+ 641 image positions > 4,096)",
             lambda: python(lambda: pipe.generate([fits_alone], size=128), expect_error=True)),
        Case("Python", "`pipe.chat` a prompt with a lone surrogate ('\\ud800')",
             lambda: python(lambda: pipe.chat("what is \ud800?"))),
        Case("Python", "`pipe.processor` an image tensor full of NaN",
             lambda: python(lambda: pipe.processor("<image>What is it?", [nan_image]))),
        Case("Python", "`pipe.chat` with that tensor (the pipeline takes PIL images)",
             lambda: python(lambda: pipe.chat("What is it?", [nan_image]))),
        Case("Python", "`model.vae_local.encode` NaN pixels",
             lambda: python(lambda: pipe.model.vae_local.encode(torch.full((1, 3, 64, 64), float("nan"))))),
        # --- HTTP
        Case("HTTP", "chat with a data URL holding text", lambda: chat_image(b["text file"][0])),
        Case("HTTP", "chat with a truncated PNG", lambda: chat_image(b["truncated PNG"][0])),
        Case("HTTP", "chat with a decompression bomb", lambda: chat_image(
            b["decompression bomb (100000x100000 PNG header)"][0])),
        Case("HTTP", "chat with a 0x0 PNG", lambda: chat_image(b["zero-sized PNG (0x0)"][0])),
        Case("HTTP", "chat with a 4097x4096 PNG (server limit 4096x4096)",
             lambda: chat_image(bad_files.png_by_hand(4097, 4096))),
        Case("HTTP", "edit with an empty image upload", lambda: http(
            client, "POST", "/v1/images/edits", data={"prompt": "make it blue"},
            files={"image": ("empty.png", b"", "image/png")})),
        Case("HTTP", "generate an empty prompt", lambda: gen(prompt="   ")),
        Case("HTTP", "generate a prompt with a lone surrogate (JSON \"\\ud800\")",
             lambda: http(client, "POST", "/v1/images/generations", content=b'{"prompt": "x\\ud800", "size": "64x64"}',
                          headers={"content-type": "application/json"})),
        Case("HTTP", "generate a 4,500-token prompt", lambda: gen(prompt=long_prompt)),
        Case("HTTP", "generate size 100x100", lambda: gen(size="100x100")),
        Case("HTTP", "chat with a body that is not JSON", lambda: http(
            client, "POST", "/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})),
        # --- data loading (training)
        Case("data loading", "records image path `../secret.png`",
             lambda: python(lambda: read_records(records("traversal", t2i("../secret.png"))))),
        Case("data loading", "records image path `/etc/passwd`",
             lambda: python(lambda: read_records(records("absolute", t2i("/etc/passwd"))))),
        Case("data loading", "records image that is a symlink out of the data root",
             lambda: load_and_skip(symlinked)),
        Case("data loading", "records image missing", lambda: load_and_skip(missing)),
        Case("data loading", "records image truncated", lambda: load_and_skip(corrupt)),
        Case("data loading", "records line that is not UTF-8 (Latin-1)",
             lambda: python(lambda: read_records(records("latin1", raw=b'{"messages": "caf\xe9"}')))),
        Case("data loading", "records line that is not JSON",
             lambda: python(lambda: read_records(records("notjson", raw=b'{"messages": [}')))),
        # --- checkpoints (training)
        Case("checkpoints", "resume from an optimizer.pt that runs code when unpickled", optimizer_trap),
        Case("checkpoints", "a checkpoint write hits a full disk (ENOSPC)", disk_full),
    ]
    return c


# ----------------------------------------------------------------------------------------------- table


def _cell(text: str, tmp: Path) -> str:
    text = text.replace(str(tmp), "DIR").replace(str(ROOT), ".").replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 400 else text[:397] + "..."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doc", default=str(ROOT / "docs" / "reliability.md"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import warnings

    import torch
    from fastapi.testclient import TestClient

    from vargpt.pipeline import VARGPTPipeline
    from vargpt.server import ServerSettings, create_app

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.NOTSET)
    pipe = VARGPTPipeline.from_pretrained(device="cpu", progress=False)
    rows = []
    with tempfile.TemporaryDirectory() as t, TestClient(create_app(pipe, ServerSettings())) as client:
        tmp = Path(t).resolve()
        for case in cases(tmp, pipe, client):
            outcome = case.run()
            rows.append({"interface": case.interface, "input": case.what, "seen": _cell(outcome.seen, tmp),
                         "ok": outcome.ok})
            print(f"[{'ok' if outcome.ok else 'NO'}] {case.interface}: {case.what} -> {rows[-1]['seen']}", flush=True)
    table = ["| # | interface | bad input | what the user sees | ok |", "|---|---|---|---|---|"]
    table += [f"| {i} | {r['interface']} | {r['input']} | {r['seen']} | {'yes' if r['ok'] else '**NO**'} |"
              for i, r in enumerate(rows, 1)]
    bad = [r for r in rows if not r["ok"]]
    summary = (f"{len(rows)} cases, {len(rows) - len(bad)} handled (a one-line error of ours, a counted skip or the "
               f"documented conversion), {len(bad)} not" + (": " + "; ".join(r["input"] for r in bad) if bad else "")
               + ". Generated by `python benchmarks/bad_inputs.py`; DIR is a temporary directory.")
    block = "\n".join([BEGIN, summary, "", *table, END])
    doc = Path(args.doc)
    text = doc.read_text() if doc.is_file() else f"# Reliability\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    start, end = text.index(BEGIN), text.index(END) + len(END)
    doc.write_text(text[:start] + block + text[end:])
    print(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
