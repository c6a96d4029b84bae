"""Teach the shipped model a colour its world never shows, with a LoRA: "an orange circle".

    python -m ldm.finetune --out runs/orange.safetensors              # 3-5 minutes on one CPU thread
    python -m ldm.finetune --out runs/o.safetensors --steps 300 --rank 8 --color orange=255,128,0
    ldm generate "an orange circle" --lora runs/orange.safetensors    # what it learnt

The shapes world (ldm.shapes) paints six colours; the shipped model (ldm/data/ldm-shapes.safetensors,
trained by ldm.train) has never seen orange, and "orange" is a token its text encoder was never
trained on. A LoRA (Hu et al. 2021) leaves every base weight frozen and learns, for some Linear and
Conv2d modules W, two thin matrices down (r, in) and up (out, r):

    y = W x + (alpha / r) * up(down(x))            up starts at 0: step 0 is the base model exactly

Here they sit on the UNet's attention blocks (proj_in, q/k/v/out of self- and cross-attention, the
feed-forward, proj_out), on its ResBlock convolutions (LoCon-style; --no-convs leaves them out: the
colour then comes out red-orange more often) and on the text encoder's q/k/v/out and MLP Linears,
so that the new word gets a meaning and the image a new colour.

The recipe, top to bottom:

1. Data: a few dozen (default 48) scenes of the world, single shapes, a third of them each shape,
   with the colour replaced by the new one (shapes.render draws it through extra_colors). Their
   captions come from the world's grammar at every step ("an orange circle in the top left", "a
   large orange shape on a black background"), like ldm.train's.
2. Latents: the frozen VAE never saw orange either. How it encodes it depends on the VAE: the
   first shipped one turned an orange (255, 128, 0) shape red, about (220, 60, 35) decoded; the
   retrained one gives it back as (242, 121, 27). The decoder can paint orange either way, from
   latents the encoder may never output, so the targets are refined by gradient descent on the
   decoder's reconstruction loss, starting from the encoder's mean (latent inversion; `invert`),
   moving only the latent cells under the shape: the background keeps the encoder's own latents.
   The log says what the encoder's mean and the inverted latents decode to.
3. Prior preservation (as DreamBooth's): by default half of every batch is ordinary world scenes
   from the recipe's own scene pool (ldm.recipe.encode_pool), so the LoRA learns orange without
   unlearning red or yellow.
4. Loss: ldm.train's stage-2 objective (ldm.recipe.eps_loss), the simplified epsilon loss of Ho et
   al. 2020, x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, loss = |eps - eps_theta(x_t, t, c)|^2,
   t uniform over SD's 1000 steps, ~10% of captions emptied (classifier-free guidance keeps working).
   The LoRA runs during training through `ldm.lora.apply(..., merge=False)`, the very code that
   applies a file; only the LoRA's down/up matrices are given to the optimiser.
5. The file: kohya's layout (lora_unet_<module path, . -> _>.lora_down.weight / .lora_up.weight /
   .alpha, lora_te_... for the text encoder), names checked against `ldm.lora.module_table`, so
   `ldm.lora.read` + `ldm.lora.apply` (and `ldm generate --lora`) load it back unchanged. An
   existing file is never overwritten, a failed write leaves nothing behind, and two fine-tunes to
   one --out cannot both run (the second refuses before any work).

benchmarks/bench_finetune.py measures the result with the judge (ldm.judge, told about the new
colour): how often "an orange circle" comes out orange and round, with and without the LoRA, and
whether the old colours still come out right with it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from torch import nn
from tqdm import tqdm

from ldm import lora, shapes
from ldm.checkpoint.write import write_new
from ldm.commandline import ArgumentParser, command, short
from ldm.recipe import Denoiser, encode_pool, eps_loss, generator, lr_at, optimizer_step
from ldm.runfiles import SEED, THREADS, OutputError, check_device_name, ints, output_lock, reals

__all__ = ["FinetuneConfig", "UNET_TARGETS", "UNET_CONV_TARGETS", "TEXT_TARGETS", "new_scenes", "article",
           "shape_cells", "invert", "init_lora", "lora_state_dict", "held_loss", "finetune", "main"]

log = logging.getLogger(__name__)

# Which modules get a LoRA: regular expressions on our (CompVis) module names.
UNET_TARGETS = r"(proj_in|proj_out|attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2))$"
UNET_CONV_TARGETS = r"(in_layers\.2|out_layers\.3|skip_connection)$"  # ResBlock convs (LoCon); --convs
TEXT_TARGETS = r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$"
STAGE_OF_PREFIX = {stage: prefix for prefix, stage in lora.KOHYA_PREFIXES.items()}  # unet -> "lora_unet_"

# The allowed values of the numeric options (prior and caption_dropout are checked on their own). Wide
# enough for any fine-tune of the shapes world, narrow enough that a typo (--batch 100000000, --lr inf,
# --alpha nan) is refused before any work instead of exhausting memory or writing a LoRA of NaNs.
RANGES = {
    "images": ints(1, 1024), "steps": ints(1, 10**6), "batch": ints(1, 1024), "rank": ints(1, 256),
    "alpha": reals(0, 1e4), "lr": reals(0, 1, open_lo=True), "warmup": ints(0, 10**6),
    "min_lr_frac": reals(0, 1), "grad_clip": reals(0, 1e6, open_lo=True), "invert_steps": ints(0, 10**5),
    "invert_lr": reals(0, 10, open_lo=True), "pool_size": ints(1, 65536), "seed": SEED,
    "threads": THREADS, "log_every": ints(1, 10**6),
}
MAX_COLOR_CHARS = 32


@dataclass
class FinetuneConfig:
    """Every knob of the fine-tune. The lr schedule and clipping are ldm.recipe's (warmup, min_lr_frac,
    grad_clip are the fields its lr_at and optimizer_step read), and so is its scene pool (pool_size)."""

    out: str = ""                  # the .safetensors to write (required; never overwritten)
    checkpoint: str = ""           # the base model: "" = ldm's shipped model (ldm.weights.SHIPPED)
    color: str = "orange"          # the new colour's name, a word the world's grammar does not know
    rgb: tuple = (255, 128, 0)     # and its value (0-255)
    images: int = 48               # scenes of the new colour, a third each shape
    steps: int = 600
    batch: int = 16
    prior: float = 0.5             # fraction of each batch drawn from the ordinary world (prior preservation)
    rank: int = 8
    alpha: float = 0.0             # 0: alpha = rank (scale 1)
    lr: float = 3e-3
    warmup: int = 40
    min_lr_frac: float = 0.1
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    text_encoder: bool = True      # LoRA on the text encoder too (the new word needs a meaning)
    convs: bool = True             # LoRA on the UNet's ResBlock convolutions too (LoCon)
    invert_steps: int = 30         # Adam steps of latent inversion (0: the encoder's mean as it is)
    invert_lr: float = 0.3
    pool_size: int = 512           # ordinary world scenes encoded for prior preservation
    seed: int = 0
    threads: int = 1               # torch CPU threads (0: torch's default)
    device: str = "cpu"
    log_every: int = 25

    def __post_init__(self):
        if not (isinstance(self.out, str) and self.out.endswith(".safetensors") and "\0" not in self.out):
            raise ValueError(f"--out {short(self.out)}: expected a path ending in .safetensors")
        for name, allowed in RANGES.items():
            allowed.check(f"--{name.replace('_', '-')} ", getattr(self, name))
        check_device_name("--device ", self.device, auto=False, available=False)
        if not 0.0 <= self.prior < 1.0:
            raise ValueError(f"--prior {self.prior!r} must be in [0, 1): some of each batch must be the new colour")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"--caption-dropout {self.caption_dropout!r} must be in [0, 1]")
        taken = {*shapes.COLORS, *shapes.BACKGROUNDS, *shapes.SHAPES, *shapes.SIZES, "shape"}
        if not re.fullmatch(rf"[a-z]{{1,{MAX_COLOR_CHARS}}}", self.color) or self.color in taken:
            raise ValueError(f"--color {short(self.color)}: expected a new lowercase word of at most "
                             f"{MAX_COLOR_CHARS} letters, not one of the world's {sorted(taken)}")
        if len(self.rgb) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in self.rgb):
            raise ValueError(f"--color {self.color}={self.rgb!r}: expected three integers in 0-255")

    @property
    def extra_colors(self) -> dict[str, tuple[int, int, int]]:
        """{name: rgb}, as shapes.render and the judge take it."""
        return {self.color: tuple(self.rgb)}

    @property
    def scale(self) -> float:
        return (self.alpha or self.rank) / self.rank


# --- 1. the new images ------------------------------------------------------------------------------

def recolor(scene: shapes.Scene, color: str) -> shapes.Scene:
    """The same scene with every shape painted `color`."""
    return dataclasses.replace(scene, shapes=tuple(dataclasses.replace(s, color=color) for s in scene.shapes))


def new_scenes(cfg: FinetuneConfig) -> list[shapes.Scene]:
    """cfg.images single-shape world scenes (sizes, places, backgrounds drawn as the world draws them),
    the i-th one a SHAPES[i % 3], all painted the new colour."""
    rng = np.random.default_rng(cfg.seed)
    out = []
    while len(out) < cfg.images:
        scene = shapes.random_scene(rng, num_shapes=1)
        if scene.shapes[0].shape == shapes.SHAPES[len(out) % len(shapes.SHAPES)]:
            out.append(recolor(scene, cfg.color))
    return out


def article(text: str) -> str:
    """'a orange circle' -> 'an orange circle' (the world's grammar writes 'a': no word of its starts with a vowel)."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


# --- 2. latents the decoder turns into them ------------------------------------------------------------

def shape_rgb(images: torch.Tensor, scenes: list[shapes.Scene]) -> list[list[float]]:
    """The mean RGB (0-255) inside each scene's shapes: what colour an image really paints."""
    out = []
    for x, scene in zip(images, scenes):
        inside = torch.from_numpy(np.any([shapes.coverage(s) > 0.99 for s in scene.shapes], axis=0))
        out.append(((x.detach().float().clamp(-1, 1) + 1) * 127.5)[:, inside].mean(1).tolist())
    return out


def shape_cells(scenes: list[shapes.Scene], factor: int) -> torch.Tensor:
    """(B, 1, 64 / factor, 64 / factor) float: 1 on the latent cells (factor x factor pixel blocks) that
    any shape of the scene touches, 0 on pure background."""
    cover = torch.from_numpy(np.stack([np.max([shapes.coverage(s) for s in sc.shapes], 0) for sc in scenes]))
    return (F.max_pool2d(cover[:, None], factor) > 0).float()


def invert(vae, x: torch.Tensor, steps: int, lr: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, 64, 64) images -> (B, 4, 8, 8) latents z, unscaled, whose decode(z) is close to them.

    Starts from the encoder's posterior mean z0 and takes `steps` Adam steps on ldm.train's
    reconstruction loss (L1 + MSE on pixels) over z = z0 + mask * delta; the VAE stays frozen. With
    mask = shape_cells(...) only the cells under the shapes move: left free, every cell drifts (on the
    first shipped VAE by about 20 posterior stds, background too) to latents the decoder renders the
    same but the UNet never saw, and a LoRA trained on them painted noisy backgrounds."""
    with torch.no_grad():
        z0 = vae.encode(x).mean
    mask = torch.ones_like(z0[:, :1]) if mask is None else mask.to(z0)
    delta = torch.zeros_like(z0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    for _ in range(steps):
        x_rec = vae.decode(z0 + mask * delta)
        loss = (x_rec - x).abs().mean() + (x_rec - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (z0 + mask * delta).detach()


# --- 3. the LoRA, and its file ----------------------------------------------------------------------------

def init_lora(text_encoder: nn.Module, unet: nn.Module, cfg: FinetuneConfig, g: torch.Generator) -> lora.LoRA:
    """A kohya LoRA for the target modules: down Kaiming-uniform (peft's init), up zero.

    Names are kohya's (our module path with '.' -> '_'), each checked to resolve to its module through
    lora.module_table, as lora.read's file will be. down/up are nn.Parameters on the model's device and
    dtype, so lora.apply(merge=False) hooks them in as they are (Tensor.to to the same device and dtype
    returns the tensor itself) and gradients reach them."""
    w = next(unet.parameters())
    unet_pattern = UNET_TARGETS if not cfg.convs else f"({UNET_TARGETS}|{UNET_CONV_TARGETS})"
    targets = [("unet", unet, unet_pattern)]
    if cfg.text_encoder:
        targets.append(("text_encoder", text_encoder, TEXT_TARGETS))
    lo = lora.LoRA(path=cfg.out, format="kohya")
    for stage, model, pattern in targets:
        table = lora.module_table(stage, model)
        for name, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)) or not re.search(pattern, name):
                continue
            key = name.replace(".", "_")
            assert table[key] == name, (key, table.get(key), name)
            out_ch, in_ch, *kernel = module.weight.shape  # (out, in) or (out, in, kh, kw)
            down = torch.empty(cfg.rank, in_ch, *kernel, device=w.device, dtype=w.dtype)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=g)
            up = torch.zeros(out_ch, cfg.rank, *[1] * len(kernel), device=w.device, dtype=w.dtype)
            layer = lora.LoRALayer(nn.Parameter(down), nn.Parameter(up), float(cfg.alpha or cfg.rank))
            lo.layers.setdefault(stage, {})[key] = layer
    return lo


def parameters(lo: lora.LoRA) -> list[nn.Parameter]:
    return [t for layers in lo.layers.values() for layer in layers.values() for t in (layer.down, layer.up)]


def lora_state_dict(lo: lora.LoRA) -> dict[str, torch.Tensor]:
    """kohya keys: lora_unet_<name>.lora_down.weight / .lora_up.weight / .alpha (0-d), float32."""
    sd = {}
    for stage, layers in lo.layers.items():
        for name, layer in layers.items():
            key = STAGE_OF_PREFIX[stage] + name
            sd[key + ".lora_down.weight"] = layer.down.detach().float().cpu().contiguous()
            sd[key + ".lora_up.weight"] = layer.up.detach().float().cpu().contiguous()
            sd[key + ".alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    return sd


def write(path: Path, lo: lora.LoRA, cfg: FinetuneConfig, result: dict) -> None:
    """The kohya file, through ldm.checkpoint.write.write_new: written to a temporary file beside it,
    then linked into place, so a file that appeared meanwhile is not overwritten and a failed write
    (a full disk) leaves nothing at `path` that a later run would refuse as "already exists"."""
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(cfg.rank),
                "ss_network_alpha": str(cfg.alpha or cfg.rank),
                "ldm.finetune": json.dumps({"config": dataclasses.asdict(cfg), **result})}
    data = safetensors_bytes(lora_state_dict(lo), metadata=metadata)
    try:
        write_new(path, lambda tmp: tmp.write_bytes(data))
    except FileExistsError:
        raise
    except OSError as e:
        raise OutputError(f"--out {path}: writing the LoRA failed ({e.strerror or short(str(e))}); "
                          f"nothing was left there; allowed: a folder with room for "
                          f"{len(data) / 2**20:.1f} MiB") from None


# --- 4. the loss and the loop -------------------------------------------------------------------------------

@torch.no_grad()
def held_loss(denoiser, tokenizer, x0: torch.Tensor, texts: list[str], schedule, seed: int) -> float:
    """eps_loss at fixed timesteps and noise (the same every call): before/after comparisons."""
    return float(eps_loss(denoiser, tokenizer(texts), x0, schedule, torch.Generator().manual_seed(seed)))


def check_output(cfg: FinetuneConfig) -> None:
    """Refuse before any work an --out that exists (never overwritten) or a --checkpoint that does not."""
    if Path(cfg.out).exists():
        raise FileExistsError(f"{cfg.out} already exists; not overwritten (delete it or pick another --out)")
    if cfg.checkpoint and not Path(cfg.checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint {cfg.checkpoint}: no such file or folder")


def lock_path(out: str | Path) -> Path:
    """The lock file a fine-tune holds beside its --out while it runs (ldm.runfiles.output_lock)."""
    out = Path(out)
    return out.with_name(f".{out.name}.lock")


def finetune(cfg: FinetuneConfig, pipe=None) -> dict:
    """Train the LoRA and write cfg.out; returns what it measured (losses, colours, minutes).

    pipe: an ldm Pipeline in float32 to adapt (default: cfg.checkpoint loaded on cfg.device); its
    networks come back unchanged (the LoRA's hooks are removed at the end).

    Before any work it takes --out's lock (creating its folder: one that cannot be written is refused
    now, not after training), so a second fine-tune to the same --out refuses (OutputError)."""
    check_output(cfg)
    with output_lock(lock_path(cfg.out), f"--out {cfg.out}"):
        check_output(cfg)  # again under the lock: another fine-tune may have just written it
        return _finetune(cfg, pipe)


def _finetune(cfg: FinetuneConfig, pipe=None) -> dict:
    """finetune's work, under --out's lock."""
    from ldm.pipeline import load
    from ldm.weights import SHIPPED

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0, cpu0 = time.time(), time.process_time()
    if pipe is None:
        pipe = load(cfg.checkpoint or SHIPPED, device=cfg.device, dtype=torch.float32)
    te, unet, vae, tokenizer = pipe.text_encoder, pipe.unet, pipe.vae, pipe.tokenizer
    for m in (te, unet, vae):
        m.requires_grad_(False).eval()  # the base stays frozen (eval: no dropout anywhere)
    scale, device = vae.cfg.scaling_factor, pipe.device
    result: dict = {"base": pipe.name or str(cfg.checkpoint or SHIPPED.name)}

    # 1-2. the new scenes and their latents
    scenes = new_scenes(cfg)
    x = shapes.to_tensor(np.stack([shapes.render(s, cfg.extra_colors) for s in scenes])).to(device)
    with torch.no_grad():
        encoded_rgb = np.mean(shape_rgb(vae.decode(vae.encode(x).mean), scenes), 0)
    cells = shape_cells(scenes, vae.cfg.downsample_factor)
    z_new = invert(vae, x, cfg.invert_steps, cfg.invert_lr, cells)  # (N, 4, 8, 8), unscaled
    with torch.no_grad():
        inverted_rgb = np.mean(shape_rgb(vae.decode(z_new), scenes), 0)
    result["decoded_rgb"] = {"encoder_mean": [round(v) for v in encoded_rgb],
                             "inverted": [round(v) for v in inverted_rgb], "target": list(cfg.rgb)}
    log.info("%d %s scenes: decoded from the encoder's mean the shapes are RGB %s, after %d inversion steps %s "
             "(target %s)", len(scenes), cfg.color, result["decoded_rgb"]["encoder_mean"], cfg.invert_steps,
             result["decoded_rgb"]["inverted"], tuple(cfg.rgb))
    # 3. the world's own scenes, for prior preservation (the recipe's pool, cfg.pool_size of them)
    means, stds, pool = encode_pool(vae, cfg, device)

    # the LoRA, hooked into the frozen networks
    lo = init_lora(te, unet, cfg, torch.Generator().manual_seed(cfg.seed))
    params = parameters(lo)
    log.info("LoRA rank %d, alpha %g: %d UNet + %d text-encoder modules, %d parameters", cfg.rank,
             cfg.alpha or cfg.rank, len(lo.layers.get("unet", {})), len(lo.layers.get("text_encoder", {})),
             sum(p.numel() for p in params))
    handle = lora.apply({"text_encoder": te, "unet": unet}, [(lo, 1.0)], merge=False)
    denoiser = Denoiser(te, unet)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)

    # fixed evaluation batches: the new scenes, and as many world scenes, one caption each
    rng = np.random.default_rng(cfg.seed + 1)
    new_texts = [article(shapes.caption(s, rng)) for s in scenes]
    k = min(len(pool), len(scenes))
    world_x0, world_texts = (means[:k] * scale).to(device), [shapes.caption(s, rng) for s in pool[:k]]
    before = {"new": held_loss(denoiser, tokenizer, z_new * scale, new_texts, pipe.schedule, cfg.seed),
              "world": held_loss(denoiser, tokenizer, world_x0, world_texts, pipe.schedule, cfg.seed)}

    n_world = round(cfg.batch * cfg.prior)
    n_new = cfg.batch - n_world
    history = []
    t_train = time.time()
    try:
        for step in tqdm(range(cfg.steps), desc="lora", mininterval=5):
            g = generator(cfg, 3, step)  # stage 3: a stream of its own, seeded by (seed, step)
            i_new = torch.randint(0, len(scenes), (n_new,), generator=g)
            i_old = torch.randint(0, len(pool), (n_world,), generator=g)
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=g)))
            texts = [article(shapes.caption(scenes[i], rng)) for i in i_new.tolist()]
            texts += [shapes.caption(pool[i], rng) for i in i_old.tolist()]
            drop = (torch.rand(len(texts), generator=g) < cfg.caption_dropout).tolist()
            texts = ["" if d else c for c, d in zip(texts, drop)]
            z_old = means[i_old] + stds[i_old] * torch.randn(means[i_old].shape, generator=g)  # a posterior draw
            x0 = torch.cat([z_new[i_new.to(device)], z_old.to(device)]) * scale  # (batch, 4, 8, 8)
            loss = eps_loss(denoiser, tokenizer(texts), x0, pipe.schedule, g)
            loss.backward()
            optimizer_step(opt, params, cfg, lr_at(step, cfg.lr, cfg, cfg.steps))
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                log.info("lora step %d loss %.5f", step + 1, loss.item())
                history.append([step + 1, round(loss.item(), 6)])
        after = {"new": held_loss(denoiser, tokenizer, z_new * scale, new_texts, pipe.schedule, cfg.seed),
                 "world": held_loss(denoiser, tokenizer, world_x0, world_texts, pipe.schedule, cfg.seed)}
    finally:
        handle.unmerge()  # the hooks come off: the networks are the base model again
    result.update({"loss_before": before, "loss_after": after, "history": history,
                   "train_minutes": (time.time() - t_train) / 60, "minutes": (time.time() - t0) / 60,
                   "cpu_minutes": (time.process_time() - cpu0) / 60,
                   "modules": lo.num_modules, "params": lo.num_params})
    write(Path(cfg.out), lo, cfg, result)
    log.info("wrote %s (%d modules, %d parameters) in %.1f min (%.1f min of CPU time); eps loss on the %s "
             "scenes %.4f -> %.4f, on world scenes %.4f -> %.4f", cfg.out, lo.num_modules, lo.num_params,
             result["minutes"], result["cpu_minutes"], cfg.color, before["new"], after["new"], before["world"],
             after["world"])
    result["out"] = cfg.out
    return result


# --- 5. the command ----------------------------------------------------------------------------------------------

def _color(text: str) -> tuple[str, tuple[int, ...]]:
    """'orange=255,128,0' -> ('orange', (255, 128, 0))."""
    name, sep, rgb = text.partition("=")
    try:
        values = tuple(int(v) for v in rgb.split(","))
    except ValueError:
        values = ()
    if not sep or len(values) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=R,G,B, e.g. orange=255,128,0")
    return name, values


def parse_args(argv: list[str] | None) -> FinetuneConfig:
    d = FinetuneConfig.__dataclass_fields__
    parser = ArgumentParser(prog="python -m ldm.finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the LoRA .safetensors to write (never overwritten)")
    parser.add_argument("--checkpoint", default="", help="base model (default: ldm's shipped model)")
    parser.add_argument("--color", type=_color, default=None, metavar="NAME=R,G,B",
                        help="the new colour (default orange=255,128,0)")
    for name in ("images", "steps", "batch", "rank", "warmup", "invert_steps", "pool_size", "seed", "threads",
                 "log_every"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=d[name].default,
                            help=f"(default {d[name].default})")
    for name in ("prior", "alpha", "lr", "min_lr_frac", "grad_clip", "caption_dropout", "invert_lr"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=d[name].default,
                            help=f"(default {d[name].default})")
    parser.add_argument("--text-encoder", action=argparse.BooleanOptionalAction, default=True,
                        help="LoRA on the text encoder too (default: yes)")
    parser.add_argument("--convs", action=argparse.BooleanOptionalAction, default=True,
                        help="LoRA on the UNet's ResBlock convolutions too (default: yes)")
    parser.add_argument("--device", default="cpu")
    args = vars(parser.parse_args(argv))
    color = args.pop("color")
    if color is not None:
        args["color"], args["rgb"] = color
    return FinetuneConfig(**args)


def main(argv: list[str] | None = None, pipe=None) -> dict:
    """`python -m ldm.finetune ARGS`: a bad option, an existing or busy output, or a failed write is a
    one-line SystemExit. pipe: a Pipeline to adapt instead of loading --checkpoint (see finetune)."""
    try:
        cfg = parse_args(argv)
        check_device_name("--device ", cfg.device, auto=False)  # CUDA asked for on a machine without it
        check_output(cfg)  # before any work: loading the model takes seconds
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        raise SystemExit(f"ldm finetune: {e}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # no-op if logging is set up
    try:
        return finetune(cfg, pipe)
    except (OutputError, FileExistsError) as e:
        raise SystemExit(f"ldm finetune: {e}") from None


if __name__ == "__main__":
    sys.exit(command(main, "ldm finetune"))
