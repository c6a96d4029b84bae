"""The judge reads the world's images right, also when they are blurred and noisy, and scores prompts."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import judge, shapes


def _image(*shape_list, background="white"):
    scene = shapes.Scene(tuple(shape_list), background,
                         shapes.relation_of(*shape_list) if len(shape_list) == 2 else None)
    return shapes.render(scene)


RED_CIRCLE = shapes.Shape("circle", "red", "large", "center", 32, 32, 16)
TOP = shapes.Shape("circle", "red", "small", "top", 31, 17, 10)
BOTTOM = shapes.Shape("square", "blue", "small", "bottom", 33, 47, 10)


def test_accuracy_on_the_world():
    acc = judge.accuracy(300, seed=0)
    for key in ("color+shape", "count", "color", "shape", "size", "position", "relation", "background"):
        assert acc[key] >= 0.98, (key, acc)
    held = judge.accuracy(100, seed=1, held_out=True)
    assert held["color+shape"] >= 0.98, held


def test_robust_to_blur_and_noise():
    """A small model paints soft edges and noisy colours; colour, shape and count must still read right."""
    acc = judge.accuracy(150, seed=2, blur=1.0, noise=0.15)
    assert acc["color+shape"] >= 0.98 and acc["position"] >= 0.98, acc
    x, captions, _ = shapes.batch(60, seed=3)
    y = judge.degrade(x, blur=1.5, noise=0.2, seed=3)
    assert (y - x).abs().mean() > 0.1  # the degradation is real
    scores = [judge.score(img, text) for img, text in zip(y, captions)]
    assert np.mean([s["shapes_present"] and s["count"] for s in scores]) >= 0.95


def test_colour_shift_and_speckles():
    img = _image(RED_CIRCLE).astype(np.int16)
    img += np.array([-25, 20, 15], np.int16)  # a red that is off
    rng = np.random.default_rng(0)
    ys, xs = rng.integers(0, 64, 30), rng.integers(0, 64, 30)
    img[ys, xs] = shapes.COLORS["blue"]  # scattered blue speckles: too small to be a shape
    (d,) = judge.read(np.clip(img, 0, 255).astype(np.uint8))
    assert (d.shape, d.color, d.size, d.position) == ("circle", "red", "large", "center")


def test_reads_every_input_kind_alike():
    img = _image(TOP, BOTTOM, background="black")
    as_tensor = shapes.to_tensor(img[None])[0]
    def decisions(image):
        return [(d.shape, d.color, d.size, d.position, d.area, d.box) for d in judge.read(image)]

    for form in (Image.fromarray(img), as_tensor, as_tensor[None]):
        assert decisions(form) == decisions(img)
    assert judge.background(img) == "black"
    found = judge.read(img)
    assert [(d.color, d.shape, d.position) for d in sorted(found, key=lambda d: d.cy)] == \
        [("red", "circle", "top"), ("blue", "square", "bottom")]
    for bad in (np.zeros((32, 32, 3), np.uint8), np.zeros((64, 64, 3), np.float32), torch.zeros(4, 64, 64), [1, 2]):
        with pytest.raises(ValueError, match="image"):
            judge.read(bad)


def test_score_accepts_the_right_prompt_and_rejects_a_wrong_one():
    red = _image(RED_CIRCLE)
    right = judge.score(red, "a large red circle in the center on a white background")
    assert right["relation"] is None and all(v is True for k, v in right.items() if k != "relation"), right
    wrong = judge.score(red, "a blue square")
    assert not wrong["shapes_present"] and not wrong["color"] and not wrong["shape"] and not wrong["all"]
    assert wrong["position"] is None and wrong["count"] is True
    assert judge.score(red, "a circle")["all"] and judge.score(red, "a circle")["color"] is None
    assert judge.score(red, "a small circle")["size"] is False
    assert judge.score(red, "a red circle in the top left")["position"] is False

    pair = _image(TOP, BOTTOM)
    assert judge.score(pair, "a red circle above a blue square")["all"]
    assert judge.score(pair, "a blue square below a red circle")["all"]
    swapped = judge.score(pair, "a red circle below a blue square")
    assert swapped["shapes_present"] and swapped["relation"] is False and not swapped["all"]
    one = judge.score(pair, "a red circle")
    assert one["shapes_present"] and one["count"] is False and not one["all"]
    missing = judge.score(red, "a red circle and a blue square")
    assert not missing["shapes_present"] and not missing["count"]


def test_empty_image_and_explain():
    blank = _image(background="gray")
    assert judge.read(blank) == []
    assert not judge.score(blank, "a circle")["shapes_present"]
    assert "no blob" in judge.explain(blank)
    text = judge.explain(_image(TOP, BOTTOM))
    assert "red circle" in text and "overlap" in text
    assert "the blue square is below the red circle" in text


ORANGE = {"orange": (255, 128, 0)}  # ldm.finetune's new colour


def test_an_extra_colour_only_when_asked():
    """With orange in its palette the judge still reads the world right, reads orange shapes as orange
    (also blurred and noisy), and scores prompts that name it; without it orange is not a colour."""
    assert judge.accuracy(150, seed=4, extra_colors=ORANGE)["color+shape"] >= 0.98
    assert judge.accuracy(100, seed=5, blur=1.0, noise=0.15, extra_colors=ORANGE)["color+shape"] >= 0.98
    rng = np.random.default_rng(6)
    scenes = []
    for _ in range(60):
        s = shapes.random_scene(rng)
        scenes.append(shapes.Scene((replace(s.shapes[0], color="orange"), *s.shapes[1:]), s.background, s.relation))
    x = judge.degrade(shapes.to_tensor(np.stack([shapes.render(s, ORANGE) for s in scenes])), blur=1.0, noise=0.15)
    right = [sorted((d.color, d.shape) for d in judge.read(img, ORANGE)) == sorted((t.color, t.shape) for t in s.shapes)
             for img, s in zip(x, scenes)]
    assert np.mean(right) >= 0.98
    orange = shapes.render(shapes.Scene((replace(RED_CIRCLE, color="orange"),), "white", None), ORANGE)
    assert judge.score(orange, "an orange circle", ORANGE)["all"]
    assert not judge.score(orange, "a red circle", ORANGE)["color"]
    assert "orange circle" in judge.explain(orange, ORANGE)
    assert all(d.color != "orange" for d in judge.read(orange))  # not asked: the six world colours only
    with pytest.raises(ValueError, match="an orange circle"):
        judge.score(orange, "an orange circle")  # not asked: not a word of the grammar
    for bad, words in (({"gold": (245, 200, 40)}, "from yellow"), ({"red": (1, 2, 3)}, "a new name"),
                       ({"x": (300, 0, 0)}, "0-255")):
        with pytest.raises(ValueError, match=words):
            judge.read(orange, bad)
