"""The embedded default data set: segmentation scenes of scikit-learn's real handwritten digits.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 handwritten digits (no download). The generator splits
them (stratified by digit, seeded) into disjoint source pools for train (70 %), val (10 %) and test (20 %) scenes,
and composes each scene on a textured, noisy background: ``digits_per_image`` digits, each upscaled (bilinear) to
a random square size in ``digit_size`` pixels, drawn in a random bright colour (alpha = its stroke intensity) at
the least-overlapping of ``placement_tries`` random positions (fully inside). Pixel labels: background 0, digit
``d`` -> class ``d + 1`` where the digit's stroke intensity is ``>= label_threshold`` (of its 0-16 range); where
digits overlap, the later one wins (in image and label alike).

The scenes are written once, in Pascal VOC 2012's layout (``JPEGImages/*.jpg``, ``SegmentationClass/*.png``
palette PNGs of class indices, ``ImageSets/Segmentation/{train,val,test}.txt``) plus ``meta.json`` (parameters,
generator version, the source digit indices of every scene), to::

    <root>/<version-key>/            root: the `root` argument, else $LIT_ATTN_DATA/digits_voc,
                                           else ${XDG_CACHE_HOME:-~/.cache}/lit_attn/digits_voc

where ``<version-key>`` hashes the generator version and parameters, so changing a parameter (or the generator)
generates a new folder. Generation writes to a temporary folder and renames it atomically, so concurrent
processes (DDP ranks, parallel tests) are safe; a finished folder is never rewritten. Generation is deterministic
(same parameters -> same bytes) and takes a couple of seconds for the defaults.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from . import meta
from .datasets import SegmentationDataset, VOCSegmentation
from .segmentation import SegmentationDataModule
from .transforms import SegmentationTransform

__all__ = ["DigitsDataModule", "default_digits_root", "generate_digits_voc"]

GENERATOR_VERSION = 1
SOURCE_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


def default_digits_root() -> Path:
    """``$LIT_ATTN_DATA/digits_voc`` if the variable is set, else ``$XDG_CACHE_HOME/lit_attn/digits_voc`` (cache
    home ``~/.cache`` if that is unset or empty, as for the environment of scripts/with_env.sh)."""
    base = os.environ.get("LIT_ATTN_DATA")
    if base:
        return Path(base).expanduser() / "digits_voc"
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "lit_attn" / "digits_voc"


def _check_root(root: Path) -> None:
    """A clear error if ``root`` or the nearest existing folder above it is a file (mkdir's would not name it)."""
    for p in (root, *root.parents):
        if p.exists():
            if not p.is_dir():
                where = "" if p == root else f": {p}"
                raise NotADirectoryError(f"digits root {root}{where} is a file, not a folder; pass a folder as "
                                         f"`root` (or set LIT_ATTN_DATA) for the generated scenes")
            return


def _source_pools(targets: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Disjoint, stratified pools of load_digits indices for the train / val / test scenes."""
    rng = np.random.default_rng([seed, 1])
    pools: dict[str, list[int]] = {k: [] for k in SOURCE_FRACTIONS}
    for d in range(10):
        idx = rng.permutation(np.flatnonzero(targets == d))
        n_train = int(round(len(idx) * SOURCE_FRACTIONS["train"]))
        n_val = int(round(len(idx) * SOURCE_FRACTIONS["val"]))
        pools["train"] += idx[:n_train].tolist()
        pools["val"] += idx[n_train:n_train + n_val].tolist()
        pools["test"] += idx[n_train + n_val:].tolist()
    return {k: np.array(sorted(v)) for k, v in pools.items()}


@functools.cache
def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``(n_out, n_in)`` bilinear interpolation weights (half-pixel centres, edges clamped), so that
    ``M @ x @ M.T`` upsamples a square array like ``F.interpolate(..., align_corners=False)``."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (pos - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), dtype=np.float32)
    np.add.at(m, (np.arange(n_out), lo), 1 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


def _background(rng: np.random.Generator, size: int, strength: float) -> np.ndarray:
    """Low-frequency coloured texture (bilinear-upsampled random grid) plus pixel noise, in [0, ~strength]."""
    cells = int(rng.integers(3, 9))
    level = rng.uniform(0.3, 1.0) * strength
    grid = (rng.random((3, cells, cells)) * level).astype(np.float32)
    m = _interp_matrix(size, cells)
    tex = (m @ grid @ m.T).transpose(1, 2, 0)
    tex += rng.normal(0.0, 0.04, (size, size, 3)).astype(np.float32)
    return tex


def _render_scene(rng: np.random.Generator, images: np.ndarray, targets: np.ndarray, pool: np.ndarray,
                  p: dict) -> tuple[np.ndarray, np.ndarray, list[int]]:
    size = p["image_size"]
    img = _background(rng, size, p["background"])
    label = np.zeros((size, size), dtype=np.uint8)
    n = int(rng.integers(p["digits_per_image"][0], p["digits_per_image"][1] + 1))
    sources = [int(i) for i in rng.choice(pool, size=n, replace=False)]
    for src in sources:
        s = int(rng.integers(p["digit_size"][0], p["digit_size"][1] + 1))
        m = _interp_matrix(s, images.shape[-1])
        alpha = (m @ (images[src].astype(np.float32) / 16.0) @ m.T).clip(0.0, 1.0)
        # the least-overlapping of a few random positions (overlaps stay possible; the later digit wins)
        best = None
        for _ in range(p["placement_tries"]):
            top, left = (int(v) for v in rng.integers(0, size - s + 1, size=2))
            overlap = int(np.count_nonzero(label[top:top + s, left:left + s][alpha >= p["label_threshold"]]))
            if best is None or overlap < best[0]:
                best = (overlap, top, left)
        _, top, left = best
        colour = rng.uniform(0.6, 1.0, size=3).astype(np.float32)
        region = img[top:top + s, left:left + s]
        region[:] = region * (1.0 - alpha[..., None]) + colour * alpha[..., None]
        label[top:top + s, left:left + s][alpha >= p["label_threshold"]] = targets[src] + 1
    return (img.clip(0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), label, sources


def _params(num_train: int, num_val: int, num_test: int, image_size: int, digit_size: Sequence[int],
            digits_per_image: Sequence[int], background: float, label_threshold: float, seed: int,
            placement_tries: int = 4) -> dict:
    p = {"num_train": int(num_train), "num_val": int(num_val), "num_test": int(num_test),
         "image_size": int(image_size), "digit_size": [int(v) for v in digit_size],
         "digits_per_image": [int(v) for v in digits_per_image], "background": float(background),
         "label_threshold": float(label_threshold), "placement_tries": int(placement_tries), "seed": int(seed)}
    lo, hi = p["digit_size"]
    if not 1 <= lo <= hi <= p["image_size"]:
        raise ValueError(f"digit_size {digit_size} must satisfy 1 <= low <= high <= image_size ({image_size})")
    if not 1 <= p["digits_per_image"][0] <= p["digits_per_image"][1]:
        raise ValueError(f"digits_per_image {digits_per_image} must satisfy 1 <= low <= high")
    if p["placement_tries"] < 1:
        raise ValueError(f"placement_tries must be >= 1, got {placement_tries}")
    if min(num_train, num_val, num_test) < 1:
        raise ValueError("num_train, num_val and num_test must be >= 1")
    return p


def _version_key(p: dict) -> str:
    blob = json.dumps({"generator": GENERATOR_VERSION, **p}, sort_keys=True)
    return f"v{GENERATOR_VERSION}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def _encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _write(out: Path, p: dict) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, targets = digits.images, digits.target
    pools = _source_pools(targets, p["seed"])
    (out / "JPEGImages").mkdir(parents=True)
    (out / "SegmentationClass").mkdir()
    (out / "ImageSets" / "Segmentation").mkdir(parents=True)
    palette = [c for rgb in meta.voc_colormap(256) for c in rgb]
    scenes: dict[str, list[list[int]]] = {}
    files: list[tuple[Path, bytes]] = []
    for k, split in enumerate(("train", "val", "test")):
        rng = np.random.default_rng([p["seed"], 2, k])
        names, scenes[split] = [], []
        for i in range(p[f"num_{split}"]):
            img, label, sources = _render_scene(rng, images, targets, pools[split], p)
            name = f"{split}_{i:05d}"
            lbl = Image.frombytes("P", (label.shape[1], label.shape[0]), label.tobytes())
            lbl.putpalette(palette)
            files.append((out / "JPEGImages" / f"{name}.jpg", _encode(Image.fromarray(img), "JPEG", quality=95)))
            files.append((out / "SegmentationClass" / f"{name}.png", _encode(lbl, "PNG")))
            names.append(name)
            scenes[split].append(sources)
        (out / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    # creating thousands of small files dominates on slow file systems: do it from a few threads
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda f: _write_bytes(*f), files))
    info = {"generator_version": GENERATOR_VERSION, "params": p, "class_names": meta.DIGITS_CLASSES,
            "source_pools": {k: v.tolist() for k, v in pools.items()}, "scene_sources": scenes}
    (out / "meta.json").write_text(json.dumps(info))


def generate_digits_voc(root: str | os.PathLike | None = None, num_train: int = 2000, num_val: int = 200,
                        num_test: int = 300, image_size: int = 64, digit_size: Sequence[int] = (20, 36),
                        digits_per_image: Sequence[int] = (2, 3), background: float = 0.45,
                        label_threshold: float = 0.5, seed: int = 0, placement_tries: int = 4) -> Path:
    """Generate the digits scenes if needed and return their VOC2012-layout folder ``<root>/<version-key>``
    (see the module docstring; ``root=None`` -> :func:`default_digits_root`)."""
    p = _params(num_train, num_val, num_test, image_size, digit_size, digits_per_image, background,
                label_threshold, seed, placement_tries)
    root = Path(root).expanduser() if root is not None else default_digits_root()
    final = root / _version_key(p)
    if (final / "meta.json").is_file():
        return final
    _check_root(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write(tmp, p)
        try:
            os.rename(tmp, final)  # atomic; fails if another process finished first
        except OSError:
            if not (final / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


class DigitsDataModule(SegmentationDataModule):
    """Embedded default: scenes of scikit-learn's real handwritten digits, 11 classes (``background``, ``0``..``9``),
    generated once (see :func:`generate_digits_voc`) and read with the Pascal VOC loader.

    Generator args (``num_train``, ``num_val``, ``num_test``, ``image_size``, ``digit_size``, ``digits_per_image``,
    ``background``, ``label_threshold``, ``seed``) are described in the module docstring; ``root`` is the cache
    folder (default ``$LIT_ATTN_DATA/digits_voc``, else ``${XDG_CACHE_HOME:-~/.cache}/lit_attn/digits_voc``; a
    file there raises ``NotADirectoryError`` naming it).

    Training augmentation is OFF by default (``ratio_range=None``, ``photometric=False``, ``hflip_prob=0``; the crop
    equals the scene): for the few-minute CPU budget it only slows learning. Measured with an smp Unet (resnet18,
    decoder (128, 64, 32, 16, 16), AdamW 3e-3, one-cycle, batch 16): test mIoU 0.71 after 600 steps without
    augmentation, 0.63 with photometric only, 0.48 after 600 and 0.63 after 900 steps with
    ``ratio_range=(0.75, 1.5)`` + photometric (about 0.17 s a step on 2 free cores). Turn them on for longer runs;
    keep ``hflip_prob=0`` (mirrored digits are not digits). Evaluation: identity (all scenes are
    ``image_size``-square, so ``eval_batch_size`` can be > 1).
    """

    num_classes = 11
    class_names = meta.DIGITS_CLASSES
    palette = meta.DIGITS_PALETTE
    train_split = "train"
    val_split = "val"
    test_split = "test"
    dataset_name = "digits"

    def __init__(self, root: str | None = None, batch_size: int = 16, num_workers: int = 0, num_train: int = 2000,
                 num_val: int = 200, num_test: int = 300, image_size: int = 64,
                 digit_size: tuple[int, int] = (20, 36), digits_per_image: tuple[int, int] = (2, 3),
                 background: float = 0.45, label_threshold: float = 0.5, seed: int = 0,
                 crop_size: int | tuple[int, int] | None = None, ratio_range: tuple[float, float] | None = None,
                 hflip_prob: float = 0.0, photometric: bool = False, eval_batch_size: int = 32,
                 pin_memory: bool = False, predict_root: str | None = None,
                 mean: tuple[float, float, float] = meta.IMAGENET_MEAN,
                 std: tuple[float, float, float] = meta.IMAGENET_STD) -> None:
        crop = crop_size if crop_size is not None else image_size
        super().__init__(root, batch_size, num_workers, crop, image_size, ratio_range, 1.0, hflip_prob,
                         photometric, None, eval_batch_size, pin_memory, predict_root, mean, std)
        self.save_hyperparameters()
        self.gen_params = _params(num_train, num_val, num_test, image_size, digit_size, digits_per_image,
                                  background, label_threshold, seed)
        self.data_dir: Path | None = None

    def prepare_data(self) -> None:
        self.data_dir = generate_digits_voc(self.root, **self.gen_params)

    def make_dataset(self, split: str, transform: SegmentationTransform) -> SegmentationDataset:
        if self.data_dir is None:
            self.prepare_data()  # no-op if generated (e.g. by local rank 0); safe if several ranks race
        return VOCSegmentation(self.data_dir, split, transform, num_classes=self.num_classes, kind="digits (VOC)")
