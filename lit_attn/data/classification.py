"""Classification DataModules: ImageFolder and CIFAR-10/100 from local files (never downloaded).

Batches: ``{"image": (B, 3, H, W) float, "label": (B,) long}`` (docs/TRAINING_CONTRACTS.md).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.datasets import CIFAR10, CIFAR100, ImageFolder

from . import meta
from .datasets import CorruptImageError
from .segmentation import eval_sampler

__all__ = ["CIFAR_LAYOUT", "IMAGEFOLDER_LAYOUT", "CIFARDataModule", "ClassificationDataModule", "DictDataset",
           "ImageFolderDataModule"]

IMAGEFOLDER_LAYOUT = "<root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg (optional <root>/test/<class>/...)"
CIFAR_LAYOUT = (
    "<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} (CIFAR-10) or "
    "<root>/cifar-100-python/{train,test,meta} (CIFAR-100): the python-pickle archives, extracted"
)


class DictDataset(Dataset):
    """Wraps an ``(image, target)`` dataset as ``{"image", "label"}`` dicts; undecodable images raise
    :class:`~lit_attn.data.datasets.CorruptImageError` with their path (for ImageFolder)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict:
        try:
            image, label = self.dataset[index]
        except (OSError, SyntaxError) as e:
            samples = getattr(self.dataset, "samples", None)
            where = samples[index][0] if samples is not None else f"index {index}"
            raise CorruptImageError(f"corrupt or unreadable image {where}: {e}") from e
        return {"image": image, "label": int(label)}


class ClassificationDataModule(pl.LightningDataModule):
    """Base: ``num_classes``, ``class_names``; train loader shuffles, val/test/predict loaders use
    :func:`~lit_attn.data.segmentation.eval_sampler` (no repeats under DDP)."""

    def __init__(self, root: str, batch_size: int = 64, num_workers: int = 4, eval_batch_size: int | None = None,
                 pin_memory: bool = False) -> None:
        super().__init__()
        self.root = os.fspath(root)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.eval_batch_size = eval_batch_size or batch_size
        self.pin_memory = pin_memory
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    def make_dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.train_dataset = self.make_dataset("train")
        if stage in (None, "fit", "validate"):
            self.val_dataset = self.make_dataset("val")
        if stage in (None, "test", "predict"):
            self.test_dataset = self.make_dataset("test")

    def _get(self, attr: str, stage: str) -> Dataset:
        if getattr(self, attr) is None:
            self.setup(stage)
        return getattr(self, attr)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        kwargs = {"num_workers": self.num_workers, "pin_memory": self.pin_memory,
                  "persistent_workers": self.num_workers > 0}
        if train:
            return DataLoader(dataset, batch_size=self.batch_size, shuffle=True,
                              drop_last=len(dataset) >= self.batch_size, **kwargs)  # type: ignore[arg-type]
        return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=eval_sampler(dataset), **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._get("train_dataset", "fit"), train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._get("val_dataset", "validate"), train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._get("test_dataset", "test"), train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self._get("test_dataset", "predict"), train=False)


class ImageFolderDataModule(ClassificationDataModule):
    """``torchvision.datasets.ImageFolder`` over ``root/train`` and ``root/val`` (test: ``root/test`` if present,
    else ``val``). Transforms: ``timm.data.create_transform`` (training: RandomResizedCrop + flip + colour jitter
    (+ ``auto_augment``, e.g. ``"rand-m9-mstd0.5-inc1"``); evaluation: resize to ``img_size / crop_pct`` + centre
    crop), ImageNet mean/std. ``num_classes`` / ``class_names`` come from the sub-folders of ``root/train``."""

    def __init__(self, root: str, batch_size: int = 64, num_workers: int = 4, img_size: int = 224,
                 auto_augment: str | None = None, crop_pct: float | None = None, eval_batch_size: int | None = None,
                 pin_memory: bool = False, mean: tuple[float, float, float] = meta.IMAGENET_MEAN,
                 std: tuple[float, float, float] = meta.IMAGENET_STD) -> None:
        super().__init__(root, batch_size, num_workers, eval_batch_size, pin_memory)
        self.save_hyperparameters()
        self.img_size = img_size
        self.auto_augment = auto_augment
        self.crop_pct = crop_pct
        self.mean, self.std = tuple(mean), tuple(std)
        self._classes: list[str] | None = None

    def _split_dir(self, split: str) -> Path:
        root = Path(self.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"ImageFolder root {root} does not exist; expected {IMAGEFOLDER_LAYOUT}")
        if split == "test" and not (root / "test").is_dir():
            split = "val"
        d = root / split
        if not d.is_dir():
            raise FileNotFoundError(f"ImageFolder root {root} is missing {split}/; expected {IMAGEFOLDER_LAYOUT}")
        return d

    @property
    def class_names(self) -> list[str]:
        if self._classes is None:
            d = self._split_dir("train")
            self._classes = sorted(e.name for e in os.scandir(d) if e.is_dir())
            if not self._classes:
                raise FileNotFoundError(f"ImageFolder {d} has no class sub-folders; expected {IMAGEFOLDER_LAYOUT}")
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def setup(self, stage: str | None = None) -> None:
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in needed.get(stage, ("train", "val", "test")):  # check the layout before scanning any folder
            self._split_dir(split)
        super().setup(stage)

    def transform(self, train: bool) -> Callable:
        from timm.data import create_transform

        kwargs = {"crop_pct": self.crop_pct} if (not train and self.crop_pct is not None) else {}
        if train and self.auto_augment:
            kwargs["auto_augment"] = self.auto_augment
        return create_transform(self.img_size, is_training=train, mean=self.mean, std=self.std, **kwargs)

    def make_dataset(self, split: str) -> Dataset:
        d = self._split_dir(split)
        ds = ImageFolder(str(d), transform=self.transform(split == "train"))
        if ds.classes != self.class_names:
            raise FileNotFoundError(f"ImageFolder {d} has classes {ds.classes[:5]}... but train/ has "
                                    f"{self.class_names[:5]}...: the split folders must hold the same classes")
        return DictDataset(ds)


class _LocalCIFAR10(CIFAR10):
    """CIFAR10 without the md5 checks (file presence only) so it works with any local copy; never downloads."""

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


class _LocalCIFAR100(CIFAR100):
    train_list = [[name, None] for name, _ in CIFAR100.train_list]
    test_list = [[name, None] for name, _ in CIFAR100.test_list]
    meta = {**CIFAR100.meta, "md5": None}


class CIFARDataModule(ClassificationDataModule):
    """CIFAR-10 (``version=10``) or CIFAR-100 (``version=100``) from the extracted python-pickle archives under
    ``root`` (``root/cifar-10-batches-py`` / ``root/cifar-100-python``; ``root`` may also be that folder), read
    with torchvision's CIFAR10/CIFAR100 (``download=False``). The 50,000 training images train; the 10,000 test
    images serve as validation and test set (the usual CIFAR protocol). Transforms: training
    ``RandomCrop(32, padding=4, reflect)`` + flip, then (if ``img_size != 32``) a resize; CIFAR mean/std."""

    def __init__(self, root: str, version: int = 10, batch_size: int = 128, num_workers: int = 4,
                 img_size: int = 32, eval_batch_size: int | None = None, pin_memory: bool = False) -> None:
        if version not in (10, 100):
            raise ValueError(f"CIFAR version must be 10 or 100, got {version}")
        super().__init__(root, batch_size, num_workers, eval_batch_size, pin_memory)
        self.save_hyperparameters()
        self.version = version
        self.img_size = img_size
        self.num_classes = version
        self.class_names = list(meta.CIFAR10_CLASSES if version == 10 else meta.CIFAR100_CLASSES)

    def _cls(self):
        return _LocalCIFAR10 if self.version == 10 else _LocalCIFAR100

    def _resolve_root(self) -> Path:
        cls = self._cls()
        root = Path(self.root).expanduser()
        if root.name == cls.base_folder:
            root = root.parent
        folder = root / cls.base_folder
        if not folder.is_dir():
            raise FileNotFoundError(f"CIFAR-{self.version} root {root} is missing {cls.base_folder}/; "
                                    f"expected {CIFAR_LAYOUT}")
        for name, _ in [*cls.train_list, *cls.test_list, [cls.meta["filename"], None]]:
            if not (folder / name).is_file():
                raise FileNotFoundError(f"CIFAR-{self.version} root {root} is missing {cls.base_folder}/{name}; "
                                        f"expected {CIFAR_LAYOUT}")
        return root

    def transform(self, train: bool) -> Callable:
        v = self.version
        ops: list = [T.RandomCrop(32, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip()] if train else []
        if self.img_size != 32:
            ops.append(T.Resize(self.img_size, interpolation=T.InterpolationMode.BICUBIC))
        ops += [T.ToTensor(), T.Normalize(meta.CIFAR_MEAN[v], meta.CIFAR_STD[v])]
        return T.Compose(ops)

    def make_dataset(self, split: str) -> Dataset:
        root = self._resolve_root()
        ds = self._cls()(str(root), train=split == "train", transform=self.transform(split == "train"),
                         download=False)
        return DictDataset(ds)
