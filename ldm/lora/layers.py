"""What a LoRA file holds, normalised (LoRALayer, LoRA), and the tables that turn the names it uses into
our modules (module_table, targets: UNet, CLIP and OpenCLIP towers); which family a file that does not fit
was made for; LoRAError and the quoting every message about a file goes through.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ldm import checkpoint, families
from ldm.clip import CLIPTextModel
from ldm.openclip import OpenCLIPTextModel
from ldm.unet import UNetModel

log = logging.getLogger(__name__)

__all__ = ["LoRA", "LoRALayer", "LoRAError", "Target", "NAMINGS", "OPENCLIP_NAMES", "module_table", "targets",
           "family_title"]

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


def all_finite(t: Tensor) -> bool:
    """No NaN or infinity in the floating-point `t`. Its largest and smallest values say it (a NaN propagates
    through both): ten times faster than isfinite(t).all() on the fp16 tensors LoRAs ship in, which
    matters for the ~200M numbers of an SDXL LoRA and the 2.6G of SDXL's merged weights. A tensor on the
    meta device holds no numbers (shapes only: a LoRA checked against a meta-device model)."""
    if t.numel() == 0 or t.is_meta:
        return True
    return bool(torch.isfinite(t.amax()) and torch.isfinite(t.amin()))


# 1. One adapted module ----------------------------------------------------------------------------
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


# 2. Matching names: the table of every adaptable module -------------------------------------------
@dataclass(frozen=True)
class Target:
    """Where a LoRA layer lands: the weight of the Linear / Conv2d `module`, or, for a layer that a file
    names as one of q_proj / k_proj / v_proj, the rows [start, stop) of the fused (3C, C) `param` that
    the OpenCLIP towers keep (ldm.openclip: in_proj_weight holds [W_q; W_k; W_v])."""
    module: str
    param: str = "weight"
    rows: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        """How tables and messages name it: the module, or param[start:stop] for a row block."""
        return self.module if self.rows is None else f"{self.module}.{self.param}[{self.rows[0]}:{self.rows[1]}]"


def _unet_key_map_config(unet: nn.Module) -> checkpoint.KeyMapConfig:
    cfg = unet.cfg
    levels = len(cfg.channel_mult)
    return checkpoint.KeyMapConfig(unet_levels=levels, unet_layers_per_block=cfg.num_res_blocks,
                                   unet_attention_levels=tuple(l for l in range(levels)
                                                               if 2**l in cfg.attention_resolutions),
                                   unet_label_emb=cfg.adm_in_channels is not None)


def _diffusers_names(name: str, rows: list[tuple[str, str, str]], first_only: bool) -> list[str]:
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
        if first_only:  # the UNet's rows do not overlap: the longest one is the answer
            break
    return out


def _linear_or_conv(model: nn.Module):
    return ((n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def _keyed_names(model: nn.Module, rows, first_only: bool) -> dict[str, set[str]]:
    rows = sorted(rows, key=lambda r: -len(r[1]))
    return {name: {name, *_diffusers_names(name, rows, first_only)} for name, _ in _linear_or_conv(model)}


def _unet_names(model: UNetModel) -> dict[Target, set[str]]:
    """A UNet's modules under our (CompVis) names and diffusers' (ldm.checkpoint's key map for its blocks:
    any number of levels and transformer depths, SDXL's label_emb = add_embedding)."""
    rows = checkpoint.key_map(_unet_key_map_config(model))["unet"]
    return {Target(n): names for n, names in _keyed_names(model, rows, first_only=True).items()}


def _clip_names(model: CLIPTextModel) -> dict[Target, set[str]]:
    """CLIP ViT-L (SD 1.x, SDXL's first tower): transformers' names are ours, with or without text_model."""
    return {Target(n): names for n, names in _keyed_names(model, checkpoint.key_map()["text_encoder"], False).items()}


# The OpenCLIP towers (SD 2.x's ViT-H, SDXL's bigG) keep open_clip's names in ldm; LoRA files name them as
# transformers' CLIPTextModel(WithProjection) does (diffusers converts the towers to it). Inside block N
# (theirs text_model.encoder.layers.N, ours transformer.resblocks.N): their name -> our module, or the
# row block (0: q, 1: k, 2: v) of the fused attn.in_proj_weight.
OPENCLIP_NAMES = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2,
                  "self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def _openclip_names(model: OpenCLIPTextModel) -> dict[Target, set[str]]:
    C = model.config.width
    out: dict[Target, set[str]] = {}
    for i in range(len(model.transformer.resblocks)):
        ours = f"transformer.resblocks.{i}"
        for theirs, where in OPENCLIP_NAMES.items():
            if isinstance(where, int):
                target, names = Target(f"{ours}.attn", "in_proj_weight", (where * C, (where + 1) * C)), set()
            else:
                target, names = Target(f"{ours}.{where}"), {f"{ours}.{where}"}
            out[target] = names | {f"text_model.encoder.layers.{i}.{theirs}", f"encoder.layers.{i}.{theirs}"}
    return out


# Which names each kind of network has in LoRA files. A stage is adapted by what it holds, so a family's
# text towers need no list here: CLIP-L under text_encoder (SD 1.x, SDXL), an OpenCLIP tower under
# text_encoder (SD 2.x) or text_encoder_2 (SDXL).
NAMINGS = ((UNetModel, _unet_names), (CLIPTextModel, _clip_names), (OpenCLIPTextModel, _openclip_names))


def targets(stage: str, model: nn.Module) -> dict[str, Target]:
    """{every name a LoRA file may use for a module of `model`: where it lands}; each name also with
    "." replaced by "_" (kohya's spelling)."""
    naming = next((f for cls, f in NAMINGS if isinstance(model, cls)), None)
    if naming is None:
        raise LoRAError(f"stage {stage!r} holds a {type(model).__name__}, which LoRA files do not adapt; ldm.lora "
                        f"knows the names of {', '.join(cls.__name__ for cls, _ in NAMINGS)}")
    table: dict[str, Target] = {}
    for target, names in naming(model).items():
        for alias in names:
            for spelling in (alias, alias.replace(".", "_")):
                if table.setdefault(spelling, target) != target:
                    raise LoRAError(f"{stage}: the LoRA name {spelling!r} would match both {table[spelling].name!r} "
                                    f"and {target.name!r}")
    return table


def module_table(stage: str, model: nn.Module) -> dict[str, str]:
    """{every name a LoRA file may use for a module: our module name}, for each Linear and Conv2d (and
    the q/k/v row blocks of an OpenCLIP tower's in_proj_weight, named param[start:stop]: Target.name).

    Aliases: our (CompVis / open_clip) name, its diffusers / transformers name(s) (ldm.checkpoint.key_map,
    OPENCLIP_NAMES), and each of them with "." replaced by "_" (kohya's spelling).
    """
    return {alias: target.name for alias, target in targets(stage, model).items()}


# 3. Which family a file was made for, when it does not fit ----------------------------------------
def _short(title: str) -> str:
    return title.split(" (")[0]  # "SD 2.x (512-base)" -> "SD 2.x"


def family_title(models) -> str:
    """How messages name the family of the networks `models` (stage -> network): the first supported
    ldm.families record whose stages hold those classes and whose UNet traits (input channels, linear
    projections, a vector y) the UNet has; "an unknown family" if none does."""
    given = {s: m for s, m in models.items() if m is not None}
    unet = given.get("unet")
    for fam in families.supported():
        if not set(given) <= set(fam.stage_names) or not all(isinstance(m, fam.models[s]) for s, m in given.items()):
            continue
        ucfg = fam.configs["unet"]
        if unet is not None and (unet.cfg.in_channels, unet.cfg.use_linear_in_transformer,
                                 unet.cfg.adm_in_channels is None) != (ucfg.in_channels, fam.linear_proj,
                                                                       ucfg.adm_in_channels is None):
            continue
        return _short(fam.title)
    return "an unknown family"


def _context_families() -> dict[int, str]:
    """The width of the text context each family's UNet reads (attn2.to_k's input): 768 SD 1.x, ..."""
    out: dict[int, str] = {}
    for fam in families.supported():
        out.setdefault(fam.configs["unet"].context_dim, _short(fam.title))
    return out


# Names that only a UNet with more levels (SD 1.x / 2.x: 4) or deeper transformers (SDXL: 10) has.
FOUR_LEVELS = re.compile(r"(?:^|[._])(?:(?:down|up)_blocks[._]3|(?:input|output)_blocks[._](?:9|10|11))(?:[._]|$)")
DEEP = re.compile(r"(?:^|[._])transformer_blocks[._](\d{1,2})(?:[._]|$)")
CROSS_ATTENTION_K = ("attn2.to_k", "attn2_to_k", "attn2.to_v", "attn2_to_v")


def _unet_evidence(layers: dict[str, LoRALayer], unet: nn.Module) -> tuple[str, str, str] | None:
    """(family, why, what the pipeline's UNet has instead) when the file's UNet layers show another UNet
    than `unet`: a cross-attention key of another width, or names of a deeper or wider network; else None."""
    ctx = unet.cfg.context_dim
    for name, layer in layers.items():
        if name.endswith(CROSS_ATTENTION_K) and layer.down.ndim == 2 and layer.down.shape[1] != ctx:
            width = layer.down.shape[1]
            return (_context_families().get(width, "another model"), f"its attn2.to_k reads a {width}-wide text "
                    "context", f"a {ctx}-wide context")
    levels, depth = len(unet.cfg.channel_mult), max(unet.cfg.depths())
    for name in layers:
        if levels < 4 and FOUR_LEVELS.search(name):
            return "SD 1.x or 2.x", f"{_quote(name, 50)}: a UNet of 4 levels", f"{levels} levels"
        deep = DEEP.search(name)
        if deep and int(deep.group(1)) >= depth:
            return "SDXL", f"{_quote(name, 50)}: transformers {int(deep.group(1)) + 1} blocks deep", \
                f"transformers at most {depth} deep"
    return None


# 4. A file, normalised ----------------------------------------------------------------------------
@dataclass
class LoRA:
    """A LoRA file, normalised: layers[stage][name as the file spells it] -> LoRALayer.

    The names are the file's (kohya: underscores; peft/legacy: dotted diffusers paths); `resolve`
    turns them into our module names for a given model. made_for: (family, the keys that say so) when
    the keys name a family, e.g. ("SDXL", "lora_te2_ keys").
    """
    path: str
    format: str
    layers: dict[str, dict[str, LoRALayer]] = field(default_factory=dict)
    made_for: tuple[str, str] | None = None

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
        made_for = f", for {self.made_for[0]}" if self.made_for else ""
        return (f"LoRA({self.path!r}, format={self.format!r}{made_for}, modules={self.num_modules} ({per_stage}), "
                f"ranks={sorted(self.ranks)}, params={self.num_params:,})")

    def mismatch(self, models) -> str | None:
        """'this LoRA is for SDXL (lora_te2_ keys), the pipeline is SD 1.x' when the file shows that it was
        made for another family than the networks `models`, else None."""
        pipeline = family_title(models)
        evidence = [(*self.made_for, "")] if self.made_for else []
        if "unet" in self.layers and models.get("unet") is not None:
            evidence.append(_unet_evidence(self.layers["unet"], models["unet"]))
        for family, why, instead in filter(None, evidence):
            if pipeline not in family:
                instead = f" ({instead})" if instead else ""
                return f"this LoRA is for {family} ({why}), the pipeline is {pipeline}{instead}"
        return None

    def resolve(self, models: dict[str, nn.Module | None], strict: bool = True) -> dict[str, dict[str, LoRALayer]]:
        """{stage: {our module name (Target.name): layer}}, every name looked up in `module_table` and
        shape-checked (see `targets`). strict=False skips (and logs) names that match no module."""
        return {stage: {t.name: layer for t, layer in layers.items()}
                for stage, layers in self.targets(models, strict).items()}

    def targets(self, models: dict[str, nn.Module | None], strict: bool = True) -> dict[str, dict[Target, LoRALayer]]:
        """{stage: {Target: layer}}: where each layer lands in `models` (stage -> network), checked.

        A file made for another family (SDXL's lora_te1_ / lora_te2_ keys on SD 1.x, ...) is refused
        first, in one line; names that match no module (strict) and shapes that do not fit say which
        family the file shows, where it shows one.
        """
        if self.made_for and (why := self.mismatch(models)):
            raise LoRAError(f"{self.path}: {why}")
        out: dict[str, dict[Target, LoRALayer]] = {}
        for stage, layers in self.layers.items():
            model = models.get(stage)
            if model is None:
                raise LoRAError(f"{self.path}: has {len(layers)} {stage} layers but no {stage} was given")
            table = targets(stage, model)
            unmatched = [name for name in layers if name not in table]
            if unmatched and strict:
                why = self.mismatch(models)
                raise LoRAError(f"{self.path}: {why + ': ' if why else ''}{len(unmatched)} of {len(layers)} {stage} "
                                f"LoRA names match no module of the model, e.g. {_listed(unmatched)}"
                                f"{'' if why else '; is it a LoRA for another model family?'} "
                                "(pass strict=False to skip them)")
            if unmatched:
                log.warning("%s: skipping %d %s LoRA names that match no module, e.g. %s", self.path,
                            len(unmatched), stage, _listed(unmatched))
            resolved: dict[Target, LoRALayer] = {}
            for name, layer in layers.items():
                if name not in table:
                    continue
                target = table[name]
                if target in resolved:
                    raise LoRAError(f"{self.path}: two names in the file adapt the same module {target.name!r}")
                _check_shapes(self, models, name, layer, target, model)
                resolved[target] = layer
            out[stage] = resolved
        return out


def _check_shapes(lo: LoRA, models, name, layer: LoRALayer, target: Target, model: nn.Module) -> None:
    w = model.get_parameter(f"{target.module}.{target.param}")
    out_features = w.shape[0] if target.rows is None else target.rows[1] - target.rows[0]
    if w.ndim == 2:
        want_down, want_up = (layer.rank, w.shape[1]), (out_features, layer.rank)
    else:
        want_down, want_up = (layer.rank, *w.shape[1:]), (out_features, layer.rank, 1, 1)
    if tuple(layer.down.shape) != want_down or tuple(layer.up.flatten(1).shape) != want_up[:2] \
            or layer.up.ndim != len(want_up):
        if target.rows is None:
            what = f"{target.name} ({type(model.get_submodule(target.module)).__name__}, weight {tuple(w.shape)})"
        else:
            what = f"{target.name} (rows of the fused {target.param} {tuple(w.shape)})"
        why = lo.mismatch(models)
        raise LoRAError(f"{lo.path}: {why + ': ' if why else ''}{_layer(name)}: down {tuple(layer.down.shape)} and up "
                        f"{tuple(layer.up.shape)} do not fit {what}: expected down {want_down} and up {want_up}"
                        f"{'' if why else '; is it a LoRA for another model family (SD 2.x, SDXL)?'}")
