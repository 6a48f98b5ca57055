"""ANNHead: mmsegmentation's asymmetric non-local decode head around lit_attn's `afnb` and `apnb` blocks.

Zhu et al., "Asymmetric Non-local Neural Networks for Semantic Segmentation", ICCV 2019,
arXiv 1908.07678, as mmseg's `ANNHead` (`mmseg/models/decode_heads/ann_head.py`): AFNB fuses stages 3
and 4 -> Dropout2d -> bottleneck 3x3 -> APNB -> Dropout2d -> 1x1 classifier.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..registry import create_attn
from .fcn import ConvModule, DecodeHead, LayerSpec, check_head_args, check_map, resolve_act_layer, resolve_norm_layer

__all__ = ["ANNHead"]


class ANNHead(DecodeHead):
    """mmsegmentation's ANNHead (ANN, Zhu et al., ICCV 2019, arXiv 1908.07678; `mmseg:mmseg/models/
    decode_heads/ann_head.py@034a5c8`, config `ann_r50-d8.py@3f8d34e`: in_channels (1024, 2048), channels
    512, project_channels 256, query_scales (1,), key_pool_scales (1, 3, 6, 8), dropout 0.1).
    forward(x3, x4), x3 (B, c3, h', w') stage 3 (the keys, pooled), x4 (B, c4, h, w) stage 4.
    `fusion` = lit_attn's `afnb` (AFNB: low c3, high c4, out c4, key/value project_channels, dropout 0:
    query 1x1 conv-BN-ReLU of x4, key 1x1 conv-BN-ReLU and value 1x1 conv (bias) of x3, both pooled to
    1+9+36+64 = 110 anchors, softmax of q.k * project_channels^-0.5, zero-init 1x1 out_project (bias) to
    c4, 1x1 conv-BN (no act) on concat[context, x4]); Dropout2d; `bottleneck` = ConvModule(c4 -> channels,
    3x3); `context` = lit_attn's `apnb` (APNB on channels, shared query/key projection, dropout 0, 1x1
    conv-BN-ReLU on concat[context, x]); Dropout2d (the same module, as mmseg) and `conv_seg`. Only
    query_scales=(1,) (other scales crash in mmseg and the official code). Differences: the shared APNB
    projection runs once (mmseg twice: BN running stats updated twice per step); the blocks' ConvModules
    keep PyTorch-default conv init (mmseg: kaiming fan_out; BN after each; the zero out_project init is
    kept). Parameters at (1024, 2048), channels 512, project 256, K classes:
    9968896 (AFNB) + 9*2048*512 + 1024 + 919808 (APNB) + 513 K. Cost O(N S C) with S = 110, N = h*w;
    output (B, num_classes, h, w) at the resolution of x4.
    """

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int, *, project_channels: int = 256,
                 query_scales: Sequence[int] = (1,), key_pool_scales: Sequence[int] = (1, 3, 6, 8),
                 dropout: float = 0.1, norm_layer: LayerSpec = nn.BatchNorm2d, act_layer: LayerSpec = nn.ReLU):
        super().__init__()
        name = type(self).__name__
        if isinstance(in_channels, (str, bytes)) or not isinstance(in_channels, Sequence) or len(in_channels) != 2:
            raise ValueError(f"{name}: in_channels must be a pair (stage-3 channels, stage-4 channels), "
                             f"e.g. (1024, 2048), got {in_channels!r}")
        low, high = in_channels
        check_head_args(name, dropout, low_channels=low, high_channels=high, channels=channels,
                        num_classes=num_classes, project_channels=project_channels)
        if tuple(query_scales) != (1,):
            raise ValueError(f"{name}: only query_scales=(1,) is supported (mmseg's config), got {query_scales!r}")
        self.in_channels, self.channels, self.num_classes = (low, high), channels, num_classes
        norm, act = resolve_norm_layer(norm_layer), resolve_act_layer(act_layer)
        block_norm = nn.BatchNorm2d if norm is None else norm
        block_act = act if act is not None else nn.ReLU
        self.fusion = create_attn("afnb", high, low_channels=low, key_channels=project_channels,
                                  value_channels=project_channels, out_channels=high, pool_sizes=key_pool_scales,
                                  dropout=0.0, norm_layer=block_norm, act_layer=block_act)
        self.bottleneck = ConvModule(high, channels, 3, norm_layer=norm, act_layer=act)
        self.context = create_attn("apnb", channels, key_channels=project_channels, value_channels=project_channels,
                                   pool_sizes=key_pool_scales, dropout=0.0, norm_layer=block_norm, act_layer=block_act)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.init_weights()

    def attention_modules(self) -> tuple[nn.Module, ...]:
        """The AFNB and APNB blocks; `init_weights` leaves them alone."""
        return tuple(m for m in (getattr(self, "fusion", None), getattr(self, "context", None)) if m is not None)

    def _check(self, x3: Tensor, x4: Tensor) -> None:
        low, high = self.in_channels
        check_map(self, x3, low, "stage-3 map x3")
        check_map(self, x4, high, "stage-4 map x4")
        if x3.shape[0] != x4.shape[0]:
            raise ValueError(f"{type(self).__name__}: x3 and x4 need the same batch size, got "
                             f"{tuple(x3.shape)} and {tuple(x4.shape)}")

    def forward_features(self, x3: Tensor, x4: Tensor) -> Tensor:
        """The (B, channels, h, w) features before the last dropout and the classifier."""
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only checks)
            self._check(x3, x4)
        out = self.dropout(self.fusion(x3, x4))
        return self.context(self.bottleneck(out))
