"""Writing checkpoints: our networks as a CompVis single file, the inverse of reading one.

    write_single_file("my.safetensors", text_encoder, unet, vae)       # SD 1.x layout, never overwrites
    write_single_file("my.safetensors", {"text_encoder": te, "unet": unet, "vae": vae}, family="sd1")
    single_file_state_dict(text_encoder, unet, vae, family="sd1")      # the dict it writes

It prefixes each state dict the way the original CompVis single-file checkpoints do (the family's
prefixes: `model.diffusion_model.`, `first_stage_model.`, `cond_stage_model.transformer.` for SD 1.x)
and adds the schedule buffers those files carry at the top level, so diffusers' own single-file
converter reads what we write (tests/test_roundtrip.py). Networks whose shapes are not the family's
(the shipped shapes model, the random tiny checkpoints) carry their configs in the safetensors
metadata under CONFIG_METADATA_KEY; ldm/checkpoint/configs.py writes that JSON (configs_metadata)
and reads it back (configs_for). A .safetensors file also gets Stability's model-spec keys
(modelspec.architecture, modelspec.prediction_type): for SD 2.x they are the only thing in the file
that says 512-base (epsilon) or 768-v (v), and ldm/checkpoint/prediction.py reads them first.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ldm import families
from ldm.checkpoint.configs import CONFIG_METADATA_KEY, configs_metadata
from ldm.checkpoint.prediction import MODELSPEC_NAME
from ldm.families import Family

__all__ = ["CONFIG_METADATA_KEY", "RANDOM_METADATA_KEY", "single_file_state_dict", "write_single_file", "stage_modules",
           "modelspec_metadata", "write_new"]

# Safetensors metadata entry marking a checkpoint of random weights (ldm.weights.random_checkpoint writes it).
RANDOM_METADATA_KEY = "ldm.random_weights"


def write_new(path, write) -> Path:
    """Create `path` with `write(tmp_path)`, never overwriting and never leaving a part-written file.

    write() fills a temporary file beside the target (same folder, so same file system); the finished
    file is then linked to `path` with os.link, which fails if `path` exists: of two processes writing
    one path, exactly one wins and the other gets FileExistsError, even when both checked first. A
    failed or interrupted write (a full disk, Ctrl-C) removes the temporary file, so nothing is left at
    `path` that a later run would refuse as "already exists".
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; not overwritten (delete it or pick another path)")
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique name per writer, ending like the target (savers that check the suffix accept it)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        try:
            os.link(tmp, path)                 # atomic, and refuses an existing target
        except FileExistsError:
            raise FileExistsError(f"{path} already exists (another process wrote it first); "
                                  f"not overwritten") from None
        except OSError:                        # a file system without hard links: exclusive rename
            if path.exists():
                raise FileExistsError(f"{path} already exists; not overwritten") from None
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def modelspec_metadata(family: Family, title: str) -> dict[str, str]:
    """Stability's model spec (github.com/Stability-AI/ModelSpec) for a file of `family`: its
    architecture id and prediction type ("epsilon" or "v"), or {} for a family without an id."""
    if family.modelspec is None:
        return {}
    return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": family.modelspec,
            "modelspec.implementation": "https://github.com/CompVis/stable-diffusion", "modelspec.title": title,
            "modelspec.prediction_type": MODELSPEC_NAME[family.prediction_type]}


def _schedule_buffers(family: Family) -> dict[str, torch.Tensor]:
    """The DDPM schedule buffers CompVis checkpoints carry at top level (the family's schedule)."""
    sched = family.schedule()
    alpha_bar = sched.alpha_bar
    return {"betas": sched.betas, "alphas_cumprod": alpha_bar,
            "alphas_cumprod_prev": torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])}


def stage_modules(models: tuple, family: Family) -> dict[str, nn.Module]:
    """The networks a writer was given, as stage -> module: one mapping (stage name -> module), or the
    modules in the family's stage order (SD: text_encoder, unet, vae)."""
    if len(models) == 1 and isinstance(models[0], Mapping):
        given = dict(models[0])
    elif len(models) == len(family.stages):
        given = dict(zip(family.stage_names, models))
    else:
        raise ValueError(f"{len(models)} networks given; the {family.name} family has {len(family.stages)} stages "
                         f"({', '.join(family.stage_names)}): pass them in that order, or one dict stage -> module")
    if set(given) != set(family.stage_names):
        raise ValueError(f"networks for {sorted(given)}; the {family.name} family's stages are "
                         f"{list(family.stage_names)}")
    return {name: given[name] for name in family.stage_names}


def single_file_state_dict(*models, family: str | Family = "sd1") -> dict:
    """Every stage's network under the family's single-file prefixes, plus the schedule buffers.
    `models`: the networks in the family's stage order, or one dict stage -> module."""
    family = families.get(family)
    sd = _schedule_buffers(family)
    for stage, module in stage_modules(models, family).items():
        sd.update({family.prefixes[stage] + k: v for k, v in module.state_dict().items()})
    return sd


def write_single_file(path, *models, dtype: torch.dtype | None = None, configs: dict | None = None,
                      random_weights: bool = False, metadata: dict[str, str] | None = None,
                      family: str | Family = "sd1") -> Path:
    """Write a .safetensors or .ckpt in the family's single-file layout (SD 1.x's by default).
    Never overwrites a file. `models`: the networks in the family's stage order (SD: text_encoder,
    unet, vae), or one dict stage -> module.

    `configs`, when given, is stored in the safetensors metadata so `build` can rebuild
    networks whose shapes are not SD 1.x's, and `random_weights=True` marks the file as random
    (a .ckpt has nowhere to keep either). The family's model-spec keys are written too
    (modelspec_metadata). `metadata` adds free-form string entries to the
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
    if path.exists():  # checked before the work; write_new checks again, atomically
        raise FileExistsError(f"{path} already exists; not overwritten (delete it or pick another path)")
    sd = single_file_state_dict(*models, family=family)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
          for k, v in sd.items()}
    if path.suffix == ".safetensors":
        meta = {"format": "pt", **modelspec_metadata(families.get(family), path.stem), **(metadata or {})}
        if random_weights:
            meta[RANDOM_METADATA_KEY] = "true"
        if configs is not None:
            meta[CONFIG_METADATA_KEY] = configs_metadata(configs)
        return write_new(path, lambda tmp: save_file(sd, str(tmp), metadata=meta))
    return write_new(path, lambda tmp: torch.save({"state_dict": sd}, tmp))
