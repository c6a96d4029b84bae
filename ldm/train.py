"""Train ldm's own small text-to-image model on the shapes world (ldm.shapes), in two stages.

    python -m ldm.train --out runs/shapes                   # the whole recipe: VAE, then latent model
    python -m ldm.train --out runs/shapes --resume          # continue from the last checkpoint
    python -m ldm.train --stage vae --set vae_steps=200     # one stage, any TrainConfig field changed
    torchrun --nproc_per_node 2 -m ldm.train --out ...      # DistributedDataParallel (gloo on the CPU)

nanoGPT's train.py is the model for the loop: one file, read top to bottom, that runs in one process on
the CPU or a GPU, and under torchrun as DDP (RANK set -> one process per rank; gradients averaged;
gradient accumulation divided by the world size; only rank 0 writes files).

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
vae.pt and latent.pt (checkpoints), samples/*.png (grids), and the final ldm-shapes.safetensors
(SD 1.x single-file layout, fp16, configs and scaling factor in the metadata), never overwritten.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ldm import shapes, weights
from ldm.clip import CLIPTextConfig, CLIPTextModel
from ldm.schedule import Schedule
from ldm.tokenizer import CLIPTokenizer
from ldm.unet import UNetConfig, UNetModel
from ldm.vae import AutoencoderKL, VAEConfig

__all__ = ["TrainConfig", "main", "train_vae", "train_latent", "export", "psnr", "STAGES", "MODEL_FILE"]

log = logging.getLogger(__name__)

STAGES = ("vae", "unet", "all")
MODEL_FILE = "ldm-shapes.safetensors"
VAE_CKPT, LATENT_CKPT = "vae.pt", "latent.pt"


# --- the configuration -----------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Every knob of the recipe; `--set key=value` or `--key value` changes one."""

    out: str = "runs/shapes"
    stage: str = "all"  # "vae", "unet" (needs a finished vae.pt in out) or "all"
    seed: int = 0
    device: str = "auto"  # "auto": cuda if available, else cpu
    threads: int = 0  # torch CPU threads per process (0: torch's default; 1 is far faster on a busy CPU)
    log_every: int = 25
    # stage 1: the autoencoder (8x down: 64x64x3 images <-> 8x8x4 latents)
    vae_ch: int = 16
    vae_groups: int = 4  # GroupNorm groups (SD: 32); one channel per group (instance norm) washes out colour
    vae_ch_mult: tuple = (1, 2, 2, 2)
    vae_res_blocks: int = 1
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_lr: float = 3e-3
    vae_mean_steps: int = 550  # the first steps decode the posterior mean, later ones a sample
    kl_weight: float = 1e-5  # times the KL per image, over pixels per image: SD's kl_weight convention
    vae_decoder_steps: int = 800  # then the decoder alone, encoder frozen (SD's ft-MSE VAE): latents unchanged
    vae_decoder_lr: float = 1e-3
    vae_eval_images: int = 256  # held-out images for the PSNR and the scaling factor
    # stage 2: text encoder + UNet
    text_width: int = 64
    text_layers: int = 4
    text_heads: int = 4
    unet_channels: int = 64
    unet_channel_mult: tuple = (1, 2, 2)
    unet_res_blocks: int = 1
    unet_attention: tuple = (1, 2, 4)  # downsampling factors with a SpatialTransformer
    unet_heads: int = 4
    unet_steps: int = 4400
    unet_batch: int = 32
    unet_lr: float = 1e-3
    pool_size: int = 16384  # scenes encoded once for stage 2
    caption_dropout: float = 0.1  # fraction of empty captions (classifier-free guidance)
    # both stages
    grad_accum: int = 2  # micro-steps per optimiser step, summed over all processes: one process runs 2,
    # torchrun with 2 runs 1 each, and either way a step sees 2 x batch images
    warmup: int = 100  # linear warmup steps, then cosine decay to min_lr_frac of the rate
    min_lr_frac: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # averages about the last 1 / (1 - decay) = 1000 steps
    sample_every: int = 350  # steps between sample grids (0: never)
    ckpt_every: int = 200  # steps between checkpoints (the last step always writes one)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r} is not one of {STAGES}")
        for name in ("vae_batch", "unet_batch", "grad_accum", "vae_ch", "unet_channels", "text_width",
                     "text_layers", "text_heads", "unet_heads", "pool_size", "vae_eval_images", "log_every", "vae_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")
        for name in ("threads", "vae_steps", "unet_steps", "warmup", "sample_every", "ckpt_every", "vae_mean_steps",
                     "vae_decoder_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout={self.caption_dropout!r} must be in [0, 1]")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay!r} must be in [0, 1)")
        for name in ("vae_lr", "vae_decoder_lr", "unet_lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")

    def vae_config(self) -> VAEConfig:
        return VAEConfig(ch=self.vae_ch, ch_mult=tuple(self.vae_ch_mult), num_res_blocks=self.vae_res_blocks,
                         norm_groups=self.vae_groups)

    def text_config(self) -> CLIPTextConfig:
        return CLIPTextConfig(hidden_size=self.text_width, intermediate_size=4 * self.text_width,
                              num_hidden_layers=self.text_layers, num_attention_heads=self.text_heads)

    def unet_config(self, vae_cfg: VAEConfig) -> UNetConfig:
        return UNetConfig(model_channels=self.unet_channels, channel_mult=tuple(self.unet_channel_mult),
                          num_res_blocks=self.unet_res_blocks, attention_resolutions=tuple(self.unet_attention),
                          num_heads=self.unet_heads, context_dim=self.text_width,
                          in_channels=vae_cfg.embed_dim, out_channels=vae_cfg.embed_dim,
                          sample_size=shapes.SIZE_PX // vae_cfg.downsample_factor)


def _parse_value(name: str, text: str, default):
    """'1e-3' -> 0.001, '(1, 2)' -> (1, 2), 'cpu' -> 'cpu', typed like the field's default."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(default, tuple):
        value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    elif isinstance(default, str):
        value = text
    elif isinstance(default, float) and isinstance(value, int):
        value = float(value)
    if not isinstance(value, type(default)):
        raise ValueError(f"{name}={text!r} must be of type {type(default).__name__} (default {default!r})")
    return value


def make_config(overrides: dict[str, str]) -> TrainConfig:
    """TrainConfig with `overrides` (field name -> text) applied; an unknown name is an error."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key {unknown[0]!r}; allowed keys: {', '.join(fields)}")
    defaults = TrainConfig()
    return TrainConfig(**{k: _parse_value(k, v, getattr(defaults, k)) for k, v in overrides.items()})


# --- processes, randomness, optimisation -----------------------------------------------------


@dataclass
class Dist:
    """This process's place in the run: rank 0 of 1 without torchrun."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup(cfg: TrainConfig) -> Dist:
    """DDP when RANK is set (torchrun): nccl on CUDA, gloo on the CPU; else one plain process."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if int(os.environ.get("RANK", -1)) == -1:
        return Dist(device=torch.device("cuda" if want_cuda else cfg.device if cfg.device != "auto" else "cpu"))
    import torch.distributed as td
    if not td.is_initialized():
        td.init_process_group(backend="nccl" if want_cuda else "gloo")
    rank, world = td.get_rank(), td.get_world_size()
    device = torch.device("cpu")
    if want_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return Dist(rank, world, device)


def generator(cfg: TrainConfig, stage: int, step: int, rank: int = 0) -> torch.Generator:
    """The generator of one step of one stage on one rank: resuming at step s redraws step s's numbers."""
    return torch.Generator().manual_seed(((cfg.seed * 7 + stage) * 1_000_003 + step) * 4099 + rank)


def lr_at(step: int, base: float, cfg: TrainConfig, total: int) -> float:
    """Linear warmup for cfg.warmup steps, then cosine decay to min_lr_frac * base at `total`."""
    if step < cfg.warmup:
        return base * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
    return base * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def accum_steps(cfg: TrainConfig, dist: Dist) -> int:
    """Micro-steps per optimiser step on this process: grad_accum shared out over the world."""
    if cfg.grad_accum % dist.world:
        raise ValueError(f"grad_accum={cfg.grad_accum} must be a multiple of the {dist.world} processes")
    return cfg.grad_accum // dist.world


def wrap(module: nn.Module, dist: Dist) -> nn.Module:
    if dist.world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)


def no_sync(model: nn.Module, last_micro_step: bool):
    """DDP averages gradients on the last micro-step only (nanoGPT's require_backward_grad_sync)."""
    return nullcontext() if last_micro_step or not hasattr(model, "no_sync") else model.no_sync()


def optimizer_step(opt, params, cfg: TrainConfig, lr: float) -> float:
    for group in opt.param_groups:
        group["lr"] = lr
    norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """ema <- d ema + (1 - d) model, with d warmed up as (1 + step) / (10 + step) early on."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - d)


def save(path: Path, state: dict) -> None:
    """torch.save through a temporary file: a crash never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    tmp.replace(path)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1], measured on [0, 1] (peak 1), both clamped to the range."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def grid(images, cols: int):
    """A list of PIL images -> one PIL image, cols per row."""
    from PIL import Image
    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * w, (i // cols) * h))
    return sheet


def to_pil(x: torch.Tensor):
    from ldm.images import to_pil as _to_pil
    return _to_pil(x.detach().float().cpu())


# --- stage 1: the autoencoder ----------------------------------------------------------------


class VAELoss(nn.Module):
    """x -> (loss, reconstruction loss): L1 + MSE of the decoded latent, + kl_weight * KL / pixels.

    The latent is the posterior mean when `sample` is False (the first vae_mean_steps: the encoder
    learns to carry the picture before it has to beat the noise), else a posterior sample.
    """

    def __init__(self, vae: AutoencoderKL, kl_weight: float):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, x: torch.Tensor, g: torch.Generator, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x)
        eps = torch.randn(posterior.mean.shape, generator=g).to(x.device)  # the reparameterisation trick
        z = posterior.mean + posterior.std * eps if sample else posterior.mean  # (B, 4, 8, 8)
        x_rec = self.vae.decode(z)  # (B, 3, 64, 64)
        rec = (x_rec - x).abs().mean() + (x_rec - x).pow(2).mean()
        kl = posterior.kl().mean() / x[0].numel()  # per image, over its pixels
        return rec + self.kl_weight * kl, rec


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
        ck = torch.load(ckpt_path, map_location=dist.device, weights_only=False)
        vae.load_state_dict(ck["vae"])
        opt.load_state_dict(ck["opt"])
        step, elapsed, history = ck["step"], ck["elapsed"], ck.get("history", [])
        encoder_metrics = ck.get("encoder_metrics") or (ck.get("metrics") if step >= cfg.vae_steps else None)
        if ck.get("done") and step >= total:
            vae.cfg = dataclasses.replace(vae.cfg, scaling_factor=ck["metrics"]["scaling_factor"])
            log.info("stage 1 already finished (%d steps): %s", step, ck["metrics"])
            return vae
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
    _barrier(dist)
    # every rank reads the measured scaling factor from rank 0's checkpoint
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
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


# --- stage 2: the latent model ---------------------------------------------------------------


class Denoiser(nn.Module):
    """(ids, x_t, t) -> eps: text encoder and UNet as one module, so DDP sees both."""

    def __init__(self, text_encoder: CLIPTextModel, unet: UNetModel):
        super().__init__()
        self.text_encoder, self.unet = text_encoder, unet

    def forward(self, ids: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, self.text_encoder(ids))  # (B, 4, h, w)


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, cfg: TrainConfig, device) -> tuple[torch.Tensor, torch.Tensor, list]:
    """pool_size training scenes -> posterior means and stds (N, 4, 8, 8), and the scenes (for captions)."""
    vae.eval()
    means, stds, scenes = [], [], []
    chunk = 256
    for i in range(0, cfg.pool_size, chunk):
        n = min(chunk, cfg.pool_size - i)
        x, _, sc = shapes.batch(n, seed=cfg.seed * 1_000_003 + 30_000 + i)
        posterior = vae.encode(x.to(device))
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
        scenes.extend(sc)
    return torch.cat(means), torch.cat(stds), scenes


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
        ck = torch.load(ckpt_path, map_location=dist.device, weights_only=False)
        denoiser.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        step, elapsed, history = ck["step"], ck["elapsed"], ck.get("history", [])
        log.info("stage 2: resuming at step %d", step)
    if dist.master:
        log.info("stage 2: text encoder %.2fM parameters, UNet %.2fM parameters", count(text_encoder) / 1e6,
                 count(unet) / 1e6)
    tokenizer = CLIPTokenizer()
    schedule = Schedule.sd1()
    alpha_bar = schedule.alpha_bar.to(dist.device)
    T = schedule.num_train_timesteps
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
            t = torch.randint(0, T, (cfg.unet_batch,), generator=g).to(dist.device)
            eps = torch.randn(x0.shape, generator=g).to(dist.device)
            ab = alpha_bar[t].view(-1, 1, 1, 1)
            x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps  # Ho et al. 2020 eq. 4
            with no_sync(model, m == micro - 1):
                loss = F.mse_loss(model(tokenizer(captions).to(dist.device), x_t, t), eps)
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
    _barrier(dist)
    return ema.text_encoder, ema.unet


SAMPLE_PROMPTS = ("a red circle", "a blue square", "a yellow triangle", "a large green square",
                  "a cyan circle in the top left", "a purple triangle on a black background",
                  "a red circle above a blue square", "a yellow square to the left of a cyan triangle")


@torch.no_grad()
def _latent_samples(ema: Denoiser, vae: AutoencoderKL, tokenizer, cfg: TrainConfig, path: Path) -> None:
    """One row per guidance (1 and 7.5), one column per SAMPLE_PROMPTS entry, 25 Euler steps, seed 0."""
    from ldm.pipeline import Pipeline
    pipe = Pipeline(tokenizer, ema.text_encoder, ema.unet, vae)
    images = []
    for guidance in (1.0, 7.5):
        images += pipe(list(SAMPLE_PROMPTS), steps=25, guidance=guidance, seed=0, progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(images, cols=len(SAMPLE_PROMPTS)).save(path)


def _barrier(dist: Dist) -> None:
    if dist.world > 1:
        import torch.distributed as td
        td.barrier()


# --- export ----------------------------------------------------------------------------------


def export(path: Path, text_encoder, unet, vae, metadata: dict[str, str]) -> Path:
    """The SD 1.x single file in fp16, configs (with the scaling factor) in its metadata."""
    configs = {"text_encoder": text_encoder.config, "unet": unet.cfg, "vae": vae.cfg}
    return weights.write_single_file(path, text_encoder, unet, vae, dtype=torch.float16, configs=configs,
                                     metadata=metadata)


# --- the command -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[TrainConfig, bool]:
    from ldm.cli import ArgumentParser  # argparse with its usage errors on one line

    parser = ArgumentParser(prog="ldm train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change one TrainConfig field (repeatable)")
    for f in dataclasses.fields(TrainConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), dest="field_" + f.name, metavar=f.name.upper(),
                            help=f"TrainConfig.{f.name} (default {f.default!r})")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set {item!r} must look like key=value")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value.strip()
    for f in dataclasses.fields(TrainConfig):
        if getattr(args, "field_" + f.name) is not None:
            overrides[f.name] = getattr(args, "field_" + f.name)
    return make_config(overrides), args.resume


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
    """The recipe for cfg.stage; returns what it measured (and the model path when it wrote one)."""
    check_outputs(cfg, resume)
    dist = setup(cfg)
    out = Path(cfg.out)
    if dist.master:
        out.mkdir(parents=True, exist_ok=True)
        log.info("ldm train: %d process(es) on %s, config %s", dist.world, dist.device, json.dumps(dataclasses.asdict(cfg)))
    _barrier(dist)
    t0 = time.time()
    vae = train_vae(cfg, dist, resume=resume or cfg.stage == "unet")
    vae_ck = torch.load(out / VAE_CKPT, map_location="cpu", weights_only=False)
    result = {**vae_ck["metrics"], "vae_minutes": vae_ck["elapsed"] / 60, "history": {"vae": vae_ck.get("history", [])}}
    if cfg.stage in ("unet", "all"):
        text_encoder, unet = train_latent(cfg, dist, vae, resume=resume)
        latent_ck = torch.load(out / LATENT_CKPT, map_location="cpu", weights_only=False)
        result["unet_minutes"] = latent_ck["elapsed"] / 60
        result["history"]["unet"] = latent_ck.get("history", [])
        if dist.master:
            result["params"] = {"text_encoder": count(text_encoder), "unet": count(unet), "vae": count(vae)}
            meta = {"ldm.train": json.dumps({"config": dataclasses.asdict(cfg), "world_size": dist.world,
                                             **{k: v for k, v in result.items()}})}
            result["model"] = str(export(out / MODEL_FILE, text_encoder.cpu(), unet.cpu(), vae.cpu(), meta))
            log.info("wrote %s (%.1f MB) after %.1f min", result["model"],
                     Path(result["model"]).stat().st_size / 1e6, (time.time() - t0) / 60)
    _barrier(dist)
    return result


def main(argv: list[str] | None = None) -> dict:
    """`ldm train ARGS`: parse, run; a bad argument or an existing output is a one-line SystemExit."""
    try:
        cfg, resume = parse_args(argv)
        check_outputs(cfg, resume)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        raise SystemExit(f"ldm train: {e}") from None
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return run(cfg, resume)


if __name__ == "__main__":
    main()
