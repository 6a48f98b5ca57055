"""The generic attention context head: mmseg's NLHead / GCHead pattern with any lit_attn block.

mmsegmentation's NLHead, GCHead, CCHead and DNLHead are all one FCNHead (num_convs=2,
concat_input=True) with a context block between its two convs:
conv3x3 -> block -> conv3x3 -> concat([x, out]) -> conv3x3 -> Dropout2d -> 1x1 classifier.
`AttnHead` is that head for any registered block name (or class, or module).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from ..registry import HEAD, create_attn, get_attn_entry
from .fcn import FCNHead, LayerSpec

__all__ = ["AttnHead", "build_attention"]


def build_attention(attention: str | type | nn.Module | None, channels: int,
                    attention_kwargs: Mapping[str, Any] | None = None, *, where: str = "AttnHead") -> nn.Module:
    """The block `lit_attn.create_attn(attention, channels, **attention_kwargs)`, nn.Identity for None.

    Plug-in blocks (kind "gate"/"global") and conv-kind blocks (built channels -> channels, e.g.
    "aa_conv") are accepted; head-only blocks (kind "head", they need extra inputs) are not.
    """
    kwargs = dict(attention_kwargs or {})
    if attention is None or (isinstance(attention, str) and attention.lower() in ("", "none", "identity")):
        if kwargs:
            raise ValueError(f"{where}: attention_kwargs {kwargs} given without an attention block")
        return nn.Identity()
    if isinstance(attention, str):
        entry = get_attn_entry(attention)  # a KeyError listing the known names for an unknown one
        if entry.kind == HEAD:
            raise ValueError(f"{where}: {attention!r} is a head-only block (kind 'head'); it needs the head "
                             f"built for it, not the generic AttnHead")
    elif not (isinstance(attention, nn.Module) or callable(attention)):
        raise ValueError(f"{where}: attention must be a registered block name, a class, a module or None, "
                         f"got {attention!r}")
    elif isinstance(attention, nn.Module) and kwargs:
        raise ValueError(f"{where}: attention_kwargs cannot be applied to an already built module")
    return create_attn(attention, channels, **kwargs)


class AttnHead(FCNHead):
    """Attention context head: FCNHead(num_convs=2, concat_input=True) with an attention block between
    `convs[0]` and `convs[1]`, as mmseg's NLHead (`nl_block`) and GCHead (`gc_block`).

    forward: out = convs[1](attn(convs[0](x))); out = conv_cat(concat([x, out])); conv_seg(dropout(out)).
    `attention` is a registered lit_attn name (`lit_attn.list_attn()`), a block class or a built module,
    created by `lit_attn.create_attn(attention, channels, **attention_kwargs)`: a plug-in block
    (C -> C) or a conv-kind one (built channels -> channels); None gives mmseg's FCN-D8 head (no block).
    The block keeps its own (paper) init; the convs get mmseg's. Extra FCNHead options (kernel_size,
    dilation, norm_layer, act_layer) pass through; num_convs and concat_input are fixed, as in mmseg.
    Parameters: those of FCNHead(in, channels, K) plus the block's; for in=2048, channels=512 the convs
    and classifier hold 9 * 512 * (2048 + 512 + 2560) + 3 * 1024 + 513 K.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, *,
                 attention: str | type | nn.Module | None = "psa_p", attention_kwargs: dict[str, Any] | None = None,
                 dropout: float = 0.1, kernel_size: int = 3, dilation: int = 1,
                 norm_layer: LayerSpec = nn.BatchNorm2d, act_layer: LayerSpec = nn.ReLU):
        attn = build_attention(attention, channels, attention_kwargs, where=type(self).__name__)
        super().__init__(in_channels, channels, num_classes, num_convs=2, kernel_size=kernel_size,
                         dilation=dilation, concat_input=True, dropout=dropout, norm_layer=norm_layer,
                         act_layer=act_layer)
        self.attention_name = attention if isinstance(attention, str) else (
            None if attention is None else getattr(attention, "__name__", type(attention).__name__))
        self.attn = attn

    def attention_modules(self) -> tuple[nn.Module, ...]:
        attn = getattr(self, "attn", None)
        return () if attn is None or isinstance(attn, nn.Identity) else (attn,)

    def context(self, x: Tensor) -> Tensor:
        out = self.convs[0](x)
        out = self.attn(out)
        return self.convs[1](out)

    def extra_repr(self) -> str:
        return f"attention={self.attention_name!r}"
