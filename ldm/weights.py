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
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ldm import checkpoint
from ldm.clip import CLIPTextConfig, CLIPTextModel
from ldm.schedule import Schedule
from ldm.unet import UNetConfig, UNetModel
from ldm.vae import AutoencoderKL, VAEConfig

__all__ = ["PREFIXES", "CONFIG_METADATA_KEY", "SHIPPED", "find_checkpoint", "default_checkpoint", "is_random", "configs_for", "build", "single_file_state_dict",
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
# The model ldm trains itself (ldm.train) and ships: used when no real checkpoint is given or found.
SHIPPED = Path(__file__).resolve().parent / "data" / "ldm-shapes.safetensors"


def is_random(path: str | Path) -> bool:
    """True for a .safetensors file written by `random_checkpoint` (its metadata says so).
    A file whose header cannot be read is not known to be random: False (reading it fails later
    with the checkpoint reader's error)."""
    path = Path(path)
    if not (path.suffix == ".safetensors" and path.is_file()):
        return False
    try:
        return checkpoint.safetensors_metadata(path).get(RANDOM_METADATA_KEY) == "true"
    except (checkpoint.CheckpointError, OSError):
        return False


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


def default_checkpoint(folder: str | Path = "weights") -> tuple[Path, str]:
    """The checkpoint to use when none is given, and why: a real one ($LDM_CHECKPOINT, else the
    first in `folder`, random-weight files passed over) keeps priority; else ldm's shipped model."""
    found = find_checkpoint(folder, real_only=True)
    if found is not None:
        where = "$LDM_CHECKPOINT" if os.environ.get("LDM_CHECKPOINT") else f"{folder}/"
        return found, f"{found} (from {where})"
    return SHIPPED, (f"ldm's shipped shapes model {SHIPPED.name} (no real checkpoint in $LDM_CHECKPOINT "
                     f"or {folder}/; it paints flat shapes in six colours, trained by `ldm train`)")


# Bounds on the configs a file's metadata may name (SD 1.x's largest number is the 49,408-row
# vocabulary); block counts are checked against the tensors before anything is built.
MAX_CONFIG_INT, MAX_CONFIG_LEN = 2**20, 16


def _config_from_dict(cls, d, where: str):
    """One stage's config from the metadata JSON: known fields, ints in 1..MAX_CONFIG_INT, floats
    finite and > 0, tuples of at most MAX_CONFIG_LEN such ints; then the config's own checks."""
    bad = lambda msg: checkpoint.CheckpointError(f"{where}: {msg}")
    if not isinstance(d, dict):
        raise bad(f"a {type(d).__name__}, not a JSON object of {cls.__name__} fields")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise bad(f"unknown {cls.__name__} fields {sorted(unknown)[:10]}; allowed: {sorted(fields)}")
    values = {}
    for k, v in d.items():
        default = fields[k].default
        ok_int = lambda x: type(x) is int and 1 <= x <= MAX_CONFIG_INT
        if isinstance(default, tuple):
            ok, allowed = isinstance(v, list) and len(v) <= MAX_CONFIG_LEN and all(map(ok_int, v)), \
                f"a list of at most {MAX_CONFIG_LEN} integers from 1 to {MAX_CONFIG_INT}"
            v = tuple(v) if ok else v
        elif isinstance(default, float):
            ok, allowed = type(v) in (int, float) and 0 < v < math.inf, "a finite number > 0"
            v = float(v) if ok else v
        else:
            ok, allowed = ok_int(v), f"an integer from 1 to {MAX_CONFIG_INT}"
        if not ok:
            raise bad(f"{cls.__name__}.{k}={str(v)[:60]}; allowed: {allowed}")
        values[k] = v
    try:
        return cls(**values)
    except (ValueError, TypeError, ArithmeticError) as e:
        raise bad(f"{type(e).__name__}: {e}") from None


def _count(sd: dict, prefix: str) -> int:
    """How many numbered children `prefix<i>.` the keys name (input_blocks.0., input_blocks.1., ...)."""
    return len({k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)})


def _shape(sd: dict, key: str, dim: int):
    t = sd.get(key)
    return t.shape[dim] if t is not None and t.ndim > dim else None


def _check_against_tensors(where: str, configs: dict, ck) -> None:
    """The block counts and first widths a config names must be the tensors' (a config that
    asks for 10**6 layers would otherwise take hours to build before load_stage says no)."""
    te, unet, vae = configs["text_encoder"], configs["unet"], configs["vae"]
    L, n = len(unet.channel_mult), unet.num_res_blocks
    depths = {int(m.group(1)) for k in ck.unet for m in [re.search(r"\.transformer_blocks\.(\d+)\.", k)] if m}
    checks = [
        ("text_encoder", "num_hidden_layers", te.num_hidden_layers, _count(ck.text_encoder, "text_model.encoder.layers.")),
        ("text_encoder", "hidden_size", te.hidden_size, _shape(ck.text_encoder, "text_model.embeddings.token_embedding.weight", 1)),
        ("text_encoder", "vocab_size", te.vocab_size, _shape(ck.text_encoder, "text_model.embeddings.token_embedding.weight", 0)),
        ("text_encoder", "max_position_embeddings", te.max_position_embeddings,
         _shape(ck.text_encoder, "text_model.embeddings.position_embedding.weight", 0)),
        ("unet", "channel_mult and num_res_blocks (input blocks)", 1 + L * n + L - 1, _count(ck.unet, "input_blocks.")),
        ("unet", "channel_mult and num_res_blocks (output blocks)", L * (n + 1), _count(ck.unet, "output_blocks.")),
        ("unet", "model_channels", unet.model_channels, _shape(ck.unet, "input_blocks.0.0.weight", 0)),
        ("unet", "in_channels", unet.in_channels, _shape(ck.unet, "input_blocks.0.0.weight", 1)),
        ("vae", "ch_mult (levels)", len(vae.ch_mult), _count(ck.vae, "encoder.down.")),
        ("vae", "num_res_blocks", vae.num_res_blocks, _count(ck.vae, "encoder.down.0.block.")),
        ("vae", "ch", vae.ch, _shape(ck.vae, "encoder.conv_in.weight", 0)),
    ]
    if depths and unet.attention_resolutions:
        checks.append(("unet", "transformer_depth", unet.transformer_depth, max(depths) + 1))
    for stage, name, said, found in checks:
        if said != found:
            raise checkpoint.CheckpointError(f"{where}: {stage} {name} gives {said}, but the file's tensors "
                                             f"have {found}")


def configs_for(ck) -> dict:
    """The config of each stage: from the file's metadata if it has ours (validated, bounded and
    checked against the tensors), else SD 1.x."""
    stored = (getattr(ck, "metadata", None) or {}).get(CONFIG_METADATA_KEY)
    if not stored:
        unet = UNetConfig.inpainting() if ck.family == "sd1-inpaint" else UNetConfig()
        return {"text_encoder": CLIPTextConfig(), "unet": unet, "vae": VAEConfig()}
    where = f"{getattr(ck, 'path', None) or 'checkpoint'}: {CONFIG_METADATA_KEY} metadata"
    try:
        parsed = json.loads(stored)
    except (ValueError, RecursionError) as e:
        raise checkpoint.CheckpointError(f"{where} is not valid JSON ({type(e).__name__}: "
                                         f"{' '.join(str(e).split())[:120]})") from None
    if not (isinstance(parsed, dict) and set(parsed) == set(CONFIG_CLASSES)):
        shown = sorted(map(str, parsed))[:10] if isinstance(parsed, dict) else type(parsed).__name__
        raise checkpoint.CheckpointError(f"{where} holds {shown}; allowed: an object with exactly the stages "
                                         f"{sorted(CONFIG_CLASSES)}")
    configs = {stage: _config_from_dict(CONFIG_CLASSES[stage], d, f"{where}, {stage}") for stage, d in parsed.items()}
    _check_against_tensors(where, configs, ck)
    return configs


def build(ck, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(text_encoder, unet, vae) in eval mode with the checkpoint's weights, strictly loaded."""
    configs = configs_for(ck)
    classes = {"text_encoder": CLIPTextModel, "unet": UNetModel, "vae": AutoencoderKL}
    models = []
    where = getattr(ck, "path", None) or "checkpoint"
    for stage in ("text_encoder", "unet", "vae"):
        try:
            with torch.device("meta"):  # shapes only; the weights come from the file
                module = classes[stage](configs[stage])
        except (RuntimeError, ValueError, ArithmeticError) as e:   # e.g. widths whose weights overflow
            raise checkpoint.CheckpointError(f"{where}: the {stage} config {configs[stage]} does not build "
                                             f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
        state = getattr(ck, stage)
        checkpoint.load_stage(module, state, stage=stage, family=ck.family, assign=True, path=getattr(ck, "path", None))
        if dtype is not None:       # after the shapes are checked; cast only tensors that fit the module
            try:
                module = module.to(dtype)
            except (RuntimeError, MemoryError) as e:
                raise checkpoint.CheckpointError(f"{where}: cannot cast the {stage} to {dtype} "
                                                 f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
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
                      random_weights: bool = False, metadata: dict[str, str] | None = None) -> Path:
    """Write a .safetensors or .ckpt in the SD 1.x single-file layout. Never overwrites a file.

    `configs`, when given, is stored in the safetensors metadata so `build` can rebuild
    networks whose shapes are not SD 1.x's, and `random_weights=True` marks the file as random
    (a .ckpt has nowhere to keep either). `metadata` adds free-form string entries to the
    safetensors metadata (a trainer's facts: steps, data, losses); they may not reuse the keys
    ldm writes itself ("format", ldm.configs, ldm.random_weights).
    """
    path = Path(path)
    if path.suffix not in (".safetensors", ".ckpt"):
        raise ValueError(f"path={str(path)!r} must end in .safetensors or .ckpt")
    if metadata is not None:
        reserved = {"format", CONFIG_METADATA_KEY, RANDOM_METADATA_KEY}
        if not (isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
            raise ValueError(f"metadata={str(metadata)[:80]}; allowed: a dict of str to str")
        if reserved & metadata.keys():
            raise ValueError(f"metadata keys {sorted(reserved & metadata.keys())} are written by ldm itself; "
                             f"allowed: any other key")
        if path.suffix != ".safetensors":
            raise ValueError(f"metadata= needs a .safetensors path (a .ckpt has no metadata); got {str(path)!r}")
    if path.exists():
        raise FileExistsError(f"{path} already exists; not overwritten (delete it or pick another path)")
    sd = single_file_state_dict(text_encoder, unet, vae)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
          for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")  # a crash never leaves a half-written checkpoint
    if path.suffix == ".safetensors":
        meta = {"format": "pt", **(metadata or {})}
        if random_weights:
            meta[RANDOM_METADATA_KEY] = "true"
        if configs is not None:
            meta[CONFIG_METADATA_KEY] = json.dumps(
                {stage: dataclasses.asdict(cfg) for stage, cfg in configs.items()})
    try:
        if path.suffix == ".safetensors":
            save_file(sd, str(tmp), metadata=meta)
        else:
            torch.save({"state_dict": sd}, tmp)
    except BaseException:  # interrupted or failed (disk full): leave no half-written .partial behind
        tmp.unlink(missing_ok=True)
        raise
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
