"""HRNetV2 with Polarized Self-Attention in every basic block, the PSA paper's backbone, as timm models
`hrnet_{w18_small_v2,w18,w32,w48}_psa_{p,s}`.

Liu, Liu, Fan, Huang, "Polarized Self-Attention: Towards High-quality Pixel-wise Regression", arXiv
2107.00782 (2021). Official code: DeLightCMU/PSA @ 588b370, `semantic-segmentation/network/hrnetv2.py`:
every BasicBlock of stages 2-4 (all branches, all modules) runs conv1-bn1-relu -> PSA (`deattn`, PSA_s or
PSA_p of the block width) -> conv2-bn2 -> + shortcut -> relu, so PSA sits inside the residual branch
before conv2 (not in timm's attention slot after bn2); the stage-1 Bottlenecks have none. Cost per block:
O(N C + C^2) for PSA_p, O(N C^2) for PSA_s (see `layers/psa.py`); the 104 blocks of w48 add 6.36 M (psa_p) /
5.38 M (psa_s) parameters to the 65.33 M of its raw-branch trunk (w18_small_v2: 38 blocks, 0.31 M / 0.26 M).

timm's HRNet is reused, with the least change that reproduces the official model:
- block: `PsaBasicBlock` subclasses timm's resnet `BasicBlock` (which timm's HRNet uses) and holds the
  block as `attn` (`PolarizedSelfAttention`, `formulation="official"`, the official parameter names;
  `official_to_timm_keys` maps `deattn` onto it). timm's HRNet picks its block classes by looking up the
  stage cfg's `block_type` in `timm.models.hrnet.block_types_dict` while it builds, so two NEW keys are
  added there ("BASIC_PSA_P", "BASIC_PSA_S"; timm's own entries are untouched) and copies of timm's
  `cfg_cls` name them for stages 2-4 (`psa_hrnet_cfg`). No timm class or function is replaced: the
  plain `hrnet_*` models are unchanged.
- fuse: the official segmentation HRNetV2 upsamples the lower-resolution branches in its fuse layers
  bilinearly (align_corners=False) to the size of the branch they join; timm's (HRNet-Image-Classification)
  uses `nn.Upsample(scale_factor=2**k, mode="nearest")`, which gives other numbers and fails on inputs
  whose size is not a multiple of 32. The stage modules of these models are `OfficialFuseModule`s (timm's
  `HighResolutionModule` with the official fuse; the parameter-free `nn.Upsample` is dropped, so the
  state dict keys are timm's). Like the official code, the ImageNet trunk (trained with nearest fuse)
  is then used with the bilinear fuse.
- init: the trunk has timm's init; the PSA convs get `normal(std=0.001)` weights (`psa_init="hrnet"`,
  default), which is what the official model starts from (its `get_seg_model` -> `init_weights` draws
  every Conv2d of the backbone, PSA's included, from N(0, 0.001) after PSA's own kaiming init, and the
  ImageNet file has no PSA tensors). At that init PSA_p(x) ~ x (both masks ~0.5) while PSA_s scales x by
  ~0.5 (spatial mask) times its channel mask (a sigmoid of its LN bottleneck, whose biases keep their init).
  `psa_init="block"` keeps `PolarizedSelfAttention`'s own init (kaiming fan_in q/v convs).
- features_only: `timm.create_model(name, features_only=True)` returns the stem (stride 2, 64 channels)
  and the four raw branches (w, 2w, 4w, 8w at strides 4-32), what the paper's heads consume, as timm's
  `feature_location=""`; `feature_location="incre"` gives timm's classification-head features (with
  `feature_cls="getter"`: `head=""` by default, `head="incre"` for those). `feature_cls="fx"` fails as for
  timm's HRNet (its feature_info names no modules); `timm.models.create_feature_extractor` traces.
- pretrained: `pretrained=True` loads the plain `hrnet_wXX` ImageNet checkpoint of the same tag into the
  trunk (`pretrained.mirror_pretrained_cfgs`, `pretrained.TrunkFilter`: every trunk tensor must load, the
  PSA blocks keep their init; head tensors a features model lacks are left out).

Other differences from the official code: timm's HRNet applies every non-identity transition to the last
branch (official: the transition of an existing branch i to branch i; the same for every config here, whose
transitions never change an existing branch's width after stage 1); the classification model keeps timm's head
(incre modules, downsampling, final 1x1 conv to 2048, classifier), which the segmentation code lacks.
"""
from __future__ import annotations

import copy
import sys

import timm
import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models import hrnet as timm_hrnet
from timm.models._builder import pretrained_cfg_for_features
from timm.models.hrnet import HighResolutionModule, HighResolutionNet, HighResolutionNetFeatures
from timm.models.resnet import BasicBlock
from torch import Tensor, nn

from ..layers.psa import PolarizedSelfAttention
from .pretrained import TrunkFilter, mirror_pretrained_cfgs, require_weights

__all__ = ["BASES", "OfficialFuseModule", "PsaBasicBlock", "PsaHighResolutionNet", "PsaHighResolutionNetFeatures",
           "official_to_timm_keys", "psa_hrnet_cfg"]

BASES = ("hrnet_w18_small_v2", "hrnet_w18", "hrnet_w32", "hrnet_w48")
PSA_INITS = ("hrnet", "block")
# the modules of the official HRNetV2 segmentation trunk (DeLightCMU/PSA network/hrnetv2.py), top level
TRUNK_MODULES = ("conv1", "bn1", "conv2", "bn2", "layer1", "transition1", "stage2", "transition2", "stage3",
                 "transition3", "stage4")
_HEAD_MODULES = ("incre_modules", "downsamp_modules", "final_layer", "classifier")  # timm's classification head


class PsaBasicBlock(BasicBlock):
    """timm's BasicBlock with a PSA block (`attn`, official formulation, `layout` of the subclass) after
    act1 and before conv2, inside the residual branch, as the official HRNet BasicBlock's `deattn`."""
    layout = "parallel"

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, *,
                 device=None, dtype=None, **kwargs):
        super().__init__(inplanes, planes, stride, downsample, device=device, dtype=dtype, **kwargs)
        self.attn = PolarizedSelfAttention(self.conv1.out_channels, layout=self.layout, formulation="official",
                                           device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))  # (aa: an Identity in HRNet)
        y = self.bn2(self.conv2(self.attn(y)))
        y = y if self.se is None else self.se(y)
        y = y if self.drop_path is None else self.drop_path(y)
        return self.act2(y + shortcut)


class PsaPBasicBlock(PsaBasicBlock):
    """`PsaBasicBlock` with the official PSA_p (parallel layout)."""
    layout = "parallel"


class PsaSBasicBlock(PsaBasicBlock):
    """`PsaBasicBlock` with the official PSA_s (sequential layout)."""
    layout = "sequential"


BLOCK_TYPES = {"psa_p": "BASIC_PSA_P", "psa_s": "BASIC_PSA_S"}  # attention -> key in timm's block_types_dict
for _key, _cls in ((BLOCK_TYPES["psa_p"], PsaPBasicBlock), (BLOCK_TYPES["psa_s"], PsaSBasicBlock)):
    if timm_hrnet.block_types_dict.setdefault(_key, _cls) is not _cls:
        raise RuntimeError(f"timm.models.hrnet.block_types_dict[{_key!r}] is already taken by "
                           f"{timm_hrnet.block_types_dict[_key]}")


@register_notrace_function  # a leaf for FX tracing: the target size is read from a tensor's shape
def resize_to(x: Tensor, ref: Tensor) -> Tensor:
    """x resized bilinearly (align_corners=False) to ref's spatial size, as the official fuse does."""
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


class OfficialFuseModule(HighResolutionModule):
    """timm's HighResolutionModule whose fuse upsamples the lower-resolution branches bilinearly to the
    target branch's size (official segmentation HRNetV2) instead of by nearest `scale_factor`; built by
    `use_official_fuse` from timm's modules (same parameters and names)."""

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        if self.num_branches == 1:
            return [self.branches[0](x[0])]
        ys: list[Tensor] = []  # a new list (timm's writes into the caller's); indexed loops: TorchScript unrolls them
        for i, branch in enumerate(self.branches):
            ys.append(branch(x[i]))
        out: list[Tensor] = []
        for i, fuse_outer in enumerate(self.fuse_layers):
            y: Tensor | None = None
            for j, f in enumerate(fuse_outer):
                z = f(ys[j])
                if j > i:
                    z = resize_to(z, ys[i])
                if y is None:
                    y = z
                else:
                    y = y + z
            assert y is not None
            out.append(self.fuse_act(y))
        return out


def use_official_fuse(model: nn.Module) -> nn.Module:
    """Turn every timm HighResolutionModule in `model` into an `OfficialFuseModule` in place (the nn.Upsample of
    its fuse layers dropped; no parameter changes); returns `model`. timm builds these modules inside
    `HighResolutionNet.__init__` without a hook, hence the class swap."""
    for module in model.modules():
        if not isinstance(module, HighResolutionModule) or isinstance(module, OfficialFuseModule):
            continue
        module.__class__ = OfficialFuseModule
        if isinstance(module.fuse_layers, nn.ModuleList):
            for i, outer in enumerate(module.fuse_layers):
                for j, f in enumerate(outer):
                    if j > i and isinstance(f[-1], nn.Upsample):
                        del f[-1]
    return model


def psa_hrnet_cfg(base: str | dict, attn: str) -> dict:
    """A copy of timm's HRNet cfg (`timm.models.hrnet.cfg_cls[base]`, or a cfg dict of the same form) whose
    stages 2-4 use the PSA basic block (`attn`: "psa_p" or "psa_s")."""
    if attn not in BLOCK_TYPES:
        raise ValueError(f"attn must be one of {tuple(BLOCK_TYPES)}, got {attn!r}")
    if isinstance(base, str) and base not in timm_hrnet.cfg_cls:
        raise ValueError(f"{base!r} is not one of timm's HRNet cfgs: {sorted(timm_hrnet.cfg_cls)}")
    cfg = copy.deepcopy(timm_hrnet.cfg_cls[base] if isinstance(base, str) else base)
    for stage in ("stage2", "stage3", "stage4"):
        if cfg[stage]["block_type"] != "BASIC":
            raise ValueError(f"{stage} of the cfg uses {cfg[stage]['block_type']!r} blocks; PSA goes in BASIC blocks")
        cfg[stage]["block_type"] = BLOCK_TYPES[attn]
    return cfg


class PsaHighResolutionNet(HighResolutionNet):
    """timm's HighResolutionNet built from a `psa_hrnet_cfg`, with the official bilinear fuse and the PSA
    blocks' init (`psa_init`: "hrnet", N(0, 0.001) conv weights as the official model; "block", the
    block's own init). Other arguments: timm's."""
    psa_init = "hrnet"

    def __init__(self, cfg: dict, *, psa_init: str = "hrnet", **kwargs):
        if psa_init not in PSA_INITS:
            raise ValueError(f"{type(self).__name__}: psa_init must be one of {PSA_INITS}, got {psa_init!r}")
        super().__init__(cfg, **kwargs)
        use_official_fuse(self)
        self.psa_init = psa_init
        self.init_attn()

    def attention_blocks(self) -> dict[str, nn.Module]:
        """The PSA blocks by module name (`stage2.0.branches.0.0.attn`, ...): the tensors a plain HRNet lacks."""
        return {f"{n}.attn": m.attn for n, m in self.named_modules() if isinstance(m, PsaBasicBlock)}

    @torch.jit.ignore
    def init_weights(self) -> None:
        """timm's HRNet init (it also reaches the PSA convs), then the PSA blocks' init."""
        super().init_weights()
        self.init_attn()

    @torch.jit.ignore
    def init_attn(self) -> None:
        for block in self.attention_blocks().values():
            if self.psa_init == "block":
                block.reset_parameters()
                continue
            for m in block.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, std=0.001)


class PsaHighResolutionNetFeatures(HighResolutionNetFeatures, PsaHighResolutionNet):
    """Feature extractor of `PsaHighResolutionNet`: the stem and the four raw branches by default
    (`feature_location=""`), timm's incre features with `feature_location="incre"`."""

    def __init__(self, cfg: dict, feature_location: str = "", **kwargs):
        super().__init__(cfg, feature_location=feature_location, **kwargs)


def official_to_timm_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """An official PSA HRNetV2 trunk state dict (DeLightCMU/PSA `network/hrnetv2.py`; a leading "module."
    and "backbone." are stripped) with the names of `PsaHighResolutionNet`: the PSA blocks' `deattn`
    becomes `attn`; every other name is the same. Keys outside the trunk (OCR / classifier heads, ...)
    raise a ValueError naming them: select the backbone's tensors first."""
    out, unmapped = {}, []
    for key, value in state_dict.items():
        k = key.removeprefix("module.").removeprefix("backbone.")
        if k.split(".", 1)[0] not in TRUNK_MODULES:
            unmapped.append(key)
            continue
        out[k.replace(".deattn.", ".attn.")] = value
    if unmapped:
        more = f", ... ({len(unmapped) - 8} more)" if len(unmapped) > 8 else ""
        raise ValueError(f"official_to_timm_keys: {len(unmapped)} key(s) outside the HRNetV2 trunk (top-level "
                         f"modules {TRUNK_MODULES}): {', '.join(unmapped[:8])}{more}; pass the backbone's "
                         "tensors only (e.g. the keys under 'module.backbone.')")
    return out


def _drop_absent_heads(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """The checkpoint without the classification-head tensors of modules the model does not have
    (a features model, or head=""); the rest is checked by TrunkFilter."""
    own = model.state_dict()
    present = {k.split(".", 1)[0] for k in own}
    return {k: v for k, v in state_dict.items()
            if not (k.split(".", 1)[0] in _HEAD_MODULES and k.split(".", 1)[0] not in present)}


def _init_note(base: str, attn: str) -> str:
    return (f"lit_attn: {base} trunk weights; the `{attn}` blocks are not in the checkpoint and keep their init "
            "(N(0, 0.001) convs, as the official model), which is NOT the identity; the fuse layers upsample "
            "bilinearly (official segmentation HRNetV2), the checkpoint was trained with nearest")


def _entrypoint(variant: str, base: str, attn: str, default_tag: str):
    def create(pretrained: bool = False, **kwargs):
        model_cls, kwargs_filter, features_mode = PsaHighResolutionNet, None, ""
        if kwargs.pop("features_only", False):
            if "feature_cls" in kwargs or "feature_cls" in kwargs.get("feature_cfg", {}):
                features_mode = "cfg"  # timm's generic wrappers ("getter") around the model, raw branches too
                kwargs.setdefault("head", "")
            else:
                model_cls, kwargs_filter, features_mode = (
                    PsaHighResolutionNetFeatures, ("num_classes", "global_pool"), "cls")
        filter_fn = trunk = None
        if pretrained:
            require_weights(variant, kwargs, why=f"timm {timm.__version__} has no pretrained tag for {base}",
                            todo=f"Load a {base} state dict as its trunk.")
            trunk = TrunkFilter(variant, base, f"{attn} blocks", lambda m: list(m.attention_blocks()))

            def filter_fn(state_dict, model):
                return trunk(_drop_absent_heads(state_dict, model), model)
        model = build_model_with_cfg(model_cls, variant, pretrained, model_cfg=psa_hrnet_cfg(base, attn),
                                     pretrained_filter_fn=filter_fn, kwargs_filter=kwargs_filter,
                                     features_only=features_mode == "cfg", **kwargs)
        if features_mode == "cls":
            model.pretrained_cfg = pretrained_cfg_for_features(model.default_cfg)
            model.default_cfg = model.pretrained_cfg
        if trunk is not None:
            trunk.log(features_only=bool(features_mode))
        return model

    create.__name__ = create.__qualname__ = variant
    create.__module__ = __name__
    create.__doc__ = (
        f"{base} (HRNetV2) with the official {attn.upper().replace('_', '-')} Polarized Self-Attention block "
        "between conv1 and conv2 of every basic block of stages 2-4 (DeLightCMU/PSA). features_only=True: the "
        f"stem and the four raw branches. Pretrained: the {base} trunk of every timm tag of {base} (default "
        f"`{default_tag}`); the PSA blocks are NOT the identity at init: logits differ from the base's.")
    return create


default_cfgs: dict = {}


def _register() -> list[str]:
    mod = sys.modules[__name__]
    added = []
    for base in BASES:
        for attn in BLOCK_TYPES:
            variant = f"{base}_{attn}"
            cfgs = mirror_pretrained_cfgs(base, variant, notes=(_init_note(base, attn),))
            if not cfgs:
                raise RuntimeError(f"timm {timm.__version__} has no pretrained cfg for {base}")
            default_cfgs.update(generate_default_cfgs(cfgs))
            fn = _entrypoint(variant, base, attn, default_cfgs[variant].tags[0])
            setattr(mod, variant, register_model(fn))
            added.append(variant)
    return added


_register()
