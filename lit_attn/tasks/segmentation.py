"""SegmentationTask: a LightningModule around any segmentation model (smp, lit_attn heads, ...).

mmsegmentation's training recipe by default: cross-entropy with ignore_index 255, auxiliary
losses weighted 0.4, SGD (lr 0.01, momentum 0.9, weight decay 5e-4) with a poly schedule
(power 0.9, min lr 1e-4) stepped per iteration after an optional linear warm-up; metrics are
torchmetrics' MulticlassJaccardIndex (dataset-level macro mIoU with ignore_index, synced under
DDP) and pixel accuracy. Validation runs whole-image inference; test and predict use the
configured mode (whole / slide) with optional multi-scale + flip. Scores are resized to the label
(evaluation) or to the input image's original size (predict) before the argmax, in bounded memory;
batches of mixed image sizes (lists, see `lit_attn.data.collate_eval`) run one image at a time.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn
from torchmetrics import ClasswiseWrapper, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from ..checkpoints import CheckedLoading, load_model_weights
from .inference import label_map, resize, segment, split_outputs
from .losses import SegmentationLoss
from .optim import configure_poly_optimizer

__all__ = ["SegmentationTask"]


class SegmentationTask(CheckedLoading, LightningModule):
    """Train / evaluate a semantic segmentation model.

    Args:
        model: any nn.Module mapping images (B, 3, H, W) to logits (B, num_classes, h, w), or in
            training mode to (main, *aux) logits. A model with a `forward_with_aux(x)` method returning
            `(main, *aux)` logits (lit_attn's smp architectures, whose `forward` returns a Tensor as smp's models)
            is trained through it, so its auxiliary outputs enter the loss; evaluation calls `model(x)` (see
            docs/TRAINING_CONTRACTS.md).
        num_classes: number of classes (the data module's, linked by the CLI).
        loss: "ce", "ohem", "dice", "lovasz", or a "+"-joined sum (e.g. "ce+dice").
        aux_weight: weight of each auxiliary output's loss: a float for all of them, a list (one per
            auxiliary output), or None (default): the model's `aux_loss_weights` when it has them
            (lit_attn's smp architectures: DANet's pam/cam outputs 1.0, the FCN auxiliary head 0.4),
            else mmseg's 0.4.
        optimizer: "sgd" or "adamw"; lr, momentum, weight_decay as mmseg's defaults.
        warmup_iters, warmup_ratio, poly_power, min_lr: the per-iteration schedule.
        test_mode: "whole" or "slide" (with test_crop_size, test_stride) for test and predict (named apart from
            the data module's training `crop_size`: Lightning refuses equal hparam names with other values).
        test_scales, test_flip: multi-scale + horizontal-flip testing (probabilities averaged).
        class_names: names for per-class IoU logging (default: the data module's, else indices).
        init_weights: weights to start `fit` from (not when resuming, nor for validate/test/predict): an smp
            `save_pretrained` folder such as `lit-attn convert mmseg` writes, a `.safetensors` / `.pth` state dict
            of the model, or a Lightning checkpoint; loaded strictly (`lit_attn.checkpoints.load_model_weights`).

    Loading a checkpoint (`Trainer(ckpt_path=...)`, `load_from_checkpoint`) first checks that it was trained with
    this architecture (`lit_attn.checkpoints.CheckedLoading`) and refuses it with both named otherwise.
    """

    def __init__(self, model: nn.Module, num_classes: int, *, ignore_index: int = 255, loss: str = "ce",
                 aux_weight: float | list[float] | None = None, ohem_thresh: float = 0.7, ohem_min_kept: int = 100_000,
                 class_weight: list[float] | None = None, optimizer: str = "sgd", lr: float = 0.01,
                 momentum: float = 0.9, weight_decay: float = 5e-4, warmup_iters: int = 0,
                 warmup_ratio: float = 1e-6, poly_power: float = 0.9, min_lr: float = 1e-4,
                 test_mode: str = "whole", test_crop_size: Sequence[int] | None = None,
                 test_stride: Sequence[int] | None = None, test_scales: Sequence[float] = (1.0,),
                 test_flip: bool = False, class_names: list[str] | None = None, init_weights: str | None = None):
        super().__init__()
        if _given_hyperparameters.get() is None:  # built in Python: the model is saved in the state dict
            self.save_hyperparameters(ignore=["model"])
        else:  # built by LightningCLI: the model's config is saved, so checkpoints rebuild it
            self.save_hyperparameters()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"SegmentationTask: num_classes must be an int >= 2, got {num_classes!r}")
        self.model = model
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.criterion = SegmentationLoss(loss, ignore_index, ohem_thresh, ohem_min_kept, class_weight)
        self.aux_weight = aux_weight
        self.class_names = class_names
        self.val_metrics = self._metrics("val/")
        self.test_metrics = self._metrics("test/")

    def _metrics(self, prefix: str) -> MetricCollection:
        k, ig = self.num_classes, self.ignore_index
        return MetricCollection({
            "mIoU": MulticlassJaccardIndex(k, average="macro", ignore_index=ig, validate_args=False),
            "acc": MulticlassAccuracy(k, average="micro", ignore_index=ig, validate_args=False),
        }, prefix=prefix)

    def on_fit_start(self) -> None:  # after a resumed checkpoint was restored: only a fresh fit takes init_weights
        if self.hparams.init_weights and self.trainer.ckpt_path is None:
            load_model_weights(self.model, self.hparams.init_weights)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(dm, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ValueError(f"SegmentationTask has num_classes={self.num_classes} but the data module "
                             f"{type(dm).__name__} has {data_classes}")
        if self.class_names is None:
            self.class_names = list(getattr(dm, "class_names", None) or map(str, range(self.num_classes)))
        labels = [str(n) for n in self.class_names]
        for split in ("val", "test"):
            per_class = ClasswiseWrapper(
                MulticlassJaccardIndex(self.num_classes, average="none", ignore_index=self.ignore_index,
                                       validate_args=False), labels=labels, prefix="IoU_")
            setattr(self, f"{split}_per_class", per_class.to(self.device))

    # ------------------------------------------------------------------ forward / loss
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _check_logits(self, logits: Tensor) -> None:
        if logits.ndim != 4 or logits.shape[1] != self.num_classes:
            raise ValueError(f"the model returned logits of shape {tuple(logits.shape)}; SegmentationTask "
                             f"expects (B, num_classes={self.num_classes}, h, w)")

    def _aux_weights(self, n: int) -> list[float]:
        weights = self.aux_weight
        if weights is None:
            weights = getattr(self.model, "aux_loss_weights", None)
            if weights is None:
                return [0.4] * n
        if isinstance(weights, (int, float)):
            return [float(weights)] * n
        weights = [float(w) for w in weights]
        if len(weights) != n:
            raise ValueError(f"SegmentationTask: {len(weights)} auxiliary loss weights {weights} for the model's "
                             f"{n} auxiliary outputs")
        return weights

    def _training_outputs(self, image: Tensor):
        """The model's outputs for the loss: `forward_with_aux(image)` where the model offers auxiliary outputs
        that way (its `forward` returns the main logits only), else `model(image)`."""
        forward_with_aux = getattr(self.model, "forward_with_aux", None)
        return forward_with_aux(image) if callable(forward_with_aux) else self.model(image)

    def training_step(self, batch, batch_idx):
        image, mask = batch["image"], batch["mask"]
        main, aux = split_outputs(self._training_outputs(image))
        self._check_logits(main)
        for a in aux:
            if not isinstance(a, Tensor) or a.ndim != 4:
                shape = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
                raise ValueError(f"the model returned an auxiliary output of shape {shape} next to its logits; "
                                 f"SegmentationTask trains auxiliary logits (B, K, h, w) only (an smp model built "
                                 f"with aux_params returns (mask, label): the classification head has no loss here)")
        loss_main = self.criterion(resize(main, mask.shape[-2:]), mask)
        loss = loss_main
        weights = self._aux_weights(len(aux))
        for i, (a, w) in enumerate(zip(aux, weights, strict=True)):
            loss_aux = self.criterion(resize(a, mask.shape[-2:]), mask)
            loss = loss + w * loss_aux
            self.log(f"train/loss_aux{i}", loss_aux, batch_size=image.shape[0])
        self.log("train/loss_main", loss_main, batch_size=image.shape[0])
        self.log("train/loss", loss, prog_bar=True, batch_size=image.shape[0])
        return loss

    # ------------------------------------------------------------------ evaluation
    def _check_mask(self, mask: Tensor, names) -> None:
        bad = (mask != self.ignore_index) & ((mask < 0) | (mask >= self.num_classes))
        if bad.any():
            raise ValueError(f"labels outside [0, {self.num_classes}) or {self.ignore_index} in batch "
                             f"{list(names) if names is not None else ''}: {mask[bad].unique().tolist()}")

    def _label_maps(self, images: Tensor | list[Tensor], sizes, **inference) -> list[Tensor]:
        """One (H_i, W_i) label map per image: `images` a (B, 3, h, w) batch (one model call) or a list of
        (3, h_i, w_i) images of different sizes (one call each)."""
        batches = [images] if isinstance(images, Tensor) else [image[None] for image in images]
        scores = []
        for x in batches:
            out = segment(self.model, x, **inference)
            self._check_logits(out)
            scores += list(out)
        return [label_map(s, size) for s, size in zip(scores, sizes, strict=True)]

    def _evaluate(self, batch, metrics: MetricCollection, per_class, **inference) -> Tensor | list[Tensor]:
        masks = batch["mask"]
        masks = list(masks) if isinstance(masks, Tensor) else masks
        for mask in masks:
            self._check_mask(mask, batch.get("name"))
        preds = self._label_maps(batch["image"], [m.shape[-2:] for m in masks], **inference)
        if isinstance(batch["mask"], Tensor):
            preds = [torch.stack(preds)]
            masks = [batch["mask"]]
        for pred, mask in zip(preds, masks, strict=True):
            metrics.update(pred, mask)
            per_class.update(pred, mask)
        return preds[0] if isinstance(batch["mask"], Tensor) else preds

    def _inference_kwargs(self) -> dict:
        h = self.hparams
        return dict(mode=h.test_mode, crop_size=h.test_crop_size, stride=h.test_stride, scales=tuple(h.test_scales),
                    flip=h.test_flip)

    def validation_step(self, batch, batch_idx):
        preds = self._evaluate(batch, self.val_metrics, self.val_per_class)
        self.log_dict(self.val_metrics, batch_size=len(batch["image"]))
        return preds

    def on_validation_epoch_end(self) -> None:
        self._log_per_class("val")

    def test_step(self, batch, batch_idx):
        preds = self._evaluate(batch, self.test_metrics, self.test_per_class, **self._inference_kwargs())
        self.log_dict(self.test_metrics, batch_size=len(batch["image"]))
        return preds

    def on_test_epoch_end(self) -> None:
        self._log_per_class("test")

    def _log_per_class(self, split: str) -> None:
        metric = getattr(self, f"{split}_per_class")
        values = metric.compute()
        metric.reset()
        self.log_dict({f"{split}/{k}": v for k, v in values.items()})
        self.per_class_iou = {k[len("IoU_"):]: float(v) for k, v in values.items()}

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0):
        """{"pred": one (H, W) label map per image at its original size (uint8 up to 256 classes), "name"}. The
        size is the batch's `orig_size` (the image before the evaluation resize), else the mask's, else the
        input's."""
        images = batch["image"]
        if "orig_size" in batch:
            sizes = [tuple(int(v) for v in s) for s in batch["orig_size"]]
        elif "mask" in batch:
            sizes = [m.shape[-2:] for m in batch["mask"]]
        else:
            sizes = [x.shape[-2:] for x in images]
        preds = self._label_maps(images, sizes, **self._inference_kwargs())
        if self.num_classes <= 256:
            preds = [p.to(torch.uint8) for p in preds]
        return {"pred": preds, "name": batch.get("name")}

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        return configure_poly_optimizer(self)
