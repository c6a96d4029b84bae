"""Reference builders for the UNet: diffusers' UNet2DConditionModel on the same weights as ours.

SD 1.x, SD 2.x and SDXL configs alike: diffusers_unet_config translates num_head_channels (SD 2.x's
head dim 64) into diffusers' per-level head counts, use_linear_in_transformer into
use_linear_projection, a per-level transformer_depth (SDXL's (1, 2, 10)) into
transformer_layers_per_block (diffusers' mid block takes its last entry, as sgm's does), and
adm_in_channels into a "projection" class embedding.

Our model is built first (its state_dict has the CompVis checkpoint names), then converted
with diffusers' own single-file converter `convert_ldm_unet_checkpoint`, which knows the real
CompVis key names: a wrong name in ldm/unet.py shows up as a missing key when the converted
dict is loaded into diffusers with strict=True. The diffusers model is built on the meta
device and takes our tensors with `assign=True`, so a full-size pair costs one weight init.

diffusers is imported inside the functions, so `import ref_unet` works without it.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from ldm.unet import UNetConfig, UNetModel
from ldm.weights import random_init_

# The stored reference file must stay under 1 MB: tiny() has 1.1M parameters, so the stored
# case uses tiny() with one level width and one ResBlock per level (still: down, attention,
# middle, skips, up), and stores its weights as float16 (exactly representable values; the
# model runs them in float32).
STORED_CONFIG = dataclasses.replace(UNetConfig.tiny(), channel_mult=(1, 1), num_res_blocks=1)


def diffusers_unet_config(cfg: UNetConfig) -> dict:
    """kwargs for diffusers.UNet2DConditionModel that build the same network as `cfg`."""
    attn = [2 ** level in cfg.attention_resolutions for level in range(len(cfg.channel_mult))]
    return dict(
        sample_size=cfg.sample_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks,
        transformer_layers_per_block=cfg.transformer_depth,  # an int, or per level (diffusers: mid = the last)
        cross_attention_dim=cfg.context_dim,
        # diffusers' name for the number of heads (SD 1.x: 8; SD 2.x: per level, [5, 10, 20, 20]; SDXL [5, 10, 20])
        attention_head_dim=(cfg.num_heads if cfg.num_head_channels is None
                            else tuple(cfg.heads(cfg.model_channels * m)[0] for m in cfg.channel_mult)),
        norm_num_groups=32,
        norm_eps=1e-5,
        flip_sin_to_cos=True,
        freq_shift=0,
        act_fn="silu",
        use_linear_projection=cfg.use_linear_in_transformer,
        # a vector y through label_emb: diffusers' class embedding of type "projection" is the same MLP
        # (linear_1, SiLU, linear_2) added to the time embedding; its converter maps label_emb.0.{0,2} to it
        **({} if cfg.adm_in_channels is None else
           dict(class_embed_type="projection", projection_class_embeddings_input_dim=cfg.adm_in_channels)),
    )


def ours(cfg: UNetConfig, seed: int = 0, **kwargs) -> UNetModel:
    """Our UNet for `cfg` with random_init_ weights (built on meta, then materialised once)."""
    with torch.device("meta"):
        model = UNetModel(cfg, **kwargs)
    model = model.to_empty(device="cpu")
    return random_init_(model, seed).eval()


def to_diffusers(model: UNetModel):
    """diffusers' UNet2DConditionModel sharing `model`'s tensors, via diffusers' own converter."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = diffusers_unet_config(model.cfg)
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config)
    ref.load_state_dict(converted, strict=True, assign=True)
    return ref.eval()


def diffusers_unet(cfg: UNetConfig, seed: int = 0):
    """A diffusers UNet2DConditionModel for `cfg` (the weights of ours(cfg, seed))."""
    return to_diffusers(ours(cfg, seed))


@functools.lru_cache(maxsize=None)
def full_pair() -> tuple[UNetModel, object]:
    """(ours, diffusers) full-size SD 1.x UNets sharing one set of random weights; built once."""
    model = ours(UNetConfig(), seed=0)
    return model, to_diffusers(model)


@functools.lru_cache(maxsize=None)
def full_pair_sd2() -> tuple[UNetModel, object]:
    """(ours, diffusers) full-size SD 2.x UNets (UNetConfig.sd2()) sharing random weights; built once."""
    model = ours(UNetConfig.sd2(), seed=0)
    return model, to_diffusers(model)


def reference_tensors() -> dict[str, torch.Tensor]:
    """STORED_CONFIG weights (float16), inputs, and diffusers' eps (float32)."""
    model = ours(STORED_CONFIG, seed=0)
    with torch.no_grad():
        for p in model.parameters():               # round to the stored precision first
            p.copy_(p.half().float())
    ref = to_diffusers(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, STORED_CONFIG.in_channels, 8, 8, generator=g)
    t = torch.tensor([1.0, 981.0])
    context = torch.randn(2, 5, STORED_CONFIG.context_dim, generator=g)
    with torch.no_grad():
        eps = ref(x, t, encoder_hidden_states=context).sample
    out = {f"weights.{k}": v.half() for k, v in model.state_dict().items()}
    out.update({"inputs.x": x, "inputs.t": t, "inputs.context": context, "outputs.eps": eps})
    return out


@functools.lru_cache(maxsize=None)
def tiny_sdxl_pair() -> tuple[UNetModel, object]:
    """(ours, diffusers) UNets for UNetConfig.tiny_sdxl() sharing random weights; built once."""
    model = ours(UNetConfig.tiny_sdxl(), seed=7)
    return model, to_diffusers(model)


def meta_key_proof(cfg: UNetConfig, **diffusers_changes) -> tuple[dict, dict]:
    """({key: shape} that diffusers' converter makes of our state dict, {key: shape} of diffusers' own
    UNet2DConditionModel for the same config): both built on the meta device, so any size costs seconds."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = {**diffusers_unet_config(cfg), **diffusers_changes}
    with torch.device("meta"):
        sd, ref = UNetModel(cfg).state_dict(), UNet2DConditionModel(**config)
    converted = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in sd.items()}, config)
    shapes = lambda d: {k: None if v is None else tuple(v.shape) for k, v in d.items()}
    return shapes(converted), shapes(ref.state_dict())
