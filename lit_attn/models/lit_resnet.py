"""timm ResNets with lit_attn blocks, registered as `resnet{18,50,101}_<block>` in timm.

Placement follows the papers: gates (kind "gate": PSA, residual attention, ...) go in every residual
block through timm's own attention slot (`block_args={"attn_layer": name}`, after the last BN of
the residual branch, before the shortcut sum); global-context blocks (kind "global": non-local,
DANet, ...) follow the Non-local paper's placement: one block after every other residual block of
res3 and res4 (official `nonlocal_mod = 2`, 5 blocks in ResNet-50, 2 in ResNet-18, 13 in
ResNet-101). The base ResNet's parameter names are unchanged, so ImageNet ResNet weights load with
`strict=False`. No pretrained weights exist for the variants (`pretrained=False`).
"""
from __future__ import annotations

import sys

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ..registry import _REGISTRY, GATE, GLOBAL, create_attn

__all__ = ["ContextBasicBlock", "ContextBottleneck", "LitResNet", "register_resnet_variants"]

BASES = {
    "resnet18": dict(block=BasicBlock, layers=(2, 2, 2, 2)),
    "resnet50": dict(block=Bottleneck, layers=(3, 4, 6, 3)),
    "resnet101": dict(block=Bottleneck, layers=(3, 4, 23, 3)),
}


class ContextBasicBlock(BasicBlock):
    """timm BasicBlock followed by a context block (`self.context`) on its output."""

    def forward(self, x):
        return self.context(super().forward(x))


class ContextBottleneck(Bottleneck):
    """timm Bottleneck followed by a context block (`self.context`) on its output."""

    def forward(self, x):
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


def _cfg(**kwargs):
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
            "crop_pct": 0.875, "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225), "first_conv": "conv1", "classifier": "fc", **kwargs}


default_cfgs: dict = {}


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


def _entrypoint(variant: str, base: str, attn: str, kind: str):
    def create(pretrained: bool = False, **kwargs):
        args = dict(BASES[base])
        if kind == GATE:
            args["block_args"] = {"attn_layer": attn}
        else:
            args["context_layer"] = attn
            if attn in PAPER_PLACEMENT:
                args["context_blocks"] = PAPER_PLACEMENT[attn][1](args["layers"])
        return build_model_with_cfg(LitResNet, variant, pretrained, pretrained_strict=False, **dict(args, **kwargs))

    create.__name__ = create.__qualname__ = variant
    create.__module__ = __name__
    where = "in every block" if kind == GATE else PAPER_PLACEMENT.get(attn, ("res3/res4, every other block",))[0]
    create.__doc__ = f"{base} with lit_attn's `{attn}` block ({where})."
    return create


def register_resnet_variants() -> list[str]:
    """Register `<base>_<block>` for every lit_attn plug-in block not registered yet."""
    mod = sys.modules[__name__]
    added = []
    for entry in sorted(_REGISTRY.values(), key=lambda e: e.name):
        if entry.source != "lit_attn" or entry.kind not in (GATE, GLOBAL):
            continue
        for base in BASES:
            variant = f"{base}_{entry.name}"
            if variant in default_cfgs:
                continue
            default_cfgs.update(generate_default_cfgs({variant: _cfg()}))
            fn = _entrypoint(variant, base, entry.name, entry.kind)
            setattr(mod, variant, register_model(fn))
            added.append(variant)
    return added


register_resnet_variants()
