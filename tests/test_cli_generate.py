"""`vargpt generate / chat / edit / convert` through the real CLI entry, on a random tiny model (``--model``)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from conftest import run_cli


def test_generate_one_file_and_a_directory(tiny_model_dir, tmp_path, capsys):
    m = ["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32"]
    code, out, err = run_cli(capsys, "generate", "a red circle", "--out", str(tmp_path / "one.png"), "--size", "64", *m)
    assert code == 0, err
    assert Image.open(tmp_path / "one.png").size == (64, 64)
    code, out, err = run_cli(capsys, "generate", "a red circle", "a blue square", "--n", "2", "--seed", "3",
                             "--cfg", "2", "--out", str(tmp_path / "many"), *m)
    assert code == 0, err
    files = sorted((tmp_path / "many").glob("*.png"))
    assert len(files) == 4 and out.split() == [str(f) for f in files]


def test_chat_edit_convert(tiny_model_dir, tmp_path, capsys):
    m = ["--model", str(tiny_model_dir), "--device", "cpu"]
    img = tmp_path / "in.png"
    Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8)).save(img)
    code, out, err = run_cli(capsys, "chat", "--image", str(img), "What is shown?", "--max-new-tokens", "4", *m)
    assert code == 0, err
    code, out, err = run_cli(capsys, "edit", "--image", str(img), "make it red", "--out", str(tmp_path / "e.png"), *m)
    assert code == 0, err
    assert Image.open(tmp_path / "e.png").size == (64, 64)
    code, out, err = run_cli(capsys, "convert", str(tiny_model_dir), str(tmp_path / "released"))
    assert code == 0, err
    assert json.loads(out)["layout"] == "released"
    assert json.loads((tmp_path / "released" / "config.json").read_text())["model_type"] == "vargpt_qwen2_vl"


def test_user_errors_are_one_line(tiny_model_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", "a circle", "--size", "100", "--model", str(tiny_model_dir), "--out",
                        str(tmp_path / "x.png"))
    assert code == 2 and err.startswith("error: ") and "supported sizes" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "generate", "a circle", "--model", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "x.png"))
    assert code == 2 and "config.json" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "chat", "--image", str(tmp_path / "missing.png"), "hi",
                           "--model", str(tiny_model_dir))
    assert code == 2 and "missing.png" in err


def test_usage_errors_name_the_option(tmp_path, capsys):
    """A bad option value or an unknown option: click's usage message naming it, exit 2 (whichever click typer
    raises: its own copy in newer typer, click's in older)."""
    code, _, err = run_cli(capsys, "generate", "a circle", "--steps-typo", "3")
    assert code == 2 and "No such option: --steps-typo" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "bench", "--json", str(tmp_path / "b.json"), "--runs", "0")
    assert code == 2 and "Invalid value for '--runs'" in err
    code, out, _ = run_cli(capsys, "bench", "--help")
    assert code == 0 and "--baseline-timeout" in out


def test_chat_repl(tiny_model_dir, tmp_path, capsys, monkeypatch):
    img = tmp_path / "in.png"
    Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8)).save(img)
    lines = iter(["What is shown?", "And the colour?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, out, err = run_cli(capsys, "chat", "--image", str(img), "--max-new-tokens", "3",
                             "--model", str(tiny_model_dir), "--device", "cpu")
    assert code == 0, err
    assert len(out.splitlines()) == 2  # one answer line per question, then the empty line ends the session


def test_non_square_sizes_width_x_height_or_aspect(tiny_model_dir, tmp_path, capsys):
    from vargpt.pipeline import VARGPTPipeline
    from vargpt.scales import num_tokens, resolve_size

    m = ["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32"]
    code, _, err = run_cli(capsys, "generate", "a red circle", "--size", "64", "--aspect", "2:1",
                           "--out", str(tmp_path / "wide.png"), *m)
    assert code == 0, err
    assert Image.open(tmp_path / "wide.png").size == (80, 40)  # PIL: (width, height)
    code, _, err = run_cli(capsys, "generate", "a red circle", "--size", "40x80", "--out", str(tmp_path / "tall.png"),
                           *m)
    assert code == 0, err
    assert Image.open(tmp_path / "tall.png").size == (40, 80)
    src = tmp_path / "src.png"
    Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8)).save(src)
    code, _, err = run_cli(capsys, "edit", "--image", str(src), "make it red", "--size", "80x40",
                           "--out", str(tmp_path / "e.png"), *m)
    assert code == 0, err
    assert Image.open(tmp_path / "e.png").size == (80, 40)
    code, _, err = run_cli(capsys, "generate", "a circle", "--size", "100x60", "--out", str(tmp_path / "x.png"), *m)
    assert code == 2 and "nearest supported sizes: 112x64" in err and not (tmp_path / "x.png").exists()
    # the tokens drawn follow the 2:1 schedule: its grids, its token count
    engine = VARGPTPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32", progress=False).engine
    out = engine.generate_images("a red circle", size=resolve_size("64", 8, "2:1"), seed=0)
    assert out.images.shape == (1, 3, 40, 80) and out.schedule[-1] == (1, 5, 10)
    assert sum(b.shape[1] * b.shape[2] for b in out.bits) == num_tokens(out.schedule)
    assert [tuple(b.shape[1:3]) for b in out.bits] == [(h, w) for _, h, w in out.schedule]
