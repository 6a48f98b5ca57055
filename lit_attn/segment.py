"""`segment_image`: one image in, its class-index mask out, with the same pipeline as `lit-attn predict`.

The model is an `nn.Module` (an smp model, any module returning logits, or a `SegmentationTask`), a Lightning
checkpoint of `SegmentationTask` trained through lit-attn's config files, or an smp `save_pretrained` folder (such as
`lit-attn convert` writes). Settings, each overridable by keyword:

- inference (`mode` whole / slide, `crop_size`, `stride`, `scales`, `flip`): the task's `test_*` hyper-parameters
  (a `SegmentationTask`, or a checkpoint's), else whole-image, one scale, no flip;
- preprocessing (`test_scale` keep-ratio resize, `mean`, `std`): the checkpoint's data module settings when it
  recorded them (Lightning saves the data module's hyper-parameters; the data module is rebuilt from them,
  without touching its data, to read its `test_scale` / `mean` / `std`), else no resize and ImageNet mean/std.

The image is decoded by `lit_attn.data.datasets.load_image`'s mode rule (grey, palette, CMYK, 16-bit -> RGB
8-bit, alpha dropped), normalised, resized, segmented, and its scores resized to the image's size before the
argmax (`lit_attn.tasks.inference.label_map`), as `SegmentationTask.predict_step` does, so the mask equals the
one `lit-attn predict` writes for that image. Checkpoints load with `weights_only=True` and are checked against the
rebuilt architecture (`lit_attn.checkpoints`); the classes the checkpoint's config names (task, model, data module)
are instantiated as `lit-attn ... --use_checkpoint_architecture true` does, so load only checkpoints whose
configs you would run. Cost: one load per call: for many images, load once (`SegmentationTask` or the smp folder's
model) and pass the module.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import tv_tensors

from .checkpoints import check_checkpoint_fits, load_checkpoint, load_model_weights
from .data.datasets import image_to_rgb, load_image
from .data.meta import IMAGENET_MEAN, IMAGENET_STD
from .data.transforms import build_eval_transform
from .tasks.inference import label_map, segment

__all__ = ["segment_image"]

RECORDED = "recorded"


def segment_image(model_or_checkpoint: nn.Module | str | os.PathLike,
                  image: str | os.PathLike | Image.Image | np.ndarray, *, device: str | torch.device = "cpu",
                  mode: str | None = None, crop_size=None, stride=None, scales=None, flip: bool | None = None,
                  test_scale: Any = RECORDED, mean=None, std=None) -> np.ndarray:
    """The `(H, W)` uint8 class-index mask of `image` at its own size (see the module docstring).

    Args:
        model_or_checkpoint: an `nn.Module` (put in eval mode for the call and moved to `device`), a Lightning
            checkpoint file of `SegmentationTask`, or an smp `save_pretrained` folder.
        image: an image file path, a PIL image, or an `(H, W, 3)` uint8 array (RGB).
        device: where the model runs.
        mode, crop_size, stride, scales, flip: inference settings (default: the task's, else whole image).
        test_scale: keep-ratio evaluation resize (`None`: none; default: the checkpoint's data module's, else none).
        mean, std: normalisation (default: the checkpoint's data module's, else ImageNet's).
    """
    rgb = _image_array(image)
    net, inference, data = _load(model_or_checkpoint)
    given = dict(mode=mode, crop_size=crop_size, stride=stride, scales=scales, flip=flip)
    inference.update({k: v for k, v in given.items() if v is not None})
    if "scales" in inference:
        inference["scales"] = tuple(inference["scales"])
    if test_scale != RECORDED:
        data["test_scale"] = test_scale
    data.update({k: v for k, v in dict(mean=mean, std=std).items() if v is not None})
    transform = build_eval_transform(data.get("test_scale"), data.get("mean", IMAGENET_MEAN),
                                     data.get("std", IMAGENET_STD))
    x, _ = transform(tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1).contiguous()))
    training = net.training
    net.eval().to(device)
    try:
        with torch.inference_mode():
            scores = segment(net, x[None].to(device), **inference)
            if scores.ndim != 4 or scores.shape[0] != 1:
                raise ValueError(f"segment_image: the model returned scores of shape {tuple(scores.shape)}; "
                                 f"expected (1, num_classes, h, w) logits")
            labels = label_map(scores[0], rgb.shape[:2])
    finally:
        net.train(training)
    if int(labels.max()) > 255:
        raise ValueError(f"segment_image: class {int(labels.max())} does not fit a uint8 mask (up to 256 classes)")
    return labels.to(torch.uint8).cpu().numpy()


def _image_array(image) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"segment_image: image {os.fspath(image)} does not exist (expected an image "
                                    "file, a PIL image or an (H, W, 3) uint8 array)")
        return load_image(image)
    if isinstance(image, Image.Image):
        return image_to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise ValueError(f"segment_image: an array image must be (H, W, 3) uint8 RGB, got shape {image.shape} "
                             f"dtype {image.dtype}" + ("; drop the alpha channel with image[..., :3]"
                                                       if image.ndim == 3 and image.shape[2] == 4 else ""))
        return image
    raise TypeError(f"segment_image: image must be a path, a PIL image or an (H, W, 3) uint8 array, got "
                    f"{type(image).__name__}")


def _load(source) -> tuple[nn.Module, dict, dict]:
    """(network, inference settings, data settings) of a module, a checkpoint file or an smp folder."""
    from .tasks.segmentation import SegmentationTask

    if isinstance(source, SegmentationTask):
        return source.model, source._inference_kwargs(), {}
    if isinstance(source, nn.Module):
        return source, {}, {}
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"segment_image: expected an nn.Module, a checkpoint path or an smp save_pretrained folder, "
                        f"got {type(source).__name__}")
    path = Path(source).expanduser()
    if path.is_dir():
        return _smp_folder(path), {}, {}
    if not path.is_file():
        raise FileNotFoundError(f"segment_image: {path} does not exist (expected a Lightning checkpoint of "
                                "SegmentationTask or an smp save_pretrained folder)")
    return _task_checkpoint(path)


def _import(class_path: str):
    module, _, name = str(class_path).rpartition(".")
    return getattr(importlib.import_module(module), name)


def _task_checkpoint(path: Path) -> tuple[nn.Module, dict, dict]:
    from lightning.pytorch.cli import instantiate_module

    from .data.segmentation import SegmentationDataModule
    from .tasks.segmentation import SegmentationTask

    checkpoint = load_checkpoint(path)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if "state_dict" not in checkpoint or not isinstance(hparams.get("model"), dict):
        raise ValueError(f"segment_image: {path} is not a Lightning checkpoint of a SegmentationTask built from a "
                         f"config (no model config in its hyper-parameters); build the model and pass the module")
    cls = _import(hparams.get("_class_path", "lit_attn.tasks.SegmentationTask"))
    if not (isinstance(cls, type) and issubclass(cls, SegmentationTask)):
        raise ValueError(f"segment_image: {path} holds a {cls!r}, not a SegmentationTask")
    hparams.pop("_instantiator", None)
    task = instantiate_module(SegmentationTask, hparams)
    check_checkpoint_fits(task, checkpoint, f"checkpoint {path}")
    task.load_state_dict(checkpoint["state_dict"], strict=True)
    data: dict = {}
    dm_hparams = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    dm_cls = _import(dm_hparams["_class_path"]) if "_class_path" in dm_hparams else None
    if isinstance(dm_cls, type) and issubclass(dm_cls, SegmentationDataModule):
        dm = dm_cls(**{k: v for k, v in dm_hparams.items() if not k.startswith("_")})
        data = {"test_scale": dm.test_scale, "mean": dm.mean, "std": dm.std}
    return task.model, task._inference_kwargs(), data


def _smp_folder(path: Path) -> nn.Module:
    import segmentation_models_pytorch as smp

    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"segment_image: {path} is a folder but not an smp save_pretrained folder (no "
                                "config.json)")
    config = json.loads(config_file.read_text())
    cls = getattr(smp, str(config.get("_model_class")), None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"segment_image: {config_file} names model class {config.get('_model_class')!r}, which "
                         "segmentation_models_pytorch does not have")
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    if "encoder_weights" in kwargs:
        kwargs["encoder_weights"] = None  # the folder holds the weights: never download them
    model = cls(**kwargs)
    load_model_weights(model, path)
    return model
