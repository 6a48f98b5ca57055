"""OCRHead: mmsegmentation's object-contextual representations head (stage 2 of its cascade) around `ocr`.

Yuan, Chen, Wang, "Object-Contextual Representations for Semantic Segmentation", ECCV 2020,
arXiv 1909.11065, as mmseg's `OCRHead` (`mmseg/models/decode_heads/ocr_head.py`): bottleneck 3x3 ->
soft object regions from the stage-1 logits -> pixel-region attention -> 1x1 fusion -> Dropout2d ->
1x1 classifier. The stage-1 head that produces the region logits is not part of this head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import create_attn
from .fcn import ConvModule, DecodeHead, LayerSpec, check_head_args, check_map, resolve_act_layer, resolve_norm_layer

__all__ = ["OCRHead"]


class OCRHead(DecodeHead):
    """mmsegmentation's OCRHead (OCRNet, Yuan et al., ECCV 2020, arXiv 1909.11065; `mmseg:mmseg/models/
    decode_heads/ocr_head.py@168c883`, config `ocrnet_r50-d8.py@b23982d`: channels 512, ocr_channels 256,
    scale 1, dropout 0.1). forward(x, region_logits): x (B, in_channels, h, w) the last feature map,
    region_logits (B, K', h, w) the raw (pre-softmax) logits of mmseg's stage-1 head, FCNHead(1024, 256, K,
    num_convs=1, concat_input=False) on stage 3 with loss weight 0.4, which the caller builds and runs
    (mmseg's CascadeEncoderDecoder; no auxiliary head besides it; the logits are not detached, so the
    OCR loss also trains stage 1). `bottleneck` = ConvModule(in -> channels, 3x3); `ocr` = lit_attn's
    `ocr` block (ObjectContextBlock with `bias=False, dropout=0`): mmseg's SpatialGatherModule (softmax
    over the pixels of scale * logits, region features (B, C, K', 1)) and ObjectAttentionBlock (2-layer
    1x1 conv-BN-ReLU query/key to ocr_channels, value conv-BN-ReLU to ocr_channels, softmax over the K'
    regions of q.k * ocr_channels^-0.5, out_project conv-BN-ReLU to channels, `bottleneck` 1x1 conv-BN-ReLU
    on concat[context, feats]); then Dropout2d and `conv_seg`. Differences: names (`ocr.object_context_block
    .f_query/f_key/f_value/W`, `ocr.conv_bn_dropout` for mmseg's `query_project/key_project/value_project/
    out_project`, `bottleneck`); `scale` is only the gather scale (mmseg's scale > 1 path also max-pools the
    queries and returns its input, a bug, not reproduced); region logits at another size are resized
    bilinearly to (h, w); the block keeps its PyTorch-default conv init (mmseg: kaiming fan_out; BN after
    each). Parameters at in 2048, channels 512, ocr 256, K classes: 9*2048*512 + 1024 + 1184256 (block) +
    513 K. Cost O(N K' C) for the attention, N = h*w; output (B, num_classes, h, w).
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, *, ocr_channels: int = 256,
                 scale: float = 1.0, dropout: float = 0.1, norm_layer: LayerSpec = nn.BatchNorm2d,
                 act_layer: LayerSpec = nn.ReLU):
        super().__init__()
        name = type(self).__name__
        check_head_args(name, dropout, in_channels=in_channels, channels=channels, num_classes=num_classes,
                        ocr_channels=ocr_channels)
        if not float(scale) > 0:
            raise ValueError(f"{name}: scale must be > 0, got {scale!r}")
        self.in_channels, self.channels, self.num_classes = in_channels, channels, num_classes
        norm, act = resolve_norm_layer(norm_layer), resolve_act_layer(act_layer)
        self.bottleneck = ConvModule(in_channels, channels, 3, norm_layer=norm, act_layer=act)
        self.ocr = create_attn("ocr", channels, key_channels=ocr_channels, scale=scale, dropout=0.0, bias=False,
                               norm_layer=norm, act_layer=act)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.init_weights()

    def attention_modules(self) -> tuple[nn.Module, ...]:
        """The OCR block; `init_weights` leaves it alone."""
        ocr = getattr(self, "ocr", None)
        return () if ocr is None else (ocr,)

    def _check(self, x: Tensor, region_logits: Tensor) -> None:
        check_map(self, x, self.in_channels)
        name = type(self).__name__
        if not isinstance(region_logits, Tensor) or region_logits.ndim != 4 or 0 in region_logits.shape:
            shape = tuple(region_logits.shape) if isinstance(region_logits, Tensor) else type(region_logits).__name__
            raise ValueError(f"{name} expects region_logits (B, K, h, w) (the stage-1 head's logits), got {shape}")
        if region_logits.shape[0] != x.shape[0]:
            raise ValueError(f"{name}: region_logits batch {region_logits.shape[0]} != feature batch {x.shape[0]}")

    def forward_features(self, x: Tensor, region_logits: Tensor) -> Tensor:
        """The (B, channels, h, w) object-contextual features before dropout and the classifier."""
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only checks)
            self._check(x, region_logits)
        if region_logits.shape[-2:] != x.shape[-2:]:
            region_logits = F.interpolate(region_logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.ocr(self.bottleneck(x), region_logits)
