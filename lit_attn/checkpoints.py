"""Checkpoints that are never lost, never half-written and never loaded into the wrong model.

- `RunCheckpoint`: Lightning's ModelCheckpoint with one folder per `fit`, `<dirpath>/version_<N>/`, so a second
  run never overwrites the first one's `best`/`last` files.
- `find_checkpoint(dirpath, "best" | "last")`: what `--ckpt_path best|last` means: the newest run folder (highest
  N) holding such a file; `last` is its newest `last*.ckpt` (as Lightning's fit picks), `best` the file its
  ModelCheckpoint recorded as best (else its newest `best*.ckpt`). A flat `dirpath` without run folders works too.
- `AtomicCheckpointIO`: writes each checkpoint to a temporary file next to the target, fsyncs and renames it, so
  a kill leaves the previous file intact on every file system (Lightning's fsspec transaction makes its temporary
  file in `$TMPDIR`; from another file system the final "rename" is a copy that a kill truncates).
- `check_checkpoint_fits(module, checkpoint)`: a short error naming both architectures when a checkpoint was
  trained with another model than the one it is loaded into (called by the tasks' `on_load_checkpoint`).
- `load_model_weights(model, path)`: weights to start a training from (`SegmentationTask(init_weights=...)`): an
  smp `save_pretrained` folder (e.g. written by `lit-attn convert`), a `.safetensors` / `.pth` state dict, or a
  Lightning checkpoint, loaded strictly; an smp folder's config.json must agree with the model's.

Every load here uses `torch.load(..., weights_only=True)`: no code runs from a checkpoint file.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "CheckedLoading", "CheckpointMismatchError", "RunCheckpoint", "check_checkpoint_fits",
           "find_checkpoint", "load_checkpoint", "load_model_weights"]

RUN_DIR = re.compile(r"version_(\d+)")
ARCH_OPT_IN = "--use_checkpoint_architecture true"


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model it is loaded into."""


def load_checkpoint(path: str | os.PathLike, mmap: bool = True) -> dict[str, Any]:
    """A Lightning checkpoint as a dict of tensors and plain values (`weights_only=True`; memory-mapped)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


# ---------------------------------------------------------------------------------------------- run folders
def run_dirs(root: str | os.PathLike) -> list[Path]:
    """The `version_<N>` folders under `root`, newest (highest N) first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := RUN_DIR.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def new_run_dir(root: str | os.PathLike) -> Path:
    """Create and return `<root>/version_<N>`, N one above the highest existing (safe against concurrent fits)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    while True:
        existing = run_dirs(root)
        n = int(RUN_DIR.fullmatch(existing[0].name).group(1)) + 1 if existing else 0
        try:
            (root / f"version_{n}").mkdir()
            return root / f"version_{n}"
        except FileExistsError:
            continue


def _recorded_best(folder: Path) -> Path | None:
    """The best file named by the ModelCheckpoint state of the folder's newest checkpoint, if it is in `folder`."""
    ckpts = sorted(folder.glob("*.ckpt"), key=os.path.getmtime, reverse=True)
    if not ckpts:
        return None
    try:
        states = load_checkpoint(ckpts[0]).get("callbacks", {})
    except Exception:  # an unreadable newest file: fall back to the file names
        return None
    for state in states.values():
        best = state.get("best_model_path") if isinstance(state, dict) else None
        if best and (folder / Path(best).name).is_file():
            return folder / Path(best).name
    return None


def _in_folder(folder: Path, which: str) -> Path | None:
    if which == "best":
        recorded = _recorded_best(folder)
        if recorded is not None:
            return recorded
    files = [p for p in folder.glob(f"{which}*.ckpt") if p.is_file()]
    return max(files, key=os.path.getmtime) if files else None


def find_checkpoint(dirpath: str | os.PathLike, which: str) -> Path | None:
    """`best` or `last` checkpoint of the newest run under `dirpath` (see the module docstring); None if none."""
    if which not in ("best", "last"):
        raise ValueError(f"find_checkpoint: which must be 'best' or 'last', got {which!r}")
    for folder in [*run_dirs(dirpath), Path(dirpath)]:
        found = _in_folder(folder, which) if folder.is_dir() else None
        if found is not None:
            return found
    return None


class RunCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` that writes every `fit` into its own folder `<dirpath>/version_<N>/` (N = one above the
    highest existing), so `best`/`last` of earlier runs are never overwritten; a resumed fit is a new run folder
    too (its best is tracked from the resume point). Same arguments as ModelCheckpoint; `dirpath` must be a local
    folder. `lit-attn ... --ckpt_path best|last` resolve through `find_checkpoint(dirpath, ...)`."""

    def __init__(self, dirpath: str | os.PathLike | None = None, *args, **kwargs):
        if dirpath is not None and not _is_local_file_protocol(str(dirpath)):
            raise ValueError(f"RunCheckpoint needs a local dirpath, got {dirpath!r}; use ModelCheckpoint for remote "
                             "storage")
        super().__init__(dirpath, *args, **kwargs)
        self.run_root = self.dirpath

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath", self.dirpath) != self.dirpath:  # another run's folder: a new run by design
            self.best_model_path = state_dict.get("best_model_path", self.best_model_path)
            return
        super().load_state_dict(state_dict)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self.run_root is not None:
            run = str(new_run_dir(self.run_root)) if trainer.is_global_zero else None
            self.dirpath = trainer.strategy.broadcast(run)
        super().setup(trainer, pl_module, stage)


# ---------------------------------------------------------------------------------------------- atomic saves
def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves are atomic on every file system: the checkpoint is written to a hidden
    temporary file in the target's folder (`.<name>.tmp-<pid>-<id>`), flushed to disk and renamed over the target,
    so a kill at any moment leaves either the old or the new complete file. A failed save removes its temporary
    file; one left by a killed process is removed by the next save of the same target. Remote paths use
    Lightning's implementation. `lit-attn` installs it unless the config sets another CheckpointIO plugin."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path).absolute()
        target.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{target.name}.tmp-"
        for stale in target.parent.glob(f"{prefix}*"):
            stale.unlink(missing_ok=True)
        tmp = target.parent / f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for torch.save
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)


# ---------------------------------------------------------------------------------------------- compatibility
def _plain(value: Any) -> Any:
    """JSON-normal form (tuples -> lists, None-valued keys dropped) so YAML and Python configs compare equal."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return json.loads(json.dumps(value, default=str))


def architecture(hparams: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any] | None:
    """The hyper-parameters that define a task's network: its class and `keys` (None if they were not saved)."""
    if not hparams or not any(k in hparams for k in keys):
        return None
    return _plain({"class_path": hparams.get("_class_path"), **{k: hparams.get(k) for k in keys}})


def _diff(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(key, a's value, b's value) where both set a key to different values; a key set on one side only is not
    compared (an argument added to a class since the checkpoint; the state-dict check still sees real changes)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) & set(b), key=str):
            out += _diff(a[k], b[k], f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [(prefix, a, b)]


def _model_name(arch: dict[str, Any]) -> str:
    model = arch.get("model")
    name = model.get("class_path") if isinstance(model, dict) else model
    return str(name or arch.get("class_path"))


def check_checkpoint_fits(module: torch.nn.Module, checkpoint: dict[str, Any], where: str = "the checkpoint",
                          arch_keys: tuple[str, ...] = ("model",)) -> None:
    """Raise `CheckpointMismatchError` with a short message when `checkpoint` (a Lightning checkpoint dict) was
    trained with another architecture than `module`'s (compared on the saved model config when both have one), or
    when its state dict does not fit (missing / unexpected keys, other shapes)."""
    saved = architecture(checkpoint.get("hyper_parameters", {}), arch_keys)
    current = architecture(dict(getattr(module, "hparams", {})), arch_keys)
    diffs = _diff(saved, current) if saved is not None and current is not None else []
    if diffs:
        shown = "\n".join(f"    {k}: checkpoint {a!r}, config {b!r}" for k, a, b in diffs[:6])
        more = f"\n    ... and {len(diffs) - 6} more" if len(diffs) > 6 else ""
        raise CheckpointMismatchError(
            f"{where} holds a {_model_name(saved)} but the config builds a {_model_name(current)}; they differ in\n"
            f"{shown}{more}\nUse the config the checkpoint was trained with, or build the checkpoint's own "
            f"architecture (lit-attn: {ARCH_OPT_IN}).")
    state = checkpoint.get("state_dict")
    if state is None:
        return
    own = module.state_dict()
    strict = getattr(module, "strict_loading", True)
    missing = [k for k in own if k not in state] if strict else []
    unexpected = [k for k in state if k not in own] if strict else []
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} model keys missing from it (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} keys the model does not have (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} of other shapes (e.g. " + ", ".join(
                f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)}" for k in shapes[:2]) + ")")
        raise CheckpointMismatchError(
            f"{where} does not fit the model {type(module).__name__}: " + "; ".join(parts)
            + f". It was trained with another architecture: use its config (lit-attn: {ARCH_OPT_IN}).")


class CheckedLoading:
    """LightningModule mixin: loading a checkpoint (`Trainer(ckpt_path=...)`, `load_from_checkpoint`) first runs
    `check_checkpoint_fits` on the hyper-parameters named in `architecture_hparams`."""

    architecture_hparams: tuple[str, ...] = ("model",)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = getattr(self, "_trainer", None)
        path = trainer.ckpt_path if trainer is not None else None
        check_checkpoint_fits(self, checkpoint, f"checkpoint {path}" if path else "the checkpoint",
                              self.architecture_hparams)


def _state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = load_checkpoint(path, mmap=False)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a Lightning checkpoint
        state = {k[len("model."):]: v for k, v in state["state_dict"].items() if k.startswith("model.")}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatchError(f"{path} is not a state dict of tensors (nor a Lightning checkpoint)")
    return state


def load_model_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load `path` (see the module docstring) into `model` strictly; `CheckpointMismatchError` naming what differs."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        if not files:
            raise FileNotFoundError(f"init weights {path}: a folder needs model.safetensors (smp save_pretrained)")
        saved = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        own = dict(getattr(model, "_hub_mixin_config", None) or {})
        diffs = [(k, saved[k], own[k]) for k in sorted(set(saved) & set(own))
                 if k != "encoder_weights" and _plain(saved[k]) != _plain(own[k])]
        cls = saved.get("_model_class")
        if cls and cls != type(model).__name__:
            diffs.insert(0, ("model class", cls, type(model).__name__))
        if diffs:
            raise CheckpointMismatchError(f"init weights {path} were saved for another model: " + "; ".join(
                f"{k}: saved {a!r}, model {b!r}" for k, a, b in diffs[:6]))
        path = files[0]
    elif not path.is_file():
        raise FileNotFoundError(f"init weights {path}: no such file or folder")
    state = _state_dict_file(path)
    check_checkpoint_fits(model, {"state_dict": state}, f"init weights {path}")
    model.load_state_dict(state, strict=True)
