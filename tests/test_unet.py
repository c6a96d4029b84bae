"""The UNet against diffusers' UNet2DConditionModel on the same weights: every block type, the
whole model (tiny and full size: SD 1.x, 2.x, SDXL), the backends against each other, the stored reference
tensors, the architecture table, the inspection API and the error messages."""
import dataclasses
import re
from pathlib import Path

import pytest
import torch
from einops import rearrange
from safetensors.torch import load_file

import ref_unet
from ldm.unet import (CrossAttention, UNetConfig, UNetModel,
                      timestep_embedding)

ROOT = Path(__file__).resolve().parents[1]
TOL = dict(atol=1e-4, rtol=1e-4)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def tiny_pair():
    pytest.importorskip("diffusers")
    model = ref_unet.ours(UNetConfig.tiny(), seed=0)
    return model, ref_unet.to_diffusers(model)


def inputs(cfg, B=2, h=8, w=8, T=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, cfg.in_channels, h, w, generator=g), torch.tensor([1.0, 981.0])[:B],
            torch.randn(B, T, cfg.context_dim, generator=g))


# ---- blocks ---------------------------------------------------------------------------------

def test_timestep_embedding_matches_diffusers():
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    t = torch.tensor([0.0, 1.0, 250.0, 999.0])
    ref = embeddings.get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, 320), ref, atol=0, rtol=0)
    assert timestep_embedding(t, 320)[0, :160].eq(1).all()   # t = 0: cos(0) = 1 comes first


@torch.no_grad()
def test_every_block_type_matches_diffusers(tiny_pair):
    """Our blocks and diffusers' blocks share tensors (through the converter); same inputs in."""
    ours, ref = tiny_pair
    g = torch.Generator().manual_seed(2)
    t, ctx = torch.tensor([3.0, 700.0]), torch.randn(2, 7, 32, generator=g)
    emb = ours.time_embed(timestep_embedding(t, 32))
    torch.testing.assert_close(emb, ref.time_embedding(ref.time_proj(t)), **TOL)
    x32, x64 = torch.randn(2, 32, 8, 8, generator=g), torch.randn(2, 64, 4, 4, generator=g)
    h32 = torch.randn(2, 64, 32, generator=g)                # 64 tokens of width 32
    x4 = torch.randn(2, 4, 8, 8, generator=g)
    st, st_ref = ours.input_blocks[1][1], ref.down_blocks[0].attentions[0]
    blk, blk_ref = st.transformer_blocks[0], st_ref.transformer_blocks[0]
    cases = {
        "conv_in": (ours.input_blocks[0][0](x4), ref.conv_in(x4)),
        "ResBlock": (ours.input_blocks[1][0](x32, emb), ref.down_blocks[0].resnets[0](x32, emb)),
        "ResBlock 1x1 skip": (ours.input_blocks[4][0](x32[..., :4, :4], emb),
                              ref.down_blocks[1].resnets[0](x32[..., :4, :4], emb)),
        "Downsample": (ours.input_blocks[3][0](x32), ref.down_blocks[0].downsamplers[0](x32)),
        "Upsample": (ours.output_blocks[2][1](x64), ref.up_blocks[0].upsamplers[0](x64)),
        "self-attention": (blk.attn1(h32), blk_ref.attn1(h32)),
        "cross-attention": (blk.attn2(h32, ctx), blk_ref.attn2(h32, encoder_hidden_states=ctx)),
        "GEGLU feed-forward": (blk.ff(h32), blk_ref.ff(h32)),
        "BasicTransformerBlock": (blk(h32, ctx, "math"), blk_ref(h32, encoder_hidden_states=ctx)),
        "SpatialTransformer": (st(x32, ctx, "math"), st_ref(x32, encoder_hidden_states=ctx).sample),
        "middle_block": (ours.middle_block(x64, emb, ctx, "sdpa"),
                         ref.mid_block(x64, emb, encoder_hidden_states=ctx)),
        "out": (ours.out(x32), ref.conv_out(ref.conv_act(ref.conv_norm_out(x32)))),
    }
    for name, (a, b) in cases.items():
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{name}: {m}")


# ---- whole model, tiny ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["math", "sdpa", "auto"])
@torch.no_grad()
def test_tiny_unet_matches_diffusers(tiny_pair, backend):
    ours, ref = tiny_pair
    x, t, ctx = inputs(ours.cfg, h=16, w=8)                  # non-square latent
    expected = ref(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(ours(x, t, ctx, attention_backend=backend), expected, **TOL)


@torch.no_grad()
def test_a_vector_through_label_emb_matches_diffusers():
    """UNetConfig.adm_in_channels: y (B, adm) through label_emb joins the time embedding (CompVis'
    num_classes="sequential", SDXL's size and pooled-text vector) = diffusers' projection class embedding."""
    pytest.importorskip("diffusers")
    cfg = dataclasses.replace(UNetConfig.tiny(), adm_in_channels=12)
    ours = ref_unet.ours(cfg, seed=5)
    x, t, ctx = inputs(cfg)
    y = torch.randn(2, 12, generator=torch.Generator().manual_seed(2))
    ref = ref_unet.to_diffusers(ours)
    torch.testing.assert_close(ours(x, t, ctx, y), ref(x, t, encoder_hidden_states=ctx, class_labels=y).sample, **TOL)
    assert (ours(x, t, ctx, y) - ours(x, t, ctx, torch.zeros_like(y))).abs().max() > 1e-3  # y matters
    with pytest.raises(ValueError, match=r"y must be \(B=2, 12\), got None"):
        ours(x, t, ctx)
    with pytest.raises(ValueError, match="this UNet takes no vector"):
        ref_unet.ours(UNetConfig.tiny())(x, t, ctx, y)


@pytest.mark.parametrize("h, w", [(9, 8), (7, 13), (5, 5)])
@torch.no_grad()
def test_latent_sides_that_do_not_halve_evenly_match_diffusers(h, w):
    """Any multiple of 8 px is a valid image side (a 72 px side is a 9-wide latent): each
    Upsample lands on its skip's size, as diffusers' forward_upsample_size does."""
    pytest.importorskip("diffusers")
    cfg = UNetConfig(**{**UNetConfig.tiny().__dict__, "channel_mult": (1, 2, 2), "num_res_blocks": 1})
    ours = ref_unet.ours(cfg, seed=4)
    x, t, ctx = inputs(cfg, h=h, w=w)
    eps = ours(x, t, ctx)
    assert eps.shape == x.shape
    torch.testing.assert_close(eps, ref_unet.to_diffusers(ours)(x, t, encoder_hidden_states=ctx).sample, **TOL)


@pytest.mark.parametrize("cfg", [
    UNetConfig(**{**UNetConfig.tiny().__dict__, "in_channels": 9}),                  # SD 1.5 inpainting
    UNetConfig(**{**UNetConfig.tiny().__dict__, "transformer_depth": 2, "attention_resolutions": (1, 2)}),
    UNetConfig(**{**UNetConfig.tiny().__dict__, "channel_mult": (1, 2, 2), "num_res_blocks": 1}),
], ids=["inpainting-9ch", "depth2-attn-everywhere", "three-levels"])
@torch.no_grad()
def test_tiny_variants_match_diffusers(cfg):
    pytest.importorskip("diffusers")
    ours = ref_unet.ours(cfg, seed=3)
    ref = ref_unet.to_diffusers(ours)
    x, t, ctx = inputs(cfg, B=1)
    torch.testing.assert_close(ours(x, t, ctx), ref(x, t, encoder_hidden_states=ctx).sample, **TOL)


@torch.no_grad()
def test_scalar_timestep_is_broadcast(tiny_pair):
    ours, _ = tiny_pair
    x, _, ctx = inputs(ours.cfg)
    torch.testing.assert_close(ours(x, 500, ctx), ours(x, torch.tensor([500, 500]), ctx), atol=0, rtol=0)
    torch.testing.assert_close(ours(x, torch.tensor(500.0), ctx), ours(x, 500, ctx), atol=0, rtol=0)


@torch.no_grad()
def test_stored_reference_tensors():
    """Our model on the stored weights and inputs gives the stored diffusers output (no diffusers here)."""
    stored = load_file(str(ROOT / "tests" / "reference" / "unet_tiny.safetensors"))
    weights = {k[len("weights."):]: v.float() for k, v in stored.items() if k.startswith("weights.")}
    model = UNetModel(ref_unet.STORED_CONFIG).eval()
    model.load_state_dict(weights, strict=True)
    eps = model(stored["inputs.x"], stored["inputs.t"], stored["inputs.context"])
    torch.testing.assert_close(eps, stored["outputs.eps"], **TOL)
    eps_math = model(stored["inputs.x"], stored["inputs.t"], stored["inputs.context"], attention_backend="math")
    torch.testing.assert_close(eps_math, stored["outputs.eps"], **TOL)


# ---- SD 2.x: head dim 64, linear proj_in/proj_out, context 1024 -----------------------------

@pytest.fixture(scope="module")
def tiny_sd2_pair():
    pytest.importorskip("diffusers")
    model = ref_unet.ours(UNetConfig.tiny_sd2(), seed=5)
    return model, ref_unet.to_diffusers(model)


def test_sd2_config_is_sd1_with_three_changes():
    sd1, sd2 = UNetConfig(), UNetConfig.sd2()
    changed = {k for k in sd1.__dict__ if getattr(sd1, k) != getattr(sd2, k)}
    assert changed == {"num_head_channels", "use_linear_in_transformer", "context_dim"}
    assert (sd2.num_head_channels, sd2.use_linear_in_transformer, sd2.context_dim) == (64, True, 1024)
    assert [sd2.heads(320 * m) for m in (1, 2, 4)] == [(5, 64), (10, 64), (20, 64)]
    assert [sd1.heads(320 * m) for m in (1, 2, 4)] == [(8, 40), (8, 80), (8, 160)]
    assert UNetConfig.sd2(in_channels=9).in_channels == 9     # 512-inpainting
    assert ref_unet.diffusers_unet_config(sd2)["attention_head_dim"] == (5, 10, 20, 20)
    with pytest.raises(ValueError, match=r"width model_channels\*mult=320 must be divisible by 32 .* "
                                         r"and num_head_channels=48"):
        UNetConfig.sd2(num_head_channels=48)
    with pytest.raises(ValueError, match=r"num_head_channels=0 must be >= 1"):
        UNetConfig.sd2(num_head_channels=0)


@torch.no_grad()
def test_sd2_blocks_match_diffusers(tiny_sd2_pair):
    """The linear-projection SpatialTransformer (per-level head counts: 2 x 16, then 4 x 16 in
    the middle) and its attention against diffusers' blocks on shared tensors."""
    ours, ref = tiny_sd2_pair
    g = torch.Generator().manual_seed(6)
    ctx = torch.randn(2, 7, 48, generator=g)
    x32, x64 = torch.randn(2, 32, 8, 8, generator=g), torch.randn(2, 64, 4, 4, generator=g)
    st, st_ref = ours.input_blocks[1][1], ref.down_blocks[0].attentions[0]
    assert isinstance(st.proj_in, torch.nn.Linear) and st.proj_in.weight.shape == (32, 32)
    assert st.transformer_blocks[0].attn1.heads == 2 and ours.middle_block[1].transformer_blocks[0].attn1.heads == 4
    h = torch.randn(2, 64, 32, generator=g)
    emb = ours.time_embed(timestep_embedding(torch.tensor([3.0, 700.0]), 32))
    cases = {
        "cross-attention": (st.transformer_blocks[0].attn2(h, ctx),
                            st_ref.transformer_blocks[0].attn2(h, encoder_hidden_states=ctx)),
        "SpatialTransformer (linear)": (st(x32, ctx, "math"), st_ref(x32, encoder_hidden_states=ctx).sample),
        "middle_block": (ours.middle_block(x64, emb, ctx, "sdpa"), ref.mid_block(x64, emb, encoder_hidden_states=ctx)),
    }
    for name, (a, b) in cases.items():
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["math", "sdpa", "auto"])
@torch.no_grad()
def test_tiny_sd2_unet_matches_diffusers(tiny_sd2_pair, backend):
    ours, ref = tiny_sd2_pair
    x, t, ctx = inputs(ours.cfg, h=16, w=8)
    expected = ref(x, t, encoder_hidden_states=ctx).sample
    eps = ours(x, t, ctx, attention_backend=backend)
    print(f"SD 2 tiny UNet ({backend}) max |ours - diffusers| = {(eps - expected).abs().max().item():.2e}")
    torch.testing.assert_close(eps, expected, **TOL)


@torch.no_grad()
def test_half_precision_attention_survives_scores_beyond_fp16(tiny_sd2_pair):
    """SD 2.x's black images: q k^T past fp16's 65504 turns a naive fp16 softmax into NaN.
    With to_q/to_k scaled up so that the scores overflow in fp16, the fp16 UNet stays finite
    on every CPU backend (the scores and softmax are fp32 inside ldm.attention)."""
    ours, _ = tiny_sd2_pair
    model = ref_unet.ours(UNetConfig.tiny_sd2(), seed=5)
    model.load_state_dict(ours.state_dict())
    for m in model.modules():
        if isinstance(m, CrossAttention):
            m.to_q.weight.mul_(200)
            m.to_k.weight.mul_(200)
    x, t, ctx = inputs(model.cfg)
    attn1 = model.input_blocks[1][1].transformer_blocks[0].attn1
    seen = {}
    hooks = [getattr(attn1, name).register_forward_hook(
        lambda mod, args, out, name=name: seen.setdefault(name, out)) for name in ("to_q", "to_k")]
    half = model.half()
    for backend in ("math", "sdpa"):
        eps = half(x.half(), t, ctx.half(), attention_backend=backend)
        assert eps.dtype == torch.float16 and torch.isfinite(eps).all(), backend
    for hook in hooks:
        hook.remove()
    q, k = (rearrange(seen[n], "b n (h d) -> b h n d", h=attn1.heads) for n in ("to_q", "to_k"))
    naive = q @ k.transpose(-1, -2)                          # fp16 scores as a naive path would form them
    assert torch.isinf(naive).any()                          # ... they do overflow in this model
    assert torch.isnan(naive.softmax(-1)).any()              # and a fp16 softmax of them is NaN


# ---- full SD 1.x architecture, random weights -----------------------------------------------

@pytest.mark.full
@torch.no_grad()
def test_full_size_unet_matches_diffusers():
    """All 686 CompVis keys convert with diffusers' own converter and load strictly into
    diffusers (inside full_pair); then one forward at an 8x8 latent with a 77x768 context."""
    pytest.importorskip("diffusers")
    ours, ref = ref_unet.full_pair()
    assert len(ours.state_dict()) == 686
    g = torch.Generator().manual_seed(4)
    x, ctx, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 768, generator=g), torch.tensor([421])
    expected = ref(x, t, encoder_hidden_states=ctx).sample
    eps_sdpa = ours(x, t, ctx, attention_backend="sdpa")
    torch.testing.assert_close(eps_sdpa, expected, **TOL)
    torch.testing.assert_close(ours(x, t, ctx, attention_backend="math"), eps_sdpa, **TOL)


@pytest.mark.full
@torch.no_grad()
def test_full_size_sd2_unet_matches_diffusers():
    """SD 2.x: the 686 CompVis keys (linear proj_in/proj_out, to_k/to_v reading 1024) convert
    with diffusers' converter and load strictly into UNet2DConditionModel(attention_head_dim=
    [5, 10, 20, 20], use_linear_projection=True, cross_attention_dim=1024); one forward at 8x8."""
    pytest.importorskip("diffusers")
    ours, ref = ref_unet.full_pair_sd2()
    sd = ours.state_dict()
    assert len(sd) == 686
    assert sd["input_blocks.1.1.proj_in.weight"].shape == (320, 320)                # Linear, not (320, 320, 1, 1)
    assert sd["input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 1024)   # the SD 2 detector
    g = torch.Generator().manual_seed(4)
    x, ctx, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 1024, generator=g), torch.tensor([421])
    expected = ref(x, t, encoder_hidden_states=ctx).sample
    for backend in ("sdpa", "math"):
        eps = ours(x, t, ctx, attention_backend=backend)
        print(f"SD 2 full-size UNet ({backend}) max |ours - diffusers| = {(eps - expected).abs().max().item():.2e}")
        torch.testing.assert_close(eps, expected, **TOL)


# ---- SDXL: a transformer depth per level, label_emb ------------------------------------------

@pytest.mark.parametrize("backend", ["math", "sdpa"])
@torch.no_grad()
def test_tiny_sdxl_unet_matches_diffusers(backend):
    """Depths (1, 1, 2): level 0 without attention, 1 block at level 1, 2 at level 2 and in the middle."""
    pytest.importorskip("diffusers")
    ours, ref = ref_unet.tiny_sdxl_pair()
    assert [len(ours.output_blocks[i][1].transformer_blocks) for i in (0, 3)] == [2, 1] == \
        [len(ours.middle_block[1].transformer_blocks), len(ours.input_blocks[4][1].transformer_blocks)]
    x, t, ctx = inputs(ours.cfg, h=16, w=8)
    y = torch.randn(2, ours.cfg.adm_in_channels, generator=torch.Generator().manual_seed(8))
    eps, expected = ours(x, t, ctx, y, attention_backend=backend), ref(x, t, ctx, class_labels=y).sample
    print(f"SDXL tiny UNet ({backend}) max |ours - diffusers| = {(eps - expected).abs().max().item():.2e}")
    torch.testing.assert_close(eps, expected, **TOL)


@pytest.mark.full
def test_full_size_sdxl_unet_keys_are_diffusers_converters():
    """SDXL base's keys and shapes are what diffusers' converter maps into its UNet, both ways, with label_emb as a
    projection class embedding and as SDXL's own text_time add_embedding (on the meta device: seconds)."""
    pytest.importorskip("diffusers")
    with torch.device("meta"):
        model = UNetModel(UNetConfig.sdxl())
    sd = model.state_dict()
    assert (len(sd), sum(p.numel() for p in model.parameters())) == (1680, 2_567_463_684)
    assert [len({k.split(".")[1] for k in sd if k.startswith(f"{s}_blocks.")}) for s in ("input", "output")] == [9, 9]
    assert {"output_blocks.2.2.conv.weight", "output_blocks.5.2.conv.weight"} <= sd.keys()
    for changes in ({}, dict(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=256)):
        converted, expected = ref_unet.meta_key_proof(UNetConfig.sdxl(), **changes)
        assert sorted(converted.keys() ^ expected.keys()) == [] and converted == expected and len(converted) == 1680


# ---- the architecture table -----------------------------------------------------------------

def parse_table(text: str) -> list[list[str]]:
    rows = [line.strip().strip("|").split("|") for line in text.splitlines()
            if re.match(r"\s*\| (time_embed|input_blocks\.\d+|middle_block|output_blocks\.\d+|out) \|", line)]
    return [[cell.strip() for cell in row] for row in rows]


def table_from_state_dict(cfg: UNetConfig, latent: int = 64) -> list[list[str]]:
    """The table as the state_dict's keys and shapes (and the config's head count) say it."""
    with torch.device("meta"):
        sd = UNetModel(cfg).state_dict()
    rows = [["time_embed", "Linear, SiLU, Linear",
             f"{sd['time_embed.0.weight'].shape[1]} -> {sd['time_embed.2.weight'].shape[0]}", "-", "-"]]
    size = latent
    count = {side: 1 + max(int(k.split(".")[1]) for k in sd if k.startswith(side))
             for side in ("input_blocks", "output_blocks")}
    blocks = ([f"input_blocks.{i}" for i in range(count["input_blocks"])] + ["middle_block"]
              + [f"output_blocks.{i}" for i in range(count["output_blocks"])])
    for block in blocks:
        slots = sorted({int(k[len(block) + 1:].split(".")[0]) for k in sd if k.startswith(block + ".")})
        modules, c_in, c_out, heads, new_size = [], None, None, "-", size
        for s in slots:
            p = f"{block}.{s}."
            if p + "in_layers.0.weight" in sd:
                modules.append("ResBlock")
                c_in = c_in or sd[p + "in_layers.0.weight"].shape[0]
                c_out = sd[p + "out_layers.3.weight"].shape[0]
            elif p + "proj_in.weight" in sd:
                modules.append("SpatialTransformer")
                width = sd[p + "transformer_blocks.0.attn1.to_q.weight"].shape[0]
                heads = "{} x {}".format(*cfg.heads(width))
            elif p + "op.weight" in sd:
                modules.append("Downsample")
                c_in = c_out = sd[p + "op.weight"].shape[0]
                new_size = size // 2
            elif p + "conv.weight" in sd:
                modules.append("Upsample")
                new_size = size * 2
            else:
                modules.append("Conv")
                c_in, c_out = sd[p + "weight"].shape[1], sd[p + "weight"].shape[0]
        res = str(size) if new_size == size else f"{size} -> {new_size}"
        rows.append([block, ", ".join(modules), f"{c_in} -> {c_out}", res, heads])
        size = new_size
    rows.append(["out", "GroupNorm, SiLU, Conv",
                 f"{sd['out.2.weight'].shape[1]} -> {sd['out.2.weight'].shape[0]}", str(size), "-"])
    return rows


def test_architecture_table_in_docstring_matches_state_dict():
    import ldm.unet
    documented = parse_table(ldm.unet.__doc__)
    assert len(documented) == 1 + 12 + 1 + 12 + 1
    assert documented == table_from_state_dict(UNetConfig())


def test_architecture_tables_in_chapter_match_the_networks():
    """Chapter 3 has two block tables: SD 1.x's (the docstring's) and the shipped model's UNet."""
    import ldm.unet
    from ldm import checkpoint, weights

    chapter = (ROOT / "docs" / "03-unet.md").read_text()
    sd1, shipped_section = chapter.split("## The shipped model's UNet", 1)
    assert parse_table(sd1) == parse_table(ldm.unet.__doc__)
    shipped = weights.configs_for(checkpoint.read(weights.SHIPPED))["unet"]
    assert parse_table(shipped_section) == table_from_state_dict(shipped, latent=shipped.sample_size)


def test_sd2_table_is_sd1_with_64_channel_heads():
    """The docstring's table holds for SD 2.x except the heads column: 5/10/20 heads of 64."""
    sd1, sd2 = table_from_state_dict(UNetConfig()), table_from_state_dict(UNetConfig.sd2())
    assert [row[:4] for row in sd1] == [row[:4] for row in sd2]
    heads = {row[0]: row[4] for row in sd2 if row[4] != "-"}
    assert heads["input_blocks.1"] == "5 x 64" and heads["input_blocks.4"] == "10 x 64"
    assert heads["input_blocks.7"] == heads["middle_block"] == heads["output_blocks.3"] == "20 x 64"


def test_sd_key_counts_and_inpainting_input():
    with torch.device("meta"):
        sd = UNetModel(UNetConfig()).state_dict()
        inpaint = UNetModel(UNetConfig.inpainting()).state_dict()
    assert len(sd) == 686 and len(inpaint) == 686
    assert sum(v.numel() for v in sd.values()) == 859_520_964
    assert inpaint["input_blocks.0.0.weight"].shape == (320, 9, 3, 3)
    assert not any(k.endswith(("to_q.bias", "to_k.bias", "to_v.bias")) for k in sd)   # SD 1.x: no q/k/v bias
    assert sd["input_blocks.1.1.proj_in.weight"].shape == (320, 320, 1, 1)            # 1x1 conv, not linear
    with torch.device("meta"):
        sd2 = UNetModel(UNetConfig.sd2()).state_dict()
    assert len(sd2) == 686 and sum(v.numel() for v in sd2.values()) == 865_910_724   # SD 2.x's UNet
    assert sd2["input_blocks.1.1.proj_in.weight"].shape == (320, 320)                 # linear


# ---- inspection -----------------------------------------------------------------------------

@torch.no_grad()
def test_capture_features_and_cross_attention_maps(tiny_pair):
    ours, ref = tiny_pair
    x, t, ctx = inputs(ours.cfg, h=8, w=16, T=5)
    layer = "output_blocks.4.1.transformer_blocks.0.attn2"
    assert layer in ours.attention_layers("cross")
    assert len(ours.attention_layers("cross")) == len(ours.attention_layers("self")) == 2 + 1 + 3

    # diffusers' view of the same points: the mid-block output and the input of that attn2
    seen = {}
    h1 = ref.mid_block.register_forward_hook(lambda m, a, out: seen.__setitem__("mid", out))
    attn_ref = ref.up_blocks[1].attentions[1].transformer_blocks[0].attn2
    h2 = attn_ref.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("q_in", kw.get("hidden_states", a[0] if a else None)),
                                            with_kwargs=True)
    ref(x, t, encoder_hidden_states=ctx)
    h1.remove(), h2.remove()

    with ours.capture(features=["middle_block", "input_blocks.3"], attention=[layer]) as cap:
        eps = ours(x, t, ctx)
    torch.testing.assert_close(cap.features["middle_block"], seen["mid"], **TOL)
    assert cap.features["input_blocks.3"].shape == (2, 32, 4, 8)

    probs = cap.attention[layer]                             # (B, heads, H*W, T)
    q = attn_ref.to_q(seen["q_in"]).view(2, -1, 2, 16).transpose(1, 2)
    k = attn_ref.to_k(ctx).view(2, -1, 2, 16).transpose(1, 2)
    torch.testing.assert_close(probs, (q @ k.transpose(-1, -2) / 4.0).softmax(-1), **TOL)
    assert cap.sizes[layer] == (8, 16)
    maps = cap.token_maps(layer)                             # (B, heads, T, H, W)
    assert maps.shape == (2, 2, 5, 8, 16)
    torch.testing.assert_close(maps[:, :, 3].flatten(2), probs[..., 3], atol=0, rtol=0)

    # capturing changes nothing, and everything is unhooked afterwards
    torch.testing.assert_close(eps, ours(x, t, ctx), **TOL)
    assert all(m.probs_hook is None for m in ours.modules() if isinstance(m, CrossAttention))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in ours.modules())


def test_capture_rejects_unknown_names(tiny_pair):
    ours, _ = tiny_pair
    with pytest.raises(ValueError, match=r"features entry 'input_blocks.99'"):
        with ours.capture(features=["input_blocks.99"]):
            pass
    with pytest.raises(ValueError, match=r"attention entry 'input_blocks.1.1' is not an attention layer"):
        with ours.capture(attention=["input_blocks.1.1"]):
            pass


# ---- errors and backends --------------------------------------------------------------------

def test_bad_inputs_name_the_argument(tiny_pair):
    ours, _ = tiny_pair
    x, t, ctx = inputs(ours.cfg)
    with pytest.raises(ValueError, match=r"x must be \(B, 4, h, w\), got shape \(2, 3, 8, 8\)"):
        ours(x[:, :3], t, ctx)
    with pytest.raises(ValueError, match=r"x must be .* got shape \(2, 8, 8\)"):
        ours(x[:, 0], t, ctx)
    with pytest.raises(ValueError, match=r"context must be \(B=2, T, 32\), got shape \(2, 7, 16\)"):
        ours(x, t, ctx[..., :16])
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(B=2,\), got shape \(3,\)"):
        ours(x, torch.tensor([1, 2, 3]), ctx)
    with pytest.raises(ValueError, match=r"attention_backend='fast' is not one of"):
        ours(x, t, ctx, attention_backend="fast")
    with pytest.raises(ValueError, match=r"attention_backend='fast' is not one of"):
        UNetModel(UNetConfig.tiny(), attention_backend="fast")
    with pytest.raises(ValueError, match=r"width model_channels\*mult=48 must be divisible by 32"):
        UNetConfig(model_channels=48, channel_mult=(1,))
    with pytest.raises(ValueError, match=r"num_res_blocks=0 must be >= 1"):
        UNetConfig(num_res_blocks=0)


@torch.no_grad()
def test_backend_is_per_model_or_per_call(tiny_pair, monkeypatch):
    """The model attribute picks the default backend; a call's argument overrides it."""
    import ldm.unet
    ours, _ = tiny_pair
    used = []
    real = ldm.unet.attention
    monkeypatch.setattr(ldm.unet, "attention", lambda q, k, v, backend, **kw: used.append(backend) or real(q, k, v, backend, **kw))
    x, t, ctx = inputs(ours.cfg)
    ours(x, t, ctx)
    assert set(used) == {"auto"}
    used.clear()
    ours(x, t, ctx, attention_backend="math")
    assert set(used) == {"math"} and len(used) == 12     # 6 transformers x (self + cross)
    model = UNetModel(UNetConfig.tiny(), attention_backend="sdpa")
    used.clear()
    model(x, t, ctx)
    assert set(used) == {"sdpa"}
