"""lit_attn in segmentation-models-pytorch: attention heads as smp architectures, block names in
smp's decoders. Active on `import lit_attn` (`install()`).

    smp.create_model("danet", encoder_name="resnet34", encoder_weights=None, classes=19)
    smp.create_model("attnfcn", encoder_name="tu-resnet50", encoder_weights=None, classes=19, attention="psa_p")
    smp.Unet("resnet34", encoder_weights=None, decoder_attention_type="cbam")   # any plug-in block name

Each architecture is an smp `SegmentationModel`: `encoder` (smp's `get_encoder`, dilated to
`encoder_output_stride`, 8 by default as mmseg's R-50-D8 models), `decoder` (the mmseg-configured
decode head of `lit_attn.heads` on the last feature map, logits at the feature resolution),
`auxiliary_head` (mmseg's FCNHead(C3 -> 256, one conv, no concat) on the stage before, loss weight
0.4; OCRNet's first cascade stage) and `segmentation_head` (bilinear resize to the input, then the
activation). Any input size works (no divisibility check). Training mode returns
`(main, *extra, aux)` logits at the input size, whose loss weights are `model.aux_loss_weights`
(read by `lit_attn.tasks.SegmentationTask`); eval mode returns the main logits, as smp models do.
`save_pretrained` / `smp.from_pretrained` round-trip through smp's hub mixin (the classes are set
on the `segmentation_models_pytorch` module so `from_pretrained` finds them).
"""
from __future__ import annotations

import importlib
from typing import Any

import segmentation_models_pytorch as smp
import torch.nn.functional as F
from segmentation_models_pytorch.base import SegmentationModel
from segmentation_models_pytorch.base import modules as smp_modules
from segmentation_models_pytorch.base.hub_mixin import supports_config_loading
from segmentation_models_pytorch.base.modules import Activation, SCSEModule
from segmentation_models_pytorch.encoders import get_encoder
from torch import Tensor, nn

from ..heads.fcn import FCNHead
from ..registry import GATE, GLOBAL, get_attn_entry, is_attn

__all__ = ["ARCHITECTURES", "CLASSES", "AttnFCN", "AttnSegmentationModel", "LitAttnDecoderAttention", "install"]

# name: (class name, "module:Head", arch-specific head defaults, head inputs, paper, mmseg decode-head channels)
ARCHITECTURES: dict[str, tuple[str, str, dict, str, str, int]] = {
    "danet": ("DANet", "danet:DAHead", {}, "last", "DANet (CVPR 2019)", 512),
    "ccnet": ("CCNet", "context:CCHead", {}, "last", "CCNet (ICCV 2019)", 512),
    "isanet": ("ISANet", "isa:ISAHead", {}, "last", "ISA (arXiv 1907.12273)", 512),
    "emanet": ("EMANet", "ema:EMAHead", {}, "last", "EMANet (ICCV 2019)", 256),
    "nlnet": ("NLNet", "context:NLHead", {}, "last", "Non-local (CVPR 2018)", 512),
    "dnlnet": ("DNLNet", "context:DNLHead", {}, "last", "DNL (ECCV 2020)", 512),
    "gcnet": ("GCNet", "context:GCHead", {}, "last", "GCNet (ICCVW 2019)", 512),
    "ocrnet": ("OCRNet", "ocr:OCRHead", {}, "ocr", "OCRNet (ECCV 2020)", 512),
    "psanet": ("PSANet", "psa:PSAHead", {}, "last", "PSANet (ECCV 2018)", 512),
    "apcnet": ("APCNet", "apc:APCHead", {}, "last", "APCNet (CVPR 2019)", 512),
    "ann": ("ANN", "ann:ANNHead", {}, "last2", "ANN (ICCV 2019)", 512),
    "glorenet": ("GloReNet", "context:GloReHead", {}, "last", "GloRe (CVPR 2019)", 512),
    "a2net": ("A2Net", "context:A2Head", {}, "last", "A2-Nets (NeurIPS 2018)", 512),
    "attnfcn": ("AttnFCN", "context:AttnHead", {}, "last", "FCN + any lit_attn block", 512),
}


def _head_class(path: str) -> type[nn.Module]:
    module, name = path.split(":")
    return getattr(importlib.import_module(f"lit_attn.heads.{module}"), name)


class AttnSegmentationModel(SegmentationModel):
    """An mmseg-style attention segmentor as an smp `SegmentationModel` (see the module docstring).

    Args: encoder_name / encoder_depth / encoder_weights / in_channels / classes / activation as
    every smp model; encoder_output_stride 8 (mmseg's D8), 16 or 32; decoder_channels: the head
    width (mmseg's `channels`; None: the architecture's mmseg value); decoder_dropout: Dropout2d
    before the classifier (0.1); decoder_norm: "batchnorm" (SyncBN comes from Lightning's
    `sync_batchnorm`), "groupnorm", ...; decoder_kwargs: head-specific options (e.g.
    {"recurrence": 3} for CCNet); aux_head: mmseg's auxiliary FCN head (always on for OCRNet,
    whose decode head needs its logits); aux_channels 256; aux_loss_weight 0.4.
    """

    requires_divisible_input_shape = False
    arch: str = ""

    @supports_config_loading
    def __init__(self, encoder_name: str = "resnet34", encoder_depth: int = 5, encoder_weights: str | None = None,
                 encoder_output_stride: int = 8, decoder_channels: int | None = None,
                 decoder_dropout: float = 0.1, decoder_norm: str = "batchnorm",
                 decoder_kwargs: dict[str, Any] | None = None, aux_head: bool = True, aux_channels: int = 256,
                 aux_loss_weight: float = 0.4, in_channels: int = 3, classes: int = 1,
                 activation: str | None = None, aux_params: dict | None = None, **kwargs: Any):
        super().__init__()
        cls_name, head_path, head_defaults, inputs, _, channels = ARCHITECTURES[self.arch]
        if aux_params is not None:
            raise ValueError(f"{cls_name}: aux_params (smp's image-classification head) is not supported; "
                             f"the auxiliary output here is mmseg's FCN head (aux_head=True)")
        if encoder_output_stride not in (8, 16, 32):
            raise ValueError(f"{cls_name}: encoder_output_stride must be 8, 16 or 32, got "
                             f"{encoder_output_stride!r}")
        if encoder_depth < 4 and (aux_head or inputs != "last"):
            raise ValueError(f"{cls_name}: encoder_depth={encoder_depth} leaves no stage for the auxiliary "
                             f"head; use encoder_depth >= 4 or aux_head=False")
        self.encoder = get_encoder(encoder_name, in_channels=in_channels, depth=encoder_depth,
                                   weights=encoder_weights, output_stride=encoder_output_stride, **kwargs)
        enc_channels = list(self.encoder.out_channels)
        head_kwargs = {**head_defaults, **self._head_kwargs(), **(decoder_kwargs or {})}
        head_in = (enc_channels[-2], enc_channels[-1]) if inputs == "last2" else enc_channels[-1]
        self.decoder = _head_class(head_path)(head_in, decoder_channels or channels, classes,
                                              dropout=decoder_dropout, norm_layer=decoder_norm, **head_kwargs)
        self.inputs = inputs
        self.auxiliary_head = None
        if aux_head or inputs == "ocr":
            self.auxiliary_head = FCNHead(enc_channels[-2], aux_channels, classes, num_convs=1,
                                          concat_input=False, dropout=0.1, norm_layer=decoder_norm)
        self.segmentation_head = Activation(activation)
        self.classification_head = None
        extra = tuple(getattr(self.decoder, "extra_loss_weights", ()))
        self.aux_loss_weights = extra + ((aux_loss_weight,) if self.auxiliary_head is not None else ())
        self.name = f"{self.arch}-{encoder_name}"
        # no smp `initialize()`: the heads carry mmseg's init and the blocks their papers' (zero gammas)

    def _head_kwargs(self) -> dict:
        return {}

    def forward(self, x: Tensor):
        if not isinstance(x, Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__} expects a (B, C, H, W) image batch, got {shape}")
        feats = self.encoder(x)
        aux = None
        if self.auxiliary_head is not None and (self.training or self.inputs == "ocr"):
            aux = self.auxiliary_head(feats[-2])
        if self.inputs == "ocr":
            out = self.decoder(feats[-1], aux)
        elif self.inputs == "last2":
            out = self.decoder(feats[-2], feats[-1])
        else:
            out = self.decoder(feats[-1])
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        if self.training and aux is not None:
            outs.append(aux)
        size = x.shape[-2:]
        outs = [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs]
        outs[0] = self.segmentation_head(outs[0])
        return tuple(outs) if self.training and len(outs) > 1 else outs[0]


class AttnFCN(AttnSegmentationModel):
    """FCN head with any lit_attn block between its convs (`attention=<registered name>`, mmseg's
    NLHead/GCHead pattern), on any smp or timm ("tu-") encoder; `attention=None` is mmseg's FCN-D8 head."""

    arch = "attnfcn"

    @supports_config_loading
    def __init__(self, attention: str | None = "psa_p", attention_kwargs: dict[str, Any] | None = None, **kwargs: Any):
        self._attention = (attention, attention_kwargs)
        super().__init__(**kwargs)

    def _head_kwargs(self) -> dict:
        attention, attention_kwargs = self._attention
        return {"attention": attention, "attention_kwargs": attention_kwargs}


class LitAttnDecoderAttention(nn.Module):
    """smp's decoder `Attention(name, in_channels=...)` that also accepts every lit_attn/timm plug-in
    block name (registry kinds gate and global), built for `in_channels`; None and "scse" keep smp's
    behaviour (installed as `segmentation_models_pytorch.base.modules.Attention`)."""

    def __init__(self, name, **params):
        super().__init__()
        if name is None:
            self.attention = nn.Identity()
        elif name == "scse":
            self.attention = SCSEModule(**params)
        elif is_attn(name) and get_attn_entry(name).kind in (GATE, GLOBAL):
            self.attention = get_attn_entry(name).build(params["in_channels"])
        else:
            from ..registry import list_attn

            raise ValueError(f"decoder_attention_type {name!r} is not smp's 'scse' or a lit_attn plug-in block; "
                             f"known: {', '.join(list_attn(kind=(GATE, GLOBAL)))}")

    def forward(self, x):
        return self.attention(x)


def _architecture(arch: str) -> type[AttnSegmentationModel]:
    cls_name, _, _, _, paper, _ = ARCHITECTURES[arch]
    doc = (f"{paper} decode head (lit_attn.heads, mmseg's R-50-D8 configuration) as an smp model: "
           f"`smp.create_model({arch!r}, ...)`. Arguments: see AttnSegmentationModel.")
    return type(cls_name, (AttnSegmentationModel,), {"arch": arch, "__doc__": doc, "__module__": __name__})


# the architectures as classes of this module (so LightningCLI / jsonargparse and pickling find them)
for _arch in ARCHITECTURES:
    if _arch != "attnfcn":
        globals()[ARCHITECTURES[_arch][0]] = _architecture(_arch)
CLASSES: dict[str, type[AttnSegmentationModel]] = {arch: globals()[ARCHITECTURES[arch][0]] for arch in ARCHITECTURES}


def install() -> None:
    """Register the architectures in smp (`smp.create_model(name)`, `smp.<Class>` for `smp.from_pretrained`)
    and route smp's decoder attention names to lit_attn. Idempotent; refuses to shadow smp's own names."""
    for arch, cls in CLASSES.items():
        existing = getattr(smp, cls.__name__, None)
        if existing is not None and existing is not cls:
            raise RuntimeError(f"segmentation_models_pytorch already defines {cls.__name__}; lit_attn will not "
                               f"replace it")
        if smp.MODEL_ARCHITECTURES_MAPPING.get(arch, cls) is not cls:
            raise RuntimeError(f"smp already has an architecture named {arch!r}")
        smp.MODEL_ARCHITECTURES_MAPPING[arch] = cls
        setattr(smp, cls.__name__, cls)
    smp_modules.Attention = LitAttnDecoderAttention
