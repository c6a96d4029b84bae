"""Hostile prompts and embedding files: each ends in ldm's own one-line error (PromptError,
EmbeddingError, or the tokenizer's TypeError / ValueError) naming the prompt, argument or file,
within seconds and bounded memory, or, where the input is merely long, in the right answer fast.

The classes: a parser that was quadratic in nesting (and weights that overflow to inf), a BPE
that was quadratic in a word's length and read a whole prompt before truncating it, prompts that
asked for unbounded chunks of context, and embedding files with hostile names, keys and values.
The slow and large cases run in a forked child with a memory cap and a deadline (tests/bounded.py),
so a regression fails its test instead of hanging the run.
"""
from __future__ import annotations

import functools
import random
import warnings

import pytest
import torch
from safetensors.torch import save_file

from bounded import assert_one_line_error, run_bounded
from ldm import prompt
from ldm.clip import CLIPTextConfig, CLIPTextModel
from ldm.tokenizer import MAX_RUN_CHARS, CLIPTokenizer, TruncationWarning

PROMPT_ERRORS = ("PromptError",)


@functools.lru_cache(maxsize=1)
def tok() -> CLIPTokenizer:
    return CLIPTokenizer()


def letters(n: int, seed: int = 0) -> str:
    """A word of n random letters: the BPE's worst case (a run of one letter merges in bulk)."""
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))


# --- the A1111 parser: nesting, weights, length ------------------------------------------------


@pytest.mark.parametrize("text, match", [
    ("(a" * 50000 + ")" * 50000, "MAX_PROMPT_CHARS"),      # quadratic before: every ")" re-weighted all
    ("(a" * 20000 + ")" * 20000, "opens more than 100 brackets at once"),
    ("(" * 10000 + "a" + ")" * 10000, "opens more than 100 brackets at once"),  # 1.1 ** 10000 = inf
    ("x " + "(" * 80 + "a" + ")" * 80, "the text at character 82 has weight 2048"),  # 1.1 ** 80
    ("((a:1000))", "the text at character 2 has weight 1100"),  # each allowed, their product not
    ("(a:" + "9" * 400 + ")", "is out of range; allowed: -1000 to 1000"),  # float() says inf
    ("(a:-1e3)", "is not a number"),
])
def test_brackets_end_in_one_line_error_fast(text, match):
    out = run_bounded(lambda: prompt.parse(text), deadline_s=10)
    message = assert_one_line_error(out, PROMPT_ERRORS, "prompt", match=match, max_len=300)
    assert out["seconds"] < 10, out["seconds"]
    assert "ldm.prompt.MAX_" in message or "not a number" in message


def test_deep_but_allowed_nesting_is_linear_and_exact():
    """100 groups open around 20,000 pieces: each piece's weight is the product A1111 computes
    (the first group to close first), without re-weighting earlier pieces at every bracket."""
    text = "[" * 99 + "(x)\\[" * 10000 + "]" * 99  # 60,198 characters
    out = run_bounded(lambda: len(prompt.parse(text)), deadline_s=5)
    assert out["error"] is None and out["value"] == "20000", out
    inner, outer = 1.0 * 1.1, 1.0  # "x" is multiplied by its "(x)" first, then by the 99 "["
    for _ in range(99):
        inner, outer = inner * (1 / 1.1), outer * (1 / 1.1)
    assert prompt.parse(text)[:2] == [("x", inner), ("[", outer)]


# --- the tokenizer: long words and long prompts ---------------------------------------------------


def test_a_long_word_tokenizes_in_bounded_time():
    """A 100,000-letter word never finished (BPE was quadratic: 20,000 letters took 20 s)."""
    word = letters(100_000)
    out = run_bounded(lambda: tok()(word).shape, deadline_s=10)
    assert out["error"] is None and out["value"] == "torch.Size([1, 77])", out
    out = run_bounded(lambda: len(tok().encode(word[:20_000])), deadline_s=10)
    assert out["error"] is None, out


def test_a_long_prompt_is_read_only_as_far_as_the_window():
    """17 MB of words: the window reads the first segments, not the whole text."""
    text = "a photo of a cat " * 1_000_000

    def window():
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            ids = tok()(text)
        return ids[0, :5].tolist(), str(rec[0].message)

    out = run_bounded(window, deadline_s=5)
    assert out["error"] is None, out["message"]
    assert "[49406, 320, 1125, 539, 320]" in out["value"]
    assert "has more than 1075 BPE tokens; CLIP reads 75, so more than 1000 were dropped" in out["value"]


def test_bad_arguments_give_short_lines():
    """A huge value in a wrong argument is named, cut, on one line."""
    big = b"\n" * 10**6
    for call, name in [(lambda: tok()(big), "prompts="), (lambda: tok().encode(big), "text="),
                       (lambda: tok()(["a", big]), "prompts[1]="), (lambda: prompt.parse(big), "prompt="),
                       (lambda: tok().bpe(""), "word=")]:
        with pytest.raises((TypeError, ValueError)) as err:
            call()
        message = str(err.value)
        assert name in message and "\n" not in message and len(message) < 300, message[:300]


def reference_tokenizer():
    transformers = pytest.importorskip("transformers")
    import ref_sd

    vocab, merges = ref_sd.clip_vocab_and_merges()
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges)


def test_long_words_and_texts_match_the_reference():
    """The heap BPE and the segmented reading give the reference's ids: all of them for a
    20,000-letter word and a 30,000-character text of tricky pieces (NFC across spaces,
    specials, contractions), the 77-id window for a word past MAX_RUN_CHARS."""
    ref, t = reference_tokenizer(), tok()
    rng = random.Random(3)
    parts = [*" \t\n\r\x0b\x0c'!1xs", "<|endoftext|>", "'ll", "ΣΑΣ", "e\u0301", " \u0301", "\u1100\u1161",
             "\u3000", "\u0344", "İ", "字", "🚀", "ab" * 20]
    text = "".join(rng.choice(parts) for _ in range(10_000))
    word = letters(20_000, seed=1)
    for s in (word, text):
        assert t.encode(s) == ref(s, add_special_tokens=False)["input_ids"]
    long = letters(MAX_RUN_CHARS + 5_000, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        window = t(long)[0].tolist()
    assert window == ref(long, padding="max_length", max_length=77, truncation=True)["input_ids"]


def test_an_added_name_with_a_space_is_found_in_a_long_text():
    """Segments are cut at whitespace, so a name holding a space turns those cuts off (here the
    first whitespace past SEGMENT_CHARS is the one inside the name)."""
    t = CLIPTokenizer()
    (i,) = t.add_tokens(["my style"])
    text = "!" * 5000 + "my  \n style" + " dog" * 2000
    ids = t.encode(text)
    assert ids.count(i) == 1 and ids[-2000:] == [1929] * 2000


# --- chunks: bounded context -------------------------------------------------------------------


@pytest.mark.parametrize("text, match", [
    ("a BREAK " * 12500, "has 100,000 characters; at most 65,536"),  # asked for 1 GB of context
    ("a BREAK " * 40, "needs more than 32 chunks of 75 tokens"),
    ("cat " * 2401, "needs more than 32 chunks of 75 tokens"),
])
def test_too_many_chunks_are_refused_before_any_tensor(text, match):
    out = run_bounded(lambda: prompt.tokenize(["a cat", text], tok())[0].shape, deadline_s=10,
                      extra_bytes=2**28)
    assert_one_line_error(out, PROMPT_ERRORS, "prompt", match=match, max_len=300)


def test_the_longest_allowed_prompt_still_works():
    ids, weights = prompt.tokenize("cat " * 2400, tok())
    assert ids.shape == weights.shape == (1, prompt.MAX_CHUNKS, 77)


# --- embedding files ------------------------------------------------------------------------


C = CLIPTextConfig.tiny().hidden_size  # 32


def fresh():
    """A new tokenizer and tiny text encoder (loading an embedding changes both)."""
    return CLIPTokenizer(), CLIPTextModel(CLIPTextConfig.tiny())


def _pt(path, obj):
    torch.save(obj, path)
    return path


HOSTILE_FILES = {  # file name -> (what to write there, a piece of the expected message)
    "count.pt": (lambda p: _pt(p, {"string_to_param": {"*": torch.zeros(1, C).expand(10**6, C)}}),
                 "claim more than"),
    "wide.safetensors": (lambda p: save_file({"emb_params": torch.zeros(1, 5000)}, str(p)), "1 <= C <= 4096"),
    "narrow.pt": (lambda p: _pt(p, {"string_to_param": {"*": torch.zeros(2, 768)}}), "this text encoder is 32 wide"),
    "inf.pt": (lambda p: _pt(p, {"string_to_param": {"*": torch.full((1, C), float("inf"))}}), "NaN or infinite"),
    "nan.bin": (lambda p: _pt(p, {"<t>": torch.full((C,), float("nan"))}), "NaN or infinite"),
    "intkey.bin": (lambda p: _pt(p, {123456: torch.zeros(C)}), "the one key is 123456 (int)"),
    "text.pt": (lambda p: _pt(p, {"string_to_param": {"*": "a\nb"}}), "the embedding is a str"),
    "listparams.pt": (lambda p: _pt(p, {"string_to_param": [torch.zeros(1, C)]}), "got list"),
    "escape.bin": (lambda p: _pt(p, {"<a>\n\x1b[31mred": torch.zeros(C)}), r"'<a>\n\x1b[31mred' must be"),
    "longname.bin": (lambda p: _pt(p, {"x" * 100_000: torch.zeros(C)}), "at most 256 characters"),
    "longkeys.bin": (lambda p: _pt(p, {"k\n" * 10_000 + str(i): torch.zeros(C) for i in range(9)}),
                     "... 5 more]"),
    "evil\n\x1b[31m.pt": (lambda p: _pt(p, {"string_to_param": {"*": torch.zeros(1, C)}}),
                          "token name 'evil\\n\\x1b[31m' must be"),
    "evil\ncorrupt.pt": (lambda p: p.write_bytes(b"garbage"), "not a checkpoint"),
}


@pytest.mark.parametrize("fname", HOSTILE_FILES)
def test_hostile_embedding_files_are_one_line_naming_the_file(tmp_path, fname):
    make, match = HOSTILE_FILES[fname]
    path = tmp_path / fname
    make(path)
    tokenizer, text_encoder = fresh()
    out = run_bounded(lambda: prompt.load_embedding(path, tokenizer, text_encoder), deadline_s=20,
                      extra_bytes=2**29)
    shown = str(path) if str(path).isprintable() else repr(str(path))
    assert_one_line_error(out, ("EmbeddingError",), shown, match=match, max_len=len(shown) + 240)
    with pytest.raises(prompt.EmbeddingError):  # and nothing was added (checked in this process)
        prompt.load_embedding(path, tokenizer, text_encoder)
    assert tokenizer.vocab_size == text_encoder.config.vocab_size == 49408
