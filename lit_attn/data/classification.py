"""Classification DataModules: ImageFolder and CIFAR-10/100 from local files (never downloaded).

Batches: ``{"image": (B, 3, H, W) float, "label": (B,) long}`` (docs/TRAINING_CONTRACTS.md).

CIFAR's python archives are pickles, and unpickling runs whatever code a file names: every CIFAR file is checked
against the official md5 before anything is unpickled (:class:`ChecksumError` otherwise), and is then unpickled
through an allow-list that admits only numpy array reconstruction and plain containers.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.datasets import CIFAR10, CIFAR100, ImageFolder

from . import meta
from .datasets import CorruptImageError, load_image
from .segmentation import eval_sampler

__all__ = ["CIFAR_LAYOUT", "CIFAR_MD5", "IMAGEFOLDER_LAYOUT", "CIFARDataModule", "ChecksumError",
           "ClassificationDataModule", "DictDataset", "ImageFolderDataModule"]

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
        try:
            ds = ImageFolder(str(d), transform=self.transform(split == "train"), loader=_load_rgb)
        except FileNotFoundError as e:  # torchvision's message names neither the split nor the folder
            raise FileNotFoundError(f"ImageFolder split {split!r} ({d}): {e}; expected {IMAGEFOLDER_LAYOUT}") from e
        if ds.classes != self.class_names:
            raise FileNotFoundError(f"ImageFolder {d} has classes {ds.classes[:5]}... but train/ has "
                                    f"{self.class_names[:5]}...: the split folders must hold the same classes")
        return DictDataset(ds)


def _load_rgb(path: str) -> Image.Image:
    """ImageFolder loader: :func:`~lit_attn.data.datasets.load_image` (16-bit / float images scaled to 8 bits,
    not clipped as by ``convert("RGB")``)."""
    return Image.fromarray(load_image(path))


class ChecksumError(ValueError):
    """A data file whose checksum is not the official one (its path, both checksums and the remedy are in the
    message)."""


# The official md5 of every file of the extracted python archives (torchvision's tables).
CIFAR_MD5: dict[int, dict[str, str]] = {
    v: {**dict(c.train_list), **dict(c.test_list), c.meta["filename"]: c.meta["md5"]}
    for v, c in ((10, CIFAR10), (100, CIFAR100))
}

# What CIFAR's pickles (Python 2 cPickle, protocol 2: dicts of byte strings, int lists and one uint8 array) name,
# under their py2 and their numpy 1.x / 2.x module names; plain containers only besides numpy's array rebuilding.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    *((m, n) for m in ("builtins", "__builtin__") for n in ("dict", "list", "tuple", "set", "frozenset", "bytes",
                                                            "bytearray", "str", "int", "float", "bool")),
}


class _CIFARUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed (only numpy arrays and containers)")
        return super().find_class(module, name)


def _unpickle(path: str) -> dict:
    with open(path, "rb") as f:
        try:
            entry = _CIFARUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"refusing to unpickle CIFAR file {path}: {e}; re-extract the official "
                                         f"archive") from e
    if not isinstance(entry, dict):
        raise ValueError(f"CIFAR file {path} holds a {type(entry).__name__}, not a dict; re-extract the official "
                         f"archive")
    return entry


def _md5(path: str | os.PathLike) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class _LocalCIFAR10(CIFAR10):
    """torchvision's CIFAR10 (``__getitem__``, ``__len__``), never downloading, its files unpickled through the
    allow-list of :class:`_CIFARUnpickler`. The md5 check is :meth:`CIFARDataModule.verify`'s, done once per setup
    before any of these is built."""

    def __init__(self, root: str, train: bool = True, transform: Callable | None = None) -> None:
        super(CIFAR10, self).__init__(root, transform=transform)  # VisionDataset's: CIFAR10's would unpickle
        self.train = train
        data, self.targets = [], []
        for name, _ in self.train_list if train else self.test_list:
            path = os.path.join(self.root, self.base_folder, name)
            entry = _unpickle(path)
            x, y = entry.get("data"), entry.get("labels", entry.get("fine_labels"))
            if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3072
                    and isinstance(y, list) and len(y) == len(x)):
                raise ValueError(f"CIFAR file {path} lacks a uint8 (N, 3072) 'data' array with N labels; "
                                 f"re-extract the official archive")
            data.append(x)
            self.targets.extend(y)
        self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))  # HWC
        self._load_meta()

    def _load_meta(self) -> None:
        self.classes = _unpickle(os.path.join(self.root, self.base_folder, self.meta["filename"]))[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class _LocalCIFAR100(_LocalCIFAR10, CIFAR100):
    """:class:`_LocalCIFAR10`'s loading with CIFAR-100's folder and file lists."""


class CIFARDataModule(ClassificationDataModule):
    """CIFAR-10 (``version=10``) or CIFAR-100 (``version=100``) from the extracted python-pickle archives under
    ``root`` (``root/cifar-10-batches-py`` / ``root/cifar-100-python``; ``root`` may also be that folder), read
    with torchvision's CIFAR10/CIFAR100 (never downloaded). The 50,000 training images train; the 10,000 test
    images serve as validation and test set (the usual CIFAR protocol). Transforms: training
    ``RandomCrop(32, padding=4, reflect)`` + flip, then (if ``img_size != 32``) a resize; CIFAR mean/std.

    ``setup`` first checks the md5 of every file against :attr:`checksums` (default: the official ones,
    :data:`CIFAR_MD5`) and raises :class:`ChecksumError` on a mismatch, before anything is unpickled (a pickle
    can run arbitrary code); the files are then unpickled through an allow-list (numpy arrays, containers)."""

    checksums: dict[int, dict[str, str]] = CIFAR_MD5

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
        for name in self._files():
            if not (folder / name).is_file():
                raise FileNotFoundError(f"CIFAR-{self.version} root {root} is missing {cls.base_folder}/{name}; "
                                        f"expected {CIFAR_LAYOUT}")
        return root

    def _files(self) -> list[str]:
        cls = self._cls()
        return [name for name, _ in [*cls.train_list, *cls.test_list]] + [cls.meta["filename"]]

    def verify(self, root: Path) -> None:
        """Check every file's md5 against ``self.checksums`` (all of them, before any is unpickled)."""
        cls = self._cls()
        table = self.checksums.get(self.version, {})
        for name in self._files():
            path = root / cls.base_folder / name
            expected, found = table.get(name), _md5(path)
            if found != expected:
                raise ChecksumError(
                    f"CIFAR-{self.version} file {path} has md5 {found}, expected {expected or '(none listed)'} "
                    f"(the official file's): refusing to unpickle it (a modified pickle can run arbitrary code). "
                    f"Re-extract the official archive {cls.url} (md5 {cls.tgz_md5}) into {root}"
                )

    def setup(self, stage: str | None = None) -> None:
        self.verify(self._resolve_root())  # once per setup, before any dataset is built
        super().setup(stage)

    def transform(self, train: bool) -> Callable:
        v = self.version
        ops: list = [T.RandomCrop(32, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip()] if train else []
        if self.img_size != 32:
            ops.append(T.Resize(self.img_size, interpolation=T.InterpolationMode.BICUBIC))
        ops += [T.ToTensor(), T.Normalize(meta.CIFAR_MEAN[v], meta.CIFAR_STD[v])]
        return T.Compose(ops)

    def make_dataset(self, split: str) -> Dataset:
        root = self._resolve_root()
        ds = self._cls()(str(root), train=split == "train", transform=self.transform(split == "train"))
        return DictDataset(ds)
