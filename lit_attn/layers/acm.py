"""APCNet's Adaptive Context Module (ACM), as a plug-in block.

Adaptive Pyramid Context Network for Semantic Segmentation (He, Deng, Zhou, Wang, Qiao, CVPR 2019; no
arXiv version). The official code was not released; the reference is mmsegmentation's
`mmseg/models/decode_heads/apc_head.py` (`ACM`, `APCHead`). Each pixel takes a sigmoid-weighted sum of
the s x s average-pooled regions of the map, with weights predicted from the pixel's feature plus a
global (image-level) feature: "global-guided local affinity". The APCHead (several ACMs with
s in (1, 2, 3, 6), concatenated with the input) lives with the heads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.pooling import adaptive_avg_pool2d
from ..registry import GLOBAL, register_attn
from ._utils import TimmInitHooks, check_channels, check_input, factory
from .conv_module import ConvModule

_PAPER = "Adaptive Pyramid Context Network for Semantic Segmentation (CVPR 2019, no arXiv id)"


@register_attn("acm", family="apcnet", kind=GLOBAL, paper=_PAPER, year=2019,
               attends="s x s pooled regions (per-pixel sigmoid affinity)", cost="O(N s^2 C + N C^2)")
class ACM(TimmInitHooks, nn.Module):
    """Adaptive Context Module, from "Adaptive Pyramid Context Network for Semantic Segmentation"
    (He et al., CVPR 2019, no arXiv id), as mmseg's `ACM` (no official code): with ConvModule =
    1x1 conv (no bias) + BN + ReLU, pooled = pooled_redu_conv(adaptive_avg_pool(x, s)) (s^2 regions),
    x' = input_redu_conv(x), affinity = sigmoid(gla(x' + global_info(GAP(x')))) with gla a plain 1x1
    conv C' -> s^2 (a sigmoid per pixel and region, not a softmax), z = affinity @ pooled (B, C', N),
    y = ReLU(residual_conv(z) + x') and, with `fusion` (default, as APCHead), y = fusion_conv(y).
    Channels: `channels` is the input C (mmseg's in_channels); `out_channels` C' (mmseg's `channels`)
    defaults to C, so the plug-in maps C -> C; the APCHead builds ACM(2048, out_channels=512,
    pool_scale=s) for s in (1, 2, 3, 6). pool_scale defaults to 3 (the paper and mmseg only use the
    four together; 3 is our single-scale choice). The output is not a residual of x (no identity at
    init, none in the paper). Submodule names and layout follow mmseg (`conv`/`bn` children), so its
    state dicts load by key, and its init is mmcv's (kaiming fan_out). act_layer/norm_layer set the
    conv-norm-act units (ReLU, BatchNorm2d; the ReLU after the residual sum is fixed, as mmseg);
    rd_ratio is accepted and ignored. In training,
    BN sees the (B, C', 1, 1) global feature, so batch size 1 fails there (as mmseg with BN).
    Cost O(N C C' + N C'^2 + N s^2 C') time, O(N (C' + s^2)) memory, N = H*W. The s x s pooling goes
    through `lit_attn.ops.pooling.adaptive_avg_pool2d` (matrix products with the same bins while exporting,
    so ONNX export works at any H, W).
    """

    def __init__(self, channels: int, *, out_channels: int | None = None, pool_scale: int = 3, fusion: bool = True,
                 rd_ratio: float | None = None, act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d,
                 device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        check_channels(name, channels)
        out = channels if out_channels is None else out_channels
        check_channels(name, out)
        if not isinstance(pool_scale, int) or pool_scale < 1:
            raise ValueError(f"{name}: pool_scale must be a positive integer, got {pool_scale!r}")
        dd = factory(device, dtype)
        cna = dict(norm_layer=norm_layer, act_layer=act_layer or nn.ReLU, **dd)
        self.channels, self.out_channels, self.pool_scale, self.fusion = channels, out, pool_scale, bool(fusion)
        self.pooled_redu_conv = ConvModule(channels, out, 1, **cna)
        self.input_redu_conv = ConvModule(channels, out, 1, **cna)
        self.global_info = ConvModule(out, out, 1, **cna)
        self.gla = nn.Conv2d(out, pool_scale**2, 1, **dd)
        self.residual_conv = ConvModule(out, out, 1, **cna)
        self.fusion_conv = ConvModule(out, out, 1, **cna) if self.fusion else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmcv's ConvModule init (kaiming normal fan_out, norm weight 1 / bias 0), as mmseg's ACM."""
        for m in self.modules():
            if isinstance(m, ConvModule):
                m.init_weights()

    def affinity(self, x_red: Tensor) -> Tensor:
        """(B, s^2, H, W) sigmoid affinities of each pixel of x' = input_redu_conv(x) to the s^2 regions."""
        return torch.sigmoid(self.gla(x_red + self.global_info(F.adaptive_avg_pool2d(x_red, 1))))

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_input(self, x, self.channels)
        pooled = self.pooled_redu_conv(adaptive_avg_pool2d(x, self.pool_scale)).flatten(2)  # (B, C', s^2)
        x_red = self.input_redu_conv(x)
        z = torch.matmul(pooled, self.affinity(x_red).flatten(2))                              # (B, C', N)
        z = self.residual_conv(z.unflatten(2, x_red.shape[-2:]))
        out = self.fusion_conv(F.relu(z + x_red))
        # a ReLU's backward reads its output, and callers modify the block's output in place (timm's
        # BasicBlock: x += shortcut): hand back a copy when autograd records the graph
        return out.clone() if out.requires_grad else out

    def extra_repr(self) -> str:
        return f"out_channels={self.out_channels}, pool_scale={self.pool_scale}, fusion={self.fusion}"
