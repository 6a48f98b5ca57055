"""ANN (APNB / AFNB): values against a naive float64 reference (explicit pyramid pooling windows,
dense softmax over the S = 110 anchors), zero-init context, the shared key/query projection of APNB,
and the head-only AFNB's contract (odd and unequal sizes, bf16, compile, gradients, ValueErrors)."""
import math

import pytest
import torch
from torch import nn

import lit_attn
from lit_attn.layers.ann import AFNB, APNB, pyramid_attention, pyramid_pool
from lit_attn.registry import GLOBAL, HEAD


def randomise(block: nn.Module, std: float = 0.3, seed: int = 0) -> nn.Module:
    """Random parameters (out_project included) and random BN running statistics."""
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


# ----------------------------------------------------------------------------- naive reference
def ref_pool(x, sizes=(1, 3, 6, 8)):
    """(B, C, H, W) -> (B, C, S): average over the explicit adaptive-pooling windows, cell by cell."""
    h, w = x.shape[-2:]
    cells = []
    for s in sizes:
        for i in range(s):
            for j in range(s):
                y0, y1 = (i * h) // s, math.ceil((i + 1) * h / s)
                x0, x1 = (j * w) // s, math.ceil((j + 1) * w / s)
                cells.append(x[:, :, y0:y1, x0:x1].mean((-2, -1)))
    return torch.stack(cells, -1)


def ref_conv(conv, x):
    y = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x)
    return y if conv.bias is None else y + conv.bias[:, None, None]


def ref_cna(m, x, act=True):
    """timm ConvNormAct (1x1 conv, eval-mode BN, ReLU) written out."""
    bn = m.bn
    y = ref_conv(m.conv, x)
    y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    y = y * bn.weight[:, None, None] + bn.bias[:, None, None]
    return y.clamp_min(0) if act else y


def ref_attention(q, k, v, sizes=(1, 3, 6, 8)):
    """Dense softmax over the S pooled anchors: (B, dk, H, W) queries -> (B, dv, H, W)."""
    b, dk, h, w = q.shape
    kp, vp = ref_pool(k, sizes), ref_pool(v, sizes)                        # (B, dk, S), (B, dv, S)
    logits = torch.einsum("bcn,bcs->bns", q.flatten(2), kp) / math.sqrt(dk)  # (B, N, S)
    e = torch.exp(logits - logits.amax(-1, keepdim=True))
    attn = e / e.sum(-1, keepdim=True)                                      # normalised over S
    return torch.einsum("bns,bcs->bcn", attn, vp).reshape(b, -1, h, w)


def ref_apnb(m, x):
    q = ref_cna(m.key_project, x)       # the shared projection gives both the queries and the keys
    ctx = ref_conv(m.out_project, ref_attention(q, q, ref_conv(m.value_project, x), m.pool_sizes))
    return ref_cna(m.bottleneck, torch.cat([ctx, x], 1))


def ref_afnb(m, low, high):
    q, k = ref_cna(m.query_project, high), ref_cna(m.key_project, low)
    ctx = ref_conv(m.out_project, ref_attention(q, k, ref_conv(m.value_project, low), m.pool_sizes))
    return ref_cna(m.bottleneck, torch.cat([ctx, high], 1), act=False)


# ----------------------------------------------------------------------------- pooling / attention
@pytest.mark.parametrize("hw", [(7, 9), (1, 1), (16, 5), (3, 13)])
def test_pyramid_pool_is_110_explicit_windows(hw):
    x = torch.randn(2, 4, *hw, dtype=torch.float64)
    p = pyramid_pool(x)
    assert p.shape == (2, 4, 110)
    torch.testing.assert_close(p, ref_pool(x))


def test_softmax_is_over_the_anchors():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 8, 5, 7, generator=g), torch.randn(2, 8, 6, 4, generator=g)
    v = torch.full((2, 3, 6, 4), 2.5)          # constant values: rows normalised over S reproduce them
    torch.testing.assert_close(pyramid_attention(q, k, v), torch.full((2, 3, 5, 7), 2.5))
    v = torch.randn(2, 3, 6, 4, generator=g, dtype=torch.float64)
    out = pyramid_attention(q.double(), k.double(), v)
    torch.testing.assert_close(out, ref_attention(q.double(), k.double(), v))
    # the same logits normalised over the queries (the wrong axis) give something else
    logits = torch.einsum("bcn,bcs->bns", q.double().flatten(2), ref_pool(k.double())) / math.sqrt(8)
    wrong = torch.einsum("bns,bcs->bcn", logits.softmax(1), ref_pool(v)).reshape(out.shape)
    assert (out - wrong).abs().max() > 1e-2


# ----------------------------------------------------------------------------- APNB
@pytest.mark.parametrize("shape", [(2, 16, 7, 9), (1, 16, 1, 1), (1, 16, 12, 3)])
def test_apnb_matches_naive_reference(shape):
    m = randomise(APNB(16, dtype=torch.float64)).eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(m(x), ref_apnb(m, x))


def test_apnb_custom_sizes_and_channels():
    m = randomise(APNB(12, key_channels=5, value_channels=7, pool_sizes=(2, 4))).double().eval()
    x = torch.randn(2, 12, 9, 6, dtype=torch.float64)
    torch.testing.assert_close(m(x), ref_apnb(m, x))


def test_apnb_key_and_query_are_one_projection():
    c, kc, vc = 16, 8, 8
    m = APNB(c)
    assert m.query_project is m.key_project
    assert (m.key_channels, m.value_channels) == (kc, vc)
    shared = c * kc + 2 * kc                     # 1x1 conv without bias + BN, counted once
    expected = shared + (c * vc + vc) + (vc * c + c) + (2 * c * c + 2 * c)
    assert sum(p.numel() for p in m.parameters()) == expected
    # both the keys and the queries move with the shared weights: the reference above uses
    # key_project for both, and a separate query projection would have its own random weights
    sd = m.state_dict()
    assert not any(k.startswith("query_project.") for k in sd)  # stored once (safetensors-friendly)
    # an mmseg state dict, which lists the shared module under both names, loads strictly
    mmseg_sd = {**sd, **{k.replace("key_project.", "query_project."): v for k, v in sd.items()
                         if k.startswith("key_project.")}}
    APNB(c).load_state_dict(mmseg_sd, strict=True)


def test_apnb_context_is_zero_at_init():
    m = randomise(APNB(16)).eval()
    m.reset_parameters()                          # out_project back to its zero init
    x = torch.randn(2, 16, 6, 5)
    assert m.context(x).abs().max() == 0
    expected = m.bottleneck(torch.cat([torch.zeros_like(x), x], 1))
    torch.testing.assert_close(m(x), expected)
    fresh = APNB(16)
    assert fresh.out_project.weight.abs().max() == 0 and fresh.out_project.bias.abs().max() == 0


def test_apnb_registered_and_bad_arguments():
    e = lit_attn.get_attn_entry("apnb")
    assert e.kind == GLOBAL and e.cls is APNB
    assert isinstance(lit_attn.create_attn("apnb", 8, rd_ratio=1.0), APNB)
    for kwargs in ({"pool_sizes": ()}, {"pool_sizes": (1, 0)}, {"dropout": 1.0}, {"key_channels": 0},
                   {"rd_ratio": 0}):
        with pytest.raises(ValueError, match="APNB"):
            APNB(16, **kwargs)
    with pytest.raises(ValueError, match="APNB"):
        APNB(0)


def test_apnb_output_can_be_modified_in_place():
    m = randomise(APNB(8, dropout=0.0)).train()
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    out = m(x)
    out += 1                                      # timm's BasicBlock does x += shortcut after the block
    out.sum().backward()
    assert x.grad is not None


# ----------------------------------------------------------------------------- AFNB
def pair(b=2, c=16, hw=(7, 9), low_hw=None, dtype=torch.float32):
    low_hw = low_hw or hw
    return torch.randn(b, c // 2, *low_hw, dtype=dtype), torch.randn(b, c, *hw, dtype=dtype)


@pytest.mark.parametrize("hw,low_hw", [((7, 9), None), ((1, 1), None), ((5, 6), (11, 13)), ((9, 4), (1, 1))])
def test_afnb_matches_naive_reference(hw, low_hw):
    m = randomise(AFNB(16, dtype=torch.float64)).eval()
    low, high = pair(2, 16, hw, low_hw, torch.float64)
    out = m(low, high)
    assert out.shape == high.shape
    torch.testing.assert_close(out, ref_afnb(m, low, high))


def test_afnb_knobs_and_zero_init():
    m = AFNB(16, low_channels=6, key_channels=4, value_channels=5, out_channels=10)
    assert m.query_project is not m.key_project
    low, high = torch.randn(1, 6, 5, 5), torch.randn(1, 16, 5, 5)
    randomise(m).eval()
    torch.testing.assert_close(m(low, high), ref_afnb(m, low, high), rtol=1e-4, atol=1e-4)
    assert m(low, high).shape == (1, 10, 5, 5)
    m.reset_parameters()                          # zero out_project: the output ignores `low`
    torch.testing.assert_close(m(low, high), m(torch.randn(1, 6, 3, 8), high))
    d = AFNB(2048)                                # the paper's AFNB(1024 -> 2048, key 256)
    assert (d.low_channels, d.key_channels, d.value_channels, d.out_channels) == (1024, 256, 256, 2048)


def test_afnb_contract_by_hand():
    e = lit_attn.get_attn_entry("afnb")
    assert e.kind == HEAD and e.cls is AFNB
    m = randomise(lit_attn.create_attn("afnb", 16), std=0.1).eval()
    low, high = pair(2, 16, (9, 11), (5, 7))
    ref = m(low, high)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(low, high)
    assert torch.isfinite(out).all() and (out.float() - ref).norm() / ref.norm() < 5e-2
    torch.testing.assert_close(m(low.to(memory_format=torch.channels_last), high.to(memory_format=torch.channels_last)),
                               ref, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(m)(low, high), ref, rtol=1e-3, atol=1e-3)
    meta = AFNB(16, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    AFNB(16, act_layer="silu")
    AFNB(8, rd_ratio=1.0)


def test_afnb_gradients_reach_every_parameter_and_both_inputs():
    m = randomise(AFNB(16)).train()
    low, high = (t.requires_grad_(True) for t in pair(2, 16, (7, 9), (5, 6)))
    (m(low, high) * torch.randn(2, 16, 7, 9)).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert low.grad.abs().sum() > 0 and high.grad.abs().sum() > 0


def test_afnb_value_errors():
    m = AFNB(16)
    low, high = pair(2, 16)
    cases = [
        ((torch.randn(2, 6, 7, 9), high), "AFNB.*`low`.*C=8"),
        ((low, torch.randn(2, 12, 7, 9)), "AFNB.*`high`.*C=16"),
        ((low[0], high), "AFNB.*`low`.*4-D"),
        ((low, high[0]), "AFNB.*`high`.*4-D"),
        ((low[:, :, :0], high), "AFNB.*empty `low`"),
        ((low, high[:0]), "AFNB.*empty `high`"),
        ((low[:1], high), "AFNB.*batch"),
        ((low, "high"), "AFNB.*`high`.*4-D"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            m(*args)
    with pytest.raises(ValueError, match="AFNB"):
        AFNB(16, low_channels=0)
    with pytest.raises(ValueError, match="AFNB"):
        AFNB(16, pool_sizes=(3, -1))


def test_mmseg_state_dict_names():
    keys = set(APNB(16).state_dict())
    assert {"key_project.conv.weight", "key_project.bn.running_var",
            "value_project.weight", "value_project.bias", "out_project.weight", "bottleneck.conv.weight",
            "bottleneck.bn.weight"} <= keys
    assert "key_project.conv.bias" not in keys          # ConvModule: no bias before a norm
    keys = set(AFNB(16).state_dict())
    assert {"query_project.bn.weight", "bottleneck.bn.bias"} <= keys
