"""How often a trained class-conditional decoder draws the requested shape AND colour (ShapesWorld checker).

For each class ("<colour> <shape>", or "<shape>") of a `examples.class_decoder.train` model, draw N samples with
fixed per-sample seeds (sample j of class c uses seed ``seed * 1_000_003 + c * 1000 + j``, the same under every
setting), decode them with the VAE, parse them with `vargpt.eval.checker.parse_scene` and count a sample correct
iff the parsed scene has exactly one object whose shape (and colour, for shape x colour classes) equal the
class. Every (cfg, tau) pair of ``--cfg`` x ``--tau`` is one setting. ``--recon`` also scores the VAE's own
reconstructions of N rendered scenes per class (random cell, size, background): the ceiling the decoder's
samples inherit from the VAE, split by object size.

    python -m examples.class_decoder.evaluate --model runs/cls/model --vae runs/vae64 --samples-per-class 10 \
        --json runs/cls/eval.json --cfg 3 --tau 0.5 --recon

Not a test: writes a JSON report (overall / per-shape / per-colour accuracy and failure kinds per setting)
and a PNG grid per setting (rows: shapes x first 4 samples, columns: colours; red frame = not correct).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch
from examples.class_decoder.model import ClassConditionalDecoder
from examples.class_decoder.train import make_class_images
from PIL import Image, ImageDraw

from vargpt.config import DecoderConfig, SamplingConfig
from vargpt.data.scene import COLOURS, SHAPES
from vargpt.eval.checker import parse_scene
from vargpt.models.vae import BSQVAE
from vargpt.scales import schedule_for_size
from vargpt.training.checkpoint import load_model_dir
from vargpt.training.vae import load_vae


def load_class_decoder(path: str | Path) -> tuple[ClassConditionalDecoder, dict]:
    """A trained class decoder from its model directory (or the run directory above it)."""
    path = Path(path)
    if (path / "model").is_dir():
        path = path / "model"
    state, config = load_model_dir(path)
    model = ClassConditionalDecoder(DecoderConfig(**config["decoder"]), config["codebook_dim"], config["num_classes"])
    model.load_state_dict(state)
    return model.eval(), config


def to_uint8(vae: BSQVAE, codes_BDHW: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ((vae.decode(codes_BDHW) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()


def judge(image_3HW: torch.Tensor, name: str) -> tuple[bool, str]:
    """(correct, failure kind) of one picture against class ``name``."""
    words = name.split()
    shape, colour = words[-1], (words[0] if len(words) == 2 else None)
    objs = parse_scene(Image.fromarray(image_3HW.permute(1, 2, 0).numpy())).objects
    if len(objs) != 1:
        return False, f"{len(objs)} objects"
    bad = [k for k, ok in (("shape", objs[0].shape == shape), ("colour", colour is None or objs[0].colour == colour))
           if not ok]
    return not bad, "wrong " + "+".join(bad) if bad else "ok"


def summarise(names: list[str], labels: list[int], verdicts: list[tuple[bool, str]]) -> dict:
    per: dict[str, Counter] = {"shape": Counter(), "colour": Counter()}
    tot: dict[str, Counter] = {"shape": Counter(), "colour": Counter()}
    for lab, (ok, _) in zip(labels, verdicts, strict=True):
        words = names[lab].split()
        for key, value in (("shape", words[-1]), ("colour", words[0] if len(words) == 2 else None)):
            if value is not None:
                tot[key][value] += 1
                per[key][value] += ok
    n_ok = sum(ok for ok, _ in verdicts)
    return {"n": len(verdicts), "n_correct": n_ok, "accuracy": round(n_ok / max(1, len(verdicts)), 4),
            "per_shape": {s: round(per["shape"][s] / tot["shape"][s], 4) for s in SHAPES if tot["shape"][s]},
            "per_colour": {c: round(per["colour"][c] / tot["colour"][c], 4) for c in COLOURS if tot["colour"][c]},
            "failures": dict(Counter(kind for ok, kind in verdicts if not ok).most_common())}


def grid(pics: torch.Tensor, labels: list[int], verdicts: list[tuple[bool, str]], names: list[str],
         per_row: int = 4) -> Image.Image:
    """Rows: each shape x its first `per_row` samples; columns: colours (shape classes: one column)."""
    colours = sorted({n.split()[0] for n in names if len(n.split()) == 2}, key=list(COLOURS).index) or [None]
    side = pics.shape[-1]
    canvas = Image.new("RGB", (side * len(colours), side * per_row * len(SHAPES)), "black")
    draw = ImageDraw.Draw(canvas)
    seen: Counter = Counter()
    for i, lab in enumerate(labels):
        j = seen[lab]
        seen[lab] += 1
        if j >= per_row:
            continue
        words = names[lab].split()
        x = side * colours.index(words[0] if len(words) == 2 else None)
        y = side * (SHAPES.index(words[-1]) * per_row + j)
        canvas.paste(Image.fromarray(pics[i].permute(1, 2, 0).numpy()), (x, y))
        if not verdicts[i][0]:
            draw.rectangle((x, y, x + side - 1, y + side - 1), outline=(255, 0, 0), width=2)
    return canvas


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="class decoder model dir (or its run dir)")
    p.add_argument("--vae", required=True, help="VAE run or model dir")
    p.add_argument("--samples-per-class", type=int, default=10)
    p.add_argument("--json", required=True)
    p.add_argument("--png", default=None, help="sample grid (default: JSON path with .png; per-setting suffix)")
    p.add_argument("--cfg", type=float, nargs="+", default=[3.0])
    p.add_argument("--tau", type=float, nargs="+", default=[0.5])
    p.add_argument("--top-p", type=float, default=0.97)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--recon", action="store_true", help="also score VAE reconstructions of rendered scenes")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model, config = load_class_decoder(args.model)
    vae = load_vae(args.vae)[0]
    names: list[str] = config["class_names"]
    size = int(config["image_size"])
    schedule = schedule_for_size(size, size, vae.stride)
    n = args.samples_per_class
    labels = [c for c in range(len(names)) for _ in range(n)]
    seeds = [args.seed * 1_000_003 + c * 1000 + j for c in range(len(names)) for j in range(n)]
    report: dict = {"model": str(args.model), "vae": str(args.vae), "image_size": size, "num_classes": len(names),
                    "samples_per_class": n, "seed": args.seed, "top_p": args.top_p, "top_k": args.top_k,
                    "criterion": "parse_scene finds exactly one object with the requested shape and colour",
                    "train": config.get("train"), "results": []}
    png = Path(args.png or Path(args.json).with_suffix(".png"))
    for cfg in args.cfg:
        for tau in args.tau:
            t0 = time.time()
            sampling = SamplingConfig(cfg_scale=cfg, tau=tau, top_k=args.top_k, top_p=args.top_p)
            pics = []
            for i in range(0, len(labels), args.batch):
                lab = torch.tensor(labels[i:i + args.batch])
                gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + args.batch]]
                pics.append(to_uint8(vae, model.sample(lab, schedule, sampling, generator=gens).summed_codes_BDHW))
            pics_t = torch.cat(pics)
            verdicts = [judge(pics_t[i], names[lab]) for i, lab in enumerate(labels)]
            res = {"cfg": cfg, "tau": tau, **summarise(names, labels, verdicts),
                   "seconds": round(time.time() - t0, 1)}
            out_png = png.with_name(f"{png.stem}_cfg{cfg:g}_tau{tau:g}{png.suffix}")
            grid(pics_t, labels, verdicts, names).save(out_png, optimize=True)
            res["png"] = str(out_png)
            report["results"].append(res)
            print(f"cfg {cfg:g} tau {tau:g}: accuracy {res['accuracy']:.3f} ({res['n_correct']}/{res['n']}), "
                  f"failures {res['failures']}, {res['seconds']}s", flush=True)
    if args.recon:
        kind = "shape_colour" if any(len(x.split()) == 2 for x in names) else "shape"
        train = config.get("train") or {}
        object_size, cell = train.get("object_size", "any"), int(train.get("cell", -1))
        background = train.get("background", "any")
        images, labs = make_class_images(len(names) * n, kind, size, 10_000 + args.seed, object_size, cell, background)
        with torch.no_grad():
            rec = to_uint8(vae, vae.encode(images.float() / 127.5 - 1, schedule).summed_BDHW)
        verdicts = [judge(rec[i], names[lab]) for i, lab in enumerate(labs.tolist())]
        clean = sum(judge(images[i], names[lab])[0] for i, lab in enumerate(labs.tolist()))
        report["vae_reconstruction"] = {"object_size": object_size, "cell": cell, "background": background,
                                        "rendered_accuracy": round(clean / len(labs), 4),
                                        **summarise(names, labs.tolist(), verdicts)}
        print(f"VAE reconstructions: accuracy {report['vae_reconstruction']['accuracy']:.3f} "
              f"(rendered originals {clean}/{len(labs)})", flush=True)
    Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
