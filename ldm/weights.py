"""From a checkpoint to the three networks, random weights, and where a user's checkpoint is.

    ck = ldm.checkpoint.read(ldm.weights.find_checkpoint())   # $LDM_CHECKPOINT or weights/
    text_encoder, unet, vae = ldm.weights.build(ck)          # strict loading, no renaming
    ldm.weights.write_single_file("my.safetensors", text_encoder, unet, vae)   # = ldm.checkpoint.write_single_file
    ldm.weights.random_checkpoint("weights/random-tiny.safetensors", size="tiny")
    ldm.weights.random_init_(module, seed)                     # fast seeded random weights

`build` takes each network's class and config from the checkpoint's family record
(ldm.families: SD 1.x, or SD 1.5 inpainting's 9-channel UNet), unless the file's metadata names
other configs (ldm's shipped model and our random tiny checkpoints do: SD 1.x's layout at other
widths), constructs the module on the "meta" device (no time spent drawing random weights that
are about to be replaced) and loads the stage's state dict with `strict=True` through
`ldm.checkpoint.load_stage`, which names missing and unexpected keys if the file does not fit.

Writing is the reader's inverse and sits beside it, in ldm/checkpoint/write.py; the names are
re-exported here, where the random checkpoints use them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from ldm import checkpoint, families
from ldm.checkpoint.write import (CONFIG_METADATA_KEY, RANDOM_METADATA_KEY, single_file_state_dict,  # noqa: F401
                                  write_single_file)
from ldm.clip import CLIPTextConfig
from ldm.openclip import OpenCLIPTextConfig, OpenCLIPTextModel
from ldm.unet import UNetConfig
from ldm.vae import VAEConfig

__all__ = ["CONFIG_METADATA_KEY", "SHIPPED", "find_checkpoint", "default_checkpoint", "is_random", "configs_for",
           "build", "single_file_state_dict", "write_single_file", "random_init_", "random_family", "random_models",
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


# Bounds on the configs a file's metadata may name (SD 1.x's largest number is the 49,408-row
# vocabulary); block counts are checked against the tensors before anything is built.
MAX_CONFIG_INT, MAX_CONFIG_LEN = 2**20, 16


def _config_from_dict(cls, d, where: str):
    """One stage's config from the metadata JSON: known fields, ints in 1..MAX_CONFIG_INT, floats
    finite and > 0, tuples of at most MAX_CONFIG_LEN such ints, booleans, optional ints (default
    None) as null or such an int; then the config's own checks."""
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
        elif isinstance(default, bool):  # a switch (UNetConfig.use_linear_in_transformer)
            ok, allowed = type(v) is bool, "true or false"
        elif default is None:  # an optional integer (UNetConfig.num_head_channels)
            ok, allowed = v is None or ok_int(v), f"null or an integer from 1 to {MAX_CONFIG_INT}"
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
    if isinstance(te, CLIPTextConfig):  # each text tower under its own names
        checks = [
            ("text_encoder", "num_hidden_layers", te.num_hidden_layers, _count(ck.text_encoder, "text_model.encoder.layers.")),
            ("text_encoder", "hidden_size", te.hidden_size, _shape(ck.text_encoder, "text_model.embeddings.token_embedding.weight", 1)),
            ("text_encoder", "vocab_size", te.vocab_size, _shape(ck.text_encoder, "text_model.embeddings.token_embedding.weight", 0)),
            ("text_encoder", "max_position_embeddings", te.max_position_embeddings,
             _shape(ck.text_encoder, "text_model.embeddings.position_embedding.weight", 0))]
    else:  # OpenCLIP (SD 2.x)
        checks = [
            ("text_encoder", "layers", te.layers, _count(ck.text_encoder, "transformer.resblocks.")),
            ("text_encoder", "width", te.width, _shape(ck.text_encoder, "token_embedding.weight", 1)),
            ("text_encoder", "vocab_size", te.vocab_size, _shape(ck.text_encoder, "token_embedding.weight", 0)),
            ("text_encoder", "context_length", te.context_length, _shape(ck.text_encoder, "positional_embedding", 0))]
    checks += [
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
    checked against the tensors), else its family record's (ldm.families)."""
    family = families.get(ck.family)
    if not family.supported:
        raise checkpoint.CheckpointError(f"{getattr(ck, 'path', None) or 'checkpoint'}: the {family.name} family "
                                         f"({family.title}) has no stages in ldm yet")
    stored = (getattr(ck, "metadata", None) or {}).get(CONFIG_METADATA_KEY)
    if not stored:
        return dict(family.configs)
    classes = {stage: type(config) for stage, config in family.configs.items()}  # the family's config types
    where = f"{getattr(ck, 'path', None) or 'checkpoint'}: {CONFIG_METADATA_KEY} metadata"
    try:
        parsed = json.loads(stored)
    except (ValueError, RecursionError) as e:
        raise checkpoint.CheckpointError(f"{where} is not valid JSON ({type(e).__name__}: "
                                         f"{' '.join(str(e).split())[:120]})") from None
    if not (isinstance(parsed, dict) and set(parsed) == set(classes)):
        shown = sorted(map(str, parsed))[:10] if isinstance(parsed, dict) else type(parsed).__name__
        raise checkpoint.CheckpointError(f"{where} holds {shown}; allowed: an object with exactly the stages "
                                         f"{sorted(classes)}")
    configs = {stage: _config_from_dict(classes[stage], d, f"{where}, {stage}") for stage, d in parsed.items()}
    _check_against_tensors(where, configs, ck)
    return configs


def build(ck, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(text_encoder, unet, vae) in eval mode with the checkpoint's weights, strictly loaded."""
    configs = configs_for(ck)
    classes = families.get(ck.family).models  # stage -> nn.Module class
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


def random_models(size: str = "tiny", seed: int = 0, inpainting: bool = False, family: str | None = None):
    """(text_encoder, unet, vae, configs) with random weights: `size` "tiny" or "full" (the family's own
    configs). `family` is a name in ldm.families ("sd1", "sd2", "sd2-v", ...; default "sd1", or
    "sd1-inpaint" with inpainting=True)."""
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not one of {SIZES}")
    family = random_family(family, inpainting)
    configs = tiny_configs(family) if size == "tiny" else dict(family.configs)
    models = []
    for i, stage in enumerate(("text_encoder", "unet", "vae")):
        with torch.device("meta"):  # shapes only: random_init_ fills every parameter
            module = family.models[stage](configs[stage])
        models.append(random_init_(module.to_empty(device="cpu"), seed + i).eval())
    return (*models, configs)


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
    text_encoder, unet, vae, configs = random_models(size, seed, family=family.name)
    return write_single_file(path, text_encoder, unet, vae, dtype=dtype, family=family,
                             configs=configs if size == "tiny" else None, random_weights=True)
