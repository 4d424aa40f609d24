"""Scale schedules: the grids (h, w) that next-scale prediction walks through, coarse to fine.

The released model uses Infinity's "dynamic resolution" templates: for each aspect ratio h/w there is
one list of 13 latent grids; the first 7 / 10 / 12 / 13 of them form the pixel budgets '0.06M' /
'0.25M' / '0.60M' / '1M'. A grid is in latent positions; pixels = grid x VAE stride (16 released,
8 for the tiny preset, so the same templates serve both).

A schedule is a tuple of ``(1, h, w)`` triples (t = 1 for images), which is the form the released code
keys its RoPE tables by. ``schedule_for_size`` finds the template and prefix that ends at a requested
pixel size, so users can ask for any size the templates define (non-square included).
"""

from __future__ import annotations

import math

from vargpt.errors import InputError

Schedule = tuple[tuple[int, int, int], ...]

# Latent grids per aspect template (h/w), from Infinity's dynamic_resolution table (facts only).
_RATIO_TO_HWS: dict[float, tuple[tuple[int, int], ...]] = {
    1.000: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40),
            (48, 48), (64, 64)),
    1.250: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36),
            (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36),
            (60, 45), (72, 54)),
    1.500: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32),
            (63, 42), (78, 52)),
    1.750: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32),
            (70, 40), (84, 48)),
    2.000: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30),
            (74, 37), (90, 45)),
    2.500: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26),
            (80, 32), (100, 40)),
    3.000: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24),
            (90, 30), (111, 37)),
}


def _with_transposes() -> dict[float, tuple[tuple[int, int], ...]]:
    out = {}
    for ratio, hws in _RATIO_TO_HWS.items():
        out[ratio] = hws
        if ratio != 1.0:
            out[int(1 / ratio * 1000) / 1000] = tuple((w, h) for h, w in hws)
    return out


TEMPLATES: dict[float, tuple[tuple[int, int], ...]] = _with_transposes()
PIXEL_BUDGETS: dict[str, int] = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}  # name -> number of scales


def nearest_template(h_div_w: float) -> float:
    """The aspect template closest to h/w (as the released code picks it)."""
    return min(TEMPLATES, key=lambda r: abs(r - h_div_w))


def scale_schedule(pn: str = "0.25M", h_div_w: float = 1.0) -> Schedule:
    """The released schedule for a pixel budget name and aspect ratio."""
    if pn not in PIXEL_BUDGETS:
        raise InputError(f"unknown pixel budget {pn!r}; choose one of {', '.join(PIXEL_BUDGETS)}")
    hws = TEMPLATES[nearest_template(h_div_w)][: PIXEL_BUDGETS[pn]]
    return tuple((1, h, w) for h, w in hws)


def schedule_for_grid(grid_h: int, grid_w: int) -> Schedule:
    """The template prefix that ends exactly at latent grid (grid_h, grid_w)."""
    for hws in TEMPLATES.values():
        for i, hw in enumerate(hws):
            if hw == (grid_h, grid_w):
                return tuple((1, h, w) for h, w in hws[: i + 1])
    raise InputError(f"no scale schedule ends at a {grid_h}x{grid_w} latent grid; "
                     f"supported sizes: {supported_sizes_text(1)}")


def schedule_for_size(height: int, width: int, stride: int) -> Schedule:
    """The schedule that generates a `height` x `width` image with a VAE of the given stride; `InputError` naming
    the nearest supported sizes when none does."""
    if height % stride == 0 and width % stride == 0:
        try:
            return schedule_for_grid(height // stride, width // stride)
        except InputError:
            pass
    near = ", ".join(f"{w}x{h}" for h, w in nearest_sizes(height, width, stride))
    raise InputError(f"no scale schedule generates {width}x{height} (WIDTHxHEIGHT) images with VAE stride {stride}; "
                     f"nearest supported sizes: {near}")


def nearest_sizes(height: int, width: int, stride: int, k: int = 3) -> list[tuple[int, int]]:
    """The ``k`` supported (height, width) sizes closest to the given one (in log aspect ratio, then log area)."""
    def distance(hw: tuple[int, int]) -> tuple[float, float]:
        h, w = hw
        return abs(math.log(h / w) - math.log(height / width)), abs(math.log(h * w / (height * width)))
    return sorted(supported_sizes(stride), key=lambda hw: (round(sum(distance(hw)), 9), hw))[:k]


def resolve_size(size: str | int, stride: int, aspect: str | None = None) -> tuple[int, int]:
    """A user's size as (height, width) pixels: ``"512"`` (square), ``"768x384"`` (WIDTHxHEIGHT, as OpenAI writes
    it), or ``"512"`` with ``aspect="2:1"`` (WIDTH:HEIGHT): the template of that aspect at the pixel budget that
    ends at 512x512, as the released dynamic-resolution templates pair them (official: 2:1 at 512 -> 736x368).
    Raises `InputError` naming the nearest supported sizes when no schedule generates it."""
    text = str(size).strip().lower()
    w_text, sep, h_text = text.partition("x")
    if not (w_text.isdigit() and (not sep or h_text.isdigit())):
        raise InputError(f"size {size!r}: write N (square) or WIDTHxHEIGHT, e.g. 512 or 768x384")
    width, height = int(w_text), int(h_text or w_text)
    if aspect is not None:
        a_w, colon, a_h = aspect.strip().partition(":")
        if sep or not (colon and a_w.isdigit() and a_h.isdigit() and int(a_w) and int(a_h)):
            raise InputError(f"aspect {aspect!r}: write WIDTH:HEIGHT (e.g. 2:1) with a square size (e.g. 512)")
        square = TEMPLATES[1.0]
        if width % stride or (width // stride, width // stride) not in square:
            raise InputError(f"size {width} with an aspect ratio: the square size must be one the templates define "
                             f"({', '.join(str(h * stride) for h, _ in square[4:])})")
        index = square.index((width // stride, width // stride))
        h, w = TEMPLATES[nearest_template(int(a_h) / int(a_w))][index]
        return h * stride, w * stride
    schedule_for_size(height, width, stride)  # raises, naming the nearest supported sizes
    return height, width


def supported_sizes(stride: int) -> list[tuple[int, int]]:
    """All (height, width) pixel sizes some template prefix ends at, smallest first."""
    sizes = {(h * stride, w * stride) for hws in TEMPLATES.values() for h, w in hws[4:]}
    return sorted(sizes, key=lambda hw: (hw[0] * hw[1], hw))


def supported_sizes_text(stride: int, limit: int = 12) -> str:
    sizes = supported_sizes(stride)
    shown = ", ".join(f"{w}x{h}" for h, w in sizes[:limit])
    return shown + (f", ... ({len(sizes)} in all)" if len(sizes) > limit else "")


def num_tokens(schedule: Schedule) -> int:
    """Total tokens of a schedule (521 for '0.06M' 1:1, 2521 for '0.25M' 1:1)."""
    return sum(t * h * w for t, h, w in schedule)


def padded_tokens(schedule: Schedule, multiple: int = 128) -> int:
    """Tokens padded up to a multiple (the released training pads to 128: 521 -> 640, 2521 -> 2560)."""
    n = num_tokens(schedule)
    return -(-n // multiple) * multiple


def scale_offsets(schedule: Schedule) -> list[int]:
    """Start index of each scale in the flattened token sequence."""
    offs, acc = [], 0
    for t, h, w in schedule:
        offs.append(acc)
        acc += t * h * w
    return offs
