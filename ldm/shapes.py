"""The shipped model's world: flat shapes on flat backgrounds, with captions, where the truth is known.

A scene is one shape alone (somewhere among five places) or two shapes, one above, below, left or
right of the other, on a white, black or gray background. Everything is drawn from a numpy
Generator, so a seed gives the same scenes, images and captions on every machine:

    scene = random_scene(rng)            # Scene(shapes=(Shape('circle', 'red', 'small', 'top left', ...),), ...)
    img = render(scene)                  # (64, 64, 3) uint8
    text = caption(scene, rng)           # 'a small red circle in the top left', 'a red shape', ...
    spec = parse(text)                   # Prompt: what the text asks for (attributes it leaves open are None)
    compare(spec, scene)["all"]          # True: every caption is a true statement about its scene
    x, texts, scenes = batch(64, seed=0) # (64, 3, 64, 64) float32 in [-1, 1], SD's convention

Captions come from a small grammar and leave attributes out at random ("a circle", "a blue
shape", "a large square"), so that prompts which leave something open are in the training
distribution. HELD_OUT lists (colour, shape) pairs the training draws never contain: a model that
draws "a green triangle" has composed a colour and a shape it only ever saw apart.

Rendering is anti-aliased with signed distances: for each pixel centre, d = how far it lies outside
the shape (negative inside), and the shape covers clip(0.5 - d, 0, 1) of the pixel. That is what
supersampling approximates, at the cost of one pass over a 64 x 64 grid.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["SIZE_PX", "SHAPES", "COLORS", "BACKGROUNDS", "SIZES", "RADIUS", "POSITIONS", "ANCHORS", "SIDES",
           "RELATIONS", "PAIR_SIDES", "HELD_OUT",
           "Shape", "Scene", "ShapeSpec", "Prompt", "random_scene", "coverage", "render", "caption", "parse",
           "compare", "relation_of", "batch", "to_tensor"]

SIZE_PX = 64  # images are SIZE_PX x SIZE_PX RGB

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Shape colours, chosen far apart in RGB (every pair, and every colour from every background, at
# least 124 apart in 0-255 units) so that a judge can name them even when a model paints them off.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 30),
    "purple": (170, 50, 220),
    "cyan": (30, 210, 220),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (120, 120, 120),
}
SIZES: tuple[str, ...] = ("small", "large")
# r = half the width of the shape's box, in pixels: small shapes are 18-22 px across, large 30-34.
RADIUS: dict[str, tuple[float, float]] = {"small": (9.0, 11.0), "large": (15.0, 17.0)}
POSITIONS: tuple[str, ...] = ("center", "top left", "top right", "bottom left", "bottom right")
ANCHORS: dict[str, tuple[float, float]] = {  # (x, y) of each place, y down
    "center": (32.0, 32.0), "top left": (20.0, 20.0), "top right": (44.0, 20.0),
    "bottom left": (20.0, 44.0), "bottom right": (44.0, 44.0),
}
JITTER = 2.5  # one shape: uniform +- JITTER px around its anchor
# Two shapes: relation of shapes[0] to shapes[1], and the side of the picture each one takes.
RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of")
SIDES: tuple[str, ...] = ("top", "bottom", "left", "right")
PAIR_SIDES: dict[str, tuple[str, str]] = {"above": ("top", "bottom"), "below": ("bottom", "top"),
                                          "left of": ("left", "right"), "right of": ("right", "left")}
INVERSE: dict[str, str] = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
PAIR_OFFSET, PAIR_ALONG, PAIR_ACROSS = 15.0, 1.5, 4.0  # centres 32 -+ 15 (+-1.5) along the axis, +-4 across
# (colour, shape) pairs that random_scene(..., held_out=False) never produces.
HELD_OUT: tuple[tuple[str, str], ...] = (("green", "triangle"), ("yellow", "circle"), ("purple", "square"))
P_TWO_SHAPES = 0.4


@dataclass(frozen=True)
class Shape:
    """One shape. (cx, cy) is its centre of mass in pixels (x right, y down, image corners at 0 and
    64); r is half the width of its box. A triangle points up: base 2r, height sqrt(3) r.
    position: one of POSITIONS when the shape is alone, one of SIDES when it is one of two."""

    shape: str
    color: str
    size: str
    position: str
    cx: float
    cy: float
    r: float


@dataclass(frozen=True)
class Scene:
    """Shapes on a background; relation says where shapes[0] is with respect to shapes[1] (None for one shape)."""

    shapes: tuple[Shape, ...]
    background: str
    relation: str | None


# ---------------------------------------------------------------------------------------------
# Drawing scenes
# ---------------------------------------------------------------------------------------------

def _fits(shape: str, cx: float, cy: float, r: float) -> tuple[float, float]:
    """Move (cx, cy) the least amount that keeps the whole shape one pixel inside the image."""
    lo, hi = 1.0, SIZE_PX - 1.0
    up, down = (2 / math.sqrt(3) * r, r / math.sqrt(3)) if shape == "triangle" else (r, r)  # centroid to apex / base
    return float(np.clip(cx, lo + r, hi - r)), float(np.clip(cy, lo + up, hi - down))


def _pick_pairs(rng: np.random.Generator, k: int, held_out: bool) -> list[tuple[str, str]]:
    """k distinct (colour, shape) pairs: none of HELD_OUT, or (held_out=True) the first one from it."""
    allowed = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELD_OUT]
    pairs = []
    if held_out:
        pairs.append(HELD_OUT[rng.integers(len(HELD_OUT))])
        allowed = [(c, s) for c in COLORS for s in SHAPES]  # the other shape may be anything
    while len(pairs) < k:
        p = allowed[rng.integers(len(allowed))]
        if p not in pairs:
            pairs.append(p)
    order = rng.permutation(k)
    return [pairs[i] for i in order]


def random_scene(rng: np.random.Generator, *, held_out: bool = False, num_shapes: int | None = None) -> Scene:
    """One random scene. held_out=False never contains a HELD_OUT (colour, shape) pair;
    held_out=True always contains at least one. num_shapes: 1, 2 or None (2 with probability 0.4)."""
    if num_shapes is None:
        num_shapes = 2 if rng.random() < P_TWO_SHAPES else 1
    if num_shapes not in (1, 2):
        raise ValueError(f"num_shapes={num_shapes!r}: the world has scenes of 1 or 2 shapes")
    pairs = _pick_pairs(rng, num_shapes, held_out)
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    if num_shapes == 1:
        (color, shape), = pairs
        size, position = SIZES[rng.integers(len(SIZES))], POSITIONS[rng.integers(len(POSITIONS))]
        r = rng.uniform(*RADIUS[size])
        ax, ay = ANCHORS[position]
        cx, cy = _fits(shape, ax + rng.uniform(-JITTER, JITTER), ay + rng.uniform(-JITTER, JITTER), r)
        return Scene((Shape(shape, color, size, position, cx, cy, r),), background, None)
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    sign = -1.0 if relation in ("above", "left of") else 1.0  # shapes[0] goes first along the axis
    out = []
    for (color, shape), s, side in zip(pairs, (sign, -sign), PAIR_SIDES[relation]):
        r = rng.uniform(*RADIUS["small"])
        along = 32 + s * PAIR_OFFSET + rng.uniform(-PAIR_ALONG, PAIR_ALONG)
        across = 32 + rng.uniform(-PAIR_ACROSS, PAIR_ACROSS)
        cx, cy = (across, along) if relation in ("above", "below") else (along, across)
        cx, cy = _fits(shape, cx, cy, r)
        out.append(Shape(shape, color, "small", side, cx, cy, r))
    return Scene(tuple(out), background, relation)


def _outside(s: Shape, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance (px) from pixel centres (x, y) to the shape's edge: > 0 outside, < 0 inside.
    Exact along the edges, which is all anti-aliasing needs."""
    dx, dy = x - s.cx, y - s.cy
    if s.shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - s.r
    if s.shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - s.r
    if s.shape == "triangle":  # up-pointing equilateral, centroid at the origin: inradius r / sqrt(3)
        base = dy - s.r / math.sqrt(3)  # the bottom edge, at +inradius
        sides = (math.sqrt(3) * np.abs(dx) - dy) / 2 - s.r / math.sqrt(3)  # the two slanted edges
        return np.maximum(base, sides)
    raise ValueError(f"shape={s.shape!r}: allowed shapes are {SHAPES}")


_Y, _X = np.mgrid[0:SIZE_PX, 0:SIZE_PX].astype(np.float32) + 0.5  # pixel centres


def coverage(s: Shape) -> np.ndarray:
    """(64, 64) float32: the fraction of each pixel the shape covers (anti-aliased by its signed distance)."""
    return np.clip(0.5 - _outside(s, _X, _Y), 0.0, 1.0)


def render(scene: Scene, extra_colors: dict[str, tuple[int, int, int]] | None = None) -> np.ndarray:
    """The scene as a (64, 64, 3) uint8 image: flat colours, edges anti-aliased by coverage.
    extra_colors: {name: (r, g, b)} for shape colours outside COLORS (a colour the world never shows,
    as ldm.finetune teaches one); the world itself never draws them."""
    palette = {**COLORS, **(extra_colors or {})}
    img = np.empty((SIZE_PX, SIZE_PX, 3), np.float32)
    img[:] = BACKGROUNDS[scene.background]
    for s in scene.shapes:
        cover = coverage(s)[..., None]  # (64, 64, 1) fraction inside
        img += cover * (np.asarray(palette[s.color], np.float32) - img)
    return np.rint(img).astype(np.uint8)


def to_tensor(images_uint8: np.ndarray) -> torch.Tensor:
    """(n, 64, 64, 3) uint8 -> (n, 3, 64, 64) float32 in [-1, 1] (x / 127.5 - 1, SD's convention)."""
    a = np.asarray(images_uint8)
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"images_uint8: got dtype {a.dtype}, shape {a.shape}; expected uint8 (n, H, W, 3)")
    return torch.from_numpy(a).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def batch(n: int, seed: int, *, held_out: bool = False) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """n scenes from one seed: images (n, 3, 64, 64) float32 in [-1, 1], one caption each, the scenes."""
    if n < 1:
        raise ValueError(f"n={n!r}: need at least one image")
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, held_out=held_out) for _ in range(n)]
    captions = [caption(s, rng) for s in scenes]
    images = np.stack([render(s) for s in scenes])
    return to_tensor(images), captions, scenes


# ---------------------------------------------------------------------------------------------
# The grammar: captions out, prompts in
# ---------------------------------------------------------------------------------------------
#   caption   := [article] phrase [place] [ (relation | "and") [article] phrase ] [background]
#   phrase    := [size] [colour] (shape | "shape")          at least one word
#   place     := "in the" (center | middle | top left [corner] | ...)
#   relation  := above | below | [to the] left of | [to the] right of
#   background:= "on a" bg "background" | "on" bg
# caption() writes a subset of it (the one-shape forms with place, two-shape forms without size).

P_SIZE, P_COLOR, P_SHAPE_WORD, P_PLACE, P_BACKGROUND, P_RELATION = 0.4, 0.85, 0.9, 0.5, 0.35, 0.8


@dataclass(frozen=True)
class ShapeSpec:
    """What a prompt asks of one shape; None = left open."""

    shape: str | None = None
    color: str | None = None
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class Prompt:
    """What a prompt asks for: shapes in the order the text names them; relation of shapes[0] to shapes[1]."""

    shapes: tuple[ShapeSpec, ...]
    background: str | None = None
    relation: str | None = None


def _phrase(s: Shape, rng: np.random.Generator, with_size: bool) -> str:
    words = []
    if with_size and rng.random() < P_SIZE:
        words.append(s.size)
    has_color = rng.random() < P_COLOR
    if has_color:
        words.append(s.color)
    words.append(s.shape if (not has_color or rng.random() < P_SHAPE_WORD) else "shape")
    return " ".join(words)


def _place(position: str, rng: np.random.Generator) -> str:
    if position == "center":
        return "in the " + ("center" if rng.random() < 0.7 else "middle")
    return "in the " + position + (" corner" if rng.random() < 0.3 else "")


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A random true sentence about the scene from the grammar; it names every shape, and may leave
    out colour, shape word, size, place, relation and background."""
    if len(scene.shapes) == 1:
        (s,) = scene.shapes
        text = "a " + _phrase(s, rng, with_size=True)
        if rng.random() < P_PLACE:
            text += " " + _place(s.position, rng)
    else:
        a, b = scene.shapes
        relation = scene.relation
        if rng.random() < 0.5:  # say it the other way round: "a blue square below a red circle"
            a, b, relation = b, a, INVERSE[relation]
        if rng.random() < P_RELATION:
            link = relation if relation in ("above", "below") else "to the " + relation
        else:
            link = "and"
        text = f"a {_phrase(a, rng, with_size=False)} {link} a {_phrase(b, rng, with_size=False)}"
    if rng.random() < P_BACKGROUND:
        text += f" on a {scene.background} background"
    return text


_PLACE_WORDS = {"center": "center", "middle": "center",
                **{p: p for p in POSITIONS[1:]}, **{p + " corner": p for p in POSITIONS[1:]}}


def parse(prompt: str, extra_colors=()) -> Prompt:
    """What a prompt from the grammar asks for. Raises ValueError (one line) on text outside it.
    extra_colors: colour names read besides COLORS (e.g. {"orange": ...}: only its names count)."""
    colors = (*COLORS, *extra_colors)
    if not isinstance(prompt, str):
        raise ValueError(f"prompt={prompt!r}: expected a string")
    words = re.sub(r"[,.!]", " ", prompt.lower()).split()
    i = 0

    def fail(why: str):
        raise ValueError(f"prompt {prompt!r}: {why}; the grammar is '[a] [size] [colour] shape [in the place] "
                         f"[above|below|to the left of|to the right of|and a ...] [on a <bg> background]' with "
                         f"sizes {SIZES}, colours {colors}, shapes {SHAPES}, places {tuple(_PLACE_WORDS)}, "
                         f"backgrounds {tuple(BACKGROUNDS)}")

    def at(*seq: str) -> bool:
        return tuple(words[i:i + len(seq)]) == seq

    def phrase() -> ShapeSpec:
        nonlocal i
        if i < len(words) and words[i] in ("a", "an"):
            i += 1
        size = color = shape = None
        if i < len(words) and words[i] in SIZES:
            size, i = words[i], i + 1
        if i < len(words) and words[i] in colors:
            color, i = words[i], i + 1
        if i < len(words) and (words[i] in SHAPES or words[i] == "shape"):
            shape, i = (None if words[i] == "shape" else words[i]), i + 1
        elif size is None and color is None:
            fail(f"expected a shape at {' '.join(words[i:]) or 'the end'!r}")
        position = None
        if at("in", "the"):
            for n in (3, 2, 1):  # the longest place first: "top left corner" before "top left"
                key = " ".join(words[i + 2:i + 2 + n])
                if len(words) >= i + 2 + n and key in _PLACE_WORDS:
                    position, i = _PLACE_WORDS[key], i + 2 + n
                    break
            else:
                fail(f"unknown place {' '.join(words[i + 2:]) or 'at the end'!r}")
        return ShapeSpec(shape, color, size, position)

    specs, relation, background = [phrase()], None, None
    for rel, seq in (("above", ("above",)), ("below", ("below",)), ("left of", ("to", "the", "left", "of")),
                     ("right of", ("to", "the", "right", "of")), ("left of", ("left", "of")),
                     ("right of", ("right", "of")), (None, ("and",))):
        if at(*seq):
            i += len(seq)
            relation = rel
            specs.append(phrase())
            break
    if at("on"):
        i += 1
        if i < len(words) and words[i] in ("a", "an"):
            i += 1
        if i >= len(words) or words[i] not in BACKGROUNDS:
            fail(f"unknown background {' '.join(words[i:]) or 'at the end'!r}")
        background, i = words[i], i + 1
        if at("background"):
            i += 1
    if i != len(words):
        fail(f"unexpected {' '.join(words[i:])!r}")
    return Prompt(tuple(specs), background, relation)


# ---------------------------------------------------------------------------------------------
# Does a scene satisfy a prompt? (used by the tests on captions and by the judge on images)
# ---------------------------------------------------------------------------------------------

def relation_of(a: Shape, b: Shape) -> str:
    """Where a is with respect to b, from their centres: the axis with the larger offset decides."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dy) >= abs(dx):
        return "above" if dy > 0 else "below"
    return "left of" if dx > 0 else "right of"


_ATTRS = ("shape", "color", "size", "position")


def compare(prompt: Prompt, scene: Scene) -> dict[str, bool | None]:
    """Per attribute, does the scene give what the prompt asks? None = the prompt does not ask.

    The prompt's shapes are matched one-to-one to the scene's shapes in the way that satisfies the
    most (colour and shape first). Keys: count (as many shapes as asked), shapes_present (every asked
    shape is there with its colour, where named), shape, color, size, position, relation,
    background, all (every asked attribute and the count)."""
    specs, found = prompt.shapes, list(scene.shapes)
    slots = found + [None] * max(0, len(specs) - len(found))  # None: nothing left to match

    def ok(spec: ShapeSpec, s: Shape | None, attr: str) -> bool | None:
        want = getattr(spec, attr)
        return None if want is None else (s is not None and getattr(s, attr) == want)

    def related(chosen) -> bool | None:
        if prompt.relation is None:
            return None
        a, b = chosen[0], chosen[1]
        return a is not None and b is not None and relation_of(a, b) == prompt.relation

    best, best_key = None, None
    for chosen in itertools.permutations(slots, len(specs)):
        checks = [{a: ok(spec, s, a) for a in _ATTRS} for spec, s in zip(specs, chosen)]
        core = sum(c["shape"] is not False and c["color"] is not False for c in checks)
        rest = sum(v is True for c in checks for v in c.values()) + (related(chosen) is True)
        if best_key is None or (core, rest) > best_key:
            best, best_key = (chosen, checks), (core, rest)
    chosen, checks = best

    def every(attr: str) -> bool | None:
        asked = [c[attr] for c in checks if c[attr] is not None]
        return None if not asked else all(asked)

    out: dict[str, bool | None] = {"count": len(found) == len(specs)}
    out["shapes_present"] = all(s is not None and c["shape"] is not False and c["color"] is not False
                                for s, c in zip(chosen, checks))
    for attr in _ATTRS:
        out[attr] = every(attr)
    out["relation"] = related(chosen)
    out["background"] = None if prompt.background is None else scene.background == prompt.background
    out["all"] = all(v is not False for v in out.values())
    return out
