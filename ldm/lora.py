"""LoRA files as users have them: read one, find the modules it adapts, merge it (and unmerge exactly).

A LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation") stores, for some Linear and Conv2d modules of
the UNet and the text encoder, two thin matrices `down` (r, in) and `up` (out, r) and a number
alpha. With a user weight m the adapted module computes

    y = W x + m * (alpha / r) * up(down(x))          i.e.  W' = W + m * (alpha / r) * up @ down

For a convolution `down` is a conv with the module's kernel (r, in, kh, kw; 1x1, or 3x3 for LoCon's
ResBlock convs) and `up` a 1x1 conv (out, r, 1, 1), so the merged delta is up @ down.flatten(1).

    from ldm import lora
    lo = lora.read("weights/lcm-lora-sdv1-5.safetensors")      # any of the formats below
    handle = lora.apply(pipe.text_encoder, pipe.unet, [(lo, 1.0)])   # merged into the weights
    ...
    handle.unmerge()                                             # the original tensors, bit for bit

Formats (`LoRA.format`), told apart by their keys:

    kohya    lora_unet_<module path, . -> _>.lora_down.weight / .lora_up.weight / .alpha
             lora_te_text_model_encoder_layers_0_self_attn_q_proj.* (text encoder). A1111, kohya-ss,
             ComfyUI and most downloads. UNet paths use diffusers block names (down_blocks_0_...) or
             CompVis ones (input_blocks_1_1_...); alpha missing or 0 means alpha = r.
    peft     unet.<diffusers path>.lora_A.weight / .lora_B.weight, text_encoder.<path>.lora_A.weight;
             r and lora_alpha (and alpha_pattern) in the safetensors metadata "lora_adapter_metadata";
             no metadata means alpha = r (scale 1), as in diffusers.
    legacy   diffusers before peft: unet.<path>.processor.to_q_lora.down.weight (attention processors),
             <path>.lora.down.weight, text_encoder.<path>.lora_linear_layer.down.weight, ...to_q_lora...

Underscores are ambiguous (is `down_blocks_0_attentions_0_proj_in` down_blocks.0.attentions.0.proj_in
or down.blocks...?), so a file's names are never parsed: `module_table` lists every Linear/Conv2d of
our model under its own (CompVis) name, its diffusers name (from ldm.checkpoint's key map) and both
with dots replaced by underscores, and a file's name is looked up there (as ComfyUI and A1111 do).
Everything is checked - names, shapes, ranks, numbers - before any weight is touched. A file is
data, never code: its alpha_pattern keys are matched as module names, not run as regular
expressions, and every name a file provides is quoted and cut before it reaches a message.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm import checkpoint

log = logging.getLogger(__name__)

__all__ = ["LoRA", "LoRALayer", "LoRAError", "Applied", "FORMATS", "read", "from_state_dict", "apply",
           "module_table", "parse_spec"]

FORMATS = ("kohya", "peft", "legacy")
STAGES = ("unet", "text_encoder")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
SDXL_PREFIXES = ("lora_te1_", "lora_te2_")  # SDXL's two text encoders
# dotted formats: the file's component prefix -> our stage (no prefix: the UNet, as diffusers assumes)
DOTTED_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "base_model.model.": "unet"}
# the end of a dotted key -> (module suffix to append, which matrix); the module path is what precedes it
DOTTED_SUFFIXES = [
    (".lora_A.weight", "", "down"), (".lora_B.weight", "", "up"),                          # peft
    (".lora.down.weight", "", "down"), (".lora.up.weight", "", "up"),                      # diffusers LoRACompatible*
    (".lora_linear_layer.down.weight", "", "down"), (".lora_linear_layer.up.weight", "", "up"),
    *[(f".processor.to_{p}_lora.{d}.weight", f".to_{p}", d)                               # UNet attention processors
      for p in ("q", "k", "v") for d in ("down", "up")],
    (".processor.to_out_lora.down.weight", ".to_out.0", "down"), (".processor.to_out_lora.up.weight", ".to_out.0", "up"),
    *[(f".to_{p}_lora.{d}.weight", f".{p}_proj", d) for p in ("q", "k", "v") for d in ("down", "up")],  # text encoder
    (".to_out_lora.down.weight", ".out_proj", "down"), (".to_out_lora.up.weight", ".out_proj", "up"),
    (".alpha", "", "alpha"),
]
MAX_LISTED = 3   # names from a file quoted in one error
MAX_QUOTED = 60  # characters of each (a kohya key is ~90: its head and tail are kept)
PLAIN_NAME = re.compile(r"[\w.\-]+", re.ASCII)  # a module name as files spell it, safe to print bare


class LoRAError(ValueError):
    """A LoRA file or request that cannot be applied; nothing was changed."""


def _quote(value, limit: int = MAX_QUOTED) -> str:
    """Something a file or user provided, fit for a one-line message: repr'd (so no raw newline or
    terminal escape gets through) and cut to about `limit` characters, in the middle for a string."""
    if isinstance(value, str):
        half = limit // 2
        return repr(value if len(value) <= limit else f"{value[:half]}...{value[-half:]}")
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - e.g. an int of more than 4,300 digits refuses repr()
        text = f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def _layer(name) -> str:
    """A layer name from a file: bare when it is a plain module name (how messages read best), else quoted."""
    return name if isinstance(name, str) and len(name) <= MAX_QUOTED and PLAIN_NAME.fullmatch(name) else _quote(name)


def _listed(names, limit: int = 40) -> str:
    """At most MAX_LISTED names, each quoted and cut to about `limit` characters: 'a', 'b', 'c' and 2 more."""
    names = list(names)
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(_quote(n, limit) for n in names[:MAX_LISTED]) + more


# 1. What a file holds, normalised ---------------------------------------------------------------
@dataclass(frozen=True)
class LoRALayer:
    """One adapted module: y += weight * scale * up(down(x)), scale = alpha / rank."""
    down: Tensor  # (r, in) or (r, in, kh, kw)
    up: Tensor    # (out, r) or (out, r, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> Tensor:
        """up @ down in float32, shaped like the module's weight: (out, in) or (out, in, kh, kw)."""
        d = self.up.float().flatten(1) @ self.down.float().flatten(1)
        return d.reshape(self.up.shape[0], *self.down.shape[1:])


@dataclass
class LoRA:
    """A LoRA file, normalised: layers[stage][name as the file spells it] -> LoRALayer.

    The names are the file's (kohya: underscores; peft/legacy: dotted diffusers paths); `resolve`
    turns them into our module names for a given model.
    """
    path: str
    format: str
    layers: dict[str, dict[str, LoRALayer]] = field(default_factory=dict)

    @property
    def num_modules(self) -> int:
        return sum(len(v) for v in self.layers.values())

    @property
    def num_params(self) -> int:
        return sum(l.down.numel() + l.up.numel() for v in self.layers.values() for l in v.values())

    @property
    def ranks(self) -> set[int]:
        return {l.rank for v in self.layers.values() for l in v.values()}

    def __repr__(self) -> str:
        per_stage = ", ".join(f"{s}: {len(v)}" for s, v in self.layers.items())
        return (f"LoRA({self.path!r}, format={self.format!r}, modules={self.num_modules} ({per_stage}), "
                f"ranks={sorted(self.ranks)}, params={self.num_params:,})")

    def resolve(self, models: dict[str, nn.Module | None], strict: bool = True) -> dict[str, dict[str, LoRALayer]]:
        """{stage: {our module name: layer}}, every name looked up in `module_table` and shape-checked.

        strict=False skips (and logs) names that match no module instead of raising.
        """
        out: dict[str, dict[str, LoRALayer]] = {}
        for stage, layers in self.layers.items():
            model = models.get(stage)
            if model is None:
                raise LoRAError(f"{self.path}: has {len(layers)} {stage} layers but no {stage} was given")
            table, modules = module_table(stage, model), dict(model.named_modules())
            unmatched = [name for name in layers if name not in table]
            if unmatched and strict:
                raise LoRAError(f"{self.path}: {len(unmatched)} of {len(layers)} {stage} LoRA names match no module "
                                f"of the model, e.g. {_listed(unmatched)}; is it a LoRA for another model family? "
                                "(pass strict=False to skip them)")
            if unmatched:
                log.warning("%s: skipping %d %s LoRA names that match no module, e.g. %s", self.path,
                            len(unmatched), stage, _listed(unmatched))
            resolved: dict[str, LoRALayer] = {}
            for name, layer in layers.items():
                if name not in table:
                    continue
                target = table[name]
                if target in resolved:
                    raise LoRAError(f"{self.path}: two names in the file adapt the same module {target!r}")
                _check_shapes(self.path, name, layer, target, modules[target])
                resolved[target] = layer
            out[stage] = resolved
        return out


def _check_shapes(path, name, layer: LoRALayer, target: str, module: nn.Module) -> None:
    w = module.weight
    if isinstance(module, nn.Linear):
        want_down, want_up = (layer.rank, w.shape[1]), (w.shape[0], layer.rank)
    else:
        want_down, want_up = (layer.rank, *w.shape[1:]), (w.shape[0], layer.rank, 1, 1)
    if tuple(layer.down.shape) != want_down or tuple(layer.up.flatten(1).shape) != want_up[:2] \
            or layer.up.ndim != len(want_up):
        raise LoRAError(f"{path}: {_layer(name)}: down {tuple(layer.down.shape)} and up {tuple(layer.up.shape)} "
                        f"do not fit {target} ({type(module).__name__}, weight {tuple(w.shape)}): expected down "
                        f"{want_down} and up {want_up}; is it a LoRA for another model family (SD 2.x, SDXL)?")


# 2. Reading ---------------------------------------------------------------------------------------
def read(path: str | Path) -> LoRA:
    """Read a LoRA file (.safetensors, or a .pt/.ckpt/.bin through ldm.checkpoint's restricted reader)."""
    path = Path(path)
    try:
        raw, fmt = checkpoint._read_file(path)
        metadata = checkpoint.safetensors_metadata(path) if fmt == "safetensors" else {}
    except checkpoint.CheckpointError as e:
        raise LoRAError(str(e)) from None
    if isinstance(raw.get("state_dict"), dict) and not any(isinstance(v, Tensor) for v in raw.values()):
        raw = raw["state_dict"]
    return from_state_dict(raw, metadata, path=str(path))


def from_state_dict(state_dict: dict, metadata: dict[str, str] | None = None, *, path: str = "<state_dict>") -> LoRA:
    """Normalise a LoRA state dict (see the formats in the module docstring); raises LoRAError on anything odd."""
    if not isinstance(state_dict, dict):
        raise LoRAError(f"{path}: holds a {type(state_dict).__name__}; expected a dict of tensors")
    not_str = [k for k in state_dict if not isinstance(k, str)]  # a pickle can hold any key
    if not_str:
        raise LoRAError(f"{path}: {len(not_str)} keys are not strings, e.g. {_listed(not_str)}; not a LoRA file")
    bad = [k for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if bad:
        raise LoRAError(f"{path}: {len(bad)} entries are not tensors, e.g. {_listed(bad)}; not a LoRA file")
    if not state_dict:
        raise LoRAError(f"{path}: the file holds no tensors")
    keys = list(state_dict)
    if any(k.startswith(SDXL_PREFIXES) for k in keys):
        raise LoRAError(f"{path}: an SDXL LoRA (lora_te1_/lora_te2_ keys, two text encoders); "
                        "ldm applies SD 1.x LoRAs (lora_unet_, lora_te_)")
    if any(k.startswith(tuple(KOHYA_PREFIXES)) for k in keys):
        parts, fmt = _split_kohya(path, state_dict), "kohya"
    else:
        parts = _split_dotted(path, state_dict)
        fmt = "peft" if any(".lora_A." in k or ".lora_B." in k for k in keys) else "legacy"
    alphas = _peft_alphas(path, metadata or {}) if fmt == "peft" else {}
    lo = LoRA(path, fmt)
    for (stage, name), p in parts.items():
        if "down" not in p or "up" not in p:
            missing = "up" if "down" in p else "down"
            raise LoRAError(f"{path}: {_layer(name)} ({stage}) has no {missing} matrix")
        down, up = (_checked_matrix(path, name, what, p[what]) for what in ("down", "up"))
        if down.ndim not in (2, 4) or up.ndim != down.ndim or (up.ndim == 4 and up.shape[2:] != (1, 1)):
            raise LoRAError(f"{path}: {_layer(name)}: down {tuple(down.shape)} / up {tuple(up.shape)}; expected "
                            "(r, in) / (out, r), or (r, in, kh, kw) / (out, r, 1, 1) for a convolution")
        if up.shape[1] != down.shape[0]:
            raise LoRAError(f"{path}: {_layer(name)}: rank mismatch: down {tuple(down.shape)} has rank "
                            f"{down.shape[0]}, up {tuple(up.shape)} has rank {up.shape[1]}; they must agree")
        rank = down.shape[0]
        if rank == 0:  # scale = alpha / r
            raise LoRAError(f"{path}: {_layer(name)}: rank 0 (down {tuple(down.shape)}); expected a rank of at least 1")
        if fmt == "peft":
            alpha = _peft_alpha_for(alphas.get(stage), name, rank)
        else:
            alpha = _kohya_alpha(path, name, p.get("alpha"), rank)
        if not math.isfinite(alpha):
            raise LoRAError(f"{path}: {_layer(name)}.alpha = {alpha}; expected a finite number")
        lo.layers.setdefault(stage, {})[name] = LoRALayer(down, up, alpha)
    return lo


def _checked_matrix(path, name: str, what: str, t: Tensor) -> Tensor:
    """A down or up matrix, floating-point and finite. The 8-bit floats (float8_e4m3fn, ...; LoRAs ship
    in them) come back as float32, which holds each of their values exactly: torch can neither check
    them for NaN (isfinite) nor multiply them."""
    if not t.is_floating_point():
        raise LoRAError(f"{path}: {_layer(name)}.{what} has dtype {t.dtype}; expected a floating-point tensor")
    if t.dtype.itemsize == 1:
        try:
            t = t.float()
        except (NotImplementedError, RuntimeError):  # float4_e2m1fn_x2: torch cannot convert it either
            raise LoRAError(f"{path}: {_layer(name)}.{what} has dtype {t.dtype}, which torch cannot convert; "
                            "expected float32, float16, bfloat16 or a float8 type") from None
    if not torch.isfinite(t).all():
        raise LoRAError(f"{path}: {_layer(name)}.{what} holds NaN or infinite values")
    return t


def _kohya_alpha(path, name: str, t: Tensor | None, rank: int) -> float:
    """A kohya .alpha tensor -> alpha; missing or 0 means alpha = r (scale 1)."""
    if t is None:
        return float(rank)
    if t.numel() != 1 or t.is_complex():
        raise LoRAError(f"{path}: {_layer(name)}.alpha holds {t.numel()} {t.dtype} values; expected one real number")
    try:
        alpha = float(t.reshape(()).double())  # float64: a float64 alpha keeps its value
    except (NotImplementedError, RuntimeError):
        raise LoRAError(f"{path}: {_layer(name)}.alpha has dtype {t.dtype}, which torch cannot convert; "
                        "expected a real number") from None
    return alpha if alpha != 0 else float(rank)


def _split_kohya(path, sd: dict[str, Tensor]) -> dict[tuple[str, str], dict[str, Tensor]]:
    """kohya keys -> {(stage, underscored module name): {"down", "up", "alpha"}}."""
    parts, unknown = {}, []
    ends = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
    for key, t in sd.items():
        prefix = next((p for p in KOHYA_PREFIXES if key.startswith(p)), None)
        end = next((e for e in ends if key.endswith(e)), None)
        if prefix is None or end is None:
            unknown.append(key)
            continue
        name = key[len(prefix):-len(end)]
        parts.setdefault((KOHYA_PREFIXES[prefix], name), {})[ends[end]] = t
    if unknown:
        raise LoRAError(f"{path}: {len(unknown)} keys are not kohya LoRA keys (lora_unet_/lora_te_ + .lora_down.weight, "
                        f".lora_up.weight, .alpha), e.g. {_listed(unknown)}; LoHa, LoKr and DoRA are not supported")
    return parts


def _split_dotted(path, sd: dict[str, Tensor]) -> dict[tuple[str, str], dict[str, Tensor]]:
    """peft / legacy diffusers keys -> {(stage, dotted module name): {"down", "up", "alpha"}}."""
    parts, unknown = {}, []
    for key, t in sd.items():
        prefix = next((p for p in DOTTED_PREFIXES if key.startswith(p)), "")
        rest = key[len(prefix):]
        row = next((r for r in DOTTED_SUFFIXES if rest.endswith(r[0])), None)
        if row is None:
            unknown.append(key)
            continue
        end, module_suffix, what = row
        name = rest[:-len(end)] + module_suffix
        parts.setdefault((DOTTED_PREFIXES.get(prefix, "unet"), name), {})[what] = t
    if unknown:
        raise LoRAError(f"{path}: {len(unknown)} keys are not LoRA keys of a known format (kohya lora_unet_*, "
                        f"peft *.lora_A.weight, diffusers *.lora.down.weight / *_lora.down.weight), "
                        f"e.g. {_listed(unknown)}")
    return parts


MAX_PATTERN_KEYS = 4096       # SD 1.x adapts ~350 modules, SDXL ~800: one key per module at most
MAX_PATTERN_KEY_CHARS = 256   # a diffusers module name is under 80 characters
REGEX_SYNTAX = frozenset("\\^$*+?{}[]()|")  # regex syntax, '.' aside (module names are full of dots)
JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
              type(None): "null"}


def _peft_alphas(path, metadata: dict[str, str]) -> dict[str, dict]:
    """{stage: {"lora_alpha", "alpha_pattern", "use_rslora"}} from diffusers' "lora_adapter_metadata";
    alpha_pattern as {module name: (its position, alpha)} (see _alpha_pattern)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    where = f"{path}: metadata lora_adapter_metadata"
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as e:  # not JSON, an int past Python's 4,300 digits, nested too deep
        raise LoRAError(f"{where} is not JSON ldm can read ({checkpoint.one_line(e, 120)})") from None
    if not isinstance(meta, dict):
        raise LoRAError(f"{where} is a JSON {JSON_TYPES.get(type(meta), type(meta).__name__)}; expected an object "
                        '({"unet.r": 4, "unet.lora_alpha": 4, ...})')
    out = {}
    for stage in STAGES:
        cfg = {k[len(stage) + 1:]: v for k, v in meta.items() if k.startswith(stage + ".")}
        if not cfg:
            continue
        if cfg.get("use_dora"):
            raise LoRAError(f"{path}: a DoRA adapter ({stage}.use_dora = true); ldm applies plain LoRA only")
        key = "lora_alpha" if "lora_alpha" in cfg else "r"
        alpha = None if cfg.get(key) is None else _metadata_number(where, f"{stage}.{key}", cfg[key])
        pattern = cfg.get("alpha_pattern") or {}
        if not isinstance(pattern, dict):
            raise LoRAError(f"{where}: {stage}.alpha_pattern is a JSON {JSON_TYPES.get(type(pattern), '?')}; "
                            "expected an object {module name: alpha}")
        out[stage] = {"lora_alpha": alpha, "alpha_pattern": _alpha_pattern(where, stage, pattern),
                      "use_rslora": bool(cfg.get("use_rslora"))}
    return out


def _metadata_number(where: str, what: str, value) -> float:
    """A number from the metadata as a finite float (a JSON integer can be too large for one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LoRAError(f"{where}: {what} = {_quote(value)}; expected a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise LoRAError(f"{where}: {what} = {_quote(value)}; expected a finite number")
    return number


def _alpha_pattern(where: str, stage: str, pattern: dict) -> dict[str, tuple[int, float]]:
    """peft's alpha_pattern {key: alpha} -> {key: (its position, alpha)}, each key checked to be a module name.

    peft gives a module the alpha of the first key for which re.match(rf"(.*\\.)?({key})$", name) holds.
    ldm never runs a regular expression taken from a file: one like "(a+)+b" takes exponential time
    on a name like "aaa...a". peft and diffusers write module names here (to_q, down_blocks.0.
    attentions.0.proj_in), and for those the rule reads "the key is the name, or the end of the name
    after a dot", which `_pattern_alpha` checks with dictionary look-ups. A key with any other regex
    syntax is refused, and '.' means a dot (peft's regex would let it match any character).
    """
    if len(pattern) > MAX_PATTERN_KEYS:
        raise LoRAError(f"{where}: {stage}.alpha_pattern has {len(pattern)} keys; at most {MAX_PATTERN_KEYS} "
                        "(one per adapted module)")
    index = {}
    for position, (key, alpha) in enumerate(pattern.items()):
        what = f"{stage}.alpha_pattern[{_quote(key)}]"
        if len(key) > MAX_PATTERN_KEY_CHARS:
            raise LoRAError(f"{where}: {what} has {len(key)} characters; a module name has at most "
                            f"{MAX_PATTERN_KEY_CHARS}")
        if not REGEX_SYNTAX.isdisjoint(key):
            raise LoRAError(f"{where}: {what} is a regular expression; ldm reads module names only "
                            "(to_q, down_blocks.0.attentions.0.proj_in), and never runs a regex from a file")
        index[key] = (position, _metadata_number(where, what, alpha))
    return index


def _pattern_alpha(index: dict[str, tuple[int, float]], name: str) -> float | None:
    """The alpha of the first alpha_pattern key that is `name` or a tail of it after a dot, else None."""
    # Only tails as short as the longest allowed key can match: the work is bounded for any name.
    tails = [name] if len(name) <= MAX_PATTERN_KEY_CHARS else []
    dot = name.find(".", max(0, len(name) - MAX_PATTERN_KEY_CHARS - 1))
    while dot != -1:
        tails.append(name[dot + 1:])
        dot = name.find(".", dot + 1)
    hits = [index[tail] for tail in tails if tail in index]
    return min(hits)[1] if hits else None


def _peft_alpha_for(cfg: dict | None, name: str, rank: int) -> float:
    """peft's alpha for a module: the first alpha_pattern key matching the end of its name, else lora_alpha.

    Returned as the alpha of scale = alpha / r (rsLoRA's alpha / sqrt(r) is folded in)."""
    if cfg is None or cfg["lora_alpha"] is None:
        return float(rank)  # no metadata: scale 1
    alpha = _pattern_alpha(cfg["alpha_pattern"], name)
    alpha = cfg["lora_alpha"] if alpha is None else alpha
    return alpha * (math.sqrt(rank) if cfg["use_rslora"] else 1.0)


# 3. Matching names: the table of every adaptable module -------------------------------------------
def _unet_key_map_config(unet: nn.Module) -> checkpoint.KeyMapConfig:
    cfg = unet.cfg
    levels = len(cfg.channel_mult)
    return checkpoint.KeyMapConfig(unet_levels=levels, unet_layers_per_block=cfg.num_res_blocks,
                                   unet_attention_levels=tuple(l for l in range(levels)
                                                               if 2**l in cfg.attention_resolutions))


def _diffusers_names(stage: str, name: str, rows: list[tuple[str, str, str]]) -> list[str]:
    """The diffusers names of our module `name`: the key map's rows read backwards (longest prefix first)."""
    out = []
    for d, c, inner in rows:
        if name != c and not name.startswith(c + "."):
            continue
        rest = name[len(c) + 1:]
        if inner:
            inverse = {v: k for k, v in checkpoint.INNER_RENAMES[inner].items()}
            if rest not in inverse:
                continue
            rest = inverse[rest]
        out.append(".".join(p for p in (d, rest) if p))
        if stage == "unet":  # the UNet's rows do not overlap: the longest one is the answer
            break
    return out


def module_table(stage: str, model: nn.Module) -> dict[str, str]:
    """{every name a LoRA file may use for a module: our module name}, for each Linear and Conv2d.

    Aliases: our (CompVis) name, its diffusers name(s) from ldm.checkpoint.key_map, and each of
    them with "." replaced by "_" (kohya's spelling).
    """
    if stage == "unet":
        rows = checkpoint.key_map(_unet_key_map_config(model))["unet"]
    elif stage == "text_encoder":
        rows = checkpoint.key_map()["text_encoder"]
    else:
        raise ValueError(f"stage={stage!r}; allowed: {', '.join(STAGES)}")
    rows = sorted(rows, key=lambda r: -len(r[1]))
    table: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        for alias in {name, *_diffusers_names(stage, name, rows)}:
            for spelling in (alias, alias.replace(".", "_")):
                if table.setdefault(spelling, name) != name:
                    raise LoRAError(f"{stage}: the LoRA name {spelling!r} would match both {table[spelling]!r} "
                                    f"and {name!r}")
    return table


# 4. Applying: merged into the weights, or kept beside them -----------------------------------------
class Applied:
    """What `apply` did; `unmerge()` undoes it (the original weight tensors come back, bit for bit)."""

    def __init__(self, merged: bool):
        self.merged = merged
        self.originals: list[tuple[nn.Parameter, Tensor, Tensor]] = []  # (param, original, merged)
        self.hooks: list = []
        self.num_modules = 0
        self.active = True

    def unmerge(self) -> None:
        """Restore the weights (merged mode) or remove the forward hooks (unmerged mode)."""
        if not self.active:
            raise LoRAError("this LoRA was already unmerged")
        for param, _, merged in self.originals:
            if param.data.data_ptr() != merged.data_ptr():
                raise LoRAError("a weight changed after this LoRA was merged: unmerge LoRAs in the reverse "
                                "order of apply()")
        for param, original, _ in reversed(self.originals):
            param.data = original
        for hook in self.hooks:
            hook.remove()
        self.originals, self.hooks, self.active = [], [], False

    def __enter__(self) -> Applied:
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self.unmerge()

    def __repr__(self) -> str:
        state = ("merged" if self.merged else "hooked") if self.active else "undone"
        return f"Applied({self.num_modules} modules, {state})"


def _lora_forward_hook(adapters: list[tuple[Tensor, Tensor, float]]):
    """A forward hook adding sum_i c_i up_i(down_i(x)) to a Linear's or Conv2d's output."""
    def hook(module, inputs, output):
        x = inputs[0]
        for down, up, c in adapters:
            if isinstance(module, nn.Linear):
                h = F.linear(F.linear(x, down), up)
            else:  # down has the module's kernel, stride and padding; up is 1x1
                h = F.conv2d(F.conv2d(x, down, None, module.stride, module.padding, module.dilation), up)
            output = output + c * h
        return output
    return hook


def _weight(value, where: str) -> float:
    try:
        finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        raise LoRAError(f"{where}: weight {_quote(value)} is not a finite number")
    return float(value)


def _scaled_delta(path: str, where: str, layer: LoRALayer, m: float, dtype: torch.dtype) -> Tensor:
    """m * alpha / r * up @ down in float32, refused unless it is finite in float32 and in the model's
    dtype: huge values, alpha or weight are named here, before a weight changes, not found later as a
    NaN image that seems to blame the checkpoint."""
    delta = (m * layer.scale) * layer.delta()
    if not torch.isfinite(delta.to(dtype)).all():
        largest = layer.delta().abs().max().item()
        raise LoRAError(f"{path}: {where}: weight {m:g} x alpha/rank {layer.scale:g} x up @ down (largest "
                        f"{largest:.3g}) is not finite in {dtype}; the LoRA's numbers or its weight are too large")
    return delta


def _prepare(model: nn.Module, stage: str, target: str, adapters: list[tuple[str, LoRALayer, float]],
             merge: bool) -> tuple[nn.Module, object]:
    """(module, its merged weight) or (module, the adapters its forward hook adds), every number checked."""
    module = model.get_submodule(target)
    w, where = module.weight, f"{stage} {target}"
    deltas = [_scaled_delta(path, where, layer, m, w.dtype) for path, layer, m in adapters]
    files = ", ".join(dict.fromkeys(path for path, _, _ in adapters))
    if not merge:
        hooked = [(layer.down.to(w.device, w.dtype), layer.up.to(w.device, w.dtype), m * layer.scale)
                  for _, layer, m in adapters]
        if not all(torch.isfinite(down).all() and torch.isfinite(up).all() for down, up, _ in hooked):
            raise LoRAError(f"{files}: {where}: down or up is not finite in {w.dtype}; its values are too large")
        return module, hooked
    merged = (w.data.float() + sum(deltas).to(w.device)).to(w.dtype)
    if not torch.isfinite(merged).all():
        why = ("the model's weight already holds NaN or infinite values" if not torch.isfinite(w.data).all()
               else f"the merged weight W + delta is not finite in {w.dtype}; lower the weight")
        raise LoRAError(f"{files}: merging into {where}: {why}")
    return module, merged


def apply(text_encoder: nn.Module | None, unet: nn.Module | None, loras: list, *, merge: bool = True,
          strict: bool = True) -> Applied:
    """Apply [(LoRA or path, weight), ...] to the models; returns the handle that undoes it.

    merge=True adds m * alpha / r * up @ down to each weight (new tensors; the originals are kept, so
    unmerge is exact). merge=False leaves the weights alone and adds m * scale * up(down(x)) in a
    forward hook. strict=False skips names matching no module. Everything is read and checked first
    (names, shapes, and that every delta and merged weight is finite): on an error nothing has changed.
    """
    models = {"unet": unet, "text_encoder": text_encoder}
    plan: dict[tuple[str, str], list[tuple[str, LoRALayer, float]]] = {}
    for i, item in enumerate(loras):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise LoRAError(f"loras[{i}] = {_quote(item)}; expected a (LoRA or path, weight) pair")
        lo, weight = item
        lo = lo if isinstance(lo, LoRA) else read(lo)
        weight = _weight(weight, lo.path)
        for stage, layers in lo.resolve(models, strict=strict).items():
            for target, layer in layers.items():
                plan.setdefault((stage, target), []).append((lo.path, layer, weight))
    changes = [_prepare(models[stage], stage, target, adapters, merge) for (stage, target), adapters in plan.items()]
    handle = Applied(merge)
    for module, change in changes:  # all checked: from here on nothing can fail halfway
        if merge:
            handle.originals.append((module.weight, module.weight.data, change))
            module.weight.data = change
        else:
            handle.hooks.append(module.register_forward_hook(_lora_forward_hook(change)))
    handle.num_modules = len(plan)
    log.info("LoRA: %d modules %s", len(plan), "merged" if merge else "hooked")
    return handle


def parse_spec(text: str) -> tuple[str, float]:
    """'PATH[:WEIGHT]' (the CLI's --lora) -> (path, weight); the weight defaults to 1.0.

    A text naming an existing file or folder is the path whole (my:style.safetensors); otherwise the
    text after the last colon is the weight, unless a path separator follows the colon
    (C:\\loras\\x.safetensors).
    """
    if os.path.exists(text):
        return text, 1.0
    path, sep, tail = text.rpartition(":")
    if not sep or "/" in tail or "\\" in tail or not path:
        return text, 1.0
    try:
        weight = float(tail)
    except ValueError:
        raise LoRAError(f"--lora {_quote(text, 100)}: the weight {_quote(tail, 40)} is not a number; use PATH or "
                        "PATH:WEIGHT (e.g. style.safetensors:0.8)") from None
    if not math.isfinite(weight):
        raise LoRAError(f"--lora {_quote(text, 100)}: the weight {_quote(tail, 40)} is not a finite number")
    return path, weight
