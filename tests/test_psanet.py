"""PSANet (`psanet`): the pure-PyTorch PSAMask against a line-by-line Python transcription of mmcv's CPU
kernel (`mmcv/ops/csrc/pytorch/cpu/psamask.cpp`), and the block against a per-pixel dense reference
following mmseg's `PSAHead` (explicit loops over pixel pairs), both written here and sharing the block's
weights.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lit_attn
from lit_attn.layers.psanet import PointwiseSpatialAttention, point_wise_logits, psa_mask
from lit_attn.registry import GLOBAL, get_attn_entry


# ----------------------------------------------------------------------------- mmcv kernel transcription
def _mmcv_kernel(values: list, psa_type: str, num: int, hf: int, wf: int, mask_h: int, mask_w: int,
                 backward: bool) -> list:
    """psamask_{collect,distribute}_{forward,backward} of mmcv's CPU kernel, flat-index arithmetic kept."""
    half_h, half_w = (mask_h - 1) // 2, (mask_w - 1) // 2
    out = [0.0] * (num * mask_h * mask_w * hf * wf if backward else num * hf * wf * hf * wf)
    for n in range(num):
        for h in range(hf):
            for w in range(wf):
                hstart, hend = max(0, half_h - h), min(mask_h, hf + half_h - h)
                wstart, wend = max(0, half_w - w), min(mask_w, wf + half_w - w)
                for hidx in range(hstart, hend):
                    for widx in range(wstart, wend):
                        m = ((n * mask_h * mask_w + hidx * mask_w + widx) * hf + h) * wf + w
                        pos = (hidx + h - half_h) * wf + (widx + w - half_w)
                        if psa_type == "collect":
                            buf = (n * hf * wf + pos) * hf * wf + h * wf + w
                        else:
                            buf = (n * hf * wf + h * wf + w) * hf * wf + pos
                        if backward:
                            out[m] = values[buf]
                        else:
                            out[buf] = values[m]
    return out


def mmcv_psamask_forward(mask, psa_type, mask_h, mask_w):
    num, _, hf, wf = mask.shape
    out = _mmcv_kernel(mask.flatten().tolist(), psa_type, num, hf, wf, mask_h, mask_w, backward=False)
    return torch.tensor(out, dtype=mask.dtype).view(num, hf * wf, hf, wf)


def mmcv_psamask_backward(grad, psa_type, mask_h, mask_w):
    num, _, hf, wf = grad.shape
    out = _mmcv_kernel(grad.flatten().tolist(), psa_type, num, hf, wf, mask_h, mask_w, backward=True)
    return torch.tensor(out, dtype=grad.dtype).view(num, mask_h * mask_w, hf, wf)


# (mask_h, mask_w), (H, W): odd / even masks, maps inside and larger than the mask window, 1-pixel maps
OP_CASES = [((5, 5), (3, 4)), ((7, 9), (4, 5)), ((3, 3), (6, 5)), ((4, 4), (3, 5)), ((4, 6), (7, 4)),
            ((2, 3), (4, 4)), ((1, 1), (2, 3)), ((7, 9), (1, 1)), ((3, 5), (5, 1))]


@pytest.mark.parametrize("psa_type", ["collect", "distribute"])
@pytest.mark.parametrize("mask_size, hw", OP_CASES)
def test_psa_mask_matches_mmcv_cpu_kernel(psa_type, mask_size, hw):
    mh, mw = mask_size
    mask = torch.randn(2, mh * mw, *hw, dtype=torch.float64, requires_grad=True)
    out = psa_mask(mask, psa_type, mask_size)
    torch.testing.assert_close(out, mmcv_psamask_forward(mask.detach(), psa_type, mh, mw), rtol=0, atol=0)
    grad = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, mask, grad)
    torch.testing.assert_close(g, mmcv_psamask_backward(grad, psa_type, mh, mw), rtol=0, atol=0)


@pytest.mark.parametrize("psa_type", ["collect", "distribute"])
def test_psa_mask_gradcheck(psa_type):
    mask = torch.randn(1, 3 * 4, 4, 3, dtype=torch.float64, requires_grad=True)   # map larger than the mask
    assert torch.autograd.gradcheck(lambda m: psa_mask(m, psa_type, (3, 4)), (mask,))


def test_collect_is_distribute_transposed_and_differs_for_asymmetric_masks():
    for mask_size, (h, w) in [((5, 7), (3, 4)), ((4, 4), (5, 6))]:
        n = h * w
        mask = torch.randn(2, mask_size[0] * mask_size[1], h, w)
        col, dis = psa_mask(mask, "collect", mask_size), psa_mask(mask, "distribute", mask_size)
        torch.testing.assert_close(col.view(2, n, n), dis.view(2, n, n).transpose(1, 2), rtol=0, atol=0)
        assert not torch.allclose(col, dis)
    # a mask symmetric under j - i -> i - j, identical at every pixel, makes the two maps equal
    sym = torch.randn(5, 5)
    sym = (sym + sym.flip(0, 1)).reshape(1, 25, 1, 1).expand(1, 25, 3, 3)
    torch.testing.assert_close(psa_mask(sym, "collect", 5), psa_mask(sym, "distribute", 5))


def test_positions_outside_the_mask_window_get_logit_zero():
    # a 1 x 1 mask only covers the pixel itself: other positions keep mmcv's zero, i.e. weight exp(0) / Z
    mask = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 1, 3)
    g = point_wise_logits(mask, (1, 1))
    torch.testing.assert_close(g[0], torch.diag(torch.tensor([1.0, 2.0, 3.0])))
    # a 3 x 3 mask on a 1 x 5 map: offsets -1, 0, 1 come from the mask (row 1 of the 3 x 3), the rest is 0
    mask = torch.arange(9.0).view(1, 9, 1, 1).expand(1, 9, 1, 5)
    g = point_wise_logits(mask, 3)[0]
    assert g[2].tolist() == [0.0, 3.0, 4.0, 5.0, 0.0]


def test_index_cache_and_errors():
    mask = torch.randn(1, 12, 4, 5)
    torch.testing.assert_close(point_wise_logits(mask, (3, 4)), point_wise_logits(mask.clone(), (3, 4)))
    with pytest.raises(ValueError, match="12 channels"):
        point_wise_logits(torch.randn(1, 9, 4, 5), (3, 4))
    with pytest.raises(ValueError, match="psa_type"):
        psa_mask(mask, "bi-direction", (3, 4))


# ----------------------------------------------------------------------------- block reference
def shrink_rule(h, w, s):
    """mmseg PSAHead: both sides odd -> (h - 1) // s + 1 with align_corners=True, else h // s, False."""
    if s == 1:
        return h, w, False
    if h % s and w % s:
        return (h - 1) // s + 1, (w - 1) // s + 1, True
    return max(1, h // s), max(1, w // s), False


def per_pixel_attention(feats, mask, mask_size, psa_type, softmax, norm):
    """Explicit loops over pixel pairs: pixel i's mask gives logit mask_i[(j - i) + half] for position j
    (0 outside the mask); collect normalises over the sources j of each i, distribute over the senders i
    of each target j."""
    b, c, h, w = feats.shape
    mh, mw = mask_size
    half_h, half_w = (mh - 1) // 2, (mw - 1) // 2
    pixels = [(y, x) for y in range(h) for x in range(w)]

    def logit(i, j):                       # (B,) logit of the pair, from the mask predicted at i
        dh, dw = j[0] - i[0] + half_h, j[1] - i[1] + half_w
        if 0 <= dh < mh and 0 <= dw < mw:
            return mask[:, dh * mw + dw, i[0], i[1]]
        return mask.new_zeros(b)

    out = []
    for t in pixels:                       # output pixel: i for collect, j for distribute
        if psa_type == "collect":
            logits = torch.stack([logit(t, j) for j in pixels], 1)
        else:
            logits = torch.stack([logit(i, t) for i in pixels], 1)
        weights = logits.softmax(1) if softmax else logits
        srcs = torch.stack([feats[:, :, y, x] for y, x in pixels], 2)     # (B, C, N)
        out.append((srcs * weights[:, None, :]).sum(2) / norm)
    return torch.stack(out, 2).view(b, c, h, w)


def reference_block(m: PointwiseSpatialAttention, x):
    h, w = x.shape[-2:]
    hs, ws, ac = shrink_rule(h, w, m.shrink_factor)
    if m.psa_type == "bi-direction":
        branches = [(m.reduce, m.attention, "collect"), (m.reduce_p, m.attention_p, "distribute")]
    else:
        branches = [(m.reduce, m.attention, m.psa_type)]
    outs = []
    for reduce, attention, psa_type in branches:
        feats = reduce(x)
        if m.shrink_factor != 1:
            feats = F.interpolate(feats, size=(hs, ws), mode="bilinear", align_corners=ac)
        outs.append(per_pixel_attention(feats, attention(feats), m.mask_size, psa_type, m.psa_softmax,
                                        m.normalization_factor))
    out = F.interpolate(m.proj(torch.cat(outs, 1)), size=(h, w), mode="bilinear", align_corners=ac)
    return torch.relu(m.bottleneck(torch.cat([x, out], 1)))


def randomise(m: PointwiseSpatialAttention, std: float = 0.3) -> PointwiseSpatialAttention:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
        for name, buf in m.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g, dtype=buf.dtype) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g, dtype=buf.dtype) + 0.5)
    return m.eval()


BLOCK_CASES = [
    ("bi-direction", dict(mask_size=(7, 9)), (2, 8, 7, 9)),                      # odd map: 4 x 5, align_corners
    ("bi-direction", dict(mask_size=(3, 4)), (1, 8, 8, 9)),                      # 4 x 4 shrunk map > mask
    ("collect", dict(mask_size=(4, 4), proj_padding=0), (2, 8, 6, 10)),
    ("distribute", dict(mask_size=(5, 3), shrink_factor=1, psa_softmax=False,
                        normalization_factor=None), (1, 8, 3, 4)),
    ("bi-direction", dict(), (1, 8, 1, 1)),                                       # default 97 x 97 mask
    ("bi-direction", dict(mask_size=(3, 3)), (2, 8, 1, 2)),                      # 1 // 2 clamped to 1
]


@pytest.mark.parametrize("psa_type, kwargs, shape", BLOCK_CASES)
def test_block_matches_per_pixel_reference(psa_type, kwargs, shape):
    m = randomise(PointwiseSpatialAttention(shape[1], psa_type=psa_type, rd_ratio=0.5, **kwargs).double())
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(m(x), reference_block(m, x), rtol=1e-10, atol=1e-10)


def test_block_gradients_match_reference():
    m = randomise(PointwiseSpatialAttention(8, mask_size=(5, 4), rd_ratio=0.5).double())
    x = torch.randn(2, 8, 7, 5, dtype=torch.float64, requires_grad=True)    # 4 x 3 shrunk map
    gy = torch.randn(2, 8, 7, 5, dtype=torch.float64)
    grads = torch.autograd.grad((m(x) * gy).sum(), [x, *m.parameters()])
    ref = torch.autograd.grad((reference_block(m, x) * gy).sum(), [x, *m.parameters()])
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)


def test_shrink_rule_and_structure_follow_mmseg():
    m = PointwiseSpatialAttention(32)
    assert [m.shrunk_size(*s) for s in [(7, 9), (64, 128), (7, 8), (1, 1), (1, 2)]] == [
        (4, 5, True), (32, 64, False), (3, 4, False), (1, 1, True), (1, 1, False)]
    assert m.rd_channels == 8 and m.mask_size == (97, 97) and m.normalization_factor == 1.0
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    # mmseg PSAHead names: ConvModule -> .conv / .bn, the mask conv is attention.1 (no bias)
    assert shapes["reduce.conv.weight"] == shapes["reduce_p.conv.weight"] == (8, 32, 1, 1)
    assert shapes["attention.0.conv.weight"] == (8, 8, 1, 1) and "attention.0.bn.running_var" in shapes
    assert shapes["attention.1.weight"] == shapes["attention_p.1.weight"] == (97 * 97, 8, 1, 1)
    assert "attention.1.bias" not in shapes
    assert shapes["proj.conv.weight"] == (32, 16, 1, 1) and m.proj.conv.padding == (1, 1)
    assert shapes["bottleneck.conv.weight"] == (32, 64, 3, 3)
    single = PointwiseSpatialAttention(32, psa_type="collect", mask_size=5)
    assert not hasattr(single, "reduce_p") and single.proj.conv.in_channels == 8
    assert PointwiseSpatialAttention(32, mask_size=(3, 5), normalization_factor=None).normalization_factor == 15
    entry = get_attn_entry("psanet")
    assert entry.kind == GLOBAL and entry.family == "psanet" and entry.cls is PointwiseSpatialAttention


def test_constructor_errors():
    for kwargs, match in [(dict(psa_type="both"), "psa_type"), (dict(mask_size=(3, 0)), "mask_size"),
                          (dict(mask_size=(3, 3, 3)), "mask_size"), (dict(shrink_factor=0), "shrink_factor"),
                          (dict(compact=True), "compact"), (dict(proj_padding=2), "proj_padding"),
                          (dict(rd_ratio=0), "rd_ratio"), (dict(rd_channels=0), "rd_channels")]:
        with pytest.raises(ValueError, match=f"PointwiseSpatialAttention.*{match}"):
            PointwiseSpatialAttention(16, **kwargs)
    with pytest.raises(ValueError, match="PointwiseSpatialAttention"):
        lit_attn.create_attn("psanet", 0)


@pytest.mark.parametrize("psa_type, kwargs, shape", [BLOCK_CASES[i] for i in (0, 1, 2, 3)])
def test_torchscript_matches_per_pixel_reference(psa_type, kwargs, shape):
    """torch.jit.script: the scripted block builds its index tensors per call (the eager cache is Python) and
    spells the branches out; both shrink rules, maps beyond the mask window, the three psa types; keys unchanged."""
    m = randomise(PointwiseSpatialAttention(shape[1], psa_type=psa_type, rd_ratio=0.5, **kwargs).double())
    scripted = torch.jit.script(m)
    assert list(scripted.state_dict()) == list(m.state_dict())
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(scripted(x), reference_block(m, x), rtol=1e-10, atol=1e-10)
