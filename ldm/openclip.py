"""The OpenCLIP text towers: ViT-H/14 (SD 2.x) and ViT-bigG/14 (SDXL's second tower).

SD 2.x replaced OpenAI's CLIP ViT-L/14 (ldm/clip.py) with the text half of LAION's OpenCLIP
ViT-H/14. It is the same kind of network, a GPT-2-style causal pre-LN transformer, but wider
(1024, 16 heads of 64), deeper (24 blocks), with the exact GELU instead of quick_gelu, and SD
2.x reads it one layer earlier: the *penultimate* block's output, then the final layer norm
(FrozenOpenCLIPEmbedder(layer="penultimate") in the Stability code). Top to bottom:

    ids (B, T=77)                      padded with 0, not EOS (ldm.tokenizer: pad_id=0)
      -> token_embedding(ids) + positional_embedding        (B, T, 1024)
      -> 23 of the 24 ResidualAttentionBlocks:               (B, T, 1024)
             x = x + attn(ln_1(x))     fused in_proj: one (3*1024, 1024) matrix -> q, k, v;
                                       causal: token i sees tokens 0..i
             x = x + mlp(ln_2(x))      c_fc 1024->4096, GELU, c_proj 4096->1024
         (block 23 is in the checkpoint but SD 2.x never runs it)
      -> ln_final                                            (B, T, 1024) = the context

SDXL reads the same penultimate block of the bigger ViT-bigG/14 (1280 wide, 32 blocks, 20
heads, OpenCLIPTextConfig.bigg()) without the final layer norm, and also takes CLIP's pooled
sentence vector from it (sgm's FrozenOpenCLIPEmbedder2(layer="penultimate", legacy=False,
always_return_pooled=True); diffusers' encode_prompt):

                   SD 2.x (ViT-H, .full())              SDXL (ViT-bigG, .bigg())
    context        the penultimate block's output,      the penultimate block's output as it
                   then ln_final                        is (final_norm_on_context=False)
                   (final_norm_on_context=True)
    pooled         unused                               ln_final(the last block's output) at the
                                                        EOT token @ text_projection: (B, 1280)

"Penultimate" is layer_skip=1 in both: hidden_states[-2] of every block, transformers' count.

`model(ids)` runs the layers - layer_skip blocks the context needs (the last block is dead
weight there) and returns the context. `model.encode(ids)` runs every block and returns
(context, pooled); on ViT-H it gives open_clip's own text embedding as the pooled vector. The
EOT token is found as open_clip and sgm find it: the position of the highest id in each row
(EOT = 49407 is the highest id the tokenizer writes). `text_projection` is stored as open_clip
holds it, (width, embed_dim) used as x @ P; diffusers/transformers store its transpose (a
Linear's weight): bigG's is square, so a missing transpose would only show in the numbers.

Parameter names equal the single-file checkpoint keys after `cond_stage_model.model.` (SD 2.x)
or `conditioner.embedders.1.model.` (SDXL), open_clip's names (`transformer.resblocks.0.attn.
in_proj_weight`, `ln_final.weight`, ...), so `load_state_dict(strict=True)` takes them with no
renaming, an unused last block, `text_projection` and `logit_scale` included (294 tensors for
ViT-H, 390 for bigG). The attention keeps torch.nn.MultiheadAttention's layout
(`in_proj_weight` rows = [W_q; W_k; W_v], `out_proj`) but computes through ldm.attention with
`causal=True`, like every other stage.

How this relates to transformers: `CLIPTextModel(hidden_size=1024, num_hidden_layers=23,
hidden_act="gelu", intermediate_size=4096, num_attention_heads=16)` is the same function once
in_proj is split into q_proj/k_proj/v_proj (diffusers' single_file_utils.
convert_open_clip_checkpoint does that and drops block 23); for bigG it is the 32-layer
`CLIPTextModelWithProjection`, whose hidden_states[-2] is our SDXL context and whose
text_embeds is our pooled vector. tests/test_openclip.py checks both.

Counting layers. `clip_skip=n` takes the output n blocks before the penultimate one, as in
ldm/clip.py: clip_skip=0 is the penultimate block (config.layer_skip=1), clip_skip=1 the block
before it, i.e. hidden_states[-(n + 2)] of every block. That is diffusers' count for SD 2.x
(encode_prompt(clip_skip=n) on its 23-layer CLIPTextModel) and for SDXL (hidden_states[-(n + 2)]
of its 32-layer model), so code that maps A1111's "Clip skip" N to clip_skip=N - 1 works for
every tower. `return_hidden_states=True` gives the embedding output and the output of every
block that ran (layers - layer_skip + 1 entries, no final layer norm): transformers'
hidden_states of the 23-layer model for SD 2.x.

Reference: Cherti et al. 2023, "Reproducible scaling laws for contrastive language-image
learning" (OpenCLIP); Radford et al. 2021 (CLIP); Rombach et al. 2022 (SD 2 release notes);
Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm.attention import BACKENDS, attention
from ldm.clip import append_rows, check_text_inputs

__all__ = ["OpenCLIPTextConfig", "OpenCLIPTextModel"]


@dataclass(frozen=True)
class OpenCLIPTextConfig:
    """The text tower's shape, in open_clip's names, and which of its outputs the UNet gets.
    Defaults are ViT-H/14 as SD 2.x uses it; bigg() is SDXL's second tower."""

    vocab_size: int = 49408
    context_length: int = 77  # T: the position table's length
    width: int = 1024  # the width of the context the UNet cross-attends to
    layers: int = 24  # blocks in the checkpoint
    heads: int = 16  # head_dim = 1024 / 16 = 64
    mlp_ratio: float = 4.0  # c_fc: width -> 4 * width
    embed_dim: int = 1024  # text_projection's output: CLIP's joint space (SDXL's pooled vector)
    layer_norm_eps: float = 1e-5
    # which output the UNet gets (the table in the module docstring)
    layer_skip: int = 1  # blocks after the context's: 1 = "penultimate" (SD 2.x and SDXL)
    final_norm_on_context: bool = True  # ln_final on the context: SD 2.x yes, SDXL no (sgm's legacy=False)

    @classmethod
    def full(cls) -> "OpenCLIPTextConfig":
        """ViT-H/14 as SD 2.x (512-base and 768-v) uses it."""
        return cls()

    @classmethod
    def tiny(cls) -> "OpenCLIPTextConfig":
        """A small tower for tests (same vocab and 77 tokens; 3 blocks of which 2 run)."""
        return cls(width=48, layers=3, heads=4, embed_dim=40)

    @classmethod
    def bigg(cls) -> "OpenCLIPTextConfig":
        """ViT-bigG/14 as SDXL uses it: the context is the penultimate block's output without
        ln_final; encode() adds the pooled vector through text_projection (1280, 1280)."""
        return cls(width=1280, layers=32, heads=20, embed_dim=1280, final_norm_on_context=False)

    @classmethod
    def tiny_bigg(cls) -> "OpenCLIPTextConfig":
        """A small tower read as SDXL reads bigG (3 blocks, context from the 2nd without
        ln_final, a square projection), 64 wide: not CLIPTextConfig.tiny()'s 32, as SDXL's two
        towers differ in width, which is how diffusers' single-file loader tells them apart."""
        return cls(width=64, layers=3, heads=4, embed_dim=64, final_norm_on_context=False)

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"OpenCLIPTextConfig: width={self.width} must be divisible by heads={self.heads}")
        if not 0 <= self.layer_skip < self.layers:
            raise ValueError(f"OpenCLIPTextConfig: layer_skip={self.layer_skip} must be in "
                             f"[0, layers - 1 = {self.layers - 1}]")

    # The two names ldm.prompt and the pipeline read from a text encoder's config (ldm.clip's
    # CLIPTextConfig fields): the output width, and the blocks the output can be taken from.
    @property
    def hidden_size(self) -> int:
        return self.width

    @property
    def num_hidden_layers(self) -> int:
        """Blocks the context needs (23 of ViT-H's 24, 31 of bigG's 32): what transformers'
        equivalent CLIPTextModel has for SD 2.x, and the range of clip_skip (0 to this - 1)."""
        return self.layers - self.layer_skip

    @property
    def intermediate_size(self) -> int:
        return int(self.width * self.mlp_ratio)


# --- building blocks ------------------------------------------------------------------------


class Attention(nn.Module):
    """Causal multi-head self-attention with nn.MultiheadAttention's parameters: one fused
    in_proj (rows [W_q; W_k; W_v]) and out_proj, so the checkpoint's keys load as they are."""

    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        C = cfg.width
        self.heads = cfg.heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * C, C))  # (3C, C)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * C))
        self.out_proj = nn.Linear(C, C)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's init

    def forward(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)           # (B, T, 3C)
        q, k, v = rearrange(qkv, "b t (three h d) -> three b h t d", three=3, h=self.heads)  # each (B, heads, T, d)
        out = attention(q, k, v, backend=backend, causal=True)              # token i sees tokens 0..i
        return self.out_proj(rearrange(out, "b h t d -> b t (h d)"))        # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.width, cfg.intermediate_size)
        self.c_proj = nn.Linear(cfg.intermediate_size, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the exact (erf) GELU; OpenAI's CLIP (ldm.clip) uses quick_gelu here
        return self.c_proj(F.gelu(self.c_fc(x)))  # (B, T, 4096) inside, (B, T, C) out


class ResidualAttentionBlock(nn.Module):
    """One pre-LN transformer block (open_clip's name)."""

    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), backend=backend)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))


# --- the model ------------------------------------------------------------------------------


class OpenCLIPTextModel(nn.Module):
    """ids (B, T) -> context (B, T, width): block (layers - layer_skip - clip_skip)'s output,
    then ln_final if config.final_norm_on_context.

    `model(ids)` is the context (SD 2.x's or SDXL's, as the config says); `model.encode(ids)`
    is (context, pooled), SDXL's pair. `return_hidden_states=True` also returns the hidden
    states (see the module docstring); `clip_skip=n` goes n blocks further back.
    `text_projection` (width, embed_dim) makes the pooled vector; `logit_scale` (0-d) is
    loaded from the checkpoint for completeness, and neither family uses it.
    """

    def __init__(self, cfg: OpenCLIPTextConfig = OpenCLIPTextConfig(), backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"OpenCLIPTextModel: backend={backend!r} is not one of {BACKENDS}")
        self.config = cfg
        self.backend = backend  # ldm.attention's backend ("auto" = sdpa: causal never takes Triton)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))  # (T, C)
        self.transformer = Transformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.embed_dim))  # x @ P: (C, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's learned temperature (log), 0-d
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=cfg.width ** -0.5)

    def add_embeddings(self, vectors: torch.Tensor) -> list[int]:
        """Append `vectors` (n, width) as new rows of the token embedding; returns their ids
        (textual inversion, as CLIPTextModel.add_embeddings; config.vocab_size grows)."""
        ids = append_rows(self.token_embedding, vectors)
        self.config = replace(self.config, vocab_size=ids[-1] + 1)
        return ids

    def forward(self, ids: torch.Tensor, return_hidden_states: bool = False, clip_skip: int = 0):
        context, hidden_states = self._run(ids, clip_skip, self.config.num_hidden_layers)
        if return_hidden_states:
            return context, hidden_states
        return context

    def encode(self, ids: torch.Tensor, clip_skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's two outputs in one pass: (context (B, T, width), pooled (B, embed_dim)).

        The context is model(ids, clip_skip=clip_skip)'s; pooled = ln_final(the last block's
        output) at the EOT token @ text_projection, CLIP's sentence embedding (transformers'
        text_embeds), whatever clip_skip is. Every block runs, the last included.
        """
        context, hidden_states = self._run(ids, clip_skip, self.config.layers)
        last = hidden_states[-1]  # (B, T, C): the last block's output
        # EOT (49407) is the highest id the tokenizer writes: open_clip's and sgm's text.argmax(dim=-1).
        # (A textual-inversion token, id >= 49408, would win instead, as it does in those references.)
        eot = ids.long().argmax(dim=-1).to(last.device)  # (B,)
        x = self.ln_final(last[torch.arange(last.shape[0], device=last.device), eot])  # (B, C)
        return context, x @ self.text_projection  # (B, embed_dim): open_clip's x @ P

    def _run(self, ids: torch.Tensor, clip_skip: int, run: int):
        """Run the first `run` blocks; (context, hidden states: the embedding and each block's output)."""
        cfg = self.config
        check_text_inputs(ids, cfg.context_length, clip_skip, cfg.num_hidden_layers)

        T = ids.shape[1]
        x = self.token_embedding(ids.long()) + self.positional_embedding[:T]  # (B, T, C)
        hidden_states = [x]
        for block in self.transformer.resblocks[:run]:
            x = block(x, backend=self.backend)  # (B, T, C)
            hidden_states.append(x)
        # block (layers - layer_skip - clip_skip)'s output: SD 2.x's and SDXL's "penultimate" at clip_skip=0
        context = hidden_states[cfg.num_hidden_layers - clip_skip]  # (B, T, C)
        if cfg.final_norm_on_context:
            context = self.ln_final(context)  # SD 2.x; SDXL's context is the raw hidden state
        return context, hidden_states
