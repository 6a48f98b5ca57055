"""Attention Augmented Convolution (arXiv 1904.09925): values against a literal port of the paper's
TensorFlow listing (explicit (B, Nh, N, N) logits, `rel_to_abs` pad-flatten-reshape-slice), relative
logits by hand, size handling, gradients, and the timm model `aa_resnet50`."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import lit_attn
from lit_attn.layers.aa_conv import AugmentedConv2d, relative_index
from lit_attn.models.aa_resnet import AAResNet

# ---------------------------------------------------------------- naive reference: the paper's TF code


def tf_rel_to_abs(x):
    """[B, Nh, L, 2L-1] relative -> [B, Nh, L, L] absolute, as the listing: pad, flatten, reshape, slice."""
    b, nh, length, _ = x.shape
    x = torch.cat([x, x.new_zeros(b, nh, length, 1)], 3)
    flat_x = x.reshape(b, nh, length * 2 * length)
    flat_x_padded = torch.cat([flat_x, x.new_zeros(b, nh, length - 1)], 2)
    final_x = flat_x_padded.reshape(b, nh, length + 1, 2 * length - 1)
    return final_x[:, :, :length, length - 1:]


def tf_relative_logits_1d(q, rel_k, h, w, nh, transpose_mask):
    rel_logits = torch.einsum("bhxyd,md->bhxym", q, rel_k)
    rel_logits = rel_logits.reshape(-1, nh * h, w, 2 * w - 1)
    rel_logits = tf_rel_to_abs(rel_logits)
    rel_logits = rel_logits.reshape(-1, nh, h, w, w)
    rel_logits = rel_logits.unsqueeze(3).repeat(1, 1, 1, h, 1, 1)  # tf.tile
    rel_logits = rel_logits.permute(*transpose_mask)
    return rel_logits.reshape(-1, nh, h * w, h * w)


def tf_relative_logits(q, h, w, nh, r_width, r_height):
    rel_logits_w = tf_relative_logits_1d(q, r_width, h, w, nh, [0, 1, 2, 4, 3, 5])
    rel_logits_h = tf_relative_logits_1d(q.permute(0, 1, 3, 2, 4), r_height, w, h, nh, [0, 1, 4, 2, 5, 3])
    return rel_logits_h, rel_logits_w


def tf_self_attention_2d(layer, x, r_width=None, r_height=None):
    """The listing's `self_attention_2d` (NHWC) with the layer's 1x1 convs and the given tables."""
    inputs = x.permute(0, 2, 3, 1)
    b, h, w, _ = inputs.shape
    nh, dk, dv = layer.num_heads, layer.dk, layer.dv
    dkh, dvh = dk // nh, dv // nh

    def conv1x1(t, conv):  # NHWC 1x1 conv with the layer's weights
        return torch.einsum("bhwc,oc->bhwo", t, conv.weight[:, :, 0, 0]) + conv.bias

    def split_heads_2d(t):
        return t.reshape(b, h, w, nh, t.shape[-1] // nh).permute(0, 3, 1, 2, 4)

    kqv = conv1x1(inputs, layer.qkv)
    k, q, v = kqv.split([dk, dk, dv], 3)
    q = q * dkh ** -0.5
    q, k, v = split_heads_2d(q), split_heads_2d(k), split_heads_2d(v)
    logits = q.reshape(b, nh, h * w, dkh) @ k.reshape(b, nh, h * w, dkh).transpose(-1, -2)  # (B, Nh, N, N)
    if layer.relative:
        rel_logits_h, rel_logits_w = tf_relative_logits(q, h, w, nh, r_width, r_height)
        logits = logits + rel_logits_h + rel_logits_w
    weights = logits.softmax(-1)
    attn_out = weights @ v.reshape(b, nh, h * w, dvh)
    attn_out = attn_out.reshape(b, nh, h, w, dvh).permute(0, 2, 3, 1, 4).reshape(b, h, w, nh * dvh)
    return conv1x1(attn_out, layer.proj).permute(0, 3, 1, 2)


def central_tables(layer, h, w):
    """The (2H-1, dkh) / (2W-1, dkh) rows of the layer's tables for an (h, w) grid."""
    th, tw = layer.feat_size
    return layer.r_width[tw - w: tw + w - 1], layer.r_height[th - h: th + h - 1]


def make(in_ch=16, out_ch=24, *, feat_size=(5, 7), dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"num_heads": 2, "dk": 8, "dv": 6, **kw}
    return AugmentedConv2d(in_ch, out_ch, feat_size=feat_size, **kw).to(dtype)


# ---------------------------------------------------------------- layer values vs the listing


@pytest.mark.parametrize("feat_size", [(5, 7), (9, 8)], ids=["table=input", "table>input"])
def test_matches_tf_listing(feat_size):
    layer = make(feat_size=feat_size)
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    r_width, r_height = central_tables(layer, 5, 7)
    ref_attn = tf_self_attention_2d(layer, x, r_width, r_height)
    out = layer(x)
    assert out.shape == (2, 24, 5, 7)
    torch.testing.assert_close(out[:, :18], layer.conv(x))
    torch.testing.assert_close(out[:, 18:], ref_attn, rtol=1e-10, atol=1e-10)


def test_no_relative_matches_listing():
    layer = make(relative=False)
    assert layer.r_width is None and layer.r_height is None
    x = torch.randn(1, 16, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x)[:, 18:], tf_self_attention_2d(layer, x), rtol=1e-10, atol=1e-10)


def test_gradients_match_listing_and_reach_tables():
    layer = make(seed=1)
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    (layer(x)[:, 18:] * g).sum().backward()
    ours = [t.grad.clone() for t in (x, layer.r_width, layer.r_height, layer.qkv.weight)]
    for t in (x, layer.r_width, layer.r_height, layer.qkv.weight):
        t.grad = None
    (tf_self_attention_2d(layer, x, layer.r_width, layer.r_height) * g).sum().backward()
    ref = [x.grad, layer.r_width.grad, layer.r_height.grad, layer.qkv.weight.grad]
    for a, b in zip(ours, ref, strict=True):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------- relative logits


def test_relative_logits_by_hand():
    """rel_h[i, y'] + rel_w[i, x'] = q_i . (r_h[dy + H - 1] + r_w[dx + W - 1]), dy = y' - y, dx = x' - x."""
    layer = make()
    h, w = 5, 7
    q = torch.randn(1, 2, h * w, layer.dkh, dtype=torch.float64)
    rel_h, rel_w = layer.relative_logits(q, h, w)
    assert rel_h.shape == (1, 2, h * w, h) and rel_w.shape == (1, 2, h * w, w)
    r_h, r_w = layer.r_height, layer.r_width
    for n in range(2):
        for i in range(h * w):
            y, x = divmod(i, w)
            for j in range(h * w):
                yk, xk = divmod(j, w)
                expect = q[0, n, i] @ (r_h[yk - y + h - 1] + r_w[xk - x + w - 1])
                torch.testing.assert_close(rel_h[0, n, i, yk] + rel_w[0, n, i, xk], expect)
    # one case written out: query (1, 2) -> key (4, 0): offset (dy, dx) = (3, -2)
    i = 1 * w + 2
    expect = q[0, 0, i] @ r_h[3 + h - 1] + q[0, 0, i] @ r_w[-2 + w - 1]
    torch.testing.assert_close(rel_h[0, 0, i, 4] + rel_w[0, 0, i, 0], expect)


def test_relative_logits_translation_equivariant():
    """With the same query everywhere the bias depends only on the offset key - query."""
    layer = make()
    h, w = 5, 7
    q = torch.randn(1, 1, 1, layer.dkh, dtype=torch.float64).expand(1, 2, h * w, layer.dkh)
    rel_h, rel_w = layer.relative_logits(q, h, w)
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(1, 2, h, w, h, w)
    for dy, dx in [(0, 0), (1, -2), (-3, 4), (2, 3)]:
        vals = [bias[0, 0, y, x, y + dy, x + dx] for y in range(h) for x in range(w)
                if 0 <= y + dy < h and 0 <= x + dx < w]
        assert len(vals) > 1
        torch.testing.assert_close(torch.stack(vals), vals[0].expand(len(vals)))


def test_relative_index_clips_beyond_table():
    idx = relative_index(6, 3)  # table rows for offsets -2..2
    assert idx.shape == (6, 6)
    assert idx[0, 0] == 2 and idx[0, 2] == 4 and idx[0, 5] == 4 and idx[5, 0] == 0 and idx[3, 1] == 0
    assert torch.equal(relative_index(4, 4), torch.arange(4)[None, :] - torch.arange(4)[:, None] + 3)


def test_larger_input_than_tables_is_clipped_listing():
    """A 5x7 input on 3x4 tables equals the listing with the tables edge-extended to 5x7."""
    layer = make(feat_size=(3, 4))
    x = torch.randn(1, 16, 5, 7, dtype=torch.float64)
    offsets_w = torch.arange(-6, 7).clamp(-3, 3) + 3  # table rows for offsets -6..6, clipped to -3..3
    offsets_h = torch.arange(-4, 5).clamp(-2, 2) + 2
    r_width, r_height = layer.r_width[offsets_w], layer.r_height[offsets_h]
    torch.testing.assert_close(layer(x)[:, 18:], tf_self_attention_2d(layer, x, r_width, r_height),
                               rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- strides, sizes, options


def test_stride2_attends_on_avg_pooled_input():
    layer = make(stride=2)
    x = torch.randn(1, 16, 9, 13, dtype=torch.float64)
    out = layer(x)
    assert out.shape == (1, 24, 5, 7)
    pooled = F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)
    r_width, r_height = central_tables(layer, 5, 7)
    torch.testing.assert_close(out[:, 18:], tf_self_attention_2d(layer, pooled, r_width, r_height),
                               rtol=1e-10, atol=1e-10)


def test_attn_downsample_pools_then_upsamples():
    layer = make(attn_downsample=True, feat_size=(10, 14))
    assert layer.feat_size == (5, 7)
    x = torch.randn(1, 16, 10, 14, dtype=torch.float64)
    pooled = F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)
    ref = tf_self_attention_2d(layer, pooled, layer.r_width, layer.r_height)
    ref = F.interpolate(ref, (10, 14), mode="bilinear", align_corners=False)
    torch.testing.assert_close(layer(x)[:, 18:], ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("size", [(7, 9), (1, 1), (2, 3)])
@pytest.mark.parametrize("stride", [1, 2])
def test_odd_sizes(size, stride):
    layer = AugmentedConv2d(32, 40, stride=stride, feat_size=4)
    out = layer(torch.randn(2, 32, *size))
    expect = tuple((s - 1) // stride + 1 for s in size)
    assert out.shape == (2, 40, *expect) and torch.isfinite(out).all()


def test_defaults_and_channels():
    layer = lit_attn.create_attn("aa_conv", 32)  # registry: in_channels first, out defaults to in
    assert isinstance(layer, AugmentedConv2d) and layer.out_channels == 32
    assert (layer.num_heads, layer.dk, layer.dv) == (8, 160, 8)  # Nh=8, >= 20 key dims/head, dv = 0.1 * 32 -> 8
    big = AugmentedConv2d(256, 512)
    assert (big.dk, big.dv) == (160, 48)  # kappa 0.2 -> 102 < 160; upsilon 0.1 -> 51.2 -> 48
    assert AugmentedConv2d(512, 1024).dk == 208  # 0.2 * 1024 = 204.8 -> 208
    assert layer(torch.randn(1, 32, 6, 5)).shape == (1, 32, 6, 5)
    assert AugmentedConv2d(16, 8, dk=8, dv=8, num_heads=2)(torch.randn(1, 16, 3, 3)).shape == (1, 8, 3, 3)
    assert "aa_conv" in lit_attn.list_attn(kind="conv")
    assert lit_attn.get_attn_entry("aa_conv").year == 2019


def test_bad_args_and_input():
    with pytest.raises(ValueError, match="AugmentedConv2d"):
        AugmentedConv2d(16, 24, dk=10, num_heads=4)
    with pytest.raises(ValueError, match="AugmentedConv2d"):
        AugmentedConv2d(16, 8, dv=16, num_heads=4)
    with pytest.raises(ValueError, match="AugmentedConv2d"):
        AugmentedConv2d(16, kernel_size=4)
    layer = AugmentedConv2d(16, dk=8, dv=8, num_heads=2)
    with pytest.raises(ValueError, match="AugmentedConv2d"):
        layer(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="AugmentedConv2d"):
        layer(torch.randn(16, 4, 4))


def test_meta_device_bf16_autocast_channels_last():
    meta = AugmentedConv2d(32, 64, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    layer = AugmentedConv2d(32, 64, feat_size=6)
    x = torch.randn(2, 32, 6, 7)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)
    torch.testing.assert_close(layer(x.to(memory_format=torch.channels_last)), ref)


# ---------------------------------------------------------------- timm model


def test_aa_resnet50_timm():
    assert "aa_resnet50" in timm.list_models("aa_*")
    model = timm.create_model("aa_resnet50", num_classes=7)
    assert isinstance(model, AAResNet)
    aa = [m for m in model.modules() if isinstance(m, AugmentedConv2d)]
    assert len(aa) == 16  # every Bottleneck 3x3 conv of the 4 stages
    assert model.layer1[0].conv2.feat_size == (56, 56) and model.layer4[0].conv2.feat_size == (7, 7)
    assert model.layer2[0].conv2.stride == 2 and model.layer2[0].conv2.pool is not None
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (1, 2048, 2, 2)
        assert model.forward_head(feats).shape == (1, 7)
        assert model.forward_head(feats, pre_logits=True).shape == (1, 2048)
        assert model(torch.randn(1, 3, 33, 47)).shape == (1, 7)
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3


def test_aa_resnet50_features_only_backward():
    # zero_init_last=False: timm zero-inits bn3, which would hide the gradients of conv2 at init
    model = timm.create_model("aa_resnet50", features_only=True, out_indices=(1, 2, 3, 4), zero_init_last=False)
    assert model.feature_info.channels() == [256, 512, 1024, 2048]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[-1] for o in outs] == [16, 8, 4, 2]
    sum(o.mean() for o in outs).backward()
    r = model.layer3[0].conv2.r_width
    assert r.grad is not None and r.grad.abs().sum() > 0
