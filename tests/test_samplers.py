"""ldm.samplers step for step against diffusers' schedulers driven as SD 1.x's pipelines drive them.

For every sampler, spacing, Karras setting and step count 1, 2, 7, 20, 50, the test records every
(x, t) the network receives in the diffusers loop (tests/ref_samplers.py) and in ours, and compares
the whole sequence and the final latent. fp32 is bit-exact except LMS (diffusers integrates its
coefficients numerically from float32 values; ours are exact). At fp64, DDIM/DDPM/PNDM/Heun are
bit-exact; diffusers' Euler, Euler ancestral and DPM-Solver cast the latent to float32 inside step(),
so there the comparison allows that rounding. Those comparisons run both loops in this process;
the stored trajectories (written on another machine) are compared at the fp32 noise floor instead.
"""
import pytest
import torch
from safetensors.torch import load_file

from ref_samplers import STORED, smooth_eps, stored_key

from ldm import samplers
from ldm.schedule import Schedule

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")
REFERENCE = __import__("pathlib").Path(__file__).parent / "reference" / "samplers_tiny.safetensors"
SHAPE = (1, 2, 2, 2)
STEP_COUNTS = [1, 2, 7, 20, 50]
KARRAS_OK = ("euler", "heun", "lms", "dpmpp_2m")  # the diffusers schedulers with use_karras_sigmas

# (rtol, atol) per (sampler, dtype) between ours and diffusers run in this process; missing = bit-exact
TOLERANCE = {
    ("lms", torch.float32): (1e-5, 1e-4), ("lms", torch.float64): (1e-7, 1e-5),
    ("euler", torch.float64): (1e-6, 1e-5), ("euler_a", torch.float64): (1e-6, 1e-5),
    ("dpmpp_2m", torch.float64): (1e-6, 1e-5),
}
# The stored trajectories were written on another machine. The same fp32 computation differs by a
# few ulps between CPUs (AVX2 vs AVX-512 kernels for tanh/sin/cos, thread counts): 3.8e-6 on an
# AVX-512 Xeon, 4.8e-6 here under ATEN_CPU_CAPABILITY=default. So they are compared at the fp32
# noise floor, never bit-exactly. The timesteps too: most grids are fp64 arithmetic, but the Karras
# grid maps sigmas back to t through the schedule's fp32 log-sigmas, and on 2026-12-06 a fresh machine
# gave t 1.5e-5 (1.1e-7 relative, one fp32 ulp) from the stored value for euler/lms with karras=True.
STORED_TOL = dict(rtol=1e-5, atol=2e-5)
STORED_T_TOL = dict(rtol=1e-6, atol=1e-6)


def recording(fn, calls):
    def eps_fn(x, t):
        calls.append((x.clone(), float(t)))
        return fn(x, t)
    return eps_fn


def run_ours(name, noise, steps, **kw):
    calls = []
    return samplers.sample(name, recording(smooth_eps, calls), noise, steps, **kw), calls


def assert_same_run(name, dtype, ref, ours):
    (ref_x, ref_calls), (our_x, our_calls) = ref, ours
    rtol, atol = TOLERANCE.get((name, dtype), (0.0, 0.0))
    assert [t for _, t in our_calls] == [t for _, t in ref_calls]  # the same timesteps, in order
    torch.testing.assert_close(torch.stack([x for x, _ in our_calls]), torch.stack([x for x, _ in ref_calls]),
                               rtol=rtol, atol=atol)
    torch.testing.assert_close(our_x, ref_x, rtol=rtol, atol=atol)


def cases():
    for name in samplers.SAMPLERS:
        for spacing in ("leading", "trailing", "linspace"):
            for karras in ((False, True) if name in KARRAS_OK else (False,)):
                for eta in ((0.0, 0.7) if name == "ddim" else (0.0,)):
                    yield pytest.param(name, spacing, karras, eta,
                                       id=f"{name}-{spacing}{'-karras' if karras else ''}{f'-eta{eta}' if eta else ''}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name,spacing,karras,eta", list(cases()))
def test_matches_diffusers_step_for_step(name, spacing, karras, eta, dtype):
    pytest.importorskip("diffusers")
    if name == "lms":
        pytest.importorskip("scipy")  # diffusers' LMSDiscreteScheduler integrates with scipy
    from ref_samplers import reference_run
    for steps in STEP_COUNTS:
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps), dtype=dtype)
        kw = dict(spacing=spacing, karras=karras, eta=eta)
        ref = reference_run(name, smooth_eps, noise, steps, generator=torch.Generator().manual_seed(1), **kw)
        ours = run_ours(name, noise, steps, generator=torch.Generator().manual_seed(1), **kw)
        assert_same_run(name, dtype, ref, ours)


@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_default_spacing_and_every_prediction_type_match_diffusers(name):
    """eps, v and x0 predictions, each converted by the one function (ldm.samplers.common.predict_x0_eps),
    for every prediction type the sampler's registry entry takes (all the reference scheduler takes)."""
    pytest.importorskip("diffusers")
    if name == "lms":
        pytest.importorskip("scipy")
    from ref_samplers import reference_run
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    assert set(samplers.REGISTRY[name].prediction_types) <= set(samplers.PREDICTION_TYPES)
    for prediction_type in samplers.REGISTRY[name].prediction_types:
        kw = dict(prediction_type=prediction_type)
        ref = reference_run(name, smooth_eps, noise, 7, generator=torch.Generator().manual_seed(1), **kw)
        ours = run_ours(name, noise, 7, generator=torch.Generator().manual_seed(1), **kw)
        assert_same_run(name, torch.float32, ref, ours)


@pytest.mark.parametrize("name", [n for n in samplers.SAMPLERS if n not in ("pndm", "lms")])
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_img2img_matches_diffusers(name, strength):
    pytest.importorskip("diffusers")
    from ref_samplers import reference_run
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    kw = dict(init=init, strength=strength)
    ref = reference_run(name, smooth_eps, noise, 20, generator=torch.Generator().manual_seed(1), **kw)
    ours = run_ours(name, noise, 20, generator=torch.Generator().manual_seed(1), **kw)
    assert_same_run(name, torch.float32, ref, ours)


@pytest.mark.parametrize("name", ["pndm", "lms"])
def test_img2img_restarts_multistep_history(name):
    """diffusers' img2img slices PNDM's doubled timestep list and keeps LMS's global order, which feeds the
    network mismatched (x, t) / uses higher-order weights with one slope. Here a run from step k is
    exactly the txt2img loop started at step k with a fresh history: check that against the loop itself."""
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    steps, strength = 10, 0.6
    start = samplers.img2img_start_step(steps, strength)
    sched = Schedule.sd1()
    t, sigmas = samplers.sampler_grid(name, sched, steps)
    calls = []
    ours = samplers.sample(name, recording(smooth_eps, calls), noise, steps, init=init, strength=strength)
    if name == "pndm":
        x = sched.add_noise(init, noise, int(t[start]))
        expected = samplers.pndm(smooth_eps, x, t, sched, start=start)
        # the warm-up step calls the network twice: at t_start and at t_start+1 (on the DDIM-predicted x)
        expected_t = [float(t[start]), float(t[start + 1])] + [float(v) for v in t[start + 1:]]
        assert [c[1] for c in calls] == expected_t
    else:
        x = init + noise * sigmas[start]
        expected = samplers.lms(smooth_eps, x, t, sigmas, start=start)
        assert [c[1] for c in calls] == [float(v) for v in t[start:]]
    torch.testing.assert_close(calls[0][0], x if name == "pndm" else x / (sigmas[start] ** 2 + 1) ** 0.5,
                               rtol=0, atol=0)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


@pytest.mark.parametrize("key", [stored_key(*s) for s in STORED])
def test_stored_reference_trajectories(key):
    """The stored diffusers trajectories (tests/reference/samplers_tiny.safetensors), without diffusers."""
    stored = load_file(str(REFERENCE))
    name, steps, spacing, karras, eta = next(s for s in STORED if stored_key(*s) == key)
    g = torch.Generator().manual_seed(int(stored["inputs.seed"]))
    final, calls = run_ours(name, stored["inputs.noise"], steps, spacing=spacing, karras=karras, eta=eta,
                            generator=g)
    rtol, atol = TOLERANCE.get((name, torch.float32), (0.0, 0.0))
    tol = dict(rtol=max(rtol, STORED_TOL["rtol"]), atol=max(atol, STORED_TOL["atol"]))   # stored: fp32 noise floor
    torch.testing.assert_close(torch.tensor([t for _, t in calls], dtype=torch.float64),
                               stored[f"outputs.{key}.t"], **STORED_T_TOL)
    torch.testing.assert_close(torch.stack([x for x, _ in calls]), stored[f"outputs.{key}.x"], **tol)
    torch.testing.assert_close(final, stored[f"outputs.{key}.final"], **tol)


@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_pure_no_hidden_state_no_inplace_edits(name):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    init = torch.randn(SHAPE)
    keep_noise, keep_init = noise.clone(), init.clone()
    seen = []
    a = samplers.sample(name, smooth_eps, noise, 5, generator=torch.Generator().manual_seed(3),
                        callback=lambda i, x, x0: seen.append((i, x.shape, x0.shape)))
    b = samplers.sample(name, smooth_eps, noise, 5, generator=torch.Generator().manual_seed(3))
    samplers.sample(name, smooth_eps, noise, 5, init=init, strength=0.5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # a second call is not affected by the first
    torch.testing.assert_close(noise, keep_noise, rtol=0, atol=0)
    torch.testing.assert_close(init, keep_init, rtol=0, atol=0)
    assert [i for i, _, _ in seen] == list(range(5))
    assert all(s == SHAPE and s0 == SHAPE for _, s, s0 in seen)


def test_strength_zero_returns_init_and_callback_indices_start_late():
    init = torch.randn(SHAPE)
    out = samplers.sample("euler", smooth_eps, torch.randn(SHAPE), 10, init=init, strength=0.0)
    torch.testing.assert_close(out, init, rtol=0, atol=0)
    seen = []
    samplers.sample("ddim", smooth_eps, torch.randn(SHAPE), 10, init=init, strength=0.5,
                    callback=lambda i, x, x0: seen.append(i))
    assert seen == list(range(5, 10))


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="plms"), r"sampler 'plms' is unknown; valid: ddim, ddpm, pndm, euler, euler_a, heun, lms, dpmpp_2m, lcm"),
    (dict(steps=0), r"steps=0 .* from 1 to num_train_timesteps=1000"),
    (dict(steps=1001), r"steps=1001"),
    (dict(eta=-0.5), r"eta=-0.5 must be >= 0"),
    (dict(name="euler", eta=0.5), r"eta=0.5 only applies to 'ddim'"),
    (dict(spacing="uniform"), r"spacing='uniform' is unknown; valid: leading, trailing, linspace"),
    (dict(karras=True), r"karras=True is not available for 'ddim'"),
    (dict(prediction_type="x0"), r"prediction_type='x0' is unknown; valid: epsilon, v_prediction, sample$"),
    (dict(name="pndm", prediction_type="sample"), r"prediction_type='sample' is not available for 'pndm'; "
                                                  r"valid: epsilon, v_prediction$"),
    (dict(strength=1.2, init=torch.zeros(SHAPE)), r"strength=1.2 is outside \[0, 1\]"),
    (dict(init=torch.zeros(1, 2, 3, 3)), r"init has shape \(1, 2, 3, 3\) but noise has \(1, 2, 2, 2\)"),
])
def test_bad_input_names_value_and_allowed(kwargs, match):
    """One line each, naming the value and what is allowed (the registry says what each sampler takes)."""
    args = dict(name="ddim", eps_fn=smooth_eps, noise=torch.zeros(SHAPE), steps=10) | kwargs
    with pytest.raises(ValueError, match=match):
        samplers.sample(**args)


def test_the_registry_is_the_one_list_of_samplers():
    """Every name the package knows comes from REGISTRY: adding a sampler is one entry there."""
    from ldm import cli
    assert samplers.SAMPLERS == tuple(samplers.REGISTRY)
    assert samplers.DEFAULT_SPACING == {n: s.default_spacing for n, s in samplers.REGISTRY.items()}
    for name, entry in samplers.REGISTRY.items():
        assert entry.name == name and entry.space in ("ddpm", "sigma") and entry.summary
        t, sigmas = samplers.sampler_grid(name, Schedule.sd1(), 4)
        assert len(t) == 4 and (sigmas is None or len(sigmas) == 5)
    generate = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["generate"]._actions
                    if "--scheduler" in a.option_strings)
    assert tuple(generate.choices) == samplers.SAMPLERS
