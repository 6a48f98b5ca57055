"""ClassificationTask: image classification with timm backbones carrying attention blocks.

Top-1 / top-5 accuracy (torchmetrics), label smoothing, and mixup / cutmix through timm's own
`timm.data.Mixup` with `timm.loss.SoftTargetCrossEntropy`.
"""
from __future__ import annotations

import timm
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from ..checkpoints import CheckedLoading
from .optim import configure_poly_optimizer

__all__ = ["ClassificationTask"]


class ClassificationTask(CheckedLoading, LightningModule):
    """Train / evaluate an image classifier.

    Args:
        model: an nn.Module, or a timm model name built with `timm.create_model(model, num_classes=...,
            pretrained=pretrained, **model_kwargs)` (e.g. "resnet50_psa_p", or "resnet50" with
            model_kwargs={"block_args": {"attn_layer": "psa_p"}}).
        pretrained: with a timm name, start from its pretrained weights (a tag in the name picks them,
            e.g. "resnet50_nonlocal.tv_in1k"; offline: model_kwargs={"pretrained_cfg_overlay": {"file": F}}).
            lit_attn's variants load their base model's trunk, the blocks keep their init.
        num_classes: number of classes (the data module's, linked by the CLI).
        label_smoothing, mixup_alpha, cutmix_alpha, mixup_prob: regularisation (timm's Mixup when an
            alpha is > 0, which also applies the label smoothing).
        optimizer, lr, momentum, weight_decay, warmup_iters, warmup_ratio, poly_power, min_lr: as
            SegmentationTask (per-iteration poly schedule).
    """

    architecture_hparams = ("model", "model_kwargs")

    def __init__(self, model: nn.Module | str, num_classes: int, *, pretrained: bool = False,
                 model_kwargs: dict | None = None,
                 label_smoothing: float = 0.0, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 mixup_prob: float = 1.0, optimizer: str = "sgd", lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 1e-4, warmup_iters: int = 0, warmup_ratio: float = 1e-3,
                 poly_power: float = 0.9, min_lr: float = 0.0):
        super().__init__()
        if _given_hyperparameters.get() is None and isinstance(model, nn.Module):
            self.save_hyperparameters(ignore=["model"])
        else:
            self.save_hyperparameters()
        if isinstance(model, str):
            model = timm.create_model(model, num_classes=num_classes, pretrained=pretrained, **(model_kwargs or {}))
        self.model = model
        self.num_classes = num_classes
        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=mixup_prob,
                               label_smoothing=label_smoothing, num_classes=num_classes)
            self.soft_ce = SoftTargetCrossEntropy()
        top5 = min(5, num_classes)
        metrics = {"acc1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                   f"acc{top5}": MulticlassAccuracy(num_classes, top_k=top5, average="micro")}
        self.val_metrics = MetricCollection(metrics, prefix="val/")
        self.test_metrics = self.val_metrics.clone(prefix="test/")

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch["image"], batch["label"]
        if self.mixup is not None:
            if x.shape[0] % 2:  # timm's Mixup needs an even batch
                x, y = x[:-1], y[:-1]
            x, soft = self.mixup(x, y)
            loss = self.soft_ce(self.model(x), soft)
        else:
            loss = F.cross_entropy(self.model(x), y, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def _evaluate(self, batch, metrics):
        logits = self.model(batch["image"])
        metrics.update(logits, batch["label"])
        self.log(f"{metrics.prefix}loss", F.cross_entropy(logits, batch["label"]), batch_size=logits.shape[0],
                 sync_dist=True)
        self.log_dict(metrics, batch_size=logits.shape[0])

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, self.val_metrics)

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, self.test_metrics)

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0):
        return self.model(batch["image"]).softmax(-1)

    def configure_optimizers(self):
        return configure_poly_optimizer(self)
