"""Reading an mmsegmentation checkpoint without running any code from it.

Every file goes through `torch.load(..., weights_only=True)`. An mmseg checkpoint holds tensors, dicts, strings and
numbers; the only other objects met in real ones sit outside the weights: numpy scalars / arrays in `meta` (mmcv's
`hook_msgs`) and mmengine's `HistoryBuffer`s in a 1.x training checkpoint's `message_hub`. Those globals (module
`numpy`, `mmengine`, `mmcv` or `mmseg`) are allow-listed *under their names but bound to `Opaque`*, an inert class
of ours that records its arguments: the unpickler never imports or calls the real numpy / mmengine code, and the
values we read (the config text, the version strings, the tensors) are plain types anyway. torch's own
`TorchVersion` (a str) is allowed as itself. Any other global (a Lightning `AttributeDict`, `functools.partial`,
`os.system`, ...) is refused, naming it.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConvertError, CorruptCheckpointError, NotMMSegCheckpointError, NotPSACheckpointError

__all__ = ["MMSegCheckpoint", "Opaque", "load_mmseg_checkpoint", "read_checkpoint"]

# modules whose pickled objects may appear in an mmseg checkpoint's metadata; they are replaced by `Opaque`
_METADATA_MODULES = ("numpy", "mmengine", "mmcv", "mmseg")
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_LIGHTNING_KEYS = ("pytorch-lightning_version", "hyper_parameters", "loops", "lr_schedulers", "callbacks")


class Opaque:
    """Stands in for a numpy / mmengine object of a checkpoint's metadata: keeps what the pickle passed, runs
    nothing. `name` is the global it replaced (set on the per-name subclass)."""

    name = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.name} (not loaded)>"


_OPAQUE: dict[str, type] = {}


def _opaque(name: str) -> type:
    if name not in _OPAQUE:
        _OPAQUE[name] = type("Opaque", (Opaque,), {"name": name, "__module__": __name__})
    return _OPAQUE[name]


# harmless classes allowed as themselves: torch's version string (a str subclass some metadata records)
_HARMLESS = {"torch.torch_version.TorchVersion": torch.torch_version.TorchVersion}


def _is_metadata_global(name: str) -> bool:
    return name in _HARMLESS or name.split(".", 1)[0] in _METADATA_MODULES


def _allow(name: str):
    return _HARMLESS[name] if name in _HARMLESS else (_opaque(name), name)


def _refuse(path: str, names: list[str], source: str) -> ConvertError:
    if source == "psa":
        return NotPSACheckpointError(
            f"{path}: not an NVIDIA semantic-segmentation / PSA checkpoint: it pickles Python objects of "
            f"{', '.join(sorted(names))}, which those checkpoints do not hold (tensors, dicts, strings and numbers, "
            f"numpy values in their metadata). Refusing to unpickle them (torch.load weights_only=True).")
    return NotMMSegCheckpointError(
        f"{path}: not an mmseg checkpoint: it pickles Python objects of {', '.join(sorted(names))}, which an "
        f"mmsegmentation checkpoint does not hold (only tensors, dicts, strings and numbers, plus numpy / mmengine "
        f"values in its metadata). Refusing to unpickle them (torch.load weights_only=True).")


def _corrupt(path: str, err: BaseException) -> CorruptCheckpointError:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = text.split(". ")[0][:160]
    detail = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return CorruptCheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated, damaged or not a "
                                  f"torch.save file; {detail})")


def read_checkpoint(path: str | os.PathLike, source: str = "mmseg") -> Any:
    """`torch.load(path, weights_only=True)` with numpy / mmengine metadata objects read as `Opaque`; errors as
    `CorruptCheckpointError` (unreadable file) or, for other Python objects, `NotMMSegCheckpointError` (`source`
    "mmseg") / `NotPSACheckpointError` ("psa")."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CorruptCheckpointError(f"{path}: no such checkpoint file")
    needed: list[str] = []
    if zipfile.is_zipfile(path):
        try:  # the globals the pickle needs, read without unpickling anything
            needed = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception as e:  # noqa: BLE001 - a damaged archive: reported as such
            raise _corrupt(path, e) from None
    for _ in range(64):  # legacy (non-zip) files: learn the needed globals from the refusals, one at a time
        foreign = [n for n in needed if not _is_metadata_global(n)]
        if foreign:
            raise _refuse(path, foreign, source)
        try:
            with torch.serialization.safe_globals([_allow(n) for n in needed]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            m = _UNSUPPORTED_GLOBAL.search(str(e))
            if m is None or m.group(1) in needed:
                raise _corrupt(path, e) from None
            needed.append(m.group(1))
        except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError, ImportError,
                KeyError, IndexError, TypeError, UnicodeDecodeError) as e:
            raise _corrupt(path, e) from None
    raise _corrupt(path, RuntimeError("too many pickled globals"))


@dataclass
class MMSegCheckpoint:
    """An mmseg checkpoint's weights (`state_dict`, tensors only) and metadata (`meta`, {} for a bare state
    dict); `source` names where it came from (a path or "<dict>")."""

    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = "<dict>"


def _describe_keys(keys: list[str]) -> str:
    heads = sorted({k.split(".", 1)[0] for k in keys})
    shown = ", ".join(heads[:8]) + (", ..." if len(heads) > 8 else "")
    return f"{len(keys)} entries under {shown}"


def _looks_like_timm_or_torchvision(keys: list[str]) -> bool:
    return any(k.startswith(("conv1.", "layer1.", "stem.", "blocks.", "stages.", "patch_embed.")) for k in keys) \
        and not any(k.startswith("decode_head.") for k in keys)


def load_mmseg_checkpoint(source: str | os.PathLike | Mapping) -> MMSegCheckpoint:
    """Read and classify `source` (a path or an already loaded dict): an mmseg checkpoint `{"meta": ...,
    "state_dict": ...}` (0.x or 1.x, with or without training state), or a bare state dict with mmseg's
    `backbone.*` / `decode_head.*` keys. Anything else raises `NotMMSegCheckpointError` saying what it looks like;
    an unreadable file `CorruptCheckpointError`."""
    if isinstance(source, Mapping):
        obj, where = source, "<dict>"
    else:
        where = os.fspath(source)
        obj = read_checkpoint(source)
    if not isinstance(obj, Mapping):
        raise NotMMSegCheckpointError(f"{where}: not an mmseg checkpoint: it holds a {type(obj).__name__}, not a "
                                      f"dict with 'meta' and 'state_dict'")
    if any(k in obj for k in _LIGHTNING_KEYS):
        raise NotMMSegCheckpointError(
            f"{where}: not an mmseg checkpoint: it is a PyTorch Lightning checkpoint (keys "
            f"{', '.join(k for k in _LIGHTNING_KEYS if k in obj)}); lit-attn loads those directly "
            f"(lit-attn test --ckpt_path {where})")
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        state, meta = obj["state_dict"], obj.get("meta")
        meta = dict(meta) if isinstance(meta, Mapping) else {}
    elif all(isinstance(k, str) for k in obj) and any(str(k).startswith("decode_head.") for k in obj):
        state, meta = obj, {}
    else:
        keys = [str(k) for k in obj]
        what = ("a bare model state dict without mmseg's backbone.* / decode_head.* keys (a timm or torchvision "
                "model?)" if _looks_like_timm_or_torchvision(keys) else "no 'state_dict' entry")
        raise NotMMSegCheckpointError(f"{where}: not an mmseg checkpoint: {what}; it holds "
                                      f"{_describe_keys(keys)}")
    keys = [str(k) for k in state]
    if keys and all(k.startswith("module.") for k in keys):  # saved from a DataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
        keys = list(state)
    if not any(k.startswith("decode_head.") for k in keys) or not any(k.startswith("backbone.") for k in keys):
        what = ("a timm / torchvision style state dict" if _looks_like_timm_or_torchvision(keys)
                else f"its state_dict holds {_describe_keys(keys)}")
        raise NotMMSegCheckpointError(f"{where}: not an mmseg segmentor checkpoint (no backbone.* and "
                                      f"decode_head.* weights): {what}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise NotMMSegCheckpointError(f"{where}: state_dict entries that are not tensors: {', '.join(bad[:5])}")
    return MMSegCheckpoint(dict(state), meta, where if isinstance(where, str) else "<dict>")


