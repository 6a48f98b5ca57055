"""mmsegmentation checkpoints (0.x and 1.x) as lit_attn's smp architectures.

`convert_mmseg(checkpoint)` reads every width from the state dict (so a full-size zoo checkpoint and a reduced test
one go through the same code), takes what the weights do not hold (output stride, CCNet's recurrence, EMANet's
stages, ...) from the config text in the checkpoint's meta when there is one and from mmseg's defaults otherwise,
builds the matching `smp.create_model(...)`, maps every key, loads strictly and optionally writes a
`save_pretrained` folder. See `lit_attn/convert/__init__.py` for what converts and how.

HRNet OCRNet (`_hrnet_ocr_plan`, `_hrnet_ocr_rules`): mmseg's HRNet keeps the official HRNet's names, as timm's
does, so its backbone keys map one to one onto timm's plain HRNet (found by `nvidia.match_hrnet_trunk`: the timm
HRNet with exactly those keys and shapes); the cascade's FCNHead is NVIDIA's aux_head and the OCRHead its
conv3x3_ocr + OCR block + cls_head (mmseg's ObjectAttentionBlock names mapped as for the ResNet OCRNet). Two things
have no tensor or no match in mmseg: the biases of conv3x3_ocr and of the aux_head's first conv (mmseg's ConvModules
have none: set to 0, noted), and the fuse: mmseg upsamples a lower branch by 2^k and then resizes it to the target
branch, hrnet_ocr resizes once (official HRNetV2); the same numbers for input sides divisible by 32, not otherwise
(the fixture's 33x49 input: max abs logits difference 0.025 at logits std 0.2).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch

from .config import UNKNOWN, mmseg_version, model_config
from .errors import KeyMappingError, UnsupportedModelError
from .loading import MMSegCheckpoint

__all__ = ["ARCH_ALIASES", "ConversionPlan", "DNL_FORMS", "MMSEG_HEADS", "build_plan", "map_state_dict"]

# our architecture -> mmseg decode-head class (the FCN baseline is attnfcn without a block)
MMSEG_HEADS = {
    "danet": "DAHead", "ccnet": "CCHead", "isanet": "ISAHead", "emanet": "EMAHead", "nlnet": "NLHead",
    "dnlnet": "DNLHead", "gcnet": "GCHead", "ocrnet": "OCRHead", "psanet": "PSAHead", "apcnet": "APCHead",
    "ann": "ANNHead", "attnfcn": "FCNHead", "hrnet_ocr": "OCRHead",
}
# --arch also takes mmseg's method names
ARCH_ALIASES = {"fcn": "attnfcn", "nonlocal": "nlnet", "nonlocal_net": "nlnet", "dnl": "dnlnet", "isa": "isanet",
                "ema": "emanet", "gc": "gcnet", "ocr": "ocrnet", "psa": "psanet", "apc": "apcnet", "cc": "ccnet",
                "da": "danet", "annnet": "ann", "ocrnet_hr": "hrnet_ocr", "ocr_hr": "hrnet_ocr"}
# DNL: how conv_out (+BN) meets the two terms. "sum" is the code of every released mmseg (0.6 ... 0.30 and 1.x, read
# in their sources; the dnl_v0 fixture checks 0.30's), so "0.x" and "1.x" both name it; "per_term" is the variant
# that applies conv_out to each term
DNL_FORMS = {"sum": "sum", "0.x": "sum", "1.x": "sum", "per_term": "per_term"}

# decode heads lit_attn does not convert, recognised by their keys (for the error message)
_OTHER_HEADS = (
    ("lateral_convs.", "UPerHead (UPerNet)"), ("c1_bottleneck.", "DepthwiseSeparableASPPHead (DeepLabV3+)"),
    ("aspp_modules.", "ASPPHead (DeepLabV3)"), ("psp_modules.", "PSPHead (PSPNet)"),
    ("scale_heads.", "FPNHead (Semantic FPN)"), ("enc_module.", "EncHead (EncNet)"),
    ("dcm_modules.", "DMHead (DMNet)"), ("hamburger.", "LightHamHead (SegNeXt)"),
    ("linear_fuse.", "SegformerHead (SegFormer)"), ("aspp_conv.", "LRASPPHead (LR-ASPP)"),
    ("up_convs.", "SETRUPHead (SETR)"), ("reassemble_blocks.", "DPTHead (DPT)"),
    ("convs.0.depthwise_conv.", "DepthwiseSeparableFCNHead (Fast-SCNN)"),
)
_STANDARD_PLANES = (64, 128, 256, 512)
_RESNET_DEPTHS = {("bottleneck", (3, 4, 6, 3)): 50, ("bottleneck", (3, 4, 23, 3)): 101,
                  ("bottleneck", (3, 8, 36, 3)): 152, ("basic", (2, 2, 2, 2)): 18, ("basic", (3, 4, 6, 3)): 34}
# (strides, dilations) of mmseg's ResNet for each output stride timm's dilated ResNet reproduces
_STRIDE_PATTERNS = {8: ((1, 2, 1, 1), (1, 1, 2, 4)), 16: ((1, 2, 2, 1), (1, 1, 1, 2)), 32: ((1, 2, 2, 2), (1, 1, 1, 1))}


@dataclass
class ConversionPlan:
    """What `convert_mmseg` builds: `arch` and the `smp.create_model` keyword arguments, and for each setting
    where it came from (`notes`)."""

    arch: str
    create_kwargs: dict[str, Any]
    notes: dict[str, str] = field(default_factory=dict)
    head_type: str = ""
    mmseg_version: str | None = None


# ------------------------------------------------------------------------------------------------ helpers
def _get(cfg: Mapping | None, key: str, default: Any) -> tuple[Any, bool]:
    """(value, from_config): cfg[key] when the config has a known value, else the default."""
    if isinstance(cfg, Mapping) and key in cfg and cfg[key] is not UNKNOWN:
        return cfg[key], True
    return default, False


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise UnsupportedModelError(f"the state dict has no {key!r}, which this head needs")
    return tuple(sd[key].shape)


def _has(sd: Mapping[str, Any], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in sd)


def _sqrt(n: int) -> int | None:
    r = math.isqrt(n)
    return r if r * r == n else None


def _tuple(v: Any) -> Any:
    return tuple(_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v


def _type(cfg: Any) -> str | None:
    t = cfg.get("type") if isinstance(cfg, Mapping) else None
    return t if isinstance(t, str) else None


# ------------------------------------------------------------------------------------------------ detection
def _head_cfgs(mcfg: Mapping | None) -> tuple[Mapping | None, Mapping | None]:
    """(decode head config, auxiliary head config) of the model config; OCRNet's cascade gives (stage 2, stage 1)."""
    if not isinstance(mcfg, Mapping):
        return None, None
    dec, aux = mcfg.get("decode_head"), mcfg.get("auxiliary_head")
    if isinstance(dec, (list, tuple)):
        dec, aux = (dec[-1], dec[0]) if len(dec) == 2 else (None, None)
    return (dec if isinstance(dec, Mapping) else None), (aux if isinstance(aux, Mapping) else None)


def _is_hrnet(sd: Mapping[str, Any]) -> bool:
    return _has(sd, "backbone.stage2.") or _has(sd, "backbone.transition1.")


def detect_arch(sd: Mapping[str, torch.Tensor], mcfg: Mapping | None = None) -> tuple[str, str]:
    """(our architecture, mmseg head class) of an mmseg state dict, from its backbone and decode_head keys; an
    `UnsupportedModelError` naming the head for the heads lit_attn does not convert."""
    if not _is_hrnet(sd):
        return _detect_head(sd, mcfg)
    if _has(sd, "decode_head.1.object_context_block.") and _has(sd, "decode_head.0."):
        return "hrnet_ocr", "OCRHead"
    _, head = _detect_head(sd, mcfg)  # names the head (or refuses it by name)
    raise UnsupportedModelError(f"unsupported model: an mmseg {head} on an HRNet backbone; lit-attn converts HRNet "
                                f"checkpoints of mmseg's OCRNet cascade (FCNHead + OCRHead, e.g. ocrnet_hr18 / hr48) "
                                f"into hrnet_ocr")


def _detect_head(sd: Mapping[str, torch.Tensor], mcfg: Mapping | None) -> tuple[str, str]:
    cfg_type = _type(_head_cfgs(mcfg)[0])
    if _has(sd, "decode_head.1.") and _has(sd, "decode_head.0."):
        head = "decode_head.1."
        if _has(sd, head + "object_context_block."):
            return "ocrnet", "OCRHead"
        return _unsupported(cfg_type, "a cascade (CascadeEncoderDecoder) whose second stage is not an OCRHead")
    checks = (("pam.", "danet"), ("cca.", "ccnet"), ("global_relation.", "isanet"), ("ema_module.", "emanet"),
              ("dnl_block.", "dnlnet"), ("nl_block.", "nlnet"), ("gc_block.", "gcnet"), ("acm_modules.", "apcnet"),
              ("fusion.stages.", "ann"))
    for prefix, arch in checks:
        if _has(sd, "decode_head." + prefix):
            return arch, MMSEG_HEADS[arch]
    if _has(sd, "decode_head.attention.") and _has(sd, "decode_head.reduce."):
        return "psanet", "PSAHead"
    for prefix, name in _OTHER_HEADS:
        if _has(sd, "decode_head." + prefix):
            return _unsupported(cfg_type, f"an mmseg {name}")
    own = {k[len("decode_head."):].split(".")[0] for k in sd if k.startswith("decode_head.")}
    if own <= {"convs", "conv_cat", "conv_seg"} and "conv_seg" in own and "convs" in own:
        return "attnfcn", "FCNHead"
    return _unsupported(cfg_type, "a decode head with the submodules " + ", ".join(sorted(own)))


def _unsupported(cfg_type: str | None, what: str) -> NoReturn:
    named = f" (config: type={cfg_type!r})" if cfg_type else ""
    supported = ", ".join(f"{h} ({a})" for a, h in MMSEG_HEADS.items())
    raise UnsupportedModelError(f"unsupported decode head: the checkpoint holds {what}{named}; lit-attn converts "
                                f"mmseg's {supported}")


def _encoder(sd: Mapping[str, torch.Tensor], mcfg: Mapping | None, output_stride: int | None
             ) -> tuple[dict[str, Any], dict[str, str], str]:
    """smp encoder kwargs (encoder_name, in_channels, encoder_output_stride, timm's stem_width / channels), the
    notes, and the stem kind ("deep" or "plain")."""
    notes: dict[str, str] = {}
    bcfg = mcfg.get("backbone") if isinstance(mcfg, Mapping) else None
    btype = _type(bcfg)
    if btype is not None and btype not in ("ResNetV1c", "ResNet"):
        raise UnsupportedModelError(f"unsupported backbone: config type={btype!r}; lit-attn converts mmseg's "
                                    f"ResNetV1c (R-xx-D8, timm resnet*c) and ResNet (timm resnet*)")
    if _has(sd, "neck."):
        raise UnsupportedModelError("unsupported model: the checkpoint has a neck (neck.* weights); lit-attn's "
                                    "architectures put the head directly on the backbone")
    if "backbone.stem.0.weight" in sd:
        stem = "deep"
        if _has(sd, "backbone.layer1.0.downsample.2."):
            raise UnsupportedModelError("unsupported backbone: ResNetV1d (average-pool shortcut); lit-attn converts "
                                        "ResNetV1c and ResNet")
        half, in_ch = _shape(sd, "backbone.stem.0.weight")[:2]
        full = _shape(sd, "backbone.stem.6.weight")[0]
        if full != 2 * half or _shape(sd, "backbone.stem.3.weight")[:2] != (half, half):
            raise UnsupportedModelError(f"unsupported backbone: deep stem widths {half}, {half}, {full} (timm's deep "
                                        f"stem is w, w, 2w)")
    elif "backbone.conv1.weight" in sd:
        stem = "plain"
        full, in_ch = _shape(sd, "backbone.conv1.weight")[:2]
        half = None
        if full != 64:
            raise UnsupportedModelError(f"unsupported backbone: a 7x7 stem with {full} channels (timm's ResNet has 64)")
    else:
        found = sorted({".".join(k.split(".")[:2]) for k in sd if k.startswith("backbone.")})[:6]
        raise UnsupportedModelError(f"unsupported backbone: not an mmseg ResNet / ResNetV1c (backbone keys "
                                    f"{', '.join(found)}, ...); lit-attn converts ResNetV1c and ResNet")
    blocks, planes = [], []
    bottleneck = "backbone.layer1.0.conv3.weight" in sd
    for i in range(1, 5):
        idx = {int(m.group(1)) for k in sd if (m := re.match(rf"backbone\.layer{i}\.(\d+)\.conv1\.weight$", k))}
        if not idx or idx != set(range(len(idx))):
            raise UnsupportedModelError(f"unsupported backbone: layer{i} blocks {sorted(idx)} (a 4-stage ResNet "
                                        f"expected)")
        blocks.append(len(idx))
        w1 = _shape(sd, f"backbone.layer{i}.0.conv1.weight")
        w2 = _shape(sd, f"backbone.layer{i}.0.conv2.weight")
        if w2[1] != (w1[0] if bottleneck else w2[0]) or w2[2:] != (3, 3):
            raise UnsupportedModelError(f"unsupported backbone: layer{i}.0.conv2 of shape {w2} (grouped or "
                                        f"widened convs: ResNeXt / Res2Net?)")
        planes.append(w1[0] if bottleneck else w2[0])
    if _has(sd, "backbone.layer5."):
        raise UnsupportedModelError("unsupported backbone: more than 4 stages")
    kind = "bottleneck" if bottleneck else "basic"
    depth = _RESNET_DEPTHS.get((kind, tuple(blocks)))
    if depth is None:
        raise UnsupportedModelError(f"unsupported backbone: a ResNet with {kind} blocks {tuple(blocks)} (lit-attn "
                                    f"converts depths 18, 34, 50, 101, 152)")
    import timm

    kwargs: dict[str, Any] = {"in_channels": in_ch}
    if stem == "deep" and f"resnet{depth}c" in timm.list_models(f"resnet{depth}c"):
        kwargs["encoder_name"] = f"tu-resnet{depth}c"
        if half != 32:
            kwargs["stem_width"] = half
    elif stem == "deep":  # ResNetV1c-18/34: timm's resnet18/34 with the deep stem
        kwargs.update(encoder_name=f"tu-resnet{depth}", stem_type="deep", stem_width=half)
    else:
        kwargs["encoder_name"] = f"tu-resnet{depth}"
    if tuple(planes) != _STANDARD_PLANES:
        kwargs["channels"] = tuple(planes)
    notes["encoder"] = (f"{kwargs['encoder_name']} (mmseg {'ResNetV1c' if stem == 'deep' else 'ResNet'}-{depth}: "
                        f"blocks {tuple(blocks)}, stem {'deep ' + str(full) if stem == 'deep' else str(full)}, "
                        f"stage widths {tuple(planes)}, from the state dict)")
    kwargs["encoder_output_stride"], notes["output_stride"] = _output_stride(bcfg, output_stride)
    return kwargs, notes, stem


def _output_stride(bcfg: Mapping | None, override: int | None) -> tuple[int, str]:
    strides, s_known = _get(bcfg, "strides", None)
    dilations, d_known = _get(bcfg, "dilations", None)
    from_cfg = None
    if s_known or d_known:
        strides = _tuple(strides) if s_known else (1, 2, 2, 2)
        dilations = _tuple(dilations) if d_known else (1, 1, 1, 1)
        match = [os_ for os_, pat in _STRIDE_PATTERNS.items() if pat == (strides, dilations)]
        if not match:
            raise UnsupportedModelError(
                f"unsupported backbone: strides={strides}, dilations={dilations}; timm's dilated ResNet reproduces "
                + "; ".join(f"output stride {o}: strides={s}, dilations={d}" for o, (s, d) in _STRIDE_PATTERNS.items()))
        from_cfg = match[0]
        contract, c_known = _get(bcfg, "contract_dilation", False)
        if from_cfg != 32 and not contract:
            raise UnsupportedModelError(
                "unsupported backbone: contract_dilation=False" + ("" if c_known else " (mmseg's default)")
                + " dilates the first block of each dilated stage fully; timm's dilated ResNet (and mmseg's D8/D16 "
                "configs, contract_dilation=True) use the previous stage's dilation there")
        multi_grid, _ = _get(bcfg, "multi_grid", None)
        if multi_grid is not None:
            raise UnsupportedModelError(f"unsupported backbone: multi_grid={multi_grid} (timm's ResNet has no "
                                        f"multi-grid)")
        style, _ = _get(bcfg, "style", "pytorch")
        if style != "pytorch":
            raise UnsupportedModelError(f"unsupported backbone: style={style!r} (stride on the 1x1 conv); timm's "
                                        f"ResNet strides the 3x3 conv (mmseg's style='pytorch')")
    if override is not None:
        if override not in _STRIDE_PATTERNS:
            raise UnsupportedModelError(f"output stride must be one of {tuple(_STRIDE_PATTERNS)}, got {override!r}")
        note = "--output-stride"
        if from_cfg is not None and from_cfg != override:
            note += f" (overrides the config's {from_cfg}: the weights are the same, the maps are not)"
        return override, note
    if from_cfg is not None:
        return from_cfg, f"config: strides={strides}, dilations={dilations}"
    return 8, "default: mmseg's D8 (strides (1, 2, 1, 1), dilations (1, 1, 2, 4)); the meta holds no config"


def _dnl_form(dnl_form: str | None, meta: Mapping[str, Any]) -> tuple[str, str]:
    version, where = mmseg_version(meta)
    if dnl_form is not None:
        if dnl_form not in DNL_FORMS:
            raise UnsupportedModelError(f"--dnl-form must be one of {', '.join(DNL_FORMS)}, got {dnl_form!r}")
        return DNL_FORMS[dnl_form], f"--dnl-form {dnl_form}"
    return "sum", (f"'sum' (conv_out on pairwise + unary): the code of every released mmseg, 0.6 to 0.30 and 1.x, "
                   f"so of this checkpoint's ({where}: {version or 'unknown'}); --dnl-form per_term for the "
                   f"variant with conv_out on each term")


# --------------------------------------------------------------------------------------------- head settings
def _head_settings(arch: str, sd: Mapping[str, torch.Tensor], hcfg: Mapping | None, meta: Mapping[str, Any],
                   dnl_form: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """decoder_kwargs of our head and the notes on where each value came from."""
    p = "decode_head.1." if arch == "ocrnet" else "decode_head."
    channels = _shape(sd, p + "conv_seg.weight")[1]
    kw: dict[str, Any] = {}
    notes: dict[str, str] = {}

    def cfg(key: str, default: Any, name: str | None = None) -> Any:
        value, known = _get(hcfg, key, default)
        value = _tuple(value)
        notes[name or key] = f"{value!r} ({'config' if known else 'mmseg default; not in the weights'})"
        return value

    def weights(name: str, value: Any, how: str) -> Any:
        notes[name] = f"{value!r} (state dict: {how})"
        return value

    if arch == "danet":
        kw["pam_channels"] = weights("pam_channels", _shape(sd, p + "pam.key_project.weight")[0], "pam.key_project")
    elif arch == "ccnet":
        q = _shape(sd, p + "cca.query_conv.weight")[0]
        if q != channels // 8:
            raise UnsupportedModelError(f"CCHead: query_conv has {q} channels, mmcv's CrissCrossAttention has "
                                        f"channels // 8 = {channels // 8}")
        kw["recurrence"] = cfg("recurrence", 2)
    elif arch == "isanet":
        kw["isa_channels"] = weights("isa_channels", _shape(sd, p + "global_relation.key_project.0.conv.weight")[0],
                                     "global_relation.key_project.0")
        kw["down_factor"] = cfg("down_factor", (8, 8))
    elif arch == "emanet":
        bases = _shape(sd, p + "ema_module.bases")
        kw["ema_channels"] = weights("ema_channels", _shape(sd, p + "ema_in_conv.conv.weight")[0], "ema_in_conv")
        kw["num_bases"] = weights("num_bases", bases[-1], "ema_module.bases")
        kw["num_stages"] = cfg("num_stages", 3)
        kw["momentum"] = cfg("momentum", 0.1)
        kw["concat_input"] = weights("concat_input", _has(sd, p + "conv_cat."), "conv_cat present")
    elif arch in ("nlnet", "dnlnet"):
        block = p + ("nl_block." if arch == "nlnet" else "dnl_block.")
        inter = _shape(sd, block + "g.conv.weight")[0]
        reduction = channels // inter
        if reduction < 1 or channels // reduction != inter:
            raise UnsupportedModelError(f"{MMSEG_HEADS[arch]}: g has {inter} channels, not channels // reduction "
                                        f"for any reduction (channels {channels})")
        kw["reduction"] = weights("reduction", reduction, f"{channels} // {inter}")
        kw["use_scale"] = cfg("use_scale", True)
        default_mode = "embedded_gaussian"
        if arch == "nlnet" and not _has(sd, block + "theta."):
            default_mode = "gaussian"
        elif arch == "nlnet" and _has(sd, block + "concat_project."):
            default_mode = "concatenation"
        kw["mode"] = cfg("mode", default_mode)
        if arch == "dnlnet":
            kw["temperature"] = cfg("temperature", 0.05)
            kw["conv_out_form"], notes["conv_out_form"] = _dnl_form(dnl_form, meta)
        if _get(hcfg, "sub_sample", False)[0]:
            raise UnsupportedModelError(f"{MMSEG_HEADS[arch]}: sub_sample=True is not supported")
    elif arch == "gcnet":
        fusion = tuple(f for f in ("channel_add", "channel_mul") if _has(sd, f"{p}gc_block.{f}_conv."))
        planes = _shape(sd, f"{p}gc_block.{fusion[0]}_conv.0.weight")[0] if fusion else 0
        ratio = planes / channels
        if int(channels * ratio) != planes:
            ratio = (planes + 0.5) / channels
        kw["ratio"] = weights("ratio", ratio, f"{planes} / {channels}")
        kw["pooling_type"] = weights("pooling_type", "att" if _has(sd, p + "gc_block.conv_mask.") else "avg",
                                     "conv_mask present")
        kw["fusion_types"] = weights("fusion_types", fusion, "channel_*_conv present")
    elif arch == "ocrnet":
        kw["ocr_channels"] = weights("ocr_channels",
                                     _shape(sd, p + "object_context_block.query_project.0.conv.weight")[0],
                                     "object_context_block.query_project.0")
        scale = cfg("scale", 1)
        if scale != 1:
            raise UnsupportedModelError(f"OCRHead: scale={scale} (mmseg's scale > 1 path returns its input, a bug "
                                        f"OCRHead here does not reproduce)")
    elif arch == "psanet":
        n = _shape(sd, p + "attention.1.weight")[0]
        side = _sqrt(n)
        mask, known = _get(hcfg, "mask_size", None)
        if known:
            mask = _tuple(mask)
            mask = (mask, mask) if isinstance(mask, int) else mask
            if mask[0] * mask[1] != n:
                raise KeyMappingError(f"PSAHead: config mask_size={mask} but attention.1 predicts {n} channels")
            notes["mask_size"] = f"{mask!r} (config)"
        elif side is None:
            raise UnsupportedModelError(f"PSAHead: {n} mask channels is not a square mask and the meta holds no "
                                        f"config; pass decoder_kwargs={{'mask_size': [h, w]}}")
        else:
            mask = (side, side)
            notes["mask_size"] = f"{mask!r} (state dict: sqrt of {n} mask channels)"
        kw["mask_size"] = mask
        if _has(sd, p + "reduce_p."):
            kw["psa_type"] = weights("psa_type", "bi-direction", "reduce_p present")
        else:
            psa_type, known = _get(hcfg, "psa_type", None)
            if not known or psa_type == "bi-direction":
                raise UnsupportedModelError("PSAHead: one branch only (no reduce_p): psa_type 'collect' or "
                                            "'distribute' cannot be told from the weights and the meta holds no "
                                            "config; pass decoder_kwargs={'psa_type': ...}")
            kw["psa_type"] = psa_type
            notes["psa_type"] = f"{psa_type!r} (config)"
        if _get(hcfg, "compact", False)[0]:
            raise UnsupportedModelError("PSAHead: compact=True is not supported")
        kw["shrink_factor"] = cfg("shrink_factor", 2)
        kw["normalization_factor"] = cfg("normalization_factor", 1.0)
        kw["psa_softmax"] = cfg("psa_softmax", True)
    elif arch == "apcnet":
        n_acm = len({k.split(".")[2] for k in sd if k.startswith(p + "acm_modules.")})
        scales = []
        for i in range(n_acm):
            s = _sqrt(_shape(sd, f"{p}acm_modules.{i}.gla.weight")[0])
            if s is None:
                raise UnsupportedModelError(f"APCHead: acm_modules.{i}.gla is not pool_scale ** 2 wide")
            scales.append(s)
        kw["pool_scales"] = weights("pool_scales", tuple(scales), "sqrt of each acm_modules.i.gla width")
        kw["fusion"] = weights("fusion", _has(sd, p + "acm_modules.0.fusion_conv."), "fusion_conv present")
    elif arch == "ann":
        stages = {k.split(".")[3] for k in sd if k.startswith(p + "fusion.stages.")}
        if stages != {"0"}:
            raise UnsupportedModelError(f"ANNHead: {len(stages)} query scales; only query_scales=(1,) is supported")
        width = _shape(sd, p + "fusion.stages.0.key_project.conv.weight")[0]
        kw["project_channels"] = weights("project_channels", width, "fusion.stages.0.key_project")
        kw["key_pool_scales"] = cfg("key_pool_scales", (1, 3, 6, 8))
        qs = cfg("query_scales", (1,))
        if tuple(qs) != (1,):
            raise UnsupportedModelError(f"ANNHead: query_scales={qs}; only (1,) is supported")
        notes.pop("query_scales", None)
    elif arch == "attnfcn":
        convs = {k.split(".")[2] for k in sd if k.startswith(p + "convs.")}
        if convs != {"0", "1"} or not _has(sd, p + "conv_cat."):
            raise UnsupportedModelError(f"FCNHead with num_convs={len(convs)}, concat_input="
                                        f"{_has(sd, p + 'conv_cat.')}: lit-attn's FCN baseline (attnfcn without a "
                                        f"block) is mmseg's FCN-D8 head, num_convs=2 with concat_input=True")
        k = _shape(sd, p + "convs.0.conv.weight")[-1]
        if k != 3:
            kw["kernel_size"] = weights("kernel_size", k, "convs.0")
        dil = cfg("dilation", 1)
        if dil != 1:
            kw["dilation"] = dil
    return kw, notes


def _check_head_cfg(hcfg: Mapping | None, what: str) -> None:
    """Config values our heads cannot follow: align_corners=True, a norm other than BN, an act other than ReLU."""
    if not isinstance(hcfg, Mapping):
        return
    if _get(hcfg, "align_corners", False)[0]:
        raise UnsupportedModelError(f"{what}: align_corners=True; lit-attn's models resize with align_corners=False")
    norm = _type(hcfg.get("norm_cfg"))
    if norm is not None and norm not in ("BN", "SyncBN", "BN2d"):
        raise UnsupportedModelError(f"{what}: norm_cfg type={norm!r}; the conversion supports BN / SyncBN heads")
    act = hcfg.get("act_cfg")
    if isinstance(act, Mapping) and _type(act) not in (None, "ReLU"):
        raise UnsupportedModelError(f"{what}: act_cfg type={_type(act)!r}; the conversion supports ReLU heads")


def build_plan(ckpt: MMSegCheckpoint, arch: str | None = None, dnl_form: str | None = None,
               output_stride: int | None = None, decoder_kwargs: Mapping[str, Any] | None = None) -> ConversionPlan:
    """Detect the architecture and read every setting (see the module docstring)."""
    sd, meta = ckpt.state_dict, ckpt.meta
    mcfg = model_config(meta)
    detected, head_type = detect_arch(sd, mcfg)
    if arch is not None:
        wanted = ARCH_ALIASES.get(arch, arch)
        if wanted not in MMSEG_HEADS:
            raise UnsupportedModelError(f"--arch {arch!r}: lit-attn converts to "
                                        f"{', '.join(MMSEG_HEADS)} (or mmseg's names {', '.join(ARCH_ALIASES)})")
        if wanted != detected:
            hint = (" (OCRHead on a ResNet is ocrnet, the OCRNet cascade on an HRNet hrnet_ocr)"
                    if {wanted, detected} == {"ocrnet", "hrnet_ocr"} else "")
            raise UnsupportedModelError(f"--arch {arch} (mmseg {MMSEG_HEADS[wanted]}), but the checkpoint holds an "
                                        f"mmseg {head_type} ({detected}){hint}")
    if detected != "dnlnet" and dnl_form is not None:
        raise UnsupportedModelError(f"--dnl-form applies to DNLNet checkpoints; this one is {detected}")
    hcfg, acfg = _head_cfgs(mcfg)
    cfg_type = _type(hcfg)
    if cfg_type is not None and cfg_type != head_type:
        raise UnsupportedModelError(f"the config names decode head {cfg_type!r} but the weights are an {head_type}")
    _check_head_cfg(hcfg, head_type)
    _check_head_cfg(acfg, "auxiliary head")
    if detected == "hrnet_ocr":
        return _hrnet_ocr_plan(ckpt, mcfg, output_stride, decoder_kwargs)
    enc_kwargs, notes, _ = _encoder(sd, mcfg, output_stride)
    p = "decode_head.1." if detected == "ocrnet" else "decode_head."
    classes, channels = _shape(sd, p + "conv_seg.weight")[:2]
    head_kwargs, head_notes = _head_settings(detected, sd, hcfg, meta, dnl_form)
    if decoder_kwargs:
        head_kwargs.update(decoder_kwargs)
        head_notes.update({k: f"{v!r} (decoder_kwargs)" for k, v in decoder_kwargs.items()})
    aux = "decode_head.0." if detected == "ocrnet" else "auxiliary_head."
    kwargs: dict[str, Any] = {**enc_kwargs, "encoder_weights": None, "classes": classes,
                              "decoder_channels": channels}
    dropout, known = _get(hcfg, "dropout_ratio", 0.1)
    kwargs["decoder_dropout"] = float(dropout)
    if _has(sd, aux):
        aux_convs = {m.group(1) for k in sd if (m := re.match(re.escape(aux) + r"convs\.(\d+)\.", k))}
        if aux_convs != {"0"} or _has(sd, aux + "conv_cat."):
            raise UnsupportedModelError(f"auxiliary FCNHead with num_convs={len(aux_convs)}"
                                        f"{', concat_input=True' if _has(sd, aux + 'conv_cat.') else ''}; lit-attn's "
                                        f"auxiliary head is mmseg's num_convs=1, concat_input=False")
        aux_classes, aux_channels = _shape(sd, aux + "conv_seg.weight")[:2]
        if aux_classes != classes:
            raise UnsupportedModelError(f"the auxiliary head predicts {aux_classes} classes, the decode head {classes}")
        kwargs.update(aux_head=True, aux_channels=aux_channels)
        notes["aux_head"] = f"FCNHead({aux_channels} channels) (state dict)"
    else:
        kwargs["aux_head"] = False
        notes["aux_head"] = "none in the checkpoint"
    if head_kwargs:
        kwargs["decoder_kwargs"] = head_kwargs
    if detected == "attnfcn":
        kwargs["attention"] = None
    notes.update({"classes": f"{classes} (state dict: conv_seg)", "decoder_channels": f"{channels} (state dict: "
                  f"conv_seg)", "decoder_dropout": f"{dropout} ({'config' if known else 'mmseg default'})"})
    notes.update({f"decoder_kwargs.{k}": v for k, v in head_notes.items()})
    _test_cfg_note(mcfg, notes)
    version, _ = mmseg_version(meta)
    return ConversionPlan(detected, kwargs, notes, head_type, version)


def _test_cfg_note(mcfg: Mapping | None, notes: dict[str, str]) -> None:
    test_cfg = mcfg.get("test_cfg") if isinstance(mcfg, Mapping) else None
    if isinstance(test_cfg, Mapping) and test_cfg.get("mode") not in (None, UNKNOWN):
        shown = ", ".join(f"{k}={_tuple(v)!r}" for k, v in test_cfg.items() if v is not UNKNOWN)
        notes["mmseg_test_cfg"] = f"{shown} (config; SegmentationTask test_mode / test_crop_size / test_stride)"


# ------------------------------------------------------------------------------------------- HRNet OCRNet
_FUSE_NOTE = ("bilinear to the target branch's size (the official HRNetV2 fuse, lit_attn's use_official_fuse); "
              "mmseg's HRModule upsamples bilinearly by 2^k, then resizes to the target size: identical when the "
              "input's sides are multiples of 32 (e.g. Cityscapes 1024x2048 whole-image), slightly different "
              "otherwise (e.g. ADE20K's resized images)")


def _hrnet_ocr_plan(ckpt: MMSegCheckpoint, mcfg: Mapping | None, output_stride: int | None,
                    decoder_kwargs: Mapping[str, Any] | None) -> ConversionPlan:
    """mmseg's CascadeEncoderDecoder on its HRNet (FCNHead -> OCRHead) as hrnet_ocr on timm's plain HRNet: the
    trunk is the timm HRNet with exactly the checkpoint's backbone keys and shapes; stage 1 is NVIDIA's aux_head,
    stage 2 its conv3x3_ocr + ocr block + cls_head."""
    from timm.models import hrnet as timm_hrnet

    from ..models.hrnet_psa import TRUNK_MODULES
    from .nvidia import match_hrnet_trunk

    sd, meta = ckpt.state_dict, ckpt.meta
    hcfg, acfg = _head_cfgs(mcfg)
    bcfg = mcfg.get("backbone") if isinstance(mcfg, Mapping) else None
    if _type(bcfg) not in (None, "HRNet"):
        raise UnsupportedModelError(f"unsupported backbone: config type={_type(bcfg)!r} with HRNet keys")
    for bad, why in (("neck.", "a neck (neck.* weights)"), ("auxiliary_head.", "an auxiliary_head besides the "
                     "cascade (hrnet_ocr's auxiliary output is the cascade's stage 1)")):
        if _has(sd, bad):
            raise UnsupportedModelError(f"unsupported model: the HRNet OCRNet checkpoint has {why}")
    if output_stride not in (None, 32):
        raise UnsupportedModelError(f"--output-stride {output_stride}: HRNet keeps its four branches at strides "
                                    f"4-32; hrnet_ocr on a timm HRNet runs at output stride 32 only")
    if decoder_kwargs:
        raise UnsupportedModelError("decoder_kwargs do not apply to hrnet_ocr (every setting is read from the "
                                    "checkpoint)")
    if isinstance(bcfg, Mapping):
        for key, ok, why in (("multiscale_output", True, "four output branches"),
                             ("conv_cfg", None, "plain Conv2d layers")):
            value, known = _get(bcfg, key, ok)
            if known and value != ok:
                raise UnsupportedModelError(f"unsupported backbone: HRNet {key}={value!r}; hrnet_ocr needs {why}")
        norm = _type(bcfg.get("norm_cfg"))
        if norm not in (None, "BN", "SyncBN", "BN2d"):
            raise UnsupportedModelError(f"unsupported backbone: HRNet norm_cfg type={norm!r} (BN / SyncBN only)")
    backbone = {k: v for k, v in sd.items() if k.startswith("backbone.") and k.split(".")[1] in TRUNK_MODULES}
    trunk = match_hrnet_trunk(backbone, None)
    stage4 = timm_hrnet.cfg_cls[trunk]["stage4"]
    expansion = timm_hrnet.block_types_dict[stage4["block_type"]].expansion
    branches = tuple(c * expansion for c in stage4["num_channels"])
    total = sum(branches)
    a, p = "decode_head.0.", "decode_head.1."
    stage1 = {k[len(a):].rsplit(".", 1)[0] for k in sd if k.startswith(a)}
    if stage1 - {"convs.0.conv", "convs.0.bn", "conv_seg"}:
        raise UnsupportedModelError(f"decode_head.0 has {', '.join(sorted(stage1))}: hrnet_ocr's aux_head is mmseg's "
                                    f"FCNHead with num_convs=1, concat_input=False (convs.0, conv_seg)")
    w0 = _shape(sd, a + "convs.0.conv.weight")
    if w0 != (total, total, 1, 1):
        raise UnsupportedModelError(f"decode_head.0.convs.0 has shape {w0}; hrnet_ocr's aux_head (NVIDIA's) is a 1x1 "
                                    f"conv from the {total} concatenated branch channels to {total} (mmseg FCNHead "
                                    f"kernel_size=1, channels=sum(in_channels))")
    mid, cat = _shape(sd, p + "bottleneck.conv.weight")[:2]
    classes = _shape(sd, p + "conv_seg.weight")[0]
    aux_classes = _shape(sd, a + "conv_seg.weight")[0]
    if cat != total or aux_classes != classes:
        raise UnsupportedModelError(f"decode_head.1.bottleneck takes {cat} channels and predicts {classes} classes, "
                                    f"decode_head.0 {aux_classes}; hrnet_ocr needs the {total} branch channels of "
                                    f"{trunk} and the same classes in both stages")
    for what, c in (("decode_head.0 (FCNHead)", acfg), ("decode_head.1 (OCRHead)", hcfg)):
        transform, known = _get(c, "input_transform", "resize_concat")
        index = _tuple(_get(c, "in_index", (0, 1, 2, 3))[0])
        if (known and transform != "resize_concat") or index != (0, 1, 2, 3):
            raise UnsupportedModelError(f"{what}: input_transform={transform!r}, in_index={index!r}; "
                                        f"hrnet_ocr's heads read the four branches resized and concatenated "
                                        f"('resize_concat', in_index (0, 1, 2, 3))")
    drop1, _ = _get(acfg, "dropout_ratio", -1)
    if drop1 > 0:
        raise UnsupportedModelError(f"decode_head.0 (FCNHead) dropout_ratio={drop1}: hrnet_ocr's aux_head (NVIDIA's) "
                                    f"has no dropout (the same in eval mode, not in training; mmseg's HRNet OCRNet "
                                    f"configs use -1)")
    drop, drop_known = _get(hcfg, "dropout_ratio", -1)
    head_kwargs, head_notes = _head_settings("ocrnet", sd, hcfg, meta, None)  # ocr_channels; refuses scale != 1
    kwargs: dict[str, Any] = {"encoder_name": f"tu-{trunk}", "encoder_weights": None,
                              "in_channels": _shape(sd, "backbone.conv1.weight")[1], "classes": classes,
                              "decoder_channels": mid, "decoder_key_channels": head_kwargs["ocr_channels"],
                              "decoder_dropout": max(float(drop), 0.0)}
    notes = {"encoder": f"tu-{trunk} (every mmseg HRNet backbone key and shape equals timm's {trunk}; raw branches "
                        f"{branches}, feature_location='')",
             "output_stride": "32 (HRNet)", "fuse": _FUSE_NOTE,
             "classes": f"{classes} (state dict: decode_head.1.conv_seg)",
             "decoder_channels": f"{mid} (state dict: decode_head.1.bottleneck, mmseg's OCRHead channels)",
             "decoder_key_channels": f"{head_notes['ocr_channels']} (mmseg's ocr_channels)",
             "decoder_dropout": f"{kwargs['decoder_dropout']} (dropout_ratio={drop}: "
                                f"{'config' if drop_known else 'the value of mmseg HRNet OCRNet configs'}; mmseg's "
                                f"Dropout2d before conv_seg = hrnet_ocr's before cls_head)",
             "aux_head": f"decode_head.0 (FCNHead 1x1, {total} -> {total} -> {classes}) = hrnet_ocr's aux_head"}
    if "scale" in head_notes:
        notes["decoder_kwargs.scale"] = head_notes["scale"]
    _test_cfg_note(mcfg, notes)
    version, _ = mmseg_version(meta)
    return ConversionPlan("hrnet_ocr", kwargs, notes, "OCRHead", version)


# ------------------------------------------------------------------------------------------------ key mapping
Rule = tuple[str, str, bool]  # (regex on the mmseg key, replacement, reshape allowed)


def _fcn_rules(src: str, dst: str) -> list[Rule]:
    return [(rf"^{src}((?:convs\.[01]|conv_cat|conv_seg)\..*)$", rf"{dst}\1", False)]


def _conv_module_rules(src: str, conv_dst: str, bn_dst: str) -> list[Rule]:
    """An mmcv ConvModule `src` (regex prefix, without the trailing dot): `src.conv.*` -> `conv_dst.*`,
    `src.bn.*` -> `bn_dst.*`."""
    return [(rf"^{src}\.conv\.(.*)$", rf"{conv_dst}.\1", False), (rf"^{src}\.bn\.(.*)$", rf"{bn_dst}.\1", False)]


def _sa_rules(src: str, dst: str, value_module: bool) -> list[Rule]:
    """mmseg's SelfAttentionBlock with 2-layer key/query ConvModules -> lit_attn's f_query / f_key / f_value / W."""
    rules = []
    for mm, ours in (("query", "f_query"), ("key", "f_key")):
        rules += [*_conv_module_rules(rf"{src}{mm}_project\.0", f"{dst}{ours}.0", f"{dst}{ours}.1.0"),
                  *_conv_module_rules(rf"{src}{mm}_project\.1", f"{dst}{ours}.2", f"{dst}{ours}.3.0")]
    if value_module:  # a ConvModule (OCR)
        rules += _conv_module_rules(rf"{src}value_project", f"{dst}f_value.0", f"{dst}f_value.1.0")
    else:  # a plain conv with bias (ISA)
        rules += [(rf"^{src}value_project\.(weight|bias)$", rf"{dst}f_value.\1", False)]
    return rules


def _ocr_block_rules() -> list[Rule]:
    """mmseg's OCRHead ObjectAttentionBlock -> lit_attn's `ocr` block (ObjectContextBlock) at `decoder.ocr.`."""
    b, o = r"decode_head\.1\.object_context_block\.", "decoder.ocr."
    return [*_sa_rules(b, o + "object_context_block.", value_module=True),
            *_conv_module_rules(rf"{b}out_project", o + "object_context_block.W.0", o + "object_context_block.W.1.0"),
            *_conv_module_rules(rf"{b}bottleneck", o + "conv_bn_dropout.0", o + "conv_bn_dropout.1.0")]


def _hrnet_ocr_rules() -> list[Rule]:
    """mmseg HRNet (the official HRNet's names, as timm's) + FCNHead stage 1 (NVIDIA's aux_head) + OCRHead
    (conv3x3_ocr, the ocr block, cls_head)."""
    from ..models.hrnet_psa import TRUNK_MODULES

    return [(rf"^backbone\.((?:{'|'.join(TRUNK_MODULES)})\..*)$", r"encoder.model.\1", False),
            *_conv_module_rules(r"decode_head\.0\.convs\.0", "decoder.aux_head.0", "decoder.aux_head.1.0"),
            (r"^decode_head\.0\.conv_seg\.(.*)$", r"decoder.aux_head.2.\1", False),
            *_conv_module_rules(r"decode_head\.1\.bottleneck", "decoder.conv3x3_ocr.0", "decoder.conv3x3_ocr.1.0"),
            (r"^decode_head\.1\.conv_seg\.(.*)$", r"decoder.cls_head.\1", False),
            *_ocr_block_rules()]


def _rules(arch: str, stem: str) -> list[Rule]:
    if arch == "hrnet_ocr":
        return _hrnet_ocr_rules()
    rules: list[Rule] = [(r"^backbone\.(layer[1-4]\..*)$", r"encoder.model.\1", False)]
    if stem == "deep":
        rules += [(r"^backbone\.stem\.7\.(.*)$", r"encoder.model.bn1.\1", False),
                  (r"^backbone\.stem\.([0-6])\.(.*)$", r"encoder.model.conv1.\1.\2", False)]
    else:
        rules += [(r"^backbone\.(conv1|bn1)\.(.*)$", r"encoder.model.\1.\2", False)]
    d, o = "decode_head.", "decoder."
    if arch == "ocrnet":
        rules += [(r"^decode_head\.0\.((?:convs\.0|conv_seg)\..*)$", r"auxiliary_head.\1", False),
                  (r"^decode_head\.1\.((?:bottleneck|conv_seg)\..*)$", r"decoder.\1", False),
                  *_ocr_block_rules()]
        return rules
    rules.append((r"^auxiliary_head\.((?:convs\.0|conv_seg)\..*)$", r"auxiliary_head.\1", False))
    d = re.escape(d)
    if arch == "danet":
        rules += [(rf"^{d}pam\.(key|query|value)_project\.(.*)$", r"decoder.pam.\1_conv.\2", False),
                  (rf"^{d}(pam|cam)\.gamma(?:\.scale)?$", r"decoder.\1.gamma", True),  # mmcv Scale (0-d)
                  (rf"^{d}((?:pam_in_conv|pam_out_conv|cam_in_conv|cam_out_conv|pam_conv_seg|cam_conv_seg|conv_seg)"
                   rf"\..*)$", r"decoder.\1", False)]
    elif arch == "ccnet":
        rules += [(rf"^{d}cca\.gamma(?:\.scale)?$", r"decoder.attn.gamma", True),  # Scale, or a (1,) Parameter
                  (rf"^{d}cca\.((?:query_conv|key_conv|value_conv)\..*)$", r"decoder.attn.\1", False),
                  *_fcn_rules(d, o)]
    elif arch == "isanet":
        for mm, ours in (("global_relation", "long_range_sa"), ("local_relation", "short_range_sa")):
            rules += _sa_rules(rf"{d}{mm}\.", f"decoder.isa.{ours}.", value_module=False)
            rules += _conv_module_rules(rf"{d}{mm}\.output_project", f"decoder.isa.{ours}.W.0",
                                        f"decoder.isa.{ours}.W.1.0")
        rules += [*_conv_module_rules(rf"{d}out_conv", "decoder.isa.conv_bn.0", "decoder.isa.conv_bn.1.0"),
                  (rf"^{d}((?:in_conv|conv_seg)\..*)$", r"decoder.\1", False)]
    elif arch == "emanet":
        rules += [(rf"^{d}ema_module\.bases$", r"decoder.ema.mu", False),
                  (rf"^{d}ema_mid_conv\.conv\.(.*)$", r"decoder.ema.conv1.\1", False),
                  *_conv_module_rules(rf"{d}ema_out_conv", "decoder.ema.conv2.0", "decoder.ema.conv2.1"),
                  (rf"^{d}((?:ema_in_conv|bottleneck|conv_cat|conv_seg)\..*)$", r"decoder.\1", False)]
    elif arch == "nlnet":
        rules += [(rf"^{d}nl_block\.(g|theta|phi)\.conv\.(.*)$", r"decoder.attn.\1.\2", False),
                  (rf"^{d}nl_block\.conv_out\.conv\.(.*)$", r"decoder.attn.w_z.\1", False),
                  (rf"^{d}nl_block\.conv_out\.bn\.(.*)$", r"decoder.attn.norm.\1", False),
                  (rf"^{d}nl_block\.concat_project\.conv\.weight$", r"decoder.attn.w_f", True),
                  *_fcn_rules(d, o)]
    elif arch == "dnlnet":
        rules += [(rf"^{d}dnl_block\.((?:g|theta|phi|conv_out)\.(?:conv|bn)\..*)$", r"decoder.attn.\1", False),
                  (rf"^{d}dnl_block\.(conv_mask\..*)$", r"decoder.attn.\1", False),
                  *_fcn_rules(d, o)]
    elif arch == "gcnet":
        rules.append((rf"^{d}gc_block\.conv_mask\.(.*)$", r"decoder.attn.conv_attn.\1", False))
        for mm, ours in (("channel_add_conv", "mlp_add"), ("channel_mul_conv", "mlp_scale")):
            rules += [(rf"^{d}gc_block\.{mm}\.0\.(.*)$", rf"decoder.attn.{ours}.fc1.\1", False),
                      (rf"^{d}gc_block\.{mm}\.1\.(.*)$", rf"decoder.attn.{ours}.norm.\1", True),
                      (rf"^{d}gc_block\.{mm}\.3\.(.*)$", rf"decoder.attn.{ours}.fc2.\1", False)]
        rules += _fcn_rules(d, o)
    elif arch == "psanet":
        rules.append((rf"^{d}((?:reduce|reduce_p|attention|attention_p|proj|bottleneck|conv_seg)\..*)$",
                      r"decoder.\1", False))
    elif arch == "apcnet":
        rules.append((rf"^{d}((?:acm_modules|bottleneck|conv_seg)\..*)$", r"decoder.\1", False))
    elif arch == "ann":
        rules += [(rf"^{d}(fusion|context)\.stages\.0\.(.*)$", r"decoder.\1.\2", False),
                  (rf"^{d}((?:fusion|context)\.bottleneck\..*)$", r"decoder.\1", False),
                  (rf"^{d}((?:bottleneck|conv_seg)\..*)$", r"decoder.\1", False)]
    elif arch == "attnfcn":
        rules += _fcn_rules(d, o)
    return rules


# model biases mmseg's checkpoints have no tensor for (ConvModule convs followed by a norm: bias=False), set to 0
_ZERO_BIASES = {"hrnet_ocr": ("decoder.conv3x3_ocr.0.bias", "decoder.aux_head.0.bias")}


def _shared_copies(arch: str, sd: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """mmseg keys that duplicate another key (a module registered under two names) -> the key they copy."""
    if arch != "ann":
        return {}
    src = "decode_head.context.stages.0."
    return {k: src + "key_project." + k[len(src + "query_project."):] for k in sd
            if k.startswith(src + "query_project.")}


def map_state_dict(arch: str, stem: str, sd: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
                   ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(our state dict, accounting notes): every mmseg key mapped by the architecture's rules onto a key of
    `target` (our model's state dict) with the same shape (or numel, for the marked reshapes). Keys that map to
    nothing, target keys left without a value and shape differences raise one `KeyMappingError` listing them.
    Accounted for without a target: mmseg's second copy of a shared module (ANN's APNB query_project = its
    key_project, checked equal); filled without a source: BN `num_batches_tracked` counters absent from old
    checkpoints (set to 0) and hrnet_ocr's conv3x3_ocr / aux_head conv biases, which mmseg's bias-free
    ConvModules lack (set to 0)."""
    rules = [(re.compile(pat), rep, reshape) for pat, rep, reshape in _rules(arch, stem)]
    shared = _shared_copies(arch, sd)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unmapped, shapes, notes = [], [], []
    for key, value in sd.items():
        if key in shared:
            twin = shared[key]
            if twin not in sd or not torch.equal(sd[twin], value):
                raise KeyMappingError(f"{key} should be a copy of {twin} (mmseg's shared APNB query/key projection) "
                                      f"but differs from it")
            continue
        rule = next((r for r in rules if r[0].match(key)), None)
        if rule is None:
            unmapped.append(key)
            continue
        pat, rep, reshape = rule
        new = pat.sub(rep, key)
        if new not in target:
            unmapped.append(f"{key} -> {new}")
            continue
        if new in out:
            unmapped.append(f"{key} -> {new} (already mapped from {origin[new]})")
            continue
        want = tuple(target[new].shape)
        if tuple(value.shape) != want:
            if reshape and value.numel() == target[new].numel():
                value = value.reshape(want)
            else:
                shapes.append(f"{key} {tuple(value.shape)} -> {new} {want}")
                continue
        out[new], origin[new] = value.to(target[new].dtype), key
    if shared:
        notes.append(f"{len(shared)} keys of ANN's APNB query_project not copied: mmseg registers its shared "
                     f"query/key projection twice (checked equal to key_project)")
    missing = [k for k in target if k not in out]
    counters = [k for k in missing if k.endswith("num_batches_tracked")]
    if counters:
        for k in counters:
            out[k] = torch.zeros_like(target[k])
        notes.append(f"{len(counters)} BatchNorm num_batches_tracked counters absent from the checkpoint, set to 0")
        missing = [k for k in missing if k not in counters]
    zeros = [k for k in _ZERO_BIASES.get(arch, ()) if k in missing]
    if zeros:
        for k in zeros:
            out[k] = torch.zeros_like(target[k])
        notes.append(f"{', '.join(zeros)} set to 0: mmseg's OCRHead.bottleneck and FCNHead convs.0 are ConvModules "
                     f"without a bias (a BN follows), NVIDIA's conv3x3_ocr / aux_head convs have one; a zero bias "
                     f"computes the same")
        missing = [k for k in missing if k not in zeros]
    if unmapped or missing or shapes:
        parts = []
        for title, items in (("mmseg keys that map to nothing", unmapped),
                             ("model keys nothing maps to", missing), ("shapes that differ", shapes)):
            if items:
                shown = "\n    ".join(items[:12]) + (f"\n    ... and {len(items) - 12} more" if len(items) > 12 else "")
                parts.append(f"  {len(items)} {title}:\n    {shown}")
        raise KeyMappingError(f"the {arch} mapping does not cover the checkpoint:\n" + "\n".join(parts))
    return out, notes


def stem_kind(sd: Mapping[str, torch.Tensor]) -> str:
    return "deep" if "backbone.stem.0.weight" in sd else "plain"


