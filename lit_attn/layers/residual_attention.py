"""Residual Attention Network attention module (Wang et al., CVPR 2017, arXiv 1704.06904).

`AttentionModule` is the paper's building block: a trunk branch T(x) of pre-activation bottleneck
units and a bottom-up / top-down soft-mask branch M(x) (max-pool down, residual units, bilinear
up, residual-unit skips, then BN-ReLU-1x1-BN-ReLU-1x1-sigmoid) that gates the trunk with
attention residual learning, H = (1 + M) * T. The mask has the full C x H x W shape ("mixed"
attention: an independent sigmoid per channel and position). `PreActBottleneck` is the residual
unit the module (and the `resattnet*` models) are built from.

Read from the official Caffe deploy prototxts (fwang91/residual-attention-network,
`imagenet_model/Attention-56-deploy.prototxt`, `model/Attention-92-deploy.prototxt`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import create_act_layer, get_act_layer, get_norm_layer
from torch import Tensor, nn

from ..registry import GATE, register_attn
from ._utils import TimmInitHooks, check_channels, check_input, factory

__all__ = ["AttentionModule", "PreActBottleneck"]


def _non_negative_int(block: str, **values) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{block}: {name} must be a non-negative int, got {v!r}")


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck residual unit (He et al., ECCV 2016), as used by the Residual
    Attention Network prototxts: BN-act-1x1 (mid), BN-act-3x3 (mid, stride), BN-act-1x1 (out),
    plus the identity, or a strided 1x1 projection of the pre-activated input when the shape
    changes (the prototxt's `branch2`). The stride sits on the 3x3 conv. No biases. Cost
    O(N C mid) for the 1x1 convs and O(N mid^2) for the 3x3 conv."""

    def __init__(self, in_chs: int, out_chs: int | None = None, *, mid_chs: int | None = None,
                 stride: int = 1, act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d, device=None, dtype=None):
        super().__init__()
        dd = factory(device, dtype)
        out_chs = out_chs or in_chs
        mid_chs = mid_chs or max(1, out_chs // 4)
        norm_layer = get_norm_layer(norm_layer) or nn.BatchNorm2d
        act_layer = get_act_layer(act_layer) or nn.ReLU
        self.norm1 = norm_layer(in_chs, **dd)
        self.act1 = create_act_layer(act_layer, inplace=False)  # norm1 may be identity-like: keep x intact
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 1, bias=False, **dd)
        self.norm2 = norm_layer(mid_chs, **dd)
        self.act2 = create_act_layer(act_layer, inplace=True)
        self.conv2 = nn.Conv2d(mid_chs, mid_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.norm3 = norm_layer(mid_chs, **dd)
        self.act3 = create_act_layer(act_layer, inplace=True)
        self.conv3 = nn.Conv2d(mid_chs, out_chs, 1, bias=False, **dd)
        self.downsample = (nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, **dd)
                           if stride != 1 or in_chs != out_chs else None)

    def forward(self, x: Tensor) -> Tensor:
        x_pre = self.act1(self.norm1(x))
        shortcut = x if self.downsample is None else self.downsample(x_pre)
        x = self.conv1(x_pre)
        x = self.conv2(self.act2(self.norm2(x)))
        x = self.conv3(self.act3(self.norm3(x)))
        return x + shortcut


@register_attn("residual_attention", family="residual_attention", kind=GATE,
               paper="Residual Attention Network for Image Classification (CVPR 2017, arXiv 1704.06904)",
               year=2017, attends="channels x positions (mixed soft mask)", cost="O(N C^2)")
class AttentionModule(TimmInitHooks, nn.Module):
    """Residual Attention Network attention module, "Residual Attention Network for Image
    Classification" (Wang et al., CVPR 2017, arXiv 1704.06904). `p` shared pre-activation
    bottleneck units (width `channels * rd_ratio`), then a trunk of `t` units and, from the same
    shared output, a soft mask: `levels` max-pool 3x3/s2 steps with `r` units each (2r at the
    lowest level), one residual-unit skip per level above the lowest, bilinear upsampling to the
    exact size of each matching level with `r` units after each skip sum, then
    BN-act-1x1-BN-act-1x1-gate; output `final((1 + M) * T)` through `p` final units. The
    prototxt's stage-1/2/3 modules ("AttentionA/B/C") are `levels=3/2/1`; the plug-in default
    `levels=2` (one skip, mask core at 1/4 resolution) suits the 1/4..1/32 maps of timm's
    attention slots, and any H, W >= 1 works (odd sizes, e.g. 7x9 -> 4x5 -> 2x3, and 1x1).
    `p=0, t=0` gives a pure gate `(1 + M(x)) * x`. Differences from the official Caffe code:
    max-pool uses padding 1 / floor mode instead of Caffe's padding 0 / ceil mode (the same output
    sizes for even inputs, windows shifted by one pixel, and 1x1 inputs work); the upsampling is
    bilinear with align_corners=True, which is what Caffe's Interp layer computes; BN is standard
    BatchNorm (the official "BN" layer is the same affine batch norm). `gate_layer="sigmoid"`
    (default) follows the paper and the released `imagenet_model/` prototxts; `"tanh"` is the
    earlier `model/` prototxts' mask (M in (-1, 1)). The paper has no zero-init, so the module is
    not the identity at init (the mask starts near 0.5, so H ~ 1.5 T, and the units are random).
    Cost: (6 + 3 (levels - 1)) bottleneck units plus two C x C 1x1 convs at the defaults, i.e.
    O(N C^2) time and O(C^2) parameters (about 11.6 C^2 at `levels=2`); no N x N term."""

    def __init__(self, channels: int, *, p: int = 1, t: int = 2, r: int = 1, levels: int = 2,
                 gate_layer="sigmoid", rd_ratio: float = 1 / 4, rd_channels: int | None = None,
                 act_layer=None, norm_layer=None, device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        check_channels(name, channels)
        _non_negative_int(name, p=p, t=t, r=r)
        if not isinstance(levels, int) or isinstance(levels, bool) or levels < 1:
            raise ValueError(f"{name}: levels must be an int >= 1, got {levels!r}")
        if rd_channels is None:
            if not rd_ratio > 0:
                raise ValueError(f"{name}: rd_ratio must be > 0, got {rd_ratio!r}")
            rd_channels = max(1, int(round(channels * rd_ratio)))
        elif not isinstance(rd_channels, int) or rd_channels < 1:
            raise ValueError(f"{name}: rd_channels must be a positive int, got {rd_channels!r}")
        self.channels = channels
        self.levels = levels
        dd = factory(device, dtype)
        act_layer = get_act_layer(act_layer) or nn.ReLU
        norm_layer = get_norm_layer(norm_layer) or nn.BatchNorm2d

        def units(n: int) -> nn.Sequential:
            return nn.Sequential(*[PreActBottleneck(channels, channels, mid_chs=rd_channels, act_layer=act_layer,
                                                    norm_layer=norm_layer, **dd) for _ in range(n)])

        self.shared = units(p)
        self.trunk = units(t)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        # down[i] runs after the (i+1)-th pooling; the lowest level has 2r units
        self.down = nn.ModuleList([units(r) for _ in range(levels - 1)] + [units(2 * r)])
        self.skips = nn.ModuleList([units(1) for _ in range(levels - 1)])
        self.up = nn.ModuleList([units(r) for _ in range(levels - 1)])
        self.mask_head = nn.Sequential(
            norm_layer(channels, **dd), create_act_layer(act_layer, inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False, **dd),
            norm_layer(channels, **dd), create_act_layer(act_layer, inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False, **dd),
        )
        self.gate = create_act_layer(gate_layer)
        self.final = units(p)

    def _upsample(self, x: Tensor, size: list[int]) -> Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)

    def mask_logits(self, s: Tensor) -> Tensor:
        """Soft-mask branch before the gate, from the shared units' output `s`: (B, C, H, W)."""
        size = s.shape[-2:]
        x = s
        skips: list[Tensor] = []
        for i, down in enumerate(self.down):
            x = down(self.pool(x))
            if i < len(self.skips):
                if torch.jit.is_scripting():  # TorchScript indexes a ModuleList by literals only: find skips[i]
                    for j, skip in enumerate(self.skips):
                        if j == i:
                            skips.append(skip(x))
                else:
                    skips.append(self.skips[i](x))
        for i in range(len(self.up) - 1, -1, -1):   # top-down: the lowest level first
            x = self._upsample(x, skips[i].shape[-2:]) + skips[i]
            if torch.jit.is_scripting():
                for j, up in enumerate(self.up):
                    if j == i:
                        x = up(x)
            else:
                x = self.up[i](x)
        return self.mask_head(self._upsample(x, size))

    def mask(self, s: Tensor) -> Tensor:
        """The soft mask M (after the gate) for the shared units' output `s`: (B, C, H, W)."""
        return self.gate(self.mask_logits(s))

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_input(self, x, self.channels)
        s = self.shared(x)
        t = self.trunk(s)
        m = self.mask(s)
        return self.final(t * (1 + m))
