"""APCNet's ACM: values against a naive float64 reference (explicit pooling windows and an explicit
per-pixel, per-region sigmoid affinity), sigmoid (not softmax) affinities, the in/out channel knobs the
APCHead needs, fusion on/off, mmseg's state-dict names and ValueErrors."""
import math

import pytest
import torch
from torch import nn

import lit_attn
from lit_attn.layers.acm import ACM
from lit_attn.registry import GLOBAL


def randomise(block: nn.Module, std: float = 0.3, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
        for name, b in block.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.2)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g, dtype=b.dtype) + 0.5)
    return block


def cna(m, x):
    """1x1 conv (no bias) -> eval BN -> ReLU on a (C,) vector or a (C, H, W) map, written out."""
    bn = m.bn
    y = torch.einsum("oc,c...->o...", m.conv.weight[:, :, 0, 0], x)
    shape = (-1,) + (1,) * (y.ndim - 1)
    y = (y - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
    return (y * bn.weight.view(shape) + bn.bias.view(shape)).clamp_min(0)


def ref_acm(m, x):
    """ACM for one image x (C, H, W), pixel by pixel."""
    _, h, w = x.shape
    s = m.pool_scale
    regions = []                                              # the s^2 pooled regions, row-major
    for i in range(s):
        for j in range(s):
            y0, y1 = (i * h) // s, math.ceil((i + 1) * h / s)
            x0, x1 = (j * w) // s, math.ceil((j + 1) * w / s)
            regions.append(cna(m.pooled_redu_conv, x[:, y0:y1, x0:x1].mean((1, 2))))
    regions = torch.stack(regions, 1)                         # (C', s^2)
    xr = cna(m.input_redu_conv, x)                            # (C', H, W)
    g = cna(m.global_info, xr.mean((1, 2)))                   # global guidance (C',)
    wg, bg = m.gla.weight[:, :, 0, 0], m.gla.bias
    z = torch.zeros_like(xr)
    for py in range(h):
        for px in range(w):
            a = 1 / (1 + torch.exp(-(wg @ (xr[:, py, px] + g) + bg)))  # this pixel's sigmoid affinity to each region
            z[:, py, px] = regions @ a
    out = (cna(m.residual_conv, z) + xr).clamp_min(0)
    return cna(m.fusion_conv, out) if m.fusion else out


@pytest.mark.parametrize("pool_scale", [1, 2, 3, 6])
@pytest.mark.parametrize("shape", [(2, 12, 7, 9), (1, 12, 1, 1), (1, 12, 4, 13)])
def test_matches_naive_reference(pool_scale, shape):
    m = randomise(ACM(12, pool_scale=pool_scale, dtype=torch.float64)).eval()
    x = torch.randn(shape, dtype=torch.float64)
    out = m(x)
    assert out.shape == shape
    torch.testing.assert_close(out, torch.stack([ref_acm(m, xi) for xi in x]))


def test_head_channels_and_no_fusion():
    m = randomise(ACM(20, out_channels=8, pool_scale=3, fusion=False, dtype=torch.float64)).eval()
    assert isinstance(m.fusion_conv, nn.Identity)
    x = torch.randn(2, 20, 6, 5, dtype=torch.float64)
    out = m(x)
    assert out.shape == (2, 8, 6, 5)
    torch.testing.assert_close(out, torch.stack([ref_acm(m, xi) for xi in x]))
    with pytest.raises(ValueError, match="ACM.*C=20"):
        m(torch.randn(1, 8, 6, 5, dtype=torch.float64))


def test_affinity_is_a_sigmoid_not_a_softmax():
    m = randomise(ACM(8, pool_scale=3)).eval()
    x_red = m.input_redu_conv(torch.randn(2, 8, 5, 7))
    a = m.affinity(x_red)
    assert a.shape == (2, 9, 5, 7) and (a > 0).all() and (a < 1).all()
    assert (a.sum(1) - 1).abs().max() > 1e-2               # not normalised over the regions
    with torch.no_grad():
        m.gla.weight.zero_()
        m.gla.bias.fill_(0.0)
    torch.testing.assert_close(m.affinity(x_red), torch.full_like(a, 0.5))  # sum over regions 4.5, not 1


def test_registered_defaults_and_mmseg_names():
    e = lit_attn.get_attn_entry("acm")
    assert e.kind == GLOBAL and e.cls is ACM
    m = lit_attn.create_attn("acm", 16)
    assert (m.channels, m.out_channels, m.pool_scale, m.fusion) == (16, 16, 3, True)
    keys = set(ACM(16, out_channels=8, pool_scale=2).state_dict())
    assert {"pooled_redu_conv.conv.weight", "pooled_redu_conv.bn.running_mean", "input_redu_conv.bn.weight",
            "global_info.conv.weight", "gla.weight", "gla.bias", "residual_conv.conv.weight",
            "fusion_conv.bn.bias"} <= keys
    assert "input_redu_conv.conv.bias" not in keys     # mmcv ConvModule: no conv bias before a norm
    assert ACM(16, out_channels=8, pool_scale=6).gla.out_channels == 36


def test_output_can_be_modified_in_place():
    m = randomise(ACM(8)).train()
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    out = m(x)
    out += 1                                           # timm's BasicBlock does x += shortcut after the block
    out.sum().backward()
    assert x.grad is not None


def test_bad_arguments():
    for kwargs in ({"pool_scale": 0}, {"pool_scale": 2.0}, {"out_channels": 0}):
        with pytest.raises(ValueError, match="ACM"):
            ACM(8, **kwargs)
    with pytest.raises(ValueError, match="ACM"):
        ACM(-1)
