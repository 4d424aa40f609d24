"""`vargpt data shapesworld` and `vargpt check`, and the image loader's errors, through the real CLI entry."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from vargpt.data.scene import Obj, Scene, render


@pytest.fixture
def good_png(tmp_path):
    path = tmp_path / "good.png"
    render(Scene((Obj("circle", "red", "small", 0.17, 0.5), Obj("square", "blue", "large", 0.83, 0.5))), 128).save(path)
    return path


def test_data_shapesworld_writes_records(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "data", "shapesworld", "--out", str(tmp_path / "d"), "--n", "6", "--split", "test",
                        "--size", "64", "--tasks", "t2i,dpo")
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["records"] == 6 and summary["tasks"] == {"dpo": 3, "t2i": 3}
    lines = (tmp_path / "d" / "records.jsonl").read_text().splitlines()
    assert [json.loads(x)["task"] for x in lines] == ["t2i", "dpo"] * 3


def test_check_prints_a_verdict_per_image(tmp_path, capsys, good_png):
    code, out, _ = run_cli(capsys, "check", "--prompt", "a red circle to the left of a blue square", str(good_png),
                        str(good_png))
    assert code == 0
    verdicts = [json.loads(line) for line in out.strip().splitlines()]
    assert len(verdicts) == 2
    assert verdicts[0]["image"] == str(good_png) and verdicts[0]["score"] == 1.0
    assert verdicts[0]["category"] == "position"
    code, out, _ = run_cli(capsys, "check", "--prompt", "three crosses", str(good_png))
    assert json.loads(out)["score"] == 0.0 and json.loads(out)["category"] == "counting"


def test_check_edit_mode(tmp_path, capsys, good_png):
    edited = tmp_path / "edited.png"
    render(Scene((Obj("square", "blue", "large", 0.83, 0.5),)), 128).save(edited)
    code, out, _ = run_cli(capsys, "check", "--source", str(good_png), "--instruction", "Remove the red circle.",
                        str(edited))
    verdict = json.loads(out)
    assert code == 0 and verdict["score"] == 1.0 and verdict["category"] == "remove"


def _bad_inputs(tmp_path, good_png) -> dict[str, tuple[list[str], str]]:
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good_png.read_bytes()[:200])
    p = "a red circle"
    return {
        "not an image": (["--prompt", p, str(text)], "not an image"),
        "truncated": (["--prompt", p, str(truncated)], "truncated"),
        "missing": (["--prompt", p, str(tmp_path / "nope.png")], "no such file"),
        "empty prompt": (["--prompt", "", str(good_png)], "prompt is empty"),
        "non-UTF-8 prompt": (["--prompt", "a red \udcffcircle", str(good_png)], "not valid UTF-8"),
        "unparseable prompt": (["--prompt", "a sunset over the sea", str(good_png)], "cannot parse prompt"),
    }


@pytest.mark.parametrize("case", ["not an image", "truncated", "missing", "empty prompt", "non-UTF-8 prompt",
                                  "unparseable prompt"])
def test_check_bad_input_is_one_clear_line(tmp_path, capsys, good_png, case):
    args, needle = _bad_inputs(tmp_path, good_png)[case]
    code, out, err = run_cli(capsys, "check", *args, str(good_png))
    assert code != 0
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err


def test_check_reads_cmyk_and_16_bit_images(tmp_path, capsys):
    """Everyday files that once were refused: converted to 8-bit RGB and scored."""
    cmyk, deep = tmp_path / "cmyk.jpg", tmp_path / "deep.png"
    Image.new("CMYK", (32, 32), (0, 50, 100, 0)).save(cmyk)
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(deep)
    code, out, err = run_cli(capsys, "check", "--prompt", "a red circle", str(cmyk), str(deep))
    assert code == 0 and err == ""
    assert [json.loads(line)["image"] for line in out.splitlines()] == [str(cmyk), str(deep)]
