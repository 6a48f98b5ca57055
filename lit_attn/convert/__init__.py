"""Converting trained checkpoints of other libraries into lit_attn models.

    from lit_attn.convert import convert_mmseg
    model = convert_mmseg("dnl_r50-d8_512x1024_80k_cityscapes.pth", out_dir="converted/dnl_r50")   # eval mode
    # later, in any process:
    import lit_attn, segmentation_models_pytorch as smp
    model = smp.from_pretrained("converted/dnl_r50")

    lit-attn convert mmseg CKPT OUT_DIR [--arch NAME] [--dnl-form sum|per_term] [--output-stride 8|16|32]
                                        [--lightning-ckpt FILE]

mmsegmentation 0.x and 1.x checkpoints (`{"meta": ..., "state_dict": ...}`, or a bare state dict with mmseg's
`backbone.*` / `decode_head.*` keys) of the DANet, CCNet, ISANet, EMANet, NonLocal, DNLNet, GCNet, OCRNet, PSANet,
APCNet, ANN and FCN heads on a ResNetV1c (or ResNet) backbone become the smp architectures danet, ccnet, isanet,
emanet, nlnet, dnlnet, gcnet, ocrnet, psanet, apcnet, ann and attnfcn (attention=None) with the smp encoder
`tu-resnet{18,34,50,101,152}c` (timm; 18/34 with `stem_type="deep"`), and mmseg's HRNet OCRNet (the cascade FCNHead
+ OCRHead on its HRNet backbone: `ocrnet_hr18s` / `hr18` / `hr48` configs, Cityscapes, ADE20K, VOC) becomes
`hrnet_ocr` (NVIDIA's HRNet-OCR) on timm's plain HRNet, `tu-hrnet_w18_small_v2` / `tu-hrnet_w18` / `tu-hrnet_w48`.
What is read from where:

- architecture: the decode head's keys (`decode_head.pam.*` DANet, `cca.*` CCNet, `global_relation.*` ISANet,
  `ema_module.*` EMANet, `nl_block.*` NonLocal, `dnl_block.*` DNLNet, `gc_block.*` GCNet, `decode_head.1.
  object_context_block.*` OCRNet, `reduce.*` + `attention.*` PSANet, `acm_modules.*` APCNet, `fusion.stages.*` ANN,
  only `convs` / `conv_cat` / `conv_seg` FCN); `--arch` only confirms it. Other heads (PSPNet, DeepLabV3, UPerNet,
  ...) are refused by name.
- widths, all from the state dict: backbone depth (blocks per stage), stem and stage widths (timm's `stem_width`
  and `channels`, passed through smp's "tu-" encoder to `timm.create_model`; omitted when standard), input
  channels, classes and head channels (`conv_seg`), the auxiliary head (its `conv_seg`; none without one) and each
  head's own widths (pam / isa / ema / ocr / project channels, NL/DNL reduction, GC ratio and fusions, PSA mask
  size and branches, APC pool scales from each `gla` width, EMA bases).
- what the weights do not hold, from the config text in meta (0.x `meta["config"]`, 1.x `meta["cfg"]`, parsed as
  literals, never executed), else mmseg's defaults: the output stride (`strides` / `dilations` of the backbone:
  (1, 2, 1, 1) / (1, 1, 2, 4) is 8, (1, 2, 2, 1) / (1, 1, 1, 2) is 16; no config: 8, mmseg's D8, or
  `--output-stride`), CCNet's recurrence, ISA's down factor, EMANet's stages and momentum, NL/DNL's use_scale,
  mode and temperature, PSANet's shrink factor and normalisation, ANN's key pool scales, the dropout ratio.
  Settings our models cannot reproduce (align_corners=True, a non-BN / non-ReLU head, contract_dilation=False,
  multi-grid, caffe style, a neck) are refused.
- HRNet OCRNet: the trunk is the timm HRNet whose every key and shape the checkpoint's `backbone.*` has (mmseg's
  HRNet keeps the official names, as timm's; the nearest trunk and the differing keys are named otherwise); in
  channels, classes, OCR widths (`decode_head.1.bottleneck` = decoder_channels, ocr_channels = decoder_key_channels)
  from the weights; stage 1 (`decode_head.0`, FCNHead 1x1, channels = sum of the branches) = hrnet_ocr's aux_head,
  OCRHead's bottleneck = conv3x3_ocr, conv_seg = cls_head; their conv biases, which mmseg's ConvModules lack, are
  set to 0 (noted). OCRHead's dropout_ratio (-1 in the zoo) becomes decoder_dropout (both a Dropout2d before the
  classifier); a stage-1 dropout, another input_transform than resize_concat of all four branches, an OCR scale
  != 1, an auxiliary_head or an output stride other than 32 are refused. The fuse differs: mmseg upsamples a lower
  branch bilinearly by 2^k and then resizes it to the target size, hrnet_ocr (official HRNetV2) resizes once: the
  same numbers when the input's sides are multiples of 32 (Cityscapes' 1024x2048 whole-image test), slightly
  different otherwise (e.g. ADE20K's aspect-kept resizes).
- DNLNet: the conv_out form. Every released mmseg, 0.x (0.6 ... 0.30) and 1.x, computes x + BN(conv_out(pairwise
  + unary)) ("sum"; `--dnl-form 0.x` and `1.x` name it too), so every checkpoint gets it whatever version its meta
  names (the version is reported); `--dnl-form per_term` selects x + BN(conv_out(pairwise)) + BN(conv_out(unary)), a
  variant attributed to mmseg 0.x that no release has, for checkpoints trained with it.

Every key is mapped (see `mmseg.py`, `_rules`) and loaded strictly: an unmapped mmseg key, a model key left without
a value or a shape difference is a `KeyMappingError` listing them. Accounted for explicitly: ANN's duplicated
APNB query_project (checked equal to key_project) and, for old checkpoints without them, BN num_batches_tracked
counters (set to 0). Loading uses `torch.load(weights_only=True)`; numpy / mmengine objects in the metadata are
read as inert placeholders (`loading.py`). `lightning_ckpt` also writes the weights as a minimal Lightning
checkpoint of `SegmentationTask` (`state_dict` with `model.` keys, no hyper-parameters, no training state) for
`lit-attn test|validate|predict --config <recipe> --ckpt_path FILE` (the recipe must build the same widths: the
task's state-dict check names any difference). The model expects mmseg's input normalisation (RGB, mean (123.675,
116.28, 103.53), std (58.395, 57.12, 57.375) on 0-255 pixels, i.e. ImageNet's on 0-1).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import mmseg_version
from .errors import (
    ConvertError,
    CorruptCheckpointError,
    KeyMappingError,
    NotMMSegCheckpointError,
    UnsupportedModelError,
)
from .loading import MMSegCheckpoint, load_mmseg_checkpoint, read_checkpoint
from .mmseg import ARCH_ALIASES, DNL_FORMS, MMSEG_HEADS, ConversionPlan, build_plan, map_state_dict, stem_kind
from .output import check_out_dir, save_folder, save_lightning

__all__ = ["ARCH_ALIASES", "DNL_FORMS", "MMSEG_HEADS", "Conversion", "ConversionPlan", "ConvertError",
           "CorruptCheckpointError", "KeyMappingError", "MMSegCheckpoint", "NotMMSegCheckpointError",
           "UnsupportedModelError", "convert_mmseg", "convert_mmseg_checkpoint", "load_mmseg_checkpoint",
           "read_checkpoint"]

REPORT_NAME = "mmseg_conversion.json"


@dataclass
class Conversion:
    """The converted model (eval mode), the plan it was built from, accounting notes and the output folder."""

    model: torch.nn.Module
    plan: ConversionPlan
    notes: list[str] = field(default_factory=list)
    out_dir: Path | None = None
    num_tensors: int = 0


def _class_names(meta: Mapping[str, Any]) -> list[str] | None:
    names = meta.get("CLASSES")
    if names is None and isinstance(meta.get("dataset_meta"), Mapping):
        names = meta["dataset_meta"].get("classes")
    return [str(n) for n in names] if isinstance(names, (list, tuple)) else None


def convert_mmseg_checkpoint(checkpoint: str | os.PathLike | Mapping, out_dir: str | os.PathLike | None = None, *,
                             arch: str | None = None, dnl_form: str | None = None, output_stride: int | None = None,
                             decoder_kwargs: Mapping[str, Any] | None = None, overwrite: bool = False,
                             lightning_ckpt: str | os.PathLike | None = None) -> Conversion:
    """`convert_mmseg` returning the whole `Conversion` (model, plan with where each setting came from, notes)."""
    import segmentation_models_pytorch as smp

    import lit_attn  # noqa: F401  (registers the architectures in smp)

    if out_dir is not None:
        check_out_dir(Path(out_dir), overwrite)
    if lightning_ckpt is not None and Path(lightning_ckpt).exists() and not overwrite:
        raise ConvertError(f"{lightning_ckpt}: exists; choose another file or pass --overwrite")
    ckpt = checkpoint if isinstance(checkpoint, MMSegCheckpoint) else load_mmseg_checkpoint(checkpoint)
    plan = build_plan(ckpt, arch=arch, dnl_form=dnl_form, output_stride=output_stride, decoder_kwargs=decoder_kwargs)
    try:
        model = smp.create_model(plan.arch, **plan.create_kwargs)
    except (ValueError, TypeError, KeyError) as e:
        raise UnsupportedModelError(f"cannot build {plan.arch} with {plan.create_kwargs}: {e}") from None
    state, notes = map_state_dict(plan.arch, stem_kind(ckpt.state_dict), ckpt.state_dict, model.state_dict())
    model.load_state_dict(state, strict=True)
    model.eval()
    conv = Conversion(model, plan, notes, None, len(state))
    if out_dir is not None:
        conv.out_dir = save_folder(model, _report(conv, ckpt), REPORT_NAME, Path(out_dir), overwrite)
    if lightning_ckpt is not None:
        save_lightning(model, _report(conv, ckpt), Path(lightning_ckpt))
    return conv


def convert_mmseg(checkpoint: str | os.PathLike | Mapping, out_dir: str | os.PathLike | None = None, *,
                  arch: str | None = None, dnl_form: str | None = None, output_stride: int | None = None,
                  decoder_kwargs: Mapping[str, Any] | None = None, overwrite: bool = False,
                  lightning_ckpt: str | os.PathLike | None = None) -> torch.nn.Module:
    """An mmsegmentation checkpoint (path, loaded dict or bare state dict) as the matching lit_attn smp model, in
    eval mode, with every weight loaded strictly (see the module docstring for what is read from where).

    Args:
        checkpoint: an mmseg 0.x / 1.x checkpoint file or dict.
        out_dir: also write an smp `save_pretrained` folder there (`smp.from_pretrained(out_dir)` after
            `import lit_attn`), plus `mmseg_conversion.json` (source, settings and where each came from).
        arch: confirm the architecture (ours, e.g. "dnlnet", or mmseg's name, e.g. "dnl"); a mismatch is an error.
        dnl_form: DNLNet's conv_out form: "sum" (default; what every released mmseg computes, also named "0.x"
            and "1.x") or "per_term".
        output_stride: 8, 16 or 32 when the checkpoint has no config in its meta (default 8, mmseg's D8), or to
            run it at another stride.
        decoder_kwargs: head settings the checkpoint cannot tell (e.g. PSANet's psa_type for a one-branch head).
        overwrite: replace an existing non-empty `out_dir` (and an existing `lightning_ckpt`).
        lightning_ckpt: also write a minimal Lightning checkpoint of `SegmentationTask` there (for `lit-attn test
            --ckpt_path`; not for resuming `fit`).

    Raises a `ConvertError` subclass (`CorruptCheckpointError`, `NotMMSegCheckpointError`, `UnsupportedModelError`,
    `KeyMappingError`) whose message says what is wrong.
    """
    return convert_mmseg_checkpoint(checkpoint, out_dir, arch=arch, dnl_form=dnl_form, output_stride=output_stride,
                                    decoder_kwargs=decoder_kwargs, overwrite=overwrite,
                                    lightning_ckpt=lightning_ckpt).model


def _report(conv: Conversion, ckpt: MMSegCheckpoint) -> dict[str, Any]:
    version, where = mmseg_version(ckpt.meta)
    return {"source": ckpt.source, "mmseg_version": version, "version_source": where,
            "mmseg_head": conv.plan.head_type, "architecture": conv.plan.arch,
            "create_model": {k: list(v) if isinstance(v, tuple) else v for k, v in conv.plan.create_kwargs.items()},
            "settings": conv.plan.notes, "notes": conv.notes, "tensors": conv.num_tensors,
            "class_names": _class_names(ckpt.meta)}


