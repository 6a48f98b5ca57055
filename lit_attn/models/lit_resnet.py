"""timm ResNets with lit_attn blocks, registered as `resnet{18,50,101}_<block>` in timm.

Placement follows the papers: gates (kind "gate": PSA, residual attention, ...) go in every residual
block through timm's own attention slot (`block_args={"attn_layer": name}`, after the last BN of
the residual branch, before the shortcut sum); global-context blocks (kind "global": non-local,
DANet, ...) follow the Non-local paper's placement: one block after every other residual block of
res3 and res4 (official `nonlocal_mod = 2`, 5 blocks in ResNet-50, 2 in ResNet-18, 13 in
ResNet-101). The base ResNet's parameter names are unchanged.

Pretrained trunks: every variant has the pretrained tags timm has for its base (read from timm's
registry at import, `timm.list_pretrained("resnet50_nonlocal.*")`), each with the base's cfg, so
`timm.create_model("resnet50_nonlocal.a1_in1k", pretrained=True)` loads timm's `resnet50.a1_in1k`
checkpoint (`pretrained=True` alone: the base's default tag; offline:
`pretrained_cfg_overlay=dict(file="resnet50.safetensors")`, a base state dict). Every trunk tensor must
load (`pretrained.TrunkFilter`: a missing, mis-shaped or unexpected tensor is an error naming it); the
blocks keep their init. `IDENTITY_AT_INIT` holds the blocks that are the identity at init (logits equal
the base's until trained); the others (e.g. sigmoid gates, PSA) change the logits from the start, as
their cfg notes and docstrings say.
"""
from __future__ import annotations

import sys

import timm
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, split_model_name_tag
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from ..layers._utils import TimmInitHooks
from ..registry import _REGISTRY, GATE, GLOBAL, create_attn
from .pretrained import TrunkFilter, block_is_identity_at_init, mirror_pretrained_cfgs, require_weights

__all__ = ["IDENTITY_AT_INIT", "SKIPPED_TAGS", "ContextBasicBlock", "ContextBottleneck", "LitResNet",
           "identity_at_init", "register_resnet_variants"]

BASES = {
    "resnet18": dict(block=BasicBlock, layers=(2, 2, 2, 2)),
    "resnet50": dict(block=Bottleneck, layers=(3, 4, 6, 3)),
    "resnet101": dict(block=Bottleneck, layers=(3, 4, 23, 3)),
}


class ContextBasicBlock(BasicBlock):
    """timm BasicBlock followed by a context block (`self.context`) on its output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles no super() call: timm's BasicBlock.forward, spelled out
            shortcut = x if self.downsample is None else self.downsample(x)
            y = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
            y = self.bn2(self.conv2(y))
            y = y if self.se is None else self.se(y)
            y = y if self.drop_path is None else self.drop_path(y)
            return self.context(self.act2(y + shortcut))
        return self.context(super().forward(x))


class ContextBottleneck(Bottleneck):
    """timm Bottleneck followed by a context block (`self.context`) on its output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles no super() call: timm's Bottleneck.forward, spelled out
            shortcut = x if self.downsample is None else self.downsample(x)
            y = self.act1(self.bn1(self.conv1(x)))
            y = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(y)))))
            y = self.bn3(self.conv3(y))
            y = y if self.se is None else self.se(y)
            y = y if self.drop_path is None else self.drop_path(y)
            return self.context(self.act3(y + shortcut))
        return self.context(super().forward(x))


_WITH_CONTEXT = {BasicBlock: ContextBasicBlock, Bottleneck: ContextBottleneck}


class LitResNet(ResNet):
    """timm `ResNet` that inserts `context_layer` after every `context_every`-th residual block
    (1-based: blocks 2, 4, ...) of the stages in `context_stages` (0-based: (1, 2) = res3, res4), or
    after the blocks listed in `context_blocks` ({stage: 0-based block indices}) when given."""

    def __init__(self, *args, context_layer: str | None = None, context_stages=(1, 2), context_every: int = 2,
                 context_blocks: dict[int, tuple[int, ...]] | None = None, context_kwargs: dict | None = None,
                 device=None, dtype=None, **kwargs):
        super().__init__(*args, device=device, dtype=dtype, **kwargs)
        self.context_layer = context_layer
        if context_layer is None:
            return
        stages = context_blocks.keys() if context_blocks is not None else context_stages
        for stage in stages:
            blocks = getattr(self, f"layer{stage + 1}")
            if context_blocks is not None and not set(context_blocks[stage]) <= set(range(len(blocks))):
                raise ValueError(f"context_blocks[{stage}]={context_blocks[stage]} outside the {len(blocks)} blocks "
                                 f"of stage {stage}")
            for i, blk in enumerate(blocks):
                if (i in context_blocks[stage]) if context_blocks is not None else (
                        i % context_every == context_every - 1):
                    out_chs = (blk.conv3 if isinstance(blk, Bottleneck) else blk.conv2).out_channels
                    blk.__class__ = _WITH_CONTEXT[type(blk)]
                    blk.context = create_attn(context_layer, out_chs, device=device, dtype=dtype,
                                              **(context_kwargs or {}))

    def init_weights(self, zero_init_last: bool = True) -> None:
        """timm's ResNet init (kaiming convs, zero last BN of each residual branch with `zero_init_last`), then
        the lit_attn blocks' own init again: timm's init also reaches the gates in its attention slot (and only
        calls their `zero_init_last()` hook when `zero_init_last=True`), so a gate's zero-init (e.g. a2's
        conv_out) or official init would be lost. The context blocks are added after this runs."""
        super().init_weights(zero_init_last=zero_init_last)
        for block in self.attention_blocks().values():
            if isinstance(block, TimmInitHooks):
                block.init_weights(zero_init_last=zero_init_last)

    def attention_blocks(self) -> dict[str, nn.Module]:
        """The blocks a plain ResNet lacks, by module name: gates in timm's attention slot
        (`layer1.0.se`) and context blocks (`layer3.1.context`). Their tensors are the ones a base
        ResNet checkpoint does not have."""
        out = {}
        for name, module in self.named_modules():
            if isinstance(module, (BasicBlock, Bottleneck)):
                for slot in ("se", "context"):
                    if getattr(module, slot, None) is not None:
                        out[f"{name}.{slot}"] = getattr(module, slot)
        return out


def _cfg(**kwargs):
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
            "crop_pct": 0.875, "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225), "first_conv": "conv1", "classifier": "fc", **kwargs}


default_cfgs: dict = {}
SKIPPED_TAGS: dict[str, str] = {}  # base tags not mirrored: "<base>.<tag>" -> reason (none with timm 1.0.31)

# Whether each shipped plug-in block returns its input exactly at its default init (zero-initialised last
# BN / gamma, as the papers do). Declared here so that importing lit_attn runs no forward pass (running
# them all takes about a second on CPU); tests/test_pretrained.py checks every entry against the block
# itself (`pretrained.block_is_identity_at_init`). Blocks registered later are checked at registration.
_DECLARED_IDENTITY = {
    "a2": True, "cgnl": True, "cgnl_gaussian": True, "criss_cross": True, "danet": True, "danet_cam": True,
    "danet_pam": True, "dnl_mmseg": True, "glore": True, "latentgnn": True, "nonlocal": True,
    "nonlocal_concat": True, "nonlocal_dot": True, "nonlocal_gaussian": True,
    "acm": False, "apnb": False, "base_oc": False, "dgmn": False, "dnl": False, "ema": False, "isa": False,
    "psa_channel": False, "psa_p": False, "psa_s": False, "psa_spatial": False, "psanet": False,
    "residual_attention": False,
}
# block names whose variants reproduce the base model's logits exactly at init (filled at registration)
IDENTITY_AT_INIT: set[str] = set()
_VARIANT_BLOCK: dict[str, str] = {}  # variant -> block name


def identity_at_init(name: str) -> bool:
    """Whether a registered variant (`"resnet50_nonlocal"`, tags allowed) or a block name has blocks that
    are the identity at init, i.e. the variant loaded with a base checkpoint gives the base's logits."""
    name = split_model_name_tag(name)[0]
    block = _VARIANT_BLOCK.get(name, name)
    if block not in _VARIANT_BLOCK.values():
        raise KeyError(f"{name!r} is neither a lit_attn ResNet variant nor a block with variants "
                       f"(registered: {', '.join(sorted(set(_VARIANT_BLOCK.values())))})")
    return block in IDENTITY_AT_INIT


# where a paper puts its block in a ResNet, when it differs from the Non-local default above:
# name -> (description, layers per stage -> {stage (0-based, 1 = res3): 0-based blocks followed by the block})
PAPER_PLACEMENT = {
    "glore": ("after blocks 1, 3 of res3 and 1, 3, 5 of res4 (official resnet50_3d_gcn_x5, '+2/+3')",
              lambda layers: {1: tuple(i for i in (0, 2) if i < layers[1]),
                              2: tuple(i for i in (0, 2, 4) if i < layers[2])}),
    "cgnl": ("one block before the last block of res4 (official model/resnet.py, nl_nums=1)",
             lambda layers: {2: (layers[2] - 2,)}),
    "latentgnn": ("one block after the last block of res4 (official detection code, 'C4')",
                  lambda layers: {2: (layers[2] - 1,)}),
    "dgmn": ("one block after the last block of res5 (official DynamicWeightsCat11 option)",
             lambda layers: {3: (layers[3] - 1,)}),
}
PAPER_PLACEMENT["cgnl_gaussian"] = PAPER_PLACEMENT["cgnl"]


def _block_prefixes(model: LitResNet) -> list[str]:
    return list(model.attention_blocks())


def _init_note(base: str, attn: str, identity: bool) -> str:
    if identity:
        return (f"lit_attn: {base} trunk weights; the `{attn}` blocks are not in the checkpoint and keep their init, "
                f"which is the identity: logits equal {base}'s (same tag) until trained")
    return (f"lit_attn: {base} trunk weights; the `{attn}` blocks are not in the checkpoint and keep their init, "
            f"which is NOT the identity: logits differ from {base}'s (same tag) until fine-tuned")


def _entrypoint(variant: str, base: str, attn: str, kind: str, identity: bool, default_tag: str | None):
    def create(pretrained: bool = False, **kwargs):
        args = dict(BASES[base])
        if kind == GATE:
            args["block_args"] = {"attn_layer": attn}
        else:
            args["context_layer"] = attn
            if attn in PAPER_PLACEMENT:
                args["context_blocks"] = PAPER_PLACEMENT[attn][1](args["layers"])
        trunk = None
        if pretrained:
            require_weights(variant, kwargs, why=f"timm {timm.__version__} has no pretrained tag "
                            f"for {base}", todo=f"Train it, or load a {base} state dict as its trunk.")
            trunk = TrunkFilter(variant, base, f"{attn} blocks", _block_prefixes)
        model = build_model_with_cfg(LitResNet, variant, pretrained, pretrained_filter_fn=trunk,
                                     **dict(args, **kwargs))
        if trunk is not None:
            trunk.log(features_only=bool(kwargs.get("features_only", False)))
        return model

    create.__name__ = create.__qualname__ = variant
    create.__module__ = __name__
    where = "in every block" if kind == GATE else PAPER_PLACEMENT.get(attn, ("res3/res4, every other block",))[0]
    if default_tag is None:
        weights = f"No pretrained weights: timm has none for {base}."
    else:
        weights = f"Pretrained: the {base} trunk of every timm tag of {base} (default `{default_tag}`)."
    init = ("The blocks start as the identity: with a base checkpoint, logits equal the base's until trained."
            if identity else "The blocks are NOT the identity at init: logits differ from the base's until "
            "fine-tuned.")
    create.__doc__ = f"{base} with lit_attn's `{attn}` block ({where}). {weights} {init}"
    return create


def register_resnet_variants() -> list[str]:
    """Register `<base>_<block>` for every lit_attn plug-in block not registered yet, with the base's
    pretrained tags (see the module docstring)."""
    mod = sys.modules[__name__]
    added = []
    for entry in sorted(_REGISTRY.values(), key=lambda e: e.name):
        if entry.source != "lit_attn" or entry.kind not in (GATE, GLOBAL):
            continue
        identity = _DECLARED_IDENTITY.get(entry.name)
        for base in BASES:
            variant = f"{base}_{entry.name}"
            if variant in default_cfgs:
                continue
            if identity is None:
                identity = block_is_identity_at_init(entry.name)
            cfgs = mirror_pretrained_cfgs(base, variant, notes=(_init_note(base, entry.name, identity),),
                                          skipped=SKIPPED_TAGS)
            default_cfgs.update(generate_default_cfgs(cfgs or {variant: _cfg()}))
            default_tag = default_cfgs[variant].tags[0] if cfgs else None
            fn = _entrypoint(variant, base, entry.name, entry.kind, identity, default_tag)
            setattr(mod, variant, register_model(fn))
            _VARIANT_BLOCK[variant] = entry.name
            if identity:
                IDENTITY_AT_INIT.add(entry.name)
            added.append(variant)
    return added


register_resnet_variants()
