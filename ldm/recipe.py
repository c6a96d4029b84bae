"""The shapes recipe's knobs and the pieces it is made of: objectives, optimisation, processes, measures.

ldm.train (the two-stage recipe that trained the shipped model) and ldm.finetune (a LoRA on top of
it) are loops, read top to bottom; what they are made of, and what a notebook may call on its own:

0. The knobs: `TrainConfig`, every setting of ldm.train, each numeric one with its documented range
   (`RANGES`, `TUPLES`, checked by `check_field` before any work).
1. The objectives. `eps_loss` is the simplified loss |eps - eps_theta(x_t, t, c)|^2 on a `Denoiser`
   (text encoder and UNet as one module), with x_t from `ldm.schedule.Schedule.add_noise`, the forward
   process q(x_t | x_0) of Ho et al. 2020 eq. 4, at one timestep per image; `VAELoss` is stage 1's
   L1 + MSE + KL.
2. The data: `encode_pool` encodes a pool of world scenes once (posterior means and stds).
3. The optimisation: `generator` (every random draw of a step, seeded by seed, stage, step, rank),
   `lr_at` (warmup, then cosine decay), `optimizer_step` (clip and step), `ema_update`.
4. The processes: `Dist` and `setup` (torchrun's DDP, or one plain process), `accum_steps`, `wrap`,
   `no_sync`, `barrier`.
5. Measuring and looking: `psnr`, `count`, `grid`, `to_pil`.

Sections 2-4 take any config with the fields they read (TrainConfig and ldm.finetune's
FinetuneConfig both have them): warmup, min_lr_frac, grad_clip, seed, pool_size, ...
"""
from __future__ import annotations

import dataclasses
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ldm import shapes
from ldm.clip import CLIPTextConfig, CLIPTextModel
from ldm.commandline import short
from ldm.schedule import Schedule
from ldm.runfiles import MAX_STEPS, SEED, THREADS, Range, check_device_name, ints, reals
from ldm.unet import UNetConfig, UNetModel
from ldm.vae import AutoencoderKL, VAEConfig

__all__ = ["TrainConfig", "RANGES", "TUPLES", "STAGES", "check_field", "Denoiser", "eps_loss",
           "VAELoss", "encode_pool", "generator", "lr_at", "optimizer_step", "ema_update", "Dist", "setup",
           "accum_steps", "wrap", "no_sync", "barrier", "psnr", "count", "grid", "to_pil"]


# --- 0. the knobs ----------------------------------------------------------------------------


STAGES = ("vae", "unet", "all")

# The allowed values of every numeric TrainConfig field. Wide enough for any run of this recipe on one
# machine (SD 1.x's own sizes fit: VAE ch 128, CLIP width 768, UNet 320 channels), narrow enough that a
# typo (vae_batch=100000000, threads=10**11, vae_lr=1e309) is refused before any work instead of
# exhausting memory, hanging, or being noticed after a stage ran. `ldm train --help` prints them.
RANGES: dict[str, Range] = {
    "seed": SEED, "threads": THREADS, "log_every": ints(1, MAX_STEPS),
    "vae_ch": ints(1, 256), "vae_groups": ints(1, 256), "vae_res_blocks": ints(1, 8),
    "vae_steps": ints(0, MAX_STEPS), "vae_batch": ints(1, 1024), "vae_lr": reals(0, 1, open_lo=True),
    "vae_mean_steps": ints(0, MAX_STEPS), "kl_weight": reals(0, 1), "vae_decoder_steps": ints(0, MAX_STEPS),
    "vae_decoder_lr": reals(0, 1, open_lo=True), "vae_eval_images": ints(1, 4096),
    "text_width": ints(1, 1024), "text_layers": ints(1, 32), "text_heads": ints(1, 64),
    "unet_channels": ints(1, 512), "unet_res_blocks": ints(1, 8), "unet_heads": ints(1, 64),
    "unet_steps": ints(0, MAX_STEPS), "unet_batch": ints(1, 1024), "unet_lr": reals(0, 1, open_lo=True),
    "pool_size": ints(1, 65536), "caption_dropout": reals(0, 1),
    "grad_accum": ints(1, 64), "warmup": ints(0, MAX_STEPS), "min_lr_frac": reals(0, 1),
    "weight_decay": reals(0, 1), "grad_clip": reals(0, 1e6, open_lo=True), "ema_decay": reals(0, 1, open_hi=True),
    "sample_every": ints(0, MAX_STEPS), "ckpt_every": ints(0, MAX_STEPS),
}
# The tuple fields: (fewest, most entries), each entry in the range. vae_ch_mult's length sets the
# downsampling (2 ** (n - 1)): six levels take a 64-pixel image to a 2 x 2 latent.
TUPLES: dict[str, tuple[int, int, Range]] = {
    "vae_ch_mult": (1, 6, ints(1, 8)), "unet_channel_mult": (1, 4, ints(1, 8)),
    "unet_attention": (0, 4, ints(1, 64)),
}


def check_field(name: str, value) -> None:
    """Refuse a TrainConfig field's value outside its documented range (RANGES, TUPLES) or choices."""
    if name in RANGES:
        RANGES[name].check(f"{name}=", value)
    elif name in TUPLES:
        fewest, most, each = TUPLES[name]
        if not (isinstance(value, tuple) and fewest <= len(value) <= most and all(v in each for v in value)):
            raise ValueError(f"{name}={short(value)} must be a tuple of {fewest} to {most} integers, each {each}")
    elif name == "stage":
        if value not in STAGES:
            raise ValueError(f"stage={short(value)} is not one of {STAGES}")
    elif name == "device":
        check_device_name("device=", value, available=False)  # a config may be written on another machine
    elif name == "out":
        if not (isinstance(value, str) and value and "\0" not in value):
            raise ValueError(f"out={short(value)} must be a folder path (not empty, no NUL character)")


@dataclass
class TrainConfig:
    """Every knob of the recipe; `--set key=value` or `--key value` changes one (RANGES, TUPLES: what is allowed)."""

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
        for f in dataclasses.fields(self):
            check_field(f.name, getattr(self, f.name))
        # the fields that must fit together: GroupNorm and attention-head splits, and the latent's size
        vae_widths = [self.vae_ch * m for m in self.vae_ch_mult]
        if any(w % self.vae_groups for w in vae_widths):
            raise ValueError(f"vae_ch={self.vae_ch} with vae_ch_mult={self.vae_ch_mult} gives widths {vae_widths}; "
                             f"each must be a multiple of vae_groups={self.vae_groups}")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width={self.text_width} must be a multiple of text_heads={self.text_heads}")
        unet_widths = [self.unet_channels * m for m in self.unet_channel_mult]
        if any(w % 32 or w % self.unet_heads for w in unet_widths):
            raise ValueError(f"unet_channels={self.unet_channels} with unet_channel_mult={self.unet_channel_mult} "
                             f"gives widths {unet_widths}; each must be a multiple of 32 (GroupNorm groups) and "
                             f"of unet_heads={self.unet_heads}")
        latent = shapes.SIZE_PX >> (len(self.vae_ch_mult) - 1)
        if latent % (1 << (len(self.unet_channel_mult) - 1)):
            raise ValueError(f"vae_ch_mult={self.vae_ch_mult} makes {latent}x{latent} latents, which "
                             f"unet_channel_mult={self.unet_channel_mult} cannot halve "
                             f"{len(self.unet_channel_mult) - 1} times")

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


# --- 1. the objectives -----------------------------------------------------------------------


class Denoiser(nn.Module):
    """(ids, x_t, t) -> eps: text encoder and UNet as one module, so DDP sees both."""

    def __init__(self, text_encoder: CLIPTextModel, unet: UNetModel):
        super().__init__()
        self.text_encoder, self.unet = text_encoder, unet

    def forward(self, ids: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, self.text_encoder(ids))  # (B, 4, h, w)


def eps_loss(denoiser: nn.Module, ids: torch.Tensor, x0: torch.Tensor, schedule: Schedule,
             g: torch.Generator) -> torch.Tensor:
    """The simplified epsilon loss on scaled latents x0 (B, 4, h, w): draw t ~ U{0..T-1}, then eps,
    from g (in that order), noise x0 to x_t (schedule.add_noise) and regress the noise. `denoiser` is a
    Denoiser, or one wrapped by DDP."""
    t = torch.randint(0, len(schedule.alpha_bar), (len(x0),), generator=g).to(x0.device)
    eps = torch.randn(x0.shape, generator=g).to(x0.device)
    x_t = schedule.add_noise(x0, eps, t)
    return F.mse_loss(denoiser(ids.to(x0.device), x_t, t), eps)


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


# --- 2. the data -----------------------------------------------------------------------------


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, cfg, device) -> tuple[torch.Tensor, torch.Tensor, list]:
    """cfg.pool_size training scenes -> posterior means and stds (N, 4, 8, 8), and the scenes (for captions)."""
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


# --- 3. the optimisation ---------------------------------------------------------------------


def generator(cfg, stage: int, step: int, rank: int = 0) -> torch.Generator:
    """The generator of one step of one stage on one rank: resuming at step s redraws step s's numbers.
    The seed is taken modulo 2**64 (manual_seed's range), which leaves every seed that fitted unchanged."""
    return torch.Generator().manual_seed((((cfg.seed * 7 + stage) * 1_000_003 + step) * 4099 + rank) % 2**64)


def lr_at(step: int, base: float, cfg, total: int) -> float:
    """Linear warmup for cfg.warmup steps, then cosine decay to min_lr_frac * base at `total`."""
    if step < cfg.warmup:
        return base * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
    return base * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_step(opt, params, cfg, lr: float) -> float:
    """Set the learning rate, clip the gradients' norm to cfg.grad_clip, step, zero; returns the norm."""
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


# --- 4. the processes ------------------------------------------------------------------------


@dataclass
class Dist:
    """This process's place in the run: rank 0 of 1 without torchrun."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup(cfg) -> Dist:
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


def accum_steps(cfg, dist: Dist) -> int:
    """Micro-steps per optimiser step on this process: cfg.grad_accum shared out over the world."""
    if cfg.grad_accum % dist.world:
        raise ValueError(f"grad_accum={cfg.grad_accum} must be a multiple of the {dist.world} processes")
    return cfg.grad_accum // dist.world


def wrap(module: nn.Module, dist: Dist) -> nn.Module:
    """The module in DistributedDataParallel when there are several processes, else itself."""
    if dist.world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)


def no_sync(model: nn.Module, last_micro_step: bool):
    """DDP averages gradients on the last micro-step only (nanoGPT's require_backward_grad_sync)."""
    return nullcontext() if last_micro_step or not hasattr(model, "no_sync") else model.no_sync()


def barrier(dist: Dist) -> None:
    """Wait for every process (nothing to wait for in one)."""
    if dist.world > 1:
        import torch.distributed as td
        td.barrier()


# --- 5. measuring and looking ----------------------------------------------------------------


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1], measured on [0, 1] (peak 1), both clamped to the range."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def count(module: nn.Module) -> int:
    """The number of parameters."""
    return sum(p.numel() for p in module.parameters())


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
    """(B, 3, H, W) in [-1, 1], on any device and dtype -> a list of PIL images."""
    from ldm.images import to_pil as _to_pil
    return _to_pil(x.detach().float().cpu())
