"""LatentGNN (latentgnn) against a naive reference written here.

The reference writes every L2 normalisation as an explicit division by a norm over a named axis and
the node softmax as exp / sum, in float64, and also builds the equivalent dense N x N affinity that
the paper's low-rank argument is about.
"""
from __future__ import annotations

import pytest
import torch
from helpers import MaxNumel

import lit_attn
from lit_attn.layers.latentgnn import LatentGNN
from lit_attn.registry import GLOBAL, get_attn_entry


def randomise(m: LatentGNN, gamma: float = 0.8, seed: int = 1) -> LatentGNN:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.full_like(p, gamma) if name == "gamma" else torch.randn(p.shape, generator=g,
                                                                                    dtype=p.dtype) * 0.3)
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    return m.eval()


def conv_bn(seq: torch.nn.Sequential, x: torch.Tensor, relu: bool) -> torch.Tensor:
    conv, bn = seq[0], seq[1]
    y = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x)
    y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    y = y * bn.weight[:, None, None] + bn.bias[:, None, None]
    return y.clamp_min(0) if relu else y


def l2(t: torch.Tensor, axis: int) -> torch.Tensor:
    return t / t.pow(2).sum(axis, keepdim=True).sqrt().clamp_min(1e-12)


def naive_kernel(k, v2l, l2v, mode, swap=False):
    """One latent kernel; returns the output (B, C', N) and the dense N x N matrix M with out = X M."""
    b, c, h, w = v2l.shape
    if mode == "asymmetric":
        a_v2l = l2(conv_bn(k.psi_v2l, v2l, True).reshape(b, -1, h * w), 1 if swap else 2)   # over pixels
        a_l2v = l2(conv_bn(k.psi_l2v, l2v, True).reshape(b, -1, h * w), 2 if swap else 1)   # over nodes
    else:
        a_v2l = a_l2v = l2(conv_bn(k.psi, v2l, True).reshape(b, -1, h * w), 1)
    xf = v2l.reshape(b, c, h * w)                                   # (B, C', N)
    nodes = torch.einsum("bdn,bcn->bdc", a_v2l, xf)                 # (B, d, C')
    nn_ = l2(nodes, 2)                                              # over channels
    e = torch.exp(torch.einsum("bdc,bec->bde", nn_, nn_))
    aff = e / e.sum(2, keepdim=True)                                # softmax over the second node index
    nodes = torch.einsum("bde,bec->bdc", aff, nodes)
    out = torch.einsum("bdc,bdn->bcn", nodes, a_l2v)
    dense = torch.einsum("bdn,bed,bem->bnm", a_v2l, aff, a_l2v)     # (B, N, N): A_v2l^T Aff^T A_l2v
    if hasattr(k, "GraphConvWeight"):
        out = conv_bn(k.GraphConvWeight, out.reshape(b, c, h, w), True).reshape(b, c, h * w)
    return out, dense


def naive_latentgnn(m: LatentGNN, x: torch.Tensor, swap: bool = False) -> torch.Tensor:
    b, _, h, w = x.shape
    if m.mode == "asymmetric":
        v2l = l2(conv_bn(m.down_channel_v2l, x, False), 1)
        l2v = l2(conv_bn(m.down_channel_l2v, x, False), 1)
    else:
        v2l = l2v = l2(conv_bn(m.down_channel, x, False), 1)
    outs = [naive_kernel(getattr(m, f"LatentGNN_Kernel_{i}"), v2l, l2v, m.mode, swap)[0]
            for i in range(len(m.latent_dims))]
    y = conv_bn(m.up_channel, torch.cat(outs, 1).reshape(b, -1, h, w), False)
    return x + m.gamma * y


CASES = [dict(), dict(latent_dims=(5, 3)), dict(mode="symmetric", latent_dims=7),
         dict(graph_conv=True, latent_dims=4, num_kernels=2)]


@pytest.mark.parametrize("kwargs", CASES, ids=["default", "two_kernels", "symmetric", "graph_conv"])
@pytest.mark.parametrize("shape", [(2, 16, 7, 9), (1, 16, 1, 1)])
def test_matches_naive(shape, kwargs):
    m = randomise(LatentGNN(shape[1], **kwargs).double())
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m(x), naive_latentgnn(m, x), rtol=1e-10, atol=1e-10)


def test_normalisation_axes_matter():
    """The reference with the v2l / l2v normalisation axes swapped gives other values."""
    m = randomise(LatentGNN(16, latent_dims=6).double())
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(m(x), naive_latentgnn(m, x, swap=True), rtol=1e-3, atol=1e-3)


def test_defaults_follow_official():
    m = LatentGNN(256)
    assert m.mode == "asymmetric" and m.latent_dims == (100,)
    assert m.down_channel_v2l[0].out_channels == m.down_channel_l2v[0].out_channels == 64   # channel_stride 4
    assert m.down_channel_v2l[0].bias is None and m.LatentGNN_Kernel_0.psi_v2l[0].out_channels == 100
    assert not hasattr(m.LatentGNN_Kernel_0, "GraphConvWeight")
    assert m.up_channel[0].in_channels == 64 and m.up_channel[0].out_channels == 256
    two = LatentGNN(1024, latent_dims=(100, 100), rd_ratio=1 / 8)   # the official README example
    assert two.up_channel[0].in_channels == 256
    assert LatentGNN(64, latent_dims=50, num_kernels=3).latent_dims == (50, 50, 50)


def test_low_rank_dense_equivalent():
    """The paper's claim: the kernel equals a dense N x N graph X M with M = A_v2l^T Aff^T A_l2v of rank <= d."""
    m = randomise(LatentGNN(16, latent_dims=3).double())
    x = torch.randn(1, 16, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    v2l = l2(conv_bn(m.down_channel_v2l, x, False), 1)
    l2v = l2(conv_bn(m.down_channel_l2v, x, False), 1)
    out, dense = naive_kernel(m.LatentGNN_Kernel_0, v2l, l2v, "asymmetric")
    assert dense.shape == (1, 30, 30) and torch.linalg.matrix_rank(dense[0]) <= 3
    torch.testing.assert_close(out, torch.bmm(v2l.flatten(2), dense), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.LatentGNN_Kernel_0(v2l, l2v).flatten(2), out, rtol=1e-10, atol=1e-10)


def test_identity_at_init_and_registry():
    entry = get_attn_entry("latentgnn")
    assert entry.family == "latentgnn" and entry.kind == GLOBAL and entry.year == 2019
    assert "1905.11634" in entry.paper
    m = lit_attn.create_attn("latentgnn", 32)
    assert torch.count_nonzero(m.gamma) == 0
    x = torch.randn(2, 32, 7, 9)
    assert torch.equal(m(x), x)


def test_linear_memory_no_n_by_n():
    m = randomise(LatentGNN(16, latent_dims=8)).train()
    x = torch.randn(1, 16, 40, 40, requires_grad=True)
    with MaxNumel() as rec:
        m(x).sum().backward()
    assert rec.max_numel < (40 * 40) ** 2 // 50, rec.max_numel
    assert torch.isfinite(x.grad).all()


def test_official_state_dict_loads_strictly():
    c, ci, d = 32, 8, 10
    sd = {}

    def conv_bn_keys(prefix, cin, cout):
        sd[f"{prefix}.0.weight"] = torch.randn(cout, cin, 1, 1)
        for k, v in (("weight", torch.randn(cout)), ("bias", torch.randn(cout)), ("running_mean", torch.zeros(cout)),
                     ("running_var", torch.ones(cout)), ("num_batches_tracked", torch.tensor(0))):
            sd[f"{prefix}.1.{k}"] = v

    conv_bn_keys("down_channel_v2l", c, ci)
    conv_bn_keys("down_channel_l2v", c, ci)
    for i in range(2):
        conv_bn_keys(f"LatentGNN_Kernel_{i}.psi_v2l", ci, d)
        conv_bn_keys(f"LatentGNN_Kernel_{i}.psi_l2v", ci, d)
    conv_bn_keys("up_channel", 2 * ci, c)
    sd["gamma"] = torch.randn(1)
    LatentGNN(c, latent_dims=(d, d)).load_state_dict(sd, strict=True)


def test_fp32_and_bf16_close_to_float64():
    m = randomise(LatentGNN(32, latent_dims=20))
    x = torch.randn(2, 32, 12, 10)
    ref = m.double()(x.double())
    m.float()
    torch.testing.assert_close(m(x).double(), ref, rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert ((out.double() - ref).norm() / (ref - x.double()).norm()) < 5e-2


def test_bad_arguments():
    with pytest.raises(ValueError, match="LatentGNN"):
        LatentGNN(16, mode="paper")
    with pytest.raises(ValueError, match="LatentGNN"):
        LatentGNN(16, latent_dims=(4, 4), num_kernels=3)
    with pytest.raises(ValueError, match="LatentGNN"):
        LatentGNN(16, latent_dims=0)
    with pytest.raises(ValueError, match="LatentGNN"):
        LatentGNN(16, rd_ratio=0)
    with pytest.raises(ValueError, match="LatentGNN.*C=8"):
        LatentGNN(16)(torch.randn(1, 8, 4, 4))
    m = LatentGNN(8, act_layer="silu")
    assert isinstance(m.LatentGNN_Kernel_0.psi_v2l[2], torch.nn.SiLU)


@pytest.mark.parametrize("kwargs", CASES, ids=["default", "two_kernels", "symmetric", "graph_conv"])
def test_torchscript_matches_naive(kwargs):
    """torch.jit.script: the scripted block reaches `LatentGNN_Kernel_<i>` through its children (TorchScript looks
    up no computed name) and dispatches the mode by the submodules present; keys unchanged."""
    m = randomise(LatentGNN(16, **kwargs).double())
    scripted = torch.jit.script(m)
    assert list(scripted.state_dict()) == list(m.state_dict())
    x = torch.randn(2, 16, 7, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(scripted(x), naive_latentgnn(m, x), rtol=1e-10, atol=1e-10)
