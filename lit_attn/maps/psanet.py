"""Maps of PSANet's point-wise spatial attention: for each query, its collect row and / or its distribute
weights, from the over-complete masks cropped to the (shrunk) map as the block uses them (mmcv's PSAMask).

O(Q N') per branch for Q queries on the N'-pixel shrunk map (plus the block's own mask conv), no N' x N' matrix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layers.psanet import PointwiseSpatialAttention
from .core import MapPart, map_for
from .position import _acc


def _branch(block, x: Tensor, reduce, attention, cells: Tensor, psa_type: str) -> tuple[Tensor, str]:
    hs, ws, align = block.shrunk_size(*x.shape[-2:])
    feats = reduce(x)
    if (hs, ws) != tuple(x.shape[-2:]):
        feats = F.interpolate(feats, size=[hs, ws], mode="bilinear", align_corners=align)
    mask = _acc(attention(feats))                                        # (B, mask_h * mask_w, hs, ws)
    mask_h, mask_w = block.mask_size
    half_h, half_w = (mask_h - 1) // 2, (mask_w - 1) // 2
    qy = (cells[:, 0] * hs // x.shape[-2]).clamp(max=hs - 1)             # the query's cell on the shrunk map
    qx = (cells[:, 1] * ws // x.shape[-1]).clamp(max=ws - 1)
    py, px = torch.meshgrid(torch.arange(hs), torch.arange(ws), indexing="ij")
    py, px = py.flatten()[None], px.flatten()[None]                      # (1, N') the other pixel j
    collect = psa_type == "collect"
    # collect: G[q, j] = mask_q[j - q] (the query's own mask); distribute: G[i, q] = mask_i[q - i] (every pixel's)
    dy, dx = (py - qy[:, None], px - qx[:, None]) if collect else (qy[:, None] - py, qx[:, None] - px)
    inside = (dy + half_h >= 0) & (dy + half_h < mask_h) & (dx + half_w >= 0) & (dx + half_w < mask_w)
    channel = ((dy + half_h).clamp(0, mask_h - 1) * mask_w + (dx + half_w).clamp(0, mask_w - 1))  # (Q, N')
    where_y, where_x = (qy[:, None].expand_as(channel), qx[:, None].expand_as(channel)) if collect else \
        (py.expand_as(channel), px.expand_as(channel))
    logits = mask[:, channel, where_y, where_x].masked_fill(~inside, 0)  # (B, Q, N')
    weights = logits.softmax(-1) if block.psa_softmax else logits
    how = ("softmax over the sources j of the query's own mask" if collect else
           "the query's column of the distribute matrix: each source i's mask at the query, softmax over i")
    how = how if block.psa_softmax else "raw mask logits (psa_softmax=False)"
    note = (f"{psa_type}: {how}; offsets outside the {mask_h}x{mask_w} mask have logit 0 (mmcv); on the {hs}x{ws} "
            f"shrunk map (query at cell floor(r * {hs} / H)); the aggregation is divided by "
            f"{block.normalization_factor:g}")
    return weights.unflatten(-1, (hs, ws)), note


@map_for(PointwiseSpatialAttention)
def psanet_map(block: PointwiseSpatialAttention, args, kwargs, output, cells) -> list[MapPart]:
    """"collect": the query's weights over the sources it gathers from (its mask, cropped to the map);
    "distribute": the weights with which every pixel sends to the query (their masks at the query)."""
    x = args[0]
    first = "collect" if block.psa_type == "bi-direction" else block.psa_type
    m, note = _branch(block, x, block.reduce, block.attention, cells, first)
    parts = [MapPart("query_attention", m, first, note)]
    if hasattr(block, "reduce_p"):
        m, note = _branch(block, x, block.reduce_p, block.attention_p, cells, "distribute")
        parts.append(MapPart("query_attention", m, "distribute", note))
    return parts
