"""ISA (interlaced sparse self-attention) against a naive per-group reference written here.

The reference pads explicitly, loops over the long-range groups (strided sub-grids) and the
short-range groups (dh x dw blocks), runs a dense softmax attention inside each group from the
block's own layers (eval mode, float64), crops and fuses; plus the all-pairs connectivity property.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lit_attn
from lit_attn.layers.isa import InterlacedSparseAttention, from_groups, to_groups
from lit_attn.registry import GLOBAL, get_attn_entry

ROOT = Path(__file__).resolve().parents[1]


def randomise(m: nn.Module, seed: int = 1, std: float = 0.3, bn_bias: float = 0.2) -> nn.Module:
    """Random conv weights, BN affine and running statistics, eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.Conv2d):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std)
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
            elif isinstance(mod, nn.BatchNorm2d):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.2 + bn_bias)
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
    return m.eval()


def dense_sa(sa, x):
    """Dense self-attention inside one group x (1, C, h, w), explicit (n, n) softmax over keys."""
    _, _, h, w = x.shape
    q, k, v = sa.f_query(x).flatten(2)[0], sa.f_key(x).flatten(2)[0], sa.f_value(x).flatten(2)[0]
    sim = torch.softmax(q.t() @ k / math.sqrt(sa.key_channels), dim=-1)   # (n, n), rows = queries
    return sa.W((v @ sim.t()).reshape(1, -1, h, w))


def naive_isa(m: InterlacedSparseAttention, x):
    b, c, h, w = x.shape
    dh, dw = m.down_factor
    hp, wp = math.ceil(h / dh) * dh, math.ceil(w / dw) * dw
    top, left = (hp - h) // 2, (wp - w) // 2
    xp = torch.zeros(b, c, hp, wp, dtype=x.dtype)
    xp[:, :, top:top + h, left:left + w] = x                             # symmetric zero padding
    long = torch.empty_like(xp)
    for bi in range(b):
        for p in range(dh):              # long range: the pixels at offset (p, q) of every dh x dw block
            for q in range(dw):
                long[bi:bi + 1, :, p::dh, q::dw] = dense_sa(m.long_range_sa, xp[bi:bi + 1, :, p::dh, q::dw])
    short = torch.empty_like(xp)
    for bi in range(b):
        for i in range(0, hp, dh):       # short range: each contiguous dh x dw block
            for j in range(0, wp, dw):
                short[bi:bi + 1, :, i:i + dh, j:j + dw] = dense_sa(m.short_range_sa,
                                                                   long[bi:bi + 1, :, i:i + dh, j:j + dw])
    ctx = short[:, :, top:top + h, left:left + w]
    return m.conv_bn(torch.cat([ctx, x] if m.context_first else [x, ctx], 1))


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("shape,factor", [((2, 8, 7, 9), (4, 4)), ((1, 8, 5, 5), (2, 3)), ((1, 8, 7, 9), (8, 8)),
                                          ((1, 8, 1, 1), (8, 8)), ((2, 8, 8, 12), (4, 3))])
def test_isa_matches_per_group_loops(shape, factor):
    m = randomise(InterlacedSparseAttention(shape[1], down_factor=factor)).double()
    x = rand(*shape)
    torch.testing.assert_close(m(x), naive_isa(m, x), rtol=1e-10, atol=1e-10)


def test_grouping_layout_and_round_trip():
    t = torch.arange(2 * 3 * 4 * 6).reshape(2, 3, 4, 6)  # (B, C, 2*2, 2*3): blocks of 2 x 3
    g = to_groups(t, 2, 3, local=False)                    # 6 strided groups of 2 x 2 pixels
    assert g.shape == (2, 6, 4, 3)
    torch.testing.assert_close(g[1, 4].t(), t[1, :, 1::2, 1::3].reshape(3, 4))   # offset (1, 1) = group 4
    g = to_groups(t, 2, 3, local=True)                     # 4 blocks of 2 x 3 pixels
    assert g.shape == (2, 4, 6, 3)
    torch.testing.assert_close(g[0, 3].t(), t[0, :, 2:4, 3:6].reshape(3, 6))      # block (1, 1) = group 3
    for local in (False, True):
        assert torch.equal(from_groups(to_groups(t, 2, 3, local), 2, 2, 2, 3, local), t)


def test_bench_reference_and_train_mode_batch_statistics():
    spec = importlib.util.spec_from_file_location("bench_ref_isa", ROOT / "scripts" / "bench_refs" / "isa.py")
    refs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(refs)
    m = randomise(InterlacedSparseAttention(16, down_factor=(4, 4)))
    x = torch.randn(2, 16, 9, 11)
    ref = refs.REFERENCES["isa"][0][1](m)
    torch.testing.assert_close(ref(x), m(x), rtol=1e-4, atol=1e-4)
    # train mode: the official (B * groups, C, ., .) batches give the norms the same statistics
    m = randomise(InterlacedSparseAttention(16, down_factor=(4, 4), dropout=0.0)).train()
    a = m(x)
    torch.testing.assert_close(refs.REFERENCES["isa"][0][1](m)(x), a, rtol=1e-4, atol=1e-4)


def connectivity(m, x, fn):
    """|d fn(x)[:, :, p] / d x[:, :, q]| summed over channels, for every (p, q): (N, N).

    One batch entry per output pixel p (eval mode, so entries are independent): one backward pass."""
    _, c, h, w = x.shape
    n = h * w
    xs = x.expand(n, c, h, w).clone().requires_grad_(True)
    out = fn(xs).flatten(2)                                             # (N, C, N)
    out[torch.arange(n), :, torch.arange(n)].sum().backward()
    return xs.grad.abs().sum(1).flatten(1)                              # (N outputs, N inputs)


@pytest.mark.parametrize("size,factor", [((16, 16), (4, 4)), ((7, 9), (4, 4)), ((9, 10), (3, 4))])
def test_isa_connects_every_pair_of_pixels(size, factor):
    m = randomise(InterlacedSparseAttention(8, down_factor=factor), std=0.5, bn_bias=1.0)
    x = torch.randn(1, 8, *size, generator=torch.Generator().manual_seed(0))
    jac = connectivity(m, x, m)
    assert (jac > 0).all(), f"{(jac == 0).sum()} (p, q) pairs without a path"
    # negative control: the long-range stage alone only connects pixels of the same strided group
    dh, dw = factor
    pad_h, pad_w = -size[0] % dh, -size[1] % dw

    def long_only(t):
        t = F.pad(t, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        y = m.long_range_sa.grouped(t, dh, dw, local=False)
        return y[:, :, pad_h // 2:pad_h // 2 + size[0], pad_w // 2:pad_w // 2 + size[1]]

    jac = connectivity(m, x, long_only)
    ys, xs = torch.meshgrid(torch.arange(size[0]) + pad_h // 2, torch.arange(size[1]) + pad_w // 2, indexing="ij")
    group = ((ys % dh) * dw + xs % dw).flatten()
    same = group[:, None] == group[None, :]
    assert (jac[same] > 0).all() and (jac[~same] == 0).all()


def test_isa_registry_and_defaults():
    entry = get_attn_entry("isa")
    assert entry.kind == GLOBAL and entry.family == "isa" and "1907.12273" in entry.paper and entry.year == 2019
    m = lit_attn.create_attn("isa", 512)
    assert isinstance(m, InterlacedSparseAttention) and m.down_factor == (8, 8)
    sa = m.long_range_sa
    assert sa.key_channels == 256 and sa.value_channels == 512 and sa.out_channels == 512   # ISANet head
    assert sa.f_query[0].bias is None and sa.f_value.bias is None and m.conv_bn[0].bias is None
    assert m.conv_bn[0].in_channels == 1024 and m.conv_bn[2].p == 0.05 and not m.context_first
    assert m.long_range_sa is not m.short_range_sa
    assert InterlacedSparseAttention(16, down_factor=4).down_factor == (4, 4)
    keys = set(m.state_dict())  # openseg ISA_Module names, less the `stages.0.` prefix
    assert {"long_range_sa.f_key.1.0.running_mean", "short_range_sa.W.1.0.weight", "conv_bn.0.weight",
            "conv_bn.1.0.bias"} <= keys


def test_mmseg_options():
    # mmseg ISAHead: concat[context, x], value conv with a bias, no dropout inside
    m = randomise(InterlacedSparseAttention(8, down_factor=(2, 2), context_first=True, value_bias=True,
                                            dropout=0.0)).double()
    assert m.long_range_sa.f_value.bias is not None and m.conv_bn[2].p == 0.0
    x = rand(1, 8, 5, 6)
    torch.testing.assert_close(m(x), naive_isa(m, x), rtol=1e-10, atol=1e-10)
    swapped = InterlacedSparseAttention(8, down_factor=(2, 2), value_bias=True).double()
    swapped.load_state_dict(m.state_dict())
    swapped.eval()
    assert not torch.allclose(swapped(x), m(x))  # the order matters ...
    with torch.no_grad():                        # ... and is the only difference
        w = swapped.conv_bn[0].weight
        w.copy_(torch.cat([w[:, 8:], w[:, :8]], 1))
    torch.testing.assert_close(swapped(x), m(x))


def test_isa_bad_arguments():
    for bad in ((0, 8), (8,), "8", (8, 8, 8), (2.5, 2)):
        with pytest.raises(ValueError, match="InterlacedSparseAttention.*down_factor"):
            InterlacedSparseAttention(8, down_factor=bad)
    with pytest.raises(ValueError, match="InterlacedSparseAttention.*key_channels"):
        InterlacedSparseAttention(8, key_channels=0)
    with pytest.raises(ValueError, match="InterlacedSparseAttention.*rd_ratio"):
        InterlacedSparseAttention(8, rd_ratio=0)
    with pytest.raises(ValueError, match="InterlacedSparseAttention.*C=8"):
        InterlacedSparseAttention(8)(torch.randn(1, 4, 8, 8))
