"""lit_attn.data safety: CIFAR pickles are checksummed (and unpickled through an allow-list) before use,
high-bit-depth images are scaled (not clipped) to 8 bits, empty split lists and unusable digits roots fail with a
message naming the split / file / folder. Fixtures are tiny files in each data set's real on-disk layout."""
from __future__ import annotations

import hashlib
import io
import pickle
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100

from lit_attn.data import (
    CIFARDataModule,
    CorruptImageError,
    DigitsDataModule,
    ImageFolderDataModule,
    VOCDataModule,
    VOCSegmentation,
    default_digits_root,
    generate_digits_voc,
)
from lit_attn.data import classification as cls_mod
from lit_attn.data.datasets import load_image
from lit_attn.data.meta import CIFAR_MEAN, CIFAR_STD

RNG = np.random.default_rng(0)
SMALL_DIGITS = {"num_train": 6, "num_val": 2, "num_test": 2}


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------- CIFAR fixtures
class _Py2Pickler(pickle._Pickler):
    """Writes like Python 2's cPickle (protocol 2), which wrote the official CIFAR files: byte strings as py2 `str`
    (SHORT_BINSTRING / BINSTRING, read back as text under encoding="latin1", as torchvision reads them)."""

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes}


def _py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # numpy >= 2 names its array reconstructor numpy._core; the 2009 files (numpy 1.x) reference numpy.core
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _write_cifar_py2(root: Path, version: int) -> tuple[dict[str, str], dict[str, np.ndarray], list[str]]:
    """A complete CIFAR-`version` folder in the official dict layout (py2 pickles, byte-string keys); returns the
    {file: md5} table, {file: (data, labels)} and the class names."""
    key = b"labels" if version == 10 else b"fine_labels"

    def batch(n: int, name: bytes) -> dict:
        d = {b"batch_label": name, key: RNG.integers(0, version, n).tolist(),
             b"data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"filenames": [b"img_%d.png" % i for i in range(n)]}
        if version == 100:
            d[b"coarse_labels"] = RNG.integers(0, 20, n).tolist()
        return d

    names = [f"class_{i}" for i in range(version)]
    if version == 10:
        d = root / "cifar-10-batches-py"
        files = {f"data_batch_{i}": batch(2, b"training batch %d of 5" % i) for i in range(1, 6)}
        files["test_batch"] = batch(3, b"testing batch 1 of 1")
        files["batches.meta"] = {b"label_names": [n.encode() for n in names], b"num_cases_per_batch": 2,
                                 b"num_vis": 3072}
    else:
        d = root / "cifar-100-python"
        files = {"train": batch(4, b"training batch 1 of 1"), "test": batch(3, b"testing batch 1 of 1"),
                 "meta": {b"fine_label_names": [n.encode() for n in names],
                          b"coarse_label_names": [b"c%d" % i for i in range(20)]}}
    d.mkdir(parents=True)
    for name, obj in files.items():
        (d / name).write_bytes(_py2_pickle(obj))
    arrays = {k: (v[b"data"], np.array(v[key])) for k, v in files.items() if b"data" in v}
    return {name: _md5(d / name) for name in files}, arrays, names


class _Evil:
    """A pickle payload: unpickling it creates (opens for writing) `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _plant_evil(root: Path, marker: Path) -> Path:
    path = root / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": _Evil(marker), "labels": [0]}, protocol=2))
    return path


# --------------------------------------------------------------------------------------------- CIFAR tests
def test_cifar_crafted_batch_is_refused_before_unpickling(tmp_path):
    table, _, _ = _write_cifar_py2(tmp_path, 10)
    marker = tmp_path / "pwned"
    evil = _plant_evil(tmp_path, marker)
    dm = CIFARDataModule(str(tmp_path), version=10, num_workers=0)
    dm.checksums = {10: table}  # every other file matches; data_batch_1 does not
    with pytest.raises(ValueError, match="data_batch_1") as e:
        dm.setup("fit")
    msg = str(e.value)
    assert str(evil) in msg and table["data_batch_1"] in msg and _md5(evil) in msg and "re-extract" in msg.lower()
    assert not marker.exists()


def test_cifar_official_checksums_are_the_default(tmp_path):
    """Without an injected table the official md5s apply: a fixture (not the real data) is refused, naming the
    first file, torchvision's expected md5 and the md5 found; nothing is unpickled."""
    _write_cifar_py2(tmp_path, 10)
    dm = CIFARDataModule(str(tmp_path), version=10, num_workers=0)
    first = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    with pytest.raises(ValueError, match="data_batch_1") as e:
        dm.setup("validate")
    assert dict(CIFAR10.train_list)["data_batch_1"] in str(e.value) and _md5(first) in str(e.value)
    expected = {n: m for n, m in [*CIFAR10.train_list, *CIFAR10.test_list]} | {"batches.meta": CIFAR10.meta["md5"]}
    assert CIFARDataModule.checksums[10] == expected
    expected = {n: m for n, m in [*CIFAR100.train_list, *CIFAR100.test_list]} | {"meta": CIFAR100.meta["md5"]}
    assert CIFARDataModule.checksums[100] == expected


def test_cifar_allow_list_refuses_foreign_globals_even_with_matching_md5(tmp_path):
    """Defence in depth: a file swapped after its check (or a wrong table) still cannot run code."""
    table, _, _ = _write_cifar_py2(tmp_path, 10)
    marker = tmp_path / "pwned"
    evil = _plant_evil(tmp_path, marker)
    dm = CIFARDataModule(str(tmp_path), version=10, num_workers=0)
    dm.checksums = {10: {**table, "data_batch_1": _md5(evil)}}
    with pytest.raises(pickle.UnpicklingError, match=r"data_batch_1: io\.open is not allowed"):
        dm.setup("fit")
    assert not marker.exists()


@pytest.mark.parametrize("version", [10, 100])
def test_cifar_matching_checksums_load_the_fixture_arrays(tmp_path, version):
    table, arrays, names = _write_cifar_py2(tmp_path, version)
    dm = CIFARDataModule(str(tmp_path), version=version, batch_size=2, num_workers=0)
    dm.checksums = {version: table}
    dm.setup("fit")
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if version == 10 else ["train"]
    test_file = "test_batch" if version == 10 else "test"
    for ds, files in ((dm.train_dataset.dataset, train_files), (dm.val_dataset.dataset, [test_file])):
        data = np.concatenate([arrays[f][0] for f in files])
        expected = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CIFAR rows: 1024 R, 1024 G, 1024 B
        assert ds.data.dtype == np.uint8 and np.array_equal(ds.data, expected)
        assert list(ds.targets) == np.concatenate([arrays[f][1] for f in files]).tolist()
        assert ds.classes == names
    s = dm.val_dataset[1]  # evaluation transform: ToTensor + Normalize only
    x = arrays[test_file][0][1].reshape(3, 32, 32).astype(np.float64) / 255
    want = (x - np.array(CIFAR_MEAN[version])[:, None, None]) / np.array(CIFAR_STD[version])[:, None, None]
    assert s["label"] == int(arrays[test_file][1][1])
    assert torch.allclose(s["image"].double(), torch.from_numpy(want), atol=1e-5)


def test_cifar_files_are_hashed_once_per_setup(tmp_path, monkeypatch):
    table, _, _ = _write_cifar_py2(tmp_path, 10)
    calls = []
    real = cls_mod._md5
    monkeypatch.setattr(cls_mod, "_md5", lambda p: calls.append(Path(p).name) or real(p))
    dm = CIFARDataModule(str(tmp_path), version=10, num_workers=0)
    dm.checksums = {10: table}
    dm.setup(None)  # train, val and test datasets
    assert sorted(calls) == sorted(table)
    for i in range(3):
        dm.train_dataset[i]
    assert len(calls) == len(table)


# --------------------------------------------------------------------------------------------- high bit depth
def _png16(a: np.ndarray, path: Path) -> None:
    """Minimal 16-bit PNG writer (Pillow cannot write 48-bit RGB): (H, W) grey or (H, W, 3) RGB uint16."""
    h, w = a.shape[:2]
    c = 1 if a.ndim == 2 else a.shape[2]
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in a.reshape(h, w * c))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def _tiff16_rgb(a: np.ndarray, path: Path) -> None:
    """Minimal little-endian baseline TIFF, (H, W, 3) uint16, uncompressed, one strip."""
    h, w, _ = a.shape
    pix = a.astype("<u2").tobytes()
    n = 10
    bps_off = 8 + 2 + n * 12 + 4
    pix_off = bps_off + 6

    def short(tag: int, value: int) -> bytes:
        return struct.pack("<HHIHH", tag, 3, 1, value, 0)

    entries = [short(256, w), short(257, h), struct.pack("<HHII", 258, 3, 3, bps_off), short(259, 1), short(262, 2),
               struct.pack("<HHII", 273, 4, 1, pix_off), short(277, 3), short(278, h),
               struct.pack("<HHII", 279, 4, 1, len(pix)), short(284, 1)]
    path.write_bytes(b"II*\x00" + struct.pack("<IH", 8, n) + b"".join(entries) + b"\x00" * 4
                     + struct.pack("<3H", 16, 16, 16) + pix)


# corner values of the 16 -> 8 bit rule (v >> 8) plus random ones
U16 = np.concatenate([np.array([0, 1, 127, 128, 255, 256, 257, 32767, 32768, 65279, 65280, 65534, 65535]),
                      RNG.integers(0, 65536, 35)]).astype(np.uint16).reshape(6, 8)


def _grey3(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=2)


@pytest.mark.parametrize("fmt", ["png", "tif", "tif-bigendian"])
def test_16bit_grey_is_scaled_not_clipped(tmp_path, fmt):
    path = tmp_path / f"x.{fmt[:3]}"
    im = Image.frombytes("I;16B", (8, 6), U16.astype(">u2").tobytes()) if fmt == "tif-bigendian" else \
        Image.fromarray(U16)
    im.save(path)
    out = load_image(path)
    assert out.dtype == np.uint8 and out.shape == (6, 8, 3)
    assert np.array_equal(out, _grey3((U16.astype(np.int64) // 256).astype(np.uint8)))


def test_16bit_colour_matches_pillow_and_grey(tmp_path):
    """Pillow reduces 48-bit PNG / 16-bit RGB TIFF to 8 bits by the high byte; grey 16-bit follows the same rule,
    so one 16-bit picture decodes alike whether stored grey or RGB."""
    rgb = RNG.integers(0, 65536, (6, 8, 3)).astype(np.uint16)
    _png16(rgb, tmp_path / "rgb.png")
    _tiff16_rgb(rgb, tmp_path / "rgb.tif")
    for p in (tmp_path / "rgb.png", tmp_path / "rgb.tif"):
        assert np.array_equal(load_image(p), (rgb.astype(np.int64) // 256).astype(np.uint8))
    _png16(_grey3(U16), tmp_path / "grey_as_rgb.png")
    Image.fromarray(U16).save(tmp_path / "grey.png")
    assert np.array_equal(load_image(tmp_path / "grey.png"), load_image(tmp_path / "grey_as_rgb.png"))


def test_32bit_int_image(tmp_path):
    a = U16.astype(np.int32)
    Image.fromarray(a).save(tmp_path / "i.tif")  # mode "I" (Pillow < 10 also opened 16-bit PNGs as "I")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    assert np.array_equal(load_image(tmp_path / "i.tif"), _grey3((a // 256).astype(np.uint8)))
    for bad in (70000, -1):
        b = a.copy()
        b[2, 3] = bad
        Image.fromarray(b).save(tmp_path / "bad.tif")
        with pytest.raises(CorruptImageError, match=rf"bad\.tif .*\[{min(bad, 0)}, {max(bad, 65535)}\].*0\.\.65535"):
            load_image(tmp_path / "bad.tif")


def test_float_image(tmp_path):
    f = np.concatenate([[0.0, 1.0, 0.5, 1 / 255], RNG.random(44)]).astype(np.float32).reshape(6, 8)
    Image.fromarray(f).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    assert np.array_equal(load_image(tmp_path / "f.tif"), _grey3(np.round(f.astype(np.float64) * 255).astype(np.uint8)))
    for bad in (1.5, -0.25, np.nan):
        g = f.copy()
        g[1, 1] = bad
        Image.fromarray(g).save(tmp_path / "bad.tif")
        with pytest.raises(CorruptImageError, match=r"bad\.tif .*mode 'F'.*\[0, 1\]"):
            load_image(tmp_path / "bad.tif")


def test_8bit_images_are_bit_identical(tmp_path):
    rgb = RNG.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    grey = RNG.integers(0, 256, (6, 8), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(grey).save(tmp_path / "grey.tif")
    rgba = np.dstack([rgb, grey])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    pal = Image.fromarray(grey % 16).convert("P")
    pal.putpalette(RNG.integers(0, 256, 768, dtype=np.uint8).tolist())
    pal.save(tmp_path / "pal.png")
    palette = np.array(pal.getpalette(), dtype=np.uint8).reshape(-1, 3)
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=90)
    assert np.array_equal(load_image(tmp_path / "rgb.png"), rgb)
    assert np.array_equal(load_image(tmp_path / "grey.png"), _grey3(grey))
    assert np.array_equal(load_image(tmp_path / "grey.tif"), _grey3(grey))
    assert np.array_equal(load_image(tmp_path / "rgba.png"), rgb)  # alpha dropped
    assert np.array_equal(load_image(tmp_path / "pal.png"), palette[grey % 16])
    with Image.open(tmp_path / "rgb.jpg") as im:
        assert np.array_equal(load_image(tmp_path / "rgb.jpg"), np.asarray(im.convert("RGB")))


def test_imagefolder_scales_16bit_images(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(U16).save(tmp_path / split / "a" / "x.png")
    dm = ImageFolderDataModule(str(tmp_path), num_workers=0, img_size=8)
    ds = dm.make_dataset("val").dataset
    img = ds.loader(ds.samples[0][0])
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), _grey3((U16 // 256).astype(np.uint8)))


# --------------------------------------------------------------------------------------------- empty splits
def _voc(root: Path) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    for name in ("a", "b"):
        Image.fromarray(RNG.integers(0, 256, (3, 4, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{name}.jpg")
        Image.fromarray(np.zeros((3, 4), np.uint8)).save(voc / "SegmentationClass" / f"{name}.png")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("b\n")
    return voc


@pytest.mark.parametrize("split,stage", [("val", "validate"), ("train", "fit")])
@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_voc_empty_split_list_fails(tmp_path, split, stage, content):
    voc = _voc(tmp_path)
    lst = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
    lst.write_text(content)
    with pytest.raises(FileNotFoundError, match=rf"split '{split}'.*{re.escape(str(lst))}.*no image") as e:
        VOCSegmentation(tmp_path, split)
    dm = VOCDataModule(str(tmp_path), num_workers=0)
    with pytest.raises(FileNotFoundError) as e2:
        dm.setup(stage)
    assert str(e2.value) == str(e.value)


def test_imagefolder_empty_split_names_the_folder(tmp_path):
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
    for c in ("cat", "dog"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / c / "0.png")
    dm = ImageFolderDataModule(str(tmp_path), num_workers=0)
    with pytest.raises(FileNotFoundError, match=rf"split 'val' \({re.escape(str(tmp_path / 'val'))}\).*no valid file"):
        dm.setup("validate")


# --------------------------------------------------------------------------------------------- digits root
def test_digits_root_that_is_a_file(tmp_path):
    f = tmp_path / "data"
    f.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=rf"digits root {re.escape(str(f))} is a file"):
        generate_digits_voc(f, **SMALL_DIGITS)
    sub = re.escape(str(f / "sub"))
    with pytest.raises(NotADirectoryError, match=rf"digits root {sub}: {re.escape(str(f))} is a file"):
        DigitsDataModule(root=str(f / "sub"), **SMALL_DIGITS).prepare_data()
    assert f.read_text() == "not a folder"


def test_default_digits_root_honours_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv("LIT_ATTN_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_digits_root() == tmp_path / "home" / ".cache" / "lit_attn" / "digits_voc"
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # empty counts as unset (as ${XDG_CACHE_HOME:-...} in with_env.sh)
    assert default_digits_root() == tmp_path / "home" / ".cache" / "lit_attn" / "digits_voc"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_digits_root() == tmp_path / "xdg" / "lit_attn" / "digits_voc"
    monkeypatch.setenv("LIT_ATTN_DATA", str(tmp_path / "data"))  # takes precedence
    assert default_digits_root() == tmp_path / "data" / "digits_voc"
