"""SDXL LoRAs against diffusers' StableDiffusionXLPipeline.load_lora_weights, and the files that do not fit.

The tiny SDXL (ldm.families' sdxl tiny_configs) is written by ldm as a single file and read by both ldm.load
and diffusers' from_single_file (tests/ref_sdxl.py). Random LoRAs in the layouts SDXL users download:
(a) kohya keys with diffusers block names, UNet only, alpha in the file, every module kind the LCM-LoRA
for SDXL adapts; (b) kohya keys with CompVis (sgm) names, as kohya-ss trains SDXL, with lora_te1_ and
lora_te2_ layers (the bigG tower's q/k/v land on row blocks of its fused in_proj_weight), conv_in,
conv_out, time_embed and label_emb included, at weight 0.8; (c) peft keys (unet., text_encoder.,
text_encoder_2.) with lora_adapter_metadata. Each is compared with diffusers (peft layers unfused; (b) also
fused) on the text conditioning (prompt embeds, pooled), the UNet's output and a 3-step Euler image (guidance
5), ours merged and, where the file has no q/k/v of bigG (forward hooks cannot reach rows of a fused
weight: refused in one line), hooked (merge=False). diffusers' kohya conversion drops
the sgm keys of a file that mixes both UNet spellings (_maybe_map_sgm_blocks_to_diffusers), so no file
here mixes them; every kohya file has one alpha per component (diffusers turns per-module alphas of
attention layers into alpha_pattern keys that match nothing).

The LCM-LoRA for SDXL's shape facts are checked on the full-size UNet built on the meta device, and SD 2.x
text-encoder LoRAs (the same OpenCLIP layout, under lora_te_) against transformers + peft.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import ldm
import ref_lora
import ref_openclip
import ref_sdxl
from bounded import assert_one_line_error, run_bounded
from ldm import lora, weights
from ldm.openclip import OpenCLIPTextConfig
from ldm.unet import UNetConfig, UNetModel

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

PROMPT = "a red circle above a blue square"
TE_LEAVES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
ATOL = 1e-4  # fp32 parity (DESIGN.md section 4); measured: at most 1.8e-5 (prompt embeds, LoRA merged vs peft unfused)


# ---- the tiny SDXL, ours and diffusers' ------------------------------------------------------------
@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """(ours, diffusers', a folder): two pipelines on one tiny random SDXL single file."""
    root = tmp_path_factory.mktemp("sdxl-lora")
    models, configs = weights.random_stages("tiny", seed=1, family="sdxl")
    path = weights.write_single_file(root / "xl.safetensors", models, family="sdxl", configs=configs)
    return ldm.load(path, device="cpu"), ref_sdxl.load_with_diffusers(path, configs, root / "config"), root


def unet_inputs(ref):
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 96, generator=g)
    pooled = torch.randn(2, 64, generator=g)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [1024, 512, 8, 0, 64, 64]])
    y = torch.cat([pooled, ref.unet.add_time_proj(ids.flatten()).reshape(2, -1)], dim=1)
    return x, torch.tensor([999, 251]), ctx, y, {"text_embeds": pooled, "time_ids": ids}


@torch.no_grad()
def ours_outputs(ours, ref) -> dict[str, torch.Tensor]:
    cond = ours.condition([PROMPT], height=64, width=64)
    x, t, ctx, y, _ = unet_inputs(ref)
    image = ours.generate(PROMPT, steps=3, height=64, width=64, seed=0, guidance=5.0, progress=False).images[0]
    return {"prompt_embeds": cond.context, "pooled": cond.y[:, :64], "unet": ours.unet(x, t, ctx, y),
            "image": torch.from_numpy(np.asarray(image).astype(np.float64))}


@torch.no_grad()
def diffusers_outputs(ref) -> dict[str, torch.Tensor]:
    pe, _, pooled, _ = ref.encode_prompt([PROMPT], device="cpu", num_images_per_prompt=1,
                                         do_classifier_free_guidance=False)
    x, t, ctx, _, added = unet_inputs(ref)
    image = ref(prompt=PROMPT, num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
                generator=[torch.Generator().manual_seed(0)], output_type="np").images[0]
    eps = ref.unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
    return {"prompt_embeds": pe, "pooled": pooled, "unet": eps,
            "image": torch.from_numpy((image * 255).round().astype(np.float64))}


def compare(ours: dict, theirs: dict, label: str) -> dict[str, float]:
    """Max abs errors; tensors at the fp32 noise floor, images within 1/255."""
    errors = {k: (ours[k] - theirs[k]).abs().max().item() for k in ours}
    print(f"{label}: " + ", ".join(f"{k} {v:.2e}" if k != "image" else f"image {v:g}/255" for k, v in errors.items()))
    for k in ("prompt_embeds", "pooled", "unet"):
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=ATOL)
    assert errors["image"] <= 1, errors
    return errors


def check_parity(xl, path, weight: float, label: str, hooked: bool = True, fused: bool = False,
                 text: bool = True) -> dict[str, float]:
    """Ours (merged, and hooked when asked) against diffusers' load_lora_weights (unfused, and fused when
    asked), at `weight`; the LoRA visibly changes the outputs, and unloading restores every tensor."""
    ours, ref, _ = xl
    before = {s: {k: v.clone() for k, v in m.state_dict().items()} for s, m in ours.stages.items()}
    base = ours_outputs(ours, ref)
    ref.load_lora_weights(str(path), adapter_name="x")
    try:
        if weight != 1.0:
            ref.set_adapters(["x"], adapter_weights=[weight])
        theirs = diffusers_outputs(ref)
        if fused:
            ref.fuse_lora(adapter_names=["x"])
            theirs_fused = diffusers_outputs(ref)
            ref.unfuse_lora()
    finally:
        ref.unload_lora_weights()
    ours.load_lora(path, weight)
    merged = ours_outputs(ours, ref)
    ours.unload_loras()
    errors = compare(merged, theirs, f"{label}, merged vs diffusers")
    if fused:
        compare(merged, theirs_fused, f"{label}, merged vs diffusers fused")
    if hooked:
        ours.load_lora(path, weight, merge=False)
        compare(ours_outputs(ours, ref), theirs, f"{label}, hooked vs diffusers")
        ours.unload_loras()
    assert (merged["unet"] - base["unet"]).abs().max() > 1e-2 and (merged["image"] - base["image"]).abs().max() >= 8
    if text:  # both towers changed: the context (CLIP-L's and bigG's halves) and bigG's pooled vector
        for k in ("prompt_embeds", "pooled"):
            assert (merged[k] - base[k]).abs().max() > 1e-2, k
        assert (merged["prompt_embeds"] - base["prompt_embeds"])[..., :32].abs().max() > 1e-2
    for s, m in ours.stages.items():  # unload is exact
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[s][k]), (s, k)
    return errors


# ---- random LoRA files in the three layouts ---------------------------------------------------------
def random_pair(shape, rank: int, g: torch.Generator, scale: float):
    """(down, up) for a weight of `shape`: down with the module's kernel, up 1x1 for a convolution."""
    down = torch.randn(rank, *shape[1:], generator=g) * scale
    up = torch.randn(shape[0], rank, *((1, 1) if len(shape) == 4 else ()), generator=g) * scale
    return down, up


def unet_layers(unet, pattern: str, rank: int, seed: int, scale: float = 0.15) -> dict[str, tuple]:
    """{our UNet module name: (down, up)} for the modules whose names match `pattern`."""
    g = torch.Generator().manual_seed(seed)
    return {n: random_pair(unet.get_submodule(n).weight.shape, rank, g, scale)
            for n in ref_lora.targets(unet, pattern)}


def te_layers(ref_tower, rank: int, seed: int, scale: float = 0.2) -> dict[str, tuple]:
    """{transformers name text_model.encoder.layers.N.<leaf>: (down, up)} for every attention and MLP
    projection of diffusers' tower (so the shapes are transformers', not ours)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in ref_tower.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(TE_LEAVES):
            out["text_model." + name.removeprefix("text_model.")] = random_pair(module.weight.shape, rank, g, scale)
    return out


def kohya(path, parts: list[tuple[str, dict, float]]):
    """A kohya file: [(key prefix, {dotted name: (down, up)}, alpha)] -> prefix + name with _ for ., one
    alpha per component."""
    sd = {}
    for prefix, layers, alpha in parts:
        for name, (down, up) in layers.items():
            key = prefix + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
            sd[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return path


UNET_LCM = ref_lora.LCM_TARGETS  # attention, feed-forward, proj_in/out, ResBlock convs/skips/time projections, resamplers
UNET_EXTRA = r"^(input_blocks\.0\.0|out\.2|time_embed\.[02]|label_emb\.0\.[02])$"  # conv_in/out, time and y MLPs


def test_kohya_diffusers_names_unet_only_like_lcm_lora_sdxl(xl):
    """(a) The LCM-LoRA for SDXL's layout: kohya keys, diffusers block names, UNet only, alpha in the file."""
    ours, ref, root = xl
    layers = unet_layers(ours.unet, UNET_LCM, rank=4, seed=0)
    spelled = ref_lora.diffusers_spelling(ours.unet)
    path = kohya(root / "a.safetensors", [("lora_unet_", {spelled[n]: dp for n, dp in layers.items()}, 8.0)])
    lo = lora.read(path)
    assert lo.format == "kohya" and lo.made_for is None and set(lo.layers) == {"unet"}
    assert lo.num_modules == len(layers) and {l.scale for l in lo.layers["unet"].values()} == {2.0}
    assert any("transformer_blocks_1" in n for n in lo.layers["unet"])  # level 2 and the middle are 2 deep
    check_parity(xl, path, 1.0, "(a) kohya, diffusers names, UNet only", text=False)


def test_kohya_compvis_names_with_both_text_towers(xl):
    """(b) kohya-ss's SDXL layout: CompVis (sgm) UNet names, lora_te1_ (CLIP-L) and lora_te2_ (bigG), weight 0.8."""
    ours, ref, root = xl
    layers = unet_layers(ours.unet, f"{UNET_LCM}|{UNET_EXTRA}", rank=4, seed=1, scale=0.1)
    assert {"label_emb.0.0", "input_blocks.4.1.transformer_blocks.0.attn2.to_k", "output_blocks.5.2.conv"} <= set(layers)
    te1, te2 = te_layers(ref.text_encoder, rank=4, seed=2), te_layers(ref.text_encoder_2, rank=4, seed=3)
    path = kohya(root / "b.safetensors", [("lora_unet_", layers, 4.0), ("lora_te1_", te1, 2.0), ("lora_te2_", te2, 8.0)])
    lo = lora.read(path)
    assert lo.made_for == ("SDXL", "lora_te1_ and lora_te2_ keys")
    targets = lo.targets(ours.stages)
    rows = [t for t in targets["text_encoder_2"] if t.rows is not None]
    assert len(rows) == 3 * len(ours.text_encoder_2.transformer.resblocks)  # q, k, v of every block
    assert {t.rows for t in rows} == {(0, 64), (64, 128), (128, 192)}
    check_parity(xl, path, 0.8, "(b) kohya, CompVis names, lora_te1_ + lora_te2_, weight 0.8", hooked=False, fused=True)


def test_hooked_text_towers_and_unet_equal_diffusers_unfused(xl):
    """merge=False on SDXL: forward hooks on the UNet, CLIP-L and bigG's out_proj / fc1 / fc2 (its q/k/v are
    rows of a fused weight, which hooks refuse: test_hooks_on_row_blocks_are_refused_in_one_line)."""
    ours, ref, root = xl
    layers = unet_layers(ours.unet, r"(attn2\.to_k|attn1\.to_out\.0|ff\.net\.2|emb_layers\.1)$", rank=2, seed=9)
    te1 = te_layers(ref.text_encoder, rank=2, seed=10)
    te2 = {n: dp for n, dp in te_layers(ref.text_encoder_2, rank=2, seed=11).items()
           if not n.endswith(("q_proj", "k_proj", "v_proj"))}
    path = kohya(root / "hooks.safetensors",
                 [("lora_unet_", layers, 2.0), ("lora_te1_", te1, 2.0), ("lora_te2_", te2, 2.0)])
    check_parity(xl, path, 1.5, "kohya, CompVis names, bigG without q/k/v, weight 1.5", hooked=True)


def test_peft_layout_with_metadata(xl):
    """(c) diffusers' own format: unet. / text_encoder. / text_encoder_2. + lora_A/lora_B, alphas in the metadata."""
    ours, ref, root = xl
    spelled = ref_lora.diffusers_spelling(ours.unet)
    layers = unet_layers(ours.unet, r"(to_q|to_k|to_v|to_out\.0|proj_in|proj_out|ff\.net\.2|in_layers\.2)$", rank=4,
                         seed=4)
    te1, te2 = te_layers(ref.text_encoder, rank=4, seed=5), te_layers(ref.text_encoder_2, rank=2, seed=6)
    sd, meta = {}, {}
    for prefix, named in (("unet", {spelled[n]: dp for n, dp in layers.items()}), ("text_encoder", te1),
                          ("text_encoder_2", te2)):
        for name, (down, up) in named.items():
            sd[f"{prefix}.{name}.lora_A.weight"], sd[f"{prefix}.{name}.lora_B.weight"] = down, up
        rank = next(iter(named.values()))[0].shape[0]
        leaves = sorted({n.rsplit(".", 1)[-1] if prefix != "unet" else n for n in named})
        meta |= {f"{prefix}.r": rank, f"{prefix}.lora_alpha": {"unet": 8, "text_encoder": 2, "text_encoder_2": 4}[prefix],
                 f"{prefix}.target_modules": leaves}
    path = root / "c.safetensors"
    save_file(sd, str(path), metadata={"lora_adapter_metadata": json.dumps(meta)})
    lo = lora.read(path)
    assert lo.format == "peft" and lo.made_for == ("SDXL", "text_encoder_2. keys")
    assert {s: {l.scale for l in v.values()} for s, v in lo.layers.items()} == {
        "unet": {2.0}, "text_encoder": {0.5}, "text_encoder_2": {2.0}}
    check_parity(xl, path, 1.0, "(c) peft + metadata", hooked=False)


# ---- the fused in_proj: merged rows, exact unmerge, hooks refused ----------------------------------------
def test_q_k_v_merge_into_their_rows_only_and_unmerge_exactly(xl):
    ours, ref, root = xl
    te2 = ours.text_encoder_2
    C = te2.config.width
    g = torch.Generator().manual_seed(7)
    k = random_pair((C, C), 3, g, 0.2)
    path = kohya(root / "k-only.safetensors", [("lora_te2_", {"text_model.encoder.layers.1.self_attn.k_proj": k}, 6.0)])
    w = te2.transformer.resblocks[1].attn.in_proj_weight
    original, ptr = w.data.clone(), w.data_ptr()
    with lora.apply(ours.stages, [(path, 0.5)]) as handle:
        assert handle.num_modules == 1
        expected = original.clone()
        expected[C:2 * C] += 0.5 * 2.0 * (k[1] @ k[0])
        torch.testing.assert_close(w.data, expected, rtol=0, atol=1e-6)
        assert torch.equal(w.data[:C], original[:C]) and torch.equal(w.data[2 * C:], original[2 * C:])
    assert w.data_ptr() == ptr and torch.equal(w.data, original)  # the very tensor that was there before


def test_hooks_on_row_blocks_are_refused_in_one_line(xl):
    ours, ref, root = xl
    C = ours.text_encoder_2.config.width
    path = kohya(root / "q.safetensors", [("lora_te2_", {"text_model.encoder.layers.0.self_attn.q_proj":
                                                         random_pair((C, C), 2, torch.Generator(), 0.1)}, 2.0)])
    before = ours.text_encoder_2.transformer.resblocks[0].attn.in_proj_weight.data_ptr()
    with pytest.raises(lora.LoRAError) as e:
        ours.load_lora(path, merge=False)
    message = str(e.value)
    print(message)
    assert message.startswith(str(path)) and "\n" not in message and "merge=True" in message
    assert "transformer.resblocks.0.attn.in_proj_weight[0:64]" in message
    assert ours.text_encoder_2.transformer.resblocks[0].attn.in_proj_weight.data_ptr() == before and not ours.loras


def test_sd2_text_encoder_lora_is_the_same_open_clip_mapping(tmp_path):
    """SD 2.x's ViT-H tower has bigG's layout: a lora_te_ file lands on its in_proj rows too; equal to
    diffusers' kohya conversion into transformers' CLIPTextModel (peft), at weight 1."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    ours, hf = ref_openclip.pair(OpenCLIPTextConfig.tiny())
    layers = te_layers(hf, rank=4, seed=8)
    assert len(layers) == 6 * ours.config.num_hidden_layers
    path = kohya(tmp_path / "sd2-te.safetensors", [("lora_te_", layers, 2.0)])
    sd, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    StableDiffusionPipeline.load_lora_into_text_encoder(sd, alphas, text_encoder=hf, prefix="text_encoder")
    ids = ref_openclip.example_ids(batch=2)
    with torch.no_grad():
        base = ours(ids)
        theirs = hf(input_ids=ids).last_hidden_state
        with lora.apply({"text_encoder": ours}, [(path, 1.0)]):
            merged = ours(ids)
    err = (merged - theirs).abs().max().item()
    print(f"SD 2.x text encoder LoRA (lora_te_ on OpenCLIP ViT-H): max |ours - transformers + peft| = {err:.2e}")
    torch.testing.assert_close(merged, theirs, rtol=1e-5, atol=ATOL)
    assert (merged - base).abs().max() > 1e-2


# ---- the LCM-LoRA for SDXL, shapes only ----------------------------------------------------------------
def test_lcm_lora_sdxl_layout_on_the_full_size_unet():
    """Every module the LCM-LoRA for SDXL adapts, under kohya keys with diffusers names, at rank 64, on the
    full-size SDXL UNet built on the meta device: 788 modules, 196,751,360 parameters, and the published
    file's exact size, 393,854,592 bytes (fp16, one alpha per module)."""
    with torch.device("meta"):
        unet = UNetModel(UNetConfig.sdxl())
    sd = ref_lora.lcm_sdxl_shaped(unet)
    lo = lora.from_state_dict(sd, path="lcm-lora-sdxl-shaped.safetensors")
    assert lo.format == "kohya" and lo.ranks == {64} and {l.scale for l in lo.layers["unet"].values()} == {1.0}
    assert lo.num_modules == ref_lora.LCM_SDXL_MODULES == 788
    assert lo.num_params == ref_lora.LCM_SDXL_PARAMS == 196_751_360
    assert ref_lora.safetensors_size(sd) == ref_lora.LCM_SDXL_BYTES  # CompVis names would give another size
    resolved = lo.resolve({"unet": unet})["unet"]
    assert sorted(resolved) == sorted(ref_lora.targets(unet, ref_lora.LCM_TARGETS))
    assert "middle_block.1.transformer_blocks.9.ff.net.2" in resolved
    assert "output_blocks.2.2.conv" in resolved and "input_blocks.6.0.op" in resolved
    # every name is a module of diffusers' own SDXL UNet (the published config), with the weight the LoRA fits
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        theirs = UNet2DConditionModel(**ref_sdxl.PUBLISHED_UNET_CONFIG)
    shapes = {"lora_unet_" + n.replace(".", "_"): tuple(m.weight.shape) for n, m in theirs.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    for key, t in sd.items():
        if key.endswith(".lora_down.weight"):
            base = key.removesuffix(".lora_down.weight")
            assert base in shapes and shapes[base][1:] == tuple(t.shape[1:]), key
            assert shapes[base][0] == sd[f"{base}.lora_up.weight"].shape[0], key


# ---- files that do not fit: one line each, naming the file, what it is and what was expected ---------
@pytest.fixture(scope="module")
def sd1():
    te, unet, vae, _ = weights.random_models("tiny")
    return {"text_encoder": te, "unet": unet, "vae": vae}


def state(models) -> dict:
    return {(s, k): v.clone() for s, m in models.items() for k, v in m.state_dict().items()}


def refused(models, path, *names, merge: bool = True) -> str:
    """The one-line LoRAError of applying `path` to `models`, in a bounded child; nothing changed."""
    before = state(models)
    out = run_bounded(lambda: lora.apply(models, [(path, 1.0)], merge=merge), deadline_s=20)
    message = assert_one_line_error(out, ("LoRAError",), str(path), *names, max_len=500)
    print(message)
    with pytest.raises(lora.LoRAError):  # and in this process: nothing merged, no hook left behind
        lora.apply(models, [(path, 1.0)], merge=merge)
    after = state(models)
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert not any(m._forward_hooks for model in models.values() for m in model.modules())
    return message


def small(*shape):
    return torch.full(shape, 0.01)


def test_sdxl_loras_on_sd1_say_so(sd1, tmp_path):
    cases = {
        "te2.safetensors": {"lora_te2_text_model_encoder_layers_0_mlp_fc1": (small(4, 1280), small(5120, 4))},
        "te1.safetensors": {"lora_te1_text_model_encoder_layers_0_mlp_fc1": (small(4, 32), small(64, 4))},
        "deep.safetensors": {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_9_attn1_to_q":
                             (small(4, 32), small(32, 4))},
        "wide.safetensors": {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k":
                             (small(4, 2048), small(640, 4))},
    }
    expected = {"te2.safetensors": "this LoRA is for SDXL (lora_te2_ keys), the pipeline is SD 1.x",
                "te1.safetensors": "this LoRA is for SDXL (lora_te1_ keys), the pipeline is SD 1.x",
                "deep.safetensors": "this LoRA is for SDXL (",
                "wide.safetensors": "this LoRA is for SDXL (its attn2.to_k reads a 2048-wide text context"}
    for name, layers in cases.items():
        sd = {}
        for key, (down, up) in layers.items():
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
        save_file(sd, str(tmp_path / name))
        message = refused(sd1, tmp_path / name)
        assert expected[name] in message and "the pipeline is SD 1.x" in message, message


def test_an_sd1_lora_on_sdxl_says_so(xl, tmp_path):
    ours, _, _ = xl
    cases = {"sd1-wide.safetensors": ("lora_unet_input_blocks_7_1_transformer_blocks_0_attn2_to_k", small(4, 768),
                                      small(64, 4), "this LoRA is for SD 1.x (its attn2.to_k reads a 768-wide text context"),
             "sd1-levels.safetensors": ("lora_unet_down_blocks_3_resnets_0_conv1", small(4, 1280, 3, 3),
                                        small(1280, 4, 1, 1),
                                        "this LoRA is for SD 1.x or 2.x ('down_blocks_3_resnets_0_conv1': a UNet of 4 levels")}
    for name, (key, down, up, expected) in cases.items():
        save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}, str(tmp_path / name))
        message = refused(ours.stages, tmp_path / name)
        assert expected in message and "the pipeline is SDXL" in message, message


def test_wrong_shapes_on_a_row_block(xl, tmp_path):
    ours, _, _ = xl
    path = tmp_path / "qshape.safetensors"
    key = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{key}.lora_down.weight": small(4, 64), f"{key}.lora_up.weight": small(192, 4)}, str(path))
    message = refused(ours.stages, path, "transformer.resblocks.0.attn.in_proj_weight[0:64]")
    assert "expected down (4, 64) and up (64, 4)" in message and "rows of the fused in_proj_weight (192, 64)" in message


HOSTILE = "\x1b[2J\x1b[31mpwned\n"


@pytest.mark.parametrize("case", ["names", "rank 0", "nan", "overflow", "hooked overflow"])
def test_hostile_text_encoder_2_layers(xl, tmp_path, case):
    ours, _, _ = xl
    q = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    if case == "names":  # five 1 MB names with terminal escapes: quoted, cut, a few listed
        sd = {f"lora_te2_{HOSTILE}{i}{'x' * 2**20}.lora_{d}.weight": small(2, 64) if d == "down" else small(64, 2)
              for i in range(5) for d in ("down", "up")}
    elif case == "rank 0":
        sd = {f"{q}.lora_down.weight": small(0, 64), f"{q}.lora_up.weight": small(64, 0)}
    elif case == "nan":
        sd = {f"{q}.lora_down.weight": small(2, 64), f"{q}.lora_up.weight": torch.full((64, 2), float("nan"))}
    else:  # finite numbers whose merged rows are not
        sd = {f"{q}.lora_down.weight": torch.full((2, 64), 1e30), f"{q}.lora_up.weight": torch.full((64, 2), 1e30)}
    path = tmp_path / "hostile.safetensors"
    save_file(sd, str(path))
    message = refused(ours.stages, path, merge=case != "hooked overflow")
    if case == "names":
        assert "\\x1b" in message and "text_encoder_2" in message
    elif case == "rank 0":
        assert "rank 0" in message
    elif case == "nan":
        assert "NaN" in message
    elif case == "overflow":
        assert "in_proj_weight[0:64]" in message and "too large" in message
    else:
        assert "merge=False" in message
