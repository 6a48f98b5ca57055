"""A2-Net: the double attention block (gather, then distribute), as a plug-in block.

A^2-Nets: Double Attention Networks (Chen, Kalantidis, Li, Yan, Feng, NeurIPS 2018, arXiv 1810.11579).
The authors released no code; this follows the paper's equations. Third-party versions often get the
softmax axes wrong (External-Attention-pytorch's `F.softmax` without `dim` normalises over the batch)
or compute A (B^T V), which materialises an N x N matrix; here the gather softmax runs over positions,
the distribution softmax over the n descriptors, and the product is associated as (A B^T) V.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..registry import GLOBAL, register_attn
from ._utils import TimmInitHooks, check_channels, check_input, factory

_PAPER = "A^2-Nets: Double Attention Networks (NeurIPS 2018, arXiv 1810.11579)"


def _softmax(t: Tensor, dim: int) -> Tensor:
    """Softmax in fp32 (at least) for fp16/bf16 inputs, cast back to the input's dtype."""
    low = t.dtype in (torch.float16, torch.bfloat16)
    return torch.softmax(t, dim, dtype=torch.float32).to(t.dtype) if low else torch.softmax(t, dim)


def _width(name: str, what: str, channels: int, rd_ratio: float, value: int | None) -> int:
    if value is None:
        if not rd_ratio > 0:
            raise ValueError(f"{name}: rd_ratio must be > 0, got {rd_ratio!r}")
        return max(1, int(channels * rd_ratio))
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: {what} must be a positive integer, got {value!r}")
    return value


@register_attn("a2", family="a2net", kind=GLOBAL, paper=_PAPER, year=2018,
               attends="n global descriptors", cost="O(N C (m + n))")
class DoubleAttention(TimmInitHooks, nn.Module):
    """Double attention block, from "A^2-Nets: Double Attention Networks" (Chen et al., NeurIPS 2018,
    arXiv 1810.11579), as the paper describes it (no official code was released): A = conv_a(x)
    (1x1, C -> m, the features to gather), B = softmax over the N positions of conv_b(x) (1x1, C -> n;
    n attention maps), gather G = A B^T (m x n global descriptors, second-order attention pooling);
    V = softmax over the n descriptors of conv_v(x) (1x1, C -> n) at each position, distribute
    Z = G V (m x N); y = x + conv_out(Z) (1x1, m -> C, with bias). m = `mid_channels`, n =
    `num_descriptors`, both C * rd_ratio = C/4 by default: the paper's exact (m, n) for its ResNet-50
    blocks could not be checked here, so C/4 is a reduction-style default, not a quoted setting.
    `zero_init=True` (default; not in the paper) zero-initialises conv_out so that the block is an
    identity at init, as the non-local block's zero BN, which keeps a pretrained backbone intact when the
    block is inserted; `zero_init=False` keeps PyTorch's default init. Both softmaxes run in fp32.
    act_layer is accepted and ignored (no activation). The product is associated as (A B^T) V: cost
    O(N C (m + n) + N m n) time and O(N (m + n)) memory, N = H*W; A (B^T V) would build an N x N matrix.
    """

    def __init__(self, channels: int, *, rd_ratio: float = 0.25, mid_channels: int | None = None,
                 num_descriptors: int | None = None, zero_init: bool = True, act_layer=None,
                 device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        check_channels(name, channels)
        dd = factory(device, dtype)
        self.channels = channels
        self.mid_channels = m = _width(name, "mid_channels", channels, rd_ratio, mid_channels)
        self.num_descriptors = n = _width(name, "num_descriptors", channels, rd_ratio, num_descriptors)
        self.conv_a = nn.Conv2d(channels, m, 1, **dd)
        self.conv_b = nn.Conv2d(channels, n, 1, **dd)
        self.conv_v = nn.Conv2d(channels, n, 1, **dd)
        self.conv_out = nn.Conv2d(m, channels, 1, **dd)
        self.zero_init = bool(zero_init)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """With `zero_init`, conv_out = 0 (identity at init); the convs keep PyTorch's default init."""
        if self.zero_init:
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    def attend(self, x: Tensor) -> Tensor:
        """Z = (A B^T) V as a (B, m, H, W) map, before conv_out and the residual."""
        b, _, h, w = x.shape
        a = self.conv_a(x).reshape(b, self.mid_channels, h * w)
        gather = _softmax(self.conv_b(x).reshape(b, self.num_descriptors, h * w), dim=2)      # over positions
        distribute = _softmax(self.conv_v(x).reshape(b, self.num_descriptors, h * w), dim=1)  # over descriptors
        g = torch.bmm(a, gather.transpose(1, 2))                                              # (B, m, n)
        return torch.bmm(g, distribute).reshape(b, self.mid_channels, h, w)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_input(self, x, self.channels)
        return x + self.conv_out(self.attend(x))

    def extra_repr(self) -> str:
        return f"mid_channels={self.mid_channels}, num_descriptors={self.num_descriptors}"
