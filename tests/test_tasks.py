"""Task internals: losses, inference modes, schedules, aux-loss wiring (no data module needed)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_attn.tasks import ClassificationTask, SegmentationLoss, SegmentationTask, ohem_cross_entropy, segment
from lit_attn.tasks.optim import build_optimizer, poly_warmup_factor


def naive_ohem(logits, target, ignore, thresh, min_kept):
    """Pixel by pixel, as mmseg's OHEMPixelSampler describes it."""
    prob = logits.softmax(1)
    entries = []
    for b in range(target.shape[0]):
        for i in range(target.shape[1]):
            for j in range(target.shape[2]):
                t = int(target[b, i, j])
                if t != ignore:
                    entries.append((float(prob[b, t, i, j]), -math.log(float(prob[b, t, i, j]))))
    probs = sorted(p for p, _ in entries)
    threshold = max(thresh, probs[min(min_kept, len(probs)) - 1])
    kept = [loss for p, loss in entries if p <= threshold]
    return sum(kept) / len(kept)


@pytest.mark.parametrize("thresh,min_kept", [(0.7, 10), (0.05, 30), (0.99, 1000)])
def test_ohem_matches_naive(thresh, min_kept):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, 4, (2, 5, 6), generator=g)
    target[0, 0, :3] = 255
    got = ohem_cross_entropy(logits, target, 255, thresh, min_kept)
    assert got.item() == pytest.approx(naive_ohem(logits, target, 255, thresh, min_kept), rel=1e-9)


def test_loss_combinations_and_errors():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 8, 8, generator=g, requires_grad=True)
    target = torch.randint(0, 3, (2, 8, 8), generator=g)
    target[:, :2] = 255
    ce = SegmentationLoss("ce")(logits, target)
    torch.testing.assert_close(ce, F.cross_entropy(logits, target, ignore_index=255))
    both = SegmentationLoss("ce+dice")(logits, target)
    from segmentation_models_pytorch.losses import DiceLoss
    torch.testing.assert_close(both, ce + DiceLoss("multiclass", ignore_index=255)(logits, target))
    for name in ("lovasz", "ohem", "ce+lovasz"):
        value = SegmentationLoss(name)(logits, target)
        value.backward()
        assert torch.isfinite(value)
    with pytest.raises(ValueError, match="unknown loss 'focal'"):
        SegmentationLoss("focal")


class Pointwise(nn.Module):
    """A 1x1 conv: translation-equivariant and flip-equivariant, so slide == whole and flip == no flip."""

    def __init__(self, k=3):
        super().__init__()
        self.conv = nn.Conv2d(3, k, 1)

    def forward(self, x):
        return self.conv(x)


def test_slide_inference_equals_whole_for_pointwise_model():
    model = Pointwise().double()
    x = torch.randn(2, 3, 37, 53, dtype=torch.float64)
    whole = segment(model, x)
    for crop, stride in [((16, 16), (8, 8)), ((37, 20), (10, 7)), ((64, 64), (32, 32))]:
        torch.testing.assert_close(segment(model, x, mode="slide", crop_size=crop, stride=stride), whole)


def test_slide_inference_counts_overlaps():
    """A model returning ones: overlapping crops average back to exactly one everywhere."""
    x = torch.randn(1, 3, 20, 30)
    out = segment(lambda t: torch.ones(t.shape[0], 2, *t.shape[-2:]), x, mode="slide", crop_size=(8, 12),
                  stride=(5, 7))
    torch.testing.assert_close(out, torch.ones(1, 2, 20, 30))


def test_multiscale_flip_averages_probabilities():
    model = Pointwise().double()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    probs = segment(model, x, flip=True)  # flip-equivariant model: mean of two equal softmaxes
    torch.testing.assert_close(probs, model(x).softmax(1))
    ms = segment(model, x, scales=(0.5, 1.0))
    half = F.interpolate(model(F.interpolate(x, scale_factor=0.5, mode="bilinear")), size=(16, 16),
                         mode="bilinear").softmax(1)
    torch.testing.assert_close(ms, (half + model(x).softmax(1)) / 2)
    with pytest.raises(ValueError, match="slide inference needs"):
        segment(model, x, mode="slide")
    with pytest.raises(ValueError, match="inference mode"):
        segment(model, x, mode="tiles")


def test_poly_schedule_with_warmup_hand_computed():
    assert poly_warmup_factor(0, 100, 0) == 1.0
    assert poly_warmup_factor(50, 100, 0, power=0.9) == pytest.approx(0.5 ** 0.9)
    assert poly_warmup_factor(100, 100, 0) == 0.0
    assert poly_warmup_factor(100, 100, 0, min_factor=0.01) == pytest.approx(0.01)
    # linear warm-up from warmup_ratio over 10 steps, times the poly factor
    assert poly_warmup_factor(5, 100, 10, warmup_ratio=0.1) == pytest.approx((0.95 ** 0.9) * (0.1 + 0.9 * 0.5))
    p = nn.Parameter(torch.zeros(1))
    cfg = build_optimizer([p], "sgd", lr=0.01, total_steps=10, min_lr=1e-4)
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.01) and lrs[5] == pytest.approx((0.01 - 1e-4) * 0.5 ** 0.9 + 1e-4)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        build_optimizer([p], "lamb", lr=1.0, total_steps=1)


class TwoHeads(nn.Module):
    """Returns (main, aux) in training, main in eval, as lit_attn's segmentors."""

    def __init__(self):
        super().__init__()
        self.main, self.aux = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        small = F.avg_pool2d(x, 2)
        return (self.main(small), self.aux(small)) if self.training else self.main(small)


def test_segmentation_task_uses_aux_outputs_in_the_loss():
    task = SegmentationTask(TwoHeads(), num_classes=4, aux_weight=0.4)
    task.log = lambda *a, **k: None
    batch = {"image": torch.randn(2, 3, 8, 8), "mask": torch.randint(0, 4, (2, 8, 8))}
    loss = task.training_step(batch, 0)
    main, aux = task.model(batch["image"])
    up = lambda t: F.interpolate(t, size=(8, 8), mode="bilinear", align_corners=False)  # noqa: E731
    expected = F.cross_entropy(up(main), batch["mask"]) + 0.4 * F.cross_entropy(up(aux), batch["mask"])
    torch.testing.assert_close(loss, expected)


def test_segmentation_task_rejects_wrong_logits_and_labels():
    task = SegmentationTask(TwoHeads(), num_classes=5)
    task.log = lambda *a, **k: None
    with pytest.raises(ValueError, match=r"num_classes=5"):
        task.training_step({"image": torch.randn(1, 3, 8, 8), "mask": torch.zeros(1, 8, 8, dtype=torch.long)}, 0)
    task = SegmentationTask(TwoHeads(), num_classes=4)
    with pytest.raises(ValueError, match=r"labels outside \[0, 4\) or 255 in batch \['img_7'\]: \[9\]"):
        task._check_mask(torch.tensor([[0, 9, 255]]), ["img_7"])
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        SegmentationTask(TwoHeads(), num_classes=1)


def test_classification_task_mixup_and_smoothing():
    task = ClassificationTask("resnet18", num_classes=6, mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1)
    task.log = lambda *a, **k: None
    loss = task.training_step({"image": torch.randn(5, 3, 32, 32), "label": torch.randint(0, 6, (5,))}, 0)
    assert torch.isfinite(loss) and task.model.fc.out_features == 6
    plain = ClassificationTask("resnet18_psa_p", num_classes=3, label_smoothing=0.1)
    plain.log = lambda *a, **k: None
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    expected = F.cross_entropy(plain.model(x), y, label_smoothing=0.1)
    torch.testing.assert_close(plain.training_step({"image": x, "label": y}, 0), expected)
