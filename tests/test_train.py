"""ldm.train: the loss falls, a resumed run equals an uninterrupted one, DDP runs with 2 CPU
processes under torchrun, and bad input is a one-line error that leaves existing files alone."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ldm import recipe, shapes, train
from ldm.clip import CLIPTextModel
from ldm.schedule import Schedule
from ldm.tokenizer import CLIPTokenizer
from ldm.unet import UNetModel
from ldm.vae import AutoencoderKL

# A micro recipe: every network a few thousand parameters wide (the text tower's 49,408-row token
# table dominates), so a handful of steps takes seconds.
MICRO = ["--set", "threads=1", "--set", "vae_ch=8", "--set", "vae_groups=4", "--set", "vae_batch=4",
         "--set", "vae_eval_images=8", "--set", "text_width=32", "--set", "text_layers=1",
         "--set", "text_heads=2", "--set", "unet_channels=32", "--set", "unet_channel_mult=(1,2)",
         "--set", "unet_attention=(2,)", "--set", "unet_heads=2", "--set", "unet_batch=8",
         "--set", "pool_size=32", "--set", "sample_every=0", "--set", "log_every=1",
         "--set", "vae_decoder_steps=0"]  # the decoder-only phase is tested on its own


def micro(out, *extra) -> list[str]:
    return ["--out", str(out), *MICRO, *extra]


def held_out_batch(n=16):
    x, captions, _ = shapes.batch(n, seed=123, held_out=True)
    return x, captions


def test_vae_loss_falls(tmp_path, monkeypatch):
    """A few steps on one batch of the world (every draw returns it) make its reconstruction better."""
    fixed = shapes.batch(4, seed=5)
    monkeypatch.setattr(shapes, "batch", lambda n, seed, held_out=False: fixed)
    argv = micro(tmp_path, "--stage", "vae", "--set", "vae_steps=20", "--set", "vae_mean_steps=20",
                 "--set", "warmup=2", "--set", "vae_lr=5e-3")
    cfg, _ = train.parse_args(argv)
    torch.manual_seed(cfg.seed)  # train_vae draws its initial weights right after this seed
    before = AutoencoderKL(cfg.vae_config())
    result = train.main(argv)
    after = AutoencoderKL(cfg.vae_config())
    after.load_state_dict(torch.load(tmp_path / "vae.pt", weights_only=False)["vae"])
    x = fixed[0]
    with torch.no_grad():
        losses = [F.l1_loss(m.decode(m.encode(x).mean), x).item() for m in (before, after)]
    assert losses[1] < 0.7 * losses[0], losses
    assert result["psnr"] > 0 and result["scaling_factor"] > 0
    assert not (tmp_path / train.MODEL_FILE).exists()  # stage vae writes no model


def _eps_loss(text_encoder, unet, vae, scale):
    """The epsilon loss on a fixed held-out batch at fixed timesteps and noise."""
    x, captions = held_out_batch()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x0 = vae.encode(x).mean * scale
        t = torch.randint(0, 1000, (len(x),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        x_t = Schedule.sd1().add_noise(x0, eps, t)
        return F.mse_loss(unet(x_t, t, text_encoder(CLIPTokenizer()(captions))), eps).item()


def test_latent_loss_falls_and_model_file(tmp_path):
    argv = micro(tmp_path, "--set", "vae_steps=2", "--set", "unet_steps=25", "--set", "warmup=3",
                 "--set", "unet_lr=2e-3", "--set", "ema_decay=0.5")
    result = train.main(argv)
    cfg, _ = train.parse_args(argv)
    vae = AutoencoderKL(cfg.vae_config())
    vae.load_state_dict(torch.load(tmp_path / "vae.pt", weights_only=False)["vae"])
    scale = result["scaling_factor"]
    torch.manual_seed(cfg.seed + 1)  # train_latent's initial weights
    init = CLIPTextModel(cfg.text_config()), UNetModel(cfg.unet_config(vae.cfg))
    ck = torch.load(tmp_path / "latent.pt", weights_only=False)
    trained = recipe.Denoiser(CLIPTextModel(cfg.text_config()), UNetModel(cfg.unet_config(vae.cfg)))
    trained.load_state_dict(ck["model"])
    before = _eps_loss(*init, vae, scale)
    after = _eps_loss(trained.text_encoder, trained.unet, vae, scale)
    assert after < 0.8 * before, (before, after)
    assert ck["step"] == 25 and ck["done"]

    # the shipped layout: fp16, SD 1.x prefixes, configs with the measured scaling factor; ldm.load reads it
    path = Path(result["model"])
    assert path == tmp_path / train.MODEL_FILE
    sd = load_file(path)
    assert all(v.dtype == torch.float16 for k, v in sd.items() if v.is_floating_point())
    assert any(k.startswith("model.diffusion_model.") for k in sd)
    from ldm.pipeline import load
    pipe = load(path, device="cpu")
    assert pipe.vae.cfg.scaling_factor == pytest.approx(scale, rel=1e-6)
    assert pipe.default_size == 64
    (image,) = pipe("a red circle", steps=2, seed=0, progress=False)
    assert image.size == (64, 64)


def test_decoder_finetune_moves_the_decoder_only(tmp_path):
    """After vae_steps, vae_decoder_steps train the decoder alone: the encoder's weights, hence its
    latents and their measured scaling factor, stay exactly what the first phase left."""
    common = ["--stage", "vae", "--set", "vae_steps=3", "--set", "warmup=0", "--set", "ckpt_every=3",
              "--set", "vae_mean_steps=0"]
    train.main(micro(tmp_path / "a", *common))
    train.main(micro(tmp_path / "b", *common, "--set", "vae_decoder_steps=3"))
    a, b = (torch.load(tmp_path / d / "vae.pt", weights_only=False) for d in ("a", "b"))
    assert (a["step"], b["step"]) == (3, 6)
    for k in a["vae"]:
        if k.startswith(("encoder.", "quant_conv.")):
            torch.testing.assert_close(b["vae"][k], a["vae"][k], rtol=0, atol=0, msg=k)  # same process: exact
    assert any(not torch.equal(a["vae"][k], b["vae"][k]) for k in a["vae"] if k.startswith("decoder."))
    assert b["metrics"]["scaling_factor"] == a["metrics"]["scaling_factor"]
    assert b["metrics"]["psnr_before_decoder_finetune"] == a["metrics"]["psnr"]


def test_resume_continues_exactly(tmp_path):
    common = ["--set", "vae_steps=4", "--set", "warmup=0", "--set", "min_lr_frac=1.0", "--set", "ckpt_every=2",
              "--set", "vae_mean_steps=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # an uninterrupted run of 4 steps, each stage ...
    train.main(micro(straight, *common, "--set", "unet_steps=4"))
    # ... against one stopped after 2 steps of each stage, then resumed to 4 (constant lr: the
    # schedule does not depend on the total, so the two must agree step for step)
    train.main(micro(resumed, *common, "--stage", "vae", "--set", "vae_steps=2"))
    train.main(micro(resumed, *common, "--stage", "vae", "--resume"))
    train.main(micro(resumed, *common, "--stage", "unet", "--set", "unet_steps=2"))
    (resumed / train.MODEL_FILE).unlink()  # the 2-step model; the resumed run writes the 4-step one
    train.main(micro(resumed, *common, "--stage", "unet", "--set", "unet_steps=4", "--resume"))
    for name in ("vae.pt", "latent.pt"):
        a, b = (torch.load(d / name, weights_only=False) for d in (straight, resumed))
        assert a["step"] == b["step"] == 4
        for key in ("vae",) if name == "vae.pt" else ("model", "ema"):
            assert a[key].keys() == b[key].keys()
            for k in a[key]:
                torch.testing.assert_close(a[key][k], b[key][k], rtol=1e-5, atol=1e-6, msg=f"{name} {key} {k}")
    fa, fb = load_file(straight / train.MODEL_FILE), load_file(resumed / train.MODEL_FILE)
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], rtol=1e-3, atol=1e-4)


def test_ddp_two_cpu_processes(tmp_path):
    """torchrun --nproc_per_node 2, gloo on the CPU: both ranks train in step, only rank 0 writes."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "ldm.train", *micro(out, "--set", "vae_steps=2", "--set", "unet_steps=2", "--set", "grad_accum=2")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("vae.pt", "latent.pt"):
        ck = torch.load(out / name, weights_only=False)
        assert ck["world_size"] == 2 and ck["step"] == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(["vae.pt", "latent.pt", train.MODEL_FILE])


@pytest.mark.parametrize("args, words", [
    (["--set", "vae_stepz=3"], ["vae_stepz", "allowed keys", "vae_steps"]),
    (["--set", "unet_batch=0"], ["unet_batch=0", ">= 1"]),
    (["--vae-batch", "0"], ["vae_batch=0", ">= 1"]),
    (["--set", "stage=everything"], ["stage='everything'"]),
])
def test_bad_config_is_one_line(tmp_path, args, words):
    with pytest.raises(SystemExit) as info:
        train.main(["--out", str(tmp_path), *args])
    message = str(info.value.code)
    assert "\n" not in message and all(w in message for w in words), message
    assert not any(tmp_path.iterdir())  # nothing written


def test_existing_outputs_are_never_overwritten(tmp_path):
    model = tmp_path / train.MODEL_FILE
    model.write_bytes(b"keep me")
    with pytest.raises(SystemExit) as info:
        train.main(micro(tmp_path, "--set", "vae_steps=1", "--set", "unet_steps=1"))
    message = str(info.value.code)
    assert "\n" not in message and str(model) in message and "not overwritten" in message
    assert model.read_bytes() == b"keep me" and not (tmp_path / "vae.pt").exists()

    ckpt = tmp_path / "elsewhere" / "vae.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"a checkpoint")
    with pytest.raises(SystemExit) as info:  # a checkpoint is continued with --resume, never restarted over
        train.main(micro(ckpt.parent, "--stage", "vae", "--set", "vae_steps=1"))
    assert "--resume" in str(info.value.code) and ckpt.read_bytes() == b"a checkpoint"
