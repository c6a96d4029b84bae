"""What a LoRA file holds, normalised (LoRALayer, LoRA), and the table that turns the names it uses into
our module names (module_table); with LoRAError and the quoting every message about a file goes through.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from torch import Tensor, nn

from ldm import checkpoint

log = logging.getLogger(__name__)

__all__ = ["LoRA", "LoRALayer", "LoRAError", "STAGES", "module_table"]

STAGES = ("unet", "text_encoder")

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


# 3. A file, normalised ----------------------------------------------------------------------------
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
