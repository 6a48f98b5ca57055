"""mmseg's named attention heads: CCHead, NLHead, DNLHead, GCHead, DAHead (+ GloReHead, A2Head).

Parameter counts at R-50-D8 (in 2048, channels 512, 19 classes) are written out layer by layer from the
mmseg configs and mmcv bricks; forward passes are checked against the mmseg / mmcv formulas, written naively
below (explicit N x N matrices), on small inputs.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_attn.heads.context import A2Head, AttnHead, CCHead, DNLHead, GCHead, GloReHead, NLHead
from lit_attn.heads.danet import DAHead
from lit_attn.heads.fcn import ConvModule

IN, CH, K = 2048, 512, 19                     # mmseg R-50-D8 decode head on Cityscapes


@functools.cache
def big(cls: type) -> nn.Module:
    """The head at mmseg R-50-D8 sizes, built once on the meta device (parameter counts and structure only)."""
    with torch.device("meta"):
        return cls(IN, CH, K)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def bn_eval(bn: nn.BatchNorm2d, y: torch.Tensor) -> torch.Tensor:
    y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    return y * bn.weight[:, None, None] + bn.bias[:, None, None]


def cbr(m: ConvModule, x: torch.Tensor) -> torch.Tensor:
    """A ConvModule (conv, BN, ReLU) in eval mode, by hand."""
    c = m.conv
    return F.relu(bn_eval(m.bn, F.conv2d(x, c.weight, c.bias, c.stride, c.padding, c.dilation)))


def conv1x1(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, conv.weight, conv.bias)


def randomise(model: nn.Module) -> None:
    """Unit-gain random conv weights (the paper inits, N(0, 0.01) projections and conv_seg, make the attention
    near-uniform and the logits tiny, so a wrong temperature or scale would pass), random BN statistics and
    affines, and non-zero values for every remaining all-zero parameter (gammas, zero inits)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.normal_(m.weight, std=m.weight[0].numel() ** -0.5)
            if m.bias is not None:
                nn.init.normal_(m.bias, std=0.1)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
    for p in model.parameters():
        if torch.all(p == 0):
            p.data.uniform_(-0.8, 0.8)


def fcn_tail(head: AttnHead, x: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """mmseg FCNHead after its block: convs[1], conv_cat(concat([x, out])), conv_seg (eval mode)."""
    out = cbr(head.convs[1], mid)
    out = cbr(head.conv_cat, torch.cat([x, out], 1))
    return conv1x1(head.conv_seg, out)


# ------------------------------------------------------------------------------ mmcv / mmseg formulas
def ref_nonlocal(blk, x, mode="embedded_gaussian", use_scale=True):
    """mmcv NonLocal2d.forward (pairwise [N, HW, HW]), with the block's weights; conv_out = BN(w_z(y))."""
    n, c, h, w = x.shape
    g = conv1x1(blk.g, x).flatten(2).transpose(1, 2)
    if mode == "gaussian":
        theta, phi = x.flatten(2).transpose(1, 2), x.flatten(2)
    else:
        theta, phi = conv1x1(blk.theta, x).flatten(2).transpose(1, 2), conv1x1(blk.phi, x).flatten(2)
    pw = theta @ phi
    if mode == "embedded_gaussian":
        pw = (pw / theta.shape[-1] ** 0.5 if use_scale else pw).softmax(-1)
    elif mode == "gaussian":
        pw = pw.softmax(-1)
    else:                                      # dot_product
        pw = pw / pw.shape[-1]
    y = (pw @ g).transpose(1, 2).reshape(n, -1, h, w)
    return x + bn_eval(blk.norm, conv1x1(blk.w_z, y))


def ref_dnl(blk, x, temperature=0.05):
    """mmseg DisentangledNonLocal2d.forward (dnl_head.py@3f8d34e): x + conv_out(y + unary_x)."""
    n, c, h, w = x.shape
    g = conv1x1(blk.g.conv, x).flatten(2).transpose(1, 2)
    theta = conv1x1(blk.theta.conv, x).flatten(2).transpose(1, 2)
    phi = conv1x1(blk.phi.conv, x).flatten(2)
    theta = theta - theta.mean(dim=-2, keepdim=True)
    phi = phi - phi.mean(dim=-1, keepdim=True)
    pw = ((theta @ phi) / theta.shape[-1] ** 0.5 / temperature).softmax(-1)
    y = (pw @ g).transpose(1, 2).reshape(n, -1, h, w)
    mask = conv1x1(blk.conv_mask, x).view(n, 1, -1).softmax(-1)
    unary = (mask @ g).transpose(1, 2).reshape(n, -1, 1, 1)
    return x + bn_eval(blk.conv_out.bn, F.conv2d(y + unary, blk.conv_out.conv.weight))


def ref_context_block(gc, x, pooling="att"):
    """mmcv ContextBlock.forward with nn.LayerNorm([planes, 1, 1]) (eps 1e-5), with the timm block's weights."""
    n, c, h, w = x.shape
    if pooling == "att":
        mask = conv1x1(gc.conv_attn, x).view(n, 1, h * w).softmax(2)
        context = (x.view(n, c, h * w) @ mask.transpose(1, 2)).view(n, c, 1, 1)
    else:
        context = x.mean((2, 3), keepdim=True)

    def mlp(m):
        t = conv1x1(m.fc1, context)
        p = t.shape[1]
        t = F.layer_norm(t, [p, 1, 1], m.norm.weight.view(p, 1, 1), m.norm.bias.view(p, 1, 1), eps=1e-5)
        return conv1x1(m.fc2, F.relu(t))

    out = x
    if gc.mlp_scale is not None:
        out = out * torch.sigmoid(mlp(gc.mlp_scale))
    if gc.mlp_add is not None:
        out = out + mlp(gc.mlp_add)
    return out


def ref_cca(blk, x):
    """mmcv CrissCrossAttention.forward (>= 1.3.13, einsum with a -inf diagonal), one step."""
    _, _, h, _ = x.shape
    q, k, v = conv1x1(blk.query_conv, x), conv1x1(blk.key_conv, x), conv1x1(blk.value_conv, x)
    neg_diag = torch.diag(torch.full((h,), float("-inf")))
    energy_h = (torch.einsum("bchw,bciw->bwhi", q, k) + neg_diag).transpose(1, 2)
    energy_w = torch.einsum("bchw,bchj->bhwj", q, k)
    attn = torch.cat([energy_h, energy_w], -1).softmax(-1)
    out = torch.einsum("bciw,bhwi->bchw", v, attn[..., :h]) + torch.einsum("bchj,bhwj->bchw", v, attn[..., h:])
    return blk.gamma * out + x


def ref_pam(pam, x):
    """mmseg PAM: SelfAttentionBlock(key/query 1x1 no norm, matmul_norm False, no out_project) + Scale."""
    n, c, h, w = x.shape
    query = conv1x1(pam.query_conv, x).flatten(2).transpose(1, 2)
    key = conv1x1(pam.key_conv, x).flatten(2)
    value = conv1x1(pam.value_conv, x).flatten(2).transpose(1, 2)
    sim = (query @ key).softmax(-1)
    return pam.gamma * (sim @ value).transpose(1, 2).reshape(n, c, h, w) + x


def ref_cam(cam, x):
    """mmseg CAM: softmax(max(energy) - energy) over channels."""
    n, c, h, w = x.shape
    q = x.view(n, c, -1)
    energy = q @ q.transpose(1, 2)
    attn = (energy.max(-1, keepdim=True)[0].expand_as(energy) - energy).softmax(-1)
    return cam.gamma * (attn @ q).view(n, c, h, w) + x


# ------------------------------------------------------------------------------ parameter counts (R-50-D8)
# mmseg FCNHead(2048, 512, 19, num_convs=2, concat_input=True), shared by CC/NL/DNL/GC heads:
FCN_CONVS0 = 9 * 2048 * 512 + 2 * 512            # 3x3 2048 -> 512, no bias (a norm follows) + BN(512)
FCN_CONVS1 = 9 * 512 * 512 + 2 * 512             # 3x3 512 -> 512 + BN
FCN_CONV_CAT = 9 * (2048 + 512) * 512 + 2 * 512  # 3x3 2560 -> 512 + BN
FCN_CONV_SEG = 512 * 19 + 19                     # 1x1 512 -> 19 with bias
FCN = FCN_CONVS0 + FCN_CONVS1 + FCN_CONV_CAT + FCN_CONV_SEG


def test_fcn_part_r50_d8():
    assert FCN == 23_605_779


def test_cchead_param_count_r50_d8():
    # mmcv CrissCrossAttention(512): query/key 1x1 512 -> 512 // 8 = 64 with bias, value 1x1 512 -> 512 with
    # bias, Scale(0) gamma (1 parameter); the same module applied recurrence = 2 times (no extra parameters)
    cca = 2 * (512 * 64 + 64) + (512 * 512 + 512) + 1
    assert cca == 328_321
    head = big(CCHead)
    assert n_params(head.attn) == cca
    assert n_params(head) == FCN + cca == 23_934_100                  # = mmseg


def test_nlhead_param_count_r50_d8():
    # mmcv NonLocal2d(512, reduction=2, norm_cfg=SyncBN): g/theta/phi ConvModule 1x1 512 -> 256 without a norm,
    # so with bias; conv_out ConvModule 1x1 256 -> 512 with the norm, so no bias, + BN(512)
    nl_mmcv = 3 * (512 * 256 + 256) + 256 * 512 + 2 * 512
    assert nl_mmcv == 526_080
    mmseg = FCN + nl_mmcv
    assert mmseg == 24_131_859
    head = big(NLHead)
    assert head.attn.w_z.bias is None  # as mmcv's conv_out (a norm follows)
    assert n_params(head.attn) == nl_mmcv
    assert n_params(head) == mmseg


def test_dnlhead_param_count_r50_d8():
    # mmseg DisentangledNonLocal2d = mmcv NonLocal2d(512, reduction 2, SyncBN) + conv_mask 1x1 512 -> 1 with bias
    dnl = 3 * (512 * 256 + 256) + 256 * 512 + 2 * 512 + (512 + 1)
    assert dnl == 526_593
    head = big(DNLHead)
    assert n_params(head.attn) == dnl
    assert n_params(head) == FCN + dnl == 24_132_372                  # = mmseg


def test_gchead_param_count_r50_d8():
    # mmcv ContextBlock(512, ratio 1/4, 'att', ('channel_add',)): conv_mask 1x1 512 -> 1 with bias;
    # channel_add_conv: 1x1 512 -> 128 with bias, LayerNorm([128, 1, 1]) (weight + bias), ReLU, 1x1 128 -> 512
    gc = (512 + 1) + (512 * 128 + 128) + 2 * 128 + (128 * 512 + 512)
    assert gc == 132_481
    head = big(GCHead)
    assert n_params(head.attn) == gc
    assert n_params(head) == FCN + gc == 23_738_260                   # = mmseg


def test_glorehead_param_count_r50_d8():
    # GloRe_Unit(512, num_mid=128): conv_state 1x1 512 -> 256 with bias, conv_proj 1x1 512 -> 128 with bias,
    # GCN conv1 (Conv1d over 128 nodes, bias), conv2 (Conv1d over 256 states, no bias), conv_extend
    # 1x1 256 -> 512 no bias, BN(512). No mmseg head to compare with.
    glore = (512 * 256 + 256) + (512 * 128 + 128) + (128 * 128 + 128) + 256 * 256 + 256 * 512 + 2 * 512
    assert glore == 411_136
    head = big(GloReHead)
    assert n_params(head.attn) == glore
    assert n_params(head) == FCN + glore == 24_016_915


def test_a2head_param_count_r50_d8():
    # DoubleAttention(512, m = n = 128): conv_a/conv_b/conv_v 1x1 512 -> 128 with bias, conv_out 1x1 128 -> 512
    # with bias. No mmseg head to compare with.
    a2 = 3 * (512 * 128 + 128) + (128 * 512 + 512)
    assert a2 == 263_040
    head = big(A2Head)
    assert n_params(head.attn) == a2
    assert n_params(head) == FCN + a2 == 23_868_819


def test_dahead_param_count_r50_d8():
    # mmseg DAHead(in 2048, channels 512, pam_channels 64, 19 classes):
    pam_in_conv = 9 * 2048 * 512 + 2 * 512             # 3x3 ConvModule, no bias + BN
    pam = 2 * (512 * 64 + 64) + (512 * 512 + 512) + 1  # key/query 1x1 512 -> 64, value 512 -> 512, all with bias; gamma
    pam_out_conv = 9 * 512 * 512 + 2 * 512
    pam_conv_seg = 512 * 19 + 19
    cam_in_conv = 9 * 2048 * 512 + 2 * 512
    cam = 1                                            # gamma only
    cam_out_conv = 9 * 512 * 512 + 2 * 512
    cam_conv_seg = 512 * 19 + 19
    conv_seg = 512 * 19 + 19
    total = (pam_in_conv + pam + pam_out_conv + pam_conv_seg + cam_in_conv + cam + cam_out_conv + cam_conv_seg
             + conv_seg)
    assert total == 23_954_619
    head = big(DAHead)
    assert n_params(head.pam) == pam and n_params(head.cam) == cam
    assert n_params(head.pam_in_conv) == pam_in_conv and n_params(head.cam_out_conv) == cam_out_conv
    assert n_params(head) == total                                    # = mmseg


# ------------------------------------------------------------------------------ structure
def test_attn_heads_structure_r50_d8():
    heads = {cls: big(cls) for cls in (CCHead, NLHead, DNLHead, GCHead, GloReHead, A2Head)}
    for head in heads.values():
        assert isinstance(head, AttnHead) and len(head.convs) == 2 and head.concat_input
        for conv, cin in ((head.convs[0].conv, 2048), (head.convs[1].conv, 512), (head.conv_cat.conv, 2560)):
            assert conv.in_channels == cin and conv.out_channels == 512 and conv.bias is None
            assert conv.kernel_size == (3, 3) and conv.padding == (1, 1)
        assert all(isinstance(m.bn, nn.BatchNorm2d) for m in (*head.convs, head.conv_cat))
        assert isinstance(head.dropout, nn.Dropout2d) and head.dropout.p == 0.1
        assert head.conv_seg.kernel_size == (1, 1) and head.conv_seg.out_channels == 19
        assert head.attention_modules() == (head.attn,)
    cc = heads[CCHead].attn
    assert type(cc).__name__ == "CrissCrossAttention" and cc.recurrence == 2
    assert cc.query_conv.out_channels == cc.key_conv.out_channels == 64 and cc.value_conv.out_channels == 512
    nl = heads[NLHead].attn
    assert (type(nl).__name__, nl.mode, nl.inner, nl.use_scale) == ("NonLocal2d", "embedded", 256, True)
    assert isinstance(nl.norm, nn.BatchNorm2d) and not nl.sub_sample
    dnl = heads[DNLHead].attn
    assert (dnl.mode, dnl.inter, dnl.temperature, dnl.use_scale) == ("mmseg", 256, 0.05, True)
    gc = heads[GCHead].attn
    assert type(gc).__name__ == "GlobalContext" and gc.conv_attn is not None and gc.mlp_scale is None
    assert gc.mlp_add.fc1.out_channels == 128 and gc.mlp_add.norm.eps == 1e-5
    glore = heads[GloReHead].attn
    assert (glore.num_n, glore.num_s, glore.normalize) == (128, 256, True)
    a2 = heads[A2Head].attn
    assert (a2.mid_channels, a2.num_descriptors) == (128, 128)


def test_dahead_structure_r50_d8():
    head = big(DAHead)
    for name, cin in (("pam_in_conv", 2048), ("pam_out_conv", 512), ("cam_in_conv", 2048), ("cam_out_conv", 512)):
        conv = getattr(head, name).conv
        assert conv.in_channels == cin and conv.out_channels == 512 and conv.bias is None
        assert conv.kernel_size == (3, 3) and conv.padding == (1, 1)
        assert isinstance(getattr(head, name).bn, nn.BatchNorm2d)
    assert head.pam.query_conv.out_channels == head.pam.key_conv.out_channels == 64
    assert head.pam.value_conv.out_channels == 512 and head.cam.mode == "official"
    for name in ("pam_conv_seg", "cam_conv_seg", "conv_seg"):
        conv = getattr(head, name)
        assert conv.kernel_size == (1, 1) and conv.out_channels == 19 and conv.bias is not None
    assert isinstance(head.dropout, nn.Dropout2d) and head.dropout.p == 0.1
    assert head.extra_loss_weights == (1.0, 1.0)
    assert head.attention_modules() == (head.pam, head.cam)
    mmseg_prefixes = {"pam_in_conv.conv", "pam_in_conv.bn", "pam", "pam.query_conv", "pam.key_conv",
                      "pam.value_conv", "pam_out_conv.conv", "pam_out_conv.bn", "pam_conv_seg", "cam_in_conv.conv",
                      "cam_in_conv.bn", "cam", "cam_out_conv.conv", "cam_out_conv.bn", "cam_conv_seg", "conv_seg"}
    assert {k.rsplit(".", 1)[0] for k in head.state_dict()} == mmseg_prefixes


# ------------------------------------------------------------------------------ the mmseg maths
def _eval_head(cls, cin=12, ch=16, k=3, **kw):
    head = cls(cin, ch, k, **kw).eval()
    randomise(head)
    return head


@pytest.mark.parametrize("mode", ["embedded_gaussian", "dot_product", "gaussian"])
def test_nlhead_matches_mmcv_nonlocal(mode):
    head = _eval_head(NLHead, mode=mode)
    x = torch.randn(2, 12, 6, 5)
    mid = ref_nonlocal(head.attn, cbr(head.convs[0], x), mode=mode)
    torch.testing.assert_close(head(x), fcn_tail(head, x, mid), rtol=1e-4, atol=1e-4)


def test_nlhead_use_scale_false_and_concatenation_run():
    head = _eval_head(NLHead, use_scale=False)
    x = torch.randn(1, 12, 5, 4)
    mid = ref_nonlocal(head.attn, cbr(head.convs[0], x), use_scale=False)
    torch.testing.assert_close(head(x), fcn_tail(head, x, mid), rtol=1e-4, atol=1e-4)
    assert NLHead(12, 16, 3, mode="concatenation").eval()(x).shape == (1, 3, 5, 4)


def test_dnlhead_matches_mmseg():
    head = _eval_head(DNLHead)
    x = torch.randn(2, 12, 5, 7)
    mid = ref_dnl(head.attn, cbr(head.convs[0], x))
    torch.testing.assert_close(head(x), fcn_tail(head, x, mid), rtol=1e-4, atol=1e-4)
    head = _eval_head(DNLHead, temperature=0.2)
    mid = ref_dnl(head.attn, cbr(head.convs[0], x), temperature=0.2)
    torch.testing.assert_close(head(x), fcn_tail(head, x, mid), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pooling, fusion", [("att", ("channel_add",)), ("avg", ("channel_mul",)),
                                             ("att", ("channel_add", "channel_mul"))])
def test_gchead_matches_mmcv_context_block(pooling, fusion):
    head = _eval_head(GCHead, pooling_type=pooling, fusion_types=fusion)
    assert (head.attn.conv_attn is not None) == (pooling == "att")
    x = torch.randn(2, 12, 6, 7)
    mid = ref_context_block(head.attn, cbr(head.convs[0], x), pooling=pooling)
    torch.testing.assert_close(head(x), fcn_tail(head, x, mid), rtol=1e-4, atol=1e-4)


def test_gchead_init_is_mmcv():
    head = GCHead(12, 16, 3, fusion_types=("channel_add", "channel_mul"))
    gc = head.attn
    for mlp in (gc.mlp_add, gc.mlp_scale):                 # mmcv last_zero_init: weight and bias 0
        assert torch.all(mlp.fc2.weight == 0) and torch.all(mlp.fc2.bias == 0) and mlp.norm.eps == 1e-5
    assert torch.all(gc.conv_attn.bias == 0)
    x = torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(GCHead(12, 16, 3).attn(x), x)            # channel_add only: identity at init
    head.init_weights()                                                   # the head's init keeps the block's
    assert torch.all(gc.mlp_add.fc2.weight == 0)
    assert int(16 * 0.3) == 4 and GCHead(12, 16, 3, ratio=0.3).attn.mlp_add.fc1.out_channels == 4


def test_cchead_matches_mmcv_cca_twice():
    head = _eval_head(CCHead)
    x = torch.randn(2, 12, 7, 5)
    mid = cbr(head.convs[0], x)
    for _ in range(2):                                  # mmseg: `for _ in range(recurrence): output = self.cca(output)`
        mid = ref_cca(head.attn, mid)
    torch.testing.assert_close(head(x), fcn_tail(head, x, mid), rtol=1e-4, atol=1e-4)
    one = _eval_head(CCHead, recurrence=1)
    torch.testing.assert_close(one(x), fcn_tail(one, x, ref_cca(one.attn, cbr(one.convs[0], x))),
                               rtol=1e-4, atol=1e-4)


def test_dahead_matches_mmseg():
    head = _eval_head(DAHead, pam_channels=4)
    assert head.pam.gamma.item() != 0 and head.cam.gamma.item() != 0
    x = torch.randn(2, 12, 6, 5)
    pam_feat = cbr(head.pam_out_conv, ref_pam(head.pam, cbr(head.pam_in_conv, x)))
    cam_feat = cbr(head.cam_out_conv, ref_cam(head.cam, cbr(head.cam_in_conv, x)))
    y = head(x)
    assert isinstance(y, torch.Tensor)
    torch.testing.assert_close(y, conv1x1(head.conv_seg, pam_feat + cam_feat), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(head.forward_features(x), pam_feat + cam_feat, rtol=1e-4, atol=1e-4)


def test_dahead_train_returns_three_logits():
    torch.manual_seed(0)
    head = DAHead(12, 16, 3, pam_channels=4, dropout=0.0).train()
    randomise(head)
    x = torch.randn(2, 12, 6, 5)
    out = head(x)
    assert isinstance(out, tuple) and len(out) == 1 + len(head.extra_loss_weights) == 3
    assert all(o.shape == (2, 3, 6, 5) for o in out)
    pam_feat, cam_feat = head.branch_features(x)
    torch.testing.assert_close(out[0], head.conv_seg(pam_feat + cam_feat))
    torch.testing.assert_close(out[1], head.pam_conv_seg(pam_feat))
    torch.testing.assert_close(out[2], head.cam_conv_seg(cam_feat))
    loss = sum(w * F.cross_entropy(o, torch.randint(0, 3, (2, 6, 5)))
               for w, o in zip((1.0, *head.extra_loss_weights), out, strict=True))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
    for name in ("pam.query_conv.weight", "pam.key_conv.weight", "pam.gamma", "cam.gamma", "pam_conv_seg.weight"):
        assert head.get_parameter(name).grad.abs().sum() > 0, name


def test_dahead_init():
    head = DAHead(12, 16, 3, pam_channels=4)
    assert head.pam.gamma.item() == 0 and head.cam.gamma.item() == 0
    assert abs(head.conv_seg.weight.std().item() - 0.01) < 0.005 and torch.all(head.conv_seg.bias == 0)
    assert head.pam_conv_seg.weight.std().item() > 0.05                 # PyTorch default, as mmseg
    x = torch.randn(2, 16, 4, 3)
    torch.testing.assert_close(head.pam(x), x)
    torch.testing.assert_close(head.cam(x), x)


# ------------------------------------------------------------------------------ shapes, modes, gradients
SMALL = {
    "CCHead": lambda **kw: CCHead(24, 16, 5, **kw),
    "NLHead": lambda **kw: NLHead(24, 16, 5, **kw),
    "DNLHead": lambda **kw: DNLHead(24, 16, 5, **kw),
    "GCHead": lambda **kw: GCHead(24, 16, 5, **kw),
    "GloReHead": lambda **kw: GloReHead(24, 16, 5, **kw),
    "A2Head": lambda **kw: A2Head(24, 16, 5, **kw),
    "DAHead": lambda **kw: DAHead(24, 16, 5, pam_channels=4, **kw),
}


@pytest.mark.parametrize("name", list(SMALL))
def test_head_shapes_train_eval(name):
    head = SMALL[name]()
    n_extra = len(getattr(head, "extra_loss_weights", ()))
    for shape in ((2, 24, 8, 8), (1, 24, 7, 5), (2, 24, 1, 1)):
        head.train()
        if shape[0] * shape[2] * shape[3] > 1 and shape[2] > 1:      # BN in training needs > 1 value per channel
            out = head(torch.randn(shape))
            outs = out if isinstance(out, tuple) else (out,)
            assert len(outs) == 1 + n_extra
            assert all(o.shape == (shape[0], 5, *shape[2:]) for o in outs)
        head.eval()
        with torch.no_grad():
            y = head(torch.randn(shape))
        assert isinstance(y, torch.Tensor) and y.shape == (shape[0], 5, *shape[2:]) and torch.isfinite(y).all()


@pytest.mark.parametrize("name", list(SMALL))
def test_head_gradients_reach_parameters(name):
    head = SMALL[name](dropout=0.0).train()
    randomise(head)                                     # non-zero gammas / zero-init weights, so gradients flow
    out = head(torch.randn(2, 24, 6, 7))
    outs = out if isinstance(out, tuple) else (out,)
    sum(o.square().mean() for o in outs).backward()
    for pname, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        if p.ndim >= 2:                                 # every weight (biases before a BN or the whitening cancel)
            assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ["CCHead", "NLHead", "DNLHead", "GCHead", "GloReHead", "A2Head"])
def test_blocks_start_as_identity_and_keep_their_init(name):
    head = SMALL[name]()
    x = torch.randn(2, 16, 5, 6)
    head.init_weights()
    torch.testing.assert_close(head.attn(x), x)


def test_reduction_rounding_matches_mmcv():
    for ch, r in ((16, 2), (15, 2), (49, 7), (9, 3), (30, 4), (7, 7), (100, 3)):
        assert NLHead(4, ch, 2, reduction=r).attn.inner == ch // r
        assert DNLHead(4, ch, 2, reduction=r).attn.inter == ch // r


def test_norm_layer_none():
    head = NLHead(12, 16, 3, norm_layer=None)           # mmcv: no norm -> conv_out zero-initialised, with bias
    assert isinstance(head.attn.norm, nn.Identity) and torch.all(head.attn.w_z.weight == 0)
    assert head.convs[0].conv.bias is not None
    assert head.eval()(torch.randn(1, 12, 4, 4)).shape == (1, 3, 4, 4)


def test_errors():
    with pytest.raises(ValueError, match=r"NLHead expects a \(B, 24, H, W\)"):
        SMALL["NLHead"]()(torch.randn(1, 23, 5, 5))
    with pytest.raises(ValueError, match="CCHead expects"):
        SMALL["CCHead"]()(torch.randn(24, 5, 5))
    with pytest.raises(ValueError, match=r"DAHead expects a \(B, 24, H, W\)"):
        SMALL["DAHead"]()(torch.randn(1, 16, 5, 5))
    with pytest.raises(ValueError, match="DAHead expects"):
        SMALL["DAHead"]()(torch.randn(1, 24, 5))
    with pytest.raises(ValueError, match="recurrence"):
        CCHead(8, 8, 2, recurrence=0)
    with pytest.raises(ValueError, match="mode"):
        NLHead(8, 8, 2, mode="softmax")
    with pytest.raises(ValueError, match="reduction"):
        NLHead(8, 8, 2, reduction=16)
    with pytest.raises(ValueError, match="embedded_gaussian"):
        DNLHead(8, 8, 2, mode="dot_product")
    with pytest.raises(ValueError, match="pooling_type"):
        GCHead(8, 8, 2, pooling_type="max")
    with pytest.raises(ValueError, match="fusion_types"):
        GCHead(8, 8, 2, fusion_types=("channel_sub",))
    with pytest.raises(ValueError, match="ratio"):
        GCHead(8, 2, 2, ratio=0.25)
    with pytest.raises(ValueError, match="pam_channels"):
        DAHead(8, 8, 2, pam_channels=0)
    with pytest.raises(ValueError, match="dropout"):
        DAHead(8, 8, 2, dropout=1.0)
    with pytest.raises(ValueError, match="channels"):
        DAHead(8, 0, 2)
