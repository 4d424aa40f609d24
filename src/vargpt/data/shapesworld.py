"""ShapesWorld: text, tasks, splits and the on-disk dataset built from `vargpt.data.scene` scenes.

From a scene it derives captions, understanding questions with answers, GenEval-style generation prompts
(`CATEGORIES`), edit instructions with the edited scene, and DPO preference pairs (a faithful scene for a
prompt vs. a structured corruption). Prompts and edits have a structured form (`PromptSpec`, `EditSpec`), a
text form made by templates over a small closed vocabulary, and parsers back (`parse_prompt`, `parse_edit`)
that accept every text the templates make, so the checker can score free text typed on the command line.

Records are chat-style JSONL, one source among others for training:

    {"id": "train-000012", "task": "caption" | "vqa" | "t2i" | "edit" | "dpo",
     "messages": [{"role": "user", "content": "<image>\\nWhat colour is the square?"},
                  {"role": "assistant", "content": "red"}],
     "images": ["images/000012.png"], "scene": {...}, "meta": {"category": ..., "heldout": false, ...}}

``<image>`` marks an input image, ``<image_gen>`` a generated one. t2i: images = [target]. edit: user
"<image>\\n<instruction>", images = [source, target], ``scene`` = source, ``meta.target_scene``. dpo: messages =
the prompt turn only, plus ``chosen`` and ``rejected`` assistant messages ("<image_gen>"), images = [chosen,
rejected], ``scene`` = the chosen scene, ``meta.rejected_scene`` and ``meta.corruption``. Paths are relative to
records.jsonl.

Splits: record i of split s under seed k draws everything from ``Random(sha256("k/s/i"))``, so splits share no
scene and a seed gives byte-identical files. The colour-shape pairs in `HELDOUT_PAIRS` and the prompt
compositions in `HELDOUT_COMPOSITIONS` never occur in train (not in any scene, prompt, edit or DPO image);
val and test draw from everything and flag records that use a held-out item (``meta.heldout``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from vargpt.data.scene import (
    BACKGROUNDS,
    CELL_NAMES,
    COLOURS,
    IMAGE_SIZES,
    MAX_OBJECTS,
    PLURALS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    clamp_to_cell,
    place,
    random_object,
    render,
    sample_scene,
)
from vargpt.errors import InputError

TASKS: tuple[str, ...] = ("caption", "vqa", "t2i", "edit", "dpo")
SPLITS: tuple[str, ...] = ("train", "val", "test")
CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
QTYPES: tuple[str, ...] = ("exist", "count", "colour", "shape", "where", "relative")
EDIT_KINDS: tuple[str, ...] = ("recolour", "move", "add", "remove", "resize", "swap")
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four")

HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("triangle", "red"), ("circle", "yellow"), ("square", "purple"), ("diamond", "green"), ("cross", "blue")})
HELDOUT_COMPOSITIONS: frozenset[str] = frozenset({"pair:circle+triangle", "pair:cross+square", "count:diamond*3"})


# ----------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ObjSpec:
    """What a prompt asks for: `count` objects of `shape`, optionally of a given colour and size."""

    shape: str
    colour: str | None = None
    size: str | None = None
    count: int = 1


@dataclass(frozen=True)
class PromptSpec:
    category: str
    objects: tuple[ObjSpec, ...]
    relation: str | None = None  # position: objects[0] <relation> objects[1]

    def to_dict(self) -> dict[str, Any]:
        return {"category": self.category, "relation": self.relation,
                "objects": [o.__dict__.copy() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PromptSpec:
        return cls(d["category"], tuple(ObjSpec(**o) for o in d["objects"]), d.get("relation"))


@dataclass(frozen=True)
class Ref:
    """A reference to one object of a scene ("the large red circle at the top left"); None = not said."""

    shape: str
    colour: str | None = None
    size: str | None = None
    cell: int | None = None


@dataclass(frozen=True)
class EditSpec:
    kind: str
    target: Ref | None = None  # all kinds but add
    other: Ref | None = None  # swap
    colour: str | None = None  # recolour, add
    size: str | None = None  # resize, add
    shape: str | None = None  # add
    cell: int | None = None  # move, add

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind}
        for k in ("target", "other"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k).__dict__.copy()
        d.update({k: getattr(self, k) for k in ("colour", "size", "shape", "cell") if getattr(self, k) is not None})
        return d


def spec_matches(obj: Obj, spec: ObjSpec | Ref) -> bool:
    return (obj.shape == spec.shape and spec.colour in (None, obj.colour) and spec.size in (None, obj.size)
            and getattr(spec, "cell", None) in (None, obj.cell))


def cells_related(a: int, b: int, relation: str) -> bool:
    """Whether grid cell `a` is `relation` ("left of", "right of", "above", "below") cell `b`."""
    (ar, ac), (br, bc) = divmod(a, 3), divmod(b, 3)
    return {"left of": ac < bc, "right of": ac > bc, "above": ar < br, "below": ar > br}[relation]


def relation_holds(a: Obj, b: Obj, relation: str) -> bool:
    return cells_related(a.cell, b.cell, relation)


def composition(spec: PromptSpec) -> str:
    """The composition key of a prompt, as used by `HELDOUT_COMPOSITIONS`."""
    if len(spec.objects) == 2:
        return "pair:" + "+".join(sorted(o.shape for o in spec.objects))
    o = spec.objects[0]
    return f"count:{o.shape}*{o.count}" if spec.category == "counting" else f"one:{o.shape}"


def uses_heldout(scenes: Sequence[Scene], spec: PromptSpec | None = None) -> bool:
    pairs = any((o.shape, o.colour) in HELDOUT_PAIRS for s in scenes for o in s.objects)
    comp = spec is not None and (composition(spec) in HELDOUT_COMPOSITIONS
                                 or any((o.shape, o.colour) in HELDOUT_PAIRS for o in spec.objects))
    return pairs or comp


# ----------------------------------------------------------------------------------------------- words


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def describe(obj: Obj, *, size: bool = True, colour: bool = True) -> str:
    words = ([obj.size] if size else []) + ([obj.colour] if colour else []) + [obj.shape]
    return " ".join(words)


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def ref_text(ref: Ref) -> str:
    words = [w for w in (ref.size, ref.colour, ref.shape) if w]
    return "the " + " ".join(words) + ("" if ref.cell is None else f" at the {CELL_NAMES[ref.cell]}")


def unique_ref(obj: Obj, scene: Scene, *, with_colour: bool = True) -> Ref:
    """The shortest description that picks out `obj` alone in `scene` (the cell always does)."""
    candidates = [Ref(obj.shape), Ref(obj.shape, size=obj.size)]
    if with_colour:
        candidates[1:1] = [Ref(obj.shape, colour=obj.colour)]
        candidates.append(Ref(obj.shape, obj.colour, obj.size))
    candidates.append(Ref(obj.shape, cell=obj.cell))
    for ref in candidates:
        if sum(spec_matches(o, ref) for o in scene.objects) == 1:
            return ref
    raise ValueError("two objects share a cell")  # cannot happen for sampled scenes


def resolve_ref(ref: Ref, scene: Scene) -> Obj:
    hits = [o for o in scene.objects if spec_matches(o, ref)]
    if len(hits) != 1:
        raise InputError(f"{ref_text(ref)!r} matches {len(hits)} objects in the image, not exactly one; "
                         "name the object more precisely (colour, size or 'at the <cell>')")
    return hits[0]


# ----------------------------------------------------------------------------------------------- prompts


PROMPT_PREFIXES: tuple[str, ...] = ("", "a photo of ", "a picture of ", "an image of ", "draw ", "generate ", "show ")
RELATION_TEXT = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}


def _np_text(o: ObjSpec) -> str:
    words = " ".join(w for w in (o.size, o.colour) if w)
    noun = o.shape if o.count == 1 else PLURALS[o.shape]
    head = f"{words} {noun}" if words else noun
    return _a(head) if o.count == 1 else f"{NUMBERS[o.count]} {head}"


def prompt_text(spec: PromptSpec, rng: random.Random | None = None) -> str:
    """The prompt in words, with a random prefix template when `rng` is given."""
    body = _np_text(spec.objects[0])
    if spec.relation is not None:
        body += f" {RELATION_TEXT[spec.relation]} {_np_text(spec.objects[1])}"
    elif len(spec.objects) == 2:
        body += f" and {_np_text(spec.objects[1])}"
    prefix = rng.choice(PROMPT_PREFIXES) if rng else ""
    text = prefix + body
    return text[0].upper() + text[1:] + "."


def _alt(words: Sequence[str]) -> str:
    return "(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


_SHAPE = _alt(list(SHAPES) + list(PLURALS.values()))
_COLOUR = _alt(COLOURS)
_SIZE = _alt(SIZES)
_CELL = _alt(CELL_NAMES)
_SINGULAR = {p: s for s, p in PLURALS.items()}


def _np_re(p: str) -> str:
    return (rf"(?P<{p}det>a|an|one|two|three|four|[1-4]) (?:(?P<{p}size>{_SIZE}) )?"
            rf"(?:(?P<{p}colour>{_COLOUR}) )?(?P<{p}shape>{_SHAPE})")


_PROMPT_RE = re.compile(rf"(?:(?:{_alt([p.strip() for p in PROMPT_PREFIXES if p])}) )?{_np_re('a')}"
                        rf"(?: (?P<link>and|{_alt(RELATION_TEXT.values())}) {_np_re('b')})?")


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[.!?,;:]+", " ", text.lower()).split())


def _objspec(m: re.Match, p: str) -> ObjSpec:
    det = m[f"{p}det"]
    count = int(det) if det.isdigit() else (1 if det in ("a", "an") else NUMBERS.index(det))
    shape = _SINGULAR.get(m[f"{p}shape"], m[f"{p}shape"])
    return ObjSpec(shape, m[f"{p}colour"], m[f"{p}size"], count)


def parse_prompt(text: str) -> PromptSpec:
    """The structured form of a generation prompt (any text `prompt_text` makes, digits allowed for counts)."""
    norm = _normalise(text)
    if not norm:
        raise InputError("the prompt is empty; give one like 'a red circle' or 'two squares'")
    m = _PROMPT_RE.fullmatch(norm)
    if m is None:
        found = [w for w in norm.split() if w in SHAPES or w in PLURALS.values() or w in COLOURS]
        raise InputError(f"cannot parse prompt {text!r} (understood only: {', '.join(found) or 'nothing'}); "
                         "use forms like 'a red circle', 'two squares', 'a circle and a square', "
                         "'a circle to the left of a square', 'a red circle and a blue square'")
    a = _objspec(m, "a")
    if m["link"] is None:
        if a.count > 1:
            return PromptSpec("counting", (a,))
        return PromptSpec("colors" if a.colour else "single_object", (a,))
    b = _objspec(m, "b")
    if m["link"] == "and":
        return PromptSpec("color_attr" if a.colour and b.colour else "two_object", (a, b))
    relation = {v: k for k, v in RELATION_TEXT.items()}[m["link"]]
    return PromptSpec("position", (a, b), relation)


def sample_prompt(rng: random.Random, category: str, *, train: bool, position_colours: float = 0.0) -> PromptSpec:
    """A random prompt of `category`; with `train`, never a held-out pair or composition.

    `position_colours`: the share of position prompts that name both objects' colours ("a red circle to the left
    of a blue square"); at 0 (the evaluation splits) they name none and no random number is drawn for it.
    """
    while True:
        s1, s2 = rng.sample(SHAPES, 2)
        c1, c2 = rng.sample(tuple(COLOURS), 2)
        if category == "single_object":
            spec = PromptSpec(category, (ObjSpec(s1),))
        elif category == "colors":
            spec = PromptSpec(category, (ObjSpec(s1, c1),))
        elif category == "counting":
            spec = PromptSpec(category, (ObjSpec(s1, count=rng.randint(2, MAX_OBJECTS)),))
        elif category == "two_object":
            spec = PromptSpec(category, (ObjSpec(s1), ObjSpec(s2)))
        elif category == "position":
            relation = rng.choice(RELATIONS)
            coloured = position_colours > 0 and rng.random() < position_colours
            spec = PromptSpec(category, (ObjSpec(s1, c1 if coloured else None), ObjSpec(s2, c2 if coloured else None)),
                              relation)
        elif category == "color_attr":
            spec = PromptSpec(category, (ObjSpec(s1, c1), ObjSpec(s2, c2)))
        else:
            raise InputError(f"unknown prompt category {category!r}; choose one of {', '.join(CATEGORIES)}")
        if not (train and uses_heldout([], spec)):
            return spec


def _allowed(train: bool) -> Callable[[str, str], bool]:
    return (lambda s, c: (s, c) not in HELDOUT_PAIRS) if train else (lambda s, c: True)


def scene_for_prompt(spec: PromptSpec, rng: random.Random, *, train: bool = False) -> Scene:
    """A scene that satisfies `spec` exactly and holds nothing else."""
    allowed = _allowed(train)
    if spec.relation is not None:
        cells = list(rng.choice([(a, b) for a in range(9) for b in range(9) if cells_related(a, b, spec.relation)]))
    else:
        cells = rng.sample(range(9), sum(o.count for o in spec.objects))
    objs = []
    for o in spec.objects:
        for _ in range(o.count):
            objs.append(random_object(rng, cells.pop(0), allowed=allowed, shape=o.shape, colour=o.colour, size=o.size))
    return Scene(tuple(objs), rng.choice(tuple(BACKGROUNDS)))


# Canonical layout: where `canonical_scene` puts the objects of a prompt, by category / relation / count.
CANONICAL_CELLS: dict[str, tuple[int, ...]] = {
    "one": (4,), "pair": (3, 5), "left of": (3, 5), "right of": (5, 3), "above": (1, 7), "below": (7, 1),
    "count2": (3, 5), "count3": (3, 4, 5), "count4": (0, 2, 6, 8),
}
CANONICAL_COLOUR = "orange"  # for prompts that name no colour: in no held-out pair, so every shape trains with it
LAYOUTS: tuple[str, ...] = ("random", "canonical")


def canonical_scene(spec: PromptSpec) -> Scene:
    """The one picture the embedded default learns to draw for `spec`: large objects at fixed cell centres
    (`CANONICAL_CELLS`), `CANONICAL_COLOUR` where the prompt names no colour, white background.

    A deterministic target per prompt: the tiny model spends its few CPU steps on binding words to cells,
    shapes and colours instead of on modelling layout variety (the trade-off is reported as "variety").
    """
    if spec.relation is not None:
        key = spec.relation
    elif len(spec.objects) == 2:
        key = "pair"
    else:
        key = "one" if spec.objects[0].count == 1 else f"count{spec.objects[0].count}"
    cells = list(CANONICAL_CELLS[key])
    objs = []
    for o in spec.objects:
        for _ in range(o.count):
            cell = cells.pop(0)
            objs.append(Obj(o.shape, o.colour or CANONICAL_COLOUR, o.size or "large",
                            round((cell % 3 + 0.5) / 3, 4), round((cell // 3 + 0.5) / 3, 4)))
    return Scene(tuple(objs), "white")


def corrupt(spec: PromptSpec, scene: Scene, rng: random.Random, *, train: bool = False) -> tuple[Scene, str]:
    """A structured corruption of a faithful `scene` that fails `spec`.

    Returns (scene, kind), kind one of "object" (wrong shape), "colour", "count", "position".
    """
    allowed = _allowed(train)
    objs = list(scene.objects)
    if spec.category == "single_object":
        shapes = [s for s in SHAPES if s != spec.objects[0].shape and allowed(s, objs[0].colour)]
        objs[0] = objs[0].replace(shape=rng.choice(shapes))
        kind = "object"
    elif spec.category == "colors":
        colours = [c for c in COLOURS if c != objs[0].colour and allowed(objs[0].shape, c)]
        objs[0] = objs[0].replace(colour=rng.choice(colours))
        kind = "colour"
    elif spec.category == "counting":
        n = spec.objects[0].count
        if n == MAX_OBJECTS or (n > 2 and rng.random() < 0.5):
            objs.pop(rng.randrange(len(objs)))
        else:
            free = [c for c in range(9) if c not in {o.cell for o in objs}]
            objs.append(random_object(rng, rng.choice(free), allowed=allowed, shape=spec.objects[0].shape))
        kind = "count"
    elif spec.category == "two_object":
        objs.pop(rng.randrange(2))
        kind = "count"
    elif spec.category == "position":
        a, b = objs
        ax, ay = place(rng, a.size, b.cell)
        bx, by = place(rng, b.size, a.cell)
        objs = [a.replace(cx=ax, cy=ay), b.replace(cx=bx, cy=by)]
        kind = "position"
    elif spec.category == "color_attr":
        a, b = objs
        objs = [a.replace(colour=b.colour), b.replace(colour=a.colour)]
        kind = "colour"
    else:
        raise InputError(f"unknown prompt category {spec.category!r}")
    return Scene(tuple(objs), scene.background), kind


# ----------------------------------------------------------------------------------------------- edits


EDIT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolour": ("Make {target} {colour}.", "Change the colour of {target} to {colour}.", "Paint {target} {colour}."),
    "move": ("Move {target} to the {cell}.", "Put {target} at the {cell}."),
    "add": ("Add {new} at the {cell}.", "Draw {new} at the {cell}."),
    "remove": ("Remove {target}.", "Delete {target}.", "Erase {target}."),
    "resize": ("Make {target} {size}.", "Make {target} {comparative}."),
    "swap": ("Swap {target} and {other}.", "Swap the positions of {target} and {other}."),
}


def edit_text(spec: EditSpec, rng: random.Random | None = None) -> str:
    templates = EDIT_TEMPLATES[spec.kind]
    template = rng.choice(templates) if rng else templates[0]
    new = _a(" ".join(w for w in (spec.size, spec.colour, spec.shape) if w)) if spec.kind == "add" else ""
    return template.format(
        target=ref_text(spec.target) if spec.target else "", other=ref_text(spec.other) if spec.other else "",
        colour=spec.colour, size=spec.size, comparative={"large": "bigger", "small": "smaller"}.get(spec.size or ""),
        cell=CELL_NAMES[spec.cell] if spec.cell is not None else "", new=new)


def _ref_re(p: str) -> str:
    return (rf"the (?:(?P<{p}size>{_SIZE}) )?(?:(?P<{p}colour>{_COLOUR}) )?(?P<{p}shape>{_SHAPE})"
            rf"(?: at the (?P<{p}cell>{_CELL}))?")


_T, _O = _ref_re("t"), _ref_re("o")
_EDIT_RES: tuple[tuple[str, re.Pattern], ...] = tuple((k, re.compile(r)) for k, r in (
    ("recolour", rf"(?:make|paint|colour|color) {_T} (?P<colour>{_COLOUR})"),
    ("recolour", rf"change the colou?r of {_T} to (?P<colour>{_COLOUR})"),
    ("resize", rf"make {_T} (?P<size>{_SIZE}|bigger|larger|smaller)"),
    ("move", rf"(?:move|put) {_T} (?:to|at) the (?P<cell>{_CELL})"),
    ("add", rf"(?:add|draw|put) an? (?:(?P<size>{_SIZE}) )?(?:(?P<colour>{_COLOUR}) )?(?P<shape>{_SHAPE}) "
            rf"(?:at|to|in) the (?P<cell>{_CELL})"),
    ("remove", rf"(?:remove|delete|erase) {_T}"),
    ("swap", rf"swap (?:the positions of )?{_T} and {_O}"),
))


def _ref(m: re.Match, p: str) -> Ref:
    cell = m[f"{p}cell"]
    return Ref(m[f"{p}shape"], m[f"{p}colour"], m[f"{p}size"], None if cell is None else CELL_NAMES.index(cell))


def parse_edit(text: str) -> EditSpec:
    """The structured form of an edit instruction (any text `edit_text` makes)."""
    norm = _normalise(text)
    if not norm:
        raise InputError("the edit instruction is empty; give one like 'make the circle blue'")
    for kind, pattern in _EDIT_RES:
        m = pattern.fullmatch(norm)
        if m is None:
            continue
        groups = m.groupdict()
        size = {"bigger": "large", "larger": "large", "smaller": "small"}.get(groups.get("size") or "",
                                                                              groups.get("size"))
        cell = groups.get("cell")
        return EditSpec(kind, target=_ref(m, "t") if "tshape" in groups else None,
                        other=_ref(m, "o") if "oshape" in groups else None, colour=groups.get("colour"), size=size,
                        shape=groups.get("shape"), cell=None if cell is None else CELL_NAMES.index(cell))
    raise InputError(f"cannot parse edit instruction {text!r}; use forms like 'make the circle blue', 'move the "
                     "red square to the top left', 'add a small green cross at the center', 'remove the triangle', "
                     "'make the circle large', 'swap the circle and the square'")


def apply_edit(scene: Scene, spec: EditSpec, rng: random.Random | None = None) -> tuple[Scene, list[int]]:
    """The edited scene and the indices (in its objects) of the objects the edit made or changed.

    Moved and added objects get a jittered centre from `rng` (the cell centre without one).
    """
    def at(size: str, cell: int) -> tuple[float, float]:
        return place(rng, size, cell) if rng else (round((cell % 3 + .5) / 3, 4), round((cell // 3 + .5) / 3, 4))

    objs = list(scene.objects)
    taken = {o.cell for o in objs}
    if spec.kind == "add":
        if spec.cell in taken:
            raise InputError(f"the {CELL_NAMES[spec.cell]} cell is already occupied; add the object elsewhere")
        cx, cy = at(spec.size or "small", spec.cell)
        objs.append(Obj(spec.shape, spec.colour or "red", spec.size or "small", cx, cy))
        return Scene(tuple(objs), scene.background), [len(objs) - 1]
    i = objs.index(resolve_ref(spec.target, scene))
    if spec.kind == "remove":
        objs.pop(i)
        return Scene(tuple(objs), scene.background), []
    if spec.kind == "recolour":
        objs[i] = objs[i].replace(colour=spec.colour)
    elif spec.kind == "resize":
        objs[i] = clamp_to_cell(objs[i].replace(size=spec.size))
    elif spec.kind == "move":
        if spec.cell in taken - {objs[i].cell}:
            raise InputError(f"the {CELL_NAMES[spec.cell]} cell is already occupied; move the object elsewhere")
        cx, cy = at(objs[i].size, spec.cell)
        objs[i] = objs[i].replace(cx=cx, cy=cy)
    elif spec.kind == "swap":
        j = objs.index(resolve_ref(spec.other, scene))
        a, b = objs[i], objs[j]
        objs[i] = a.replace(**dict(zip(("cx", "cy"), at(a.size, b.cell), strict=True)))
        objs[j] = b.replace(**dict(zip(("cx", "cy"), at(b.size, a.cell), strict=True)))
        return Scene(tuple(objs), scene.background), [i, j]
    return Scene(tuple(objs), scene.background), [i]


def edit_fits(kind: str, scene: Scene) -> bool:
    """Whether an edit of `kind` can apply to `scene` (add and move need a free cell; remove and swap two objects)."""
    n, free = len(scene.objects), 9 - len({o.cell for o in scene.objects})
    return {"add": free > 0 and n < MAX_OBJECTS, "move": free > 0, "remove": n > 1, "swap": n > 1}.get(kind, True)


def sample_edit(scene: Scene, rng: random.Random, *, train: bool,
                kinds: Sequence[str] = EDIT_KINDS) -> tuple[EditSpec, Scene]:
    """A random feasible edit of `scene`, of one of `kinds` (uniformly), and the edited scene (train: no held-out
    pair appears). Raises `InputError` when no kind fits the scene (`edit_fits`)."""
    if not any(edit_fits(k, scene) for k in kinds):
        raise InputError(f"no edit of kind(s) {', '.join(kinds)} fits a scene of {len(scene.objects)} object(s)")
    allowed = _allowed(train)
    free = [c for c in range(9) if c not in {o.cell for o in scene.objects}]
    while True:
        kind = rng.choice(tuple(kinds))
        if not edit_fits(kind, scene):
            continue
        if kind == "add":
            new = random_object(rng, rng.choice(free), allowed=allowed)
            spec = EditSpec("add", colour=new.colour, size=new.size, shape=new.shape, cell=new.cell)
        else:
            a, b = rng.sample(scene.objects, 2) if kind == "swap" else (rng.choice(scene.objects), None)
            target = unique_ref(a, scene)
            other = unique_ref(b, scene) if b else None
            if kind == "recolour":
                colours = [c for c in COLOURS if c != a.colour and allowed(a.shape, c)]
                spec = EditSpec(kind, target, colour=rng.choice(colours))
            elif kind == "resize":
                spec = EditSpec(kind, target, size="large" if a.size == "small" else "small")
            elif kind == "move":
                spec = EditSpec(kind, target, cell=rng.choice(free))
            else:
                spec = EditSpec(kind, target, other)
        edited, _ = apply_edit(scene, spec, rng)
        return spec, edited


# ----------------------------------------------------------------------------------------------- captions, VQA


def caption(scene: Scene, rng: random.Random) -> str:
    objs = sorted(scene.objects, key=lambda o: o.cell)  # reading order
    plain = _join([_a(describe(o)) for o in objs])
    placed = _join([f"{_a(describe(o))} at the {CELL_NAMES[o.cell]}" for o in objs])
    n = len(objs)
    templates = (
        f"{plain}.",
        f"{plain} on a {scene.background} background.",
        f"there {'is' if n == 1 else 'are'} {NUMBERS[n]} {'shape' if n == 1 else 'shapes'}: {plain}.",
        f"{placed}.",
        f"a {scene.background} background with {placed}.",
    )
    text = rng.choice(templates)
    return text[0].upper() + text[1:]


def question(scene: Scene, rng: random.Random, *, train: bool,
             qtypes: Sequence[str] = QTYPES) -> tuple[str, str, str]:
    """(question type, question, answer) about `scene`, of one of `qtypes` ("relative" needs two objects)."""
    allowed = _allowed(train)
    objs = scene.objects
    types = tuple(t for t in QTYPES if t in qtypes and (t != "relative" or len(objs) > 1))
    if not types:
        raise InputError(f"no question of type(s) {', '.join(qtypes)} fits a scene of {len(objs)} object(s)")
    qtype = rng.choice(types)
    o = rng.choice(objs)
    if qtype == "exist":
        present = {(x.shape, x.colour) for x in objs}
        if rng.random() < 0.5:
            s, c = o.shape, o.colour
        else:
            s, c = rng.choice([(s, c) for s in SHAPES for c in COLOURS if (s, c) not in present and allowed(s, c)])
        return qtype, f"Is there {_a(c + ' ' + s)}?", "yes" if (s, c) in present else "no"
    if qtype == "count":
        if rng.random() < 0.5:
            s = rng.choice(SHAPES)
            return qtype, f"How many {PLURALS[s]} are there?", NUMBERS[sum(x.shape == s for x in objs)]
        return qtype, "How many shapes are there?", NUMBERS[len(objs)]
    if qtype == "colour":
        return qtype, f"What colour is {ref_text(unique_ref(o, scene, with_colour=False))}?", o.colour
    if qtype == "shape":
        if sum(x.colour == o.colour for x in objs) == 1:
            return qtype, f"What shape is the {o.colour} object?", o.shape
        return qtype, f"What shape is at the {CELL_NAMES[o.cell]}?", o.shape
    if qtype == "where":
        return qtype, f"Where is {ref_text(unique_ref(o, scene))}?", CELL_NAMES[o.cell]
    a, b = rng.sample(objs, 2)
    relation = rng.choice(RELATIONS)
    text = f"Is {ref_text(unique_ref(a, scene))} {RELATION_TEXT[relation]} {ref_text(unique_ref(b, scene))}?"
    return qtype, text, "yes" if relation_holds(a, b, relation) else "no"


# ----------------------------------------------------------------------------------------------- records


def record_rng(seed: int, split: str, index: int) -> random.Random:
    digest = hashlib.sha256(f"shapesworld/{seed}/{split}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def make_record(index: int, *, split: str, seed: int = 0, size: int = 64, tasks: Sequence[str] = TASKS,
                t2i_layout: str = "random", vqa_turns: int = 1, position_colours: float = 0.0,
                categories: Sequence[str] = CATEGORIES, qtypes: Sequence[str] = QTYPES,
                vqa_objects: int | None = None,
                edit_kinds: Sequence[str] = EDIT_KINDS) -> tuple[dict[str, Any], dict[str, Image.Image]]:
    """Record `index` of a split and its images ({relative path: image}); pure function of its arguments.

    ``t2i_layout="canonical"``: text-to-image targets are `canonical_scene` (the prompt is drawn the same way).
    ``position_colours=p``: text-to-image and preference prompts of the position category name both colours with
    probability p (`sample_prompt`).
    ``categories``: the prompt categories text-to-image and preference records draw from (default: all, uniformly;
    e.g. ``("position",)`` for a set of position prompts only).
    ``vqa_turns=k``: a question record is a conversation of k distinct questions about its picture (the first turn
    is the single-turn record's; meta ``qtype`` is the first one's, ``qtypes`` all of them). One picture then trains
    k answers for the price of one image encoding.
    ``qtypes``: the question types a question record asks (default: all six); ``vqa_objects=n``: question and
    caption pictures hold exactly n objects (default: 1-4 at random). E.g. ``qtypes=("relative",), vqa_objects=2``
    for "Is A left of B?" about two objects only.
    ``edit_kinds``: the kinds edit records draw from (default: all six, uniformly where they fit the scene; a scene
    that fits none of them, e.g. one object for ``("swap",)``, is drawn again).
    """
    if vqa_turns < 1:
        raise InputError(f"vqa_turns must be at least 1 (got {vqa_turns})")
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if t2i_layout not in LAYOUTS:
        raise InputError(f"unknown t2i layout {t2i_layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not 0.0 <= position_colours <= 1.0:
        raise InputError(f"position_colours is a probability in [0, 1] (got {position_colours})")
    _check_categories(categories)
    _check_questions(qtypes, vqa_objects)
    _check_names(edit_kinds, EDIT_KINDS, "edit_kinds", "edit kind(s)")
    rng = record_rng(seed, split, index)
    train = split == "train"
    task = tasks[index % len(tasks)]
    stem = f"images/{index:06d}"
    rid = f"{split}-{index:06d}"
    if task in ("caption", "vqa"):
        scene = sample_scene(rng, n_objects=vqa_objects, allowed=_allowed(train))
        if task == "caption":
            messages, meta = [{"role": "user", "content": "<image>\nDescribe the image."},
                              {"role": "assistant", "content": caption(scene, rng)}], {}
        else:
            qtype, q, a = question(scene, rng, train=train, qtypes=qtypes)
            messages, meta = [{"role": "user", "content": f"<image>\n{q}"}, {"role": "assistant", "content": a}], \
                {"qtype": qtype}
            if vqa_turns > 1:
                asked, asked_types = {q}, [qtype]
                for _ in range(50 * vqa_turns):  # small scenes have few distinct questions: stop trying, not hang
                    if len(asked) == vqa_turns:
                        break
                    qtype, q, a = question(scene, rng, train=train, qtypes=qtypes)
                    if q not in asked:
                        asked.add(q)
                        asked_types.append(qtype)
                        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                meta["qtypes"] = asked_types
        images = {f"{stem}.png": render(scene, size)}
        meta["heldout"] = uses_heldout([scene])
        return _record(rid, task, messages, list(images), scene, meta), images
    if task == "edit":
        scene = sample_scene(rng, allowed=_allowed(train))
        while not any(edit_fits(k, scene) for k in edit_kinds):
            scene = sample_scene(rng, allowed=_allowed(train))
        spec, edited = sample_edit(scene, rng, train=train, kinds=edit_kinds)
        messages = [{"role": "user", "content": f"<image>\n{edit_text(spec, rng)}"},
                    {"role": "assistant", "content": "<image_gen>"}]
        images = {f"{stem}_src.png": render(scene, size), f"{stem}_tgt.png": render(edited, size)}
        meta = {"category": spec.kind, "edit": spec.to_dict(), "target_scene": edited.to_dict(),
                "heldout": uses_heldout([scene, edited])}
        return _record(rid, task, messages, list(images), scene, meta), images
    if task not in ("t2i", "dpo"):
        raise InputError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    spec = sample_prompt(rng, rng.choice(tuple(categories)), train=train, position_colours=position_colours)
    scene = scene_for_prompt(spec, rng, train=train)
    messages = [{"role": "user", "content": prompt_text(spec, rng)}]
    meta = {"category": spec.category, "spec": spec.to_dict(), "heldout": uses_heldout([scene], spec)}
    if task == "t2i":
        if t2i_layout == "canonical":
            scene = canonical_scene(spec)
            meta["layout"] = "canonical"
        messages.append({"role": "assistant", "content": "<image_gen>"})
        images = {f"{stem}.png": render(scene, size)}
        return _record(rid, task, messages, list(images), scene, meta), images
    rejected, kind = corrupt(spec, scene, rng, train=train)
    images = {f"{stem}_chosen.png": render(scene, size), f"{stem}_rejected.png": render(rejected, size)}
    meta.update(corruption=kind, rejected_scene=rejected.to_dict())
    rec = _record(rid, task, messages, list(images), scene, meta)
    rec["chosen"] = {"role": "assistant", "content": "<image_gen>"}
    rec["rejected"] = {"role": "assistant", "content": "<image_gen>"}
    return rec, images


def _check_names(values: Sequence[str], known: Sequence[str], arg: str, what: str) -> None:
    """`values` is a non-empty sequence (not a bare string) of names from `known`."""
    if isinstance(values, str):
        raise InputError(f"{arg} is a sequence of names, e.g. ({values!r},), not the string {values!r}")
    bad = [v for v in values if v not in known]
    if bad or not values:
        raise InputError(f"unknown {what} {', '.join(bad) or '(none given)'}; choose from {', '.join(known)}")


def _check_categories(categories: Sequence[str]) -> None:
    _check_names(categories, CATEGORIES, "categories", "prompt categor(ies)")


def _check_questions(qtypes: Sequence[str], vqa_objects: int | None) -> None:
    _check_names(qtypes, QTYPES, "qtypes", "question type(s)")
    if vqa_objects is not None and not 1 <= vqa_objects <= MAX_OBJECTS:
        raise InputError(f"vqa_objects is 1-{MAX_OBJECTS} objects per picture (got {vqa_objects})")
    if set(qtypes) == {"relative"} and (vqa_objects or 1) < 2:
        raise InputError("relative questions alone need pictures of two or more objects: give vqa_objects "
                         f"(--vqa-objects) 2-{MAX_OBJECTS}")


def _record(rid: str, task: str, messages: list[dict[str, str]], images: list[str], scene: Scene,
            meta: dict[str, Any]) -> dict[str, Any]:
    return {"id": rid, "task": task, "messages": messages, "images": images, "scene": scene.to_dict(), "meta": meta}


def write_dataset(out: str | Path, *, n: int, split: str = "train", size: int = 64, seed: int = 0,
                  tasks: Sequence[str] = TASKS, t2i_layout: str = "random", vqa_turns: int = 1,
                  position_colours: float = 0.0, categories: Sequence[str] = CATEGORIES,
                  qtypes: Sequence[str] = QTYPES, vqa_objects: int | None = None,
                  edit_kinds: Sequence[str] = EDIT_KINDS, progress: bool = True) -> dict[str, Any]:
    """Write `n` records to ``out/records.jsonl`` and their PNGs under ``out/images``; returns a summary."""
    from tqdm import tqdm

    if size not in IMAGE_SIZES:
        raise InputError(f"image size {size} is not supported; choose one of {', '.join(map(str, IMAGE_SIZES))}")
    if n < 1:
        raise InputError(f"--n must be at least 1 (got {n})")
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise InputError(f"unknown task(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(TASKS)}")
    _check_categories(categories)
    _check_questions(qtypes, vqa_objects)
    _check_names(edit_kinds, EDIT_KINDS, "edit_kinds", "edit kind(s)")
    out = Path(out)
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create output directory {out}: {e.strerror}") from None
    tmp = out / "records.jsonl.tmp"
    counts: Counter[str] = Counter()
    heldout = 0
    with tmp.open("w") as f:
        for i in tqdm(range(n), desc=f"shapesworld {split}", unit="rec", disable=not progress):
            rec, images = make_record(i, split=split, seed=seed, size=size, tasks=tasks, t2i_layout=t2i_layout,
                                      vqa_turns=vqa_turns, position_colours=position_colours, categories=categories,
                                      qtypes=qtypes, vqa_objects=vqa_objects, edit_kinds=edit_kinds)
            for rel, img in images.items():
                img.save(out / rel, format="PNG", optimize=False)
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")
            counts[rec["task"]] += 1
            heldout += bool(rec["meta"]["heldout"])
    os.replace(tmp, out / "records.jsonl")
    return {"out": str(out), "records": n, "split": split, "size": size, "seed": seed, "t2i_layout": t2i_layout,
            "vqa_turns": vqa_turns, "position_colours": position_colours, "categories": list(categories),
            "qtypes": list(qtypes), "vqa_objects": vqa_objects, "edit_kinds": list(edit_kinds),
            "tasks": dict(sorted(counts.items())), "heldout_records": heldout}


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a records.jsonl (or of the directory holding one)."""
    path = Path(path)
    path = path / "records.jsonl" if path.is_dir() else path
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; write one with `vargpt data shapesworld --out DIR`") from None


__all__ = ["CANONICAL_CELLS", "CANONICAL_COLOUR", "CATEGORIES", "EDIT_KINDS", "HELDOUT_COMPOSITIONS", "HELDOUT_PAIRS",
           "LAYOUTS", "QTYPES", "TASKS", "EditSpec", "ObjSpec", "PromptSpec", "Ref", "apply_edit", "canonical_scene",
           "caption", "corrupt", "edit_text", "make_record", "parse_edit", "parse_prompt", "prompt_text", "question",
           "read_records", "relation_holds", "resolve_ref", "sample_edit", "sample_prompt", "scene_for_prompt",
           "spec_matches", "unique_ref", "write_dataset"]
