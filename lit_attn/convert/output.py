"""Writing a converted model: an smp `save_pretrained` folder with a JSON report (written to a temporary sibling and
checked to reload to the same tensors before it replaces anything), and a minimal Lightning checkpoint of
`SegmentationTask` for `lit-attn test|validate|predict --ckpt_path`. Shared by every converter."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from .errors import ConvertError

__all__ = ["check_out_dir", "save_folder", "save_lightning"]


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty folder without `overwrite`, as the output folder."""
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConvertError(f"{out}: folder exists and is not empty; choose another or pass --overwrite")


def save_folder(model: torch.nn.Module, report: dict[str, Any], report_name: str, out: Path,
                overwrite: bool) -> Path:
    """save_pretrained plus `report_name` (the report as JSON) into a temporary sibling folder, check that it reloads
    to the same tensors, then move it to `out` (an interrupted conversion leaves no half-written folder)."""
    import segmentation_models_pytorch as smp

    check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.converting-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        (tmp / report_name).write_text(json.dumps(report, indent=2, default=str) + "\n")
        reloaded = smp.from_pretrained(str(tmp))
        mine, theirs = model.state_dict(), reloaded.state_dict()
        if mine.keys() != theirs.keys() or any(not torch.equal(mine[k], theirs[k]) for k in mine):
            raise ConvertError(f"{out}: the saved folder does not reload to the converted weights")
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def save_lightning(model: torch.nn.Module, report: dict[str, Any], path: Path) -> None:
    """`{"state_dict": {"model.<key>": ...}, "pytorch-lightning_version": ..., "lit_attn_conversion": report}`: what
    `Trainer.test(ckpt_path=...)` restores into a SegmentationTask (written to a temporary file, then renamed)."""
    from importlib.metadata import version

    payload = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
               "pytorch-lightning_version": version("lightning"),
               "lit_attn_conversion": json.loads(json.dumps(report, default=str))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.converting-{uuid.uuid4().hex[:8]}"
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
