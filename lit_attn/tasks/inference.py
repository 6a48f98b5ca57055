"""Test-time inference for segmentation: whole image, sliding window, multi-scale + flip.

Follows mmsegmentation's `EncoderDecoder.whole_inference` / `slide_inference` / `aug_test`:
slide crops of `crop_size` every `stride` pixels (the last crop aligned to the border), logits
summed and divided by the per-pixel crop count; multi-scale + flip averages the softmax
probabilities of every (scale, flip) pass after resizing them back to the input size.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

MODES = ("whole", "slide")


def split_outputs(out) -> tuple[Tensor, list[Tensor]]:
    """(main logits, auxiliary logits) from a Tensor, a (main, *aux) tuple or a {"out", "aux"} dict."""
    if isinstance(out, dict):
        aux = out.get("aux", [])
        return out["out"], list(aux) if isinstance(aux, (list, tuple)) else [aux]
    if isinstance(out, (tuple, list)):
        return out[0], list(out[1:])
    return out, []


def resize(logits: Tensor, size) -> Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def label_map(scores: Tensor, size, max_elements: int = 1 << 24) -> Tensor:
    """Class indices (H, W) of `scores` (K, h, w) resized to `size` = (H, W): the argmax of the bilinear
    (align_corners=False) resize, as `resize(scores[None], size)[0].argmax(0)`, but computed in bands of output
    rows so that at most about `max_elements` resized scores exist at once (a 6000x6000 photo's 19 class scores
    would take 2.7 GB). Each band is resized along the width from the input rows it needs, then blended between
    the two source rows of each output row: the separable form of the same bilinear weights."""
    k, h, w = scores.shape
    out_h, out_w = (int(v) for v in size)
    if k * out_h * out_w <= max_elements:
        return resize(scores[None], (out_h, out_w))[0].argmax(0)
    rows = max(1, max_elements // (k * out_w))
    out = torch.empty(out_h, out_w, dtype=torch.long, device=scores.device)
    for y0 in range(0, out_h, rows):
        y1 = min(out_h, y0 + rows)
        src = ((torch.arange(y0, y1, device=scores.device, dtype=torch.float64) + 0.5) * (h / out_h) - 0.5).clamp(0)
        lo = src.floor().long().clamp(max=h - 1)
        hi = (lo + 1).clamp(max=h - 1)
        frac = (src - lo).to(scores.dtype)[:, None]
        r0, r1 = int(lo[0]), int(hi[-1]) + 1
        band = resize(scores[None, :, r0:r1], (r1 - r0, out_w))[0]           # width only (height is unchanged)
        top, bottom = band[:, lo - r0], band[:, hi - r0]
        out[y0:y1] = (top * (1 - frac) + bottom * frac).argmax(0)
    return out


def whole_inference(model: Callable, x: Tensor) -> Tensor:
    return resize(split_outputs(model(x))[0], x.shape[-2:])


def slide_inference(model: Callable, x: Tensor, crop_size: Sequence[int], stride: Sequence[int]) -> Tensor:
    """Logits of `x` from overlapping crops (mmseg's slide_inference)."""
    (h_crop, w_crop), (h_stride, w_stride) = crop_size, stride
    if min(h_crop, w_crop, h_stride, w_stride) < 1:
        raise ValueError(f"slide inference needs positive crop_size and stride, got {crop_size}, {stride}")
    b, _, h, w = x.shape
    h_grids = max(h - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w - w_crop + w_stride - 1, 0) // w_stride + 1
    logits, count = None, x.new_zeros(1, 1, h, w)
    for i in range(h_grids):
        for j in range(w_grids):
            y2, x2 = min(i * h_stride + h_crop, h), min(j * w_stride + w_crop, w)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            crop = whole_inference(model, x[:, :, y1:y2, x1:x2])
            if logits is None:
                logits = x.new_zeros(b, crop.shape[1], h, w, dtype=crop.dtype)
            logits[:, :, y1:y2, x1:x2] += crop
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def segment(model: Callable, x: Tensor, *, mode: str = "whole", crop_size=None, stride=None,
            scales: Sequence[float] = (1.0,), flip: bool = False) -> Tensor:
    """Class scores (B, K, H, W) of `x`: logits for a single pass, mean probabilities for several."""
    if mode not in MODES:
        raise ValueError(f"inference mode must be one of {MODES}, got {mode!r}")
    if mode == "slide" and (crop_size is None or stride is None):
        raise ValueError("slide inference needs crop_size and stride")

    def once(inp):
        if mode == "slide":
            return slide_inference(model, inp, crop_size, stride)
        return whole_inference(model, inp)

    passes = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    if passes == [(1.0, False)]:
        return once(x)
    size, probs = x.shape[-2:], 0
    for scale, flipped in passes:
        inp = x if scale == 1.0 else F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        inp = inp.flip(-1) if flipped else inp
        out = once(inp)
        out = out.flip(-1) if flipped else out
        probs = probs + resize(out, size).softmax(1)
    return probs / len(passes)
