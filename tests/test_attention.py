"""attention(q, k, v, backend=...): the math specification, its chunking, and the fused backends."""
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from hypothesis import given, settings, strategies as st

from ldm.attention import BACKENDS, MATH_CHUNK_BYTES, attention, math_attention


def qkv(B=2, heads=3, N=10, M=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, heads, N, d, generator=g), torch.randn(B, heads, M, d, generator=g),
            torch.randn(B, heads, M, d, generator=g))


def test_math_is_softmax_qkt_over_sqrt_d_times_v():
    q, k, v = qkv()
    out, probs = attention(q, k, v, backend="math", return_probs=True)
    # written out element by element, independently of the library's matmul form
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) / math.sqrt(q.shape[-1])
    expected_probs = scores.exp() / scores.exp().sum(-1, keepdim=True)
    torch.testing.assert_close(probs, expected_probs)
    torch.testing.assert_close(out, torch.einsum("bhnm,bhmd->bhnd", expected_probs, v))
    assert probs.shape == (2, 3, 10, 7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 10))


@pytest.mark.parametrize("N,M,d", [(64, 64, 40), (64, 77, 40), (16, 77, 160), (5, 3, 8)])
def test_math_matches_sdpa(N, M, d):
    q, k, v = qkv(B=2, heads=8, N=N, M=M, d=d)
    torch.testing.assert_close(attention(q, k, v, backend="math"), attention(q, k, v, backend="sdpa"),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention(q, k, v, backend="sdpa"),
                               F.scaled_dot_product_attention(q, k, v), atol=0, rtol=0)


def test_strided_views_from_rearrange():
    """The UNet hands attention views of (B, N, heads*d) projections, not contiguous tensors."""
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 12, 4 * 16, generator=g), torch.randn(2, 5, 4 * 16, generator=g)
    q = rearrange(x, "b n (h d) -> b h n d", h=4)
    k = rearrange(ctx, "b m (h d) -> b h m d", h=4)
    v = rearrange(ctx.flip(-1), "b m (h d) -> b h m d", h=4)
    assert not q.is_contiguous()
    ref = attention(q.contiguous(), k.contiguous(), v.contiguous(), backend="math")
    for backend in ("math", "sdpa", "auto"):
        torch.testing.assert_close(attention(q, k, v, backend=backend), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 7 * 4 * 2, 3 * 7 * 4 * 3 + 1, MATH_CHUNK_BYTES])
def test_query_chunking_changes_nothing(chunk_bytes):
    """Chunks of 1 row, 2 rows, 3 rows (uneven last chunk) and one chunk give the same result."""
    q, k, v = qkv(B=1, heads=3, N=10, M=7, d=8)
    out, probs = math_attention(q, k, v, return_probs=True, chunk_bytes=chunk_bytes)
    whole, whole_probs = math_attention(q, k, v, return_probs=True, chunk_bytes=2 ** 40)
    torch.testing.assert_close(out, whole)
    torch.testing.assert_close(probs, whole_probs)


def test_chunking_bounds_the_score_block(monkeypatch):
    """No score block exceeds the budget: 4096 x 4096 scores (a 64x64 latent) in 16 MiB blocks."""
    seen = []
    real_softmax = torch.Tensor.softmax

    def spy(self, *args, **kwargs):
        seen.append(self.numel() * self.element_size())
        return real_softmax(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "softmax", spy)
    q = torch.randn(1, 2, 4096, 1)          # head_dim 1 keeps the matmuls cheap; the scores are full-size
    out = attention(q, q, q, backend="math", chunk_bytes=16 * 2**20)
    assert out.shape == (1, 2, 4096, 1)
    assert len(seen) == 8 and max(seen) <= 16 * 2**20   # 128 MiB of scores in 8 blocks
    # the default budget at SD's 512x512 self-attention: batch 2, 8 heads -> 1 GiB in 8 blocks
    assert 2 * 8 * 4096 * 4096 * 4 // MATH_CHUNK_BYTES == 8


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), heads=st.integers(1, 4), N=st.integers(1, 33), M=st.integers(1, 33),
       d=st.sampled_from([1, 8, 40]), seed=st.integers(0, 2 ** 16))
def test_math_and_sdpa_agree_on_any_shape(B, heads, N, M, d, seed):
    q, k, v = qkv(B, heads, N, M, d, seed)
    torch.testing.assert_close(attention(q, k, v, backend="math", chunk_bytes=B * heads * M * 4 * 5),
                               attention(q, k, v, backend="sdpa"), atol=1e-5, rtol=1e-5)


def test_auto_on_cpu_is_sdpa():
    q, k, v = qkv()
    torch.testing.assert_close(attention(q, k, v, backend="auto"), attention(q, k, v, backend="sdpa"),
                               atol=0, rtol=0)


def test_triton_backend_calls_the_kernel_module(monkeypatch):
    """The seam: backend="triton" imports ldm_kernels.flash_attention lazily and hands it q, k, v."""
    calls = []

    def fake_flash(q, k, v):
        calls.append((q.shape, k.shape, v.shape))
        return F.scaled_dot_product_attention(q, k, v)

    fake = types.ModuleType("ldm_kernels.flash_attention")
    fake.flash_attention, fake.supports = fake_flash, (lambda q, k, v: True)
    monkeypatch.setitem(sys.modules, "ldm_kernels.flash_attention", fake)
    q, k, v = qkv()
    torch.testing.assert_close(attention(q, k, v, backend="triton"), attention(q, k, v, backend="math"),
                               atol=1e-5, rtol=1e-5)
    assert calls == [(q.shape, k.shape, v.shape)]
    attention(q, k, v, backend="auto")   # CPU tensors: auto never calls the CUDA kernel
    assert len(calls) == 1


# ---- causal attention (the text towers) ----------------------------------------------------

@pytest.mark.parametrize("N,M", [(77, 77), (10, 10), (5, 9), (9, 5)])
def test_causal_math_is_the_masked_specification_and_matches_sdpa(N, M):
    """causal=True: query i sees keys 0..i (top-left aligned, as torch's is_causal)."""
    q, k, v = qkv(B=2, heads=4, N=N, M=M, d=16)
    out, probs = attention(q, k, v, backend="math", causal=True, return_probs=True)
    mask = torch.ones(N, M, dtype=torch.bool).tril()          # True where key j <= query i
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) / 4.0
    expected = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    torch.testing.assert_close(probs, expected)
    assert (probs[..., ~mask] == 0).all()
    torch.testing.assert_close(out, expected @ v)
    for backend in ("sdpa", "auto"):
        torch.testing.assert_close(attention(q, k, v, backend=backend, causal=True), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention(q, k, v, backend="sdpa", causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=0, rtol=0)


@pytest.mark.parametrize("chunk_bytes", [1, 2 * 4 * 77 * 4 * 5, MATH_CHUNK_BYTES])
def test_causal_chunking_changes_nothing(chunk_bytes):
    """The mask follows each chunk's query positions: 1 row, 5 rows (uneven), one chunk."""
    q, k, v = qkv(B=2, heads=4, N=77, M=77, d=8)
    out = math_attention(q, k, v, causal=True, chunk_bytes=chunk_bytes)
    torch.testing.assert_close(out, math_attention(q, k, v, causal=True, chunk_bytes=2 ** 40))


def test_causal_refused_by_triton_and_auto_avoids_the_kernel(monkeypatch):
    """The flash kernel has no mask: backend="triton" with causal=True is an error, and "auto"
    never hands causal attention to it, even where the kernel says it supports the inputs."""
    import ldm.attention as A

    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"causal=True is not supported by backend='triton'"):
        attention(q, k, v, backend="triton", causal=True)
    fake = types.ModuleType("ldm_kernels.flash_attention")
    fake.supports = lambda q, k, v: True
    monkeypatch.setitem(sys.modules, "ldm_kernels.flash_attention", fake)
    cuda_half = types.SimpleNamespace(is_cuda=True, dtype=torch.float16)   # what auto looks at
    assert A._auto_backend(cuda_half, cuda_half, cuda_half) == "triton"
    assert A._auto_backend(cuda_half, cuda_half, cuda_half, causal=True) == "sdpa"


# ---- half precision: scores and softmax in fp32 -----------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_scores_beyond_fp16_stay_finite(dtype, causal):
    """SD 2.x's black images: q k^T past fp16's largest value (65504) makes a fp16 softmax NaN.
    Every CPU backend forms the scores in fp32, so the output is finite and close to fp32's."""
    q, k, v = qkv(B=1, heads=2, N=16, M=16, d=64, seed=3)
    q, k = q * 40, k * 40                                   # a typical q . k: 40^2 * sqrt(64) = 12800
    q[..., 0, :] = k[..., 0, :] = 40.0                      # q0 . k0 = 64 * 40^2 = 102400 > 65504
    naive = q.half() @ k.half().transpose(-1, -2)
    assert torch.isinf(naive).any() and torch.isnan(naive.softmax(-1)).any()
    ref = attention(q, k, v, backend="math", causal=causal)
    for backend in ("math", "sdpa"):
        out = attention(q.to(dtype), k.to(dtype), v.to(dtype), backend=backend, causal=causal)
        assert out.dtype == dtype and torch.isfinite(out).all(), backend
        torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)


def test_math_budget_counts_fp32_scores_for_half_inputs(monkeypatch):
    """fp16 inputs give fp32 score blocks; the chunk size is computed for those."""
    seen = []
    real_softmax = torch.Tensor.softmax

    def spy(self, *args, **kwargs):
        seen.append((self.dtype, self.numel() * self.element_size()))
        return real_softmax(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "softmax", spy)
    q = torch.randn(1, 2, 256, 4).half()
    attention(q, q, q, backend="math", chunk_bytes=64 * 2**10)
    assert {d for d, _ in seen} == {torch.float32}
    assert len(seen) == 8 and max(b for _, b in seen) <= 64 * 2**10   # 512 KiB of fp32 scores in 8 blocks


def test_errors_name_the_argument():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"backend='flash'.*'math', 'sdpa', 'triton', 'auto'"):
        attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="return_probs=True needs backend='math'"):
        attention(q, k, v, backend="sdpa", return_probs=True)
    with pytest.raises(ValueError, match=r"q must be 4-D"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"k and v must agree"):
        attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match=r"q .* and k .* must agree"):
        attention(q, k[..., :4], v)
    assert BACKENDS == ("math", "sdpa", "triton", "auto")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["math", "sdpa", "auto"])
def test_cuda_half_causal_and_overflowing_scores(backend):
    """On CUDA in fp16: causal attention (auto -> sdpa) and scores past 65504 (SD 2.x) stay finite."""
    q, k, v = qkv(B=2, heads=16, N=77, M=77, d=64, seed=3)
    q[..., 0, :] = k[..., 0, :] = 40.0
    ref = attention(q, k, v, backend="math", causal=True)
    out = attention(q.cuda().half(), k.cuda().half(), v.cuda().half(), backend=backend, causal=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float().cpu(), ref, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
def test_auto_on_cuda_matches_math():
    q, k, v = (t.cuda().half() for t in qkv(B=2, heads=8, N=256, M=77, d=40))
    ref = attention(q.float(), k.float(), v.float(), backend="math")
    torch.testing.assert_close(attention(q, k, v, backend="auto").float(), ref, atol=2e-3, rtol=2e-3)
