"""mmcv's ConvModule (conv -> norm -> act) and the norm/activation name resolution shared by blocks and heads.

Kept free of timm's fused `BatchNormAct2d` on purpose: `torch.nn.SyncBatchNorm.convert_sync_batchnorm`
(what Lightning's `sync_batchnorm=True` calls) replaces a BatchNormAct2d by a plain SyncBatchNorm and
silently drops its activation; a separate `act` child survives the conversion.
"""
from __future__ import annotations

from collections.abc import Callable

from timm.layers import create_act_layer, get_norm_layer
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ["ConvModule", "LayerSpec", "resolve_act_layer", "resolve_norm_layer"]

LayerSpec = str | Callable[..., nn.Module] | None


def resolve_norm_layer(norm_layer: LayerSpec) -> Callable[..., nn.Module] | None:
    """A norm class from a class or a timm name ("batchnorm", "groupnorm", "layernorm2d", ...); None: no norm."""
    if norm_layer is None or norm_layer == "":
        return None
    if isinstance(norm_layer, str) and norm_layer.replace("_", "").lower() in ("syncbatchnorm", "syncbn"):
        return nn.SyncBatchNorm
    try:
        return get_norm_layer(norm_layer)
    except (KeyError, AssertionError):
        raise ValueError(f"unknown norm_layer {norm_layer!r}; use a class or a timm norm name such as "
                         f"'batchnorm', 'groupnorm', 'layernorm2d'") from None


def resolve_act_layer(act_layer: LayerSpec) -> LayerSpec:
    """`act_layer` as given (a class or a timm name such as "relu", "gelu"); None or "": no activation."""
    return None if act_layer in (None, "") else act_layer


def _norm_abbr(norm: nn.Module) -> str:
    """The attribute name mmcv's ConvModule gives a norm layer ('bn', 'gn', 'ln', 'in', else 'norm_layer')."""
    if isinstance(norm, _InstanceNorm):
        return "in"
    if isinstance(norm, _BatchNorm):
        return "bn"
    if isinstance(norm, nn.GroupNorm):
        return "gn"
    if isinstance(norm, nn.LayerNorm) or "layernorm" in type(norm).__name__.lower():
        return "ln"
    return "norm_layer"


class ConvModule(nn.Sequential):
    """conv -> norm -> act, as mmcv's ConvModule with its defaults (order conv/norm/act, the conv has a
    bias only without a norm, in-place activation). Children are named `conv`, `bn` (`gn`, `ln`, `in` or
    `norm_layer` for other norms, as mmcv) and `act`; the `norm` property returns the norm layer.
    """

    __jit_unused_properties__ = ["norm"]  # TorchScript compiles module properties; forward does not use it

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1,
                 padding: int | None = None, dilation: int = 1, groups: int = 1,
                 norm_layer: LayerSpec = nn.BatchNorm2d, act_layer: LayerSpec = nn.ReLU, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if padding is None:
            padding = (kernel_size // 2) * dilation
        norm_cls = resolve_norm_layer(norm_layer)
        act = resolve_act_layer(act_layer)
        self.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                          dilation=dilation, groups=groups, bias=norm_cls is None, **dd))
        if norm_cls is not None:
            norm = norm_cls(out_channels, **dd)
            self.norm_name = _norm_abbr(norm)
            self.add_module(self.norm_name, norm)
        else:
            self.norm_name = None
        if act is not None:
            self.add_module("act", create_act_layer(act, inplace=True))

    @property
    def norm(self) -> nn.Module | None:
        return getattr(self, self.norm_name) if self.norm_name else None

    def init_weights(self, zero_init_last: bool = False) -> None:
        """mmcv's ConvModule init: kaiming normal (fan_out, relu) conv weight, zero bias; norm weight 1, bias 0.
        `zero_init_last` (what timm's byobnet / regnet init passes to every module with an `init_weights`) is
        accepted and ignored: a ConvModule is no residual branch. The block holding it re-applies its own init
        afterwards (timm calls the hooks children first)."""
        nn.init.kaiming_normal_(self.conv.weight, a=0, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)
        norm = self.norm
        if norm is not None:
            if getattr(norm, "weight", None) is not None:
                nn.init.ones_(norm.weight)
            if getattr(norm, "bias", None) is not None:
                nn.init.zeros_(norm.bias)
