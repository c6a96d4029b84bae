"""Tests of the Triton flash-attention kernel (kernels/ldm_kernels/flash_attention.py, `ldm_kernels`).

Three kinds, one file:
  * interpreter tests: the kernel run on the CPU by Triton's interpreter, small shapes, against
    softmax(Q K^T * scale) V computed here in float64. TRITON_INTERPRET=1 must be set before
    triton is first imported, which another test module may already have done in this process,
    so `test_interpreter_suite` re-runs this file in a fresh Python with the variable set, and
    the interpreter tests exist only in that child (LDM_FLASH_INTERPRETER_CHILD=1).
  * compile tests (no GPU needed): the kernel compiled for an H100 (sm_90) with Triton's bundled
    ptxas, checking what only the GPU path shows: wgmma is used and rows load as 16-byte
    vectors (the ALIGN hint), not 2-byte scalars.
  * GPU tests (`gpu` marker, skipped without CUDA): every SD 1.x attention shape at fp16 and
    bf16 against an fp32 reference.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from einops import rearrange

CHILD = os.environ.get("LDM_FLASH_INTERPRETER_CHILD") == "1"
ROOT = Path(__file__).resolve().parents[1]


def reference(q, k, v, scale=None):
    """softmax(q k^T * scale) v in float64: the specification the kernel must meet."""
    q, k, v = (x.double() for x in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


# Tolerances against the float64 reference, per input dtype. fp16: the output and the
# probabilities fed to the second dot are rounded to fp16 (2^-11 relative). bf16 (interpreter):
# the interpreter truncates fp32 -> bf16 instead of rounding, so allow two bf16 ulps (2^-7 each).
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def heads_view(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads * d) -> (B, heads, N, d), a strided view: what ldm/attention.py passes."""
    return rearrange(x, "b n (h d) -> b h n d", h=heads)


# ---------------------------------------------------------------------------------------------
# The parent process: run the interpreter tests in a child, and the tests that need no kernel run
# ---------------------------------------------------------------------------------------------

if not CHILD:

    def test_interpreter_suite():
        """Every interpreter test of this file, in a fresh process with TRITON_INTERPRET=1."""
        env = {**os.environ, "TRITON_INTERPRET": "1", "LDM_FLASH_INTERPRETER_CHILD": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-x"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"interpreter tests failed:\n{out[-6000:]}"
        passed = re.search(r"(\d+) passed", out)
        assert passed and int(passed.group(1)) >= 20, f"too few interpreter tests ran:\n{out[-3000:]}"

    def test_cpu_tensors_without_interpreter_are_refused():
        """Outside the interpreter the kernel needs CUDA: a clear error, and supports() says no."""
        fa = pytest.importorskip("ldm_kernels.flash_attention")
        if fa.INTERPRETING:
            pytest.skip("this process runs Triton's interpreter, where CPU tensors are allowed")
        q = torch.randn(1, 1, 4, 8)
        assert fa.supports(q, q, q) is False
        with pytest.raises(ValueError, match=r"device cpu is not supported.*CUDA.*TRITON_INTERPRET=1"):
            fa.flash_attention(q, q, q)


# ---------------------------------------------------------------------------------------------
# Compile for an H100 without one: what the GPU code looks like
# ---------------------------------------------------------------------------------------------

def _compile_sm90(d: int, strategy: str, block_m: int, block_n: int, num_warps: int, num_stages: int,
                  heads: int = 8, n: int = 4096):
    """Compile the kernel for sm_90 as the launcher would call it on (B, N, heads, d) fp16 views."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ldm_kernels.flash_attention import INTERPRETING, _attn_fwd, head_dim_chunks, stride_alignment

    if INTERPRETING:
        pytest.skip("this process runs Triton's interpreter: the kernel is not compilable here")

    q = heads_view(torch.empty(2, n, heads * d, dtype=torch.float16), heads)
    D0, D1 = head_dim_chunks(d, strategy)
    constexprs = dict(HEAD_DIM=d, D0=D0, D1=D1, BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=False,
                      INPUT_PRECISION="tf32", ALIGN=stride_alignment(q))
    # integer arguments as Triton's launcher specialises them: == 1 -> constant, % 16 == 0 -> hinted
    ints = {}
    for t in "qkvo":
        for axis, stride in zip("bhnd", q.stride()):
            ints[f"stride_{t}{'m' if t in 'kv' and axis == 'n' else axis}"] = stride
    ints.update(N=n, M=n)
    names = _attn_fwd.arg_names
    signature, attrs = {}, {}
    for name in names:
        if name in "QKVO":
            signature[name] = "*fp16"
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
        elif name == "qk_scale":
            signature[name] = "fp32"
        elif name in constexprs or ints.get(name) == 1:
            signature[name] = "constexpr"
            constexprs.setdefault(name, 1)
        else:
            signature[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    src = ASTSource(_attn_fwd, signature, attrs=attrs,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True))


def _ptxas_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(CHILD or not _ptxas_available(),
                    reason="needs triton's bundled ptxas, outside the interpreter")
@pytest.mark.parametrize("d,strategy", [(40, "pad"), (40, "split"), (80, "split"), (160, "split")])
def test_compiles_for_h100_with_wgmma_and_vector_loads(d, strategy):
    kernel = _compile_sm90(d, strategy, block_m=128, block_n=64, num_warps=8, num_stages=2)
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async" in ptx, "the dots should use Hopper's wgmma"
    assert "cp.async" in ptx, "K/V tiles should be copied to shared memory asynchronously"
    scalar_loads = re.findall(r"ld\.global(?:\.[a-z]+)*\.b16\b", ptx)
    assert not scalar_loads, f"{len(scalar_loads)} 2-byte scalar loads: the ALIGN hint was lost"


# ---------------------------------------------------------------------------------------------
# GPU: every SD 1.x attention shape (batch 2 with guidance, 8 heads)
# ---------------------------------------------------------------------------------------------

SD_SHAPES = [  # (N, head dim): the four UNet levels at 512x512
    (4096, 40), (1024, 80), (256, 160), (64, 160)]
GPU_TOL = {  # against an fp32 reference computed from the same rounded inputs
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["self", "cross"])
@pytest.mark.parametrize("N,d", SD_SHAPES, ids=[f"N{n}-d{d}" for n, d in SD_SHAPES])
@pytest.mark.parametrize("strategy,blocks", [("pad", (None, None)), ("split", (64, 64))],
                         ids=["pad-autotuned", "split-64x64"])  # autotuning both would take ~10 min
def test_sd_shapes_on_gpu(N, d, kind, dtype, strategy, blocks):
    fa = pytest.importorskip("ldm_kernels.flash_attention")
    if fa.INTERPRETING:
        pytest.skip("TRITON_INTERPRET=1 is set: the GPU path is not what would run")
    B, H = 2, 8
    M = N if kind == "self" else 77
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    # the projections' (B, tokens, heads * d) outputs, viewed per head without a copy
    q = heads_view(torch.randn(B, N, H * d, device=dev, generator=gen).to(dtype), H)
    k = heads_view(torch.randn(B, M, H * d, device=dev, generator=gen).to(dtype), H)
    v = heads_view(torch.randn(B, M, H * d, device=dev, generator=gen).to(dtype), H)
    assert fa.supports(q, k, v)
    with torch.no_grad():
        out = fa.flash_attention(q, k, v, head_dim_strategy=strategy, block_m=blocks[0], block_n=blocks[1])
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert out.shape == (B, H, N, d) and out.dtype == dtype and out.stride() == q.stride()
    torch.testing.assert_close(out.float(), ref, **GPU_TOL[dtype])
    # and no worse than torch's own kernel in the same dtype (plus a little slack)
    ours, theirs = (out.float() - ref).abs().max().item(), (sdpa.float() - ref).abs().max().item()
    assert ours <= 2 * theirs + 1e-4, f"max error {ours:.2e} vs SDPA's {theirs:.2e}"


@pytest.mark.gpu
@pytest.mark.full
def test_unet_with_triton_matches_sdpa_on_gpu():
    """The full SD 1.x UNet (random weights), batch 2, 64x64 latent: "triton" against "sdpa".

    fp32: the two backends agree to 1e-3. fp16: both are compared with the fp32 SDPA run, and
    ours may be off by at most 1.5x SDPA-fp16's own error (plus 1e-3).
    """
    fa = pytest.importorskip("ldm_kernels.flash_attention")
    unet_mod = pytest.importorskip("ldm.unet")
    if fa.INTERPRETING:
        pytest.skip("TRITON_INTERPRET=1 is set: the GPU path is not what would run")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    unet = unet_mod.UNetModel(unet_mod.UNetConfig()).to(dev).eval()
    x = torch.randn(2, 4, 64, 64, device=dev)
    t = torch.tensor([999, 500], device=dev)
    ctx = torch.randn(2, 77, 768, device=dev)
    with torch.no_grad():
        ref = unet(x, t, ctx, attention_backend="sdpa")
        ours = unet(x, t, ctx, attention_backend="triton")
        torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-3)
        unet = unet.half()
        args = (x.half(), t, ctx.half())
        ours16 = unet(*args, attention_backend="triton").float()
        sdpa16 = unet(*args, attention_backend="sdpa").float()
    ours_err, sdpa_err = (ours16 - ref).abs().max().item(), (sdpa16 - ref).abs().max().item()
    assert ours_err <= 1.5 * sdpa_err + 1e-3, f"fp16 UNet: ours {ours_err:.2e} vs SDPA {sdpa_err:.2e}"


# ---------------------------------------------------------------------------------------------
# The child process: the kernel under Triton's interpreter
# ---------------------------------------------------------------------------------------------

if CHILD:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from ldm_kernels.flash_attention import (
        INTERPRETING, MAX_HEAD_DIM, flash_attention, head_dim_chunks, stride_alignment, supports)

    def _qkv(B, H, N, M, d, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(B, H, N, d, generator=g).to(dtype),
                torch.randn(B, H, M, d, generator=g).to(dtype),
                torch.randn(B, H, M, d, generator=g).to(dtype))

    def test_runs_in_the_interpreter():
        assert INTERPRETING

    CASES = [  # dtype, d, strategy, B, H, N, M, block_n; N and M chosen to leave tails
        (torch.float32, 40, "pad", 2, 2, 40, 77, None),     # cross-attention: 77 keys, one tile of 128
        (torch.float32, 40, "split", 2, 2, 40, 77, None),
        (torch.float32, 40, "split", 1, 2, 35, 150, None),  # ten 16-key tiles, the last holds 6
        (torch.float16, 80, "pad", 1, 3, 33, 50, 16),       # 4 key tiles, tail of 2; query tail of 1
        (torch.float16, 80, "split", 1, 3, 33, 50, 16),
        (torch.float16, 160, "pad", 2, 1, 20, 77, None),
        (torch.float16, 160, "split", 2, 1, 20, 40, 16),
        (torch.float16, 40, "split", 2, 2, 48, 48, 16),     # self-attention, tiles fit exactly
        (torch.bfloat16, 40, "pad", 2, 2, 24, 77, None),    # bf16: upcast inside the kernel
        (torch.bfloat16, 40, "split", 2, 2, 24, 77, None),
        (torch.bfloat16, 160, "split", 1, 2, 17, 33, 16),
        (torch.float32, 64, "split", 1, 2, 20, 30, 16),     # a power of two: one chunk either way
        (torch.float32, 8, "pad", 1, 1, 5, 3, None),        # tiny: padded up to a 16-wide tile
        (torch.float32, 200, "split", 1, 1, 18, 20, None),  # 128 + 128 (72 used)
        (torch.float16, MAX_HEAD_DIM, "pad", 1, 1, 18, 20, None),
    ]

    @pytest.mark.parametrize("dtype,d,strategy,B,H,N,M,block_n", CASES)
    def test_matches_math(dtype, d, strategy, B, H, N, M, block_n):
        q, k, v = _qkv(B, H, N, M, d, dtype)
        assert supports(q, k, v)
        out = flash_attention(q, k, v, head_dim_strategy=strategy, block_n=block_n)
        assert out.shape == (B, H, N, d) and out.dtype == dtype
        torch.testing.assert_close(out.double(), reference(q, k, v), **TOL[dtype])

    @pytest.mark.parametrize("strategy", ["pad", "split"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    def test_strided_projection_views(strategy, dtype):
        """(B, N, heads * d) projections viewed as (B, heads, N, d): read in place, output alike."""
        B, H, N, M, d = 2, 3, 37, 77, 40
        g = torch.Generator().manual_seed(1)
        x = torch.randn(B, N, H * d, generator=g).to(dtype)
        ctx = torch.randn(B, M, 2 * H * d, generator=g).to(dtype)  # k and v from one packed projection
        q = heads_view(x, H)
        k, v = (heads_view(t, H) for t in ctx.chunk(2, dim=-1))
        assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
        out = flash_attention(q, k, v, head_dim_strategy=strategy)
        assert out.stride() == q.stride()  # laid out as (B, N, heads, d): back to (B, N, H*d) for free
        assert rearrange(out, "b h n d -> b n (h d)").is_contiguous()
        torch.testing.assert_close(out.double(), reference(q, k, v), **TOL[dtype])

    def test_any_strides():
        """A transposed K (d-stride != 1), a batch-broadcast V (stride 0), a sliced Q."""
        B, H, N, M, d = 2, 2, 20, 24, 40
        q, k, v = _qkv(B, H, N + 5, M, d, torch.float32, seed=2)
        q = q[:, :, 5:]                                          # storage offset, row stride d
        k = k.transpose(-1, -2).contiguous().transpose(-1, -2)   # stride along d is M
        v = v[:1].expand(B, H, M, d)                             # batch stride 0
        assert k.stride(-1) == M and v.stride(0) == 0
        out = flash_attention(q, k, v, block_n=16)
        torch.testing.assert_close(out.double(), reference(q, k, v), **TOL[torch.float32])

    def test_scale():
        q, k, v = _qkv(1, 2, 20, 30, 40, torch.float32, seed=3)
        out = flash_attention(q, k, v, scale=0.05)
        torch.testing.assert_close(out.double(), reference(q, k, v, scale=0.05), **TOL[torch.float32])

    def test_large_scores_do_not_overflow():
        """Scores of several hundred: exp would overflow fp32 without the running max."""
        q, k, v = _qkv(1, 1, 20, 40, 40, torch.float32, seed=4)
        out = flash_attention(q * 30, k * 30, v, block_n=16)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), reference(q * 30, k * 30, v), **TOL[torch.float32])

    def test_head_dim_chunks():
        assert [head_dim_chunks(d, "pad") for d in (40, 80, 160, 64, 8)] == [
            (64, 0), (128, 0), (256, 0), (64, 0), (16, 0)]
        assert [head_dim_chunks(d, "split") for d in (40, 80, 160, 64, 8, 200)] == [
            (32, 16), (64, 16), (128, 32), (64, 0), (16, 0), (128, 128)]
        with pytest.raises(ValueError, match=r"head_dim_strategy='chunks'.*'pad' or 'split'"):
            head_dim_chunks(40, "chunks")
        with pytest.raises(ValueError, match=r"head dim d=257.*1\.\.256"):
            head_dim_chunks(257)

    def test_stride_alignment():
        assert stride_alignment(heads_view(torch.empty(2, 64, 8 * 40), 8)) == 8     # head stride 40
        assert stride_alignment(heads_view(torch.empty(2, 64, 8 * 80), 8)) == 16
        assert stride_alignment(torch.empty(2, 3, 5, 7)) == 1

    ERRORS = [  # (q, k, v) builder, the words the error must contain
        (lambda: _qkv(1, 2, 4, 4, 16, torch.float64), r"q\.dtype=torch\.float64 is not supported: allowed float16, bfloat16, float32"),
        (lambda: (torch.zeros(1, 2, 4, 16, dtype=torch.int32),) * 3, r"q\.dtype=torch\.int32 is not supported"),
        (lambda: _qkv(1, 2, 4, 4, 300, torch.float32), r"head dim d=300 is not supported: allowed 1\.\.256"),
        (lambda: (torch.randn(2, 4, 16),) * 3, r"q must be 4-D \(B, heads, tokens, head_dim\), got shape \(2, 4, 16\)"),
        (lambda: (torch.randn(1, 2, 4, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 6, 16)), r"shapes do not match"),
        (lambda: (torch.randn(1, 2, 4, 16), torch.randn(1, 3, 5, 16), torch.randn(1, 3, 5, 16)), r"shapes do not match.*\(1, 2, M, 16\)"),
        (lambda: (torch.randn(1, 2, 4, 16), torch.randn(1, 2, 5, 32), torch.randn(1, 2, 5, 32)), r"shapes do not match"),
        (lambda: (torch.randn(1, 2, 4, 16), torch.randn(1, 2, 5, 16).half(), torch.randn(1, 2, 5, 16)), r"dtypes differ"),
        (lambda: (torch.randn(1, 2, 4, 16), torch.randn(1, 2, 5, 16, device="meta"), torch.randn(1, 2, 5, 16)), r"devices differ"),
        (lambda: (torch.randn(1, 2, 4, 16, device="meta"),) * 3, r"device meta is not supported: the kernel needs a CUDA GPU"),
        (lambda: (torch.randn(1, 2, 0, 16),) * 3, r"every dimension must be >= 1"),
        (lambda: (torch.randn(1, 2, 4, 16, requires_grad=True),) * 3, r"forward-only"),
        (lambda: ("q", "k", "v"), r"q must be a torch\.Tensor, got str"),
    ]

    @pytest.mark.parametrize("make,message", ERRORS)
    def test_launcher_errors(make, message):
        q, k, v = make()
        assert supports(q, k, v) is False
        with pytest.raises(ValueError, match=message):
            flash_attention(q, k, v)

    def test_argument_errors():
        q, k, v = _qkv(1, 1, 4, 4, 16, torch.float32)
        with pytest.raises(ValueError, match=r"head_dim_strategy='fold'"):
            flash_attention(q, k, v, head_dim_strategy="fold")
        with pytest.raises(ValueError, match=r"block_m=24 is not supported: allowed a power of two >= 16"):
            flash_attention(q, k, v, block_m=24)
        with pytest.raises(ValueError, match=r"block_n=8 is not supported"):
            flash_attention(q, k, v, block_n=8)
        with pytest.raises(ValueError, match=r"scale=nan is not supported"):
            flash_attention(q, k, v, scale=float("nan"))

    def test_supports_never_raises():
        assert supports(None, None, None) is False
        assert supports(*_qkv(1, 1, 4, 4, 16, torch.float32)) is True
        with torch.no_grad():  # requires_grad only matters when autograd would record
            assert supports(*(torch.randn(1, 1, 4, 16, requires_grad=True),) * 3) is True
