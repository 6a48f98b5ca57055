"""Converting NVIDIA semantic-segmentation checkpoints (OCRNet = HRNet-OCR, MscaleOCR), the PSA paper's included
(DeLightCMU/PSA, a fork: a PSA_p / PSA_s block in every HRNet basic block), into lit_attn's smp architectures
`hrnet_ocr` / `mscale_ocr` on the timm encoder `tu-hrnet_<width>[_psa_p|_psa_s]`.

    lit-attn convert psa CKPT OUT_DIR [--arch hrnet_ocr|mscale_ocr] [--inference-scales 0.5,1.0,2.0] [--flip]

The checkpoint is `{"state_dict": ..., "epoch", "mean_iu", "command", ...}` as NVIDIA's train.py saves it, or a bare
state dict; keys `module.backbone.*`, `module.ocr.*`, `module.scale_attn.*` (the `module.` prefix optional). Read
from the tensors: the architecture (`scale_attn.*` present: mscale_ocr), the PSA block (`deattn.conv_up.0.*`:
PSA_s's bottleneck; `deattn.conv_up.*`: PSA_p; no `deattn`: plain HRNet), the HRNet trunk (the timm HRNet whose
every trunk key and shape the checkpoint has: w18_small_v2, w18, w32, w48, ... compared on the meta device), the
input channels, the classes (`ocr.cls_head`), the OCR widths (mid, key) and the scale-attention head's width and
inner 3x3. What the tensors cannot tell: the inference scales (default NVIDIA's Cityscapes evaluation, (0.5, 1.0,
2.0)) and flip (off, as NVIDIA's evaluation scripts). Every key is mapped (`official_to_timm_keys` for the trunk,
`official_ocr_keys` for the heads) and loaded strictly: an unmapped key, a model key left without a value or a shape
difference is a `KeyMappingError` naming them; BN `num_batches_tracked` counters missing from a checkpoint are set
to 0 and reported. The model expects NVIDIA's input normalisation (ImageNet mean / std on 0-1 RGB).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import ConvertError, KeyMappingError, NotPSACheckpointError, UnsupportedModelError
from .loading import read_checkpoint
from .output import check_out_dir, save_folder, save_lightning

__all__ = ["PSAConversion", "convert_psa", "match_hrnet_trunk", "nvidia_state_dict", "plan_psa"]

REPORT_NAME = "psa_conversion.json"
ARCHS = ("hrnet_ocr", "mscale_ocr")
# timm HRNet trunks tried, narrowest first within a width (the first whose keys and shapes all match wins)
TRUNKS = ("hrnet_w18_small", "hrnet_w18_small_v2", "hrnet_w18", "hrnet_w30", "hrnet_w32", "hrnet_w40", "hrnet_w44",
          "hrnet_w48", "hrnet_w64")
_MAX_KEYS = 10


@dataclass
class PSAConversion:
    """The converted model (eval mode), how it was built (`create_kwargs`), what was read from where (`settings`),
    accounting notes and the output folder."""

    model: torch.nn.Module
    arch: str
    create_kwargs: dict[str, Any]
    settings: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    out_dir: Path | None = None
    num_tensors: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


def _names(keys: Sequence[str]) -> str:
    keys = list(keys)
    more = f", ... ({len(keys) - _MAX_KEYS} more)" if len(keys) > _MAX_KEYS else ""
    return ", ".join(keys[:_MAX_KEYS]) + more


def nvidia_state_dict(checkpoint: Mapping[str, Any], source: str = "checkpoint") -> tuple[dict[str, Tensor],
                                                                                         dict[str, Any]]:
    """(state dict without the DDP `module.` prefix, metadata) of an NVIDIA train.py checkpoint or a bare state dict;
    `NotPSACheckpointError` when it has no `backbone.*` and `ocr.*` tensors."""
    meta: dict[str, Any] = {}
    state = checkpoint
    if isinstance(checkpoint.get("state_dict"), Mapping):
        state = checkpoint["state_dict"]
        meta = {k: v for k, v in checkpoint.items() if k in ("epoch", "arch", "num_classes", "mean_iu", "command")}
    tensors = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, Tensor)}
    if not any(k.startswith("backbone.") for k in tensors) or not any(k.startswith("ocr.") for k in tensors):
        raise NotPSACheckpointError(
            f"{source}: not an NVIDIA OCRNet / MscaleOCR state dict (expected `module.backbone.*` and `module.ocr.*` "
            f"tensors, as DeLightCMU/PSA's and NVIDIA/semantic-segmentation's checkpoints); its keys start "
            f"{_names(sorted({k.split('.', 1)[0] for k in tensors}))}")
    return tensors, meta


def _psa_block(state: Mapping[str, Tensor]) -> str | None:
    keys = [k for k in state if k.startswith("backbone.") and ".deattn." in k]
    if not keys:
        return None
    if any(".deattn.conv_up.0." in k for k in keys):
        return "psa_s"
    if any(k.endswith(".deattn.conv_up.weight") for k in keys):
        return "psa_p"
    raise UnsupportedModelError(f"PSA blocks (`deattn`) of an unknown form: {_names(keys)}")


def match_hrnet_trunk(state: Mapping[str, Tensor], attention: str | None) -> str:
    """The timm HRNet whose trunk has exactly the checkpoint's backbone keys and shapes (built on meta)."""
    import timm
    from timm.models import hrnet as timm_hrnet

    from ..models.hrnet_psa import official_to_timm_keys

    backbone = {k: v for k, v in state.items() if k.startswith("backbone.")}
    theirs = {k: tuple(v.shape) for k, v in official_to_timm_keys(backbone).items()
              if not k.endswith("num_batches_tracked")}
    width = theirs.get("stage2.0.branches.0.0.conv1.weight", (None,))[0]
    tried = []
    for base in TRUNKS:  # the bases of this width (the cfg says; nothing built), then keys and shapes on meta
        name = base if attention is None else f"{base}_{attention}"
        if not timm.is_model(name) or timm_hrnet.cfg_cls[base]["stage2"]["num_channels"][0] != width:
            continue
        kwargs = {"feature_location": ""} if attention is None else {}
        with torch.device("meta"):
            trunk = timm.create_model(name, features_only=True, in_chans=theirs["conv1.weight"][1], **kwargs)
        mine = {k: tuple(v.shape) for k, v in trunk.state_dict().items() if not k.endswith("num_batches_tracked")}
        if mine == theirs:
            return name
        tried.append((len(mine.keys() ^ theirs.keys()), name, mine))
    if not tried:
        raise UnsupportedModelError(f"no timm HRNet{'' if attention is None else ' ' + attention} has branch width "
                                    f"{width} (backbone.stage2.0.branches.0.0.conv1.weight)")
    _, name, mine = min(tried, key=lambda t: t[0])
    missing, extra = sorted(mine.keys() - theirs.keys()), sorted(theirs.keys() - mine.keys())
    shapes = sorted(k for k in mine.keys() & theirs.keys() if mine[k] != theirs[k])
    raise UnsupportedModelError(
        f"the HRNet trunk matches none of timm's {', '.join(t[1] for t in tried)}; nearest {name}: "
        f"missing {_names(missing) or '-'}; extra {_names(extra) or '-'}; other shapes {_names(shapes) or '-'}")


def plan_psa(state: Mapping[str, Tensor], *, arch: str | None = None,
             inference_scales: Sequence[float] | None = (0.5, 1.0, 2.0),
             inference_flip: bool = False) -> tuple[str, dict[str, Any], dict[str, str]]:
    """(arch, smp.create_model kwargs, settings: what was read from where) for a prefix-free NVIDIA state dict."""
    found = "mscale_ocr" if any(k.startswith("scale_attn.") for k in state) else "hrnet_ocr"
    if arch is not None and arch != found:
        raise UnsupportedModelError(f"--arch {arch} was given, but the checkpoint is {found} "
                                    f"({'has' if found == 'mscale_ocr' else 'has no'} scale_attn.* tensors)")
    attention = _psa_block(state)
    trunk = match_hrnet_trunk(state, attention)
    try:
        classes = state["ocr.cls_head.weight"].shape[0]
        mid = state["ocr.conv3x3_ocr.0.weight"].shape[0]
        key = state["ocr.ocr_distri_head.object_context_block.f_pixel.0.weight"].shape[0]
    except KeyError as e:
        raise KeyMappingError(f"the OCR head lacks {e.args[0]}") from None
    kwargs: dict[str, Any] = dict(encoder_name=f"tu-{trunk}", encoder_weights=None,
                                  in_channels=state["backbone.conv1.weight"].shape[1], classes=classes,
                                  decoder_channels=mid, decoder_key_channels=key)
    settings = {"arch": f"{found} (scale_attn.* {'present' if found == 'mscale_ocr' else 'absent'})",
                "encoder": f"{trunk} (every trunk key and shape; PSA block: {attention or 'none'})",
                "classes": f"{classes} (ocr.cls_head)", "ocr widths": f"mid {mid}, key {key} (ocr.conv3x3_ocr, "
                f"f_pixel)"}
    if found == "mscale_ocr":
        kwargs.update(attn_channels=state["scale_attn.conv0.weight"].shape[0],
                      attn_inner_3x3="scale_attn.conv1.weight" in state,
                      inference_scales=None if inference_scales is None else tuple(inference_scales),
                      inference_flip=bool(inference_flip))
        settings["scale attention"] = (f"{kwargs['attn_channels']} wide, inner 3x3 {kwargs['attn_inner_3x3']} "
                                       f"(scale_attn.conv0 / conv1)")
        settings["inference"] = (f"scales {kwargs['inference_scales']}, flip {kwargs['inference_flip']} (not in the "
                                 f"checkpoint: NVIDIA's Cityscapes evaluation uses 0.5, 1.0, 2.0 without flip)")
    return found, kwargs, settings


def _map(state: Mapping[str, Tensor], model: torch.nn.Module) -> tuple[dict[str, Tensor], list[str]]:
    from ..heads.hrnet_ocr import official_ocr_keys
    from ..models.hrnet_psa import official_to_timm_keys

    backbone = {k: v for k, v in state.items() if k.startswith("backbone.")}
    heads = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    try:
        mapped = {f"encoder.model.{k}": v for k, v in official_to_timm_keys(backbone).items()}
        mapped.update(official_ocr_keys(heads, backbone_prefix=None))
    except (KeyError, ValueError) as e:
        raise KeyMappingError(str(e.args[0] if e.args else e)) from None
    own = model.state_dict()
    notes = []
    counters = sorted(k for k in own.keys() - mapped.keys() if k.endswith("num_batches_tracked"))
    if counters:
        for k in counters:
            mapped[k] = torch.zeros_like(own[k])
        notes.append(f"{len(counters)} BN num_batches_tracked counters absent from the checkpoint: set to 0")
    missing, unexpected = sorted(own.keys() - mapped.keys()), sorted(mapped.keys() - own.keys())
    shapes = sorted(f"{k} {tuple(mapped[k].shape)} vs {tuple(own[k].shape)}" for k in own.keys() & mapped.keys()
                    if mapped[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise KeyMappingError(f"the checkpoint does not fill the model: model keys without a value "
                              f"{_names(missing) or '-'}; mapped keys the model lacks {_names(unexpected) or '-'}; "
                              f"shape differences {_names(shapes) or '-'}")
    return mapped, notes


def convert_psa(checkpoint: str | os.PathLike | Mapping, out_dir: str | os.PathLike | None = None, *,
                arch: str | None = None, inference_scales: Sequence[float] | None = (0.5, 1.0, 2.0),
                inference_flip: bool = False, overwrite: bool = False,
                lightning_ckpt: str | os.PathLike | None = None) -> PSAConversion:
    """An NVIDIA semantic-segmentation OCRNet / MscaleOCR checkpoint (DeLightCMU/PSA's HRNetV2-OCR + PSA_p / PSA_s
    included; a path, a loaded dict or a bare state dict) as lit_attn's `hrnet_ocr` / `mscale_ocr` smp model in eval
    mode, every tensor loaded strictly (see the module docstring for what is read from where).

    Args:
        checkpoint: the .pth file or dict.
        out_dir: also write an smp `save_pretrained` folder there (`smp.from_pretrained(out_dir)` after `import
            lit_attn`) plus `psa_conversion.json` (source, settings and where each came from).
        arch: confirm the architecture ("hrnet_ocr" or "mscale_ocr"); a mismatch is an error.
        inference_scales, inference_flip: MscaleOCR's evaluation scales (must contain 1.0; None: the two-scale
            training output) and flip (NVIDIA's --do_flip).
        overwrite: replace a non-empty `out_dir` (and an existing `lightning_ckpt`).
        lightning_ckpt: also write a minimal Lightning checkpoint of `SegmentationTask` (for `lit-attn test
            --ckpt_path`).

    Raises a `ConvertError` subclass (`CorruptCheckpointError`, `NotPSACheckpointError`, `UnsupportedModelError`,
    `KeyMappingError`) whose message says what is wrong.
    """
    import segmentation_models_pytorch as smp

    import lit_attn  # noqa: F401  (registers the architectures and the timm HRNet PSA models)

    if arch is not None and arch not in ARCHS:
        raise UnsupportedModelError(f"arch must be one of {ARCHS}, got {arch!r}")
    if out_dir is not None:
        check_out_dir(Path(out_dir), overwrite)
    if lightning_ckpt is not None and Path(lightning_ckpt).exists() and not overwrite:
        raise ConvertError(f"{lightning_ckpt}: exists; choose another file or pass --overwrite")
    source = "<dict>" if isinstance(checkpoint, Mapping) else os.fspath(checkpoint)
    raw = checkpoint if isinstance(checkpoint, Mapping) else read_checkpoint(checkpoint, source="psa")
    if not isinstance(raw, Mapping):
        raise NotPSACheckpointError(f"{source}: holds a {type(raw).__name__}, not a checkpoint dict")
    state, meta = nvidia_state_dict(raw, source)
    found, kwargs, settings = plan_psa(state, arch=arch, inference_scales=inference_scales,
                                       inference_flip=inference_flip)
    try:
        model = smp.create_model(found, **kwargs)
    except (ValueError, TypeError, KeyError) as e:
        raise UnsupportedModelError(f"cannot build {found} with {kwargs}: {e}") from None
    mapped, notes = _map(state, model)
    model.load_state_dict(mapped, strict=True)
    model.eval()
    conv = PSAConversion(model, found, kwargs, settings, notes, None, len(state), meta)
    report = {"source": source, "architecture": found, "create_model": kwargs, "settings": settings,
              "notes": notes, "tensors": len(state), "checkpoint_meta": meta}
    if out_dir is not None:
        conv.out_dir = save_folder(model, report, REPORT_NAME, Path(out_dir), overwrite)
    if lightning_ckpt is not None:
        save_lightning(model, report, Path(lightning_ckpt))
    return conv
