"""Class-conditional decoder: learns labels' bits, samples with CFG, the CPU training entry point runs."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: examples/ is not installed

from examples.class_decoder.model import ClassConditionalDecoder  # noqa: E402
from examples.class_decoder.train import ClassDecoderTrainConfig, make_class_images, train_class_decoder  # noqa: E402

from vargpt.config import DecoderConfig, SamplingConfig  # noqa: E402
from vargpt.models.quantizer import multiscale_bits  # noqa: E402
from vargpt.scales import schedule_for_grid  # noqa: E402

SCHED = schedule_for_grid(4, 4)  # 3 scales, 21 tokens



def test_learns_class_bits_and_samples():
    torch.manual_seed(0)
    cfg = DecoderConfig(depth=2, embed_dim=64, num_heads=2, block_chunks=1, text_channels=64, text_maxlen=8,
                        drop_path_rate=0.0, cond_drop_rate=0.1)
    model = ClassConditionalDecoder(cfg, codebook_dim=8, num_classes=3).train()
    latents = torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(0))  # one "image" per class
    tokens = multiscale_bits(latents, SCHED)
    labels = torch.arange(3)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    first = model.loss(labels, tokens, SCHED, generator=gen).loss.item()
    for _ in range(40):
        res = model.loss(labels, tokens, SCHED, generator=gen)
        opt.zero_grad()
        res.loss.backward()
        opt.step()
    assert res.loss.item() < 0.5 * first and res.bit_accuracy > 0.85
    model.eval()
    out = model.sample(labels, SCHED, SamplingConfig(cfg_scale=2.0, tau=0.2, top_k=0, top_p=0.97),
                       generator=[torch.Generator().manual_seed(i) for i in range(3)])
    assert [tuple(b.shape) for b in out.bits] == [(3, 1, 1, 8), (3, 2, 2, 8), (3, 4, 4, 8)]
    agree = torch.tensor([[(out.bits[-1][i] == tokens.bits[-1][j].long()).float().mean().item() for j in range(3)]
                          for i in range(3)])
    off = agree.masked_fill(torch.eye(3, dtype=torch.bool), 0).amax(1)
    assert (agree.diag() > off + 0.1).all()  # each label reproduces its own image's bits, not the others'


def test_class_images_and_training_entry_point(tmp_path):
    images, labels = make_class_images(6, "shape", 64, seed=0)
    assert images.shape == (6, 3, 64, 64) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 1, 2, 3, 4, 0]
    result = train_class_decoder(ClassDecoderTrainConfig(out=str(tmp_path / "run"), steps=2, batch_size=2, pool=5,
                                                         classes="shape", warmup=1, log_every=1, device="cpu"))
    assert result["loss"] > 0
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "samples.png").is_file()


def test_checkpoints_and_resume_reach_the_uninterrupted_weights(tmp_path):
    import shutil

    from examples.class_decoder.train import main
    from safetensors.torch import load_file

    from vargpt.training.checkpoint import list_checkpoints

    args = ["--steps", "6", "--batch-size", "2", "--pool", "5", "--classes", "shape", "--warmup", "1",
            "--log-every", "1", "--ckpt-every", "2", "--keep-last", "5", "--self-correction", "0.3",
            "--device", "cpu"]
    main(["--out", str(tmp_path / "full"), *args])
    assert [c.step for c in list_checkpoints(tmp_path / "full")] == [2, 4, 6]
    shutil.copytree(tmp_path / "full", tmp_path / "cut")  # as if killed after the checkpoint of step 4:
    shutil.rmtree(tmp_path / "cut" / "model")
    shutil.rmtree(list_checkpoints(tmp_path / "cut")[-1].path)
    main(["--out", str(tmp_path / "cut"), *args, "--resume"])
    full, cut = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("full", "cut"))
    assert full.keys() == cut.keys() and all(torch.equal(full[k], cut[k]) for k in full)
    with (tmp_path / "cut" / "log.csv").open() as f:
        assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == ["0", "1", "2", "3", "4", "5"]
