"""On-policy preference pairs (`vargpt.training.preferences`, `vargpt data preferences`)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from vargpt.config import SamplingConfig
from vargpt.data.records import RecordDataset, read_records
from vargpt.data.shapesworld import make_record
from vargpt.errors import InputError
from vargpt.eval.checker import parse_scene, score_edit, score_prompt
from vargpt.training.preferences import PreferenceConfig, build_preferences


class ScriptedModel:
    """Draws the faithful render of each prompt's scene where ``passes(j)`` (j = sample index within the prompt),
    an empty background otherwise: a generator whose checker verdicts the test knows in advance."""

    def __init__(self, split: str, seed: int, size: int, passes, categories=None, task="t2i") -> None:
        self.split, self.seed, self.size, self.passes, self.task = split, seed, size, passes, task
        self.config = SimpleNamespace(sampling=SamplingConfig())
        self.prompt_index = 0
        self.categories = categories

    def generate_images(self, prompts, *, n, size, sampling, seed, **extra):
        assert len(seed) == len(prompts) * n and size == self.size
        sources = extra.pop("source_images", None)
        assert not extra and (sources is not None) == (self.task == "edit")
        out = []
        for k, p in enumerate(prompts):
            while True:  # the next record of the asked categories
                rec, imgs = make_record(self.prompt_index, split=self.split, seed=self.seed, size=size,
                                        tasks=(self.task,))
                self.prompt_index += 1
                if self.categories is None or rec["meta"]["category"] in self.categories:
                    break
            assert rec["messages"][0]["content"] == p
            good = np.asarray(imgs[rec["images"][-1]], dtype=np.float32)  # the render (an edit's target)
            if sources is not None:  # editing: a failing sample leaves the source as it was
                assert sources[k].tobytes() == imgs[rec["images"][0]].tobytes()
                blank = np.asarray(sources[k], dtype=np.float32)
            else:
                blank = np.full_like(good, 255.0)
            out += [good if self.passes(j) else blank for j in range(n)]
        x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
        return SimpleNamespace(images=x / 127.5 - 1)


def test_pairs_passing_against_failing_samples(tmp_path):
    model = ScriptedModel("train", 0, 64, passes=lambda j: j % 2 == 0)
    summary = build_preferences(model, PreferenceConfig(out=str(tmp_path), n=5, samples=4, batch=8),
                                progress=False)
    assert summary["pairs"] == summary["pairs_sample_chosen"] == 5
    assert summary["sample_pass_rate"] == pytest.approx(0.5)
    recs = read_records(tmp_path)
    assert [r.task for r in recs] == ["dpo"] * 5
    for r in recs:
        chosen, rejected = (Image.open(p) for p in r.images)
        prompt = r.messages[0]["content"]
        assert score_prompt(parse_scene(chosen), prompt).score == 1.0
        assert score_prompt(parse_scene(rejected), prompt).score == 0.0
    raw = json.loads((tmp_path / "records.jsonl").read_text().splitlines()[0])
    assert raw["meta"]["sample_scores"] == [1.0, 0.0, 1.0, 0.0]


def test_categories_keep_only_their_prompts(tmp_path):
    model = ScriptedModel("train", 0, 64, passes=lambda j: j == 0, categories=("position", "counting"))
    summary = build_preferences(model, PreferenceConfig(out=str(tmp_path), n=6, samples=2, batch=4,
                                                        categories=("position", "counting")), progress=False)
    assert summary["pairs"] == 6
    cats = [json.loads(line)["meta"]["category"] for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert set(cats) == {"position", "counting"}
    with pytest.raises(InputError, match="unknown or no prompt categories.*bogus"):
        PreferenceConfig(out=str(tmp_path), categories=("position", "bogus")).validate()


def test_edit_pairs_keep_the_source_as_a_prompt_image(tmp_path, tiny_model_dir):
    """--task edit: pairs of an edited and an unchanged picture, the source in the user turn; the DPO dataset gives
    both answers that source (the decoder's source term with source_condition)."""
    model = ScriptedModel("train", 0, 64, passes=lambda j: j == 1, task="edit")
    summary = build_preferences(model, PreferenceConfig(out=str(tmp_path), n=4, samples=3, batch=6, task="edit"),
                                progress=False)
    # a record whose unchanged source already passes (a swap of two identical objects) has no contrast
    unchanged_pass = 0
    for i in range(4):
        rec, imgs = make_record(i, split="train", seed=0, size=64, tasks=("edit",))
        src = imgs[rec["images"][0]]
        unchanged_pass += score_edit(src, rec["messages"][0]["content"].replace("<image>", "").strip(), src).score
    assert summary["pairs"] == summary["pairs_sample_chosen"] == 4 - unchanged_pass >= 3
    assert summary["sample_pass_rate"] == pytest.approx((4 + 2 * unchanged_pass) / 12)
    recs = read_records(tmp_path)
    for r in recs:
        source, chosen, rejected = (Image.open(p).convert("RGB") for p in r.images)
        instruction = r.messages[0]["content"]
        assert instruction.startswith("<image>")
        assert score_edit(source, instruction.replace("<image>", "").strip(), chosen).score == 1.0
        assert rejected.tobytes() == source.tobytes()
    raw = json.loads((tmp_path / "records.jsonl").read_text().splitlines()[0])
    assert raw["meta"]["chosen_score"] == [1.0, 2.0] and raw["meta"]["rejected_score"][0] == 0.0
    from vargpt.models.vargpt import VARGPT

    vm = VARGPT.from_pretrained(tiny_model_dir)
    ds = RecordDataset(recs, vm.require_processor(), image_size=64, stride=vm.config.vae.stride, gen_transform="resize",
                       pad_multiple=vm.config.decoder.pad_to_multiplier, seed=0, pairs=True, source_condition=True)
    item = ds[0]
    src = item["chosen"]["gen_source_pixel_values"]
    assert src.shape == (1, 3, 64, 64) and torch.equal(src, item["rejected"]["gen_source_pixel_values"])
    assert not torch.equal(item["chosen"]["gen_pixel_values"], item["rejected"]["gen_pixel_values"])
    assert torch.allclose(item["rejected"]["gen_pixel_values"], src)  # the rejected sample is the source
    with pytest.raises(InputError, match="unknown or no edit kinds.*bogus"):
        PreferenceConfig(out=str(tmp_path), task="edit", categories=("move", "bogus")).validate()
    with pytest.raises(InputError, match="unknown task 'vqa'"):
        PreferenceConfig(out=str(tmp_path), task="vqa").validate()


def test_no_contrast_gives_no_pair_unless_the_render_is_chosen(tmp_path):
    with pytest.raises(InputError, match="none of 3 prompts gave a pair.*equally wrong.*--render-chosen"):
        build_preferences(ScriptedModel("train", 0, 64, passes=lambda j: False),
                          PreferenceConfig(out=str(tmp_path / "a"), n=3, samples=2), progress=False)
    with pytest.raises(InputError, match="every sample passed"):
        build_preferences(ScriptedModel("train", 0, 64, passes=lambda j: True),
                          PreferenceConfig(out=str(tmp_path / "b"), n=3, samples=2), progress=False)
    assert not (tmp_path / "a" / "records.jsonl").exists()  # no file that a resumed build would take for a set
    empty = build_preferences(ScriptedModel("train", 0, 64, passes=lambda j: True),
                              PreferenceConfig(out=str(tmp_path / "e"), n=3, samples=2, allow_empty=True),
                              progress=False)
    assert empty["pairs"] == 0 and empty["prompts_all_pass"] == 3 and empty["sample_pass_rate"] == 1.0
    assert (tmp_path / "e" / "records.jsonl").read_text() == ""
    summary = build_preferences(ScriptedModel("train", 0, 64, passes=lambda j: False),
                                PreferenceConfig(out=str(tmp_path / "c"), n=3, samples=2, render_chosen=True),
                                progress=False)
    assert summary["pairs_render_chosen"] == 3 and summary["prompts_none_pass"] == 0



def test_partial_credit_breaks_ties_between_failing_samples(tmp_path, monkeypatch):
    """No sample passes, but one shows more of the requested objects: it is chosen over the emptier one."""
    import vargpt.training.preferences as prefs

    verdicts = iter([(0.0, 0.5), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)])  # prompt 0: a contrast; prompt 1: a tie
    monkeypatch.setattr(prefs, "_judge", lambda img, prompt, source=None: next(verdicts))
    summary = build_preferences(ScriptedModel("train", 0, 64, passes=lambda j: False),
                                PreferenceConfig(out=str(tmp_path), n=2, samples=2), progress=False)
    assert summary["pairs"] == 1 and summary["prompts_none_pass"] == 1
    raw = json.loads((tmp_path / "records.jsonl").read_text())
    assert raw["meta"]["chosen_score"] == [0.0, 0.5] and raw["meta"]["rejected_score"] == [0.0, 0.0]

def test_cli_writes_records_the_dpo_pipeline_reads(tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "prefs"
    code, stdout, err = run_cli(capsys, "data", "preferences", "--model", str(tiny_model_dir), "--out", str(out),
                                "--n", "2", "--samples", "2", "--size", "64", "--render-chosen", "--device", "cpu",
                                "--cfg", "1")
    assert code in (0, None), err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["pairs"] >= 1
    recs = read_records(out)
    assert len(recs) == summary["pairs"]
    from vargpt.models.vargpt import VARGPT

    model = VARGPT.from_pretrained(tiny_model_dir)
    ds = RecordDataset(recs, model.require_processor(), image_size=64, stride=model.config.vae.stride,
                       gen_transform="resize", pad_multiple=model.config.decoder.pad_to_multiplier, seed=0,
                       pairs=True)
    item = ds[0]
    assert item["chosen"]["gen_pixel_values"].shape == item["rejected"]["gen_pixel_values"].shape == (1, 3, 64, 64)
