"""SDXL base against diffusers' StableDiffusionXLPipeline, per stage and end to end, and its bad inputs.

The tiny SDXL (ldm.families' sdxl tiny_configs: CLIP 32 wide, bigG 64 wide, a 96-wide context, y of
64 + 6 x 8) is written by ldm as a single file and read by both: ldm.load, and diffusers'
from_single_file with a local config folder (tests/ref_sdxl.py). The full-size key proof builds every
network on the meta device, so it costs seconds and no memory.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ldm
import ref_sdxl
import ref_vae
from ldm import checkpoint, families, weights
from ldm.checkpoint.write import single_file_state_dict

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")

PROMPTS = ["a red circle above a blue square", "a green triangle"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(ours, diffusers') pipelines on one tiny random SDXL single file."""
    root = tmp_path_factory.mktemp("sdxl")
    models, configs = weights.random_stages("tiny", seed=1, family="sdxl")
    path = weights.write_single_file(root / "xl.safetensors", models, family="sdxl", configs=configs)
    return ldm.load(path, device="cpu"), ref_sdxl.load_with_diffusers(path, configs, root / "config")


def _images(ours, ref):
    a = np.stack([np.asarray(im) for im in ours]).astype(int)
    b = (ref * 255).round().astype(int)
    return np.abs(a - b).max()


# ---- per stage -----------------------------------------------------------------------------------
@pytest.mark.parametrize("negative", [None, "", "blurry"])
def test_the_conditioning_is_diffusers_encode_prompt(pair, negative):
    ours, ref = pair
    pe, npe, pooled, npooled = ref.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                 do_classifier_free_guidance=True, negative_prompt=negative)
    cond = ours.condition(PROMPTS + [negative] * 2, height=64, width=64)
    assert cond.context.shape == (4, 77, 96) and cond.y.shape == (4, 112)
    torch.testing.assert_close(cond.context, torch.cat([pe, npe]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond.y[:, :64], torch.cat([pooled, npooled]), rtol=1e-5, atol=1e-5)
    if negative is None:  # no negative prompt: zeros (force_zeros_for_empty_prompt); "" is encoded
        assert cond.context[2:].abs().max() == 0 and cond.y[2:, :64].abs().max() == 0
    else:
        assert cond.context[2:].abs().max() > 0.1


def test_the_size_numbers_are_diffusers_add_time_ids(pair):
    ours, ref = pair
    kw = dict(original_size=(512, 768), crops_coords_top_left=(32, 16), target_size=(64, 96))
    cond = ours.condition(["x"], height=64, width=96, **kw)
    ids = torch.tensor([[512.0, 768, 32, 16, 64, 96]])                    # original, crop, target: (h, w) each
    torch.testing.assert_close(cond.y[:, 64:], ref.unet.add_time_proj(ids.flatten()).reshape(1, -1), rtol=0, atol=1e-6)
    default = ours.condition(["x"], height=64, width=96)                   # defaults: (H, W), (0, 0), (H, W)
    ids = torch.tensor([[64.0, 96, 0, 0, 64, 96]])
    torch.testing.assert_close(default.y[:, 64:], ref.unet.add_time_proj(ids.flatten()).reshape(1, -1), rtol=0, atol=1e-6)


def test_the_unet_with_y_is_diffusers_text_time_unet(pair):
    ours, ref = pair
    g = torch.Generator().manual_seed(3)
    x, ctx, pooled = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 96, generator=g), torch.randn(2, 64, generator=g)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [1024, 512, 8, 0, 64, 64]])
    y = torch.cat([pooled, ref.unet.add_time_proj(ids.flatten()).reshape(2, -1)], dim=1)
    t = torch.tensor([999, 251])
    with torch.no_grad():
        expected = ref.unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        torch.testing.assert_close(ours.unet(x, t, ctx, y), expected, rtol=1e-4, atol=1e-5)


# ---- end to end ----------------------------------------------------------------------------------
@pytest.mark.parametrize("negative, guidance", [(None, 5.0), ("blurry, low quality", 5.0), (None, 1.0)])
def test_euler_end_to_end_is_diffusers(pair, negative, guidance):
    ours, ref = pair
    out = ref(prompt=PROMPTS, negative_prompt=negative, num_inference_steps=4, guidance_scale=guidance, height=64,
              width=64, generator=[torch.Generator().manual_seed(s) for s in (0, 1)], output_type="np")
    res = ours.generate(PROMPTS, negative_prompt=negative, steps=4, guidance=guidance, height=64, width=64, seed=0,
                        progress=False)
    assert ours.spacing == "leading" and _images(res.images, out.images) <= 1


def test_lcm_four_steps_four_images_per_prompt_is_diffusers(pair):
    from diffusers import LCMScheduler

    ours, ref = pair
    base_scheduler = ref.scheduler
    ref.scheduler = LCMScheduler.from_config(base_scheduler.config)
    try:
        out = ref(prompt=PROMPTS[:1], num_inference_steps=4, guidance_scale=1.0, num_images_per_prompt=4, height=64,
                  width=64, generator=[torch.Generator().manual_seed(s) for s in range(7, 11)], output_type="np")
    finally:
        ref.scheduler = base_scheduler
    res = ours.generate(PROMPTS[0], scheduler="lcm", steps=4, guidance=1.0, num_images=4, height=64, width=64,
                        seed=7, progress=False)
    assert res.seeds == [7, 8, 9, 10] and len(res.images) == 4
    assert _images(res.images, out.images) <= 1
    assert len({np.asarray(im).tobytes() for im in res.images}) == 4  # four different images


def test_the_family_record_drives_the_pipeline(pair):
    ours, _ = pair
    assert ours.family.name == "sdxl" and set(ours.stages) == {"text_encoder", "text_encoder_2", "unet", "vae"}
    assert ours.tokenizers["text_encoder_2"].pad_id == 0 and ours.tokenizers["text_encoder"].pad_id == 49407
    assert ours.vae.cfg.scaling_factor == 0.13025 and ours.spacing == "leading" and ours.schedule.steps_offset == 1


def test_a_negative_prompt_at_guidance_one_is_named_not_silently_ignored(pair, caplog):
    ours, _ = pair
    with caplog.at_level("WARNING", logger="ldm.pipeline"):
        ours.generate("x", negative_prompt="blurry", guidance=1.0, steps=1, height=64, width=64, seed=0, progress=False)
    lines = [r.getMessage() for r in caplog.records if "negative prompt has no effect" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="ldm.pipeline"):
        ours.generate("x", guidance=1.0, steps=1, height=64, width=64, seed=0, progress=False)
    assert not [r for r in caplog.records if "negative prompt" in r.getMessage()]


# ---- the full-size key proof (meta device) ------------------------------------------------------------
def test_a_full_size_sdxl_file_has_exactly_the_keys_diffusers_converters_want():
    from diffusers import AutoencoderKL as DAutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint,
                                                     infer_diffusers_model_type)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    import ref_openclip

    fam = families.get("sdxl")
    with torch.device("meta"):
        models = {stage: fam.models[stage](fam.configs[stage]) for stage in fam.stage_names}
    file = single_file_state_dict(models, family="sdxl")
    counts = {stage: sum(k.startswith(p) for k in file) for stage, p in fam.prefixes.items()}
    assert counts == {"text_encoder": 196, "text_encoder_2": 390, "unet": 1680, "vae": 248}  # 2514 (+ position_ids: 2515)
    assert infer_diffusers_model_type(file) == "xl_base"  # diffusers recognises it as SDXL base
    shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items()}

    unet_config = ref_sdxl.PUBLISHED_UNET_CONFIG
    vae_config = {**ref_vae.diffusers_vae_config(fam.configs["vae"]), "scaling_factor": 0.13025}
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**unet_config), DAutoencoderKL(**vae_config)
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu"))
        big_g = CLIPTextModelWithProjection(ref_openclip.hf_config(fam.configs["text_encoder_2"], every_block=True))
    for name, converted, reference in [
        ("unet", convert_ldm_unet_checkpoint(file, unet_config), unet.state_dict()),
        ("vae", convert_ldm_vae_checkpoint(file, vae_config), vae.state_dict()),
        ("text_encoder", {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(file).items()
                          if k.startswith("text_model.")}, clip_l.state_dict()),
        ("text_encoder_2", convert_open_clip_checkpoint(big_g, file, prefix=fam.prefixes["text_encoder_2"]),
         big_g.state_dict())]:
        got, want = shapes(converted), shapes(reference)
        assert sorted(got.keys() - want.keys()) == [], f"{name}: keys diffusers does not know"
        assert sorted(want.keys() - got.keys()) == [], f"{name}: keys diffusers wants and the file lacks"
        assert got == want, f"{name}: shapes differ"
    assert sum(p.numel() for p in models["unet"].parameters()) == 2_567_463_684


def test_a_file_with_clips_position_ids_buffer_reads_as_real_files_do(tmp_path):
    models, configs = weights.random_stages("tiny", seed=2, family="sdxl")
    sd = single_file_state_dict(models, family="sdxl")
    sd["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "xl.safetensors",
              metadata={"ldm.configs": checkpoint.configs.configs_metadata(configs)})
    ck = checkpoint.read(tmp_path / "xl.safetensors")
    assert ck.family == "sdxl" and ck.ignored.get("position_ids") == 1


# ---- bad input -----------------------------------------------------------------------------------
def test_a_refiner_file_is_named_and_refused(tmp_path):
    refiner = {"conditioner.embedders.0.model.token_embedding.weight": torch.zeros(8, 4),
               "conditioner.embedders.0.model.transformer.resblocks.0.ln_1.weight": torch.zeros(4),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(384, 4, 3, 3),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1536, 2560),
               "first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}
    from safetensors.torch import save_file

    save_file(refiner, tmp_path / "refiner.safetensors")
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.read(tmp_path / "refiner.safetensors")
    assert "SDXL refiner" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kw, message", [
    (dict(original_size=(-64, 64)), r"original_size=\(-64, 64\) must be \(height, width\): two integers from 1 to 16384"),
    (dict(original_size=(10**9, 64)), r"original_size=\(1000000000, 64\) must be"),
    (dict(target_size=(64.5, 64)), r"target_size=\(64.5, 64\) must be"),
    (dict(target_size=(float("nan"), 64)), r"target_size=\(nan, 64\) must be"),
    (dict(crops_coords_top_left=(-1, 0)), r"crops_coords_top_left=\(-1, 0\) must be \(top, left\): two integers from 0"),
    (dict(crops_coords_top_left=None), r"crops_coords_top_left=None must be \(top, left\)"),
    (dict(original_size=(64, 64, 64)), r"original_size=\(64, 64, 64\) must be"),
    (dict(original_size="1024x1024"), r"original_size='1024x1024' must be"),
    (dict(height=100), r"height=100 must be a multiple of 8 pixels"),
    (dict(prompt_syntax="a1111"), r"prompt_syntax='a1111': ldm reads SDXL prompts as plain text only"),
])
def test_bad_sdxl_options_are_one_line_errors(pair, kw, message):
    ours, _ = pair
    with pytest.raises(ValueError, match=message) as err:
        ours.generate("x", **{"steps": 1, "height": 64, "width": 64, "progress": False, **kw})
    assert "\n" not in str(err.value)


def test_size_conditioning_on_sd1_is_refused_by_name(tmp_path):
    pipe = ldm.load(weights.random_checkpoint(tmp_path / "sd1.safetensors"), device="cpu")
    with pytest.raises(ValueError, match=r"^original_size=\(1024, 1024\): the sd1 family \(SD 1.x\) takes no size "
                                         r"conditioning; it is SDXL's \(leave it out\)$"):
        pipe.generate("x", original_size=(1024, 1024), steps=1, height=32, width=32, progress=False)
    pipe.generate("x", crops_coords_top_left=(0, 0), steps=1, height=32, width=32, progress=False)  # the default is fine


def test_textual_inversion_on_sdxl_is_refused_in_one_line(pair, tmp_path):
    ours, _ = pair
    with pytest.raises(ValueError, match=r"the sdxl family has 2 text towers .* one-tower families \(SD 1.x, 2.x\) only"):
        ours.load_embedding(tmp_path / "missing.safetensors")


def test_the_sd1_uncond_branch_is_still_the_empty_prompt(tmp_path):
    """SD 1.x: no negative prompt and "" are the same (diffusers encodes "" for both)."""
    pipe = ldm.load(weights.random_checkpoint(tmp_path / "sd1.safetensors"), device="cpu")
    a = pipe.generate("x", steps=2, height=32, width=32, seed=0, progress=False)
    b = pipe.generate("x", negative_prompt="", steps=2, height=32, width=32, seed=0, progress=False)
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)


# ---- the source document's job, as one command (tiny) ----------------------------------------------
def test_the_job_is_one_command_four_images_a_drawn_seed_and_a_one_line_note(tmp_path):
    import subprocess
    import sys

    from PIL import Image

    models, configs = weights.random_stages("tiny", seed=4, family="sdxl")
    path = weights.write_single_file(tmp_path / "xl.safetensors", models, family="sdxl", configs=configs)
    run = subprocess.run([sys.executable, "-m", "ldm.cli", "generate", "a red circle", "--checkpoint", str(path),
                          "--scheduler", "lcm", "--steps", "4", "--guidance", "1", "--num-images", "4",
                          "--size", "64x64", "--negative", "low quality, blurry, text, watermark",
                          "--out", str(tmp_path / "outputs"), "-q"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    notes = [line for line in run.stderr.splitlines() if "negative prompt has no effect" in line]
    assert len(notes) == 1, run.stderr[-2000:]
    pngs = sorted((tmp_path / "outputs").glob("*.png"))
    assert len(pngs) == 4
    seeds = []
    for png in pngs:
        with Image.open(png) as im:
            text = im.text["parameters"]
        assert "Sampler: lcm" in text and "Steps: 4" in text and "CFG scale: 1" in text
        seeds.append(int(text.split("Seed: ")[1].split(",")[0]))
    assert len(set(seeds)) == 4 and seeds == list(range(seeds[0], seeds[0] + 4))  # drawn once, then seed + i
