"""Benchmark the flash-attention kernel against torch SDPA's backends on SD 1.x shapes (needs CUDA).

    python kernels/bench_flash_attention.py                       # every shape, fp16 and bf16
    python kernels/bench_flash_attention.py --dtypes fp16 --shapes 4096 --strategies pad
    python kernels/bench_flash_attention.py --unet                # and the UNet step per backend
    python kernels/bench_flash_attention.py --json results.json   # also write the numbers

Shapes: SD 1.x at 512x512 with classifier-free guidance, batch 2, 8 heads; self-attention with
N = M = 4096 (head dim 40), 1024 (80), 256 (160), 64 (160, the middle block), and
cross-attention with the same N and d and M = 77 text tokens. Inputs are the strided
(B, heads, N, d) views of (B, N, heads*d) projections the UNet produces.

Candidates: our kernel with each head-dim strategy ("pad", "split", autotuned), torch SDPA with
each backend forced (flash, efficient, cuDNN, math), and flash-attn / xformers when installed.
Each is checked against an fp32 reference first (max error printed), then timed with
triton.testing.do_bench (median of ~100 ms of runs, after warm-up; our kernel is called once
before timing so autotuning is not timed). Reported: ms, useful TFLOP/s = 4*B*heads*N*M*d / t
(the real d, not the padded one), GB/s for cross-attention = bytes of q, k, v, o / t, and the
speed-up of each candidate over the best SDPA backend (> 1: faster than torch's best).

Autotuning compiles up to 16 configs per (shape, dtype, strategy) key: a full run compiles a
few hundred kernels. Triton caches them (TRITON_CACHE_DIR), so a second run is fast; use the
filters to split a first run into parts.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

SHAPES = [(4096, 40), (1024, 80), (256, 160), (64, 160)]  # (N, head dim)
BATCH, HEADS, TEXT_TOKENS = 2, 8, 77
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Row:
    kind: str          # "self" or "cross"
    N: int
    M: int
    d: int
    dtype: str
    candidate: str
    ms: float | None   # None: the candidate does not run this shape
    tflops: float | None
    gbps: float | None
    max_err: float | None
    note: str = ""


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------

def environment() -> dict[str, str]:
    """The GPU, driver and library versions: a benchmark number means nothing without them."""
    import triton

    env = {
        "gpu": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "driver": _nvidia_smi("driver_version"),
        "cuda (torch)": str(torch.version.cuda),
        "cudnn": str(torch.backends.cudnn.version()),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }
    for name in ("flash_attn", "xformers"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = "not installed"
    return env


def _nvidia_smi(field: str) -> str:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else "unknown"
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


# ---------------------------------------------------------------------------------------------
# The attention candidates
# ---------------------------------------------------------------------------------------------

def candidates(strategies: list[str]) -> dict:
    """name -> (context-manager factory or None, fn(q, k, v) -> out) for every runnable candidate."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ldm_kernels.flash_attention import flash_attention

    out = {}
    for strategy in strategies:
        out[f"triton-{strategy}"] = (nullcontext, lambda q, k, v, s=strategy: flash_attention(
            q, k, v, head_dim_strategy=s))
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)):
        out[f"sdpa-{name}"] = (lambda b=backend: sdpa_kernel([b]), F.scaled_dot_product_attention)
    try:  # both libraries take (B, N, heads, d): the projections' own layout, a free transpose
        from flash_attn import flash_attn_func
        out["flash-attn"] = (nullcontext, lambda q, k, v: flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2))
    except ImportError:
        pass
    try:
        import xformers.ops as xops
        out["xformers"] = (nullcontext, lambda q, k, v: xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2))
    except ImportError:
        pass
    return out


def make_inputs(N: int, M: int, d: int, dtype: torch.dtype, seed: int = 0):
    """q (B, heads, N, d), k/v (B, heads, M, d): per-head views of (B, tokens, heads*d) projections."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def proj(tokens):
        x = torch.randn(BATCH, tokens, HEADS * d, device="cuda", generator=gen, dtype=torch.float32)
        return x.to(dtype).view(BATCH, tokens, HEADS, d).transpose(1, 2)   # (B, heads, tokens, d)

    return proj(N), proj(M), proj(M)


def bench_shape(kind: str, N: int, d: int, dtype_name: str, cands: dict) -> list[Row]:
    from triton.testing import do_bench

    M = N if kind == "self" else TEXT_TOKENS
    dtype = DTYPES[dtype_name]
    q, k, v = make_inputs(N, M, d, dtype)
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    flops = 4 * BATCH * HEADS * N * M * d
    moved = (2 * N * d + 2 * M * d) * BATCH * HEADS * q.element_size()   # read q, k, v; write o
    rows = []
    for name, (ctx, fn) in cands.items():
        note = ""
        try:
            with torch.no_grad(), ctx():
                out = fn(q, k, v)            # compiles / autotunes our kernel: not timed
                torch.cuda.synchronize()
                err = (out.float() - ref).abs().max().item()
                ms = do_bench(lambda: fn(q, k, v), warmup=25, rep=100, return_mode="median")
            if name.startswith("triton"):
                from ldm_kernels.flash_attention import _attn_fwd_tuned
                c = _attn_fwd_tuned.best_config
                note = f"BLOCK_M={c.kwargs['BLOCK_M']} BLOCK_N={c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"
        except (RuntimeError, ValueError, NotImplementedError) as e:  # backend refuses this shape
            rows.append(Row(kind, N, M, d, dtype_name, name, None, None, None, None,
                            note=str(e).splitlines()[0][:80]))
            continue
        rows.append(Row(kind, N, M, d, dtype_name, name, ms, flops / ms / 1e9,
                        moved / ms / 1e6 if kind == "cross" else None, err, note))
    return rows


def print_table(rows: list[Row]) -> None:
    """A markdown table; 'vs best SDPA' = best SDPA backend's ms / this candidate's ms."""
    print("| shape | dtype | candidate | ms | TFLOP/s | GB/s | vs best SDPA | max err | note |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.kind, r.N, r.M, r.d, r.dtype), []).append(r)
    for (kind, N, M, d, dtype), group in groups.items():
        sdpa = [r.ms for r in group if r.candidate.startswith("sdpa") and r.ms is not None]
        best = min(sdpa) if sdpa else math.nan
        for r in group:
            shape = f"{kind} N={N} M={M} d={d}"
            if r.ms is None:
                print(f"| {shape} | {dtype} | {r.candidate} | n/a | | | | | {r.note} |")
                continue
            gbps = f"{r.gbps:.0f}" if r.gbps is not None else ""
            print(f"| {shape} | {dtype} | {r.candidate} | {r.ms:.4f} | {r.tflops:.1f} | {gbps} | "
                  f"{best / r.ms:.2f}x | {r.max_err:.1e} | {r.note} |")


# ---------------------------------------------------------------------------------------------
# The UNet step (batch 2, 64x64 latent: one guided step at 512x512), per attention backend
# ---------------------------------------------------------------------------------------------

def bench_unet_step(dtype_name: str = "fp16") -> list[dict]:
    """Time one full-size SD 1.x UNet forward (random weights) with each attention backend.

    Imports ldm.unet only here, so the attention benchmark runs without it.
    """
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    from ldm.unet import UNetConfig, UNetModel

    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig()).to(device="cuda", dtype=dtype).eval()
    x = torch.randn(BATCH, 4, 64, 64, device="cuda", dtype=dtype)
    t = torch.tensor([999, 999], device="cuda")
    ctx = torch.randn(BATCH, TEXT_TOKENS, 768, device="cuda", dtype=dtype)
    runs = {
        "triton": ("triton", nullcontext),
        "sdpa (torch's choice)": ("sdpa", nullcontext),
        "sdpa-flash": ("sdpa", lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])),
        "sdpa-efficient": ("sdpa", lambda: sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])),
        "sdpa-cudnn": ("sdpa", lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION])),
    }
    results = []
    with torch.no_grad():
        ref = unet(x, t, ctx, attention_backend="sdpa").float()
        for name, (backend, cm) in runs.items():
            try:
                with cm():
                    err = (unet(x, t, ctx, attention_backend=backend).float() - ref).abs().max().item()
                    ms = do_bench(lambda: unet(x, t, ctx, attention_backend=backend),
                                  warmup=5, rep=1000, return_mode="median")
                results.append(dict(backend=name, dtype=dtype_name, ms=ms, max_err_vs_sdpa=err))
            except RuntimeError as e:
                results.append(dict(backend=name, dtype=dtype_name, ms=None, note=str(e).splitlines()[0][:80]))
    print(f"\nUNet step, batch {BATCH}, 64x64 latent, {dtype_name}:")
    print("| backend | ms | max abs diff vs sdpa |")
    print("|---|---:|---:|")
    for r in results:
        ms = f"{r['ms']:.2f}" if r["ms"] is not None else f"n/a ({r['note']})"
        print(f"| {r['backend']} | {ms} | {r.get('max_err_vs_sdpa', float('nan')):.1e} |")
    return results


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="fp16,bf16", help="comma list of fp16, bf16")
    p.add_argument("--shapes", default=",".join(str(n) for n, _ in SHAPES),
                   help="comma list of N among 4096, 1024, 256, 64")
    p.add_argument("--kinds", default="self,cross", help="comma list of self, cross")
    p.add_argument("--strategies", default="pad,split", help="our head-dim strategies to time")
    p.add_argument("--unet", action="store_true", help="also time the full UNet step per backend")
    p.add_argument("--json", help="write the environment and every row to this file")
    args = p.parse_args(argv)

    dtypes = args.dtypes.split(",")
    shapes = [(n, d) for n, d in SHAPES if str(n) in args.shapes.split(",")]
    kinds = args.kinds.split(",")
    for name, allowed in (("--dtypes", DTYPES), ("--kinds", ("self", "cross")),
                          ("--strategies", ("pad", "split"))):
        bad = [x for x in getattr(args, name[2:]).split(",") if x not in allowed]
        if bad:
            p.error(f"{name}: {bad} not among {list(allowed)}")
    if not shapes:
        p.error(f"--shapes={args.shapes!r}: allowed N among {[n for n, _ in SHAPES]}")
    if not torch.cuda.is_available():
        print("bench_flash_attention: no CUDA GPU found; this benchmark needs one "
              "(the kernel's CPU tests: pytest tests/test_flash_attention.py)", file=sys.stderr)
        return 1

    env = environment()
    print("  ".join(f"{k}: {v}" for k, v in env.items()))
    cands = candidates(args.strategies.split(","))
    rows = []
    for N, d in shapes:
        for kind in kinds:
            for dtype_name in dtypes:
                rows += bench_shape(kind, N, d, dtype_name, cands)
                print(f"done: {kind} N={N} d={d} {dtype_name}", file=sys.stderr, flush=True)
    print_table(rows)
    unet = [r for dt in dtypes for r in bench_unet_step(dt)] if args.unet else []
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "attention": [asdict(r) for r in rows], "unet_step": unet}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
