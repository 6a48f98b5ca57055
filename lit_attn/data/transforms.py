"""Joint image/mask transforms for segmentation (torchvision.transforms.v2), after mmseg's pipelines.

Samples travel as ``{"image": tv_tensors.Image (3, H, W) uint8, "mask": tv_tensors.Mask (H, W) int64}``; the
geometric transforms are applied to both (antialiased bilinear for the image, pixel-centred nearest for the mask),
the photometric ones and the normalisation to the image only. The output is
``{"image": float32 (3, h, w) normalised, "mask": int64 (h, w)}`` as plain tensors (``255`` = ignore).

Training (mmseg's train pipeline)::

    RandomScaleResize(scale, ratio_range)      # mmseg RandomResize(scale, ratio_range, keep_ratio=True)
    RandomCropPad(crop_size, cat_max_ratio)    # mmseg RandomCrop + Pad (image pad 0, mask pad 255)
    RandomHorizontalFlip(hflip_prob)
    ToDtype(float32, scale=True)
    PhotoMetricDistortion()                    # brightness / contrast / saturation / hue, each with p = 0.5
    Normalize(ImageNet mean, std)

Evaluation (mmseg's test pipeline): ``ScaleResize(scale)`` on the image only (keep the aspect ratio, fit the long
edge into ``max(scale)`` and the short edge into ``min(scale)``), normalise; the mask stays at the original
resolution, so metrics are computed at full resolution (the task resizes logits to the label size).

Difference from mmseg: mmseg resizes label maps with OpenCV's ``INTER_NEAREST``, which takes source pixel
``floor(dst * in / out)`` while the bilinear image resize samples at pixel centres, ``(dst + 0.5) * in / out - 0.5``;
labels then lag the image by up to half an output pixel (at 1.6x, a class border lands one pixel late in every other
block). Masks here use ``nearest-exact`` (source ``floor((dst + 0.5) * in / out)``), the same pixel-centred grid as the
image, so each label is the class of the source pixel the image pixel is centred on.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .meta import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "PhotoMetricDistortion",
    "RandomCropPad",
    "RandomScaleResize",
    "ScaleResize",
    "SegmentationTransform",
    "build_eval_transform",
    "build_train_transform",
    "rescale_size",
]


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    x = tuple(int(v) for v in x)
    if len(x) != 2:
        raise ValueError(f"expected an int or a pair of ints, got {x}")
    return x  # type: ignore[return-value]


def rescale_size(h: int, w: int, scale: int | Sequence[int], ratio: float = 1.0) -> tuple[int, int]:
    """mmcv's ``imrescale`` with ``keep_ratio=True``: the largest size with the image's aspect ratio whose long
    edge is at most ``max(scale) * ratio`` and short edge at most ``min(scale) * ratio`` (scales up or down)."""
    s0, s1 = _pair(scale)
    max_long, max_short = max(s0, s1) * ratio, min(s0, s1) * ratio
    factor = min(max_long / max(h, w), max_short / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def _resize(inpt: Any, size: tuple[int, int]) -> Any:
    """Resize an image (antialiased bilinear) or a mask (pixel-centred nearest, see the module docstring)."""
    if tuple(inpt.shape[-2:]) == tuple(size):
        return inpt
    if isinstance(inpt, tv_tensors.Mask):
        mask = inpt.as_subclass(torch.Tensor)
        out = F.resize_image(mask.unsqueeze(0) if mask.ndim == 2 else mask, list(size),
                             interpolation=v2.InterpolationMode.NEAREST_EXACT)
        return tv_tensors.wrap(out.reshape(*mask.shape[:-2], *size), like=inpt)
    return F.resize(inpt, size=list(size), antialias=True)


def _image_size(flat_inputs: list[Any]) -> tuple[int, int]:
    for inpt in flat_inputs:
        if isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            return int(inpt.shape[-2]), int(inpt.shape[-1])
    raise TypeError("expected a tv_tensors.Image or tv_tensors.Mask in the sample")


class _Transform(v2.Transform):
    """v2.Transform with the pre-0.21 private method names aliased (torchvision >= 0.19)."""

    def _get_params(self, flat_inputs: list[Any]) -> dict[str, Any]:  # torchvision < 0.21
        return self.make_params(flat_inputs)

    def _transform(self, inpt: Any, params: dict[str, Any]) -> Any:  # torchvision < 0.21
        return self.transform(inpt, params)


class RandomScaleResize(_Transform):
    """mmseg's ``RandomResize(scale, ratio_range, keep_ratio=True)``: draw ``r ~ U(ratio_range)`` and rescale so the
    image fits ``scale * r`` keeping its aspect ratio. ``ratio_range=None`` rescales to ``scale`` itself."""

    _transformed_types = (tv_tensors.Image, tv_tensors.Mask)

    def __init__(self, scale: int | Sequence[int], ratio_range: Sequence[float] | None = (0.5, 2.0)) -> None:
        super().__init__()
        self.scale = _pair(scale)
        self.ratio_range = tuple(ratio_range) if ratio_range is not None else None

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _image_size(flat_inputs)
        ratio = 1.0 if self.ratio_range is None else random.uniform(*self.ratio_range)
        return {"size": rescale_size(h, w, self.scale, ratio)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return _resize(inpt, params["size"])


class ScaleResize(_Transform):
    """Deterministic keep-ratio rescale to ``scale`` (mmseg's test ``Resize(scale, keep_ratio=True)``).
    ``image_only=True`` (evaluation) leaves the mask at its original resolution."""

    def __init__(self, scale: int | Sequence[int], image_only: bool = True) -> None:
        super().__init__()
        self.scale = _pair(scale)
        self.image_only = image_only
        self._transformed_types = (tv_tensors.Image,) if image_only else (tv_tensors.Image, tv_tensors.Mask)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _image_size(flat_inputs)
        return {"size": rescale_size(h, w, self.scale)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return _resize(inpt, params["size"])


class RandomCropPad(_Transform):
    """mmseg's ``RandomCrop(crop_size, cat_max_ratio)`` followed by ``Pad(size=crop_size)``.

    Crops a random ``min(crop, size)`` window; with ``cat_max_ratio < 1`` it retries up to 10 times until no single
    class (ignoring ``ignore_index``) covers more than that fraction of the crop. Then pads at the bottom / right to
    ``crop_size``: image with ``image_fill`` (0), mask with ``ignore_index`` (255).
    """

    _transformed_types = (tv_tensors.Image, tv_tensors.Mask)

    def __init__(self, crop_size: int | Sequence[int], cat_max_ratio: float = 1.0, image_fill: float = 0,
                 ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.crop_size = _pair(crop_size)
        self.cat_max_ratio = float(cat_max_ratio)
        self.image_fill = image_fill
        self.ignore_index = ignore_index

    def _draw(self, h: int, w: int) -> tuple[int, int, int, int]:
        ch, cw = min(self.crop_size[0], h), min(self.crop_size[1], w)
        top, left = random.randint(0, h - ch), random.randint(0, w - cw)
        return top, left, ch, cw

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _image_size(flat_inputs)
        box = self._draw(h, w)
        if self.cat_max_ratio < 1.0:
            mask = next((m for m in flat_inputs if isinstance(m, tv_tensors.Mask)), None)
            if mask is not None:
                for _ in range(10):
                    top, left, ch, cw = box
                    crop = mask[..., top:top + ch, left:left + cw]
                    _, counts = torch.unique(crop[crop != self.ignore_index], return_counts=True)
                    if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                        break
                    box = self._draw(h, w)
        top, left, ch, cw = box
        return {"box": box, "pad": [0, 0, self.crop_size[1] - cw, self.crop_size[0] - ch]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        top, left, ch, cw = params["box"]
        out = self._call_kernel(F.crop, inpt, top=top, left=left, height=ch, width=cw)
        if any(params["pad"]):
            fill = self.ignore_index if isinstance(inpt, tv_tensors.Mask) else self.image_fill
            out = self._call_kernel(F.pad, out, padding=params["pad"], fill=fill, padding_mode="constant")
        return out


class PhotoMetricDistortion(_Transform):
    """mmseg's ``PhotoMetricDistortion`` on a float image in [0, 1]: random brightness (additive,
    ``+-brightness_delta / 255``), contrast (``contrast_range``; before or after the colour ops, at random),
    saturation (``saturation_range``) and hue (``+-hue_delta`` of OpenCV's 180-degree hue circle), each applied
    with probability ``p``. Only images are changed."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, brightness_delta: int = 32, contrast_range: Sequence[float] = (0.5, 1.5),
                 saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: int = 18, p: float = 0.5) -> None:
        super().__init__()
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta
        self.p = p

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        def maybe(value: float) -> float | None:
            return value if random.random() < self.p else None

        return {
            "brightness": maybe(random.uniform(-self.brightness_delta, self.brightness_delta) / 255.0),
            "contrast": maybe(random.uniform(*self.contrast_range)),
            "contrast_first": random.random() < 0.5,
            "saturation": maybe(random.uniform(*self.saturation_range)),
            "hue": maybe(random.uniform(-self.hue_delta, self.hue_delta) / 180.0),
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not inpt.is_floating_point():
            raise TypeError("PhotoMetricDistortion expects a float image in [0, 1] (put it after ToDtype)")
        img = inpt
        if params["brightness"] is not None:
            img = tv_tensors.wrap((img + params["brightness"]).clamp_(0, 1), like=inpt)
        if params["contrast_first"] and params["contrast"] is not None:
            img = F.adjust_contrast(img, params["contrast"])
        if params["saturation"] is not None:
            img = F.adjust_saturation(img, params["saturation"])
        if params["hue"] is not None:
            img = F.adjust_hue(img, params["hue"])
        if not params["contrast_first"] and params["contrast"] is not None:
            img = F.adjust_contrast(img, params["contrast"])
        return img


class SegmentationTransform:
    """Callable ``(image: Image uint8, mask: Mask | None) -> (image float32 normalised, mask int64 | None)``
    wrapping a v2 pipeline of geometric / photometric ops (picklable, for DataLoader workers and ddp_spawn)."""

    def __init__(self, ops: Sequence[v2.Transform], mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, photometric: v2.Transform | None = None) -> None:
        tail = [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)]
        if photometric is not None:
            tail.append(photometric)
        tail.append(v2.Normalize(mean=list(mean), std=list(std)))
        self.pipeline = v2.Compose([*ops, *tail])

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask | None = None):
        sample: dict[str, Any] = {"image": image}
        if mask is not None:
            sample["mask"] = mask
        out = self.pipeline(sample)
        img = out["image"].as_subclass(torch.Tensor).contiguous()
        m = out["mask"].as_subclass(torch.Tensor).long().contiguous() if mask is not None else None
        return img, m

    def __repr__(self) -> str:
        return f"SegmentationTransform({self.pipeline})"


def build_train_transform(crop_size: int | Sequence[int], scale: int | Sequence[int] | None,
                          ratio_range: Sequence[float] | None = (0.5, 2.0), cat_max_ratio: float = 1.0,
                          hflip_prob: float = 0.5, photometric: bool = True, mean: Sequence[float] = IMAGENET_MEAN,
                          std: Sequence[float] = IMAGENET_STD) -> SegmentationTransform:
    """mmseg-style training pipeline (see the module docstring). ``scale=None`` skips the random resize."""
    _check_ratio(ratio_range)
    ops: list[v2.Transform] = []
    if scale is not None:
        ops.append(RandomScaleResize(scale, ratio_range))
    ops.append(RandomCropPad(crop_size, cat_max_ratio=cat_max_ratio))
    if hflip_prob > 0:
        ops.append(v2.RandomHorizontalFlip(hflip_prob))
    return SegmentationTransform(ops, mean, std, PhotoMetricDistortion() if photometric else None)


def build_eval_transform(scale: int | Sequence[int] | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                         std: Sequence[float] = IMAGENET_STD) -> SegmentationTransform:
    """Evaluation pipeline: keep-ratio resize of the image to ``scale`` (``None``: identity), normalise. Masks stay
    at the original resolution."""
    ops = [ScaleResize(scale, image_only=True)] if scale is not None else []
    return SegmentationTransform(ops, mean, std)


def _check_ratio(ratio_range: Sequence[float] | None) -> None:
    if ratio_range is not None and (len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]
                                    or not all(math.isfinite(r) for r in ratio_range)):
        raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {ratio_range}")
