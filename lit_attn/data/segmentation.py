"""LightningDataModules for semantic segmentation (contract: docs/TRAINING_CONTRACTS.md).

All constructor arguments are plain types (str / int / float / bool / tuples / None) so they work from YAML and
LightningCLI. Sizes follow mmseg: ``crop_size`` is ``(height, width)`` (an int = square); ``scale`` is the
keep-ratio bound ``(long edge, short edge)`` of mmseg's ``RandomResize`` / test ``Resize`` (an int bounds both):
training rescales each image to fit ``scale * r``, ``r ~ U(ratio_range)``, crops ``crop_size`` (padding with 0 /
mask 255), flips and applies mmseg's photometric distortion; evaluation rescales the image to fit ``test_scale``
(default ``scale``) and keeps the mask at its original resolution (so ``eval_batch_size`` defaults to 1).
"""
from __future__ import annotations

import os

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from . import meta
from .datasets import (
    ADE20KSegmentation,
    CityscapesSegmentation,
    ImageFolderPredictDataset,
    SegmentationDataset,
    VOCSegmentation,
)
from .transforms import SegmentationTransform, build_eval_transform, build_train_transform

__all__ = [
    "ADE20KDataModule",
    "CityscapesDataModule",
    "SegmentationDataModule",
    "VOCDataModule",
    "collate_eval",
    "collate_predict",
    "eval_sampler",
]


def collate_eval(samples: list[dict]) -> dict:
    """Collate evaluation / prediction samples: stacked tensors when every image (and mask) has one size, else
    lists of per-sample tensors (the tasks then run the model one image at a time) and stacked ``orig_size``."""
    if all(len({tuple(s[k].shape) for s in samples if k in s}) <= 1 for k in ("image", "mask")):
        return default_collate(samples)
    out = {k: [s[k] for s in samples] for k in samples[0]}
    if all("orig_size" in s for s in samples):
        out["orig_size"] = torch.stack(out["orig_size"])
    return out


def collate_predict(samples: list[dict]) -> dict:
    """:func:`collate_eval` for prediction, leaving out the samples a dataset marked ``"skipped"`` (an image that
    could not be decoded, see :class:`~lit_attn.data.datasets.ImageFolderPredictDataset`): they are listed as
    ``(path or name, reason)`` under the batch's ``"skipped"``; a batch of skipped images only is an empty batch
    (``image`` and ``name`` empty lists, ``orig_size`` of shape (0, 2)) that predicts nothing."""
    skipped = [(s.get("path", s.get("name")), s["skipped"]) for s in samples if "skipped" in s]
    kept = [s for s in samples if "skipped" not in s]
    if kept:
        out = collate_eval(kept)
    else:
        out = {"image": [], "name": [], "path": [], "orig_size": torch.zeros(0, 2, dtype=torch.long)}
    if skipped:
        out["skipped"] = skipped
    return out


def eval_sampler(dataset: Dataset, num_replicas: int | None = None, rank: int | None = None) -> Sampler | None:
    """Sampler for validation / test / predict loaders: Lightning's ``UnrepeatedDistributedSampler`` (each sample
    exactly once over all ranks, no padding repeats) when ``torch.distributed`` is initialised or ``num_replicas``
    is given, else ``None`` (sequential). Lightning keeps a ``DistributedSampler`` subclass it finds in a loader."""
    if num_replicas is None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        num_replicas, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(dataset, num_replicas=num_replicas, rank=rank or 0, shuffle=False)


class SegmentationDataModule(pl.LightningDataModule):
    """Base segmentation DataModule.

    Subclasses set ``num_classes``, ``class_names``, ``palette`` and the split names, and implement
    :meth:`make_dataset`. Batches: ``{"image": (B, 3, H, W) float, "mask": (B, H, W) long (255 = ignore),
    "name": list[str]}``.

    Args:
        root: data set root (layout: see the subclass).
        batch_size: training batch size.
        num_workers: DataLoader workers (persistent when > 0).
        crop_size: training crop ``(h, w)`` or an int.
        scale: keep-ratio base scale ``(long, short)`` (or int) of the random resize; ``None`` skips it.
        ratio_range: random resize ratio range around ``scale`` (mmseg: 0.5-2.0); ``None`` = fixed ``scale``.
        cat_max_ratio: mmseg's crop retry (no class > this fraction of the crop); 1.0 disables it.
        hflip_prob: horizontal flip probability.
        photometric: apply mmseg's PhotoMetricDistortion in training.
        test_scale: keep-ratio scale of evaluation images (``None``: ``scale``; images whose size already fits are
            left as they are). Masks are never resized in evaluation.
        eval_batch_size: batch size of val/test/predict loaders (1 unless all images have one size).
        pin_memory: DataLoader ``pin_memory``.
        predict_root: images to predict: a folder, an image file or a glob pattern (``photos/*.jpg``; see
            :class:`~lit_attn.data.datasets.ImageFolderPredictDataset`); ``None`` predicts the test split.
        mean, std: normalisation (ImageNet).

    Concrete subclasses call ``self.save_hyperparameters()`` in their ``__init__`` (so ``hparams`` holds exactly
    their own arguments and ``cls(**hparams)`` rebuilds them).
    """

    num_classes: int = 0
    class_names: list[str] = []
    palette: list[tuple[int, int, int]] = []
    ignore_index: int = meta.IGNORE_INDEX
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "val"
    dataset_name: str = "segmentation"

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 8,
        num_workers: int = 4,
        crop_size: int | tuple[int, int] = 512,
        scale: int | tuple[int, int] | None = (2048, 512),
        ratio_range: tuple[float, float] | None = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        hflip_prob: float = 0.5,
        photometric: bool = True,
        test_scale: int | tuple[int, int] | None = None,
        eval_batch_size: int = 1,
        pin_memory: bool = False,
        predict_root: str | None = None,
        mean: tuple[float, float, float] = meta.IMAGENET_MEAN,
        std: tuple[float, float, float] = meta.IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.root = os.fspath(root) if root is not None else None
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.crop_size = crop_size
        self.scale = scale
        self.ratio_range = ratio_range
        self.cat_max_ratio = cat_max_ratio
        self.hflip_prob = hflip_prob
        self.photometric = photometric
        self.test_scale = test_scale if test_scale is not None else scale
        self.eval_batch_size = eval_batch_size
        self.pin_memory = pin_memory
        self.predict_root = predict_root
        self.mean, self.std = tuple(mean), tuple(std)
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self.predict_dataset: Dataset | None = None

    # -- transforms & datasets ------------------------------------------------------------------------------------
    def train_transform(self) -> SegmentationTransform:
        return build_train_transform(self.crop_size, self.scale, self.ratio_range, self.cat_max_ratio,
                                     self.hflip_prob, self.photometric, self.mean, self.std)

    def eval_transform(self) -> SegmentationTransform:
        return build_eval_transform(self.test_scale, self.mean, self.std)

    def make_dataset(self, split: str, transform: SegmentationTransform) -> SegmentationDataset:
        raise NotImplementedError

    def _require_root(self) -> str:
        if self.root is None:
            raise ValueError(f"{type(self).__name__} needs `root`: the local {self.dataset_name} folder")
        return self.root

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.train_dataset = self.make_dataset(self.train_split, self.train_transform())
        if stage in (None, "fit", "validate"):
            self.val_dataset = self.make_dataset(self.val_split, self.eval_transform())
        if stage in (None, "test"):
            self.test_dataset = self.make_dataset(self.test_split, self.eval_transform())
        if stage in (None, "predict"):
            if self.predict_root is not None:
                self.predict_dataset = ImageFolderPredictDataset(self.predict_root, self.eval_transform())
            else:
                self.predict_dataset = self.make_dataset(self.test_split, self.eval_transform())

    # -- loaders --------------------------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, batch_size: int, train: bool, collate_fn=collate_eval) -> DataLoader:
        kwargs = {"num_workers": self.num_workers, "pin_memory": self.pin_memory,
                  "persistent_workers": self.num_workers > 0}
        if train:
            return DataLoader(dataset, batch_size=batch_size, shuffle=True,
                              drop_last=len(dataset) >= batch_size, **kwargs)
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=eval_sampler(dataset),
                          collate_fn=collate_fn, **kwargs)

    def _get(self, attr: str, stage: str) -> Dataset:
        if getattr(self, attr) is None:
            self.setup(stage)
        return getattr(self, attr)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._get("train_dataset", "fit"), self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._get("val_dataset", "validate"), self.eval_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._get("test_dataset", "test"), self.eval_batch_size, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self._get("predict_dataset", "predict"), self.eval_batch_size, train=False,
                            collate_fn=collate_predict)


class VOCDataModule(SegmentationDataModule):
    """Pascal VOC 2012 (21 classes, 255 = boundary/ignore) from ``root`` containing (or being)
    ``VOCdevkit/VOC2012``. ``use_aug=True`` trains on the SBD-augmented ``train_aug`` list
    (``SegmentationClassAug``, 10,582 images); validation and test use ``val`` (VOC's test labels are not
    public). mmseg defaults: crop 512x512, scale (2048, 512), ratio 0.5-2.0."""

    num_classes = 21
    class_names = meta.VOC_CLASSES
    palette = meta.VOC_PALETTE
    dataset_name = "Pascal VOC 2012"

    def __init__(self, root: str | None = None, use_aug: bool = False, batch_size: int = 8, num_workers: int = 4,
                 crop_size: int | tuple[int, int] = 512, scale: int | tuple[int, int] | None = (2048, 512),
                 ratio_range: tuple[float, float] | None = (0.5, 2.0), cat_max_ratio: float = 0.75,
                 hflip_prob: float = 0.5, photometric: bool = True, test_scale: int | tuple[int, int] | None = None,
                 test_split: str = "val", eval_batch_size: int = 1, pin_memory: bool = False,
                 predict_root: str | None = None, mean: tuple[float, float, float] = meta.IMAGENET_MEAN,
                 std: tuple[float, float, float] = meta.IMAGENET_STD) -> None:
        super().__init__(root, batch_size, num_workers, crop_size, scale, ratio_range, cat_max_ratio, hflip_prob,
                         photometric, test_scale, eval_batch_size, pin_memory, predict_root, mean, std)
        self.save_hyperparameters()
        self.use_aug = use_aug
        self.train_split = "train_aug" if use_aug else "train"
        self.test_split = test_split

    def make_dataset(self, split: str, transform: SegmentationTransform) -> SegmentationDataset:
        return VOCSegmentation(self._require_root(), split, transform, num_classes=self.num_classes)


class CityscapesDataModule(SegmentationDataModule):
    """Cityscapes fine (19 trainIds; labelIds mapped, the rest 255) from ``root`` with ``leftImg8bit/`` and
    ``gtFine/``. Test uses ``val`` by default (the test labels are not public). mmseg defaults: crop 512x1024,
    scale (2048, 1024), ratio 0.5-2.0; evaluation at 2048x1024."""

    num_classes = 19
    class_names = meta.CITYSCAPES_CLASSES
    palette = meta.CITYSCAPES_PALETTE
    dataset_name = "Cityscapes"

    def __init__(self, root: str | None = None, batch_size: int = 2, num_workers: int = 4,
                 crop_size: int | tuple[int, int] = (512, 1024), scale: int | tuple[int, int] | None = (2048, 1024),
                 ratio_range: tuple[float, float] | None = (0.5, 2.0), cat_max_ratio: float = 0.75,
                 hflip_prob: float = 0.5, photometric: bool = True, test_scale: int | tuple[int, int] | None = None,
                 test_split: str = "val", eval_batch_size: int = 1, pin_memory: bool = False,
                 predict_root: str | None = None, mean: tuple[float, float, float] = meta.IMAGENET_MEAN,
                 std: tuple[float, float, float] = meta.IMAGENET_STD) -> None:
        super().__init__(root, batch_size, num_workers, crop_size, scale, ratio_range, cat_max_ratio, hflip_prob,
                         photometric, test_scale, eval_batch_size, pin_memory, predict_root, mean, std)
        self.save_hyperparameters()
        self.test_split = test_split

    def make_dataset(self, split: str, transform: SegmentationTransform) -> SegmentationDataset:
        return CityscapesSegmentation(self._require_root(), split, transform)


class ADE20KDataModule(SegmentationDataModule):
    """ADE20K SceneParsing (150 classes, reduce_zero_label) from ``root`` containing (or being)
    ``ADEChallengeData2016``. Validation and test use ``validation``. mmseg defaults: crop 512x512,
    scale (2048, 512), ratio 0.5-2.0."""

    num_classes = 150
    class_names = meta.ADE20K_CLASSES
    palette = meta.ADE20K_PALETTE
    train_split = "training"
    val_split = "validation"
    test_split = "validation"
    dataset_name = "ADE20K (ADEChallengeData2016)"

    def __init__(self, root: str | None = None, batch_size: int = 8, num_workers: int = 4,
                 crop_size: int | tuple[int, int] = 512, scale: int | tuple[int, int] | None = (2048, 512),
                 ratio_range: tuple[float, float] | None = (0.5, 2.0), cat_max_ratio: float = 0.75,
                 hflip_prob: float = 0.5, photometric: bool = True, test_scale: int | tuple[int, int] | None = None,
                 eval_batch_size: int = 1, pin_memory: bool = False, predict_root: str | None = None,
                 mean: tuple[float, float, float] = meta.IMAGENET_MEAN,
                 std: tuple[float, float, float] = meta.IMAGENET_STD) -> None:
        super().__init__(root, batch_size, num_workers, crop_size, scale, ratio_range, cat_max_ratio, hflip_prob,
                         photometric, test_scale, eval_batch_size, pin_memory, predict_root, mean, std)
        self.save_hyperparameters()

    def make_dataset(self, split: str, transform: SegmentationTransform) -> SegmentationDataset:
        return ADE20KSegmentation(self._require_root(), split, transform)
