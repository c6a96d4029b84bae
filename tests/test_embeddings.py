"""Textual inversion: A1111 .pt / .safetensors and diffusers learned_embeds files as new tokens.

Each format is written here with torch.save / safetensors, loaded with ldm.prompt.load_embedding,
and checked row by row; the encoder output is compared with diffusers' own
StableDiffusionPipeline.load_textual_inversion on a tiny pipeline sharing our weights.
"""
from __future__ import annotations

import copy
import functools
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close

import ref_clip
import ref_sd
import ref_unet
import ref_vae
from ldm import prompt
from ldm.clip import CLIPTextConfig
from ldm.tokenizer import CLIPTokenizer
from ldm.unet import UNetConfig

C = CLIPTextConfig.tiny().hidden_size  # 32


def vectors(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, C, generator=torch.Generator().manual_seed(seed))


def write(path: Path, fmt: str, vecs: torch.Tensor, token: str = "<tok>") -> Path:
    """An embedding file in one of the formats found in the wild."""
    if fmt == "a1111-pt":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vecs},
                    "name": "stored-name", "step": 3000, "sd_checkpoint": "abc123"}, path)
    elif fmt == "a1111-paramdict":  # torch 1.11-era A1111 files pickled an nn.ParameterDict
        params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vecs)})
        torch.save({"string_to_token": {"*": 265}, "string_to_param": params, "name": "x", "step": 1}, path)
    elif fmt == "a1111-safetensors":
        save_file({"emb_params": vecs.contiguous()}, str(path))
    elif fmt == "diffusers-safetensors":
        save_file({token: (vecs[0] if len(vecs) == 1 else vecs).contiguous()}, str(path))
    elif fmt == "diffusers-bin":
        torch.save({token: vecs[0] if len(vecs) == 1 else vecs}, path)
    return path


FORMATS = {  # format -> (file name, the prompt word it implies)
    "a1111-pt": ("my-style.pt", "my-style"),
    "a1111-paramdict": ("old-style.pt", "old-style"),
    "a1111-safetensors": ("kohya-style.safetensors", "kohya-style"),
    "diffusers-safetensors": ("learned_embeds.safetensors", "<tok>"),
    "diffusers-bin": ("learned_embeds.bin", "<tok>"),
}


def fresh():
    """A new tokenizer and tiny text encoder (loading an embedding changes both)."""
    te, _ = ref_clip.pair(CLIPTextConfig.tiny())
    return CLIPTokenizer(), te


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", [1, 3])
def test_each_format_loads_as_new_tokens(tmp_path, fmt, n):
    fname, word = FORMATS[fmt]
    vecs = vectors(n)
    path = write(tmp_path / fname, fmt, vecs)
    tok, te = fresh()
    keys = set(te.state_dict())
    emb = prompt.load_embedding(path, tok, te)
    assert emb.name == word and emb.path == path
    assert emb.tokens == (word, *[f"{word}_{i}" for i in range(1, n)])
    assert emb.ids == tuple(range(49408, 49408 + n))
    assert tok.vocab_size == te.config.vocab_size == 49408 + n
    table = te.text_model.embeddings.token_embedding.weight
    assert table.shape == (49408 + n, C) and set(te.state_dict()) == keys
    assert_close(table[49408:], vecs, rtol=0, atol=0)  # the file's vectors, row by row
    assert tok.encode(f"a photo of {word}") == tok.encode("a photo of") + list(emb.ids)
    assert tok.encode(f"{word.upper()}, x") == [*emb.ids, *tok.encode(", x")]
    if n > 1:
        assert tok.encode(f"{word}_2") == [emb.ids[2]]  # each further token still matches alone


def test_name_argument_and_whole_words(tmp_path):
    path = write(tmp_path / "e.pt", "a1111-pt", vectors(1))
    tok, te = fresh()
    prompt.load_embedding(path, tok, te, name="zorblax")
    assert tok.encode("zorblax") == [49408]
    assert 49408 not in tok.encode("zorblaxes and prezorblax")  # not inside a longer word
    assert tok.decode(tok("a zorblax cat")[0]) == "a zorblax cat"


@functools.lru_cache(maxsize=1)
def _tiny_unet_vae():
    return ref_unet.diffusers_unet(UNetConfig.tiny()), ref_vae.tiny_pair()[1]


@functools.lru_cache(maxsize=1)
def _hf_tokenizer():
    from transformers import CLIPTokenizer as HFTokenizer

    folder = Path(tempfile.mkdtemp(prefix="ldm-tok-"))
    ref_sd.write_tokenizer_files(folder)
    return HFTokenizer.from_pretrained(folder)


def diffusers_pipe(hf_te):
    """A tiny diffusers StableDiffusionPipeline around `hf_te` with our vocabulary."""
    from diffusers import StableDiffusionPipeline

    unet, vae = _tiny_unet_vae()
    if not hasattr(hf_te, "text_model"):
        # diffusers 0.42's encode_prompt(clip_skip=...) calls text_encoder.text_model.final_layer_norm,
        # which transformers 5 moved onto the model itself; an unregistered alias bridges the two
        object.__setattr__(hf_te, "text_model", hf_te)
    return StableDiffusionPipeline(vae=vae, text_encoder=hf_te, tokenizer=copy.deepcopy(_hf_tokenizer()),
                                   unet=unet, scheduler=ref_sd.as_pipeline_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("fmt, n", [("a1111-pt", 1), ("a1111-pt", 4), ("diffusers-safetensors", 1),
                                    ("diffusers-bin", 2), ("a1111-safetensors", 3)])
def test_encoder_output_equals_diffusers_load_textual_inversion(tmp_path, fmt, n):
    fname, _ = FORMATS[fmt]
    path = write(tmp_path / fname, fmt, vectors(n))
    te, hf_te = ref_clip.pair(CLIPTextConfig.tiny())
    tok = CLIPTokenizer()
    prompt.load_embedding(path, tok, te, name="<tok>")
    pipe = diffusers_pipe(hf_te)
    pipe.load_textual_inversion(str(path), token="<tok>")
    for p in ["a photo of <tok>", "<tok> riding a horse, <tok>"]:
        assert tok(p)[0].tolist() == pipe.tokenizer(pipe.maybe_convert_prompt(p, pipe.tokenizer),
                                                    padding="max_length", max_length=77).input_ids
        with torch.no_grad():
            ref = pipe.encode_prompt(p, "cpu", 1, False)[0]
            ref_skip = pipe.encode_prompt(p, "cpu", 1, False, clip_skip=1)[0]  # diffusers skips 1 layer
            ours = prompt.encode(p, tok, te)
            ours_skip = prompt.encode(p, tok, te, clip_skip=2)  # = A1111's "Clip skip: 2"
            plain = te(tok(p))
        assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        assert_close(plain, ref, rtol=1e-5, atol=1e-5)
        assert_close(ours_skip, ref_skip, rtol=1e-5, atol=1e-5)


def test_multi_vector_embedding_stays_in_one_chunk(tmp_path):
    path = write(tmp_path / "trio.pt", "a1111-pt", vectors(3))
    tok, te = fresh()
    emb = prompt.load_embedding(path, tok, te)
    c0, c1 = prompt.chunk("cat " * 73 + "(trio:1.2)", tok)  # 73 + 3 > 75: all 3 move on
    assert c0.ids[74] == tok.eos_id and list(c1.ids[1:4]) == list(emb.ids)
    assert c1.weights[1:4] == pytest.approx((1.2,) * 3)


def assert_unchanged(tok, te):
    assert tok.vocab_size == 49408 and tok.added_words == {}
    assert te.config.vocab_size == 49408 and te.text_model.embeddings.token_embedding.weight.shape[0] == 49408


@pytest.mark.parametrize("make, match", [
    (lambda d: write(d / "wide.pt", "a1111-pt", torch.randn(2, 768)),
     r"wide\.pt: the embedding is 768 wide \(2 vectors\); this text encoder is 32 wide"),
    (lambda d: write(d / "ints.safetensors", "a1111-safetensors", torch.ones(1, C, dtype=torch.int32)),
     r"ints\.safetensors: the embedding holds torch.int32 values; expected floating-point"),
    (lambda d: write(d / "nan.pt", "a1111-pt", torch.full((1, C), float("nan"))),
     r"nan\.pt: the embedding holds NaN or infinite values"),
    (lambda d: write(d / "cube.pt", "a1111-pt", torch.randn(1, 2, C)),
     r"cube\.pt: the embedding has shape \(1, 2, 32\); expected \(n, C\)"),
    (lambda d: write(d / "cat.pt", "a1111-pt", vectors(1)),
     r"cat\.pt: token name 'cat' is already a token.*pass name="),
    (lambda d: (save_file({"clip_l": vectors(1), "clip_g": torch.randn(1, 1280)}, str(d / "xl.safetensors")),
                d / "xl.safetensors")[1], r"xl\.safetensors: an SDXL embedding"),
    (lambda d: (torch.save({"a": vectors(1), "b": vectors(1)}, d / "two.bin"), d / "two.bin")[1],
     r"two\.bin: not a textual-inversion embedding: keys \['a', 'b'\]"),
    (lambda d: (d / "empty.pt").write_bytes(b"") or d / "empty.pt", r"empty\.pt: the file is empty"),
])
def test_bad_files_are_one_line_naming_the_file_and_add_nothing(tmp_path, make, match):
    path = make(tmp_path)
    tok, te = fresh()
    with pytest.raises(prompt.EmbeddingError, match=match) as err:
        prompt.load_embedding(path, tok, te)
    assert "\n" not in str(err.value)
    assert_unchanged(tok, te)


def test_a_second_file_with_a_taken_name_adds_nothing(tmp_path):
    tok, te = fresh()
    prompt.load_embedding(write(tmp_path / "a.pt", "a1111-pt", vectors(2)), tok, te, name="<x>")
    before = te.text_model.embeddings.token_embedding.weight.clone()
    with pytest.raises(prompt.EmbeddingError, match=r"b\.pt: token name '<x>' is already a token"):
        prompt.load_embedding(write(tmp_path / "b.pt", "a1111-pt", vectors(3)), tok, te, name="<x>")
    assert tok.vocab_size == te.config.vocab_size == 49410
    assert_close(te.text_model.embeddings.token_embedding.weight, before, rtol=0, atol=0)


class _Exploit:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned",))


def test_a_pickle_that_calls_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": vectors(1)}, "name": _Exploit()}, path)
    tok, te = fresh()
    with pytest.raises(prompt.EmbeddingError, match=r"evil\.pt: unsafe pickle: it calls (posix|nt)\.system"):
        prompt.load_embedding(path, tok, te)
    assert_unchanged(tok, te)
