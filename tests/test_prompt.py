"""ldm.prompt: A1111's bracket weights, 75-token chunks, BREAK, the mean-restoring rule, CLIP skip.

The parser is checked against a table of A1111 cases (the examples of A1111's own docstring of
parse_prompt_attention, made balanced, plus nesting, escapes and BREAK), with the expected
weights written as the products A1111 computes. Encoding is checked against the rule written
out here on the plain encoder, and CLIP skip against transformers' hidden states.
"""
from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch.testing import assert_close

import ref_clip
from ldm import prompt
from ldm.clip import CLIPTextConfig
from ldm.tokenizer import CLIPTokenizer, TruncationWarning

B_ = prompt.BREAK
R, S = 1.1, 1 / 1.1  # "(x)", "[x]"


@functools.lru_cache(maxsize=1)
def tok() -> CLIPTokenizer:
    return CLIPTokenizer()


@functools.lru_cache(maxsize=1)
def tiny():
    """(ours, transformers') tiny text encoders on the same weights: 2 layers, 32 wide."""
    return ref_clip.pair(CLIPTextConfig.tiny())


# --- 1. parse ---------------------------------------------------------------------------------

PARSE_CASES = [
    # A1111's docstring examples (the balanced ones verbatim, the last one with its ")" closed)
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", R), (" word", 1.0)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", R)]),
    ("a (((house:1.3))) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * R * R), (" ", 1.0), ("on", S), (" a ", 1.0), ("hill", 0.5),
      (", sun, ", 1.0), ("sky", R * R * R), (".", 1.0)]),
    # nesting multiplies, inner group first
    ("((a))", [("a", R * R)]),
    ("[a]", [("a", S)]),
    ("[[a]]", [("a", S * S)]),
    ("(a:1.5)", [("a", 1.5)]),
    ("(a: 1.5 )", [("a", 1.5)]),
    ("((a:1.5))", [("a", 1.5 * R)]),
    ("[(a:1.5)]", [("a", 1.5 * S)]),
    ("(a [b] c)", [("a ", R), ("b", S * R), (" c", R)]),
    ("(a:0)", [("a", 0.0)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:.5)", [("a", 0.5)]),
    # escapes; a lone backslash is dropped, "\\\\" is one backslash
    ("\\(a\\) \\[b\\]", [("(a) [b]", 1.0)]),
    ("(\\(a\\))", [("(a)", R)]),
    ("a\\\\b", [("a\\b", 1.0)]),
    ("a\\b", [("ab", 1.0)]),
    ("a\\:b", [("a:b", 1.0)]),
    # colons that are not weights are text
    ("style: anime, 1:2 ratio", [("style: anime, 1:2 ratio", 1.0)]),
    # BREAK: a capitalised word of its own, its spaces eaten; inside brackets it stays a BREAK
    ("a cat BREAK a dog", [("a cat", 1.0), B_, ("a dog", 1.0)]),
    ("a BREAK(b)", [("a", 1.0), B_, ("", 1.0), ("b", R)]),
    ("(a BREAK b)", [("a", R), B_, ("b", R)]),
    ("a BREAK BREAK b", [("a", 1.0), B_, ("", 1.0), B_, ("b", 1.0)]),
    ("BREAKFAST break aBREAK", [("BREAKFAST break aBREAK", 1.0)]),
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
]


@pytest.mark.parametrize("text, expected", PARSE_CASES)
def test_parse_matches_a1111_table(text, expected):
    got = prompt.parse(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12, abs=0)


@pytest.mark.parametrize("text, match", [
    ("a (cat", r"'\(' at character 2 is never closed"),
    ("a [cat", r"'\[' at character 2 is never closed"),
    ("a cat)", r"'\)' at character 5 closes no '\('"),
    ("a cat]", r"'\]' at character 5 closes no '\['"),
    ("(a]", r"'\]' at character 2 closes no '\['"),
    ("happy :1.2)", r"'\)' at character 10 closes no '\('"),
    ("(a:abc)", r"the weight 'abc' at character 2 is not a number"),
    ("(a:1.2.3)", r"the weight '1.2.3' at character 2 is not a number"),
    ("(a:)", r"the weight '' at character 2 is not a number"),
    ("(a:1e3)", r"the weight '1e3' at character 2 is not a number"),
])
def test_bad_brackets_are_one_line_naming_the_prompt(text, match):
    with pytest.raises(prompt.PromptError, match=match) as err:
        prompt.parse(text)
    message = str(err.value)
    assert "\n" not in message and repr(text) in message


def test_error_on_a_long_prompt_shows_where():
    text = "word " * 40 + "(oops " + "word " * 40
    with pytest.raises(prompt.PromptError, match="never closed") as err:
        prompt.parse(text)
    assert "(oops" in str(err.value) and len(str(err.value)) < 250


# --- 2. chunk ---------------------------------------------------------------------------------


def test_short_plain_prompt_is_the_plain_window():
    p = "a photograph of an astronaut riding a horse"
    (c,) = prompt.chunk(p, tok())
    assert list(c.ids) == tok()(p)[0].tolist()
    assert c.weights == (1.0,) * 77


def test_weights_follow_their_tokens():
    (c,) = prompt.chunk("a (red:1.3) [fox]", tok())
    assert list(c.ids) == tok()("a red fox")[0].tolist()
    assert c.weights[:5] == pytest.approx([1.0, 1.0, 1.3, S, 1.0]) and set(c.weights[5:]) == {1.0}


def test_long_prompt_splits_at_75_tokens():
    words = ["cat", "dog"] * 75  # 150 one-token words, no commas
    chunks = prompt.chunk(" ".join(words), tok())
    assert len(chunks) == 2
    assert list(chunks[0].ids) == tok()(" ".join(words[:75]))[0].tolist()
    assert list(chunks[1].ids) == tok()(" ".join(words[75:]))[0].tolist()


def test_full_chunk_moves_the_words_after_a_near_comma():
    text = "cat " * 70 + ", " + "dog " * 10  # the comma is token 71; 75 - 70 = 5 <= 20
    cat, dog, comma = tok().encode("cat dog ,")
    c0, c1 = prompt.chunk(text, tok())
    assert list(c0.ids) == [tok().bos_id] + [cat] * 70 + [comma] + [tok().eos_id] * 5
    assert list(c1.ids[:12]) == [tok().bos_id] + [dog] * 10 + [tok().eos_id]
    d0, d1 = prompt.chunk(text, tok(), comma_backtrack=0)  # off: a plain cut at 75
    assert list(d0.ids) == [tok().bos_id] + [cat] * 70 + [comma] + [dog] * 4 + [tok().eos_id]
    far = "cat " * 30 + ", " + "dog " * 60  # comma 45 tokens from the end: too far, plain cut
    f0, _ = prompt.chunk(far, tok())
    assert f0.ids[-2] == dog


def test_break_starts_a_new_chunk():
    c0, c1 = prompt.chunk("a cat BREAK a (dog)", tok())
    assert list(c0.ids) == tok()("a cat")[0].tolist()
    assert list(c1.ids) == tok()("a dog")[0].tolist()
    assert c1.weights[2] == pytest.approx(R) and c1.weights[1] == 1.0


def test_weighting_off_reads_brackets_as_text():
    (c,) = prompt.chunk("(a:1.5)", tok(), weighting=False)
    assert list(c.ids) == tok()("(a:1.5)")[0].tolist() and set(c.weights) == {1.0}


def test_batch_pads_with_empty_chunks():
    ids, weights = prompt.tokenize(["a cat", "cat " * 80], tok())
    assert ids.shape == weights.shape == (2, 2, 77)
    assert ids[0, 1].tolist() == tok()("")[0].tolist() and (weights[0, 1] == 1).all()


# --- 3-5. encode ------------------------------------------------------------------------------


def test_plain_prompt_equals_the_plain_path():
    te, _ = tiny()
    p = "a photograph of an astronaut riding a horse"
    with torch.no_grad():
        assert_close(prompt.encode(p, tok(), te), te(tok()(p)), rtol=0, atol=0)


def test_mean_restoring_rule_written_out():
    te, _ = tiny()
    with torch.no_grad():
        got = prompt.encode(["a (red:1.3) [fox], ((snow))"], tok(), te)
        z = te(tok()("a red fox, snow"))  # (1, 77, C): the same tokens, unweighted
        w = torch.ones(1, 77)
        w[0, 2], w[0, 3], w[0, 5] = 1.3, 1 / 1.1, 1.1 * 1.1  # BOS a red fox , snow EOS ...
        expected = z * w[..., None]
        expected = expected * (z.mean() / expected.mean())
    assert got.shape == (1, 77, 32)
    assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert (got - z).abs().max() > 1e-3  # the weights did something


def test_150_token_prompt_is_two_chunks_of_the_plain_encoder():
    te, _ = tiny()
    words = ["cat", "dog"] * 75
    with torch.no_grad():
        ctx = prompt.encode(" ".join(words), tok(), te)
        first = te(tok()(" ".join(words[:75])))
        second = te(tok()(" ".join(words[75:])))
    assert ctx.shape == (1, 154, 32)
    assert_close(ctx[:, :77], first, rtol=0, atol=0)
    assert_close(ctx[:, 77:], second, rtol=0, atol=0)


def test_batch_of_unequal_prompts_keeps_each_prompt_its_own():
    te, _ = tiny()
    with torch.no_grad():
        both = prompt.encode(["a cat", "(a dog:1.2) " * 40], tok(), te)
        alone = prompt.encode("a cat", tok(), te)
        empty = te(tok()(""))
    assert both.shape == (2, 154, 32)
    assert_close(both[:1, :77], alone)  # the mean is restored per prompt, not over the batch
    assert_close(both[:1, 77:], empty)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_is_a1111s_count_against_transformers(clip_skip):
    te, hf = tiny()
    p = "a (photo:1.2) of a cat " + "dog " * 80  # weighted, two chunks
    ids, weights = prompt.tokenize(p, tok())
    with torch.no_grad():
        got = prompt.encode(p, tok(), te, clip_skip=clip_skip)
        h = hf(input_ids=ids[0], output_hidden_states=True).hidden_states[-clip_skip]  # (2, 77, C)
        z = getattr(hf, "text_model", hf).final_layer_norm(h)
        expected = z * weights[0][..., None]
        expected = expected * (z.mean(dim=(1, 2), keepdim=True) / expected.mean(dim=(1, 2), keepdim=True))
    assert_close(got, expected.reshape(1, 154, 32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [0, 3, -1, 1.0, True, "2"])
def test_bad_clip_skip_names_the_range(bad):
    te, _ = tiny()
    with pytest.raises(ValueError, match=r"clip_skip=.* must be an int in \[1, 2\]"):
        prompt.encode("a cat", tok(), te, clip_skip=bad)


def test_truncation_warning_stays_on_the_plain_path_only():
    te, _ = tiny()
    long = "cat " * 100
    with pytest.warns(TruncationWarning):
        tok()(long)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            assert prompt.encode(long, tok(), te).shape == (1, 154, 32)


@pytest.mark.full
def test_full_size_long_weighted_prompt_with_clip_skip_2():
    te, hf = ref_clip.full_pair()
    p = "a (photo:1.3) of a [cat], " * 15 + "BREAK snow"  # 90 tokens, a comma cut, a BREAK
    ids, weights = prompt.tokenize(p, tok())
    with torch.no_grad():
        got = prompt.encode(p, tok(), te, clip_skip=2)
        h = hf(input_ids=ids[0], output_hidden_states=True).hidden_states[-2]  # (3, 77, 768)
        z = getattr(hf, "text_model", hf).final_layer_norm(h)
        expected = z * weights[0][..., None]
        expected = expected * (z.mean(dim=(1, 2), keepdim=True) / expected.mean(dim=(1, 2), keepdim=True))
    n = ids.shape[1]
    assert n == 3 and got.shape == (1, 77 * n, 768)
    err = (got - expected.reshape(1, -1, 768)).abs().max().item()
    print(f"prompt.encode full-size clip_skip=2, {n} chunks: max |ours - transformers| = {err:.2e}")
    assert_close(got, expected.reshape(1, -1, 768), rtol=1e-4, atol=1e-4)
