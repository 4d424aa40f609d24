"""The ShapesWorld checker: parse a picture back into a scene, then score answers, prompts and edits.

No learned model. `parse_scene` works at any resolution:

1. background = the `BACKGROUNDS` colour nearest to the median border pixel;
2. foreground = pixels farther than 0.4 x (closest palette colour's distance) from the background; 8-connected
   components (scipy.ndimage) are the objects;
3. an object's colour = the palette colour most of its pixels are nearest to; its coverage ``alpha`` per pixel =
   the projection of (pixel - background) on (colour - background), which undoes the renderer's antialiasing.
   The projection is taken in YCbCr with chroma down-weighted (`LUMA_CONTRAST`), because JPEG blurs chroma;
4. shape = nearest prototype in a space of scale-invariant, alpha-weighted moment features (spread
   ``(var_x + var_y) / area``, kurtosis of the x/y marginals, vertical skewness, log aspect ratio), with the
   box-filter variance of pixels removed; "unknown" when no prototype is close. Size = small/large from the
   extent implied by the area and the shape's fill ratio; the centre is the centroid, shifted for the triangle.

Scoring: `score_answer` (normalised exact match), `score_prompt` (GenEval-style rule per category, 0 or 1)
and `score_edit` (the instruction is satisfied AND every untouched object keeps its attributes and position).

"Exact scene" (`scenes_match`) = same background, same number of objects and a one-to-one pairing with equal
shape, colour, size and grid cell and centres within `POSITION_TOL` (0.02 of the side, 1.3 px at 64 px).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from vargpt.data.scene import BACKGROUNDS, COLOURS, SIZES, Obj, Scene
from vargpt.data.shapesworld import (
    EditSpec,
    PromptSpec,
    Ref,
    apply_edit,
    parse_edit,
    parse_prompt,
    relation_holds,
    resolve_ref,
    spec_matches,
)

POSITION_TOL = 0.02  # of the image side: 1.3 px at 64 px; measured centre errors stay below 0.3 px at 64 px
FG_FRACTION = 0.4  # foreground threshold, as a fraction of the closest palette colour's distance to the background
MIN_AREA = 0.3 * 0.5 * SIZES["small"] ** 2  # a third of the smallest object (small triangle), fraction of the image
# JPEG keeps luma sharp and blurs chroma: coverage is measured along luma, plus just enough chroma to reach this
# contrast (yellow on a light background has little luma contrast).
LUMA_CONTRAST = 35.0
SHAPE_MAX_DIST = 3.0  # in units of FEATURE_SCALE; farther than this from every prototype -> "unknown"

# (spread, kurtosis, vertical skewness, log aspect) of each shape, exact for the renderer's geometry.
PROTOTYPES: dict[str, tuple[float, float, float, float]] = {
    "circle": (1 / (2 * math.pi), 2.0, 0.0, 0.0),
    "square": (1 / 6, 1.8, 0.0, 0.0),
    "triangle": (7 / 36, 2.4, -2 * math.sqrt(2) / 5, math.log(0.75)),
    "diamond": (1 / 6, 2.4, 0.0, 0.0),
    "cross": (29 / 150, 2205 / 841, 0.0, 0.0),
}
FEATURE_SCALE = np.array([0.01, 0.12, 0.15, 0.1])
FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5, "cross": 5 / 9}

_PALETTE = np.array(list(COLOURS.values()), np.float32)
_COLOUR_NAMES = tuple(COLOURS)
_PROTO = np.array(list(PROTOTYPES.values()))
_PROTO_NAMES = tuple(PROTOTYPES)
_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


# ----------------------------------------------------------------------------------------------- parsing


def parse_scene(image: Image.Image) -> Scene:
    """The scene drawn in `image` (objects sorted by cell, then left to right)."""
    rgb = np.asarray(image.convert("RGB"), np.float32)
    h, w = rgb.shape[:2]
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    bg_name = _nearest(np.median(border, axis=0), BACKGROUNDS)
    bg = np.array(BACKGROUNDS[bg_name], np.float32)
    diff = rgb - bg
    to_bg = np.linalg.norm(_PALETTE - bg, axis=1)
    fg = np.linalg.norm(diff, axis=2) > FG_FRACTION * to_bg.min()
    labels, _ = ndimage.label(fg, structure=np.ones((3, 3), bool))
    nearest = np.argmin(((rgb[..., None, :] - _PALETTE) ** 2).sum(-1), axis=-1)
    objects = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        obj = _parse_component(labels, k, sl, nearest, diff, bg)
        if obj is not None:
            objects.append(obj)
    objects.sort(key=lambda o: (o.cell, o.cx))
    return Scene(tuple(objects), bg_name)


def _parse_component(labels: np.ndarray, k: int, sl: tuple[slice, slice], nearest: np.ndarray, diff: np.ndarray,
                     bg: np.ndarray) -> Obj | None:
    h, w = labels.shape
    (y0, y1), (x0, x1) = (sl[0].start, sl[0].stop), (sl[1].start, sl[1].stop)
    own = labels[sl] == k
    colour = int(np.bincount(nearest[sl][own], minlength=len(_PALETTE)).argmax())
    dycc = (_PALETTE[colour] - bg) @ _YCC.T
    cw = min(1.0, math.sqrt(max(LUMA_CONTRAST**2 - dycc[0] ** 2, 0.0)) / max(np.linalg.norm(dycc[1:]), 1e-6))
    proj = (np.diag([1.0, cw, cw]) @ _YCC).T.astype(np.float32)
    c = (_PALETTE[colour] - bg) @ proj
    # Coverage inside the component only, not clipped at 0 or 1: noise then averages out of the moments instead
    # of biasing them outward; the loose clip only tames outliers.
    alpha = np.clip(diff[sl] @ proj @ c / (c @ c), -0.5, 1.5) * own
    area = float(alpha.sum())
    if area < MIN_AREA * h * w:
        return None
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5
    mx, my = (alpha * xs).sum() / area, (alpha * ys).sum() / area
    dx, dy = xs - mx, ys - my
    # Box-filtered pixels add the variance of a unit uniform (1/12) to the 2nd and a known term to the 4th moment.
    vx = max((alpha * dx**2).sum() / area - 1 / 12, 1e-6)
    vy = max((alpha * dy**2).sum() / area - 1 / 12, 1e-6)
    kx = ((alpha * dx**4).sum() / area - vx / 2 - 1 / 80) / vx**2
    ky = ((alpha * dy**4).sum() / area - vy / 2 - 1 / 80) / vy**2
    skew = (alpha * dy**3).sum() / area / vy**1.5
    feats = np.array([(vx + vy) / area, (kx + ky) / 2, skew, math.log(vx / vy)])
    dist = np.linalg.norm((_PROTO - feats) / FEATURE_SCALE, axis=1)
    best = int(dist.argmin())
    shape = _PROTO_NAMES[best] if dist[best] <= SHAPE_MAX_DIST else "unknown"
    extent = math.sqrt(area / (h * w) / FILL.get(shape, 0.7))
    size = "small" if extent < (SIZES["small"] + SIZES["large"]) / 2 else "large"
    cx, cy = mx / w, my / h
    if shape == "triangle":
        cy -= extent / 6  # the centroid sits a sixth of the extent below the box centre
    return Obj(shape, _COLOUR_NAMES[colour], size, round(float(cx), 4), round(float(cy), 4))


def _nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    names = tuple(table)
    return names[int(np.argmin(np.linalg.norm(np.array(list(table.values()), np.float32) - rgb, axis=1)))]


def scenes_match(truth: Scene, parsed: Scene, *, tol: float = POSITION_TOL) -> bool:
    """Whether `parsed` is the exact scene `truth` (the definition in the module docstring)."""
    if truth.background != parsed.background or len(truth.objects) != len(parsed.objects):
        return False
    rest = list(parsed.objects)
    for o in truth.objects:
        hit = next((p for p in rest if p.key() == o.key() and _close(o, p, tol)), None)
        if hit is None:
            return False
        rest.remove(hit)
    return True


def _close(a: Obj, b: Obj, tol: float) -> bool:
    return abs(a.cx - b.cx) <= tol and abs(a.cy - b.cy) <= tol


def _as_scene(image_or_scene: Image.Image | Scene) -> Scene:
    return image_or_scene if isinstance(image_or_scene, Scene) else parse_scene(image_or_scene)


# ----------------------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Verdict:
    """A 0/1 score of one image against one prompt, its GenEval-style category and why."""

    score: float
    category: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EditVerdict:
    """An edit scores 1 when it is `satisfied` (the instruction happened) and `preserved` (nothing else moved)."""

    score: float
    kind: str
    satisfied: bool
    preserved: bool
    details: dict[str, Any] = field(default_factory=dict)


_NUMBER_WORDS = {w: str(i) for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven",
                                                  "eight", "nine", "ten"))}
_SYNONYMS = {"color": "colour", "gray": "grey", "centre": "center", "middle": "center", "true": "yes", "false": "no"}


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation or articles, number words as digits, British spellings."""
    words = re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split()
    words = [_NUMBER_WORDS.get(w, _SYNONYMS.get(w, w)) for w in words if w not in ("a", "an", "the")]
    return " ".join(words)


def score_answer(pred: str, gold: str) -> float:
    """1.0 when the answers are equal after `normalise_answer`, else 0.0."""
    return float(normalise_answer(pred) == normalise_answer(gold))


def score_prompt(image_or_scene: Image.Image | Scene, prompt: str | PromptSpec) -> Verdict:
    """Whether the picture shows what the prompt asks for, by the rule of the prompt's category.

    single_object / colors: an object of that shape (and colour); counting: exactly N objects of the shape;
    two_object / color_attr: two distinct objects matching the two parts; position: such a pair whose grid
    columns (left/right of) or rows (above/below) are in the stated order. Extra objects are not penalised,
    except that counting counts every object of the shape.
    """
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    scene = _as_scene(image_or_scene)
    objs = scene.objects
    details: dict[str, Any] = {"spec": spec.to_dict(), "scene": scene.to_dict()}
    if spec.category == "counting":
        want = spec.objects[0]
        found = sum(spec_matches(o, want) for o in objs)
        details["found"] = found
        return Verdict(float(found == want.count), spec.category, details)
    if len(spec.objects) == 1:
        ok = any(spec_matches(o, spec.objects[0]) for o in objs)
        return Verdict(float(ok), spec.category, details)
    a_spec, b_spec = spec.objects
    ok = any(spec_matches(a, a_spec) and spec_matches(b, b_spec)
             and (spec.relation is None or relation_holds(a, b, spec.relation))
             for i, a in enumerate(objs) for j, b in enumerate(objs) if i != j)
    return Verdict(float(ok), spec.category, details)


def object_recall(image_or_scene: Image.Image | Scene, prompt: str | PromptSpec) -> float:
    """Partial credit for a prompt: the fraction of its objects (shape, and colour where it names one) that some
    object in the picture matches; counts and relations are ignored. 1.0 whenever `score_prompt` is 1 except for
    counting; it moves before the all-or-nothing score does, so it shows progress of weak models."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    objs = _as_scene(image_or_scene).objects
    return sum(any(spec_matches(o, want) for o in objs) for want in spec.objects) / len(spec.objects)


def score_edit(source: Image.Image | Scene, instruction: str | EditSpec, edited: Image.Image | Scene, *,
               tol: float = 0.05) -> EditVerdict:
    """Whether `edited` is `source` with the instruction applied and every other object left as it was.

    Satisfied: changed or added objects have the expected shape, colour, size and cell, a removed object is gone
    and no object is added beyond the expected count. Preserved: every untouched object keeps all four and its
    centre within `tol`. Raises `InputError` when the
    instruction does not apply to the source (no or several objects match its reference, cell occupied).
    """
    spec = parse_edit(instruction) if isinstance(instruction, str) else instruction
    src, out = _as_scene(source), _as_scene(edited)
    expected, changed = apply_edit(src, spec)
    untouched = [o for i, o in enumerate(expected.objects) if i not in changed]
    rest = list(out.objects)
    preserved = True
    for o in untouched:
        hit = next((p for p in rest if p.key() == o.key() and _close(o, p, tol)), None)
        preserved &= hit is not None
        if hit is not None:
            rest.remove(hit)
    satisfied = True
    for i in changed:
        want = expected.objects[i]
        # An added object need only have the attributes the instruction names ("add a circle" = any colour/size).
        ref = Ref(spec.shape, spec.colour, spec.size, spec.cell) if spec.kind == "add" else None
        hit = next((p for p in rest if (spec_matches(p, ref) if ref else p.key() == want.key())), None)
        satisfied &= hit is not None
        if hit is not None:
            rest.remove(hit)
    # Unmatched leftovers beyond the expected count are unwanted additions (or a removal that did not happen);
    # a leftover that replaces a missing untouched object is a preservation failure, counted above.
    satisfied &= len(out.objects) <= len(expected.objects)
    if spec.kind == "remove":
        gone = resolve_ref(spec.target, src)
        satisfied &= not any(p.key() == gone.key() and _close(gone, p, tol) for p in out.objects)
    details = {"edit": spec.to_dict(), "source": src.to_dict(), "edited": out.to_dict(),
               "expected": expected.to_dict(), "unexpected": [o.to_dict() for o in rest]}
    return EditVerdict(float(satisfied and preserved), spec.kind, satisfied, preserved, details)


def check_image(image: Image.Image, prompt: str) -> dict[str, Any]:
    """The JSON verdict `vargpt check` prints for one image (without the ``image`` key)."""
    verdict = score_prompt(image, prompt)
    return {"score": verdict.score, "category": verdict.category, "prompt": prompt,
            "scene": verdict.details["scene"]}
