"""The judge: reads a 64 x 64 image of the shapes world and says what it contains, and why.

No network, just four readable steps, each of which a reader can check by eye:

    1. background  the background colour with the most pixels nearest to it
    2. colours     every pixel is read as the background blended with one shape colour: the
                   colour whose blend explains it best, if the blend is at least half that
                   colour and leaves at most MAX_COLOR_DIST unexplained
    3. blobs       4-connected pixels of one shape colour form a blob; blobs under MIN_AREA
                   pixels are speckles and are ignored
    4. features    shape: draw a circle, a square and a triangle with the blob's area and centre
                   of mass, and keep the one that overlaps the blob best (intersection over
                   union); size from that shape's r = sqrt(area / k), k its area per r^2;
                   position from the centre of mass (nearest of the five places when alone;
                   top/bottom/left/right of the other when one of two)

    dets = read(img)                      # [Detection(shape='circle', color='red', ...)]
    score(img, "a red circle above a blue square")   # {'shapes_present': True, 'color': True, ...}
    print(explain(img))                   # the same, in words, with the numbers behind each choice
    accuracy(2000)                        # read() against the true scenes of the world's own images

It is meant for what a small diffusion model paints: colours a little off, soft edges and
speckles are absorbed by nearest-colour assignment and the minimum area.

It names the world's six colours only, unless asked for more: every reading function takes
extra_colors={name: (r, g, b)}, e.g. {"orange": (255, 128, 0)} for a model fine-tuned on a colour
the world never shows (ldm.finetune). Each extra colour must stand at least MIN_EXTRA_DIST from
every world colour, so that a world colour painted a little off is still read as itself.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ldm import shapes as world

__all__ = ["Detection", "read", "background", "score", "explain", "accuracy", "degrade", "MIN_AREA", "MAX_COLOR_DIST",
           "MIN_EXTRA_DIST"]

MIN_AREA = 40         # px; the smallest shape in the world (a triangle with r = 9) covers about 140
MAX_COLOR_DIST = 110  # RGB distance (0-255 units); colours in the palette are at least 124 apart
MIN_EXTRA_DIST = 80   # an extra colour's distance from every world colour: a 40-unit margin each side
# Area per r^2 (r = half the box width): what turns a blob's area into the r of each candidate shape.
AREA_PER_R2 = {"triangle": math.sqrt(3), "circle": math.pi, "square": 4.0}
SIZE_SPLIT = (world.RADIUS["small"][1] + world.RADIUS["large"][0]) / 2  # r below it: small (13 px)

_SHAPE_NAMES = list(world.COLORS)
_SHAPE_RGB = np.array([world.COLORS[c] for c in _SHAPE_NAMES], np.float32)     # (6, 3)
_BG_NAMES = list(world.BACKGROUNDS)
_BG_RGB = np.array([world.BACKGROUNDS[c] for c in _BG_NAMES], np.float32)       # (3, 3)


def _palette(extra_colors: dict | None) -> tuple[list[str], np.ndarray]:
    """The shape colours the judge names: the world's six, then extra_colors {name: (r, g, b)}, checked."""
    if not extra_colors:
        return _SHAPE_NAMES, _SHAPE_RGB
    names, rgb = list(_SHAPE_NAMES), [_SHAPE_RGB]
    world_rgb = np.concatenate([_SHAPE_RGB, _BG_RGB])
    for name, value in extra_colors.items():
        c = np.asarray(value, np.float32)
        if name in names or name in _BG_NAMES or c.shape != (3,) or not ((c >= 0) & (c <= 255)).all():
            raise ValueError(f"extra_colors[{name!r}] = {value!r}: expected a new name and (r, g, b) in 0-255")
        d = np.sqrt(((world_rgb - c) ** 2).sum(-1))
        if d.min() < MIN_EXTRA_DIST:
            near = (_SHAPE_NAMES + _BG_NAMES)[int(d.argmin())]
            raise ValueError(f"extra_colors[{name!r}] = {value!r} is {d.min():.0f} from {near}; the judge needs "
                             f"at least {MIN_EXTRA_DIST} from every world colour")
        names.append(name)
        rgb.append(c[None])
    return names, np.concatenate(rgb)


@dataclass
class Detection:
    """One blob read as a shape. (cx, cy): centre of mass in pixels; box = (x0, y0, x1, y1), inclusive;
    iou: overlap of the blob with each candidate shape drawn at its area and centre (the best one wins);
    fill = area / box area (a triangle fills 1/2 of its box, a circle pi/4, a square all); r = the
    half-width that area gives for the chosen shape."""

    shape: str
    color: str
    size: str
    position: str
    cx: float
    cy: float
    r: float
    area: int
    fill: float
    iou: dict[str, float]
    box: tuple[int, int, int, int]
    color_dist: float  # mean RGB residual of the blob's pixels from the background-to-colour blend


def _as_rgb(image) -> np.ndarray:
    """PIL image, (64, 64, 3) uint8 array or (3, 64, 64) / (1, 3, 64, 64) tensor in [-1, 1]
    -> (64, 64, 3) float32 in 0-255."""
    if isinstance(image, Image.Image):
        a = np.asarray(image.convert("RGB"), np.float32)
    elif isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"image: tensor of shape {tuple(image.shape)}; expected (3, 64, 64) in [-1, 1]")
        a = ((t.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image: array of dtype {image.dtype}, shape {image.shape}; expected uint8 (64, 64, 3)")
        a = image.astype(np.float32)
    else:
        raise ValueError(f"image: got {type(image).__name__}; expected a PIL image, a uint8 (64, 64, 3) array "
                         "or a (3, 64, 64) tensor in [-1, 1]")
    if a.shape[:2] != (world.SIZE_PX, world.SIZE_PX):
        side = world.SIZE_PX
        raise ValueError(f"image: size {a.shape[1]}x{a.shape[0]}; the judge reads {side}x{side} images")
    return a


def _dist(rgb: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W, 3), (K, 3) -> (H, W, K) Euclidean RGB distances."""
    return np.sqrt(((rgb[:, :, None, :] - palette[None, None]) ** 2).sum(-1))


def _background(rgb: np.ndarray, palette=(_SHAPE_NAMES, _SHAPE_RGB)) -> tuple[str, np.ndarray]:
    """Step 1: the background colour that most pixels are nearest to (among all palette colours), and the counts."""
    d = _dist(rgb, np.concatenate([_BG_RGB, palette[1]]))
    counts = np.bincount(d.argmin(-1).ravel(), minlength=len(_BG_NAMES) + len(palette[0]))[:len(_BG_NAMES)]
    return _BG_NAMES[int(counts.argmax())], counts


def background(image, extra_colors: dict | None = None) -> str:
    """The background colour's name."""
    return _background(_as_rgb(image), _palette(extra_colors))[0]


def _colour_map(rgb: np.ndarray, bg: str, palette=(_SHAPE_NAMES, _SHAPE_RGB)) -> tuple[np.ndarray, np.ndarray]:
    """Step 2: (H, W) index into the palette's names (-1: background or no colour), and each pixel's residual.

    Each pixel is read as the background blended with one shape colour c: p = bg + alpha (c - bg).
    For each c, alpha is the projection of p - bg on c - bg (clipped to [0, 1]) and the residual is
    what that blend leaves unexplained. The colour with the smallest residual wins; the pixel is
    the shape's when alpha >= 0.5 (the shape covers most of it) and the residual <= MAX_COLOR_DIST.
    Reading blends (not nearest colours) keeps a soft cyan edge on black from passing for green."""
    b = _BG_RGB[_BG_NAMES.index(bg)]
    v = palette[1] - b                                                  # (K, 3) background -> colour
    q = rgb - b                                                         # (H, W, 3)
    alpha = np.clip((q @ v.T) / (v * v).sum(-1), 0.0, 1.0)              # (H, W, K)
    resid = np.sqrt(((q[:, :, None, :] - alpha[..., None] * v) ** 2).sum(-1))  # (H, W, K)
    best = resid.argmin(-1)
    a = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    dist = np.take_along_axis(resid, best[..., None], -1)[..., 0]
    label = np.where((a >= 0.5) & (dist <= MAX_COLOR_DIST), best, -1)
    return label, dist


def _blobs(label: np.ndarray) -> np.ndarray:
    """Step 3: connected components of equal labels (4-neighbours), by repeated min-propagation.

    Every labelled pixel starts with its own id; each round it takes the smallest id among itself and
    its same-colour neighbours, until nothing changes (rounds ~ the longest path inside a blob).
    Returns (H, W) ids, -1 where unlabelled."""
    h, w = label.shape
    big = h * w
    ids = np.where(label >= 0, np.arange(big).reshape(h, w), big)
    pad = np.full((h + 2, w + 2), -2)
    pad[1:-1, 1:-1] = label
    same = [pad[1 + dy:h + 1 + dy, 1 + dx:w + 1 + dx] == label for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))]
    while True:
        p = np.full((h + 2, w + 2), big)
        p[1:-1, 1:-1] = ids
        neighbours = [p[1 + dy:h + 1 + dy, 1 + dx:w + 1 + dx] for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))]
        new = ids
        for n, s in zip(neighbours, same):
            new = np.where(s & (label >= 0), np.minimum(new, n), new)
        if np.array_equal(new, ids):
            return np.where(label >= 0, ids, -1)
        ids = new


def _classify(blob: np.ndarray, cx: float, cy: float) -> dict[str, float]:
    """Step 4: IoU of the blob (H, W) bool with each shape drawn at the blob's area and centre of mass."""
    area = blob.sum()
    iou = {}
    for shape in world.SHAPES:
        r = math.sqrt(area / AREA_PER_R2[shape])
        template = world.coverage(world.Shape(shape, "", "", "", cx, cy, r)) >= 0.5
        iou[shape] = float((blob & template).sum() / (blob | template).sum())
    return iou


def _nearest_place(cx: float, cy: float) -> str:
    return min(world.ANCHORS, key=lambda p: (world.ANCHORS[p][0] - cx) ** 2 + (world.ANCHORS[p][1] - cy) ** 2)


def _read(rgb: np.ndarray, palette=(_SHAPE_NAMES, _SHAPE_RGB)) -> tuple[str, list[Detection]]:
    bg, _ = _background(rgb, palette)
    label, dist = _colour_map(rgb, bg, palette)
    ids = _blobs(label)
    found = []
    for blob, area in zip(*np.unique(ids[ids >= 0], return_counts=True)):
        if area < MIN_AREA:
            continue
        ys, xs = np.nonzero(ids == blob)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
        fill = float(area / ((x1 - x0 + 1) * (y1 - y0 + 1)))
        cx, cy = float(xs.mean() + 0.5), float(ys.mean() + 0.5)  # pixel centres sit at i + 0.5
        iou = _classify(ids == blob, cx, cy)
        shape = max(iou, key=iou.get)
        r = math.sqrt(area / AREA_PER_R2[shape])
        color = palette[0][int(label[ys[0], xs[0]])]
        found.append(Detection(shape, color, "small" if r < SIZE_SPLIT else "large", "", cx, cy, r, int(area),
                               fill, iou, (x0, y0, x1, y1), float(dist[ys, xs].mean())))
    found.sort(key=lambda d: -d.area)
    if len(found) == 2:  # one of two: the side it takes with respect to the other
        rel = world.relation_of(_as_shape(found[0]), _as_shape(found[1]))
        found[0].position, found[1].position = world.PAIR_SIDES[rel]
    else:
        for d in found:
            d.position = _nearest_place(d.cx, d.cy)
    return bg, found


def _as_shape(d: Detection) -> world.Shape:
    return world.Shape(d.shape, d.color, d.size, d.position, d.cx, d.cy, d.r)


def read(image, extra_colors: dict | None = None) -> list[Detection]:
    """The shapes in the image, largest first."""
    return _read(_as_rgb(image), _palette(extra_colors))[1]


def _scene(image, extra_colors: dict | None = None) -> world.Scene:
    """What the judge sees, as a world Scene (relation of the first detection to the second)."""
    bg, found = _read(_as_rgb(image), _palette(extra_colors))
    shapes = tuple(_as_shape(d) for d in found)
    relation = world.relation_of(shapes[0], shapes[1]) if len(shapes) == 2 else None
    return world.Scene(shapes, bg, relation)


def score(image, prompt: str, extra_colors: dict | None = None) -> dict[str, bool | None]:
    """Does the image show what the prompt asks? See ldm.shapes.compare for the keys; None = not asked.
    extra_colors: colours besides the world's, both in the prompt ("an orange circle") and in the image."""
    return world.compare(world.parse(prompt, extra_colors or ()), _scene(image, extra_colors))


def explain(image, extra_colors: dict | None = None) -> str:
    """A short account of what the judge sees and the numbers behind each decision."""
    rgb, palette = _as_rgb(image), _palette(extra_colors)
    bg, counts = _background(rgb, palette)
    bg_text = ", ".join(f"{n} {c}" for n, c in zip(_BG_NAMES, counts))
    lines = [f"background: {bg} (pixels nearest each background colour: {bg_text})"]
    found = _read(rgb, palette)[1]
    for i, d in enumerate(found):
        w, h = d.box[2] - d.box[0] + 1, d.box[3] - d.box[1] + 1
        overlaps = ", ".join(f"{s} {v:.2f}" for s, v in d.iou.items())
        cmp = "<" if d.size == "small" else ">="
        lines.append(
            f"shape {i}: a {d.size} {d.color} {d.shape}, {d.position}: {d.area} px of {d.color} "
            f"(mean colour residual {d.color_dist:.0f}) in a {w}x{h} box; overlap with {overlaps}; "
            f"r = {d.r:.1f} px ({cmp} {SIZE_SPLIT:g}: {d.size}); centre ({d.cx:.1f}, {d.cy:.1f})")
    if len(found) == 2:
        a, b = found
        rel = world.relation_of(_as_shape(a), _as_shape(b))
        lines.append(f"relation: the {a.color} {a.shape} is {rel} the {b.color} {b.shape} (from their centres)")
    if not found:
        lines.append(f"no blob of a shape colour with at least {MIN_AREA} px")
    return "\n".join(lines)


def degrade(images: torch.Tensor, *, blur: float = 0.0, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """World images (n, 3, 64, 64) in [-1, 1] made to look like a small model's: a Gaussian blur of
    std `blur` px, then Gaussian noise of std `noise` (in [-1, 1] units), clamped back to [-1, 1]."""
    x = images.float()
    if blur > 0:
        k = torch.arange(-3, 4, dtype=torch.float32)
        k = torch.exp(-k**2 / (2 * blur**2))
        k = (k / k.sum()).repeat(3, 1, 1, 1)  # (3, 1, 1, 7): one separable kernel per channel
        x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (3, 3, 0, 0), mode="replicate"), k, groups=3)
        x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 0, 3, 3), mode="replicate"),
                                       k.transpose(2, 3), groups=3)
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return x.clamp(-1, 1)


def accuracy(n: int = 1000, seed: int = 0, *, held_out: bool = False, blur: float = 0.0,
             noise: float = 0.0, extra_colors: dict | None = None) -> dict[str, float]:
    """read() against the true scenes of n world images (optionally degraded): the fraction right, per attribute.
    extra_colors: read them with these colours in the palette too (does adding one confuse the world's?).

    Each true shape is paired with the detection nearest its centre. count, color+shape (every shape
    found with its colour and shape, and nothing else), background and all are per image; color,
    shape, size, position are per true shape (position: the five places for a shape alone, the side
    for one of two); relation is per two-shape image."""
    images, _, scenes = world.batch(n, seed, held_out=held_out)
    images = degrade(images, blur=blur, noise=noise, seed=seed)
    palette = _palette(extra_colors)
    right, total = Counter(), Counter()
    for img, scene in zip(images, scenes):
        bg, found = _read(_as_rgb(img), palette)
        per_image = {"count": len(found) == len(scene.shapes), "background": bg == scene.background}
        pairs = []
        for s in scene.shapes:
            d = min(found, key=lambda d: (d.cx - s.cx) ** 2 + (d.cy - s.cy) ** 2, default=None)
            pairs.append((s, d))
            for attr in ("color", "shape", "size", "position"):
                total[attr] += 1
                right[attr] += d is not None and getattr(d, attr) == getattr(s, attr)
        per_image["color+shape"] = per_image["count"] and all(
            d is not None and (d.color, d.shape) == (s.color, s.shape) for s, d in pairs)
        if scene.relation is not None:
            total["relation"] += 1
            right["relation"] += all(d is not None for _, d in pairs) and len({id(d) for _, d in pairs}) == 2 and \
                world.relation_of(_as_shape(pairs[0][1]), _as_shape(pairs[1][1])) == scene.relation
        per_image["all"] = per_image["color+shape"] and per_image["background"] and all(
            getattr(d, a) == getattr(s, a) for s, d in pairs for a in ("size", "position"))
        for k, v in per_image.items():
            total[k] += 1
            right[k] += bool(v)
    return {k: right[k] / total[k] for k in total} | {"n": n}
