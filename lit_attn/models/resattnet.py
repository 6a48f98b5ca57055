"""Residual Attention Network (Wang et al., CVPR 2017, arXiv 1704.06904) as timm models.

`timm.create_model("resattnet56")` / `"resattnet92"` (after `import lit_attn`) build Attention-56 /
Attention-92 as in the official Caffe deploy prototxts (fwang91/residual-attention-network):
stem conv 7x7/2 (64) + BN-ReLU + max-pool 3x3/2, four stages of pre-activation bottleneck units
(outputs 256, 512, 1024, 2048; the first unit of stages 2-4 has stride 2 on its 3x3 conv) with
1/1/1 (Attention-56) or 1/2/3 (Attention-92) attention modules in stages 1-3 (mask levels 3, 2,
1 = the prototxts' AttentionA/B/C), three units in stage 4, then BN-ReLU, global pool and fc.

No pretrained weights exist (the official release is deploy prototxts only), so the pretrained
configs have no url; `pretrained=True` raises `NoPublishedWeightsError` (train the model, or load your
own checkpoint with `pretrained_cfg_overlay=dict(file=...)`). `features_only=True`
gives the stem (64 ch, stride 2) and the four stage outputs (strides 4, 8, 16, 32). Only
`output_stride=32` is supported (no dilated variant).

Size (num_classes=1000, 224x224): resattnet56 31,810,728 parameters, 6.27 GMACs; counting the BN
running mean/var as well (Caffe's BN layer stores them as blobs, so Caffe counts them) gives 31.88M,
the paper's 31.9M (6.3 GFLOPs). resattnet92 has 52,466,344 parameters (52.60M Caffe-style) and 10.53
GMACs, 2.3% / 1.3% above the paper's 51.3M / 10.4 GFLOPs, although it is Attention-56 plus exactly
the modules the Attention-92 prototxt adds (one more 512-ch AttentionB, two more 1024-ch
AttentionC, built like Attention-56's): the paper's Attention-92 figures are not reproducible from
the released prototxt.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import create_act_layer, create_classifier, get_act_layer, get_device_dtype, get_norm_layer
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from ..layers._utils import factory
from ..layers.residual_attention import AttentionModule, PreActBottleneck
from .pretrained import require_weights

__all__ = ["ResidualAttentionNet"]


class ResidualAttentionNet(nn.Module):
    """Residual Attention Network, "Residual Attention Network for Image Classification"
    (Wang et al., CVPR 2017, arXiv 1704.06904), built like the official Attention-56/92 Caffe
    prototxts. `units[i]` plain pre-activation bottleneck units open stage i (the first one
    changes width and, for i > 0, has stride 2), followed by `attn_modules[i]` attention modules
    (`AttentionModule` with `p, t, r` and `mask_levels[i]` mask levels). Differences from the
    official code are those of `AttentionModule` (max-pool padding 1 / floor mode, also in the
    stem) plus timm conventions: kaiming-normal conv init, a configurable global pool. Cost:
    O(N C^2) per unit; 6.27 / 10.53 GMACs at 224x224 for resattnet56 / resattnet92."""

    def __init__(
            self,
            attn_modules: Sequence[int] = (1, 1, 1, 0),
            units: Sequence[int] = (1, 1, 1, 3),
            channels: Sequence[int] = (256, 512, 1024, 2048),
            mask_levels: Sequence[int] = (3, 2, 1, 1),
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = "avg",
            stem_chs: int = 64,
            p: int = 1,
            t: int = 2,
            r: int = 1,
            bottle_ratio: float = 1 / 4,
            gate_layer="sigmoid",
            act_layer=nn.ReLU,
            norm_layer=nn.BatchNorm2d,
            drop_rate: float = 0.,
            output_stride: int = 32,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if output_stride != 32:
            raise ValueError(f"ResidualAttentionNet supports only output_stride=32, got {output_stride}")
        n = len(channels)
        if not (len(attn_modules) == len(units) == len(mask_levels) == n):
            raise ValueError("ResidualAttentionNet: attn_modules, units, channels and mask_levels need one entry "
                             f"per stage, got {len(attn_modules)}, {len(units)}, {n}, {len(mask_levels)}")
        if any(u < 1 for u in units):
            raise ValueError(f"ResidualAttentionNet: every stage needs at least one unit, got units={tuple(units)}")
        dd = factory(device, dtype)
        act_layer = get_act_layer(act_layer) or nn.ReLU
        norm_layer = get_norm_layer(norm_layer) or nn.BatchNorm2d
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.stem = nn.Sequential()
        self.stem.add_module("conv", nn.Conv2d(in_chans, stem_chs, 7, stride=2, padding=3, bias=False, **dd))
        self.stem.add_module("norm", norm_layer(stem_chs, **dd))
        self.stem.add_module("act", create_act_layer(act_layer, inplace=True))
        self.stem.add_module("pool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.feature_info = [dict(num_chs=stem_chs, reduction=2, module="stem.act")]

        prev_chs, reduction = stem_chs, 4
        self.stages = nn.Sequential()
        for i, (c, n_units, n_attn, levels) in enumerate(zip(channels, units, attn_modules, mask_levels, strict=True)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            mid = max(1, int(round(c * bottle_ratio)))
            blocks = [PreActBottleneck(prev_chs, c, mid_chs=mid, stride=stride, act_layer=act_layer,
                                       norm_layer=norm_layer, **dd)]
            blocks += [PreActBottleneck(c, c, mid_chs=mid, act_layer=act_layer, norm_layer=norm_layer, **dd)
                       for _ in range(n_units - 1)]
            blocks += [AttentionModule(c, p=p, t=t, r=r, levels=levels, gate_layer=gate_layer, rd_channels=mid,
                                       act_layer=act_layer, norm_layer=norm_layer, **dd) for _ in range(n_attn)]
            self.stages.add_module(str(i), nn.Sequential(*blocks))
            prev_chs = c
            self.feature_info.append(dict(num_chs=c, reduction=reduction, module=f"stages.{i}"))

        self.num_features = self.head_hidden_size = prev_chs
        self.norm = norm_layer(prev_chs, **dd)  # the last unit is pre-activation: BN-ReLU before the head
        self.act = create_act_layer(act_layer, inplace=True)
        self.global_pool, self.fc = create_classifier(prev_chs, num_classes, pool_type=global_pool, **dd)
        self.init_weights()

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = False) -> None:
        """Kaiming-normal (fan_out) convs, timm's ResNet init; the BN layers keep weight 1, bias 0 (the official
        init: no zero-init of the last BN, so `zero_init_last`, timm's keyword, is accepted and ignored)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False):
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x, flatten=True)
        else:
            x = self.stages(x)
        return self.act(self.norm(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward features that also returns intermediates, as timm's ResNetV2 (also pre-activation).

        Intermediate 0 is the stem output before its max-pool (`stem.act`, stride 2), 1..4 the stage outputs
        (`stages.i`), as `feature_info`. Args: `indices` (None: all; an int n: the last n; a sequence: those
        indices); `norm`: apply the final BN-ReLU (`norm`, `act`) to the last stage's intermediate (the only
        one it is sized for); `stop_early`: stop after the last wanted stage (the returned features are then
        that stage's, without the final norm); `output_fmt`: "NCHW" only; `intermediates_only`: return only
        the list. Returns (features as `forward_features` gives them, intermediates) or the intermediates.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"ResidualAttentionNet.forward_intermediates: output_fmt must be 'NCHW', "
                             f"got {output_fmt!r}")
        intermediates = []
        last_idx = len(self.stages)
        take_indices, max_index = feature_take_indices(last_idx + 1, indices)

        x = self.stem.act(self.stem.norm(self.stem.conv(x)))
        if 0 in take_indices:
            intermediates.append(x)
        x = self.stem.pool(x)

        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index]
        feat_idx = 0
        for feat_idx, stage in enumerate(stages, start=1):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.act(self.norm(x)) if norm and feat_idx == last_idx else x)

        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.act(self.norm(x))
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: int | list[int] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages after the last intermediate in `indices` (as `forward_intermediates` counts them),
        the stem's max-pool when only the stem is kept, the final BN-ReLU when `prune_norm` or when stages are
        dropped (it is sized for the last stage), and the classifier when `prune_head` or when stages are
        dropped. Returns the kept indices (for `forward_intermediates(indices=...)`)."""
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        prune_end = max_index < len(self.stages)
        self.stages = self.stages[:max_index]
        if max_index == 0:
            self.stem.pool = nn.Identity()  # follows the stem feature
        if prune_norm or prune_end:
            self.norm, self.act = nn.Identity(), nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_resattnet(variant: str, pretrained: bool = False, **kwargs) -> ResidualAttentionNet:
    if pretrained:
        require_weights(variant, kwargs, why="the official release has Caffe deploy prototxts only",
                        todo="Train it (e.g. lit-attn fit with this model).")
    return build_model_with_cfg(ResidualAttentionNet, variant, pretrained,
                                feature_cfg=dict(flatten_sequential=True), **kwargs)


def _cfg(**kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv", "classifier": "fc",
        "paper_ids": "arXiv:1704.06904", "paper_name": "Residual Attention Network for Image Classification",
        "origin_url": "https://github.com/fwang91/residual-attention-network",
        "notes": ("no pretrained weights: the official release has Caffe deploy prototxts only",),
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "resattnet56": _cfg(),
    "resattnet92": _cfg(),
})


@register_model
def resattnet56(pretrained: bool = False, **kwargs) -> ResidualAttentionNet:
    """Attention-56: one attention module in each of stages 1-3 (paper: 31.9M params, 6.3 GFLOPs)."""
    model_args = dict(attn_modules=(1, 1, 1, 0))
    return _create_resattnet("resattnet56", pretrained, **dict(model_args, **kwargs))


@register_model
def resattnet92(pretrained: bool = False, **kwargs) -> ResidualAttentionNet:
    """Attention-92: 1, 2 and 3 attention modules in stages 1-3 (paper: 51.3M params, 10.4 GFLOPs)."""
    model_args = dict(attn_modules=(1, 2, 3, 0))
    return _create_resattnet("resattnet92", pretrained, **dict(model_args, **kwargs))
