"""NVIDIA's HRNet-OCR and hierarchical multi-scale attention (MscaleOCR) as smp architectures.

    smp.create_model("hrnet_ocr", encoder_name="tu-hrnet_w48", encoder_weights=None, classes=19)
    smp.create_model("mscale_ocr", encoder_name="tu-hrnet_w48", classes=19, inference_scales=(0.5, 1.0, 2.0))

From `NVIDIA/semantic-segmentation@66464461` (`network/ocrnet.py`: OCRNet, MscaleOCR; `config.py` defaults), the
code base DeLightCMU/PSA forks. Registered by `lit_attn.integrations.smp.install()`. The smp contract of lit_attn's
other architectures: `forward(x)` returns the main logits (B, classes, H, W) at the input size in training and eval
mode (or `(mask, label)` with `aux_params`), `forward_with_aux(x)` returns `(main, *aux)` whose loss weights are
`aux_loss_weights` (what `lit_attn.tasks.SegmentationTask` trains with); any input size; save_pretrained /
smp.from_pretrained. NVIDIA's checkpoints load through `lit_attn.heads.hrnet_ocr.official_ocr_keys`.
"""
from typing import Any

import timm
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base import ClassificationHead, SegmentationModel
from segmentation_models_pytorch.base import initialization as smp_init
from segmentation_models_pytorch.base.hub_mixin import supports_config_loading
from segmentation_models_pytorch.base.modules import Activation
from segmentation_models_pytorch.base.utils import is_torch_compiling
from segmentation_models_pytorch.encoders import get_encoder
from torch import Tensor

from ..heads.hrnet_ocr import HRNetOCRHead, ScaleAttentionHead, hrnetv2_representation
from ..models.hrnet_psa import use_official_fuse

__all__ = ["OCR_CAPABILITIES", "OCR_CLASSES", "HRNetOCR", "MscaleOCR"]

# smp's (_is_torch_scriptable, _is_torch_exportable, _is_torch_compilable), measured with timm's test ResNet and
# tu-hrnet_w18_small_v2 at 64x64 in eval mode (torch.jit.script; torch.export.export strict=True; torch.compile
# fullgraph=True, dynamic=True) and checked by tests/test_hrnet_ocr.py. An instance with a timm HRNet encoder is not
# scriptable (timm's HighResolutionNetFeatures does not script): its `_is_torch_scriptable` is False.
OCR_CAPABILITIES: dict[str, tuple[bool, bool, bool]] = {
    "hrnet_ocr": (True, True, True),
    "mscale_ocr": (True, True, True),
}


def _timm_name(encoder_name: str) -> str | None:
    """The timm model name of an smp "tu-" encoder (without its pretrained tag), else None."""
    return encoder_name[3:].split(".")[0] if encoder_name.startswith("tu-") else None


def _is_timm_hrnet(encoder_name: str) -> bool:
    """A timm HRNet entrypoint (timm.models.hrnet), whose features_only default is the classification head's
    'incre' features: the raw branches need feature_location=''."""
    name = _timm_name(encoder_name)
    return name is not None and timm.models.is_model(name) and \
        timm.models.model_entrypoint(name).__module__ == "timm.models.hrnet"


def _scale_as(x: Tensor, size: list[int], align_corners: bool) -> Tensor:
    """NVIDIA's `scale_as` / `Upsample`: bilinear resize to `size`."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


class HRNetOCR(SegmentationModel):
    """HRNet-OCR (Yuan, Chen, Wang, ECCV 2020, arXiv 1909.11065) as NVIDIA's `OCRNet` (`network/ocrnet.py
    @66464461`): any smp encoder's maps at strides 4, 8, 16, 32 (`encoder.out_channels[2:]`; timm HRNets give their
    raw branches: `feature_location=''` is passed for timm's `hrnet_*`) upsampled bilinearly to stride 4 and
    concatenated (`hrnetv2_representation`, align_corners False as NVIDIA's default), then `decoder` =
    `HRNetOCRHead` (NVIDIA's OCR_block: conv3x3_ocr, aux_head soft regions, SpatialGather + SpatialOCR, cls_head);
    cls and aux logits resized bilinearly to the input. Loss: main + 0.4 aux (OCR_ALPHA; NVIDIA's RMI loss is the
    task's choice, not the model's). Cost: the encoder + O(N (9 C mid + C^2) + N K mid) at stride 4, N = H W / 16.

    Args: encoder_name (default "tu-hrnet_w48", NVIDIA's HRNetV2-W48 trunk) / encoder_depth (2-5: the maps from
    stride 4 on; 5 = NVIDIA's four branches) / encoder_weights / in_channels / classes / activation / aux_params as
    every smp model; encoder_output_stride 32 (no dilation, as HRNet; 8 or 16 dilate smp's ResNets; timm's HRNets
    support 32 only); decoder_channels 512 (MID_CHANNELS), decoder_key_channels 256 (KEY_CHANNELS), decoder_dropout
    0.05, decoder_norm "batchnorm"; align_corners False (cfg.MODEL.ALIGN_CORNERS); aux_loss_weight 0.4.
    A timm HRNet encoder gets the segmentation HRNetV2's fuse (`lit_attn.models.hrnet_psa.use_official_fuse`:
    lower branches resized bilinearly to the target branch's size, as NVIDIA's, DeLightCMU's and mmseg's HRNet;
    timm's ImageNet HRNet upsamples by nearest scale factors and needs sizes divisible by 32), so any input size
    works; its ImageNet weights are used with that fuse, as the official code does.
    """

    requires_divisible_input_shape = False  # any input size: the logits are resized to it
    _is_torch_scriptable, _is_torch_exportable, _is_torch_compilable = OCR_CAPABILITIES["hrnet_ocr"]
    arch = "hrnet_ocr"
    __constants__ = ["align_corners"]

    @supports_config_loading
    def __init__(self, encoder_name: str = "tu-hrnet_w48", encoder_depth: int = 5, encoder_weights: str | None = None,
                 encoder_output_stride: int = 32, decoder_channels: int = 512, decoder_key_channels: int = 256,
                 decoder_dropout: float = 0.05, decoder_norm: str = "batchnorm", align_corners: bool = False,
                 aux_loss_weight: float = 0.4, in_channels: int = 3, classes: int = 1, activation: str | None = None,
                 aux_params: dict | None = None, **kwargs: Any):
        super().__init__()
        name = type(self).__name__
        if encoder_output_stride not in (8, 16, 32):
            raise ValueError(f"{name}: encoder_output_stride must be 8, 16 or 32, got {encoder_output_stride!r}")
        if isinstance(encoder_depth, bool) or not isinstance(encoder_depth, int) or encoder_depth < 2:
            raise ValueError(f"{name} needs the encoder's maps from stride 4 on (NVIDIA: the four HRNet branches at "
                             f"strides 4-32, encoder_depth=5); encoder_depth must be 2-5, got {encoder_depth!r}")
        hrnet = _timm_name(encoder_name) is not None and "hrnet" in encoder_name.lower()
        if hrnet and encoder_output_stride != 32:
            raise ValueError(f"{name}: timm's HRNet encoders ({encoder_name!r}) support encoder_output_stride=32 only, "
                             f"got {encoder_output_stride}")
        if _is_timm_hrnet(encoder_name):
            kwargs.setdefault("feature_location", "")  # the raw branches, not timm's classification 'incre' maps
        self.encoder = get_encoder(encoder_name, in_channels=in_channels, depth=encoder_depth,
                                   weights=encoder_weights, output_stride=encoder_output_stride, **kwargs)
        branches = list(self.encoder.out_channels[2:])
        if not branches or min(branches) < 1:
            raise ValueError(f"{name}: encoder {encoder_name!r} with encoder_depth={encoder_depth} gives no feature "
                             f"maps at strides 4 and below (channels {self.encoder.out_channels})")
        use_official_fuse(self.encoder)  # timm HRNets: NVIDIA's / mmseg's bilinear fuse (no-op for other encoders)
        self.align_corners = bool(align_corners)
        if hrnet:  # timm's HighResolutionNetFeatures does not script (its set-typed `_out_idx`): this instance neither
            self._is_torch_scriptable = False
        self.decoder = HRNetOCRHead(sum(branches), classes, mid_channels=decoder_channels,
                                    key_channels=decoder_key_channels, dropout=decoder_dropout, norm_layer=decoder_norm)
        self.segmentation_head = Activation(activation)
        self.classification_head = None
        if aux_params is not None:  # smp's: on the last stage, smp's head init
            self.classification_head = ClassificationHead(in_channels=self.encoder.out_channels[-1], **aux_params)
            smp_init.initialize_head(self.classification_head)
        self.aux_loss_weights: tuple[float, ...] = (float(aux_loss_weight),)
        self.name = f"{self.arch}-{encoder_name}"

    def __prepare_scriptable__(self):
        """torch.jit.script's hook: a clear RuntimeError where `_is_torch_scriptable` is False."""
        if not self._is_torch_scriptable:
            raise RuntimeError(f"{type(self).__name__} cannot be scripted with TorchScript yet; torch.export.export "
                               f"and torch.compile work")
        return self

    @torch.jit.unused
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.ndim != 4 or 0 in x.shape:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__} expects a (B, C, H, W) image batch, got {shape}")

    def _run(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(cls, aux, ocr_feats, last encoder map) at the feature resolution."""
        feats = self.encoder(x)
        cls, aux, ocr_feats = self.decoder(hrnetv2_representation(feats[2:], self.align_corners))
        return cls, aux, ocr_feats, feats[-1]

    def _to_input(self, t: Tensor, x: Tensor) -> Tensor:
        """Logits resized bilinearly to x's size (NVIDIA's scale_as)."""
        return _scale_as(t, [x.shape[-2], x.shape[-1]], self.align_corners)

    def forward(self, x: Tensor):
        """Logits (B, classes, H, W) at the input size after `activation`, in training and eval mode; with
        `aux_params`, `(mask, label)` as smp's models."""
        if not (torch.jit.is_scripting() or torch.jit.is_tracing() or is_torch_compiling()):
            self._check_input(x)
        cls, _, _, last = self._run(x)
        masks = self.segmentation_head(self._to_input(cls, x))
        if self.classification_head is not None:
            return masks, self.classification_head(last)
        return masks

    @torch.jit.unused
    def forward_with_aux(self, x: Tensor) -> tuple[Tensor, ...]:
        """`(main, aux)` at the input size in either mode: `forward`'s logits and the aux_head's (soft object
        region) logits, loss weights `aux_loss_weights` (0.4, NVIDIA's OCR_ALPHA)."""
        self._check_input(x)
        cls, aux, _, _ = self._run(x)
        return self.segmentation_head(self._to_input(cls, x)), self._to_input(aux, x)


class MscaleOCR(HRNetOCR):
    """Hierarchical multi-scale attention on HRNet-OCR (Tao, Sapra, Catanzaro, arXiv 2005.10821) as NVIDIA's
    `MscaleOCR` (`network/ocrnet.py@66464461`): HRNetOCR plus `scale_attn` (`ScaleAttentionHead`, NVIDIA's
    make_attn_head: 3x3-BN-ReLU x2 to 256, 1x1 to 1, sigmoid) on the OCR features; per scale `_fwd` runs the model on
    the resized image and resizes cls, aux and attention to that image's size. Training (`forward` in train mode,
    `forward_with_aux` in either mode) = NVIDIA's two_scale_forward: joint = up(a_lo * p_lo) + (1 - up(a_lo)) p_1x
    with lo_scale 0.5 (MSCALE_LO_SCALE), aux combined the same way. Inference (`forward` in eval mode) = NVIDIA's
    nscale_forward over `inference_scales` (default (0.5, 1.0, 2.0), NVIDIA's eval n_scales; 1.0 required):
    scales from the largest down, p = a_s p_s + (1 - a_s) down(p) for s >= 1, p = up(a_s p_s) + (1 - up(a_s)) p
    for s < 1 (the lower scale's attention decides); None: the two-scale output in eval mode too (NVIDIA with
    N_SCALES unset). `inference_flip` (default False, NVIDIA's --do_flip off) averages the logits of x and of the
    flipped image flipped back (NVIDIA does this in its evaluation loop, around the model; here in the model, eval
    mode only). Images are resized to floor(H s) x floor(W s) bilinearly (NVIDIA's ResizeX).

    Args (besides HRNetOCR's): lo_scale 0.5; inference_scales; inference_flip; attn_channels 256 (SEGATTN_BOT_CH);
    attn_inner_3x3 True (MSCALE_INNER_3x3); attn_dropout False (MSCALE_DROPOUT); supervised_mscale_weight 0.05
    (SUPERVISED_MSCALE_WT of NVIDIA's Cityscapes recipe `scripts/train_cityscapes.yml`; config.py's default is 0):
    with a weight > 0 `forward_with_aux` also returns the low-scale prediction (resized to the input) and the 1x
    prediction, each with that weight. `aux_loss_weights` = (0.4, w, w) or (0.4,). Differences: the attention of
    the largest scale (unused by NVIDIA's combination) and the 1x attention of the training forward are not
    computed; nscale_forward's combined aux output (NVIDIA's loss only when training with N_SCALES, which its
    forward never does) is not computed; the classification head (`aux_params`) sees the 1x pass's last map.
    Cost: the model at every scale (sum of s^2 times HRNetOCR's) plus the attention head per scale.
    """

    arch = "mscale_ocr"
    inference_scales: list[float]  # (TorchScript: the type of an empty list; no `from __future__ import annotations`)
    _is_torch_scriptable, _is_torch_exportable, _is_torch_compilable = OCR_CAPABILITIES["mscale_ocr"]
    __constants__ = ["align_corners", "lo_scale", "inference_flip"]

    @supports_config_loading
    def __init__(self, lo_scale: float = 0.5,
                 inference_scales: tuple[float, ...] | list[float] | None = (0.5, 1.0, 2.0),
                 inference_flip: bool = False, attn_channels: int = 256, attn_inner_3x3: bool = True,
                 attn_dropout: bool = False, supervised_mscale_weight: float = 0.05, **kwargs: Any):
        super().__init__(**kwargs)
        name = type(self).__name__
        if not 0.0 < float(lo_scale) < 1.0:
            raise ValueError(f"{name}: lo_scale must be in (0, 1) (NVIDIA's MSCALE_LO_SCALE 0.5), got {lo_scale!r}")
        self.lo_scale = float(lo_scale)
        self.inference_scales: list[float] = self._checked_scales(inference_scales)
        self.inference_flip = bool(inference_flip)
        self.scale_attn = ScaleAttentionHead(self.decoder.mid_channels, 1, bottleneck_channels=attn_channels,
                                             inner_3x3=attn_inner_3x3, dropout=attn_dropout,
                                             norm_layer=kwargs.get("decoder_norm", "batchnorm"))
        if float(supervised_mscale_weight) < 0:
            raise ValueError(f"{name}: supervised_mscale_weight must be >= 0, got {supervised_mscale_weight!r}")
        self.supervised_mscale_weight = float(supervised_mscale_weight)
        mscale = (self.supervised_mscale_weight,) * 2 if self.supervised_mscale_weight > 0 else ()
        self.aux_loss_weights = self.aux_loss_weights + mscale

    @torch.jit.unused
    def _checked_scales(self, scales) -> list[float]:
        if scales is None or len(scales) == 0:
            return []
        scales = [float(s) for s in scales]
        if 1.0 not in scales or min(scales) <= 0:
            raise ValueError(f"{type(self).__name__}: inference_scales must be positive and contain 1.0 (the target "
                             f"scale, as NVIDIA's nscale_forward), got {scales!r}")
        return sorted(scales, reverse=True)

    def _resize(self, x: Tensor, scale: float) -> Tensor:
        """NVIDIA's ResizeX: bilinear by `scale` with recompute_scale_factor, to floor(H s) x floor(W s) (identity at
        1.0); the scale factor, not a size computed in Python, so that traced exports (ONNX) keep it per input."""
        if scale == 1.0:
            return x
        return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=self.align_corners,
                             recompute_scale_factor=True)

    def _fwd(self, x: Tensor, attend: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """NVIDIA's `_fwd`: cls, aux and (with `attend`) the scale attention at x's size, and the last encoder map."""
        cls, aux, ocr_feats, last = self._run(x)
        attn: Tensor | None = None
        if attend:
            attn = self._to_input(self.scale_attn(ocr_feats), x)
        return self._to_input(cls, x), self._to_input(aux, x), attn, last

    def two_scale(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """NVIDIA's two_scale_forward: (joint pred, joint aux, low-scale pred resized to x, 1x pred, last map)."""
        pred_lo, aux_lo, attn_lo, _ = self._fwd(self._resize(x, self.lo_scale), True)
        assert attn_lo is not None
        pred_1x, aux_1x, _, last = self._fwd(x, False)
        size = [pred_1x.shape[-2], pred_1x.shape[-1]]
        p_lo = _scale_as(attn_lo * pred_lo, size, self.align_corners)
        a_lo = _scale_as(attn_lo * aux_lo, size, self.align_corners)
        attn = _scale_as(attn_lo, size, self.align_corners)
        joint_pred = p_lo + (1 - attn) * pred_1x
        joint_aux = a_lo + (1 - attn) * aux_1x
        return joint_pred, joint_aux, _scale_as(pred_lo, size, self.align_corners), pred_1x, last

    def nscale(self, x: Tensor, scales: list[float]) -> tuple[Tensor, Tensor]:
        """NVIDIA's nscale_forward prediction over `scales` (sorted from the largest down, 1.0 among them): (pred at
        x's size, the 1x pass's last encoder map)."""
        pred = x.new_empty(0)
        last = x.new_empty(0)
        first = True
        for s in scales:
            cls, _, attn, last_s = self._fwd(self._resize(x, s), not first)
            if s == 1.0:
                last = last_s
            if first:
                pred = cls
                first = False
            elif s >= 1.0:
                assert attn is not None
                pred = _scale_as(pred, [cls.shape[-2], cls.shape[-1]], self.align_corners)
                pred = attn * cls + (1 - attn) * pred
            else:
                assert attn is not None
                size = [pred.shape[-2], pred.shape[-1]]
                cls = _scale_as(attn * cls, size, self.align_corners)
                attn = _scale_as(attn, size, self.align_corners)
                pred = cls + (1 - attn) * pred
        return pred, last

    def _predict(self, x: Tensor, scales: list[float]) -> tuple[Tensor, Tensor]:
        if self.training or len(scales) == 0:
            out = self.two_scale(x)
            return out[0], out[4]
        return self.nscale(x, scales)

    def forward(self, x: Tensor):
        """Training mode: the two-scale joint logits; eval mode: the n-scale logits over `inference_scales` (with
        `inference_flip`, averaged with the flipped image's); at the input size after `activation`, or `(mask,
        label)` with `aux_params`."""
        scales = self.inference_scales
        if not (torch.jit.is_scripting() or torch.jit.is_tracing() or is_torch_compiling()):
            self._check_input(x)
            scales = self._checked_scales(scales)  # (a user may have replaced them)
        pred, last = self._predict(x, scales)
        if self.inference_flip and not self.training:  # NVIDIA's eval loop: flipped first, then plain, mean
            flipped, _ = self._predict(torch.flip(x, [3]), scales)
            pred = (torch.flip(flipped, [3]) + pred) / 2
        masks = self.segmentation_head(pred)
        if self.classification_head is not None:
            return masks, self.classification_head(last)
        return masks

    @torch.jit.unused
    def forward_with_aux(self, x: Tensor) -> tuple[Tensor, ...]:
        """NVIDIA's training outputs (two_scale_forward) in either mode: `(joint, joint_aux)`, plus `(low-scale
        pred, 1x pred)` when supervised_mscale_weight > 0, at the input size; loss weights `aux_loss_weights`. In eval
        mode `forward` is the n-scale inference, so `forward_with_aux(x)[0]` equals `forward(x)` only with
        inference_scales None and no flip."""
        self._check_input(x)
        joint, joint_aux, pred_lo, pred_1x, _ = self.two_scale(x)
        outs = (self.segmentation_head(joint), joint_aux)
        if self.supervised_mscale_weight > 0:
            outs = outs + (pred_lo, pred_1x)
        return outs


OCR_CLASSES: dict[str, type[HRNetOCR]] = {"hrnet_ocr": HRNetOCR, "mscale_ocr": MscaleOCR}
