"""A checkpoint's configs: the shapes each stage's network is built at, written and read side by side.

    configs_for(ck)             {"text_encoder": CLIPTextConfig(...), "unet": UNetConfig(...), "vae": VAEConfig(...)}
    configs_metadata(configs)   the JSON write_single_file stores under CONFIG_METADATA_KEY ("ldm.configs")
    from_metadata(ck, text)     that JSON read back: validated, bounded, checked against the tensors
    from_tensors(ck)            each config read from the tensors' shapes and key names

Where a file's configs come from:

1. Its `ldm.configs` safetensors metadata, which ldm writes for networks that are not its family's
   shapes (the shipped shapes model, the random tiny checkpoints, what `ldm train` writes). It is
   a hostile file's text like any other: known fields only, bounded numbers, block counts checked
   against the tensors before anything is built.
2. Otherwise the tensors, as ComfyUI's model detection (comfy/model_detection.py) and
   stable-diffusion.cpp do: widths from weight shapes, block counts from key names, so a real SD
   1.x / 2.x file gives exactly its family's configs and a tiny or slimmed file written by another
   converter gives its own. What no tensor can say comes from the family's record (ldm.families):

    stage         read from the tensors                          the family's record, or a rule
    UNet          in/out channels, model_channels, channel_mult,  the head split (no weight's shape
                  num_res_blocks, attention_resolutions,         depends on it): SD 1.x 8 heads, SD 2.x
                  transformer_depth, context_dim, linear proj    64-channel heads *; sample_size
    VAE           ch, ch_mult, num_res_blocks, z_channels,       norm_groups (32) *, norm_eps,
                  embed_dim, in/out channels                     scaling_factor
    CLIP ViT-L    layers, width, vocabulary, context length,     heads: 64-channel heads (ViT-L 12) *;
                  MLP width                                      layer_norm_eps
    OpenCLIP      layers, width, vocabulary, context length,     heads as CLIP (ViT-H 16) *; layer_skip,
                  mlp_ratio, embed_dim (text_projection)         layer_norm_eps

   * Where the family's split does not divide every width (tiny widths: a 32-wide tower has no
   64-channel head), the largest split below it that divides them all is taken: the number of
   heads / channels per head / groups that is the largest divisor of the widths' greatest common
   divisor not above the family's (a 32/64-wide SD 2.x UNet gets 32-channel heads, a 48-wide
   OpenCLIP tower one 48-channel head, an 8/16-wide VAE 8 groups). Such a network loads and runs,
   but its outputs are the file's only if it was trained with that split: write the configs into
   the metadata (write_single_file(configs=...)) when they matter.

A config that UNetConfig cannot express (transformer depths that differ within a level or between the
middle block and the last level, levels with different numbers of ResBlocks) is refused in one line
naming the file and what was found.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections import defaultdict

from torch import Tensor

from ldm import families
from ldm.checkpoint.errors import CheckpointError
from ldm.clip import CLIPTextConfig
from ldm.openclip import OpenCLIPTextConfig
from ldm.unet import UNetConfig
from ldm.vae import VAEConfig

__all__ = ["CONFIG_METADATA_KEY", "MAX_CONFIG_INT", "MAX_CONFIG_LEN", "MAX_BLOCKS", "configs_for",
           "configs_metadata", "from_metadata", "from_tensors"]

log = logging.getLogger(__name__)

# Safetensors metadata entry holding {"text_encoder": {...}, "unet": {...}, "vae": {...}} when a
# file's networks are not its family's shapes (e.g. the tiny random checkpoints, the shipped model).
CONFIG_METADATA_KEY = "ldm.configs"
# Bounds on the configs a file may name (SD 1.x's largest number is the 49,408-row vocabulary),
# whether its metadata says them or its shapes do.
MAX_CONFIG_INT, MAX_CONFIG_LEN = 2**20, 16
# Bound on a count read from key names (layers, blocks, transformer blocks): SD's largest is 32
# (SDXL's ViT-bigG layers). A hostile file can name input_blocks.1000000 with one small tensor;
# building that many modules would take hours before the strict load says no.
MAX_BLOCKS = 256
# The head split the text towers' rule aims at: 64 channels per head (ViT-L 768 = 12 x 64, ViT-H 1024 = 16 x 64).
TEXT_HEAD_CHANNELS = 64


# ---- writing -----------------------------------------------------------------------------------

def configs_metadata(configs: dict) -> str:
    """The JSON stored under CONFIG_METADATA_KEY: {stage: {field: value}} (tuples as lists); from_metadata reads it."""
    return json.dumps({stage: dataclasses.asdict(cfg) for stage, cfg in configs.items()})


# ---- reading: the choice -----------------------------------------------------------------------

def _where(ck) -> str:
    return str(getattr(ck, "path", None) or "checkpoint")


def configs_for(ck) -> dict:
    """The config of each stage: from the file's ldm.configs metadata if it has it (validated, bounded
    and checked against the tensors), else read from its tensors (from_tensors)."""
    family = families.get(ck.family)
    if not family.supported:
        raise CheckpointError(f"{_where(ck)}: the {family.name} family ({family.title}) has no stages in ldm yet")
    stored = (getattr(ck, "metadata", None) or {}).get(CONFIG_METADATA_KEY)
    return from_metadata(ck, stored) if stored else from_tensors(ck)


# ---- reading: the metadata ---------------------------------------------------------------------

def _config_from_dict(cls, d, where: str):
    """One stage's config from a dict of fields: known fields, ints in 1..MAX_CONFIG_INT, floats
    finite and > 0, tuples of at most MAX_CONFIG_LEN such ints, booleans, optional ints (default
    None) as null or such an int, fields typed `int | tuple[int, ...]` as either; then the config's own
    checks. Fields not named keep the class's defaults."""
    bad = lambda msg: CheckpointError(f"{where}: {msg}")
    if not isinstance(d, dict):
        raise bad(f"a {type(d).__name__}, not a JSON object of {cls.__name__} fields")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise bad(f"unknown {cls.__name__} fields {sorted(map(str, unknown))[:10]}; allowed: {sorted(fields)}")
    values = {}
    ok_int = lambda x: type(x) is int and 1 <= x <= MAX_CONFIG_INT
    ok_ints = lambda x: isinstance(x, (list, tuple)) and len(x) <= MAX_CONFIG_LEN and all(map(ok_int, x))
    ints = f"a list of at most {MAX_CONFIG_LEN} integers from 1 to {MAX_CONFIG_INT}"
    for k, v in d.items():
        default = fields[k].default
        if str(fields[k].type) == "int | tuple[int, ...]":  # one for all, or per level (UNetConfig.transformer_depth)
            ok, allowed = ok_int(v) or ok_ints(v), f"an integer from 1 to {MAX_CONFIG_INT}, or {ints}"
            v = tuple(v) if ok and isinstance(v, list) else v
        elif isinstance(default, tuple):  # a JSON list, or a tuple when from_tensors built the dict
            ok, allowed = ok_ints(v), ints
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
    return len({k[len(prefix):].split(".", 1)[0] for k in sd if isinstance(k, str) and k.startswith(prefix)})


def _shape(sd: dict, key: str, dim: int):
    t = sd.get(key)
    return t.shape[dim] if isinstance(t, Tensor) and t.ndim > dim else None


def _check_against_tensors(where: str, configs: dict, ck) -> None:
    """The block counts and first widths a config names must be the tensors' (a config that
    asks for 10**6 layers would otherwise take hours to build before load_stage says no)."""
    unet, vae = configs["unet"], configs["vae"]
    L, n = len(unet.channel_mult), unet.num_res_blocks
    # bounded digits: int() of a hostile 5,000-digit index raises ValueError, not ours
    depths = {int(m.group(1)) for k in ck.unet if isinstance(k, str)
              for m in [re.search(r"\.transformer_blocks\.(\d{1,7})\.", k)] if m}
    checks = []
    for stage, te in configs.items():  # each text tower under its own names (SDXL has two)
        sd = getattr(ck, stage)
        text = lambda key, dim: _shape(sd, key, dim)
        if isinstance(te, CLIPTextConfig):
            embedding = "text_model.embeddings.token_embedding.weight"
            checks += [
                (stage, "num_hidden_layers", te.num_hidden_layers, _count(sd, "text_model.encoder.layers.")),
                (stage, "hidden_size", te.hidden_size, text(embedding, 1)),
                (stage, "vocab_size", te.vocab_size, text(embedding, 0)),
                (stage, "max_position_embeddings", te.max_position_embeddings,
                 text("text_model.embeddings.position_embedding.weight", 0))]
        elif isinstance(te, OpenCLIPTextConfig):  # OpenCLIP (SD 2.x, SDXL's second tower)
            checks += [
                (stage, "layers", te.layers, _count(sd, "transformer.resblocks.")),
                (stage, "width", te.width, text("token_embedding.weight", 1)),
                (stage, "vocab_size", te.vocab_size, text("token_embedding.weight", 0)),
                (stage, "context_length", te.context_length, text("positional_embedding", 0))]
        # a stage of another kind: the strict load checks it
    checks += [
        ("unet", "channel_mult and num_res_blocks (input blocks)", 1 + L * n + L - 1, _count(ck.unet, "input_blocks.")),
        ("unet", "channel_mult and num_res_blocks (output blocks)", L * (n + 1), _count(ck.unet, "output_blocks.")),
        ("unet", "model_channels", unet.model_channels, _shape(ck.unet, "input_blocks.0.0.weight", 0)),
        ("unet", "in_channels", unet.in_channels, _shape(ck.unet, "input_blocks.0.0.weight", 1)),
        ("vae", "ch_mult (levels)", len(vae.ch_mult), _count(ck.vae, "encoder.down.")),
        ("vae", "num_res_blocks", vae.num_res_blocks, _count(ck.vae, "encoder.down.0.block.")),
        ("vae", "ch", vae.ch, _shape(ck.vae, "encoder.conv_in.weight", 0)),
    ]
    if depths and unet.attention_resolutions:  # the deepest SpatialTransformer built: attention levels and the middle
        used = [d for level, d in enumerate(unet.depths()) if 2**level in unet.attention_resolutions or level == L - 1]
        checks.append(("unet", "transformer_depth (the deepest)", max(used), max(depths) + 1))
    for stage, name, said, found in checks:
        if said != found:
            raise CheckpointError(f"{where}: {stage} {name} gives {said}, but the file's tensors have {found}")


def from_metadata(ck, stored: str) -> dict:
    """The configs a file's ldm.configs metadata names (the JSON `stored`): validated, bounded, and
    checked against the file's tensors before anything is built."""
    classes = {stage: type(config) for stage, config in families.get(ck.family).configs.items()}
    where = f"{_where(ck)}: {CONFIG_METADATA_KEY} metadata"
    try:
        parsed = json.loads(stored)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{where} is not valid JSON ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:120]})") from None
    if not (isinstance(parsed, dict) and set(parsed) == set(classes)):
        shown = sorted(map(str, parsed))[:10] if isinstance(parsed, dict) else type(parsed).__name__
        raise CheckpointError(f"{where} holds {shown}; allowed: an object with exactly the stages {sorted(classes)}")
    configs = {stage: _config_from_dict(classes[stage], d, f"{where}, {stage}") for stage, d in parsed.items()}
    _check_against_tensors(where, configs, ck)
    return configs


# ---- reading: the tensors ----------------------------------------------------------------------

class _Tensors:
    """One stage's state dict as derivation reads it: shapes that must be there, and bounded counts.
    Every refusal is one CheckpointError naming the file and the stage."""

    def __init__(self, sd: dict, where: str, stage: str):
        self.sd, self.where, self.stage = sd, where, stage

    def error(self, msg: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: {self.stage} {msg}")

    def has(self, key: str) -> bool:
        return isinstance(self.sd.get(key), Tensor)

    def shape(self, key: str, ndim: int) -> tuple[int, ...]:
        """The shape of tensor `key`: it must exist, have `ndim` dimensions, each 1..MAX_CONFIG_INT."""
        t = self.sd.get(key)
        if not isinstance(t, Tensor):
            raise self.error(f"has no tensor {key}; its config cannot be read from the tensors "
                             f"(no {CONFIG_METADATA_KEY} metadata either)")
        if t.ndim != ndim or not all(1 <= d <= MAX_CONFIG_INT for d in t.shape):
            raise self.error(f"tensor {key} has shape {tuple(t.shape)[:8]}; allowed: {ndim} dimensions "
                             f"of 1 to {MAX_CONFIG_INT}")
        return tuple(t.shape)

    def count(self, prefix: str) -> int:
        """How many numbered children `prefix<i>.` the keys name (input_blocks.0., input_blocks.1., ...)."""
        return self.numbered({k[len(prefix):].split(".", 1)[0] for k in self.sd
                              if isinstance(k, str) and k.startswith(prefix)}, f"{prefix}N")

    def numbered(self, names: set, what: str) -> int:
        """n, for children named 0 .. n-1 with n at most MAX_BLOCKS; other names are left for the
        strict load to list (an unexpected key)."""
        names = {s for s in names if s.isdigit()}
        if len(names) > MAX_BLOCKS or any(len(s) > 6 for s in names):
            largest = max(names, key=lambda s: (len(s), s))
            raise self.error(f"keys name {what} up to N={largest[:20]}{'...' if len(largest) > 20 else ''} "
                             f"({len(names)} distinct N); allowed: at most {MAX_BLOCKS}, numbered from 0")
        found = sorted(int(s) for s in names)
        if found != list(range(len(found))):
            present = set(found)
            gaps = [i for i in range(len(found)) if i not in present][:5]
            raise self.error(f"keys name {what} for N in {found[:8]}{' ...' if len(found) > 8 else ''}, "
                             f"without N in {gaps}; allowed: 0 to n-1 in a row")
        return len(found)


def _largest_divisor(n: int, at_most: int) -> int:
    """The largest d <= at_most that divides n (1 at least): the family's split where it fits, else
    the nearest below it."""
    return next(d for d in range(min(n, at_most), 0, -1) if n % d == 0)


def _unet(t: _Tensors, family: UNetConfig) -> dict:
    """UNetConfig fields from the UNet's tensors (ldm/unet.py's layout; the table in its docstring)."""
    model_channels, in_channels = t.shape("input_blocks.0.0.weight", 4)[:2]     # (mc, in, 3, 3)
    out_channels = t.shape("out.2.weight", 4)[0]                               # (out, mc, 3, 3)
    # After the stem, each level's ResBlocks, then a Downsample (.0.op) on every level but the last.
    levels: list[list[int]] = [[]]
    for i in range(1, t.count("input_blocks.")):
        if t.has(f"input_blocks.{i}.0.op.weight"):
            levels.append([])
        else:
            levels[-1].append(i)
    if len(levels) > MAX_CONFIG_LEN:
        raise t.error(f"has {len(levels)} levels (Downsample blocks + 1); allowed: at most {MAX_CONFIG_LEN}")
    per_level = [len(blocks) for blocks in levels]
    if len(set(per_level)) != 1 or not per_level[0]:
        raise t.error(f"has {per_level} ResBlocks per level in input_blocks; UNetConfig has one num_res_blocks >= 1")
    widths = [t.shape(f"input_blocks.{blocks[0]}.0.out_layers.3.weight", 4)[0] for blocks in levels]
    if any(w % model_channels for w in widths):
        raise t.error(f"level widths {widths} are not multiples of model_channels={model_channels}")
    # A level has attention when its first ResBlock is followed by a SpatialTransformer (slot 1);
    # UNetConfig names it by its downsampling factor 2**level, largest first as CompVis' configs do.
    attention = tuple(2**level for level in reversed(range(len(levels)))
                      if t.has(f"input_blocks.{levels[level][0]}.1.proj_in.weight"))

    # Every SpatialTransformer (input, middle, output) and how many transformer blocks it holds.
    owners: dict[str, set] = defaultdict(set)
    for k in t.sd:
        if isinstance(k, str) and ".transformer_blocks." in k:
            owner, rest = k.split(".transformer_blocks.", 1)
            owners[owner].add(rest.split(".", 1)[0])
    depths = {owner: t.numbered(names, f"{owner}.transformer_blocks.N") for owner, names in owners.items()}
    # transformer_depth per level: a level's input and output blocks share it, the middle block has the last
    # level's; other owners are left for the strict load to list.
    L, n = len(levels), per_level[0]
    level_of = {f"input_blocks.{i}.1": level for level, blocks in enumerate(levels) for i in blocks}
    level_of.update({f"output_blocks.{j}.1": L - 1 - j // (n + 1) for j in range(L * (n + 1))})
    level_of["middle_block.1"] = L - 1
    found: dict[int, dict[int, str]] = defaultdict(dict)  # level -> {depth: an owner with it}
    for owner, d in depths.items():
        if owner in level_of:
            found[level_of[owner]].setdefault(d, owner)
    for level, example in sorted(found.items()):
        if len(example) > 1:
            raise t.error(f"SpatialTransformers of level {level} have {sorted(example)} transformer blocks (e.g. "
                          f"{', '.join(f'{o}: {d}' for d, o in sorted(example.items())[:4])}); UNetConfig has one "
                          f"transformer_depth per level (the middle block's is the last level's)")
    values = dataclasses.asdict(family)  # what shapes cannot tell: the family's (sample_size, the head split)
    values.update(in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
                  channel_mult=tuple(w // model_channels for w in widths), num_res_blocks=per_level[0],
                  attention_resolutions=attention)
    if t.has("label_emb.0.0.weight"):  # a vector y through label_emb (SDXL): (time embed width, adm_in_channels)
        values["adm_in_channels"] = t.shape("label_emb.0.0.weight", 2)[1]
    if found:  # a level without attention (SDXL's level 0) reads 1, or the depth all others share (then an int)
        used = {level: next(iter(example)) for level, example in found.items()}
        values["transformer_depth"] = (next(iter(used.values())) if len(set(used.values())) == 1
                                       else tuple(used.get(level, 1) for level in range(L)))
        to_k = next((k for k in t.sd if isinstance(k, str) and k.endswith(".attn2.to_k.weight")), None)
        if to_k is not None:
            values["context_dim"] = t.shape(to_k, 2)[1]                      # (inner, context_dim)
        proj_in = next((k for k in t.sd if isinstance(k, str) and k.endswith(".proj_in.weight")), None)
        if proj_in is not None:     # SD 2.x: Linear (inner, C); SD 1.x: 1x1 conv (inner, C, 1, 1)
            values["use_linear_in_transformer"] = isinstance(t.sd[proj_in], Tensor) and t.sd[proj_in].ndim == 2
    # The head split: the family's where it divides every level's width, else the largest below it that does.
    common = math.gcd(*widths)
    if family.num_head_channels is None:
        values["num_heads"] = _largest_divisor(common, family.num_heads)
    else:
        values["num_head_channels"] = _largest_divisor(common, family.num_head_channels)
    return values


def _vae(t: _Tensors, family: VAEConfig) -> dict:
    """VAEConfig fields from the autoencoder's tensors (ldm/vae.py's layout)."""
    ch, in_channels = t.shape("encoder.conv_in.weight", 4)[:2]                 # (ch, in, 3, 3)
    levels = t.count("encoder.down.")
    if levels > MAX_CONFIG_LEN:
        raise t.error(f"has {levels} encoder levels; allowed: at most {MAX_CONFIG_LEN}")
    widths = [t.shape(f"encoder.down.{i}.block.0.conv1.weight", 4)[0] for i in range(levels)]
    if any(w % ch for w in widths):
        raise t.error(f"level widths {widths} are not multiples of ch={ch}")
    values = dataclasses.asdict(family)  # norm_eps, scaling_factor: the family's (a file cannot tell)
    values.update(in_channels=in_channels, out_ch=t.shape("decoder.conv_out.weight", 4)[0], ch=ch,
                  ch_mult=tuple(w // ch for w in widths), num_res_blocks=t.count("encoder.down.0.block."),
                  z_channels=t.shape("encoder.conv_out.weight", 4)[0] // 2,   # mean and logvar: 2 z_channels
                  embed_dim=t.shape("quant_conv.weight", 4)[0] // 2,
                  norm_groups=_largest_divisor(math.gcd(ch, *widths), family.norm_groups))
    return values


def _text_heads(width: int) -> int:
    """64-channel heads (ViT-L: 768 = 12 x 64, ViT-H: 1024 = 16 x 64); a width 64 does not divide gets
    the largest head below 64 that divides it (a 32-wide tower: one head of 32)."""
    return width // _largest_divisor(width, TEXT_HEAD_CHANNELS)


def _clip(t: _Tensors, family: CLIPTextConfig) -> dict:
    """CLIPTextConfig fields from CLIP's tensors (transformers' names under text_model.)."""
    vocab, width = t.shape("text_model.embeddings.token_embedding.weight", 2)
    values = dataclasses.asdict(family)  # layer_norm_eps: the family's
    values.update(vocab_size=vocab, hidden_size=width, num_attention_heads=_text_heads(width),
                  max_position_embeddings=t.shape("text_model.embeddings.position_embedding.weight", 2)[0],
                  num_hidden_layers=t.count("text_model.encoder.layers."),
                  intermediate_size=t.shape("text_model.encoder.layers.0.mlp.fc1.weight", 2)[0])
    return values


def _openclip(t: _Tensors, family: OpenCLIPTextConfig) -> dict:
    """OpenCLIPTextConfig fields from the OpenCLIP tower's tensors (open_clip's names)."""
    vocab, width = t.shape("token_embedding.weight", 2)
    hidden = t.shape("transformer.resblocks.0.mlp.c_fc.weight", 2)[0]          # (width * mlp_ratio, width)
    mlp_ratio = hidden / width
    if int(width * mlp_ratio) != hidden:  # the tower computes int(width * mlp_ratio): land on `hidden`
        mlp_ratio = math.nextafter(mlp_ratio, math.inf)
    values = dataclasses.asdict(family)  # layer_skip, layer_norm_eps: the family's
    values.update(vocab_size=vocab, width=width, heads=_text_heads(width), mlp_ratio=mlp_ratio,
                  context_length=t.shape("positional_embedding", 2)[0], layers=t.count("transformer.resblocks."),
                  embed_dim=t.shape("text_projection", 2)[1])                # x @ P: (width, embed_dim)
    return values


_READERS = {UNetConfig: _unet, VAEConfig: _vae, CLIPTextConfig: _clip, OpenCLIPTextConfig: _openclip}


def from_tensors(ck) -> dict:
    """Each stage's config read from its tensors, the family's record filling what shapes cannot tell
    (the table in this module's docstring); validated and bounded as the metadata is."""
    family = families.get(ck.family)
    where = f"{_where(ck)}: configs read from the tensors (no {CONFIG_METADATA_KEY} metadata)"
    configs = {}
    for stage, config in family.configs.items():
        cls = type(config)
        if cls not in _READERS:  # a stage whose shapes ldm cannot read: the record's config, checked by the strict load
            configs[stage] = config
            continue
        values = _READERS[cls](_Tensors(getattr(ck, stage), where, stage), config)
        configs[stage] = _config_from_dict(cls, values, f"{where}, {stage}")
    _check_against_tensors(where, configs, ck)
    differ = [f"{stage}.{f.name}={getattr(cfg, f.name)}" for stage, cfg in configs.items()
              for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(family.configs[stage], f.name)]
    if differ:
        log.info("%s: not the %s family's shapes: %s", _where(ck), family.name, ", ".join(differ))
    return configs
