"""Lightning callbacks: colour-coded mask writer for `predict`, a W&B validation panel, and (from
`lit_attn.checkpoints`) `RunCheckpoint`, a ModelCheckpoint with one folder per run.

`SegmentationMaskWriter` writes one palette PNG per predicted image at the input image's size, at the input's
relative path under `output_dir` (`a/x.jpg` -> `a/x.png`; `a/x.jpg.png` and `a/x.png.png` where two inputs share
a stem).
`SegmentationPanel` logs, once per validation epoch, a few validation images with their
ground-truth and predicted masks (wandb.Image masks), a per-pixel map of what each lit_attn
block changed in the first image (||block(x) - x|| over channels, upsampled: where the
attention acts), and the per-class IoU table. It does nothing without a WandbLogger.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from .checkpoints import RunCheckpoint
from .data.meta import voc_colormap
from .registry import _REGISTRY

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _palette(trainer, n: int) -> list[tuple[int, int, int]]:
    pal = getattr(getattr(trainer, "datamodule", None), "palette", None)
    return [tuple(int(v) for v in c) for c in pal] if pal else voc_colormap(n)


__all__ = ["RunCheckpoint", "SegmentationMaskWriter", "SegmentationPanel", "lit_attn_blocks"]


class SegmentationMaskWriter(BasePredictionWriter):
    """Write each prediction of `lit-attn predict` as a colour-coded palette PNG `<output_dir>/<name>.png`, where
    `name` is the sample's name (the input's path relative to the predicted folder, see the module docstring).
    Refuses a name that leaves `output_dir` and two predictions of one run under the same name."""

    def __init__(self, output_dir: str = "predictions"):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self._written: set[Path] = set()

    def on_predict_start(self, trainer, pl_module) -> None:
        self._written = set()

    def target(self, name: str) -> Path:
        root = self.output_dir.absolute()
        path = (root / f"{name}.png").resolve()
        if root.resolve() not in path.parents:
            raise ValueError(f"SegmentationMaskWriter: prediction name {name!r} leads outside {self.output_dir}")
        if path in self._written:
            raise ValueError(f"SegmentationMaskWriter: two predictions are named {name!r}; names must be unique")
        self._written.add(path)
        return path

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        preds = prediction["pred"]
        names = prediction.get("name") or [f"{batch_idx:06d}_{i}" for i in range(len(preds))]
        flat = [v for rgb in _palette(trainer, pl_module.num_classes) for v in rgb]
        for pred, name in zip(preds, names, strict=True):
            path = self.target(str(name))
            path.parent.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(pred.cpu().numpy().astype(np.uint8), mode="P")
            img.putpalette(flat)
            img.save(path)


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    mean = image.new_tensor(IMAGENET_MEAN)[:, None, None]
    std = image.new_tensor(IMAGENET_STD)[:, None, None]
    img = (image.float() * std + mean).clamp(0, 1)
    return (img.permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)


def lit_attn_blocks(model: torch.nn.Module):
    """(qualified name, module) of every lit_attn-registered block inside `model`."""
    classes = tuple({getattr(e.cls, "func", e.cls) for e in _REGISTRY.values() if isinstance(e.cls, type)})
    return [(n, m) for n, m in model.named_modules() if isinstance(m, classes)]


class SegmentationPanel(Callback):
    """Log validation images with masks, attention-effect maps and the per-class IoU table to W&B."""

    def __init__(self, num_images: int = 4, max_blocks: int = 4):
        self.num_images, self.max_blocks = num_images, max_blocks

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx != 0 or trainer.sanity_checking or not isinstance(trainer.logger, WandbLogger):
            return
        if trainer.global_rank != 0:
            return
        names = [str(n) for n in (pl_module.class_names or range(pl_module.num_classes))]
        labels = dict(enumerate(names))
        images = batch["image"][: self.num_images]
        masks = [{"predictions": {"mask_data": p.cpu().numpy().astype(np.uint8), "class_labels": labels},
                  "ground_truth": {"mask_data": g.cpu().numpy().astype(np.uint8), "class_labels": labels}}
                 for p, g in zip(outputs[: self.num_images], batch["mask"][: self.num_images], strict=True)]
        trainer.logger.log_image("val/predictions", images=[_to_uint8(i) for i in images], masks=masks,
                                 step=trainer.global_step)
        maps, captions = self.attention_maps(pl_module, images[0][None])
        if maps:
            trainer.logger.log_image("val/attention", images=maps, caption=captions, step=trainer.global_step)

    @torch.no_grad()
    def attention_maps(self, pl_module, image: torch.Tensor):
        """For each lit_attn block (up to max_blocks): ||block(x) - x|| over channels, as an image."""
        blocks = lit_attn_blocks(pl_module.model)[: self.max_blocks]
        captured, hooks = [], []
        for name, block in blocks:
            def hook(mod, inp, out, name=name):
                if isinstance(out, torch.Tensor) and out.shape == inp[0].shape:
                    captured.append((name, (out - inp[0]).float().norm(dim=1, keepdim=True)))
            hooks.append(block.register_forward_hook(hook))
        try:
            pl_module.model(image)
        finally:
            for h in hooks:
                h.remove()
        maps, captions = [], []
        for name, m in captured:
            m = F.interpolate(m, size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
            m = (m - m.min()) / (m.max() - m.min()).clamp(min=1e-12)
            maps.append((m.cpu().numpy() * 255).astype(np.uint8))
            captions.append(f"{name}: ||block(x) - x||")
        return maps, captions

    def on_validation_end(self, trainer, pl_module):  # after the module's epoch-end hook
        iou = getattr(pl_module, "per_class_iou", None)
        if trainer.sanity_checking or not iou or not isinstance(trainer.logger, WandbLogger):
            return
        if trainer.global_rank == 0:
            trainer.logger.log_table("val/per_class_iou", columns=["class", "IoU"],
                                     data=[[k, v] for k, v in iou.items()], step=trainer.global_step)
