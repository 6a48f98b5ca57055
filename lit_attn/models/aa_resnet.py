"""timm model `aa_resnet50`: ResNet-50 with Attention Augmented 3x3 convolutions (AA-ResNet-50).

Bello et al., "Attention Augmented Convolutional Networks", ICCV 2019, arXiv 1904.09925. `AAResNet` is
timm's `ResNet`; after timm builds it, the 3x3 `conv2` of every Bottleneck in the chosen stages is
swapped for `lit_attn.layers.aa_conv.AugmentedConv2d` (same in/out channels, stride and dilation), so
timm's `feature_info`, `features_only`, `forward_features`, `forward_head`, `reset_classifier`,
`forward_intermediates` and `output_stride` all work unchanged.

    import timm, lit_attn
    model = timm.create_model("aa_resnet50", num_classes=10)
    feats = timm.create_model("aa_resnet50", features_only=True)
"""
from __future__ import annotations

import math
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck, ResNet
from torch import nn

from ..layers.aa_conv import AugmentedConv2d
from .pretrained import require_weights

__all__ = ["AAResNet", "aa_resnet50"]

# the paper's ResNet setting: Nh = 8 heads, kappa = 2 * upsilon = 0.2, >= 20 key dims per head
AA_DEFAULTS: dict[str, Any] = dict(num_heads=8, kappa=0.2, upsilon=0.1, min_dkh=20, relative=True)


class AAResNet(ResNet):
    """timm ResNet whose Bottleneck 3x3 convs in `aa_stages` (0-based, 0 = conv2_x / layer1) are
    AugmentedConv2d. `img_size` sizes each layer's relative-position tables for the grid it sees at that
    input size (H / reduction); other input sizes work (smaller grids use the tables' central rows,
    larger ones clip far offsets, see AugmentedConv2d). `aa_downsample_stages` apply the paper's
    memory-saving option (attention on a 3x3/2 average-pooled input, bilinearly upsampled back);
    none by default, since `global_attention` needs no N x N memory. `aa_kwargs` override AA_DEFAULTS.
    With the defaults (all 4 stages, 16 layers) the model has 25.85M parameters (ResNet-50: 25.56M).
    """

    def __init__(self, *, aa_stages: tuple[int, ...] = (0, 1, 2, 3), aa_downsample_stages: tuple[int, ...] = (),
                 aa_kwargs: dict[str, Any] | None = None, img_size: int | tuple[int, int] = 224, **kwargs):
        super().__init__(**kwargs)
        dd = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        aa_kwargs = {**AA_DEFAULTS, **(aa_kwargs or {})}
        img_h, img_w = to_2tuple(img_size)
        self.aa_stages = tuple(aa_stages)
        stage_info = [info for info in self.feature_info if info["module"].startswith("layer")]
        for idx in self.aa_stages:
            if not 0 <= idx < len(stage_info):
                raise ValueError(f"AAResNet: aa_stages index {idx} is not one of 0..{len(stage_info) - 1}")
            info = stage_info[idx]
            feat_size = (math.ceil(img_h / info["reduction"]), math.ceil(img_w / info["reduction"]))
            for block in getattr(self, info["module"]):
                old = getattr(block, "conv2", None)
                if not isinstance(block, Bottleneck) or not isinstance(old, nn.Conv2d) or old.groups != 1:
                    raise ValueError("AAResNet augments the 3x3 conv of ungrouped Bottleneck blocks only")
                block.conv2 = AugmentedConv2d(
                    old.in_channels, old.out_channels, old.kernel_size[0], old.stride[0], dilation=old.dilation[0],
                    feat_size=feat_size, attn_downsample=idx in aa_downsample_stages, **aa_kwargs, **dd)
                for m in block.conv2.modules():  # timm ResNet's conv init
                    if isinstance(m, nn.Conv2d):
                        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                        if m.bias is not None:
                            nn.init.zeros_(m.bias)


def _cfg(**kwargs) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1", "classifier": "fc", "license": "apache-2.0",
        "paper_ids": "arXiv:1904.09925", "paper_name": "Attention Augmented Convolutional Networks", **kwargs,
    }


default_cfgs = generate_default_cfgs({"aa_resnet50.untrained": _cfg()})


def _create_aa_resnet(variant: str, pretrained: bool = False, **kwargs) -> AAResNet:
    if pretrained:
        require_weights(variant, kwargs, why="the paper's ImageNet models were not released",
                        todo="Train it (e.g. lit-attn fit with this model).")
    return build_model_with_cfg(AAResNet, variant, pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3, 4)),
                                **kwargs)


@register_model
def aa_resnet50(pretrained: bool = False, **kwargs) -> AAResNet:
    """AA-ResNet-50 (arXiv 1904.09925): every Bottleneck 3x3 conv is an AugmentedConv2d (Nh=8,
    kappa = 2 upsilon = 0.2, >= 20 key dims per head, relative logits). No pretrained weights."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3))
    return _create_aa_resnet("aa_resnet50", pretrained, **dict(model_args, **kwargs))
