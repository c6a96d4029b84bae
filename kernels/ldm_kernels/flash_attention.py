"""Flash attention: a Triton forward kernel for softmax(Q K^T * scale) V, and its launcher.

`flash_attention(q, k, v)` computes exactly what `ldm.attention.attention(..., backend="math")`
computes, but tile by tile: each program holds BLOCK_M query rows in registers, streams the
keys and values past them BLOCK_N at a time, and keeps a running (online) softmax, so the
N x M score matrix never exists in GPU memory. `supports(q, k, v)` says, without raising,
whether the kernel takes these inputs; `ldm/attention.py` uses it to choose the "triton"
backend automatically on CUDA.

The kernel, in the notation of the chapter (docs/06-flash-attention.md):

    for each key/value tile j:                 s_j = (Q K_j^T) * scale * log2(e)   (BLOCK_M, BLOCK_N)
        m_new = max(m, rowmax(s_j))            running max, in log2 units
        p_j   = exp2(s_j - m_new)              unnormalised probabilities of this tile
        alpha = exp2(m - m_new)                rescales what was accumulated so far
        l     = alpha * l + rowsum(p_j)        running normaliser
        acc   = alpha * acc + p_j V_j          running numerator, fp32
    O = acc / l

Inputs are (B, heads, N, d) queries and (B, heads, M, d) keys/values in fp16, bf16 or fp32, in
any strided layout: all four strides of q, k, v and o go to the kernel, so the (B, N, heads, d)
views that `rearrange(x, "b n (h d) -> b h n d")` makes of a projection are read in place.

The head dim d of SD 1.x (40, 80, 160) is not a power of two, but Triton tiles are. Two ways
in, chosen by `head_dim_strategy`:
  "pad"   one chunk of next_pow2(d) columns, the tail masked (40 -> 64, 80 -> 128, 160 -> 256);
  "split" a power-of-two chunk plus a masked remainder chunk of >= 16 columns
          (40 -> 32 + 16, 80 -> 64 + 16, 160 -> 128 + 32): fewer wasted multiply-adds,
          two dots per product instead of one.
"pad" is the default (the simpler one); the trade-off is discussed in the chapter.

Run it on the CPU with Triton's interpreter by setting TRITON_INTERPRET=1 before this module
is imported. The interpreter computes a bf16 `tl.dot` wrongly, so there the kernel upcasts
bf16 tiles to fp32 (UPCAST); on a GPU the dots take fp16/bf16 and accumulate in fp32.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

try:
    import triton
    import triton.language as tl
except ImportError as err:  # pragma: no cover - triton ships with CUDA builds of torch
    raise ImportError(
        "ldm_kernels.flash_attention needs the `triton` package "
        "(pip install 'ldm[triton]'); use ldm.attention's 'sdpa' or 'math' backend without it"
    ) from err

__all__ = ["flash_attention", "supports", "head_dim_chunks", "stride_alignment", "INTERPRETING", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HeadDimStrategy = Literal["pad", "split"]
LOG2_E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))
MIN_TILE = 16  # the smallest tile a GPU tl.dot takes


# ---------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------

@triton.jit
def _multiple_of(stride, ALIGN: tl.constexpr):
    """`stride`, a multiple of ALIGN (the launcher checked), in a form the compiler can see is one.

    Without it a head offset like h * 40 has unknown alignment, every load is a 2-byte scalar
    load and nothing is pipelined; with it rows load as 16-byte cp.async copies (seen in the
    PTX for sm_90). tl.multiple_of does not carry this for scalar arguments.
    """
    return (stride // ALIGN) * ALIGN


@triton.jit
def _attn_fwd(
    Q, K, V, O,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_km, stride_kd,
    stride_vb, stride_vh, stride_vm, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    N, M,
    qk_scale,                                   # scale * log2(e): exp2 then gives exp(scale * q.k)
    HEAD_DIM: tl.constexpr,                     # the real head dim d
    D0: tl.constexpr, D1: tl.constexpr,         # head-dim chunks, D0 + D1 >= d; D1 = 0: one chunk
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,                       # do the dots in fp32 (bf16 under the interpreter)
    INPUT_PRECISION: tl.constexpr,              # "ieee" for fp32 inputs: no silent tf32
    ALIGN: tl.constexpr,                        # every stride but the last is a multiple of ALIGN
):
    stride_qb, stride_qh, stride_qn = (_multiple_of(stride_qb, ALIGN), _multiple_of(stride_qh, ALIGN),
                                       _multiple_of(stride_qn, ALIGN))
    stride_kb, stride_kh, stride_km = (_multiple_of(stride_kb, ALIGN), _multiple_of(stride_kh, ALIGN),
                                       _multiple_of(stride_km, ALIGN))
    stride_vb, stride_vh, stride_vm = (_multiple_of(stride_vb, ALIGN), _multiple_of(stride_vh, ALIGN),
                                       _multiple_of(stride_vm, ALIGN))
    stride_ob, stride_oh, stride_on = (_multiple_of(stride_ob, ALIGN), _multiple_of(stride_oh, ALIGN),
                                       _multiple_of(stride_on, ALIGN))
    start_m = tl.program_id(0)                  # which BLOCK_M rows of queries
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < N                          # the last query tile may run past N
    offs_d0 = tl.arange(0, D0)
    mask_d0 = offs_d0 < HEAD_DIM                 # "pad": columns d..D0 are masked to zero

    # the query tile stays in registers for the whole pass: (BLOCK_M, D0) [+ (BLOCK_M, D1)]
    q0 = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d0[None, :] * stride_qd,
                 mask=mask_m[:, None] & mask_d0[None, :], other=0.0)
    if UPCAST:
        q0 = q0.to(tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        mask_d1 = offs_d1 < HEAD_DIM             # "split": the remainder chunk's tail is masked
        q1 = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d1[None, :] * stride_qd,
                     mask=mask_m[:, None] & mask_d1[None, :], other=0.0)
        if UPCAST:
            q1 = q1.to(tl.float32)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)   # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                 # running normaliser

    # one pass over the keys and values, BLOCK_N at a time
    for start_n in range(0, M, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < M                        # the last key tile may run past M (M = 77)

        # s = Q K^T for this tile: K is loaded transposed, (D, BLOCK_N)
        k0 = tl.load(k_base + offs_d0[:, None] * stride_kd + cols[None, :] * stride_km,
                     mask=mask_d0[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            k0 = k0.to(tl.float32)
        s = tl.dot(q0, k0, input_precision=INPUT_PRECISION)     # (BLOCK_M, BLOCK_N) fp32
        if D1 > 0:
            k1 = tl.load(k_base + offs_d1[:, None] * stride_kd + cols[None, :] * stride_km,
                         mask=mask_d1[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:
                k1 = k1.to(tl.float32)
            s = tl.dot(q1, k1, s, input_precision=INPUT_PRECISION)
        s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))

        # online softmax: new max, rescale the old sums, add this tile's
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])    # (BLOCK_M, BLOCK_N), masked columns -> 0
        alpha = tl.math.exp2(m_i - m_new)       # 0 on the first tile (m_i = -inf)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

        v0 = tl.load(v_base + cols[:, None] * stride_vm + offs_d0[None, :] * stride_vd,
                     mask=mask_n[:, None] & mask_d0[None, :], other=0.0)    # (BLOCK_N, D0)
        if UPCAST:
            v0 = v0.to(tl.float32)
        acc0 = tl.dot(p.to(v0.dtype), v0, acc0 * alpha[:, None], input_precision=INPUT_PRECISION)
        if D1 > 0:
            v1 = tl.load(v_base + cols[:, None] * stride_vm + offs_d1[None, :] * stride_vd,
                         mask=mask_n[:, None] & mask_d1[None, :], other=0.0)
            if UPCAST:
                v1 = v1.to(tl.float32)
            acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=INPUT_PRECISION)

    # normalise once at the end, and write the rows and columns that exist
    l_inv = 1.0 / l_i
    out0 = (acc0 * l_inv[:, None]).to(O.dtype.element_ty)
    tl.store(o_base + offs_m[:, None] * stride_on + offs_d0[None, :] * stride_od, out0,
             mask=mask_m[:, None] & mask_d0[None, :])
    if D1 > 0:
        out1 = (acc1 * l_inv[:, None]).to(O.dtype.element_ty)
        tl.store(o_base + offs_m[:, None] * stride_on + offs_d1[None, :] * stride_od, out1,
                 mask=mask_m[:, None] & mask_d1[None, :])


INTERPRETING: bool = type(_attn_fwd).__name__ == "InterpretedFunction"
"""True when TRITON_INTERPRET=1 was set before import: the kernel runs on the CPU, in numpy."""


# ---------------------------------------------------------------------------------------------
# Tile sizes: autotuned on a GPU, fixed under the interpreter
# ---------------------------------------------------------------------------------------------

def _gpu_configs() -> list[triton.Config]:
    configs = []
    for block_m in (64, 128):
        for block_n in (32, 64, 128):
            for num_warps in (4, 8):
                for num_stages in (2, 3):
                    if num_warps == 8 and block_m == 64:
                        continue  # wgmma works on 64 rows per 4 warps: 8 warps want 128 rows
                    configs.append(triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n},
                                                 num_warps=num_warps, num_stages=num_stages))
    return configs


def _short_keys_block_n(M: int) -> int:
    """The key tile that holds all M keys at once (cross-attention, M = 77 -> 128)."""
    return max(MIN_TILE, triton.next_power_of_2(M))


H100_SHARED_MEMORY = 227 * 1024  # bytes a block may use


def _fits(block_m: int, block_n: int, num_warps: int, num_stages: int, d_tiles: int, elem: int) -> bool:
    """Whether a tile config fits an H100 without spilling registers.

    Both rules were read off sm_90 compiles of this kernel (docs/06-flash-attention.md):
    shared memory is exactly the Q tile plus num_stages K and V tiles, and ptxas starts to
    spill once a thread's share of the fp32 accumulator and score tiles passes ~160 values.
    """
    smem = (block_m * d_tiles + 2 * num_stages * block_n * d_tiles) * elem
    per_thread = (block_m * d_tiles + block_m * block_n) / (32 * num_warps)
    return smem <= H100_SHARED_MEMORY and per_thread <= 160


def _prune_configs(configs, named_args, **kwargs):
    """Keep the configs that fit; for M <= 128 keys prefer those holding all keys in one tile."""
    M = named_args["M"]
    d_tiles = kwargs["D0"] + kwargs["D1"]
    elem = named_args["Q"].element_size()

    def keep(block_n_of):
        kept = {}
        for c in configs:
            key = (c.kwargs["BLOCK_M"], block_n_of(c), c.num_warps, c.num_stages)
            if _fits(*key, d_tiles, elem):
                kept[key] = triton.Config({"BLOCK_M": key[0], "BLOCK_N": key[1]},
                                          num_warps=key[2], num_stages=key[3])
        return list(kept.values())

    one_tile = keep(lambda c: _short_keys_block_n(M)) if M <= 128 else []
    # (d = 160 padded to 256 cannot hold 128 keys in one tile: then several tiles it is)
    return one_tile or keep(lambda c: c.kwargs["BLOCK_N"]) or [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)]


_attn_fwd_tuned = None if INTERPRETING else triton.autotune(
    configs=_gpu_configs(),
    key=["N", "M", "HEAD_DIM", "D0", "D1", "ALIGN"],  # the autotuner adds the dtypes of the tensors
    prune_configs_by={"early_config_prune": _prune_configs},
)(_attn_fwd)

# the interpreter: one small config, no autotuning (timing numpy is meaningless)
INTERPRETER_BLOCK_M = 16
INTERPRETER_BLOCK_N = 16


# ---------------------------------------------------------------------------------------------
# The launcher
# ---------------------------------------------------------------------------------------------

def head_dim_chunks(d: int, strategy: HeadDimStrategy = "pad") -> tuple[int, int]:
    """The head-dim tiles (D0, D1) the kernel uses for head dim d; D1 = 0 means one tile.

    "pad":   (next_pow2(d), 0), at least 16:          40 -> (64, 0),  80 -> (128, 0), 160 -> (256, 0)
    "split": a power of two <= d plus a >= 16 rest:   40 -> (32, 16), 80 -> (64, 16), 160 -> (128, 32)
    """
    if not isinstance(d, int) or not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim d={d!r} is not supported: allowed 1..{MAX_HEAD_DIM}")
    pad = max(MIN_TILE, triton.next_power_of_2(d))
    if strategy == "pad":
        return pad, 0
    if strategy == "split":
        d0 = max(MIN_TILE, 1 << (d.bit_length() - 1))       # largest power of two <= d
        rest = d - d0
        if rest <= 0:
            return d0, 0
        return d0, max(MIN_TILE, triton.next_power_of_2(rest))
    raise ValueError(f"head_dim_strategy={strategy!r} is not supported: allowed 'pad' or 'split'")


def stride_alignment(*tensors: torch.Tensor) -> int:
    """The largest power of two <= 16 that divides every stride but the last of each tensor.

    The kernel is told this (ALIGN) so that it can load 16-byte vectors: for SD's
    (B, N, heads, 40) views the head stride is 40, a multiple of 8 but not of 16, which is
    all Triton's own argument specialisation would notice.
    """
    align = 16
    for t in tensors:
        for stride in t.stride()[:-1]:
            while stride % align:
                align //= 2
    return align


def _problem(q, k, v) -> str | None:
    """Why the kernel cannot take (q, k, v), or None when it can."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            return f"{name} must be a torch.Tensor, got {type(x).__name__}"
        if x.dim() != 4:
            return f"{name} must be 4-D (B, heads, tokens, head_dim), got shape {tuple(x.shape)}"
        if x.dtype not in SUPPORTED_DTYPES:
            return f"{name}.dtype={x.dtype} is not supported: allowed float16, bfloat16, float32"
        if x.numel() == 0:
            return f"{name} has shape {tuple(x.shape)}: every dimension must be >= 1"
    if not q.dtype == k.dtype == v.dtype:
        return f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}): they must be equal"
    if not q.device == k.device == v.device:
        return f"q, k, v devices differ ({q.device}, {k.device}, {v.device}): they must be equal"
    if q.device.type != "cuda" and not (INTERPRETING and q.device.type == "cpu"):
        return (f"device {q.device} is not supported: the kernel needs a CUDA GPU (or the CPU "
                f"under Triton's interpreter: TRITON_INTERPRET=1 set before importing ldm_kernels)")
    if q.device.type == "cuda" and not INTERPRETING:
        major, minor = torch.cuda.get_device_capability(q.device)
        if major < 8:
            return f"GPU compute capability {major}.{minor} is not supported: needs 8.0 (Ampere) or newer"
    B, H, _, d = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != H or k.shape[3] != d:
        return (f"shapes do not match: q {tuple(q.shape)} (B, heads, N, d) needs k and v of shape "
                f"(B, heads, M, d) = ({B}, {H}, M, {d}), got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if d > MAX_HEAD_DIM:
        return f"head dim d={d} is not supported: allowed 1..{MAX_HEAD_DIM}"
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return "inputs require grad: the kernel is forward-only (use torch.no_grad() or the 'sdpa' backend)"
    return None


def supports(q, k, v) -> bool:
    """True when `flash_attention(q, k, v)` takes these inputs; never raises."""
    try:
        return _problem(q, k, v) is None
    except Exception:  # a caller asking "can you?" must get an answer, not an error
        return False


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    head_dim_strategy: HeadDimStrategy = "pad",
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v with the Triton kernel; forward only, no mask, no dropout.

    q: (B, heads, N, d); k, v: (B, heads, M, d); fp16, bf16 or fp32, any strides, d <= 256.
    scale: defaults to 1 / sqrt(d).
    head_dim_strategy: "pad" or "split" (see `head_dim_chunks`).
    block_m, block_n: fix the tile sizes (powers of two >= 16) instead of autotuning them.
    Returns (B, heads, N, d) in q's dtype, laid out in memory like q when q is dense
    (so a (B, N, heads, d) view stays one, and rearranging back to (B, N, heads*d) is free).
    """
    problem = _problem(q, k, v)
    if problem is not None:
        raise ValueError(f"flash_attention: {problem}")
    B, H, N, d = q.shape
    M = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"flash_attention: scale={scale!r} is not supported: allowed a finite number or None")
    D0, D1 = head_dim_chunks(d, head_dim_strategy)
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        if block is not None and (not isinstance(block, int) or block < MIN_TILE or block & (block - 1)):
            raise ValueError(f"flash_attention: {name}={block!r} is not supported: "
                             f"allowed a power of two >= {MIN_TILE}, or None")

    o = torch.empty_like(q)  # keeps q's strides when q is dense, e.g. a (B, N, heads, d) view
    args = (q, k, v, o, *q.stride(), *k.stride(), *v.stride(), *o.stride(), N, M, float(scale) * LOG2_E)
    consts = dict(
        HEAD_DIM=d, D0=D0, D1=D1,
        UPCAST=INTERPRETING and q.dtype == torch.bfloat16,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        ALIGN=stride_alignment(q, k, v, o),
    )
    if INTERPRETING or block_m is not None or block_n is not None:
        bm = block_m or (INTERPRETER_BLOCK_M if INTERPRETING else 64)
        if block_n is not None:
            bn = block_n
        elif M <= 128:
            bn = _short_keys_block_n(M)  # cross-attention: all 77 keys in one tile, as on the GPU
        else:
            bn = INTERPRETER_BLOCK_N if INTERPRETING else 64
        grid = (triton.cdiv(N, bm), H, B)
        _attn_fwd[grid](*args, **consts, BLOCK_M=bm, BLOCK_N=bn,
                        num_warps=8 if bm >= 128 else 4, num_stages=2)
    else:
        def grid(meta):
            return triton.cdiv(N, meta["BLOCK_M"]), H, B
        _attn_fwd_tuned[grid](*args, **consts)
    return o
