"""Benchmark adapters on the embedded tiny model: lmms-eval's model API with fake Instance objects (lmms-eval itself
is not installed), GenEval's folder layout and DPG-Bench's grids at 64 px."""

from __future__ import annotations

import importlib
import json
import math
import shutil
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vargpt.errors import InputError
from vargpt.eval.tasks import vqa_cases
from vargpt.integrations import dpg_bench, geneval
from vargpt.integrations import lmms_eval as lmms_module
from vargpt.integrations.lmms_eval import GenerationSettings, VARGPTLmms

DATA = Path(__file__).resolve().parent / "data"
GENEVAL_METADATA = DATA / "geneval_metadata.jsonl"
DPG_PROMPTS = DATA / "dpg_prompts"
SIZE = 64


@dataclass
class Request:  # what the adapter reads of lmms-eval's Instance
    args: tuple


@pytest.fixture(scope="module")
def lm() -> VARGPTLmms:
    # model_args arrive as strings from lmms-eval's command line
    return VARGPTLmms(pretrained=None, device="cpu", dtype="fp32", batch_size="1")


@pytest.fixture(scope="module")
def pipe(lm):
    return lm.pipe


@pytest.fixture(scope="module")
def cases():
    return vqa_cases(4, split="test")


@pytest.fixture
def task(lm, cases):
    lm.task_dict = {"shapes_vqa": {"test": [{"image": c.image, "question": c.question} for c in cases]}}
    yield lambda doc: [doc["image"]]
    lm.task_dict = {}


def _requests(cases, gen_kwargs, to_visual):
    return [Request((c.question, gen_kwargs, to_visual, i, "shapes_vqa", "test")) for i, c in enumerate(cases)]


# ----------------------------------------------------------------------------------------------- lmms-eval


def test_generate_until_equals_chat_and_cuts_at_until(lm, pipe, cases, task):
    expected = [pipe.chat(c.question, [c.image], max_new_tokens=12) for c in cases]
    greedy = {"max_new_tokens": 12, "temperature": 0, "do_sample": False}
    assert lm.generate_until(_requests(cases, greedy, task)) == expected
    lm.batch_size = 3  # left-padded batches of 3 and 1 answer the same
    try:
        assert lm.generate_until(_requests(cases, greedy, task)) == expected
    finally:
        lm.batch_size = 1
    assert any(" " in a for a in expected)  # so that the cut below changes something
    cut = lm.generate_until(_requests(cases, {**greedy, "until": [" ", "\n\n"]}, task))
    assert cut == [a.split(" ")[0] for a in expected]


def test_loglikelihood_prefers_the_greedy_answer(lm, pipe, cases, task):
    greedy = [pipe.chat(c.question, [c.image], max_new_tokens=12) for c in cases]
    wrong = [next(w for w in ("yes", "no", "square") if w != g) for g in greedy]
    requests = [Request((c.question, target, task, i, "shapes_vqa", "test"))
                for i, (c, target) in enumerate(zip(cases, greedy, strict=True))]
    requests[0] = Request(requests[0].args[:1] + (lambda doc: greedy[0],) + requests[0].args[2:])  # doc_to_target
    own = lm.loglikelihood(requests)
    other = lm.loglikelihood([Request((c.question, w, task, i, "shapes_vqa", "test"))
                              for i, (c, w) in enumerate(zip(cases, wrong, strict=True))])
    for (ll, is_greedy), (ll_wrong, wrong_is_greedy) in zip(own, other, strict=True):
        assert isinstance(ll, float) and math.isfinite(ll) and ll <= 0 and is_greedy
        assert ll > ll_wrong and not wrong_is_greedy


def test_multi_round(lm, pipe, cases, task):
    follow_up = cases[1].question

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        if round_idx == 1:
            return [doc["image"]], follow_up, False, previous_output, {"asked": 1}
        assert previous_round_info == {"asked": 1} and len(previous_output) == 2
        return None, "", True, previous_output, None

    request = Request((cases[0].question, {"max_new_tokens": 12}, task, doc_to_text, 0, "shapes_vqa", "test"))
    assert lm.generate_until_multi_round([request]) == [[
        pipe.chat(cases[0].question, [cases[0].image], max_new_tokens=12),
        pipe.chat(follow_up, [cases[0].image], max_new_tokens=12)]]


def test_generation_settings_and_arguments():
    assert GenerationSettings.from_kwargs({"do_sample": True, "temperature": 0}).do_sample is False
    assert GenerationSettings.from_kwargs({"temperature": 0.7}).do_sample is False  # do_sample absent: greedy
    s = GenerationSettings.from_kwargs({"do_sample": True, "temperature": 0.7, "top_p": None, "until": "\n",
                                        "max_new_tokens": 5})
    assert (s.do_sample, s.temperature, s.top_p, s.until, s.max_new_tokens) == (True, 0.7, 1.0, ("\n",), 5)
    assert s.cut("a\nb") == "a"
    with pytest.raises(InputError, match="num_beams"):
        GenerationSettings.from_kwargs({"num_beams": 4})
    with pytest.raises(InputError, match="batch_size='auto'"):
        VARGPTLmms(batch_size="auto")


def test_registers_with_lmms_eval_when_importable(monkeypatch):
    """With a stand-in lmms-eval (its base class, the decorator registry, the model registry), importing the adapter
    subclasses ``lmms`` and registers ``vargpt`` in both registries."""
    registered: dict[str, Any] = {}
    manifests = []

    class lmms:  # noqa: N801 - lmms-eval's name
        def __init__(self) -> None:
            self.task_dict = {}

    @dataclass(frozen=True)
    class ModelManifest:
        model_id: str
        simple_class_path: str | None = None

    fake = {name: types.ModuleType(name) for name in (
        "lmms_eval", "lmms_eval.api", "lmms_eval.api.model", "lmms_eval.api.registry", "lmms_eval.models",
        "lmms_eval.models.registry_v2")}
    fake["lmms_eval.api.model"].lmms = lmms
    fake["lmms_eval.api.registry"].register_model = lambda *names: (
        lambda cls: registered.update(dict.fromkeys(names, cls)) or cls)
    fake["lmms_eval.models.registry_v2"].ModelManifest = ModelManifest
    fake["lmms_eval.models"].MODEL_REGISTRY_V2 = types.SimpleNamespace(
        register_manifest=lambda m, overwrite=False: manifests.append(m))
    for name, module in fake.items():
        monkeypatch.setitem(sys.modules, name, module)
    try:
        module = importlib.reload(lmms_module)
        assert issubclass(module.VARGPTLmms, lmms)
        assert registered == {"vargpt": module.VARGPTLmms}
        assert manifests == [ModelManifest("vargpt", simple_class_path="vargpt.integrations.lmms_eval.VARGPTLmms")]
    finally:
        monkeypatch.undo()
        importlib.reload(lmms_module)
    assert lmms_module.VARGPTLmms.__bases__[0] is not lmms  # the stand-in is gone again


# ----------------------------------------------------------------------------------------------- GenEval


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_geneval_layout_resume_and_reproducibility(pipe, tmp_path):
    out = tmp_path / "a"
    summary = geneval.write_samples(pipe, GENEVAL_METADATA, out, n_samples=2, seed=3, size=SIZE, progress=False)
    assert summary == {"prompts": 3, "generated": 3, "skipped": 0, "outdir": str(out)}
    files = _files(out)
    assert sorted(files) == [f"{i:05d}/{name}" for i in range(3)
                             for name in ("grid.png", "metadata.jsonl", "samples/0000.png", "samples/0001.png")]
    lines = GENEVAL_METADATA.read_text().splitlines()
    for i in range(3):
        assert json.loads((out / f"{i:05d}" / "metadata.jsonl").read_text()) == json.loads(lines[i])
        samples = [Image.open(out / f"{i:05d}" / "samples" / f"{k:04d}.png") for k in range(2)]
        assert all(im.format == "PNG" and im.size == (SIZE, SIZE) and im.mode == "RGB" for im in samples)
        grid = Image.open(out / f"{i:05d}" / "grid.png")
        assert grid.size == (2 * SIZE, SIZE)
        assert np.array_equal(np.asarray(grid)[:, SIZE:], np.asarray(samples[1]))
    # resume: only the prompt with a missing sample is generated again, with the same bytes
    (out / "00001" / "samples" / "0001.png").unlink()
    (out / "00002" / "grid.png").unlink()
    summary = geneval.write_samples(pipe, GENEVAL_METADATA, out, n_samples=2, seed=3, size=SIZE, progress=False)
    assert (summary["generated"], summary["skipped"]) == (1, 2)
    assert _files(out) == files
    # same seed, fresh folder: identical files; another seed: other images
    geneval.write_samples(pipe, GENEVAL_METADATA, tmp_path / "b", n_samples=2, seed=3, size=SIZE, progress=False)
    assert _files(tmp_path / "b") == files
    geneval.write_samples(pipe, GENEVAL_METADATA, tmp_path / "c", n_samples=1, seed=4, size=SIZE, grid=False,
                          progress=False)
    assert not (tmp_path / "c" / "00000" / "grid.png").exists()
    assert (tmp_path / "c" / "00000" / "samples" / "0000.png").read_bytes() != files["00000/samples/0000.png"]


def test_geneval_command_line(pipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(geneval.VARGPTPipeline, "from_pretrained", lambda *a, **k: pipe)
    geneval.main(["--metadata", str(GENEVAL_METADATA), "--outdir", str(tmp_path), "--n-samples", "1",
                  "--size", str(SIZE), "--batch", "2", "--skip-grid"])
    assert json.loads(capsys.readouterr().out)["generated"] == 3
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")) == [
        f"{i:05d}/samples/0000.png" for i in range(3)]


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected an object"),
    ('{"tag": "single_object", "include": []}', "missing or empty 'prompt'"),
    ('{"prompt": "a cat", "include": []}', "missing 'tag'"),
    ('{"prompt": "a cat", "tag": "single_object", "include": "cat"}', "'include' must be a list"),
])
def test_geneval_malformed_line_names_it(tmp_path, line, problem):
    good = GENEVAL_METADATA.read_text().splitlines()
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("\n".join([good[0], line, good[1]]) + "\n")
    with pytest.raises(InputError, match=rf"evaluation_metadata.jsonl line 2: .*{problem}"):
        geneval.read_metadata(path)
    with pytest.raises(SystemExit, match="line 2"):  # the command line fails before loading a model
        geneval.main(["--metadata", str(path), "--outdir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- DPG-Bench


def test_dpg_bench_grids(pipe, tmp_path):
    out = tmp_path / "dpg"
    summary = dpg_bench.write_grids(pipe, DPG_PROMPTS, out, seed=0, size=SIZE, progress=False)
    assert summary == {"prompts": 2, "generated": 2, "skipped": 0, "outdir": str(out)}
    assert sorted(p.name for p in out.iterdir()) == ["shapes_above.png", "triangles_row.png"]
    grid = Image.open(out / "shapes_above.png")
    assert grid.format == "PNG" and grid.size == (2 * SIZE, 2 * SIZE)
    a = np.asarray(grid)
    tiles = [a[r * SIZE:(r + 1) * SIZE, c * SIZE:(c + 1) * SIZE] for r in range(2) for c in range(2)]
    assert all(not np.array_equal(tiles[i], tiles[j]) for i in range(4) for j in range(i + 1, 4))
    # tile k is the sample drawn with seed + k (row-major, as the scorer crops)
    one = pipe.generate((DPG_PROMPTS / "shapes_above.txt").read_text().strip(), seed=2, size=SIZE)[0]
    assert np.abs(tiles[2].astype(int) - np.asarray(one, dtype=int)).max() <= 1
    before = (out / "triangles_row.png").read_bytes()
    (out / "shapes_above.png").unlink()
    summary = dpg_bench.write_grids(pipe, DPG_PROMPTS, out, seed=0, size=SIZE, progress=False)
    assert (summary["generated"], summary["skipped"]) == (1, 1)
    assert (out / "triangles_row.png").read_bytes() == before


def test_dpg_bench_bad_prompt_folders(tmp_path, monkeypatch, pipe, capsys):
    prompts = tmp_path / "prompts"
    shutil.copytree(DPG_PROMPTS, prompts)
    (prompts / "blank.txt").write_text(" \n")
    with pytest.raises(InputError, match=r"blank\.txt: the prompt file is empty"):
        dpg_bench.read_prompts(prompts)
    with pytest.raises(SystemExit, match=r"blank\.txt: the prompt file is empty"):
        dpg_bench.main(["--prompts", str(prompts), "--outdir", str(tmp_path / "out")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no .txt prompt files"):
        dpg_bench.read_prompts(empty)
    (prompts / "blank.txt").unlink()
    monkeypatch.setattr(dpg_bench.VARGPTPipeline, "from_pretrained", lambda *a, **k: pipe)
    dpg_bench.main(["--prompts", str(prompts), "--outdir", str(tmp_path / "out"), "--size", str(SIZE)])
    assert json.loads(capsys.readouterr().out)["generated"] == 2
