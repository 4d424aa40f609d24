"""Write docs/shapesworld_grid.png: 12 ShapesWorld samples at 128 px with their captions beneath.

    python scripts/make_readme_grid.py [--out docs/shapesworld_grid.png] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from vargpt.data.shapesworld import make_record

SIZE, COLS, ROWS, PAD, TEXT_H = 128, 4, 3, 8, 84


def wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + [line]


def make_grid(seed: int) -> Image.Image:
    cell_w, cell_h = SIZE + PAD, SIZE + TEXT_H + PAD
    grid = Image.new("RGB", (COLS * cell_w + PAD, ROWS * cell_h + PAD), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=11)
    for k in range(COLS * ROWS):
        rec, images = make_record(5 * k, split="train", seed=seed, size=SIZE, tasks=("caption",))
        x, y = PAD + (k % COLS) * cell_w, PAD + (k // COLS) * cell_h
        grid.paste(images[rec["images"][0]], (x, y))
        draw.rectangle([x - 1, y - 1, x + SIZE, y + SIZE], outline=(160, 160, 160))
        for j, line in enumerate(wrap(draw, rec["messages"][1]["content"], font, SIZE)[:6]):
            draw.text((x, y + SIZE + 3 + 13 * j), line, fill=(30, 30, 30), font=font)
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/shapesworld_grid.png"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    make_grid(args.seed).save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
