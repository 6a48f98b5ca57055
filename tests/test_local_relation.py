"""Local relation layer: values against a per-pixel loop, identity under a peaked geometry prior, strides."""
import importlib.util
import os

import pytest
import torch
from torch import nn

import lit_attn
from lit_attn.layers.local_relation import LocalRelation2d

REF = os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_refs", "local_relation.py")


def naive_local_relation(block, x):
    """Explicit loops: per output pixel and group, softmax over the in-image window taps of
    -sum_c (q_c - k_c)^2 + MLP(dy, dx), weighted sum of the input channels of the group."""
    b, c, h, w = x.shape
    k, d, s, g = block.kernel_size, block.dilation, block.stride, block.groups
    m, kc = c // g, block.key_channels // g
    q, key = block.query(x), block.key(x)
    l1, l2 = block.geometry[0], block.geometry[2]
    ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
    out = torch.zeros(b, c, ho, wo, dtype=x.dtype)
    for i in range(ho):
        for j in range(wo):
            ci, cj = i * s, j * s
            for gi in range(g):
                logits, values = [], []
                for a in range(k):
                    for bb in range(k):
                        y, xx = ci + (a - k // 2) * d, cj + (bb - k // 2) * d
                        if not (0 <= y < h and 0 <= xx < w):
                            continue
                        off = torch.tensor([a - k // 2, bb - k // 2], dtype=x.dtype)
                        geo = l2(torch.relu(l1(off)))[gi]
                        kg = slice(gi * kc, (gi + 1) * kc)
                        app = -(q[:, kg, ci, cj] - key[:, kg, y, xx]).square().sum(1)
                        logits.append(app + geo)
                        values.append(x[:, gi * m:(gi + 1) * m, y, xx])
                weights = torch.softmax(torch.stack(logits, 1), 1)  # (B, taps)
                out[:, gi * m:(gi + 1) * m, i, j] = (weights[:, :, None] * torch.stack(values, 1)).sum(1)
    return out if block.proj is None else block.proj(out)


@pytest.mark.parametrize("kwargs,size", [
    ({}, (5, 6)),                                                          # k = 7 window wider than the map
    ({"kernel_size": 3, "stride": 2}, (7, 6)),
    ({"kernel_size": 5, "dilation": 2, "out_channels": 24, "key_channels": 4}, (4, 7)),
    ({"kernel_size": 3, "channels_per_group": 4, "geometry_channels": 3}, (1, 3)),
])
def test_matches_naive_loops(kwargs, size):
    torch.manual_seed(0)
    block = LocalRelation2d(16, dtype=torch.float64, **kwargs).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(std=0.5)
    x = torch.randn(2, 16, *size, dtype=torch.float64)
    out = block(x)
    assert out.shape[-2:] == block.output_size(*size)
    torch.testing.assert_close(out, naive_local_relation(block, x))


def test_peaked_geometry_prior_is_identity():
    """With a geometry prior of -100 (|dy| + |dx|) the softmax keeps only the centre: output = input."""
    block = LocalRelation2d(16, kernel_size=5)
    with torch.no_grad():
        l1, l2 = block.geometry[0], block.geometry[2]
        l1.weight.zero_(), l1.bias.zero_(), l2.weight.zero_(), l2.bias.zero_()
        l1.weight[:4] = torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1]])  # relu(+-dy), relu(+-dx)
        l2.weight[:, :4] = -100.0
    x = torch.randn(2, 16, 6, 7)
    torch.testing.assert_close(block(x), x)


def test_output_size_matches_conv():
    for stride in (1, 2, 3):
        block = LocalRelation2d(16, 8, 7, stride)
        conv = nn.Conv2d(16, 8, 7, stride, padding=3)
        for size in ((7, 9), (1, 1), (8, 13)):
            x = torch.randn(1, 16, *size)
            assert block(x).shape == conv(x).shape


def test_matches_unfold_reference():
    spec = importlib.util.spec_from_file_location("bench_ref_local_relation", REF)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    block = lit_attn.create_attn("local_relation", 32, out_channels=16, stride=2).eval()
    ref = mod.REFERENCES["local_relation"][0][1](block).eval()
    x = torch.randn(2, 32, 9, 11)
    torch.testing.assert_close(block(x), ref(x), rtol=1e-4, atol=1e-5)


def test_memory_lean_autograd():
    """The graph keeps far less than one unfolded (C, k^2, N) tensor (the naive formulation keeps several)."""
    block = LocalRelation2d(16, kernel_size=7)
    x = torch.randn(1, 16, 12, 12, requires_grad=True)
    saved = {}  # bytes per storage (a tensor saved by two nodes counts once)
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.update({t.data_ptr(): t.numel() * t.element_size()}) or t, lambda t: t):
        out = block(x)
    assert sum(saved.values()) < x.numel() * 49 * 4 / 4  # a quarter of one fp32 unfolded input
    out.sum().backward()
    assert x.grad is not None


def test_autocast_and_channels_last():
    torch.manual_seed(0)
    block = LocalRelation2d(16, 24)
    x = torch.randn(2, 16, 7, 9)
    ref = block(x)
    torch.testing.assert_close(block(x.contiguous(memory_format=torch.channels_last)), ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).norm() / ref.norm() < 5e-2


def test_meta_device():
    block = LocalRelation2d(16, 32, device="meta")
    assert all(p.device.type == "meta" for p in block.parameters())


def test_errors():
    with pytest.raises(ValueError, match="LocalRelation2d.*channels_per_group=8"):
        LocalRelation2d(12)
    with pytest.raises(ValueError, match="key_channels=3"):
        LocalRelation2d(16, key_channels=3)
    with pytest.raises(ValueError, match="odd"):
        LocalRelation2d(16, kernel_size=4)
    with pytest.raises(ValueError, match="stride"):
        LocalRelation2d(16, stride=0)
    block = LocalRelation2d(16)
    with pytest.raises(ValueError, match="LocalRelation2d.*C=16.*C=8"):
        block(torch.randn(1, 8, 5, 5))
    with pytest.raises(ValueError, match="4-D"):
        block(torch.randn(16, 5, 5))
