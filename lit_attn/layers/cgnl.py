"""Compact generalized non-local block (Yue, Sun, Li, Zhou, Ding, Wen: Compact Generalized Non-local
Network, NeurIPS 2018, arXiv 1810.13125).

Official code: KaiyuYue/cgnl-network.pytorch, `model/resnet.py` (`SpatialCGNL`, `SpatialCGNLx`). The
non-local affinity is taken between *every channel-position pair* (c, h, w) of a group instead of between
positions, and the kernel is factorised so that the whole block costs O(N C): registered as `cgnl`
(dot-product kernel) and `cgnl_gaussian` (Taylor-expanded Gaussian RBF kernel, the official CGNLx).
Parameter names follow the official file (`t`, `p`, `g`, `z`, `gn`), so its weights load directly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import make_divisible
from torch import Tensor, nn

from ..ops.amp import no_autocast
from ..registry import GLOBAL, register_attn
from ._utils import TimmInitHooks, check_channels, check_input, factory
from .non_local import _acc_dtype

_KERNELS = ("dot", "gaussian")


def inner_planes(channels: int, rd_ratio: float, groups: int) -> int:
    """The inner width of theta/phi/g: int(channels * rd_ratio) (the official planes = C/2) when `groups` divides
    it, else channels * rd_ratio rounded to a multiple of `groups` as timm's `make_divisible` rounds (nearest
    multiple, at least `groups`, never more than 10% below), so the widths timm's attention slots ask for
    (efficientnet / byobnet `rd_ratio`s) build."""
    planes = max(1, int(channels * rd_ratio))
    return planes if planes % groups == 0 else make_divisible(channels * rd_ratio, groups)


def _group_dot(a: Tensor, g: Tensor) -> Tensor:
    """(B, groups, 1): <a, g> over the last dimension, one batched BLAS dot per group (as the official bmm)."""
    return torch.matmul(a.unsqueeze(-2), g.unsqueeze(-1)).squeeze(-1)


class CGNL(TimmInitHooks, nn.Module):
    """Compact generalized non-local block (Compact Generalized Non-local Network, NeurIPS 2018,
    arXiv 1810.13125), the official `SpatialCGNL` / `SpatialCGNLx`. theta (`t`), phi (`p`) and g are 1x1
    convs C -> C*rd_ratio (C/2) without bias (rounded to a multiple of `groups` when C*rd_ratio is not one,
    see `inner_planes`), split into `groups` (8) groups of c channels; within a group
    every element of the flattened (c*h*w) vector attends to every other: y_j = sum_i f(t_j, p_i) g_i.
    `kernel="dot"` (`cgnl`): f = t_j p_i, so y = <p, g> t with one scalar <p, g> per group (over channels
    AND positions). `kernel="gaussian"` (`cgnl_gaussian`, CGNLx): f = beta * sum_{k<=order} (2 gamma t_j
    p_i)^k / k!, the Taylor series of the RBF exp(-gamma (t - p)^2) with its normaliser simplified to
    beta = exp(-2 gamma) as the official code does (order 3, gamma 1e-4), so y = sum_k beta (2 gamma)^k / k!
    <p^k, g> t^k. `use_scale` divides each <p^k, g> by sqrt(c*h*w) (official default off). Then a grouped
    1x1 conv z (C/2 -> C, `groups`, no bias), GroupNorm(groups, C) and the residual: out = x + GN(z(y)).
    Init as the official ResNet does for its single CGNL block: convs N(0, 0.01), GN weight and bias 0
    (identity at init). Same maths as the official code; for fp16/bf16 inputs the per-group sums (they
    add up c*h*w products), z and the GroupNorm run in fp32. No activation: act_layer is accepted and
    ignored. Cost O(N C) time and memory for the attention (N = H*W; order+1 times that for the Gaussian
    kernel) plus O(N C^2) for the 1x1 convs; no N x N tensor exists in the method at all.
    """

    def __init__(self, channels: int, *, groups: int = 8, kernel: str = "dot", order: int = 3, gamma: float = 1e-4,
                 use_scale: bool = False, rd_ratio: float = 0.5, act_layer=None, device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        check_channels(name, channels, groups=groups)
        if kernel not in _KERNELS:
            raise ValueError(f"{name}: kernel must be one of {_KERNELS}, got {kernel!r}")
        if not rd_ratio > 0:
            raise ValueError(f"{name}: rd_ratio must be > 0, got {rd_ratio!r}")
        if not (isinstance(order, int) and order >= 0):
            raise ValueError(f"{name}: order must be a non-negative int, got {order!r}")
        if not gamma > 0:
            raise ValueError(f"{name}: gamma must be > 0, got {gamma!r}")
        planes = inner_planes(channels, rd_ratio, groups)
        dd = factory(device, dtype)
        self.channels, self.planes, self.groups = channels, planes, groups
        self.kernel, self.order, self.gamma, self.use_scale = kernel, order, float(gamma), bool(use_scale)
        self.t = nn.Conv2d(channels, planes, 1, bias=False, **dd)
        self.p = nn.Conv2d(channels, planes, 1, bias=False, **dd)
        self.g = nn.Conv2d(channels, planes, 1, bias=False, **dd)
        self.z = nn.Conv2d(planes, channels, 1, groups=groups, bias=False, **dd)
        self.gn = nn.GroupNorm(groups, channels, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in (self.t, self.p, self.g, self.z):
            nn.init.normal_(m.weight, std=0.01)
        nn.init.zeros_(self.gn.weight)
        nn.init.zeros_(self.gn.bias)

    def extra_repr(self) -> str:
        extra = f", order={self.order}, gamma={self.gamma}" if self.kernel == "gaussian" else ""
        return f"kernel={self.kernel!r}, planes={self.planes}, groups={self.groups}, use_scale={self.use_scale}" + extra

    def aggregate(self, t: Tensor, p: Tensor, g: Tensor) -> Tensor:
        """y_j = sum_i f(t_j, p_i) g_i over the last dimension of (B, groups, c*h*w) tensors, in O(c*h*w)."""
        norm = t.shape[-1] ** -0.5 if self.use_scale else 1.0

        if self.kernel == "dot":
            return _group_dot(p, g).mul(norm) * t
        beta, two_gamma = math.exp(-2 * self.gamma), 2 * self.gamma
        y = g.sum(-1, keepdim=True).mul(beta * norm).expand_as(t)        # k = 0: p^0 = t^0 = 1
        t_k, p_k = t, p
        for k in range(1, self.order + 1):
            coef = beta * two_gamma ** k / math.factorial(k) * norm
            y = y + _group_dot(p_k, g).mul(coef) * t_k
            if k < self.order:
                t_k, p_k = t_k * t, p_k * p
        return y

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_input(self, x, self.channels)
        t, p, g = self.t(x), self.p(x), self.g(x)
        b, c, h, w = t.shape
        with no_autocast(x.device):   # sums of c*h*w products, until the GN: fp32
            acc = _acc_dtype(t)
            t_, p_, g_ = (a.to(acc).reshape(b, self.groups, -1) for a in (t, p, g))
            y = self.aggregate(t_, p_, g_).reshape(b, c, h, w)
            y = F.conv2d(y, self.z.weight.to(acc), groups=self.groups)
            y = F.group_norm(y, self.groups, self.gn.weight.to(acc), self.gn.bias.to(acc), self.gn.eps)
        return x + y.to(x.dtype)


_PAPER = "Compact Generalized Non-local Network (NeurIPS 2018, arXiv 1810.13125)"
register_attn("cgnl", family="cgnl", kind=GLOBAL, paper=_PAPER, year=2018,
              attends="channels and positions jointly (dot kernel, one scalar per group)", cost="O(N C)",
              cls=CGNL, kernel="dot")
register_attn("cgnl_gaussian", family="cgnl", kind=GLOBAL, paper=_PAPER, year=2018,
              attends="channels and positions jointly (Taylor-expanded Gaussian RBF kernel)", cost="O(N C)",
              cls=CGNL, kernel="gaussian")
