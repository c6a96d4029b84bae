"""The pipeline end to end: parity with diffusers' three SD pipelines, seeds, previews, precision, bad input.

Parity: the same checkpoint file loaded by ldm.load and by diffusers' single-file loader, the same
per-image CPU generators, the same sampler. Every step's latent is compared (assert_close, fp32,
rtol 1e-4 and atol 1e-4 times the step's largest |x|: sigma-space latents start near sigma_max ~ 15)
and the final images as uint8 (max difference <= 1, i.e. 1/255).
"""
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import ldm
import ref_sd
from ref_sd import compare, run_ours
from ldm import images as imgs
from ldm import pipeline as pl
from ldm import families, samplers, weights
from ldm.tokenizer import TruncationWarning

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{"sd1": (ours, diffusers base), "sd1-inpaint": (...)} from tiny random checkpoint files."""
    root = tmp_path_factory.mktemp("pipe")
    out = {}
    for family, inpainting in (("sd1", False), ("sd1-inpaint", True)):
        path = weights.random_checkpoint(root / f"{family}.safetensors", seed=3, inpainting=inpainting)
        configs = weights.configs_for(ldm.checkpoint.read(path))
        base = ref_sd.load_with_diffusers(path, configs, root / f"{family}-config")
        out[family] = (ldm.load(path, device="cpu"), base)
    return out


def picture(size=64, seed=0) -> Image.Image:
    """A smooth RGB test picture (the VAE of a random checkpoint does not care what it shows)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(size, size), mode="bilinear")
    return imgs.to_pil(x * 2 - 1)[0]


def square_mask(size=64) -> Image.Image:
    m = Image.new("L", (size, size))
    m.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return m


@pytest.mark.parametrize("scheduler, guidance, n_prompts, num_images", [
    ("euler", 7.5, 1, 1), ("ddim", 7.5, 2, 2), ("dpmpp_2m", 1.0, 1, 1), ("euler_a", 5.0, 1, 2), ("lms", 7.5, 1, 1),
])
def test_txt2img_matches_diffusers_every_step(tiny, scheduler, guidance, n_prompts, num_images):
    ours, base = tiny["sd1"]
    prompts = ["a dog wearing a hat", "a red cube on a table"][:n_prompts]
    res, steps = run_ours(ours, "generate", prompts, 7, steps=4, scheduler=scheduler, guidance=guidance,
                          num_images=num_images, negative_prompt="blurry", height=64, width=48)
    ref_images, ref_steps = ref_sd.run_diffusers(
        ref_sd.as_pipeline(base, "txt2img", scheduler), prompts, res.seeds, negative="blurry",
        num_inference_steps=4, guidance_scale=guidance, num_images_per_prompt=num_images, height=64, width=48)
    assert res.seeds == list(range(7, 7 + n_prompts * num_images))
    compare(steps, res.images, ref_images, ref_steps)
    torch.testing.assert_close(res.latents, ref_steps[-1], **TOL)


@pytest.mark.parametrize("scheduler, strength, num_images", [("euler", 0.6, 1), ("ddim", 0.5, 2), ("euler_a", 0.8, 2)])
def test_img2img_matches_diffusers_every_step(tiny, scheduler, strength, num_images):
    ours, base = tiny["sd1"]
    image = picture()
    res, steps = run_ours(ours, "img2img", ["a cat"], 1, image=image, strength=strength, steps=5,
                          scheduler=scheduler, num_images=num_images)
    ref_images, ref_steps = ref_sd.run_diffusers(
        ref_sd.as_pipeline(base, "img2img", scheduler), ["a cat"], res.seeds, image=image, strength=strength,
        num_inference_steps=5, guidance_scale=7.5, num_images_per_prompt=num_images)
    assert len(steps) == int(5 * strength)
    compare(steps, res.images, ref_images, ref_steps)


@pytest.mark.parametrize("family, scheduler, strength, num_images", [
    ("sd1", "euler", 1.0, 1), ("sd1", "ddim", 0.7, 1), ("sd1", "euler_a", 1.0, 2), ("sd1", "dpmpp_2m", 0.8, 1),
    ("sd1-inpaint", "euler", 1.0, 2), ("sd1-inpaint", "dpmpp_2m", 0.8, 1), ("sd1-inpaint", "euler_a", 1.0, 2),
])
def test_inpaint_matches_diffusers_every_step(tiny, family, scheduler, strength, num_images):
    ours, base = tiny[family]
    image, mask = picture(), square_mask()
    res, steps = run_ours(ours, "inpaint", ["a cat"], 2, image=image, mask=mask, strength=strength, steps=4,
                          scheduler=scheduler, num_images=num_images)
    ref_images, ref_steps = ref_sd.run_diffusers(
        ref_sd.as_pipeline(base, "inpaint", scheduler), ["a cat"], res.seeds, image=image, mask_image=mask,
        strength=strength, num_inference_steps=4, guidance_scale=7.5, num_images_per_prompt=num_images,
        height=64, width=64)
    compare(steps, res.images, ref_images, ref_steps)


def test_plain_inpainting_keeps_the_known_region(tiny):
    ours, _ = tiny["sd1"]
    image, mask = picture(), square_mask()
    res = ours.inpaint("a cat", image, mask, steps=3, seed=0, progress=False)
    known = ours.encode_image(imgs.from_pil(image), [torch.Generator().manual_seed(0)])
    keep = torch.nn.functional.interpolate(imgs.mask_from_pil(mask, (64, 64)), size=(8, 8)) < 0.5
    torch.testing.assert_close(res.latents[keep.expand_as(res.latents)], known[keep.expand_as(known)])
    assert not torch.allclose(res.latents, known)  # the masked square was repainted


def test_same_seed_same_image_and_each_image_has_its_own_seed(tiny):
    ours, _ = tiny["sd1"]
    kw = dict(steps=3, height=64, width=64, progress=False)
    a = ours.generate("a dog", seed=11, num_images=2, **kw)
    b = ours.generate("a dog", seed=11, num_images=2, **kw)
    torch.testing.assert_close(a.latents, b.latents, atol=0, rtol=0)
    alone = ours.generate("a dog", seed=12, **kw)  # image 1 of the batch had seed 12
    torch.testing.assert_close(alone.latents[0], a.latents[1], **TOL)
    assert not torch.allclose(a.latents[0], a.latents[1])
    assert "Seed: 12" in a.parameters[1] and "Negative prompt" not in a.parameters[1]


def test_guidance_one_skips_the_unconditional_pass(tiny):
    ours, _ = tiny["sd1"]
    batches = []
    handle = ours.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        ours.generate(["a", "b"], guidance=1.0, steps=2, height=64, width=64, progress=False, seed=0)
        ours.generate(["a", "b"], guidance=3.0, steps=2, height=64, width=64, progress=False, seed=0)
    finally:
        handle.remove()
    assert batches == [2, 2, 4, 4]


def test_previews_and_x0_per_step(tiny):
    ours, _ = tiny["sd1"]
    res = ours.generate("a dog", steps=3, height=64, width=48, previews="cheap", seed=0, progress=False)
    assert len(res.x0_preds) == len(res.previews) == 3 and res.previews[0][0].size == (6, 8)
    x0 = res.x0_preds[-1]
    factors = ours.family.preview_factors()  # the family record's (4, 3) map
    manual = torch.einsum("bchw,cr->brhw", x0, torch.tensor(families.SD_LATENT_RGB_FACTORS))
    torch.testing.assert_close(imgs.latent_preview(x0, factors), manual)
    full = ours.generate("a dog", steps=2, height=64, width=64, previews="vae", seed=0, progress=False)
    assert full.previews[-1][0].size == (64, 64)


def test_auto_tiling_above_the_threshold(tiny, monkeypatch):
    ours, _ = tiny["sd1"]
    calls = []
    real = ours.vae.decode_tiled
    monkeypatch.setattr(ours.vae, "decode_tiled", lambda z, **kw: calls.append(z.shape) or real(z, **kw))
    z = torch.randn(2, 4, 8, 8)
    untiled = ours.decode(z)
    assert calls == []
    monkeypatch.setattr(pl, "AUTO_TILE_LATENT", 4)
    tiled = ours.decode(z)
    assert calls == [(1, 4, 8, 8)] * 2 and tiled.shape == untiled.shape == (2, 3, 64, 64)


def test_bf16_on_the_cpu_keeps_latents_fp32(tiny, tmp_path):
    path = weights.random_checkpoint(tmp_path / "m.safetensors", seed=3)
    pipe = ldm.load(path, device="cpu", dtype=torch.bfloat16)
    assert pipe.dtype == pipe.vae_dtype == torch.bfloat16
    res = pipe.generate("a dog", steps=3, height=64, width=64, seed=0, progress=False)
    ref = tiny["sd1"][0].generate("a dog", steps=3, height=64, width=64, seed=0, progress=False)
    assert res.latents.dtype == torch.float32
    assert (res.latents - ref.latents).abs().max() < 0.1 * ref.latents.abs().max()  # bf16: 8 mantissa bits


def test_fp16_default_keeps_the_vae_in_fp32(tmp_path):
    path = weights.random_checkpoint(tmp_path / "m.safetensors")
    pipe = ldm.load(path, device="cpu", dtype=torch.float16)
    assert pipe.dtype == torch.float16 and pipe.vae_dtype == torch.float32


def test_overflowing_decode_raises_instead_of_a_black_image(tmp_path):
    path = weights.random_checkpoint(tmp_path / "m.safetensors")
    pipe = ldm.load(path, device="cpu", dtype=torch.float32, vae_dtype=torch.float16)
    with torch.no_grad():
        pipe.vae.decoder.conv_in.weight.mul_(3e4)  # activations beyond fp16's 65504
    with pytest.raises(pl.NonFiniteError, match="decoded image 0 has .* NaN/inf values"):
        pipe.decode(torch.randn(1, 4, 8, 8))
    with pytest.raises(pl.NonFiniteError, match="the latent"):
        pipe.decode(torch.tensor([math.nan]).expand(1, 4, 8, 8))


def test_txt2img_refuses_an_inpainting_checkpoint(tiny):
    with pytest.raises(ValueError, match="inpainting checkpoint"):
        tiny["sd1-inpaint"][0].generate("a dog", steps=1, progress=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(height=60), "height=60 must be a multiple of 8 pixels"),
    (dict(width=0), "width=0 must be a multiple of 8 pixels .* at least 16"),
    (dict(width=8), "width=8 must be .* at least 16"),
    (dict(steps=0), "steps=0 is not allowed"),
    (dict(guidance=-1.0), "guidance=-1.0 must be a finite number >= 0"),
    (dict(guidance=math.nan), "guidance=nan"),
    (dict(scheduler="dpm"), "scheduler='dpm' is unknown"),
    (dict(num_images=0), "num_images=0"),
    (dict(seed=-1), "seed=-1"),
    (dict(previews="fancy"), "previews='fancy'"),
])
def test_bad_generate_input_names_the_value(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny["sd1"][0].generate("a dog", progress=False, **kwargs)


def test_bad_prompts_images_masks(tiny):
    ours = tiny["sd1"][0]
    with pytest.raises(ValueError, match=r"prompt=\[\] must be a str or a non-empty list"):
        ours.generate([], progress=False)
    with pytest.raises(ValueError, match="strength=1.5 is outside"):
        ours.img2img("a", picture(), strength=1.5, progress=False)
    with pytest.raises(ValueError, match="mask is 32x32 pixels but the image is 64x64"):
        ours.inpaint("a", picture(), square_mask(32), progress=False)
    with pytest.raises(ValueError, match="image is 60x60 pixels; .* multiples of 8"):
        ours.img2img("a", picture(60), progress=False)
    with pytest.raises(ValueError, match="height=8 must be .* at least 16"):
        ours.img2img("a", picture(8), progress=False)
    with pytest.raises(ValueError, match="mode 'CMYK'"):
        ours.img2img("a", picture().convert("CMYK"), progress=False)
    rgba = picture().convert("RGBA")  # converted, not refused
    assert ours.img2img("a", rgba, steps=1, progress=False).images[0].size == (64, 64)


def test_long_prompt_warns_once_with_the_dropped_words(tiny):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny["sd1"][0].generate("a dog " * 40 + "wearing a golden crown", steps=1, guidance=1.0,
                                height=64, width=64, progress=False)
    msgs = [str(w.message) for w in caught if issubclass(w.category, TruncationWarning)]
    assert len(msgs) == 1 and "golden crown" in msgs[0]


def test_sampler_step_hook_and_generator_lists():
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    rows = samplers.randn((2, 4, 3, 3), gens, torch.float32, torch.device("cpu"))
    torch.testing.assert_close(rows[1:], torch.randn((1, 4, 3, 3), generator=torch.Generator().manual_seed(2)))
    eps_fn = lambda x, t: 0.1 * x  # noqa: E731
    noise = torch.randn(1, 4, 4, 4)
    plain = samplers.sample("euler", eps_fn, noise, 3)
    seen = []
    same = samplers.sample("euler", eps_fn, noise, 3, step_hook=lambda i, x: seen.append(i) or x)
    torch.testing.assert_close(same, plain, atol=0, rtol=0)
    assert seen == [0, 1, 2]
    zeroed = samplers.sample("ddim", eps_fn, noise, 3, step_hook=lambda i, x: torch.zeros_like(x))
    assert torch.equal(zeroed, torch.zeros_like(zeroed))
    t, sigmas = samplers.sampler_grid("euler", samplers.Schedule.sd1(), 3)
    x0 = torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(samplers.noised_latent("euler", x0, noise, 1, t, sigmas, None), x0 + sigmas[1] * noise)
    assert samplers.noised_latent("ddim", x0, noise, 3, t, None, None) is x0


def test_png_parameters_and_never_overwriting(tmp_path):
    img = picture()
    text = imgs.parameters_text("a dog", "blurry", steps=25, sampler="euler", cfg_scale=7.5, seed=0, size="64x64")
    assert text == "a dog\nNegative prompt: blurry\nSteps: 25, Sampler: euler, CFG scale: 7.5, Seed: 0, Size: 64x64"
    (tmp_path / "00000-0.png").write_bytes(b"precious")
    p1 = imgs.save_png(img, tmp_path, text, stem="0")
    p2 = imgs.save_png(img, tmp_path, text, stem="0")
    assert (p1.name, p2.name) == ("00001-0.png", "00002-0.png")
    assert (tmp_path / "00000-0.png").read_bytes() == b"precious"
    with Image.open(p1) as back:
        assert back.text["parameters"] == text
        np.testing.assert_array_equal(np.asarray(back), np.asarray(img))


def test_pil_round_trip_and_mask_binarisation():
    img = picture()
    np.testing.assert_array_equal(np.asarray(imgs.to_pil(imgs.from_pil(img))[0]), np.asarray(img))
    m = Image.fromarray(np.array([[0, 127, 128, 255]] * 8, dtype=np.uint8).repeat(2, axis=1))
    assert imgs.mask_from_pil(m, (8, 8))[0, 0, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.full
def test_full_size_pipelines_match_diffusers_every_step():
    """Full SD 1.x architecture, random weights, 64x64 pixels (8x8 latent), 2-3 steps each."""
    ours, base = ref_sd.full_pipeline()
    res, steps = run_ours(ours, "generate", ["a dog wearing a hat"], 0, steps=2, scheduler="euler",
                          height=64, width=64)
    ref_images, ref_steps = ref_sd.run_diffusers(ref_sd.as_pipeline(base, "txt2img", "euler"),
                                                 ["a dog wearing a hat"], res.seeds, num_inference_steps=2,
                                                 guidance_scale=7.5, height=64, width=64)
    compare(steps, res.images, ref_images, ref_steps)
    image, mask = res.images[0], square_mask()
    res, steps = run_ours(ours, "img2img", ["a cat"], 1, image=image, strength=0.7, steps=3, scheduler="ddim")
    ref_images, ref_steps = ref_sd.run_diffusers(ref_sd.as_pipeline(base, "img2img", "ddim"), ["a cat"], res.seeds,
                                                 image=image, strength=0.7, num_inference_steps=3, guidance_scale=7.5)
    compare(steps, res.images, ref_images, ref_steps)
    res, steps = run_ours(ours, "inpaint", ["a cat"], 2, image=image, mask=mask, steps=2, scheduler="euler")
    ref_images, ref_steps = ref_sd.run_diffusers(ref_sd.as_pipeline(base, "inpaint", "euler"), ["a cat"], res.seeds,
                                                 image=image, mask_image=mask, num_inference_steps=2,
                                                 guidance_scale=7.5, height=64, width=64)
    compare(steps, res.images, ref_images, ref_steps)


@pytest.mark.weights
def test_real_checkpoint_matches_diffusers_at_512(real_checkpoint, tmp_path):
    """On real SD 1.x weights: 512x512, euler, 4 steps, CFG; every step and the image."""
    ours = ldm.load(real_checkpoint, device="cpu", dtype=torch.float32)
    configs = weights.configs_for(ldm.checkpoint.read(real_checkpoint))
    base = ref_sd.load_with_diffusers(real_checkpoint, configs, tmp_path / "config")
    res, steps = run_ours(ours, "generate", ["a dog wearing a hat"], 0, steps=4, scheduler="euler")
    ref_images, ref_steps = ref_sd.run_diffusers(ref_sd.as_pipeline(base, "txt2img", "euler"),
                                                 ["a dog wearing a hat"], res.seeds, num_inference_steps=4,
                                                 guidance_scale=7.5, height=512, width=512)
    compare(steps, res.images, ref_images, ref_steps)


def test_any_multiple_of_8_pixels_works(tiny):
    """72x40 px is a 9x5 latent, which the UNet cannot halve evenly: it upsamples to each skip's size."""
    res = tiny["sd1"][0].generate("a dog", steps=1, height=72, width=40, progress=False)
    assert res.images[0].size == (40, 72) and res.latents.shape[-2:] == (9, 5)


def test_dtype_auto_takes_bf16_only_where_the_cpu_has_it(monkeypatch):
    """dtype="auto": bf16 networks (the VAE too: bf16 has fp32's range) on a CPU with native bf16; fp32
    on a CPU without (emulated bf16 is slower than fp32); fp16 on CUDA, where the VAE stays fp32."""
    from ldm import memory, pipeline, weights
    monkeypatch.setattr(memory, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert pipeline.default_device_dtype("cpu", "auto") == (torch.device("cpu"), torch.bfloat16)
    assert pipeline.default_device_dtype("cuda", "auto")[1] == torch.float16
    fast = pipeline.load(weights.SHIPPED, device="cpu", dtype="auto")
    assert (fast.dtype, fast.vae_dtype) == (torch.bfloat16, torch.bfloat16)
    half = pipeline.load(weights.SHIPPED, device="cpu", dtype=torch.float16)
    assert (half.dtype, half.vae_dtype) == (torch.float16, torch.float32)  # SD's VAE decoder overflows fp16
    ref = pipeline.load(weights.SHIPPED, device="cpu", dtype=torch.float32)
    a = np.asarray(fast("a red circle", steps=10, seed=0, progress=False)[0], np.float32)
    b = np.asarray(ref("a red circle", steps=10, seed=0, progress=False)[0], np.float32)
    assert np.abs(a - b).mean() < 8  # the same picture, to bf16's precision (0-255 scale)
    monkeypatch.setattr(memory, "_cpu_flags", lambda: frozenset({"avx512f"}))
    assert pipeline.default_device_dtype("cpu", "auto")[1] == torch.float32
    with pytest.raises(ValueError, match="dtype='fp8' is not supported"):
        pipeline.default_device_dtype("cpu", "fp8")
