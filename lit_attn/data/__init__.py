"""Data for lit_attn: segmentation / classification DataModules, datasets read from their real on-disk layouts,
joint image/mask transforms, and the embedded digits-scenes default (docs/TRAINING_CONTRACTS.md)."""
from .classification import (
    ChecksumError,
    CIFARDataModule,
    ClassificationDataModule,
    DictDataset,
    ImageFolderDataModule,
)
from .datasets import (
    ADE20KSegmentation,
    CityscapesSegmentation,
    CorruptImageError,
    ImageFolderPredictDataset,
    InvalidLabelError,
    SegmentationDataset,
    VOCSegmentation,
)
from .digits import DigitsDataModule, default_digits_root, generate_digits_voc
from .segmentation import (
    ADE20KDataModule,
    CityscapesDataModule,
    SegmentationDataModule,
    VOCDataModule,
    collate_eval,
    eval_sampler,
)
from .transforms import SegmentationTransform, build_eval_transform, build_train_transform

__all__ = [
    "ADE20KDataModule",
    "ADE20KSegmentation",
    "CIFARDataModule",
    "ChecksumError",
    "CityscapesDataModule",
    "CityscapesSegmentation",
    "ClassificationDataModule",
    "CorruptImageError",
    "DictDataset",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "ImageFolderPredictDataset",
    "InvalidLabelError",
    "SegmentationDataModule",
    "SegmentationDataset",
    "SegmentationTransform",
    "VOCDataModule",
    "VOCSegmentation",
    "build_eval_transform",
    "build_train_transform",
    "collate_eval",
    "default_digits_root",
    "eval_sampler",
    "generate_digits_voc",
]
