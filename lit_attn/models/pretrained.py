"""Pretrained weights for lit_attn's timm models: the trunk of a timm base model, and clear errors where
no weights exist.

A variant `<base>_<block>` (`lit_resnet`) is its timm base with attention blocks added; the base's
parameter names are unchanged. `mirror_pretrained_cfgs` gives the variant every pretrained tag timm has
for the base, read from timm's registry at import (so a newer timm's tags follow), with the base's cfg
(hf_hub_id / url, mean, std, input size, crop, interpolation, license, ...): `pretrained=True` fetches
the BASE checkpoint through timm's normal route (hub, url, or `pretrained_cfg_overlay=dict(file=...)`).

`TrunkFilter` is the `pretrained_filter_fn` that enforces the loading rule before timm loads: every
tensor of the base architecture must be in the checkpoint with the model's shape (a missing or
mis-shaped trunk key is a `PretrainedLoadError` naming it), the checkpoint has no tensor the model
lacks, and only the attention blocks' own tensors may be absent (they keep their init: the filter
passes the model's own tensors for them, so timm's strict load goes through). The classifier follows
timm's rule (dropped and re-initialised when num_classes differs from the checkpoint's, otherwise
loaded strictly), and the first conv may differ in input channels (timm adapts it to in_chans).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg, resolve_pretrained_cfg
from timm.models._pretrained import PretrainedCfg
from torch import nn

from ..registry import create_attn

__all__ = ["NoPublishedWeightsError", "PretrainedLoadError", "TrunkFilter", "block_is_identity_at_init",
           "describe_source", "mirror_pretrained_cfgs", "require_weights"]

_logger = logging.getLogger(__name__)
_MAX_KEYS = 8  # keys named in an error message


class PretrainedLoadError(RuntimeError):
    """A checkpoint that does not fit the variant's trunk (missing, mis-shaped or unexpected tensors)."""


class NoPublishedWeightsError(RuntimeError):
    """`pretrained=True` for a model that has no published weights and no file / state dict given."""


def _skip_reason(cfg: PretrainedCfg, default: PretrainedCfg) -> str | None:
    """Why a base tag cannot be mirrored (None: it can): the variant loads the checkpoint with timm's
    generic state-dict path, so it must be a native state dict whose head / stem names are the base's."""
    if not (cfg.url or cfg.hf_hub_id or cfg.file):
        return "no weights"
    if cfg.custom_load:
        return "custom_load (not a native state dict)"
    if cfg.classifier != default.classifier:
        return f"classifier {cfg.classifier!r} is not {default.classifier!r}"
    if cfg.first_conv != default.first_conv:
        return f"first_conv {cfg.first_conv!r} is not {default.first_conv!r}"
    return None


@functools.cache
def _base_cfgs(base: str) -> tuple[dict[str, PretrainedCfg], PretrainedCfg | None]:
    """timm's registered cfgs of `base` ("<base>.<tag>" -> cfg, default tag first) and its default cfg,
    read once per base (the variants of a base share them; `mirror_pretrained_cfgs` copies)."""
    cfgs = get_arch_pretrained_cfgs(base)
    return cfgs, (get_pretrained_cfg(base) if cfgs else None)


def mirror_pretrained_cfgs(base: str, variant: str, notes: tuple[str, ...] = (),
                           skipped: dict[str, str] | None = None) -> dict[str, PretrainedCfg]:
    """`{"<variant>.<tag>": cfg}` for every pretrained tag of timm's `base` whose checkpoint fits the
    variant's trunk, in timm's order; the base's default tag is marked default ("*"). `cfg` is the base's
    registered cfg (hf_hub_id completed to the base's "timm/<base>.<tag>", url, preprocessing, license)
    with `notes` appended. Tags left out go to `skipped` ({"<base>.<tag>": reason}). Empty when timm has
    no weights for `base`."""
    cfgs, default = _base_cfgs(base)
    if not cfgs:
        return {}
    out: dict[str, PretrainedCfg] = {}
    for name, cfg in cfgs.items():
        tag = cfg.tag or ""
        reason = _skip_reason(cfg, default)
        if reason is not None or not tag:
            if skipped is not None:
                skipped[name] = reason or "untagged cfg"
            continue
        mirrored = dataclasses.replace(cfg, architecture=None, tag=None, notes=tuple(cfg.notes or ()) + notes)
        is_default = tag == default.tag
        out[f"{variant}.{tag}{'*' if is_default else ''}"] = mirrored
    return out


def describe_source(cfg: dict[str, Any]) -> str:
    """Where timm loads a pretrained cfg's weights from (timm's own resolution order when available)."""
    try:
        from timm.models._builder import _resolve_pretrained_source
        load_from, loc = _resolve_pretrained_source(cfg)
    except (ImportError, AssertionError, RuntimeError):
        load_from, loc = "", ""
    if not load_from:
        for key in ("state_dict", "file", "hf_hub_id", "url"):
            if cfg.get(key):
                load_from, loc = key, cfg[key]
                break
    if load_from == "state_dict":
        return "a state dict (pretrained_cfg_overlay)"
    if load_from == "hf-hub":
        return "hf-hub:" + ("/".join(loc) if isinstance(loc, (tuple, list)) else str(loc))
    return str(loc) if loc else "an unknown source"


def _names(keys, limit: int = _MAX_KEYS) -> str:
    keys = list(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


class TrunkFilter:
    """`pretrained_filter_fn` for a variant: checks a base checkpoint against the loading rule (see the
    module docstring) and completes it with the model's own tensors for the attention blocks, so that
    timm's strict load keeps their init. `block_prefixes(model)` names the attention blocks' modules.
    After the load, `summary()` is the log line (`log()` writes it)."""

    def __init__(self, variant: str, base: str, blocks: str, block_prefixes: Callable[[nn.Module], list[str]]):
        self.variant, self.base, self.blocks = variant, base, blocks
        self.block_prefixes = block_prefixes
        self.stats: dict[str, Any] | None = None

    def __call__(self, state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        own = model.state_dict()
        cfg = getattr(model, "pretrained_cfg", None) or {}
        source = describe_source(cfg)
        prefixes = tuple(p + "." for p in self.block_prefixes(model))
        heads = cfg.get("classifier") or ()
        heads = (heads,) if isinstance(heads, str) else tuple(heads)
        head_keys = {h + suffix for h in heads for suffix in (".weight", ".bias")}  # what timm drops or keeps
        first_convs = cfg.get("first_conv") or ()
        first_convs = {f + ".weight" for f in ((first_convs,) if isinstance(first_convs, str) else first_convs)}

        def is_block(k: str) -> bool:
            return k.startswith(prefixes)

        def is_head(k: str) -> bool:  # timm's rule decides (kept strictly, or dropped when num_classes differs)
            return k in head_keys

        def fits(k: str) -> bool:
            a, b = tuple(getattr(state_dict[k], "shape", ())), tuple(own[k].shape)
            if k in first_convs and len(a) == len(b) == 4 and a[:1] + a[2:] == b[:1] + b[2:]:
                return True  # other input channels: timm adapts the stem (in_chans)
            return a == b

        trunk = [k for k in own if not is_block(k) and not is_head(k)]
        # BatchNorm fills a missing counter itself (older checkpoints, e.g. torchvision's, have none)
        missing = [k for k in trunk if k not in state_dict and not k.endswith(".num_batches_tracked")]
        unexpected = [k for k in state_dict if k not in own and not is_head(k)]
        misshaped = [k for k in state_dict if k in own and not is_head(k) and not fits(k)]
        problems = []
        if missing:
            problems.append(f"{len(missing)} trunk tensor(s) of {self.base} missing from the checkpoint: "
                            f"{_names(missing)}")
        if misshaped:
            problems.append(f"{len(misshaped)} tensor(s) with a shape other than the model's: " + _names(
                f"{k} {tuple(state_dict[k].shape)} (model: {tuple(own[k].shape)})" for k in misshaped))
        if unexpected:
            problems.append(f"{len(unexpected)} tensor(s) the model does not have: {_names(unexpected)}")
        if problems:
            raise PretrainedLoadError(
                f"{self.variant}: the checkpoint ({source}) does not fit the {self.base} trunk: "
                + "; ".join(problems) + f". Every tensor of {self.base} must load; only the {self.blocks}' own "
                "tensors may be absent (they keep their init).")
        out = dict(state_dict)
        fresh = [k for k in own if is_block(k) and k not in state_dict]
        for k in fresh + [k for k in trunk if k not in state_dict]:  # block init, BN counters
            out[k] = own[k]
        self.stats = dict(source=source, trunk=sum(k in state_dict for k in trunk), fresh=len(fresh),
                          blocks_loaded=sum(1 for k in state_dict if is_block(k)),
                          head=[k for k in state_dict if is_head(k)],
                          num_classes=getattr(model, "num_classes", None), ckpt_classes=cfg.get("num_classes"))
        return out

    def summary(self, features_only: bool = False) -> str:
        s = self.stats
        if s is None:
            return f"{self.variant}: no pretrained weights loaded"
        head_kept = (not features_only and s["head"] and s["num_classes"] == s["ckpt_classes"])
        trunk = s["trunk"] + (len(s["head"]) if head_kept else 0)
        line = (f"{self.variant}: loaded {trunk} trunk tensors from {s['source']}; {s['fresh']} tensors of the "
                f"{self.blocks} keep their init")
        if s["blocks_loaded"]:
            line += f" ({s['blocks_loaded']} block tensors loaded from the checkpoint)"
        if s["head"] and not head_kept and not features_only:
            line += (f"; classifier re-initialised (num_classes={s['num_classes']}, checkpoint: "
                     f"{s['ckpt_classes']})")
        return line

    def log(self, features_only: bool = False) -> None:
        _logger.info(self.summary(features_only))


def _has_source(cfg: PretrainedCfg) -> bool:
    return bool(cfg.url or cfg.file or cfg.hf_hub_id or cfg.state_dict)


def require_weights(variant: str, kwargs: dict[str, Any], why: str, todo: str) -> None:
    """Raise `NoPublishedWeightsError` when `pretrained=True` would find no weights for `variant`: its
    pretrained cfg (tag, `pretrained_cfg`, `pretrained_cfg_overlay` in `kwargs`) has no url, hub id,
    file or state dict. `why`: why none exist; `todo`: what to do instead."""
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"),
                                 pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"))
    if not _has_source(cfg):
        raise NoPublishedWeightsError(
            f"{variant}: no published pretrained weights exist ({why}). {todo} Your own checkpoint (a state dict "
            f"in .pth or .safetensors) loads with timm.create_model({variant!r}, pretrained=True, "
            "pretrained_cfg_overlay=dict(file='path/to/checkpoint.safetensors')) (add num_classes=K to the overlay for "
            "a checkpoint with a K-class head); pretrained=False for random init.")


def block_is_identity_at_init(name: str, channels: int = 64, size: int = 8, seed: int = 0) -> bool:
    """Whether the registered plug-in block `name`, built with its default init for `channels` channels,
    returns its input exactly (eval mode, a random (2, channels, size, size) input). Uses a forked RNG,
    so the caller's random state is untouched."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        block = create_attn(name, channels).eval()
        x = torch.randn(2, channels, size, size)
        y = block(x)
        return isinstance(y, torch.Tensor) and torch.equal(y, x)
