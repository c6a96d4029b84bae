"""Reading files: a single checkpoint file of any format, and a diffusers folder.

    read_file(path) -> (top-level dict, "safetensors" | "ckpt")   sniffed from the bytes, not the name
    safetensors_metadata(path)                                      the header's free-form strings
    read_diffusers_folder(path) -> ({stage: state dict}, ignored)   renamed with the key map
    read_scheduler_config(path)                                     its prediction type, spacing, offset

`.safetensors` files are memory-mapped (tensors are views of the file, no second copy in RAM);
pickled `.ckpt` files are read by ldm.checkpoint.unpickle's restricted unpickler, which never
imports or calls anything the file names, lets BUILD touch only inert stand-ins, bounds every size
by the file's real content, and refuses a pickle that tries to call code (UnsafeCheckpointError).
"""
from __future__ import annotations

import json
import logging
import struct
from collections import Counter
from pathlib import Path

from torch import Tensor

from ldm.checkpoint import unpickle
from ldm.checkpoint.detect import text_encoder_keys
from ldm.checkpoint.diffusers_layout import KeyMapConfig, diffusers_to_compvis, key_map
from ldm.checkpoint.errors import CheckpointError, UnsafeCheckpointError, one_line, supported_text, unsupported
from ldm.samplers.common import PREDICTION_TYPES
from ldm.schedule import SPACINGS

__all__ = ["read_file", "safetensors_metadata", "read_diffusers_folder", "read_scheduler_config", "DIFFUSERS_STAGES"]

log = logging.getLogger(__name__)

DIFFUSERS_STAGES = ("unet", "vae", "text_encoder")  # the folders a diffusers pipeline keeps its networks in


# 1. Pickled checkpoints (.ckpt/.pt/.bin): unpickle's Corrupt / Refused become the errors below
def _read_torch_zip(path: Path) -> object:
    try:
        obj, stand_ins = unpickle.read_torch_zip(path)
    except unpickle.Refused as e:
        raise UnsafeCheckpointError(
            f"{path}: unsafe pickle: {e}. A checkpoint should hold only tensors and plain data; "
            "nothing was imported or executed, and the file was refused. Prefer a .safetensors file.") from None
    except unpickle.Corrupt as e:
        raise CheckpointError(f"{path}: truncated or corrupt torch zip archive: {e}") from e
    if stand_ins:
        log.info("%s: inert stand-ins replace classes the pickle names: %s", path, stand_ins)
    return obj


# 2. Files: sniff the format from the bytes, read, turn library errors into CheckpointError
def read_file(path: Path) -> tuple[dict, str]:
    """One file -> (its top-level dict, "safetensors" | "ckpt")."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    # checkpoint.read takes a folder as a diffusers folder before it gets here; the LoRA and
    # embedding readers come straight here, where open() would raise a bare IsADirectoryError
    if path.is_dir():
        raise CheckpointError(f"{path}: a directory; expected a single file (.safetensors, .ckpt, .pt or .bin)")
    if not path.is_file():                            # a pipe or device: open() or read() could block
        raise CheckpointError(f"{path}: not a regular file; expected a single file (.safetensors, .ckpt, .pt or .bin)")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    with open(path, "rb") as f:
        head = f.read(9)
    try:
        if head[:4] == b"PK\x03\x04":
            obj, fmt = _read_torch_zip(path), "ckpt"
        elif len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 2**27:
            from safetensors.torch import load_file   # memory-mapped: tensors are views of the file
            obj, fmt = load_file(str(path)), "safetensors"
        elif head[:1] == b"\x80":
            raise CheckpointError(f"{path}: a bare pickle (torch's pre-1.6 format, or not a checkpoint); "
                                  "ldm reads .safetensors and torch's zip format (torch.save since 1.6)")
        else:
            raise CheckpointError(f"{path}: not a checkpoint: neither safetensors nor a torch zip archive "
                                  f"(first bytes {head[:8]!r})")
    except CheckpointError:
        raise
    except Exception as e:                             # zipfile, safetensors, unpickling, as_strided ...
        kind = "torch zip archive" if head[:4] == b"PK\x03\x04" else "safetensors file"
        raise CheckpointError(f"{path}: truncated or corrupt {kind} ({one_line(e)})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint: the file holds a {type(obj).__name__}, not a dict")
    return obj, fmt


MAX_HEADER_BYTES = 100 * 2**20                      # safetensors' own limit on the JSON header


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The free-form string map in a safetensors header (ldm.weights keeps configs there)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(MAX_HEADER_BYTES, path.stat().st_size - 8):   # checked before reading n bytes
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header length {n})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:         # UnicodeDecodeError, JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path}: truncated or corrupt safetensors header ({one_line(e)})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not (meta is None or isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings")
    return dict(meta or {})


# 3. Diffusers folders: one file per component, named by the key map; the scheduler's config
_WEIGHT_FILES = [f"{name}{variant}{ext}" for variant in ("", ".fp16") for name in
                 ("diffusion_pytorch_model", "model", "pytorch_model") for ext in (".safetensors", ".bin")]


def _read_json(path: Path) -> dict:
    """A diffusers config file: a JSON object, or a CheckpointError naming the file."""
    try:
        if path.stat().st_size > 2**20:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes; a diffusers config is a few KB")
        obj = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:         # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path}: not valid JSON ({one_line(e)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(obj).__name__}, not an object")
    return obj


def _count_blocks(sd: dict[str, Tensor], prefix: str) -> int:
    """How many numbered children `prefix.<i>.` the keys name (down_blocks.0, down_blocks.1, ...)."""
    return len({k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)})


def _check_against_tensors(path: Path, configs: dict, stages: dict) -> None:
    """The configs' block counts must be those of the tensors, before a key map is built from them."""
    unet, vae = configs["unet"], configs["vae"]
    layers = unet.get("layers_per_block", 2)
    checks = [("unet", "down_block_types", len(unet["down_block_types"]), _count_blocks(stages["unet"], "down_blocks.")),
              ("unet", "layers_per_block", layers[0] if isinstance(layers, (list, tuple)) else layers,
               _count_blocks(stages["unet"], "down_blocks.0.resnets.")),
              ("vae", "block_out_channels", len(vae["block_out_channels"]),
               _count_blocks(stages["vae"], "encoder.down_blocks.")),
              ("vae", "layers_per_block", vae.get("layers_per_block", 2),
               _count_blocks(stages["vae"], "encoder.down_blocks.0.resnets."))]
    for stage, key, said, found in checks:
        if said != found:
            raise CheckpointError(f"{path / stage / 'config.json'}: {key} says {said} blocks but the weights "
                                  f"hold {found}")


def read_scheduler_config(path: Path) -> dict:
    """What a diffusers folder's scheduler/scheduler_config.json says about sampling, checked:
    {"prediction_type", "timestep_spacing", "steps_offset"}, only the keys it names ({} without the file).
    ldm.pipeline.load takes them as the pipeline's defaults; a user overrides each."""
    file = path / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        return {}
    config = _read_json(file)
    T = config.get("num_train_timesteps", 1000)
    T = T if type(T) is int and 1 < T <= 100_000 else 1000
    rules = {"prediction_type": (lambda v: v in PREDICTION_TYPES, ", ".join(PREDICTION_TYPES)),
             "timestep_spacing": (lambda v: v in SPACINGS, ", ".join(SPACINGS)),
             "steps_offset": (lambda v: type(v) is int and 0 <= v < T, f"an integer from 0 to {T - 1}")}
    out = {}
    for key, (ok, allowed) in rules.items():
        if key in config:
            if not ok(config[key]):
                raise CheckpointError(f"{file}: {key}={repr(config[key])[:60]}; allowed: {allowed}")
            out[key] = config[key]
    return out


def read_diffusers_folder(path: Path) -> tuple[dict[str, dict[str, Tensor]], Counter]:
    """A diffusers folder's unet/, vae/, text_encoder/ -> {stage: state dict in our names}, ignored counts."""
    if not (path / "model_index.json").is_file():
        raise CheckpointError(f"{path}: a directory without model_index.json, not a diffusers folder. "
                              f"{supported_text()}.")
    index = _read_json(path / "model_index.json")
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        raise unsupported(path, f"an SDXL diffusers folder ({index.get('_class_name')})")
    configs, stages, ignored = {}, {}, Counter()
    for stage in DIFFUSERS_STAGES:
        folder = path / stage
        weights = next((folder / n for n in _WEIGHT_FILES if (folder / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path}: no weights in {stage}/ (looked for {', '.join(_WEIGHT_FILES)})")
        stages[stage] = {k: t for k, t in read_file(weights)[0].items() if isinstance(t, Tensor)}
        if stage != "text_encoder":
            config = folder / "config.json"
            if not config.is_file():
                raise CheckpointError(f"{config}: missing; the key map is built from it")
            configs[stage] = _read_json(config)
    try:
        keymap_config = KeyMapConfig.from_diffusers(configs["unet"], configs["vae"])
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    _check_against_tensors(path, configs, stages)
    table = key_map(keymap_config)
    try:
        stages = {s: diffusers_to_compvis(s, sd, table) for s, sd in stages.items()}
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    stages["text_encoder"] = text_encoder_keys(stages["text_encoder"], ignored)
    return stages, ignored
