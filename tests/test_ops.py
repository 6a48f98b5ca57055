"""lit_attn.ops: exact values against an explicit N x N softmax, gradients, kernels, half precision."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lit_attn.ops import chunked_attention, global_attention, map_to_tokens, tokens_to_map
from lit_attn.ops.attention import _fold_rel_bias, fused_attention


def naive_attention(q, k, v, scale, bias=None):
    logits = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        logits = logits + bias
    return torch.softmax(logits, -1) @ v


def rel_bias(rel_h, rel_w):
    return (rel_h[..., :, :, None] + rel_w[..., :, None, :]).flatten(-2)


@pytest.mark.parametrize("dk,dv", [(8, 8), (4, 12)])
@pytest.mark.parametrize("nq,nk", [(37, 37), (1, 5), (300, 7)])
def test_global_attention_matches_naive(dk, dv, nq, nk):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, d, generator=g, dtype=torch.float64) for n, d in ((nq, dk), (nk, dk), (nk, dv)))
    torch.testing.assert_close(global_attention(q, k, v, scale=0.3), naive_attention(q, k, v, 0.3))
    torch.testing.assert_close(global_attention(q, k, v), naive_attention(q, k, v, dk ** -0.5))


def test_chunked_gradients_match_autograd_of_naive():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 29, d, generator=g, dtype=torch.float64, requires_grad=True) for d in (5, 5, 7))
    rel_h = torch.randn(2, 2, 29, 1, generator=g, dtype=torch.float64, requires_grad=True)
    rel_w = torch.randn(2, 2, 29, 29, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 29, 7, generator=g, dtype=torch.float64)
    for bias in (False, True):
        extra = (rel_h, rel_w) if bias else (None, None)
        out = chunked_attention(q, k, v, 0.4, *extra, chunk_size=8)
        grads = torch.autograd.grad((out * w).sum(), (q, k, v) + ((rel_h, rel_w) if bias else ()))
        ref = naive_attention(q, k, v, 0.4, rel_bias(rel_h, rel_w) if bias else None)
        ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v) + ((rel_h, rel_w) if bias else ()))
        torch.testing.assert_close(out, ref)
        for a, b in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(a, b)


def test_chunked_gradcheck():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, 11, d, generator=g, dtype=torch.float64, requires_grad=True) for d in (3, 3, 4))
    assert torch.autograd.gradcheck(lambda q, k, v: chunked_attention(q, k, v, 0.5, chunk_size=4), (q, k, v))


def test_relative_bias_both_paths_match_naive():
    g = torch.Generator().manual_seed(3)
    hk, wk = 3, 5
    q, k, v = (torch.randn(2, 2, hk * wk, d, generator=g, dtype=torch.float64) for d in (4, 4, 6))
    rel_h = torch.randn(2, 2, hk * wk, hk, generator=g, dtype=torch.float64)
    rel_w = torch.randn(2, 2, hk * wk, wk, generator=g, dtype=torch.float64)
    ref = naive_attention(q, k, v, 0.5, rel_bias(rel_h, rel_w))
    torch.testing.assert_close(global_attention(q, k, v, 0.5, rel_h=rel_h, rel_w=rel_w), ref)
    qf, kf = _fold_rel_bias(q, k, rel_h, rel_w, 0.5)  # the CUDA / compile path
    torch.testing.assert_close(F.scaled_dot_product_attention(qf, kf, v, scale=1.0), ref)


def test_equal_dims_take_the_fused_flash_kernel_on_cpu():
    """With only the flash backend allowed, SDPA raises if the layout would need the math path."""
    x = torch.randn(2, 16, 9, 11)
    q = map_to_tokens(x, heads=2)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = global_attention(q, q, q)
        # the same tensors in the transposed (last-dim stride N) layout cannot use the flash kernel
        bad = x.reshape(2, 2, 8, 99).transpose(-1, -2)
        with pytest.raises(RuntimeError):
            F.scaled_dot_product_attention(bad, bad, bad)
    torch.testing.assert_close(out, naive_attention(q, q, q, 8 ** -0.5), rtol=1e-4, atol=1e-5)


def test_unequal_dims_never_materialise_n_by_n_on_cpu(monkeypatch):
    """Profile the allocations: with a chunk budget below N x N, none is as large as the matrix."""
    import lit_attn.ops.attention as ops_attention

    monkeypatch.setattr(ops_attention, "CHUNK_ELEMENTS", 1 << 18)  # 256 queries per chunk here
    n = 1024
    q, k = torch.randn(1, 1, n, 8, requires_grad=True), torch.randn(1, 1, n, 8, requires_grad=True)
    v = torch.randn(1, 1, n, 32, requires_grad=True)
    with torch.profiler.profile(profile_memory=True) as prof:
        global_attention(q, k, v).sum().backward()
    biggest = max(e.self_cpu_memory_usage for e in prof.events())
    assert biggest < n * n * 4 / 2, biggest


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dims", [(16, 16), (8, 32)])
def test_softmax_finite_under_autocast(dtype, dims):
    g = torch.Generator().manual_seed(4)
    dk, dv = dims
    q = torch.randn(1, 1, 200, dk, generator=g) * 60  # logits of order 1e4-1e5: an fp16 q k^T overflows
    k = torch.randn(1, 1, 200, dk, generator=g) * 60
    v = torch.randn(1, 1, 200, dv, generator=g)
    with torch.autocast("cpu", dtype=dtype):
        out = global_attention(q, k, v, scale=1.0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dims", [(16, 16), (8, 32)])
def test_autocast_close_to_exact_on_rounded_inputs(dtype, dims):
    g = torch.Generator().manual_seed(5)
    dk, dv = dims
    q, k, v = (torch.randn(1, 2, 150, d, generator=g) * 2 for d in (dk, dk, dv))
    with torch.autocast("cpu", dtype=dtype):
        out = global_attention(q, k, v)
    ref = naive_attention(*(t.to(dtype).double() for t in (q, k, v)), dk ** -0.5)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_default_chunk_budget():
    from lit_attn.ops.attention import CHUNK_ELEMENTS, default_chunk

    q, k = torch.empty(2, 1, 8192, 64), torch.empty(2, 1, 8192, 64)
    assert default_chunk(q, k) == CHUNK_ELEMENTS // (2 * 8192) == 1024
    assert default_chunk(torch.empty(1, 1, 10, 8), torch.empty(1, 1, 10, 8)) == 10
    assert default_chunk(torch.empty(64, 8, 10**5, 8), torch.empty(64, 8, 10**5, 8)) == 64


def test_token_layout_roundtrip():
    x = torch.randn(2, 12, 5, 7)
    t = map_to_tokens(x, heads=3)
    assert t.shape == (2, 3, 35, 4) and t.stride(-1) == 1
    torch.testing.assert_close(tokens_to_map(t, 5, 7), x)
    torch.testing.assert_close(t[1, 2, 7 * 2 + 3], x[1, 8:12, 2, 3])


def test_bad_shapes_raise():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="key dims"):
        global_attention(q, torch.randn(1, 1, 4, 6), torch.randn(1, 1, 4, 8))
    with pytest.raises(ValueError, match="together"):
        global_attention(q, q, q, rel_h=torch.randn(1, 1, 4, 2))


@pytest.mark.parametrize("dk,dv", [(8, 8), (4, 12), (12, 4), (8, 300), (300, 8)])
def test_cuda_path_padding_and_slicing_is_exact(dk, dv):
    """The CUDA path pads q/k and slices v to make flash kernels eligible; check its maths on CPU."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 33, d, generator=g, dtype=torch.float64) for d in (dk, dk, dv))
    torch.testing.assert_close(fused_attention(q, k, v, 0.3), naive_attention(q, k, v, 0.3))
