"""Scaled dot-product attention, softmax(Q K^T / sqrt(d)) V, behind one function with backends.

`attention(q, k, v, backend=...)` computes every attention of the library: the UNet's self-
and cross-attention and the text towers' causal self-attention (ldm.clip, ldm.openclip, with
`causal=True`). The backend is an argument of each call, so a model picks one per model or
per forward pass; there is no global switch:

    "math"    the readable specification below. It can hand back the attention
              probabilities (`return_probs=True`) for inspection, and it works through the
              queries in chunks so that the (N, M) score matrix of a 64x64 latent never has
              to exist whole (see `MATH_CHUNK_BYTES`).
    "sdpa"    torch.nn.functional.scaled_dot_product_attention, torch's fused kernel.
    "triton"  the hand-written flash-attention kernel in ldm_kernels.flash_attention
              (imported on first use, so the library runs without Triton).
    "auto"    "triton" for fp16/bf16 CUDA tensors the kernel supports, else "sdpa"
              (always "sdpa" with causal=True: the kernel has no mask).

causal=True masks the scores above the diagonal, so query i sees keys 0..i only (GPT-style
text towers; top-left aligned like torch's `is_causal` when N != M).

Half precision (fp16, bf16). The scores q k^T of SD 2.x reach beyond fp16's largest value
(65504) and the softmax of an inf row is NaN: black images (the CompVis code's fix is
ATTN_PRECISION="fp32", diffusers' is `upcast_attention`). So every backend forms the scores
and their softmax in fp32 whatever the input dtype: the math path upcasts q and k before the
product, torch's fused sdpa kernels and the Triton kernel accumulate q k^T and run the online
softmax in fp32 registers. The output has q's dtype.

Shapes (one vocabulary for the whole library):
    q      (B, heads, N, d)   N queries, e.g. the H*W pixels of a latent
    k, v   (B, heads, M, d)   M keys/values: the same pixels (self-attention) or the
                              T = 77 text tokens (cross-attention)
    out    (B, heads, N, d)
    probs  (B, heads, N, M)   each row sums to 1: where query i looks

q, k and v may be strided views, e.g. rearrange(x, "b n (h d) -> b h n d", h=heads).
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

BACKENDS = ("math", "sdpa", "triton", "auto")

# Largest score block (B * heads * chunk * M elements) the math path materialises at once.
# 128 MiB of fp32: a 512x512 image (64x64 latent, N = M = 4096, batch 2, 8 heads) needs
# 1 GiB for the full score matrix, so the math path processes it in 8 query chunks.
MATH_CHUNK_BYTES = 128 * 2**20


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D (B, heads, tokens, head_dim), "
                             f"got shape {tuple(t.shape)}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"attention: k and v must agree on (B, heads, M), got k {tuple(k.shape)} "
                         f"and v {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on "
                         f"B, heads and head_dim")


def math_attention(q: Tensor, k: Tensor, v: Tensor, return_probs: bool = False,
                   chunk_bytes: int = MATH_CHUNK_BYTES, causal: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The specification: out = softmax(q k^T / sqrt(d) + mask) v (Vaswani et al. 2017, eq. 1).

    mask is 0 everywhere, or with `causal=True` -inf where key j > query i (a token sees
    itself and the tokens before it). The softmax runs over the keys, independently for
    every query row, so splitting the queries into chunks gives exactly the same numbers
    with a bounded score matrix. Scores and softmax are fp32 for fp16/bf16 inputs (see the
    module docstring); the probabilities are cast back to v's dtype for the product with v.
    """
    B, heads, N, d = q.shape
    M = k.shape[2]
    scale = 1.0 / math.sqrt(d)
    score_dtype = torch.promote_types(q.dtype, torch.float32)   # fp16/bf16 -> fp32; fp64 stays
    row_bytes = B * heads * M * torch.finfo(score_dtype).bits // 8   # one query row of scores, all heads
    chunk = max(1, min(N, chunk_bytes // max(row_bytes, 1)))
    k_t = k.to(score_dtype).transpose(-2, -1)                   # (B, heads, d, M)
    outs, all_probs = [], []
    for start in range(0, N, chunk):
        q_c = q[:, :, start:start + chunk].to(score_dtype)      # (B, heads, n, d)
        scores = (q_c @ k_t) * scale                            # (B, heads, n, M)
        if causal:
            i = torch.arange(start, start + q_c.shape[2], device=q.device)[:, None]   # query positions
            j = torch.arange(M, device=q.device)[None, :]                              # key positions
            scores = scores.masked_fill(j > i, float("-inf"))   # (n, M) mask, broadcast over B, heads
        probs = scores.softmax(dim=-1).to(v.dtype)              # rows sum to 1 over the keys
        outs.append(probs @ v)                                  # (B, heads, n, d)
        if return_probs:
            all_probs.append(probs)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # (B, heads, N, d)
    if return_probs:
        return out, (all_probs[0] if len(all_probs) == 1 else torch.cat(all_probs, dim=2))
    return out


def _triton(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    try:
        from ldm_kernels.flash_attention import flash_attention
    except ImportError as e:  # Triton missing, or the kernel module failed to import
        raise RuntimeError(f"attention: backend='triton' needs ldm_kernels.flash_attention "
                           f"(and Triton); importing it failed: {e}") from e
    return flash_attention(q, k, v)


def _auto_backend(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> str:
    """'triton' for fp16/bf16 CUDA tensors the flash kernel supports, otherwise 'sdpa'.
    (The kernel's fp32 path is exact IEEE dots without tensor cores: a correctness path;
    it has no mask, so causal attention always takes sdpa.)"""
    if causal or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return "sdpa"
    try:
        from ldm_kernels.flash_attention import supports
    except ImportError:
        log.debug("attention: ldm_kernels.flash_attention unavailable, 'auto' uses sdpa")
        return "sdpa"
    return "triton" if supports(q, k, v) else "sdpa"


def attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "math", *,
              causal: bool = False, return_probs: bool = False,
              chunk_bytes: int = MATH_CHUNK_BYTES) -> Tensor | tuple[Tensor, Tensor]:
    """softmax(q k^T / sqrt(d)) v with the chosen backend.

    q (B, heads, N, d), k/v (B, heads, M, d) -> out (B, heads, N, d); with
    `return_probs=True` (math backend only) -> (out, probs (B, heads, N, M)).
    `causal=True`: query i attends to keys 0..i only ("triton" refuses it, "auto" picks sdpa).
    `chunk_bytes` bounds the score block of the math path.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention: backend={backend!r} is not one of {BACKENDS}")
    _check(q, k, v)
    if return_probs and backend != "math":
        raise ValueError(f"attention: return_probs=True needs backend='math' (the fused "
                         f"backends never form the probabilities), got backend={backend!r}")
    if causal and backend == "triton":
        raise ValueError("attention: causal=True is not supported by backend='triton' (the flash "
                         "kernel has no mask); use 'auto', 'sdpa' or 'math'")
    if backend == "auto":
        backend = _auto_backend(q, k, v, causal)
    if backend == "math":
        return math_attention(q, k, v, return_probs=return_probs, chunk_bytes=chunk_bytes, causal=causal)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return _triton(q, k, v)
