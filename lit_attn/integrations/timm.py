"""lit_attn's block names in timm's attention slots.

timm resolves `attn_layer="se"` through `timm.layers.create_attn.get_attn`, a closed if/elif
chain that about ten timm modules bind by name at import time (resnet, byobnet, cspnet,
efficientnet's builder, nfnet, gcvit, ...). `install()` rebinds `get_attn` in every loaded timm
module that holds timm's function to a wrapper that resolves the names in lit_attn's registry
(timm's own names map to timm's own classes there, except where a shim fixes a timm bug, see
`layers/timm_blocks.py`) and hands every other value (unknown strings, classes, partials,
modules, bools) to timm's function unchanged. It is guarded by a timm version check and is idempotent.
"""
from __future__ import annotations

import importlib
import sys
import warnings
from functools import partial, wraps

import timm
import timm.layers.create_attn  # noqa: F401

from ..registry import _REGISTRY

SUPPORTED_TIMM = ((1, 0), (2, 0))  # [min, max) major.minor
_timm_module = sys.modules["timm.layers.create_attn"]
timm_get_attn = getattr(_timm_module.get_attn, "__wrapped__", _timm_module.get_attn)


@wraps(timm_get_attn)
def get_attn(attn_type):
    """timm's `get_attn`, extended with lit_attn's registered block names."""
    if isinstance(attn_type, str):
        entry = _REGISTRY.get(attn_type.lower())
        if entry is not None:
            return partial(entry.cls, **entry.defaults) if entry.defaults else entry.cls
    return timm_get_attn(attn_type)


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
