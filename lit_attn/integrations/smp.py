"""lit_attn in segmentation-models-pytorch: attention heads as smp architectures, block names in
smp's decoders. Active on `import lit_attn` (`install()`).

    smp.create_model("danet", encoder_name="resnet34", encoder_weights=None, classes=19)
    smp.create_model("attnfcn", encoder_name="tu-resnet50", encoder_weights=None, classes=19, attention="psa_p")
    smp.Unet("resnet34", encoder_weights=None, decoder_attention_type="cbam")   # any plug-in block name

Each architecture is an smp `SegmentationModel`: `encoder` (smp's `get_encoder`, dilated to
`encoder_output_stride`, 8 by default as mmseg's R-50-D8 models; `encoder_depth` 3-5), `decoder` (the
mmseg-configured decode head of `lit_attn.heads` on the last feature map, logits at the feature resolution),
`auxiliary_head` (mmseg's FCNHead(C -> 256, one conv, no concat) on the stage before the last, loss weight 0.4;
OCRNet's first cascade stage), `segmentation_head` (bilinear resize to the input, then the activation) and, with
smp's `aux_params`, `classification_head` on the last stage. Any input size works (no divisibility check).

`forward(x)` is smp's contract in training and eval mode alike: the main logits (B, classes, H, W) at the input
size, or `(mask, label)` with `aux_params`; it computes no auxiliary output (OCRNet's auxiliary head excepted: its
decode head needs it), so `loss = criterion(model(x), y)` works in any training loop. `forward_with_aux(x)`
returns `(main, *extra, aux)` logits at the input size (DANet's pam / cam outputs, the auxiliary FCN head's), whose
loss weights are `model.aux_loss_weights`: `lit_attn.tasks.SegmentationTask` trains through it, as mmseg.
`save_pretrained` / `smp.from_pretrained` round-trip through smp's hub mixin (the classes are set on the
`segmentation_models_pytorch` module so `from_pretrained` finds them). smp's capability flags
(`_is_torch_scriptable`, ...) are set from `CAPABILITIES`.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base import ClassificationHead, SegmentationModel
from segmentation_models_pytorch.base import initialization as smp_init
from segmentation_models_pytorch.base import modules as smp_modules
from segmentation_models_pytorch.base.hub_mixin import supports_config_loading
from segmentation_models_pytorch.base.modules import Activation, SCSEModule
from segmentation_models_pytorch.base.utils import is_torch_compiling
from segmentation_models_pytorch.encoders import get_encoder
from torch import Tensor, nn

from ..heads.danet import DAHead
from ..heads.fcn import FCNHead
from ..registry import GATE, GLOBAL, NOT_SCRIPTABLE, get_attn_entry, is_attn

__all__ = ["ARCHITECTURES", "CAPABILITIES", "CLASSES", "AttnFCN", "AttnSegmentationModel", "LitAttnDecoderAttention",
           "install"]

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


# What smp's `_is_torch_scriptable`, `_is_torch_exportable`, `_is_torch_compilable` report per architecture:
# measured with resnet18 and timm's test_resnet encoders at 64x64 in eval mode (torch.jit.script; torch.export.export
# strict=True; torch.compile fullgraph=True, dynamic=True), and checked both ways by tests/test_smp_contract.py (a
# False flag must still fail there, so a capability that starts working shows up). Every architecture scripts
# (PSANet too: its block builds the index tensors uncached under TorchScript); AttnFCN's flags are those of its
# default block, and an AttnFCN instance is not scriptable with a block in `lit_attn.registry.NOT_SCRIPTABLE`.
CAPABILITIES: dict[str, tuple[bool, bool, bool]] = {  # arch: (scriptable, exportable, compilable)
    arch: (True, True, True) for arch in ARCHITECTURES
}


def _head_class(path: str) -> type[nn.Module]:
    module, name = path.split(":")
    return getattr(importlib.import_module(f"lit_attn.heads.{module}"), name)


class AttnSegmentationModel(SegmentationModel):
    """An mmseg-style attention segmentor as an smp `SegmentationModel` (see the module docstring).

    Args: encoder_name / encoder_depth (3, 4 or 5 as smp's models; 1-2 where the architecture allows) /
    encoder_weights / in_channels / classes / activation / aux_params as every smp model; encoder_output_stride
    8 (mmseg's D8), 16 or 32; decoder_channels: the head width (mmseg's `channels`; None: the architecture's
    mmseg value); decoder_dropout: Dropout2d before the classifier (0.1); decoder_norm: "batchnorm" (SyncBN
    comes from Lightning's `sync_batchnorm`), "groupnorm", ...; decoder_kwargs: head-specific options (e.g.
    {"recurrence": 3} for CCNet); aux_head: mmseg's auxiliary FCN head on the stage before the last (always on
    for OCRNet, whose decode head needs its logits; turned off with a warning where the encoder has no such
    stage); aux_channels 256; aux_loss_weight 0.4; aux_params: smp's image-classification head on the last
    stage (`classification_head`; `forward` then returns `(mask, label)`).

    `forward(x)` returns the main logits (or `(mask, label)`) in training and eval mode, as smp's models;
    `forward_with_aux(x)` returns `(main, *extra, aux)`, whose loss weights are `aux_loss_weights`.
    """

    __constants__ = ["_cascade", "_two_inputs", "_extra"]
    requires_divisible_input_shape = False  # any input size: the logits are resized to it
    # set per architecture from CAPABILITIES
    _is_torch_scriptable = False
    _is_torch_exportable = True
    _is_torch_compilable = True
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
        if encoder_output_stride not in (8, 16, 32):
            raise ValueError(f"{cls_name}: encoder_output_stride must be 8, 16 or 32, got "
                             f"{encoder_output_stride!r}")
        self.encoder = get_encoder(encoder_name, in_channels=in_channels, depth=encoder_depth,
                                   weights=encoder_weights, output_stride=encoder_output_stride, **kwargs)
        # encoder.out_channels: the input, then one entry per stage (0: a stage the encoder does not have, as the
        # 1/2 map of transformer-style timm encoders)
        enc_channels = list(self.encoder.out_channels)
        if len(enc_channels) < 2 or enc_channels[-1] < 1:
            raise ValueError(f"{cls_name}: encoder {encoder_name!r} with encoder_depth={encoder_depth} has no "
                             f"feature map for the decode head")
        before_last = enc_channels[-2] if len(enc_channels) >= 3 and enc_channels[-2] > 0 else None
        if before_last is None and inputs != "last":
            needs = ("two stages (decode head on the last two)" if inputs == "last2"
                     else "the auxiliary FCN head (its cascade's first stage) on the stage before the last")
            raise ValueError(f"{cls_name} needs {needs}, but encoder {encoder_name!r} with "
                             f"encoder_depth={encoder_depth} gives one; use a larger encoder_depth")
        if before_last is None and aux_head:
            warnings.warn(f"{cls_name}: encoder {encoder_name!r} with encoder_depth={encoder_depth} has no stage "
                          f"before the last for the auxiliary FCN head; it is turned off (aux_head=False)",
                          UserWarning, stacklevel=2)
            aux_head = False
        head_kwargs = {**head_defaults, **self._head_kwargs(), **(decoder_kwargs or {})}
        head_in = (before_last, enc_channels[-1]) if inputs == "last2" else enc_channels[-1]
        self.decoder = _head_class(head_path)(head_in, decoder_channels or channels, classes,
                                              dropout=decoder_dropout, norm_layer=decoder_norm, **head_kwargs)
        self.inputs = inputs
        self._cascade, self._two_inputs = inputs == "ocr", inputs == "last2"
        extra = tuple(getattr(self.decoder, "extra_loss_weights", ()))
        self._extra = bool(extra)
        if self._extra and not isinstance(self.decoder, DAHead):
            raise TypeError(f"{cls_name}: no main-only path for the extra outputs of {type(self.decoder).__name__}")
        self.auxiliary_head = None
        if aux_head or self._cascade:
            self.auxiliary_head = FCNHead(before_last, aux_channels, classes, num_convs=1,
                                          concat_input=False, dropout=0.1, norm_layer=decoder_norm)
        self.segmentation_head = Activation(activation)
        self.classification_head = None
        if aux_params is not None:  # smp's: on the last stage, smp's head init
            self.classification_head = ClassificationHead(in_channels=enc_channels[-1], **aux_params)
            smp_init.initialize_head(self.classification_head)
        self.aux_loss_weights = extra + ((aux_loss_weight,) if self.auxiliary_head is not None else ())
        self.name = f"{self.arch}-{encoder_name}"
        # no smp `initialize()`: the heads carry mmseg's init and the blocks their papers' (zero gammas)

    def _head_kwargs(self) -> dict:
        return {}

    def __prepare_scriptable__(self):
        """torch.jit.script's hook: a clear RuntimeError (smp's tests expect one) where TorchScript is known to
        fail (`_is_torch_scriptable` False, from CAPABILITIES), instead of an error deep in a head or block."""
        if not self._is_torch_scriptable:
            raise RuntimeError(f"{type(self).__name__} cannot be scripted with TorchScript yet (its heads and blocks "
                               f"are not scriptable); torch.export.export and torch.compile work")
        return self

    @torch.jit.unused
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__} expects a (B, C, H, W) image batch, got {shape}")
        self.check_input_shape(x)  # smp's divisibility check: a no-op here (requires_divisible_input_shape False)

    def _main_logits(self, feats: list[Tensor], aux: Tensor | None) -> Tensor:
        """The decode head's main logits at the feature resolution: no extra output is computed (DANet's pam /
        cam classifiers), and the auxiliary head's logits are only used by OCRNet's cascade."""
        if torch.jit.is_scripting():  # TorchScript: the heads' typed methods (their forward takes *inputs)
            if self._cascade:
                assert aux is not None
                return self.decoder.cls_seg(self.decoder.forward_features(feats[-1], aux))
            if self._two_inputs:
                return self.decoder.cls_seg(self.decoder.forward_features(feats[-2], feats[-1]))
            return self.decoder.cls_seg(self.decoder.forward_features(feats[-1]))
        if self._cascade:
            return self.decoder(feats[-1], aux)
        if self._two_inputs:
            return self.decoder(feats[-2], feats[-1])
        if self._extra and self.decoder.training:  # DAHead: its eval-mode output, cls_seg(pam_feat + cam_feat)
            return self.decoder.cls_seg(self.decoder.forward_features(feats[-1]))
        return self.decoder(feats[-1])

    def forward(self, x: Tensor):
        """Logits (B, classes, H, W) at the input size after `activation`, in training and eval mode (no
        auxiliary output is computed, except the auxiliary head OCRNet's decode head needs); with `aux_params`,
        `(mask, label)` as smp's models."""
        if not (torch.jit.is_scripting() or torch.jit.is_tracing() or is_torch_compiling()):
            self._check_input(x)
        feats = self.encoder(x)
        aux: Tensor | None = None
        if self._cascade:
            auxiliary_head = self.auxiliary_head
            assert auxiliary_head is not None
            if torch.jit.is_scripting():  # the heads' forward takes *inputs: their typed methods
                aux = auxiliary_head.cls_seg(auxiliary_head.forward_features(feats[-2]))
            else:
                aux = auxiliary_head(feats[-2])
        logits = self._main_logits(feats, aux)
        masks = self.segmentation_head(F.interpolate(logits, size=x.shape[-2:], mode="bilinear",
                                                     align_corners=False))
        if self.classification_head is not None:
            labels = self.classification_head(feats[-1])
            return masks, labels
        return masks

    @torch.jit.unused
    def forward_with_aux(self, x: Tensor) -> tuple[Tensor, ...]:
        """`(main, *extra, aux)` logits at the input size, in training and eval mode: the main logits as
        `forward`'s (after `activation`), DANet's pam and cam logits, the auxiliary FCN head's; one loss weight
        each in `aux_loss_weights` (what `lit_attn.tasks.SegmentationTask` trains with). The classification head
        (`aux_params`) is `forward`'s only."""
        self._check_input(x)
        feats = self.encoder(x)
        aux = self.auxiliary_head(feats[-2]) if self.auxiliary_head is not None else None
        if self._extra:  # DAHead's training-mode outputs (pam_cam, pam, cam), in either mode
            head = self.decoder
            pam_feat, cam_feat = head.branch_features(feats[-1])
            outs = [head.cls_seg(pam_feat + cam_feat), head.pam_cls_seg(pam_feat), head.cam_cls_seg(cam_feat)]
        else:
            outs = [self._main_logits(feats, aux)]
        if aux is not None:
            outs.append(aux)
        size = x.shape[-2:]
        outs = [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs]
        outs[0] = self.segmentation_head(outs[0])
        return tuple(outs)


class AttnFCN(AttnSegmentationModel):
    """FCN head with any lit_attn block between its convs (`attention=<registered name>`, mmseg's
    NLHead/GCHead pattern), on any smp or timm ("tu-") encoder; `attention=None` is mmseg's FCN-D8 head."""

    arch = "attnfcn"

    @supports_config_loading
    def __init__(self, attention: str | None = "psa_p", attention_kwargs: dict[str, Any] | None = None, **kwargs: Any):
        self._attention = (attention, attention_kwargs)
        super().__init__(**kwargs)
        if attention is not None and attention.lower() in NOT_SCRIPTABLE:  # the class flag is the default block's
            self._is_torch_scriptable = False

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
    return type(cls_name, (AttnSegmentationModel,), {"arch": arch, "__doc__": doc, "__module__": __name__,
                                                     **_capabilities(arch)})


def _capabilities(arch: str) -> dict[str, bool]:
    scriptable, exportable, compilable = CAPABILITIES[arch]
    return {"_is_torch_scriptable": scriptable, "_is_torch_exportable": exportable,
            "_is_torch_compilable": compilable}


# the architectures as classes of this module (so LightningCLI / jsonargparse and pickling find them)
for _flag, _value in _capabilities("attnfcn").items():
    setattr(AttnFCN, _flag, _value)
for _arch in ARCHITECTURES:
    if _arch != "attnfcn":
        globals()[ARCHITECTURES[_arch][0]] = _architecture(_arch)
CLASSES: dict[str, type[AttnSegmentationModel]] = {arch: globals()[ARCHITECTURES[arch][0]] for arch in ARCHITECTURES}


def install() -> None:
    """Register the architectures in smp (`smp.create_model(name)`, `smp.<Class>` for `smp.from_pretrained`)
    and route smp's decoder attention names to lit_attn. Idempotent; refuses to shadow smp's own names. NVIDIA's
    HRNet-OCR / MscaleOCR ("hrnet_ocr", "mscale_ocr") come from `lit_attn.integrations.smp_ocr`."""
    from .smp_ocr import OCR_CLASSES

    for arch, cls in {**CLASSES, **OCR_CLASSES}.items():
        existing = getattr(smp, cls.__name__, None)
        if existing is not None and existing is not cls:
            raise RuntimeError(f"segmentation_models_pytorch already defines {cls.__name__}; lit_attn will not "
                               f"replace it")
        if smp.MODEL_ARCHITECTURES_MAPPING.get(arch, cls) is not cls:
            raise RuntimeError(f"smp already has an architecture named {arch!r}")
        smp.MODEL_ARCHITECTURES_MAPPING[arch] = cls
        setattr(smp, cls.__name__, cls)
    smp_modules.Attention = LitAttnDecoderAttention
