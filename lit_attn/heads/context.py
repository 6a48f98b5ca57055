"""The generic attention context head: mmseg's NLHead / GCHead pattern with any lit_attn block.

mmsegmentation's NLHead, GCHead, CCHead and DNLHead are all one FCNHead (num_convs=2,
concat_input=True) with a context block between its two convs:
conv3x3 -> block -> conv3x3 -> concat([x, out]) -> conv3x3 -> Dropout2d -> 1x1 classifier.
`AttnHead` is that head for any registered block name (or class, or module); `CCHead`, `NLHead`,
`DNLHead` and `GCHead` are mmseg's heads of that form with their block and config values fixed, and
`GloReHead` / `A2Head` the same pattern for two methods mmseg does not ship (DANet's head: `danet.py`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..registry import HEAD, create_attn, get_attn_entry
from .fcn import FCNHead, LayerSpec, resolve_norm_layer

__all__ = ["A2Head", "AttnHead", "CCHead", "DNLHead", "GCHead", "GloReHead", "NLHead", "build_attention"]


def build_attention(attention: str | type | nn.Module | None, channels: int,
                    attention_kwargs: Mapping[str, Any] | None = None, *, where: str = "AttnHead") -> nn.Module:
    """The block `lit_attn.create_attn(attention, channels, **attention_kwargs)`, nn.Identity for None.

    Plug-in blocks (kind "gate"/"global") and conv-kind blocks (built channels -> channels, e.g.
    "aa_conv") are accepted; head-only blocks (kind "head", they need extra inputs) are not.
    """
    kwargs = dict(attention_kwargs or {})
    if attention is None or (isinstance(attention, str) and attention.lower() in ("", "none", "identity")):
        if kwargs:
            raise ValueError(f"{where}: attention_kwargs {kwargs} given without an attention block")
        return nn.Identity()
    if isinstance(attention, str):
        entry = get_attn_entry(attention)  # a KeyError listing the known names for an unknown one
        if entry.kind == HEAD:
            raise ValueError(f"{where}: {attention!r} is a head-only block (kind 'head'); it needs the head "
                             f"built for it, not the generic AttnHead")
    elif not (isinstance(attention, nn.Module) or callable(attention)):
        raise ValueError(f"{where}: attention must be a registered block name, a class, a module or None, "
                         f"got {attention!r}")
    elif isinstance(attention, nn.Module) and kwargs:
        raise ValueError(f"{where}: attention_kwargs cannot be applied to an already built module")
    return create_attn(attention, channels, **kwargs)


class AttnHead(FCNHead):
    """Attention context head: FCNHead(num_convs=2, concat_input=True) with an attention block between
    `convs[0]` and `convs[1]`, as mmseg's NLHead (`nl_block`) and GCHead (`gc_block`).

    forward: out = convs[1](attn(convs[0](x))); out = conv_cat(concat([x, out])); conv_seg(dropout(out)).
    `attention` is a registered lit_attn name (`lit_attn.list_attn()`), a block class or a built module,
    created by `lit_attn.create_attn(attention, channels, **attention_kwargs)`: a plug-in block
    (C -> C) or a conv-kind one (built channels -> channels); None gives mmseg's FCN-D8 head (no block).
    The block keeps its own (paper) init; the convs get mmseg's. Extra FCNHead options (kernel_size,
    dilation, norm_layer, act_layer) pass through; num_convs and concat_input are fixed, as in mmseg.
    Parameters: those of FCNHead(in, channels, K) plus the block's; for in=2048, channels=512 the convs
    and classifier hold 9 * 512 * (2048 + 512 + 2560) + 3 * 1024 + 513 K.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, *,
                 attention: str | type | nn.Module | None = "psa_p", attention_kwargs: dict[str, Any] | None = None,
                 dropout: float = 0.1, kernel_size: int = 3, dilation: int = 1,
                 norm_layer: LayerSpec = nn.BatchNorm2d, act_layer: LayerSpec = nn.ReLU):
        attn = build_attention(attention, channels, attention_kwargs, where=type(self).__name__)
        super().__init__(in_channels, channels, num_classes, num_convs=2, kernel_size=kernel_size,
                         dilation=dilation, concat_input=True, dropout=dropout, norm_layer=norm_layer,
                         act_layer=act_layer)
        self.attention_name = attention if isinstance(attention, str) else (
            None if attention is None else getattr(attention, "__name__", type(attention).__name__))
        self.attn = attn

    def attention_modules(self) -> tuple[nn.Module, ...]:
        attn = getattr(self, "attn", None)
        return () if attn is None or isinstance(attn, nn.Identity) else (attn,)

    def context(self, x: Tensor) -> Tensor:
        out = self.convs[0](x)
        out = self.attn(out)
        return self.convs[1](out)

    def extra_repr(self) -> str:
        return f"attention={self.attention_name!r}"


# ------------------------------------------------------------------------------------ mmseg's named heads
def _inner_ratio(name: str, channels: int, reduction: int) -> float:
    """An rd_ratio for which a block's `int(channels * rd_ratio)` is exactly mmcv's `channels // reduction`."""
    if not isinstance(reduction, int) or isinstance(reduction, bool) or reduction < 1:
        raise ValueError(f"{name}: reduction must be a positive int, got {reduction!r}")
    inner = channels // reduction if isinstance(channels, int) else 0
    if inner < 1:
        raise ValueError(f"{name}: channels // reduction must be >= 1, got channels={channels!r}, "
                         f"reduction={reduction}")
    return (inner + 0.5) / channels


def _has_norm(norm_layer: LayerSpec) -> bool:
    return resolve_norm_layer(norm_layer) is not None


class CCHead(AttnHead):
    """CCNet decode head, from "CCNet: Criss-Cross Attention for Semantic Segmentation" (Huang et al., ICCV 2019,
    arXiv 1811.11721), as mmseg's `CCHead` (`mmseg/models/decode_heads/cc_head.py@3f8d34e`, config
    `ccnet_r50-d8.py`: channels 512, recurrence 2): FCNHead(num_convs=2, concat_input=True) with mmcv's
    `CrissCrossAttention(channels)` applied `recurrence` times (same weights) between convs[0] and convs[1].
    The block is lit_attn's `criss_cross` (q/k 1x1 C -> C/8, v 1x1 C -> C, all with bias, scalar gamma 0), which
    runs the recurrences itself: same maths, parameters and init as mmcv >= 1.3.13 (no compiled op; no -inf mask
    and no (B, H, W, H + W) logits tensor). State dict: mmseg's `cca.*` is `attn.*` here and mmcv's 0-d
    `gamma.scale` is the (1,) `gamma`. Cost per recurrence O(N (H + W) C), N = H*W. R-50-D8, K = 19:
    23,934,100 parameters, as mmseg.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, *, recurrence: int = 2,
                 dropout: float = 0.1, kernel_size: int = 3, dilation: int = 1,
                 norm_layer: LayerSpec = nn.BatchNorm2d, act_layer: LayerSpec = nn.ReLU):
        if not isinstance(recurrence, int) or isinstance(recurrence, bool) or recurrence < 1:
            raise ValueError(f"CCHead: recurrence must be an int >= 1, got {recurrence!r}")
        super().__init__(in_channels, channels, num_classes, attention="criss_cross",
                         attention_kwargs={"recurrence": recurrence, "reduction": 8}, dropout=dropout,
                         kernel_size=kernel_size, dilation=dilation, norm_layer=norm_layer, act_layer=act_layer)
        self.recurrence = recurrence

    def extra_repr(self) -> str:
        return f"recurrence={self.recurrence}"


_NL_MODES = ("embedded_gaussian", "dot_product", "gaussian", "concatenation")


class NLHead(AttnHead):
    """Non-local decode head, from "Non-local Neural Networks" (Wang et al., CVPR 2018, arXiv 1711.07971), as
    mmseg's `NLHead` (`mmseg/models/decode_heads/nl_head.py@5563185`, config `nonlocal_r50-d8.py`: channels 512,
    reduction 2, use_scale True, embedded Gaussian): FCNHead(num_convs=2, concat_input=True) with mmcv's
    `NonLocal2d(channels, reduction, use_scale, norm_cfg=head's)` between convs[0] and convs[1]. The block is
    lit_attn's `nonlocal` (g/theta/phi 1x1 C -> C // reduction with bias, softmax(theta . phi / sqrt(C'))
    through a fused kernel, out = x + BN(W_z y)); init as mmcv (g/theta/phi N(0, 0.01), bias 0, output BN
    weight and bias 0: identity at init; W_z without a bias when a norm follows, as mmcv's conv_out).
    Differences from mmcv: W_z is N(0, 0.01) where mmcv leaves ConvModule's kaiming init (its gradient is zero until the
    BN weight moves), the block's norm is always BatchNorm2d (mmcv uses the head's norm; norm_layer=None drops
    it and zero-inits W_z, as mmcv). `mode` accepts mmcv's four; use_scale applies to embedded_gaussian only,
    as mmcv. State dict: mmseg `nl_block.{g,theta,phi}.conv` -> `attn.{g,theta,phi}`, `conv_out.conv` ->
    `attn.w_z`, `conv_out.bn` -> `attn.norm`. Cost O(N^2 C) time, O(N C) memory (no N x N matrix; mmcv builds
    it), N = H*W. R-50-D8, K = 19: 24,131,859 parameters, as mmseg.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, *, reduction: int = 2,
                 use_scale: bool = True, mode: str = "embedded_gaussian", dropout: float = 0.1,
                 kernel_size: int = 3, dilation: int = 1, norm_layer: LayerSpec = nn.BatchNorm2d,
                 act_layer: LayerSpec = nn.ReLU):
        if mode not in _NL_MODES:
            raise ValueError(f"NLHead: mode must be one of {_NL_MODES}, got {mode!r}")
        kwargs = {"mode": mode, "rd_ratio": _inner_ratio("NLHead", channels, reduction),
                  "use_scale": bool(use_scale) if mode == "embedded_gaussian" else None,
                  "norm": _has_norm(norm_layer), "out_bias": not _has_norm(norm_layer)}
        super().__init__(in_channels, channels, num_classes, attention="nonlocal", attention_kwargs=kwargs,
                         dropout=dropout, kernel_size=kernel_size, dilation=dilation, norm_layer=norm_layer,
                         act_layer=act_layer)
        self.reduction, self.use_scale, self.mode = reduction, bool(use_scale), mode

    def extra_repr(self) -> str:
        return f"reduction={self.reduction}, use_scale={self.use_scale}, mode={self.mode!r}"


class DNLHead(AttnHead):
    """Disentangled non-local decode head, from "Disentangled Non-Local Neural Networks" (Yin et al., ECCV 2020,
    arXiv 2006.06668), as mmseg's `DNLHead` (`mmseg/models/decode_heads/dnl_head.py@3f8d34e`, config
    `dnl_r50-d8.py`: channels 512, reduction 2, use_scale True, temperature 0.05): FCNHead(num_convs=2,
    concat_input=True) with mmseg's `DisentangledNonLocal2d` between convs[0] and convs[1]. The block is
    lit_attn's `dnl_mmseg`: theta/phi/g 1x1 C -> C // reduction with bias, whitened pairwise softmax scaled by
    1/sqrt(C') and 1/temperature plus the unary softmax-mask term (conv_mask 1x1 C -> 1), out =
    x + BN(conv_out(pairwise + unary)) (conv_out without bias), mmcv's init (identity at init) and mmseg's
    module names (`dnl_block.*` keys load as `attn.*`). `conv_out_form="per_term"` applies conv_out to each
    term separately (see `DisentangledNonLocal2d`; "sum", the default, is every released mmseg's code). Same
    maths and parameter count as mmseg; only the embedded-Gaussian mode exists (the only one mmseg's DNL
    scales by the temperature), and the block's norm is always BatchNorm2d (mmseg uses the head's norm_cfg).
    Cost O(N^2 C) time, O(N C) memory (no N x N matrix; mmseg builds it), N = H*W. R-50-D8, K = 19:
    24,132,372 parameters, as mmseg.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, *, reduction: int = 2,
                 use_scale: bool = True, mode: str = "embedded_gaussian", temperature: float = 0.05,
                 conv_out_form: str = "sum", dropout: float = 0.1, kernel_size: int = 3, dilation: int = 1,
                 norm_layer: LayerSpec = nn.BatchNorm2d, act_layer: LayerSpec = nn.ReLU):
        if mode != "embedded_gaussian":
            raise ValueError(f"DNLHead: only mode='embedded_gaussian' is implemented, got {mode!r}")
        kwargs = {"mode": "mmseg", "temperature": temperature, "use_scale": bool(use_scale),
                  "rd_ratio": _inner_ratio("DNLHead", channels, reduction), "conv_out_form": conv_out_form}
        super().__init__(in_channels, channels, num_classes, attention="dnl_mmseg", attention_kwargs=kwargs,
                         dropout=dropout, kernel_size=kernel_size, dilation=dilation, norm_layer=norm_layer,
                         act_layer=act_layer)
        self.reduction, self.use_scale, self.mode, self.temperature = reduction, bool(use_scale), mode, temperature

    def extra_repr(self) -> str:
        form = f", conv_out_form={self.attn.conv_out_form!r}" if self.attn.conv_out_form != "sum" else ""
        return f"reduction={self.reduction}, use_scale={self.use_scale}, temperature={self.temperature}{form}"


_GC_POOLING = ("att", "avg")
_GC_FUSION = ("channel_add", "channel_mul")


class GCHead(AttnHead):
    """Global-context decode head, from "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond"
    (Cao et al., ICCVW 2019, arXiv 1904.11492), as mmseg's `GCHead` (`mmseg/models/decode_heads/gc_head.py@3f8d34e`,
    config `gcnet_r50-d8.py`: channels 512, ratio 1/4, pooling 'att', fusion ('channel_add',)): FCNHead(num_convs=2,
    concat_input=True) with mmcv's `ContextBlock` between convs[0] and convs[1]. The block is timm's
    `GlobalContext` (registered `gc`) with use_attn = pooling 'att', fuse_add = 'channel_add', fuse_scale =
    'channel_mul' and rd_channels = int(C * ratio) (mmcv's rounding; timm's own rounds half up): softmax attention
    pooling (conv 1x1 C -> 1) to one context vector, then 1x1 C -> C*ratio, LayerNorm, ReLU, 1x1 back to C, added
    (and/or a sigmoid gate), the same maths and parameter count as mmcv. Set here to match mmcv where timm
    differs: the LayerNorm eps 1e-5 (timm's LayerNorm2d: 1e-6), the last conv of each fusion MLP zero weight
    *and* bias (timm zeroes only the add branch's weight, leaving a random bias, so the block is not the
    identity at init) and a zero conv_attn bias (both kaiming-normal fan_in weights). State dict: mmcv
    `gc_block.conv_mask` -> `attn.conv_attn`, `channel_add_conv.{0,1,3}` -> `attn.mlp_add.{fc1,norm,fc2}` (the
    LayerNorm weight is (C',) here, (C', 1, 1) in mmcv). Cost O(N C) + O(C^2 / 2), N = H*W. R-50-D8, K = 19:
    23,738,260 parameters, as mmseg.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, *, ratio: float = 1 / 4,
                 pooling_type: str = "att", fusion_types: tuple[str, ...] = ("channel_add",),
                 dropout: float = 0.1, kernel_size: int = 3, dilation: int = 1,
                 norm_layer: LayerSpec = nn.BatchNorm2d, act_layer: LayerSpec = nn.ReLU):
        if pooling_type not in _GC_POOLING:
            raise ValueError(f"GCHead: pooling_type must be one of {_GC_POOLING}, got {pooling_type!r}")
        if (not isinstance(fusion_types, (list, tuple)) or not fusion_types
                or any(f not in _GC_FUSION for f in fusion_types)):
            raise ValueError(f"GCHead: fusion_types must be a non-empty tuple of {_GC_FUSION}, got {fusion_types!r}")
        planes = int(channels * ratio) if isinstance(channels, int) and ratio > 0 else 0
        if planes < 1:
            raise ValueError(f"GCHead: int(channels * ratio) must be >= 1, got channels={channels!r}, ratio={ratio!r}")
        kwargs = {"use_attn": pooling_type == "att", "fuse_add": "channel_add" in fusion_types,
                  "fuse_scale": "channel_mul" in fusion_types, "rd_channels": planes}
        super().__init__(in_channels, channels, num_classes, attention="gc", attention_kwargs=kwargs,
                         dropout=dropout, kernel_size=kernel_size, dilation=dilation, norm_layer=norm_layer,
                         act_layer=act_layer)
        self.ratio, self.pooling_type, self.fusion_types = ratio, pooling_type, tuple(fusion_types)
        self.reset_block_parameters()

    @torch.no_grad()
    def reset_block_parameters(self) -> None:
        """mmcv ContextBlock's init and LayerNorm eps on timm's GlobalContext (see the class docstring)."""
        gc = self.attn
        if gc.conv_attn is not None:
            nn.init.kaiming_normal_(gc.conv_attn.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(gc.conv_attn.bias)
        for mlp in (gc.mlp_add, gc.mlp_scale):
            if mlp is not None:
                mlp.fc1.reset_parameters()
                mlp.norm.reset_parameters()
                mlp.norm.eps = 1e-5
                nn.init.zeros_(mlp.fc2.weight)
                nn.init.zeros_(mlp.fc2.bias)

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, pooling_type={self.pooling_type!r}, fusion_types={self.fusion_types}"


class GloReHead(AttnHead):
    """GloRe decode head, from "Graph-Based Global Reasoning Networks" (Chen et al., CVPR 2019, arXiv 1811.12814):
    the GloRe README's Cityscapes model "FCN + 1 GloRe unit" (facebookresearch/GloRe; its segmentation code was
    not released, and mmseg has no GloRe head), built as mmseg's NLHead pattern: FCNHead(num_convs=2,
    concat_input=True) with one `glore` unit between convs[0] and convs[1] (state 1x1 C -> 2 * num_mid, projection
    1x1 C -> num_mid nodes, one GCN, reverse projection, x + BN(conv_extend(.)) with zero BN weight; num_mid
    defaults to C / 4 as the official R50 units). `normalize=True` (default here; the unit's official default is
    False) divides the node features by H*W: a segmentation head is trained on crops and tested on whole images,
    and without it the unit's output grows with the input area. Cost O(N C^2) time, O(N C) memory, N = H*W.
    R-50-D8, K = 19: 24,016,915 parameters.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, *, num_mid: int | None = None,
                 normalize: bool = True, dropout: float = 0.1, kernel_size: int = 3, dilation: int = 1,
                 norm_layer: LayerSpec = nn.BatchNorm2d, act_layer: LayerSpec = nn.ReLU):
        super().__init__(in_channels, channels, num_classes, attention="glore",
                         attention_kwargs={"num_mid": num_mid, "normalize": bool(normalize)}, dropout=dropout,
                         kernel_size=kernel_size, dilation=dilation, norm_layer=norm_layer, act_layer=act_layer)
        self.normalize = bool(normalize)

    def extra_repr(self) -> str:
        return f"num_mid={self.attn.num_n}, normalize={self.normalize}"


class A2Head(AttnHead):
    """A^2-Net decode head, from "A^2-Nets: Double Attention Networks" (Chen et al., NeurIPS 2018,
    arXiv 1810.11579), which released no code and reports no segmentation model (mmseg has no A2 head): mmseg's
    NLHead pattern, FCNHead(num_convs=2, concat_input=True) with one `a2` double-attention block between
    convs[0] and convs[1] (gather m = mid_channels features with n = num_descriptors position-softmax maps,
    distribute with a descriptor-softmax, x + conv_out(.); m = n = C / 4 by default; conv_out zero-initialised,
    so the block starts as the identity). Cost O(N C (m + n)) time, O(N (m + n)) memory, N = H*W. R-50-D8,
    K = 19: 23,868,819 parameters.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, *, mid_channels: int | None = None,
                 num_descriptors: int | None = None, zero_init: bool = True, dropout: float = 0.1,
                 kernel_size: int = 3, dilation: int = 1, norm_layer: LayerSpec = nn.BatchNorm2d,
                 act_layer: LayerSpec = nn.ReLU):
        super().__init__(in_channels, channels, num_classes, attention="a2",
                         attention_kwargs={"mid_channels": mid_channels, "num_descriptors": num_descriptors,
                                           "zero_init": zero_init},
                         dropout=dropout, kernel_size=kernel_size, dilation=dilation, norm_layer=norm_layer,
                         act_layer=act_layer)

    def extra_repr(self) -> str:
        return f"mid_channels={self.attn.mid_channels}, num_descriptors={self.attn.num_descriptors}"
