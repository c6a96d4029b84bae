"""The LCM sampler (ldm.samplers.lcm) step for step against diffusers' LCMScheduler.

The reference is diffusers' LCMScheduler with SD 1.x's betas, driven by tests/ref_samplers.reference_run
(the StableDiffusionPipeline loop: the (x, t) the UNet receives, the generator passed to step()). Checked:
the timesteps for 1..50 steps (4 steps: 999, 759, 499, 259), c_skip / c_out, every network input and the
final latent at 1 to 8 steps (so the noise put back between steps is drawn alike), img2img, and that the
pipeline runs one UNet pass per step at guidance 1 (no unconditional half).
"""
import pytest
import torch

import ref_samplers
from ref_samplers import smooth_eps

from ldm import samplers
from ldm.schedule import Schedule

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")
SHAPE = (2, 4, 3, 3)


def lcm_scheduler(prediction_type="epsilon", **config):
    from diffusers import LCMScheduler

    return LCMScheduler(**dict(ref_samplers.SD1, prediction_type=prediction_type, **config))


@pytest.fixture
def reference(monkeypatch):
    """ref_samplers.reference_run, with "lcm" mapped to diffusers' LCMScheduler."""
    pytest.importorskip("diffusers")
    make = ref_samplers.make_scheduler

    def make_with_lcm(name, spacing=None, karras=False, prediction_type="epsilon", **config):
        if name == "lcm":
            return lcm_scheduler(prediction_type, **({"timestep_spacing": spacing} if spacing else {}), **config)
        return make(name, spacing, karras, prediction_type, **config)

    monkeypatch.setattr(ref_samplers, "make_scheduler", make_with_lcm)
    return ref_samplers.reference_run


def recording(calls):
    def eps_fn(x, t):
        calls.append((x.clone(), float(t)))
        return smooth_eps(x, t)
    return eps_fn


def test_timesteps_match_diffusers_for_1_to_50_steps():
    pytest.importorskip("diffusers")
    sched = Schedule.sd1()
    for steps in range(1, samplers.LCM_ORIGINAL_STEPS + 1):
        ref = lcm_scheduler()
        ref.set_timesteps(steps)
        t, sigmas = samplers.sampler_grid("lcm", sched, steps)
        assert sigmas is None
        assert t.long().tolist() == ref.timesteps.tolist(), steps
    assert samplers.lcm_timesteps(sched, 4).tolist() == [999, 759, 499, 259]
    assert samplers.lcm_timesteps(sched, 2).tolist() == [999, 499]
    assert samplers.lcm_timesteps(sched, 1).tolist() == [999]


def test_boundary_scalings_match_diffusers():
    pytest.importorskip("diffusers")
    ref = lcm_scheduler()
    for t in (0, 1, 19, 259, 499, 759, 999):
        ours = samplers.lcm_boundary(t)
        theirs = ref.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    c_skip, c_out = samplers.lcm_boundary(259)
    torch.testing.assert_close(c_skip, torch.tensor(0.25 / (2590.0**2 + 0.25)))
    torch.testing.assert_close(c_out, torch.tensor(2590.0 / (2590.0**2 + 0.25) ** 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("prediction_type", samplers.PREDICTION_TYPES)
def test_trajectory_matches_diffusers_1_to_8_steps(reference, prediction_type, dtype):
    worst = {}
    for steps in range(1, 9):
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps), dtype=dtype)
        ref_x, ref_calls = reference("lcm", smooth_eps, noise, steps, prediction_type=prediction_type,
                                     generator=torch.Generator().manual_seed(1))
        calls, x0s = [], []
        ours = samplers.sample("lcm", recording(calls), noise, steps, prediction_type=prediction_type,
                               generator=torch.Generator().manual_seed(1), callback=lambda i, x, x0: x0s.append(x0))
        assert [t for _, t in calls] == [t for _, t in ref_calls]
        our_inputs, ref_inputs = torch.stack([x for x, _ in calls]), torch.stack([x for x, _ in ref_calls])
        torch.testing.assert_close(our_inputs, ref_inputs, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours, ref_x, rtol=1e-6, atol=1e-6)
        assert ours.dtype == dtype and len(x0s) == steps
        torch.testing.assert_close(x0s[-1], ours, rtol=0, atol=0)  # no noise after the last step
        worst[steps] = max((our_inputs - ref_inputs).abs().max().item(), (ours - ref_x).abs().max().item())
    print(f"LCM {prediction_type} {dtype}: max |ours - diffusers| per step count {worst}")


def test_noise_is_put_back_between_steps(reference):
    """With a different generator seed only the re-noising changes: the first input is the same,
    later ones differ; one step draws no noise at all."""
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    runs = []
    for seed in (1, 2):
        calls = []
        out = samplers.sample("lcm", recording(calls), noise, 4, generator=torch.Generator().manual_seed(seed))
        runs.append((out, calls))
    (a, ca), (b, cb) = runs
    torch.testing.assert_close(ca[0][0], cb[0][0], rtol=0, atol=0)
    assert (ca[1][0] - cb[1][0]).abs().max() > 0.1 and (a - b).abs().max() > 1e-3
    one = [samplers.sample("lcm", smooth_eps, noise, 1, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    torch.testing.assert_close(one[0], one[1], rtol=0, atol=0)


@pytest.mark.parametrize("strength", [0.5, 0.75, 1.0])
def test_img2img_matches_diffusers(reference, strength):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    ref_x, ref_calls = reference("lcm", smooth_eps, noise, 8, init=init, strength=strength,
                                 generator=torch.Generator().manual_seed(1))
    calls = []
    ours = samplers.sample("lcm", recording(calls), noise, 8, init=init, strength=strength,
                           generator=torch.Generator().manual_seed(1))
    assert [t for _, t in calls] == [t for _, t in ref_calls]
    torch.testing.assert_close(torch.stack([x for x, _ in calls]), torch.stack([x for x, _ in ref_calls]),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours, ref_x, rtol=1e-6, atol=1e-6)


def test_guidance_1_runs_one_unet_pass_per_step():
    """LCM-LoRA is used at guidance 1-2; at 1 the pipeline skips the unconditional half of the batch."""
    from ldm.pipeline import Pipeline
    from ldm.weights import random_models

    te, unet, vae, _ = random_models("tiny", seed=0)
    pipe = Pipeline({"text_encoder": te, "unet": unet, "vae": vae}, name="random-tiny")
    for guidance, batch in ((1.0, 1), (1.5, 2)):
        batches = []
        hook = unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
        try:
            images = pipe("a red circle", steps=4, scheduler="lcm", guidance=guidance, seed=0, height=32, width=32)
        finally:
            hook.remove()
        assert batches == [batch] * 4 and len(images) == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=51), r"steps=51 is not allowed for 'lcm': use an integer from 1 to 50"),
    (dict(karras=True), r"karras=True is not available for 'lcm'"),
    (dict(eta=0.3), r"eta=0.3 only applies to 'ddim', not 'lcm'"),
    (dict(steps=2, schedule=Schedule(num_train_timesteps=40)), r"original_steps=50 must be from 1 to num_train_timesteps=40"),
])
def test_bad_input(kwargs, match):
    args = dict(name="lcm", eps_fn=smooth_eps, noise=torch.zeros(SHAPE), steps=4) | kwargs
    with pytest.raises(ValueError, match=match):
        samplers.sample(**args)
