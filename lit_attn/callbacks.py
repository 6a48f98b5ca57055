"""Lightning callbacks: colour-coded mask writer for `predict`, a W&B validation panel, and (from
`lit_attn.checkpoints`) `RunCheckpoint`, a ModelCheckpoint with one folder per run.

`SegmentationMaskWriter` writes one palette PNG per predicted image at the input image's size, at the input's
relative path under `output_dir` (`a/x.jpg` -> `a/x.png`; `a/x.jpg.png` and `a/x.png.png` where two inputs share
a stem), and with `overlay=True` `<name>_overlay.png`: the image blended with the colour mask plus a legend.
`SegmentationPanel` logs, once per validation epoch, a few validation images with their
ground-truth and predicted masks (wandb.Image masks), a per-pixel map of what each lit_attn
block changed in the first image (||block(x) - x|| over channels, upsampled: where the
attention acts), and the per-class IoU table. It does nothing without a WandbLogger.
"""
from __future__ import annotations

import os
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import WandbLogger
from PIL import Image, ImageDraw, ImageFont

from .checkpoints import RunCheckpoint
from .data.datasets import CorruptImageError, load_image
from .data.meta import voc_colormap
from .registry import _REGISTRY

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _palette(trainer, n: int) -> list[tuple[int, int, int]]:
    pal = getattr(getattr(trainer, "datamodule", None), "palette", None)
    return [tuple(int(v) for v in c) for c in pal] if pal else voc_colormap(n)


__all__ = ["RunCheckpoint", "SegmentationMaskWriter", "SegmentationPanel", "lit_attn_blocks", "render_overlay"]


class SegmentationMaskWriter(BasePredictionWriter):
    """Write each prediction of `lit-attn predict` as a colour-coded palette PNG `<output_dir>/<name>.png`, where
    `name` is the sample's name (the input's path relative to the predicted folder, see the module docstring).
    Refuses a name that leaves `output_dir` and two predictions of one run under the same name.

    With `overlay=True` it also writes `<name>_overlay.png`: the input image (reloaded from the sample's `"path"`
    by `lit_attn.data.datasets.load_image`'s mode rule) blended with the colour mask,
    `round((1 - alpha) * image + alpha * colour)` (mmseg's `show_result`, opacity `alpha`), at the input's size,
    and on its right a legend panel (which widens the canvas, and lengthens it where the image is shorter than the
    list) with a swatch and the name of every class present (names from the task's `class_names`, else the data
    module's, else indices). A sample without a path gets no overlay (one warning). Each file is written to a
    hidden temporary file next to it and renamed, so a killed run leaves whole files only. Images the data set
    skipped (undecodable, see `ImageFolderPredictDataset`) get no file; the run ends with one warning naming
    them all."""

    def __init__(self, output_dir: str = "predictions", overlay: bool = False, alpha: float = 0.5):
        super().__init__(write_interval="batch")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"SegmentationMaskWriter: alpha must be in [0, 1], got {alpha}")
        self.output_dir = Path(output_dir)
        self.overlay, self.alpha = overlay, alpha
        self._written: set[Path] = set()
        self._skipped: list[tuple[str, str]] = []
        self._warned_no_path = False

    def on_predict_start(self, trainer, pl_module) -> None:
        self._written, self._skipped, self._warned_no_path = set(), [], False

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
        paths = batch.get("path") if isinstance(batch, dict) else None
        self._skipped += [(str(p), str(r)) for p, r in (batch.get("skipped", []) if isinstance(batch, dict) else [])]
        palette = _palette(trainer, pl_module.num_classes)
        flat = [v for rgb in palette for v in rgb]
        for i, (pred, name) in enumerate(zip(preds, names, strict=True)):
            mask = pred.cpu().numpy().astype(np.uint8)
            img = Image.fromarray(mask)
            img.putpalette(flat)
            _save_png_atomic(img, self.target(str(name)))
            if self.overlay:
                self._write_overlay(trainer, pl_module, mask, str(name), paths[i] if paths else None, palette)

    def _write_overlay(self, trainer, pl_module, mask: np.ndarray, name: str, source, palette) -> None:
        target = self.target(f"{name}_overlay")
        if source is None:
            if not self._warned_no_path:
                warnings.warn("SegmentationMaskWriter(overlay=True): the predicted samples have no 'path' (only "
                              "ImageFolderPredictDataset, i.e. predict_root, gives one), so no overlays are written",
                              stacklevel=2)
                self._warned_no_path = True
            return
        try:
            image = load_image(source)
        except CorruptImageError as e:  # decoded for the prediction, but changed since
            warnings.warn(f"SegmentationMaskWriter: no overlay for {name}: {e}", stacklevel=2)
            return
        if image.shape[:2] != mask.shape:
            warnings.warn(f"SegmentationMaskWriter: no overlay for {name}: {source} is now {image.shape[1]}x"
                          f"{image.shape[0]}, its mask {mask.shape[1]}x{mask.shape[0]}", stacklevel=2)
            return
        _save_png_atomic(render_overlay(image, mask, palette, _class_names(trainer, pl_module), self.alpha), target)

    def on_predict_end(self, trainer, pl_module) -> None:
        if self._skipped:
            listed = "\n".join(f"    {p}: {r}" for p, r in self._skipped)
            warnings.warn(f"SegmentationMaskWriter: {len(self._skipped)} image(s) could not be decoded and were "
                          f"skipped (no file written for them):\n{listed}", stacklevel=2)


def _class_names(trainer, pl_module) -> list[str]:
    names = getattr(pl_module, "class_names", None) or getattr(getattr(trainer, "datamodule", None), "class_names",
                                                               None)
    return [str(n) for n in names] if names else []


def render_overlay(image: np.ndarray, mask: np.ndarray, palette, class_names=(), alpha: float = 0.5) -> Image.Image:
    """`image` (H, W, 3) uint8 blended with the colours of `mask` (H, W) class indices,
    `floor((1 - alpha) * image + alpha * palette[mask] + 0.5)`, in the top-left (H, W) of an RGB canvas whose right
    panel lists, for every class present, a swatch of its colour and its name (`class_names[c]`, else `c`)."""
    colours = np.asarray([tuple(c) for c in palette] + voc_colormap(256)[len(palette):], dtype=np.float64)[:256]
    blend = np.floor((1 - alpha) * image.astype(np.float64) + alpha * colours[mask] + 0.5).astype(np.uint8)
    present = [int(c) for c in np.unique(mask)]
    labels = [class_names[c] if c < len(class_names) else str(c) for c in present]
    font = ImageFont.load_default()
    pad, sw = 4, 10
    boxes = [font.getbbox(t) for t in labels]
    row = max(sw, *(b[3] - b[1] for b in boxes)) + pad
    panel_w = pad + sw + pad + max(b[2] - b[0] for b in boxes) + pad
    h, w = mask.shape
    canvas = Image.new("RGB", (w + panel_w, max(h, pad + row * len(present))), (255, 255, 255))
    canvas.paste(Image.fromarray(blend), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, (c, text, box) in enumerate(zip(present, labels, boxes, strict=True)):
        x0, y0 = w + pad, pad + k * row
        draw.rectangle([x0, y0, x0 + sw - 1, y0 + sw - 1], fill=tuple(int(v) for v in colours[c]))
        draw.text((x0 + sw + pad - box[0], y0 + (sw - (box[3] - box[1])) // 2 - box[1]), text, fill=(0, 0, 0),
                  font=font)
    return canvas


def _save_png_atomic(image: Image.Image, path: Path) -> None:
    """Save `image` as PNG at `path` through a hidden temporary file in its folder, renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
