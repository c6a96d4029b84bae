"""ldm.compiled: the UNet through torch.compile (opt-in). The real compile is slow (a minute on a tiny
UNet), so it is in the full tier; the wiring (what runs eager, what a failure does, what the module
keeps) is tested in the default run with torch.compile replaced."""
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import ldm
from ldm import compiled, weights
from ldm.unet import UNetConfig, UNetModel


def tiny_unet():
    torch.manual_seed(0)
    return UNetModel(UNetConfig.tiny()).eval()


def unet_inputs(unet):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, unet.cfg.in_channels, 8, 8, generator=g), torch.tensor([999.0, 250.0]),
            torch.randn(2, 7, unet.cfg.context_dim, generator=g))


@pytest.fixture
def fake_compile(monkeypatch):
    """torch.compile replaced by a recorder that returns the function itself (eager), so the wiring
    runs without minutes of compiling."""
    calls = []

    def fake(fn, **kwargs):
        calls.append(kwargs)
        return fn
    monkeypatch.setattr(torch, "compile", fake)
    return calls


def test_compile_keeps_the_module_and_its_keys(fake_compile):
    unet = tiny_unet()
    keys = list(unet.state_dict())
    x, t, ctx = unet_inputs(unet)
    with torch.no_grad():
        ref = unet(x, t, ctx)
        cf = compiled.compile_unet(unet, notify=lambda msg: None)
        assert compiled.is_compiled(unet) and compiled.compile_unet(unet) is cf  # twice: the same wrapper
        assert torch.equal(unet(x, t, ctx), ref)
    assert fake_compile == [{"dynamic": False}]
    assert list(unet.state_dict()) == keys  # checkpoints and LoRAs still see the same names
    unet.load_state_dict(tiny_unet().state_dict(), strict=True)
    compiled.uncompile_unet(unet)
    assert not compiled.is_compiled(unet) and "forward" not in unet.__dict__
    with pytest.raises(TypeError, match="expected an ldm UNetModel, got Linear"):
        compiled.compile_unet(torch.nn.Linear(2, 2))
    for bad in ("no", 1, None):  # a flag that only looks like one fails before the checkpoint is read
        with pytest.raises(TypeError, match=rf"ldm.load: compile={bad!r}: must be True or False"):
            ldm.load("/no/such/file.safetensors", compile=bad)


def test_compile_is_for_inference_and_recompiles_when_weights_change(fake_compile):
    """With gradients on (training) the eager forward runs; a new shape or an in-place weight change
    (what a LoRA merge does) is noticed: the first compiles for that shape, the second afresh."""
    unet = tiny_unet()
    x, t, ctx = unet_inputs(unet)
    said = []
    cf = compiled.compile_unet(unet, notify=said.append)
    out = unet(x, t, ctx)
    assert out.requires_grad and cf.compiles == 0 and not fake_compile
    with torch.no_grad():
        unet(x, t, ctx)
        unet(x, t, ctx)
        assert (cf.compiles, len(fake_compile)) == (1, 1)
        assert "compiling the UNet for x (2, 4, 8, 8) float32" in said[0] and "compiled in" in said[1]
        unet(x[:1], t[:1], ctx[:1])  # a new shape: compiled for it, with the same torch.compile
        assert (cf.compiles, len(fake_compile)) == (2, 1)
        unet.out[-1].weight.mul_(2.0)  # in place
        after = unet(x, t, ctx)
        assert (cf.compiles, len(fake_compile)) == (3, 2)  # a fresh torch.compile freezes the new weights
        assert torch.allclose(after, cf.eager(x, t, ctx))
        unet.out[-1].weight.data = unet.out[-1].weight.data * 2  # a new tensor: how ldm.lora merges
        unet(x, t, ctx)
        assert (cf.compiles, len(fake_compile)) == (4, 3)
        hook = unet.out[-1].register_forward_hook(lambda m, i, o: o * 2)  # how an unmerged LoRA runs
        assert torch.allclose(unet(x, t, ctx), cf.eager(x, t, ctx))
        assert (cf.compiles, len(fake_compile)) == (5, 4)
        hook.remove()


def test_a_failed_compile_says_why_and_runs_eager(monkeypatch):
    def broken(fn, **kwargs):
        def run(*a, **k):
            raise RuntimeError("C++ compile error\ncc1plus: not found")
        return run
    monkeypatch.setattr(torch, "compile", broken)
    unet = tiny_unet()
    x, t, ctx = unet_inputs(unet)
    said = []
    cf = compiled.compile_unet(unet, notify=said.append)
    with torch.no_grad():
        ref = cf.eager(x, t, ctx)
        assert torch.equal(unet(x, t, ctx), ref)
        assert said[-1] == "ldm: torch.compile failed (RuntimeError: C++ compile error); the UNet runs eager"
        assert torch.equal(unet(x, t, ctx), ref) and len(said) == 2  # no second try, no more lines
        with pytest.raises(ValueError, match="x must be"):  # a bad input still fails, from the eager forward
            unet(x[:, :3], t, ctx)


def test_cli_compile_flag_compiles_the_unet(tmp_path, monkeypatch, capsys):
    """--compile compiles; the deprecation notes torch's compiler raises about its own internals (14 of one
    kind in a real run) are not the user's business and stay out of the CLI's output."""
    import warnings
    from ldm import cli
    calls = []

    def fake(fn, **kwargs):
        calls.append(kwargs)

        def run(*a, **k):
            warnings.warn("`torch.jit.script_method` is deprecated", DeprecationWarning)
            return fn(*a, **k)
        return run
    monkeypatch.setattr(torch, "compile", fake)
    out = tmp_path / "out"
    assert cli.main(["generate", "a red circle", "--checkpoint", str(weights.SHIPPED), "--steps", "2", "--seed", "0",
                     "--out", str(out), "--compile", "--device", "cpu"]) == 0
    assert len(list(out.glob("*.png"))) == 1 and len(calls) == 1
    err = capsys.readouterr().err
    assert "ldm: compiling the UNet for x (2, 4, 8, 8) float32" in err and "deprecated" not in err


# ---- the real compile ------------------------------------------------------------------------------------

def kohya_lora(path, unet):
    """A small kohya LoRA on the UNet's self-attention queries (random, strong enough to change the image)."""
    from ldm import lora
    g = torch.Generator().manual_seed(3)
    table = lora.module_table("unet", unet)
    sd = {}
    for name in [n for n, _ in unet.named_modules() if n.endswith("attn1.to_q")]:
        alias = next(a for a, n in table.items() if n == name and "." in a and a != name)
        w = unet.get_submodule(name).weight
        key = "lora_unet_" + alias.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = torch.randn(4, w.shape[1], generator=g)
        sd[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], 4, generator=g)
    save_file(sd, str(path))
    return path


@pytest.mark.full
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++") or os.environ.get("CXX")),
                    reason="inductor needs a C++ compiler on the CPU (none found)")
def test_compiled_pipeline_matches_eager_through_a_lora(tmp_path):
    """A compiled tiny pipeline paints the eager one's picture; a LoRA merged after the first compile
    applies (the frozen weights are refreshed), and unloading it brings the first picture back."""
    ckpt = weights.random_checkpoint(tmp_path / "tiny.safetensors", size="tiny")
    eager, fast = ldm.load(ckpt, device="cpu"), ldm.load(ckpt, device="cpu", compile=True)
    assert compiled.is_compiled(fast.unet) and not compiled.is_compiled(eager.unet)

    def image(pipe):
        return np.asarray(pipe("a red circle", steps=3, seed=0, progress=False)[0], np.int16)

    def latents(pipe):
        return pipe.generate("a red circle", steps=3, seed=0, progress=False).latents

    def rel(a, b):  # max |a - b| against b's largest value (the latents of 3 guided steps reach ~20)
        return ((a - b).abs().max() / b.abs().max()).item()

    base = latents(eager)
    assert rel(latents(fast), base) < 1e-4  # fp32: the same sums fused and ordered otherwise (seen: 1.5e-5)
    assert np.abs(image(fast) - image(eager)).max() <= 1
    lora = kohya_lora(tmp_path / "q.safetensors", eager.unet)
    for pipe in (eager, fast):
        pipe.load_lora(lora, 1.0)
    with_lora = latents(eager)
    assert rel(with_lora, base) > 1e-2  # the LoRA changes the picture...
    assert rel(latents(fast), with_lora) < 1e-4  # ...and the compiled UNet sees it
    for pipe in (eager, fast):
        pipe.unload_loras()
    assert rel(latents(fast), base) < 1e-4
    assert fast.unet.forward.compiles >= 2 and not fast.unet.forward.failed
