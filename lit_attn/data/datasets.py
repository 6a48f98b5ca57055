"""Segmentation data sets read from their real on-disk layouts (never downloaded).

Every dataset returns ``{"image": float32 (3, H, W) normalised, "mask": int64 (H, W) (255 = ignore), "name": str}``
(see docs/TRAINING_CONTRACTS.md). Files are listed (and their presence checked) when the dataset is built; a
missing or incomplete root raises ``FileNotFoundError`` naming the expected layout. Images and labels are decoded
and validated when a sample is loaded: an undecodable image raises :class:`CorruptImageError`, a label with a
value outside the data set's valid set raises :class:`InvalidLabelError` (both ``ValueError``), with the path.
"""
from __future__ import annotations

import contextlib
import glob
import os
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from . import meta
from .transforms import build_eval_transform

__all__ = [
    "ADE20K_LAYOUT",
    "CITYSCAPES_LAYOUT",
    "VOC_LAYOUT",
    "ADE20KSegmentation",
    "CityscapesSegmentation",
    "CorruptImageError",
    "ImageFolderPredictDataset",
    "InvalidLabelError",
    "SegmentationDataset",
    "VOCSegmentation",
    "SkippedImageWarning",
    "image_to_rgb",
    "load_image",
    "load_label",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm")

VOC_LAYOUT = (
    "<root>/VOCdevkit/VOC2012/ (or <root> being that folder) with JPEGImages/<id>.jpg, "
    "SegmentationClass/<id>.png (palette PNG of class indices, 255 = boundary) and "
    "ImageSets/Segmentation/{train,val}.txt; the augmented split 'train_aug' also needs "
    "SegmentationClassAug/<id>.png and ImageSets/Segmentation/train_aug.txt (SBD 'trainaug' layout of mmseg/DeepLab)"
)
CITYSCAPES_LAYOUT = (
    "<root>/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png and "
    "<root>/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png"
)
ADE20K_LAYOUT = (
    "<root>/ADEChallengeData2016/ (or <root> being that folder) with images/{training,validation}/<id>.jpg and "
    "annotations/{training,validation}/<id>.png"
)

Sample = tuple[str, "str | None", str]  # (image path, label path or None, name)
Transform = Callable[[tv_tensors.Image, "tv_tensors.Mask | None"], tuple[torch.Tensor, "torch.Tensor | None"]]


class CorruptImageError(ValueError):
    """An image file that cannot be decoded (its path is in the message)."""


class SkippedImageWarning(UserWarning):
    """An image that prediction skips because it cannot be decoded (its path and the reason are in the message)."""


class InvalidLabelError(ValueError):
    """A label file that cannot be decoded, is not a class-index image, has another size than its image, or holds
    values outside the data set's valid set (its path is in the message)."""


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image to an ``(H, W, 3)`` uint8 array; :class:`CorruptImageError` if it cannot be decoded.

    The mode rule (also :func:`image_to_rgb` for PIL images): 8-bit images go through Pillow's ``convert("RGB")``
    (bit-identical to it): grey ``L`` / ``1`` is repeated over the channels, a palette ``P`` image is looked up in
    its palette, ``CMYK`` uses Pillow's conversion, and transparency (``RGBA``, ``LA``, ``PA``, a palette's
    transparent entry) is simply dropped: the colour under the alpha is kept, not composited on a background.
    Single-channel high-bit-depth images, which ``convert`` would clip, are scaled: 16-bit values (modes ``I;16*``,
    and ``I`` with values in 0..65535) keep their high byte, ``v >> 8`` (0 -> 0, 65535 -> 255: the full 16-bit
    range onto 0..255), the rule Pillow itself applies to 48-bit RGB PNGs and 16-bit RGB TIFFs (and cv2's 8-bit
    reading), so a picture decodes alike stored grey or RGB; float images (mode ``F``) must hold values in [0, 1]
    and become ``round(255 * v)``. Other ranges (``I`` outside 0..65535, ``F`` outside [0, 1] or NaN) raise
    :class:`CorruptImageError` rather than guess a scale.
    """
    try:
        with Image.open(path) as im:
            mode, arr = _pixels(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f"corrupt or unreadable image {path}: {e}") from e
    return _to_rgb8(arr, mode, path)


def image_to_rgb(image: Image.Image, source: str = "the PIL image") -> np.ndarray:
    """A PIL image as an ``(H, W, 3)`` uint8 array by :func:`load_image`'s mode rule (``source`` names it in
    errors)."""
    mode, arr = _pixels(image)
    return _to_rgb8(arr, mode, source)


def _pixels(im: Image.Image) -> tuple[str, np.ndarray]:
    """(mode, pixels): 8-bit modes decoded to RGB (mode ``"RGB"``), high-bit-depth ones as they are stored."""
    mode = im.mode
    if mode not in ("I", "F") and not mode.startswith("I;16"):
        return "RGB", np.array(im.convert("RGB"))
    return mode, np.asarray(im)


def _to_rgb8(arr: np.ndarray, mode: str, path) -> np.ndarray:
    if mode == "RGB":
        return arr
    if arr.dtype.kind == "f":
        lo, hi = float(arr.min()), float(arr.max())
        if not (lo >= 0.0 and hi <= 1.0):  # NaN fails too
            raise CorruptImageError(f"image {path} has mode {mode!r} (float) with values in [{lo:g}, {hi:g}]; "
                                    f"expected values in [0, 1] (scaled by 255): convert it to 8 or 16 bits")
        gray = np.round(arr.astype(np.float64) * 255).astype(np.uint8)
    else:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise CorruptImageError(f"image {path} has mode {mode!r} with values in [{lo}, {hi}]; only 8-bit and "
                                    f"16-bit (0..65535) images are supported: convert it to 8 or 16 bits")
        gray = (arr.astype(np.uint16) >> 8).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)  # as convert("RGB") does for grey


def load_label(path: str | os.PathLike, lut: np.ndarray | None = None, valid: str = "") -> np.ndarray:
    """Decode a class-index PNG (palette 'P', grayscale 'L' or 16-bit) and map it through ``lut`` (see
    :mod:`lit_attn.data.meta`). Raises :class:`InvalidLabelError` for undecodable / RGB files and values the LUT
    marks invalid (``-1``)."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
                raise InvalidLabelError(
                    f"label {path} has mode {mode!r}; expected a single-channel class-index PNG (palette 'P' or "
                    f"grayscale 'L'), not a colour rendering"
                )
            arr = np.asarray(im)
    except InvalidLabelError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise InvalidLabelError(f"corrupt or unreadable label {path}: {e}") from e
    arr = arr.astype(np.int64)
    if lut is None:
        return arr
    bad = (arr < 0) | (arr >= len(lut))
    mapped = np.where(bad, -1, lut[np.clip(arr, 0, len(lut) - 1)])
    if (mapped < 0).any():
        values = np.unique(arr[mapped < 0])
        shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
        raise InvalidLabelError(f"label {path} contains values [{shown}] outside the valid set {valid}".rstrip())
    return mapped


class SegmentationDataset(Dataset):
    """Generic ``(image, label)`` file-list dataset.

    Args:
        samples: ``(image_path, label_path or None, name)`` triples.
        lut: raw label value -> train label (``-1`` = invalid); ``None`` keeps the raw values.
        transform: ``(Image, Mask | None) -> (image, mask | None)``; default: normalise only (ImageNet mean/std).
        valid: human-readable description of the valid raw label values (used in error messages).
    """

    def __init__(self, samples: Sequence[Sample], lut: np.ndarray | None = None, transform: Transform | None = None,
                 valid: str = "") -> None:
        self.samples = list(samples)
        self.lut = lut
        self.transform = transform if transform is not None else build_eval_transform(None)
        self.valid = valid

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def names(self) -> list[str]:
        return [s[2] for s in self.samples]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The raw ``(H, W, 3)`` uint8 image and mapped ``(H, W)`` int64 mask (None if unlabelled)."""
        img_path, lbl_path, _ = self.samples[index]
        image = load_image(img_path)
        if lbl_path is None:
            return image, None
        mask = load_label(lbl_path, self.lut, self.valid)
        if mask.shape != image.shape[:2]:
            raise InvalidLabelError(
                f"label {lbl_path} has size {mask.shape[1]}x{mask.shape[0]} but its image {img_path} is "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        return image, mask

    def __getitem__(self, index: int) -> dict:
        with _single_thread():
            return self._get_sample(index)

    def _get_sample(self, index: int) -> dict:
        image, mask = self.load(index)
        h, w = image.shape[:2]
        img = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1).contiguous())
        msk = tv_tensors.Mask(torch.from_numpy(mask)) if mask is not None else None
        img_t, msk_t = self.transform(img, msk)
        out = {"image": img_t, "name": self.samples[index][2], "orig_size": torch.tensor([h, w])}
        if msk_t is not None:
            out["mask"] = msk_t
        return out


@contextlib.contextmanager
def _single_thread():
    """Run per-sample tensor ops single-threaded in the main process (``num_workers=0``): intra-op threads on
    small images cost more than they gain (measured 3-5x slower loading on 2 busy cores). Workers already run
    with one thread."""
    n = torch.get_num_threads()
    if n == 1 or torch.utils.data.get_worker_info() is not None:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _missing(kind: str, root: Path, what: str, layout: str) -> FileNotFoundError:
    return FileNotFoundError(f"{kind} root {root} is missing {what}; expected {layout}")


def _read_list(path: Path) -> list[str]:
    """Stems listed one a line; DeepLab-style lines '/JPEGImages/x.jpg /SegmentationClassAug/x.png' also work."""
    stems = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            stems.append(Path(line.split()[0]).stem)
    return stems


def find_voc_root(root: str | os.PathLike) -> Path:
    """The VOC2012 folder under ``root`` (``root/VOCdevkit/VOC2012``, ``root/VOC2012`` or ``root`` itself)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Pascal VOC root {root} does not exist; expected {VOC_LAYOUT}")
    for cand in (root / "VOCdevkit" / "VOC2012", root / "VOC2012", root):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise _missing("Pascal VOC", root, "VOCdevkit/VOC2012/JPEGImages", VOC_LAYOUT)


class VOCSegmentation(SegmentationDataset):
    """Pascal VOC 2012 segmentation (also the layout of the embedded digits data).

    ``split`` names a list ``ImageSets/Segmentation/<split>.txt`` (a missing or empty list raises
    ``FileNotFoundError`` naming the split and the file); labels come from ``SegmentationClass`` or, for
    splits ending in ``aug`` (``train_aug``), from ``SegmentationClassAug``. A ``test`` split without labels is
    loaded unlabelled (no "mask"). Valid label values: ``0..num_classes-1`` and 255 (VOC's boundary, kept as
    ignore).
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Transform | None = None,
                 num_classes: int = 21, kind: str = "Pascal VOC") -> None:
        self.root = voc_dir = find_voc_root(root)
        list_file = voc_dir / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not list_file.is_file():
            raise _missing(kind, voc_dir, f"ImageSets/Segmentation/{split}.txt (the list of split {split!r})",
                           VOC_LAYOUT)
        label_dir_name = "SegmentationClassAug" if split.endswith("aug") else "SegmentationClass"
        label_dir = voc_dir / label_dir_name
        stems = _read_list(list_file)
        if not stems:  # else validate/test "succeed" on nothing and fit fails inside torch's sampler
            raise FileNotFoundError(f"{kind} split {split!r}: its list {list_file} names no images (no non-blank "
                                    f"line); expected one image id a line; layout: {VOC_LAYOUT}")
        images = [voc_dir / "JPEGImages" / f"{s}.jpg" for s in stems]
        labels = [label_dir / f"{s}.png" for s in stems]
        for p in images:
            if not p.is_file():
                raise _missing(kind, voc_dir, f"JPEGImages/{p.name} (listed in {list_file.name})", VOC_LAYOUT)
        have = [p.is_file() for p in labels]
        if split == "test" and not any(have):
            label_paths: list[str | None] = [None] * len(stems)
        else:
            if not label_dir.is_dir():
                raise _missing(kind, voc_dir, f"{label_dir_name}/", VOC_LAYOUT)
            for p, ok in zip(labels, have, strict=True):
                if not ok:
                    raise _missing(kind, voc_dir, f"{label_dir_name}/{p.name} (listed in {list_file.name})",
                                   VOC_LAYOUT)
            label_paths = [str(p) for p in labels]
        super().__init__([(str(i), lbl, s) for i, lbl, s in zip(images, label_paths, stems, strict=True)],
                         meta.identity_lut(num_classes), transform, valid=f"[0, {num_classes}) or 255")


class CityscapesSegmentation(SegmentationDataset):
    """Cityscapes fine annotations: ``*_gtFine_labelIds.png`` mapped to the 19 trainIds (others -> 255)."""

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Transform | None = None) -> None:
        self.root = root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"Cityscapes root {root} does not exist; expected {CITYSCAPES_LAYOUT}")
        img_dir, gt_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        for d in (img_dir, gt_dir):
            if not d.is_dir():
                raise _missing("Cityscapes", root, str(d.relative_to(root)), CITYSCAPES_LAYOUT)
        suffix = "_leftImg8bit.png"
        files = sorted(img_dir.glob(f"*/*{suffix}"))
        if not files:
            raise _missing("Cityscapes", root, f"images leftImg8bit/{split}/<city>/*{suffix}", CITYSCAPES_LAYOUT)
        samples = []
        for f in files:
            base = f.name[: -len(suffix)]
            gt = gt_dir / f.parent.name / f"{base}_gtFine_labelIds.png"
            if not gt.is_file():
                raise _missing("Cityscapes", root, str(gt.relative_to(root)), CITYSCAPES_LAYOUT)
            samples.append((str(f), str(gt), base))
        super().__init__(samples, meta.cityscapes_lut(), transform, valid="(Cityscapes labelIds 0..33 or 255)")


def find_ade_root(root: str | os.PathLike) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"ADE20K root {root} does not exist; expected {ADE20K_LAYOUT}")
    for cand in (root / "ADEChallengeData2016", root):
        if (cand / "images").is_dir():
            return cand
    raise _missing("ADE20K", root, "ADEChallengeData2016/images", ADE20K_LAYOUT)


class ADE20KSegmentation(SegmentationDataset):
    """ADE20K SceneParsing (ADEChallengeData2016) with ``reduce_zero_label``: 0 -> 255, 1..150 -> 0..149.
    ``split``: ``training`` / ``validation`` (aliases ``train`` / ``val`` / ``test`` -> validation)."""

    _ALIASES = {"train": "training", "val": "validation", "test": "validation"}

    def __init__(self, root: str | os.PathLike, split: str = "training", transform: Transform | None = None) -> None:
        self.root = ade = find_ade_root(root)
        split = self._ALIASES.get(split, split)
        img_dir, ann_dir = ade / "images" / split, ade / "annotations" / split
        for d in (img_dir, ann_dir):
            if not d.is_dir():
                raise _missing("ADE20K", ade, str(d.relative_to(ade)), ADE20K_LAYOUT)
        files = sorted(img_dir.glob("*.jpg"))
        if not files:
            raise _missing("ADE20K", ade, f"images images/{split}/*.jpg", ADE20K_LAYOUT)
        samples = []
        for f in files:
            ann = ann_dir / f"{f.stem}.png"
            if not ann.is_file():
                raise _missing("ADE20K", ade, str(ann.relative_to(ade)), ADE20K_LAYOUT)
            samples.append((str(f), str(ann), f.stem))
        super().__init__(samples, meta.ade20k_lut(), transform, valid="(ADE20K raw labels 0..150 or 255)")


class ImageFolderPredictDataset(SegmentationDataset):
    """Images to predict: ``{"image", "name", "orig_size", "path"}`` for each image of ``root``.

    ``root`` is a folder (all images under it, recursive), an image file, or a glob pattern (``photos/*.jpg``,
    ``shots/**/*.png``: the matching image files). ``name`` is the image's path relative to the folder (for a
    pattern: to its fixed leading folder, ``photos`` for ``photos/*.jpg``; for a file: its folder) without its
    extension (``a/x.jpg`` -> ``a/x``), or with it where several images of one folder share a stem (``x.jpg`` and
    ``x.png`` -> ``x.jpg`` and ``x.png``), so that names are unique (case-insensitively, for case-insensitive file
    systems). Images decode by :func:`load_image`'s mode rule (grey, palette, CMYK, 16-bit -> RGB 8-bit; alpha
    dropped). A missing path, or a pattern that matches no image, raises ``FileNotFoundError`` naming it.

    An image that cannot be decoded does not stop the run: loading it warns (:class:`SkippedImageWarning`, naming
    the file and the reason) and returns ``{"name", "path", "skipped": reason}`` instead of a sample; the predict
    collate (:func:`lit_attn.data.segmentation.collate_predict`) leaves it out of the batch and lists it under the
    batch's ``"skipped"``, so nothing is written for it and `SegmentationMaskWriter` names all skipped files at the
    end of the run.
    """

    def __init__(self, root: str | os.PathLike, transform: Transform | None = None) -> None:
        files, base = _predict_files(root)
        self.root = base
        rel = [p.relative_to(base) for p in files]
        stems = Counter(r.with_suffix("").as_posix().lower() for r in rel)
        names = [(r if stems[r.with_suffix("").as_posix().lower()] > 1 else r.with_suffix("")).as_posix()
                 for r in rel]
        super().__init__([(str(p), None, n) for p, n in zip(files, names, strict=True)], None, transform)

    def __getitem__(self, index: int) -> dict:
        path, _, name = self.samples[index]
        try:
            sample = super().__getitem__(index)
        except CorruptImageError as e:
            warnings.warn(f"skipping {path}: {e}", SkippedImageWarning, stacklevel=2)
            return {"name": name, "path": path, "skipped": str(e)}
        sample["path"] = path
        return sample


def _predict_files(root: str | os.PathLike) -> tuple[list[Path], Path]:
    """(image files, the folder names are relative to) of a predict root: a folder, a file or a glob pattern."""
    kinds = ", ".join(IMG_EXTENSIONS)
    text = os.path.expanduser(os.fspath(root))
    path = Path(text)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
        if not files:
            raise FileNotFoundError(f"predict root {root} contains no images ({kinds})")
        return files, path
    if path.is_file():
        return [path], path.parent
    if not glob.has_magic(text):
        raise FileNotFoundError(f"predict root {root} does not exist; expected a folder of images, an image file or "
                                f"a glob pattern such as photos/*.jpg ({kinds})")
    parts = path.parts
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    matches = sorted(Path(p) for p in glob.glob(text, recursive=True))
    files = [p for p in matches if p.suffix.lower() in IMG_EXTENSIONS and p.is_file()]
    if not files:
        found = f"{len(matches)} paths but no image files ({kinds})" if matches else "nothing"
        raise FileNotFoundError(f"predict root pattern {root!r} matches {found}")
    return files, base
