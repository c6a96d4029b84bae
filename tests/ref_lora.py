"""Random LoRA files in the layouts users download, for tests and benchmarks (no hub access here)."""
from __future__ import annotations

import re

import torch
from safetensors.torch import save_file
from torch import nn

from ldm import lora

# The modules LCM-LoRA for SD 1.5 (latent-consistency/lcm-lora-sdv1-5) adapts: every attention and
# feed-forward projection, proj_in/out, the ResBlocks' convs, skips and time projections, the
# down/upsampling convs: 278 modules, rank 64, alpha 64, 67.25M parameters (134.6 MB in fp16).
LCM_TARGETS = (r"(to_q|to_k|to_v|to_out\.0|ff\.net\.0\.proj|ff\.net\.2|proj_in|proj_out|in_layers\.2|"
               r"out_layers\.3|skip_connection|emb_layers\.1|\.op|\d\.conv)$")


def targets(model: nn.Module, pattern: str, exclude: tuple[str, ...] = ()) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and re.search(pattern, n)
            and n not in exclude]


def lcm_shaped(unet: nn.Module, seed: int = 0, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """A kohya state dict (diffusers block names, fp16) shaped like LCM-LoRA SD 1.5 for `unet`
    (a meta-device UNet is enough: only the weight shapes are read)."""
    g = torch.Generator().manual_seed(seed)
    table = lora.module_table("unet", unet)
    spelled = {n: a for a, n in table.items() if a.startswith(("down_", "mid_", "up_")) and "." not in a}
    sd = {}
    for name in targets(unet, LCM_TARGETS):
        w = unet.get_submodule(name).weight
        key = "lora_unet_" + spelled[name]
        sd[f"{key}.lora_down.weight"] = (torch.randn(64, *w.shape[1:], generator=g) * scale).half()
        sd[f"{key}.lora_up.weight"] = (torch.randn(w.shape[0], 64, *((1, 1) if w.ndim == 4 else ()), generator=g)
                                       * scale).half()
        sd[f"{key}.alpha"] = torch.tensor(64.0).half()
    return sd


def write_lcm_shaped(path, unet: nn.Module, seed: int = 0):
    save_file(lcm_shaped(unet, seed), str(path))
    return path
