"""Segmentation losses: cross-entropy with ignore_index, mmseg's OHEM, and smp's Dice / Lovasz."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOSSES = ("ce", "ohem", "dice", "lovasz")


def ohem_cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = 255, thresh: float = 0.7,
                       min_kept: int = 100_000) -> Tensor:
    """Cross-entropy over the hard pixels only, as mmseg's OHEMPixelSampler + CrossEntropyLoss.

    A valid pixel is kept when its predicted probability of the true class is below
    max(thresh, the min_kept-th smallest such probability), so at least `min_kept` pixels count.
    """
    valid = target != ignore_index
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    with torch.no_grad():
        prob = logits.detach().float().softmax(1).gather(1, target.clamp(0, logits.shape[1] - 1)[:, None])[:, 0]
        prob = prob.masked_fill(~valid, 1.0)
        n_valid = int(valid.sum())
        threshold = thresh
        if n_valid > 0 and min_kept > 0:
            kth = prob[valid].sort().values[min(min_kept, n_valid) - 1]
            threshold = max(thresh, float(kth))
        keep = valid & (prob <= threshold)
    return (loss * keep).sum() / keep.sum().clamp(min=1)


class SegmentationLoss(nn.Module):
    """Sum of the named losses ("ce", "ohem", "dice", "lovasz"; e.g. "ce+dice") with ignore_index."""

    def __init__(self, loss: str = "ce", ignore_index: int = 255, ohem_thresh: float = 0.7,
                 ohem_min_kept: int = 100_000, class_weight: list[float] | None = None):
        super().__init__()
        names = [n.strip().lower() for n in loss.split("+")]
        bad = [n for n in names if n not in LOSSES]
        if bad or not names:
            raise ValueError(f"unknown loss {loss!r}: use one of {LOSSES}, joined with '+' (e.g. 'ce+dice')")
        self.names, self.ignore_index = names, ignore_index
        self.ohem_thresh, self.ohem_min_kept = ohem_thresh, ohem_min_kept
        self.register_buffer("class_weight", None if class_weight is None else torch.tensor(class_weight),
                             persistent=False)
        if "dice" in names or "lovasz" in names:
            from segmentation_models_pytorch.losses import DiceLoss, LovaszLoss

            self.dice = DiceLoss("multiclass", ignore_index=ignore_index) if "dice" in names else None
            self.lovasz = LovaszLoss("multiclass", ignore_index=ignore_index) if "lovasz" in names else None

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = logits.float()
        total = logits.new_zeros(())
        for name in self.names:
            if name == "ce":
                total = total + F.cross_entropy(logits, target, weight=self.class_weight,
                                                ignore_index=self.ignore_index)
            elif name == "ohem":
                total = total + ohem_cross_entropy(logits, target, self.ignore_index, self.ohem_thresh,
                                                   self.ohem_min_kept)
            elif name == "dice":
                total = total + self.dice(logits, target)
            else:
                total = total + self.lovasz(logits, target)
        return total
