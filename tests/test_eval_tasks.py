"""The generation scorers: an oracle that renders the truth scores 1, a blank model 0, seeds are reported apart."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vargpt.config import SamplingConfig
from vargpt.data.scene import Scene, render
from vargpt.data.shapesworld import make_record
from vargpt.eval import tasks as G


def _tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB")) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


class Oracle:
    """Renders the scene each test record asks for; `broken` answers a blank background instead."""

    def __init__(self, n: int, broken: bool = False) -> None:
        self.config = SimpleNamespace(image_size=64, sampling=SamplingConfig())
        self.broken, self.t2i, self.edits, self.seeds = broken, {}, {}, []
        for i in range(n):
            rec, _ = make_record(i, split="test", size=64, tasks=("t2i",))
            self.t2i[rec["messages"][0]["content"]] = Scene.from_dict(rec["scene"])
            rec, _ = make_record(i, split="test", size=64, tasks=("edit",))
            text = rec["messages"][0]["content"].replace("<image>", "").strip()
            self.edits[text] = Scene.from_dict(rec["meta"]["target_scene"])

    def _out(self, scenes, seed):
        self.seeds.append(list(seed))
        if self.broken:
            scenes = [Scene(objects=(), background=s.background) for s in scenes]
        return SimpleNamespace(images=_tensor([render(s, 64) for s in scenes]))

    def generate_images(self, prompts, *, size, sampling, seed):
        return self._out([self.t2i[p] for p in prompts], seed)

    def edit_images(self, images, instructions, *, size, sampling, seed):
        assert len(images) == len(instructions)
        return self._out([self.edits[t] for t in instructions], seed)


def test_t2i_oracle_scores_one_and_seeds_differ_per_image():
    cases = G.t2i_cases(6)
    assert len({c.prompt for c in cases}) == 6 and all(c.category for c in cases)
    model = Oracle(6)
    rep = G.evaluate_t2i(model, cases, seeds=(0, 1), batch=4, progress=False, keep_images=3)
    assert rep["score"]["mean"] == 1.0 and rep["score"]["spread"] == 0.0 and rep["object_recall"]["mean"] == 1.0
    assert [r["seed"] for r in rep["per_seed"]] == [0, 1] and len(rep["images"]) == 3
    assert all(v == 1.0 for v in rep["by_group"].values())
    flat = [s for call in model.seeds for s in call]
    assert len(flat) == 12 and len(set(flat)) == 12  # every (seed, image) pair draws its own stream


def test_broken_model_scores_zero_and_edit_reports_rates(tmp_path):
    rep = G.evaluate_t2i(Oracle(4, broken=True), G.t2i_cases(4), seeds=(0,), progress=False)
    assert rep["score"]["mean"] == 0.0 and rep["object_recall"]["mean"] == 0.0
    cases = G.edit_cases(5)
    good = G.evaluate_edit(Oracle(5), cases, seeds=(3,), batch=2, progress=False, keep_images=5)
    assert good["score"]["mean"] == 1.0 and good["satisfied"]["mean"] == 1.0 and good["preserved"]["mean"] == 1.0
    bad = G.evaluate_edit(Oracle(5, broken=True), cases, seeds=(3,), progress=False)
    assert bad["score"]["mean"] == 0.0
    png = G.sample_sheet(good["images"], tmp_path / "sheet.png", sources=[c.source for c in cases], per_row=4)
    assert png.is_file() and "pass" in png.with_suffix(".txt").read_text()
    white = Image.new("RGB", (16, 16), "white")
    sheet = Image.open(G.sample_sheet([(white, True, "a"), (white, False, "b")], tmp_path / "two.png", per_row=2))
    assert sheet.getpixel((0, 0)) == (200, 200, 200) and sheet.getpixel((8, 8)) == (255, 255, 255)  # hairline
    assert sheet.getpixel((16, 0)) == (220, 0, 0) and sheet.getpixel((17, 8)) == (220, 0, 0)  # failure framed


@pytest.mark.parametrize("values,spread", [((0.5,), 0.0), ((0.25, 0.5, 0.75), 0.5)])
def test_spread(values, spread):
    s = G._spread(values)
    assert s["spread"] == pytest.approx(spread) and s["mean"] == pytest.approx(sum(values) / len(values))


class _PassThroughVAE(torch.nn.Module):
    """A 'VAE' that reconstructs perfectly (or, ``blank``, answers a white picture)."""

    def __init__(self, blank: bool = False) -> None:
        super().__init__()
        self.blank, self.w = blank, torch.nn.Parameter(torch.zeros(()))

    def quantize(self, x):
        return SimpleNamespace(quantized_BDHW=x)

    def decode(self, z):
        return torch.ones_like(z) if self.blank else z


def test_vae_ceiling_of_perfect_and_blank_reconstructions():
    t2i, edit = G.t2i_cases(6), G.edit_cases(4, size=64)
    assert all(c.target is not None for c in t2i + edit)
    perfect = _PassThroughVAE()
    rep = G.vae_ceiling(perfect, t2i, size=64, batch=4)
    assert rep["score"] == 1.0 and rep["n"] == 6 and set(rep["by_group"]) == {c.category for c in t2i}
    assert G.vae_ceiling(perfect, edit, size=64)["score"] == 1.0
    assert G.vae_ceiling(_PassThroughVAE(blank=True), t2i, size=64)["score"] == 0.0
    # every model report carries the ceiling of its VAE beside the score (none for a model without a VAE)
    model = Oracle(6)
    model.vae_local = perfect
    assert G.evaluate_t2i(model, t2i, seeds=(0,), progress=False)["vae_ceiling"]["score"] == 1.0
    assert G.evaluate_t2i(Oracle(6), t2i, seeds=(0,), progress=False)["vae_ceiling"] is None


def test_cli_eval_scores_the_split_it_is_given_and_refuses_train(tmp_path, capsys, tiny_model_dir):
    from conftest import run_cli

    report = tmp_path / "vqa.json"
    code, out, _ = run_cli(capsys, "eval", "vqa", "--model", str(tiny_model_dir), "--n", "2", "--split", "val",
                           "--json", str(report), "--device", "cpu")
    assert code == 0, out
    rep = json.loads(report.read_text())
    val_questions = [c.question for c in G.vqa_cases(2, split="val")]
    assert rep["split"] == "val" and [a["question"] for a in rep["answers"]] == val_questions
    assert val_questions != [c.question for c in G.vqa_cases(2, split="test")]
    code, out, err = run_cli(capsys, "eval", "t2i", "--model", str(tiny_model_dir), "--split", "train",
                             "--json", str(tmp_path / "t.json"), "--device", "cpu")
    assert code == 2 and "--split 'train'" in err and len(err.strip().splitlines()) == 1


def test_t2i_cases_in_the_canonical_layout_keep_the_prompts_and_change_the_targets():
    plain, canon = G.t2i_cases(8, split="val"), G.t2i_cases(8, split="val", layout="canonical")
    assert [c.prompt for c in plain] == [c.prompt for c in canon]
    assert [c.category for c in plain] == [c.category for c in canon]
    assert all(c.target["background"] == "white" for c in canon)
    assert any(a.target != b.target for a, b in zip(plain, canon, strict=True))
