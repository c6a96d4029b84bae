"""SD 2.x end to end: random files of both variants read, built and run against diffusers.

Parity: a random SD 2.x single file written by ldm.weights (tiny, and the full architecture) is
loaded by ldm.load and by diffusers' own single-file loader (StableDiffusionPipeline.from_single_file
with a local config folder: its converter splits OpenCLIP's fused in_proj and renames every key, so
a wrong name on our side is a missing or random tensor on its side); the same per-image CPU
generators and the same sampler; every step's latent and the final images are compared
(ref_sd.compare: rtol 1e-4, atol 1e-4 times the step's largest |x|; images at most 1/255 apart).
Every sampler in the registry runs under both prediction types (512-base: epsilon, 768-v: v).

The prediction rule (ldm/checkpoint/prediction.py): each source of the answer, in order, and the
UNet test checked on ldm's trained shapes model (an epsilon model) and on its output turned
exactly into v.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import ldm
import ref_sd
from ldm import checkpoint, families, samplers, weights
from ldm.checkpoint import prediction
from ldm.openclip import OpenCLIPTextModel
from ref_sd import compare, run_ours

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*", "ignore::FutureWarning")
FAMILIES = ("sd2", "sd2-v")


@pytest.fixture(scope="module")
def tiny2(tmp_path_factory):
    """{"sd2": (ours, diffusers base), "sd2-v": (...)} from tiny random SD 2.x checkpoint files."""
    root = tmp_path_factory.mktemp("sd2")
    out = {}
    for name in FAMILIES:
        path = weights.random_checkpoint(root / f"{name}.safetensors", family=name, seed=11)
        ck = checkpoint.read(path)
        base = ref_sd.load_with_diffusers(path, weights.configs_for(ck), root / f"{name}-config",
                                          prediction_type=ck.prediction_type)
        out[name] = (ldm.load(path, device="cpu"), base)
    return out


def test_the_records_build_sd2_from_the_family(tiny2):
    for name in FAMILIES:
        pipe, _ = tiny2[name]
        fam = families.get(name)
        assert pipe.family is fam and fam.supported
        assert pipe.prediction_type == fam.prediction_type == {"sd2": "epsilon", "sd2-v": "v_prediction"}[name]
        assert isinstance(pipe.text_encoder, OpenCLIPTextModel)
        assert pipe.tokenizer.pad_id == 0
        assert pipe.unet.cfg.use_linear_in_transformer and pipe.unet.cfg.num_head_channels == 16
    assert (families.get("sd2").default_size, families.get("sd2-v").default_size) == (512, 768)
    with pytest.raises(ValueError, match=r"^inpainting=True is the sd1-inpaint family; it does not go with family='sd2'$"):
        weights.random_models(inpainting=True, family="sd2")
    full = families.get("sd2").configs
    assert (full["text_encoder"].width, full["unet"].context_dim, full["unet"].num_head_channels) == (1024, 1024, 64)


@pytest.mark.parametrize("scheduler", samplers.SAMPLERS)
@pytest.mark.parametrize("name", FAMILIES)
def test_txt2img_matches_diffusers_every_sampler_both_predictions(tiny2, name, scheduler):
    ours, base = tiny2[name]
    steps, guidance = (4, 1.5) if scheduler == "lcm" else (3, 7.5)
    res, latents = run_ours(ours, "generate", ["a red circle", "two blue squares"], 5, steps=steps,
                            scheduler=scheduler, guidance=guidance, height=64, width=64)
    ref = ref_sd.as_pipeline(base, "txt2img", scheduler, prediction_type=ours.prediction_type)
    ref_images, ref_latents = ref_sd.run_diffusers(ref, ["a red circle", "two blue squares"], res.seeds,
                                                   num_inference_steps=steps, guidance_scale=guidance,
                                                   height=64, width=64)
    if scheduler == "pndm":  # diffusers' PLMS warm-up is two scheduler steps (the first a half-way latent), ours one
        ref_latents = ref_latents[1:]
    if scheduler == "heun":  # diffusers' Heun step is two scheduler steps (Euler's half-way latent, then the
        ref_latents = ref_latents[1:-1:2] + ref_latents[-1:]  # correction), except the last, plain Euler to sigma 0
    compare(latents, res.images, ref_images, ref_latents)


@pytest.mark.parametrize("name", FAMILIES)
def test_img2img_matches_diffusers(tiny2, name):
    from test_pipeline import picture

    ours, base = tiny2[name]
    res, latents = run_ours(ours, "img2img", ["a cat"], 2, image=picture(), strength=0.6, steps=5, scheduler="ddim")
    ref = ref_sd.as_pipeline(base, "img2img", "ddim", prediction_type=ours.prediction_type)
    ref_images, ref_latents = ref_sd.run_diffusers(ref, ["a cat"], res.seeds, image=picture(), strength=0.6,
                                                   num_inference_steps=5, guidance_scale=7.5)
    compare(latents, res.images, ref_images, ref_latents)


def test_prompts_pad_with_zero_and_clip_skip_counts_as_diffusers(tiny2):
    """SD 2.x's window pads with 0 after EOS on both prompt paths (A1111 pads so after the first EOS), and
    clip skip N is diffusers' encode_prompt(clip_skip=N - 1) on the same file: the final layer norm of
    hidden_states[-N] of its 23-layer CLIPTextModel (written out here: diffusers' encode_prompt reaches for
    text_model., which transformers 5 removed)."""
    ours, base = tiny2["sd2"]
    ids = ours.tokenizer(["a red circle"])
    assert ids[0, :5].tolist() == [49406, 320, 736, 7117, 49407] and set(ids[0, 5:].tolist()) == {0}
    plain = ours.encode_prompt(["a red circle"])
    torch.testing.assert_close(ours.encode_prompt(["a red circle"], prompt_syntax="a1111"), plain, rtol=0, atol=0)
    hf = base.text_encoder
    final_norm = getattr(hf, "text_model", hf).final_layer_norm
    with torch.no_grad():
        hidden = hf(ids, output_hidden_states=True).hidden_states
    for clip_skip in (1, 2):
        ref = final_norm(hidden[-clip_skip])
        torch.testing.assert_close(ours.encode_prompt(["a red circle"], clip_skip=clip_skip), ref, rtol=1e-5, atol=1e-5)
    long = ours.encode_prompt(["a (red:1.3) circle, " * 30], prompt_syntax="a1111")
    assert long.shape == (1, 2 * 77, 48)  # 120 tokens: two windows


def test_the_prediction_override_and_its_errors(tiny2):
    ours, _ = tiny2["sd2-v"]
    assert ours.check_prediction_type("epsilon") == "epsilon"  # the 768-v network may be run as 512-base
    with pytest.raises(ValueError, match=r"^prediction_type='sample' is not a choice for the sd2-v family "
                                         r"\(SD 2.x \(768-v\)\); allowed: epsilon, v_prediction$"):
        ours.generate("a dog", prediction_type="sample", progress=False)


# ---- the prediction rule ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """The tiny SD 2.x tensors and ldm's configs, without the model-spec metadata that says eps or v."""
    root = tmp_path_factory.mktemp("bare")
    path = weights.random_checkpoint(root / "m.safetensors", family="sd2", seed=4)
    meta = checkpoint.safetensors_metadata(path)
    return load_file(path), {k: v for k, v in meta.items() if not k.startswith("modelspec.")}


def _write(tmp_path, tensors, metadata, name="m.safetensors"):
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return path


def _with_out_bias(tensors, value):
    """The UNet's last convolution's bias set to `value`: its output's mean moves by about that much."""
    key = "model.diffusion_model.out.2.bias"
    return {**tensors, key: torch.full_like(tensors[key], value)}


@pytest.mark.parametrize("bias, expected", [(-4.0, "v_prediction"), (4.0, "epsilon")])
def test_without_a_word_in_the_file_the_unet_test_decides(bare, tmp_path, bias, expected):
    tensors, meta = bare
    ck = checkpoint.read(_write(tmp_path, _with_out_bias(tensors, bias), meta))
    assert ck.prediction_type == expected
    assert ck.family == {"epsilon": "sd2", "v_prediction": "sd2-v"}[expected]
    sign = "<" if expected == "v_prediction" else ">="
    assert ck.prediction_reason.startswith("the UNet's test at t=999 on constant input gave mean(out - x) = ")
    assert f" {sign} -1 (the AUTOMATIC1111 web UI's rule)" in ck.prediction_reason


def test_what_the_file_says_comes_before_the_unet_test(bare, tmp_path):
    tensors, meta = bare
    v_by_test = _with_out_bias(tensors, -4.0)  # the UNet test alone would say v
    cases = [
        ({"modelspec.prediction_type": "epsilon"}, {}, None, "epsilon", "modelspec.prediction_type=epsilon"),
        ({"modelspec.architecture": "stable-diffusion-v2-512"}, {}, None, "epsilon",
         "modelspec.architecture=stable-diffusion-v2-512"),
        ({}, {"v_pred": torch.tensor([])}, None, "v_prediction", "the file has a v_pred entry"),
        ({}, {}, "model:\n  params:\n    linear_start: 0.00085\n", "epsilon", "m.yaml beside it says so"),
        ({}, {}, "model:\n  params:\n    parameterization: \"v\"\n", "v_prediction", "m.yaml beside it says so"),
    ]
    for i, (extra_meta, extra_tensors, yaml_text, expected, reason) in enumerate(cases):
        folder = tmp_path / str(i)
        folder.mkdir()
        path = _write(folder, {**v_by_test, **extra_tensors}, {**meta, **extra_meta})
        if yaml_text is not None:
            (folder / "m.yaml").write_text(yaml_text)
        ck = checkpoint.read(path)
        assert (ck.prediction_type, reason in ck.prediction_reason) == (expected, True), (i, ck.prediction_reason)
    # the model spec of ldm's own random files says which variant they are
    assert checkpoint.read(weights.random_checkpoint(tmp_path / "v.safetensors", family="sd2-v")).prediction_reason \
        == "the file's metadata says modelspec.prediction_type=v"


def test_bad_declarations_are_one_line(bare, tmp_path):
    tensors, meta = bare
    path = _write(tmp_path, tensors, {**meta, "modelspec.prediction_type": "x0"})
    with pytest.raises(checkpoint.CheckpointError, match=r"modelspec.prediction_type='x0'; allowed: v, epsilon$"):
        checkpoint.read(path)
    path = _write(tmp_path, tensors, meta, "n.safetensors")
    for text, match in (("model: [unclosed\n", r"n.yaml: not a readable YAML model config"),
                        ("just a string\n", r"n.yaml: no model.params mapping"),
                        ("model:\n  params:\n    parameterization: flow\n",
                         r"model.params.parameterization='flow'; allowed: eps, v, x0$"),
                        ("model:\n  params:\n    parameterization: x0\n",
                         r"it predicts sample, which no SD 2.x \(512-base\) model does; allowed: epsilon, v_prediction$"),
                        ("!!python/object/apply:os.system ['echo hi']\n", r"not a readable YAML model config")):
        (tmp_path / "n.yaml").write_text(text)
        with pytest.raises(checkpoint.CheckpointError, match=match) as err:
            checkpoint.read(path)
        assert "\n" not in str(err.value)


def test_hostile_yaml_beside_a_checkpoint_is_one_line_in_bounded_time(bare, tmp_path):
    """A YAML beside the file is a door: an alias bomb (a few hundred bytes that str() expands to
    gigabytes), a `model:` that is a string or empty, a value that is no string. Each ends in one line
    naming the YAML, within the child's deadline and memory cap."""
    from bounded import run_bounded, assert_one_line_error

    tensors, meta = bare
    path = _write(tmp_path, tensors, meta)
    laughs = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    laughs += [f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]" for p, c in zip("abcdefgh", "bcdefghi")]
    cases = {
        "model:\n  params:\n    parameterization: &x [1]\n" + "\n".join("    p%d: *x" % i for i in range(3)) + "\n":
            "aliases (*name) are not allowed",
        "\n".join(laughs) + "\nmodel:\n  params:\n    parameterization: *i\n": "aliases (*name) are not allowed",
        "model: just a string\n": "no model.params mapping",
        "model:\n": "no model.params mapping",
        "model:\n  params:\n    parameterization: [1, 2, 3]\n": "parameterization=a list; allowed: eps, v, x0",
        "[" * 50000 + "\n": "not a readable YAML model config",
    }
    for text, match in cases.items():
        (tmp_path / "m.yaml").write_text(text)
        out = run_bounded(lambda: checkpoint.read(path), deadline_s=10)
        assert_one_line_error(out, ("CheckpointError",), str(tmp_path / "m.yaml"), match=match)


def test_the_callers_prediction_type_comes_first_and_the_unet_is_not_run(bare, tmp_path, monkeypatch):
    """Step 1 of the rule in the code: ldm.load(path, prediction_type=...) neither runs the UNet test nor
    fails when it could not run (here it would raise), and the family follows the answer."""
    tensors, meta = bare
    path = _write(tmp_path, _with_out_bias(tensors, -4.0), meta)   # the UNet test would say v

    def no_probe(*args, **kwargs):
        raise AssertionError("the UNet test ran although the caller said what the UNet predicts")

    monkeypatch.setattr(prediction, "probe_state_dict", no_probe)
    for said, family in (("epsilon", "sd2"), ("v_prediction", "sd2-v")):
        ck = checkpoint.read(path, prediction_type=said)
        assert (ck.prediction_type, ck.family, ck.prediction_reason) == (said, family, f"prediction_type={said!r} was given")
        pipe = ldm.load(path, device="cpu", prediction_type=said)
        assert (pipe.prediction_type, pipe.family.name) == (said, family)
    # the caller's answer also beats what the file says
    spec = _write(tmp_path, tensors, {**meta, "modelspec.prediction_type": "v"}, "spec.safetensors")
    assert checkpoint.read(spec, prediction_type="epsilon").prediction_type == "epsilon"
    with pytest.raises(ValueError, match=r"^prediction_type='sample' is not a choice for the sd2 family"):
        checkpoint.read(path, prediction_type="sample")
    with pytest.raises(ValueError, match=r"^prediction_type='banana' is not a choice for the sd2 family"):
        ldm.load(path, device="cpu", prediction_type="banana")


def test_the_unet_test_on_a_trained_model_and_its_exact_v_twin():
    """ldm's shipped model predicts epsilon; the same network's output turned into v, exactly as a perfect
    v model of the same data would answer (v = sqrt(abar) eps - sqrt(1 - abar) x0), must read as v."""
    pipe = ldm.load(weights.SHIPPED, device="cpu")
    unet, cfg, abar = pipe.unet, pipe.unet.cfg, pipe.schedule.alpha_bar

    class AsV(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, x, t, context):
            eps = self.unet(x, t, context)
            a, s = abar[t.long()].sqrt().view(-1, 1, 1, 1), (1 - abar[t.long()]).sqrt().view(-1, 1, 1, 1)
            x0 = (x - s * eps) / a
            return a * eps - s * x0

    eps_answer, eps_score = prediction.probe(unet, cfg.in_channels, cfg.context_dim)
    v_answer, v_score = prediction.probe(AsV(), cfg.in_channels, cfg.context_dim)
    assert (eps_answer, v_answer) == ("epsilon", "v_prediction")
    assert eps_score > -0.5 and v_score < -2  # measured: -0.18 and -3.05, far on either side of -1


def test_info_says_what_it_found_and_why(tiny2, tmp_path, capsys):
    from ldm import cli

    path = weights.random_checkpoint(tmp_path / "v.safetensors", family="sd2-v", seed=2)
    assert cli.main(["info", str(path)]) in (0, None)
    out = capsys.readouterr().out
    assert "family  sd2-v" in out
    assert "predicts v_prediction (the file's metadata says modelspec.prediction_type=v)" in out


def test_an_sd2_diffusers_folder_is_refused_by_name(tiny2, tmp_path):
    _, base = tiny2["sd2"]
    base.save_pretrained(tmp_path / "folder")
    with pytest.raises(checkpoint.CheckpointError, match=r"this looks like an SD 2.x \(512-base\) diffusers "
                                                         r"folder; ldm reads SD 2.x \(512-base\) from its single-file"):
        checkpoint.read(tmp_path / "folder")


@pytest.mark.full
def test_full_size_sd2_files_match_diffusers(tmp_path):
    """The full SD 2.x architecture (ViT-H/14 text tower, 865M-parameter UNet), random weights stored in
    fp16 and run in fp32, both variants: 64x64 pixels, 2 steps, CFG, every step and the image."""
    path = weights.random_checkpoint(tmp_path / "full.safetensors", size="full", family="sd2-v",
                                     dtype=torch.float16, seed=1)
    ck = checkpoint.read(path)
    assert (ck.family, len(ck.text_encoder), len(ck.unet), len(ck.vae)) == ("sd2-v", 294, 686, 248)
    base = ref_sd.load_with_diffusers(path, weights.configs_for(ck), tmp_path / "config",
                                      prediction_type="v_prediction", torch_dtype=torch.float32)
    ours = ldm.load(path, device="cpu", dtype=torch.float32)  # loaded once: the file says v
    for predicts, scheduler in (("v_prediction", "euler"), ("epsilon", "dpmpp_2m")):  # then overridden per call
        res, latents = run_ours(ours, "generate", ["a photograph of an astronaut"], 0, steps=2,
                                scheduler=scheduler, height=64, width=64, prediction_type=predicts)
        ref = ref_sd.as_pipeline(base, "txt2img", scheduler, prediction_type=predicts)
        ref_images, ref_latents = ref_sd.run_diffusers(ref, ["a photograph of an astronaut"], res.seeds,
                                                       num_inference_steps=2, guidance_scale=7.5, height=64, width=64)
        compare(latents, res.images, ref_images, ref_latents)
    assert json.loads(json.dumps(ck.summary()))["prediction_type"] == "v_prediction"
