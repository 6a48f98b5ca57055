"""AttnSegmentor: a timm or smp encoder + the attention context head + mmseg's auxiliary FCN head.

mmsegmentation's EncoderDecoder for the attention heads of its model zoo (NLNet, GCNet, ... R-50-D8):
a dilated backbone (output stride 8), the decode head on the last feature map, an auxiliary
FCNHead(1024 -> 256, num_convs=1, no concat) on the one before (ResNet stage 3), logits resized
bilinearly (align_corners=False) to the input. The loss and its auxiliary weight (mmseg: 0.4) belong
to the task (`lit_attn.tasks`), not to the model.

Encoder names: a timm model name ("resnet50", optionally written "timm:resnet50") is built with
`timm.create_model(name, features_only=True, output_stride=..., pretrained=..., in_chans=...,
**encoder_kwargs)`; "smp:<name>" builds smp's encoder `<name>` ("smp:resnet34", "smp:mit_b0",
"smp:tu-convnext_tiny") with `segmentation_models_pytorch.encoders.get_encoder(name, in_channels=...,
depth=5, weights=..., output_stride=..., **encoder_kwargs)`. mmseg's R-50-D8 backbone is ResNetV1c
(3x3 deep stem 32-32-64): timm's "resnet50c" / "resnet101c"; timm's "resnet50" has the 7x7 stem.
"""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import get_attn_entry, list_attn
from .context import AttnHead
from .fcn import FCNHead

__all__ = ["AttnSegmentor", "build_encoder", "find_attention_blocks", "SMP_PREFIX", "TIMM_PREFIX"]

SMP_PREFIX = "smp:"
TIMM_PREFIX = "timm:"
_OUTPUT_STRIDES = (8, 16, 32)


def _is_nhwc(model: nn.Module) -> bool:
    fmt = getattr(model, "output_fmt", "NCHW")
    return str(getattr(fmt, "value", fmt)).upper() == "NHWC"


def build_encoder(encoder: str, *, output_stride: int = 8, in_channels: int = 3, pretrained: bool | str = False,
                  encoder_kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, list[int], list[int], bool]:
    """(encoder, feature channels, feature reductions, NHWC output?) for a timm or "smp:" encoder name.

    The encoder maps (B, in_channels, H, W) to a list of feature maps, shallow to deep; smp's leading
    identity map (the input itself) is dropped by `AttnSegmentor`. Nothing is downloaded unless
    `pretrained` asks: for timm a bool (timm's default pretrained tag); for smp True means "imagenet",
    a string names smp's weights.
    """
    if not isinstance(encoder, str) or not encoder:
        raise ValueError(f"AttnSegmentor: encoder must be a timm model name or 'smp:<encoder name>', got {encoder!r}")
    if output_stride not in _OUTPUT_STRIDES:
        raise ValueError(f"AttnSegmentor: output_stride must be one of {_OUTPUT_STRIDES}, got {output_stride!r}")
    kwargs = dict(encoder_kwargs or {})
    if encoder.startswith(SMP_PREFIX):
        from segmentation_models_pytorch.encoders import get_encoder

        if isinstance(pretrained, bool):
            weights = "imagenet" if pretrained else None
        else:
            weights = pretrained
        reserved = {"in_channels", "weights", "output_stride", "name"} & kwargs.keys()
        if reserved:
            raise ValueError(f"AttnSegmentor: encoder_kwargs must not set {sorted(reserved)}; use the "
                             f"AttnSegmentor arguments in_channels / pretrained / output_stride")
        kwargs.setdefault("depth", 5)
        model = get_encoder(encoder[len(SMP_PREFIX):], in_channels=in_channels, weights=weights,
                            output_stride=output_stride, **kwargs)
        chans = list(model.out_channels)[1:]                           # [0] is the input itself
        reductions = [min(2 ** i, output_stride) for i in range(1, len(chans) + 1)]
        return model, chans, reductions, False

    import timm

    name = encoder[len(TIMM_PREFIX):] if encoder.startswith(TIMM_PREFIX) else encoder
    if not isinstance(pretrained, bool):
        raise ValueError(f"AttnSegmentor: pretrained must be True/False for a timm encoder, got {pretrained!r}")
    reserved = {"features_only", "in_chans", "pretrained", "output_stride"} & kwargs.keys()
    if reserved:
        raise ValueError(f"AttnSegmentor: encoder_kwargs must not set {sorted(reserved)}; use the "
                         f"AttnSegmentor arguments in_channels / pretrained / output_stride")
    if output_stride != 32:  # not every timm model takes output_stride (ViTs, Swin); 32 is their default
        kwargs["output_stride"] = output_stride
    model = timm.create_model(name, features_only=True, pretrained=pretrained, in_chans=in_channels, **kwargs)
    return model, list(model.feature_info.channels()), list(model.feature_info.reduction()), _is_nhwc(model)


def _registered_block_types() -> tuple[type, ...]:
    types = {get_attn_entry(n).cls for n in list_attn()}
    return tuple(t for t in types if isinstance(t, type))


def find_attention_blocks(module: nn.Module, extra: tuple[nn.Module, ...] = ()) -> dict[str, nn.Module]:
    """{qualified name: block} for the outermost modules of `module` that are registered lit_attn blocks
    (ours or timm's, e.g. in a timm encoder built with `block_args={"attn_layer": ...}`) or in `extra`."""
    types = _registered_block_types()
    extra_ids = {id(m) for m in extra}
    found: dict[str, nn.Module] = {}
    inside: set[int] = set()
    for name, m in module.named_modules():
        if id(m) in inside:
            continue
        if isinstance(m, types) or id(m) in extra_ids:
            found[name] = m
            inside.update(id(c) for c in m.modules())
    return found


class AttnSegmentor(nn.Module):
    """Encoder (timm `features_only` or smp) + `AttnHead` (+ mmseg's auxiliary `FCNHead`).

    Args:
        encoder: a timm model name ("resnet50", "timm:resnet50") or "smp:<smp encoder name>" (module docstring).
        num_classes: number of classes K.
        attention: a registered lit_attn block name (`lit_attn.list_attn(kind=("gate", "global", "conv"))`)
            for the decode head, or None for the FCN-D8 baseline.
        attention_kwargs: keyword arguments of the block.
        output_stride: 8 (mmseg's D8, default), 16 or 32 (no dilation).
        channels: the decode head's width (mmseg: 512).
        aux: add the auxiliary FCNHead on the second-to-last feature map (stage 3 of a ResNet).
        aux_channels: its width (mmseg: 256).
        in_channels: image channels.
        pretrained: load the encoder's pretrained weights (a download); timm: bool, smp: bool or a weights name.
        dropout: Dropout2d before both classifiers (mmseg: 0.1).
        encoder_kwargs: extra keyword arguments of the encoder constructor, e.g.
            `{"block_args": {"attn_layer": "psa_p"}}` for attention in a timm ResNet.
        norm_layer, act_layer: the heads' norm and activation (timm names; "batchnorm", "relu" as mmseg's
            SyncBN/ReLU once converted with `nn.SyncBatchNorm.convert_sync_batchnorm`).

    forward(x) -> logits (B, K, H, W) at the input size; in training mode with `aux`, the tuple
    (main logits, aux logits), both at the input size. Any H, W the encoder accepts (>= 32 for ResNets).
    """

    def __init__(self, encoder: str = "resnet50", *, num_classes: int, attention: str | None = "psa_p",
                 attention_kwargs: dict[str, Any] | None = None, output_stride: int = 8, channels: int = 512,
                 aux: bool = True, aux_channels: int = 256, in_channels: int = 3, pretrained: bool | str = False,
                 dropout: float = 0.1, encoder_kwargs: dict[str, Any] | None = None,
                 norm_layer: str = "batchnorm", act_layer: str = "relu"):
        super().__init__()
        self.encoder_name, self.output_stride, self.num_classes = encoder, output_stride, num_classes
        self.encoder, chans, reductions, self._nhwc = build_encoder(
            encoder, output_stride=output_stride, in_channels=in_channels, pretrained=pretrained,
            encoder_kwargs=encoder_kwargs)
        self._drop_first = encoder.startswith(SMP_PREFIX)
        self.encoder_channels, self.encoder_reductions = chans, reductions
        if aux and len(chans) < 2:
            raise ValueError(f"AttnSegmentor: aux=True needs an encoder with >= 2 feature maps; {encoder!r} has "
                             f"{len(chans)}")
        self.decode_head = AttnHead(chans[-1], channels, num_classes, attention=attention,
                                    attention_kwargs=attention_kwargs, dropout=dropout, norm_layer=norm_layer,
                                    act_layer=act_layer)
        self.auxiliary_head = FCNHead(chans[-2], aux_channels, num_classes, num_convs=1, concat_input=False,
                                      dropout=dropout, norm_layer=norm_layer, act_layer=act_layer) if aux else None

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """The encoder's feature maps, shallow to deep, in (B, C, H, W) layout."""
        feats = list(self.encoder(x))
        if self._drop_first:
            feats = feats[1:]
        if self._nhwc:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        return feats

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"AttnSegmentor expects a (B, C, H, W) image tensor, got {shape}")
        size = x.shape[-2:]
        feats = self.forward_features(x)
        logits = F.interpolate(self.decode_head(feats[-1]), size=size, mode="bilinear", align_corners=False)
        if self.training and self.auxiliary_head is not None:
            aux = F.interpolate(self.auxiliary_head(feats[-2]), size=size, mode="bilinear", align_corners=False)
            return logits, aux
        return logits

    def attention_blocks(self) -> dict[str, nn.Module]:
        """{qualified module name: block} for the attention blocks inside (decode head and encoder)."""
        return find_attention_blocks(self, extra=self.decode_head.attention_modules())
