"""Applying LoRAs: merged into the weights (exactly undone by `Applied.unmerge`), or kept beside them in
forward hooks; every name, shape and number is checked before a weight changes. And parse_spec, the
CLI's --lora PATH[:WEIGHT].
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.lora.formats import read
from ldm.lora.layers import LoRA, LoRAError, LoRALayer, Target, _quote, all_finite

log = logging.getLogger(__name__)

__all__ = ["Applied", "apply", "parse_spec"]


# 1. The handle that undoes it ---------------------------------------------------------------------
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


# 2. Hooked or merged, every number checked first --------------------------------------------------
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
    if not all_finite(delta.to(dtype)):
        largest = layer.delta().abs().max().item()
        raise LoRAError(f"{path}: {where}: weight {m:g} x alpha/rank {layer.scale:g} x up @ down (largest "
                        f"{largest:.3g}) is not finite in {dtype}; the LoRA's numbers or its weight are too large")
    return delta


def _prepare(model: nn.Module, stage: str, module_name: str, param_name: str,
             parts: list[tuple[Target, list[tuple[str, LoRALayer, float]]]], merge: bool) -> tuple[object, object]:
    """(parameter, its merged value) or (module, the adapters its forward hook adds), every number checked.

    parts: [(target, [(file, layer, weight), ...])] for one parameter: the whole weight, or row blocks
    of a fused one (an OpenCLIP tower's q, k and v in in_proj_weight), each merged into its rows only."""
    param = model.get_parameter(f"{module_name}.{param_name}")
    files = ", ".join(dict.fromkeys(path for _, adapters in parts for path, _, _ in adapters))
    deltas = [(target, sum(_scaled_delta(path, f"{stage} {target.name}", layer, m, param.dtype)
                           for path, layer, m in adapters)) for target, adapters in parts]
    if not merge:  # only whole weights get here (apply refuses hooks on row blocks)
        (target, adapters), = parts
        hooked = [(layer.down.to(param.device, param.dtype), layer.up.to(param.device, param.dtype), m * layer.scale)
                  for _, layer, m in adapters]
        if not all(all_finite(down) and all_finite(up) for down, up, _ in hooked):
            raise LoRAError(f"{files}: {stage} {target.name}: down or up is not finite in {param.dtype}; its values "
                            "are too large")
        return model.get_submodule(module_name), hooked
    merged = param.data.to(torch.float32, copy=True)  # W, then W[rows] + delta for each target
    for target, delta in deltas:
        rows = slice(None) if target.rows is None else slice(*target.rows)
        merged[rows] += delta.to(param.device)
    merged = merged.to(param.dtype)
    if not all_finite(merged):
        where = f"{stage} {module_name}" + ("" if param_name == "weight" else f".{param_name}")
        why = ("the model's weight already holds NaN or infinite values" if not all_finite(param.data)
               else f"the merged weight W + delta is not finite in {param.dtype}; lower the weight")
        raise LoRAError(f"{files}: merging into {where}: {why}")
    return param, merged


# 3. apply, and the CLI's PATH[:WEIGHT] ------------------------------------------------------------
def apply(models: Mapping[str, nn.Module | None], loras: list, *, merge: bool = True,
          strict: bool = True) -> Applied:
    """Apply [(LoRA or path, weight), ...] to the networks `models` (stage -> network, e.g. pipe.stages or
    {"text_encoder": te, "unet": unet}); returns the handle that undoes it. A LoRA's layers name their
    stage (lora_unet_ -> "unet", lora_te_ / lora_te1_ -> "text_encoder", lora_te2_ -> "text_encoder_2");
    a stage it adapts must be in `models`, and a file made for another family is refused (LoRA.targets).

    merge=True adds m * alpha / r * up @ down to each weight (new tensors; the originals are kept, so
    unmerge is exact); a layer that lands on rows of a fused weight (q/k/v of an OpenCLIP tower's
    in_proj_weight) changes those rows only. merge=False leaves the weights alone and adds
    m * scale * up(down(x)) in a forward hook; it refuses row blocks (a hook sees the fused projection's
    output only after attention has used it). strict=False skips names matching no module. Everything
    is read and checked first (names, shapes, and that every delta and merged weight is finite): on an
    error nothing has changed.
    """
    if not isinstance(models, Mapping):
        raise TypeError(f"models={type(models).__name__}; expected a mapping stage -> network "
                        f"(pipe.stages, or {{'text_encoder': te, 'unet': unet}})")
    plan: dict[tuple[str, Target], list[tuple[str, LoRALayer, float]]] = {}
    for i, item in enumerate(loras):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise LoRAError(f"loras[{i}] = {_quote(item)}; expected a (LoRA or path, weight) pair")
        lo, weight = item
        lo = lo if isinstance(lo, LoRA) else read(lo)
        weight = _weight(weight, lo.path)
        for stage, layers in lo.targets(models, strict=strict).items():
            for target, layer in layers.items():
                plan.setdefault((stage, target), []).append((lo.path, layer, weight))
    rows = [(stage, t, adapters) for (stage, t), adapters in plan.items() if t.rows is not None]
    if rows and not merge:
        stage, t, adapters = rows[0]
        raise LoRAError(f"{adapters[0][0]}: merge=False cannot hook {len(rows)} q/k/v layers of {stage} (e.g. "
                        f"{t.name}): they are rows of a fused projection; apply them merged (merge=True, the default)")
    per_param: dict[tuple[str, str, str], list] = {}  # one change per parameter: its whole weight or its row blocks
    for (stage, target), adapters in plan.items():
        per_param.setdefault((stage, target.module, target.param), []).append((target, adapters))
    changes = [_prepare(models[stage], stage, module, param, parts, merge)
               for (stage, module, param), parts in per_param.items()]
    handle = Applied(merge)
    for owner, change in changes:  # all checked: from here on nothing can fail halfway
        if merge:
            handle.originals.append((owner, owner.data, change))
            owner.data = change
        else:
            handle.hooks.append(owner.register_forward_hook(_lora_forward_hook(change)))
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
