"""The Stable Diffusion 1.x / 2.x UNet: eps = unet(x_t, t, context), the noise predicted in a latent.

x (B, 4, h, w) noisy latent, t (B,) timesteps, context (B, 77, 768) CLIP text embeddings
-> eps (B, 4, h, w). The network is the CompVis `openaimodel.UNetModel` as SD 1.x configures
it (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"),
and its module paths are the checkpoint keys after `model.diffusion_model.`, so a real
checkpoint loads with `load_state_dict(sd, strict=True)`; the Sequential slots that held
dropout are kept as nn.Identity so the indices match.

How the pieces fit (read this file top to bottom in the same order):
  timestep_embedding   t -> sinusoids (B, 320), cos first ("flip"), frequency shift 0
  time_embed           Linear, SiLU, Linear -> emb (B, 1280), added inside every ResBlock
  ResBlock             GroupNorm, SiLU, conv; + Linear(emb); GroupNorm, SiLU, conv; + skip
  SpatialTransformer   GroupNorm, 1x1 conv proj_in, BasicTransformerBlock(s), 1x1 proj_out, + x
  BasicTransformerBlock  x += SelfAttn(LN x); x += CrossAttn(LN x, context); x += GEGLU-FF(LN x)
  Downsample/Upsample  stride-2 3x3 conv / nearest 2x then 3x3 conv
  UNetModel            input_blocks (their outputs are saved), middle_block, output_blocks
                       (each concatenates one saved output: the skip connection), out

Architecture of SD 1.x (UNetConfig() defaults) for a 512x512 image, i.e. a 64x64 latent.
Channels are in -> out of the block; an output block's input is the running feature map
concatenated with the skip from the matching input block. Every transformer has 8 heads;
the head dim is channels / 8.

| block | modules | channels | latent size | heads x head dim |
|---|---|---|---|---|
| time_embed | Linear, SiLU, Linear | 320 -> 1280 | - | - |
| input_blocks.0 | Conv | 4 -> 320 | 64 | - |
| input_blocks.1 | ResBlock, SpatialTransformer | 320 -> 320 | 64 | 8 x 40 |
| input_blocks.2 | ResBlock, SpatialTransformer | 320 -> 320 | 64 | 8 x 40 |
| input_blocks.3 | Downsample | 320 -> 320 | 64 -> 32 | - |
| input_blocks.4 | ResBlock, SpatialTransformer | 320 -> 640 | 32 | 8 x 80 |
| input_blocks.5 | ResBlock, SpatialTransformer | 640 -> 640 | 32 | 8 x 80 |
| input_blocks.6 | Downsample | 640 -> 640 | 32 -> 16 | - |
| input_blocks.7 | ResBlock, SpatialTransformer | 640 -> 1280 | 16 | 8 x 160 |
| input_blocks.8 | ResBlock, SpatialTransformer | 1280 -> 1280 | 16 | 8 x 160 |
| input_blocks.9 | Downsample | 1280 -> 1280 | 16 -> 8 | - |
| input_blocks.10 | ResBlock | 1280 -> 1280 | 8 | - |
| input_blocks.11 | ResBlock | 1280 -> 1280 | 8 | - |
| middle_block | ResBlock, SpatialTransformer, ResBlock | 1280 -> 1280 | 8 | 8 x 160 |
| output_blocks.0 | ResBlock | 2560 -> 1280 | 8 | - |
| output_blocks.1 | ResBlock | 2560 -> 1280 | 8 | - |
| output_blocks.2 | ResBlock, Upsample | 2560 -> 1280 | 8 -> 16 | - |
| output_blocks.3 | ResBlock, SpatialTransformer | 2560 -> 1280 | 16 | 8 x 160 |
| output_blocks.4 | ResBlock, SpatialTransformer | 2560 -> 1280 | 16 | 8 x 160 |
| output_blocks.5 | ResBlock, SpatialTransformer, Upsample | 1920 -> 1280 | 16 -> 32 | 8 x 160 |
| output_blocks.6 | ResBlock, SpatialTransformer | 1920 -> 640 | 32 | 8 x 80 |
| output_blocks.7 | ResBlock, SpatialTransformer | 1280 -> 640 | 32 | 8 x 80 |
| output_blocks.8 | ResBlock, SpatialTransformer, Upsample | 960 -> 640 | 32 -> 64 | 8 x 80 |
| output_blocks.9 | ResBlock, SpatialTransformer | 960 -> 320 | 64 | 8 x 40 |
| output_blocks.10 | ResBlock, SpatialTransformer | 640 -> 320 | 64 | 8 x 40 |
| output_blocks.11 | ResBlock, SpatialTransformer | 640 -> 320 | 64 | 8 x 40 |
| out | GroupNorm, SiLU, Conv | 320 -> 4 | 64 | - |

(tests/test_unet.py checks this table against the model's state_dict keys and shapes.)

SD 2.x (UNetConfig.sd2(), v2-inference.yaml) is the same network with three changes, all
read from the config by the same code: every head is 64 channels wide (num_head_channels=64:
5 x 64, 10 x 64, 20 x 64 instead of 8 x 40, 8 x 80, 8 x 160), the SpatialTransformer's
proj_in/proj_out are Linear layers (use_linear_in_transformer), and attn2's to_k/to_v read a
1024-wide context (OpenCLIP ViT-H, ldm/openclip.py). The 768-v model predicts v instead of eps
with the same weights' shapes: that is the sampler's business, not the network's. In half
precision its attention scores overflow fp16, so ldm.attention forms them in fp32.

SDXL base (UNetConfig.sdxl(), sgm openaimodel.py) is SD 2.x's heads on three levels (320, 640,
1280): 9 input and 9 output blocks (Upsample at output_blocks.2.2 and 5.2), attention only at
levels 1 and 2 with 2 and 10 transformer blocks (transformer_depth per level), 10 in the middle,
a 2048-wide context, and y (B, 2816) through label_emb: 2,567,463,684 parameters.

Attention backends ("math", "sdpa", "triton", "auto"; see ldm/attention.py) are chosen per
model (`UNetModel(cfg, attention_backend=...)`, a plain attribute) or per call
(`unet(x, t, ctx, attention_backend="math")`). `UNetModel.capture(...)` records the feature
map after any module and the attention probabilities of any attention layer.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ldm.attention import BACKENDS, attention
from ldm.capture import Capture, capture

NUM_GROUPS = 32  # every GroupNorm in SD 1.x has 32 groups


@dataclass(frozen=True)
class UNetConfig:
    """CompVis `UNetModel` arguments; the defaults are SD 1.x (v1-inference.yaml)."""
    in_channels: int = 4                              # 9 for SD 1.5 inpainting (latent, mask, masked latent)
    out_channels: int = 4
    model_channels: int = 320                         # width of the first level
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)      # width of level i = model_channels * channel_mult[i]
    num_res_blocks: int = 2                           # ResBlocks per level on the way down (one more going up)
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors that get a SpatialTransformer
    num_heads: int = 8                                # head_dim = width / num_heads: 40, 80, 160
    num_head_channels: int | None = None              # SD 2.x: 64, a fixed head_dim (heads = width / 64),
                                                      # num_heads then unused; None = SD 1.x (CompVis: -1)
    transformer_depth: int | tuple[int, ...] = 1      # BasicTransformerBlocks per SpatialTransformer: one for
                                                      # all, or one per level (SDXL: (1, 2, 10)); middle: the last
    context_dim: int = 768                            # width of the text embeddings (SD 2.x: 1024)
    use_linear_in_transformer: bool = False           # SD 2.x: proj_in/proj_out are Linear, not 1x1 Conv2d
    sample_size: int = 64                             # the latent side it was trained at (diffusers' name):
                                                      # default image side = sample_size * the VAE's factor
    adm_in_channels: int | None = None                # a vector y added to the time embedding through
                                                      # label_emb (SDXL: 2816); None = SD 1.x / 2.x, no y

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks",
                     "num_heads", "context_dim", "sample_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"UNetConfig: {name}={getattr(self, name)} must be >= 1")
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"UNetConfig: channel_mult={self.channel_mult} must be a non-empty "
                             f"tuple of positive integers")
        depth, levels = self.transformer_depth, len(self.channel_mult)
        if not (isinstance(depth, int) and depth >= 1 or isinstance(depth, tuple) and len(depth) == levels
                and all(isinstance(d, int) and d >= 1 for d in depth)):
            raise ValueError(f"UNetConfig: transformer_depth={depth} must be an integer >= 1 or a tuple of "
                             f"one per level (len(channel_mult)={levels}), each >= 1")
        if self.adm_in_channels is not None and self.adm_in_channels < 1:
            raise ValueError(f"UNetConfig: adm_in_channels={self.adm_in_channels} must be >= 1, or None (no vector y)")
        if self.num_head_channels is not None and self.num_head_channels < 1:
            raise ValueError(f"UNetConfig: num_head_channels={self.num_head_channels} must be >= 1, "
                             f"or None to split each width into num_heads heads")
        split = (f"num_heads={self.num_heads}" if self.num_head_channels is None
                 else f"num_head_channels={self.num_head_channels}")
        for mult in self.channel_mult:
            width = self.model_channels * mult
            if width % NUM_GROUPS or width % (self.num_head_channels or self.num_heads):
                raise ValueError(f"UNetConfig: width model_channels*mult={width} must be divisible by "
                                 f"{NUM_GROUPS} (GroupNorm groups) and {split}")

    def heads(self, width: int) -> tuple[int, int]:
        """(heads, head_dim) of a transformer `width` channels wide: SD 1.x keeps the head count
        (8 x 40, 8 x 80, 8 x 160), SD 2.x the head dim (5 x 64, 10 x 64, 20 x 64)."""
        if self.num_head_channels is None:
            return self.num_heads, width // self.num_heads
        return width // self.num_head_channels, self.num_head_channels

    def depths(self) -> tuple[int, ...]:
        """transformer_depth of each level (an int: the same at every level); the middle block's is the last."""
        d = self.transformer_depth
        return d if isinstance(d, tuple) else (d,) * len(self.channel_mult)

    @classmethod
    def tiny(cls) -> "UNetConfig":
        """Widths 32/64, attention at the first level and in the middle (like SD, none at the last)."""
        return cls(model_channels=32, channel_mult=(1, 2), num_res_blocks=2,
                   attention_resolutions=(1,), num_heads=2, context_dim=32)

    @classmethod
    def inpainting(cls) -> "UNetConfig":
        """SD 1.5 inpainting: input = cat[noisy latent (4), mask (1), masked-image latent (4)]."""
        return cls(in_channels=9)

    @classmethod
    def sd2(cls, **changes) -> "UNetConfig":
        """SD 2.x (v2-inference.yaml, and v2-inference-v.yaml: the 768-v model has the same
        network): heads of 64 channels, linear proj_in/proj_out, a 1024-wide OpenCLIP context;
        everything else is SD 1.x's. `changes` override fields, e.g. sd2(in_channels=9) for
        512-inpainting, or the tiny test sizes (see tiny_sd2)."""
        return cls(**{**dict(num_head_channels=64, use_linear_in_transformer=True, context_dim=1024), **changes})

    @classmethod
    def tiny_sd2(cls) -> "UNetConfig":
        """tiny() shaped like SD 2.x: 16-channel heads (2 heads at width 32, 4 at 64), linear projections."""
        return cls.sd2(model_channels=32, channel_mult=(1, 2), num_res_blocks=2,
                       attention_resolutions=(1,), num_head_channels=16, context_dim=48)

    @classmethod
    def sdxl(cls, **changes) -> "UNetConfig":
        """SDXL base 1.0 (sgm sd_xl_base.yaml): SD 2.x's heads and projections on three levels, attention
        at the two deeper ones with 2 and 10 transformer blocks (level 0's 1 is unused), 10 in the middle,
        a 2048-wide context, and a 2816-wide vector y through label_emb; a 1024 px image (128 latent)."""
        return cls.sd2(**{**dict(channel_mult=(1, 2, 4), attention_resolutions=(4, 2), transformer_depth=(1, 2, 10),
                                 context_dim=2048, adm_in_channels=2816, sample_size=128), **changes})

    @classmethod
    def tiny_sdxl(cls, **changes) -> "UNetConfig":
        """sdxl() at widths 32/64/64: 16-channel heads, depths (1, 1, 2) (level 0 unused, middle 2); the
        context and y of the tiny towers (ldm.families' sdxl tiny_configs): 32 + 64 = 96, 64 + 6 x 8 = 112."""
        return cls.sdxl(**{**dict(model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(1, 1, 2),
                                  num_head_channels=16, context_dim=96, adm_in_channels=112, sample_size=8), **changes})


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of the timesteps (Vaswani et al. 2017, sec. 3.5): t (B,) -> (B, dim).

    Frequencies f_i = max_period^(-i / (dim/2)), i = 0 .. dim/2 - 1 (no frequency shift);
    SD puts the cosines first ("flip_sin_to_cos" in diffusers): [cos(t f), sin(t f)].
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]                        # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)     # (B, dim)


class ResBlock(nn.Module):
    """Two 3x3 convs with the time embedding added in between, plus a skip (He et al. 2016)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(NUM_GROUPS, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(NUM_GROUPS, out_channels), nn.SiLU(),
            nn.Identity(),                                           # slot 2 was dropout
            nn.Conv2d(out_channels, out_channels, 3, padding=1))
        # a 1x1 conv matches the channels when they change; otherwise the skip is the input itself
        self.skip_connection = (nn.Identity() if channels == out_channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)                                        # (B, C_out, H, W)
        h = h + self.emb_layers(emb)[:, :, None, None]               # time enters as a per-channel shift
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class CrossAttention(nn.Module):
    """Multi-head attention: query from x, key and value from `context` (x itself when None).

    `probs_hook`, when set (UNetModel.capture does it), forces the math backend and is
    called with the attention probabilities (B, heads, N, M).
    """

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Identity())  # slot 1 was dropout
        self.probs_hook = None

    def forward(self, x: Tensor, context: Tensor | None = None, backend: str = "math") -> Tensor:
        context = x if context is None else context                  # x (B, N, C), context (B, M, C_ctx)
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        k = rearrange(self.to_k(context), "b m (h d) -> b h m d", h=self.heads)
        v = rearrange(self.to_v(context), "b m (h d) -> b h m d", h=self.heads)
        if self.probs_hook is not None:
            out, probs = attention(q, k, v, backend="math", return_probs=True)
            self.probs_hook(probs)                                   # (B, heads, N, M)
        else:
            out = attention(q, k, v, backend=backend)                # (B, heads, N, d)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection to 2x the width, half of it gates the other."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(),  # slot 1 was dropout
                                 nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, cross-attention on the text, GEGLU FF."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)         # pixels attend to pixels
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)  # pixels attend to text tokens
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor, backend: str) -> Tensor:
        x = x + self.attn1(self.norm1(x), backend=backend)
        x = x + self.attn2(self.norm2(x), context, backend=backend)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Treat the H*W pixels of a feature map as tokens, run transformer blocks, add back.

    proj_in/proj_out map channels <-> the transformer width: SD 1.x uses 1x1 convolutions
    (weights (inner, C, 1, 1), applied before the pixels become tokens), SD 2.x
    (`linear=True`) Linear layers (weights (inner, C), applied to the tokens). A 1x1 conv is
    the same map as a Linear on every pixel, so only the weight shape and the order differ.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 linear: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.linear = linear
        self.norm = nn.GroupNorm(NUM_GROUPS, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)])
        self.proj_out = nn.Linear(inner, channels) if linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: Tensor, context: Tensor, backend: str) -> Tensor:
        H, W = x.shape[-2:]
        h = self.norm(x)                                             # (B, C, H, W)
        if self.linear:                                              # SD 2.x: tokens first, then project
            h = self.proj_in(rearrange(h, "b c h w -> b (h w) c"))   # (B, H*W, inner)
        else:                                                        # SD 1.x: project, then tokens
            h = rearrange(self.proj_in(h), "b c h w -> b (h w) c")   # (B, H*W, inner)
        for block in self.transformer_blocks:
            h = block(h, context, backend)
        if self.linear:
            h = rearrange(self.proj_out(h), "b (h w) c -> b c h w", h=H, w=W)  # (B, C, H, W)
        else:
            h = self.proj_out(rearrange(h, "b (h w) c -> b c h w", h=H, w=W))  # (B, C, H, W)
        return h + x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)                                            # (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        # Nearest-neighbour x2, or to `size`: the skip this level concatenates next. They differ
        # only when a side was odd on the way down (e.g. a 72 px image: latent 9 -> 5 -> 3 -> 2).
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") if size is None else \
            F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)  # (B, C, 2H, 2W) or (B, C, *size)


class TimestepEmbedSequential(nn.Sequential):
    """One slot of input_blocks / middle_block / output_blocks: its layers in order, each
    handed what it needs (ResBlock the time embedding, SpatialTransformer the text)."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, backend: str,
                upsample_size: tuple[int, int] | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, backend)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """eps = unet(x, t, context): x (B, in_channels, h, w), t (B,) or scalar, context (B, T, context_dim);
    with cfg.adm_in_channels also y (B, adm_in_channels), a vector added to the timestep embedding."""

    def __init__(self, cfg: UNetConfig = UNetConfig(), attention_backend: str = "auto"):
        super().__init__()
        if attention_backend not in BACKENDS:
            raise ValueError(f"UNetModel: attention_backend={attention_backend!r} is not one of {BACKENDS}")
        self.cfg, self.attention_backend = cfg, attention_backend
        mc, emb_dim = cfg.model_channels, 4 * cfg.model_channels

        def transformer(ch: int, level: int) -> SpatialTransformer:
            heads, dim_head = cfg.heads(ch)
            return SpatialTransformer(ch, heads, dim_head, cfg.depths()[level], cfg.context_dim,
                                      linear=cfg.use_linear_in_transformer)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.adm_in_channels is not None:  # CompVis num_classes="sequential": label_emb.0 is an MLP like time_embed
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(),
                                                         nn.Linear(emb_dim, emb_dim)))

        # Down: record the channels of every block's output, each becomes a skip connection.
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels, ch, ds = [mc], mc, 1                          # ds: downsampling factor so far
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch), transformer(ch, -1), ResBlock(ch, emb_dim, ch))

        # Up: one more block per level than on the way down; each eats one skip, last first.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch, level))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(nn.GroupNorm(NUM_GROUPS, ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def _check_inputs(self, x: Tensor, t, context: Tensor, y: Tensor | None) -> Tensor:
        cfg = self.cfg
        if cfg.adm_in_channels is None and y is not None:
            raise ValueError("UNetModel: y was given, but this UNet takes no vector (its config has no adm_in_channels)")
        if cfg.adm_in_channels is not None and (y is None or y.shape != (x.shape[0], cfg.adm_in_channels)):
            raise ValueError(f"UNetModel: y must be (B={x.shape[0]}, {cfg.adm_in_channels}), "
                             f"got {None if y is None else tuple(y.shape)}")
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"UNetModel: x must be (B, {cfg.in_channels}, h, w), got shape {tuple(x.shape)}")
        if context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.context_dim:
            raise ValueError(f"UNetModel: context must be (B={x.shape[0]}, T, {cfg.context_dim}), "
                             f"got shape {tuple(context.shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"UNetModel: t must be a scalar or have shape (B={x.shape[0]},), "
                             f"got shape {tuple(t.shape)}")
        return t

    def forward(self, x: Tensor, t, context: Tensor, y: Tensor | None = None, *,
                attention_backend: str | None = None) -> Tensor:
        backend = attention_backend or self.attention_backend
        if backend not in BACKENDS:
            raise ValueError(f"UNetModel: attention_backend={backend!r} is not one of {BACKENDS}")
        t = self._check_inputs(x, t, context, y)
        t_emb = timestep_embedding(t, self.cfg.model_channels)      # (B, 320)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))  # (B, 1280)
        if y is not None:
            emb = emb + self.label_emb(y.to(emb.dtype))              # (B, 1280): the vector joins the time

        h, skips = x, []
        for block in self.input_blocks:                              # 64 -> 32 -> 16 -> 8
            h = block(h, emb, context, backend)
            skips.append(h)
        h = self.middle_block(h, emb, context, backend)
        for block in self.output_blocks:                             # 8 -> 16 -> 32 -> 64
            h = torch.cat([h, skips.pop()], dim=1)                   # the skip: (B, C + C_skip, H, W)
            next_size = tuple(skips[-1].shape[-2:]) if skips else None  # where an Upsample must land
            h = block(h, emb, context, backend, next_size)
        return self.out(h)                                           # eps (B, out_channels, h, w)

    # ---- inspection -------------------------------------------------------------------------

    def attention_layers(self, kind: str = "cross") -> list[str]:
        """Names of the attention layers: kind "cross" (attn2, on the text), "self" (attn1) or "all"."""
        suffix = {"cross": ("attn2",), "self": ("attn1",), "all": ("attn1", "attn2")}
        if kind not in suffix:
            raise ValueError(f"attention_layers: kind={kind!r} is not one of {tuple(suffix)}")
        return [n for n, m in self.named_modules()
                if isinstance(m, CrossAttention) and n.rsplit(".", 1)[-1] in suffix[kind]]

    @contextmanager
    def capture(self, features: Sequence[str] = (), attention: Sequence[str] = ()) -> Iterator[Capture]:
        """Record, for every forward inside the `with` block (the last one wins):
        the output of each module named in `features` (any name of named_modules(),
        e.g. "input_blocks.4", "middle_block", "output_blocks.8.2") and the attention
        probabilities of each layer in `attention` (names from attention_layers()).
        Attention layers being captured run on the math backend.

            with unet.capture(features=["middle_block"], attention=unet.attention_layers()) as cap:
                eps = unet(x, t, context)
            cap.features["middle_block"], cap.token_maps(unet.attention_layers()[0])
        """
        with capture(self, features, attention, layers=self.attention_layers("all"), what="the UNet",
                     spatial_of=lambda name: name.rsplit(".transformer_blocks.", 1)[0]) as cap:
            yield cap  # the SpatialTransformer holding ...1.transformer_blocks.0.attn2 is ...1: its input's H, W
