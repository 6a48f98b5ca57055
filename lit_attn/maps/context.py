"""Maps of the object-context family and its relatives: OCNet's Base-OC, DNL (whitened pairwise + unary) and
ISA (long- then short-range, composed).

Query rows only, O(Q N C) for Q queries (ISA: O(Q N C / (dh dw) + Q dh dw C) plus the block's own long-range
stage), never an N x N matrix. Each map is computed from the block's captured input with its own modules.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layers.dnl import DisentangledNonLocal2d
from ..layers.isa import InterlacedSparseAttention
from ..layers.object_context import BaseOC
from .core import MapPart, map_for
from .position import _acc, query_rows


def _align_corners_weights(cells: Tensor, size: int, src: int) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear align_corners=True source indices (lo, hi) and the weight of hi, per query coordinate."""
    pos = cells.double() * ((src - 1) / (size - 1) if size > 1 else 0.0)
    lo = pos.floor().long().clamp(max=src - 1)
    return lo, (lo + 1).clamp(max=src - 1), (pos - lo.double())


@map_for(BaseOC)
def base_oc_map(block: BaseOC, args, kwargs, output, cells) -> list[MapPart]:
    """The query's softmax_j(q_i . k_j * key_channels^-0.5) over the keys. With `scale` > 1 the attention runs
    on the max-pooled map and the context is upsampled bilinearly (align_corners=True): the query's row is then
    the same bilinear mix of the pooled rows around it (exactly the weights its context value gets)."""
    x = args[0]
    sab = block.attn
    xs = F.max_pool2d(x, block.scale, block.scale, ceil_mode=True) if block.scale > 1 else x
    hs, ws = xs.shape[-2:]
    q_all, k = _acc(sab.f_query(xs)), _acc(sab.f_key(xs).flatten(2))

    def rows(c):
        return torch.softmax(torch.matmul(query_rows(q_all, c), k) * sab.scale, dim=-1)

    if block.scale == 1:
        attn, note = rows(cells), "softmax over the keys of q_i . k_j * key_channels^-0.5"
    else:
        (y0, y1, wy), (x0, x1, wx) = (_align_corners_weights(cells[:, i], x.shape[-2 + i], (hs, ws)[i])
                                      for i in (0, 1))
        wy, wx = wy.to(k.dtype), wx.to(k.dtype)
        attn = sum(rows(torch.stack([yy, xx], 1)) * (fy * fx)[:, None]
                   for yy, fy in ((y0, 1 - wy), (y1, wy)) for xx, fx in ((x0, 1 - wx), (x1, wx)))
        note = (f"keys on the {hs}x{ws} max-pooled grid (scale {block.scale}); each query's row is the bilinear "
                "(align_corners=True) mix of the pooled rows its upsampled context takes")
    return [MapPart("query_attention", attn.unflatten(-1, (hs, ws)), note=note)]


@map_for(DisentangledNonLocal2d)
def dnl_map(block: DisentangledNonLocal2d, args, kwargs, output, cells) -> list[MapPart]:
    """"pairwise": the query's whitened softmax_j((q_i - mean q) . (k_j - mean k) * d^-0.5 / temperature);
    "unary": softmax over the positions of conv_mask(x), one distribution shared by every query."""
    x = args[0]
    q, k = _acc(block.theta(x).flatten(2)), _acc(block.phi(x).flatten(2))
    q, k = q - q.mean(-1, keepdim=True), k - k.mean(-1, keepdim=True)
    scale = (q.shape[1] ** -0.5 if block.use_scale else 1.0) / block.temperature
    pair = torch.softmax(torch.matmul(q[:, :, cells[:, 0] * x.shape[-1] + cells[:, 1]].transpose(1, 2), k) * scale,
                         dim=-1)
    unary = torch.softmax(_acc(block.conv_mask(x)).flatten(2), dim=-1)
    gate = "gamma * " if block.mode == "official" else "conv_out of "
    return [MapPart("query_attention", pair.unflatten(-1, x.shape[-2:]), "pairwise",
                    f"whitened pairwise term (q, k centred over positions), scale d^-0.5 / {block.temperature:g}; "
                    f"enters the output as {gate}its aggregation"),
            MapPart("shared_attention", unary.unflatten(-1, x.shape[-2:]), "unary",
                    "unary term: softmax over the positions of conv_mask(x), the same for every query")]


def _group_softmax(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """softmax over the last axis of q . k: q (B, Q, G, C), k (B, Q, G, C, M) -> (B, Q, G, M)."""
    return torch.softmax(torch.einsum("bqgc,bqgcm->bqgm", q, k) * scale, dim=-1)


def _query_blocks(t: Tensor, by: Tensor, bx: Tensor, dh: int, dw: int) -> Tensor:
    """(B, Q, C, dh*dw): the dh x dw block of t (B, C, H, W) at each origin (by, bx), row-major."""
    return torch.stack([t[:, :, y:y + dh, x:x + dw].flatten(2)
                        for y, x in zip(by.tolist(), bx.tolist(), strict=True)], 1)


@map_for(InterlacedSparseAttention)
def isa_map(block: InterlacedSparseAttention, args, kwargs, output, cells) -> list[MapPart]:
    """The query's composed ISA attention over the image: the short-range stage's weight of each pixel m of the
    query's dh x dw block times the long-range weight of m over its strided group. The m of the block have
    dh*dw distinct offsets, so every pixel j is reached by exactly one path (through the m of j's offset):
    composed(i, j) = A_short(i, m(j)) A_long(m(j), j), as criss-cross's composition (the stages' output
    convs, norms and the fusion left out). Padded pixels are keys too (as the block); the map is cropped to the
    image, so a row sums to 1 minus the weight on the padding (the note gives the smallest row sum)."""
    x = args[0]
    h, w = x.shape[-2:]
    dh, dw = block.down_factor
    pad_h, pad_w = (h + dh - 1) // dh * dh - h, (w + dw - 1) // dw * dw - w
    top, left = pad_h // 2, pad_w // 2
    xp = F.pad(x, (left, pad_w - left, top, pad_h - top))
    oh, ow = xp.shape[-2] // dh, xp.shape[-1] // dw
    x1 = block.long_range_sa.grouped(xp, dh, dw, local=False)            # the long-range stage's output
    py, px = cells[:, 0] + top, cells[:, 1] + left
    # short range: the query over its own dh x dw block (block origin (by, bx))
    by, bx = py // dh * dh, px // dw * dw
    q2 = _acc(block.short_range_sa.f_query(x1)[:, :, py, px])                     # (B, C, Q)
    k2 = _acc(block.short_range_sa.f_key(x1))
    k2 = _query_blocks(k2, by, bx, dh, dw)                                          # (B, Q, C, G)
    short = _group_softmax(q2.transpose(1, 2)[:, :, None], k2[:, :, None], block.short_range_sa.scale)[:, :, 0]
    # long range: each m = (by + a, bx + b) of the block over its group, the pixels of offset (a, b)
    q1, k1 = _acc(block.long_range_sa.f_query(xp)), _acc(block.long_range_sa.f_key(xp))
    k1 = k1.unflatten(3, (ow, dw)).unflatten(2, (oh, dh)).permute(0, 3, 5, 1, 2, 4).flatten(1, 2)  # (B, G, C, oh, ow)
    # group g = a*dw + b of k1 is offset (a, b), the same index as the block pixel (by + a, bx + b) in qm
    qm = _query_blocks(q1, by, bx, dh, dw).transpose(2, 3)                          # (B, Q, G, C)
    long = _group_softmax(qm, k1.flatten(3)[:, None].expand(-1, len(cells), -1, -1, -1),
                          block.long_range_sa.scale)                                # (B, Q, G, oh*ow)
    composed = (short[..., None] * long).unflatten(2, (dh, dw)).unflatten(-1, (oh, ow))  # (B, Q, a, b, i, j)
    composed = composed.permute(0, 1, 4, 2, 5, 3).reshape(*composed.shape[:2], oh * dh, ow * dw)
    composed = composed[:, :, top:top + h, left:left + w]
    low = composed.sum((2, 3)).min().item()
    return [MapPart("query_attention", composed,
                    note=f"short-range ({dh}x{dw} block) softmax composed with each block pixel's long-range "
                         f"(strided group) softmax, summed over the unique path; cropped to the image "
                         f"(smallest row sum {low:.3g}: the rest falls on the zero padding)")]
