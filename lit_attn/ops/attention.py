"""Global softmax attention over the H*W positions of a feature map.

`global_attention(q, k, v)` computes softmax(q k^T * scale + bias) v for q (B, h, Nq, dk),
k (B, h, Nk, dk), v (B, h, Nk, dv) without ever holding the (Nq, Nk) matrix in memory:

- through `torch.nn.functional.scaled_dot_product_attention` on CUDA, under `torch.compile`,
  `torch.jit.trace` and ONNX export (the chunked kernel's Function does not trace), and on CPU
  when dk == dv (the CPU flash kernel needs equal head dims and a contiguous last dimension:
  `map_to_tokens` builds that layout). On CUDA, unequal or wide head dims are made
  flash-eligible by zero-padding q/k (zeros add nothing to q.k) and splitting v into slices of
  at most 256 channels (`fused_attention`);
- otherwise (CPU, dk != dv, e.g. DANet's PAM with C/8 keys and C values) through an exact
  query-chunked attention whose backward recomputes the chunk's probabilities from the saved
  log-sum-exp, as FlashAttention does. Memory O(chunk * Nk); logits are accumulated in fp32 for
  fp16/bf16 inputs, so softmax stays finite under autocast.

The optional bias is a decomposed 2-D relative-position term (Attention Augmented Convolution,
MViTv2): bias[i, (y, x)] = rel_h[i, y] + rel_w[i, x] for keys on a (Hk, Wk) grid in row-major
order. The chunked kernel adds it per chunk; the SDPA path folds it into q/k by appending
rel_h/rel_w to q and one-hot key coordinates to k, so no (Nq, Nk) bias exists either way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .amp import autocast_dtype, no_autocast

CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MB in fp32): large GEMMs, memory far below N x N


def default_chunk(q: Tensor, k: Tensor) -> int:
    """Queries per chunk so that one chunk's (batch, heads, chunk, Nk) logits hold ~CHUNK_ELEMENTS."""
    rows = q.numel() // (q.shape[-1] * q.shape[-2])  # batch x heads
    return min(q.shape[-2], max(64, CHUNK_ELEMENTS // max(1, rows * k.shape[-2])))


def map_to_tokens(x: Tensor, heads: int = 1) -> Tensor:
    """(B, C, H, W) -> (B, heads, H*W, C // heads), contiguous in the last dimension."""
    b, c, h, w = x.shape
    return x.reshape(b, heads, c // heads, h * w).transpose(-1, -2).contiguous()


def tokens_to_map(t: Tensor, height: int, width: int) -> Tensor:
    """(B, heads, H*W, d) -> (B, heads * d, H, W)."""
    b, heads, n, d = t.shape
    return t.transpose(-1, -2).reshape(b, heads * d, height, width)


def tracing() -> bool:
    """True under torch.compile, torch.jit.trace and the TorchScript-based ONNX export: custom autograd
    Functions and in-place writes into fresh buffers do not trace (a Python call, a constant), plain ops do."""
    if torch.jit.is_scripting():
        return False
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def exporting() -> bool:
    """True while a graph is captured for export: torch.jit.trace, both ONNX exporters (TorchScript-based and
    dynamo-based) and torch.export. Export paths that replace ops without an ONNX lowering (adaptive pooling to
    sizes that do not divide the input, searchsorted) or that keep shape arithmetic symbolic take this flag;
    torch.compile keeps the eager ops."""
    if torch.jit.is_scripting():
        return False
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.compiler.is_exporting()


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _bias(rel_h: Tensor, rel_w: Tensor, s: int, e: int) -> Tensor:
    """(.., chunk, Hk*Wk) relative-position logits for queries s:e."""
    b = rel_h[..., s:e, :, None] + rel_w[..., s:e, None, :]
    return b.flatten(-2)


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rel_h, rel_w, scale: float, chunk: int):
        acc = _acc_dtype(q)
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],), dtype=v.dtype)
        lse = q.new_empty(q.shape[:-1], dtype=acc)
        kt = k.transpose(-1, -2).to(acc)  # logits in the accumulation dtype (fp32 for half inputs)
        for s in range(0, q.shape[-2], chunk):
            e = min(s + chunk, q.shape[-2])
            logits = torch.matmul(q[..., s:e, :].to(acc), kt).mul_(scale)
            if rel_h is not None:
                logits += _bias(rel_h, rel_w, s, e)
            # the fused softmax is several times faster than logsumexp on CPU; the log-sum-exp the
            # backward needs follows from it, since the largest probability sits at the largest logit
            row_max = logits.amax(-1)
            p = torch.softmax(logits, -1)
            lse[..., s:e] = row_max - p.amax(-1).log()
            out[..., s:e, :] = torch.matmul(p.to(v.dtype), v)
        ctx.save_for_backward(q, k, v, rel_h, rel_w, out, lse)
        ctx.scale, ctx.chunk = scale, chunk
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, rel_h, rel_w, out, lse = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        acc = _acc_dtype(q)
        lead, nq, nk = q.shape[:-2], q.shape[-2], k.shape[-2]
        # 3-D (batch * heads, tokens, dims) views; dK and dV accumulate in place with baddbmm
        q3, k3, v3 = q.reshape(-1, nq, q.shape[-1]), k.reshape(-1, nk, k.shape[-1]), v.reshape(-1, nk, v.shape[-1])
        do3 = dout.reshape(-1, nq, dout.shape[-1]).contiguous()  # arrives transposed from tokens_to_map
        lse3 = lse.reshape(-1, nq)
        dq = torch.empty_like(q3)
        dk = torch.zeros_like(k3, dtype=acc)
        dv = torch.zeros_like(v3, dtype=acc)
        has_rel = rel_h is not None
        d_rel_h = torch.empty_like(rel_h) if has_rel else None
        d_rel_w = torch.empty_like(rel_w) if has_rel else None
        kt, vt = k3.transpose(1, 2).to(acc), v3.transpose(1, 2)
        delta = (do3.to(acc) * out.reshape(do3.shape).to(acc)).sum(-1)
        for s in range(0, nq, chunk):
            e = min(s + chunk, nq)
            q_i, do_i = q3[:, s:e].to(acc), do3[:, s:e]
            logits = torch.bmm(q_i, kt).mul_(scale)
            if has_rel:
                logits += _bias(rel_h, rel_w, s, e).reshape(logits.shape)
            p = logits.sub_(lse3[:, s:e, None]).exp_()
            dv.baddbmm_(p.transpose(1, 2), do_i.to(acc))
            ds = torch.bmm(do_i, vt).to(acc).sub_(delta[:, s:e, None]).mul_(p)  # d logits
            if has_rel:
                grid = ds.reshape(*lead, e - s, rel_h.shape[-1], rel_w.shape[-1])
                d_rel_h[..., s:e, :] = grid.sum(-1)
                d_rel_w[..., s:e, :] = grid.sum(-2)
            ds.mul_(scale)
            dq[:, s:e] = torch.bmm(ds.to(k.dtype), k3)
            dk.baddbmm_(ds.transpose(1, 2), q_i)
        return (dq.reshape(q.shape), dk.to(k.dtype).reshape(k.shape), dv.to(v.dtype).reshape(v.shape),
                d_rel_h, d_rel_w, None, None)


def _common_dtype(*ts: Tensor) -> torch.dtype:
    dtype = autocast_dtype(ts[0].device)
    if dtype is not None:
        return dtype
    dtype = ts[0].dtype
    for t in ts[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None,
                      rel_h: Tensor | None = None, rel_w: Tensor | None = None,
                      chunk_size: int | None = None) -> Tensor:
    """Exact softmax(q k^T * scale + bias) v, processed in blocks of `chunk_size` queries
    (default: `default_chunk`, about 16M logits per block)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if tracing():
        return _traced_attention(q, k, v, scale, rel_h, rel_w)
    dtype = _common_dtype(q, k, v)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if rel_h is not None:  # the bias is added to fp32 logits: keep it in the accumulation dtype
        acc = _acc_dtype(q)
        rel_h, rel_w = rel_h.to(acc), rel_w.to(acc)
    with no_autocast(q.device):
        return _ChunkedAttention.apply(q, k, v, rel_h, rel_w, scale, chunk_size or default_chunk(q, k))


def _fold_rel_bias(q: Tensor, k: Tensor, rel_h: Tensor, rel_w: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Append rel_h/rel_w to q and one-hot key rows/columns to k: q'.k' = scale q.k + bias."""
    hk, wk = rel_h.shape[-1], rel_w.shape[-1]
    rows = torch.arange(hk, device=k.device).repeat_interleave(wk)
    cols = torch.arange(wk, device=k.device).repeat(hk)
    onehot = torch.cat([F.one_hot(rows, hk), F.one_hot(cols, wk)], -1).to(k.dtype)
    onehot = onehot.expand(list(k.shape[:-2]) + [hk * wk, hk + wk])
    q = torch.cat([q * scale, rel_h.to(q.dtype), rel_w.to(q.dtype)], -1)
    return q, torch.cat([k, onehot], -1)


def _traced_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, rel_h: Tensor | None,
                      rel_w: Tensor | None) -> Tensor:
    """SDPA with the bias folded into q/k: plain ops for compilers, tracers and TorchScript, which pick the kernel."""
    if rel_h is not None and rel_w is not None:
        q, k = _fold_rel_bias(q, k, rel_h, rel_w, scale)
        scale = 1.0
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


FLASH_MAX_DIM = 256


def fused_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """SDPA with q/k zero-padded to each <= 256-wide slice of v, so that flash kernels apply."""
    dk, dv = q.shape[-1], v.shape[-1]
    if dk == dv <= FLASH_MAX_DIM:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if dk > FLASH_MAX_DIM:  # no fused kernel takes such keys: stay exact and O(N) in memory
        return chunked_attention(q, k, v, scale)
    outs = []
    for v_i in v.split(FLASH_MAX_DIM, -1):
        d = max(dk, v_i.shape[-1])
        out = F.scaled_dot_product_attention(F.pad(q, (0, d - dk)), F.pad(k, (0, d - dk)),
                                             F.pad(v_i, (0, d - v_i.shape[-1])), scale=scale)
        outs.append(out[..., : v_i.shape[-1]])
    return torch.cat(outs, -1)


def global_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None,
                     rel_h: Tensor | None = None, rel_w: Tensor | None = None) -> Tensor:
    """softmax(q k^T * scale + bias) v over all key positions, with no (Nq, Nk) matrix in memory.

    q: (B, h, Nq, dk), k: (B, h, Nk, dk), v: (B, h, Nk, dv); scale defaults to dk ** -0.5.
    rel_h (B, h, Nq, Hk) and rel_w (B, h, Nq, Wk), given together, add the decomposed relative
    position bias rel_h[i, y] + rel_w[i, x] for key j = y * Wk + x (requires Nk == Hk * Wk).
    """
    if torch.jit.is_scripting():  # TorchScript compiles only this path (the checks below format shapes)
        return _traced_attention(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale, rel_h, rel_w)
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"global_attention: q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} "
                         "need matching key dims and key counts")
    if (rel_h is None) != (rel_w is None):
        raise ValueError("global_attention: rel_h and rel_w must be given together")
    if rel_h is not None and rel_h.shape[-1] * rel_w.shape[-1] != k.shape[-2]:
        raise ValueError(f"global_attention: rel_h {tuple(rel_h.shape)} x rel_w {tuple(rel_w.shape)} "
                         f"do not cover the {k.shape[-2]} keys")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    has_rel = rel_h is not None
    if tracing():  # let the compiler pick its kernel
        return _traced_attention(q, k, v, scale, rel_h, rel_w)
    if q.device.type == "cpu":
        if not has_rel and q.shape[-1] == v.shape[-1]:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)  # CPU flash kernel
        return chunked_attention(q, k, v, scale, rel_h, rel_w)
    if has_rel:
        if q.shape[-1] + rel_h.shape[-1] + rel_w.shape[-1] > FLASH_MAX_DIM:
            return chunked_attention(q, k, v, scale, rel_h, rel_w)
        q, k = _fold_rel_bias(q, k, rel_h, rel_w, scale)
        scale = 1.0
    return fused_attention(q, k, v, scale)
