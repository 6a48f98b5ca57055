"""lit_attn's block names in timm's attention slots.

timm resolves `attn_layer="se"` through `timm.layers.create_attn.get_attn`, a closed if/elif
chain that about ten timm modules bind by name at import time (resnet, byobnet, cspnet,
efficientnet's builder, nfnet, gcvit, ...). `install()` rebinds `get_attn` in every loaded timm
module that holds timm's function to a wrapper that resolves the names in lit_attn's registry
(timm's own names map to timm's own classes there, except where a shim fixes a timm bug, see
`layers/timm_blocks.py`) and hands every other value (classes, partials, modules, bools) to timm's
function unchanged. An unknown name raises `UnknownAttnError` (a ValueError, and an AssertionError
as timm's own) with the close names; lit_attn's non-plug-in kinds are refused by name. It is guarded
by a timm version check and is idempotent.
"""
from __future__ import annotations

import importlib
import sys
import warnings
from functools import partial, wraps

import timm
import timm.layers.create_attn  # noqa: F401

from ..registry import _REGISTRY, CONV, HEAD, UPSAMPLE, AttnEntry, suggest

SUPPORTED_TIMM = ((1, 0), (2, 0))  # [min, max) major.minor
_timm_module = sys.modules["timm.layers.create_attn"]
timm_get_attn = getattr(_timm_module.get_attn, "__wrapped__", _timm_module.get_attn)
_WHY = {CONV: "it replaces a convolution; timm's byobnet `self_attn_layer` slot takes it",
        HEAD: "it needs extra inputs; lit_attn.heads use it", UPSAMPLE: "it changes the resolution"}


class UnknownAttnError(ValueError, AssertionError):
    """An unknown name in a timm attention slot (an AssertionError too, as timm's own "Invalid attn module")."""


def _not_plugin(entry: AttnEntry) -> ValueError:
    return ValueError(f"{entry.name!r} is a block of kind {entry.kind!r} ({_WHY[entry.kind]}), not a plug-in: timm's "
                      "attention slots take plug-in blocks (kind gate or global, lit_attn.list_attn(kind=('gate', "
                      "'global')))")


def _self_attn_only(entry: AttnEntry, cls):
    """A conv-kind block for byobnet's self-attention slot, the only timm slot that passes `stride`
    (byobnet.py `SelfAttnBlock`); refused in the attention slots."""
    def build(channels, *args, **kwargs):
        if "stride" not in kwargs:
            raise _not_plugin(entry)
        return cls(channels, *args, **kwargs)
    return build


@wraps(timm_get_attn)
def get_attn(attn_type):
    """timm's `get_attn`, extended with lit_attn's registered block names."""
    if not isinstance(attn_type, str):
        return timm_get_attn(attn_type)
    entry = _REGISTRY.get(attn_type.lower())
    if entry is not None:
        cls = partial(entry.cls, **entry.defaults) if entry.defaults else entry.cls
        if entry.plugin or entry.source != "lit_attn":
            return cls
        if entry.kind == CONV:
            return _self_attn_only(entry, cls)
        raise _not_plugin(entry)
    try:
        cls = timm_get_attn(attn_type)
    except AssertionError:
        cls = None
    if cls is None and attn_type:  # (None also under python -O, where timm's assert is gone)
        names = [n for n, e in _REGISTRY.items() if e.plugin or e.source != "lit_attn"]
        raise UnknownAttnError(f"Invalid attn module ({attn_type!r}): {attn_type!r} is not a known attention block "
                               f"of lit_attn or timm; {suggest(attn_type, names)}") from None
    return cls


def _timm_version() -> tuple[int, int]:
    parts = timm.__version__.split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def patched_modules() -> list[str]:
    """Names of the loaded timm modules whose `get_attn` is lit_attn's wrapper."""
    return sorted(n for n, m in list(sys.modules.items())
                  if n.startswith("timm") and m is not None and getattr(m, "get_attn", None) is get_attn)


def unpatched_modules() -> list[str]:
    """Loaded timm modules that still bind timm's original `get_attn`."""
    return sorted(n for n, m in list(sys.modules.items())
                  if n.startswith("timm") and m is not None and getattr(m, "get_attn", None) is timm_get_attn)


def install() -> list[str]:
    """Rebind `get_attn` in every loaded timm module; returns the patched module names."""
    lo, hi = SUPPORTED_TIMM
    if not lo <= _timm_version() < hi:
        warnings.warn(f"lit_attn: timm {timm.__version__} is outside the tested range "
                      f"[{lo[0]}.{lo[1]}, {hi[0]}.{hi[1]}); string block names are not installed in timm's "
                      "attention slots (pass the block classes instead)", stacklevel=2)
        return []
    importlib.import_module("timm.models")  # loads every model module that binds get_attn

    for name in unpatched_modules():
        sys.modules[name].get_attn = get_attn
    return patched_modules()
