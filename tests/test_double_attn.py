"""A2-Net double attention (`a2`) against explicit per-position loops written here (float64)."""
from __future__ import annotations

import pytest
import torch
from helpers import MaxNumel

import lit_attn
from lit_attn.layers.double_attn import DoubleAttention
from lit_attn.registry import GLOBAL, get_attn_entry


def conv1x1(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, O, N) with the conv's weights, as an explicit sum over channels."""
    return torch.einsum("oc,bcn->bon", conv.weight[:, :, 0, 0], x.flatten(2)) + conv.bias[None, :, None]


def naive_a2(m: DoubleAttention, x: torch.Tensor, swap_gather: bool = False, swap_distribute: bool = False):
    b, c, h, w = x.shape
    n_pos = h * w
    a, bl, vl = conv1x1(m.conv_a, x), conv1x1(m.conv_b, x), conv1x1(m.conv_v, x)
    z = torch.zeros(b, m.mid_channels, n_pos, dtype=x.dtype)
    for i in range(b):
        gather_dim = 0 if swap_gather else 1                    # each of the n maps: a distribution over positions
        e = torch.exp(bl[i])
        weights = e / e.sum(dim=gather_dim, keepdim=True)       # (n, N)
        g = torch.zeros(m.mid_channels, m.num_descriptors, dtype=x.dtype)
        for pos in range(n_pos):
            g += torch.outer(a[i, :, pos], weights[:, pos])     # second-order attention pooling
        ev = torch.exp(vl[i])
        dist = ev / ev.sum(dim=1 if swap_distribute else 0, keepdim=True)  # per position: over the n descriptors
        for pos in range(n_pos):
            z[i, :, pos] = g @ dist[:, pos]
    out = torch.einsum("cm,bmn->bcn", m.conv_out.weight[:, :, 0, 0], z) + m.conv_out.bias[None, :, None]
    return x + out.reshape(b, c, h, w)


def randomise(m: DoubleAttention) -> DoubleAttention:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return m


def rand(*shape, seed=0):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(2, 16, 5, 6), (1, 16, 1, 1), (2, 16, 3, 7)])
@pytest.mark.parametrize("widths", [{}, {"mid_channels": 6, "num_descriptors": 3}])
def test_matches_naive(shape, widths):
    m = randomise(DoubleAttention(16, **widths).double())
    x = rand(*shape)
    torch.testing.assert_close(m(x), naive_a2(m, x), rtol=1e-10, atol=1e-10)


def test_softmax_axes():
    m = randomise(DoubleAttention(16).double())
    x = rand(2, 16, 5, 6)
    y = m(x)
    assert (y - naive_a2(m, x, swap_gather=True)).abs().max() > 1e-2
    assert (y - naive_a2(m, x, swap_distribute=True)).abs().max() > 1e-2
    # a spatially constant map: every gather map averages the same A, every distribution sums to one,
    # so Z = A at every position, whatever B and V are (a wrong softmax axis scales it by N or 1/N)
    xc = rand(2, 16, 1, 1).expand(2, 16, 4, 5)
    expected = xc + m.conv_out(m.conv_a(xc))
    torch.testing.assert_close(m(xc), expected, rtol=1e-10, atol=1e-10)


def test_identity_at_init_and_defaults():
    m = lit_attn.create_attn("a2", 32)
    assert (m.mid_channels, m.num_descriptors) == (8, 8)  # C/4 each
    assert torch.count_nonzero(m.conv_out.weight) == 0 and torch.count_nonzero(m.conv_out.bias) == 0
    x = torch.randn(2, 32, 7, 9)
    assert torch.equal(m(x), x)
    paper_init = DoubleAttention(32, zero_init=False)
    assert not torch.allclose(paper_init(x), x)
    assert DoubleAttention(32, rd_ratio=0.5).mid_channels == 16
    assert DoubleAttention(4).num_descriptors == 1
    entry = get_attn_entry("a2")
    assert entry.kind == GLOBAL and entry.family == "a2net" and "1810.11579" in entry.paper


def naive_reassociated(m: DoubleAttention, x: torch.Tensor) -> torch.Tensor:
    """A (B^T V): the same value through an N x N matrix (the wasteful association)."""
    b, _, h, w = x.shape
    a = m.conv_a(x).flatten(2)
    gather = torch.softmax(m.conv_b(x).flatten(2), dim=2)
    distribute = torch.softmax(m.conv_v(x).flatten(2), dim=1)
    return x + m.conv_out((a @ (gather.transpose(1, 2) @ distribute)).reshape(b, -1, h, w))


def peak(fn, m: DoubleAttention, side: int) -> int:
    x = torch.randn(1, m.channels, side, side, requires_grad=True)
    with MaxNumel() as rec:
        fn(m, x).square().mean().backward()
    return rec.max_numel


def test_memory_linear_in_positions():
    m = randomise(DoubleAttention(16))
    c = m.channels
    small, large = peak(DoubleAttention.forward, m, 24), peak(DoubleAttention.forward, m, 48)
    assert small <= c * 24 * 24 and large <= c * 48 * 48  # nothing larger than the input map
    assert 3.5 < large / small < 4.5, (small, large)     # 4x the positions, 4x the memory
    naive_small, naive_large = peak(naive_reassociated, m, 24), peak(naive_reassociated, m, 48)
    assert naive_large >= (48 * 48) ** 2 and naive_large / naive_small > 15  # the recorder sees N x N
    x = torch.randn(1, 16, 9, 7)
    torch.testing.assert_close(m(x), naive_reassociated(m, x), rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="DoubleAttention.*mid_channels"):
        DoubleAttention(16, mid_channels=0)
    with pytest.raises(ValueError, match="DoubleAttention.*num_descriptors"):
        DoubleAttention(16, num_descriptors=2.5)
    with pytest.raises(ValueError, match="DoubleAttention.*rd_ratio"):
        DoubleAttention(16, rd_ratio=0)
    with pytest.raises(ValueError, match="DoubleAttention"):
        DoubleAttention(0)
    with pytest.raises(ValueError, match="DoubleAttention.*C=16"):
        DoubleAttention(16)(torch.randn(1, 8, 4, 4))
    DoubleAttention(8, rd_ratio=1.0, act_layer="silu")  # accepted; act_layer ignored
