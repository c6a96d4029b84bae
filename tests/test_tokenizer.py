"""Tests for ldm/tokenizer.py: the hand-written CLIP BPE against transformers' CLIPTokenizer.

The first group needs no transformers: known ids (from the reference, written down here),
the window, truncation, errors, decode, and a hypothesis property (any str -> 77 ids, BOS
first). The second group builds transformers' CLIPTokenizer from our vendored vocab and
compares ids on every prompt of tests/data/tokenizer_corpus.txt (1,361 prompts) and on
hypothesis-generated text.
"""
from __future__ import annotations

import functools
import gzip
import json
import time
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ldm.tokenizer import (DEFAULT_VOCAB_PATH, CLIPTokenizer, TruncationWarning, bytes_to_unicode,
                           normalize, split_words)

CORPUS = Path(__file__).resolve().parent / "data" / "tokenizer_corpus.txt"
BOS, EOS = 49406, 49407


@functools.lru_cache(maxsize=1)
def tok() -> CLIPTokenizer:
    return CLIPTokenizer()


def corpus() -> list[str]:
    lines = CORPUS.read_text(encoding="utf-8").split("\n")
    return [json.loads(line) for line in lines if line and not line.startswith("#")]


# --- without the reference -------------------------------------------------------------------


def test_astronaut_fact():
    ids = tok()("a photograph of an astronaut riding a horse")
    expected = [BOS, 320, 8853, 539, 550, 18376, 6765, 320, 4558, EOS]
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    torch.testing.assert_close(ids[0], torch.tensor(expected + [EOS] * (77 - len(expected))))
    assert tok().encode("a photograph of an astronaut riding a horse") == expected[1:-1]


def test_constants_and_vocab_layout():
    t = tok()
    assert (t.bos_id, t.eos_id, t.pad_id, t.vocab_size, t.max_length) == (BOS, EOS, EOS, 49408, 77)
    byte_chars = list(bytes_to_unicode().values())
    assert len(set(byte_chars)) == 256
    assert t.id_to_token[:256] == byte_chars and t.id_to_token[0] == "!"
    assert t.id_to_token[256:512] == [c + "</w>" for c in byte_chars]
    assert len(t.bpe_ranks) == 48894 and t.id_to_token[512] == "".join(next(iter(t.bpe_ranks)))
    assert t.id_to_token[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    assert len(t.vocab) == 49408  # all token strings distinct
    assert DEFAULT_VOCAB_PATH.stat().st_size == 1356917


def test_known_ids_from_reference():
    """Ids written down from transformers 5.23's CLIPTokenizer; each shows one rule."""
    t = tok()
    cases = {
        "photorealistic": [1153, 16157],                    # BPE: 'photo' + 'realistic</w>'
        "ΟΔΟΣ": [138, 123, 138, 112, 138, 123, 139, 481],   # per-char lower: Σ -> σ, not ς
        "οδος": [138, 123, 138, 112, 138, 123, 139, 480],   # a typed ς stays ς
        "a\x1cb": [320, 472, 321],                          # U+001C is not whitespace there
        "<|EndOfText|>": [27, 347, 40786, 4160, 91, 285],   # special string in another case
        "a <|endoftext|> b": [320, EOS, 321],               # exact special -> its id
        "cafe\u0301": [15304],                              # NFD -> NFC 'café'
        "don't": [847, 713],                                # contraction "'t"
        "&amp;": [261, 6259, 282],                          # no HTML unescaping
        "12.5": [272, 273, 269, 276],                       # every digit alone
        "🧑\u200d🚀": [8792, 239, 4244, 13542],              # emoji ZWJ sequence, byte-level
        "a\u3000b\u00a0c\td\ne  ": [320, 321, 322, 323, 324],  # whitespace runs vanish
    }
    for text, ids in cases.items():
        assert t.encode(text) == ids, text
    assert t.tokenize("photorealistic") == ["photo", "realistic</w>"]
    assert t.bpe("astronaut") == ["astronaut</w>"]


def test_normalize_and_split():
    assert normalize("  A\t\tCafé\u2028X ") == " a café x "
    assert normalize("ΟΔΟΣ") == "οδοσ" and "ΟΔΟΣ".lower() == "οδος"  # Python's str.lower differs
    assert split_words("it's 42 dogs!!?  ok") == ["it", "'s", "4", "2", "dogs", "!!?", "ok"]
    assert split_words("x<|endoftext|>!") == ["x", "<|", "endoftext", "|>", "!"]
    assert split_words("!<|endoftext|>") == ["!<|", "endoftext", "|>"]


def test_batch_window_and_padding():
    t = tok()
    ids = t(["a dog", "a cat wearing a hat"])
    assert ids.shape == (2, 77) and ids.dtype == torch.int64
    for row, prompt in zip(ids, ["a dog", "a cat wearing a hat"]):
        body = t.encode(prompt)
        expected = [BOS, *body, EOS] + [EOS] * (75 - len(body))
        torch.testing.assert_close(row, torch.tensor(expected))
    torch.testing.assert_close(t("a dog"), ids[:1])
    torch.testing.assert_close(t(("a dog",)), ids[:1])
    torch.testing.assert_close(t([""])[0], torch.tensor([BOS] + [EOS] * 76))


def test_truncation_keeps_75_and_warns():
    t = tok()
    prompt = "a photo of " + " ".join(["dog"] * 73) + " with a red hat"  # 3 + 73 + 4 tokens
    ids = t.encode(prompt)
    assert len(ids) == 80
    with pytest.warns(TruncationWarning, match=rf"has {len(ids)} BPE tokens; CLIP reads 75, so {len(ids) - 75} were dropped") as rec:
        out = t([prompt, "a dog"])
    assert len(rec) == 1 and "prompts[0]" in str(rec[0].message)
    assert t.truncated_text(prompt) in str(rec[0].message)
    torch.testing.assert_close(out[0], torch.tensor([BOS, *ids[:75], EOS]))
    assert t.truncated_text(prompt) == t.decode(ids[75:]) == "dog with a red hat"
    assert t.truncated_text("a dog") == ""
    exact = " ".join(["dog"] * 75)  # exactly 75 tokens: fits, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(t(exact)[0], torch.tensor([BOS] + [1929] * 75 + [EOS]))


def test_decode():
    t = tok()
    assert t.decode(t.encode("A  Photo of a CAFÉ, 4k!")) == "a photo of a café , 4 k !"
    batch = t(["a dog", "宇宙飞行员 🚀"])
    assert t.decode(batch) == ["a dog", "宇宙飞行员 🚀"]  # (B, T) -> B strings
    assert t.decode(batch[0]) == "a dog"
    assert t.decode([[320, 1929], [49406]]) == ["a dog", ""]
    assert t.decode([]) == ""
    assert t.tokenize("宇宙") == ["å®", "ĩ", "å®", "Ļ</w>"]  # 2 characters, 6 bytes, 4 pieces
    assert t.decode(t.encode("宇宙")[:3]) == "宇\ufffd"  # a cut multi-byte character


def test_bad_inputs_raise_naming_the_argument():
    t = tok()
    with pytest.raises(TypeError, match=r"prompts=5 must be a str or a non-empty list of str"):
        t(5)
    with pytest.raises(TypeError, match=r"prompts=\[\] must be"):
        t([])
    with pytest.raises(TypeError, match=r"prompts\[1\]=3 must be a str"):
        t(["a", 3])
    with pytest.raises(TypeError, match=r"prompts=None"):
        t(None)
    with pytest.raises(TypeError, match=r"text=b'a dog' must be a str"):
        t.encode(b"a dog")
    with pytest.raises(ValueError, match=r"ids contains -1; allowed: ints in \[0, 49408\)"):
        t.decode([320, -1])
    with pytest.raises(ValueError, match=r"ids contains 49408"):
        t.decode(torch.tensor([49408]))
    with pytest.raises(ValueError, match=r"ids has shape \(1, 1, 1\)"):
        t.decode(torch.zeros(1, 1, 1, dtype=torch.long))
    with pytest.raises(TypeError, match=r"ids='a dog'"):
        t.decode("a dog")
    with pytest.raises(ValueError, match=r"word='' must be a non-empty str"):
        t.bpe("")
    with pytest.raises(ValueError, match=r"max_length=1 must be an int >= 2"):
        CLIPTokenizer(max_length=1)
    with pytest.raises(FileNotFoundError, match=r"path='/nonexistent.txt.gz'"):
        CLIPTokenizer("/nonexistent.txt.gz")


def test_vocab_path_argument(tmp_path):
    """An explicit path (plain .txt too) gives the same tokenizer; a wrong file is refused."""
    plain = tmp_path / "bpe.txt"
    plain.write_text(gzip.open(DEFAULT_VOCAB_PATH, "rt", encoding="utf-8").read(), encoding="utf-8")
    t = CLIPTokenizer(plain)
    torch.testing.assert_close(t("a photograph of an astronaut"), tok()("a photograph of an astronaut"))
    short = tmp_path / "short.txt"
    short.write_text("#version\na b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"is not a CLIP BPE merges file"):
        CLIPTokenizer(short)


def test_small_max_length():
    t = CLIPTokenizer(max_length=5)
    with pytest.warns(TruncationWarning, match="CLIP reads 3, so 2 were dropped"):
        ids = t("a photograph of an astronaut")
    torch.testing.assert_close(ids, torch.tensor([[BOS, 320, 8853, 539, EOS]]))


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(exclude_categories=()), max_size=300))  # any str, lone surrogates too
def test_any_string_gives_77_ids_starting_with_bos(text):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ids = tok()(text)
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    row, body = ids[0].tolist(), tok().encode(text)
    k = min(len(body), 75)
    assert len(rec) == (len(body) > 75)  # a TruncationWarning exactly when tokens were dropped
    assert row[0] == BOS
    assert row[1:1 + k] == body[:k]
    assert row[1 + k:] == [EOS] * (76 - k)  # EOS, then EOS padding to the end
    assert all(0 <= i < 49408 for i in row)


# --- against transformers' CLIPTokenizer -----------------------------------------------------


@functools.lru_cache(maxsize=1)
def reference_tokenizer():
    """transformers' CLIPTokenizer built from our vendored vocab (5.x keywords vocab=/merges=;
    vocab_file= would silently give a 3-token vocabulary)."""
    transformers = pytest.importorskip("transformers")
    import ref_sd

    vocab, merges = ref_sd.clip_vocab_and_merges()
    ref = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
    assert len(ref) == 49408
    return ref


def test_corpus_matches_reference():
    ref, t = reference_tokenizer(), tok()
    prompts = corpus()
    assert len(prompts) >= 1000
    start = time.perf_counter()
    ours = [t.encode(p) for p in prompts]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        window = t(prompts)
    seconds = time.perf_counter() - start
    expected = [ref(p, add_special_tokens=False)["input_ids"] for p in prompts]
    mismatched = [p for p, a, b in zip(prompts, ours, expected) if a != b]
    assert not mismatched, f"{len(mismatched)} of {len(prompts)} prompts differ, e.g. {mismatched[:3]!r}"
    reference_window = ref(prompts, padding="max_length", max_length=77, truncation=True,
                           return_tensors="pt")["input_ids"]
    torch.testing.assert_close(window, reference_window)
    n_long = sum(len(ids) > 75 for ids in expected)
    assert n_long >= 50 and len([w for w in rec if w.category is TruncationWarning]) == n_long
    print(f"\ntokenizer parity: {len(prompts)} prompts equal ({n_long} truncated, longest "
          f"{max(map(len, expected))} tokens); ours took {seconds:.2f} s")


def test_decode_matches_reference():
    ref, t = reference_tokenizer(), tok()
    prompts = corpus()
    window = t(prompts[:400])
    assert t.decode(window) == ref.batch_decode(window, skip_special_tokens=True)


TRICKY = st.sampled_from([*"<|>'!? \t\n1xsdtlmvreSTLD", "<|endoftext|>", "<|startoftext|>",
                          "<|ENDOFTEXT|>", "'s", "'ll", "ΣΑΣ", "é", "e\u0301", "\u00a0", "\x1c", "🚀", "字"])


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(st.characters(exclude_categories=("Cn", "Cs")), max_size=60),
                 st.lists(TRICKY, max_size=25).map("".join)))
def test_hypothesis_matches_reference(text):
    """Any text of characters Python's unicodedata knows (see ldm/tokenizer.py's docstring for
    why unassigned ones are left out), and text built from pieces that stress the split
    (specials, contractions, whitespace, final sigma, NFD), gives the reference's ids."""
    ref = reference_tokenizer()
    assert tok().encode(text) == ref(text, add_special_tokens=False)["input_ids"]
