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
from ldm.lora.layers import LoRA, LoRAError, LoRALayer, _quote

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


# 3. apply, and the CLI's PATH[:WEIGHT] ------------------------------------------------------------
def apply(models: Mapping[str, nn.Module | None], loras: list, *, merge: bool = True,
          strict: bool = True) -> Applied:
    """Apply [(LoRA or path, weight), ...] to the networks `models` (stage -> network, e.g. pipe.stages or
    {"text_encoder": te, "unet": unet}); returns the handle that undoes it. A LoRA's layers name their
    stage (lora_unet_ -> "unet", lora_te_ -> "text_encoder"); a stage it adapts must be in `models`.

    merge=True adds m * alpha / r * up @ down to each weight (new tensors; the originals are kept, so
    unmerge is exact). merge=False leaves the weights alone and adds m * scale * up(down(x)) in a
    forward hook. strict=False skips names matching no module. Everything is read and checked first
    (names, shapes, and that every delta and merged weight is finite): on an error nothing has changed.
    """
    if not isinstance(models, Mapping):
        raise TypeError(f"models={type(models).__name__}; expected a mapping stage -> network "
                        f"(pipe.stages, or {{'text_encoder': te, 'unet': unet}})")
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
