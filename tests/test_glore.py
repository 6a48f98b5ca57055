"""GloRe unit (glore) against a naive reference written here, in the official operation order.

The reference follows `GloRe_Unit.forward` of facebookresearch/GloRe: conv_state on the full map,
V = X_state B^T, the GCN with explicit node / state matrices, Y = GCN(V) B, conv_extend, BN. The block
computes the same products in another order (on the Nn-column side), so the match is not by construction.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lit_attn
from lit_attn.layers.glore import GCN, GloReUnit
from lit_attn.registry import GLOBAL, get_attn_entry


def randomise(m: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
        m.blocker.running_mean.copy_(torch.randn(m.channels, generator=g) * 0.1)
        m.blocker.running_var.copy_(torch.rand(m.channels, generator=g) + 0.5)
    return m.eval()


def naive_glore(m: GloReUnit, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    L = h * w
    xs = F.conv2d(x, m.conv_state.weight, m.conv_state.bias).reshape(b, m.num_s, L)     # (B, S, L)
    bp = F.conv2d(x, m.conv_proj.weight, m.conv_proj.bias).reshape(b, m.num_n, L)       # (B, Nn, L)
    v = torch.bmm(xs, bp.transpose(1, 2))                                               # (B, S, Nn)
    if m.normalize:
        v = v / L
    a = m.gcn.conv1.weight[:, :, 0]        # (Nn, Nn): mixes nodes
    wg = m.gcn.conv2.weight[:, :, 0]       # (S, S): mixes states
    hid = torch.einsum("nm,bsm->bsn", a, v) + m.gcn.conv1.bias[None, None, :] + v
    hid = torch.einsum("st,btn->bsn", wg, torch.relu(hid))
    y = torch.bmm(hid, bp).reshape(b, m.num_s, h, w)                                    # same B
    z = F.conv2d(y, m.conv_extend.weight)
    bn = m.blocker
    z = (z - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + 1e-4)
    return x + z * bn.weight[:, None, None] + bn.bias[:, None, None]


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("shape", [(2, 16, 7, 9), (1, 16, 1, 1), (1, 12, 3, 2)])
def test_matches_naive_official_order(shape, normalize):
    m = randomise(GloReUnit(shape[1], normalize=normalize).double())
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m(x), naive_glore(m, x), rtol=1e-10, atol=1e-10)


def test_defaults_follow_r50_placement():
    m = GloReUnit(512)
    assert (m.num_s, m.num_n) == (256, 128)               # state C/2, nodes C/4 (res3 of the R50: 512 / 128)
    assert m.conv_state.out_channels == 256 and m.conv_proj.out_channels == 128
    assert m.gcn.conv1.in_channels == m.gcn.conv1.out_channels == 128 and m.gcn.conv1.bias is not None
    assert m.gcn.conv2.in_channels == 256 and m.gcn.conv2.bias is None
    assert m.conv_extend.bias is None and m.blocker.eps == 1e-4
    assert not m.normalize
    assert GloReUnit(64, num_mid=5).num_s == 10 and GloReUnit(64, rd_ratio=0.5).num_n == 32


def test_gcn_axes():
    """conv1 permutes nodes (adds V), conv2 permutes states: swapping the two axes gives other values."""
    s, n = 6, 3
    gcn = GCN(s, n).double()
    pn, ps = torch.tensor([2, 0, 1]), torch.tensor([3, 5, 0, 1, 4, 2])
    with torch.no_grad():
        gcn.conv1.weight.copy_(torch.eye(n, dtype=torch.float64)[pn][:, :, None])   # row i picks node pn[i]
        gcn.conv1.bias.zero_()
        gcn.conv2.weight.copy_(torch.eye(s, dtype=torch.float64)[ps][:, :, None])   # row i picks state ps[i]
    v = torch.randn(2, s, n, dtype=torch.float64)
    expected = torch.empty_like(v)
    for i in range(s):
        for j in range(n):
            expected[:, i, j] = torch.relu(v[:, ps[i], pn[j]] + v[:, ps[i], j])
    torch.testing.assert_close(gcn(v), expected, rtol=0, atol=1e-12)


def test_identity_at_init_and_registry():
    entry = get_attn_entry("glore")
    assert entry.family == "glore" and entry.kind == GLOBAL and entry.year == 2019 and "1811.12814" in entry.paper
    m = lit_attn.create_attn("glore", 32)
    assert torch.count_nonzero(m.blocker.weight) == 0
    x = torch.randn(2, 32, 7, 9)
    assert torch.equal(m(x), x)
    assert torch.equal(m.train()(x), x)


def test_normalize_makes_the_unit_size_invariant():
    """With normalize=True the node features are means over positions: tiling the map tiles the output."""
    x = torch.randn(1, 16, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tiled = x.repeat(1, 1, 2, 3)
    for normalize in (True, False):
        m = randomise(GloReUnit(16, normalize=normalize).double())
        same = torch.allclose(m(tiled), m(x).repeat(1, 1, 2, 3), rtol=1e-10, atol=1e-10)
        assert same == normalize


def test_projection_and_reverse_projection_share_b():
    """Only conv_proj makes B; scaling B by s scales V by s and Y by s * GCN(s V) (not s * GCN(V))."""
    m = randomise(GloReUnit(16, normalize=True).double())
    assert [n for n, _ in m.named_children()] == ["conv_state", "conv_proj", "gcn", "conv_extend", "blocker"]
    x = torch.randn(2, 16, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        m.gcn.conv1.weight.zero_()
        m.gcn.conv1.bias.zero_()
        m.gcn.conv2.weight.copy_(torch.eye(m.num_s, dtype=torch.float64)[:, :, None])
        m.conv_state.bias.abs_()
        m.conv_state.weight.zero_()      # X_state = b_s > 0, so V = b_s (B 1)^T and GCN(V) = ReLU(V)
    b = F.conv2d(x, m.conv_proj.weight, m.conv_proj.bias).flatten(2)            # (B, Nn, L)
    v = m.conv_state.bias[None, :, None] * b.sum(-1)[:, None, :] / b.shape[-1]
    y = torch.bmm(torch.relu(v), b).view(2, m.num_s, 5, 4)
    bn = m.blocker
    z = (F.conv2d(y, m.conv_extend.weight) - bn.running_mean[:, None, None]) / torch.sqrt(
        bn.running_var[:, None, None] + 1e-4)
    torch.testing.assert_close(m(x), x + z * bn.weight[:, None, None] + bn.bias[:, None, None], rtol=1e-10,
                               atol=1e-10)


def test_official_state_dict_loads_strictly():
    c, mid = 32, 8
    sd = {
        "conv_state.weight": torch.randn(2 * mid, c, 1, 1), "conv_state.bias": torch.randn(2 * mid),
        "conv_proj.weight": torch.randn(mid, c, 1, 1), "conv_proj.bias": torch.randn(mid),
        "gcn.conv1.weight": torch.randn(mid, mid, 1), "gcn.conv1.bias": torch.randn(mid),
        "gcn.conv2.weight": torch.randn(2 * mid, 2 * mid, 1),
        "conv_extend.weight": torch.randn(c, 2 * mid, 1, 1),
        "blocker.weight": torch.randn(c), "blocker.bias": torch.randn(c), "blocker.running_mean": torch.randn(c),
        "blocker.running_var": torch.rand(c) + 0.5, "blocker.num_batches_tracked": torch.tensor(3),
    }
    GloReUnit(c, num_mid=mid).load_state_dict(sd, strict=True)


def test_fp32_and_bf16_close_to_float64():
    m = randomise(GloReUnit(32, normalize=True))
    x = torch.randn(2, 32, 12, 10)
    ref = m.double()(x.double())
    m.float()
    torch.testing.assert_close(m(x).double(), ref, rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert ((out.double() - ref).norm() / ref.norm()) < 3e-2


def test_bad_arguments():
    with pytest.raises(ValueError, match="GloReUnit"):
        GloReUnit(16, num_mid=0)
    with pytest.raises(ValueError, match="GloReUnit"):
        GloReUnit(16, rd_ratio=0)
    with pytest.raises(ValueError, match="GloReUnit"):
        GloReUnit(0)
    with pytest.raises(ValueError, match="GloReUnit.*C=16"):
        GloReUnit(32)(torch.randn(1, 16, 4, 4))
    assert GloReUnit(3).num_n == 1                                      # C/4 floors at one node
    assert isinstance(GloReUnit(8, act_layer="silu").gcn.act, torch.nn.SiLU)  # act_layer replaces the ReLU
