"""Train ldm's own small text-to-image model on the shapes world (ldm.shapes), in two stages.

    python -m ldm.train --out runs/shapes                   # the whole recipe: VAE, then latent model
    python -m ldm.train --out runs/shapes --resume          # continue from the last checkpoint
    python -m ldm.train --stage vae --set vae_steps=200     # one stage, any TrainConfig field changed
    torchrun --nproc_per_node 2 -m ldm.train --out ...      # DistributedDataParallel (gloo on the CPU)

nanoGPT's train.py is the model for the loop: one file, read top to bottom, that runs in one process on
the CPU or a GPU, and under torchrun as DDP (RANK set -> one process per rank; gradients averaged;
gradient accumulation divided by the world size; only rank 0 writes files). This file holds the loops
and the command; what they are made of (TrainConfig, the losses, the lr schedule, the EMA, the DDP
helpers) is ldm.recipe, and what keeps --out safe (checkpoints, ranges, the lock) is ldm.runfiles.

Stage 1, the autoencoder (ldm.vae.AutoencoderKL): images of the world -> reconstruction loss (L1 + MSE
on pixels in [-1, 1]) plus a small KL term to N(0, I) that keeps the latents well-behaved, with the
decoder fed posterior samples. At the end: PSNR on held-out images, and the latent scaling factor
measured as SD's 0.18215 was, 1 / std of the encoder's latents, stored in the VAE's config.

Stage 2, the latent model: the VAE frozen. A pool of scenes is encoded once (the posterior's mean and
std per scene; each step draws a fresh z from them), and each step writes new captions for its
scenes from the grammar, so the text varies. UNet (ldm.unet) and text encoder (ldm.clip, with the
real CLIP tokenizer) are trained from scratch on the simplified epsilon loss of Ho et al. 2020,

    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,   loss = |eps - eps_theta(x_t, t, c)|^2,

at t drawn uniformly from SD's 1000 training timesteps, with ~10% of captions emptied so that the
same network also learns eps(x_t, t, "") and classifier-free guidance works. An EMA of both networks
is what gets exported.

Every random draw comes from a generator seeded by (seed, stage, step, rank), so a run is
reproducible and `--resume` continues exactly where the checkpoint stopped. Files in --out:
vae.pt and latent.pt (checkpoints, read back by ldm.checkpoint.unpickle's restricted reader, never
by torch.load: a file planted there cannot run code), samples/*.png (grids), and the final
ldm-shapes.safetensors (SD 1.x single-file layout, fp16, configs and scaling factor in the metadata),
never overwritten; while a run writes there it holds .ldm-train.lock, and a second run on the same
--out refuses. Every numeric field has a documented range (ldm.recipe.RANGES, TUPLES), checked
before any work.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import json
import logging
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ldm import shapes, weights
from ldm.clip import CLIPTextModel
from ldm.commandline import ArgumentParser, command, short
from ldm.recipe import (RANGES, STAGES, TUPLES, Denoiser, Dist, TrainConfig, VAELoss, accum_steps, barrier,
                        check_field, count, ema_update, encode_pool, eps_loss, generator, grid, lr_at, no_sync,
                        optimizer_step, psnr, setup, to_pil, wrap)
from ldm.runfiles import (CheckpointFileError, OutputError, check_device_name, load_checkpoint, output_lock, restore,
                          save)
from ldm.schedule import Schedule
from ldm.tokenizer import CLIPTokenizer
from ldm.unet import UNetModel
from ldm.vae import AutoencoderKL

__all__ = ["make_config", "parse_args", "run", "main", "train_vae", "train_latent", "evaluate_vae", "export",
           "MODEL_FILE", "SAMPLE_PROMPTS"]

log = logging.getLogger(__name__)

MODEL_FILE = "ldm-shapes.safetensors"
VAE_CKPT, LATENT_CKPT = "vae.pt", "latent.pt"
LOCK_FILE = ".ldm-train.lock"  # held while a run writes to --out (output_lock)


# --- stage 1: the autoencoder ----------------------------------------------------------------


@torch.no_grad()
def evaluate_vae(vae: AutoencoderKL, cfg: TrainConfig, device) -> dict:
    """Images the VAE never saw -> mean PSNR of decode(mean), and 1 / std of their posterior means
    (the scaling factor). "psnr": new scenes of the training distribution; "psnr_held_out_pairs":
    scenes with a HELD_OUT (colour, shape) pair, which no training image shows."""
    vae.eval()
    metrics, means = {}, []
    for name, held_out in (("psnr", False), ("psnr_held_out_pairs", True)):
        x, _, _ = shapes.batch(cfg.vae_eval_images, seed=10_000 + cfg.seed, held_out=held_out)
        scores = []
        for xb in x.split(64):
            posterior = vae.encode(xb.to(device))
            means.append(posterior.mean.float().cpu())
            scores.append(psnr(vae.decode(posterior.mean).float().cpu(), xb))
        metrics[name] = float(torch.cat(scores).mean())
    z = torch.cat(means)
    return {**metrics, "scaling_factor": float(1.0 / z.std()), "latent_mean": float(z.mean()),
            "latent_std": float(z.std())}


def train_vae(cfg: TrainConfig, dist: Dist, resume: bool) -> AutoencoderKL:
    """Stage 1. Returns the trained VAE with its measured scaling factor in vae.cfg.

    vae_steps train the whole autoencoder; then vae_decoder_steps train the decoder alone with the
    encoder frozen, as Stability's ft-MSE VAE did for SD: sharper pictures, the same latents, so the
    scaling factor and a UNet trained on those latents stay valid."""
    out = Path(cfg.out)
    ckpt_path = out / VAE_CKPT
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(cfg.vae_config()).to(dist.device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    step, elapsed, encoder_metrics, history = 0, 0.0, None, []  # history: [step, loss] every log_every steps
    total = cfg.vae_steps + cfg.vae_decoder_steps
    if resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path, ("vae",))
        restore(ckpt_path, vae, ck["vae"])
        restore(ckpt_path, opt, ck["opt"])
        step, elapsed, history = ck["step"], ck["elapsed"], ck.get("history", [])
        encoder_metrics = ck.get("encoder_metrics") or (ck.get("metrics") if step >= cfg.vae_steps else None)
        if ck.get("done") and step >= total and "scaling_factor" in (ck.get("metrics") or {}):
            vae.cfg = dataclasses.replace(vae.cfg, scaling_factor=ck["metrics"]["scaling_factor"])
            log.info("stage 1 already finished (%d steps): %s", step, ck["metrics"])
            return vae
        if step >= total:  # the loop would not run, and no finished checkpoint would be written
            raise CheckpointFileError(f"{ckpt_path}: an unfinished stage 1 stopped at step {step}; allowed: "
                                      f"vae_steps + vae_decoder_steps > {step} to continue it")
        log.info("stage 1: resuming at step %d", step)
    if dist.master:
        log.info("stage 1: VAE %s, %.2fM parameters", vae.cfg, count(vae) / 1e6)
    micro = accum_steps(cfg, dist)
    bar = tqdm(total=total, initial=step, desc="vae", disable=not dist.master, mininterval=5)
    t0 = time.time() - elapsed
    phase = None
    while step < total:
        decoder_only = step >= cfg.vae_steps
        if decoder_only != phase:  # DDP registers the trainable parameters when it wraps: wrap again
            vae.encoder.requires_grad_(not decoder_only)  # AdamW skips parameters without a gradient
            vae.quant_conv.requires_grad_(not decoder_only)
            model, phase = wrap(VAELoss(vae, cfg.kl_weight), dist), decoder_only
        vae.train()
        for m in range(micro):
            g = generator(cfg, 1, step * micro + m, dist.rank)
            x, _, _ = shapes.batch(cfg.vae_batch, seed=int(torch.randint(0, 2**62, (1,), generator=g)))
            with no_sync(model, m == micro - 1):
                loss, rec = model(x.to(dist.device), g, step >= cfg.vae_mean_steps)
                (loss / micro).backward()
        lr = (lr_at(step - cfg.vae_steps, cfg.vae_decoder_lr, cfg, cfg.vae_decoder_steps) if decoder_only
              else lr_at(step, cfg.vae_lr, cfg, cfg.vae_steps))
        norm = optimizer_step(opt, [p for p in vae.parameters() if p.requires_grad], cfg, lr)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", rec=f"{rec.item():.4f}", refresh=False)
        if dist.master and (step % cfg.log_every == 0 or step == total):
            log.info("vae step %d loss %.5f rec %.5f grad_norm %.3f", step, loss.item(), rec.item(), norm)
            history.append([step, round(loss.item(), 6)])
        last = step == total
        if dist.master and step == cfg.vae_steps:  # the encoder is final: measure its scaling factor now
            encoder_metrics = evaluate_vae(vae, cfg, dist.device)
            log.info("stage 1, encoder done: held-out PSNR %.2f dB, scaling factor %.5f",
                     encoder_metrics["psnr"], encoder_metrics["scaling_factor"])
        if dist.master and cfg.sample_every and (step % cfg.sample_every == 0 or last):
            _vae_samples(vae, cfg, out / "samples" / f"vae-{step:06d}.png", dist.device)
        if dist.master and (last or (cfg.ckpt_every and step % cfg.ckpt_every == 0)):
            state = {"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": time.time() - t0,
                     "config": dataclasses.asdict(cfg), "world_size": dist.world, "done": False,
                     "encoder_metrics": encoder_metrics, "history": history}
            if last:  # the decoder moved, the encoder did not: its latents keep the factor measured above
                encoder_metrics = encoder_metrics or evaluate_vae(vae, cfg, dist.device)  # vae_steps=0
                state["metrics"] = {**evaluate_vae(vae, cfg, dist.device),
                                    "scaling_factor": encoder_metrics["scaling_factor"],
                                    "psnr_before_decoder_finetune": encoder_metrics["psnr"]}
                state["done"] = True
                log.info("stage 1 done in %.1f min: held-out PSNR %.2f dB, scaling factor %.5f",
                         state["elapsed"] / 60, state["metrics"]["psnr"], state["metrics"]["scaling_factor"])
            save(ckpt_path, state)
    bar.close()
    barrier(dist)
    # every rank reads the measured scaling factor from rank 0's checkpoint
    ck = load_checkpoint(ckpt_path, ("vae",))
    vae.cfg = dataclasses.replace(vae.cfg, scaling_factor=ck["metrics"]["scaling_factor"])
    return vae


@torch.no_grad()
def _vae_samples(vae: AutoencoderKL, cfg: TrainConfig, path: Path, device) -> None:
    """Top row: 8 held-out images; bottom row: their reconstructions."""
    vae.eval()
    x, _, _ = shapes.batch(8, seed=20_000 + cfg.seed, held_out=True)
    x_rec = vae.decode(vae.encode(x.to(device)).mean)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(to_pil(x) + to_pil(x_rec), cols=8).save(path)
    vae.train()


def train_latent(cfg: TrainConfig, dist: Dist, vae: AutoencoderKL, resume: bool):
    """Stage 2. Returns the EMA text encoder and UNet."""
    out = Path(cfg.out)
    ckpt_path = out / LATENT_CKPT
    torch.manual_seed(cfg.seed + 1)
    vae.requires_grad_(False).eval()
    text_encoder = CLIPTextModel(cfg.text_config()).to(dist.device)
    unet = UNetModel(cfg.unet_config(vae.cfg)).to(dist.device)
    denoiser = Denoiser(text_encoder, unet)
    ema = copy.deepcopy(denoiser).requires_grad_(False).eval()
    opt = torch.optim.AdamW(denoiser.parameters(), lr=cfg.unet_lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    step, elapsed, history = 0, 0.0, []  # history: [step, loss] every log_every steps
    if resume and ckpt_path.exists():  # a finished checkpoint resumes too: a larger unet_steps extends it
        ck = load_checkpoint(ckpt_path, ("model", "ema"))
        restore(ckpt_path, denoiser, ck["model"])
        restore(ckpt_path, ema, ck["ema"])
        restore(ckpt_path, opt, ck["opt"])
        step, elapsed, history = ck["step"], ck["elapsed"], ck.get("history", [])
        log.info("stage 2: resuming at step %d", step)
    if dist.master:
        log.info("stage 2: text encoder %.2fM parameters, UNet %.2fM parameters", count(text_encoder) / 1e6,
                 count(unet) / 1e6)
    tokenizer = CLIPTokenizer()
    schedule = Schedule.sd1()
    pool_t0 = time.time()
    means, stds, scenes = encode_pool(vae, cfg, dist.device)
    if dist.master:
        log.info("stage 2: %d scenes encoded in %.1f s", len(scenes), time.time() - pool_t0)
    scale = vae.cfg.scaling_factor
    model = wrap(denoiser, dist)
    micro = accum_steps(cfg, dist)
    bar = tqdm(total=cfg.unet_steps, initial=step, desc="unet", disable=not dist.master, mininterval=5)
    t0 = time.time() - elapsed
    while step < cfg.unet_steps:
        denoiser.train()
        for m in range(micro):
            g = generator(cfg, 2, step * micro + m, dist.rank)
            idx = torch.randint(0, len(scenes), (cfg.unet_batch,), generator=g)
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=g)))
            captions = [shapes.caption(scenes[i], rng) for i in idx.tolist()]
            drop = torch.rand(cfg.unet_batch, generator=g) < cfg.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
            z0 = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)  # a posterior draw
            x0 = (z0 * scale).to(dist.device)  # (B, 4, 8, 8), about unit variance
            with no_sync(model, m == micro - 1):  # t, eps ~ g; x_t by Ho et al. 2020 eq. 4; |eps - eps_theta|^2
                loss = eps_loss(model, tokenizer(captions), x0, schedule, g)
                (loss / micro).backward()
        norm = optimizer_step(opt, denoiser.parameters(), cfg, lr_at(step, cfg.unet_lr, cfg, cfg.unet_steps))
        ema_update(ema, denoiser, cfg.ema_decay, step)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if dist.master and (step % cfg.log_every == 0 or step == cfg.unet_steps):
            log.info("unet step %d loss %.5f grad_norm %.3f", step, loss.item(), norm)
            history.append([step, round(loss.item(), 6)])
        last = step == cfg.unet_steps
        if dist.master and cfg.sample_every and (step % cfg.sample_every == 0 or last):
            _latent_samples(ema, vae, tokenizer, cfg, out / "samples" / f"unet-{step:06d}.png")
        if dist.master and (last or (cfg.ckpt_every and step % cfg.ckpt_every == 0)):
            save(ckpt_path, {"model": denoiser.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                             "step": step, "elapsed": time.time() - t0, "config": dataclasses.asdict(cfg),
                             "world_size": dist.world, "done": last, "history": history})
    bar.close()
    if dist.master:
        log.info("stage 2 done in %.1f min", (time.time() - t0) / 60)
    barrier(dist)
    return ema.text_encoder, ema.unet


SAMPLE_PROMPTS = ("a red circle", "a blue square", "a yellow triangle", "a large green square",
                  "a cyan circle in the top left", "a purple triangle on a black background",
                  "a red circle above a blue square", "a yellow square to the left of a cyan triangle")


@torch.no_grad()
def _latent_samples(ema: Denoiser, vae: AutoencoderKL, tokenizer, cfg: TrainConfig, path: Path) -> None:
    """One row per guidance (1 and 7.5), one column per SAMPLE_PROMPTS entry, 25 Euler steps, seed 0."""
    from ldm.pipeline import Pipeline
    pipe = Pipeline({"text_encoder": ema.text_encoder, "unet": ema.unet, "vae": vae},
                    tokenizers={"text_encoder": tokenizer})
    images = []
    for guidance in (1.0, 7.5):
        images += pipe(list(SAMPLE_PROMPTS), steps=25, guidance=guidance, seed=0, progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(images, cols=len(SAMPLE_PROMPTS)).save(path)


# --- export ----------------------------------------------------------------------------------


def export(path: Path, text_encoder, unet, vae, metadata: dict[str, str]) -> Path:
    """The SD 1.x single file in fp16, configs (with the scaling factor) in its metadata."""
    configs = {"text_encoder": text_encoder.config, "unet": unet.cfg, "vae": vae.cfg}
    return weights.write_single_file(path, text_encoder, unet, vae, dtype=torch.float16, configs=configs,
                                     metadata=metadata)


# --- the command -----------------------------------------------------------------------------


MAX_VALUE_CHARS = 200  # a --set value longer than this is no number or tuple of this config


def _parse_value(name: str, text: str, default):
    """'1e-3' -> 0.001, '(1, 2)' -> (1, 2), 'cpu' -> 'cpu', typed like the field's default; a value of
    another type ('1e14' for an integer, 'abc' for a tuple) is an error naming what is allowed."""
    if isinstance(default, str):
        return text
    allowed = (RANGES[name].kind() if name in RANGES else
               f"a tuple of integers, e.g. {default}" if isinstance(default, tuple) else type(default).__name__)
    if len(text) > MAX_VALUE_CHARS:
        raise ValueError(f"{name}={short(text)} is longer than {MAX_VALUE_CHARS} characters; allowed: {allowed}")
    try:
        value = ast.literal_eval(text)  # literals only: nothing is evaluated
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        value = text
    if isinstance(default, tuple):
        value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if not all(type(v) is int for v in value):
            raise ValueError(f"{name}={short(text)} must be {allowed}")
    elif isinstance(default, float) and type(value) is int:
        value = float(value)
    if type(value) is not type(default):  # `type is`: True is no integer here
        raise ValueError(f"{name}={short(text)} must be {allowed}")
    return value


def make_config(overrides: dict[str, str], given_as: dict[str, str] | None = None) -> TrainConfig:
    """TrainConfig with `overrides` (field name -> text) applied; an unknown name, a value of the wrong
    type or outside the field's range is an error. given_as: how the command line gave each key
    ("--set ", "--vae-batch: "), the start of its error message (default "--set ")."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key {short(unknown[0])}; allowed keys: {', '.join(fields)}")
    defaults, values = TrainConfig(), {}
    for key, text in overrides.items():
        try:
            values[key] = _parse_value(key, text, getattr(defaults, key))
            check_field(key, values[key])
        except ValueError as e:
            raise ValueError(f"{(given_as or {}).get(key, '--set ')}{e}") from None
    return TrainConfig(**values)


def _allowed(name: str) -> str:
    """What a field allows, for --help."""
    if name in RANGES:
        return RANGES[name].kind()
    if name in TUPLES:
        fewest, most, each = TUPLES[name]
        return f"{fewest} to {most} integers, each {each}"
    return {"stage": f"one of {', '.join(STAGES)}", "device": "auto, cpu, cuda, cuda:N", "out": "a folder"}[name]


def parse_args(argv: list[str] | None) -> tuple[TrainConfig, bool]:
    parser = ArgumentParser(prog="ldm train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change one TrainConfig field (repeatable)")
    for f in dataclasses.fields(TrainConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), dest="field_" + f.name, metavar=f.name.upper(),
                            help=f"TrainConfig.{f.name} (default {f.default!r}; {_allowed(f.name)})")
    args = parser.parse_args(argv)
    overrides, given_as = {}, {}
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set {short(item)} must look like KEY=VALUE")
        key, value = item.split("=", 1)
        overrides[key.strip()], given_as[key.strip()] = value.strip(), "--set "
    for f in dataclasses.fields(TrainConfig):
        if getattr(args, "field_" + f.name) is not None:
            overrides[f.name] = getattr(args, "field_" + f.name)
            given_as[f.name] = f"--{f.name.replace('_', '-')}: "
    return make_config(overrides, given_as), args.resume


def check_outputs(cfg: TrainConfig, resume: bool) -> None:
    """Refuse before any work what would overwrite a file: the final model always, checkpoints unless --resume."""
    out = Path(cfg.out)
    if cfg.stage in ("unet", "all") and (out / MODEL_FILE).exists():
        raise FileExistsError(f"{out / MODEL_FILE} already exists; not overwritten (delete it or pick another --out)")
    mine = {"vae": [VAE_CKPT], "unet": [LATENT_CKPT], "all": [VAE_CKPT, LATENT_CKPT]}[cfg.stage]
    for name in mine:
        if (out / name).exists() and not resume:
            raise FileExistsError(f"{out / name} already exists; pass --resume to continue it or pick another --out")
    if cfg.stage == "unet" and not (out / VAE_CKPT).exists():
        raise FileNotFoundError(f"--stage unet needs a trained {out / VAE_CKPT}; run --stage vae first")


def run(cfg: TrainConfig, resume: bool = False) -> dict:
    """The recipe for cfg.stage; returns what it measured (and the model path when it wrote one).

    The first process (rank 0, the one that writes) holds --out's lock for the whole run: a second run
    on the same folder stops with OutputError before it reads or writes anything there."""
    check_outputs(cfg, resume)
    writer = int(os.environ.get("RANK", 0)) == 0  # torchrun's rank 0; known before any process group
    with output_lock(Path(cfg.out) / LOCK_FILE, f"--out {cfg.out}") if writer else nullcontext():
        check_outputs(cfg, resume)  # again: a run that just finished here may have written them
        return _run(cfg, resume)


def _run(cfg: TrainConfig, resume: bool) -> dict:
    """run's work, under --out's lock."""
    dist = setup(cfg)
    out = Path(cfg.out)
    if dist.master:
        out.mkdir(parents=True, exist_ok=True)
        log.info("ldm train: %d process(es) on %s, config %s", dist.world, dist.device, json.dumps(dataclasses.asdict(cfg)))
    barrier(dist)
    t0 = time.time()
    vae = train_vae(cfg, dist, resume=resume or cfg.stage == "unet")
    vae_ck = load_checkpoint(out / VAE_CKPT, ("vae",))
    result = {**vae_ck["metrics"], "vae_minutes": vae_ck["elapsed"] / 60, "history": {"vae": vae_ck.get("history", [])}}
    if cfg.stage in ("unet", "all"):
        text_encoder, unet = train_latent(cfg, dist, vae, resume=resume)
        latent_ck = load_checkpoint(out / LATENT_CKPT, ("model", "ema"))
        result["unet_minutes"] = latent_ck["elapsed"] / 60
        result["history"]["unet"] = latent_ck.get("history", [])
        if dist.master:
            result["params"] = {"text_encoder": count(text_encoder), "unet": count(unet), "vae": count(vae)}
            meta = {"ldm.train": json.dumps({"config": dataclasses.asdict(cfg), "world_size": dist.world,
                                             **{k: v for k, v in result.items()}})}
            result["model"] = str(export(out / MODEL_FILE, text_encoder.cpu(), unet.cpu(), vae.cpu(), meta))
            log.info("wrote %s (%.1f MB) after %.1f min", result["model"],
                     Path(result["model"]).stat().st_size / 1e6, (time.time() - t0) / 60)
    barrier(dist)
    return result


def main(argv: list[str] | None = None) -> dict:
    """`ldm train ARGS`: parse, run; a bad argument, an existing or busy output, or a checkpoint in --out
    that cannot be resumed is a one-line SystemExit."""
    try:
        cfg, resume = parse_args(argv)
        check_device_name("device=", cfg.device)  # CUDA asked for on a machine without it
        check_outputs(cfg, resume)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        raise SystemExit(f"ldm train: {e}") from None
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        return run(cfg, resume)
    except (CheckpointFileError, OutputError, FileExistsError, FileNotFoundError) as e:
        raise SystemExit(f"ldm train: {e}") from None


if __name__ == "__main__":
    sys.exit(command(main, "ldm train"))
