"""From a checkpoint to its networks, random weights, and where a user's checkpoint is.

    ck = ldm.checkpoint.read(ldm.weights.find_checkpoint())   # $LDM_CHECKPOINT or weights/
    nets = ldm.weights.build_stages(ck)                      # {"text_encoder": ..., "unet": ..., "vae": ...}
    text_encoder, unet, vae = ldm.weights.build(ck)          # the same, in the family's stage order
    ldm.weights.write_single_file("my.safetensors", text_encoder, unet, vae)   # = ldm.checkpoint.write_single_file
    ldm.weights.random_checkpoint("weights/random-tiny.safetensors", size="tiny")
    ldm.weights.random_init_(module, seed)                     # fast seeded random weights

`build` takes each network's class from the checkpoint's family record (ldm.families) and its
config from `configs_for` (ldm/checkpoint/configs.py: the file's ldm.configs metadata, which ldm's
shipped model and our random tiny checkpoints carry, else read from the tensors' shapes, the
family's record filling what shapes cannot tell), constructs the module on the "meta" device (no
time spent drawing random weights that are about to be replaced) and loads the stage's state dict
with `strict=True` through `ldm.checkpoint.load_stage`, which names missing and unexpected keys if
the file does not fit.

Reading and writing checkpoints, and their configs, live in ldm/checkpoint/; the names used here
(configs_for, CONFIG_METADATA_KEY, write_single_file, ...) are re-exported, where the random
checkpoints, the tests and the notebooks use them.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch
from torch import nn

from ldm import checkpoint, families
from ldm.checkpoint.configs import CONFIG_METADATA_KEY, MAX_CONFIG_INT, MAX_CONFIG_LEN, configs_for  # noqa: F401
from ldm.checkpoint.write import RANDOM_METADATA_KEY, single_file_state_dict, write_single_file  # noqa: F401
from ldm.clip import CLIPTextConfig
from ldm.openclip import OpenCLIPTextConfig, OpenCLIPTextModel
from ldm.unet import UNetConfig
from ldm.vae import VAEConfig

__all__ = ["CONFIG_METADATA_KEY", "SHIPPED", "find_checkpoint", "default_checkpoint", "is_random", "configs_for",
           "build", "build_stages", "random_stages", "single_file_state_dict", "write_single_file", "random_init_", "random_family", "random_models",
           "random_checkpoint"]

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


def build(ck, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> tuple[nn.Module, ...]:
    """The networks of build_stages, as a tuple in the family's stage order (SD: text_encoder, unet, vae)."""
    return tuple(build_stages(ck, device, dtype).values())


def build_stages(ck, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> dict[str, nn.Module]:
    """stage -> network, in eval mode with the checkpoint's weights, strictly loaded; every stage the
    family lists (ldm.families), in its order."""
    configs = configs_for(ck)  # this module's name, so a test may stand in for it (monkeypatch)
    family = families.get(ck.family)
    classes = family.models  # stage -> nn.Module class
    models = {}
    where = getattr(ck, "path", None) or "checkpoint"
    for stage in family.stage_names:
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
        models[stage] = module.to(device).eval()
    return models


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
            elif p.dim() <= 1:  # biases; OpenCLIP's 0-d logit_scale
                p.mul_(0.05)
            else:
                p.mul_(1.0 / math.sqrt(3 * n / p.shape[0]))
    return model


def tiny_configs(family: str = "sd1") -> dict:
    """The tiny test configs of a family's stages: its shapes (layout, head split, projections) at small widths."""
    family = families.get(family)
    if not family.supported:
        raise ValueError(f"family={family.name!r} ({family.title}) has no stages in ldm yet")
    if family.tiny_configs is not None:  # a family that is not SD-shaped says its own
        return dict(family.tiny_configs)
    if family.models["text_encoder"] is OpenCLIPTextModel:  # SD 2.x
        return {"text_encoder": OpenCLIPTextConfig.tiny(), "vae": VAEConfig.tiny(),
                "unet": dataclasses.replace(UNetConfig.tiny_sd2(), in_channels=family.unet_in_channels)}
    return {"text_encoder": CLIPTextConfig.tiny(), "vae": VAEConfig.tiny(),
            "unet": dataclasses.replace(UNetConfig.tiny(), in_channels=family.unet_in_channels)}


def random_family(family: str | None = None, inpainting: bool = False):
    """The family a random checkpoint is drawn from: `family` by name (default "sd1"), or
    "sd1-inpaint" with inpainting=True; a one-line ValueError if the two disagree."""
    if inpainting and family not in (None, "sd1-inpaint"):
        raise ValueError(f"inpainting=True is the sd1-inpaint family; it does not go with family={family!r}")
    return families.get(family or ("sd1-inpaint" if inpainting else "sd1"))


def random_stages(size: str = "tiny", seed: int = 0, inpainting: bool = False,
                  family: str | None = None) -> tuple[dict[str, nn.Module], dict]:
    """({stage: network with random weights}, {stage: config}): `size` "tiny" or "full" (the family's
    own configs). `family` is a name in ldm.families ("sd1", "sd2", "sd2-v", ...; default "sd1", or
    "sd1-inpaint" with inpainting=True). Stage i of the family's order draws from seed + i."""
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not one of {SIZES}")
    family = random_family(family, inpainting)
    configs = tiny_configs(family) if size == "tiny" else dict(family.configs)
    models = {}
    for i, stage in enumerate(family.stage_names):
        with torch.device("meta"):  # shapes only: random_init_ fills every parameter
            module = family.models[stage](configs[stage])
        models[stage] = random_init_(module.to_empty(device="cpu"), seed + i).eval()
    return models, configs


def random_models(size: str = "tiny", seed: int = 0, inpainting: bool = False, family: str | None = None):
    """random_stages' networks as a tuple in the family's stage order, then the configs:
    (text_encoder, unet, vae, configs) for SD 1.x and 2.x."""
    models, configs = random_stages(size, seed, inpainting, family)
    return (*models.values(), configs)


def random_checkpoint(path, size: str = "tiny", dtype: torch.dtype = torch.float32, seed: int = 0,
                      inpainting: bool = False, family: str | None = None) -> Path:
    """Write a random-weight checkpoint in the family's real single-file layout (SD 1.x by default;
    tiny: its configs in the metadata). SD 2.x files say which variant they are in the
    metadata (modelspec.architecture, modelspec.prediction_type), as the model spec asks.

    Every stage runs end to end on it (its images are noise); it is what the tests and the
    README's first command use when no real weights are at hand.
    """
    if Path(path).exists():  # check before spending seconds on random weights
        raise FileExistsError(f"{path} already exists; not overwritten (delete it or pick another path)")
    family = random_family(family, inpainting)
    models, configs = random_stages(size, seed, family=family.name)
    return write_single_file(path, models, dtype=dtype, family=family,
                             configs=configs if size == "tiny" else None, random_weights=True)
