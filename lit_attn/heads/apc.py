"""APCNet's decode head (mmsegmentation's APCHead) around lit_attn's `acm` block.

He, Deng, Zhou, Wang, Qiao, "Adaptive Pyramid Context Network for Semantic Segmentation", CVPR 2019
(no arXiv version, no official code). The reference is mmsegmentation's
`mmseg/models/decode_heads/apc_head.py` (@3f8d34e; config `configs/_base_/models/apcnet_r50-d8.py`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..layers.acm import ACM
from .fcn import ConvModule, DecodeHead, LayerSpec, check_head_args, check_map, resolve_act_layer, resolve_norm_layer

__all__ = ["APCHead"]


class APCHead(DecodeHead):
    """APCNet head ("Adaptive Pyramid Context Network for Semantic Segmentation", He et al., CVPR 2019,
    no arXiv id), as mmseg's `APCHead` (`mmseg/models/decode_heads/apc_head.py`@3f8d34e, config
    `apcnet_r50-d8.py`: channels 512, pool_scales (1, 2, 3, 6), fusion True, Dropout2d 0.1):
    `acm_modules[i]` = lit_attn's `acm` block ACM(in_channels, out_channels=channels, pool_scale=s,
    fusion) per scale, `bottleneck` = 3x3 ConvModule (conv no bias, norm, act) on concat([x, *acm outputs])
    (in + len(pool_scales) * channels -> channels), Dropout2d, `conv_seg` 1x1 to num_classes. Submodule
    names follow mmseg (`acm_modules.i.<...>.conv/bn`, `bottleneck.conv/bn`, `conv_seg`), so an mmseg
    APCHead state dict loads by key; the ACMs' ConvModules get mmcv's init in the block itself. With
    BatchNorm, training needs batch >= 2 (the ACM's global branch normalises a 1x1 map, as mmseg). Cost at
    in C = 2048, C' = 512: 4 ACMs of O(N (2 C C' + 3 C'^2 + s^2 C')) and the 3x3 bottleneck
    O(9 N (C + 4 C') C'), N = H*W; 30,465,605 parameters with 19 classes (as mmseg's APCHead).
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, *,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), fusion: bool = True, dropout: float = 0.1,
                 norm_layer: LayerSpec = nn.BatchNorm2d, act_layer: LayerSpec = nn.ReLU):
        super().__init__()
        name = type(self).__name__
        check_head_args(name, dropout, in_channels=in_channels, channels=channels, num_classes=num_classes)
        if (not isinstance(pool_scales, Sequence) or isinstance(pool_scales, str) or not pool_scales
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in pool_scales)):
            raise ValueError(f"{name}: pool_scales must be a non-empty sequence of positive ints, got {pool_scales!r}")
        self.in_channels, self.channels, self.num_classes = in_channels, channels, num_classes
        self.pool_scales, self.fusion = tuple(pool_scales), bool(fusion)
        block_norm = resolve_norm_layer(norm_layer) or nn.BatchNorm2d
        act = resolve_act_layer(act_layer) or nn.ReLU
        self.acm_modules = nn.ModuleList(
            ACM(in_channels, out_channels=channels, pool_scale=s, fusion=self.fusion, norm_layer=block_norm,
                act_layer=act) for s in self.pool_scales)
        self.bottleneck = ConvModule(in_channels + len(self.pool_scales) * channels, channels, 3,
                                     norm_layer=norm_layer, act_layer=act_layer)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.init_weights()

    def attention_modules(self) -> tuple[nn.Module, ...]:
        """The ACM blocks; `init_weights` leaves them alone."""
        return tuple(self.acm_modules)

    def forward_features(self, x: Tensor) -> Tensor:
        """The (B, channels, H, W) features before dropout and the classifier."""
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_map(self, x, self.in_channels)
        outs = [x]
        for acm in self.acm_modules:
            outs.append(acm(x))
        return self.bottleneck(torch.cat(outs, dim=1))

    def extra_repr(self) -> str:
        return f"pool_scales={self.pool_scales}, fusion={self.fusion}"
