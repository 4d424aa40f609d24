"""VAE training loop, checkpoints, evaluation report and the CLI entry points (tiny sizes, CPU, seconds)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from vargpt.cli import main
from vargpt.data.images import find_images
from vargpt.errors import CheckpointError, InputError
from vargpt.eval.vae import bit_usage, eval_images, evaluate_vae, psnr_ssim
from vargpt.models.vae import BSQVAE
from vargpt.training.checkpoint import (
    atomic_write_json,
    latest_checkpoint,
    list_checkpoints,
    load_model_dir,
    save_checkpoint,
)
from vargpt.training.vae import VAETrainConfig, foreground_weights, load_vae, recon_loss, train_vae


def _write_images(d, n=6, size=16, seed=0):
    rng = np.random.default_rng(seed)
    (d / "sub").mkdir(parents=True)
    for i in range(n):
        a = np.zeros((size, size, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
        y, x = rng.integers(0, size // 2, 2)
        a[y:y + size // 2, x:x + size // 2] = rng.integers(0, 255, 3, dtype=np.uint8)
        Image.fromarray(a).save(d / ("sub" if i % 2 else "") / f"{i}.{'png' if i % 3 else 'jpg'}")
    return d


# ----------------------------------------------------------------------------------------------- checkpoints


def test_checkpoints_keep_last_and_ignore_incomplete(tmp_path):
    sd = {"w": torch.arange(4.0)}
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, model_state={"w": sd["w"] + step}, optimizer_state={"m": step},
                        state={"x": 1}, config={"kind": "t"}, keep_last=2)
    assert [c.step for c in list_checkpoints(tmp_path)] == [20, 30]
    # a crashed save: temp dir and a step dir without COMPLETE are ignored
    (tmp_path / "checkpoints" / ".tmp-step_00000040-abc").mkdir()
    (tmp_path / "checkpoints" / "step_00000050").mkdir()
    ck = latest_checkpoint(tmp_path)
    assert ck.step == 30 and ck.state() == {"step": 30, "x": 1} and ck.optimizer_state() == {"m": 30}
    assert torch.equal(ck.model_state()["w"], sd["w"] + 30)
    save_checkpoint(tmp_path, 60, model_state=sd, keep_last=2)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert [c.step for c in list_checkpoints(tmp_path)] == [30, 60]
    with pytest.raises(CheckpointError):
        save_checkpoint(tmp_path, 70, model_state=sd, keep_last=0)


def test_atomic_json_and_model_dir_errors(tmp_path):
    atomic_write_json(tmp_path / "a" / "r.json", {"k": 1})
    assert json.loads((tmp_path / "a" / "r.json").read_text()) == {"k": 1}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["r.json"]
    with pytest.raises(CheckpointError, match="not a model directory"):
        load_model_dir(tmp_path / "a")


# ----------------------------------------------------------------------------------------------- training


def _cfg(tmp_path, data, **kw):
    base = dict(data=str(data), out=str(tmp_path / "run"), steps=40, batch_size=4, lr=2e-3, warmup_steps=5,
                size=16, log_every=5, ckpt_every=20, progress=False, device="cpu")
    base.update(kw)
    return VAETrainConfig(**base)


def test_training_loss_falls_and_outputs(tmp_path):
    data = _write_images(tmp_path / "imgs")
    assert len(find_images(data)) == 6
    res = train_vae(_cfg(tmp_path, data))
    rows = (res.out / "log.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[2]) for r in rows]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert (res.out / "loss.png").stat().st_size > 0
    vae, cfg = load_vae(res.out)
    # the logged losses are single batches of 4 (too noisy to compare over 40 steps: their last-to-first ratio
    # ranges 0.6-1.0 over seeds); the reconstructions of all 6 images are not: 40 steps gain 3.4-5.8 dB over
    # the same-seed initial weights (seeds 0-5)
    torch.manual_seed(0)  # the trainer's seed, set just before it builds the VAE
    init = BSQVAE(vae.cfg).eval()
    images = eval_images(str(data), tmp_path, 16)
    gain = evaluate_vae(vae, images)["psnr_db"] - evaluate_vae(init, images)["psnr_db"]
    assert gain > 2.0, gain
    assert cfg["preset"] == "tiny" and vae.cfg.codebook_dim == 16
    assert [c.step for c in list_checkpoints(res.out)] == [20, 40]


def test_resume_reproduces_uninterrupted_run(tmp_path):
    data = _write_images(tmp_path / "imgs")
    full = train_vae(_cfg(tmp_path, data, steps=12, ckpt_every=6, out=str(tmp_path / "full")))
    part = _cfg(tmp_path, data, steps=6, ckpt_every=6, out=str(tmp_path / "part"))
    train_vae(part)
    part.steps, part.resume = 12, True
    train_vae(part)
    a = load_vae(full.out)[0].state_dict()
    b = load_vae(tmp_path / "part")[0].state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    steps = [int(r.split(",")[0]) for r in (tmp_path / "part" / "log.csv").read_text().splitlines()[1:]]
    assert steps == [5, 6, 10, 12]  # every 5 steps and at the end of each run


def test_init_starts_from_earlier_weights_and_refuses_other_sizes(tmp_path):
    data = _write_images(tmp_path / "imgs")
    first = train_vae(_cfg(tmp_path, data, steps=10, out=str(tmp_path / "a")))
    lr = 1e-12  # the warm-started run barely moves: its weights must be the first run's
    second = train_vae(_cfg(tmp_path, data, steps=1, lr=lr, out=str(tmp_path / "b"), init=str(first.out)))
    a, b = load_vae(first.out)[0].state_dict(), load_vae(second.out)[0].state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    cold = load_vae(train_vae(_cfg(tmp_path, data, steps=1, lr=lr, out=str(tmp_path / "c"))).out)[0].state_dict()
    assert not all(torch.allclose(a[k].float(), cold[k].float(), atol=1e-6) for k in a)
    with pytest.raises(CheckpointError, match="differ from this run's"):
        train_vae(_cfg(tmp_path, data, steps=1, out=str(tmp_path / "d"), init=str(first.out),
                       vae_overrides={"base_ch": 64}))


def test_decoder_only_keeps_the_codes_and_may_add_refinement(tmp_path):
    """``--decoder-only`` over an earlier run: encoder and quantiser untouched (every code stays), the decoder trains,
    and it may gain full-resolution refinement blocks, which start at zero (the same pictures at step 0)."""
    data = _write_images(tmp_path / "imgs")
    patch = {"arch": "patch", "patch_size": 4, "base_ch": 32, "codebook_dim": 8, "num_res_blocks": 1}
    first = train_vae(_cfg(tmp_path, data, steps=5, out=str(tmp_path / "a"), vae_overrides=patch))
    refine = {**patch, "refine_blocks": 1}
    second = train_vae(_cfg(tmp_path, data, steps=5, out=str(tmp_path / "b"), init=str(first.out),
                            decoder_only=True, vae_overrides=refine))
    a, b = load_vae(first.out)[0], load_vae(second.out)[0]
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("decoder."))
    assert any(not torch.equal(sa[k], sb[k]) for k in sa if k.startswith("decoder."))
    assert {k for k in sb if k not in sa} and all(k.startswith("decoder.refine.") for k in sb if k not in sa)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(a.encode(x).labels_BLD, b.encode(x).labels_BLD)
        fresh = BSQVAE(b.cfg)  # the first run's weights + fresh refinement blocks: the first run's pictures
        missing, _ = fresh.load_state_dict(sa, strict=False)
        assert missing and all(k.startswith("decoder.refine.") for k in missing)
        torch.testing.assert_close(fresh.decode(a.quantize(x).quantized_BDHW), a.decode(a.quantize(x).quantized_BDHW))
    with pytest.raises(InputError, match="decoder_only.*init"):
        _cfg(tmp_path, data, decoder_only=True).validate()
    with pytest.raises(CheckpointError, match="refine_blocks"):  # a new decoder shape needs --decoder-only
        train_vae(_cfg(tmp_path, data, steps=1, out=str(tmp_path / "c"), init=str(first.out), vae_overrides=refine))


def test_time_budget_keeps_the_plan_when_it_fits_and_stops_when_it_does_not(tmp_path):
    data = _write_images(tmp_path / "imgs")
    fits = train_vae(_cfg(tmp_path, data, steps=70, max_minutes=30.0, out=str(tmp_path / "a"), ckpt_every=70))
    assert fits.steps == 70
    short = train_vae(_cfg(tmp_path, data, steps=100_000, max_minutes=0.03, out=str(tmp_path / "b"),
                           ckpt_every=100_000))
    assert 1 <= short.steps < 100_000 and short.seconds < 30
    assert latest_checkpoint(tmp_path / "b").step == short.steps  # the step reached is saved


def test_crop_training_trains_on_windows_and_keeps_the_full_size_model(tmp_path, monkeypatch):
    import vargpt.training.vae as vae_training

    data = _write_images(tmp_path / "imgs", size=32)
    seen = []
    real = vae_training.recon_loss
    monkeypatch.setattr(vae_training, "recon_loss",
                        lambda r, x, kind, w=None: (seen.append(tuple(x.shape)), real(r, x, kind, w))[1])
    res = train_vae(_cfg(tmp_path, data, size=32, crop=16, steps=6, ckpt_every=6, entropy_weight=0.01))
    assert seen and all(shape[-2:] == (16, 16) for shape in seen)
    vae, cfg = load_vae(res.out)
    assert cfg["image_size"] == 32 and vae.schedule_for(torch.zeros(1, 3, 32, 32))[-1] == (1, 4, 4)
    for bad in (0, 64):
        with pytest.raises(InputError, match="crop must be between"):
            _cfg(tmp_path, data, size=32, crop=bad).validate()


def test_bad_training_inputs(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        train_vae(_cfg(tmp_path, tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .png/.jpg"):
        train_vae(_cfg(tmp_path, tmp_path / "empty"))
    with pytest.raises(InputError, match="shapesworld:N"):
        train_vae(_cfg(tmp_path, "shapesworld:many"))
    with pytest.raises(InputError, match="recon_loss"):
        train_vae(_cfg(tmp_path, tmp_path, recon_loss="l3"))
    with pytest.raises(InputError, match="not a multiple of the VAE stride"):
        train_vae(_cfg(tmp_path, _write_images(tmp_path / "imgs"), size=20))


# ----------------------------------------------------------------------------------------------- eval


def test_metrics():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    y = (x + 0.02).clamp(-1, 1)
    p, s = psnr_ssim(y, x)
    assert 39 < p[0] < 41 and 0.9 < s[0] <= 1.0  # error 0.01 in [0, 1] -> 40 dB
    bits = torch.zeros(2, 2, 2, 4, dtype=torch.uint8)
    bits[0, :, :, 0] = 1
    u = bit_usage([bits])[0]
    assert u["ones_frac"] == 0.125 and u["unique_code_frac"] == 0.25 and 0.2 < u["bit_entropy"] < 0.3


def test_size_mix_repeats_a_size_for_more_steps(tmp_path):
    cfg = VAETrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), size=64, extra_sizes=(64, 128), batch_size=16)
    assert cfg.sizes == (64, 128) and cfg.size_cycle == (64, 64, 128)
    assert [cfg.batch_for(s) for s in cfg.sizes] == [16, 4]
    plain = VAETrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), size=64, extra_sizes=(128,))
    assert plain.sizes == plain.size_cycle == (64, 128)


def test_evaluate_vae_report_shapes():
    from vargpt.config import tiny_config
    from vargpt.models.vae import BSQVAE

    vae = BSQVAE(tiny_config().vae).eval()
    imgs = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    rep = evaluate_vae(vae, imgs, batch_size=2)
    assert rep["n_images"] == 3 and len(rep["psnr_db_by_scales"]) == len(rep["schedule"]) == 3
    assert rep["psnr_db"] == rep["psnr_db_by_scales"][-1]
    assert len(rep["bit_usage"]) == 3 and rep["bit_usage"][0]["positions"] == 3


def test_cli_train_and_eval(tmp_path, capsys):
    data = _write_images(tmp_path / "imgs")
    out = tmp_path / "run"
    main(["train", "vae", "--data", str(data), "--out", str(out), "--steps", "3", "--batch-size", "2",
          "--size", "16,32", "--device", "cpu"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 3
    assert json.loads((out / "model" / "config.json").read_text())["trained_sizes"] == [16, 32]
    report = tmp_path / "rep" / "vae.json"
    main(["eval", "vae", "--model", str(out), "--data", str(data), "--json", str(report), "--size", "16",
          "--device", "cpu"])
    rep = json.loads(report.read_text())
    assert {"psnr_db", "ssim", "psnr_db_by_scales", "bit_usage"} <= set(rep)
    assert (tmp_path / "rep" / "vae_recon.png").is_file() and (tmp_path / "rep" / "vae_psnr_by_scales.png").is_file()
    with pytest.raises(SystemExit) as e:
        main(["eval", "vae", "--model", str(tmp_path / "nothing"), "--json", str(report)])
    assert e.value.code == 2
    assert "train one with" in capsys.readouterr().err


def test_non_positive_lr_is_refused(tmp_path):
    with pytest.raises(InputError, match="lr must be > 0"):
        VAETrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), lr=0.0).validate()


def test_load_vae_reads_the_vae_of_a_full_model(tiny_model_dir):
    """A full VARGPT directory (e.g. the embedded default) serves as a VAE: `--init`, `eval vae`, `model.vae`."""
    from safetensors.torch import load_file

    vae, cfg = load_vae(tiny_model_dir)
    full = load_file(next(tiny_model_dir.glob("*.safetensors")))
    assert cfg["kind"] == "bsq_vae" and cfg["from_model"] == str(tiny_model_dir)
    for k, v in vae.state_dict().items():
        assert torch.equal(v, full[f"vae_local.{k}"]), k


def test_foreground_weights_mark_off_background_pixels_and_weight_the_loss():
    x = torch.full((2, 3, 8, 8), 0.8)  # light background
    x[0, :, 2:4, 2:4] = torch.tensor([-1.0, 0.5, 0.0])[:, None, None]  # a 2x2 object on image 0 only
    w = foreground_weights(x, 4.0)
    assert w.shape == (2, 1, 8, 8)
    assert w[0, 0, 2:4, 2:4].eq(5.0).all() and w[0].sum() == 64 + 4 * 4 and w[1].eq(1.0).all()
    recon = x.clone()
    recon[0, :, 2, 2] = 0.8  # one object pixel wrong
    plain, l1, mse = recon_loss(recon, x, "l1")
    weighted, l1w, msew = recon_loss(recon, x, "l1", w)
    assert (l1, mse) == (l1w, msew)  # the reported metrics stay unweighted
    assert weighted > plain  # the error sits on the object: weighting raises the loss
    with pytest.raises(InputError, match="foreground_weight"):
        VAETrainConfig(data="x", out="y", foreground_weight=-1).validate()


def test_edge_weights_mark_the_boundary_ring_of_an_object():
    x = torch.full((1, 3, 8, 8), 0.8)
    x[0, :, 3:5, 3:5] = -1.0  # 2x2 object: its 3x3-dilated ring (4x4 box at 2..5) spans both colours
    w = foreground_weights(x, 0.0, edge_weight=2.0)
    edge = torch.zeros(8, 8, dtype=torch.bool)
    edge[2:6, 2:6] = True
    assert w[0, 0][edge].eq(3.0).all() and w[0, 0][~edge].eq(1.0).all()
    both = foreground_weights(x, 4.0, edge_weight=2.0)
    assert both[0, 0, 3, 3] == 7.0 and both[0, 0, 2, 2] == 3.0 and both[0, 0, 0, 0] == 1.0
    with pytest.raises(InputError, match="edge_weight"):
        VAETrainConfig(data="x", out="y", edge_weight=-1).validate()


def test_detail_weights_mark_thin_parts_and_narrow_gaps_only():
    x = torch.full((1, 3, 16, 16), 0.8)
    x[0, :, 2:7, 2:7] = -1.0  # two solid 5x5 squares with a 1-px gap between them (a notch)
    x[0, :, 2:7, 8:13] = -1.0
    x[0, :, 11, 2:14] = -1.0  # a 1-px line (a thin arm)
    w = foreground_weights(x, 0.0, detail_weight=2.0, detail_kernel=3)
    detail = torch.zeros(16, 16, dtype=torch.bool)
    detail[2:7, 7] = True  # the gap, filled by the closing
    detail[11, 2:14] = True  # the line, removed by the opening
    assert w[0, 0][detail].eq(3.0).all() and w[0, 0][~detail].eq(1.0).all()  # solid squares: no extra weight
    with pytest.raises(InputError, match="detail_kernel"):
        VAETrainConfig(data="x", out="y", detail_kernel=4).validate()
    with pytest.raises(InputError, match="detail_weight"):
        VAETrainConfig(data="x", out="y", detail_weight=-1).validate()


def test_cli_trains_a_patch_vae_with_foreground_weight(tmp_path, capsys):
    data = _write_images(tmp_path / "imgs")
    out = tmp_path / "run"
    main(["train", "vae", "--data", str(data), "--out", str(out), "--steps", "2", "--batch-size", "2", "--size", "16",
          "--device", "cpu", "--vae", "arch=patch", "--vae", "base_ch=32", "--vae", "codebook_dim=8",
          "--foreground-weight", "4", "--edge-weight", "2"])
    vae = json.loads((out / "model" / "config.json").read_text())["vae"]
    assert (vae["arch"], vae["patch_size"], vae["base_ch"], vae["codebook_dim"]) == ("patch", 8, 32, 8)
    model, _ = load_vae(out)
    assert model.cfg.arch == "patch" and model.stride == 8
    with pytest.raises(SystemExit):
        main(["train", "vae", "--data", str(data), "--out", str(out), "--vae", "base_ch=wide"])
    assert "comma-separated list of integers" in capsys.readouterr().err


def test_recipe_vae_of_another_shape_replaces_the_checkpoints(tmp_path):
    """`model.vae` with a wider decoder MLP than the checkpoint's own VAE (`model.config_overrides.vae` saying so):
    the model takes that VAE's weights and the checkpoint's everything else; without model.vae the override fails
    the strict load with the VAE section named."""
    import dataclasses

    from vargpt.config import tiny_config
    from vargpt.errors import ConfigError
    from vargpt.models.vargpt import VARGPT
    from vargpt.training.recipe import recipe_from_dict
    from vargpt.training.trainer import build_model

    base = tiny_config()
    patch = dataclasses.replace(base.vae, arch="patch", patch_size=8, base_ch=32, codebook_dim=base.vae.codebook_dim)
    torch.manual_seed(0)
    VARGPT(dataclasses.replace(base, vae=patch)).save_pretrained(tmp_path / "ckpt")
    torch.manual_seed(1)
    wide = VARGPT(dataclasses.replace(base, vae=dataclasses.replace(patch, patch_mlp_ch=256)))
    wide.save_pretrained(tmp_path / "wide")  # a full model directory serves as a VAE directory

    def recipe(vae):
        return recipe_from_dict({
            "name": "gen", "stage": "sft_gen", "out_dir": str(tmp_path / "runs"),
            "model": {"checkpoint": str(tmp_path / "ckpt"), "preset": None, "vae": vae,
                      "config_overrides": {"vae": {"patch_mlp_ch": 256}}},
            "data": {"sources": [{"path": str(tmp_path / "data"), "format": "shapesworld"}], "image_size": 64}})

    model = build_model(recipe(str(tmp_path / "wide")))
    old = VARGPT.from_pretrained(tmp_path / "ckpt")
    assert model.config.vae.patch_mlp_ch == 256
    for k, v in model.state_dict().items():
        want = (wide if k.startswith("vae_local.") else old).state_dict()[k]
        assert torch.equal(v, want), k
    with pytest.raises((CheckpointError, ConfigError), match="vae"):
        build_model(recipe(None))
