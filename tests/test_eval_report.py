"""`vargpt eval --json PATH` (one report of every task) and `vargpt eval vae` on a full model, through the real CLI
entry, on the embedded default."""

from __future__ import annotations

import json

from PIL import Image

from conftest import run_cli
from vargpt.eval import tasks
from vargpt.pipeline import VARGPTPipeline, default_model_dir

FRACTIONS = ("vae_ssim", "understanding_accuracy", "geneval_overall", "edit_success", "edit_applied",
             "edit_preservation")


def test_one_report_scores_every_task_with_one_model_load(tmp_path, capsys, monkeypatch):
    loads, real = [], VARGPTPipeline.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        loads.append(args)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(VARGPTPipeline, "from_pretrained", classmethod(counted))
    path = tmp_path / "out" / "report.json"
    code, out, err = run_cli(capsys, "eval", "--n", "2", "--seeds", "0,1", "--device", "cpu", "--json", str(path))
    assert code == 0, err
    assert len(loads) == 1  # one pipeline serves the VAE, VQA, text-to-image and edit parts
    rep = json.loads(path.read_text())
    assert (rep["model"], rep["split"], rep["n"], rep["seeds"]) == ("embedded default", "test", 2, [0, 1])
    assert rep["vae_psnr_db"] > 15  # the embedded VAE reconstructs ShapesWorld scenes at ~30 dB
    for key in FRACTIONS:
        assert 0.0 <= rep[key] <= 1.0, key
    assert rep["seconds"] > 0
    # the cases of the test split, scored per category / question type
    assert set(rep["geneval"]) == {c.category for c in tasks.t2i_cases(2)}
    assert set(rep["understanding_by_type"]) == {c.kind for c in tasks.vqa_cases(2)}
    assert all(0.0 <= v <= 1.0 for v in [*rep["geneval"].values(), *rep["understanding_by_type"].values()])
    for key in ("geneval_overall", "edit_success", "edit_applied", "edit_preservation"):
        s = rep[f"{key}_seeds"]
        assert set(s["by_seed"]) == {"0", "1"} and s["min"] <= rep[key] == s["mean"] <= s["max"], key
    for task in ("t2i", "edit"):
        assert 0.0 <= rep["vae_ceiling"][task]["score"] <= 1.0 and rep["vae_ceiling"][task]["n"] == 2
    # the markdown table carries the numbers; the sheets show the samples (edits under their sources)
    md = path.with_suffix(".md").read_text()
    assert f"| {rep['vae_psnr_db']:.3f} |" in md and f"| {rep['edit_preservation']:.3f} |" in md
    side = rep["size"]
    assert Image.open(tmp_path / "out" / "report_t2i.png").height == side
    assert Image.open(tmp_path / "out" / "report_edit.png").height == 2 * side
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["json"] == str(path)
    assert {k: summary[k] for k in FRACTIONS + ("vae_psnr_db",)} == {k: rep[k] for k in FRACTIONS + ("vae_psnr_db",)}


def test_eval_refuses_other_splits_in_one_line(tmp_path, capsys):
    for argv in (["eval"], ["eval", "vae", "--model", str(default_model_dir())]):
        path = tmp_path / "r.json"
        code, _, err = run_cli(capsys, *argv, "--split", "train", "--json", str(path))
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "--split 'train'" in err and "val" in err and "test" in err
        assert not path.exists()
    code, _, err = run_cli(capsys, "eval", "--n", "2")
    assert code == 2 and "--json" in err


def test_eval_vae_reads_the_vae_of_a_full_model(tmp_path, capsys):
    path = tmp_path / "vae.json"
    code, out, err = run_cli(capsys, "eval", "vae", "--model", str(default_model_dir()), "--data", "shapesworld:4",
                             "--split", "val", "--limit", "2", "--device", "cpu", "--json", str(path))
    assert code == 0, err
    rep = json.loads(path.read_text())
    assert rep["psnr_db"] > 15 and 0.0 < rep["ssim"] <= 1.0 and rep["n_images"] == 2
    assert rep["split"] == "val" and [p.name for p in (tmp_path / "data").iterdir()] == [
        "shapesworld_val_4_64px_seed0"]
    assert json.loads(out)["psnr_db"] == rep["psnr_db"]


def test_report_options_before_a_subcommand_are_refused_not_ignored(tmp_path, capsys):
    code, _, err = run_cli(capsys, "eval", "--n", "3", "vqa", "--json", str(tmp_path / "r.json"))
    assert code != 0 and not (tmp_path / "r.json").exists()
    assert "--n before `vqa`" in err and "vargpt eval vqa --n" in err
