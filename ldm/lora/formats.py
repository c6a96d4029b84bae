"""Reading a LoRA file: the kohya, peft and legacy diffusers formats (see ldm.lora's docstring) -> a LoRA.

Keys are split into (stage, module name as the file spells it) -> down / up / alpha, every matrix is
checked (floating-point, finite, shapes that agree), and alpha comes from kohya's .alpha tensors or
from peft's adapter metadata (lora_alpha, alpha_pattern, use_rslora; per stage). Keys that name SDXL's
towers (lora_te1_ / lora_te2_, text_encoder_2.) mark the LoRA as made for SDXL (LoRA.made_for).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from torch import Tensor

from ldm import checkpoint
from ldm.lora.layers import LoRA, LoRAError, LoRALayer, _layer, _listed, _quote, all_finite

__all__ = ["FORMATS", "KOHYA_PREFIXES", "KOHYA_SDXL_PREFIXES", "DOTTED_PREFIXES", "read", "from_state_dict"]

FORMATS = ("kohya", "peft", "legacy")

# kohya's key prefix -> the stage it adapts (the pipeline's stage names, which are diffusers' components)
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}              # SD 1.x / 2.x (and SDXL's unet)
KOHYA_SDXL_PREFIXES = {"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}  # SDXL's two text towers
# dotted formats: the file's component prefix -> our stage (no prefix: the UNet, as diffusers assumes)
DOTTED_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2",
                   "base_model.model.": "unet"}
SDXL_ONLY_STAGES = ("text_encoder_2",)  # a file that adapts it was made for SDXL
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


# 1. Keys -> {(stage, module name): {down, up, alpha}} ---------------------------------------------
def _split_kohya(path, sd: dict[str, Tensor]) -> dict[tuple[str, str], dict[str, Tensor]]:
    """kohya keys -> {(stage, underscored module name): {"down", "up", "alpha"}}."""
    parts, unknown = {}, []
    ends = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
    prefixes = {**KOHYA_PREFIXES, **KOHYA_SDXL_PREFIXES}
    for key, t in sd.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        end = next((e for e in ends if key.endswith(e)), None)
        if prefix is None or end is None:
            unknown.append(key)
            continue
        name = key[len(prefix):-len(end)]
        parts.setdefault((prefixes[prefix], name), {})[ends[end]] = t
    if unknown:
        raise LoRAError(f"{path}: {len(unknown)} keys are not kohya LoRA keys (lora_unet_/lora_te_/lora_te1_/"
                        f"lora_te2_ + .lora_down.weight, .lora_up.weight, .alpha), e.g. {_listed(unknown)}; LoHa, LoKr "
                        "and DoRA are not supported")
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


# 2. The matrices, and kohya's alpha ---------------------------------------------------------------
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
    if not all_finite(t):
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


# 3. peft's alpha: the adapter metadata ------------------------------------------------------------
MAX_PATTERN_KEYS = 4096       # SD 1.x adapts ~350 modules, SDXL ~800: one key per module at most
MAX_PATTERN_KEY_CHARS = 256   # a diffusers module name is under 80 characters
REGEX_SYNTAX = frozenset("\\^$*+?{}[]()|")  # regex syntax, '.' aside (module names are full of dots)
JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
              type(None): "null"}


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


def _peft_alphas(path, metadata: dict[str, str], stages) -> dict[str, dict]:
    """{stage: {"lora_alpha", "alpha_pattern", "use_rslora"}} for each of `stages` (the file's) from diffusers'
    "lora_adapter_metadata" (keys "unet.r", "text_encoder_2.lora_alpha", ...); alpha_pattern as
    {module name: (its position, alpha)} (see _alpha_pattern)."""
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
    for stage in sorted(stages):
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


# 4. Reading ---------------------------------------------------------------------------------------
def _made_for(keys: list[str], stages: set[str]) -> tuple[str, str] | None:
    """("SDXL", the keys that say so) for a file whose keys name SDXL's towers, else None (SD 1.x/2.x and
    SDXL files share lora_unet_ / unet. keys: their shapes tell them apart, LoRA.mismatch)."""
    found = [p for p in KOHYA_SDXL_PREFIXES if any(k.startswith(p) for k in keys)] or \
        [f"{s}." for s in SDXL_ONLY_STAGES if s in stages]
    return ("SDXL", f"{' and '.join(found)} keys") if found else None


def from_state_dict(state_dict: dict, metadata: dict[str, str] | None = None, *, path: str = "<state_dict>") -> LoRA:
    """Normalise a LoRA state dict (see the formats in ldm.lora's docstring); raises LoRAError on anything odd."""
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
    if any(k.startswith((*KOHYA_PREFIXES, *KOHYA_SDXL_PREFIXES)) for k in keys):
        parts, fmt = _split_kohya(path, state_dict), "kohya"
    else:
        parts = _split_dotted(path, state_dict)
        fmt = "peft" if any(".lora_A." in k or ".lora_B." in k for k in keys) else "legacy"
    stages = {stage for stage, _ in parts}
    alphas = _peft_alphas(path, metadata or {}, stages) if fmt == "peft" else {}
    lo = LoRA(path, fmt, made_for=_made_for(keys, stages))
    for (stage, name), p in parts.items():
        if "down" not in p or "up" not in p:
            missing = "up" if "down" in p else "down"
            of = f"{stage} of an {lo.made_for[0]} LoRA" if lo.made_for else stage
            raise LoRAError(f"{path}: {_layer(name)} ({of}) has no {missing} matrix")
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
