"""mmsegmentation's FCNHead and the conv + norm + act unit (mmcv's ConvModule) the heads are built from.

Long, Shelhamer, Darrell, "Fully Convolutional Networks for Semantic Segmentation", CVPR 2015,
arXiv 1411.4038, in mmsegmentation's form (`mmseg/models/decode_heads/fcn_head.py`): `num_convs`
k x k ConvModules, optionally `conv_cat` on concat([x, out]), Dropout2d, a 1x1 classifier `conv_seg`.
Submodule names follow mmseg (`convs.i.conv`, `convs.i.bn`, `conv_cat`, `conv_seg`), so an mmseg
FCNHead state dict loads by key.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers.conv_module import ConvModule, LayerSpec, resolve_act_layer, resolve_norm_layer

__all__ = ["ConvModule", "DecodeHead", "FCNHead", "check_head_args", "check_map", "init_head_weights",
           "resolve_norm_layer", "resolve_act_layer"]

def check_head_args(name: str, dropout: float, **ints: int) -> None:
    """ValueError naming the head unless every `ints` value is a positive int and dropout is in [0, 1)."""
    for what, v in ints.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: {what} must be a positive int, got {v!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout!r}")


def check_map(head: nn.Module, x: Tensor, channels: int, what: str = "feature map") -> None:
    """ValueError naming the head unless x is a non-empty (B, channels, H, W) tensor."""
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != channels or 0 in x.shape:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{type(head).__name__} expects a (B, {channels}, H, W) {what} with B, H, W >= 1, "
                         f"got {shape}")


def init_head_weights(head: nn.Module, skip: tuple[nn.Module, ...] = ()) -> None:
    """mmseg's decode-head init: every ConvModule of `head` kaiming (fan_out) + norm (1, 0), `conv_seg`
    N(0, 0.01) with zero bias. Modules in `skip` (the attention blocks, which keep their own paper
    init, e.g. a zero gamma) and their children are left alone.
    """
    skipped = {id(m) for s in skip for m in s.modules()}
    for m in head.modules():
        if isinstance(m, ConvModule) and id(m) not in skipped:
            m.init_weights()
    conv_seg = getattr(head, "conv_seg", None)
    if isinstance(conv_seg, nn.Conv2d):
        nn.init.normal_(conv_seg.weight, mean=0.0, std=0.01)
        if conv_seg.bias is not None:
            nn.init.zeros_(conv_seg.bias)


class DecodeHead(nn.Module):
    """What every decode head shares (mmseg's BaseDecodeHead, trimmed): `cls_seg` (Dropout2d then the
    1x1 classifier `conv_seg`), mmseg's init of the head's own layers that leaves the attention blocks
    (`attention_modules()`) with their papers' init, and forward = cls_seg(forward_features(*inputs))."""

    def attention_modules(self) -> tuple[nn.Module, ...]:
        """The attention blocks inside the head (none here); `init_weights` leaves them alone."""
        return ()

    def init_weights(self) -> None:
        init_head_weights(self, skip=self.attention_modules())

    def cls_seg(self, feat: Tensor) -> Tensor:
        """Dropout2d, then the 1x1 classifier (mmseg's `cls_seg`)."""
        return self.conv_seg(self.dropout(feat))

    @torch.jit.unused  # TorchScript takes no *inputs: scripted callers use cls_seg(forward_features(...))
    def forward(self, *inputs: Tensor) -> Tensor:
        return self.cls_seg(self.forward_features(*inputs))


class FCNHead(DecodeHead):
    """mmsegmentation's FCNHead (FCN, Long et al., CVPR 2015, arXiv 1411.4038).

    `convs` = `num_convs` ConvModules (in -> channels, then channels -> channels; k x k, padding
    (k // 2) * dilation); with `concat_input`, `conv_cat` = ConvModule(in + channels -> channels, k x k,
    undilated) on concat([x, convs(x)]) (input first, as mmseg); then Dropout2d(`dropout`) and `conv_seg`, a 1x1 conv
    with bias to `num_classes`. `num_convs=0` needs in_channels == channels (mmseg's rule). Init as
    mmseg: ConvModules kaiming normal (fan_out), norms (1, 0), conv_seg N(0, 0.01). mmseg's auxiliary
    head is `FCNHead(1024, 256, K, num_convs=1, concat_input=False)` on ResNet stage 3; its FCN-D8
    decode head `FCNHead(2048, 512, K)`. Input (B, in_channels, H, W), output (B, num_classes, H, W).
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, *, num_convs: int = 2,
                 kernel_size: int = 3, dilation: int = 1, concat_input: bool = True, dropout: float = 0.1,
                 norm_layer: LayerSpec = nn.BatchNorm2d, act_layer: LayerSpec = nn.ReLU):
        super().__init__()
        name = type(self).__name__
        check_head_args(name, dropout, in_channels=in_channels, channels=channels, num_classes=num_classes)
        if not isinstance(num_convs, int) or num_convs < 0:
            raise ValueError(f"{name}: num_convs must be an int >= 0, got {num_convs!r}")
        if num_convs == 0 and in_channels != channels:
            raise ValueError(f"{name}: num_convs=0 needs in_channels == channels, got {in_channels} != {channels}")
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"{name}: kernel_size must be a positive odd int, got {kernel_size!r}")
        self.in_channels, self.channels, self.num_classes = in_channels, channels, num_classes
        self.num_convs, self.kernel_size, self.concat_input = num_convs, kernel_size, bool(concat_input)
        conv_args = dict(kernel_size=kernel_size, dilation=dilation, norm_layer=norm_layer, act_layer=act_layer)
        if num_convs == 0:
            self.convs = nn.Identity()
        else:
            self.convs = nn.Sequential(*[ConvModule(in_channels if i == 0 else channels, channels, **conv_args)
                                         for i in range(num_convs)])
        if self.concat_input:  # mmseg: conv_cat is never dilated (padding k // 2)
            self.conv_cat = ConvModule(in_channels + channels, channels, kernel_size=kernel_size,
                                       norm_layer=norm_layer, act_layer=act_layer)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.init_weights()

    def context(self, x: Tensor) -> Tensor:
        """convs(x): the part of the head between the input and the concat (heads override this)."""
        return self.convs(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """The (B, channels, H, W) features before dropout and the classifier."""
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_map(self, x, self.in_channels)
        out = self.context(x)
        if hasattr(self, "conv_cat"):  # concat_input (`hasattr` is resolved when TorchScript compiles)
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return out
