"""Object context (openseg.pytorch): the shared self-attention block, Base-OC and OCR.

OCNet: Object Context Network for Scene Parsing (Yuan et al., arXiv 1809.00916, 2018) and
Object-Contextual Representations for Semantic Segmentation (Yuan, Chen, Wang, ECCV 2020,
arXiv 1909.11065). Official code: openseg-group/openseg.pytorch, `lib/models/modules/
base_oc_block.py` (`_SelfAttentionBlock`, `BaseOC_Module`) and `spatial_ocr_block.py`
(`SpatialGather_Module`, `_ObjectAttentionBlock`, `SpatialOCR_Module`); mmsegmentation's
`SelfAttentionBlock` / `OCRHead` are the same computations.

- `SelfAttentionBlock`: the block all three methods (and ISA, `isa.py`) share: two-layer
  conv-norm-act query and key embeddings with separate weights, a value conv, softmax over keys of
  q.k * key_channels^-0.5 through `lit_attn.ops.global_attention` (no N x N matrix), output conv.
  Sub-module names follow openseg (`f_query`, `f_key`, `f_value`, `W`, norm+act nested as
  `ModuleHelper.BNReLU`), so openseg state dicts load with at most a prefix rename.
- `BaseOC` (`base_oc`, plug-in): dense object context, output conv on concat[context, x].
- `ObjectContextBlock` (`ocr`, head block): forward(feats, region_logits) -> refined feats.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import get_act_layer, get_norm_layer
from torch import Tensor, nn

from ..ops import global_attention, map_to_tokens, tokens_to_map
from ..registry import GLOBAL, HEAD, register_attn
from ._utils import TimmInitHooks, check_channels, check_input, factory

_OCNET = "OCNet: Object Context Network for Scene Parsing (arXiv 2018, arXiv 1809.00916)"
_OCR = "Object-Contextual Representations for Semantic Segmentation (ECCV 2020, arXiv 1909.11065)"


def resolve_layers(norm_layer, act_layer):
    """(norm class, act class) from classes or timm names; None means BatchNorm2d / ReLU (official)."""
    norm = get_norm_layer(norm_layer) if norm_layer is not None else nn.BatchNorm2d
    act = get_act_layer(act_layer) if act_layer is not None else nn.ReLU
    return norm, act


def positive_int(block_name: str, what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{block_name}: {what} must be a positive integer, got {value!r}")
    return value


def reduced_channels(block_name: str, channels: int, rd_ratio: float, given: int | None) -> int:
    """`given`, or channels * rd_ratio (at least 1) when None."""
    if given is not None:
        return positive_int(block_name, "key_channels", given)
    if not rd_ratio > 0:
        raise ValueError(f"{block_name}: rd_ratio must be > 0, got {rd_ratio!r}")
    return max(1, int(channels * rd_ratio))


def norm_act(channels: int, norm_layer, act_layer, dd: dict) -> nn.Sequential:
    """norm -> act, nested as openseg's `ModuleHelper.BNReLU` (state-dict names `.0.weight`...)."""
    return nn.Sequential(norm_layer(channels, **dd), act_layer())


def conv_norm_act(in_channels: int, out_channels: int, bias: bool, norm_layer, act_layer, dd: dict) -> nn.Sequential:
    """1x1 conv -> (norm -> act), as openseg's `nn.Conv2d, ModuleHelper.BNReLU` pairs."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=bias, **dd),
                         norm_act(out_channels, norm_layer, act_layer, dd))


def fusion(in_channels: int, out_channels: int, bias: bool, dropout: float, norm_layer, act_layer,
           dd: dict) -> nn.Sequential:
    """1x1 conv -> norm -> act -> Dropout2d on a concatenation (openseg's `conv_bn_dropout`)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=bias, **dd),
                         norm_act(out_channels, norm_layer, act_layer, dd), nn.Dropout2d(dropout))


class SelfAttentionBlock(nn.Module):
    """Self-attention block shared by OCNet, OCRNet and ISA, as openseg.pytorch's
    `SelfAttentionBlock2D` / `_ObjectAttentionBlock` and mmseg's `SelfAttentionBlock` (OCNet,
    arXiv 1809.00916; OCR, ECCV 2020, arXiv 1909.11065; ISA, arXiv 1907.12273). Query `f_query` and
    key `f_key` are separate two-layer 1x1 conv-norm-act embeddings in -> key_channels; `f_value` a
    1x1 conv in -> value_channels (followed by norm-act with `value_norm`, OCR's `f_down`); the
    context softmax_j(q_i . k_j * key_channels^-0.5) v_j goes through `global_attention`, and `W`
    maps it value -> out channels (conv-norm-act with `out_norm`, else a plain conv, zero-initialised
    with `zero_init_out` as Base-OC). `bias` sets the conv biases (openseg OCNet/OCR: True; openseg
    ISA and mmseg: False), `value_bias` the value conv's (default `bias`; mmseg's ISA/DANet value
    conv has one). Keys and values come from `key_feats` (default: the queries' map), which may
    have another spatial size (OCR: the (K, 1) region map). No residual. Cost O(N_q N_k (key +
    value channels)) time and O((N_q + N_k) C) memory, no N_q x N_k matrix in memory.
    """

    def __init__(self, in_channels: int, key_channels: int, value_channels: int, out_channels: int | None = None,
                 *, bias: bool = False, value_bias: bool | None = None, value_norm: bool = False,
                 out_norm: bool = True, zero_init_out: bool = False, norm_layer=None, act_layer=None,
                 device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        check_channels(name, in_channels)
        out_channels = in_channels if out_channels is None else out_channels
        for what, v in (("key_channels", key_channels), ("value_channels", value_channels),
                        ("out_channels", out_channels)):
            positive_int(name, what, v)
        dd = factory(device, dtype)
        norm, act = resolve_layers(norm_layer, act_layer)
        self.in_channels, self.key_channels = in_channels, key_channels
        self.value_channels, self.out_channels = value_channels, out_channels
        self.scale = key_channels ** -0.5
        self.f_query = nn.Sequential(*conv_norm_act(in_channels, key_channels, bias, norm, act, dd),
                                     *conv_norm_act(key_channels, key_channels, bias, norm, act, dd))
        self.f_key = nn.Sequential(*conv_norm_act(in_channels, key_channels, bias, norm, act, dd),
                                   *conv_norm_act(key_channels, key_channels, bias, norm, act, dd))
        if value_norm:
            self.f_value = conv_norm_act(in_channels, value_channels, bias, norm, act, dd)
        else:
            vb = bias if value_bias is None else value_bias
            self.f_value = nn.Conv2d(in_channels, value_channels, 1, bias=vb, **dd)
        if out_norm:
            self.W = conv_norm_act(value_channels, out_channels, bias, norm, act, dd)
        else:
            self.W = nn.Conv2d(value_channels, out_channels, 1, bias=bias, **dd)
        self.zero_init_out = bool(zero_init_out) and not out_norm
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """With `zero_init_out` (Base-OC: nn.init.constant_(W.weight / W.bias, 0)) a zero output conv; the
        other layers keep PyTorch's default init."""
        if self.zero_init_out:
            nn.init.zeros_(self.W.weight)
            if self.W.bias is not None:
                nn.init.zeros_(self.W.bias)

    def project(self, query_feats: Tensor, key_feats: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The query, key and value maps: (B, key, h, w), (B, key, hk, wk), (B, value, hk, wk)."""
        key_feats = query_feats if key_feats is None else key_feats
        return self.f_query(query_feats), self.f_key(key_feats), self.f_value(key_feats)

    def forward(self, query_feats: Tensor, key_feats: Tensor | None = None) -> Tensor:
        q, k, v = self.project(query_feats, key_feats)
        h, w = q.shape[-2:]
        ctx = global_attention(map_to_tokens(q), map_to_tokens(k), map_to_tokens(v), scale=self.scale)
        return self.W(tokens_to_map(ctx, h, w))


@register_attn("base_oc", family="object_context", kind=GLOBAL, paper=_OCNET, year=2018,
               attends="positions (dense self-attention)", cost="O(N^2 C)")
class BaseOC(TimmInitHooks, nn.Module):
    """Base object context module (Base-OC) from "OCNet: Object Context Network for Scene Parsing"
    (Yuan et al., arXiv 2018, arXiv 1809.00916), as openseg.pytorch's `BaseOC_Module` with one
    stage: context = SelfAttentionBlock(x) with 2-layer conv-BN-ReLU query/key (key_channels = C *
    rd_ratio, C/2 as OCNet's 256 for 512), value conv (value_channels, default C/2) and a plain
    output conv `W` C/2 -> C zero-initialised (weight and bias, so the context is 0 at init), all
    convs with biases as official; output = 1x1 conv-BN-ReLU-Dropout2d(dropout, 0.05 in OCNet) on
    concat[context, x] (not a residual: the block is not the identity at init, but its output at
    init depends on x only through the fusion). `scale` > 1 max-pools x by scale before the
    attention and bilinearly upsamples the context (align_corners=True) as official; the pooling
    uses ceil_mode so that sizes not divisible by scale (and 1x1) work (official floor mode,
    identical when divisible). Dense attention through `global_attention`: O(N'^2 C) time with
    N' = N / scale^2, O(N C) memory (no N x N matrix), N = H*W.
    """

    def __init__(self, channels: int, *, key_channels: int | None = None, value_channels: int | None = None,
                 rd_ratio: float = 0.5, scale: int = 1, dropout: float = 0.05, bias: bool = True,
                 norm_layer=None, act_layer=None, device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        check_channels(name, channels)
        dd = factory(device, dtype)
        norm, act = resolve_layers(norm_layer, act_layer)
        key_channels = reduced_channels(name, channels, rd_ratio, key_channels)
        value_channels = max(1, channels // 2) if value_channels is None else value_channels
        self.channels, self.scale = channels, positive_int(name, "scale", scale)
        self.attn = SelfAttentionBlock(channels, key_channels, value_channels, channels, bias=bias, out_norm=False,
                                       zero_init_out=True, norm_layer=norm, act_layer=act, **dd)
        self.conv_bn_dropout = fusion(2 * channels, channels, bias, dropout, norm, act, dd)

    def context(self, x: Tensor) -> Tensor:
        """The object context (B, C, H, W) before the fusion (zero at init)."""
        if self.scale == 1:
            return self.attn(x)
        ctx = self.attn(F.max_pool2d(x, self.scale, self.scale, ceil_mode=True))
        return F.interpolate(ctx, size=x.shape[-2:], mode="bilinear", align_corners=True)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_input(self, x, self.channels)
        return self.conv_bn_dropout(torch.cat([self.context(x), x], 1))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, scale={self.scale}"


def spatial_gather(feats: Tensor, region_logits: Tensor, scale: float = 1.0) -> Tensor:
    """OCR soft object regions: f_k = sum_i softmax_i(scale * l_ki) x_i, the softmax over the pixels
    of each class map. feats (B, C, H, W), region_logits (B, K, H, W) -> (B, C, K, 1), as openseg's
    `SpatialGather_Module` / mmseg's `SpatialGatherModule` (O(N K C), the softmax in at least fp32).
    """
    logits = region_logits.flatten(2)
    probs = torch.softmax(logits * scale, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    regions = torch.matmul(probs.to(feats.dtype), feats.flatten(2).transpose(1, 2))  # (B, K, C)
    return regions.transpose(1, 2).unsqueeze(-1)


@register_attn("ocr", family="object_context", kind=HEAD, paper=_OCR, year=2020,
               attends="K soft object regions per pixel", cost="O(N K C)")
class ObjectContextBlock(nn.Module):
    """OCR module from "Object-Contextual Representations for Semantic Segmentation" (Yuan, Chen,
    Wang, ECCV 2020, arXiv 1909.11065): openseg.pytorch's `SpatialGather_Module` +
    `SpatialOCR_Module` (mmseg's `SpatialGatherModule` + `ObjectAttentionBlock`). forward(feats
    (B, C, H, W), region_logits (B, K, H, W), any K >= 1, e.g. the auxiliary head's class logits)
    -> (B, C, H, W): regions f_k = softmax over pixels of scale * logits_k, weighted sum of feats
    (`spatial_gather`, `scale` = the official gather scale, 1); object attention (`object_context_block`,
    a SelfAttentionBlock): query f_pixel = 2-layer conv-BN-ReLU of the pixels, key f_object = same on
    the (K, 1) region map, value f_down = conv-BN-ReLU, key_channels = C * rd_ratio (OCRNet: 256 for
    512), softmax over the K regions of q.k * key_channels^-0.5, f_up conv-BN-ReLU back to C;
    output = 1x1 conv-BN-ReLU-Dropout2d(dropout, 0.05 in OCRNet; mmseg: 0) on concat[context, feats].
    State dicts: openseg's `f_pixel/f_object/f_down/f_up` are `f_query/f_key/f_value/W` here. `bias`
    (True, openseg; mmseg False). Not implemented: openseg's max-pool `scale` of the attention
    (unused by OCRNet; mmseg's scale > 1 path returns its input). Cost O(N K C) time, O(N C) memory.
    """

    def __init__(self, channels: int, *, key_channels: int | None = None, rd_ratio: float = 0.5,
                 scale: float = 1.0, dropout: float = 0.05, bias: bool = True, norm_layer=None, act_layer=None,
                 device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        check_channels(name, channels)
        dd = factory(device, dtype)
        norm, act = resolve_layers(norm_layer, act_layer)
        key_channels = reduced_channels(name, channels, rd_ratio, key_channels)
        self.channels, self.scale = channels, float(scale)
        self.object_context_block = SelfAttentionBlock(channels, key_channels, key_channels, channels, bias=bias,
                                                       value_norm=True, norm_layer=norm, act_layer=act, **dd)
        self.conv_bn_dropout = fusion(2 * channels, channels, bias, dropout, norm, act, dd)

    def _check(self, feats: Tensor, region_logits: Tensor) -> None:
        check_input(self, feats, self.channels)
        name = type(self).__name__
        if not isinstance(region_logits, Tensor) or region_logits.ndim != 4:
            shape = tuple(region_logits.shape) if isinstance(region_logits, Tensor) else type(region_logits).__name__
            raise ValueError(f"{name} expects region_logits of shape (B, K, H, W), got {shape}")
        b, _, h, w = feats.shape
        if region_logits.shape[0] != b or tuple(region_logits.shape[2:]) != (h, w) or region_logits.shape[1] < 1:
            raise ValueError(f"{name}: region_logits must be (B={b}, K>=1, H={h}, W={w}) to match feats "
                             f"{tuple(feats.shape)}, got {tuple(region_logits.shape)} (resize the logits first)")

    def forward(self, feats: Tensor, region_logits: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only checks)
            self._check(feats, region_logits)
        regions = spatial_gather(feats, region_logits, self.scale)        # (B, C, K, 1)
        context = self.object_context_block(feats, regions)
        return self.conv_bn_dropout(torch.cat([context, feats], 1))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, scale={self.scale}"
