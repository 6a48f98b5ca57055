"""Maps of the position-attention blocks: non-local (4 modes), DANet PAM / CAM, criss-cross (CCNet).

Each gives the rows of the chosen query pixels only: the query's features dotted with all keys, O(Q N C)
for Q queries over N = h*w keys, never the N x N matrix. Criss-cross keeps its (B, H, W, H + W) weights,
the size the block itself computes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layers.criss_cross import CrissCrossAttention
from ..layers.danet import ChannelAttention, DualAttention, PositionAttention
from ..layers.non_local import NonLocal2d
from .core import MapPart, map_for


def query_rows(feats: Tensor, cells: Tensor) -> Tensor:
    """(B, Q, C): the feature vectors of feats (B, C, h, w) at the (Q, 2) cells."""
    return feats[:, :, cells[:, 0], cells[:, 1]].transpose(1, 2)


def _acc(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@map_for(NonLocal2d)
def nonlocal_map(block: NonLocal2d, args, kwargs, output, cells) -> list[MapPart]:
    """The query's weights f(x_i, x_j) / C(x) over the keys j, as the block's mode computes them."""
    x = args[0]
    xk = F.max_pool2d(x, 2, 2, ceil_mode=block.pool_ceil) if block.sub_sample else x  # keys only
    hk, wk = xk.shape[-2:]
    if block.mode == "gaussian":
        q, k = query_rows(x, cells), xk.flatten(2)
    else:
        q, k = query_rows(block.theta(x), cells), block.phi(xk).flatten(2)
    q, k = _acc(q), _acc(k)
    pooled = (f"; keys max-pooled 2x2 ({'ceil' if block.pool_ceil else 'floor'}): the map is on the "
              f"{hk}x{wk} key grid") if block.sub_sample else ""
    if block.mode in ("embedded", "gaussian"):
        scale = q.shape[-1] ** -0.5 if block.use_scale else 1.0
        attn = torch.softmax(torch.matmul(q, k) * scale, dim=-1)
        note = f"softmax over the keys of the query's scaled dot products (scale {scale:.4g}){pooled}"
    elif block.mode == "dot":
        attn = torch.matmul(q, k) / k.shape[-1]
        note = f"theta_i . phi_j / N' (N' = {k.shape[-1]}): signed weights, not a distribution{pooled}"
    else:  # concat
        w1, w2 = _acc(block.w_f).chunk(2)
        a = torch.einsum("c,bqc->bq", w1, q)
        b = torch.einsum("c,bcn->bn", w2, k)
        attn = torch.relu(a[..., None] + b[:, None]) / k.shape[-1]
        note = f"ReLU(w_f . [theta_i, phi_j]) / N' (N' = {k.shape[-1]}): not normalised to sum 1{pooled}"
    return [MapPart("query_attention", attn.unflatten(-1, (hk, wk)), note=note)]


def _pam(block: PositionAttention, x: Tensor, cells: Tensor, label: str | None = None) -> MapPart:
    q = _acc(query_rows(block.query_conv(x), cells))
    k = _acc(block.key_conv(x).flatten(2))
    attn = torch.softmax(torch.matmul(q, k), dim=-1)  # unscaled, as the block
    return MapPart("query_attention", attn.unflatten(-1, x.shape[-2:]), label,
                   "softmax over positions of q_i . k_j (no scaling)")


def _cam(block: ChannelAttention, x: Tensor, label: str | None = None) -> MapPart:
    feats = _acc(x.flatten(2))
    energy = torch.bmm(feats, feats.transpose(1, 2))
    official = block.mode == "official"
    attn = torch.softmax(energy.neg() if official else energy, dim=-1)
    note = ("softmax(-X X^T) over channels (official CAM: the least similar channels weigh most)" if official
            else "softmax(X X^T) over channels (the paper's form)")
    return MapPart("channel_affinity", attn, label, note)


@map_for(PositionAttention)
def pam_map(block, args, kwargs, output, cells) -> list[MapPart]:
    return [_pam(block, args[0], cells)]


@map_for(ChannelAttention)
def cam_map(block, args, kwargs, output, cells) -> list[MapPart]:
    return [_cam(block, args[0])]


@map_for(DualAttention)
def dual_map(block, args, kwargs, output, cells) -> list[MapPart]:
    return [_pam(block.pam, args[0], cells, "pam"), _cam(block.cam, args[0], "cam")]


def cross_weights(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Criss-cross weights of every pixel: row (B, H, W, W) [b, y, x, x'] and column (B, W, H, H) [b, x, y, y']
    (the pixel's own column entry 0), one joint softmax over its W + H - 1 positions, as the block."""
    q, k = _acc(q), _acc(k)
    h = q.shape[-2]
    row = torch.einsum("bcyx,bcyz->byxz", q, k)
    col = torch.einsum("bcyx,bczx->bxyz", q, k)
    col = col.masked_fill(torch.eye(h, dtype=torch.bool, device=q.device), float("-inf"))  # centre: in the row
    p = torch.softmax(torch.cat([row, col.transpose(1, 2)], -1), dim=-1)  # (B, H, W, W + H)
    return p[..., : row.shape[-1]], p[..., row.shape[-1]:].transpose(1, 2)


def apply_cross(v: Tensor, row: Tensor, col: Tensor) -> Tensor:
    """v A for maps v (B, Q, H, W) over the pixels and a criss-cross matrix A: (v A)(p) = sum_j v(j) A(j, p)."""
    return torch.einsum("bqyx,byxz->bqyz", v, row) + torch.einsum("bqyx,bxyz->bqzx", v, col)


@map_for(CrissCrossAttention)
def criss_cross_map(block: CrissCrossAttention, args, kwargs, output, cells) -> list[MapPart]:
    """Per pass r the query's weights over its row and column (on that pass's input x_r); for R > 1 also the
    composed map e_u A_R ... A_1: how much each pixel's value at the block's input reaches the query through
    the R passes (summed over all paths), ignoring the residual x + gamma * (.) that each pass also adds."""
    x = args[0]
    b, _, h, w = x.shape
    onehot = torch.zeros(b, len(cells), h, w, dtype=torch.float32 if x.dtype != torch.float64 else x.dtype,
                         device=x.device)
    onehot[:, torch.arange(len(cells)), cells[:, 0], cells[:, 1]] = 1
    passes = []
    for r in range(block.recurrence):
        passes.append(cross_weights(block.query_conv(x), block.key_conv(x)))
        if r + 1 < block.recurrence:
            x = block.step(x)
    parts = [MapPart("query_attention", apply_cross(onehot, *p), f"pass{r + 1}",
                     f"pass {r + 1} of {block.recurrence}: joint softmax over the query's row and column")
             for r, p in enumerate(passes)]
    if block.recurrence > 1:
        v = parts[-1].map
        for row, col in reversed(passes[:-1]):
            v = apply_cross(v, row, col)
        parts.append(MapPart("query_attention", v, "composed",
                             f"the {block.recurrence} passes' weights composed (A_R ... A_1, summed over paths): "
                             "reach of each input pixel to the query, residual paths left out"))
    return parts
