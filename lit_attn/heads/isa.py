"""ISAHead: mmsegmentation's interlaced sparse self-attention decode head around lit_attn's `isa` block.

Huang et al., "Interlaced Sparse Self-Attention for Semantic Segmentation", arXiv 1907.12273, as
mmseg's `ISAHead` (`mmseg/models/decode_heads/isa_head.py`): in_conv 3x3 -> global relation ->
local relation -> out_conv 1x1 on concat[context, in_conv(x)] -> Dropout2d -> 1x1 classifier.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..registry import create_attn
from .fcn import ConvModule, DecodeHead, LayerSpec, check_head_args, check_map, resolve_act_layer, resolve_norm_layer

__all__ = ["ISAHead"]


class ISAHead(DecodeHead):
    """mmsegmentation's ISAHead (ISA, Huang et al., arXiv 1907.12273; `mmseg:mmseg/models/decode_heads/
    isa_head.py@3f8d34e`, config `isanet_r50-d8.py@3f8d34e`: channels 512, isa_channels 256, down_factor
    (8, 8), dropout 0.1). `in_conv` = ConvModule(in -> channels, 3x3); `isa` = lit_attn's `isa` block
    (InterlacedSparseAttention with `context_first=True, value_bias=True, dropout=0, bias=False`), which
    holds mmseg's `global_relation` (`isa.long_range_sa`), `local_relation` (`isa.short_range_sa`; each
    2-layer 1x1 conv-BN-ReLU query/key to isa_channels, a 1x1 value conv with bias, softmax of
    q.k * isa_channels^-0.5, a 1x1 conv-BN-ReLU `output_project` = `W`), the symmetric zero padding to
    multiples of down_factor, the crop, and `out_conv` (`isa.conv_bn`: 1x1 conv-BN-ReLU on
    concat[context, in_conv(x)]); then Dropout2d and `conv_seg` (1x1, bias). Same computation as mmseg
    (groups attended as heads of one attention call instead of a regrouped batch; the norms see the same
    pixels). Differences: submodule names (the block's); the block keeps its PyTorch-default conv init
    where mmseg gives its ConvModules kaiming fan_out (the BN after each makes this a learning-rate-scale
    difference only). Parameters at in 2048, channels 512, isa 256, K classes: 9*2048*512 + 1024 (in_conv)
    + 2 * 921088 (relations) + 525312 (out_conv) + 513 K. Cost O(N C (N / 64 + 64)) for the attention,
    N = h*w padded to multiples of 8; input (B, in_channels, h, w), output (B, num_classes, h, w).
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, *, isa_channels: int = 256,
                 down_factor: int | tuple[int, int] = (8, 8), dropout: float = 0.1,
                 norm_layer: LayerSpec = nn.BatchNorm2d, act_layer: LayerSpec = nn.ReLU):
        super().__init__()
        name = type(self).__name__
        check_head_args(name, dropout, in_channels=in_channels, channels=channels, num_classes=num_classes,
                        isa_channels=isa_channels)
        self.in_channels, self.channels, self.num_classes = in_channels, channels, num_classes
        norm, act = resolve_norm_layer(norm_layer), resolve_act_layer(act_layer)
        self.in_conv = ConvModule(in_channels, channels, 3, norm_layer=norm, act_layer=act)
        self.isa = create_attn("isa", channels, down_factor=down_factor, key_channels=isa_channels,
                               value_channels=channels, context_first=True, bias=False, value_bias=True,
                               dropout=0.0, norm_layer=norm, act_layer=act)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.init_weights()

    def attention_modules(self) -> tuple[nn.Module, ...]:
        """The ISA block; `init_weights` leaves it alone."""
        isa = getattr(self, "isa", None)
        return () if isa is None else (isa,)

    def forward_features(self, x: Tensor) -> Tensor:
        """The (B, channels, h, w) features before dropout and the classifier."""
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_map(self, x, self.in_channels)
        return self.isa(self.in_conv(x))
