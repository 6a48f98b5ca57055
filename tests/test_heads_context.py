"""ISAHead, EMAHead, OCRHead, ANNHead: mmseg R-50-D8 parameter counts by hand, mmseg forwards by hand, contract."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_attn.heads.ann import ANNHead
from lit_attn.heads.ema import EMAHead
from lit_attn.heads.fcn import ConvModule
from lit_attn.heads.isa import ISAHead
from lit_attn.heads.ocr import OCRHead

K = 19  # Cityscapes classes


def n_params(m: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable_only)


def conv(cin: int, cout: int, k: int = 1, bias: bool = False) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def bn(c: int) -> int:
    return 2 * c


def randomise(model: nn.Module) -> None:
    """Random BN statistics/affine and non-zero zero-initialised convs, so the hand forwards are sensitive."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    for name in ("fusion", "context"):  # ANN: out_project starts at zero
        blk = getattr(model, name, None)
        if isinstance(blk, nn.Module) and hasattr(blk, "out_project"):
            nn.init.normal_(blk.out_project.weight, 0, 0.2)
            nn.init.normal_(blk.out_project.bias, 0, 0.2)


# ------------------------------------------------------------------ R-50-D8 sizes: parameter counts by hand
@pytest.fixture(scope="module")
def big():
    return {"isa": ISAHead(2048, 512, K), "ema": EMAHead(2048, 256, K), "ocr": OCRHead(2048, 512, K),
            "ann": ANNHead((1024, 2048), 512, K)}


def test_isa_head_param_count_r50_d8(big):
    # mmseg isanet_r50-d8: in 2048, channels 512, isa_channels 256
    in_conv = conv(2048, 512, 3) + bn(512)                              # ConvModule 3x3, no bias + BN
    qk = conv(512, 256) + bn(256) + conv(256, 256) + bn(256)            # key/query_project: 2 ConvModules 1x1
    value = conv(512, 512, bias=True)                                   # value_project: nn.Conv2d (bias)
    output_project = conv(512, 512) + bn(512)                           # ConvModule 1x1
    relation = 2 * qk + value + output_project                          # one SelfAttentionBlock
    out_conv = conv(1024, 512) + bn(512)                                # ConvModule 1x1 on concat
    conv_seg = conv(512, K, bias=True)
    expected = in_conv + 2 * relation + out_conv + conv_seg
    assert relation == 921088 and expected == 11815443
    assert n_params(big["isa"]) == expected


def test_ema_head_param_count_r50_d8(big):
    # mmseg emanet_r50-d8: in 2048, channels 256, ema_channels 512, 64 bases (a buffer)
    ema_in_conv = conv(2048, 512, 3) + bn(512)
    ema_mid_conv = conv(512, 512, bias=True)                            # ConvModule(norm=None, act=None): bias; frozen
    ema_out_conv = conv(512, 512) + bn(512)                             # ConvModule(act=None)
    bottleneck = conv(512, 256, 3) + bn(256)
    conv_cat = conv(2048 + 256, 256, 3) + bn(256)
    conv_seg = conv(256, K, bias=True)
    expected = ema_in_conv + ema_mid_conv + ema_out_conv + bottleneck + conv_cat + conv_seg
    assert expected == 16458003
    head = big["ema"]
    # the frozen ema_mid_conv is a pair of buffers here (ema.conv1.weight / .bias: in the state dict, not among the
    # parameters, so that every parameter gets a gradient); mmseg counts it as (frozen) parameters
    frozen = head.ema.conv1.weight.numel() + head.ema.conv1.bias.numel()
    assert frozen == ema_mid_conv
    assert n_params(head) + frozen == expected
    assert n_params(head, trainable_only=True) == expected - ema_mid_conv
    assert head.ema.mu.shape == (1, 512, 64) and "ema.mu" in dict(head.named_buffers())
    assert all(p.data_ptr() != head.ema.mu.data_ptr() for p in head.parameters())


def test_ocr_head_param_count_r50_d8(big):
    # mmseg ocrnet_r50-d8 stage 2: in 2048, channels 512, ocr_channels 256 (stage 1 FCNHead not included)
    bottleneck = conv(2048, 512, 3) + bn(512)
    qk = conv(512, 256) + bn(256) + conv(256, 256) + bn(256)            # 2 ConvModules each
    value = conv(512, 256) + bn(256)                                    # value_out_norm=True: ConvModule
    out_project = conv(256, 512) + bn(512)
    oab_bottleneck = conv(1024, 512) + bn(512)                          # ObjectAttentionBlock.bottleneck 1x1
    conv_seg = conv(512, K, bias=True)
    block = 2 * qk + value + out_project + oab_bottleneck
    expected = bottleneck + block + conv_seg
    assert block == 1184256 and expected == 10632211
    assert n_params(big["ocr"]) == expected


def test_ann_head_param_count_r50_d8(big):
    # mmseg ann_r50-d8: in (1024, 2048), channels 512, project_channels 256
    afnb = (conv(1024, 256) + bn(256)                                   # key_project ConvModule (low)
            + conv(2048, 256) + bn(256)                                 # query_project ConvModule (high)
            + conv(1024, 256, bias=True)                                # value_project nn.Conv2d
            + conv(256, 2048, bias=True)                                # out_project nn.Conv2d (zero init)
            + conv(2048 + 2048, 2048) + bn(2048))                       # bottleneck ConvModule, no act
    bottleneck = conv(2048, 512, 3) + bn(512)
    apnb = (conv(512, 256) + bn(256)                                    # key_project = query_project (shared)
            + conv(512, 256, bias=True) + conv(256, 512, bias=True)
            + conv(1024, 512) + bn(512))
    conv_seg = conv(512, K, bias=True)
    expected = afnb + bottleneck + apnb + conv_seg
    assert (afnb, apnb, expected) == (9968896, 919808, 20336659)
    assert n_params(big["ann"]) == expected


# ------------------------------------------------------------------------------- structure at R-50-D8
def _conv_module(m, cin, cout, k, norm=nn.BatchNorm2d, act=True):
    assert isinstance(m, ConvModule)
    c = m.conv
    assert (c.in_channels, c.out_channels, c.kernel_size, c.padding) == (cin, cout, (k, k), (k // 2, k // 2))
    assert c.bias is None and isinstance(m.norm, norm) and hasattr(m, "act") == act


def test_structure_r50_d8(big):
    isa, ema, ocr, ann = big["isa"], big["ema"], big["ocr"], big["ann"]
    for h, c in ((isa, 512), (ema, 256), (ocr, 512), (ann, 512)):
        assert isinstance(h.dropout, nn.Dropout2d) and h.dropout.p == 0.1
        assert h.conv_seg.kernel_size == (1, 1) and (h.conv_seg.in_channels, h.conv_seg.out_channels) == (c, K)
        assert h.conv_seg.bias is not None
    # ISA
    _conv_module(isa.in_conv, 2048, 512, 3)
    blk = isa.isa
    assert blk.down_factor == (8, 8) and blk.context_first
    for sa in (blk.long_range_sa, blk.short_range_sa):
        assert sa.key_channels == 256 and sa.value_channels == 512 and math.isclose(sa.scale, 256 ** -0.5)
        assert [type(m) for m in sa.f_query] == [nn.Conv2d, nn.Sequential, nn.Conv2d, nn.Sequential]
        assert sa.f_query[0].bias is None and sa.f_key[2].in_channels == 256
        assert isinstance(sa.f_value, nn.Conv2d) and sa.f_value.bias is not None
        assert sa.W[0].bias is None and isinstance(sa.W[1][0], nn.BatchNorm2d)
    fuse = blk.conv_bn
    assert (fuse[0].in_channels, fuse[0].out_channels, fuse[0].kernel_size) == (1024, 512, (1, 1))
    assert fuse[0].bias is None and fuse[2].p == 0
    # EMA
    _conv_module(ema.ema_in_conv, 2048, 512, 3)
    u = ema.ema
    assert (u.num_bases, u.iterations, u.momentum, u.norm_batch_bases) == (64, 3, 0.9, True)
    assert u.conv1.kernel_size == (1, 1) and u.conv1.bias is not None
    assert not u.conv1.weight.requires_grad and not u.conv1.bias.requires_grad
    assert torch.count_nonzero(u.conv1.bias) == 0                       # mmseg ConvModule init of ema_mid_conv
    assert u.conv2[0].bias is None and isinstance(u.conv2[1], nn.BatchNorm2d)
    assert ema.no_grad_params == ("ema.conv1.weight", "ema.conv1.bias")
    _conv_module(ema.bottleneck, 512, 256, 3)
    _conv_module(ema.conv_cat, 2048 + 256, 256, 3)
    # OCR
    _conv_module(ocr.bottleneck, 2048, 512, 3)
    sa = ocr.ocr.object_context_block
    assert sa.key_channels == 256 and math.isclose(sa.scale, 256 ** -0.5) and ocr.ocr.scale == 1
    assert (sa.f_value[0].in_channels, sa.f_value[0].out_channels) == (512, 256) and sa.f_value[0].bias is None
    assert (sa.W[0].in_channels, sa.W[0].out_channels) == (256, 512)
    assert ocr.ocr.conv_bn_dropout[0].in_channels == 1024 and ocr.ocr.conv_bn_dropout[2].p == 0
    # ANN
    f, c = ann.fusion, ann.context
    assert (f.low_channels, f.channels, f.key_channels, f.value_channels, f.out_channels) == (1024, 2048, 256, 256,
                                                                                              2048)
    assert f.pool_sizes == c.pool_sizes == (1, 3, 6, 8)
    assert isinstance(f.dropout, nn.Identity) and isinstance(c.dropout, nn.Identity)
    assert f.bottleneck.conv.in_channels == 4096 and not hasattr(f.bottleneck, "act")
    assert c.query_project is c.key_project and c.key_channels == 256 and c.bottleneck.conv.in_channels == 1024
    assert isinstance(c.bottleneck.act, nn.ReLU)
    _conv_module(ann.bottleneck, 2048, 512, 3)


# ------------------------------------------------------------------------- mmseg forwards, written by hand
def _mmseg_sa(sa, query_feats, key_feats):
    """mmseg SelfAttentionBlock.forward (matmul_norm=True) with the block's projections."""
    b = query_feats.shape[0]
    q = sa.f_query(query_feats).reshape(b, sa.key_channels, -1).permute(0, 2, 1)
    k = sa.f_key(key_feats).reshape(b, sa.key_channels, -1)
    v = sa.f_value(key_feats).reshape(b, sa.value_channels, -1).permute(0, 2, 1)
    sim = F.softmax(sa.key_channels ** -0.5 * torch.matmul(q, k), dim=-1)
    ctx = torch.matmul(sim, v).permute(0, 2, 1).reshape(b, -1, *query_feats.shape[2:])
    return sa.W(ctx)


def mmseg_isa(head: ISAHead, x_):
    """mmseg ISAHead.forward, line by line."""
    x = head.in_conv(x_)
    residual = x
    n, c, h, w = x.size()
    loc_h, loc_w = head.isa.down_factor
    glb_h, glb_w = math.ceil(h / loc_h), math.ceil(w / loc_w)
    pad_h, pad_w = glb_h * loc_h - h, glb_w * loc_w - w
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    x = x.view(n, c, glb_h, loc_h, glb_w, loc_w).permute(0, 3, 5, 1, 2, 4).reshape(-1, c, glb_h, glb_w)
    x = _mmseg_sa(head.isa.long_range_sa, x, x)
    x = x.view(n, loc_h, loc_w, c, glb_h, glb_w).permute(0, 4, 5, 3, 1, 2).reshape(-1, c, loc_h, loc_w)
    x = _mmseg_sa(head.isa.short_range_sa, x, x)
    x = x.view(n, glb_h, glb_w, c, loc_h, loc_w).permute(0, 3, 1, 4, 2, 5).reshape(n, c, glb_h * loc_h, glb_w * loc_w)
    x = x[:, :, pad_h // 2:pad_h // 2 + h, pad_w // 2:pad_w // 2 + w]
    x = head.isa.conv_bn(torch.cat([x, residual], dim=1))               # out_conv(cat([x, residual]))
    return head.cls_seg(x)


def mmseg_ema(head: EMAHead, x, momentum: float):
    """mmseg EMAHead.forward + EMAModule.forward; returns (logits, the bases buffer mmseg would store)."""
    feats = head.ema_in_conv(x)
    identity = feats
    feats = head.ema.conv1(feats)                                       # ema_mid_conv
    b, c, h, w = feats.shape
    feats = feats.view(b, c, h * w)
    bases = head.ema.mu.repeat(b, 1, 1)
    with torch.no_grad():
        for _ in range(head.ema.iterations):
            attention = F.softmax(torch.einsum("bcn,bck->bnk", feats, bases), dim=2)
            attention_normed = F.normalize(attention, dim=1, p=1)
            bases = F.normalize(torch.einsum("bcn,bnk->bck", feats, attention_normed), dim=1, p=2)
    recon = torch.einsum("bck,bnk->bcn", bases, attention).view(b, c, h, w)
    new_bases = F.normalize(bases.mean(dim=0, keepdim=True), dim=1, p=2)
    stored = (1 - momentum) * head.ema.mu + momentum * new_bases
    recon = head.ema.conv2(F.relu(recon))                               # ema_out_conv
    out = head.bottleneck(F.relu(identity + recon))
    out = head.conv_cat(torch.cat([x, out], dim=1))
    return head.cls_seg(out), stored


def mmseg_ocr(head: OCRHead, x, prev_output):
    """mmseg OCRHead.forward (SpatialGatherModule, ObjectAttentionBlock), scale 1."""
    feats = head.bottleneck(x)
    b, k, h, w = prev_output.shape
    probs = F.softmax(prev_output.view(b, k, -1), dim=2)
    ocr_context = torch.matmul(probs, feats.view(b, feats.shape[1], -1).permute(0, 2, 1))
    ocr_context = ocr_context.permute(0, 2, 1).contiguous().unsqueeze(3)
    context = _mmseg_sa(head.ocr.object_context_block, feats, ocr_context)
    out = head.ocr.conv_bn_dropout(torch.cat([context, feats], dim=1))  # ObjectAttentionBlock.bottleneck
    return head.cls_seg(out)


def _ppm(t, scales):
    return torch.cat([F.adaptive_avg_pool2d(t, s).view(*t.shape[:2], -1) for s in scales], dim=2)


def _mmseg_ann_sa(blk, query_feats, key_feats):
    b = query_feats.shape[0]
    q = blk.query_project(query_feats).reshape(b, blk.key_channels, -1).permute(0, 2, 1)
    k = _ppm(blk.key_project(key_feats), blk.pool_sizes)
    v = _ppm(blk.value_project(key_feats), blk.pool_sizes).permute(0, 2, 1)
    sim = F.softmax(blk.key_channels ** -0.5 * torch.matmul(q, k), dim=-1)
    ctx = torch.matmul(sim, v).permute(0, 2, 1).reshape(b, -1, *query_feats.shape[2:])
    return blk.out_project(ctx)


def mmseg_ann(head: ANNHead, low, high):
    """mmseg ANNHead.forward (AFNB, dropout, bottleneck, APNB, cls_seg)."""
    out = head.fusion.bottleneck(torch.cat([_mmseg_ann_sa(head.fusion, high, low), high], 1))
    out = head.bottleneck(head.dropout(out))
    out = head.context.bottleneck(torch.cat([_mmseg_ann_sa(head.context, out, out), out], 1))
    return head.cls_seg(out)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("size,down", [((7, 5), (3, 2)), ((6, 4), (3, 2)), ((5, 9), (8, 8))])
def test_isa_head_matches_mmseg_forward(size, down, train):
    head = ISAHead(12, 8, 3, isa_channels=4, down_factor=down, dropout=0.0)
    randomise(head)
    head.train(train)
    ref_head = copy.deepcopy(head)
    x = torch.randn(2, 12, *size)
    torch.testing.assert_close(head(x), mmseg_isa(ref_head, x), atol=1e-5, rtol=1e-4)
    if train:  # the norms saw the same pixels (padding included) as mmseg's regrouped batch
        for a, b in zip(head.buffers(), ref_head.buffers(), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("train", [False, True])
def test_ema_head_matches_mmseg_forward_and_bases_update(train):
    head = EMAHead(10, 6, 3, ema_channels=8, num_bases=5, momentum=0.1, dropout=0.0)
    randomise(head)
    head.train(train)
    ref_head = copy.deepcopy(head)
    x = torch.randn(2, 10, 7, 5)
    ref, stored = mmseg_ema(ref_head, x, momentum=0.1)
    torch.testing.assert_close(head(x), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(head.ema.mu, stored if train else ref_head.ema.mu, atol=1e-5, rtol=1e-4)
    assert train == (not torch.equal(head.ema.mu, ref_head.ema.mu))


def test_ocr_head_matches_mmseg_forward():
    head = OCRHead(12, 8, 3, ocr_channels=4, dropout=0.0).eval()
    randomise(head)
    x, prev = torch.randn(2, 12, 7, 5), torch.randn(2, 5, 7, 5)         # any number of region classes
    torch.testing.assert_close(head(x, prev), mmseg_ocr(head, x, prev), atol=1e-5, rtol=1e-4)


def test_ann_head_matches_mmseg_forward():
    head = ANNHead((6, 12), 8, 3, project_channels=4, dropout=0.0).eval()
    randomise(head)
    x3, x4 = torch.randn(2, 6, 9, 10), torch.randn(2, 12, 9, 10)
    torch.testing.assert_close(head(x3, x4), mmseg_ann(head, x3, x4), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------- the contract
def small_heads():
    return {"isa": (ISAHead(16, 8, 3, isa_channels=4), 1),
            "ema": (EMAHead(16, 8, 3, ema_channels=12, num_bases=6), 1),
            "ocr": (OCRHead(16, 8, 3, ocr_channels=4), 2),
            "ann": (ANNHead((6, 16), 8, 3, project_channels=4), 2)}


def _inputs(kind, b, h, w):
    x = torch.randn(b, 16, h, w)
    if kind == "ocr":
        return x, torch.randn(b, 3, h, w, requires_grad=True)
    if kind == "ann":
        return torch.randn(b, 6, h, w), x
    return (x,)


@pytest.mark.parametrize("kind", ["isa", "ema", "ocr", "ann"])
@pytest.mark.parametrize("shape", [(2, 8, 8), (1, 7, 5), (1, 1, 1), (3, 9, 2)])
def test_output_shapes_train_and_eval(kind, shape):
    head, _ = small_heads()[kind]
    inputs = _inputs(kind, *shape)
    for train in (True, False) if shape[0] * shape[1] * shape[2] > 1 else (False,):  # BN: > 1 value to train
        head.train(train)
        out = head(*inputs)
        assert isinstance(out, torch.Tensor) and out.shape == (shape[0], 3, *shape[1:])  # one loss: no tuple
        assert torch.isfinite(out).all()
        assert head.forward_features(*inputs).shape == (shape[0], 8, *shape[1:])


@pytest.mark.parametrize("kind", ["isa", "ema", "ocr", "ann"])
def test_gradients_reach_parameters(kind):
    head, _ = small_heads()[kind]
    head.train()
    inputs = _inputs(kind, 2, 7, 5)
    head(*inputs).square().mean().backward()
    frozen = set(getattr(head, "no_grad_params", ()))
    for name, p in head.named_parameters():
        if name in frozen:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for m in (head.conv_seg.weight, head.conv_seg.bias):
        assert m.grad.abs().sum() > 0
    if kind == "ocr":  # mmseg does not detach the stage-1 logits: the OCR loss trains stage 1 too
        assert inputs[1].grad is not None and inputs[1].grad.abs().sum() > 0


def test_init_weights_and_block_init_kept():
    torch.manual_seed(0)
    head = ANNHead((6, 16), 8, 3)
    assert torch.count_nonzero(head.fusion.out_project.weight) == 0  # the blocks' zero init survives
    assert torch.count_nonzero(head.context.out_project.weight) == 0
    isa = ISAHead(16, 8, 3)
    assert isa.conv_seg.weight.std() < 0.05 and torch.count_nonzero(isa.conv_seg.bias) == 0
    assert torch.equal(isa.in_conv.bn.weight, torch.ones(8))
    assert set(isa.attention_modules()) == {isa.isa}


def test_ocr_region_logits_resized():
    head = OCRHead(16, 8, 3, ocr_channels=4).eval()
    out = head(torch.randn(1, 16, 6, 4), torch.randn(1, 3, 12, 8))
    assert out.shape == (1, 3, 6, 4)


def test_sync_bn_norm_layer():
    head = ANNHead((6, 16), 8, 3, project_channels=4, norm_layer="syncbn")
    assert isinstance(head.bottleneck.bn, nn.SyncBatchNorm)
    bns = [m for m in head.context.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert bns and all(type(m) is nn.SyncBatchNorm for m in bns)
    assert sum(isinstance(m, nn.ReLU) for m in head.context.modules()) == 2  # the activations are kept
    isa = ISAHead(16, 8, 3, isa_channels=4, norm_layer="syncbn")
    assert isinstance(isa.isa.long_range_sa.f_query[1][0], nn.SyncBatchNorm)


@pytest.mark.parametrize("kind", ["isa", "ema", "ocr", "ann"])
def test_bad_inputs_raise_value_error_naming_the_head(kind):
    head, _ = small_heads()[kind]
    name = type(head).__name__
    good = _inputs(kind, 1, 5, 5)
    bad_channels = list(good)
    idx = 1 if kind == "ann" else 0
    bad_channels[idx] = torch.randn(1, 15, 5, 5)
    with pytest.raises(ValueError, match=name):
        head(*bad_channels)
    bad_rank = list(good)
    bad_rank[idx] = torch.randn(16, 5, 5)
    with pytest.raises(ValueError, match=name):
        head(*bad_rank)
    if kind in ("ocr", "ann"):
        other = list(good)
        other[1 - idx] = torch.randn(2, *good[1 - idx].shape[1:])      # batch mismatch
        with pytest.raises(ValueError, match=name):
            head(*other)
    if kind == "ocr":
        with pytest.raises(ValueError, match=name):
            head(good[0], torch.randn(1, 3, 5))


@pytest.mark.parametrize("build", [
    lambda: ISAHead(16, 0, 3), lambda: ISAHead(16, 8, 3, isa_channels=0), lambda: ISAHead(16, 8, 3, dropout=1.0),
    lambda: EMAHead(16, 8, 3, momentum=1.5), lambda: EMAHead(16, 8, 3, num_stages=0),
    lambda: OCRHead(16, 8, 0), lambda: OCRHead(16, 8, 3, scale=0),
    lambda: ANNHead(16, 8, 3), lambda: ANNHead((6, 16, 4), 8, 3), lambda: ANNHead((6, 16), 8, 3, query_scales=(1, 2)),
])
def test_bad_arguments(build):
    with pytest.raises(ValueError):
        build()
