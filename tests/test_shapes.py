"""The shapes world: deterministic by seed, captions that are true of their scenes, held-out pairs kept out."""
import numpy as np
import pytest
import torch

from ldm import shapes


def test_api_constants():
    assert set(shapes.SHAPES) >= {"circle", "square", "triangle"}
    assert len(shapes.COLORS) >= 6 and {"red", "green", "blue", "yellow"} <= set(shapes.COLORS)
    palette = {**shapes.COLORS, **shapes.BACKGROUNDS}
    assert len(palette) == len(shapes.COLORS) + len(shapes.BACKGROUNDS)  # no name is both
    names = list(palette)
    for i, a in enumerate(names):  # every colour is far from every other one, backgrounds included
        for b in names[i + 1:]:
            assert np.linalg.norm(np.subtract(palette[a], palette[b])) > 120, (a, b)
    for c, s in shapes.HELD_OUT:
        assert c in shapes.COLORS and s in shapes.SHAPES


def test_batch_is_deterministic_by_seed():
    x1, c1, s1 = shapes.batch(16, seed=3)
    x2, c2, s2 = shapes.batch(16, seed=3)
    x3, c3, _ = shapes.batch(16, seed=4)
    torch.testing.assert_close(x1, x2, rtol=0, atol=0)  # same process, same computation
    assert c1 == c2 and s1 == s2
    assert c1 != c3 and not torch.equal(x1, x3)
    assert x1.shape == (16, 3, 64, 64) and x1.dtype == torch.float32
    assert x1.min() >= -1 and x1.max() <= 1


def test_to_tensor_convention():
    img = np.zeros((2, 64, 64, 3), np.uint8)
    img[1] = 255
    x = shapes.to_tensor(img)
    torch.testing.assert_close(x[0], torch.full((3, 64, 64), -1.0))
    torch.testing.assert_close(x[1], torch.full((3, 64, 64), 1.0))
    with pytest.raises(ValueError, match="uint8"):
        shapes.to_tensor(img.astype(np.float32))


def test_render_draws_the_scene():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = shapes.random_scene(rng)
        img = shapes.render(scene)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        covers = [shapes.coverage(s) for s in scene.shapes]
        for s, cover in zip(scene.shapes, covers):
            assert cover.sum() > 135  # big enough to survive an 8x downsampling (smallest: a triangle, r = 9)
            inside = cover == 1.0
            assert (img[inside] == shapes.COLORS[s.color]).all()
            # the whole shape lies inside the picture: its area matches the formula for its r
            k = {"circle": np.pi, "square": 4.0, "triangle": np.sqrt(3)}[s.shape]
            np.testing.assert_allclose(cover.sum(), k * s.r**2, rtol=0.03)
            lo, hi = shapes.RADIUS[s.size]
            assert lo <= s.r <= hi
        if len(covers) == 2:
            assert (covers[0] * covers[1]).max() == 0  # apart, with no overlap
            assert shapes.relation_of(*scene.shapes) == scene.relation
            assert tuple(s.position for s in scene.shapes) == shapes.PAIR_SIDES[scene.relation]
        outside = sum(covers) == 0
        assert (img[outside] == shapes.BACKGROUNDS[scene.background]).all()


def test_one_shape_sits_at_its_place():
    rng = np.random.default_rng(1)
    for _ in range(300):
        (s,) = shapes.random_scene(rng, num_shapes=1).shapes
        ax, ay = shapes.ANCHORS[s.position]
        assert abs(s.cx - ax) <= shapes.JITTER + 1e-9 and abs(s.cy - ay) <= shapes.JITTER + 1e-9


def test_captions_are_true_of_their_scenes():
    """parse(caption) agrees with the scene, always; and the captions leave every attribute open sometimes."""
    _, captions, scenes = shapes.batch(600, seed=5)
    seen = set()
    for text, scene in zip(captions, scenes):
        prompt = shapes.parse(text)
        result = shapes.compare(prompt, scene)
        assert result["all"] and result["count"], (text, scene, result)
        for spec in prompt.shapes:
            seen |= {f"no {a}" for a in ("color", "shape", "size", "position") if getattr(spec, a) is None}
            seen |= {a for a in ("color", "shape", "size", "position") if getattr(spec, a) is not None}
        seen.add("background" if prompt.background else "no background")
        if len(prompt.shapes) == 2:
            seen.add("relation" if prompt.relation else "no relation")
    assert seen == {"color", "no color", "shape", "no shape", "size", "no size", "position", "no position",
                    "background", "no background", "relation", "no relation"}
    assert any(t.startswith("a circle") or t == "a square" for t in captions)  # shape alone


def test_a_wrong_caption_is_caught():
    scene = shapes.Scene((shapes.Shape("circle", "red", "small", "top left", 20, 20, 10),), "white", None)
    assert shapes.compare(shapes.parse("a red circle in the top left on a white background"), scene)["all"]
    for wrong, key in [("a blue circle", "color"), ("a red square", "shape"), ("a large red circle", "size"),
                       ("a red circle in the center", "position"), ("a red circle on a black background", "background"),
                       ("a red circle above a blue square", "count")]:
        result = shapes.compare(shapes.parse(wrong), scene)
        assert result[key] is False and result["all"] is False, wrong


def test_held_out_pairs():
    rng = np.random.default_rng(2)
    train = [shapes.random_scene(rng) for _ in range(3000)]
    pairs = {(s.color, s.shape) for sc in train for s in sc.shapes}
    assert not pairs & set(shapes.HELD_OUT)
    assert len(pairs) == len(shapes.COLORS) * len(shapes.SHAPES) - len(shapes.HELD_OUT)  # everything else appears
    test = [shapes.random_scene(rng, held_out=True) for _ in range(300)]
    assert all(any((s.color, s.shape) in shapes.HELD_OUT for s in sc.shapes) for sc in test)
    assert {(s.color, s.shape) for sc in test for s in sc.shapes} >= set(shapes.HELD_OUT)
    _, _, scenes = shapes.batch(50, seed=0, held_out=True)
    assert all(any((s.color, s.shape) in shapes.HELD_OUT for s in sc.shapes) for sc in scenes)


def test_parse_reads_the_grammar():
    P, S = shapes.Prompt, shapes.ShapeSpec
    assert shapes.parse("a red circle") == P((S("circle", "red"),))
    assert shapes.parse("A small red circle in the top left corner.") == P((S("circle", "red", "small", "top left"),))
    assert shapes.parse("a blue shape in the middle") == P((S(None, "blue", None, "center"),))
    assert shapes.parse("red") == P((S(None, "red"),))
    assert shapes.parse("a red circle above a blue square on a white background") == \
        P((S("circle", "red"), S("square", "blue")), "white", "above")
    assert shapes.parse("a triangle to the left of a green circle") == \
        P((S("triangle"), S("circle", "green")), None, "left of")
    assert shapes.parse("a circle and a square on gray") == P((S("circle"), S("square")), "gray", None)


@pytest.mark.parametrize("text", ["a dog wearing a hat", "a red circle in the sky",
                                  "a red circle on a plaid background",
                                  "", "a red circle above", "a red circle square", 42])
def test_parse_rejects_text_outside_the_grammar(text):
    with pytest.raises(ValueError) as err:
        shapes.parse(text)
    message = str(err.value)
    assert "\n" not in message and message.startswith("prompt") and repr(text) in message


def test_random_scene_rejects_bad_count():
    with pytest.raises(ValueError, match="num_shapes=3"):
        shapes.random_scene(np.random.default_rng(0), num_shapes=3)


def test_a_colour_outside_the_world():
    """render and parse take extra colours when asked (ldm.finetune's orange); the world never draws them."""
    extra = {"orange": (255, 128, 0)}
    s = shapes.Shape("circle", "orange", "large", "center", 32, 32, 16)
    img = shapes.render(shapes.Scene((s,), "black", None), extra)
    assert (img[shapes.coverage(s) == 1.0] == extra["orange"]).all()
    with pytest.raises(KeyError):
        shapes.render(shapes.Scene((s,), "black", None))
    assert shapes.parse("an orange circle", extra).shapes[0] == shapes.ShapeSpec("circle", "orange")
    with pytest.raises(ValueError, match="orange"):
        shapes.parse("an orange circle")
    rng = np.random.default_rng(0)
    assert all(sh.color in shapes.COLORS for _ in range(200) for sh in shapes.random_scene(rng).shapes)
