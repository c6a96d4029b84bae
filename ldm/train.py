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
vae.pt and latent.pt (checkpoints, read back by ldm.unpickle's restricted reader, never by
torch.load: a file planted there cannot run code), samples/*.png (grids), and the final
ldm-shapes.safetensors (SD 1.x single-file layout, fp16, configs and scaling factor in the metadata),
never overwritten; while a run writes there it holds .ldm-train.lock, and a second run on the same
--out refuses. Every numeric field has a documented range (RANGES, TUPLES), checked before any work.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ldm import shapes, unpickle, weights
from ldm.clip import CLIPTextConfig, CLIPTextModel
from ldm.schedule import Schedule
from ldm.tokenizer import CLIPTokenizer
from ldm.unet import UNetConfig, UNetModel
from ldm.vae import AutoencoderKL, VAEConfig

__all__ = ["TrainConfig", "RANGES", "TUPLES", "main", "train_vae", "train_latent", "export", "psnr", "STAGES",
           "MODEL_FILE", "load_checkpoint", "output_lock", "CheckpointFileError", "OutputError"]

log = logging.getLogger(__name__)

STAGES = ("vae", "unet", "all")
MODEL_FILE = "ldm-shapes.safetensors"
VAE_CKPT, LATENT_CKPT = "vae.pt", "latent.pt"
LOCK_FILE = ".ldm-train.lock"  # held while a run writes to --out (output_lock)


# --- the configuration -----------------------------------------------------------------------


def short(value, limit: int = 60) -> str:
    """repr(value), cut to about `limit` characters: a hostile value never floods an error line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class Range:
    """The allowed values of one numeric option: lo..hi, either end open, integers or real numbers.
    NaN lies in no range and infinity beyond every one, so both are refused with the rest."""

    lo: float
    hi: float
    integer: bool = True
    open_lo: bool = False
    open_hi: bool = False

    def __contains__(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        above = value > self.lo if self.open_lo else value >= self.lo
        below = value < self.hi if self.open_hi else value <= self.hi
        return above and below

    def __str__(self) -> str:  # ">= 1 and <= 1024", "> 0 and <= 1"
        lo, hi = (self.lo, self.hi) if self.integer else (f"{self.lo:g}", f"{self.hi:g}")
        return f"{'>' if self.open_lo else '>='} {lo} and {'<' if self.open_hi else '<='} {hi}"

    def kind(self) -> str:
        return f"{'an integer' if self.integer else 'a number'} {self}"

    def check(self, label: str, value) -> None:
        """Raise ValueError '<label><value> must be ...' unless value is in the range."""
        if value not in self:
            wrong_type = isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float))
            raise ValueError(f"{label}{short(value)} must be {self.kind() if wrong_type else self}")


def ints(lo: int, hi: int) -> Range:
    return Range(lo, hi)


def reals(lo: float, hi: float, open_lo: bool = False, open_hi: bool = False) -> Range:
    return Range(lo, hi, integer=False, open_lo=open_lo, open_hi=open_hi)


MAX_STEPS = 10**7  # days of training at the recipe's speed; more is a typo, not a run
SEED = ints(0, 2**32 - 1)
THREADS = ints(0, 256)
DEVICE = re.compile(r"cpu|cuda(:[0-9]{1,2})?")  # and "auto" where a field allows it

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


def check_device(label: str, device: str, auto: bool = True, available: bool = True) -> None:
    """Refuse a device name torch would reject mid-run ('banana'), and (available=True) CUDA on a
    machine without it."""
    allowed = ("auto, " if auto else "") + "cpu, cuda, cuda:N"
    if not isinstance(device, str) or not (DEVICE.fullmatch(device) or (auto and device == "auto")):
        raise ValueError(f"{label}{short(device)} must be one of {allowed}")
    if available and device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{label}{short(device)}: CUDA is not available on this machine; allowed: "
                         f"{'auto, ' if auto else ''}cpu")


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
        check_device("device=", value, available=False)  # a config may be written on another machine
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
    """The generator of one step of one stage on one rank: resuming at step s redraws step s's numbers.
    The seed is taken modulo 2**64 (manual_seed's range), which leaves every seed that fitted unchanged."""
    return torch.Generator().manual_seed((((cfg.seed * 7 + stage) * 1_000_003 + step) * 4099 + rank) % 2**64)


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
    """torch.save through a temporary file: a crash never leaves a half-written checkpoint, and a failed
    write (a full disk) removes its part. The checkpoint holds tensors and plain data only (dicts,
    lists, numbers, strings), all that load_checkpoint's restricted reader accepts."""
    tmp = path.with_name(path.name + ".partial")
    try:
        torch.save(state, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


class CheckpointFileError(ValueError):
    """A checkpoint in --out that cannot be read or resumed; the message names the file."""


def _one_line(e: BaseException, limit: int = 160) -> str:
    """An exception as one short line (torch's and the unpickler's messages may span several)."""
    text = " ".join(str(e).split())
    return text[:limit] + ("..." if len(text) > limit else "")


def _numbers(value, kinds=(int, float)) -> bool:
    return not isinstance(value, bool) and isinstance(value, kinds) and math.isfinite(value)


def _checkpoint_problem(ck, networks: tuple[str, ...]) -> str | None:
    """What is wrong with a checkpoint's contents for the loop that reads them, or None."""
    if not isinstance(ck, dict):
        return f"it holds a {type(ck).__name__}, not a dict"
    if missing := [k for k in (*networks, "opt", "step", "elapsed") if k not in ck]:
        return f"it lacks {missing}"
    if not all(isinstance(ck[k], dict) for k in (*networks, "opt")):
        return f"its {[*networks, 'opt']} are not all dicts"
    if not (type(ck["step"]) is int and 0 <= ck["step"] <= MAX_STEPS):
        return f"step={short(ck['step'])} is not an integer >= 0 and <= {MAX_STEPS}"
    if not (_numbers(ck["elapsed"]) and ck["elapsed"] >= 0):
        return f"elapsed={short(ck['elapsed'])} is not a finite number of seconds"
    history = ck.get("history", [])
    if not (isinstance(history, list) and all(isinstance(h, list) and len(h) == 2 and all(map(_numbers, h))
                                              for h in history)):
        return "its history is not a list of [step, loss] pairs"
    for key in ("metrics", "encoder_metrics"):
        metrics = ck.get(key)
        if metrics is not None and not (isinstance(metrics, dict) and all(map(_numbers, metrics.values()))):
            return f"its {key} are not a dict of finite numbers"
    if isinstance(ck.get("metrics"), dict) and not ck["metrics"].get("scaling_factor", 1) > 0:
        return f"its scaling_factor {short(ck['metrics']['scaling_factor'])} is not > 0"
    return None


def load_checkpoint(path: Path, networks: tuple[str, ...]) -> dict:
    """A checkpoint that `save` wrote (vae.pt, latent.pt), read without running anything it names.

    torch.load(weights_only=False) would run any code a planted file asks for (an object whose
    __reduce__ returns os.system). ldm.unpickle's restricted reader never imports or calls a name
    from the file and bounds every size by the file's content; and since `save` writes only tensors
    and plain data, a pickle that names any class at all is refused here. Then the fields the
    loop reads are checked (`networks`: the state dicts it loads), so a wrong file ends in one
    line naming it, not in a traceback halfway through training."""
    allowed = "a checkpoint that ldm train wrote (tensors and plain data)"
    try:
        ck, stand_ins = unpickle.read_torch_zip(path)
    except unpickle.Refused as e:
        raise CheckpointFileError(f"{path}: refused, the pickle {_one_line(e)}; nothing was run; "
                                  f"allowed: {allowed}") from None
    except Exception as e:  # noqa: BLE001 - zipfile, Corrupt, OSError: whatever it is, it is not ours
        raise CheckpointFileError(f"{path}: unreadable ({type(e).__name__}: {_one_line(e)}); "
                                  f"allowed: {allowed}") from None
    if stand_ins:
        raise CheckpointFileError(f"{path}: refused, the pickle names {short(stand_ins[:3])}; nothing was run; "
                                  f"allowed: {allowed}")
    if problem := _checkpoint_problem(ck, networks):
        raise CheckpointFileError(f"{path}: not a checkpoint this run can resume: {problem}; allowed: {allowed}")
    return ck


def restore(path: Path, module_or_opt, state: dict) -> None:
    """load_state_dict from a checkpoint, its errors (another config's shapes) one line naming the file.
    An optimiser's per-parameter state is checked too: torch loads it unchecked and fails steps later."""
    try:
        module_or_opt.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        raise CheckpointFileError(f"{path}: cannot resume from it ({_one_line(e)}); allowed: a checkpoint "
                                  f"of this config (the same network sizes)") from None
    if isinstance(module_or_opt, torch.optim.Optimizer):
        for p, st in module_or_opt.state.items():
            for k, v in st.items():
                fits = (v.ndim == 0 or v.shape == p.shape) if isinstance(v, torch.Tensor) else _numbers(v)
                if not fits:
                    what = tuple(v.shape) if isinstance(v, torch.Tensor) else short(v)
                    raise CheckpointFileError(f"{path}: cannot resume from it: its optimiser state {short(k)} is "
                                              f"{what} for a parameter of shape {tuple(p.shape)}; allowed: a "
                                              f"checkpoint of this config")


class OutputError(OSError):
    """An output that cannot be written now: another process is writing it, or its folder cannot be made."""


@contextmanager
def output_lock(lock_path: Path, what: str):
    """Hold an exclusive lock on `lock_path` while this process writes `what` ("--out runs/x"): a second
    run writing the same output refuses at once (OutputError) instead of overwriting the first's files.

    fcntl.flock: the OS releases the lock when its holder exits or is killed, so a stale lock file never
    blocks a later run. The file is removed on release, under the lock; a process that opened it just
    before then finds it gone (another inode than the path's) and tries again."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): run unlocked, as before
        yield
        return
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputError(f"{what} is in use by another process (it holds {lock_path}); nothing was "
                                  f"written; allowed: wait for it to finish, or pick another output") from None
            try:
                if os.path.samestat(os.fstat(fd), os.stat(lock_path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
    except OSError as e:
        if isinstance(e, OutputError):
            raise
        in_the_way = next((a for a in lock_path.parents if a.exists()), None)  # the deepest part that exists
        reason = (f"{in_the_way} is a file, not a folder" if in_the_way is not None and not in_the_way.is_dir()
                  else f"{e.strerror or _one_line(e)}: {e.filename or lock_path}")
        raise OutputError(f"{what}: cannot write there ({reason}); allowed: a folder this process can create "
                          f"and write") from None
    try:
        os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a person looking
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(fd)


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
    _barrier(dist)
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


def _allowed(name: str) -> str:
    """What a field allows, for --help."""
    if name in RANGES:
        return RANGES[name].kind()
    if name in TUPLES:
        fewest, most, each = TUPLES[name]
        return f"{fewest} to {most} integers, each {each}"
    return {"stage": f"one of {', '.join(STAGES)}", "device": "auto, cpu, cuda, cuda:N", "out": "a folder"}[name]


def parse_args(argv: list[str] | None) -> tuple[TrainConfig, bool]:
    from ldm.cli import ArgumentParser  # argparse with its usage errors on one line

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
    _barrier(dist)
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
    _barrier(dist)
    return result


def main(argv: list[str] | None = None) -> dict:
    """`ldm train ARGS`: parse, run; a bad argument, an existing or busy output, or a checkpoint in --out
    that cannot be resumed is a one-line SystemExit."""
    try:
        cfg, resume = parse_args(argv)
        check_device("device=", cfg.device)  # CUDA asked for on a machine without it
        check_outputs(cfg, resume)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        raise SystemExit(f"ldm train: {e}") from None
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        return run(cfg, resume)
    except (CheckpointFileError, OutputError, FileExistsError, FileNotFoundError) as e:
        raise SystemExit(f"ldm train: {e}") from None


def command(main_fn, prog: str) -> int:
    """`python -m ldm.train` / `python -m ldm.finetune` as the `ldm` command runs: the library's refusals
    (SystemExit with a message) and any other error end in one line on stderr and a non-zero status,
    not a traceback (LDM_DEBUG=1 shows it); Ctrl-C is status 130."""
    debug = os.environ.get("LDM_DEBUG", "") not in ("", "0")
    try:
        main_fn()
        return 0
    except KeyboardInterrupt:
        if debug:
            raise
        status, message = 130, f"{prog}: interrupted"
    except Exception as e:  # noqa: BLE001 - the last line of defence of a command
        if debug:
            raise
        status, message = 1, f"{prog}: error: {type(e).__name__}: {_one_line(e, 300)} (LDM_DEBUG=1 shows the traceback)"
    # printed after the except block has dropped the traceback: the failed stage's progress bar is
    # closed (and drawn) by then, so the error is the last line
    print(message, file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(command(main, "ldm train"))
