"""One registry of attention blocks: name -> class + metadata.

`register_attn` files a block class (ours or timm's) under a lower-case name with its family,
kind, paper and cost; `create_attn(name, channels, **kwargs)` builds it with channels first, as
timm's `create_attn` does; `list_attn()` lists the names, filtered by kind/family/pattern.
"""
from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from timm.layers import register_notrace_module
from torch import nn

# kinds of block, following how the block is placed in a network
GATE = "gate"            # plug-in: rescales features (SE, CBAM, PSA, ...), cheap
GLOBAL = "global"        # plug-in: global context / self-attention over positions (non-local, DANet, ...)
CONV = "conv"            # replaces a convolution: (in_channels, out_channels, kernel_size, ...)
HEAD = "head"            # only used inside a segmentation head (needs extra inputs)
UPSAMPLE = "upsample"    # content-aware upsampler: (B, C, H, W) -> (B, C, sH, sW) (CARAFE)
KINDS = (GATE, GLOBAL, CONV, HEAD, UPSAMPLE)
PLUGIN_KINDS = (GATE, GLOBAL)


@dataclass(frozen=True)
class AttnEntry:
    name: str
    cls: Callable[..., nn.Module]
    family: str
    kind: str
    paper: str
    year: int
    attends: str
    cost: str
    source: str = "lit_attn"          # "lit_attn" or "timm"
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def plugin(self) -> bool:
        return self.kind in PLUGIN_KINDS

    def build(self, channels: int, **kwargs) -> nn.Module:
        return self.cls(channels, **{**self.defaults, **kwargs})


_REGISTRY: dict[str, AttnEntry] = {}


# lit_attn blocks that torch.jit.script does not compile (README "Export, FX, TorchScript" lists them with the
# reasons); every other lit_attn block scripts and matches eager (tests/test_block_contracts.py checks both). Empty:
# every block scripts now; a block added with Python-only code goes here (and AttnFCN's flag follows)
NOT_SCRIPTABLE: frozenset[str] = frozenset()


def register_attn(name: str, *, family: str, kind: str, paper: str, year: int, attends: str, cost: str,
                  source: str = "lit_attn", cls: Callable[..., nn.Module] | None = None, **defaults):
    """Register a block under `name`. Use as a decorator, or pass `cls=` for an existing class.

    `defaults` are keyword arguments bound at build time (e.g. `mode="dot"` for a variant).
    """
    if kind not in KINDS:
        raise ValueError(f"register_attn({name!r}): kind must be one of {KINDS}, got {kind!r}")
    key = name.lower()

    def add(c):
        if key in _REGISTRY and _REGISTRY[key].cls is not c:
            raise ValueError(f"attention name {key!r} is already registered to {_REGISTRY[key].cls}")
        _REGISTRY[key] = AttnEntry(key, c, family, kind, paper, year, attends, cost, source, dict(defaults))
        if source == "lit_attn" and isinstance(c, type) and issubclass(c, nn.Module):
            # a leaf for timm's FX feature extraction (torch.fx cannot trace the blocks' shape checks, size
            # arithmetic and custom autograd functions; the leaf runs eagerly inside the traced graph)
            register_notrace_module(c)
        return c

    return add(cls) if cls is not None else add


def suggest(name: str, names=None) -> str:
    """'did you mean ...?' with the registered names (or `names`) close to `name`; all of them if none is."""
    names = sorted(_REGISTRY) if names is None else sorted(names)
    close = difflib.get_close_matches(str(name).lower(), names, n=4)
    if close:
        return f"did you mean {', '.join(map(repr, close))}? (all names: lit_attn.list_attn())"
    return f"known: {', '.join(names)}"


def get_attn_entry(name: str) -> AttnEntry:
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise KeyError(f"unknown attention block {name!r}; {suggest(name)}") from None


def is_attn(name: str) -> bool:
    return isinstance(name, str) and name.lower() in _REGISTRY


def list_attn(pattern: str = "*", *, kind: str | tuple[str, ...] | None = None, family: str | None = None,
              source: str | None = None) -> list[str]:
    """Sorted registered names matching a glob `pattern`, optionally filtered by kind/family/source."""
    kinds = (kind,) if isinstance(kind, str) else kind
    return sorted(
        e.name for e in _REGISTRY.values()
        if fnmatch.fnmatch(e.name, pattern)
        and (kinds is None or e.kind in kinds)
        and (family is None or e.family == family)
        and (source is None or e.source == source)
    )


def create_attn(name: str | type | nn.Module, channels: int, **kwargs) -> nn.Module:
    """Build the block registered as `name` (or a class / ready module) for `channels` channels."""
    if isinstance(name, nn.Module):
        return name
    if isinstance(name, str):
        return get_attn_entry(name).build(channels, **kwargs)
    return name(channels, **kwargs)
