"""PSAHead and APCHead (lit_attn/heads/psa.py, apc.py) against mmsegmentation's PSAHead / APCHead.

Parameter counts at R-50-D8 (in 2048, channels 512, 19 classes) are written out layer by layer from mmseg's
`psa_head.py` / `apc_head.py` (@3f8d34e) and the `psanet_r50-d8.py` / `apcnet_r50-d8.py` configs. PSAHead's
forward is checked against a transcription of mmseg's `PSAHead.forward` with its own PSAMask written here
from mmcv's CPU kernel (`psamask_{collect,distribute}_forward`: a zero buffer, each pixel's mask window
[hstart, hend) x [wstart, wend) copied in), and against lit_attn's `psanet` block (the same maths, written
independently). What mmcv / mmseg do on maps larger than the mask window and on odd sizes is pinned:

- larger than the window (shrunk H' > (mask_h - 1)//2 + 1, e.g. mmseg's Cityscapes 64 x 128 features,
  shrunk to 32 x 64, against the 97 x 97 mask): mmcv leaves those buffer entries at 0, so after the
  softmax over dim 1 they are attended with logit 0, weight exp(0) / Z, not excluded;
- odd sizes: both sides odd (61 x 45) -> shrunk ((H-1)//2 + 1, (W-1)//2 + 1) = 31 x 23 with
  align_corners=True for both resizes; one side even (64 x 45) -> (H//2, W//2) = 32 x 22, align_corners=False;
  mmcv's PSAMask takes any H', W' (it only asserts channels == mask_h * mask_w). `proj` (1x1, padding=1)
  returns (H'+2, W'+2) with a constant ring ReLU(BN(0)), and the resize stretches that ring onto the border
  of the H x W map (with align_corners=True the corner pixels are exactly the ring value).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_attn.heads.apc import APCHead
from lit_attn.heads.fcn import ConvModule
from lit_attn.heads.psa import PSAHead
from lit_attn.layers.acm import ACM
from lit_attn.layers.psanet import PointwiseSpatialAttention


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def randomise(m: nn.Module, seed: int = 0, std: float = 0.3) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
        for name, b in m.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.2)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g, dtype=b.dtype) + 0.5)
    return m


def conv_module(cin, cout, k, norm=nn.BatchNorm2d):
    """mmcv ConvModule parameters: conv without bias (a norm follows) + norm weight and bias."""
    return k * k * cin * cout + 2 * cout


# -------------------------------------------------------------------------------- mmseg / mmcv reference
def mmcv_psamask(mask: torch.Tensor, psa_type: str, mask_h: int, mask_w: int) -> torch.Tensor:
    """mmcv's CPU PSAMask forward: zero (N, H*W, H, W) buffer; for each pixel (h, w) its mask window
    [hstart, hend) x [wstart, wend) goes to (hidx + h - half_h, widx + w - half_w): "collect" writes
    buffer[pos, h, w], "distribute" buffer[h * W + w, pos]."""
    n, _, hf, wf = mask.shape
    half_h, half_w = (mask_h - 1) // 2, (mask_w - 1) // 2
    m = mask.view(n, mask_h, mask_w, hf, wf)
    buf = mask.new_zeros(n, hf, wf, hf * wf) if psa_type == "collect" else mask.new_zeros(n, hf * wf, hf, wf)
    for h in range(hf):
        for w in range(wf):
            hs, he = max(0, half_h - h), min(mask_h, hf + half_h - h)
            ws, we = max(0, half_w - w), min(mask_w, wf + half_w - w)
            rows, cols = slice(hs + h - half_h, he + h - half_h), slice(ws + w - half_w, we + w - half_w)
            if psa_type == "collect":
                buf[:, rows, cols, h * wf + w] = m[:, hs:he, ws:we, h, w]
            else:
                buf[:, h * wf + w, rows, cols] = m[:, hs:he, ws:we, h, w]
    return buf.reshape(n, hf * wf, hf, wf)


def mmseg_psa_features(head: PSAHead, x: torch.Tensor) -> torch.Tensor:
    """mmseg's PSAHead.forward (@3f8d34e) up to the bottleneck, line by line, on the head's layers."""
    identity, align_corners = x, False
    branches = ([(head.reduce, head.attention, "collect"), (head.reduce_p, head.attention_p, "distribute")]
                if head.psa_type == "bi-direction" else [(head.reduce, head.attention, head.psa_type)])
    outs = []
    for reduce, attention, psa_type in branches:
        out = reduce(x)
        n, c, h, w = out.size()
        s = head.shrink_factor
        if s != 1:
            if h % s and w % s:
                h, w, align_corners = (h - 1) // s + 1, (w - 1) // s + 1, True
            else:
                h, w, align_corners = h // s, w // s, False
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=align_corners)
        y = mmcv_psamask(attention(out), psa_type, *head.mask_size)
        if head.psa_softmax:
            y = F.softmax(y, dim=1)
        outs.append(torch.bmm(out.view(n, c, h * w), y.view(n, h * w, h * w)).view(n, c, h, w)
                    * (1.0 / head.normalization_factor))
    out = head.proj(torch.cat(outs, 1))
    out = F.interpolate(out, size=identity.shape[2:], mode="bilinear", align_corners=align_corners)
    return head.bottleneck(torch.cat((identity, out), dim=1))


# ------------------------------------------------------------------------------------ parameter counts
def test_psa_head_param_count_r50_d8():
    cin, ch, k, mask = 2048, 512, 19, 97 * 97
    branch = (conv_module(cin, ch, 1)                # reduce: 1x1 2048 -> 512 + BN
              + conv_module(ch, ch, 1)               # attention[0]: 1x1 512 -> 512 + BN
              + ch * mask)                           # attention[1]: 1x1 512 -> 97*97, bias=False
    expected = (2 * branch                           # collect (reduce, attention) + distribute (reduce_p, attention_p)
                + conv_module(2 * ch, cin, 1)        # proj: 1x1 1024 -> 2048 + BN (padding=1)
                + conv_module(2 * cin, ch, 3)        # bottleneck: 3x3 (2048 + 2048) -> 512 + BN
                + ch * k + k)                        # conv_seg: 1x1 512 -> 19 with bias
    assert expected == 33_246_739
    head = PSAHead(cin, ch, k)
    assert n_params(head) == expected
    assert (head.mask_size, head.psa_type, head.shrink_factor, head.normalization_factor, head.psa_softmax,
            head.compact) == ((97, 97), "bi-direction", 2, 1.0, True, False)


def test_apc_head_param_count_r50_d8():
    cin, ch, k, scales = 2048, 512, 19, (1, 2, 3, 6)

    def acm(s):
        return (conv_module(cin, ch, 1)              # pooled_redu_conv: 1x1 2048 -> 512 + BN
                + conv_module(cin, ch, 1)            # input_redu_conv: 1x1 2048 -> 512 + BN
                + conv_module(ch, ch, 1)             # global_info: 1x1 512 -> 512 + BN
                + ch * s * s + s * s                 # gla: nn.Conv2d 512 -> s^2, with bias
                + conv_module(ch, ch, 1)             # residual_conv: 1x1 512 -> 512 + BN
                + conv_module(ch, ch, 1))            # fusion_conv (fusion=True): 1x1 512 -> 512 + BN

    expected = (sum(acm(s) for s in scales)
                + conv_module(cin + len(scales) * ch, ch, 3)   # bottleneck: 3x3 (2048 + 4*512) -> 512 + BN
                + ch * k + k)                                  # conv_seg
    assert expected == 30_465_605
    head = APCHead(cin, ch, k)
    assert n_params(head) == expected
    assert head.pool_scales == (1, 2, 3, 6) and head.fusion


# ------------------------------------------------------------------------------------ structure / keys
def test_psa_head_structure_and_mmseg_keys():
    head = PSAHead(16, 8, 3, mask_size=(5, 7))
    keys = {k.rsplit(".", 1)[0] for k in head.state_dict()}
    assert keys == {"reduce.conv", "reduce.bn", "attention.0.conv", "attention.0.bn", "attention.1",
                    "reduce_p.conv", "reduce_p.bn", "attention_p.0.conv", "attention_p.0.bn", "attention_p.1",
                    "proj.conv", "proj.bn", "bottleneck.conv", "bottleneck.bn", "conv_seg"}
    for m, cin, cout, k, pad in [(head.reduce, 16, 8, 1, 0), (head.attention[0], 8, 8, 1, 0),
                                 (head.proj, 16, 16, 1, 1), (head.bottleneck, 32, 8, 3, 1)]:
        assert isinstance(m, ConvModule) and isinstance(m.bn, nn.BatchNorm2d) and isinstance(m.act, nn.ReLU)
        c = m.conv
        assert (c.in_channels, c.out_channels, c.kernel_size, c.padding, c.bias) == (cin, cout, (k, k), (pad, pad),
                                                                                     None)
    mask_conv = head.attention_p[1]
    assert type(mask_conv) is nn.Conv2d and mask_conv.out_channels == 35 and mask_conv.bias is None
    assert isinstance(head.dropout, nn.Dropout2d) and head.dropout.p == 0.1
    assert head.conv_seg.kernel_size == (1, 1) and head.conv_seg.bias is not None
    single = PSAHead(16, 8, 3, mask_size=5, psa_type="collect")
    assert not hasattr(single, "reduce_p") and single.proj.conv.in_channels == 8


def test_apc_head_structure_and_mmseg_keys():
    head = APCHead(16, 8, 3, pool_scales=(1, 3))
    assert [type(m) for m in head.acm_modules] == [ACM, ACM] and head.attention_modules() == tuple(head.acm_modules)
    assert [(m.channels, m.out_channels, m.pool_scale, m.fusion) for m in head.acm_modules] == [
        (16, 8, 1, True), (16, 8, 3, True)]
    assert head.acm_modules[1].gla.out_channels == 9 and head.acm_modules[1].gla.bias is not None
    keys = {k.rsplit(".", 1)[0] for k in head.state_dict()}
    acm = {f"{c}.{n}" for c in ("pooled_redu_conv", "input_redu_conv", "global_info", "residual_conv", "fusion_conv")
           for n in ("conv", "bn")} | {"gla"}
    assert keys == {f"acm_modules.{i}.{a}" for i in (0, 1) for a in acm} | {"bottleneck.conv", "bottleneck.bn",
                                                                           "conv_seg"}
    b = head.bottleneck
    assert isinstance(b, ConvModule) and isinstance(b.bn, nn.BatchNorm2d) and isinstance(b.act, nn.ReLU)
    assert (b.conv.in_channels, b.conv.kernel_size, b.conv.padding, b.conv.bias) == (16 + 2 * 8, (3, 3), (1, 1), None)
    assert isinstance(head.dropout, nn.Dropout2d) and head.dropout.p == 0.1
    no_fusion = APCHead(16, 8, 3, fusion=False)              # mmseg: no fusion_conv; here a parameter-free Identity
    assert isinstance(no_fusion.acm_modules[0].fusion_conv, nn.Identity)
    assert n_params(no_fusion) == n_params(APCHead(16, 8, 3)) - 4 * conv_module(8, 8, 1)


def test_sync_batchnorm():
    apc = APCHead(16, 8, 3, norm_layer=nn.SyncBatchNorm)
    assert isinstance(apc.bottleneck.bn, nn.SyncBatchNorm)
    assert all(isinstance(m.input_redu_conv.bn, nn.SyncBatchNorm) for m in apc.acm_modules)
    assert not any(type(m) is nn.BatchNorm2d for m in apc.modules())
    psa = PSAHead(16, 8, 3, mask_size=5, norm_layer="syncbn")
    assert isinstance(psa.reduce.bn, nn.SyncBatchNorm) and isinstance(psa.attention_p[0].bn, nn.SyncBatchNorm)


# ------------------------------------------------------------------------------------------- PSAHead maths
PSA_CASES = [  # (H, W), mask_size, kwargs: inside / larger than the mask window, odd / even / mixed sizes
    ((8, 8), (7, 7), {}),                      # shrunk 4 x 4 inside the 7 x 7 window
    ((7, 5), (5, 5), {}),                      # odd: 4 x 3, align_corners=True
    ((61, 45), (9, 7), {}),                    # odd, larger than the window: 31 x 23 against half-sizes 4, 3
    ((12, 9), (4, 6), {}),                     # mixed parity -> 6 x 4, even mask (one more row down / right)
    ((10, 14), (5, 5), {"psa_type": "collect"}),
    ((9, 9), (3, 5), {"psa_type": "distribute"}),
    ((6, 7), (5, 5), {"shrink_factor": 1}),
    ((1, 1), (3, 3), {}),
    ((7, 7), (5, 5), {"normalization_factor": None, "psa_softmax": False}),
]


@pytest.mark.parametrize("hw, mask_size, kw", PSA_CASES)
def test_psa_head_matches_mmseg_forward(hw, mask_size, kw):
    head = randomise(PSAHead(6, 4, 3, mask_size=mask_size, **kw).double()).eval()
    x = torch.randn(2, 6, *hw, dtype=torch.float64)
    feats = head.forward_features(x)
    torch.testing.assert_close(feats, mmseg_psa_features(head, x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(head(x), head.conv_seg(feats))


def test_psa_head_agrees_with_psanet_block():
    """The head (PSAMask + mmseg's softmax over dim 1) and the `psanet` plug-in (its own point-wise logits)
    give the same bottleneck input when they share the reduce / attention / proj weights."""
    seen = {}
    for hw, mask in [((9, 7), (5, 5)), ((12, 10), (3, 7)), ((8, 9), (7, 3))]:
        block = randomise(PointwiseSpatialAttention(6, rd_channels=4, mask_size=mask).double()).eval()
        head = PSAHead(6, 4, 3, mask_size=mask).double().eval()
        missing, unexpected = head.load_state_dict(
            {k: v for k, v in block.state_dict().items() if not k.startswith("bottleneck.")}, strict=False)
        assert unexpected == [] and {k.split(".")[0] for k in missing} == {"bottleneck", "conv_seg"}
        seen.clear()
        block.bottleneck.register_forward_hook(lambda m, i, o: seen.__setitem__("block", i[0]))
        head.bottleneck.register_forward_hook(lambda m, i, o: seen.__setitem__("head", i[0]))
        x = torch.randn(2, 6, *hw, dtype=torch.float64)
        block(x), head(x)
        torch.testing.assert_close(seen["head"], seen["block"], rtol=1e-10, atol=1e-10)


def test_psa_outside_mask_window_gets_logit_zero():
    """mmcv's zero buffer: with very negative logits inside every window, each pixel's softmax puts its weight
    on the sources outside its window (logit 0), evenly; a map inside the window has no such sources."""
    head = PSAHead(4, 4, 3, mask_size=(3, 3), psa_type="collect", shrink_factor=1).double()
    hs, ws = 5, 4                                           # wider than the 3 x 3 window (half-size 1)
    feats = torch.randn(1, 4, hs, ws, dtype=torch.float64)
    mask = torch.full((1, 9, hs, ws), -60.0, dtype=torch.float64)
    out = head.attend(feats, mask, "collect").flatten(2)
    v = feats.flatten(2)
    for i in range(hs * ws):
        r, c = divmod(i, ws)
        outside = [j for j in range(hs * ws) if abs(j // ws - r) > 1 or abs(j % ws - c) > 1]
        torch.testing.assert_close(out[0, :, i], v[0][:, outside].mean(1), rtol=1e-12, atol=1e-12)
    # inside the window everything is attended with the mask's own logits (uniform here)
    inner = head.attend(feats[..., :2, :2], mask[..., :2, :2], "collect")
    torch.testing.assert_close(inner, feats[..., :2, :2].mean((2, 3), keepdim=True).expand_as(inner))


def test_psa_cityscapes_geometry_mask_97():
    """mmseg's Cityscapes 512 x 1024 crop at OS 8: 64 x 128 features, shrunk to 32 x 64 (even: align False),
    wider than the 97 x 97 window (half-size 48); the real mask size on a narrow head."""
    head = PSAHead(8, 4, 3).eval()
    assert head.shrunk_size(64, 128) == (32, 64, False)
    x = torch.randn(1, 8, 64, 128)
    feats = head.forward_features(x)
    assert feats.shape == (1, 4, 64, 128) and torch.isfinite(feats).all()
    torch.testing.assert_close(feats, mmseg_psa_features(head, x), rtol=1e-4, atol=1e-5)


def test_psa_odd_size_61x45_and_proj_ring():
    head = randomise(PSAHead(6, 4, 3, mask_size=(9, 9))).eval()
    assert head.shrunk_size(61, 45) == (31, 23, True) and head.shrunk_size(64, 45) == (32, 22, False)
    seen = {}
    head.proj.register_forward_hook(lambda m, i, o: seen.__setitem__("proj", o))
    head.bottleneck.register_forward_hook(lambda m, i, o: seen.__setitem__("cat", i[0]))
    out = head(torch.randn(1, 6, 61, 45))
    assert out.shape == (1, 3, 61, 45)
    proj, up = seen["proj"], seen["cat"][:, 6:]
    assert proj.shape[-2:] == (33, 25)                      # 31 x 23 + mmseg's padding=1 ring
    bn = head.proj.bn                                       # the ring is ReLU(BN(0))
    ring = F.relu(bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps))
    torch.testing.assert_close(proj[0, :, 0, 0], ring)
    torch.testing.assert_close(proj[0, :, -1, 5], ring)
    for r, c in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:       # align_corners=True: the corners are the ring
        torch.testing.assert_close(up[0, :, r, c], ring)
    assert head(torch.randn(1, 6, 64, 45)).shape == (1, 3, 64, 45)


@pytest.mark.parametrize("hw", [(1, 2), (2, 1), (1, 1), (2, 2), (3, 8)])
def test_psa_tiny_maps(hw):
    """mmseg fails on 1 x 2 (H // 2 = 0); the head clamps the shrunk size to 1."""
    out = PSAHead(6, 4, 3, mask_size=(3, 3)).eval()(torch.randn(1, 6, *hw))
    assert out.shape == (1, 3, *hw)


# -------------------------------------------------------------------------------------- APCHead maths
def test_apc_head_matches_mmseg_forward():
    head = randomise(APCHead(6, 4, 3, pool_scales=(1, 2, 3)).double()).eval()
    x = torch.randn(2, 6, 7, 5, dtype=torch.float64)
    ref = head.bottleneck(torch.cat([x] + [acm(x) for acm in head.acm_modules], dim=1))   # mmseg: [x, *acm outs]
    torch.testing.assert_close(head.forward_features(x), ref)
    torch.testing.assert_close(head(x), head.conv_seg(ref))
    wrong = head.bottleneck(torch.cat([acm(x) for acm in head.acm_modules] + [x], dim=1))
    assert not torch.allclose(head.forward_features(x), wrong)
    assert head(torch.randn(1, 6, 61, 45, dtype=torch.float64)).shape == (1, 3, 61, 45)   # odd size, any pool scale


# ------------------------------------------------------------------------ shapes, modes, gradients, init
HEADS = [
    lambda: PSAHead(16, 8, 5, mask_size=(7, 7)),
    lambda: PSAHead(16, 8, 5, mask_size=(5, 3), psa_type="distribute", shrink_factor=1),
    lambda: APCHead(16, 8, 5),
    lambda: APCHead(16, 8, 5, pool_scales=(2,), fusion=False),
]


@pytest.mark.parametrize("make", HEADS)
def test_shapes_modes_and_gradients(make):
    head = make()
    for shape in [(2, 16, 8, 8), (2, 16, 7, 5)]:
        head.train()
        out = head(torch.randn(*shape))
        assert isinstance(out, torch.Tensor) and out.shape == (shape[0], 5, *shape[2:])   # one loss, as mmseg
    out.square().mean().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    head.eval()
    with torch.no_grad():
        out = head(torch.randn(1, 16, 7, 5))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 5, 7, 5)
    assert head.forward_features(torch.randn(1, 16, 3, 3)).shape == (1, 8, 3, 3)


def test_init_follows_mmseg():
    torch.manual_seed(0)
    head = PSAHead(64, 128, 256, mask_size=(3, 3))
    assert head.attention_modules() == ()
    assert abs(head.bottleneck.conv.weight.std().item() - (2.0 / (128 * 9)) ** 0.5) < 0.004   # kaiming fan_out
    assert abs(head.conv_seg.weight.std().item() - 0.01) < 0.001 and not head.conv_seg.bias.any()
    assert torch.equal(head.reduce.bn.weight, torch.ones(128)) and not head.reduce.bn.bias.any()
    bound = 1 / 128 ** 0.5                                  # the mask conv keeps nn.Conv2d's default, as mmseg
    assert head.attention[1].weight.abs().max() <= bound
    apc = APCHead(16, 8, 3)
    before = {k: v.clone() for k, v in apc.acm_modules.state_dict().items()}
    apc.init_weights()                                      # the ACM blocks keep their own init
    assert all(torch.equal(before[k], v) for k, v in apc.acm_modules.state_dict().items())


def test_value_errors():
    psa, apc = PSAHead(16, 8, 3, mask_size=3), APCHead(16, 8, 3)
    for head in (psa, apc):
        for bad in (torch.randn(1, 15, 4, 4), torch.randn(16, 4, 4), torch.randn(1, 16, 0, 4)):
            with pytest.raises(ValueError, match=type(head).__name__):
                head(bad)
    for kw in [dict(mask_size=(3, 0)), dict(mask_size=(3, 3, 3)), dict(psa_type="both"), dict(compact=True),
               dict(shrink_factor=0), dict(dropout=1.0), dict(normalization_factor=0.0)]:
        with pytest.raises(ValueError, match="PSAHead"):
            PSAHead(16, 8, 3, **kw)
    for kw in [dict(pool_scales=()), dict(pool_scales=(1, 0)), dict(pool_scales=2), dict(dropout=-0.1)]:
        with pytest.raises(ValueError, match="APCHead"):
            APCHead(16, 8, 3, **kw)
    for cls in (PSAHead, APCHead):
        with pytest.raises(ValueError, match=cls.__name__):
            cls(16, 0, 3)
