"""Writing checkpoints: our networks as a CompVis single file, the inverse of reading one.

    write_single_file("my.safetensors", text_encoder, unet, vae)       # SD 1.x layout, never overwrites
    single_file_state_dict(text_encoder, unet, vae, family="sd1")      # the dict it writes

It prefixes each state dict the way the original CompVis single-file checkpoints do (the family's
prefixes: `model.diffusion_model.`, `first_stage_model.`, `cond_stage_model.transformer.` for SD 1.x)
and adds the schedule buffers those files carry at the top level, so diffusers' own single-file
converter reads what we write (tests/test_roundtrip.py). Networks whose shapes are not the family's
(the shipped shapes model, the random tiny checkpoints) carry their configs in the safetensors
metadata under CONFIG_METADATA_KEY; ldm.weights.configs_for reads them back. A .safetensors file
also gets Stability's model-spec keys (modelspec.architecture, modelspec.prediction_type): for SD 2.x
they are the only thing in the file that says 512-base (epsilon) or 768-v (v), and
ldm/checkpoint/prediction.py reads them first.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ldm import families
from ldm.checkpoint.prediction import MODELSPEC_NAME
from ldm.families import Family

__all__ = ["CONFIG_METADATA_KEY", "RANDOM_METADATA_KEY", "single_file_state_dict", "write_single_file",
           "modelspec_metadata"]

# Safetensors metadata entry holding {"text_encoder": {...}, "unet": {...}, "vae": {...}} when a
# file's networks are not its family's shapes (e.g. the tiny random checkpoints, the shipped model).
CONFIG_METADATA_KEY = "ldm.configs"
# Safetensors metadata entry marking a checkpoint of random weights (ldm.weights.random_checkpoint writes it).
RANDOM_METADATA_KEY = "ldm.random_weights"


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


def single_file_state_dict(text_encoder: nn.Module, unet: nn.Module, vae: nn.Module,
                           family: str | Family = "sd1") -> dict:
    """All three networks under the family's single-file prefixes, plus the schedule buffers."""
    family = families.get(family)
    sd = _schedule_buffers(family)
    for stage, module in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae)):
        sd.update({family.prefixes[stage] + k: v for k, v in module.state_dict().items()})
    return sd


def write_single_file(path, text_encoder: nn.Module, unet: nn.Module, vae: nn.Module,
                      dtype: torch.dtype | None = None, configs: dict | None = None,
                      random_weights: bool = False, metadata: dict[str, str] | None = None,
                      family: str | Family = "sd1") -> Path:
    """Write a .safetensors or .ckpt in the family's single-file layout (SD 1.x's by default).
    Never overwrites a file.

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
    if path.exists():
        raise FileExistsError(f"{path} already exists; not overwritten (delete it or pick another path)")
    sd = single_file_state_dict(text_encoder, unet, vae, family)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
          for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")  # a crash never leaves a half-written checkpoint
    if path.suffix == ".safetensors":
        meta = {"format": "pt", **modelspec_metadata(families.get(family), path.stem), **(metadata or {})}
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
