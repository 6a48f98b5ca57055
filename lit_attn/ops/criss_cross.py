"""Criss-cross attention: each position attends to the H + W - 1 positions of its row and column.

`criss_cross_attention(q, k, v)` computes, for q, k (B, Ck, H, W) and v (B, C, H, W),

    out(u) = sum_{j in row(u) + column(u)} softmax_j(q(u) . k(j)) v(j)

with one joint softmax over the row and the column (the pixel itself counted once) and no
1/sqrt(d) scaling, as CCNet (Huang et al., ICCV 2019, arXiv 1811.11721) defines it. Nothing of size
N x N (N = H*W) is built: the logits are a (B, H, W, W) row part and a (B, W, H, H) column part.

`criss_cross_attention_packed(qkv, key_channels, gamma, residual)` is the same on one packed
(B, 2 Ck + C, H, W) projection (the output of a single 1x1 conv), returning residual + gamma * out,
the form a CCNet step uses; it returns one packed gradient, so the three projections cost one
backward convolution.

The eager path is a `torch.autograd.Function` on channels-last (B, H, W, C) views (free when the
projection is channels_last): row attention is one GEMM batched over the B*H rows; column attention
is one GEMM per image batched over its columns, read through strided views of v (no transposed
copy of v) and added into the output. GEMM outputs are always contiguous (BLAS writes strided
outputs slowly). The forward saves only the projection and a (B, H, W) log-sum-exp; the backward
recomputes the small (B, H, W, H + W) probabilities from q and k (Ck-channel GEMMs). Logits and
softmax are fp32 for fp16/bf16 inputs (autocast is off inside, backward included). gamma is folded
into the small probabilities and the residual into the row GEMM (baddbmm), so neither the attended
features nor gamma * out are ever stored. The centre pixel's column entry is removed by zeroing its
probability (its logit is also in the row, so the maximum does not change): no -inf arithmetic.
Under `torch.compile`, `torch.jit.trace` and ONNX export the same maths is written with plain
differentiable ops (a finite mask) for the tracer: the Function's output buffer would be traced as a
constant (ONNX) or as a Python call (TorchScript) otherwise.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .amp import autocast_dtype, no_autocast
from .attention import tracing

COL_ELEMENTS = 1 << 23  # column attention: GEMMs over as many columns as keep the temporary under this


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _logits(qn: Tensor, kn: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """Row logits (B, H, W, W) [b, y, x, x'] and column logits (B, W, H, H) [b, x, y, y'] (fp32 or wider)."""
    q, k = qn.to(acc), kn.to(acc)
    row = torch.matmul(q, k.transpose(-1, -2))
    col = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1))
    return row, col


def _softmax_(row: Tensor, col: Tensor, scale: Tensor | None = None) -> Tensor:
    """Joint softmax over each pixel's W row and H - 1 column entries, in place (times `scale` if given);
    returns the log-sum-exp (B, H, W)."""
    m = torch.maximum(row.amax(-1), col.amax(-1).transpose(1, 2))  # (B, H, W); the centre is in both
    row.sub_(m[..., None]).exp_()
    col.sub_(m.transpose(1, 2)[..., None]).exp_()
    col.diagonal(dim1=-2, dim2=-1).zero_()  # the centre pixel is counted in the row only
    total = row.sum(-1) + col.sum(-1).transpose(1, 2)
    lse = total.log() + m
    inv = total.reciprocal_() if scale is None else scale / total
    row.mul_(inv[..., None])
    col.mul_(inv.transpose(1, 2)[..., None])
    return lse


def _probs(qn: Tensor, kn: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """The probabilities again from q, k and the saved log-sum-exp (cheap: Ck-channel GEMMs)."""
    row, col = _logits(qn, kn, lse.dtype)
    row.sub_(lse[..., None]).exp_()
    col.sub_(lse.transpose(1, 2)[..., None]).exp_()
    col.diagonal(dim1=-2, dim2=-1).zero_()
    return row, col


def _rows(p: Tensor, m: Tensor, add: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """p[b, y] @ m[b, y] (+ add) for p (B, H, W, W) and m (B, H, W, C): one GEMM batched over B*H rows.

    m and add may be channel slices of a channels-last tensor (any unit-stride (B, H, W, C) view); out, if
    given, must be contiguous (BLAS writes strided outputs slowly)."""
    b, h, w, c = m.shape
    p3, m3 = p.reshape(b * h, w, w), m.view(b * h, w, c)
    o3 = None if out is None else out.view(b * h, w, c)
    if add is not None:
        return torch.baddbmm(add.view(b * h, w, c), p3, m3, out=o3).view(b, h, w, c)
    return torch.bmm(p3, m3, out=o3).view(b, h, w, c)


def _add_cols_(p: Tensor, m: Tensor, out: Tensor) -> None:
    """out[b, :, x] += p[b, x] @ m[b, :, x] for p (B, W, H, H), m and out (B, H, W, C): GEMMs batched
    over blocks of columns on strided views of m (no transposed copy of m; bounded temporaries)."""
    _, h, w, c = m.shape
    step = max(1, COL_ELEMENTS // (h * c))
    for i in range(m.shape[0]):
        for x in range(0, w, step):
            cols = slice(x, x + step)
            out[i, :, cols].add_(torch.bmm(p[i, cols], m[i, :, cols].transpose(0, 1)).transpose(0, 1))


def _col_products(g: Tensor, m: Tensor, out: Tensor) -> Tensor:
    """out[b, x, y, y'] = g[b, y, x] . m[b, y', x] for g, m (B, H, W, C) -> out (B, W, H, H)."""
    for i in range(m.shape[0]):
        torch.bmm(g[i].transpose(0, 1), m[i].permute(1, 2, 0), out=out[i])
    return out


def _channels_last_view(t: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H, W, C) view with unit channel stride: free if channels_last, else a copy."""
    t = t.permute(0, 2, 3, 1)
    return t if t.is_contiguous() else t.contiguous()


class _CrissCross(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, ck, gamma, residual):
        t = _channels_last_view(qkv)
        qn, kn, vn = t[..., :ck], t[..., ck:2 * ck], t[..., 2 * ck:]
        row, col = _logits(qn, kn, _acc_dtype(vn))
        lse = _softmax_(row, col, gamma)  # gamma P: gamma is applied on the small side
        row, col = row.to(vn.dtype), col.to(vn.dtype)
        b, h, w, c = vn.shape
        res = None if residual is None else residual.permute(0, 2, 3, 1)
        dtype = vn.dtype if res is None else torch.promote_types(vn.dtype, res.dtype)
        # the output is allocated channels_last and returned as is (a custom Function must not return a view)
        y = torch.empty((b, c, h, w), dtype=dtype, device=vn.device, memory_format=torch.channels_last)
        out = y.permute(0, 2, 3, 1)
        if dtype != vn.dtype:  # autocast: low-precision attention, full-precision residual
            out.copy_(_rows(row, vn)).add_(res)
        elif res is not None and res.is_contiguous():
            _rows(row, vn, add=res, out=out)  # residual + gamma * row part, one GEMM
        else:
            _rows(row, vn, out=out)
            if res is not None:
                out.add_(res)
        _add_cols_(col, vn, out)
        ctx.ck = ck
        ctx.residual_dtype = None if residual is None else residual.dtype
        ctx.save_for_backward(t, lse, gamma)
        return y

    @staticmethod
    def backward(ctx, dout):
        with no_autocast(dout.device):  # fp32 logits in backward too
            return _CrissCross._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout):
        t, lse, gamma = ctx.saved_tensors
        ck = ctx.ck
        qn, kn, vn = t[..., :ck], t[..., ck:2 * ck], t[..., 2 * ck:]
        b, h, w, c = vn.shape
        acc = lse.dtype
        row, col = _probs(qn, kn, lse)
        g = _channels_last_view(dout).to(vn.dtype)
        # dP = dout . v over each pixel's row and column (before gamma)
        d_row = torch.matmul(g, vn.transpose(-1, -2)).to(acc)                   # (B, H, W, W)
        d_col = _col_products(g, vn, g.new_empty(b, w, h, h)).to(acc)           # (B, W, H, H)
        # softmax backward over the joint row + column set: dS = P * (dP - sum(P * dP))
        delta = torch.linalg.vecdot(row, d_row) + torch.linalg.vecdot(col, d_col).transpose(1, 2)
        d_row.sub_(delta[..., None]).mul_(row)
        d_col.sub_(delta.transpose(1, 2)[..., None]).mul_(col)
        d_gamma = None
        if gamma is not None:  # out = gamma A: d gamma = sum(dout * A) = sum(P * dP); dS and dv scale by gamma
            d_gamma = delta.sum().reshape(gamma.shape).to(gamma.dtype)
            for p in (d_row, d_col, row, col):
                p.mul_(gamma)
        # dv = (gamma P)^T dout (a contiguous GEMM output: BLAS writes strided outputs slowly)
        dv = _rows(row.transpose(-1, -2).to(g.dtype), g)
        _add_cols_(col.transpose(-1, -2).to(g.dtype), g, dv)
        del row, col
        # dq = dS k and dk = dS^T q over rows and columns (Ck channels: small)
        q, k = qn.to(acc), kn.to(acc)
        dq = torch.matmul(d_row, k) + torch.matmul(d_col, k.transpose(1, 2)).transpose(1, 2)
        dk = (torch.matmul(d_row.transpose(-1, -2), q)
              + torch.matmul(d_col.transpose(-1, -2), q.transpose(1, 2)).transpose(1, 2))
        d_t = torch.cat([dq.to(t.dtype), dk.to(t.dtype), dv], -1)
        d_res = None if ctx.residual_dtype is None else dout.to(ctx.residual_dtype)
        return d_t.permute(0, 3, 1, 2), None, d_gamma, d_res


def _criss_cross_traced(qkv: Tensor, ck: int, gamma: Tensor | None, residual: Tensor | None) -> Tensor:
    """The same maths with plain differentiable ops (for torch.compile and tracers)."""
    h = qkv.shape[-2]
    t = qkv.permute(0, 2, 3, 1)                                                # (B, H, W, C')
    vn = t[..., 2 * ck:]
    row, col = _logits(t[..., :ck], t[..., ck:2 * ck], _acc_dtype(vn))        # (B, H, W, W), (B, W, H, H)
    ar = torch.arange(h, device=qkv.device)
    eye = ar[:, None] == ar  # (not torch.eye: ONNX Runtime has no boolean EyeLike)
    # finite mask (no inf - inf): float32's min (the logits are fp32 or fp64; exp of it is exactly 0 in both), a
    # literal because TorchScript has no torch.finfo
    col = col.masked_fill(eye, -3.4028234663852886e38).transpose(1, 2)
    p = torch.softmax(torch.cat([row, col], -1), -1).to(vn.dtype)
    out = p[..., :-h] @ vn + (p[..., -h:].transpose(1, 2) @ vn.transpose(1, 2)).transpose(1, 2)
    out = out.permute(0, 3, 1, 2)
    if gamma is not None:
        out = gamma * out
    return out if residual is None else out + residual


def criss_cross_attention_packed(qkv: Tensor, key_channels: int, gamma: Tensor | None = None,
                                 residual: Tensor | None = None) -> Tensor:
    """residual + gamma * criss_cross_attention(q, k, v) for qkv = cat([q, k, v], 1), (B, 2 Ck + C, H, W).

    gamma (a one-element tensor) and residual (B, C, H, W) are optional. Channels-last input avoids
    every copy of the projection; the result is channels-last-strided in eager mode.
    """
    if torch.jit.is_scripting():  # TorchScript compiles the plain-op path only
        return _criss_cross_traced(qkv, key_channels, gamma, residual)
    if qkv.ndim != 4 or not 0 < 2 * key_channels < qkv.shape[1]:
        raise ValueError(f"criss_cross_attention: qkv {tuple(qkv.shape)} must be (B, 2 * {key_channels} + C, H, W)")
    c = qkv.shape[1] - 2 * key_channels
    if residual is not None and residual.shape != (qkv.shape[0], c) + qkv.shape[2:]:
        raise ValueError(f"criss_cross_attention: residual {tuple(residual.shape)} does not match the value "
                         f"({qkv.shape[0]}, {c}, {qkv.shape[2]}, {qkv.shape[3]})")
    with no_autocast(qkv.device):  # the logits and the softmax stay fp32
        if tracing():
            return _criss_cross_traced(qkv, key_channels, gamma, residual)
        return _CrissCross.apply(qkv, key_channels, gamma, residual)


def criss_cross_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Criss-cross attention (CCNet) for q, k (B, Ck, H, W) and v (B, C, H, W) -> (B, C, H, W).

    out(u) = sum_j softmax_j(q(u) . k(j)) v(j) over the H + W - 1 positions j in the row and column
    of u (u itself once), unscaled. Time O(N (H + W) (Ck + C)), memory O(N (H + W) + N C), N = H*W.
    """
    if q.ndim != 4 or q.shape != k.shape or v.ndim != 4 or v.shape[0] != q.shape[0] or v.shape[2:] != q.shape[2:]:
        raise ValueError(f"criss_cross_attention: q {tuple(q.shape)} and k {tuple(k.shape)} must be (B, Ck, H, W) "
                         f"and v {tuple(v.shape)} (B, C, H, W) with the same B, H, W")
    dtype = autocast_dtype(q.device)
    if dtype is None:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    qkv = torch.cat([t.to(dtype).permute(0, 2, 3, 1) for t in (q, k, v)], -1).permute(0, 3, 1, 2)  # channels_last
    return criss_cross_attention_packed(qkv, q.shape[1])
