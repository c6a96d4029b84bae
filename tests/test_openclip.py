"""The OpenCLIP ViT-H/14 text tower (SD 2.x) against transformers.CLIPTextModel in SD 2's
configuration (23 layers, hidden 1024, gelu) on the same weights, converted with diffusers'
own single-file converter; its checkpoint names, its layout against torch's
nn.MultiheadAttention, and SD 2's zero padding in the tokenizer."""
import pytest
import torch
from torch.testing import assert_close

import ref_openclip
from ldm.openclip import OpenCLIPTextConfig, OpenCLIPTextModel
from ldm.tokenizer import CLIPTokenizer

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

TOL = dict(atol=1e-5, rtol=1e-5)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def tiny_pair():
    return ref_openclip.pair(OpenCLIPTextConfig.tiny())


@pytest.mark.parametrize("backend", ["math", "sdpa", "auto"])
@torch.no_grad()
def test_tiny_matches_transformers_every_layer(tiny_pair, backend):
    ours, hf = tiny_pair
    ours.backend = backend
    ids = ref_openclip.example_ids(batch=3)
    ctx, hidden = ours(ids, return_hidden_states=True)
    ref = hf(input_ids=ids, output_hidden_states=True)
    assert ctx.shape == (3, 77, 48)
    assert_close(ctx, ref.last_hidden_state, **TOL)
    # embeddings + the 2 blocks that run (the tiny tower has 3; SD 2 skips the last)
    assert len(hidden) == len(ref.hidden_states) == 3
    for h, r in zip(hidden, ref.hidden_states):
        assert_close(h, r, **TOL)
    ours.backend = "auto"


@torch.no_grad()
def test_clip_skip_counts_as_diffusers_does_for_sd2(tiny_pair):
    """clip_skip=1 is diffusers' encode_prompt(clip_skip=1) on SD 2: the 23-layer model's
    hidden_states[-2], then the final layer norm (one block before SD 2's penultimate)."""
    ours, hf = tiny_pair
    ids = ref_openclip.example_ids()
    ref = hf(input_ids=ids, output_hidden_states=True).hidden_states[-2]
    ref = getattr(hf, "text_model", hf).final_layer_norm(ref)
    assert_close(ours(ids, clip_skip=1), ref, **TOL)
    with pytest.raises(ValueError, match=r"clip_skip=2 must be an int in \[0, 1\]"):
        ours(ids, clip_skip=2)


@torch.no_grad()
def test_the_last_block_never_runs_and_layer_skip_0_runs_it(tiny_pair):
    ours, _ = tiny_pair
    ids = ref_openclip.example_ids(batch=1)
    before = ours(ids)
    last = ours.transformer.resblocks[-1]
    saved = {k: v.clone() for k, v in last.state_dict().items()}
    for p in last.parameters():
        p.add_(1.0)
    assert_close(ours(ids), before, atol=0, rtol=0)        # SD 2: block L-1 is dead weight
    every = OpenCLIPTextModel(OpenCLIPTextConfig(**{**OpenCLIPTextConfig.tiny().__dict__, "layer_skip": 0})).eval()
    every.load_state_dict(ours.state_dict(), strict=True)
    assert every.config.num_hidden_layers == 3
    assert not torch.allclose(every(ids), before)         # with layer_skip=0 it runs
    last.load_state_dict(saved)


@torch.no_grad()
def test_fused_in_proj_is_torch_multihead_attention(tiny_pair):
    """open_clip's blocks are torch.nn.MultiheadAttention with a causal mask: the same
    in_proj_weight / in_proj_bias / out_proj, loaded into torch's module, give our output."""
    ours, _ = tiny_pair
    attn = ours.transformer.resblocks[0].attn
    mha = torch.nn.MultiheadAttention(48, 4, batch_first=True).eval()
    mha.load_state_dict(attn.state_dict(), strict=True)
    x = torch.randn(2, 77, 48, generator=torch.Generator().manual_seed(3))
    mask = torch.full((77, 77), float("-inf")).triu(1)       # open_clip's build_causal_mask
    ref, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
    for backend in ("math", "sdpa"):
        assert_close(attn(x, backend=backend), ref, **TOL)


@torch.no_grad()
def test_gelu_not_quick_gelu(tiny_pair):
    """The activation matters: the same weights in a quick_gelu transformers model disagree."""
    from transformers import CLIPTextModel

    ours, hf = tiny_pair
    cfg = ref_openclip.hf_config(ours.config)
    cfg.hidden_act = "quick_gelu"
    quick = CLIPTextModel(cfg).eval()
    quick.load_state_dict(hf.state_dict(), strict=True)
    ids = ref_openclip.example_ids(batch=1)
    assert (ours(ids) - quick(input_ids=ids).last_hidden_state).abs().max() > 1e-3


@torch.no_grad()
def test_causal_mask_makes_early_tokens_blind_to_later_ones(tiny_pair):
    ours, _ = tiny_pair
    a = ref_openclip.example_ids(batch=1)
    b = a.clone()
    b[0, 10:] = 320
    ca, cb = ours(a), ours(b)
    assert_close(ca[:, :10], cb[:, :10], atol=0, rtol=0)
    assert not torch.allclose(ca[:, 10:], cb[:, 10:])


def test_parameter_names_are_the_single_file_keys():
    """DESIGN.md §5: cond_stage_model.model.{token_embedding.weight, positional_embedding,
    transformer.resblocks.N.{ln_1, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_2,
    mlp.c_fc, mlp.c_proj}, ln_final, text_projection, logit_scale}: 24 x 12 + 6 = 294 tensors."""
    with torch.device("meta"):
        sd = OpenCLIPTextModel(OpenCLIPTextConfig.full()).state_dict()
    assert len(sd) == 294
    block = {f"transformer.resblocks.23.{n}": shape for n, shape in {
        "ln_1.weight": (1024,), "ln_1.bias": (1024,),
        "attn.in_proj_weight": (3072, 1024), "attn.in_proj_bias": (3072,),
        "attn.out_proj.weight": (1024, 1024), "attn.out_proj.bias": (1024,),
        "ln_2.weight": (1024,), "ln_2.bias": (1024,),
        "mlp.c_fc.weight": (4096, 1024), "mlp.c_fc.bias": (4096,),
        "mlp.c_proj.weight": (1024, 4096), "mlp.c_proj.bias": (1024,)}.items()}
    top = {"token_embedding.weight": (49408, 1024), "positional_embedding": (77, 1024),
           "ln_final.weight": (1024,), "ln_final.bias": (1024,),
           "text_projection": (1024, 1024), "logit_scale": ()}
    for key, shape in {**block, **top}.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any("resblocks.24." in k for k in sd)


def test_single_file_state_dict_loads_strictly(tiny_pair):
    ours, _ = tiny_pair
    checkpoint = ref_openclip.single_file(ours)          # cond_stage_model.model.* as in SD 2 files
    stripped = {k.removeprefix(ref_openclip.PREFIX): v for k, v in checkpoint.items()}
    fresh = OpenCLIPTextModel(OpenCLIPTextConfig.tiny())
    fresh.load_state_dict(stripped, strict=True)
    with pytest.raises(RuntimeError, match="in_proj_weight"):
        fresh.load_state_dict({k: v for k, v in stripped.items() if "in_proj_weight" not in k}, strict=True)


@torch.no_grad()
def test_add_embeddings_appends_rows(tiny_pair):
    ours, _ = tiny_pair
    model = OpenCLIPTextModel(OpenCLIPTextConfig.tiny()).eval()
    model.load_state_dict(ours.state_dict())
    rows = torch.randn(2, 48)
    assert model.add_embeddings(rows) == [49408, 49409]
    assert model.config.vocab_size == 49410 and model.token_embedding.weight.shape == (49410, 48)
    assert_close(model.token_embedding.weight[-2:], rows, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"expected a float tensor \(n >= 1, 48\)"):
        model.add_embeddings(torch.randn(1, 32))


def test_config_and_errors():
    full = OpenCLIPTextConfig.full()
    assert (full.width, full.layers, full.heads, full.context_length, full.vocab_size) == (1024, 24, 16, 77, 49408)
    assert (full.hidden_size, full.num_hidden_layers, full.intermediate_size) == (1024, 23, 4096)
    with pytest.raises(ValueError, match=r"width=50 must be divisible by heads=4"):
        OpenCLIPTextConfig(width=50, heads=4)
    with pytest.raises(ValueError, match=r"layer_skip=3 must be in \[0, layers - 1 = 2\]"):
        OpenCLIPTextConfig(layers=3, layer_skip=3)
    with pytest.raises(ValueError, match=r"backend='fast' is not one of"):
        OpenCLIPTextModel(OpenCLIPTextConfig.tiny(), backend="fast")
    model = OpenCLIPTextModel(OpenCLIPTextConfig.tiny())
    for bad, match in [(torch.zeros(2, 78, dtype=torch.long), "at most 77"),
                       (torch.zeros(77, dtype=torch.long), r"shape \(B, T\)"),
                       (torch.zeros(1, 77), "integer")]:
        with pytest.raises(ValueError, match=match):
            model(bad)
    model.backend = "triton"                              # the flash kernel has no causal mask
    with pytest.raises(ValueError, match=r"causal=True is not supported by backend='triton'"):
        model(torch.zeros(1, 77, dtype=torch.long))


# ---- SD 2's tokenizer: the same BPE, padded with 0 ------------------------------------------

def test_tokenizer_pads_with_zero_like_sd2s_reference():
    """diffusers' SD 2 tokenizer is transformers' CLIPTokenizer with pad_token "!" (id 0)."""
    import transformers
    import ref_sd

    vocab, merges = ref_sd.clip_vocab_and_merges()
    ref = transformers.CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!")
    ours = CLIPTokenizer(pad_id=0)
    prompts = ["a photograph of an astronaut riding a horse", "", "a dog " * 60]   # short, empty, truncated
    with pytest.warns(UserWarning, match="were dropped"):
        ids = ours(prompts)
    expected = ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    assert_close(ids, expected, atol=0, rtol=0)
    assert ids[0, :11].tolist() == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407, 0]
    assert ids[1, :3].tolist() == [49406, 49407, 0] and ids[2, -1] == 49407
    assert ours.decode(ids[0]) == "a photograph of an astronaut riding a horse"   # padding dropped
    assert ours.decode([320, 0]) == "a !"                # 0 is "!": kept where it is no padding
    assert "pad_id=0" in repr(ours) and CLIPTokenizer().pad_id == 49407   # SD 1.x unchanged
    with pytest.raises(ValueError, match=r"pad_id=-1 must be None .* or an id in \[0, 49408\)"):
        CLIPTokenizer(pad_id=-1)


# ---- full size ------------------------------------------------------------------------------

@pytest.mark.full
@torch.no_grad()
def test_full_size_matches_transformers():
    """ViT-H/14, random weights: all 294 names through diffusers' converter into a strict
    23-layer transformers CLIPTextModel (inside full_pair), then 77 tokens, both backends."""
    ours, hf = ref_openclip.full_pair()
    ids = ref_openclip.example_ids(batch=2)
    ref = hf(input_ids=ids).last_hidden_state
    for backend in ("sdpa", "math"):
        ours.backend = backend
        ctx = ours(ids)
        assert ctx.shape == (2, 77, 1024)
        err = (ctx - ref).abs().max().item()
        print(f"OpenCLIP ViT-H full-size ({backend}) max |ours - transformers| = {err:.2e}")
        assert_close(ctx, ref, atol=1e-4, rtol=1e-4)
    ours.backend = "auto"


# ---- SDXL's second tower: ViT-bigG, penultimate without ln_final, and the pooled vector -------

@pytest.fixture(scope="module")
def tiny_bigg_pair():
    return ref_openclip.sdxl_pair(OpenCLIPTextConfig.tiny_bigg())


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@torch.no_grad()
def test_tiny_bigg_matches_transformers_with_projection(tiny_bigg_pair, backend):
    """SDXL's use (diffusers' encode_prompt): the every-block model's hidden_states[-2] with no
    final layer norm is the context, its text_embeds the pooled vector."""
    ours, hf = tiny_bigg_pair
    ours.backend = backend
    ids = ref_openclip.example_ids(batch=3)
    context, pooled = ours.encode(ids)
    ref = hf(input_ids=ids, output_hidden_states=True)
    assert context.shape == (3, 77, 64) and pooled.shape == (3, 64)
    assert len(ref.hidden_states) == 4                        # embeddings + 3 blocks, all run
    assert_close(context, ref.hidden_states[-2], **TOL)
    assert_close(pooled, ref.text_embeds, **TOL)
    assert_close(ours(ids), context, atol=0, rtol=0)          # forward gives the same context
    ours.backend = "auto"


@torch.no_grad()
def test_sdxl_context_has_no_final_norm_and_the_last_block_only_feeds_pooled(tiny_bigg_pair):
    ours, _ = tiny_bigg_pair
    ids = ref_openclip.example_ids(batch=1)
    context, hidden = ours(ids, return_hidden_states=True)
    assert len(hidden) == 3                                   # forward runs the 2 blocks the context needs
    assert_close(context, hidden[-1], atol=0, rtol=0)         # the raw hidden state
    assert not torch.allclose(context, ours.ln_final(context), atol=1e-3)
    last = ours.transformer.resblocks[-1]
    saved = {k: v.clone() for k, v in last.state_dict().items()}
    before = ours.encode(ids)
    for p in last.parameters():
        p.add_(0.5)
    after = ours.encode(ids)
    last.load_state_dict(saved)
    assert_close(after[0], before[0], atol=0, rtol=0)         # the context never sees the last block
    assert not torch.allclose(after[1], before[1])            # the pooled vector does


@torch.no_grad()
def test_sdxl_clip_skip_moves_the_context_not_the_pooled_vector(tiny_bigg_pair):
    """diffusers' SDXL encode_prompt(clip_skip=n): hidden_states[-(n + 2)], no final LN; pooled unchanged."""
    ours, hf = tiny_bigg_pair
    ids = ref_openclip.example_ids()
    ref = hf(input_ids=ids, output_hidden_states=True)
    context, pooled = ours.encode(ids, clip_skip=1)
    assert_close(context, ref.hidden_states[-3], **TOL)
    assert_close(pooled, ref.text_embeds, **TOL)
    assert ours.config.num_hidden_layers == 2                 # clip_skip in [0, 1]
    with pytest.raises(ValueError, match=r"clip_skip=2 must be an int in \[0, 1\]"):
        ours.encode(ids, clip_skip=2)


@torch.no_grad()
def test_pooled_is_taken_at_eot_and_projected_as_x_at_p(tiny_bigg_pair):
    """The EOT position is the row's highest id; text_projection is (width, embed_dim) used as
    x @ P, and diffusers stores P.T: square, so only the numbers tell the two apart."""
    ours, hf = tiny_bigg_pair
    ids = ref_openclip.example_ids()
    P = ours.text_projection
    assert P.shape == (64, 64)
    assert_close(hf.text_projection.weight, P.T, atol=0, rtol=0)
    _, pooled = ours.encode(ids)
    last = hf(input_ids=ids, output_hidden_states=True).hidden_states[-1]   # every block's output
    eot = [int((row == 49407).nonzero()[0]) for row in ids]   # BOS, tokens, EOT, 0 padding
    x = ours.ln_final(last[torch.arange(2), eot])
    assert_close(pooled, x @ P, **TOL)
    assert (pooled - x @ P.T).abs().max() > 1e-2              # the missing transpose is wrong, silently


@torch.no_grad()
def test_encode_on_vit_h_gives_open_clips_text_embedding_and_sd2_context(tiny_pair):
    """SD 2.x's forward is unchanged (23 of 24 blocks, ln_final); encode runs the last block too
    for the pooled vector, open_clip's encode_text: transformers' text_embeds of every block."""
    ours, hf23 = tiny_pair
    hf = ref_openclip.to_transformers_with_projection(ours)
    ids = ref_openclip.example_ids()
    context, pooled = ours.encode(ids)
    assert_close(context, ours(ids), atol=0, rtol=0)
    assert_close(context, hf23(input_ids=ids).last_hidden_state, **TOL)
    assert_close(pooled, hf(input_ids=ids).text_embeds, **TOL)
    assert pooled.shape == (2, 40)


def test_bigg_config_and_names():
    """DESIGN.md §5: conditioner.embedders.1.model.* exactly 390 tensors (32 blocks x 12 + 6)."""
    from ldm.clip import CLIPTextConfig

    g = OpenCLIPTextConfig.bigg()
    assert (g.width, g.layers, g.heads, g.intermediate_size, g.embed_dim) == (1280, 32, 20, 5120, 1280)
    assert (g.layer_skip, g.final_norm_on_context, g.num_hidden_layers, g.hidden_size) == (1, False, 31, 1280)
    assert OpenCLIPTextConfig.full().final_norm_on_context               # SD 2.x keeps ln_final
    assert OpenCLIPTextConfig.tiny_bigg().width != CLIPTextConfig.tiny().hidden_size
    with torch.device("meta"):
        sd = OpenCLIPTextModel(g).state_dict()
    assert len(sd) == 390
    assert tuple(sd["text_projection"].shape) == (1280, 1280)
    assert tuple(sd["transformer.resblocks.31.attn.in_proj_weight"].shape) == (3840, 1280)
    assert tuple(sd["transformer.resblocks.31.mlp.c_fc.weight"].shape) == (5120, 1280)


def test_bigg_configs_survive_the_file_metadata():
    """ldm.configs metadata holds positive ints and booleans: both towers' configs are expressible."""
    import dataclasses
    import json

    from ldm.checkpoint.configs import _config_from_dict

    for cfg in (OpenCLIPTextConfig.full(), OpenCLIPTextConfig.bigg(), OpenCLIPTextConfig.tiny_bigg()):
        stored = json.loads(json.dumps(dataclasses.asdict(cfg)))
        assert _config_from_dict(OpenCLIPTextConfig, stored, "test") == cfg


@pytest.mark.full
@torch.no_grad()
def test_full_size_bigg_matches_transformers_with_projection():
    """ViT-bigG/14, random weights (ldm.weights.random_init_): all 390 names under SDXL's prefix
    through diffusers' converter into a strict 32-layer CLIPTextModelWithProjection, then 77
    tokens, both backends: hidden_states[-2] = our context, text_embeds = our pooled vector."""
    ours, hf = ref_openclip.full_sdxl_pair()
    ids = ref_openclip.example_ids(batch=2)
    ref = hf(input_ids=ids, output_hidden_states=True)
    for backend in ("sdpa", "math"):
        ours.backend = backend
        context, pooled = ours.encode(ids)
        assert context.shape == (2, 77, 1280) and pooled.shape == (2, 1280)
        errs = [(context - ref.hidden_states[-2]).abs().max().item(), (pooled - ref.text_embeds).abs().max().item()]
        print(f"OpenCLIP ViT-bigG full-size ({backend}) max |ours - transformers|: "
              f"context {errs[0]:.2e}, pooled {errs[1]:.2e}")
        assert_close(context, ref.hidden_states[-2], atol=1e-4, rtol=1e-4)
        assert_close(pooled, ref.text_embeds, atol=1e-4, rtol=1e-4)
    ours.backend = "auto"
