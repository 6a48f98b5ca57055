"""Predict writes masks at each input image's own size, under unique names, for folders of mixed sizes, in
bounded memory (issue 10, points 1-2)."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import MaxNumel, tiny_config
from PIL import Image
from torchvision import tv_tensors

from lit_attn.cli import cli_main
from lit_attn.data import collate_eval
from lit_attn.heads import AttnSegmentor
from lit_attn.tasks import SegmentationTask
from lit_attn.tasks.inference import label_map, segment

# relative path -> (height, width): two folders with the same file name, two stems with two extensions, a
# portrait, a landscape, a tiny and a large image
PHOTOS = {"a/x.jpg": (50, 100), "b/x.jpg": (70, 40), "x.png": (33, 33), "x.jpg": (20, 90), "big.png": (300, 200),
          "c/d/tiny.bmp": (5, 7)}
EXPECTED = {"a/x.jpg": "a/x.png", "b/x.jpg": "b/x.png", "x.png": "x.png.png", "x.jpg": "x.jpg.png",
            "big.png": "big.png", "c/d/tiny.bmp": "c/d/tiny.png"}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)


def _photos(folder: Path) -> None:
    rng = np.random.default_rng(0)
    for rel, (h, w) in PHOTOS.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        # smooth colour blobs, so that the masks are not all one class
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        img = np.stack([np.sin(7 * yy + c) * np.cos(5 * xx - c) for c in rng.uniform(0, 3, 3)], -1)
        Image.fromarray(((img + 1) * 127.5).astype(np.uint8)).save(folder / rel, quality=95)


def _reference(cli, path: Path, **inference) -> np.ndarray:
    """The class map of one photo computed by hand: the data module's evaluation transform, the model, a bilinear
    resize of the scores to the photo's size, argmax."""
    rgb = np.array(Image.open(path).convert("RGB"))
    image, _ = cli.datamodule.eval_transform()(tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1)))
    model = cli.model.model.eval()
    with torch.no_grad():
        scores = segment(model, image[None], **inference)
        scores = F.interpolate(scores, size=rgb.shape[:2], mode="bilinear", align_corners=False)
    return scores[0].argmax(0).numpy()


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_predict_folder_of_mixed_sizes(tmp_path, digits_root, mode):
    folder = tmp_path / "photos"
    _photos(folder)
    cfg = tiny_config(tmp_path, digits_root, logger="csv")
    extra = ["--model.init_args.test_mode", "slide", "--model.init_args.test_crop_size", "[16, 16]",
             "--model.init_args.test_stride", "[12, 12]"] if mode == "slide" else []
    cli = cli_main(["predict", "--config", str(cfg), "--data.init_args.predict_root", str(folder),
                    "--data.init_args.eval_batch_size", "4", *extra])
    assert cli.trainer.predict_loop.return_predictions is False  # the writer has them: not all held in memory
    out = tmp_path / "run" / "pred"
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == sorted(EXPECTED.values())  # one mask per photo, none overwritten
    inference = dict(mode="slide", crop_size=(16, 16), stride=(12, 12)) if mode == "slide" else {}
    for rel, name in EXPECTED.items():
        mask = Image.open(out / name)
        h, w = PHOTOS[rel]
        assert mask.mode == "P" and mask.size == (w, h), (rel, mask.size)
        ref = _reference(cli, folder / rel, **inference)
        assert (np.asarray(mask) == ref).mean() > 0.999, rel  # equal up to float ties of the bilinear resize


def test_label_map_equals_the_full_resize_in_bounded_memory():
    torch.manual_seed(0)
    scores = torch.randn(19, 37, 23)
    for size in [(600, 411), (37, 23), (11, 5), (1000, 3)]:
        full = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]
        with MaxNumel() as peak:
            banded = label_map(scores, size, max_elements=1 << 16)
        top2 = full.topk(2, 0).values
        differ = banded != full.argmax(0)
        assert not differ.any() or (top2[0] - top2[1])[differ].max() < 1e-5, size
        # the largest tensor: the (H, W) output or one band of 19 x rows x W scores, never 19 x H x W
        assert peak.max_numel <= max(size[0] * size[1], 2 * (1 << 16) + 19 * 2 * size[1]), (size, peak.max_numel)
    # a 6000 x 6000 photo's 19-class scores (2.7 GB at once) in bands of 16 M values
    with MaxNumel() as peak:
        big = label_map(torch.randn(19, 64, 64), (6000, 6000))
    assert big.shape == (6000, 6000) and peak.max_numel <= 6000 * 6000


def test_evaluation_of_a_mixed_size_batch_equals_one_image_at_a_time():
    torch.manual_seed(0)
    model = AttnSegmentor(encoder="resnet10t", num_classes=4, attention="se", channels=16, aux_channels=8).eval()
    samples = [{"image": torch.randn(3, h, w), "mask": torch.randint(0, 4, (h + 3, w - 1)), "name": f"s{i}",
                "orig_size": torch.tensor([h + 3, w - 1])} for i, (h, w) in enumerate([(24, 40), (33, 17), (24, 40)])]
    batch = collate_eval(samples)
    assert isinstance(batch["image"], list) and batch["orig_size"].shape == (3, 2)
    assert isinstance(collate_eval(samples[::2])["image"], torch.Tensor)  # one size: stacked as usual

    def evaluate(batches):
        task = SegmentationTask(model, 4)
        task.setup("validate")
        preds = [p for b in batches for p in task._evaluate(b, task.val_metrics, task.val_per_class)]
        return preds, task.val_metrics.compute()["val/mIoU"]

    with torch.no_grad():
        mixed, miou_mixed = evaluate([batch])
        single, miou_single = evaluate([collate_eval([s]) for s in samples])
        predicted = SegmentationTask(model, 4).predict_step(batch, 0)
    assert [tuple(p.shape) for p in mixed] == [(27, 39), (36, 16), (27, 39)]
    assert all(torch.equal(a, b) for a, b in zip(mixed, single, strict=True))
    assert float(miou_mixed) == pytest.approx(float(miou_single))
    assert [p.dtype for p in predicted["pred"]] == [torch.uint8] * 3 and predicted["name"] == ["s0", "s1", "s2"]
    assert all(torch.equal(p.long(), m) for p, m in zip(predicted["pred"], mixed, strict=True))


def test_mask_writer_refuses_names_that_escape_or_repeat(tmp_path):
    from lit_attn.callbacks import SegmentationMaskWriter

    writer = SegmentationMaskWriter(str(tmp_path / "out"))
    assert writer.target("a/b/x") == (tmp_path / "out" / "a" / "b" / "x.png").resolve()
    with pytest.raises(ValueError, match="two predictions are named 'a/b/x'"):
        writer.target("a/b/x")
    with pytest.raises(ValueError, match="outside"):
        writer.target("../../etc/evil")
