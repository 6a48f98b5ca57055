"""Local dynamic aggregation over a k x k window: the op under the Local Relation layer and CARAFE.

Output position p has a centre on the input grid: (i * stride, j * stride), or (i // scale, j // scale)
for an upsampling op (CARAFE); tap t = (a, b) of the k x k window (row-major) is the input pixel at
centre + ((a - k // 2) * dilation, (b - k // 2) * dilation). Taps outside the input are zero
(zero padding). Channels form `groups` contiguous groups that share one weight per tap and position.

- `local_aggregate(x, weights)`: out[b, c, p] = sum_t weights[b, g(c), t, p] * x[b, c, tap_t(p)]
- `local_correlation(q, k, groups)`: logits[b, g, t, p] = sum_{c in g} q[b, c, p] * k[b, c, tap_t(p)]
- `local_valid_mask`: which (t, p) taps lie inside the input.

Both are memory-lean: the F.unfold form holds C * k^2 values per position (49x the input for k = 7);
here the ops loop over the k^2 taps with shifted slices, accumulate in place, and their autograd
saves only the two inputs. The two ops are each other's transposes, so three loop kernels serve
both forward and backward passes (`_aggregate`, `_aggregate_t`, `_correlate`), each registered as
a `torch.library` custom op (lit_attn::local_aggregate, ...) so that `torch.compile` keeps it as one
opaque node (no graph break, fast compile). Half-precision inputs accumulate in fp32. ONNX export
(which knows no custom op) takes an F.unfold form instead (k^2 times the input in memory).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .amp import autocast_dtype, no_autocast

__all__ = ["local_aggregate", "local_correlation", "local_valid_mask", "local_out_size"]


def local_out_size(size: int, stride: int = 1) -> int:
    """Output length of a strided local op on an input of length `size` ('same' padding)."""
    return (size - 1) // stride + 1


def _axis_taps(kernel_size: int, dilation: int, in_size: int, out_size: int, stride: int) -> list:
    """Per kernel row (or column): (output slice, input slice) of the positions whose tap is inside."""
    taps = []
    for a in range(kernel_size):
        off = (a - kernel_size // 2) * dilation
        lo = max(0, -(off // stride))                          # ceil(-off / stride)
        hi = min(out_size, (in_size - 1 - off) // stride + 1)
        taps.append((slice(lo, hi), slice(lo * stride + off, (hi - 1) * stride + off + 1, stride))
                    if hi > lo else None)
    return taps


@dataclass(frozen=True)
class _Grid:
    """Sizes of one local op: input (H, W), output centres (Ho, Wo) and the taps that fall inside."""
    groups: int
    kernel_size: int
    in_hw: tuple
    out_hw: tuple  # centres; the output map is (Ho * scale, Wo * scale)
    scale: int
    taps: tuple    # (t, out_rows, in_rows, out_cols, in_cols)

    @classmethod
    def make(cls, groups, kernel_size, dilation, in_hw, scale=1, stride=1):
        out_hw = in_hw if scale > 1 else (local_out_size(in_hw[0], stride), local_out_size(in_hw[1], stride))
        rows = _axis_taps(kernel_size, dilation, in_hw[0], out_hw[0], stride)
        cols = _axis_taps(kernel_size, dilation, in_hw[1], out_hw[1], stride)
        taps = tuple((a * kernel_size + b, *rows[a], *cols[b]) for a in range(kernel_size)
                     for b in range(kernel_size) if rows[a] is not None and cols[b] is not None)
        return cls(groups, kernel_size, tuple(in_hw), out_hw, scale, taps)

    def inp(self, t: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, G, C/G, H, 1, W, 1)."""
        return t.unflatten(1, (self.groups, -1))[:, :, :, :, None, :, None]

    def out(self, t: Tensor) -> Tensor:
        """(B, C, Ho*s, Wo*s) -> (B, G, C/G, Ho, s, Wo, s); weights (B, G, T, Ho*s, Wo*s) -> (B, G, T, Ho, s, Wo, s)."""
        (ho, wo), s = self.out_hw, self.scale
        if t.ndim == 4:
            t = t.unflatten(1, (self.groups, -1))
        return t.unflatten(4, (wo, s)).unflatten(3, (ho, s))

    def acc_zeros(self, shape, like: Tensor) -> Tensor:
        acc = torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype
        return like.new_zeros(shape, dtype=acc)


def _aggregate(x: Tensor, w: Tensor, grid: _Grid) -> Tensor:
    """out[b, c, p] = sum_t w[b, g, t, p] x[b, c, tap_t(p)] -> (B, C, Ho s, Wo s)."""
    xv, wv = grid.inp(x), grid.out(w)
    (ho, wo), s = grid.out_hw, grid.scale
    out = grid.acc_zeros((x.shape[0], x.shape[1], ho * s, wo * s), x)
    ov = grid.out(out)  # the returned tensor is the base, not a view (custom-op outputs must not be views)
    for t, oy, iy, ox, ix in grid.taps:
        ov[:, :, :, oy, :, ox].addcmul_(xv[:, :, :, iy, :, ix], wv[:, :, t, None, oy, :, ox])
    return out.to(x.dtype)


def _aggregate_t(go: Tensor, w: Tensor, grid: _Grid) -> Tensor:
    """Transpose of `_aggregate` in x: gx[b, c, tap_t(p)] += w[b, g, t, p] go[b, c, p] -> (B, C, H, W)."""
    gv, wv = grid.out(go), grid.out(w)
    gx = grid.acc_zeros((go.shape[0], go.shape[1], *grid.in_hw), go)
    gxv = grid.inp(gx)
    for t, oy, iy, ox, ix in grid.taps:
        target = gxv[:, :, :, iy, :, ix]
        for sy in range(grid.scale):  # the s x s output pixels that share one input centre
            for sx in range(grid.scale):
                y, x = slice(sy, sy + 1), slice(sx, sx + 1)
                target.addcmul_(gv[:, :, :, oy, y, ox, x], wv[:, :, t, None, oy, y, ox, x])
    return gx.to(go.dtype)


def _correlate(q: Tensor, k: Tensor, grid: _Grid) -> Tensor:
    """logits[b, g, t, p] = sum_{c in g} q[b, c, p] k[b, c, tap_t(p)] -> (B, G, T, Ho s, Wo s); 0 outside."""
    qv, kv = grid.out(q), grid.inp(k)
    (ho, wo), s = grid.out_hw, grid.scale
    logits = grid.acc_zeros((q.shape[0], grid.groups, grid.kernel_size ** 2, ho * s, wo * s), q)
    lv = grid.out(logits)
    for t, oy, iy, ox, ix in grid.taps:
        lv[:, :, t, oy, :, ox] = (qv[:, :, :, oy, :, ox] * kv[:, :, :, iy, :, ix]).sum(2, dtype=logits.dtype)
    return logits.to(q.dtype)


# The loops are registered as custom ops: opaque to torch.compile (no graph break, no unrolling of the
# k^2 taps into the graph), with their autograd formulas and shape-only fake implementations.
@torch.library.custom_op("lit_attn::local_aggregate", mutates_args=())
def _aggregate_op(x: Tensor, w: Tensor, kernel_size: int, dilation: int, scale: int, stride: int) -> Tensor:
    return _aggregate(x, w, _Grid.make(w.shape[1], kernel_size, dilation, tuple(x.shape[-2:]), scale, stride))


@torch.library.custom_op("lit_attn::local_aggregate_t", mutates_args=())
def _aggregate_t_op(go: Tensor, w: Tensor, height: int, width: int, kernel_size: int, dilation: int, scale: int,
                    stride: int) -> Tensor:
    return _aggregate_t(go, w, _Grid.make(w.shape[1], kernel_size, dilation, (height, width), scale, stride))


@torch.library.custom_op("lit_attn::local_correlation", mutates_args=())
def _correlate_op(q: Tensor, k: Tensor, groups: int, kernel_size: int, dilation: int, scale: int,
                  stride: int) -> Tensor:
    return _correlate(q, k, _Grid.make(groups, kernel_size, dilation, tuple(k.shape[-2:]), scale, stride))


@_aggregate_op.register_fake
def _(x, w, kernel_size, dilation, scale, stride):
    return x.new_empty((x.shape[0], x.shape[1], w.shape[-2], w.shape[-1]))


@_aggregate_t_op.register_fake
def _(go, w, height, width, kernel_size, dilation, scale, stride):
    return go.new_empty((go.shape[0], go.shape[1], height, width))


@_correlate_op.register_fake
def _(q, k, groups, kernel_size, dilation, scale, stride):
    return q.new_empty((q.shape[0], groups, kernel_size ** 2, q.shape[-2], q.shape[-1]))


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])  # only the two inputs: no k^2-sized tensor is kept
    ctx.args = inputs[2:]


def _aggregate_backward(ctx, grad):
    x, w = ctx.saved_tensors
    gx = _aggregate_t_op(grad, w, x.shape[-2], x.shape[-1], *ctx.args) if ctx.needs_input_grad[0] else None
    gw = _correlate_op(grad, x, w.shape[1], *ctx.args) if ctx.needs_input_grad[1] else None
    return gx, gw, None, None, None, None


def _correlate_backward(ctx, grad):
    q, k = ctx.saved_tensors
    args = ctx.args[1:]  # without groups (read from grad)
    gq = _aggregate_op(k, grad, *args) if ctx.needs_input_grad[0] else None
    gk = _aggregate_t_op(q, grad, k.shape[-2], k.shape[-1], *args) if ctx.needs_input_grad[1] else None
    return gq, gk, None, None, None, None, None


_aggregate_op.register_autograd(_aggregate_backward, setup_context=_save_inputs)
_correlate_op.register_autograd(_correlate_backward, setup_context=_save_inputs)


def _windows(x: Tensor, groups: int, kernel_size: int, dilation: int, scale: int, stride: int) -> Tensor:
    """(B, C, H, W) -> (B, G, C/G, k*k, Ho s, Wo s): every output position's zero-padded window, by F.unfold
    (plain ops for ONNX export)."""
    b, c, h, w = x.shape
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=dilation * (kernel_size // 2), stride=stride)
    cols = cols.view(b, groups, c // groups, kernel_size ** 2, local_out_size(h, stride), local_out_size(w, stride))
    return cols.repeat_interleave(scale, -2).repeat_interleave(scale, -1) if scale > 1 else cols


def _common_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    dtype = autocast_dtype(a.device)
    return torch.promote_types(a.dtype, b.dtype) if dtype is None else dtype


def _check(fn: str, kernel_size: int, dilation: int, scale: int, stride: int) -> None:
    for what, v in (("kernel_size", kernel_size), ("dilation", dilation), ("scale", scale), ("stride", stride)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{fn}: {what} must be a positive int, got {v!r}")
    if kernel_size % 2 == 0:
        raise ValueError(f"{fn}: kernel_size must be odd (centred window), got {kernel_size}")
    if scale > 1 and stride > 1:
        raise ValueError(f"{fn}: scale={scale} and stride={stride} cannot both exceed 1")


def local_aggregate(x: Tensor, weights: Tensor, kernel_size: int, dilation: int = 1, scale: int = 1,
                    stride: int = 1) -> Tensor:
    """Weighted sum over each output position's k x k input window, per channel group.

    x: (B, C, H, W); weights: (B, G, k*k, Ho, Wo) with G dividing C (channel c uses group c // (C/G))
    and taps in row-major order; (Ho, Wo) = (scale H, scale W) for upsampling (the window of output
    pixel (i, j) is centred at input (i // scale, j // scale), as CARAFE), else ((H-1)//stride + 1, ...)
    (centre (i stride, j stride)). Zero padding. Returns (B, C, Ho, Wo). Memory O(B (C H W + G k^2 Ho Wo)).
    """
    _check("local_aggregate", kernel_size, dilation, scale, stride)
    if x.ndim != 4 or weights.ndim != 5:
        raise ValueError(f"local_aggregate: x must be 4-D and weights 5-D, got {tuple(x.shape)}, "
                         f"{tuple(weights.shape)}")
    b, c, h, w = x.shape
    grid = _Grid.make(weights.shape[1], kernel_size, dilation, (h, w), scale, stride)
    expected = (b, grid.groups, kernel_size ** 2, grid.out_hw[0] * scale, grid.out_hw[1] * scale)
    if grid.groups < 1 or c % grid.groups or tuple(weights.shape) != expected:
        raise ValueError(f"local_aggregate: weights {tuple(weights.shape)} do not fit x {tuple(x.shape)}: expected "
                         f"(B, G, k*k, Ho, Wo) = {expected} with G dividing C={c}")
    dtype = _common_dtype(x, weights)
    x, weights = x.to(dtype), weights.to(dtype)
    if torch.onnx.is_in_onnx_export():
        cols = _windows(x, grid.groups, kernel_size, dilation, scale, stride)
        return (cols * weights[:, :, None]).sum(3).flatten(1, 2)
    with no_autocast(x.device):
        return _aggregate_op(x, weights, kernel_size, dilation, scale, stride)


def local_correlation(q: Tensor, k: Tensor, groups: int, kernel_size: int, dilation: int = 1, scale: int = 1,
                      stride: int = 1) -> Tensor:
    """Per-group dot products of each output position's query with the keys of its k x k input window.

    q: (B, C, Ho, Wo) on the output grid, k: (B, C, H, W) on the input grid (grids related as in
    `local_aggregate`), G = `groups` dividing C. Returns logits (B, G, k*k, Ho, Wo), 0 for taps outside
    the input (see `local_valid_mask`). The transpose of `local_aggregate` in its weights.
    """
    _check("local_correlation", kernel_size, dilation, scale, stride)
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"local_correlation: q and k must be 4-D, got {tuple(q.shape)}, {tuple(k.shape)}")
    grid = _Grid.make(groups, kernel_size, dilation, tuple(k.shape[-2:]), scale, stride)
    out = (grid.out_hw[0] * scale, grid.out_hw[1] * scale)
    if (not isinstance(groups, int) or groups < 1 or k.shape[1] % groups or q.shape[:2] != k.shape[:2]
            or tuple(q.shape[-2:]) != out):
        raise ValueError(f"local_correlation: q {tuple(q.shape)} and k {tuple(k.shape)} need the same (B, C) with "
                         f"C divisible by groups={groups}, and q on the {out} output grid")
    dtype = _common_dtype(q, k)
    q, k = q.to(dtype), k.to(dtype)
    if torch.onnx.is_in_onnx_export():
        cols = _windows(k, groups, kernel_size, dilation, scale, stride)
        return (cols * q.unflatten(1, (groups, -1))[:, :, :, None]).sum(2)
    with no_autocast(q.device):
        return _correlate_op(q, k, groups, kernel_size, dilation, scale, stride)


def local_valid_mask(in_hw: tuple[int, int], kernel_size: int, dilation: int = 1, scale: int = 1, stride: int = 1,
                     device=None) -> Tensor:
    """(k*k, Ho, Wo) bool: True where tap t of output position p lies inside the (H, W) input."""
    offsets = (torch.arange(kernel_size, device=device) - kernel_size // 2) * dilation

    def inside(size: int) -> Tensor:  # (k, output length)
        pos = torch.arange(size * scale, device=device) // scale if scale > 1 else \
            torch.arange(local_out_size(size, stride), device=device) * stride
        tap = pos[None, :] + offsets[:, None]
        return (tap >= 0) & (tap < size)

    rows, cols = inside(int(in_hw[0])), inside(int(in_hw[1]))
    return (rows[:, None, :, None] & cols[None, :, None, :]).flatten(0, 1)
