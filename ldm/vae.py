"""The VAE: images (B, 3, H, W) in [-1, 1] <-> latents (B, 4, H/8, W/8), the first stage of SD 1.x.

Stable Diffusion runs its diffusion in the latent space of a KL-regularised autoencoder
(Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", Sec. 3).
A 512x512 RGB image (786,432 numbers) becomes a 64x64x4 latent (16,384 numbers): 48x fewer.

    encode:  x (B, 3, H, W)
      -> Encoder: conv_in, 4 levels of ResnetBlocks (3 of them end in a stride-2 Downsample),
                  mid (ResnetBlock, single-head AttnBlock, ResnetBlock), norm_out, SiLU, conv_out
                                                            (B, 2 z_channels, H/8, W/8)
      -> quant_conv (1x1)                                   (B, 2 embed_dim, H/8, W/8) = [mean, logvar]
      -> DiagonalGaussian: q(z|x) = N(mean, exp(logvar)); sample(generator) or mode() = mean
    decode:  z (B, 4, H/8, W/8), *unscaled*
      -> post_quant_conv (1x1) -> Decoder (the mirror image, Upsample = nearest 2x + 3x3 conv)
                                                            (B, 3, H, W), roughly in [-1, 1]

The diffusion model never sees z itself but `scaling_factor * z` (SD 1.x: SCALING_FACTOR =
0.18215, about 1 / std of the encoder's latents over the training images, so the UNet works on
unit-variance latents). Each VAE carries its own in `VAEConfig.scaling_factor` (as diffusers'
AutoencoderKL config does): a VAE trained by ldm stores the one it measured. This file keeps
that scaling explicit: `encode` and `decode` speak unscaled latents, and the caller multiplies
by `vae.cfg.scaling_factor` after encoding and divides before decoding.

Parameter names equal the checkpoint keys after `first_stage_model.` (CompVis layout:
`encoder.down.1.block.0.nin_shortcut.weight`, `decoder.mid.attn_1.q.weight`, ...), 248
tensors for SD 1.x, so a real checkpoint loads with `load_state_dict(strict=True)`.
Parity with `diffusers.AutoencoderKL` is tested in tests/test_vae.py.

Inspection: `vae.capture(features=["encoder.down.2", "decoder.mid"], attention=["decoder.mid.attn_1"])`
records the output of any named block and the mid-block attention's probabilities during a forward
pass (ldm.capture: the same API and `Capture` as the UNet's); `decode_tiled` decodes large latents
tile by tile to bound memory.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm import capture as capturing
from ldm.attention import BACKENDS, attention

__all__ = ["SCALING_FACTOR", "VAEConfig", "DiagonalGaussian", "ResnetBlock", "AttnBlock",
           "Downsample", "Upsample", "MidBlock", "Encoder", "Decoder", "AutoencoderKL"]

log = logging.getLogger(__name__)

SCALING_FACTOR = 0.18215  # SD 1.x's: VAEConfig's default; a family's VAE config carries its own (ldm.families)


@dataclass(frozen=True)
class VAEConfig:
    """The autoencoder's shape, with CompVis' `ddconfig` names. Defaults are SD 1.x's VAE."""

    in_channels: int = 3  # RGB in
    out_ch: int = 3  # RGB out
    ch: int = 128  # width of the first level; level i has ch * ch_mult[i] channels
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # widths 128, 256, 512, 512
    num_res_blocks: int = 2  # ResnetBlocks per encoder level (the decoder has one more)
    z_channels: int = 4  # latent channels out of the encoder (it emits 2x: mean and logvar)
    embed_dim: int = 4  # latent channels after quant_conv; SD 1.x: equal to z_channels
    norm_groups: int = 32  # GroupNorm groups everywhere (CompVis hard-codes 32)
    norm_eps: float = 1e-6
    scaling_factor: float = SCALING_FACTOR  # the UNet sees scaling_factor * z: about 1 / std(z)

    @classmethod
    def tiny(cls) -> "VAEConfig":
        """A small VAE for tests and notebooks: the same 4 levels and 8x downsampling, widths 8/16
        (81k parameters, so its stored reference tensors stay small)."""
        return cls(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=4)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side: 2 ** (number of Downsample layers), 8 for SD 1.x."""
        return 2 ** (len(self.ch_mult) - 1)

    def __post_init__(self):
        if len(self.ch_mult) == 0:
            raise ValueError(f"ch_mult={self.ch_mult} must name at least one level")
        for m in self.ch_mult:
            if m < 1 or (self.ch * m) % self.norm_groups:
                raise ValueError(
                    f"ch_mult={self.ch_mult} with ch={self.ch}: every width ch * m must be a "
                    f"positive multiple of norm_groups={self.norm_groups}")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks={self.num_res_blocks} must be >= 1")
        if not (0 < self.scaling_factor < float("inf")):
            raise ValueError(f"scaling_factor={self.scaling_factor} must be a positive finite number")


# --- the posterior ---------------------------------------------------------------------------


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), read from quant_conv's output (B, 2 embed_dim, h, w).

    The first half of the channels is the mean, the second half the log-variance, clamped to
    [-30, 20] as in CompVis (a numerical guard against exp overflow and log 0).
    """

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # each (B, embed_dim, h, w)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I) drawn from `generator` (the reparameterisation trick).

        eps is drawn on the generator's device and then moved, like diffusers' `randn_tensor`,
        so a seeded CPU generator gives the same z as `latent_dist.sample(generator)`.
        """
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        """The most likely latent, the mean: what img2img uses when it wants no extra noise."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) per image, (B,): the regulariser the VAE was trained with."""
        return 0.5 * torch.sum(self.mean**2 + self.var - 1.0 - self.logvar, dim=(1, 2, 3))


# --- building blocks -------------------------------------------------------------------------


def Normalize(channels: int, cfg: VAEConfig) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps, affine=True)


def silu_(h: torch.Tensor) -> torch.Tensor:
    """SiLU(h) = h * sigmoid(h), written over h when no gradient flows through it.

    Every call site passes a fresh GroupNorm output that nothing else holds, so at inference
    this saves one full-size activation (256 MiB at the decoder's 512x512 level).
    """
    return F.silu(h, inplace=not h.requires_grad)


class ResnetBlock(nn.Module):
    """x + conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))), with a 1x1 `nin_shortcut` when widths differ.

    The UNet's ResnetBlock also adds a timestep embedding; the VAE's has none (no `temb_proj`),
    and its dropout is 0 (no parameters, so no slot here).
    """

    def __init__(self, in_channels: int, out_channels: int, cfg: VAEConfig):
        super().__init__()
        self.norm1 = Normalize(in_channels, cfg)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels, cfg)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)  # "network in network"
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(silu_(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(silu_(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return h.add_(x)  # x + h, added into conv2's fresh output (its backward does not need it)


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, q/k/v/proj_out as 1x1 convolutions.

    x + proj_out(softmax(q k^T / sqrt(C)) v), with q = q(norm(x)) etc. The only attention in the
    VAE: one per mid-block, at the lowest resolution (64x64 = 4096 positions for a 512 image).
    `backend` is the ldm.attention backend ("auto": torch's fused SDPA on the CPU; "math" is
    the readable path); AutoencoderKL.attention_backend sets it for both blocks. `probs_hook`, when
    set (AutoencoderKL.capture does it), forces the math backend and is called with the attention
    probabilities (B, 1, H*W, H*W).
    """

    def __init__(self, channels: int, cfg: VAEConfig, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.probs_hook = None
        self.norm = Normalize(channels, cfg)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # one head: (B, C, H, W) -> (B, heads=1, N=H*W, head_dim=C)
        q, k, v = (rearrange(conv(h), "b c h w -> b 1 (h w) c") for conv in (self.q, self.k, self.v))
        if self.probs_hook is not None:
            h, probs = attention(q, k, v, backend="math", return_probs=True)
            self.probs_hook(probs)  # (B, 1, N, N)
        else:
            h = attention(q, k, v, backend=self.backend)  # scale 1/sqrt(C); (B, 1, N, C)
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=H, w=W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve H and W: pad one pixel on the right and bottom, then a 3x3 conv with stride 2.

    The asymmetric pad is CompVis' (and diffusers' `downsample_padding=0`): without it a
    stride-2 conv with padding 1 would see a different pixel grid, and the weights would not fit.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 1, 0, 1))  # (B, C, H+1, W+1)
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour 2x, then a 3x3 conv (no transposed conv, no checkerboard)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x)


class MidBlock(nn.Module):
    """block_1 -> attn_1 -> block_2 at the lowest resolution (CompVis' `mid`)."""

    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, cfg)
        self.attn_1 = AttnBlock(channels, cfg)
        self.block_2 = ResnetBlock(channels, channels, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), then an optional `downsample` / `upsample`.

    CompVis' levels also hold an `attn` list, empty for the SD VAE (attn_resolutions=[]), so it
    has no keys and no slot here.
    """

    def __init__(self, in_channels: int, out_channels: int, n_blocks: int, cfg: VAEConfig,
                 resample: str | None):
        super().__init__()
        widths = [in_channels] + [out_channels] * n_blocks
        self.block = nn.ModuleList(ResnetBlock(a, b, cfg) for a, b in zip(widths, widths[1:]))
        self.downsample = Downsample(out_channels) if resample == "down" else None
        self.upsample = Upsample(out_channels) if resample == "up" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)  # (B, C, H/2, W/2)
        if self.upsample is not None:
            x = self.upsample(x)  # (B, C, 2H, 2W)
        return x


# --- encoder and decoder ---------------------------------------------------------------------


class Encoder(nn.Module):
    """x (B, 3, H, W) -> moments (B, 2 z_channels, H/f, W/f), f = cfg.downsample_factor."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]  # SD 1.x: 128, 256, 512, 512
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList(
            Level(widths[i - 1] if i else cfg.ch, widths[i], cfg.num_res_blocks, cfg,
                  resample="down" if i < last else None)
            for i in range(len(widths)))
        self.mid = MidBlock(widths[-1], cfg)
        self.norm_out = Normalize(widths[-1], cfg)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)  # double_z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:  # SD 1.x: (B,128,H,W) -> (B,256,H/2,.) -> (B,512,H/4,.) -> (B,512,H/8,.)
            h = level(h)
        h = self.mid(h)  # (B, 512, H/8, W/8)
        return self.conv_out(silu_(self.norm_out(h)))  # (B, 2 z_channels, H/8, W/8)


class Decoder(nn.Module):
    """z (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f).

    `up[i]` is the level with width ch * ch_mult[i] (as in CompVis, which builds the list in
    reverse), so the forward pass walks `up` from the last index to 0. Each level has
    num_res_blocks + 1 ResnetBlocks.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], cfg)
        self.up = nn.ModuleList(
            Level(widths[i + 1] if i < last else widths[-1], widths[i], cfg.num_res_blocks + 1, cfg,
                  resample="up" if i > 0 else None)
            for i in range(len(widths)))
        self.norm_out = Normalize(widths[0], cfg)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # (B, 512, h, w)
        h = self.mid(h)
        for level in reversed(self.up):  # SD 1.x: (B,512,2h,.) -> (B,512,4h,.) -> (B,256,8h,.) -> (B,128,8h,.)
            h = level(h)
        return self.conv_out(silu_(self.norm_out(h)))  # (B, 3, 8h, 8w)


# --- the autoencoder -------------------------------------------------------------------------


def _tile_starts(n: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of length `tile` covering 0..n, `stride` apart, the last flush with n."""
    if n <= tile:
        return [0]
    return list(range(0, n - tile, stride)) + [n - tile]


def _ramp(length: int, start: int, total: int, fade: int, device, dtype) -> torch.Tensor:
    """1-D blend weights for a tile: rise over `fade` samples at an inner start, fall at an inner end."""
    w = torch.ones(length, device=device, dtype=dtype)
    fade = min(fade, length)
    ramp = (torch.arange(fade, device=device, dtype=dtype) + 0.5) / fade  # in (0, 1), never 0
    if start > 0:
        w[:fade] = ramp
    if start + length < total:
        w[length - fade:] = torch.minimum(w[length - fade:], ramp.flip(0))
    return w


class AutoencoderKL(nn.Module):
    """encoder + quant_conv -> DiagonalGaussian;  post_quant_conv + decoder -> image."""

    def __init__(self, cfg: VAEConfig = VAEConfig(), attention_backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.attention_backend = attention_backend

    @property
    def attention_backend(self) -> str:
        """The ldm.attention backend of both mid-block attentions ("auto", "math", "sdpa", "triton")."""
        return self.decoder.mid.attn_1.backend

    @attention_backend.setter
    def attention_backend(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"AutoencoderKL: attention_backend={backend!r} is not one of {BACKENDS}")
        self.encoder.mid.attn_1.backend = self.decoder.mid.attn_1.backend = backend

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x (B, in_channels, H, W) in [-1, 1], H and W multiples of 8 -> the posterior q(z|x).

        Its latents are unscaled: multiply `.mode()` or `.sample(generator)` by cfg.scaling_factor
        before handing them to the UNet.
        """
        f = self.cfg.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected (B, {self.cfg.in_channels}, H, W)")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"x has height x width {x.shape[2]}x{x.shape[3]}; both must be "
                             f"multiples of the downsampling factor {f}")
        x = x.contiguous(memory_format=torch.channels_last)  # see decode
        moments = self.quant_conv(self.encoder(x))  # (B, 2 embed_dim, H/8, W/8)
        return DiagonalGaussian(moments.contiguous())

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, embed_dim, h, w), unscaled (divide the UNet's latent by cfg.scaling_factor first)
        -> image (B, out_ch, 8h, 8w), roughly in [-1, 1] (not clamped)."""
        if z.ndim != 4 or z.shape[1] != self.cfg.embed_dim:
            raise ValueError(f"z has shape {tuple(z.shape)}; expected (B, {self.cfg.embed_dim}, h, w)")
        # Channels-last (NHWC) activations: the CPU's oneDNN convolutions then work in place of
        # the tensors instead of copying each into a blocked layout and back, which at 512x512
        # saves about a fifth of the decoder's peak memory (same results up to float rounding).
        z = z.contiguous(memory_format=torch.channels_last)
        return self.decoder(self.post_quant_conv(z)).contiguous()  # (B, 3, 8h, 8w), NCHW again

    def decode_tiled(self, z: torch.Tensor, tile_size: int = 32, overlap: int = 8) -> torch.Tensor:
        """Decode z in overlapping tiles of tile_size x tile_size latents and blend them.

        Peak memory is that of decoding one tile, whatever the size of z. Neighbouring tiles
        overlap by at least `overlap` latents (times 8 pixels); in the overlap the decoded
        pixels are averaged with weights that ramp linearly across it, so no seam shows.
        Not bit-equal to `decode`: each tile's GroupNorm statistics and mid-block attention
        see only that tile, and its borders see zero padding instead of neighbours.
        With a single tile (z no larger than tile_size) it is exactly `decode(z)`.
        """
        if z.ndim != 4 or z.shape[1] != self.cfg.embed_dim:
            raise ValueError(f"z has shape {tuple(z.shape)}; expected (B, {self.cfg.embed_dim}, h, w)")
        if tile_size < 1:
            raise ValueError(f"tile_size={tile_size} must be >= 1 (latent pixels)")
        if not 0 <= overlap < tile_size:
            raise ValueError(f"overlap={overlap} must be in [0, tile_size={tile_size})")
        f = self.cfg.downsample_factor
        B, _, h, w = z.shape
        if h <= tile_size and w <= tile_size:
            return self.decode(z)
        stride = tile_size - overlap
        ys, xs = _tile_starts(h, tile_size, stride), _tile_starts(w, tile_size, stride)
        log.debug("decode_tiled: %dx%d latent in %d tiles of %d", h, w, len(ys) * len(xs), tile_size)
        out = weight = None
        for y0 in ys:
            for x0 in xs:
                tile = z[:, :, y0:y0 + tile_size, x0:x0 + tile_size]  # (B, 4, th, tw)
                img = self.decode(tile)  # (B, 3, f th, f tw)
                if out is None:
                    out = img.new_zeros(B, img.shape[1], h * f, w * f)
                    weight = img.new_zeros(1, 1, h * f, w * f)
                th, tw = img.shape[2], img.shape[3]
                wy = _ramp(th, y0 * f, h * f, overlap * f, img.device, img.dtype)
                wx = _ramp(tw, x0 * f, w * f, overlap * f, img.device, img.dtype)
                mask = wy[:, None] * wx[None, :]  # (th, tw), separable
                out[:, :, y0 * f:y0 * f + th, x0 * f:x0 * f + tw] += img * mask
                weight[:, :, y0 * f:y0 * f + th, x0 * f:x0 * f + tw] += mask
        return out / weight

    def forward(self, x: torch.Tensor, sample_posterior: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruct x: decode(mode()) by default, decode(sample(generator)) if sample_posterior."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)

    # ---- inspection -------------------------------------------------------------------------

    def attention_layers(self) -> list[str]:
        """Names of the attention layers: the encoder's and the decoder's mid-block attention."""
        return [n for n, m in self.named_modules() if isinstance(m, AttnBlock)]

    def capture(self, features: Sequence[str] = (), attention: Sequence[str] = ()) -> Iterator[capturing.Capture]:
        """Record, for every forward inside the `with` block (the last one wins), the output of each
        module named in `features` (any name of named_modules(): "encoder.down.0", "decoder.mid", ...)
        and the attention probabilities of each layer in `attention` (attention_layers()). ldm.capture:

            with vae.capture(features=["encoder.down.0"], attention=["encoder.mid.attn_1"]) as cap:
                vae.encode(x)
            cap.features["encoder.down.0"]   # (B, 128, H/2, W/2): level 0's output, after its Downsample
            cap.token_maps("encoder.mid.attn_1")   # (B, 1, h*w, h, w): where each pixel looks
        """
        return capturing.capture(self, features, attention, layers=self.attention_layers(), what="the VAE")
