"""Disentangled non-local block (dnl, dnl_mmseg) against a naive dense reference written here.

The reference materialises the (N, N) whitened pairwise softmax as the official code and mmseg do, in
float64 (the 1/temperature = x10..x20 factor amplifies float32 rounding), and shares the block's weights.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import MaxNumel

import lit_attn
from lit_attn.layers.dnl import DisentangledNonLocal2d

MODES = ("official", "mmseg")


def randomise(m: DisentangledNonLocal2d, std: float = 0.3, seed: int = 0) -> DisentangledNonLocal2d:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
        if m.mode == "mmseg":                     # non-trivial running statistics for the eval-mode BN
            bn = m.conv_out.bn
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g, dtype=bn.running_mean.dtype))
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g, dtype=bn.running_var.dtype) + 0.5)
    return m.eval()


def _conv(conv, x):
    return F.conv2d(x, conv.weight, conv.bias)


def naive(blk: DisentangledNonLocal2d, x: torch.Tensor, whiten: bool = True):
    """Returns (output, pairwise term, unary term) with the explicit (B, N, N) softmax."""
    b, _, h, w = x.shape
    q = _conv(blk.theta.conv, x).flatten(2).transpose(1, 2)          # (B, N, d)
    k = _conv(blk.phi.conv, x).flatten(2).transpose(1, 2)
    v = _conv(blk.g.conv, x).flatten(2).transpose(1, 2)              # (B, N, dv)
    if whiten:
        q = q - q.mean(1, keepdim=True)
        k = k - k.mean(1, keepdim=True)
    logits = q @ k.transpose(1, 2)                                   # (B, N, N)
    if blk.use_scale:
        logits = logits / q.shape[-1] ** 0.5
    attn = torch.softmax(logits / blk.temperature, dim=-1)           # over keys
    pairwise = (attn @ v).transpose(1, 2).reshape(b, -1, h, w)
    mask = torch.softmax(_conv(blk.conv_mask, x).flatten(1), dim=-1)  # (B, N), shared by all queries
    unary = (mask[:, None, :] @ v).reshape(b, -1, 1, 1)
    if blk.mode == "official":
        out = x + blk.gamma * pairwise + unary
    else:
        bn = blk.conv_out.bn
        z = F.conv2d(pairwise + unary, blk.conv_out.conv.weight)
        z = (z - bn.running_mean[:, None, None]) / (bn.running_var[:, None, None] + bn.eps).sqrt()
        out = x + z * bn.weight[:, None, None] + bn.bias[:, None, None]
    return out, pairwise, unary


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(2, 32, 5, 6), (1, 32, 1, 1), (1, 32, 3, 7), (2, 32, 1, 9)])
def test_matches_dense_reference(mode, shape):
    blk = randomise(DisentangledNonLocal2d(32, mode=mode, dtype=torch.float64))
    x = torch.randn(shape, dtype=torch.float64)
    out, pairwise, unary = naive(blk, x)
    got_pairwise, got_unary = blk.terms(x)
    torch.testing.assert_close(got_pairwise, pairwise, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got_unary, unary, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(blk(x), out, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_float32_close_to_float64_reference(mode):
    blk = randomise(DisentangledNonLocal2d(32, mode=mode))
    x = torch.randn(2, 32, 9, 11)
    ref_blk = DisentangledNonLocal2d(32, mode=mode, dtype=torch.float64).eval()
    ref_blk.load_state_dict(blk.state_dict())
    ref = naive(ref_blk, x.double())[0]
    torch.testing.assert_close(blk(x).double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_whitening_cancels_query_and_key_biases(mode):
    """A constant added to every query (or key) must not change the pairwise term; without the
    whitening the query bias would (the naive unwhitened reference shows it)."""
    blk = randomise(DisentangledNonLocal2d(32, mode=mode, dtype=torch.float64))
    x = torch.randn(2, 32, 5, 6, dtype=torch.float64)
    before = blk(x)
    plain_before = naive(blk, x, whiten=False)[0]
    with torch.no_grad():
        blk.theta.conv.bias.add_(torch.randn(blk.inter, dtype=torch.float64) * 3)
        blk.phi.conv.bias.add_(torch.randn(blk.inter, dtype=torch.float64) * 3)
    torch.testing.assert_close(blk(x), before, rtol=1e-9, atol=1e-9)
    assert (naive(blk, x, whiten=False)[0] - plain_before).abs().max() > 1e-2     # the test can fail
    assert (naive(blk, x, whiten=False)[0] - blk(x)).abs().max() > 1e-2


def test_whitening_biases_get_no_gradient():
    # float64: the gradient is zero in exact arithmetic; in float32 its rounding noise (~1e-5) depends on the
    # torch build's kernels
    blk = randomise(DisentangledNonLocal2d(32, mode="mmseg", dtype=torch.float64)).train()
    x = torch.randn(2, 32, 6, 7, dtype=torch.float64)
    (blk(x) * torch.randn(2, 32, 6, 7, dtype=torch.float64)).sum().backward()
    for name in blk.no_grad_params:
        assert blk.get_parameter(name).grad.abs().max() < 1e-10
    assert blk.theta.conv.weight.grad.abs().max() > 1e-3


def test_mmseg_identity_at_init():
    blk = lit_attn.create_attn("dnl_mmseg", 32).eval()
    assert not blk.conv_out.bn.weight.any() and not blk.conv_out.bn.bias.any()
    x = torch.randn(2, 32, 7, 9)
    torch.testing.assert_close(blk(x), x, rtol=0, atol=0)


def test_official_init_gates_only_the_pairwise_term():
    """Official: gamma = 0 removes the pairwise term, the unary term is added ungated (not the identity)."""
    blk = lit_attn.create_attn("dnl", 32)
    assert blk.gamma.item() == 0
    x = torch.randn(2, 32, 7, 9)
    pairwise, unary = blk.terms(x)
    assert pairwise.abs().max() > 0 and unary.abs().max() > 0
    torch.testing.assert_close(blk(x), x + unary, rtol=0, atol=0)
    with torch.no_grad():
        blk.gamma.fill_(0.5)
    torch.testing.assert_close(blk(x), x + 0.5 * pairwise + unary)


def test_defaults_and_state_dict_layouts():
    off, mm = lit_attn.create_attn("dnl", 32), lit_attn.create_attn("dnl_mmseg", 32)
    assert (off.mode, off.temperature, off.use_scale, off.inter) == ("official", 0.1, True, 16)
    assert (mm.mode, mm.temperature, mm.use_scale, mm.inter) == ("mmseg", 0.05, True, 16)
    assert DisentangledNonLocal2d(32, temperature=0.05).temperature == 0.05
    # mmseg DisentangledNonLocal2d(in_channels=32, reduction=2, norm_cfg=BN) as built by DNLHead
    assert {k: tuple(v.shape) for k, v in mm.state_dict().items()} == {
        "theta.conv.weight": (16, 32, 1, 1), "theta.conv.bias": (16,),
        "phi.conv.weight": (16, 32, 1, 1), "phi.conv.bias": (16,),
        "g.conv.weight": (16, 32, 1, 1), "g.conv.bias": (16,),
        "conv_mask.weight": (1, 32, 1, 1), "conv_mask.bias": (1,),
        "conv_out.conv.weight": (32, 16, 1, 1), "conv_out.bn.weight": (32,), "conv_out.bn.bias": (32,),
        "conv_out.bn.running_mean": (32,), "conv_out.bn.running_var": (32,), "conv_out.bn.num_batches_tracked": ()}
    # official _NonLocalNd_bn(32, 16, use_out=False, with_gc=True): value C -> C without bias, gamma
    assert {k: tuple(v.shape) for k, v in off.state_dict().items()} == {
        "theta.conv.weight": (16, 32, 1, 1), "theta.conv.bias": (16,),
        "phi.conv.weight": (16, 32, 1, 1), "phi.conv.bias": (16,),
        "g.conv.weight": (32, 32, 1, 1), "conv_mask.weight": (1, 32, 1, 1), "conv_mask.bias": (1,),
        "gamma": (1,)}


def test_temperature_sharpens_the_pairwise_attention():
    x = torch.randn(1, 32, 6, 6, dtype=torch.float64)
    outs = {}
    for t in (1.0, 0.1, 0.01):
        blk = randomise(DisentangledNonLocal2d(32, temperature=t, dtype=torch.float64))
        outs[t] = blk.terms(x)[0]
        torch.testing.assert_close(outs[t], naive(blk, x)[1])
    # a lower temperature concentrates each query on fewer keys: the pairwise output varies more
    assert outs[1.0].std() < outs[0.1].std() < outs[0.01].std()


@pytest.mark.parametrize("mode", MODES)
def test_never_builds_n_by_n(mode, monkeypatch):
    import lit_attn.ops.attention as ops_attention

    monkeypatch.setattr(ops_attention, "CHUNK_ELEMENTS", 1 << 16)  # small maps get chunked too
    blk = randomise(DisentangledNonLocal2d(16, mode=mode), std=0.1).train()
    x = torch.randn(1, 16, 32, 32, requires_grad=True)
    n = 32 * 32
    with MaxNumel() as rec:
        blk(x).sum().backward()
    assert rec.max_numel < n * n // 4, (rec.max_numel, n * n)


def test_value_errors():
    with pytest.raises(ValueError, match="DisentangledNonLocal2d.*mode"):
        DisentangledNonLocal2d(32, mode="paper")
    with pytest.raises(ValueError, match="DisentangledNonLocal2d.*temperature"):
        DisentangledNonLocal2d(32, temperature=0.0)
    with pytest.raises(ValueError, match="DisentangledNonLocal2d.*rd_ratio"):
        DisentangledNonLocal2d(32, rd_ratio=0)
    with pytest.raises(ValueError, match="DisentangledNonLocal2d.*C=16"):
        DisentangledNonLocal2d(32)(torch.randn(1, 16, 4, 4))
