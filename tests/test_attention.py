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
def test_auto_on_cuda_matches_math():
    q, k, v = (t.cuda().half() for t in qkv(B=2, heads=8, N=256, M=77, d=40))
    ref = attention(q.float(), k.float(), v.float(), backend="math")
    torch.testing.assert_close(attention(q, k, v, backend="auto").float(), ref, atol=2e-3, rtol=2e-3)
