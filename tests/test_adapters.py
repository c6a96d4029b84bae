"""Adapters and prompt options on the pipeline and the CLI: pipe.load_lora / unload_loras,
pipe.load_embedding, clip_skip, prompt_syntax="a1111", and the PNG text that records them as
AUTOMATIC1111 writes it. On ldm's shipped model (small, and loads in a second); the formats
themselves are tested against diffusers in test_lora.py, test_prompt.py and test_embeddings.py."""
from __future__ import annotations

import hashlib
import re

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import ldm
from ldm import cli, images, lora, weights
from ldm.tokenizer import CLIPTokenizer

GEN = dict(steps=3, seed=5, progress=False)


@pytest.fixture(scope="module")
def pipe():
    return ldm.load(weights.SHIPPED, device="cpu", dtype=torch.float32)


def write_lora(path, pipe, seed=0, rank=2, alpha=1.0):
    """A kohya file adapting every attention q/k/v/out projection of the UNet and every q/v of the
    text encoder, with up and down random (a real LoRA starts up at 0; random makes it matter)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for prefix, model, pattern in (("lora_unet_", pipe.unet, r"attn[12]\.to_(q|k|v|out\.0)$"),
                                   ("lora_te_", pipe.text_encoder, r"self_attn\.(q|v)_proj$")):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and re.search(pattern, name):
                key = prefix + name.replace(".", "_")
                sd[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.5
                sd[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.5
                sd[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path), metadata={"ss_network_dim": str(rank)})
    return path


def addnet_hash(path) -> str:
    """kohya's / A1111's LoRA hash, written out: SHA-256 of the bytes after the safetensors header."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()[:12]


def test_load_lora_changes_the_image_and_unload_restores_every_weight(pipe, tmp_path):
    before = {k: v.clone() for k, v in [*pipe.unet.state_dict().items(), *pipe.text_encoder.state_dict().items()]}
    base = pipe.generate("a red circle", **GEN)
    path = write_lora(tmp_path / "style.safetensors", pipe)
    loaded = pipe.load_lora(path, 0.8)
    assert loaded.name == "style" and loaded.weight == 0.8 and loaded.handle.num_modules > 0
    adapted = pipe.generate("a red circle", **GEN)
    assert (adapted.latents - base.latents).abs().max() > 1e-2
    text = adapted.parameters[0]
    assert text.splitlines()[0] == "a red circle <lora:style:0.8>"
    assert f'Lora hashes: "style: {addnet_hash(path)}"' in text
    pipe.unload_loras()
    assert pipe.loras == []
    after = {k: v for k, v in [*pipe.unet.state_dict().items(), *pipe.text_encoder.state_dict().items()]}
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit
    again = pipe.generate("a red circle", **GEN)
    assert torch.equal(again.latents, base.latents)
    assert "lora" not in again.parameters[0].lower()


def test_merged_and_hooked_lora_give_the_same_image(pipe, tmp_path):
    path = write_lora(tmp_path / "a.safetensors", pipe, seed=1)
    pipe.load_lora(path, 0.5)
    merged = pipe.generate("a blue square", **GEN).latents
    pipe.unload_loras()
    pipe.load_lora(path, 0.5, merge=False)
    hooked = pipe.generate("a blue square", **GEN).latents
    pipe.unload_loras()
    torch.testing.assert_close(hooked, merged, rtol=1e-4, atol=1e-4)  # (W + dW) x vs W x + dW x in fp32


def test_a_refused_lora_leaves_the_pipeline_as_it_was(pipe, tmp_path):
    bad = tmp_path / "sdxl.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 64),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(64, 2)}, str(bad))
    before = pipe.generate("a red circle", **GEN).latents
    with pytest.raises(lora.LoRAError, match="SDXL"):
        pipe.load_lora(bad)
    assert pipe.loras == []
    assert torch.equal(pipe.generate("a red circle", **GEN).latents, before)


def test_clip_skip_takes_the_earlier_layer_and_is_recorded(pipe):
    ids = CLIPTokenizer()(["a red circle"])
    with torch.no_grad():
        want = pipe.text_encoder(ids, clip_skip=1)
    got = pipe.encode_prompt(["a red circle"], clip_skip=2)
    assert torch.equal(got, want)
    assert not torch.equal(got, pipe.encode_prompt(["a red circle"]))
    r = pipe.generate("a red circle", clip_skip=2, **GEN)
    assert "Clip skip: 2" in r.parameters[0]
    assert "Clip skip" not in pipe.generate("a red circle", **GEN).parameters[0]  # A1111 omits the default
    L = pipe.text_encoder.config.num_hidden_layers
    for bad in (0, L + 1, 1.5, True):
        with pytest.raises(ValueError, match=rf"clip_skip={bad!r} must be an int in \[1, {L}\]"):
            pipe.generate("a red circle", clip_skip=bad, **GEN)


def test_a1111_syntax_weights_and_reads_past_75_tokens(pipe):
    # a plain prompt reads the same either way
    plain = pipe.generate("a red circle", **GEN)
    assert torch.equal(pipe.generate("a red circle", prompt_syntax="a1111", **GEN).latents, plain.latents)
    # brackets are weights, not text
    ctx = pipe.encode_prompt(["a (red:1.5) circle"], prompt_syntax="a1111")
    assert ctx.shape == (1, 77, pipe.text_encoder.config.hidden_size)
    assert not torch.equal(ctx, pipe.encode_prompt(["a red circle"], prompt_syntax="a1111"))
    # 100 tokens: two chunks for the prompt, and the negative prompt padded to two as well
    long = " ".join(["red"] * 100)
    with pytest.warns(UserWarning, match="truncat|75"):
        pipe.encode_prompt([long])  # the plain path keeps its warning
    assert pipe.encode_prompt([long, ""], prompt_syntax="a1111").shape[1] == 154
    r = pipe.generate(long, negative_prompt="blue", prompt_syntax="a1111", **GEN)
    assert "Prompt syntax: a1111" in r.parameters[0]
    with pytest.raises(ValueError, match="prompt_syntax='compel' must be one of"):
        pipe.generate("a red circle", prompt_syntax="compel", **GEN)


def test_embedding_word_in_the_prompt_and_its_hash(tmp_path):
    pipe = ldm.load(weights.SHIPPED, device="cpu", dtype=torch.float32)  # its own: the tokenizer grows
    C = pipe.text_encoder.config.hidden_size
    path = tmp_path / "shiny.safetensors"
    red = pipe.text_encoder.text_model.embeddings.token_embedding.weight[CLIPTokenizer().encode("red")[0]]
    save_file({"emb_params": torch.stack([red.detach(), red.detach()])}, str(path))  # two vectors, both "red"
    emb = pipe.load_embedding(path)
    assert emb.name == "shiny" and len(emb.ids) == 2
    r = pipe.generate("a shiny circle", **GEN)
    whole = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert images.short_hash(path) == whole
    assert f'TI hashes: "shiny: {whole}"' in r.parameters[0]
    assert "TI hashes" not in pipe.generate("a red circle", **GEN).parameters[0]  # listed only when used
    wide = tmp_path / "wide.safetensors"
    save_file({"emb_params": torch.zeros(1, C + 1)}, str(wide))
    with pytest.raises(ValueError, match=f"{C + 1} wide .* this text encoder is {C} wide"):
        pipe.load_embedding(wide)


# ---- the CLI ----------------------------------------------------------------------------------


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LDM_CHECKPOINT", raising=False)
    return tmp_path


def test_cli_lora_embedding_clip_skip_in_the_png(in_tmp, pipe, capsys):
    write_lora(in_tmp / "style.safetensors", pipe)
    red = pipe.text_encoder.text_model.embeddings.token_embedding.weight[CLIPTokenizer().encode("red")[0]]
    save_file({"emb_params": red.detach()[None].clone()}, str(in_tmp / "crimson.safetensors"))
    rc, out, err = run(capsys, "generate", "a (crimson:1.2) circle", "--lora", "style.safetensors:0.7",
                       "--embedding", "crimson.safetensors", "--clip-skip", "2", "--prompt-syntax", "a1111",
                       "--steps", "2", "--seed", "1", "-q")
    assert rc == 0, err
    png = next((in_tmp / "outputs").glob("*.png"))
    with Image.open(png) as im:
        text = im.text["parameters"]
    lines = text.splitlines()
    assert lines[0] == "a (crimson:1.2) circle <lora:style:0.7>"
    assert "Clip skip: 2" in lines[-1] and 'Lora hashes: "style: ' in lines[-1] and 'TI hashes: "crimson: ' in lines[-1]


@pytest.mark.parametrize("argv, expected", [
    (("--lora", "style.safetensors:strong"), "the weight 'strong' is not a number"),
    (("--lora", "missing.safetensors"), "--lora missing.safetensors: no such file"),
    (("--embedding", "missing.pt"), "--embedding missing.pt: no such file"),
    (("--clip-skip", "9"), "clip_skip=9 must be an int in [1, 4]"),
    (("--lora", "sdxl.safetensors"), "SDXL"),
])
def test_cli_bad_adapter_input_is_one_line(in_tmp, pipe, capsys, argv, expected):
    write_lora(in_tmp / "style.safetensors", pipe)
    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 64),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(64, 2)},
              str(in_tmp / "sdxl.safetensors"))
    rc, out, err = run(capsys, "generate", "a red circle", "--steps", "1", "-q", *argv)
    assert rc == 1 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (in_tmp / "outputs").exists() or not list((in_tmp / "outputs").glob("*.png"))
