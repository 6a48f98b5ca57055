"""lit_attn.ops.local: local_aggregate / local_correlation / local_valid_mask against explicit loops."""
import pytest
import torch

from lit_attn.ops.local import local_aggregate, local_correlation, local_out_size, local_valid_mask

# (C, G, H, W, k, dilation, scale, stride)
CASES = [
    (4, 2, 5, 7, 3, 1, 1, 1),
    (6, 3, 4, 5, 5, 2, 1, 1),   # dilation, window wider than the map
    (4, 1, 3, 5, 5, 1, 2, 1),   # CARAFE-style upsampling
    (6, 2, 3, 2, 3, 1, 3, 1),   # scale 3
    (4, 2, 5, 7, 3, 1, 1, 2),   # stride, odd sizes
    (2, 1, 6, 7, 5, 1, 1, 3),
    (4, 4, 1, 1, 3, 1, 2, 1),   # 1x1 input
    (3, 3, 4, 4, 1, 1, 1, 1),   # k = 1
]


def centre(i, scale, stride):
    return i // scale if scale > 1 else i * stride


def taps(k, d):
    return [(a * k + b, (a - k // 2) * d, (b - k // 2) * d) for a in range(k) for b in range(k)]


def naive_aggregate(x, w, k, d, scale, stride):
    b, c, h, wd = x.shape
    g = w.shape[1]
    out = torch.zeros(b, c, *w.shape[-2:], dtype=x.dtype)
    for i in range(w.shape[-2]):
        for j in range(w.shape[-1]):
            ci, cj = centre(i, scale, stride), centre(j, scale, stride)
            for t, dy, dx in taps(k, d):
                if 0 <= ci + dy < h and 0 <= cj + dx < wd:
                    out[:, :, i, j] += w[:, :, t, i, j].repeat_interleave(c // g, 1) * x[:, :, ci + dy, cj + dx]
    return out


def naive_correlation(q, kmap, g, k, d, scale, stride):
    b, c, h, wd = kmap.shape
    out = torch.zeros(b, g, k * k, *q.shape[-2:], dtype=q.dtype)
    for i in range(q.shape[-2]):
        for j in range(q.shape[-1]):
            ci, cj = centre(i, scale, stride), centre(j, scale, stride)
            for t, dy, dx in taps(k, d):
                if 0 <= ci + dy < h and 0 <= cj + dx < wd:
                    prod = q[:, :, i, j] * kmap[:, :, ci + dy, cj + dx]
                    out[:, :, t, i, j] = prod.view(b, g, c // g).sum(-1)
    return out


def out_hw(h, w, scale, stride):
    return (h * scale, w * scale) if scale > 1 else (local_out_size(h, stride), local_out_size(w, stride))


def make(case, dtype=torch.float64, requires_grad=False):
    c, g, h, w, k, d, s, st = case
    ho, wo = out_hw(h, w, s, st)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, c, h, w, dtype=dtype, generator=gen, requires_grad=requires_grad)
    wt = torch.randn(2, g, k * k, ho, wo, dtype=dtype, generator=gen, requires_grad=requires_grad)
    q = torch.randn(2, c, ho, wo, dtype=dtype, generator=gen, requires_grad=requires_grad)
    return x, wt, q, dict(kernel_size=k, dilation=d, scale=s, stride=st)


@pytest.mark.parametrize("case", CASES)
def test_values_match_loops(case):
    x, w, q, kw = make(case)
    args = (kw["kernel_size"], kw["dilation"], kw["scale"], kw["stride"])
    torch.testing.assert_close(local_aggregate(x, w, **kw), naive_aggregate(x, w, *args))
    torch.testing.assert_close(local_correlation(q, x, case[1], **kw), naive_correlation(q, x, case[1], *args))


@pytest.mark.parametrize("case", CASES)
def test_valid_mask(case):
    c, g, h, w, k, d, s, st = case
    ones = torch.ones(1, 1, h, w, dtype=torch.float64)
    q = torch.ones(1, 1, *out_hw(h, w, s, st), dtype=torch.float64)
    inside = naive_correlation(q, ones, 1, k, d, s, st)[0, 0] > 0
    assert torch.equal(local_valid_mask((h, w), k, d, s, st), inside)


@pytest.mark.parametrize("case", [(4, 2, 3, 4, 5, 2, 1, 1), (4, 2, 2, 3, 3, 1, 2, 1), (2, 1, 5, 4, 3, 1, 1, 2)])
def test_gradcheck(case):
    x, w, q, kw = make(case, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: local_aggregate(a, b, **kw), (x, w), fast_mode=True)
    assert torch.autograd.gradcheck(lambda a, b: local_correlation(a, b, case[1], **kw), (q, x), fast_mode=True)


def test_saves_only_its_inputs():
    """Memory-lean autograd: nothing k^2 times larger than the input is kept for the backward."""
    x, w, q, kw = make((8, 2, 9, 11, 7, 1, 1, 1), torch.float32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = local_aggregate(x, w, **kw)
    assert sorted(saved) == sorted([x.numel(), w.numel()])
    out.square().sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


def test_compile_fullgraph_matches_eager():
    x, w, q, kw = make(CASES[2], torch.float32, requires_grad=True)

    def fn(x, w, q):
        return local_aggregate(x, w, **kw).sin().sum() + local_correlation(q, x, 1, **kw).cos().sum()

    torch._dynamo.reset()
    loss = torch.compile(fn, fullgraph=True)(x, w, q)
    grads = torch.autograd.grad(loss, (x, w, q))
    ref = torch.autograd.grad(fn(x, w, q), (x, w, q))
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_opcheck():
    x, w, q, kw = make(CASES[0], torch.float32, requires_grad=True)
    args = (kw["kernel_size"], kw["dilation"], kw["scale"], kw["stride"])
    torch.library.opcheck(torch.ops.lit_attn.local_aggregate, (x, w, *args))
    torch.library.opcheck(torch.ops.lit_attn.local_correlation, (q, x, 2, *args))


def test_strided_and_half_inputs():
    x, w, q, kw = make(CASES[0], torch.float32)
    ref = local_aggregate(x, w, **kw)
    xs = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(local_aggregate(xs, w.transpose(-1, -2).contiguous().transpose(-1, -2), **kw), ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = local_aggregate(x, w, **kw)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.1)


def test_errors():
    x = torch.randn(1, 6, 5, 5)
    with pytest.raises(ValueError, match="odd"):
        local_aggregate(x, torch.randn(1, 2, 4, 5, 5), 2)
    with pytest.raises(ValueError, match="G dividing C=6"):
        local_aggregate(x, torch.randn(1, 4, 9, 5, 5), 3)
    with pytest.raises(ValueError, match="expected"):
        local_aggregate(x, torch.randn(1, 2, 9, 5, 5), 3, scale=2)  # weights must be on the 10x10 grid
    with pytest.raises(ValueError, match="both exceed 1"):
        local_aggregate(x, torch.randn(1, 2, 9, 10, 10), 3, scale=2, stride=2)
    with pytest.raises(ValueError, match="4-D"):
        local_aggregate(x[0], torch.randn(1, 2, 9, 5, 5), 3)
    with pytest.raises(ValueError, match="groups=4"):
        local_correlation(x, x, 4, 3)
