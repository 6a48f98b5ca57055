"""EMAHead: mmsegmentation's expectation-maximization attention decode head around lit_attn's `ema` block.

Li et al., "Expectation-Maximization Attention Networks for Semantic Segmentation", ICCV 2019,
arXiv 1907.13426, as mmseg's `EMAHead` (`mmseg/models/decode_heads/ema_head.py`): ema_in_conv 3x3 ->
EMA unit (frozen 1x1 mid conv, EM bases, 1x1 out conv + BN, residual, ReLU) -> bottleneck 3x3 ->
conv_cat 3x3 on concat[x, out] -> Dropout2d -> 1x1 classifier.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..registry import create_attn
from .fcn import (
    ConvModule,
    DecodeHead,
    LayerSpec,
    check_head_args,
    check_map,
    init_head_weights,
    resolve_act_layer,
    resolve_norm_layer,
)

__all__ = ["EMAHead"]


class EMAHead(DecodeHead):
    """mmsegmentation's EMAHead (EMANet, Li et al., ICCV 2019, arXiv 1907.13426; `mmseg:mmseg/models/
    decode_heads/ema_head.py@5563185`, config `emanet_r50-d8.py@85618a0`: channels 256, ema_channels 512,
    num_bases 64, num_stages 3, momentum 0.1, concat_input True, dropout 0.1; note channels=256 there, not
    512). `ema_in_conv` = ConvModule(in -> ema_channels, 3x3); `ema` = lit_attn's `ema` block (EMAUnit,
    `momentum=1 - momentum`, `norm_batch_bases=True`), which is mmseg's `ema_mid_conv` (`ema.conv1`: 1x1
    with bias, frozen), `ema_module` (bases = buffer `ema.mu`, EM under no_grad, moving average with an
    all-reduce mean and L2 norm in training), ReLU, `ema_out_conv` (`ema.conv2`: 1x1 no bias + BN, no
    act) and ReLU(identity + recon); then `bottleneck` = ConvModule(ema_channels -> channels, 3x3),
    `conv_cat` = ConvModule(in + channels -> channels, 3x3) on concat[x, out] (with `concat_input`),
    Dropout2d and `conv_seg`. `momentum` is mmseg's (weight of the new bases). Differences: the block's
    EM adds eps 1e-6 to the L1/L2 norms (official code; mmseg's F.normalize clamps at 1e-12) and runs in
    fp32 under autocast; its BN is always nn.BatchNorm2d (`norm_layer` sets the head's ConvModules);
    `init_weights` zeroes `ema.conv1.bias` as mmseg's ConvModule init does for `ema_mid_conv` (frozen, so
    its init is permanent; the block's official init leaves PyTorch's default bias). Parameters at in
    2048, channels 256, ema 512, K classes: 9*2048*512 + 1024 + 262656 (mid, frozen) + 263168 + 9*512*256
    + 512 + 9*2304*256 + 512 + 257 K; the 512 x 64 bases are a buffer. Cost O(N C K T) for the EM
    (K = 64, T = 3), N = h*w; input (B, in_channels, h, w), output (B, num_classes, h, w).
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, *, ema_channels: int = 512,
                 num_bases: int = 64, num_stages: int = 3, momentum: float = 0.1, concat_input: bool = True,
                 dropout: float = 0.1, norm_layer: LayerSpec = nn.BatchNorm2d, act_layer: LayerSpec = nn.ReLU):
        super().__init__()
        name = type(self).__name__
        check_head_args(name, dropout, in_channels=in_channels, channels=channels, num_classes=num_classes,
                        ema_channels=ema_channels, num_bases=num_bases, num_stages=num_stages)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{name}: momentum must be in [0, 1] (mmseg: weight of the new bases), got {momentum!r}")
        self.in_channels, self.channels, self.num_classes = in_channels, channels, num_classes
        self.ema_channels, self.momentum, self.concat_input = ema_channels, momentum, bool(concat_input)
        norm, act = resolve_norm_layer(norm_layer), resolve_act_layer(act_layer)
        self.ema_in_conv = ConvModule(in_channels, ema_channels, 3, norm_layer=norm, act_layer=act)
        self.ema = create_attn("ema", ema_channels, num_bases=num_bases, iterations=num_stages,
                               momentum=1.0 - momentum, norm_batch_bases=True)
        self.bottleneck = ConvModule(ema_channels, channels, 3, norm_layer=norm, act_layer=act)
        if self.concat_input:
            self.conv_cat = ConvModule(in_channels + channels, channels, 3, norm_layer=norm, act_layer=act)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.init_weights()

    __jit_unused_properties__ = ["no_grad_params"]  # TorchScript compiles module properties; forward does not use it

    @property
    def no_grad_params(self) -> tuple[str, ...]:
        """Parameters that get no gradient by design: the frozen mid conv (mmseg's `ema_mid_conv`)."""
        return tuple(f"ema.{n}" for n in getattr(self.ema, "no_grad_params", ()))

    def attention_modules(self) -> tuple[nn.Module, ...]:
        """The EMA unit; `init_weights` leaves it alone except for the mid conv's bias."""
        ema = getattr(self, "ema", None)
        return () if ema is None else (ema,)

    def init_weights(self) -> None:
        """mmseg's init: ConvModules kaiming fan_out + BN (1, 0), conv_seg N(0, 0.01); in the block only
        `conv1.bias` (mmseg's ema_mid_conv bias) is zeroed, its weights keep N(0, sqrt(2 / C)), which for a
        1x1 C -> C conv is mmseg's kaiming fan_out normal."""
        init_head_weights(self, skip=self.attention_modules())
        if self.ema.conv1.bias is not None:
            with torch.no_grad():
                self.ema.conv1.bias.zero_()

    def forward_features(self, x: Tensor) -> Tensor:
        """The (B, channels, h, w) features before dropout and the classifier."""
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_map(self, x, self.in_channels)
        out = self.bottleneck(self.ema(self.ema_in_conv(x)))
        if self.concat_input:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return out
