"""ldm.lora against diffusers' load_lora_weights (+ fuse_lora) on random LoRA files in every format.

Each case writes a random LoRA with safetensors for the tiny UNet / text encoder (kohya with diffusers
block names, with CompVis names, LoCon convs, peft with and without "lora_adapter_metadata", legacy
attention-processor keys, two LoRAs with weights), loads it into a diffusers StableDiffusionPipeline
built on the same weights, and compares: the merged weights with diffusers' fused weights, the UNet and
text-encoder outputs merged (fused) and unmerged (forward hooks vs peft's unfused layers).

Two diffusers gaps shape the cases (ours handles both, checked by equivalence instead):
- kohya / legacy text-encoder attention keys (self_attn q/k/v/out_proj) become `to_q_lora` keys that
  transformers 5's CLIPTextModel reports as UNEXPECTED and drops; kohya text-encoder cases use the MLP.
- diffusers turns per-module kohya alphas of attention layers into alpha_pattern keys that match
  nothing (peft warns and uses the file's most common alpha); kohya cases use one alpha per file.
- diffusers' CompVis-name remapping (_maybe_map_sgm_blocks_to_diffusers) sends output_blocks.N.1.conv
  (an Upsample after a level without attention, SD 1.x's deepest level) to attentions; that module is
  left out of the CompVis parity case.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

import ref_clip
import ref_lora
import ref_unet
from ldm import checkpoint, lora
from ldm.clip import CLIPTextConfig
from ldm.unet import UNetConfig, UNetModel

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

ATTENTION = r"(to_q|to_k|to_v|to_out\.0|ff\.net\.0\.proj|ff\.net\.2|proj_in|proj_out)$"
LOCON = r"(in_layers\.2|out_layers\.3|skip_connection|emb_layers\.1|\.op|\d\.conv)$"
TE_ALL = r"(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$"
TE_MLP = r"(fc1|fc2)$"
ATOL = 1e-5


# ---- models and random LoRA files --------------------------------------------------------------
@pytest.fixture
def models():
    unet = ref_unet.ours(UNetConfig.tiny(), seed=0)
    te, _ = ref_clip.pair(CLIPTextConfig.tiny())
    return te, unet


def inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999.0, 250.0]), torch.randn(2, 7, 32, generator=g),
            ref_clip.example_ids(2))


def outputs(te, unet):
    x, t, ctx, ids = inputs()
    with torch.no_grad():
        return unet(x, t, ctx), te(ids)


targets = ref_lora.targets


def random_layers(model, names, rank=4, seed=0, ranks=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{our name: (down, up)} with the module's kernel in down (LoCon) and a 1x1 up for convs."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, name in enumerate(names):
        w = model.get_submodule(name).weight
        r = (ranks or {}).get(name, rank)
        down = torch.randn(r, *w.shape[1:], generator=g) * 0.3
        up = torch.randn(w.shape[0], r, *((1, 1) if w.ndim == 4 else ()), generator=g) * 0.3
        out[name] = (down, up)
    return out


def diffusers_name(unet, name):
    """The diffusers spelling of one of our UNet modules (from the table; diffusers' loader checks it)."""
    aliases = [a for a, n in lora.module_table("unet", unet).items() if n == name and "." in a and a != name]
    return aliases[0]


def write_kohya(path, unet, unet_layers, te_layers=None, names="diffusers", alphas=None):
    sd = {}
    for stage, prefix, layers in (("unet", "lora_unet_", unet_layers), ("te", "lora_te_", te_layers or {})):
        for name, (down, up) in layers.items():
            fname = diffusers_name(unet, name) if stage == "unet" and names == "diffusers" else name
            key = prefix + fname.replace(".", "_")
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
            if alphas is not None and name in alphas:
                sd[f"{key}.alpha"] = torch.tensor(float(alphas[name]))
    save_file(sd, str(path))
    return path


def write_peft(path, unet, unet_layers, te_layers=None, meta=None):
    sd = {}
    for name, (down, up) in unet_layers.items():
        d = diffusers_name(unet, name)
        sd[f"unet.{d}.lora_A.weight"], sd[f"unet.{d}.lora_B.weight"] = down, up
    for name, (down, up) in (te_layers or {}).items():
        sd[f"text_encoder.{name}.lora_A.weight"], sd[f"text_encoder.{name}.lora_B.weight"] = down, up
    save_file(sd, str(path), metadata={"lora_adapter_metadata": json.dumps(meta)} if meta else None)
    return path


def write_legacy(path, unet, unet_layers, te_layers=None):
    sd = {}
    proc = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
    te_proc = {"q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}
    for name, (down, up) in unet_layers.items():
        d = diffusers_name(unet, name)
        module, leaf = next((d[: -len(k) - 1], v) for k, v in proc.items() if d.endswith("." + k))
        sd[f"unet.{module}.processor.{leaf}.down.weight"], sd[f"unet.{module}.processor.{leaf}.up.weight"] = down, up
    for name, (down, up) in (te_layers or {}).items():
        module, _, leaf = name.rpartition(".")
        key = f"text_encoder.{module}.{te_proc[leaf]}"
        sd[f"{key}.down.weight"], sd[f"{key}.up.weight"] = down, up
    save_file(sd, str(path))
    return path


def diffusers_reference(te, unet, files: list[tuple[str, float]]):
    """diffusers on copies of our weights: (unfused outputs, fused outputs, fused state dicts in our names)."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel as HFModel

    d_unet = ref_unet.to_diffusers(copy.deepcopy(unet))
    hf = HFModel(ref_clip.hf_clip_config(te.config))
    hf.load_state_dict(ref_clip.ours_to_hf_state_dict(te.state_dict(), hf), strict=True)
    hf.eval()
    pipe = StableDiffusionPipeline(vae=None, text_encoder=hf, tokenizer=None, unet=d_unet, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    names = [f"lora{i}" for i in range(len(files))]
    for (path, _), name in zip(files, names):
        pipe.load_lora_weights(str(path), adapter_name=name)
    if len(files) > 1 or files[0][1] != 1.0:
        pipe.set_adapters(names, adapter_weights=[w for _, w in files])
    x, t, ctx, ids = inputs()
    with torch.no_grad():
        unfused = d_unet(x, t, encoder_hidden_states=ctx).sample, hf(input_ids=ids).last_hidden_state
        pipe.fuse_lora()
        fused = d_unet(x, t, encoder_hidden_states=ctx).sample, hf(input_ids=ids).last_hidden_state
    pipe.unload_lora_weights()
    table = checkpoint.key_map(lora.layers._unet_key_map_config(unet))
    unet_sd = checkpoint.diffusers_to_compvis("unet", dict(d_unet.state_dict()), table)
    te_sd = ref_clip.hf_state_dict_to_ours(hf.state_dict())
    return unfused, fused, unet_sd, te_sd


def max_weight_error(model, ref_sd) -> float:
    ours = model.state_dict()
    assert set(ours) == set(ref_sd)
    return max((ours[k] - ref_sd[k]).abs().max().item() for k in ours)


def check_parity(te, unet, files, label):
    """Ours (merged, then hooked) against diffusers (fused, unfused); returns the max errors."""
    before = {k: v.clone() for k, v in {**unet.state_dict(), **te.state_dict()}.items()}
    base = outputs(te, unet)
    unfused, fused, unet_sd, te_sd = diffusers_reference(te, unet, files)
    loras = [(lora.read(p), w) for p, w in files]
    handle = lora.apply({"text_encoder": te, "unet": unet}, loras)
    errors = {"unet weights": max_weight_error(unet, unet_sd), "te weights": max_weight_error(te, te_sd)}
    merged = outputs(te, unet)
    handle.unmerge()
    hooked_handle = lora.apply({"text_encoder": te, "unet": unet}, loras, merge=False)
    hooked = outputs(te, unet)
    hooked_handle.unmerge()
    for what, ours, ref in (("merged", merged, fused), ("hooked", hooked, unfused)):
        for stage, a, b in zip(("unet", "te"), ours, ref):
            errors[f"{stage} {what}"] = (a - b).abs().max().item()
            torch.testing.assert_close(a, b, rtol=1e-5, atol=ATOL)
    assert errors["unet weights"] < ATOL and errors["te weights"] < ATOL, errors
    assert (merged[0] - base[0]).abs().max() > 1e-3  # the LoRA changed the UNet's output
    for k, v in {**unet.state_dict(), **te.state_dict()}.items():  # unmerge is exact
        assert torch.equal(v, before[k]), k
    print(f"{label}: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    return errors


# ---- parity with diffusers, one case per format ------------------------------------------------
def test_kohya_diffusers_names(models, tmp_path):
    te, unet = models
    names = targets(unet, ATTENTION)
    layers = random_layers(unet, names, ranks={names[0]: 2, names[1]: 8})
    alphas = {n: 4.0 for n in names}  # one alpha per file (diffusers mangles per-module attention alphas)
    te_layers = random_layers(te, targets(te, TE_MLP), seed=1)
    te_alphas = {n: 3.0 for n in te_layers}
    path = write_kohya(tmp_path / "k.safetensors", unet, layers, te_layers, alphas={**alphas, **te_alphas})
    lo = lora.read(path)
    assert lo.format == "kohya" and lo.num_modules == len(names) + len(te_layers) and lo.ranks == {2, 4, 8}
    check_parity(te, unet, [(path, 1.0)], "kohya (diffusers names)")


def test_kohya_locon_convs(models, tmp_path):
    te, unet = models
    names = targets(unet, ATTENTION) + targets(unet, LOCON)
    assert any(unet.get_submodule(n).weight.shape[-1] == 3 for n in names)  # 3x3 convs with 3x3 downs
    path = write_kohya(tmp_path / "locon.safetensors", unet, random_layers(unet, names, seed=2),
                       alphas={n: 2.0 for n in names})
    check_parity(te, unet, [(path, 0.8)], "kohya LoCon")


def test_kohya_compvis_names(models, tmp_path):
    te, unet = models
    names = targets(unet, ATTENTION) + targets(unet, LOCON, exclude=("output_blocks.2.1.conv",))
    path = write_kohya(tmp_path / "cv.safetensors", unet, random_layers(unet, names, seed=3), names="compvis",
                       alphas={n: 2.0 for n in names})
    # diffusers needs its CompVis (sgm) remapping, which load_lora_weights does not run for SD 1.x
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers
    from safetensors.torch import load_file

    remapped = _maybe_map_sgm_blocks_to_diffusers(load_file(str(path)), ref_unet.to_diffusers(unet).config)
    ref_path = tmp_path / "cv-remapped.safetensors"
    save_file(remapped, str(ref_path))
    unfused, fused, unet_sd, _ = diffusers_reference(te, unet, [(ref_path, 1.0)])
    handle = lora.apply({"text_encoder": te, "unet": unet}, [(lora.read(path), 1.0)])
    assert max_weight_error(unet, unet_sd) < ATOL
    torch.testing.assert_close(outputs(te, unet)[0], fused[0], rtol=1e-5, atol=ATOL)
    handle.unmerge()


def test_compvis_and_diffusers_names_merge_identically(models, tmp_path):
    te, unet = models
    names = targets(unet, ATTENTION) + targets(unet, LOCON)  # every module, upsamplers included
    layers = random_layers(unet, names, seed=4)
    merged = []
    for style in ("compvis", "diffusers"):
        path = write_kohya(tmp_path / f"{style}.safetensors", unet, layers, names=style)
        with lora.apply({"text_encoder": te, "unet": unet}, [(path, 0.9)]) as handle:
            assert handle.num_modules == len(names)
            merged.append({k: v.clone() for k, v in unet.state_dict().items()})
    for k in merged[0]:
        torch.testing.assert_close(merged[0][k], merged[1][k], rtol=0, atol=0)


def test_peft_with_metadata(models, tmp_path):
    te, unet = models
    names = targets(unet, ATTENTION) + targets(unet, LOCON)
    te_names = targets(te, TE_ALL)
    special = diffusers_name(unet, names[3])
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {special: 2}, "unet.rank_pattern": {},
            "unet.target_modules": sorted({diffusers_name(unet, n) for n in names}),
            "text_encoder.r": 4, "text_encoder.lora_alpha": 2, "text_encoder.target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}
    path = write_peft(tmp_path / "peft.safetensors", unet, random_layers(unet, names, seed=5),
                      random_layers(te, te_names, seed=6), meta)
    lo = lora.read(path)
    assert lo.format == "peft"
    assert lo.layers["unet"][diffusers_name(unet, names[0])].scale == 2.0
    assert lo.layers["unet"][special].scale == 0.5 and lo.layers["text_encoder"][te_names[0]].scale == 0.5
    check_parity(te, unet, [(path, 1.0)], "peft + metadata")


def test_peft_without_metadata_has_scale_1(models, tmp_path):
    te, unet = models
    names = targets(unet, ATTENTION)
    path = write_peft(tmp_path / "peft.safetensors", unet, random_layers(unet, names, seed=7),
                      random_layers(te, targets(te, TE_ALL), seed=8))
    assert {l.scale for v in lora.read(path).layers.values() for l in v.values()} == {1.0}
    check_parity(te, unet, [(path, 1.0)], "peft, no metadata")


def test_legacy_attention_processor_keys(models, tmp_path):
    te, unet = models
    names = targets(unet, r"(to_q|to_k|to_v|to_out\.0)$")
    path = write_legacy(tmp_path / "legacy.safetensors", unet, random_layers(unet, names, seed=9))
    assert lora.read(path).format == "legacy"
    check_parity(te, unet, [(path, 1.0)], "legacy attention processors")


def test_legacy_text_encoder_keys_equal_peft(models, tmp_path):
    te, unet = models
    te_layers = random_layers(te, targets(te, r"(q_proj|k_proj|v_proj|out_proj)$"), seed=10)
    results = []
    for writer in (write_legacy, write_peft):
        path = writer(tmp_path / f"{writer.__name__}.safetensors", unet, {}, te_layers)
        with lora.apply({"text_encoder": te, "unet": unet}, [(path, 1.0)]):
            results.append(outputs(te, unet)[1])
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    assert (results[0] - outputs(te, unet)[1]).abs().max() > 1e-4


def test_two_loras_with_weights(models, tmp_path):
    te, unet = models
    a = write_kohya(tmp_path / "a.safetensors", unet, random_layers(unet, targets(unet, ATTENTION), seed=11),
                    random_layers(te, targets(te, TE_MLP), seed=12), alphas={})
    b = write_peft(tmp_path / "b.safetensors", unet, random_layers(unet, targets(unet, r"(proj_in|to_k)$"), seed=13),
                   random_layers(te, targets(te, TE_ALL), seed=14))
    check_parity(te, unet, [(a, 0.7), (b, -0.4)], "two LoRAs (0.7, -0.4)")


# ---- our own behaviour ---------------------------------------------------------------------------
def test_unmerge_restores_the_same_tensors_and_checks_order(models, tmp_path):
    te, unet = models
    names = targets(unet, ATTENTION)
    path = write_kohya(tmp_path / "k.safetensors", unet, random_layers(unet, names))
    w = unet.get_submodule(names[0]).weight
    ptr = w.data_ptr()
    first = lora.apply({"text_encoder": te, "unet": unet}, [(path, 1.0)])
    assert w.data_ptr() != ptr
    second = lora.apply({"text_encoder": te, "unet": unet}, [(path, 0.5)])
    with pytest.raises(lora.LoRAError, match="reverse order"):
        first.unmerge()
    second.unmerge()
    first.unmerge()
    assert w.data_ptr() == ptr  # the very tensor that was there before
    with pytest.raises(lora.LoRAError, match="already unmerged"):
        first.unmerge()


def test_hooks_leave_weights_alone(models, tmp_path):
    te, unet = models
    base = outputs(te, unet)
    path = write_kohya(tmp_path / "k.safetensors", unet, random_layers(unet, targets(unet, ATTENTION + "|" + LOCON)))
    w = {k: v.clone() for k, v in unet.state_dict().items()}
    handle = lora.apply({"text_encoder": te, "unet": unet}, [(path, 1.0)], merge=False)
    assert all(torch.equal(v, w[k]) for k, v in unet.state_dict().items())
    assert (outputs(te, unet)[0] - base[0]).abs().max() > 1e-3
    handle.unmerge()
    torch.testing.assert_close(outputs(te, unet)[0], base[0], rtol=0, atol=0)


def test_kohya_alpha_missing_or_zero_means_rank(models, tmp_path):
    te, unet = models
    names = targets(unet, ATTENTION)[:3]
    path = write_kohya(tmp_path / "k.safetensors", unet, random_layers(unet, names, rank=4),
                       alphas={names[0]: 0.0, names[2]: 2.0})
    scales = {n: l.scale for n, l in lora.read(path).layers["unet"].items()}
    assert sorted(scales.values()) == [0.5, 1.0, 1.0]


def test_pickled_lora_through_the_restricted_reader(models, tmp_path):
    te, unet = models
    st = write_kohya(tmp_path / "k.safetensors", unet, random_layers(unet, targets(unet, ATTENTION)[:2]), alphas={})
    from safetensors.torch import load_file
    torch.save(load_file(str(st)), tmp_path / "k.pt")
    a, b = lora.read(st), lora.read(tmp_path / "k.pt")
    assert a.layers.keys() == b.layers.keys() and all(
        torch.equal(a.layers["unet"][n].up, b.layers["unet"][n].up) for n in a.layers["unet"])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"lora_unet_x.lora_down.weight": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(lora.LoRAError, match="unsafe pickle"):
        lora.read(tmp_path / "evil.pt")


def t(*shape):
    return torch.zeros(shape)


@pytest.mark.parametrize("sd,match", [
    ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": t(4, 32)}, r"text_model_encoder_layers_0_mlp_fc1 \(text_encoder of an SDXL LoRA\) has no up matrix"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": t(4, 32, 1, 1),
      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": t(32, 3, 1, 1)}, r"rank mismatch: down \(4, 32, 1, 1\) has rank 4, up \(32, 3, 1, 1\) has rank 3"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": t(4, 32, 1, 1)}, r"has no up matrix"),
    ({"lora_unet_x.hada_w1_a": t(4, 4)}, r"1 keys are not kohya LoRA keys"),
    ({"unet.foo.lora_A.weight": torch.zeros(2, 2, dtype=torch.int64), "unet.foo.lora_B.weight": t(2, 2)},
     r"foo.down has dtype torch.int64"),
    ({"unet.foo.lora_A.weight": torch.full((2, 2), float("nan")), "unet.foo.lora_B.weight": t(2, 2)}, r"NaN"),
])
def test_bad_files(tmp_path, sd, match):
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(lora.LoRAError, match=match):
        lora.read(path)
    assert str(path) in str(pytest.raises(lora.LoRAError, lora.read, path).value)


def test_mismatches_fail_before_anything_changes(models, tmp_path):
    te, unet = models
    good = write_kohya(tmp_path / "good.safetensors", unet, random_layers(unet, targets(unet, ATTENTION)))
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    # an SD 2.x-like LoRA: cross-attention keys from a 1024-wide context
    sd2 = tmp_path / "sd2.safetensors"
    key = "lora_unet_" + diffusers_name(unet, targets(unet, r"attn2\.to_k$")[0]).replace(".", "_")
    save_file({f"{key}.lora_down.weight": t(4, 1024), f"{key}.lora_up.weight": t(32, 4)}, str(sd2))
    with pytest.raises(lora.LoRAError, match=r"sd2.safetensors: .*down \(4, 1024\).*expected down \(4, 32\)"):
        lora.apply({"text_encoder": te, "unet": unet}, [(good, 1.0), (sd2, 1.0)])
    other = tmp_path / "other.safetensors"
    save_file({f"lora_unet_{n}.lora_down.weight": t(4, 32) for n in ("a_b", "c_d", "e_f")}
              | {f"lora_unet_{n}.lora_up.weight": t(32, 4) for n in ("a_b", "c_d", "e_f")}
              | {f"{key}.lora_down.weight": t(4, 32), f"{key}.lora_up.weight": t(32, 4)}, str(other))
    with pytest.raises(lora.LoRAError, match=r"3 of 4 unet LoRA names match no module .*'a_b'.*strict=False"):
        lora.apply({"text_encoder": te, "unet": unet}, [(good, 1.0), (other, 1.0)])
    with pytest.raises(lora.LoRAError, match=r"weight 'strong' is not a finite number"):
        lora.apply({"text_encoder": te, "unet": unet}, [(good, 1.0), (good, "strong")])
    with pytest.raises(lora.LoRAError, match=r"te.safetensors: has 4 text_encoder layers but no text_encoder was given"):
        lora.apply({"unet": unet}, [(write_peft(tmp_path / "te.safetensors", unet, {},
                                            random_layers(te, targets(te, TE_MLP))), 1.0)])
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    with lora.apply({"text_encoder": te, "unet": unet}, [(other, 1.0)], strict=False) as handle:  # skips the 3, applies the 1
        assert handle.num_modules == 1


@pytest.mark.parametrize("text,expected", [
    ("style.safetensors", ("style.safetensors", 1.0)), ("style.safetensors:0.8", ("style.safetensors", 0.8)),
    ("loras/a.safetensors:-1.5", ("loras/a.safetensors", -1.5)),
    ("C:\\loras\\a.safetensors", ("C:\\loras\\a.safetensors", 1.0)),
    ("C:\\loras\\a.safetensors:0.5", ("C:\\loras\\a.safetensors", 0.5)),
])
def test_parse_spec(text, expected):
    assert lora.parse_spec(text) == expected


@pytest.mark.parametrize("text,match", [("a.safetensors:strong", r"--lora 'a.safetensors:strong': the weight 'strong' is not a number"),
                                        ("a.safetensors:nan", r"not a finite number")])
def test_parse_spec_errors(text, match):
    with pytest.raises(lora.LoRAError, match=match):
        lora.parse_spec(text)


# ---- the LCM-LoRA SD 1.5 layout at full size (tests/ref_lora.py) ----------------------------------


@pytest.mark.full
def test_lcm_lora_layout_full_size(tmp_path):
    """A random file shaped like LCM-LoRA for SD 1.5 (kohya keys, diffusers names, rank 64, alpha 64): all
    278 modules map, 67.25M parameters, and merged weights equal diffusers' fused ones on a few modules."""
    with torch.device("meta"):
        meta_unet = UNetModel(UNetConfig())
    names = targets(meta_unet, ref_lora.LCM_TARGETS)
    assert len(names) == 278
    sd = ref_lora.lcm_shaped(meta_unet)
    path = tmp_path / "lcm-lora-sdv1-5-shaped.safetensors"
    save_file(sd, str(path))
    lo = lora.read(path)
    assert lo.ranks == {64} and lo.num_modules == 278 and round(lo.num_params / 1e6, 2) == 67.25
    resolved = lo.resolve({"unet": meta_unet})["unet"]
    assert sorted(resolved) == sorted(names)

    # merged weights vs diffusers' fused ones, on a few modules of each kind
    few = ["input_blocks.1.1.transformer_blocks.0.attn2.to_k", "input_blocks.4.0.in_layers.2",
           "input_blocks.4.0.skip_connection", "input_blocks.3.0.op", "middle_block.0.emb_layers.1",
           "output_blocks.2.1.conv", "output_blocks.8.2.conv", "output_blocks.11.1.proj_out"]
    prefixes = tuple("lora_unet_" + diffusers_name(meta_unet, n).replace(".", "_") + "." for n in few)
    small = {k: v for k, v in sd.items() if k.startswith(prefixes)}
    small_path = tmp_path / "few.safetensors"
    save_file(small, str(small_path))
    unet, d_unet = ref_unet.full_pair()  # shared tensors: ours are replaced by merging, diffusers' left unfused
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=d_unet, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with lora.apply({"unet": unet}, [(small_path, 1.0)]):
        pipe.load_lora_weights(str(small_path))
        errors = []
        try:
            for n in few:  # diffusers' fused weight = base + peft's delta (fuse_lora adds exactly this)
                layer = d_unet.get_submodule(diffusers_name(unet, n))
                theirs = layer.base_layer.weight + layer.get_delta_weight("default_0")
                ours = unet.get_submodule(n).weight
                errors.append((ours - theirs).abs().max().item())
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=ATOL)
        finally:
            pipe.unload_lora_weights()
    print(f"LCM-LoRA layout: max merged-weight error {max(errors):.2e} over {len(few)} modules")
