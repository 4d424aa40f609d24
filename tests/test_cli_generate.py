"""`vargpt generate / chat / edit / convert` through the real CLI entry, on a random tiny model (``--model``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vargpt.cli import main
from vargpt.config import tiny_config
from vargpt.models.vargpt import VARGPT


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(1)
    return VARGPT(tiny_config()).save_pretrained(tmp_path_factory.mktemp("cli") / "model")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_one_file_and_a_directory(model_dir, tmp_path, capsys):
    m = ["--model", str(model_dir), "--device", "cpu", "--dtype", "fp32"]
    code, out, err = _run(capsys, "generate", "a red circle", "--out", str(tmp_path / "one.png"), "--size", "64", *m)
    assert code == 0, err
    assert Image.open(tmp_path / "one.png").size == (64, 64)
    code, out, err = _run(capsys, "generate", "a red circle", "a blue square", "--n", "2", "--seed", "3", "--cfg", "2",
                          "--out", str(tmp_path / "many"), *m)
    assert code == 0, err
    files = sorted((tmp_path / "many").glob("*.png"))
    assert len(files) == 4 and out.split() == [str(f) for f in files]


def test_chat_edit_convert(model_dir, tmp_path, capsys):
    m = ["--model", str(model_dir), "--device", "cpu"]
    img = tmp_path / "in.png"
    Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8)).save(img)
    code, out, err = _run(capsys, "chat", "--image", str(img), "What is shown?", "--max-new-tokens", "4", *m)
    assert code == 0, err
    code, out, err = _run(capsys, "edit", "--image", str(img), "make it red", "--out", str(tmp_path / "e.png"), *m)
    assert code == 0, err
    assert Image.open(tmp_path / "e.png").size == (64, 64)
    code, out, err = _run(capsys, "convert", str(model_dir), str(tmp_path / "released"))
    assert code == 0, err
    assert json.loads(out)["layout"] == "released"
    assert json.loads((tmp_path / "released" / "config.json").read_text())["model_type"] == "vargpt_qwen2_vl"


def test_user_errors_are_one_line(model_dir, tmp_path, capsys):
    code, _, err = _run(capsys, "generate", "a circle", "--size", "100", "--model", str(model_dir), "--out",
                        str(tmp_path / "x.png"))
    assert code == 2 and err.startswith("error: ") and "supported sizes" in err and "Traceback" not in err
    code, _, err = _run(capsys, "generate", "a circle", "--model", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "x.png"))
    assert code == 2 and "config.json" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "chat", "--image", str(tmp_path / "missing.png"), "hi", "--model", str(model_dir))
    assert code == 2 and "missing.png" in err


def test_chat_repl(model_dir, tmp_path, capsys, monkeypatch):
    img = tmp_path / "in.png"
    Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8)).save(img)
    lines = iter(["What is shown?", "And the colour?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, out, err = _run(capsys, "chat", "--image", str(img), "--max-new-tokens", "3", "--model", str(model_dir),
                          "--device", "cpu")
    assert code == 0, err
    assert len(out.splitlines()) == 2  # one answer line per question, then the empty line ends the session
