"""DANet blocks (danet_pam, danet_cam, danet) against naive references written here.

The references build the N x N (PAM) and C x C (CAM) energies explicitly, as the official
`encoding/nn/da_att.py` does, and share the block's weights.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import MaxNumel

import lit_attn
from lit_attn.layers.danet import ChannelAttention, DualAttention, PositionAttention
from lit_attn.registry import GLOBAL, get_attn_entry


def naive_pam(m: PositionAttention, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    n = h * w
    q = F.conv2d(x, m.query_conv.weight, m.query_conv.bias).reshape(b, -1, n).permute(0, 2, 1)
    k = F.conv2d(x, m.key_conv.weight, m.key_conv.bias).reshape(b, -1, n)
    v = F.conv2d(x, m.value_conv.weight, m.value_conv.bias).reshape(b, c, n)
    energy = torch.bmm(q, k)                          # (B, N, N): row i = query, column j = key
    attention = torch.softmax(energy, dim=-1)         # over keys, no scaling
    out = torch.bmm(v, attention.permute(0, 2, 1)).reshape(b, c, h, w)
    return m.gamma * out + x


def cam_energy(x: torch.Tensor) -> torch.Tensor:
    f = x.reshape(x.shape[0], x.shape[1], -1)
    return torch.bmm(f, f.transpose(1, 2))            # (B, C, C)


def naive_cam(gamma: torch.Tensor, x: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    out = torch.bmm(attention, x.reshape(b, c, -1)).reshape(b, c, h, w)
    return gamma * out + x


def official_cam_attention(x: torch.Tensor) -> torch.Tensor:
    energy = cam_energy(x)
    energy_new = energy.max(-1, keepdim=True)[0].expand_as(energy) - energy
    return torch.softmax(energy_new, dim=-1)


def paper_cam_attention(x: torch.Tensor) -> torch.Tensor:
    energy = cam_energy(x)
    return torch.softmax(energy - energy.max(-1, keepdim=True)[0], dim=-1)


def randomise(m: torch.nn.Module, gamma: float = 0.7) -> torch.nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("gamma"):
                p.fill_(gamma)
            else:
                p.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("shape", [(2, 16, 7, 9), (1, 16, 1, 1)])
def test_pam_matches_naive(shape):
    m = randomise(PositionAttention(shape[1]).double())
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert m.query_conv.out_channels == m.key_conv.out_channels == shape[1] // 8
    assert m.value_conv.out_channels == shape[1]
    torch.testing.assert_close(m(x), naive_pam(m, x), rtol=1e-10, atol=1e-10)


def test_pam_matches_naive_fp32_equal_head_dims():
    # rd_ratio=1 gives dk == dv: global_attention takes the SDPA path instead of the chunked kernel
    m = randomise(PositionAttention(8, rd_ratio=1.0), gamma=1.0)
    x = torch.randn(2, 8, 5, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m(x), naive_pam(m, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 16, 7, 9), (1, 16, 1, 1)])
def test_cam_modes_match_naive(shape):
    x = 0.2 * torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    energy = cam_energy(x)
    official, paper = official_cam_attention(x), paper_cam_attention(x)
    # softmax is shift-invariant: the official rowmax(E) - E is softmax(-E), the paper form softmax(E)
    torch.testing.assert_close(official, torch.softmax(-energy, -1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(paper, torch.softmax(energy, -1), rtol=1e-12, atol=1e-12)

    outs = {}
    for mode, attention in (("official", official), ("stable", paper)):
        m = randomise(ChannelAttention(shape[1], mode=mode).double())
        outs[mode] = m(x)
        torch.testing.assert_close(outs[mode], naive_cam(m.gamma, x, attention), rtol=1e-10, atol=1e-10)
    if shape[1] > 1 and shape[2] * shape[3] > 1:
        assert not torch.allclose(outs["official"], outs["stable"])
    assert ChannelAttention(4).mode == "official"


@pytest.mark.parametrize("cam_mode", ["official", "stable"])
def test_danet_is_sum_of_branches(cam_mode):
    m = DualAttention(16, cam_mode=cam_mode).double()
    randomise(m)
    with torch.no_grad():
        m.cam.gamma.fill_(-0.4)
    x = 0.2 * torch.randn(2, 16, 7, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    att = official_cam_attention(x) if cam_mode == "official" else paper_cam_attention(x)
    expected = naive_pam(m.pam, x) + naive_cam(m.cam.gamma, x, att) - x
    torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m(x), m.pam(x) + m.cam(x) - x, rtol=1e-10, atol=1e-10)
    assert m.cam.mode == cam_mode


@pytest.mark.parametrize("name", ["danet_pam", "danet_cam", "danet"])
def test_identity_at_init_and_registry(name):
    entry = get_attn_entry(name)
    assert entry.family == "danet" and entry.kind == GLOBAL and entry.year == 2019
    assert "1809.02983" in entry.paper
    m = lit_attn.create_attn(name, 16)
    assert all(torch.count_nonzero(p) == 0 for n, p in m.named_parameters() if n.endswith("gamma"))
    x = torch.randn(2, 16, 7, 9)
    assert torch.equal(m(x), x)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["official", "stable"])
@pytest.mark.parametrize("offset", [0.0, 10.0])
def test_cam_large_inputs_under_autocast(amp_dtype, mode, offset):
    # |x| ~ 100 at 32x32: energies ~ 1e7 (1e9 with a shared positive mean, as after a ReLU)
    m = ChannelAttention(32, mode=mode)
    with torch.no_grad():
        m.gamma.fill_(1.0)
    x = 100 * (torch.randn(2, 32, 32, 32, generator=torch.Generator().manual_seed(0)) + offset)
    scale = x.abs().max()
    ref = m(x)
    with torch.autocast("cpu", dtype=amp_dtype):
        y = m(x)
    assert torch.isfinite(y).all()
    assert (y.float() - ref).abs().max() < 1e-2 * scale  # only the output's low-precision rounding
    if offset:  # the naive low-precision energy overflows (fp16) or loses the differences (bf16)
        attention = official_cam_attention if mode == "official" else paper_cam_attention
        with torch.autocast("cpu", dtype=amp_dtype):
            naive = naive_cam(m.gamma, x, attention(x))
        assert not torch.isfinite(naive).all() or (naive.float() - ref).abs().max() > 0.1 * scale


@pytest.mark.parametrize("name", ["danet_pam", "danet"])
def test_pam_never_builds_n_by_n(name, monkeypatch):
    import lit_attn.ops.attention as ops_attention

    monkeypatch.setattr(ops_attention, "CHUNK_ELEMENTS", 1 << 16)  # small maps get chunked too
    m = randomise(lit_attn.create_attn(name, 16))
    x = torch.randn(1, 16, 40, 40, requires_grad=True)
    n = 40 * 40
    with MaxNumel() as rec:
        m(x).sum().backward()
    assert rec.max_numel < n * n // 4, (rec.max_numel, n * n)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with MaxNumel() as naive:  # the recorder does see an explicit N x N energy
        naive_pam(m.pam if name == "danet" else m, x.detach())
    assert naive.max_numel >= n * n


def test_official_state_dict_loads_strictly():
    c = 64
    pam_sd = {
        "query_conv.weight": torch.randn(c // 8, c, 1, 1), "query_conv.bias": torch.randn(c // 8),
        "key_conv.weight": torch.randn(c // 8, c, 1, 1), "key_conv.bias": torch.randn(c // 8),
        "value_conv.weight": torch.randn(c, c, 1, 1), "value_conv.bias": torch.randn(c),
        "gamma": torch.randn(1),
    }
    cam_sd = {"gamma": torch.randn(1)}
    pam, cam = PositionAttention(c), ChannelAttention(c)
    pam.load_state_dict(pam_sd, strict=True)
    cam.load_state_dict(cam_sd, strict=True)
    torch.testing.assert_close(pam.gamma, pam_sd["gamma"])
    # a DANetHead's `sa.*` / `sc.*` modules map onto `pam.*` / `cam.*`
    head = {**{f"sa.{k}": v for k, v in pam_sd.items()}, **{f"sc.{k}": v for k, v in cam_sd.items()}}
    dual = DualAttention(c)
    dual.load_state_dict({k.replace("sa.", "pam.", 1).replace("sc.", "cam.", 1): v for k, v in head.items()},
                         strict=True)
    assert PositionAttention(512).query_conv.out_channels == 64  # official in_dim // 8


def test_bad_arguments():
    with pytest.raises(ValueError, match="ChannelAttention"):
        ChannelAttention(16, mode="paper")
    with pytest.raises(ValueError, match="DualAttention"):
        DualAttention(16, cam_mode="nope")
    with pytest.raises(ValueError, match="PositionAttention"):
        PositionAttention(16, rd_ratio=0)
    with pytest.raises(ValueError, match="DualAttention"):
        DualAttention(0)
    with pytest.raises(ValueError, match="PositionAttention"):
        PositionAttention(16)(torch.randn(1, 8, 4, 4))
    assert PositionAttention(4).query_conv.out_channels == 1  # C/8 floors at one channel
    # rd_ratio / act_layer accepted (timm's efficientnet passes them); CAM and DualAttention ignore act_layer
    ChannelAttention(8, rd_ratio=1.0, act_layer="silu")
    DualAttention(8, rd_ratio=1.0, act_layer="silu")
