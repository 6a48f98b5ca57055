"""EMANet's EM attention unit (`ema`) against an explicit EM loop written here (float64).

The reference follows XiaLiPKU/EMANet `network.py` (EMAU) and `train.py` (moving average of the
bases) and shares the block's weights and bases.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lit_attn
from lit_attn.layers.ema import EMAUnit, em_iterations
from lit_attn.registry import GLOBAL, get_attn_entry

EPS = 1e-6


def naive_em(feats: torch.Tensor, mu: torch.Tensor, iterations: int, swap_axes: bool = False):
    """Per-sample EM, feats (B, C, N), mu (1, C, K): softmax written out; returns final bases and last z."""
    mus, zs = [], []
    for f in feats:                                           # (C, N)
        m = mu[0].clone()                                     # (C, K)
        for _ in range(iterations):
            logits = f.T @ m                                  # (N, K)
            soft_dim, norm_dim = (0, 1) if swap_axes else (1, 0)
            e = torch.exp(logits - logits.amax(dim=soft_dim, keepdim=True))
            z = e / e.sum(dim=soft_dim, keepdim=True)         # each pixel: a distribution over the K bases
            weights = z / (EPS + z.sum(dim=norm_dim, keepdim=True))  # each basis: weights over the N pixels
            m = f @ weights
            m = m / (EPS + torch.sqrt((m * m).sum(dim=0, keepdim=True)))
        mus.append(m)
        zs.append(z)
    return torch.stack(mus), torch.stack(zs)


def conv1_feats(block: EMAUnit, x: torch.Tensor) -> torch.Tensor:
    w = block.conv1.weight[:, :, 0, 0]
    return torch.einsum("oc,bchw->bohw", w, x).flatten(2) + block.conv1.bias[None, :, None]


def naive_ema_eval(block: EMAUnit, x: torch.Tensor, swap_axes: bool = False) -> torch.Tensor:
    b, c, h, w = x.shape
    mu, z = naive_em(conv1_feats(block, x), block.mu, block.iterations, swap_axes)
    recon = torch.relu(torch.einsum("bck,bnk->bcn", mu, z)).reshape(b, c, h, w)
    y = torch.einsum("oc,bchw->bohw", block.conv2[0].weight[:, :, 0, 0], recon)
    bn = block.conv2[1]
    y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    y = y * bn.weight[:, None, None] + bn.bias[:, None, None]
    return torch.relu(y + x)


def randomise(block: EMAUnit) -> EMAUnit:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if not block.em_grad:  # the frozen mid conv's weight and bias are buffers (FrozenConv2d)
            for t in (block.conv1.weight, block.conv1.bias):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
        bn = block.conv2[1]
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    return block


def make(channels=16, **kwargs) -> EMAUnit:
    return randomise(EMAUnit(channels, num_bases=8, **kwargs).double())


def rand(*shape, seed=0):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(2, 16, 7, 9), (1, 16, 1, 1), (3, 16, 2, 13)])
@pytest.mark.parametrize("iterations", [1, 3])
def test_matches_naive_eval(shape, iterations):
    m = make(iterations=iterations).eval()
    x = rand(*shape)
    torch.testing.assert_close(m(x), naive_ema_eval(m, x), rtol=1e-10, atol=1e-10)


def test_softmax_axes():
    m = make().eval()
    x = rand(2, 16, 7, 9)
    out = m(x)
    # the swapped form (softmax over pixels, normalisation over bases) is a different function
    assert (out - naive_ema_eval(m, x, swap_axes=True)).abs().max() > 1e-3
    feats = conv1_feats(m, x)
    mu, z = em_iterations(feats, m.mu.expand(2, -1, -1), 3)
    torch.testing.assert_close(z.sum(dim=2), torch.ones(2, 63, dtype=torch.float64))   # over the K bases
    assert (z.sum(dim=1) - 1).abs().max() > 0.1                                         # not over the N pixels
    torch.testing.assert_close(mu.norm(dim=1), torch.ones(2, 8, dtype=torch.float64), rtol=0, atol=1e-5)  # L2 over C


@pytest.mark.parametrize("momentum,norm_batch_bases", [(0.9, False), (0.5, False), (0.9, True)])
def test_train_update_matches_hand_computed(momentum, norm_batch_bases):
    m = make(momentum=momentum, norm_batch_bases=norm_batch_bases).train()
    x = rand(3, 16, 5, 6)
    old = m.mu.clone()
    mu_final, _ = naive_em(conv1_feats(m, x), old, m.iterations)
    batch = mu_final.mean(dim=0, keepdim=True)
    if norm_batch_bases:  # mmseg's EMAModule re-normalises the batch mean before the average
        batch = batch / (EPS + batch.norm(dim=1, keepdim=True))
    m(x)
    torch.testing.assert_close(m.mu, momentum * old + (1 - momentum) * batch, rtol=1e-10, atol=1e-10)
    if not norm_batch_bases:  # official: the averaged buffer is not re-normalised
        assert (m.mu.norm(dim=1) - 1).abs().max() > 1e-3


def test_bases_change_in_train_fixed_in_eval():
    m = make().eval()
    x = rand(2, 16, 6, 6)
    mu0 = m.mu.clone()
    y1, y2 = m(x), m(x)
    assert torch.equal(y1, y2) and torch.equal(m.mu, mu0)  # eval: deterministic, buffer untouched
    m.train()
    m(x)
    mu1 = m.mu.clone()
    assert not torch.allclose(mu1, mu0)
    m(x)
    assert not torch.allclose(m.mu, mu1)                   # every training forward moves it
    mu2 = m.mu.clone()
    m.eval()
    y3 = m(x)
    assert not torch.allclose(y3, y1)                      # eval uses the moved bases ...
    assert torch.equal(m(x), y3) and torch.equal(m.mu, mu2)  # ... and leaves them alone


def test_conv1_gets_no_gradient_unless_em_grad():
    m = make().train()
    assert not m.conv1.weight.requires_grad and not m.conv1.bias.requires_grad
    assert set(m.no_grad_params) == {"conv1.weight", "conv1.bias"}
    # frozen as buffers: not parameters at all (timm's backward test wants a gradient for every parameter)
    assert not any(n.startswith("conv1.") for n, _ in m.named_parameters())
    m.requires_grad_(True)  # does not reach the buffers; the EM under no_grad cuts conv1 off anyway
    x = rand(2, 16, 5, 6).requires_grad_()
    (m(x) * rand(2, 16, 5, 6, seed=3)).sum().backward()
    assert m.conv1.weight.grad is None and m.conv1.bias.grad is None
    assert m.conv2[0].weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0

    g = make(em_grad=True).eval()
    g.load_state_dict(m.state_dict())
    assert g.conv1.weight.requires_grad and g.no_grad_params == ()
    x = rand(2, 16, 5, 6)
    ref = m.eval()(x)
    y = g(x)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)  # same forward
    (y * rand(2, 16, 5, 6, seed=3)).sum().backward()
    assert g.conv1.weight.grad.abs().sum() > 0


def test_bf16_autocast_runs_em_in_fp32():
    torch.manual_seed(0)
    m32 = EMAUnit(32, momentum=0.5).train()
    m16 = EMAUnit(32, momentum=0.5).train()
    m16.load_state_dict(m32.state_dict())
    x = torch.randn(2, 32, 12, 10)
    ref = m32(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m16(x)
    assert m16.mu.dtype == torch.float32 and torch.isfinite(y).all()
    assert (y.float() - ref).norm() / ref.norm() < 5e-2
    assert (m16.mu - m32.mu).abs().max() < 2e-2


def test_official_state_dict_loads_strictly():
    c, k = 32, 8
    official = {  # XiaLiPKU/EMANet EMAU(c, k) (SyncBN without num_batches_tracked)
        "mu": torch.randn(1, c, k), "conv1.weight": torch.randn(c, c, 1, 1), "conv1.bias": torch.randn(c),
        "conv2.0.weight": torch.randn(c, c, 1, 1), "conv2.1.weight": torch.randn(c),
        "conv2.1.bias": torch.randn(c), "conv2.1.running_mean": torch.randn(c), "conv2.1.running_var": torch.rand(c),
    }
    m = EMAUnit(c, num_bases=k)
    m.load_state_dict(official, strict=True)
    assert torch.equal(m.bases, official["mu"])


def test_init_and_registry():
    entry = get_attn_entry("ema")
    assert entry.kind == GLOBAL and entry.family == "emanet" and "1907.13426" in entry.paper
    torch.manual_seed(0)
    m = lit_attn.create_attn("ema", 512)
    assert m.mu.shape == (1, 512, 64) and m.iterations == 3 and m.momentum == 0.9
    torch.testing.assert_close(m.mu.norm(dim=1), torch.ones(1, 64))
    assert abs(m.conv1.weight.std().item() - math.sqrt(2 / 512)) < 5e-3
    assert m.conv2[0].bias is None and torch.equal(m.conv2[1].weight, torch.ones(512))
    # 1x1 input: one pixel, every basis collapses onto it
    assert m.eval()(torch.randn(1, 512, 1, 1)).shape == (1, 512, 1, 1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="EMAUnit.*num_bases"):
        EMAUnit(16, num_bases=0)
    with pytest.raises(ValueError, match="EMAUnit.*iterations"):
        EMAUnit(16, iterations=0)
    with pytest.raises(ValueError, match="EMAUnit.*momentum"):
        EMAUnit(16, momentum=1.5)
    with pytest.raises(ValueError, match="EMAUnit"):
        EMAUnit(0)
    with pytest.raises(ValueError, match="EMAUnit.*C=16"):
        EMAUnit(16)(torch.randn(1, 8, 4, 4))
    EMAUnit(8, rd_ratio=1.0, act_layer="silu")  # accepted and ignored


# ------------------------------------------------------------------ 2-process all-reduce of the bases
def _build_for_ddp() -> EMAUnit:
    torch.manual_seed(0)
    return EMAUnit(8, num_bases=4).double().train()


def _ddp_input(rank: int) -> torch.Tensor:
    return rand(2, 8, 5, 6, seed=100 + rank)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        m = _build_for_ddp()
        m(_ddp_input(rank))
        torch.save(m.mu, f"{out_dir}/mu{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_all_reduces_the_bases(tmp_path):
    # fork, not spawn: spawned children re-import torch and timm (~6 s of CPU each); the forked ones
    # run single-threaded (no OpenMP region inherited from the parent)
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    mu0, mu1 = (torch.load(tmp_path / f"mu{r}.pt", weights_only=True) for r in range(2))
    assert torch.equal(mu0, mu1)
    m = _build_for_ddp()
    old = m.mu.clone()
    batch = torch.stack([naive_em(conv1_feats(m, _ddp_input(r)), old, 3)[0].mean(0) for r in range(2)]).mean(0)
    torch.testing.assert_close(mu0, 0.9 * old + 0.1 * batch[None], rtol=1e-10, atol=1e-10)
    local = _build_for_ddp()
    local(_ddp_input(0))  # without torch.distributed: only the local batch
    assert not torch.allclose(local.mu, mu0)
