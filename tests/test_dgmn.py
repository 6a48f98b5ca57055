"""DGMN dynamic message passing (dgmn) against a naive reference written here.

The reference gathers every neighbour in Python loops, with the DCN v1 bilinear rule of the official
CUDA `DeformUnfold` (floor, four corners, zeros outside), the per-group 9-tap softmax written out,
and GroupNorm as an explicit mean / variance, in float64.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import lit_attn
from lit_attn.layers.dgmn import DynamicGraphMessagePassing, deform_unfold, gn_groups_for
from lit_attn.registry import GLOBAL, get_attn_entry


def randomise(m: torch.nn.Module, seed: int = 1, std: float = 0.3) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return m.eval()


def dcn_bilinear(img: torch.Tensor, h: float, w: float) -> torch.Tensor:
    """DCN v1 `deformable_im2col_bilinear` at (h, w) of img (C, H, W), zeros outside."""
    _, hh, ww = img.shape
    out = img.new_zeros(img.shape[0])
    if not (-1 < h < hh and -1 < w < ww):
        return out
    h0, w0 = math.floor(h), math.floor(w)
    lh, lw = h - h0, w - w0
    for y, x, wt in ((h0, w0, (1 - lh) * (1 - lw)), (h0, w0 + 1, (1 - lh) * lw),
                     (h0 + 1, w0, lh * (1 - lw)), (h0 + 1, w0 + 1, lh * lw)):
        if 0 <= y < hh and 0 <= x < ww:
            out = out + wt * img[:, y, x]
    return out


@torch.no_grad()
def naive_unfold(x: torch.Tensor, offset: torch.Tensor | None, d: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 9, H*W): tap k = 3 i + j at (y + (i-1) d + dy_k, x + (j-1) d + dx_k)."""
    b, c, h, w = x.shape
    cols = x.new_zeros(b, c, 9, h * w)
    for bi in range(b):
        for y in range(h):
            for xx in range(w):
                for k in range(9):
                    i, j = divmod(k, 3)
                    py, px = y + (i - 1) * d, xx + (j - 1) * d
                    if offset is not None:
                        py = py + offset[bi, 2 * k, y, xx].item()
                        px = px + offset[bi, 2 * k + 1, y, xx].item()
                    cols[bi, :, k, y * w + xx] = dcn_bilinear(x[bi], py, px)
    return cols


def gn_relu(seq: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    y = torch.einsum("oc,bchw->bohw", seq[0].weight[:, :, 0, 0], x)
    gn = seq[1]
    b, c, h, w = y.shape
    yg = y.reshape(b, gn.num_groups, -1)
    mean, var = yg.mean(-1, keepdim=True), yg.var(-1, unbiased=False, keepdim=True)
    y = ((yg - mean) / torch.sqrt(var + gn.eps)).reshape(b, c, h, w)
    return torch.relu(y * gn.weight[:, None, None] + gn.bias[:, None, None])


@torch.no_grad()
def naive_dgmn(m: DynamicGraphMessagePassing, x: torch.Tensor, perms=None) -> torch.Tensor:
    xd = gn_relu(m.scale1, x)
    b, c, h, w = xd.shape
    g, r = m.group, c // m.group
    msgs = [xd]
    for i, d in enumerate(m.dilations):
        pred = F.conv2d(xd, getattr(m, "cat" + "abcdefgh"[i]).weight, padding=d, dilation=d)
        offset = pred[:, 9 * g:9 * g + 18] if m.mode != "none" else None
        cols = naive_unfold(xd, offset, d)                                      # (B, C', 9, N)
        if m.mode == "deformatt":
            att = pred[:, 9 * g + 18:9 * g + 27]
            cols = cols * (1 / (1 + torch.exp(-att))).reshape(b, 1, 9, h * w)
        msg = torch.zeros_like(xd).reshape(b, c, h * w)
        for gi in range(g):
            src = perms[i][gi].item() if perms is not None else gi             # filter of group src
            logits = pred[:, 9 * src:9 * src + 9].reshape(b, 9, h * w)
            wts = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)    # softmax over the 9 taps
            for k in range(9):
                msg[:, gi * r:(gi + 1) * r] += wts[:, None, k] * cols[:, gi * r:(gi + 1) * r, k]
        msgs.append(msg.reshape(b, c, h, w))
    return x + gn_relu(m.scale3, gn_relu(m.scale2, torch.cat(msgs, 1)))


@pytest.mark.parametrize("mode,group", [("deformatt", 4), ("deform", 2), ("none", 1)])
def test_matches_naive(mode, group):
    m = randomise(DynamicGraphMessagePassing(32, mode=mode, group=group).double())
    x = torch.randn(1, 32, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m(x), naive_dgmn(m, x), rtol=1e-10, atol=1e-10)


def test_matches_naive_tiny_maps():
    m = randomise(DynamicGraphMessagePassing(16, group=2, dilations=(1, 2))).double()
    for shape in ((2, 16, 1, 1), (1, 16, 1, 4)):
        x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(m(x), naive_dgmn(m, x), rtol=1e-10, atol=1e-10)


def test_group_shuffle_in_training_only():
    m = randomise(DynamicGraphMessagePassing(32, shuffle=True, dilations=(1, 3))).double()
    x = torch.randn(1, 32, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m(x), naive_dgmn(m, x), rtol=1e-10, atol=1e-10)       # eval: no shuffle
    m.train()
    torch.manual_seed(7)
    out = m(x)
    torch.manual_seed(7)
    perms = [torch.randperm(m.group) for _ in m.dilations]
    torch.testing.assert_close(out, naive_dgmn(m, x, perms), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape,d", [((1, 3, 4, 5), 1), ((2, 2, 1, 6), 2), ((1, 2, 3, 1), 4)])
def test_deform_unfold_matches_dcn_bilinear(shape, d):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, dtype=torch.float64, generator=g)
    off = torch.randn(shape[0], 18, *shape[2:], dtype=torch.float64, generator=g) * 1.5
    torch.testing.assert_close(deform_unfold(x, off, d), naive_unfold(x, off, d), rtol=1e-12, atol=1e-12)
    zero = torch.zeros_like(off)
    plain = F.unfold(x, 3, dilation=d, padding=d).view(shape[0], shape[1], 9, -1)
    torch.testing.assert_close(deform_unfold(x, zero, d), plain, rtol=1e-12, atol=1e-12)


def test_offset_layout_row_then_column():
    x = torch.arange(30.0, dtype=torch.float64).view(1, 1, 5, 6)
    off = torch.zeros(1, 18, 5, 6, dtype=torch.float64)
    off[:, 2 * 4] = 1.0            # centre tap (k = 4): channel 8 moves one row down
    off[:, 2 * 2 + 1] = -1.0       # top-right tap (k = 2): channel 5 moves one column left
    cols = deform_unfold(x, off, 1)[0, 0].view(9, 5, 6)
    torch.testing.assert_close(cols[4, :4], x[0, 0, 1:])
    assert torch.all(cols[4, 4] == 0)                                  # below the last row: zeros
    torch.testing.assert_close(cols[2, 1:], x[0, 0, :4])               # (-1, +1) then one left = straight up


def test_filters_are_a_softmax_over_taps():
    """On a spatially constant map the non-deformable message equals the features wherever no tap is
    outside: the 9 weights of each pixel and group sum to one (a softmax over another axis would not)."""
    m = randomise(DynamicGraphMessagePassing(32, mode="none", group=4)).double()
    x = torch.randn(1, 32, 1, 1, dtype=torch.float64).expand(1, 32, 11, 11)
    xd = m.scale1(x)
    for i, d in enumerate(m.dilations[:2]):
        msg = m.message(xd, i)
        torch.testing.assert_close(msg[..., d:-d, d:-d], xd[..., d:-d, d:-d], rtol=1e-12, atol=1e-12)
        assert not torch.allclose(msg[..., :d, :], xd[..., :d, :])     # the border sees zero padding


def test_zero_offsets_reduce_to_the_fixed_neighbourhood():
    plain = randomise(DynamicGraphMessagePassing(32, mode="none", group=4)).double()
    x = torch.randn(2, 32, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    xd = plain.scale1(x)
    for mode, scale in (("deform", 1.0), ("deformatt", 0.5)):          # zero modulation logits: sigmoid = 1/2
        m = DynamicGraphMessagePassing(32, mode=mode, group=4).double()
        state = plain.state_dict()
        for name in ("cata", "catb", "catc", "catd"):
            w = torch.zeros_like(getattr(m, name).weight)
            w[:36] = state.pop(f"{name}.weight")
            getattr(m, name).weight.data.copy_(w)
        m.load_state_dict(state, strict=False)
        for i in range(4):
            torch.testing.assert_close(m.message(xd, i), scale * plain.message(xd, i), rtol=1e-12, atol=1e-12)


def test_defaults_follow_released_config():
    m = DynamicGraphMessagePassing(1024)
    assert m.inner == 256 and m.dilations == (1, 4, 8, 12) and m.group == 4 and m.mode == "deformatt"
    for name, d in zip(("cata", "catb", "catc", "catd"), (1, 4, 8, 12), strict=True):
        conv = getattr(m, name)
        assert conv.kernel_size == (3, 3) and conv.dilation == (d, d) and conv.padding == (d, d)
        assert conv.out_channels == 4 * 9 + 27 and conv.bias is None
    assert m.scale2[0].in_channels == 5 * 256 and m.scale3[0].out_channels == 1024
    assert m.scale1[1].num_groups == m.scale2[1].num_groups == m.scale3[1].num_groups == 32
    assert DynamicGraphMessagePassing(32, mode="none").cata.out_channels == 36
    assert [gn_groups_for(c) for c in (1, 3, 8, 32, 64, 256)] == [1, 1, 4, 16, 32, 32]


def test_official_state_dict_loads_strictly():
    c, ci = 64, 16
    sd = {}
    for name, cin, cout in (("scale1", c, ci), ("scale2", 5 * ci, ci), ("scale3", ci, c)):
        sd[f"{name}.0.weight"] = torch.randn(cout, cin, 1, 1)
        sd[f"{name}.1.weight"], sd[f"{name}.1.bias"] = torch.randn(cout), torch.randn(cout)
    for name in ("cata", "catb", "catc", "catd"):
        sd[f"{name}.weight"] = torch.randn(4 * 9 + 27, ci, 3, 3)
    DynamicGraphMessagePassing(c).load_state_dict(sd, strict=True)


def test_registry_and_not_identity_at_init():
    entry = get_attn_entry("dgmn")
    assert entry.family == "dgmn" and entry.kind == GLOBAL and entry.year == 2020 and "1908.06955" in entry.paper
    m = lit_attn.create_attn("dgmn", 32)
    x = torch.randn(2, 32, 7, 9)
    assert not torch.equal(m(x), x)          # the official block has no zero-init


def test_bf16_autocast_samples_in_fp32():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 40, 40, generator=g)
    off = torch.randn(1, 18, 40, 40, generator=g) * 3
    ref = deform_unfold(x, off, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deform_unfold(x.bfloat16(), off.bfloat16(), 4)
    ref_b = deform_unfold(x.bfloat16().float(), off.bfloat16().float(), 4)   # same inputs, fp32 sampling
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref_b, rtol=1e-2, atol=2e-2)
    assert (out.float() - ref).abs().max() < 0.5


def test_bad_arguments():
    with pytest.raises(ValueError, match="DynamicGraphMessagePassing"):
        DynamicGraphMessagePassing(32, mode="deformable")
    with pytest.raises(ValueError, match="DynamicGraphMessagePassing.*group"):
        DynamicGraphMessagePassing(32, group=3)
    with pytest.raises(ValueError, match="DynamicGraphMessagePassing"):
        DynamicGraphMessagePassing(32, dilations=(1, 0))
    with pytest.raises(ValueError, match="DynamicGraphMessagePassing"):
        DynamicGraphMessagePassing(32, rd_ratio=0)
    with pytest.raises(ValueError, match="DynamicGraphMessagePassing.*C=16"):
        DynamicGraphMessagePassing(32)(torch.randn(1, 16, 4, 4))
    assert isinstance(DynamicGraphMessagePassing(32, act_layer="silu").scale1[2], torch.nn.SiLU)


@pytest.mark.parametrize("mode,dilations", [("deformatt", (1, 4, 8, 12)), ("none", (2, 1, 3, 5, 4))])
def test_torchscript_matches_naive(mode, dilations):
    """torch.jit.script: the scripted block reaches `cata`.. through its children (TorchScript looks up no computed
    name), in registration order, so each conv meets its own dilation (an unsorted tuple here); keys unchanged."""
    m = randomise(DynamicGraphMessagePassing(16, mode=mode, group=2, dilations=dilations).double())
    scripted = torch.jit.script(m)
    assert list(scripted.state_dict()) == list(m.state_dict())
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(scripted(x), naive_dgmn(m, x), rtol=1e-10, atol=1e-10)
