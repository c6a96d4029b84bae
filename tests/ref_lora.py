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


# ---- SDXL (tests/test_lora_sdxl.py) ---------------------------------------------------------------
# The LCM-LoRA for SDXL (latent-consistency/lcm-lora-sdxl) adapts the same kinds of modules in SDXL's
# UNet: 788 modules, rank 64, alpha 64, 196,751,360 parameters, kohya keys with diffusers block names,
# fp16: 393,854,592 bytes (DESIGN.md section 5, "SDXL").
LCM_SDXL_MODULES, LCM_SDXL_PARAMS, LCM_SDXL_BYTES = 788, 196_751_360, 393_854_592


def diffusers_spelling(unet: nn.Module) -> dict[str, str]:
    """{our UNet module name: its diffusers name} (conv_in, down_blocks..., add_embedding...), from the table."""
    table = lora.module_table("unet", unet)
    return {n: a for a, n in table.items() if "." in a and a != n}


def lcm_sdxl_shaped(unet: nn.Module, rank: int = 64) -> dict[str, torch.Tensor]:
    """The keys and shapes of the LCM-LoRA for SDXL for `unet` (a meta-device UNet is enough): kohya keys
    with diffusers block names, fp16 matrices on the meta device (shapes, no memory), alpha = rank."""
    spelled = diffusers_spelling(unet)
    sd = {}
    for name in targets(unet, LCM_TARGETS):
        w = unet.get_submodule(name).weight
        key = "lora_unet_" + spelled[name].replace(".", "_")
        sd[f"{key}.lora_down.weight"] = torch.empty(rank, *w.shape[1:], dtype=torch.float16, device="meta")
        sd[f"{key}.lora_up.weight"] = torch.empty(w.shape[0], rank, *((1, 1) if w.ndim == 4 else ()),
                                                  dtype=torch.float16, device="meta")
        sd[f"{key}.alpha"] = torch.tensor(float(rank), dtype=torch.float16)
    return sd


def safetensors_size(sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """The bytes safetensors' save_file would write for `sd`, without the data: 8 + the JSON header, padded
    to 8 bytes with spaces, + every tensor's bytes (safetensors' own layout: names sorted, compact JSON)."""
    import json

    dtypes = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name in sorted(sd, key=lambda k: (-sd[k].dtype.itemsize, k)):
        n = sd[name].numel() * sd[name].dtype.itemsize
        header[name] = {"dtype": dtypes[sd[name].dtype], "shape": list(sd[name].shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":"))
    return 8 + len(text) + (-len(text)) % 8 + offset
