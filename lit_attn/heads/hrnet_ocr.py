"""NVIDIA's HRNet-OCR heads (semantic-segmentation code base, the PSA paper's): the OCR block on the HRNetV2
representation and the scale-attention head of hierarchical multi-scale attention, with NVIDIA's state-dict names.

Tao, Sapra, Catanzaro, "Hierarchical Multi-Scale Attention for Semantic Segmentation" (arXiv 2005.10821) on
Yuan, Chen, Wang, "Object-Contextual Representations for Semantic Segmentation" (ECCV 2020, arXiv 1909.11065), as
`NVIDIA/semantic-segmentation@66464461` `network/ocrnet.py` (`OCR_block`), `network/ocr_utils.py`,
`network/utils.py` (`make_attn_head`) with `config.py`'s defaults (DeLightCMU/PSA's fork does not change them).
The smp architectures built from them are `lit_attn.integrations.smp_ocr` ("hrnet_ocr", "mscale_ocr").
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import create_attn
from .fcn import LayerSpec, check_head_args, check_map, resolve_act_layer, resolve_norm_layer

__all__ = ["HRNetOCRHead", "ScaleAttentionHead", "hrnetv2_representation", "official_ocr_keys"]


def hrnetv2_representation(branches: list[Tensor], align_corners: bool = False) -> Tensor:
    """HRNetV2's representation: every branch upsampled bilinearly to the first (highest-resolution) branch's size
    and concatenated on channels (NVIDIA's `hrnetv2.py` forward, align_corners = cfg.MODEL.ALIGN_CORNERS, False)."""
    size = branches[0].shape[-2:]
    ups = [branches[0]] + [F.interpolate(b, size=size, mode="bilinear", align_corners=align_corners)
                           for b in branches[1:]]
    return torch.cat(ups, 1)


class HRNetOCRHead(nn.Module):
    """NVIDIA's `OCR_block` (HRNet-OCR, ECCV 2020, arXiv 1909.11065; `network/ocrnet.py@66464461`): forward(x
    (B, in_channels, h, w), the HRNetV2 representation) -> (cls (B, K, h, w), aux (B, K, h, w), ocr_feats (B,
    mid, h, w)). `conv3x3_ocr` 3x3 conv (with bias) -> BN-ReLU to mid_channels (MID_CHANNELS 512); `aux_head` 1x1
    conv in -> in (bias) -> BN-ReLU -> 1x1 conv to K (bias): the soft object regions; `ocr` = lit_attn's `ocr`
    block (ObjectContextBlock, bias=False, dropout 0.05): NVIDIA's SpatialGather_Module (softmax over pixels,
    scale 1) + SpatialOCR_Module (ObjectAttentionBlock key_channels 256, conv_bn_dropout 1x1 conv-BN-ReLU-
    Dropout2d(0.05) on concat[context, feats]); `cls_head` 1x1 conv to K (bias). The same maths as NVIDIA's;
    differences: names inside the block (`ocr.object_context_block.f_query/f_key/f_value/W` for NVIDIA's
    `ocr_distri_head.object_context_block.f_pixel/f_object/f_down/f_up`, no `ocr_gather_head` module:
    `official_ocr_keys` maps them); the attention runs through `lit_attn.ops.global_attention` (SDPA, no N x K
    matrix kept; 1e-6-level differences); NVIDIA's OCR_ASPP option and ObjectAttentionBlock's max-pool `scale`
    (both off) are not implemented. PyTorch-default init as NVIDIA's default (INIT_DECODER False). mmseg's
    OCRHead (`lit_attn.heads.OCRHead`) cannot be reused: its 3x3 conv has no bias, its dropout sits before the
    classifier (0.1, block dropout 0), its stage-1 head is an FCNHead on another map and its init is mmseg's.
    Parameters: 5,047,558 at NVIDIA's in 720 (HRNetV2-W48), mid 512, key 256, K 19 (as its OCR_block); cost
    O(N (9 in mid + in^2 + K mid)), N = h*w (the stride-4 map).
    """

    def __init__(self, in_channels: int, num_classes: int, *, mid_channels: int = 512, key_channels: int = 256,
                 dropout: float = 0.05, norm_layer: LayerSpec = nn.BatchNorm2d, act_layer: LayerSpec = nn.ReLU):
        super().__init__()
        name = type(self).__name__
        check_head_args(name, dropout, in_channels=in_channels, num_classes=num_classes, mid_channels=mid_channels,
                        key_channels=key_channels)
        norm, act = resolve_norm_layer(norm_layer), resolve_act_layer(act_layer)
        if norm is None or act is None:
            raise ValueError(f"{name}: norm_layer and act_layer are required (NVIDIA's BNReLU), got "
                             f"{norm_layer!r}, {act_layer!r}")
        self.in_channels, self.num_classes, self.mid_channels = in_channels, num_classes, mid_channels
        self.conv3x3_ocr = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 3, padding=1),
                                         nn.Sequential(norm(mid_channels), act()))
        self.aux_head = nn.Sequential(nn.Conv2d(in_channels, in_channels, 1),
                                      nn.Sequential(norm(in_channels), act()),
                                      nn.Conv2d(in_channels, num_classes, 1))
        self.ocr = create_attn("ocr", mid_channels, key_channels=key_channels, scale=1.0, dropout=dropout,
                               bias=False, norm_layer=norm, act_layer=act)
        self.cls_head = nn.Conv2d(mid_channels, num_classes, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_map(self, x, self.in_channels, "HRNetV2 representation")
        feats = self.conv3x3_ocr(x)
        aux = self.aux_head(x)
        ocr_feats = self.ocr(feats, aux)
        return self.cls_head(ocr_feats), aux, ocr_feats


class ScaleAttentionHead(nn.Sequential):
    """NVIDIA's `make_attn_head` (hierarchical multi-scale attention, arXiv 2005.10821; `network/utils.py
    @66464461`): the per-pixel weight of a lower scale's prediction, (B, in, h, w) -> (B, out, h, w) in (0, 1).
    `conv0` 3x3 conv in -> bottleneck (SEGATTN_BOT_CH 256, no bias) `bn0` `re0`, with `inner_3x3`
    (MSCALE_INNER_3x3, True) `conv1` 3x3 bottleneck -> bottleneck `bn1` `re1`, with `dropout` (MSCALE_DROPOUT,
    off) `drop` Dropout(0.5), `conv2` 1x1 -> out (no bias), `sig` sigmoid; NVIDIA's names, so its `scale_attn.*`
    keys load as they are. PyTorch-default init (NVIDIA's `init_attn` is commented out). Not implemented: the
    MSCALE_OLDARCH head. Parameters 1,770,752 at in 512 (NVIDIA's); cost O(9 N bottleneck (in + bottleneck)).
    """

    def __init__(self, in_channels: int, out_channels: int = 1, *, bottleneck_channels: int = 256,
                 inner_3x3: bool = True, dropout: bool = False, norm_layer: LayerSpec = nn.BatchNorm2d,
                 act_layer: LayerSpec = nn.ReLU):
        check_head_args(type(self).__name__, 0.0, in_channels=in_channels, out_channels=out_channels,
                        bottleneck_channels=bottleneck_channels)
        norm, act = resolve_norm_layer(norm_layer), resolve_act_layer(act_layer)
        bot = bottleneck_channels
        layers = OrderedDict([("conv0", nn.Conv2d(in_channels, bot, 3, padding=1, bias=False)),
                              ("bn0", norm(bot)), ("re0", act())])
        if inner_3x3:
            layers.update(conv1=nn.Conv2d(bot, bot, 3, padding=1, bias=False), bn1=norm(bot), re1=act())
        if dropout:
            layers["drop"] = nn.Dropout(0.5)
        layers.update(conv2=nn.Conv2d(bot, out_channels, 1, bias=False), sig=nn.Sigmoid())
        super().__init__(layers)


# NVIDIA's names inside its OCR_block -> ours (HRNetOCRHead), longest first
_OCR_RENAMES = (
    ("ocr_distri_head.object_context_block.f_pixel.", "ocr.object_context_block.f_query."),
    ("ocr_distri_head.object_context_block.f_object.", "ocr.object_context_block.f_key."),
    ("ocr_distri_head.object_context_block.f_down.", "ocr.object_context_block.f_value."),
    ("ocr_distri_head.object_context_block.f_up.", "ocr.object_context_block.W."),
    ("ocr_distri_head.conv_bn_dropout.", "ocr.conv_bn_dropout."),
    ("conv3x3_ocr.", "conv3x3_ocr."),
    ("aux_head.", "aux_head."),
    ("cls_head.", "cls_head."),
)


def official_ocr_keys(state_dict: Mapping[str, Tensor], *, head_prefix: str = "decoder.",
                      scale_attn_prefix: str = "scale_attn.",
                      backbone_prefix: str | None = "encoder.model.") -> dict[str, Tensor]:
    """An NVIDIA OCRNet / MscaleOCR state dict (`ocr.*`, `scale_attn.*`, `backbone.*`; a `module.` prefix is
    stripped) with lit_attn's keys: `ocr.<X>` -> head_prefix + our HRNetOCRHead name (`ocr.ocr_distri_head
    .object_context_block.f_pixel.*` -> `decoder.ocr.object_context_block.f_query.*`, f_object -> f_key, f_down ->
    f_value, f_up -> W, `ocr_distri_head.conv_bn_dropout` -> `ocr.conv_bn_dropout`; conv3x3_ocr, aux_head, cls_head
    unchanged), `scale_attn.*` -> scale_attn_prefix (same names), `backbone.*` -> backbone_prefix (smp's timm
    encoder `encoder.model.`; timm's HRNet keeps the official HRNet names; None refuses backbone keys). Load the
    result with `load_state_dict(..., strict=True)`, which names any key the model misses. KeyError naming every
    key it cannot map."""
    out: dict[str, Tensor] = {}
    unmapped = []
    for key, value in state_dict.items():
        k = key.removeprefix("module.")
        new = None
        if k.startswith("ocr."):
            rest = k[len("ocr."):]
            for old, ours in _OCR_RENAMES:
                if rest.startswith(old):
                    new = head_prefix + ours + rest[len(old):]
                    break
        elif k.startswith("scale_attn."):
            new = scale_attn_prefix + k[len("scale_attn."):]
        elif k.startswith("backbone.") and backbone_prefix is not None:
            new = backbone_prefix + k[len("backbone."):]
        if new is None:
            unmapped.append(key)
        else:
            out[new] = value
    if unmapped:
        raise KeyError(f"official_ocr_keys: no lit_attn name for {len(unmapped)} key(s) of the NVIDIA state dict: "
                       f"{', '.join(unmapped[:10])}{' ...' if len(unmapped) > 10 else ''} (expected ocr.conv3x3_ocr"
                       f"/aux_head/cls_head/ocr_distri_head.*, scale_attn.*"
                       f"{', backbone.*' if backbone_prefix is not None else ''})")
    return out
