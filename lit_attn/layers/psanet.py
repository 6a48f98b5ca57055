"""PSANet: point-wise spatial attention (collect / distribute), as a plug-in block.

PSANet: Point-wise Spatial Attention Network for Scene Parsing (Zhao, Zhang, Liu, Shi, Loy, Lin, Jia,
ECCV 2018). Official code: hszhao/PSANet (Caffe) and hszhao/semseg (`model/psanet.py`, `lib/psa`);
mmsegmentation's `PSAHead` with mmcv's compiled `PSAMask` op (`mmcv/ops/psa_mask.py`,
`csrc/pytorch/cpu/psamask.cpp`). Here the op is pure PyTorch, with mmcv's exact semantics:

- every pixel i = (h, w) predicts an over-complete mask of mask_h x mask_w logits; offset (dh, dw) from i
  is channel (dh + half_h) * mask_w + (dw + half_w), half = (mask - 1) // 2 (even sizes reach one more
  position down / right than up / left);
- `point_wise_logits` crops, for each i, the H x W window of its mask centred at i: G[i, j] = mask_i[j - i],
  and 0 where j - i falls outside the mask (maps larger than the mask window). Built with one
  advanced-indexing gather from index tensors of O(N (H + W)) cached per (H, W, mask, device) (built per
  call under TorchScript, which compiles no Python cache);
- mmcv's `PSAMask("distribute")` output is G itself and `PSAMask("collect")` its transpose, both laid out
  (B, N, H, W) with `psa_type`'s softmax over dim 1 (`psa_mask` returns them for comparison / reuse).
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from timm.layers import create_act_layer
from torch import Tensor, nn

from ..ops.attention import exporting, tracing
from ..ops.pooling import resize_bilinear
from ..registry import GLOBAL, register_attn
from ._utils import TimmInitHooks, check_channels, check_input, factory
from .conv_module import ConvModule

PSA_TYPES = ("collect", "distribute", "bi-direction")


def _pair(name: str, v) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(s, int) and s >= 1 for s in t):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {v!r}")
    return t


def _build_index(h: int, w: int, mask_h: int, mask_w: int, device: torch.device, traced: bool = False
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    half_h, half_w = (mask_h - 1) // 2, (mask_w - 1) // 2
    ar_h, ar_w = torch.arange(h, device=device), torch.arange(w, device=device)
    pix = torch.arange(h * w, device=device)
    pix_row = pix // w
    rows = ar_h[None, :] - pix_row[:, None] + half_h              # (N, H): mask row of (i, target row)
    cols = ar_w[None, :] - (pix - pix_row * w)[:, None] + half_w  # (N, W): mask column of (i, target col)
    # a map reaches outside the mask window iff some |offset| exceeds the half-size on its side (traced: h, w
    # are traced values and the masks are always built, a Python branch on them would freeze the export size's)
    row_out = ((rows < 0) | (rows >= mask_h))[:, :, None] if traced or h - 1 > min(half_h, mask_h - 1 - half_h) \
        else None
    col_out = ((cols < 0) | (cols >= mask_w))[:, None, :] if traced or w - 1 > min(half_w, mask_w - 1 - half_w) \
        else None
    return (rows.clamp(0, mask_h - 1)[:, :, None], cols.clamp(0, mask_w - 1)[:, None, :], pix[:, None, None],
            row_out, col_out)


@lru_cache(maxsize=32)
def _cached_index(h: int, w: int, mask_h: int, mask_w: int, device) -> tuple:
    with torch.inference_mode(False):  # tensors made under inference_mode could not be saved for backward later
        return _build_index(h, w, mask_h, mask_w, device)


def point_wise_logits(mask: Tensor, mask_size) -> Tensor:
    """(B, mask_h * mask_w, H, W) over-complete masks -> (B, N, N) logits G, N = H*W, with
    G[b, i, j] = mask[b, k(j - i), i] for the mask channel k of offset j - i, or 0 where that offset lies
    outside the mask_h x mask_w window (as mmcv's zero-initialised buffer). Row i is the pixel whose mask
    is used: softmax over j gives "collect" (i gathers), softmax over i gives "distribute" (j receives).
    """
    mask_h, mask_w = _pair("point_wise_logits: mask_size", mask_size)
    if mask.shape[1] != mask_h * mask_w:
        raise ValueError(f"point_wise_logits: the mask needs mask_h * mask_w = {mask_h * mask_w} channels, "
                         f"got {mask.shape[1]}")
    return _window_logits(mask, mask_h, mask_w)


def _window_logits(mask: Tensor, mask_h: int, mask_w: int) -> Tensor:
    """`point_wise_logits` for a checked mask (mask_h * mask_w channels), as the blocks call it."""
    b, _, h, w = mask.shape
    if torch.jit.is_scripting():  # no cache (a Python lru_cache) under TorchScript: the indices per call
        traced = False
        rows, cols, pix, row_out, col_out = _build_index(h, w, mask_h, mask_w, mask.device)
    else:
        traced = tracing()   # graph capture: no branch on the (traced / symbolic) size, no in-place write
        if traced:
            rows, cols, pix, row_out, col_out = _build_index(h, w, mask_h, mask_w, mask.device, traced=True)
        else:
            rows, cols, pix, row_out, col_out = _cached_index(h, w, mask_h, mask_w, mask.device)
    logits = mask.reshape(b, mask_h, mask_w, h * w)[:, rows, cols, pix]   # (B, N, H, W): window crop per pixel
    # out-of-window offsets -> 0; the gather's backward needs no values, so in place is safe (eager)
    if row_out is not None:
        logits = logits.masked_fill(row_out, 0) if traced else logits.masked_fill_(row_out, 0)
    if col_out is not None:
        logits = logits.masked_fill(col_out, 0) if traced else logits.masked_fill_(col_out, 0)
    return logits.reshape(b, h * w, h * w)


def psa_mask(mask: Tensor, psa_type: str, mask_size) -> Tensor:
    """mmcv's `PSAMask(psa_type, mask_size)(mask)`: (B, mask_h * mask_w, H, W) -> (B, H*W, H, W), where
    "distribute" is `point_wise_logits` and "collect" its (H*W, H*W) transpose (same values, swapped roles)."""
    if psa_type not in ("collect", "distribute"):
        raise ValueError(f"psa_mask: psa_type must be 'collect' or 'distribute', got {psa_type!r}")
    b, _, h, w = mask.shape
    g = point_wise_logits(mask, mask_size)
    return (g.transpose(1, 2) if psa_type == "collect" else g).reshape(b, h * w, h, w)


def shrunk_size(h: int, w: int, s: int) -> tuple[int, int, bool]:
    """(H', W', align_corners) of mmseg's PSA shrink by `s`: both sizes odd -> (H-1)//s+1 with
    align_corners=True, else H//s (clamped to 1; mmseg gives 0 on a 1-pixel side)."""
    if s == 1:
        return h, w, False
    if h % s and w % s:
        return (h - 1) // s + 1, (w - 1) // s + 1, True
    return max(1, h // s), max(1, w // s), False


def export_shrunk_size(h, w, s: int):
    """`shrunk_size` without a branch on the size, for captured graphs (sizes traced by the TorchScript tracer
    as 0-dim tensors, or torch.export's symbolic sizes): (H', W', c) with c = 1 when neither side is a multiple
    of s (then (H-1)//s + 1 = H//s + 1 and align_corners=True) else 0, all by integer arithmetic, so the exported
    graph applies mmseg's rule at every input size, not only at the export size's parity."""
    if s == 1:
        return h, w, 0
    c = ((h % s + s - 1) // s) * ((w % s + s - 1) // s)      # 1 iff h % s != 0 and w % s != 0

    def at_least_1(v):
        return v.clamp(min=1) if isinstance(v, Tensor) else torch.sym_max(v, 1)

    return at_least_1(h // s + c), at_least_1(w // s + c), c


class PointwiseSpatialContext:
    """The point-wise spatial attention pipeline shared by the `psanet` block and `PSAHead` (mmseg's
    PSAHead internals): per branch reduce -> shrink -> predict the over-complete mask -> aggregate, then
    `proj` and the resize back. Needs `reduce`, `attention` (+ `reduce_p`, `attention_p`), `proj`,
    `psa_type`, `mask_size`, `shrink_factor`, `psa_softmax` and `normalization_factor` on the module."""

    def extra_repr(self) -> str:
        return (f"psa_type={self.psa_type!r}, mask_size={self.mask_size}, shrink_factor={self.shrink_factor}, "
                f"normalization_factor={self.normalization_factor}, psa_softmax={self.psa_softmax}")

    def shrunk_size(self, h: int, w: int) -> tuple[int, int, bool]:
        return shrunk_size(h, w, self.shrink_factor)

    def attend(self, feats: Tensor, mask: Tensor, psa_type: str) -> Tensor:
        """Aggregate shrunk features (B, C', H', W') with the point-wise masks (B, mask_h*mask_w, H', W')."""
        b, c, h, w = feats.shape
        # (B, N', N'), row i = pixel whose mask is used
        attn = _window_logits(mask, self.mask_size[0], self.mask_size[1])
        collect = psa_type == "collect"
        if self.psa_softmax:
            attn = attn.softmax(-1 if collect else 1)
        v = feats.reshape(b, c, h * w)
        out = torch.bmm(v, attn.transpose(1, 2) if collect else attn) # collect: out_i = sum_j A_ij v_j
        return out.reshape(b, c, h, w) * (1.0 / self.normalization_factor)

    def _resize(self, t: Tensor, size: list[int], align: bool, traced: bool) -> Tensor:
        if not torch.jit.is_scripting():
            if traced:
                return resize_bilinear(t, size, align)
        return F.interpolate(t, size=size, mode="bilinear", align_corners=align)

    def context(self, x: Tensor) -> Tensor:
        """proj(concat of the branches' aggregated features), resized back to x's H, W.

        While a graph is captured for export (torch.jit.trace, both ONNX exporters, torch.export) the sizes are
        traced or symbolic: the shrink rule is computed without a branch (`export_shrunk_size`) and both resizes
        are interpolation matrices (`lit_attn.ops.pooling.resize_bilinear`, same weights as F.interpolate), so
        the exported graph follows the rule at every input size (a Python branch on the parity would be frozen
        at the export size's, or become a guard that torch.onnx's dynamo exporter can drop). The branches are
        spelled out (`reduce`/`attention`, then `reduce_p`/`attention_p` where present), as TorchScript wants."""
        h, w = x.shape[-2], x.shape[-1]
        if torch.jit.is_scripting():
            traced = False
            hs, ws, align = self.shrunk_size(h, w)
        else:
            traced = exporting()
            hs, ws, align = export_shrunk_size(h, w, self.shrink_factor) if traced else self.shrunk_size(h, w)
        shrink = traced or hs != h or ws != w
        feats = self.reduce(x)
        if shrink:
            feats = self._resize(feats, [hs, ws], align, traced)
        first = "collect" if self.psa_type == "bi-direction" else self.psa_type
        out = self.attend(feats, self.attention(feats), first)
        if hasattr(self, "reduce_p"):   # "bi-direction" (`hasattr` is resolved when TorchScript compiles)
            feats = self.reduce_p(x)
            if shrink:
                feats = self._resize(feats, [hs, ws], align, traced)
            out = torch.cat([out, self.attend(feats, self.attention_p(feats), "distribute")], 1)
        out = self.proj(out)
        if traced or out.shape[-2] != h or out.shape[-1] != w:
            out = self._resize(out, [h, w], align, traced)
        return out


@register_attn("psanet", family="psanet", kind=GLOBAL, year=2018,
               paper="PSANet: Point-wise Spatial Attention Network for Scene Parsing (ECCV 2018)",
               attends="positions (per-pixel predicted relative masks, collect + distribute)",
               cost="O(N^2 C / s^4 + N mask_h mask_w C / s^2)")
class PointwiseSpatialAttention(TimmInitHooks, PointwiseSpatialContext, nn.Module):
    """Point-wise spatial attention from "PSANet: Point-wise Spatial Attention Network for Scene Parsing"
    (Zhao et al., ECCV 2018; no arXiv version), mmseg's `PSAHead` internals in plug-in form. Per branch: `reduce`
    (1x1 conv-BN-act C -> C' = C * rd_ratio, mmseg 2048 -> 512), bilinear shrink by s with mmseg's rule (both
    sides odd: (H-1)//s + 1, align_corners=True; else H//s, False), `attention` (1x1 conv-BN-act, 1x1 conv to
    mask_h*mask_w channels: the over-complete mask of every pixel), the window crop of each pixel's mask
    (`point_wise_logits`: mmcv's PSAMask without a compiled op), softmax (collect: over the sources of each
    pixel; distribute: over the pixels sending to each target; `psa_softmax=False` skips it), aggregation of the
    shrunk features, / normalization_factor. "bi-direction" (default) concatenates a collect and a distribute
    branch (`reduce_p`, `attention_p`), then `proj` (1x1 conv-BN-act 2C' -> C with mmseg's padding=1, which adds
    a constant border ring before the resize; `proj_padding=0` is semseg's), bilinear resize to H x W, concat
    with x, `bottleneck` (3x3 conv-BN -> C, then act; mmseg's bottleneck outputs its `channels`, here C so that
    the block maps C -> C). Submodule names follow mmseg, so a PSAHead state dict loads except `bottleneck`.
    Positions farther than the mask's half-size (H' > (mask_h - 1)//2 + 1, e.g. W' = 64 of mmseg's Cityscapes
    64 x 128 features against the 97 x 97 mask) keep mmcv's zero buffer entry: logit 0, weight exp(0) / Z in the
    softmax, not excluded; reproduced here. Differences from mmseg: H//s is clamped to 1 (mmseg fails on 1 x 2
    maps); `compact=True` (mask channels = positions of one fixed map size) is refused, as a plug-in takes any
    H, W. No zero init (the output goes through BN-act, default ReLU). Cost, N = H*W, N' = N / s^2: the
    (B, N', N') attention is inherent to the method, O(N'^2 C') = O(N^2 C / s^4) time and O(N'^2) memory per
    branch, plus the mask conv, O(N' C' mask_h mask_w) time and O(N' mask_h mask_w) memory (9409 channels at
    97 x 97), and the 3x3 bottleneck O(N C^2).
    """

    def __init__(self, channels: int, *, mask_size=(97, 97), psa_type: str = "bi-direction", shrink_factor: int = 2,
                 normalization_factor: float | None = 1.0, psa_softmax: bool = True, compact: bool = False,
                 rd_ratio: float = 0.25, rd_channels: int | None = None, proj_padding: int = 1, act_layer=None,
                 norm_layer=nn.BatchNorm2d, device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        check_channels(name, channels)
        self.mask_size = _pair(f"{name}: mask_size", mask_size)
        if psa_type not in PSA_TYPES:
            raise ValueError(f"{name}: psa_type must be one of {PSA_TYPES}, got {psa_type!r}")
        if not isinstance(shrink_factor, int) or shrink_factor < 1:
            raise ValueError(f"{name}: shrink_factor must be a positive int, got {shrink_factor!r}")
        if compact:
            raise ValueError(f"{name}: compact=True ties the mask channels to one map size; use compact=False")
        if proj_padding not in (0, 1):
            raise ValueError(f"{name}: proj_padding must be 1 (mmseg) or 0 (semseg), got {proj_padding!r}")
        if rd_channels is None:
            if not rd_ratio > 0:
                raise ValueError(f"{name}: rd_ratio must be > 0, got {rd_ratio!r}")
            rd_channels = max(1, int(channels * rd_ratio))
        elif not isinstance(rd_channels, int) or rd_channels < 1:
            raise ValueError(f"{name}: rd_channels must be a positive integer, got {rd_channels!r}")
        mask_h, mask_w = self.mask_size
        if normalization_factor is None:
            normalization_factor = float(mask_h * mask_w)      # mmseg's None
        self.channels, self.rd_channels, self.psa_type = channels, rd_channels, psa_type
        self.shrink_factor, self.psa_softmax = shrink_factor, bool(psa_softmax)
        self.normalization_factor = float(normalization_factor)
        dd = factory(device, dtype)
        cna = dict(norm_layer=norm_layer, act_layer=act_layer or nn.ReLU, **dd)

        def attention():
            return nn.Sequential(ConvModule(rd_channels, rd_channels, 1, **cna),
                                 nn.Conv2d(rd_channels, mask_h * mask_w, 1, bias=False, **dd))

        self.reduce = ConvModule(channels, rd_channels, 1, **cna)
        self.attention = attention()
        if psa_type == "bi-direction":
            self.reduce_p = ConvModule(channels, rd_channels, 1, **cna)
            self.attention_p = attention()
        n_branch = 2 if psa_type == "bi-direction" else 1
        self.proj = ConvModule(n_branch * rd_channels, channels, 1, padding=proj_padding, **cna)
        self.bottleneck = ConvModule(2 * channels, channels, 3, padding=1, **{**cna, "act_layer": None})
        self.act = create_act_layer(act_layer or nn.ReLU, inplace=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, ConvModule):      # mmcv ConvModule init: kaiming fan_out, BN weight 1, bias 0
                nn.init.kaiming_normal_(m.conv.weight, mode="fan_out", nonlinearity="relu")
                if isinstance(m.bn, nn.BatchNorm2d):
                    m.bn.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_input(self, x, self.channels)
        out = self.context(x)
        out = self.bottleneck(torch.cat([x, out.to(x.dtype)], 1))
        # timm adds the shortcut into the block's output in place; ReLU saves its output for the backward,
        # clamp_min (the same function) its input
        if torch.jit.is_scripting():
            return self.act(out)
        return out.clamp_min(0) if type(self.act) is nn.ReLU else self.act(out)
