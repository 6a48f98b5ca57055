"""Image in, mask out (issue 14, deliverable 2): predict_root as a folder / file / glob, every image mode decoded to
RGB 8-bit by one rule, undecodable files skipped with a warning, overlays with a legend, and `segment_image` giving
the predict run's mask from a checkpoint, a module or an smp folder."""
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import tiny_config
from PIL import Image
from torchvision import tv_tensors

from lit_attn import segment_image
from lit_attn.cli import cli_main
from lit_attn.data.datasets import ImageFolderPredictDataset, SkippedImageWarning, load_image
from lit_attn.data.meta import DIGITS_CLASSES, DIGITS_PALETTE

rng = np.random.default_rng(0)


def _smooth(h: int, w: int, channels: int = 3, peak: int = 255) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin(7 * yy + c) * np.cos(5 * xx - c) for c in rng.uniform(0, 3, channels)], -1)
    return ((img + 1) / 2 * peak).round()


def _photos(folder: Path) -> dict[str, np.ndarray]:
    """Files of several modes and sizes; returns rel path -> the RGB 8-bit array the rule should decode it to,
    computed here by hand."""
    (folder / "sub").mkdir(parents=True)
    expected = {}
    rgb = _smooth(30, 40).astype(np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.jpg", quality=95)
    with Image.open(folder / "rgb.jpg") as im:  # JPEG is lossy: its decoded pixels
        expected["rgb.jpg"] = np.asarray(im).copy()
    grey = _smooth(47, 33, 1)[..., 0].astype(np.uint8)
    Image.fromarray(grey).save(folder / "grey.png")
    expected["grey.png"] = np.repeat(grey[..., None], 3, 2)
    rgba = _smooth(64, 64, 4).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    expected["rgba.png"] = rgba[..., :3]  # alpha dropped
    deep = _smooth(28, 20, 1, peak=65535)[..., 0].astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep.png")
    with Image.open(folder / "deep.png") as im:
        assert im.mode.startswith("I")  # stored as 16 bits
    expected["deep.png"] = np.repeat((deep // 256).astype(np.uint8)[..., None], 3, 2)
    index = (_smooth(21, 26, 1)[..., 0] // 16).astype(np.uint8)
    pal = Image.fromarray(index, "P")
    colours = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    pal.putpalette(colours.ravel().tolist())
    pal.save(folder / "sub" / "pal.png")
    expected["sub/pal.png"] = colours[index]
    good = (folder / "grey.png").read_bytes()
    (folder / "broken.png").write_bytes(good[: len(good) // 2])  # a truncated PNG: its header opens, its data not
    return expected


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, digits_root):
    """One tiny fit, then one predict of the folder with overlays on."""
    tmp = tmp_path_factory.mktemp("predict_images")
    cfg_path = tiny_config(tmp, digits_root, logger="csv", max_steps=1, val_check_interval=1)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["trainer"]["callbacks"][-1]["init_args"]["overlay"] = True
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "Panel" not in c["class_path"]]
    cfg_path.write_text(yaml.safe_dump(cfg))
    cli_main(["fit", "--config", str(cfg_path)])
    ckpt = next((tmp / "run" / "ckpt").rglob("last.ckpt"))
    expected = _photos(tmp / "photos")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = cli_main(["predict", "--config", str(cfg_path), "--ckpt_path", str(ckpt),
                        "--data.init_args.predict_root", str(tmp / "photos")])
    return {"tmp": tmp, "cfg": cfg_path, "ckpt": ckpt, "cli": cli, "expected": expected, "out": tmp / "run" / "pred",
            "warnings": [str(w.message) for w in caught]}


def _reference(cli, rgb: np.ndarray) -> np.ndarray:
    """The class map computed by hand: the data module's evaluation transform, the model, a bilinear resize of the
    scores to the image's size, argmax."""
    image, _ = cli.datamodule.eval_transform()(tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1)))
    with torch.no_grad():
        scores = cli.model.model.eval()(image[None])
        scores = F.interpolate(scores, size=rgb.shape[:2], mode="bilinear", align_corners=False)
    return scores[0].argmax(0).numpy()


def test_predict_folder_of_modes_sizes_and_a_corrupt_file(predicted):
    out, expected = predicted["out"], predicted["expected"]
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    stems = sorted(r.rsplit(".", 1)[0] for r in expected)
    assert written == sorted([f"{s}.png" for s in stems] + [f"{s}_overlay.png" for s in stems])  # none for broken
    skip = [w for w in predicted["warnings"] if "broken.png" in w]
    assert any(w.startswith("skipping ") for w in skip), predicted["warnings"]  # when it was loaded
    assert any("1 image(s) could not be decoded" in w for w in skip)  # the summary at the end
    palette = np.array(DIGITS_PALETTE, dtype=np.int64)
    for rel, rgb in expected.items():
        stem = rel.rsplit(".", 1)[0]
        mask = Image.open(out / f"{stem}.png")
        h, w = rgb.shape[:2]
        assert mask.mode == "P" and mask.size == (w, h), rel
        mask = np.asarray(mask)
        assert (mask == _reference(predicted["cli"], rgb)).mean() > 0.999, rel  # up to float ties of the resize
        overlay = np.asarray(Image.open(out / f"{stem}_overlay.png").convert("RGB")).astype(np.int64)
        assert overlay.shape[1] > w and overlay.shape[0] >= h, rel  # a legend panel on the right
        blend = (rgb.astype(np.int64) + palette[mask] + 1) // 2  # alpha 0.5, rounded half up
        assert np.array_equal(overlay[:h, :w], blend), rel
        panel = overlay[:, w:].reshape(-1, 3)
        for c in np.unique(mask):  # a swatch of each class present: a full 10 x 10 block of its colour
            assert (panel == palette[c]).all(1).sum() >= 100, (rel, c)
    assert predicted["cli"].model.class_names == DIGITS_CLASSES  # the legend's names


def test_segment_image_equals_the_predict_run(predicted, tmp_path):
    import segmentation_models_pytorch as smp

    out, folder = predicted["out"], predicted["tmp"] / "photos"
    task = predicted["cli"].model
    for rel in ("rgba.png", "grey.png"):
        want = np.asarray(Image.open(out / rel))
        assert np.array_equal(segment_image(predicted["ckpt"], folder / rel), want)  # settings from the checkpoint
        assert np.array_equal(segment_image(task, folder / rel, test_scale=32), want)  # a module: ImageNet, given scale
    rgb = predicted["expected"]["rgba.png"]
    want = np.asarray(Image.open(out / "rgba.png"))
    assert np.array_equal(segment_image(task.model, rgb, test_scale=32), want)  # an array
    assert np.array_equal(segment_image(task, Image.fromarray(rgb), test_scale=32), want)  # a PIL image
    model = smp.Unet(encoder_name="resnet18", encoder_weights=None, classes=4, decoder_channels=(16, 8, 8, 8, 8))
    torch.nn.init.normal_(model.segmentation_head[0].weight, std=3.0)  # classes that differ from pixel to pixel
    model.save_pretrained(tmp_path / "smp")
    mask = segment_image(tmp_path / "smp", folder / "rgba.png")
    assert mask.dtype == np.uint8 and mask.shape == (64, 64)
    assert np.array_equal(mask, segment_image(model, folder / "rgba.png"))
    assert model.training  # segment_image left the module's mode as it was
    x = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) \
        / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        ref = model.eval()(x[None])[0].argmax(0).numpy()
    assert len(np.unique(ref)) > 1
    assert (mask == ref).mean() > 0.999


def test_predict_root_glob_and_single_file(predicted):
    folder = predicted["tmp"] / "photos"
    assert ImageFolderPredictDataset(folder / "sub" / "pal.png").names == ["pal"]
    ds = ImageFolderPredictDataset(f"{folder}/**/*.png")  # relative to the pattern's fixed folder
    assert ds.names == ["broken", "deep", "grey", "rgba", "sub/pal"]
    assert ImageFolderPredictDataset(f"{folder}/*/p*.png").names == ["sub/pal"]
    out = predicted["tmp"] / "run" / "glob"
    cfg = yaml.safe_load(predicted["cfg"].read_text())
    cfg["trainer"]["callbacks"][-1]["init_args"] = {"output_dir": str(out)}  # masks only
    cfg_path = predicted["tmp"] / "glob.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cli_main(["predict", "--config", str(cfg_path), "--ckpt_path", str(predicted["ckpt"]),
              "--data.init_args.predict_root", f"{folder}/[gr]*.*"])
    assert sorted(p.name for p in out.iterdir()) == ["grey.png", "rgb.png", "rgba.png"]
    for name in ("grey.png", "rgba.png"):
        assert np.array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(predicted["out"] / name)))


def test_predict_root_errors_name_the_path(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        ImageFolderPredictDataset(tmp_path / "missing_dir")
    with pytest.raises(FileNotFoundError, match=r"pattern '.*\*\.jpg' matches nothing"):
        ImageFolderPredictDataset(f"{tmp_path}/*.jpg")
    with pytest.raises(FileNotFoundError, match=r"matches 1 paths but no image files"):
        ImageFolderPredictDataset(f"{tmp_path}/*.txt")


def test_corrupt_file_is_skipped_not_raised(tmp_path):
    good = Image.fromarray(np.zeros((5, 6, 3), np.uint8))
    good.save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not an image")
    ds = ImageFolderPredictDataset(tmp_path)
    assert ds[0]["path"] == str(tmp_path / "a.png") and ds[0]["image"].shape == (3, 5, 6)
    with pytest.warns(SkippedImageWarning, match=r"skipping .*b\.png"):
        sample = ds[1]
    assert set(sample) == {"name", "path", "skipped"}
    from lit_attn.data.segmentation import collate_predict

    batch = collate_predict([ds[0], sample])
    assert batch["name"] == ["a"] and batch["skipped"][0][0].endswith("b.png")
    empty = collate_predict([sample])
    assert empty["image"] == [] and empty["orig_size"].shape == (0, 2)


def test_image_modes_decode_to_rgb8(tmp_path):
    la = np.stack([np.arange(12, dtype=np.uint8).reshape(3, 4) * 20, np.full((3, 4), 7, np.uint8)], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert np.array_equal(load_image(tmp_path / "la.png"), np.repeat(la[..., :1], 3, 2))  # alpha dropped
    cmyk = rng.integers(0, 256, (3, 4, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    want = (255 - cmyk[..., :3].astype(np.int64)) * (255 - cmyk[..., 3:].astype(np.int64)) / 255
    assert np.abs(load_image(tmp_path / "c.tif") - want).max() <= 0.5 + 1e-9  # Pillow's CMYK -> RGB, rounded
    pal = Image.new("P", (3, 2))
    pal.putpalette([9, 8, 7, 200, 100, 50] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 1
    pal.save(tmp_path / "pt.png", transparency=1)
    assert load_image(tmp_path / "pt.png").tolist() == [[[9, 8, 7], [200, 100, 50], [9, 8, 7]], [[9, 8, 7]] * 3]


def test_segment_image_refuses_bad_input(tmp_path):
    model = torch.nn.Conv2d(3, 2, 1)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8 RGB, got shape \(4, 5, 4\).*image\[\.\.\., :3\]"):
        segment_image(model, np.zeros((4, 5, 4), np.uint8))
    with pytest.raises(FileNotFoundError, match="nope.png does not exist"):
        segment_image(model, tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError, match="missing.ckpt does not exist"):
        segment_image(tmp_path / "missing.ckpt", np.zeros((4, 5, 3), np.uint8))
    assert segment_image(model, np.zeros((4, 5, 3), np.uint8)).shape == (4, 5)


def test_overlay_legend_lists_the_classes_present():
    from lit_attn.callbacks import render_overlay

    image = rng.integers(0, 256, (12, 40, 3), dtype=np.uint8)  # shorter than the legend of 4 classes
    mask = np.zeros((12, 40), np.uint8)
    mask[2:6, 5:20], mask[7:11, 22:38], mask[0, 0] = 3, 7, 10
    overlay = np.asarray(render_overlay(image, mask, DIGITS_PALETTE, DIGITS_CLASSES)).astype(np.int64)
    palette = np.array(DIGITS_PALETTE, dtype=np.int64)
    assert overlay.shape[0] > 12 and overlay.shape[1] > 40  # the panel widens and lengthens the canvas
    assert np.array_equal(overlay[:12, :40], (image + palette[mask] + 1) // 2)
    assert (overlay[12:, :40] == 255).all()  # below the image: the panel's white
    panel = overlay[:, 40:].reshape(-1, 3)
    for c in range(1, 11):  # a 10 x 10 swatch for each class present, none for the others
        assert ((panel == palette[c]).all(1).sum() >= 100) == (c in (3, 7, 10)), c
