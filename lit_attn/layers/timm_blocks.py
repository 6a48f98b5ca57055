"""timm's own attention modules, registered under timm's names (pointing at timm's classes).

These are not re-written: `create_attn("cbam", 64)` builds `timm.layers.CbamModule`.
"""
from __future__ import annotations

from timm.layers import ConvMlp, get_act_layer, make_divisible
from timm.layers.gather_excite import GatherExcite as _TimmGatherExcite
from torch import nn

from ..integrations.timm import timm_get_attn
from ..registry import CONV, GATE, GLOBAL, register_attn


class GatherExcite(_TimmGatherExcite):
    """timm's GatherExcite with its MLP built correctly.

    timm 1.0.31's GatherExcite passes `*dd` (its device/dtype dict) positionally to `ConvMlp`,
    so with the default `use_mlp=True` it always raises TypeError — `timm.create_model("resnet18",
    block_args={"attn_layer": "ge"})` fails without lit_attn. This builds timm's module with
    `use_mlp=False` and then adds the same `ConvMlp(channels, rd_channels, act_layer)` timm means
    to build. Used for `ge` only when the installed timm has that bug; the maths is timm's.
    """

    def __init__(self, channels, *, use_mlp=True, rd_ratio=1.0 / 16, rd_channels=None, rd_divisor=1,
                 act_layer=nn.ReLU, device=None, dtype=None, **kwargs):
        super().__init__(channels, use_mlp=False, rd_ratio=rd_ratio, rd_channels=rd_channels,
                         rd_divisor=rd_divisor, act_layer=act_layer, device=device, dtype=dtype, **kwargs)
        if use_mlp:
            rd_channels = rd_channels or make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
            self.mlp = ConvMlp(channels, rd_channels, act_layer=get_act_layer(act_layer), device=device, dtype=dtype)


def _timm_ge_is_broken() -> bool:
    try:
        _TimmGatherExcite(8, device="cpu")
    except TypeError:
        return True
    return False


# name: (family, kind, paper, year, attends, cost)
_TIMM_ATTN = {
    "se": ("se", GATE, "Squeeze-and-Excitation Networks (CVPR 2018)", 2018, "channels", "O(NC)"),
    "ese": ("se", GATE, "CenterMask: effective SE (CVPR 2020)", 2020, "channels", "O(NC)"),
    "eca": ("eca", GATE, "ECA-Net (CVPR 2020)", 2020, "channels", "O(NC)"),
    "ecam": ("eca", GATE, "ECA-Net, MLP variant (CVPR 2020)", 2020, "channels", "O(NC)"),
    "ceca": ("eca", GATE, "ECA-Net, circular padding (CVPR 2020)", 2020, "channels", "O(NC)"),
    "ge": ("gather_excite", GATE, "Gather-Excite (NeurIPS 2018)", 2018, "channels x local extents", "O(NC)"),
    "gc": ("gcnet", GLOBAL, "GCNet: global context (ICCVW 2019)", 2019, "positions -> one context", "O(NC)"),
    "gca": ("gcnet", GLOBAL, "GCNet, add fusion (ICCVW 2019)", 2019, "positions -> one context", "O(NC)"),
    "cbam": ("cbam", GATE, "CBAM (ECCV 2018)", 2018, "channels, then positions", "O(NC)"),
    "lcbam": ("cbam", GATE, "CBAM, light variant (ECCV 2018)", 2018, "channels, then positions", "O(NC)"),
    "coord": ("coord", GATE, "Coordinate Attention (CVPR 2021)", 2021, "rows and columns", "O(NC)"),
    "scoord": ("coord", GATE, "Coordinate Attention, simple (CVPR 2021)", 2021, "rows and columns", "O(NC)"),
    "ela": ("coord", GATE, "Efficient Local Attention (2024)", 2024, "rows and columns", "O(NC)"),
    "strip": ("coord", GATE, "Strip attention (timm)", 2024, "rows and columns", "O(NC)"),
    "sk": ("sknet", CONV, "Selective Kernel Networks (CVPR 2019)", 2019, "kernel branches", "O(NC^2 k^2)"),
    "splat": ("resnest", CONV, "ResNeSt split attention (2020)", 2020, "radix splits", "O(NC^2 k^2)"),
    "lambda": ("lambda", CONV, "LambdaNetworks (ICLR 2021)", 2021, "positions (linear)", "O(N C k)"),
    "bottleneck": ("botnet", CONV, "Bottleneck Transformers (CVPR 2021)", 2021, "positions", "O(N^2 C)"),
    "halo": ("halonet", CONV, "HaloNet (CVPR 2021)", 2021, "local blocks + halo", "O(N b^2 C)"),
    "nl": ("non_local", GLOBAL, "Non-local Neural Networks (CVPR 2018), timm variant", 2018, "positions",
           "O(N^2 C)"),
    "bat": ("non_local", GLOBAL, "Bilinear Attentional Transforms (timm)", 2020,
            "rows and columns in 7x7 blocks (timm asserts H, W divisible by block_size=7)", "O(N C^2)"),
}

for _name, (_family, _kind, _paper, _year, _attends, _cost) in _TIMM_ATTN.items():
    try:
        _cls = timm_get_attn(_name)
    except AssertionError:  # an older timm without this name
        continue
    if _name == "ge" and _timm_ge_is_broken():
        _cls = GatherExcite
    register_attn(_name, family=_family, kind=_kind, paper=_paper, year=_year, attends=_attends,
                  cost=_cost, source="timm", cls=_cls)
