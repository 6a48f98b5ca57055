"""Criss-cross attention (CCNet): the op and the `criss_cross` block against references written here.

The naive reference gathers each pixel's row and column explicitly (float64 loops); the einsum
reference is mmcv's formulation (energy_H with a -inf diagonal, energy_W, concatenation, softmax,
two einsums), applied R times with the block's weights.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import MaxNumel

import lit_attn
import lit_attn.ops.criss_cross as cc_ops
from lit_attn.layers.criss_cross import CrissCrossAttention
from lit_attn.ops.criss_cross import criss_cross_attention, criss_cross_attention_packed
from lit_attn.registry import GLOBAL, get_attn_entry


def naive_criss_cross(q, k, v):
    """out(y, x) = sum over the row (y, :) and the column (:, x), centre once, of softmax(q . k) v."""
    b, _, h, w = q.shape
    out = torch.zeros(v.shape, dtype=torch.float64)
    q, k, v = q.double(), k.double(), v.double()
    for n in range(b):
        for y in range(h):
            for x in range(w):
                pos = [(y, j) for j in range(w)] + [(i, x) for i in range(h) if i != y]
                logits = torch.stack([q[n, :, y, x] @ k[n, :, i, j] for i, j in pos])
                attn = torch.softmax(logits, 0)
                out[n, :, y, x] = sum(a * v[n, :, i, j] for a, (i, j) in zip(attn, pos, strict=True))
    return out


def einsum_step(m: CrissCrossAttention, x):
    """One mmcv `CrissCrossAttention.forward` with m's weights."""
    h = x.shape[2]
    query, key, value = m.query_conv(x), m.key_conv(x), m.value_conv(x)
    neg_inf_diag = torch.diag(torch.full((h,), float("-inf"), dtype=x.dtype))
    energy_h = (torch.einsum("bchw,bciw->bwhi", query, key) + neg_inf_diag).transpose(1, 2)
    energy_w = torch.einsum("bchw,bchj->bhwj", query, key)
    attn = F.softmax(torch.cat([energy_h, energy_w], -1), -1)
    out = torch.einsum("bciw,bhwi->bchw", value, attn[..., :h]) + torch.einsum("bchj,bhwj->bchw", value, attn[..., h:])
    return m.gamma * out + x


def randomise(m, gamma=0.8, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            rnd = torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3
            p.copy_(torch.full_like(p, gamma) if name == "gamma" else rnd)
    return m


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 2, 1, 1), (1, 2, 1, 6), (2, 3, 6, 1)])
def test_op_matches_naive_loops(shape):
    b, ck, h, w = shape
    q, k, v = rand(b, ck, h, w, seed=0), rand(b, ck, h, w, seed=1), rand(b, 5, h, w, seed=2)
    ref = naive_criss_cross(q, k, v)
    torch.testing.assert_close(criss_cross_attention(q, k, v), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cc_ops._criss_cross_traced(torch.cat([q, k, v], 1), ck, None, None), ref,
                               rtol=1e-12, atol=1e-12)  # the torch.compile path
    # packed form with gamma and a residual, channels_last or not
    qkv, gamma, res = torch.cat([q, k, v], 1), torch.tensor([0.3], dtype=torch.float64), rand(b, 5, h, w, seed=3)
    for r in (res, res.contiguous(memory_format=torch.channels_last)):
        out = criss_cross_attention_packed(qkv, ck, gamma, r)
        torch.testing.assert_close(out, r + 0.3 * ref, rtol=1e-12, atol=1e-12)


def test_op_fp32_large_logits_and_the_centre_counted_once():
    # |q . k| ~ 1e3: an unmasked duplicate centre or a separate row/column softmax would change the result
    q, k, v = rand(1, 4, 6, 5, seed=0) * 20, rand(1, 4, 6, 5, seed=1) * 20, rand(1, 3, 6, 5, seed=2)
    ref = naive_criss_cross(q, k, v)
    out = criss_cross_attention(q.float(), k.float(), v.float())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("col_elements", [cc_ops.COL_ELEMENTS, 1])  # 1: one column per GEMM
def test_op_gradcheck(monkeypatch, col_elements):
    monkeypatch.setattr(cc_ops, "COL_ELEMENTS", col_elements)
    q, k, v = (rand(2, 2, 4, 3, seed=s).requires_grad_() for s in range(3))
    v = rand(2, 3, 4, 3, seed=5).requires_grad_()
    assert torch.autograd.gradcheck(criss_cross_attention, (q, k, v))
    qkv = rand(2, 7, 3, 4, seed=6).requires_grad_()
    res = rand(2, 3, 3, 4, seed=7)
    for gamma_value in (0.7, 0.0):  # gamma = 0 (the init) still gets its gradient
        gamma = torch.tensor([gamma_value], dtype=torch.float64, requires_grad=True)
        for r in (res, res.contiguous(memory_format=torch.channels_last)):
            r = r.clone().requires_grad_()
            assert torch.autograd.gradcheck(lambda a, g, r_: criss_cross_attention_packed(a, 2, g, r_), (qkv, gamma, r))


@pytest.mark.parametrize("shape", [(2, 32, 7, 9), (1, 32, 1, 1), (1, 32, 2, 13)])
@pytest.mark.parametrize("recurrence", [1, 2, 3])
def test_block_matches_einsum_reference(shape, recurrence):
    m = randomise(CrissCrossAttention(32, recurrence=recurrence).double())
    x = rand(*shape)
    ref = x
    for _ in range(recurrence):
        ref = einsum_step(m, ref)
    torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-10)
    xc = x.contiguous(memory_format=torch.channels_last)  # the conv projection path
    torch.testing.assert_close(m(xc), ref, rtol=1e-10, atol=1e-10)
    assert m(x).is_contiguous() and m(xc).is_contiguous(memory_format=torch.channels_last)


def test_identity_at_init_and_registry():
    entry = get_attn_entry("criss_cross")
    assert entry.family == "ccnet" and entry.kind == GLOBAL and entry.year == 2019 and "1811.11721" in entry.paper
    m = lit_attn.create_attn("criss_cross", 32)
    assert m.recurrence == 2 and m.query_conv.out_channels == m.key_conv.out_channels == 4
    assert m.value_conv.out_channels == 32 and torch.count_nonzero(m.gamma) == 0
    x = torch.randn(2, 32, 7, 9)
    assert torch.equal(m(x), x)


def test_recurrences_share_one_set_of_weights():
    one, two = CrissCrossAttention(16, recurrence=1), CrissCrossAttention(16, recurrence=2)
    names = [n for n, _ in two.named_parameters()]
    assert names == [n for n, _ in one.named_parameters()]
    assert sorted(names) == sorted([f"{c}.{p}" for c in ("query_conv", "key_conv", "value_conv")
                                    for p in ("weight", "bias")] + ["gamma"])
    randomise(two.double())
    one.double().load_state_dict(two.state_dict())
    x = rand(2, 16, 5, 6)
    torch.testing.assert_close(two(x), one(one(x)), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(two(x), one(x))


def test_r1_ignores_pixels_outside_the_cross():
    m = randomise(CrissCrossAttention(16, recurrence=1).double())
    x = rand(1, 16, 5, 6)
    p, y_out = (2, 3), m(x)
    for q in [(0, 0), (4, 5), (1, 1), (3, 0)]:  # neither in row 2 nor in column 3
        x2 = x.clone()
        x2[..., q[0], q[1]] += rand(16, seed=9)
        y2 = m(x2)
        assert torch.equal(y2[..., p[0], p[1]], y_out[..., p[0], p[1]])
        assert not torch.allclose(y2[..., q[0], q[1]], y_out[..., q[0], q[1]])  # the changed pixel moves
    for q in [(2, 0), (0, 3)]:  # in the row / the column: the output at p does change
        x2 = x.clone()
        x2[..., q[0], q[1]] += rand(16, seed=9)
        assert not torch.allclose(m(x2)[..., p[0], p[1]], y_out[..., p[0], p[1]])


def pixel_dependence(m, x):
    """(N, N) matrix: 1 where the output at pixel p depends on the input at pixel q (gradient != 0)."""
    h, w = x.shape[-2:]
    dep = torch.zeros(h * w, h * w, dtype=torch.bool)
    r = rand(*x.shape, seed=11)
    for p in range(h * w):
        xg = x.clone().requires_grad_()
        (m(xg)[..., p // w, p % w] * r[..., p // w, p % w]).sum().backward()
        dep[p] = xg.grad.abs().sum(1).flatten() > 0
    return dep


def test_r2_connects_every_pair_of_pixels_r1_only_the_cross():
    x = rand(1, 16, 4, 5)
    two = randomise(CrissCrossAttention(16, recurrence=2).double())
    assert pixel_dependence(two, x).all()
    one = randomise(CrissCrossAttention(16, recurrence=1).double())
    ys, xs = torch.arange(4).repeat_interleave(5), torch.arange(5).repeat(4)
    cross = (ys[:, None] == ys[None, :]) | (xs[:, None] == xs[None, :])
    assert torch.equal(pixel_dependence(one, x), cross)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_large_logits_finite(amp_dtype):
    # logits ~ 1e4 overflow fp16 (and an -inf mask would give inf - inf): logits and softmax stay fp32
    m = randomise(CrissCrossAttention(32), gamma=1.0)
    x = 30 * torch.randn(2, 32, 9, 11, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=amp_dtype):
        y = m(x)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=amp_dtype):
        m(xg).square().mean().backward()
    assert torch.isfinite(xg.grad).all() and torch.isfinite(m.gamma.grad).all()


def test_never_builds_n_by_n():
    m = randomise(CrissCrossAttention(16))
    x = torch.randn(1, 16, 40, 40, requires_grad=True)
    with MaxNumel() as rec:
        m(x).sum().backward()
    assert rec.max_numel < (40 * 40) ** 2 // 16, rec.max_numel
    assert torch.isfinite(x.grad).all()


def test_official_state_dict_loads_strictly():
    c = 64
    sd = {"query_conv.weight": torch.randn(c // 8, c, 1, 1), "query_conv.bias": torch.randn(c // 8),
          "key_conv.weight": torch.randn(c // 8, c, 1, 1), "key_conv.bias": torch.randn(c // 8),
          "value_conv.weight": torch.randn(c, c, 1, 1), "value_conv.bias": torch.randn(c),
          "gamma": torch.randn(1)}  # speedinghzl/CCNet names; mmcv stores gamma as "gamma.scale"
    m = CrissCrossAttention(c)
    m.load_state_dict(sd, strict=True)
    assert CrissCrossAttention(512).query_conv.out_channels == 64


def test_bad_arguments():
    for kwargs in ({"recurrence": 0}, {"recurrence": 1.5}, {"reduction": 0}, {"rd_ratio": 0.0}, {"rd_channels": 0}):
        with pytest.raises(ValueError, match="CrissCrossAttention"):
            CrissCrossAttention(16, **kwargs)
    with pytest.raises(ValueError, match="CrissCrossAttention"):
        CrissCrossAttention(0)
    with pytest.raises(ValueError, match="CrissCrossAttention.*C=16"):
        CrissCrossAttention(16)(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="criss_cross_attention"):
        criss_cross_attention(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 5), torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="criss_cross_attention"):
        criss_cross_attention_packed(torch.randn(1, 4, 3, 3), 2)
    assert CrissCrossAttention(4).query_conv.out_channels == 1  # C/8 floors at one channel
    assert CrissCrossAttention(8, rd_ratio=1.0).query_conv.out_channels == 8  # efficientnet's probe
    assert CrissCrossAttention(32, rd_channels=6).key_conv.out_channels == 6
    CrissCrossAttention(8, act_layer="silu")  # accepted and ignored
