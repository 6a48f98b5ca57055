"""PSANet's decode head (mmsegmentation's PSAHead) on lit_attn's pure-PyTorch PSAMask.

Zhao, Zhang, Liu, Shi, Loy, Lin, Jia, "PSANet: Point-wise Spatial Attention Network for Scene Parsing",
ECCV 2018 (no arXiv version). The reference is mmsegmentation's `mmseg/models/decode_heads/psa_head.py`
(@3f8d34e; config `configs/_base_/models/psanet_r50-d8.py`) with mmcv's compiled `PSAMask`, replaced here
by `lit_attn.layers.psanet.psa_mask` (same values, no compiled op).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers.psanet import PSA_TYPES, PointwiseSpatialContext
from .fcn import ConvModule, DecodeHead, LayerSpec, check_head_args, check_map

__all__ = ["PSAHead"]


def _pair(name: str, v) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) and not isinstance(v, bool) else tuple(v)
    if len(t) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in t):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {v!r}")
    return t


class PSAHead(PointwiseSpatialContext, DecodeHead):
    """PSANet head ("PSANet: Point-wise Spatial Attention Network for Scene Parsing", Zhao et al., ECCV 2018),
    as mmseg's `PSAHead` (`mmseg/models/decode_heads/psa_head.py`@3f8d34e, config `psanet_r50-d8.py`:
    channels 512, mask_size (97, 97), psa_type 'bi-direction', compact False, shrink_factor 2,
    normalization_factor 1.0, psa_softmax True, Dropout2d 0.1). Layers (ConvModule = conv no bias, norm,
    act), named as mmseg so its state dict loads by key: `reduce` / `reduce_p` 1x1 in -> channels;
    `attention` / `attention_p` = 1x1 ConvModule channels -> channels + 1x1 conv (no bias) to
    mask_h * mask_w; `proj` 1x1 ConvModule (2 *) channels -> in with mmseg's padding=1; `bottleneck` 3x3
    ConvModule 2 * in -> channels on concat([x, proj]); Dropout2d; `conv_seg`. Forward as mmseg: reduce,
    bilinear shrink (both sides odd: ((H-1)//s + 1, align_corners=True), else (H//s, False)), mask logits,
    PSAMask ("collect" for `attention`, "distribute" for `attention_p`; the same values as mmcv's op),
    softmax, bmm, / normalization_factor, concat, proj, resize to H x W
    (same align_corners), bottleneck, cls_seg. mmcv's semantics kept: offsets beyond the mask's half-size
    (shrunk maps wider than (mask - 1)//2 + 1) hold logit 0, so the softmax gives them exp(0) / Z;
    proj's padding adds a constant ring that the resize stretches into the map. Differences: H//s is
    clamped to 1 (mmseg resizes 1 x 2k maps to 0 rows and fails); compact=True is refused (it ties
    mask_h * mask_w to one map size). Cost, N = H*W, N' = N / s^2, per branch: the (B, N', N') attention,
    O(N'^2 C') time and memory O(N'^2), the mask conv O(N' C' mask_h mask_w) (9409 channels at 97 x 97),
    then the 3x3 bottleneck O(18 N C C'); 33,246,739 parameters at C = 2048, C' = 512, 19 classes (as
    mmseg). The pipeline up to `proj` is the `psanet` block's (`PointwiseSpatialContext`, which gathers
    the attention from the masks without the dense PSAMask output); only the bottleneck differs (the
    plug-in maps C -> C, the head 2 * in -> channels).
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, *, mask_size=(97, 97),
                 psa_type: str = "bi-direction", compact: bool = False, shrink_factor: int = 2,
                 normalization_factor: float | None = 1.0, psa_softmax: bool = True, dropout: float = 0.1,
                 norm_layer: LayerSpec = nn.BatchNorm2d, act_layer: LayerSpec = nn.ReLU):
        super().__init__()
        name = type(self).__name__
        check_head_args(name, dropout, in_channels=in_channels, channels=channels, num_classes=num_classes)
        self.mask_size = _pair(f"{name}: mask_size", mask_size)
        if psa_type not in PSA_TYPES:
            raise ValueError(f"{name}: psa_type must be one of {PSA_TYPES}, got {psa_type!r}")
        if compact:
            raise ValueError(f"{name}: compact=True ties the mask channels to one map size; use compact=False "
                             f"(mmseg's default and config)")
        if not isinstance(shrink_factor, int) or isinstance(shrink_factor, bool) or shrink_factor < 1:
            raise ValueError(f"{name}: shrink_factor must be a positive int, got {shrink_factor!r}")
        mask_h, mask_w = self.mask_size
        if normalization_factor is None:           # mmseg's None: the mask area
            normalization_factor = float(mask_h * mask_w)
        if not normalization_factor > 0:
            raise ValueError(f"{name}: normalization_factor must be > 0 or None, got {normalization_factor!r}")
        self.in_channels, self.channels, self.num_classes = in_channels, channels, num_classes
        self.psa_type, self.compact, self.shrink_factor = psa_type, False, shrink_factor
        self.normalization_factor, self.psa_softmax = float(normalization_factor), bool(psa_softmax)
        cm = dict(norm_layer=norm_layer, act_layer=act_layer)

        def attention() -> nn.Sequential:
            return nn.Sequential(ConvModule(channels, channels, 1, **cm),
                                 nn.Conv2d(channels, mask_h * mask_w, kernel_size=1, bias=False))

        self.reduce = ConvModule(in_channels, channels, 1, **cm)
        self.attention = attention()
        if psa_type == "bi-direction":
            self.reduce_p = ConvModule(in_channels, channels, 1, **cm)
            self.attention_p = attention()
        n_branch = 2 if psa_type == "bi-direction" else 1
        self.proj = ConvModule(n_branch * channels, in_channels, 1, padding=1, **cm)   # padding=1 as mmseg
        self.bottleneck = ConvModule(2 * in_channels, channels, 3, **cm)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.init_weights()

    def attention_modules(self) -> tuple[nn.Module, ...]:
        """No lit_attn block inside: every layer is mmseg's and gets mmseg's init."""
        return ()

    def forward_features(self, x: Tensor) -> Tensor:
        """The (B, channels, H, W) features before dropout and the classifier."""
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_map(self, x, self.in_channels)
        out = self.context(x)
        return self.bottleneck(torch.cat([x, out.to(x.dtype)], dim=1))
