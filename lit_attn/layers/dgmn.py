"""DGMN: dynamic graph message passing, as a plug-in block.

Dynamic Graph Message Passing Networks (Zhang, Xu, Arnab, Torr, CVPR 2020, arXiv 1908.06955).
Official code: lzrobots/dgmn (a maskrcnn-benchmark fork), `maskrcnn_benchmark/layers/dynamic_weight.py`
(`DynamicWeightsCat11`; the `Cat33` / `Re*` variants there are the same idea on C channels / with
deformable convs for the kernels). The parameter names follow `DynamicWeightsCat11` (`scale1`,
`cata`..`catd`, `scale2`, `scale3`), so its state dicts load directly.

Placement in the released detection config (`configs/dw/e2e_mask_rcnn_R_50_FPN_1x.yaml`): only res5
(`STAGE_WITH_DW: (False, False, False, True)`), inside *every* res5 bottleneck after the 3x3 conv
(`INSERT_POS: after3x3`, `DOMAIN: block`, on the bottleneck width, there with the `ReDynamicWeightsCat33`
variant), GROUP 4, DEFORM "deformatt", dilations (1, 4, 8, 12). `DOMAIN: stage` instead appends one
`DynamicWeightsCat11` after the last block of the stage, and `INSERT_POS: afterAdd` puts one after the
residual addition of each block (the position this plug-in takes in a timm attention slot is inside
the block, before the addition).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import get_act_layer
from torch import Tensor, nn

from ..ops.amp import no_autocast
from ..registry import GLOBAL, register_attn
from ._utils import TimmInitHooks, check_channels, check_input, factory

_PAPER = "Dynamic Graph Message Passing Networks (CVPR 2020, arXiv 1908.06955)"
_EXTRA = {"none": 0, "deform": 18, "deformatt": 27}   # offsets (2 x 9 taps) and 9 modulation logits
_TAPS = 9


def deform_unfold(x: Tensor, offset: Tensor, dilation: int) -> Tensor:
    """The 3x3 dilated neighbourhood of every pixel, moved by per-pixel offsets: (B, C, H, W) and
    (B, 18, H, W) -> (B, C, 9, H*W), as the official CUDA `DeformUnfold` (DCN v1 im2col with kernel 3,
    padding = dilation, stride 1, one deformable group): offset channel 2k is the row and 2k + 1 the
    column shift of tap k = 3 i + j, the samples are bilinear with zeros outside the map. fp16 / bf16
    inputs are sampled in fp32 (a bf16 sampling grid would be off by pixels).
    """
    b, c, h, w = x.shape
    taps = 9  # the 3x3 taps (_TAPS: TorchScript reads no int globals)
    dev = x.device
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    with no_autocast(dev):
        off = offset.to(acc).view(b, taps, 2, h, w)
        tap = torch.arange(taps, device=dev)
        ky = ((tap // 3 - 1) * dilation).view(1, taps, 1, 1)
        kx = ((tap % 3 - 1) * dilation).view(1, taps, 1, 1)
        ys = torch.arange(h, device=dev).view(1, 1, h, 1) + ky + off[:, :, 0]   # (B, 9, H, W)
        xs = torch.arange(w, device=dev).view(1, 1, 1, w) + kx + off[:, :, 1]
        # pixel centres -> [-1, 1] with align_corners=False (exact for any size, H or W = 1 included)
        grid = torch.stack(((2 * xs + 1) / w - 1, (2 * ys + 1) / h - 1), dim=-1).view(b, taps, h * w, 2)
        cols = F.grid_sample(x.to(acc), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return cols.to(x.dtype)


def gn_groups_for(channels: int, groups: int = 32) -> int:
    """gcd(groups, channels) GroupNorm groups (the official 32 where channels is a multiple of 64), halved
    where that leaves a single channel per group (GroupNorm cannot normalise one value on a 1x1 map)."""
    g = math.gcd(groups, channels)
    return math.gcd(groups, channels // 2) if g == channels > 1 else g


def _gn(channels: int, groups: int, dd: dict) -> nn.GroupNorm:
    return nn.GroupNorm(gn_groups_for(channels, groups), channels, **dd)


@register_attn("dgmn", family="dgmn", kind=GLOBAL, paper=_PAPER, year=2020,
               attends="9 sampled neighbours x 4 dilations per position (dynamic, deformable)",
               cost="O(N C^2)")
class DynamicGraphMessagePassing(TimmInitHooks, nn.Module):
    """DGMN dynamic message passing, from "Dynamic Graph Message Passing Networks" (Zhang, Xu, Arnab,
    Torr, CVPR 2020, arXiv 1908.06955), as the official `DynamicWeightsCat11`: x is reduced to
    C' = C * rd_ratio (C/4) by a 1x1 conv (no bias) + GN + ReLU; for each dilation d in (1, 4, 8, 12)
    a 3x3 conv with dilation d (no bias) predicts, per pixel, `group` x 9 filter logits (softmax over
    the 9 taps: the dynamic weights/affinities), in the default `mode="deformatt"` (the full model of
    the released config) also 18 offsets (dynamic sampling: the 9 neighbours at d-spaced taps are
    moved and bilinearly sampled, `deform_unfold`) and 9 sigmoid modulations multiplying the sampled
    neighbours; `mode="deform"` has offsets only, `mode="none"` gathers the fixed dilated 3x3
    neighbourhood (F.unfold). The C' channels are split in `group` groups (default 4, the released
    config), each aggregated with its own filter. The input and the 4 messages are concatenated (5 C')
    -> 1x1 conv (no bias) + GN + ReLU -> C', 1x1 conv (no bias) + GN + ReLU -> C, out = x + that.
    `shuffle=True` permutes the groups' filters at random in training (official option, off in the
    config). GN: the official maskrcnn-benchmark `group_norm` uses 32 groups (and fails unless 32
    divides the channels); here `gn_groups_for`: gcd(gn_groups, channels), halved where that leaves one
    channel per group, so narrow layers work (C' = 8 at C = 32: 4 groups of 2; the official 32 groups
    wherever the channels are a multiple of 64). Differences from the official code: offsets and
    modulations are read from `9 * group` on in "deform" mode too (the official slices 9 channels,
    which only works with group=1); the deformable sampling is grid_sample, not the CUDA kernel (same
    bilinear rule). Not identity at init (no zero-init in the official code; the last GN-ReLU starts
    with weight 1). act_layer replaces the ReLUs (default ReLU). Cost O(N C^2) time for the 1x1
    convs plus O(N C) for the 36 sampled neighbours (O(N C) memory, no N x N), N = H*W.
    """

    def __init__(self, channels: int, *, dilations: tuple[int, ...] = (1, 4, 8, 12), group: int = 4,
                 mode: str = "deformatt", shuffle: bool = False, gn_groups: int = 32, rd_ratio: float = 1 / 4,
                 act_layer=None, device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        check_channels(name, channels)
        if mode not in _EXTRA:
            raise ValueError(f"{name}: mode must be one of {tuple(_EXTRA)}, got {mode!r}")
        if not rd_ratio > 0:
            raise ValueError(f"{name}: rd_ratio must be > 0, got {rd_ratio!r}")
        dilations = tuple(dilations)
        if not 1 <= len(dilations) <= 26 or any(not isinstance(d, int) or d < 1 for d in dilations):
            raise ValueError(f"{name}: dilations must be positive integers, got {dilations!r}")
        inner = max(1, int(channels * rd_ratio))
        if not isinstance(group, int) or group < 1 or inner % group:
            raise ValueError(f"{name}: group={group!r} must divide the reduced channels {inner}")
        if not isinstance(gn_groups, int) or gn_groups < 1:
            raise ValueError(f"{name}: gn_groups must be a positive integer, got {gn_groups!r}")
        dd = factory(device, dtype)
        act = get_act_layer(act_layer or "relu")
        self.channels, self.inner, self.group, self.mode = channels, inner, group, mode
        self.dilations, self.shuffle = dilations, bool(shuffle)
        self.scale1 = nn.Sequential(nn.Conv2d(channels, inner, 1, bias=False, **dd), _gn(inner, gn_groups, dd), act())
        for i, d in enumerate(dilations):   # official names cata, catb, catc, catd
            self.add_module(f"cat{chr(97 + i)}", nn.Conv2d(inner, group * _TAPS + _EXTRA[mode], 3, padding=d,
                                                           dilation=d, bias=False, **dd))
        self.scale2 = nn.Sequential(nn.Conv2d(inner * (1 + len(dilations)), inner, 1, bias=False, **dd),
                                    _gn(inner, gn_groups, dd), act())
        self.scale3 = nn.Sequential(nn.Conv2d(inner, channels, 1, bias=False, **dd),
                                    _gn(channels, gn_groups, dd), act())

    def extra_repr(self) -> str:
        return f"inner={self.inner}, dilations={self.dilations}, group={self.group}, mode={self.mode!r}"

    def message(self, xd: Tensor, i: int) -> Tensor:
        """The message of dilation branch i on the reduced features xd (B, C', H, W) -> (B, C', H, W)."""
        return self.aggregate(xd, getattr(self, f"cat{chr(97 + i)}")(xd), self.dilations[i])

    def aggregate(self, xd: Tensor, pred: Tensor, d: int) -> Tensor:
        """A dilation-d branch's message from its conv's prediction `pred` (filter logits, offsets, modulations)."""
        b, c, h, w = xd.shape
        g, n, taps = self.group, h * w, 9   # 9 = _TAPS
        filt = torch.softmax(pred[:, :g * taps].reshape(b, g, taps, n), dim=2)    # (B, G, 9, N)
        if self.training and self.shuffle:
            filt = filt[:, torch.randperm(g, device=xd.device)]
        if self.mode == "none":
            cols = F.unfold(xd, 3, dilation=d, padding=d).view(b, c, taps, n)
        else:
            cols = deform_unfold(xd, pred[:, g * taps:g * taps + 18], d)          # (B, C', 9, N)
            if self.mode == "deformatt":
                cols = cols * torch.sigmoid(pred[:, -taps:]).reshape(b, 1, taps, n)
        cols = cols.view(b, g, c // g, taps, n)
        return torch.einsum("bgrkn,bgkn->bgrn", cols, filt).reshape(b, c, h, w)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_input(self, x, self.channels)
        xd = self.scale1(x)
        if torch.jit.is_scripting():  # TorchScript cannot look up `cat{a, b, ..}` by a computed name: it unrolls
            feats = [xd]              # the children (in registration order: cata, catb, ..) and keeps those
            for name, conv in self.named_children():
                if name.startswith("cat"):
                    feats.append(self.aggregate(xd, conv(xd), self.dilations[len(feats) - 1]))
        else:
            feats = [xd] + [self.message(xd, i) for i in range(len(self.dilations))]
        return x + self.scale3(self.scale2(torch.cat(feats, dim=1)))
