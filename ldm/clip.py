"""The CLIP ViT-L/14 text tower: token ids (B, 77) -> context (B, 77, 768) for the UNet.

Stable Diffusion 1.x conditions on the *last hidden state* of OpenAI's CLIP ViT-L/14 text
transformer (after its final layer norm), not on the pooled sentence vector. The tower is a
plain GPT-2-style stack, written here top to bottom:

    ids (B, T=77)
      -> token_embedding(ids) + position_embedding(0..76)      (B, T, 768)
      -> 12 x pre-LN block:                                     (B, T, 768)
             x = x + self_attn(layer_norm1(x))    causal: token i sees tokens 0..i
             x = x + mlp(layer_norm2(x))          fc1 768->3072, quick_gelu, fc2 3072->768
      -> final_layer_norm                                       (B, T, 768) = the context

Parameter names equal the checkpoint keys after `cond_stage_model.transformer.` (Hugging Face
naming: `text_model.encoder.layers.0.self_attn.q_proj.weight`, ...), so a real checkpoint loads
with `load_state_dict(strict=True)`. Some checkpoints also carry the buffer
`text_model.embeddings.position_ids` (just 0..76); ldm.checkpoint drops it, because positions
are computed here.

New tokens (textual inversion, see ldm.prompt) grow the token embedding in place:
`add_embeddings(vectors)` appends rows and returns their ids, keeping the parameter name
`text_model.embeddings.token_embedding.weight` (so state_dict keys stay checkpoint keys; the
table then has more rows than a checkpoint's 49,408).

Reference: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision"; parity with `transformers.CLIPTextModel` is tested in tests/test_clip.py.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from einops import rearrange
from torch import nn

from ldm.attention import BACKENDS, attention

__all__ = ["CLIPTextConfig", "CLIPTextModel", "quick_gelu", "causal_mask"]


@dataclass(frozen=True)
class CLIPTextConfig:
    """The text tower's shape. Defaults are CLIP ViT-L/14, the one SD 1.x uses."""

    vocab_size: int = 49408
    max_position_embeddings: int = 77  # T: the context window, fixed by the position table
    hidden_size: int = 768  # the width of the context the UNet cross-attends to
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12  # head_dim = 768 / 12 = 64
    layer_norm_eps: float = 1e-5

    @classmethod
    def tiny(cls) -> "CLIPTextConfig":
        """A small tower for tests and notebooks without weights (same vocab, same 77 tokens)."""
        return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by "
                f"num_attention_heads={self.num_attention_heads}")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's GELU approximation: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


def causal_mask(T: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(T, T) additive mask: 0 on and below the diagonal, -inf above (token i sees 0..i).
    For inspection: the attention itself is ldm.attention's `causal=True`."""
    return torch.full((T, T), float("-inf"), device=device, dtype=dtype).triu(1)


# --- building blocks ------------------------------------------------------------------------


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        positions = torch.arange(T, device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(positions)  # (B, T, C)


class CLIPAttention(nn.Module):
    """Multi-head causal self-attention through ldm.attention (`causal=True`): "math" is the
    readable path (it can return the probabilities), "sdpa"/"auto" torch's fused kernel."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        C = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(C, C)
        self.k_proj = nn.Linear(C, C)
        self.v_proj = nn.Linear(C, C)
        self.out_proj = nn.Linear(C, C)

    def forward(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        split = "b t (h d) -> b h t d"
        q = rearrange(self.q_proj(x), split, h=self.heads)  # (B, heads, T, head_dim)
        k = rearrange(self.k_proj(x), split, h=self.heads)
        v = rearrange(self.v_proj(x), split, h=self.heads)
        out = attention(q, k, v, backend=backend, causal=True)  # token i sees tokens 0..i
        return self.out_proj(rearrange(out, "b h t d -> b t (h d)"))  # (B, T, C)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))  # (B, T, 3072) inside, (B, T, C) out


class CLIPEncoderLayer(nn.Module):
    """One pre-LN transformer block."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), backend=backend)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


def check_text_inputs(ids: torch.Tensor, max_tokens: int, clip_skip, layers: int) -> None:
    """ids (B, T) integers with T <= max_tokens, clip_skip an int in [0, layers): else one ValueError.
    Both text towers (this one and ldm.openclip's) take their inputs through it."""
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"ids must be an integer tensor of shape (B, T); got shape {tuple(ids.shape)} "
                         f"and dtype {ids.dtype}")
    if ids.shape[1] > max_tokens:
        raise ValueError(f"ids has {ids.shape[1]} tokens; at most {max_tokens} are allowed")
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 0 <= clip_skip < layers:
        raise ValueError(f"clip_skip={clip_skip!r} must be an int in [0, {layers - 1}]")


def append_rows(emb: nn.Embedding, vectors: torch.Tensor) -> list[int]:
    """Append `vectors` (n, C) as new rows of the embedding table `emb` (textual inversion); returns
    their ids, from the old vocabulary size up. The parameter keeps its name, device and dtype."""
    C = emb.embedding_dim
    if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2 or vectors.shape[1] != C \
            or not vectors.is_floating_point() or not vectors.shape[0]:
        shown = tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
        raise ValueError(f"vectors has shape {shown}; expected a float tensor (n >= 1, {C}), "
                         f"one row of the text encoder's width {C} per new token")
    old = emb.weight
    rows = vectors.detach().to(device=old.device, dtype=old.dtype)
    emb.weight = nn.Parameter(torch.cat([old.detach(), rows]), requires_grad=old.requires_grad)  # (V + n, C)
    emb.num_embeddings = emb.weight.shape[0]
    return list(range(old.shape[0], emb.num_embeddings))


# --- the model ------------------------------------------------------------------------------


class CLIPTextModel(nn.Module):
    """ids (B, T) -> context (B, T, hidden_size): the last hidden state after the final LN.

    `model(ids)` gives the context SD 1.x uses. `model(ids, return_hidden_states=True)` also
    returns every layer's hidden state, as `transformers` counts them: entry 0 is the
    embedding output and entry i the output of block i (no final layer norm), so there are
    num_hidden_layers + 1 of them. `clip_skip=n` takes the output of block L - n (with the
    final layer norm applied) instead of the last block, the "CLIP skip" that some
    fine-tuned checkpoints want; clip_skip=0 is SD 1.x. This is diffusers' count (its
    encode_prompt(clip_skip=n) is the same tensor); A1111's "Clip skip" setting counts from 1,
    so A1111's N is clip_skip=N - 1 here (ldm.prompt.encode takes A1111's N).
    """

    def __init__(self, cfg: CLIPTextConfig = CLIPTextConfig(), backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"CLIPTextModel: backend={backend!r} is not one of {BACKENDS}")
        self.config = cfg
        # ldm.attention's backend for every layer, a plain attribute: "math" (readable),
        # "sdpa" (fused), "auto" (= sdpa: causal attention never takes the Triton kernel)
        self.backend = backend
        self.text_model = CLIPTextTransformer(cfg)

    def add_embeddings(self, vectors: torch.Tensor) -> list[int]:
        """Append `vectors` (n, hidden_size) as new rows of the token embedding; returns their ids.

        The ids run from the old vocab_size upward (as ldm.tokenizer's add_tokens gives them);
        config.vocab_size grows with the table. The parameter keeps its name, device and dtype.
        """
        ids = append_rows(self.text_model.embeddings.token_embedding, vectors)
        self.config = replace(self.config, vocab_size=ids[-1] + 1)
        return ids

    def forward(self, ids: torch.Tensor, return_hidden_states: bool = False, clip_skip: int = 0):
        cfg = self.config
        check_text_inputs(ids, cfg.max_position_embeddings, clip_skip, cfg.num_hidden_layers)

        tm = self.text_model
        x = tm.embeddings(ids.long())  # (B, T, C)
        hidden_states = [x]
        for layer in tm.encoder.layers:
            x = layer(x, backend=self.backend)  # (B, T, C)
            hidden_states.append(x)
        context = tm.final_layer_norm(hidden_states[-1 - clip_skip])  # (B, T, C)
        if return_hidden_states:
            return context, hidden_states
        return context
