"""ISA: interlaced sparse self-attention, as a plug-in block.

Interlaced Sparse Self-Attention for Semantic Segmentation (Huang, Yuan, Guo, Zhang, Chen, Wang,
arXiv 1907.12273, 2019). Official code: openseg-group/openseg.pytorch,
`lib/models/modules/isa_block.py` (`SelfAttentionBlock2D`, `ISA_Block`, `ISA_Module`); mmseg's
`ISAHead` is the same computation. The dense attention is factorised into a long-range stage
(each group a strided sub-grid: the pixels sharing one offset inside every dh x dw block) and a
short-range stage (each group one contiguous dh x dw block), so every pixel reaches every other
through the two stages. Both stages use `object_context.SelfAttentionBlock`; the groups are formed
with one reshape/permute and attended in a single `global_attention` call (groups as heads).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import global_attention
from ..ops.attention import tracing
from ..registry import GLOBAL, register_attn
from ._utils import TimmInitHooks, check_channels, check_input, factory
from .object_context import SelfAttentionBlock, fusion, positive_int, reduced_channels, resolve_layers

_PAPER = "Interlaced Sparse Self-Attention for Semantic Segmentation (arXiv 2019, arXiv 1907.12273)"


def to_groups(t: Tensor, dh: int, dw: int, local: bool) -> Tensor:
    """(B, C, oh*dh, ow*dw) -> (B, groups, group size, C). Long range (local=False): dh*dw groups,
    each the oh x ow sub-grid of one offset inside the blocks; short range: oh*ow groups, each one
    dh x dw block, in row-major order inside the group. Only the constant factors (dh, dw, C) are
    written into the reshapes (-1 for the rest), so traced / exported graphs take any map size."""
    b, c = t.shape[0], t.shape[1]
    t = t.unflatten(3, (-1, dw)).unflatten(2, (-1, dh))               # (B, C, oh, dh, ow, dw)
    if local:
        return t.permute(0, 2, 4, 3, 5, 1).reshape(b, -1, dh * dw, c)
    return t.permute(0, 3, 5, 2, 4, 1).reshape(b, dh * dw, -1, c)


def from_groups(t: Tensor, oh: int, ow: int, dh: int, dw: int, local: bool) -> Tensor:
    """Inverse of `to_groups`: (B, groups, group size, C) -> (B, C, oh*dh, ow*dw)."""
    b, c = t.shape[0], t.shape[-1]
    if local:
        t = t.reshape(b, -1, ow, dh, dw, c).permute(0, 5, 1, 3, 2, 4)
    else:
        t = t.reshape(b, dh, dw, -1, ow, c).permute(0, 5, 3, 1, 4, 2)
    return t.flatten(4).flatten(2, 3)


class GroupedSelfAttentionBlock(SelfAttentionBlock):
    """A SelfAttentionBlock (same submodules and keys) with `grouped`, its attention within each group (a method:
    TorchScript calls no module passed as an argument)."""

    def grouped(self, x: Tensor, dh: int, dw: int, local: bool) -> Tensor:
        """Self-attention within each group of x (B, C, oh*dh, ow*dw), as the official code does on the
        (B * groups, C, ., .) batch: the 1x1 convs (and the norms' batch statistics) see the same pixels."""
        oh, ow = x.shape[-2] // dh, x.shape[-1] // dw
        q, k, v = self.project(x)
        ctx = global_attention(to_groups(q, dh, dw, local), to_groups(k, dh, dw, local), to_groups(v, dh, dw, local),
                               scale=self.scale)
        return self.W(from_groups(ctx, oh, ow, dh, dw, local))


@register_attn("isa", family="isa", kind=GLOBAL, paper=_PAPER, year=2019,
               attends="positions (long-range strided groups, then short-range blocks)",
               cost="O(N C (N / (dh dw) + dh dw))")
class InterlacedSparseAttention(TimmInitHooks, nn.Module):
    """Interlaced sparse self-attention (ISA) from "Interlaced Sparse Self-Attention for Semantic
    Segmentation" (Huang et al., arXiv 2019, arXiv 1907.12273), as openseg.pytorch's `ISA_Module`
    with one down factor: x is zero-padded symmetrically (pad // 2 before, the rest after) to
    multiples of `down_factor` (dh, dw) = (8, 8); `long_range_sa` (a SelfAttentionBlock: 2-layer
    conv-BN-ReLU query/key to key_channels = C * rd_ratio, value conv to value_channels = C, softmax
    of q.k * key_channels^-0.5, W conv-BN-ReLU, all convs bias-free as official) attends within each
    of the dh*dw strided sub-grids, `short_range_sa` then within each dh x dw block, and the padding
    is cropped; output = 1x1 conv-BN-ReLU-Dropout2d(dropout, 0.05 in ISANet) on concat[x, context]
    (`context_first=True`: concat[context, x], mmseg's ISAHead order, which also sets dropout=0 and
    `value_bias=True`). As official, the padded pixels take part as keys (and in the norms' batch
    statistics); their embeddings are not zero after conv-BN-ReLU, so results on padded sizes
    depend on the padding. Openseg state dicts load after renaming `stages.0.long_range_sa` /
    `stages.0.short_range_sa` to `long_range_sa` / `short_range_sa`. No residual: not the identity
    at init. Cost O(N C (N/(dh dw) + dh dw)) time (vs O(N^2 C) dense), O(N C) memory, N = H*W
    (padded), one global_attention call per stage with the groups as heads.
    """

    def __init__(self, channels: int, *, down_factor: int | tuple[int, int] = (8, 8), key_channels: int | None = None,
                 value_channels: int | None = None, rd_ratio: float = 0.5, dropout: float = 0.05,
                 context_first: bool = False, bias: bool = False, value_bias: bool | None = None,
                 norm_layer=None, act_layer=None, device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        check_channels(name, channels)
        if isinstance(down_factor, int):
            down_factor = (down_factor, down_factor)
        if not isinstance(down_factor, (tuple, list)) or len(down_factor) != 2:
            raise ValueError(f"{name}: down_factor must be an int or a pair (dh, dw), got {down_factor!r}")
        self.down_factor = tuple(positive_int(name, "down_factor", d) for d in down_factor)
        dd = factory(device, dtype)
        norm, act = resolve_layers(norm_layer, act_layer)
        key_channels = reduced_channels(name, channels, rd_ratio, key_channels)
        value_channels = channels if value_channels is None else value_channels
        self.channels, self.context_first = channels, bool(context_first)
        kw = dict(bias=bias, value_bias=value_bias, norm_layer=norm, act_layer=act, **dd)
        self.long_range_sa = GroupedSelfAttentionBlock(channels, key_channels, value_channels, channels, **kw)
        self.short_range_sa = GroupedSelfAttentionBlock(channels, key_channels, value_channels, channels, **kw)
        self.conv_bn = fusion(2 * channels, channels, bias, dropout, norm, act, dd)

    def context(self, x: Tensor) -> Tensor:
        """ISA_Block: the long- then short-range context (B, C, H, W), before the fusion."""
        h, w = x.shape[-2], x.shape[-1]
        dh, dw = self.down_factor
        # padded size first (oh*dh), the padding from it: exported graphs (where h, w are traced values)
        # then reshape by products of the same symbols, and always pad (a branch on the size would be traced
        # as the branch taken at the export size)
        pad_h, pad_w = (h + dh - 1) // dh * dh - h, (w + dw - 1) // dw * dw - w
        top, left = pad_h // 2, pad_w // 2
        if tracing() or pad_h or pad_w:
            x = F.pad(x, (left, pad_w - left, top, pad_h - top))
        x = self.long_range_sa.grouped(x, dh, dw, local=False)
        x = self.short_range_sa.grouped(x, dh, dw, local=True)
        return x[:, :, top:top + h, left:left + w]

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_input(self, x, self.channels)
        ctx = self.context(x)
        return self.conv_bn(torch.cat([ctx, x] if self.context_first else [x, ctx], 1))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, down_factor={self.down_factor}, context_first={self.context_first}"
