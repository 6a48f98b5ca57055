"""DANet's decode head (mmsegmentation's DAHead): a position and a channel attention branch, three classifiers.

Fu et al., "Dual Attention Network for Scene Segmentation", CVPR 2019, arXiv 1809.02983, in mmsegmentation's
form (`mmseg/models/decode_heads/da_head.py`). The attention modules are lit_attn's `danet_pam` and `danet_cam`
blocks (`lit_attn/layers/danet.py`); this file only wires the convs and classifiers around them.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..registry import create_attn
from .fcn import ConvModule, LayerSpec, check_head_args, check_map, init_head_weights

__all__ = ["DAHead"]


class DAHead(nn.Module):
    """DANet decode head ("Dual Attention Network for Scene Segmentation", Fu et al., CVPR 2019, arXiv 1809.02983),
    as mmseg's `DAHead` (`mmseg/models/decode_heads/da_head.py@94f9cb4`, config `danet_r50-d8.py@3f8d34e`:
    channels 512, pam_channels 64, dropout 0.1). Two branches on the input x: `pam_in_conv` (3x3 ConvModule,
    in -> channels) -> `pam` -> `pam_out_conv` (3x3, channels -> channels), and the same with `cam`; the main
    logits are `conv_seg(dropout(pam_feat + cam_feat))`, and in training mode the head also returns
    `pam_conv_seg(dropout(pam_feat))` and `cam_conv_seg(dropout(cam_feat))`: `(pam_cam, pam, cam)`, each trained
    with the decode loss (`extra_loss_weights = (1.0, 1.0)`, as mmseg's three equal losses); eval mode returns the
    pam_cam logits only (mmseg's `forward_test`, which skips nothing but discards the other two; here they are
    not computed). `pam` is lit_attn's `danet_pam` = mmseg's PAM (SelfAttentionBlock with key/query 1x1 convs
    C -> pam_channels with bias and no norm, value 1x1 C -> C with bias, no out projection, unscaled
    softmax(Q K^T) over key positions, `Scale(0)` residual), computed by a fused kernel without the N x N matrix;
    `cam` is `danet_cam` with mode "official" = mmseg's CAM (softmax(rowmax(E) - E), E = X X^T, no parameters but
    gamma), with E and the softmax in fp32 under autocast (mmseg: the input dtype). Same maths, parameter count
    and init as mmseg (ConvModules kaiming fan_out, norms (1, 0), conv_seg N(0, 0.01); pam/cam_conv_seg and the
    PAM convs PyTorch's default; gammas 0); one shared Dropout2d, as mmseg. State dict: mmseg's keys except
    `pam.{key,query,value}_project` -> `pam.{key,query,value}_conv` and the 0-d `{pam,cam}.gamma.scale` -> the (1,)
    `{pam,cam}.gamma`. Cost O(N^2 C) (PAM) + O(N C^2) (CAM) time, O(N C + C^2) memory, N = H*W. R-50-D8, K = 19:
    23,954,619 parameters, as mmseg.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, *, pam_channels: int = 64,
                 dropout: float = 0.1, norm_layer: LayerSpec = nn.BatchNorm2d, act_layer: LayerSpec = nn.ReLU):
        super().__init__()
        check_head_args("DAHead", dropout, in_channels=in_channels, channels=channels, num_classes=num_classes,
                        pam_channels=pam_channels)
        self.in_channels, self.channels, self.num_classes = in_channels, channels, num_classes
        self.pam_channels = pam_channels
        self.extra_loss_weights: tuple[float, ...] = (1.0, 1.0)
        conv = {"kernel_size": 3, "norm_layer": norm_layer, "act_layer": act_layer}
        self.pam_in_conv = ConvModule(in_channels, channels, **conv)
        self.pam = create_attn("danet_pam", channels, rd_channels=pam_channels)
        self.pam_out_conv = ConvModule(channels, channels, **conv)
        self.pam_conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.cam_in_conv = ConvModule(in_channels, channels, **conv)
        self.cam = create_attn("danet_cam", channels, mode="official")
        self.cam_out_conv = ConvModule(channels, channels, **conv)
        self.cam_conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.init_weights()

    def attention_modules(self) -> tuple[nn.Module, ...]:
        """The PAM and CAM blocks; `init_weights` leaves them alone (their own init: zero gammas)."""
        return (self.pam, self.cam)

    def init_weights(self) -> None:
        """mmseg's init: ConvModules kaiming (fan_out) + norms (1, 0), conv_seg N(0, 0.01); mmseg's init_cfg
        overrides only `conv_seg`, so pam_conv_seg and cam_conv_seg get PyTorch's default init."""
        init_head_weights(self, skip=self.attention_modules())
        self.pam_conv_seg.reset_parameters()
        self.cam_conv_seg.reset_parameters()

    def branch_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(pam_feat, cam_feat), each (B, channels, H, W): the two branches before dropout and classifiers."""
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_map(self, x, self.in_channels)
        pam_feat = self.pam_out_conv(self.pam(self.pam_in_conv(x)))
        cam_feat = self.cam_out_conv(self.cam(self.cam_in_conv(x)))
        return pam_feat, cam_feat

    def forward_features(self, x: Tensor) -> Tensor:
        """pam_feat + cam_feat (B, channels, H, W): the features of the main (pam_cam) classifier."""
        pam_feat, cam_feat = self.branch_features(x)
        return pam_feat + cam_feat

    def cls_seg(self, feat: Tensor) -> Tensor:
        """Dropout2d, then the main 1x1 classifier `conv_seg` (mmseg's `cls_seg`)."""
        return self.conv_seg(self.dropout(feat))

    def pam_cls_seg(self, feat: Tensor) -> Tensor:
        return self.pam_conv_seg(self.dropout(feat))

    def cam_cls_seg(self, feat: Tensor) -> Tensor:
        return self.cam_conv_seg(self.dropout(feat))

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        pam_feat, cam_feat = self.branch_features(x)
        pam_cam = self.cls_seg(pam_feat + cam_feat)
        if not self.training:
            return pam_cam
        return pam_cam, self.pam_cls_seg(pam_feat), self.cam_cls_seg(cam_feat)

    def extra_repr(self) -> str:
        return f"pam_channels={self.pam_channels}"
