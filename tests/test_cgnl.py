"""CGNL (cgnl, cgnl_gaussian) against a naive reference written here.

The reference follows the paper's generalized non-local definition literally: per group it flattens the
c*h*w elements of theta, phi and g (as the official `SpatialCGNL.kernel` does with `view(b, 1, c*h*w)`)
and builds the explicit (c*h*w) x (c*h*w) pairwise matrix f(t_j, p_i) (dot product, or the explicit
truncated Taylor series of the Gaussian RBF), y_j = sum_i f_ij g_i, in float64.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import lit_attn
from lit_attn.layers.cgnl import CGNL


def randomise(m: CGNL, std: float = 0.3, seed: int = 0) -> CGNL:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return m


def naive(blk: CGNL, x: torch.Tensor) -> torch.Tensor:
    t = F.conv2d(x, blk.t.weight)
    p = F.conv2d(x, blk.p.weight)
    g = F.conv2d(x, blk.g.weight)
    b, c, h, w = t.shape
    cg = c // blk.groups
    ys = []
    for i in range(blk.groups):                                   # explicit split into groups
        sl = slice(i * cg, (i + 1) * cg)
        tg, pg, gg = (a[:, sl].reshape(b, cg * h * w) for a in (t, p, g))
        tp = tg[:, :, None] * pg[:, None, :]                       # (B, M, M): t_j * p_i
        if blk.kernel == "dot":
            f = tp
        else:                                                      # explicit truncated Taylor series
            beta = math.exp(-2 * blk.gamma)
            f = sum(beta * (2 * blk.gamma * tp) ** k / math.factorial(k) for k in range(blk.order + 1))
        if blk.use_scale:
            f = f / math.sqrt(cg * h * w)
        ys.append((f @ gg[:, :, None]).reshape(b, cg, h, w))
    y = torch.cat(ys, 1)
    z = F.conv2d(y, blk.z.weight, groups=blk.groups)
    return x + F.group_norm(z, blk.groups, blk.gn.weight, blk.gn.bias, blk.gn.eps)


@pytest.mark.parametrize("shape", [(2, 32, 5, 6), (1, 32, 1, 1), (1, 32, 3, 7)])
@pytest.mark.parametrize("use_scale", [False, True])
@pytest.mark.parametrize("groups", [8, 1])
def test_dot_kernel_matches_naive(shape, use_scale, groups):
    blk = randomise(CGNL(32, groups=groups, use_scale=use_scale, dtype=torch.float64))
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(blk(x), naive(blk, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("gamma", [1e-4, 0.05])
@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("shape", [(2, 32, 4, 5), (1, 32, 1, 1)])
def test_gaussian_kernel_matches_taylor_naive(gamma, order, shape):
    blk = randomise(CGNL(32, kernel="gaussian", gamma=gamma, order=order, dtype=torch.float64))
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(blk(x), naive(blk, x), rtol=1e-10, atol=1e-10)


def test_gaussian_orders_all_contribute_and_approach_the_rbf_series():
    """With a visible gamma each Taylor order changes the output, and the series converges to
    beta * exp(2 gamma t p) (the official simplified RBF) as the order grows."""
    x = torch.randn(1, 32, 4, 4, dtype=torch.float64)
    outs = []
    for order in range(5):
        blk = randomise(CGNL(32, kernel="gaussian", gamma=0.05, order=order, dtype=torch.float64))
        outs.append(blk(x))
    for lo, hi in itertools.pairwise(outs):
        assert (hi - lo).abs().max() > 1e-8
    blk = randomise(CGNL(32, kernel="gaussian", gamma=0.05, order=25, dtype=torch.float64))
    t, p, g = (F.conv2d(x, m.weight).reshape(1, 8, -1) for m in (blk.t, blk.p, blk.g))
    f = math.exp(-0.1) * torch.exp(0.1 * t[..., :, None] * p[..., None, :])
    y = (f @ g[..., None]).reshape(1, 16, 4, 4)
    ref = x + F.group_norm(F.conv2d(y, blk.z.weight, groups=8), 8, blk.gn.weight, blk.gn.bias, blk.gn.eps)
    torch.testing.assert_close(blk(x), ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["cgnl", "cgnl_gaussian"])
def test_identity_at_init(name):
    blk = lit_attn.create_attn(name, 32)
    assert not blk.gn.weight.any() and not blk.gn.bias.any()
    assert abs(blk.t.weight.std().item() - 0.01) < 3e-3
    x = torch.randn(2, 32, 7, 9)
    torch.testing.assert_close(blk(x), x, rtol=0, atol=0)


def test_registered_defaults_and_official_names():
    dot, gauss = lit_attn.create_attn("cgnl", 32), lit_attn.create_attn("cgnl_gaussian", 32)
    assert (dot.kernel, gauss.kernel) == ("dot", "gaussian")
    assert (gauss.order, gauss.gamma, dot.groups, dot.planes, dot.use_scale) == (3, 1e-4, 8, 16, False)
    assert lit_attn.get_attn_entry("cgnl").family == "cgnl"
    shapes = {k: tuple(v.shape) for k, v in dot.state_dict().items()}       # official SpatialCGNL(32, 16, groups=8)
    assert shapes == {"t.weight": (16, 32, 1, 1), "p.weight": (16, 32, 1, 1), "g.weight": (16, 32, 1, 1),
                      "z.weight": (32, 2, 1, 1), "gn.weight": (32,), "gn.bias": (32,)}


def test_attention_is_one_scalar_per_group():
    """The dot kernel: y = <p, g> t per group, so a group's output is proportional to its theta."""
    blk = randomise(CGNL(32, dtype=torch.float64))
    x = torch.randn(1, 32, 5, 5, dtype=torch.float64)
    t, p, g = (F.conv2d(x, m.weight).reshape(1, 8, -1) for m in (blk.t, blk.p, blk.g))
    y = blk.aggregate(t, p, g)
    ratio = y / t
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio))
    torch.testing.assert_close(ratio[..., 0], (p * g).sum(-1))


def test_bf16_autocast_keeps_group_sums_in_fp32():
    blk = randomise(CGNL(32), std=0.2).eval()
    x = torch.randn(2, 32, 24, 24)
    ref = blk(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = blk(x)
    assert (out.float() - ref).norm() / (ref - x).norm() < 3e-2


def test_value_errors():
    with pytest.raises(ValueError, match="CGNL.*groups"):
        CGNL(30)                                   # 30 channels, 8 groups
    assert CGNL(24, rd_ratio=0.5).planes == 16      # 12 inner channels: rounded to 8 groups (make_divisible)
    with pytest.raises(ValueError, match="CGNL.*kernel"):
        CGNL(32, kernel="rbf")
    with pytest.raises(ValueError, match="CGNL.*order"):
        CGNL(32, kernel="gaussian", order=-1)
    with pytest.raises(ValueError, match="CGNL.*gamma"):
        CGNL(32, kernel="gaussian", gamma=0.0)
    with pytest.raises(ValueError, match="CGNL.*C=16"):
        CGNL(32)(torch.randn(1, 16, 4, 4))
