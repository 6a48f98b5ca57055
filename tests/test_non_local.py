"""Non-local block: the four pairwise functions against a naive (N, N') reference written here."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import lit_attn
from lit_attn.layers.non_local import NonLocal2d, concat_relu_aggregate

MODES = ("embedded", "gaussian", "dot", "concat")
NAMES = {"nonlocal": "embedded", "nonlocal_gaussian": "gaussian", "nonlocal_dot": "dot",
         "nonlocal_concat": "concat"}


def _pool_ref(x, ceil=False):
    """2x2 max pooling, stride 2: an odd last row/column dropped (floor, official Caffe2 and mmcv), or kept in a
    partial window (ceil)."""
    h, w = x.shape[-2:]
    if ceil:
        x = F.pad(x, (0, w % 2, 0, h % 2), value=float("-inf"))
    else:
        x = x[..., : h - h % 2, : w - w % 2]
    return x.unflatten(2, (-1, 2)).unflatten(4, (-1, 2)).amax((3, 5))


def _conv1x1(m, t):
    return torch.einsum("oc,bchw->bohw", m.weight[:, :, 0, 0], t) + m.bias[:, None, None]


def naive(blk: NonLocal2d, x, check_branches=True):
    """z = x + BN(W_z y), y_i = sum_j f_ij g_j with the explicit (B, N, N') affinity f."""
    b, _, h, w = x.shape
    xk = _pool_ref(x, blk.pool_ceil) if blk.sub_sample else x   # keys/values pooled before phi/g
    g = _conv1x1(blk.g, xk).flatten(2).transpose(1, 2)      # (B, N', d)
    if blk.mode == "gaussian":
        q, k = x.flatten(2).transpose(1, 2), xk.flatten(2).transpose(1, 2)
    else:
        q = _conv1x1(blk.theta, x).flatten(2).transpose(1, 2)
        k = _conv1x1(blk.phi, xk).flatten(2).transpose(1, 2)
    n, m = q.shape[1], k.shape[1]
    if blk.mode in ("embedded", "gaussian"):
        s = q.shape[-1] ** -0.5 if blk.use_scale else 1.0
        f = torch.softmax(q @ k.transpose(1, 2) * s, dim=-1)
    elif blk.mode == "dot":
        f = q @ k.transpose(1, 2) / m
    else:
        cat = torch.cat([q[:, :, None, :].expand(-1, -1, m, -1), k[:, None, :, :].expand(-1, n, -1, -1)], -1)
        pre = cat @ blk.w_f                                  # (B, N, N') = w_f^T [theta_i, phi_j]
        if check_branches:                                   # both ReLU branches are exercised
            assert 0 < (pre > 0).double().mean() < 1
        f = torch.relu(pre) / m
    y = (f @ g).transpose(1, 2).reshape(b, -1, h, w)
    z = _conv1x1(blk.w_z, y)
    if isinstance(blk.norm, nn.BatchNorm2d):
        bn = blk.norm
        assert not bn.training
        z = (z - bn.running_mean[:, None, None]) / (bn.running_var[:, None, None] + bn.eps).sqrt()
        z = z * bn.weight[:, None, None] + bn.bias[:, None, None]
    return x + z


def _randomize(blk, std=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
        if isinstance(blk.norm, nn.BatchNorm2d):
            blk.norm.running_mean.copy_(torch.randn(blk.channels, generator=gen) * 0.1)
            blk.norm.running_var.copy_(torch.rand(blk.channels, generator=gen) + 0.5)
    return blk.eval()


@pytest.mark.parametrize("sub_sample", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_matches_naive_reference(mode, sub_sample):
    torch.manual_seed(0)
    blk = _randomize(NonLocal2d(16, mode=mode, sub_sample=sub_sample, dtype=torch.float64))
    x = torch.randn(2, 16, 7, 9, dtype=torch.float64)
    out, ref = blk(x), naive(blk, x)
    assert out.shape == x.shape
    assert not torch.allclose(out, x)                       # random BN weight: not the identity
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("pool_ceil", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_sub_sample_on_odd_map(mode, pool_ceil):
    """9x11: floor (default, official) pools to 4x5 keys, as F.max_pool2d(2, 2); ceil to 5x6."""
    blk = _randomize(NonLocal2d(8, mode=mode, sub_sample=True, pool_ceil=pool_ceil, dtype=torch.float64), seed=5)
    x = torch.randn(2, 8, 9, 11, dtype=torch.float64)
    xk = F.max_pool2d(x, 2, 2, ceil_mode=pool_ceil)
    assert xk.shape[-2:] == ((5, 6) if pool_ceil else (4, 5))
    torch.testing.assert_close(_pool_ref(x, pool_ceil), xk, rtol=0, atol=0)
    torch.testing.assert_close(blk(x), naive(blk, x), rtol=1e-9, atol=1e-9)
    other = _randomize(NonLocal2d(8, mode=mode, sub_sample=True, pool_ceil=not pool_ceil, dtype=torch.float64),
                       seed=5)
    assert not torch.allclose(other(x), blk(x), atol=1e-6)   # the last row/column matters


def test_sub_sample_floor_is_the_default():
    assert NonLocal2d(8, sub_sample=True).pool_ceil is False
    assert "pool_ceil=False" in repr(NonLocal2d(8, sub_sample=True))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [(1, 1), (1, 5), (3, 2)])
def test_small_and_thin_maps_with_sub_sample(mode, size):
    blk = _randomize(NonLocal2d(8, mode=mode, sub_sample=True, pool_ceil=True, dtype=torch.float64), seed=1)
    x = torch.randn(1, 8, *size, dtype=torch.float64)
    out = blk(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, naive(blk, x, check_branches=False), rtol=1e-9, atol=1e-9)
    floor = _randomize(NonLocal2d(8, mode=mode, sub_sample=True, dtype=torch.float64), seed=1)
    if min(size) < 2:                                       # floor leaves no keys: a clear error
        with pytest.raises(ValueError, match="pool_ceil=True"):
            floor(x)
    else:
        torch.testing.assert_close(floor(x), naive(floor, x, check_branches=False), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_naive_reference(mode):
    torch.manual_seed(0)
    blk = NonLocal2d(8, mode=mode, sub_sample=mode in ("dot", "concat"), dtype=torch.float64)
    blk = _randomize(blk, seed=2)
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 8, 5, 7, dtype=torch.float64)
    params = [x, *blk.parameters()]
    grads = torch.autograd.grad((blk(x) * gy).sum(), params)
    grads_ref = torch.autograd.grad((naive(blk, x) * gy).sum(), params)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_concat_aggregate_exact_and_gradcheck():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(2, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(2, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    g = torch.randn(2, 5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    ref = torch.relu(a[:, :, None] + b[:, None, :]) @ g
    torch.testing.assert_close(concat_relu_aggregate(a, b, g), ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(concat_relu_aggregate, (a, b, g))
    # all keys active / none active
    assert torch.allclose(concat_relu_aggregate(a.detach() + 10, b.detach(), g.detach()),
                          (a.detach()[:, :, None] + 10 + b.detach()[:, None, :]) @ g.detach())
    assert torch.equal(concat_relu_aggregate(a.detach() - 10, b.detach(), g.detach()), torch.zeros(2, 6, 3,
                                                                                                      dtype=a.dtype))


def test_embedded_uses_fused_cpu_flash_kernel():
    """Equal q/k/v widths: the CPU flash SDPA kernel runs (it raises if only the math path fits)."""
    torch.manual_seed(0)
    blk = _randomize(NonLocal2d(32), std=0.2)
    x = torch.randn(2, 32, 7, 9)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = blk(x)
        with pytest.raises(RuntimeError):                   # the restriction is real: dk != dv fails
            F.scaled_dot_product_attention(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8),
                                           torch.randn(1, 1, 4, 4))
    ref = naive(blk.double(), x.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_identity_at_init(mode, norm):
    blk = NonLocal2d(16, mode=mode, norm=norm, sub_sample=True)
    x = torch.randn(2, 16, 7, 9)
    assert torch.equal(blk(x), x)                           # train mode (batch statistics)
    assert torch.equal(blk.eval()(x), x)
    if norm:
        assert torch.all(blk.norm.weight == 0) and blk.w_z.weight.std() > 0   # gamma 0, W_z N(0, 0.01)
    else:
        assert isinstance(blk.norm, nn.Identity) and torch.all(blk.w_z.weight == 0)
    assert abs(blk.g.weight.std().item() - 0.01) < 0.003 and torch.all(blk.g.bias == 0)


def test_registry_and_defaults():
    for name, mode in NAMES.items():
        e = lit_attn.get_attn_entry(name)
        assert e.family == "non_local" and e.kind == "global" and "1711.07971" in e.paper
        blk = lit_attn.create_attn(name, 32)
        assert isinstance(blk, NonLocal2d) and blk.mode == mode and blk.inner == 16
        assert blk.use_scale == (mode == "embedded")        # official scale; paper's Gaussian has none
    assert not hasattr(lit_attn.create_attn("nonlocal_gaussian", 32), "theta")
    assert lit_attn.create_attn("nonlocal_concat", 32).w_f.shape == (32,)   # [theta, phi] -> scalar, no bias
    assert NonLocal2d(32, mode="embedded_gaussian").mode == "embedded"     # mmcv names
    assert NonLocal2d(32, rd_ratio=0.25, act_layer="silu").inner == 8       # act_layer accepted, unused
    assert NonLocal2d(8, rd_ratio=1.0).inner == 8
    for kwargs in ({"mode": "cosine"}, {"rd_ratio": 0}):
        with pytest.raises(ValueError, match="NonLocal2d"):
            NonLocal2d(32, **kwargs)
    with pytest.raises(ValueError, match="NonLocal2d"):
        NonLocal2d(0)
    with pytest.raises(ValueError, match="NonLocal2d"):
        NonLocal2d(32)(torch.randn(1, 16, 4, 4))


def test_sub_sample_pools_before_the_convs():
    """Official order (pool x, then phi/g) differs from mmcv's (phi/g, then pool)."""
    blk = _randomize(NonLocal2d(8, mode="dot", sub_sample=True, dtype=torch.float64), seed=4)
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    y_ref = naive(blk, x)
    theta = _conv1x1(blk.theta, x).flatten(2)
    phi, g = (F.max_pool2d(_conv1x1(m, x), 2, 2).flatten(2) for m in (blk.phi, blk.g))   # mmcv order
    y = (g @ phi.transpose(1, 2) @ theta / phi.shape[-1]).reshape(1, -1, 6, 6)
    y_mmcv = x + blk.norm(_conv1x1(blk.w_z, y))             # eval BN (checked explicitly in naive)
    torch.testing.assert_close(blk(x), y_ref)
    assert not torch.allclose(blk(x), y_mmcv, atol=1e-3)
