"""Adaptive average pooling and bilinear resizing with export paths.

`F.adaptive_avg_pool2d(x, s)` averages, for output row i, the input rows [floor(i H / s), ceil((i + 1) H / s))
(same for columns). Its ONNX lowering needs a static input size that s divides (the TorchScript-based
exporter refuses other sizes: "input size not accessible"; the dynamo-based one bakes the bins of the
export size into the graph). `adaptive_avg_pool2d` here is F.adaptive_avg_pool2d in eager mode and under
torch.compile; while a graph is captured for export (`exporting()`) it computes the same bins from the
traced input size and pools with two small matrix products, P_h x P_w^T, where P (s, H) holds
1 / (bin length) on each bin's rows: plain ops (arange, comparisons, matmul) that every exporter lowers
with dynamic H and W. Cost O(N C s) for an (H, W) = N map, against O(N C) for the pooling kernel.

`resize_bilinear(x, size, align_corners)` is F.interpolate(x, size, mode="bilinear") written as two
interpolation matrices built from traced sizes, for the TorchScript tracer (where sizes are traced values):
`align_corners` may then be a traced boolean (PSANet's shrink rule chooses it from the parity of the size).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import exporting

__all__ = ["adaptive_avg_pool2d", "adaptive_pool_matrix", "resize_bilinear", "resize_matrix"]


def adaptive_pool_matrix(size, out: int, dtype: torch.dtype, device=None) -> Tensor:
    """(out, size) matrix averaging the bins of adaptive pooling from `size` to `out`: row i holds
    1 / (end_i - start_i) on [start_i, end_i), start_i = floor(i size / out), end_i = ceil((i + 1) size / out).
    `size` may be a traced / symbolic size (a 0-dim tensor under the TorchScript tracer)."""
    i = torch.arange(out, device=device)
    start = torch.div(i * size, out, rounding_mode="floor")
    end = torch.div((i + 1) * size + out - 1, out, rounding_mode="floor")
    j = torch.arange(size, device=device)
    inside = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])
    return inside.to(dtype) / (end - start)[:, None].to(dtype)


def adaptive_avg_pool2d(x: Tensor, output_size: int | tuple[int, int]) -> Tensor:
    """F.adaptive_avg_pool2d(x, output_size) for x (B, C, H, W) and an int or (int, int) output size (no None);
    computed with matrix products while exporting (see the module docstring)."""
    if torch.jit.is_scripting():  # TorchScript compiles the pooling kernel only
        if isinstance(output_size, int):
            return F.adaptive_avg_pool2d(x, output_size)
        return F.adaptive_avg_pool2d(x, output_size)
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if not exporting() or (oh == 1 and ow == 1):  # global pooling lowers everywhere (GlobalAveragePool)
        return F.adaptive_avg_pool2d(x, (oh, ow))
    h, w = x.shape[-2], x.shape[-1]
    ph = adaptive_pool_matrix(h, oh, x.dtype, x.device)
    pw = adaptive_pool_matrix(w, ow, x.dtype, x.device)
    return torch.matmul(torch.matmul(ph, x), pw.transpose(0, 1))


def resize_matrix(size, out, align_corners, dtype: torch.dtype, device=None) -> Tensor:
    """(out, size) weights of 1-D linear interpolation as F.interpolate(mode="bilinear", size=...) computes them
    along one axis (PyTorch's source index: align_corners: i (size - 1) / (out - 1), 0 when out == 1; else
    max(0, (i + 0.5) size / out - 0.5); then the two neighbours lo = floor(src), min(lo + 1, size - 1)).

    `size` and `out` may be ints, torch.export's symbolic sizes or values traced by the TorchScript tracer
    (0-dim tensors); `align_corners` a bool or a 0/1 number of the same kinds (blended arithmetically, exact
    for 0 and 1, so that no branch on it enters a captured graph)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    i = torch.arange(out, device=device).to(acc)
    if isinstance(size, Tensor) or isinstance(out, Tensor):   # TorchScript tracer: sizes are 0-dim tensors
        n_in, n_out = (v.to(acc) if isinstance(v, Tensor) else torch.tensor(v, dtype=acc, device=device)
                       for v in (size, out))
        scale_aligned, scale_half = (n_in - 1) / (n_out - 1).clamp(min=1), n_in / n_out
    else:                                                      # ints or symbolic ints (torch.export)
        scale_aligned, scale_half = (size - 1) / torch.sym_max(out - 1, 1), size / out
    src_aligned = i * scale_aligned
    src_half = ((i + 0.5) * scale_half - 0.5).clamp(min=0)
    a = int(align_corners) if isinstance(align_corners, bool) else align_corners
    if isinstance(a, Tensor):
        a = a.to(acc)
    src = src_aligned * a + src_half * (1 - a)
    lo = src.floor().clamp(max=size - 1)
    hi = (lo + 1).clamp(max=size - 1)
    lam = src - lo
    j = torch.arange(size, device=device).to(acc)[None, :]
    weights = (j == lo[:, None]).to(acc) * (1 - lam[:, None]) + (j == hi[:, None]).to(acc) * lam[:, None]
    return weights.to(dtype)


def resize_bilinear(x: Tensor, size, align_corners) -> Tensor:
    """F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners) for x (B, C, H, W) as
    R_h x R_w^T with `resize_matrix` (sizes and align_corners may be traced values)."""
    rh = resize_matrix(x.shape[-2], size[0], align_corners, x.dtype, x.device)
    rw = resize_matrix(x.shape[-1], size[1], align_corners, x.dtype, x.device)
    return torch.matmul(torch.matmul(rh, x), rw.transpose(0, 1))
