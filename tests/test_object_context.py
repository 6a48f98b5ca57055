"""Object context blocks (SelfAttentionBlock, base_oc, ocr) against naive references written here.

The references recompute every conv-BN-ReLU by hand from the block's parameters (eval mode), the
Base-OC attention as an explicit N x N softmax, and the OCR gather / object attention with explicit
per-pixel loops, in float64.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import MaxNumel
from torch import nn

import lit_attn
from lit_attn.layers.object_context import BaseOC, ObjectContextBlock, SelfAttentionBlock, spatial_gather
from lit_attn.registry import GLOBAL, HEAD, get_attn_entry

ROOT = Path(__file__).resolve().parents[1]


def load_bench_ref(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_ref_{name}", ROOT / "scripts" / "bench_refs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def randomise(m: nn.Module, seed: int = 1, std: float = 0.3) -> nn.Module:
    """Random conv weights, BN affine and running statistics (eval-mode BN is then a real affine map)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.Conv2d):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std)
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
            elif isinstance(mod, nn.BatchNorm2d):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.2)
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
    return m.eval()


def conv(c: nn.Conv2d, x):
    """1x1 conv by hand: (B, Cin, H, W) -> (B, Cout, H, W)."""
    y = torch.einsum("oc,bchw->bohw", c.weight[:, :, 0, 0], x)
    return y if c.bias is None else y + c.bias[:, None, None]


def bn_relu(seq: nn.Sequential, x):
    """openseg's BNReLU = Sequential(BatchNorm2d, ReLU) in eval mode, by hand."""
    bn = seq[0]
    y = (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    return torch.relu(y * bn.weight[:, None, None] + bn.bias[:, None, None])


def cbr(seq: nn.Sequential, x):
    """Sequential(conv, BNReLU, conv, BNReLU, ...) by hand."""
    for i in range(0, len(seq), 2):
        x = bn_relu(seq[i + 1], conv(seq[i], x))
    return x


def naive_sa(sa: SelfAttentionBlock, xq, xk=None):
    """Dense reference: explicit (N_q, N_k) similarity, softmax over keys."""
    xk = xq if xk is None else xk
    b, _, h, w = xq.shape
    q = cbr(sa.f_query, xq).flatten(2)                      # (B, key, Nq)
    k = cbr(sa.f_key, xk).flatten(2)                        # (B, key, Nk)
    v = cbr(sa.f_value, xk) if isinstance(sa.f_value, nn.Sequential) else conv(sa.f_value, xk)
    sim = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(sa.key_channels), dim=-1)   # (B, Nq, Nk)
    ctx = (sim @ v.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)
    return cbr(sa.W, ctx) if isinstance(sa.W, nn.Sequential) else conv(sa.W, ctx)


def naive_base_oc(m: BaseOC, x):
    h, w = x.shape[-2:]
    if m.scale > 1:
        ctx = naive_sa(m.attn, F.max_pool2d(x, m.scale, m.scale, ceil_mode=True))
        ctx = F.interpolate(ctx, size=(h, w), mode="bilinear", align_corners=True)
    else:
        ctx = naive_sa(m.attn, x)
    return cbr(m.conv_bn_dropout[:2], torch.cat([ctx, x], 1))


def naive_ocr(m: ObjectContextBlock, feats, logits):
    """Per-pixel loops: gather (softmax over pixels per class), then attention over the K regions."""
    b, c, h, w = feats.shape
    k = logits.shape[1]
    sa = m.object_context_block
    regions = torch.zeros(b, c, k, 1, dtype=feats.dtype)
    for bi in range(b):
        for ki in range(k):
            weights = torch.exp(m.scale * logits[bi, ki])
            weights = weights / weights.sum()
            for i in range(h):
                for j in range(w):
                    regions[bi, :, ki, 0] += weights[i, j] * feats[bi, :, i, j]
    q = cbr(sa.f_query, feats)                               # (B, key, H, W)
    key = cbr(sa.f_key, regions)[..., 0]                     # (B, key, K)
    val = cbr(sa.f_value, regions)[..., 0]                   # (B, key, K)
    ctx = torch.zeros(b, sa.value_channels, h, w, dtype=feats.dtype)
    for bi in range(b):
        for i in range(h):
            for j in range(w):
                logit = torch.stack([q[bi, :, i, j] @ key[bi, :, r] for r in range(k)]) / math.sqrt(sa.key_channels)
                p = torch.exp(logit - logit.max())
                p = p / p.sum()
                ctx[bi, :, i, j] = sum(p[r] * val[bi, :, r] for r in range(k))
    context = cbr(sa.W, ctx)
    return cbr(m.conv_bn_dropout[:2], torch.cat([context, feats], 1))


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------------------------- shared block
@pytest.mark.parametrize("value_norm,out_norm,bias", [(False, True, False), (True, True, True), (False, False, True)])
def test_self_attention_block_matches_dense(value_norm, out_norm, bias):
    sa = randomise(SelfAttentionBlock(8, 4, 6, 5, bias=bias, value_norm=value_norm, out_norm=out_norm)).double()
    x = rand(2, 8, 5, 7)
    torch.testing.assert_close(sa(x), naive_sa(sa, x), rtol=1e-10, atol=1e-10)
    xk = rand(2, 8, 3, 1, seed=1)  # keys/values from another map (OCR's region map)
    torch.testing.assert_close(sa(x, xk), naive_sa(sa, x, xk), rtol=1e-10, atol=1e-10)
    assert sa(x).shape == (2, 5, 5, 7)
    assert (sa.f_query[0].bias is None) == (not bias)


def test_self_attention_block_structure_and_openseg_names():
    sa = SelfAttentionBlock(16, 8, 12, bias=False)
    assert sa.f_query is not sa.f_key and sa.f_query[0].weight.data_ptr() != sa.f_key[0].weight.data_ptr()
    assert sa.scale == 8 ** -0.5 and sa.out_channels == 16
    keys = set(sa.state_dict())
    # openseg SelfAttentionBlock2D: f_key = [Conv2d, BNReLU, Conv2d, BNReLU], W = [Conv2d, BNReLU]
    assert {"f_key.0.weight", "f_key.1.0.weight", "f_key.1.0.running_var", "f_key.2.weight", "f_key.3.0.bias",
            "f_query.0.weight", "f_value.weight", "W.0.weight", "W.1.0.weight"} <= keys
    assert "f_value.bias" not in keys and "f_key.0.bias" not in keys
    assert "f_value.bias" in SelfAttentionBlock(16, 8, 12, value_bias=True).state_dict()  # mmseg ISA value conv


# ----------------------------------------------------------------------------------------------- base_oc
@pytest.mark.parametrize("shape,scale", [((2, 16, 7, 9), 1), ((1, 16, 1, 1), 1), ((1, 16, 8, 6), 2),
                                         ((2, 16, 7, 5), 2)])
def test_base_oc_matches_dense(shape, scale):
    m = randomise(BaseOC(shape[1], scale=scale)).double()
    x = rand(*shape)
    torch.testing.assert_close(m(x), naive_base_oc(m, x), rtol=1e-10, atol=1e-10)


def test_base_oc_zero_init_context():
    m = BaseOC(16).eval()
    assert m.attn.W.weight.abs().sum() == 0 and m.attn.W.bias.abs().sum() == 0
    x = torch.randn(2, 16, 6, 5)
    assert torch.equal(m.context(x), torch.zeros_like(x))
    fused = m.conv_bn_dropout(torch.cat([torch.zeros_like(x), x], 1))
    torch.testing.assert_close(m(x), fused)
    with torch.no_grad():  # the attention parameters do not change the output at init
        for p in m.attn.f_query.parameters():
            p.add_(1.0)
    torch.testing.assert_close(m(x), fused)


def test_base_oc_defaults_follow_ocnet():
    m = BaseOC(512)
    assert m.attn.key_channels == 256 and m.attn.value_channels == 256     # OCNet: key 256, value 256
    assert m.attn.f_query[0].bias is not None and m.attn.W.bias is not None  # openseg convs keep biases
    assert m.conv_bn_dropout[2].p == 0.05 and m.scale == 1
    assert BaseOC(16, rd_ratio=1.0).attn.key_channels == 16


def test_bench_references_match_blocks():
    refs = load_bench_ref("object_context")
    m = randomise(BaseOC(16, scale=2))
    x = torch.randn(2, 16, 8, 10)
    torch.testing.assert_close(refs.REFERENCES["base_oc"][0][1](m)(x), m(x), rtol=1e-4, atol=1e-4)
    m = randomise(ObjectContextBlock(16))
    feats, logits = refs.INPUTS["ocr"](2, 16, 7, 9)
    assert logits.shape == (2, 19, 7, 9)
    ref = refs.REFERENCES["ocr"][0][1](m)
    assert any(p is q for p in ref.parameters() for q in m.parameters())  # shares the block's weights
    torch.testing.assert_close(ref(feats, logits), m(feats, logits), rtol=1e-4, atol=1e-4)


def test_base_oc_never_builds_n_by_n():
    m = randomise(BaseOC(16)).train()
    x = torch.randn(1, 16, 32, 32, requires_grad=True)
    n = 32 * 32
    with MaxNumel() as rec:
        m(x).sum().backward()
    assert rec.max_numel < n * n // 4
    with MaxNumel() as naive:
        naive_sa(m.attn, x.detach())
    assert naive.max_numel >= n * n


# ----------------------------------------------------------------------------------------------- ocr
@pytest.mark.parametrize("shape,k,scale", [((2, 8, 3, 5), 3, 1.0), ((1, 8, 2, 3), 1, 1.0), ((1, 8, 3, 2), 4, 2.5)])
def test_ocr_matches_per_pixel_loops(shape, k, scale):
    m = randomise(ObjectContextBlock(shape[1], key_channels=4, scale=scale)).double()
    feats, logits = rand(*shape), 2 * rand(shape[0], k, *shape[2:], seed=1)
    torch.testing.assert_close(m(feats, logits), naive_ocr(m, feats, logits), rtol=1e-9, atol=1e-9)


def test_spatial_gather_softmax_over_pixels():
    feats, logits = rand(2, 5, 4, 3), rand(2, 6, 4, 3, seed=1)
    regions = spatial_gather(feats, logits)
    assert regions.shape == (2, 5, 6, 1)
    probs = torch.softmax(logits.flatten(2), dim=-1)          # each class map sums to 1 over the pixels
    torch.testing.assert_close(regions[..., 0], torch.einsum("bkn,bcn->bck", probs, feats.flatten(2)))
    wrong = torch.einsum("bkn,bcn->bck", torch.softmax(logits.flatten(2), dim=1), feats.flatten(2))
    assert not torch.allclose(regions[..., 0], wrong)         # not a softmax over the classes
    # one class concentrated on a single pixel gathers that pixel's features
    logits = torch.full((1, 1, 4, 3), -1e4, dtype=torch.float64)
    logits[0, 0, 2, 1] = 0
    torch.testing.assert_close(spatial_gather(feats[:1], logits)[0, :, 0, 0], feats[0, :, 2, 1])


def test_ocr_registry_and_defaults():
    entry = get_attn_entry("ocr")
    assert entry.kind == HEAD and entry.family == "object_context" and "1909.11065" in entry.paper
    m = lit_attn.create_attn("ocr", 512)
    assert isinstance(m, ObjectContextBlock)
    sa = m.object_context_block
    assert sa.key_channels == 256 and sa.value_channels == 256 and sa.out_channels == 512   # OCRNet: key 256
    assert isinstance(sa.f_value, nn.Sequential) and isinstance(sa.W, nn.Sequential)      # f_down, f_up conv-BN-ReLU
    assert m.conv_bn_dropout[0].in_channels == 1024 and m.conv_bn_dropout[2].p == 0.05
    mm = ObjectContextBlock(16, key_channels=8, bias=False, dropout=0.0, scale=2)  # mmseg OCRHead setting
    assert mm.object_context_block.f_query[0].bias is None and mm.conv_bn_dropout[0].bias is None
    assert "ocr" not in lit_attn.list_attn(kind=GLOBAL)
    b = get_attn_entry("base_oc")
    assert b.kind == GLOBAL and b.family == "object_context" and "1809.00916" in b.paper


@pytest.mark.parametrize("shape,k", [((2, 16, 7, 9), 19), ((1, 16, 1, 1), 19), ((3, 16, 2, 13), 1), ((1, 16, 5, 3), 7)])
def test_ocr_shapes(shape, k):
    m = randomise(ObjectContextBlock(16))
    out = m(torch.randn(shape), torch.randn(shape[0], k, *shape[2:]))
    assert out.shape == shape and torch.isfinite(out).all()


def test_ocr_bf16_autocast_and_channels_last():
    m = randomise(ObjectContextBlock(16), std=0.2)
    feats, logits = torch.randn(2, 16, 12, 10), 3 * torch.randn(2, 19, 12, 10)
    ref = m(feats, logits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(feats, logits)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).norm() / ref.norm() < 5e-2
    cl = m(feats.to(memory_format=torch.channels_last), logits.to(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)


def test_ocr_torch_compile():
    m = randomise(ObjectContextBlock(8))
    feats, logits = torch.randn(2, 8, 5, 7), torch.randn(2, 3, 5, 7)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)  # one graph; inductor left to the heads' tests
    torch.testing.assert_close(compiled(feats, logits), m(feats, logits), rtol=1e-4, atol=1e-4)


def test_ocr_gradients_reach_every_parameter():
    m = randomise(ObjectContextBlock(8)).train()
    feats = torch.randn(2, 8, 5, 7, requires_grad=True)
    logits = torch.randn(2, 4, 5, 7, requires_grad=True)
    (m(feats, logits) * torch.randn(2, 8, 5, 7)).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert feats.grad.abs().sum() > 0 and logits.grad.abs().sum() > 0   # the region logits get a gradient


def test_ocr_meta_device_and_kwargs():
    m = ObjectContextBlock(16, device="meta")
    assert all(p.device.type == "meta" for p in m.parameters())
    m = ObjectContextBlock(16, act_layer="silu", dtype=torch.float64)
    assert isinstance(m.conv_bn_dropout[1][1], nn.SiLU) and m.conv_bn_dropout[0].weight.dtype == torch.float64


def test_errors():
    m = ObjectContextBlock(8)
    feats = torch.randn(2, 8, 5, 7)
    with pytest.raises(ValueError, match="ObjectContextBlock.*C=8"):
        m(torch.randn(2, 4, 5, 7), torch.randn(2, 3, 5, 7))
    with pytest.raises(ValueError, match="ObjectContextBlock.*region_logits"):
        m(feats, torch.randn(2, 3, 35))
    with pytest.raises(ValueError, match="ObjectContextBlock.*H=5, W=7"):
        m(feats, torch.randn(2, 3, 10, 14))
    with pytest.raises(ValueError, match="ObjectContextBlock.*B=2"):
        m(feats, torch.randn(1, 3, 5, 7))
    with pytest.raises(ValueError, match="ObjectContextBlock.*K>=1"):
        m(feats, torch.randn(2, 0, 5, 7))
    with pytest.raises(ValueError, match="ObjectContextBlock"):
        m(feats, None)
    with pytest.raises(ValueError, match="ObjectContextBlock"):
        ObjectContextBlock(8, key_channels=0)
    with pytest.raises(ValueError, match="BaseOC"):
        BaseOC(8, scale=0)
    with pytest.raises(ValueError, match="BaseOC"):
        BaseOC(8, rd_ratio=0)
    with pytest.raises(ValueError, match="SelfAttentionBlock"):
        SelfAttentionBlock(8, 4, 0)
    with pytest.raises(ValueError, match="BaseOC"):
        BaseOC(8)(torch.randn(1, 8, 0, 4))
