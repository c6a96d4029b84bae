"""Reference builders for the VAE: diffusers.AutoencoderKL for a config of ours, same weights.

Our state dict is in the CompVis layout (the `first_stage_model.` keys of a single-file
checkpoint). It reaches diffusers through diffusers' own single-file converter,
`convert_ldm_vae_checkpoint`, which knows the real CompVis key names: if one of ours were
wrong, the converted dict would miss a key and the strict load below would fail.
"""
from __future__ import annotations

import functools

import torch

from ldm.vae import SCALING_FACTOR, AutoencoderKL, VAEConfig


def diffusers_vae_config(cfg: VAEConfig) -> dict:
    """kwargs for diffusers.AutoencoderKL describing the same architecture as `cfg`."""
    if cfg.z_channels != cfg.embed_dim or cfg.norm_eps != 1e-6:
        raise ValueError(f"diffusers' AutoencoderKL needs z_channels == embed_dim and norm_eps "
                         f"1e-6; got {cfg}")
    n = len(cfg.ch_mult)
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_ch,
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=[cfg.ch * m for m in cfg.ch_mult], layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels, norm_num_groups=cfg.norm_groups,
        scaling_factor=SCALING_FACTOR, sample_size=64 * cfg.downsample_factor,
    )


def diffusers_vae(cfg: VAEConfig, device: str | torch.device | None = None):
    """diffusers.AutoencoderKL for `cfg` (random init; on "meta" it costs nothing)."""
    from diffusers import AutoencoderKL as DiffusersVAE

    with torch.device(device or "cpu"):
        return DiffusersVAE(**diffusers_vae_config(cfg)).eval()


def to_diffusers_state_dict(sd: dict[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """Our (CompVis-layout) state dict -> diffusers' keys, via diffusers' single-file converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    checkpoint = {f"first_stage_model.{k}": v for k, v in sd.items()}
    return convert_ldm_vae_checkpoint(checkpoint, diffusers_vae_config(cfg))


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every GroupNorm a non-trivial affine (the default init is weight 1, bias 0, which
    would hide a swapped or missing norm) and every conv bias a non-zero value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=g))
    return model


def ours(cfg: VAEConfig, seed: int = 0) -> AutoencoderKL:
    """Our autoencoder with seeded random weights, in eval mode (the same weights as pair's)."""
    torch.manual_seed(seed)
    return randomize_(AutoencoderKL(cfg), seed).eval()


def to_diffusers(model: AutoencoderKL):
    """diffusers.AutoencoderKL holding the same tensors as `model` (no copy)."""
    ref = diffusers_vae(model.cfg, device="meta")
    ref.load_state_dict(to_diffusers_state_dict(model.state_dict(), model.cfg), strict=True, assign=True)
    return ref.eval()


def pair(cfg: VAEConfig, seed: int = 0):
    """(ours, diffusers') autoencoders with the same random weights, in eval mode."""
    model = ours(cfg, seed)
    return model, to_diffusers(model)


@functools.lru_cache(maxsize=1)
def full_pair():
    """The full SD 1.x VAE (83.7M parameters), random weights, built once per test run."""
    return pair(VAEConfig())


@functools.lru_cache(maxsize=1)
def tiny_pair():
    return pair(VAEConfig.tiny())


def example_image(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    """(B, 3, size, size) in [-1, 1]: a smooth gradient plus noise, so every channel varies."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-1, 1, size)
    x = 0.5 * (ramp[None, None, :, None] + ramp[None, None, None, :]).expand(batch, 3, size, size)
    return (0.7 * x + 0.3 * torch.rand(batch, 3, size, size, generator=g) * 2 - 0.3).clamp(-1, 1)


def example_latent(batch: int = 2, size: int = 4, seed: int = 2) -> torch.Tensor:
    """(B, 4, size, size) unscaled latent: N(0, 1) / SCALING_FACTOR, the range decode sees."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, size, size, generator=g) / SCALING_FACTOR


def reference_tensors() -> dict[str, torch.Tensor]:
    """The tiny config's weights, an image and a latent, and diffusers' outputs for them."""
    ours, ref = pair(VAEConfig.tiny())
    x, z = example_image(), example_latent()
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        sample = dist.sample(generator=torch.Generator().manual_seed(3))
        image = ref.decode(z).sample
    tensors = {f"weights.{k}": v for k, v in ours.state_dict().items()}
    tensors.update({
        "inputs.x": x, "inputs.z": z,
        "outputs.mean": dist.mean, "outputs.logvar": dist.logvar, "outputs.std": dist.std,
        "outputs.sample_seed3": sample, "outputs.decoded": image,
    })
    return tensors
