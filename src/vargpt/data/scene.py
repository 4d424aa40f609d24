"""ShapesWorld scenes: the vocabulary, the frozen scene model, sampling and antialiased rendering.

A `Scene` is a background name plus 0-4 `Obj`s. Each object has a shape (`SHAPES`), a colour (`COLOURS`), a
size (`SIZES`) and a centre ``(cx, cy)`` in normalised image coordinates ([0, 1], y down; the centre of
the object's bounding box, which for the triangle is not its centroid). Objects live in distinct cells of a
3x3 grid and stay inside their cell with a margin (`CELL_MARGIN`), so objects never overlap, the gap between
two objects is at least ``2 * CELL_MARGIN`` of the side (3 px at 64 px), and "left of", "above" and cell
names are unambiguous.

`render(scene, size)` draws with Pillow on a canvas `_supersample(size)` times larger and box-averages it
down (exact area coverage antialiasing), so one scene gives the same picture at 64, 128, 256 and 512 px.
Everything random takes an explicit `random.Random`; nothing here keeps state.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

from vargpt.errors import InputError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles",
                           "diamond": "diamonds", "cross": "crosses"}
# Well separated from each other (min pairwise RGB distance ~100) and from every background (>= ~130).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "orange": (245, 125, 10), "yellow": (235, 210, 20), "green": (35, 160, 60),
    "blue": (35, 70, 215), "purple": (130, 45, 170), "pink": (240, 100, 185), "brown": (115, 65, 25),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255), "grey": (222, 222, 222), "cream": (250, 240, 210), "light blue": (212, 228, 245),
}
SIZES: dict[str, float] = {"small": 0.17, "large": 0.27}  # extent (bounding-box side) as a fraction of the image
CELL_NAMES: tuple[str, ...] = ("top left", "top", "top right", "left", "center", "right",
                               "bottom left", "bottom", "bottom right")
CELL_MARGIN = 0.025  # every object's box stays this far inside its cell
IMAGE_SIZES: tuple[int, ...] = (64, 128, 256, 512)
MAX_OBJECTS = 4


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    cx: float
    cy: float

    @property
    def col(self) -> int:
        return min(int(self.cx * 3), 2)

    @property
    def row(self) -> int:
        return min(int(self.cy * 3), 2)

    @property
    def cell(self) -> int:
        return self.row * 3 + self.col

    @property
    def extent(self) -> float:
        return SIZES[self.size]

    def key(self) -> tuple[str, str, str, int]:
        """What a coarse comparison looks at: shape, colour, size and grid cell."""
        return (self.shape, self.colour, self.size, self.cell)

    def replace(self, **changes: Any) -> Obj:
        return Obj(**{**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "cx": self.cx, "cy": self.cy}


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str = "white"

    def to_dict(self) -> dict[str, Any]:
        return {"background": self.background, "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        try:
            objs = tuple(Obj(o["shape"], o["colour"], o["size"], float(o["cx"]), float(o["cy"]))
                         for o in d["objects"])
            scene = cls(objs, d.get("background", "white"))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"scene dict is malformed ({e!r}); expected {{'background', 'objects': [...]}}") from None
        validate_scene(scene)
        return scene

    def keys(self) -> list[tuple[str, str, str, int]]:
        return sorted(o.key() for o in self.objects)


def validate_scene(scene: Scene) -> None:
    if scene.background not in BACKGROUNDS:
        raise InputError(f"unknown background {scene.background!r}; choose one of {', '.join(BACKGROUNDS)}")
    for o in scene.objects:
        for value, allowed in ((o.shape, SHAPES), (o.colour, COLOURS), (o.size, SIZES)):
            if value not in allowed:
                raise InputError(f"unknown attribute {value!r} in scene object; allowed: {', '.join(allowed)}")


# ----------------------------------------------------------------------------------------------- placement


def cell_of(col: int, row: int) -> int:
    return row * 3 + col


def jitter_range(size: str) -> float:
    """How far the centre may move from its cell centre while the box stays `CELL_MARGIN` inside the cell."""
    return max(0.0, (1 / 3 - SIZES[size]) / 2 - CELL_MARGIN)


def place(rng: random.Random, size: str, cell: int) -> tuple[float, float]:
    """A jittered centre for an object of `size` in `cell`, rounded to 4 decimals (records stay short)."""
    j = jitter_range(size)
    cx = (cell % 3 + 0.5) / 3 + rng.uniform(-j, j)
    cy = (cell // 3 + 0.5) / 3 + rng.uniform(-j, j)
    return round(cx, 4), round(cy, 4)


def clamp_to_cell(obj: Obj) -> Obj:
    """The same object with its centre pulled inside the allowed range of its cell (after a resize)."""
    j = jitter_range(obj.size)
    ccx, ccy = (obj.col + 0.5) / 3, (obj.row + 0.5) / 3
    return obj.replace(cx=round(min(max(obj.cx, ccx - j), ccx + j), 4),
                       cy=round(min(max(obj.cy, ccy - j), ccy + j), 4))


def random_object(rng: random.Random, cell: int, *, allowed: Callable[[str, str], bool] = lambda s, c: True,
                  shape: str | None = None, colour: str | None = None, size: str | None = None) -> Obj:
    """An object in `cell`; unspecified attributes are drawn so that ``allowed(shape, colour)`` holds."""
    pairs = [(s, c) for s in ([shape] if shape else SHAPES) for c in ([colour] if colour else COLOURS) if allowed(s, c)]
    if not pairs:
        raise ValueError(f"no allowed colour-shape pair for shape={shape} colour={colour}")
    s, c = rng.choice(pairs)
    z = size or rng.choice(tuple(SIZES))
    cx, cy = place(rng, z, cell)
    return Obj(s, c, z, cx, cy)


def sample_scene(rng: random.Random, *, n_objects: int | None = None,
                 allowed: Callable[[str, str], bool] = lambda s, c: True) -> Scene:
    """A random scene of 1-`MAX_OBJECTS` objects in distinct cells on a random background."""
    n = n_objects if n_objects is not None else rng.randint(1, MAX_OBJECTS)
    cells = rng.sample(range(9), n)
    objs = tuple(random_object(rng, c, allowed=allowed) for c in cells)
    return Scene(objs, rng.choice(tuple(BACKGROUNDS)))


# ----------------------------------------------------------------------------------------------- rendering


def _supersample(size: int) -> int:
    return max(4, 512 // size)


def _draw(draw: ImageDraw.ImageDraw, obj: Obj, side: int) -> None:
    """Draw one object on a `side`-pixel canvas. Pixel (i, j) covers [i, i+1) x [j, j+1) in canvas units."""
    x, y, h = obj.cx * side, obj.cy * side, obj.extent * side / 2
    fill = COLOURS[obj.colour]
    # Pillow's boxes include both end pixels, hence the -1 on the far edges; polygons are filled by centre.
    box = [round(x - h), round(y - h), round(x + h) - 1, round(y + h) - 1]
    if obj.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif obj.shape == "square":
        draw.rectangle(box, fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x - 0.5, y - h - 0.5), (x + h - 0.5, y + h - 0.5), (x - h - 0.5, y + h - 0.5)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(x - 0.5, y - h - 0.5), (x + h - 0.5, y - 0.5), (x - 0.5, y + h - 0.5),
                      (x - h - 0.5, y - 0.5)], fill=fill)
    elif obj.shape == "cross":
        t = h / 3
        draw.rectangle([round(x - h), round(y - t), round(x + h) - 1, round(y + t) - 1], fill=fill)
        draw.rectangle([round(x - t), round(y - h), round(x + t) - 1, round(y + h) - 1], fill=fill)
    else:
        raise InputError(f"unknown shape {obj.shape!r}; choose one of {', '.join(SHAPES)}")


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB image of `size` x `size` pixels (antialiased by exact box averaging)."""
    if size not in IMAGE_SIZES:
        raise InputError(f"image size {size} is not supported; choose one of {', '.join(map(str, IMAGE_SIZES))}")
    validate_scene(scene)
    k = _supersample(size)
    canvas = Image.new("RGB", (size * k, size * k), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        _draw(draw, obj, size * k)
    return canvas.reduce(k)
