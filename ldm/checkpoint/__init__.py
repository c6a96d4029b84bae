"""Read and write Stable Diffusion checkpoints: one state dict per stage, keyed as our modules name them.

`read(path)` takes a single file (`.safetensors`, `.ckpt`, `.pt`, `.bin`) or a diffusers folder
(`unet/`, `vae/`, `text_encoder/`), detects the model family (ldm.families), and returns a
`Checkpoint` whose `unet`, `vae` and `text_encoder` dicts load with `load_state_dict(strict=True)`:

    single file (CompVis layout, SD 1.x)                     ours
    model.diffusion_model.input_blocks.1.0.in_layers.0.weight -> unet["input_blocks.1.0.in_layers.0.weight"]
    first_stage_model.decoder.up.3.block.0.conv1.weight      -> vae["decoder.up.3.block.0.conv1.weight"]
    cond_stage_model.transformer.text_model.final_layer_norm.weight -> text_encoder["text_model.final_layer_norm.weight"]

One job per file:

    files.py             the bytes: safetensors (memory-mapped), torch zip pickles through the restricted
                         unpickler (unpickle.py), diffusers folders and their scheduler config
    diffusers_layout.py  the one key map between the diffusers layout and ours (key_map, format_key_map)
    detect.py            which family a file is (the rule is in its docstring), and the split into stages
    prediction.py        what the UNet predicts where the family leaves it open (SD 2.x: epsilon or v; the rule)
    configs.py           the shapes to build each stage at: the file's ldm.configs metadata, else read from
                         its tensors (configs_for); and the metadata's JSON, which write.py stores
    write.py             the inverse: our networks as a single file (write_single_file)
    __init__.py          this: Checkpoint, read, from_state_dict, load_stage

The prefixes, the detection traits and the configs of each family are its record in ldm.families.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ldm import families
from ldm.checkpoint import detect, prediction
from ldm.checkpoint.configs import CONFIG_METADATA_KEY, configs_for
from ldm.checkpoint.diffusers_layout import (DIFFUSERS_TO_COMPVIS, INNER_RENAMES, KeyMapConfig, diffusers_to_compvis,
                                             format_key_map, key_map)
from ldm.checkpoint.errors import CheckpointError, UnsafeCheckpointError, one_line
from ldm.checkpoint.files import read_diffusers_folder, read_file, read_scheduler_config, safetensors_metadata
from ldm.checkpoint.write import RANDOM_METADATA_KEY, single_file_state_dict, write_single_file
from ldm.families import Family

__all__ = ["Checkpoint", "read", "from_state_dict", "load_stage", "CheckpointError", "UnsafeCheckpointError",
           "STAGES", "KeyMapConfig", "key_map", "DIFFUSERS_TO_COMPVIS", "INNER_RENAMES", "format_key_map",
           "diffusers_to_compvis", "safetensors_metadata", "write_single_file", "single_file_state_dict",
           "CONFIG_METADATA_KEY", "RANDOM_METADATA_KEY", "configs_for"]

log = logging.getLogger(__name__)

STAGES = families.STAGES
_read_file = read_file  # the name ldm.lora, ldm.prompt and the tests use for "one file, any format"


@dataclass
class Checkpoint:
    """Per-stage state dicts, keyed as our modules name them, and what was found.

    `state_dicts` maps each stage of the family (ldm.families: "text_encoder", "unet", "vae", and
    any others a family lists) to its state dict; ck.unet, ck.vae, ck.text_encoder (and ck.<stage>
    for any other stage) are its entries."""
    path: Path | None
    format: str                                        # "safetensors" | "ckpt" | "diffusers" | "state_dict"
    family: str                                        # a name in ldm.families.FAMILIES: "sd1", "sd1-inpaint", ...
    state_dicts: dict[str, dict[str, Tensor]]          # stage -> its state dict, in the family's order
    ignored: dict[str, int] = field(default_factory=dict)   # what the file held that no stage uses
    metadata: dict[str, str] = field(default_factory=dict)  # a .safetensors header's __metadata__
    # what a diffusers folder's scheduler/scheduler_config.json says: prediction_type, timestep_spacing,
    # steps_offset (only the keys it names); {} for a single file
    scheduler: dict = field(default_factory=dict)
    # (prediction type, why) where the family leaves it open and the file told (ldm/checkpoint/prediction.py)
    predicted: tuple[str, str] | None = None
    # what the caller said the UNet predicts (read(..., prediction_type=)): step 1 of the rule, above all else
    requested: str | None = None

    def stages(self) -> dict[str, dict[str, Tensor]]:
        """stage -> state dict (the mapping itself: building, writing and LoRAs iterate over it)."""
        return self.state_dicts

    def __getattr__(self, name: str):
        """ck.unet, ck.text_encoder_2, ...: the state dict of the stage called `name`."""
        stages = self.__dict__.get("state_dicts")
        if stages is not None and name in stages:
            return stages[name]
        raise AttributeError(f"{type(self).__name__!r} has no attribute or stage {name!r}")

    @property
    def record(self) -> Family:
        """The family's record (ldm.families): configs, prefixes, prediction type, downloads."""
        return families.get(self.family)

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: the caller's answer, else the folder's scheduler config if it says,
        else what the file told (ldm/checkpoint/prediction.py's rule), else the family's."""
        if self.requested is not None:
            return self.requested
        if "prediction_type" in self.scheduler:
            return self.scheduler["prediction_type"]
        return self.predicted[0] if self.predicted else self.record.prediction_type

    @property
    def prediction_reason(self) -> str:
        """Why prediction_type is what it is, in words (`ldm info` prints it)."""
        if self.requested is not None:
            return f"prediction_type={self.requested!r} was given"
        if "prediction_type" in self.scheduler:
            return "scheduler/scheduler_config.json says so"
        if self.predicted:
            return self.predicted[1]
        fam = self.record
        if len(fam.prediction_types) == 1:
            return f"{fam.title} models predict {fam.prediction_type}"
        return (f"the {fam.name} family's default; the tensors cannot tell {' from '.join(fam.prediction_types)} "
                f"(override with prediction_type=)")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype most tensors have."""
        return Counter(t.dtype for sd in self.stages().values() for t in sd.values()).most_common(1)[0][0]

    def summary(self) -> dict:
        stage_info = {s: {"tensors": len(sd), "bytes": sum(t.numel() * t.element_size() for t in sd.values()),
                          "dtype": str(Counter(t.dtype for t in sd.values()).most_common(1)[0][0]).removeprefix("torch.")}
                      for s, sd in self.stages().items()}
        return {"path": str(self.path) if self.path else None, "family": self.family, "format": self.format,
                "dtype": str(self.dtype).removeprefix("torch."), "prediction_type": self.prediction_type,
                "prediction_reason": self.prediction_reason, "scheduler": dict(self.scheduler),
                "stages": stage_info, "ignored": dict(self.ignored)}


def from_state_dict(state_dict: dict, *, path: str | Path | None = None, format: str = "state_dict",
                    ema: bool = False, metadata: dict[str, str] | None = None,
                    prediction_type: str | None = None) -> Checkpoint:
    """A CompVis-layout state dict (the top level of a single file) -> Checkpoint. `metadata` is the
    file's safetensors header metadata (it may say what the UNet predicts); `prediction_type`, when
    given, is the caller's answer: it is checked against the family and nothing else is consulted."""
    where = path if path is not None else "state dict"
    raw, seen = state_dict, set()
    while isinstance(raw.get("state_dict"), dict):     # Lightning: {"state_dict": {...}, "callbacks": ...}
        seen.add(id(raw))
        raw = raw["state_dict"]
        if id(raw) in seen:                            # d["state_dict"] = d: a pickle can make a cycle
            raise CheckpointError(f"{where}: corrupt checkpoint: its state_dict contains itself")
    detect.other_kind(where, raw)
    layout = detect.layout_of(where, raw.keys())
    stages, ignored = detect.split(where, raw, layout[0], ema)
    family = detect.family_of(where, stages, layout)
    ck = Checkpoint(Path(path) if path else None, format, family.name, stages, ignored=dict(ignored),
                    metadata=dict(metadata or {}))
    twins = detect.twins(family, layout)  # the same network predicting other things (SD 2.x: 512-base, 768-v)
    if prediction_type is not None:       # step 1 of the rule: the caller's answer; no file entry, no UNet run
        chosen = next((f for f in twins if f.prediction_type == prediction_type), family)
        ck.family, ck.requested = chosen.name, chosen.check_prediction_type(prediction_type)
    elif len(twins) > 1:
        ck.predicted = prediction.declared(where, twins, ck.metadata, raw, ck.path) or _probe(where, ck)
        chosen = next((f for f in twins if f.prediction_type == ck.predicted[0]), None)
        if chosen is None:
            raise CheckpointError(f"{where}: {ck.predicted[1]}: it predicts {ck.predicted[0]}, which no "
                                  f"{family.title} model does; allowed: "
                                  f"{', '.join(f.prediction_type for f in twins)}")
        ck.family = chosen.name
    return ck


def _probe(where, ck: Checkpoint) -> tuple[str, str]:
    """The last step of the prediction rule: run the UNet once (prediction.probe_state_dict), built at
    the file's UNet config (its metadata's, else read from its tensors)."""
    config = configs_for(ck)["unet"]
    return prediction.probe_state_dict(where, ck.unet, ck.record.models["unet"], config)


def read(path: str | Path, dtype: torch.dtype | None = None, *, ema: bool = False,
         prediction_type: str | None = None) -> Checkpoint:
    """Read a single file (.safetensors/.ckpt/.pt/.bin) or a diffusers folder.

    dtype=None keeps the file's dtype; a floating dtype casts the floating tensors (a copy).
    ema=True takes the UNet's model_ema.* copy of a non-pruned single file.
    prediction_type: what the UNet predicts, when the caller knows ("epsilon", "v_prediction", "sample"):
    it must be one the family allows, and it settles the question before anything in the file is
    consulted (ldm/checkpoint/prediction.py's step 1), so the UNet is never run to guess it.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype={dtype!r}; allowed: None or a floating torch.dtype (torch.float16, ...)")
    path = Path(path)
    if path.is_dir():
        stages, ignored = read_diffusers_folder(path)
        scheduler = read_scheduler_config(path)
        # The key map gave our names, and every family's folder keeps a transformers CLIPTextModel
        # (SD 1.x's text naming): any family may match, by its UNet's traits.
        family = detect.family_of(path, stages, list(families.FAMILIES.values()),
                                  prediction_type=prediction_type or scheduler.get("prediction_type"))
        if family.prefixes["text_encoder"] != families.SD1_PREFIXES["text_encoder"]:
            # its folder holds the tower as transformers' 23-layer CLIPTextModel, not open_clip's names
            raise CheckpointError(f"{path}: this looks like an {family.title} diffusers folder; ldm reads "
                                  f"{family.title} from its single-file checkpoint (.safetensors/.ckpt) only")
        ck = Checkpoint(path, "diffusers", family.name, stages, ignored=dict(ignored), scheduler=scheduler)
        if prediction_type is not None:
            ck.requested = family.check_prediction_type(prediction_type)
    else:
        raw, fmt = read_file(path)
        metadata = safetensors_metadata(path) if fmt == "safetensors" else {}
        ck = from_state_dict(raw, path=path, format=fmt, ema=ema, metadata=metadata, prediction_type=prediction_type)
    if dtype is not None:
        try:
            for sd in ck.stages().values():
                sd.update({k: t.to(dtype) for k, t in sd.items() if t.is_floating_point()})
        except (RuntimeError, MemoryError) as e:
            raise CheckpointError(f"{path}: cannot cast the tensors to {dtype} ({one_line(e)})") from None
    log.info("%s: %s %s checkpoint, %s, predicts %s (%s); ignored %s", path, ck.format, ck.family, ck.dtype,
             ck.prediction_type, ck.prediction_reason, ck.ignored)
    return ck


def load_stage(module: torch.nn.Module, state_dict: dict[str, Tensor], stage: str = "unet",
               family: str = "sd1", *, assign: bool = False, max_listed: int = 10, path=None):
    """module.load_state_dict(state_dict, strict=True), with a one-line error that names the
    file (`path`, when given) and lists what did not fit."""
    stage_names = families.get(family).stage_names
    if stage not in stage_names:
        raise ValueError(f"stage={stage!r}; allowed: {list(stage_names)}")
    where = f"{path}: " if path is not None else ""
    what = f"{where}{stage} of a {family} checkpoint does not fit {type(module).__name__}"
    expected = module.state_dict()
    missing, unexpected = sorted(expected.keys() - state_dict.keys()), sorted(state_dict.keys() - expected.keys())
    listed = lambda items: f"{len(items)} {items[:max_listed]}" + (f" and {len(items) - max_listed} more" if len(items) > max_listed else "")
    if missing or unexpected:
        raise CheckpointError(f"{what}: missing keys {listed(missing)}; unexpected keys {listed(unexpected)}")
    wrong = [f"{k}: {tuple(state_dict[k].shape)} in the file, {tuple(t.shape)} in the model"
             for k, t in expected.items() if state_dict[k].shape != t.shape]
    if wrong:
        shown = "; ".join(wrong[:3]) + (f"; and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        raise CheckpointError(f"{what}: size mismatch for {len(wrong)} tensors: {shown}")
    try:
        return module.load_state_dict(state_dict, strict=True, assign=assign)
    except RuntimeError as e:                          # e.g. a tensor that is not a tensor
        raise CheckpointError(f"{what}: {one_line(e)}") from e
