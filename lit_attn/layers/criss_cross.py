"""CCNet: recurrent criss-cross attention, as a plug-in block.

CCNet: Criss-Cross Attention for Semantic Segmentation (Huang et al., ICCV 2019 / TPAMI 2020,
arXiv 1811.11721). Official code: speedinghzl/CCNet (`cc_attention/functions.py`,
`networks/ccnet.py` `RCCAModule`); mmcv's `mmcv/ops/cc_attention.py` (the einsum form used by
mmsegmentation's `CCHead`). The parameter names follow both (`query_conv`, `key_conv`, `value_conv`,
`gamma`), so their weights load directly (mmcv stores gamma as `gamma.scale`: rename it).
The RCCA head's 3x3 convs around the attention live with the heads; here is the attention itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.criss_cross import criss_cross_attention_packed
from ..registry import GLOBAL, register_attn
from ._utils import TimmInitHooks, check_channels, check_input, factory

_PAPER = "CCNet: Criss-Cross Attention for Semantic Segmentation (ICCV 2019, arXiv 1811.11721)"


@register_attn("criss_cross", family="ccnet", kind=GLOBAL, paper=_PAPER, year=2019,
               attends="row + column positions (recurrent)", cost="O(N (H + W) C)")
class CrissCrossAttention(TimmInitHooks, nn.Module):
    """Recurrent criss-cross attention (RCCA), from "CCNet: Criss-Cross Attention for Semantic
    Segmentation" (Huang et al., ICCV 2019, arXiv 1811.11721): query and key 1x1 convs C -> C/8
    (`reduction`, with bias), value 1x1 conv C -> C (with bias); each pixel takes one joint softmax
    over the H + W - 1 positions of its row and column (itself once, no 1/sqrt(d) scaling), and
    y = gamma * out + x with a scalar gamma initialised to 0 (identity at init). The step is applied
    `recurrence` times with the same weights (R = 2, the paper's and the README's setting, so that
    every pixel reaches every other; note that the official train.py defaults to `--recurrence 0`,
    i.e. no attention, and evaluate.py to 1). `rd_ratio` (or `rd_channels`) overrides `reduction`;
    act_layer is accepted and ignored (no activation). Same maths as the official and mmcv code
    (mmcv's einsum form is the benchmark reference); the three 1x1 convs run as one GEMM on a
    concatenated weight and the attention through `lit_attn.ops.criss_cross_attention_packed`
    (no N x N tensor, no -inf mask, fp32 softmax under autocast), computed channels_last; the output
    has the input's memory format. Cost per step O(N (H + W) C + N C^2) time, O(N C) memory, N = H*W.
    """

    def __init__(self, channels: int, *, recurrence: int = 2, reduction: int = 8, rd_ratio: float | None = None,
                 rd_channels: int | None = None, act_layer=None, device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        check_channels(name, channels)
        if not isinstance(recurrence, int) or recurrence < 1:
            raise ValueError(f"{name}: recurrence must be an integer >= 1, got {recurrence!r}")
        if rd_channels is None:
            if rd_ratio is not None and not rd_ratio > 0:
                raise ValueError(f"{name}: rd_ratio must be > 0, got {rd_ratio!r}")
            if rd_ratio is None and (not isinstance(reduction, int) or reduction < 1):
                raise ValueError(f"{name}: reduction must be a positive integer, got {reduction!r}")
            rd_channels = max(1, int(channels * rd_ratio) if rd_ratio is not None else channels // reduction)
        elif not isinstance(rd_channels, int) or rd_channels < 1:
            raise ValueError(f"{name}: rd_channels must be a positive integer, got {rd_channels!r}")
        dd = factory(device, dtype)
        self.channels = channels
        self.recurrence = recurrence
        self.query_conv = nn.Conv2d(channels, rd_channels, 1, **dd)
        self.key_conv = nn.Conv2d(channels, rd_channels, 1, **dd)
        self.value_conv = nn.Conv2d(channels, channels, 1, **dd)
        self.gamma = nn.Parameter(torch.zeros(1, **dd))

    def reset_parameters(self) -> None:
        """gamma = 0 (identity at init); the convs keep PyTorch's default init, as official."""
        nn.init.zeros_(self.gamma)

    def project(self, x: Tensor) -> Tensor:
        """The three 1x1 convs as one GEMM, cat([q, k, v], 1), laid out channels_last (as the attention reads it)."""
        weight = torch.cat([self.query_conv.weight, self.key_conv.weight, self.value_conv.weight])
        bq, bk, bv = self.query_conv.bias, self.key_conv.bias, self.value_conv.bias
        assert bq is not None and bk is not None and bv is not None  # built with biases (narrows them for TorchScript)
        bias = torch.cat([bq, bk, bv])
        if x.is_contiguous(memory_format=torch.channels_last):
            return F.conv2d(x, weight, bias)
        b, c, h, w = x.shape  # NCHW: (HW, C) x (C, C') GEMMs read x in place and write channels_last
        qkv = torch.baddbmm(bias, x.flatten(2).transpose(1, 2), weight.flatten(1).t().expand(b, c, -1))
        return qkv.view(b, h, w, -1).permute(0, 3, 1, 2)

    def step(self, x: Tensor) -> Tensor:
        """One criss-cross step, gamma * attention(x) + x."""
        return criss_cross_attention_packed(self.project(x), self.query_conv.out_channels, self.gamma, x)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_input(self, x, self.channels)
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        for _ in range(self.recurrence):
            x = self.step(x)  # channels_last out
        return x.contiguous(memory_format=fmt)  # the input's layout (a no-op for channels_last inputs)

    def extra_repr(self) -> str:
        return f"recurrence={self.recurrence}"
