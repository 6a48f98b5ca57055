"""lit_attn.data: loaders on tiny fixtures in each data set's real on-disk layout, the digits generator, the joint
transforms and the DDP evaluation sampler."""
from __future__ import annotations

import hashlib
import json
import pickle
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from lit_attn.data import (
    ADE20KDataModule,
    ADE20KSegmentation,
    CIFARDataModule,
    CityscapesDataModule,
    CityscapesSegmentation,
    CorruptImageError,
    DigitsDataModule,
    ImageFolderDataModule,
    InvalidLabelError,
    VOCDataModule,
    VOCSegmentation,
    build_eval_transform,
    build_train_transform,
    default_digits_root,
    eval_sampler,
    generate_digits_voc,
)
from lit_attn.data.meta import voc_colormap
from lit_attn.data.transforms import RandomScaleResize, ScaleResize

RNG = np.random.default_rng(0)
SMALL_DIGITS = {"num_train": 60, "num_val": 8, "num_test": 12}


# --------------------------------------------------------------------------------------------- fixture writers
def _rgb(h: int, w: int) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _palette_png(arr: np.ndarray, path: Path) -> None:
    im = Image.frombytes("P", (arr.shape[1], arr.shape[0]), arr.astype(np.uint8).tobytes())
    im.putpalette([c for rgb in voc_colormap(256) for c in rgb])
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def _gray_png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


VOC_A = np.array([[0, 0, 15, 15], [0, 255, 15, 15], [20, 255, 0, 0]], dtype=np.uint8)  # 3x4


def make_voc(root: Path) -> Path:
    """VOCdevkit/VOC2012 with train (a, b), val (c), SegmentationClassAug + train_aug (DeepLab 2-column list)."""
    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    for name in ("a", "b", "c", "d"):
        _rgb(3, 4).save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
    _palette_png(VOC_A, voc / "SegmentationClass" / "a.png")
    _palette_png(np.full((3, 4), 7), voc / "SegmentationClass" / "b.png")
    _palette_png(np.zeros((3, 4)), voc / "SegmentationClass" / "c.png")
    for name, value in (("a", 1), ("b", 2), ("c", 3), ("d", 4)):  # SBD labels are grayscale PNGs
        _gray_png(np.full((3, 4), value), voc / "SegmentationClassAug" / f"{name}.png")
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("a\nb\n")
    (sets / "val.txt").write_text("c\n")
    (sets / "train_aug.txt").write_text("/JPEGImages/a.jpg /SegmentationClassAug/a.png\nd\n")
    return voc


CS_IDS = np.array([[7, 26, 0], [24, 33, 255], [8, 9, 11]], dtype=np.uint8)
CS_TRAIN = np.array([[0, 13, 255], [11, 18, 255], [1, 255, 2]])


def make_cityscapes(root: Path, split: str = "val") -> Path:
    for city, idx in (("frankfurt", 294), ("lindau", 19)):
        base = f"{city}_000000_{idx:06d}"
        img = root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        _rgb(3, 3).save(img)
        _gray_png(CS_IDS, root / "gtFine" / split / city / f"{base}_gtFine_labelIds.png")
    return root


ADE_RAW = np.array([[0, 1, 150], [255, 2, 0]], dtype=np.uint8)
ADE_TRAIN = np.array([[255, 0, 149], [255, 1, 255]])


def make_ade(root: Path) -> Path:
    ade = root / "ADEChallengeData2016"
    for split in ("training", "validation"):
        for name in (f"ADE_{split[:5]}_00000001", f"ADE_{split[:5]}_00000002"):
            p = ade / "images" / split / f"{name}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            _rgb(2, 3).save(p)
            _gray_png(ADE_RAW, ade / "annotations" / split / f"{name}.png")
    return ade


# --------------------------------------------------------------------------------------------- Pascal VOC
def test_voc_masks_keep_255_and_trainaug(tmp_path):
    voc = make_voc(tmp_path)
    ds = VOCSegmentation(tmp_path, "train")
    s = ds[0]
    assert s["name"] == "a" and s["image"].shape == (3, 3, 4) and s["image"].dtype == torch.float32
    assert s["mask"].dtype == torch.int64
    assert torch.equal(s["mask"], torch.from_numpy(VOC_A.astype(np.int64)))  # 255 (boundary) kept as ignore
    assert ds.names == ["a", "b"]
    aug = VOCSegmentation(voc, "train_aug")  # root may be the VOC2012 folder itself
    assert aug.names == ["a", "d"]
    assert aug[0]["mask"].unique().tolist() == [1] and aug[1]["mask"].unique().tolist() == [4]


def test_voc_datamodule_batches(tmp_path):
    make_voc(tmp_path)
    dm = VOCDataModule(str(tmp_path), use_aug=True, batch_size=2, num_workers=0, crop_size=8, scale=(16, 8))
    assert dm.num_classes == 21 and len(dm.class_names) == 21 and len(dm.palette) == 21 and dm.ignore_index == 255
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b["image"].shape == (2, 3, 8, 8) and b["mask"].shape == (2, 8, 8) and len(b["name"]) == 2
    v = next(iter(dm.val_dataloader()))
    assert v["name"] == ["c"] and v["mask"].shape == (1, 3, 4)  # evaluation masks at the original resolution
    assert v["image"].shape == (1, 3, 8, 11)  # 3x4 rescaled to fit (16, 8): x8/3, aspect ratio kept


def test_voc_missing_and_incomplete_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; expected .*JPEGImages"):
        VOCSegmentation(tmp_path / "nope", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is missing VOCdevkit/VOC2012/JPEGImages"):
        VOCSegmentation(tmp_path / "empty", "train")
    voc = make_voc(tmp_path / "v")
    (voc / "SegmentationClass" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing SegmentationClass/b.png \(listed in train.txt\)"):
        VOCSegmentation(voc, "train")
    with pytest.raises(FileNotFoundError, match="ImageSets/Segmentation/trainval.txt"):
        VOCSegmentation(voc, "trainval")
    with pytest.raises(ValueError, match="needs `root`"):
        VOCDataModule().setup("fit")


def test_voc_bad_label_value_and_corrupt_files(tmp_path):
    voc = make_voc(tmp_path)
    bad = VOC_A.copy()
    bad[0, 0] = 50
    _palette_png(bad, voc / "SegmentationClass" / "a.png")
    ds = VOCSegmentation(voc, "train")  # building works: values are checked when the sample is loaded
    with pytest.raises(InvalidLabelError, match=r"SegmentationClass/a\.png contains values \[50\]"):
        ds[0]
    assert issubclass(InvalidLabelError, ValueError) and issubclass(CorruptImageError, ValueError)
    # garbage JPEG and truncated JPEG
    (voc / "JPEGImages" / "b.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(CorruptImageError, match=r"JPEGImages/b\.jpg"):
        ds[1]
    good = (voc / "JPEGImages" / "c.jpg")
    _rgb(64, 64).save(good, quality=95)
    good.write_bytes(good.read_bytes()[:300])
    with pytest.raises(CorruptImageError, match=r"JPEGImages/c\.jpg"):
        VOCSegmentation(voc, "val")[0]
    # a colour-rendered (RGB) label and a label of the wrong size
    Image.new("RGB", (4, 3), (128, 0, 0)).save(voc / "SegmentationClass" / "c.png")
    _rgb(3, 4).save(good)
    with pytest.raises(InvalidLabelError, match=r"c\.png has mode 'RGB'"):
        VOCSegmentation(voc, "val")[0]
    _palette_png(np.zeros((5, 5)), voc / "SegmentationClass" / "c.png")
    with pytest.raises(InvalidLabelError, match="has size 5x5 but its image"):
        VOCSegmentation(voc, "val")[0]


# --------------------------------------------------------------------------------------------- Cityscapes / ADE20K
def test_cityscapes_trainid_mapping(tmp_path):
    make_cityscapes(tmp_path, "val")
    ds = CityscapesSegmentation(tmp_path, "val")
    assert ds.names == ["frankfurt_000000_000294", "lindau_000000_000019"]
    for i in range(2):
        assert torch.equal(ds[i]["mask"], torch.from_numpy(CS_TRAIN))
    dm = CityscapesDataModule(str(tmp_path), num_workers=0)
    assert dm.num_classes == 19 and dm.class_names[13] == "car" and dm.palette[0] == (128, 64, 128)
    assert dm.crop_size == (512, 1024)
    dm.setup("test")
    assert len(dm.test_dataset) == 2  # test -> val (test labels are not public)


def test_cityscapes_errors(tmp_path):
    make_cityscapes(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="Cityscapes root .* is missing leftImg8bit/val; expected"):
        CityscapesSegmentation(tmp_path, "val")
    make_cityscapes(tmp_path / "b", "val")
    import shutil

    shutil.rmtree(tmp_path / "b" / "gtFine" / "val")
    with pytest.raises(FileNotFoundError, match="is missing gtFine/val; expected .*_gtFine_labelIds.png"):
        CityscapesSegmentation(tmp_path / "b", "val")
    gt = next((tmp_path / "gtFine" / "train").glob("*/*.png"))
    _gray_png(np.full((3, 3), 40), gt)
    ds = CityscapesSegmentation(tmp_path, "train")
    with pytest.raises(InvalidLabelError, match=f"{gt.name} contains values \\[40\\]"):
        ds[ds.names.index(gt.name.replace("_gtFine_labelIds.png", ""))]


def test_ade20k_reduce_zero_label(tmp_path):
    ade = make_ade(tmp_path)
    for root in (tmp_path, ade):
        ds = ADE20KSegmentation(root, "training")
        assert len(ds) == 2 and torch.equal(ds[0]["mask"], torch.from_numpy(ADE_TRAIN))
    dm = ADE20KDataModule(str(tmp_path), num_workers=0)
    assert dm.num_classes == 150 and len(dm.class_names) == 150 and len(dm.palette) == 150
    dm.setup("validate")
    assert dm.val_dataset.names == ["ADE_valid_00000001", "ADE_valid_00000002"]
    with pytest.raises(FileNotFoundError, match="ADE20K root .* is missing ADEChallengeData2016/images"):
        ADE20KSegmentation(tmp_path / "ADEChallengeData2016" / "images", "training")


# --------------------------------------------------------------------------------------------- transforms
def test_joint_transform_keeps_image_and_mask_aligned():
    """Image values encode the mask class ((c + 1) * 20); after random resize / crop / pad / flip, every pixel whose
    3x3 mask neighbourhood has one class decodes to its mask class, and the padding is image 0 <-> mask 255. One pixel
    of tolerance holds only if the mask is resized on the image's pixel-centred grid: with floor-nearest (mmseg's
    cv2 INTER_NEAREST) about one draw in ten fails."""
    h, w = 48, 80
    rng = np.random.default_rng(0)  # own generator: the layout must not depend on which tests ran before
    cls = rng.integers(0, 11, (h // 16, w // 16)).repeat(16, 0).repeat(16, 1)
    image = tv_tensors.Image(torch.from_numpy((cls + 1) * 20).to(torch.uint8).expand(3, h, w).clone())
    mask = tv_tensors.Mask(torch.from_numpy(cls))
    tf = build_train_transform(crop_size=(64, 96), scale=(80, 48), ratio_range=(0.5, 2.0), hflip_prob=0.5,
                               photometric=False, mean=(0, 0, 0), std=(1, 1, 1))
    saw_pad = 0
    for seed in range(60):
        torch.manual_seed(seed)
        random.seed(seed)  # the transforms draw their parameters from Python's `random`
        img, m = tf(image, mask)
        assert img.shape == (3, 64, 96) and m.shape == (64, 96) and m.dtype == torch.int64
        decoded = torch.round(img[0] * 255 / 20) - 1
        pad = m == 255
        saw_pad += int(pad.any())
        assert torch.all(img[:, pad] == 0)
        mf = m.float()[None, None]
        lo = -torch.nn.functional.max_pool2d(-mf, 3, 1, 1)[0, 0]
        hi = torch.nn.functional.max_pool2d(mf, 3, 1, 1)[0, 0]
        interior = (lo == hi) & ~pad
        interior[[0, -1]] = False  # the crop hides the neighbours beyond its frame
        interior[:, [0, -1]] = False
        assert interior.sum() > 300
        assert torch.equal(decoded[interior], m[interior].float()), seed
    assert saw_pad > 0


@pytest.mark.parametrize("size", [(77, 128), (24, 40), (31, 53), (48, 80), (100, 37)])
def test_mask_resize_takes_the_source_pixel_under_each_centre(size):
    """Every resized label is the source pixel under the output pixel's centre, floor((dst + 0.5) * in / out),
    computed here by index arithmetic; values and dtype survive."""
    h, w = 48, 80
    labels = torch.arange(h * w, dtype=torch.int64).reshape(h, w)  # every pixel its own value
    out = RandomScaleResize(size, ratio_range=None).transform(tv_tensors.Mask(labels), {"size": size})
    rows = ((torch.arange(size[0]) + 0.5) * h / size[0]).floor().long().clamp(max=h - 1)
    cols = ((torch.arange(size[1]) + 0.5) * w / size[1]).floor().long().clamp(max=w - 1)
    assert isinstance(out, tv_tensors.Mask) and out.dtype == torch.int64
    assert torch.equal(out.as_subclass(torch.Tensor), labels[rows][:, cols])
    batched = ScaleResize(size, image_only=False).transform(tv_tensors.Mask(labels[None]), {"size": size})
    assert torch.equal(batched[0], out)


def test_eval_transform_and_photometric():
    image = tv_tensors.Image(torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.randint(0, 5, (30, 40)))
    img, m = build_eval_transform((64, 32))(image, mask)
    assert img.shape == (3, 32, 43) and torch.equal(m, mask.as_subclass(torch.Tensor))
    img, m = build_eval_transform(None)(image, mask)  # identity geometry, ImageNet normalisation
    expected = (image.float() / 255 - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor(
        [0.229, 0.224, 0.225])[:, None, None]
    assert torch.allclose(img, expected, atol=1e-5)
    tf = build_train_transform(crop_size=(30, 40), scale=None, hflip_prob=0.0, photometric=True)
    torch.manual_seed(0)
    outs = [tf(image, mask) for _ in range(4)]
    assert all(torch.equal(o[1], mask.as_subclass(torch.Tensor)) for o in outs)  # photometric leaves masks alone
    assert not all(torch.allclose(o[0], outs[0][0]) for o in outs[1:])


# --------------------------------------------------------------------------------------------- digits
def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_digits_deterministic_versioned_and_disjoint(tmp_path):
    a = generate_digits_voc(tmp_path / "a", **SMALL_DIGITS)
    b = generate_digits_voc(tmp_path / "b", **SMALL_DIGITS)
    assert a.name == b.name and _tree_bytes(a) == _tree_bytes(b)  # same parameters -> same bytes
    assert len(list((a / "JPEGImages").glob("*.jpg"))) == 80
    mtime = (a / "meta.json").stat().st_mtime_ns
    assert generate_digits_voc(tmp_path / "a", **SMALL_DIGITS) == a and (a / "meta.json").stat().st_mtime_ns == mtime
    c = generate_digits_voc(tmp_path / "a", **{**SMALL_DIGITS, "seed": 1})  # other parameters -> other folder
    assert c != a and c.parent == a.parent
    info = json.loads((a / "meta.json").read_text())
    pools = {k: set(v) for k, v in info["source_pools"].items()}
    assert not pools["train"] & pools["val"] and not pools["train"] & pools["test"] and not pools["val"] & pools["test"]
    used = {k: {i for scene in v for i in scene} for k, v in info["scene_sources"].items()}
    assert used["train"] <= pools["train"] and used["test"] <= pools["test"] and used["val"] <= pools["val"]
    assert not used["train"] & (used["val"] | used["test"])
    assert not list(a.parent.glob(".tmp-*"))


def test_digits_labels_classes_and_alignment(tmp_path):
    root = generate_digits_voc(tmp_path, **SMALL_DIGITS)
    counts = np.zeros(256, dtype=np.int64)
    fg, bg = [], []
    for name in (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split():
        label_im = Image.open(root / "SegmentationClass" / f"{name}.png")
        assert label_im.mode == "P" and label_im.size == (64, 64)
        label = np.asarray(label_im)
        gray = np.asarray(Image.open(root / "JPEGImages" / f"{name}.jpg").convert("L"), dtype=np.float64)
        counts += np.bincount(label.ravel(), minlength=256)
        fg.append(gray[label > 0].mean())
        bg.append(gray[label == 0].mean())
        assert 1 <= len(np.unique(label[label > 0])) <= 3  # 2-3 digits per scene (two may share a class)
    assert counts[:11].all() and counts[11:].sum() == 0  # all 11 classes present, nothing else
    assert np.mean(fg) > np.mean(bg) + 60 and all(f > b for f, b in zip(fg, bg, strict=True))


def test_digits_datamodule_env_and_loaders(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_ATTN_DATA", str(tmp_path / "data"))
    assert default_digits_root() == tmp_path / "data" / "digits_voc"
    dm = DigitsDataModule(batch_size=4, eval_batch_size=4, **SMALL_DIGITS)
    assert dm.num_classes == 11 and dm.class_names == ["background"] + [str(d) for d in range(10)]
    assert dm.hparams["num_train"] == 60
    dm.prepare_data()
    assert dm.data_dir.parent == tmp_path / "data" / "digits_voc"
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b["image"].shape == (4, 3, 64, 64) and b["mask"].shape == (4, 64, 64)
    assert set(b["mask"].unique().tolist()) <= set(range(11)) | {255}
    assert len(dm.train_dataloader()) == 15
    dm.setup("test")
    t = next(iter(dm.test_dataloader()))
    assert t["name"][0] == "test_00000" and t["image"].shape == (4, 3, 64, 64)
    dm.setup("predict")
    assert len(dm.predict_dataset) == 12  # the test split by default
    restored = pickle.loads(pickle.dumps(dm))  # ddp_spawn / workers pickle the datamodule
    assert torch.equal(restored.test_dataset[0]["mask"], dm.test_dataset[0]["mask"])


def test_digits_concurrent_generation(tmp_path):
    results, errors = [], []

    def run():
        try:
            results.append(generate_digits_voc(tmp_path, **SMALL_DIGITS))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and (results[0] / "meta.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]


# --------------------------------------------------------------------------------------------- predict & DDP
def test_predict_root_and_eval_sampler(tmp_path, monkeypatch):
    make_voc(tmp_path / "voc")
    (tmp_path / "pred" / "sub").mkdir(parents=True)
    for name in ("x", "y", "sub/z"):
        _rgb(10, 12).save(tmp_path / "pred" / f"{name}.png")
    dm = VOCDataModule(str(tmp_path / "voc"), num_workers=0, predict_root=str(tmp_path / "pred"), test_scale=24)
    dm.setup("predict")
    assert dm.predict_dataset.names == ["sub/z", "x", "y"]  # recursive, sorted by path, relative names
    s = dm.predict_dataset[2]
    assert s["name"] == "y" and "mask" not in s and s["orig_size"].tolist() == [10, 12]
    assert s["image"].shape == (3, 20, 24)  # fits 24x24, aspect ratio kept

    ranks = [list(eval_sampler(dm.predict_dataset, num_replicas=2, rank=r)) for r in range(2)]
    assert ranks == [[0, 2], [1]]  # no sample repeated to even out the ranks
    assert eval_sampler(dm.predict_dataset) is None  # not distributed -> sequential

    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    loader = dm.predict_dataloader()
    assert isinstance(loader.sampler, UnrepeatedDistributedSampler) and list(loader.sampler) == [1]
    assert [b["name"] for b in loader] == [["x"]]


# --------------------------------------------------------------------------------------------- classification
def test_imagefolder_datamodule(tmp_path):
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                _rgb(40, 36).save(tmp_path / split / cls / f"{i}.jpg")
    dm = ImageFolderDataModule(str(tmp_path), batch_size=2, num_workers=0, img_size=32)
    assert dm.num_classes == 2 and dm.class_names == ["cat", "dog"]
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b["image"].shape == (2, 3, 32, 32) and b["label"].dtype == torch.int64
    dm.setup("test")
    assert sorted(dm.test_dataset[i]["label"] for i in range(4)) == [0, 0, 1, 1]  # test -> val
    (tmp_path / "val" / "dog" / "0.jpg").write_bytes(b"garbage")
    with pytest.raises(CorruptImageError, match=r"dog/0\.jpg"):
        dm.test_dataset[2]
    (tmp_path / "only_train" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="only_train is missing val/; expected <root>/train/<class>"):
        ImageFolderDataModule(str(tmp_path / "only_train")).setup("fit")


def _write_cifar(root: Path, version: int) -> dict[str, str]:
    """Random CIFAR files; returns their {file: md5} table (CIFARDataModule refuses files whose md5 is not in
    its `checksums`, by default the official ones). Protocol 4 pickles arrays with the numpy globals the loader
    allows (protocol 5's `_frombuffer` is not on its allow-list)."""

    def batch(n):
        key = "labels" if version == 10 else "fine_labels"
        return {"data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8), key: RNG.integers(0, version, n).tolist()}

    if version == 10:
        d = root / "cifar-10-batches-py"
        d.mkdir(parents=True)
        files = {f"data_batch_{i}": batch(2) for i in range(1, 6)} | {"test_batch": batch(3)}
        files["batches.meta"] = {"label_names": [f"c{i}" for i in range(10)]}
    else:
        d = root / "cifar-100-python"
        d.mkdir(parents=True)
        files = {"train": batch(4), "test": batch(3), "meta": {"fine_label_names": [f"c{i}" for i in range(100)]}}
    for name, obj in files.items():
        (d / name).write_bytes(pickle.dumps(obj, protocol=4))
    return {name: hashlib.md5((d / name).read_bytes()).hexdigest() for name in files}


@pytest.mark.parametrize("version", [10, 100])
def test_cifar_datamodule(tmp_path, version):
    with pytest.raises(FileNotFoundError, match=f"CIFAR-{version} root .* is missing"):
        CIFARDataModule(str(tmp_path), version=version).setup("fit")
    checksums = _write_cifar(tmp_path, version)
    dm = CIFARDataModule(str(tmp_path), version=version, batch_size=2, num_workers=0)
    dm.checksums = {version: checksums}
    assert dm.num_classes == version and len(dm.class_names) == version
    dm.setup("fit")
    assert len(dm.train_dataset) == (10 if version == 10 else 4) and len(dm.val_dataset) == 3
    b = next(iter(dm.train_dataloader()))
    assert b["image"].shape == (2, 3, 32, 32) and b["label"].dtype == torch.int64


# --------------------------------------------------------------------------------------------- YAML / CLI
def _instantiate(parser, cfg):
    return parser.instantiate(cfg) if hasattr(parser, "instantiate") else parser.instantiate_classes(cfg)


def test_constructor_args_are_yaml_friendly(tmp_path):
    from jsonargparse import ArgumentParser

    for cls in (DigitsDataModule, VOCDataModule, CityscapesDataModule, ADE20KDataModule, ImageFolderDataModule,
                CIFARDataModule):
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, "data")
        cfg = parser.parse_args(["--data.root", str(tmp_path)])
        dm = _instantiate(parser, cfg).data
        assert dm.root == str(tmp_path)
        assert type(dm)(**dm.hparams).hparams == dm.hparams  # hparams rebuild the module (checkpoints)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(CityscapesDataModule, "data")
    cfg = parser.parse_string("data:\n  crop_size: [256, 512]\n  scale: 1024\n  ratio_range: null\n")
    dm = _instantiate(parser, cfg).data
    assert tuple(dm.crop_size) == (256, 512) and dm.scale == 1024 and dm.ratio_range is None


# --------------------------------------------------------------------------------------------- Lightning
def test_digits_datamodule_in_lightning_trainer(tmp_path):
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Conv2d(3, 11, 3, padding=1)

        def training_step(self, batch, _):
            return torch.nn.functional.cross_entropy(self.net(batch["image"]), batch["mask"], ignore_index=255)

        def validation_step(self, batch, _):
            self.log("val_loss", torch.nn.functional.cross_entropy(self.net(batch["image"]), batch["mask"],
                                                                   ignore_index=255), batch_size=len(batch["name"]))

        def predict_step(self, batch, _):
            return batch["name"], self.net(batch["image"]).argmax(1)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = DigitsDataModule(root=str(tmp_path), batch_size=4, eval_batch_size=5, **SMALL_DIGITS)
    trainer = pl.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    model = Tiny()
    trainer.fit(model, datamodule=dm)
    names, preds = zip(*trainer.predict(model, datamodule=dm), strict=True)
    assert names[0] == [f"test_{i:05d}" for i in range(5)] and preds[0].shape == (5, 64, 64)
