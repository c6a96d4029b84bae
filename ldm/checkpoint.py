"""Read Stable Diffusion 1.x checkpoints into one state dict per stage, keyed as our modules name them.

`read(path)` takes a single file (`.safetensors`, `.ckpt`, `.pt`, `.bin`) or a diffusers folder
(`unet/`, `vae/`, `text_encoder/`), detects the model family, and returns a `Checkpoint` whose
`unet`, `vae` and `text_encoder` dicts load with `load_state_dict(strict=True)`:

    single file (CompVis layout)                       ours
    model.diffusion_model.input_blocks.1.0.in_layers.0.weight -> unet["input_blocks.1.0.in_layers.0.weight"]
    first_stage_model.decoder.up.3.block.0.conv1.weight      -> vae["decoder.up.3.block.0.conv1.weight"]
    cond_stage_model.transformer.text_model.final_layer_norm.weight -> text_encoder["text_model.final_layer_norm.weight"]

A diffusers folder names the same tensors differently (down_blocks.0.resnets.0.norm1 is
input_blocks.1.0.in_layers.0); `key_map(config)` builds the one table that translates it, and
`format_key_map()` prints it. `.safetensors` files are memory-mapped (tensors are views of the
file, no second copy in RAM); pickled `.ckpt` files are read by a restricted unpickler that
never imports or calls anything the file names, and refuses a pickle that tries to.
"""
from __future__ import annotations

import json
import logging
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ldm import unpickle

log = logging.getLogger(__name__)

STAGES = ("unet", "vae", "text_encoder")
# Prefixes of the SD 1.x single file (CompVis / LDM layout); stripped, they are our module names.
PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
            "text_encoder": "cond_stage_model.transformer."}
SUPPORTED = ("ldm reads SD 1.x checkpoints (txt2img and SD 1.5 inpainting): single files "
             "(.safetensors, .ckpt) with model.diffusion_model.*, first_stage_model.* and "
             "cond_stage_model.transformer.* keys, or diffusers folders (model_index.json, unet/, vae/, text_encoder/)")


class CheckpointError(ValueError):
    """A file that is not a readable SD 1.x checkpoint, or a state dict that does not fit a module."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint that tries to call code; it was refused and nothing ran."""


# 1. The key map: diffusers-folder names -> CompVis single-file names (= our module names)
# A row (diffusers_prefix, compvis_prefix, inner) renames a whole subtree. inner == "" keeps the
# names below the prefix (a SpatialTransformer is named alike in both layouts); otherwise it
# names the table that renames the modules inside the block:
INNER_RENAMES = {
    "unet_resnet": {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"},
    "vae_resnet": {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                   "conv_shortcut": "nin_shortcut"},
    # diffusers >= 0.14 names first, then the older names some VAE files still carry.
    # q/k/v/proj_out are 1x1 convolutions in CompVis, linear layers in diffusers (reshaped below).
    "vae_attention": {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                      "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"},
}


MAX_LEVELS, MAX_LAYERS = 8, 16                   # SD 1.x: 4 levels, 2 layers per block


@dataclass(frozen=True)
class KeyMapConfig:
    """The block structure the key map depends on; defaults are SD 1.x."""
    unet_levels: int = 4                            # len(block_out_channels)
    unet_layers_per_block: int = 2                  # ResBlocks per level on the way down (+1 going up)
    unet_attention_levels: tuple[int, ...] = (0, 1, 2)  # levels with a SpatialTransformer
    vae_levels: int = 4
    vae_layers_per_block: int = 2

    @classmethod
    def tiny(cls) -> KeyMapConfig:
        return cls(unet_levels=3, unet_layers_per_block=2, unet_attention_levels=(0, 1),
                   vae_levels=2, vae_layers_per_block=2)

    @classmethod
    def from_diffusers(cls, unet_config: dict, vae_config: dict) -> KeyMapConfig:
        """Build it from the config.json of a diffusers unet/ and vae/ (each checked: a block-type
        list of at most MAX_LEVELS strings, layers_per_block an integer in 1..MAX_LAYERS)."""
        for name, config, keys in (("unet", unet_config, ("down_block_types", "up_block_types")),
                                   ("vae", vae_config, ("block_out_channels",))):
            if not isinstance(config, dict):
                raise CheckpointError(f"{name} config: a {type(config).__name__}, not a JSON object")
            for key in keys:
                v = config.get(key)
                if not (isinstance(v, (list, tuple)) and 1 <= len(v) <= MAX_LEVELS
                        and all(isinstance(x, (str if key.endswith("types") else int)) for x in v)):
                    raise CheckpointError(f"{name} config: {key}={str(v)[:80]}; allowed: a list of 1 to "
                                          f"{MAX_LEVELS} {'strings' if key.endswith('types') else 'integers'}")
            layers = config.get("layers_per_block", 2)
            for n in (layers if isinstance(layers, (list, tuple)) and len(layers) <= MAX_LEVELS else [layers]):
                if not (type(n) is int and 1 <= n <= MAX_LAYERS):
                    raise CheckpointError(f"{name} config: layers_per_block={str(layers)[:80]}; allowed: "
                                          f"an integer from 1 to {MAX_LAYERS}")
        down, up = list(unet_config["down_block_types"]), list(unet_config["up_block_types"])
        attention = tuple(i for i, t in enumerate(down) if "CrossAttn" in t)
        if [("CrossAttn" in t) for t in reversed(up)] != [("CrossAttn" in t) for t in down]:
            raise CheckpointError(f"unet config: up_block_types {up} do not mirror down_block_types {down}")
        layers = unet_config.get("layers_per_block", 2)
        layers = set(layers) if isinstance(layers, (list, tuple)) else {layers}
        if len(layers) != 1:
            raise CheckpointError(f"unet config: layers_per_block={unet_config['layers_per_block']} "
                                  "differs between levels; SD 1.x uses one value")
        return cls(unet_levels=len(down), unet_layers_per_block=int(layers.pop()), unet_attention_levels=attention,
                   vae_levels=len(vae_config["block_out_channels"]),
                   vae_layers_per_block=int(vae_config.get("layers_per_block", 2)))


def key_map(config: KeyMapConfig = KeyMapConfig()) -> dict[str, list[tuple[str, str, str]]]:
    """The diffusers -> CompVis table for a block structure: {stage: [(diffusers, compvis, inner)]}."""
    c = config
    unet = [("conv_in", "input_blocks.0.0", ""),
            ("time_embedding.linear_1", "time_embed.0", ""), ("time_embedding.linear_2", "time_embed.2", "")]
    k = 1                                           # input_blocks.0 is conv_in
    for level in range(c.unet_levels):
        for j in range(c.unet_layers_per_block):
            unet.append((f"down_blocks.{level}.resnets.{j}", f"input_blocks.{k}.0", "unet_resnet"))
            if level in c.unet_attention_levels:
                unet.append((f"down_blocks.{level}.attentions.{j}", f"input_blocks.{k}.1", ""))
            k += 1
        if level < c.unet_levels - 1:               # every level but the last ends in a Downsample
            unet.append((f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{k}.0.op", ""))
            k += 1
    unet += [("mid_block.resnets.0", "middle_block.0", "unet_resnet"),
             ("mid_block.attentions.0", "middle_block.1", ""),
             ("mid_block.resnets.1", "middle_block.2", "unet_resnet")]
    k = 0
    for i in range(c.unet_levels):                  # up_blocks.i is level (levels - 1 - i)
        level = c.unet_levels - 1 - i
        attention = level in c.unet_attention_levels
        for j in range(c.unet_layers_per_block + 1):
            unet.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0", "unet_resnet"))
            if attention:
                unet.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1", ""))
            if j == c.unet_layers_per_block and level > 0:   # Upsample sits after the attention, if any
                unet.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{k}.{2 if attention else 1}.conv", ""))
            k += 1
    unet += [("conv_norm_out", "out.0", ""), ("conv_out", "out.2", "")]

    vae = [("quant_conv", "quant_conv", ""), ("post_quant_conv", "post_quant_conv", "")]
    for part in ("encoder", "decoder"):
        vae += [(f"{part}.conv_in", f"{part}.conv_in", ""), (f"{part}.conv_norm_out", f"{part}.norm_out", ""),
                (f"{part}.conv_out", f"{part}.conv_out", ""),
                (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", "vae_resnet"),
                (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", "vae_attention"),
                (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", "vae_resnet")]
    for level in range(c.vae_levels):
        for j in range(c.vae_layers_per_block):
            vae.append((f"encoder.down_blocks.{level}.resnets.{j}", f"encoder.down.{level}.block.{j}", "vae_resnet"))
        if level < c.vae_levels - 1:
            vae.append((f"encoder.down_blocks.{level}.downsamplers.0.conv", f"encoder.down.{level}.downsample.conv", ""))
    for i in range(c.vae_levels):                   # the decoder counts its levels upwards: up.3 runs first
        level = c.vae_levels - 1 - i
        for j in range(c.vae_layers_per_block + 1):
            vae.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", "vae_resnet"))
        if level > 0:
            vae.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv", ""))

    # transformers < 5 saved CLIPTextModel keys under text_model.; transformers 5 saves them without.
    text_encoder = [("text_model", "text_model", ""), ("", "text_model", "")]
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


DIFFUSERS_TO_COMPVIS = key_map()                    # the SD 1.x table


def format_key_map(table: dict | None = None) -> str:
    """The key map as aligned text, one row per block, then the renames inside blocks."""
    table = DIFFUSERS_TO_COMPVIS if table is None else table
    lines = []
    for stage, rows in table.items():
        width = max(len(d) for d, _, _ in rows) + 2
        lines.append(f"{stage}: {len(rows)} rows (diffusers -> CompVis)")
        lines += [f"  {d or '(no prefix)':<{width}}-> {c}" + (f"  [{inner}]" if inner else "") for d, c, inner in rows]
    for name, renames in INNER_RENAMES.items():
        lines.append(f"[{name}] inside the block")
        lines += [f"  {d:<16}-> {c}" for d, c in renames.items()]
    return "\n".join(lines)


def diffusers_to_compvis(stage: str, state_dict: dict[str, Tensor], table: dict | None = None) -> dict[str, Tensor]:
    """Rename one diffusers component's state dict to our (CompVis) names with the key map."""
    table = DIFFUSERS_TO_COMPVIS if table is None else table
    if stage not in table:
        raise ValueError(f"stage={stage!r}; allowed: {list(table)}")
    rows = {r[0]: r for r in table[stage]}
    out, unmatched = {}, []
    for key, t in state_dict.items():
        parts = key.split(".")                         # the longest prefix with a row wins
        row = next((rows[p] for p in (".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)) if p in rows),
                   None)
        if row is None:
            unmatched.append(key)
            continue
        d, c, inner = row
        rest = key[len(d) + 1:] if d else key
        if inner:
            module, _, param = rest.rpartition(".")
            if module not in INNER_RENAMES[inner]:
                unmatched.append(key)
                continue
            rest = f"{INNER_RENAMES[inner][module]}.{param}"
            if inner == "vae_attention" and param == "weight" and t.ndim == 2:
                t = t[:, :, None, None]              # linear (out, in) -> 1x1 conv (out, in, 1, 1)
        out[f"{c}.{rest}"] = t
    if unmatched:
        raise CheckpointError(f"{stage}: {len(unmatched)} diffusers keys have no row in the key map, "
                              f"e.g. {unmatched[:5]}; is this an SD 1.x {stage}?")
    return out


# 2. Pickled checkpoints (.ckpt/.pt/.bin) are read by ldm.unpickle's restricted unpickler: it
# never imports or calls what the file names, lets BUILD touch only inert stand-ins, and bounds
# every size by the file's real content. Its Corrupt / Refused become the errors below.
def _one_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line (torch's messages span several)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


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


# 3. Files: sniff the format from the bytes, read, turn library errors into CheckpointError
def _read_file(path: Path) -> tuple[dict, str]:
    """One file -> (its top-level dict, "safetensors" | "ckpt")."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
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
        raise CheckpointError(f"{path}: truncated or corrupt {kind} ({_one_line(e)})") from e
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
        raise CheckpointError(f"{path}: truncated or corrupt safetensors header ({_one_line(e)})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not (meta is None or isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings")
    return dict(meta or {})


# 4. Family detection and the split into stages
def _unsupported(where, what: str) -> CheckpointError:
    return CheckpointError(f"{where}: this looks like {what}, which ldm does not support. {SUPPORTED}.")


def _detect_other(where, raw: dict) -> None:
    """Raise a CheckpointError naming the family when `raw` is not an SD 1.x single file."""
    keys = [k for k in raw if isinstance(k, str)]
    has = lambda *marks: any(m in k for k in keys for m in marks)
    starts = lambda *prefixes: any(k.startswith(prefixes) for k in keys)
    if "string_to_param" in raw or "emb_params" in raw:
        raise _unsupported(where, "a textual-inversion embedding (string_to_param / emb_params)")
    if starts("lora_unet_", "lora_te") or has(".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".lora.down."):
        raise _unsupported(where, "a LoRA (low-rank adapter weights)")
    if starts("conditioner.embedders."):
        raise _unsupported(where, "an SDXL checkpoint (conditioner.embedders.*)")
    if starts("cond_stage_model.model."):
        raise _unsupported(where, "an SD 2.x checkpoint (1024-wide OpenCLIP text encoder cond_stage_model.model.*)")
    if starts(PREFIXES["unet"]):
        return
    tensors = [v for v in raw.values() if isinstance(v, Tensor)]
    if starts("encoder.", "decoder.", "quant_conv.", "post_quant_conv."):
        raise _unsupported(where, "a VAE-only file (encoder.*, decoder.*, quant_conv at the top level)")
    if starts("down_blocks.", "conv_in.", "text_model.", "embeddings.", "encoder.layers."):
        raise _unsupported(where, "one component in the diffusers layout; read() its whole diffusers folder")
    if 0 < len(tensors) <= 4 and all(t.ndim <= 2 and t.numel() <= 100 * 1024 for t in tensors):
        raise _unsupported(where, f"a textual-inversion embedding ({len(tensors)} small tensor(s))")
    raise CheckpointError(f"{where}: not a Stable Diffusion checkpoint: no model.diffusion_model.* keys "
                          f"({len(tensors)} tensors, e.g. {keys[:4]}). {SUPPORTED}.")


def _unet_family(where, unet: dict[str, Tensor], text_encoder: dict[str, Tensor]) -> str:
    """sd1 or sd1-inpaint from the UNet's shapes; anything else is a CheckpointError."""
    conv_in = unet.get("input_blocks.0.0.weight")
    if conv_in is None:
        raise CheckpointError(f"{where}: the UNet has no input_blocks.0.0.weight; not an SD 1.x UNet. {SUPPORTED}.")
    for key, sd, ndim in (("input_blocks.0.0.weight", unet, 4),
                          ("text_model.embeddings.token_embedding.weight", text_encoder, 2),
                          *((k, unet, 2) for k in unet if k.endswith("attn2.to_k.weight"))):
        if key in sd and sd[key].ndim != ndim:      # detection below reads shape[1] of each
            raise CheckpointError(f"{where}: {key} is a {sd[key].ndim}-D tensor of shape {tuple(sd[key].shape)}; "
                                  f"an SD 1.x checkpoint has a {ndim}-D tensor there")
    if any(k.endswith("proj_in.weight") and t.ndim == 2 for k, t in unet.items()):
        raise _unsupported(where, "an SD 2.x checkpoint (linear proj_in in the UNet's transformers)")
    to_k = next((t for k, t in unet.items() if k.endswith("attn2.to_k.weight")), None)
    tokens = text_encoder.get("text_model.embeddings.token_embedding.weight")
    if to_k is not None and tokens is not None and to_k.shape[1] != tokens.shape[1]:
        raise _unsupported(where, f"a model whose UNet attends to a {to_k.shape[1]}-wide context while its "
                                  f"text encoder is {tokens.shape[1]} wide (SD 2.x uses a 1024-wide context)")
    channels = conv_in.shape[1]
    if channels in (4, 9):
        return "sd1" if channels == 4 else "sd1-inpaint"
    what = "an InstructPix2Pix-style UNet" if channels == 8 else "a UNet"
    raise _unsupported(where, f"{what} with {channels} input channels (SD 1.x: 4, inpainting: 9)")


def _text_encoder_keys(sd: dict[str, Tensor], ignored: Counter) -> dict[str, Tensor]:
    out = {}
    for k, t in sd.items():
        k = k if k.startswith("text_model.") else f"text_model.{k}"   # both transformers layouts
        if k == "text_model.embeddings.position_ids":   # a buffer 0..76: our CLIP computes positions
            ignored["position_ids"] += 1
            continue
        out[k] = t
    return out


def _split(where, raw: dict, ema: bool) -> tuple[dict[str, dict[str, Tensor]], Counter]:
    """CompVis single file -> {stage: state dict}, plus counts of what was left out."""
    stages: dict[str, dict[str, Tensor]] = {s: {} for s in STAGES}
    ignored: Counter = Counter()
    for key, t in raw.items():
        if not (isinstance(key, str) and isinstance(t, Tensor)):
            ignored["non-tensor entries"] += 1
            continue
        stage = next((s for s, p in PREFIXES.items() if key.startswith(p)), None)
        if stage is not None:
            stages[stage][key[len(PREFIXES[stage]):]] = t
        elif key.startswith("model_ema."):
            # Non-pruned files keep an EMA copy of the UNet, named with the dots removed
            # (model_ema.diffusion_modelinput_blocks00weight). Like diffusers' single-file
            # loader by default (convert_ldm_unet_checkpoint(extract_ema=False)) we use the
            # non-EMA weights and ignore these, unless read(..., ema=True) asks for them.
            ignored["model_ema"] += 1
        else:
            ignored["other top-level (schedule buffers, ...)"] += 1
    if ema:
        for key in list(stages["unet"]):
            flat = "model_ema.diffusion_model" + key.replace(".", "")
            if not isinstance(raw.get(flat), Tensor):
                raise CheckpointError(f"{where}: ema=True but the file has no EMA copy of {key} ({flat})")
            stages["unet"][key] = raw[flat]
    stages["text_encoder"] = _text_encoder_keys(stages["text_encoder"], ignored)
    for stage, sd in stages.items():
        if not sd:
            raise CheckpointError(f"{where}: no {PREFIXES[stage]}* tensors ({stage} missing); {SUPPORTED}.")
    return stages, ignored


# 5. Diffusers folders
# Like diffusers without `variant=`, the plain file wins; the .fp16. variant is the fallback.
_WEIGHT_FILES = [f"{name}{variant}{ext}" for variant in ("", ".fp16") for name in
                 ("diffusion_pytorch_model", "model", "pytorch_model") for ext in (".safetensors", ".bin")]


def _read_json(path: Path) -> dict:
    """A diffusers config file: a JSON object, or a CheckpointError naming the file."""
    try:
        if path.stat().st_size > 2**20:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes; a diffusers config is a few KB")
        obj = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:         # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path}: not valid JSON ({_one_line(e)})") from None
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


def _read_diffusers_folder(path: Path) -> tuple[dict[str, dict[str, Tensor]], Counter]:
    if not (path / "model_index.json").is_file():
        raise CheckpointError(f"{path}: a directory without model_index.json, not a diffusers folder. {SUPPORTED}.")
    index = _read_json(path / "model_index.json")
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        raise _unsupported(path, f"an SDXL diffusers folder ({index.get('_class_name')})")
    configs, stages, ignored = {}, {}, Counter()
    for stage in STAGES:
        folder = path / stage
        weights = next((folder / n for n in _WEIGHT_FILES if (folder / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path}: no weights in {stage}/ (looked for {', '.join(_WEIGHT_FILES)})")
        stages[stage] = {k: t for k, t in _read_file(weights)[0].items() if isinstance(t, Tensor)}
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
    stages["text_encoder"] = _text_encoder_keys(stages["text_encoder"], ignored)
    return stages, ignored


# 6. The public surface
@dataclass
class Checkpoint:
    """Per-stage state dicts, keyed as our modules name them, and what was found."""
    path: Path | None
    format: str                                        # "safetensors" | "ckpt" | "diffusers" | "state_dict"
    family: str                                        # "sd1" | "sd1-inpaint"
    unet: dict[str, Tensor]
    vae: dict[str, Tensor]
    text_encoder: dict[str, Tensor]
    ignored: dict[str, int] = field(default_factory=dict)   # what the file held that no stage uses
    metadata: dict[str, str] = field(default_factory=dict)  # a .safetensors header's __metadata__

    def stages(self) -> dict[str, dict[str, Tensor]]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    @property
    def dtype(self) -> torch.dtype:
        """The dtype most tensors have."""
        return Counter(t.dtype for sd in self.stages().values() for t in sd.values()).most_common(1)[0][0]

    def summary(self) -> dict:
        stage_info = {s: {"tensors": len(sd), "bytes": sum(t.numel() * t.element_size() for t in sd.values()),
                          "dtype": str(Counter(t.dtype for t in sd.values()).most_common(1)[0][0]).removeprefix("torch.")}
                      for s, sd in self.stages().items()}
        return {"path": str(self.path) if self.path else None, "family": self.family, "format": self.format,
                "dtype": str(self.dtype).removeprefix("torch."), "stages": stage_info, "ignored": dict(self.ignored)}


def from_state_dict(state_dict: dict, *, path: str | Path | None = None, format: str = "state_dict",
                    ema: bool = False) -> Checkpoint:
    """A CompVis-layout state dict (the top level of a single file) -> Checkpoint."""
    where = path if path is not None else "state dict"
    raw, seen = state_dict, set()
    while isinstance(raw.get("state_dict"), dict):     # Lightning: {"state_dict": {...}, "callbacks": ...}
        seen.add(id(raw))
        raw = raw["state_dict"]
        if id(raw) in seen:                            # d["state_dict"] = d: a pickle can make a cycle
            raise CheckpointError(f"{where}: corrupt checkpoint: its state_dict contains itself")
    _detect_other(where, raw)
    stages, ignored = _split(where, raw, ema)
    family = _unet_family(where, stages["unet"], stages["text_encoder"])
    return Checkpoint(Path(path) if path else None, format, family, **stages, ignored=dict(ignored))


def read(path: str | Path, dtype: torch.dtype | None = None, *, ema: bool = False) -> Checkpoint:
    """Read a single file (.safetensors/.ckpt/.pt/.bin) or a diffusers folder.

    dtype=None keeps the file's dtype; a floating dtype casts the floating tensors (a copy).
    ema=True takes the UNet's model_ema.* copy of a non-pruned single file.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype={dtype!r}; allowed: None or a floating torch.dtype (torch.float16, ...)")
    path = Path(path)
    if path.is_dir():
        stages, ignored = _read_diffusers_folder(path)
        ck = Checkpoint(path, "diffusers", _unet_family(path, stages["unet"], stages["text_encoder"]),
                        **stages, ignored=dict(ignored))
    else:
        raw, fmt = _read_file(path)
        ck = from_state_dict(raw, path=path, format=fmt, ema=ema)
    if ck.format == "safetensors":
        ck.metadata = safetensors_metadata(path)
    if dtype is not None:
        try:
            for sd in ck.stages().values():
                sd.update({k: t.to(dtype) for k, t in sd.items() if t.is_floating_point()})
        except (RuntimeError, MemoryError) as e:
            raise CheckpointError(f"{path}: cannot cast the tensors to {dtype} ({_one_line(e)})") from None
    log.info("%s: %s %s checkpoint, %s; ignored %s", path, ck.format, ck.family, ck.dtype, ck.ignored)
    return ck


def load_stage(module: torch.nn.Module, state_dict: dict[str, Tensor], stage: str = "unet",
               family: str = "sd1", *, assign: bool = False, max_listed: int = 10, path=None):
    """module.load_state_dict(state_dict, strict=True), with a one-line error that names the
    file (`path`, when given) and lists what did not fit."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}; allowed: {list(STAGES)}")
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
        raise CheckpointError(f"{what}: {_one_line(e)}") from e
