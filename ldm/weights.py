"""From a checkpoint to the three networks, and from the networks back to a checkpoint.

    ck = ldm.checkpoint.read(ldm.weights.find_checkpoint())   # $LDM_CHECKPOINT or weights/
    text_encoder, unet, vae = ldm.weights.build(ck)          # strict loading, no renaming
    ldm.weights.write_single_file("my.safetensors", text_encoder, unet, vae)
    ldm.weights.random_checkpoint("weights/random-tiny.safetensors", size="tiny")
    ldm.weights.random_init_(module, seed)                     # fast seeded random weights

`build` picks each network's config (SD 1.x, or SD 1.5 inpainting's 9-channel UNet, unless
the file's metadata names another one: our random tiny checkpoints do), constructs the module
on the "meta" device (no time spent drawing random weights that are about to be replaced) and
loads the stage's state dict with `strict=True` through `ldm.checkpoint.load_stage`, which
names missing and unexpected keys if the file does not fit.

`write_single_file` is the inverse: it prefixes each state dict the way the original CompVis
single-file checkpoints do (`model.diffusion_model.`, `first_stage_model.`,
`cond_stage_model.transformer.`) and adds the schedule buffers those files carry at the top
level, so diffusers' own single-file converter reads what we write (tests/test_roundtrip.py).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ldm import checkpoint
from ldm.clip import CLIPTextConfig, CLIPTextModel
from ldm.schedule import Schedule
from ldm.unet import UNetConfig, UNetModel
from ldm.vae import AutoencoderKL, VAEConfig

__all__ = ["PREFIXES", "CONFIG_METADATA_KEY", "find_checkpoint", "is_random", "configs_for", "build", "single_file_state_dict",
           "write_single_file", "random_init_", "random_models", "random_checkpoint"]

# Stage -> the prefix its keys carry in an SD 1.x single-file checkpoint.
PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}
# Safetensors metadata entry holding {"text_encoder": {...}, "unet": {...}, "vae": {...}} when a
# file's networks are not the SD 1.x shapes (e.g. the tiny random checkpoints).
CONFIG_METADATA_KEY = "ldm.configs"
# Safetensors metadata entry marking a checkpoint of random weights (random_checkpoint writes it).
RANDOM_METADATA_KEY = "ldm.random_weights"
CONFIG_CLASSES = {"text_encoder": CLIPTextConfig, "unet": UNetConfig, "vae": VAEConfig}
SIZES = ("tiny", "full")


def is_random(path: str | Path) -> bool:
    """True for a .safetensors file written by `random_checkpoint` (its metadata says so)."""
    path = Path(path)
    return (path.suffix == ".safetensors" and path.is_file()
            and checkpoint.safetensors_metadata(path).get(RANDOM_METADATA_KEY) == "true")


def find_checkpoint(folder: str | Path = "weights", real_only: bool = False) -> Path | None:
    """Where a user's checkpoint is: $LDM_CHECKPOINT if set, else the first .safetensors / .ckpt
    file or diffusers folder (one with model_index.json) in `folder`, else None.
    real_only=True passes over our random-weight checkpoints (tests and notebooks that want
    real weights must not mistake `weights/random-tiny.safetensors` for them)."""
    if os.environ.get("LDM_CHECKPOINT"):
        return Path(os.environ["LDM_CHECKPOINT"])
    for p in sorted(Path(folder).glob("*")):
        if p.suffix in (".safetensors", ".ckpt") or (p / "model_index.json").is_file():
            if not (real_only and is_random(p)):
                return p
    return None


def _config_from_dict(cls, d: dict):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise checkpoint.CheckpointError(
            f"{CONFIG_METADATA_KEY} metadata names unknown {cls.__name__} fields {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def configs_for(ck) -> dict:
    """The config of each stage: from the file's metadata if it has ours, else SD 1.x."""
    stored = (getattr(ck, "metadata", None) or {}).get(CONFIG_METADATA_KEY)
    if stored:
        return {stage: _config_from_dict(CONFIG_CLASSES[stage], d)
                for stage, d in json.loads(stored).items()}
    unet = UNetConfig.inpainting() if ck.family == "sd1-inpaint" else UNetConfig()
    return {"text_encoder": CLIPTextConfig(), "unet": unet, "vae": VAEConfig()}


def build(ck, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(text_encoder, unet, vae) in eval mode with the checkpoint's weights, strictly loaded."""
    configs = configs_for(ck)
    classes = {"text_encoder": CLIPTextModel, "unet": UNetModel, "vae": AutoencoderKL}
    models = []
    for stage in ("text_encoder", "unet", "vae"):
        with torch.device("meta"):  # shapes only; the weights come from the file
            module = classes[stage](configs[stage])
        state = getattr(ck, stage)
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        checkpoint.load_stage(module, state, stage=stage, family=ck.family, assign=True)
        models.append(module.to(device).eval())
    return tuple(models)


def _schedule_buffers() -> dict[str, torch.Tensor]:
    """The DDPM schedule buffers CompVis checkpoints carry at top level (ldm.schedule's SD 1.x)."""
    sched = Schedule.sd1()
    alpha_bar = sched.alpha_bar
    return {"betas": sched.betas, "alphas_cumprod": alpha_bar,
            "alphas_cumprod_prev": torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])}


def single_file_state_dict(text_encoder: nn.Module, unet: nn.Module, vae: nn.Module) -> dict:
    """All three networks under their SD 1.x single-file prefixes, plus the schedule buffers."""
    sd = _schedule_buffers()
    for stage, module in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae)):
        sd.update({PREFIXES[stage] + k: v for k, v in module.state_dict().items()})
    return sd


def write_single_file(path, text_encoder: nn.Module, unet: nn.Module, vae: nn.Module,
                      dtype: torch.dtype | None = None, configs: dict | None = None,
                      random_weights: bool = False) -> Path:
    """Write a .safetensors or .ckpt in the SD 1.x single-file layout. Never overwrites a file.

    `configs`, when given, is stored in the safetensors metadata so `build` can rebuild
    networks whose shapes are not SD 1.x's, and `random_weights=True` marks the file as random
    (a .ckpt has nowhere to keep either).
    """
    path = Path(path)
    if path.suffix not in (".safetensors", ".ckpt"):
        raise ValueError(f"path={str(path)!r} must end in .safetensors or .ckpt")
    if path.exists():
        raise FileExistsError(f"{path} already exists; not overwritten (delete it or pick another path)")
    sd = single_file_state_dict(text_encoder, unet, vae)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
          for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")  # a crash never leaves a half-written checkpoint
    if path.suffix == ".safetensors":
        meta = {"format": "pt"}
        if random_weights:
            meta[RANDOM_METADATA_KEY] = "true"
        if configs is not None:
            meta[CONFIG_METADATA_KEY] = json.dumps(
                {stage: dataclasses.asdict(cfg) for stage, cfg in configs.items()})
        save_file(sd, str(tmp), metadata=meta)
    else:
        torch.save({"state_dict": sd}, tmp)
    tmp.replace(path)
    return path


def random_init_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter with seeded random values, norms included, in about a second.

    Weights get the spread of torch's default init (std 1/sqrt(3 fan_in)), biases 0.05 z,
    GroupNorm/LayerNorm scales 1 + 0.1 z (not the default 1, so a wrong eps or a swapped norm
    shows in a parity test). The values z are windows at random offsets into one pool of
    N(0, 1) samples: SD 1.x has 1.07 billion parameters, and drawing them all one by one
    takes 10-20 s on a laptop CPU; the pool takes well under one.
    """
    g = torch.Generator().manual_seed(seed)
    largest = max(p.numel() for p in model.parameters())
    # 2^25 values cover the UNet's largest tensor (29.5M); CLIP's token embedding (37.9M) is larger
    pool = torch.randn(max(largest + 1, min(2**25, 4 * largest)), generator=g)
    norm_params = {id(m.weight) for m in model.modules()
                   if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None}
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            start = int(torch.randint(0, pool.numel() - n + 1, (1,), generator=g))
            p.copy_(pool[start:start + n].view(p.shape))  # in place: no 3.4 GB of temporaries
            if id(p) in norm_params:
                p.mul_(0.1).add_(1.0)
            elif p.dim() == 1:
                p.mul_(0.05)
            else:
                p.mul_(1.0 / math.sqrt(3 * n / p.shape[0]))
    return model


def random_models(size: str = "tiny", seed: int = 0, inpainting: bool = False):
    """(text_encoder, unet, vae, configs) with random weights: `size` "tiny" or "full" (SD 1.x)."""
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not one of {SIZES}")
    if size == "tiny":
        unet_cfg = UNetConfig.tiny()
        configs = {"text_encoder": CLIPTextConfig.tiny(), "vae": VAEConfig.tiny(),
                   "unet": dataclasses.replace(unet_cfg, in_channels=9) if inpainting else unet_cfg}
    else:
        configs = {"text_encoder": CLIPTextConfig(), "vae": VAEConfig(),
                   "unet": UNetConfig.inpainting() if inpainting else UNetConfig()}
    models = []
    for i, (cls, stage) in enumerate(((CLIPTextModel, "text_encoder"), (UNetModel, "unet"),
                                      (AutoencoderKL, "vae"))):
        with torch.device("meta"):  # shapes only: random_init_ fills every parameter
            module = cls(configs[stage])
        models.append(random_init_(module.to_empty(device="cpu"), seed + i).eval())
    return (*models, configs)


def random_checkpoint(path, size: str = "tiny", dtype: torch.dtype = torch.float32, seed: int = 0,
                      inpainting: bool = False) -> Path:
    """Write a random-weight checkpoint in the real SD 1.x single-file layout.

    Every stage runs end to end on it (its images are noise); it is what the tests and the
    README's first command use when no real weights are at hand.
    """
    if Path(path).exists():  # check before spending seconds on random weights
        raise FileExistsError(f"{path} already exists; not overwritten (delete it or pick another path)")
    text_encoder, unet, vae, configs = random_models(size, seed, inpainting)
    return write_single_file(path, text_encoder, unet, vae, dtype=dtype,
                             configs=configs if size == "tiny" else None, random_weights=True)
