"""Optimisers and mmseg's per-iteration poly schedule with linear warm-up."""
from __future__ import annotations

import math

import torch

OPTIMIZERS = ("sgd", "adamw")


def poly_warmup_factor(step: int, total_steps: int, warmup_iters: int = 0, warmup_ratio: float = 1e-6,
                       power: float = 0.9, min_factor: float = 0.0) -> float:
    """lr / base_lr at `step`: linear warm-up from warmup_ratio, then (1 - t/T)^power down to min_factor."""
    total_steps = max(int(total_steps), 1)
    poly = (1.0 - min(step, total_steps) / total_steps) ** power * (1.0 - min_factor) + min_factor
    if step < warmup_iters:
        return poly * (warmup_ratio + (1.0 - warmup_ratio) * step / warmup_iters)
    return poly


def build_optimizer(params, name: str = "sgd", *, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                    total_steps: int | float, warmup_iters: int = 0, warmup_ratio: float = 1e-6,
                    poly_power: float = 0.9, min_lr: float = 0.0, label: str = "lr"):
    """(optimizer, per-step poly LambdaLR) in Lightning's configure_optimizers format."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if name == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if not math.isfinite(total_steps):
        raise ValueError("the poly schedule needs a finite number of steps: set trainer.max_steps or max_epochs")
    min_factor = min(min_lr / lr, 1.0) if lr > 0 else 0.0

    def factor(step: int) -> float:
        return poly_warmup_factor(step, total_steps, warmup_iters, warmup_ratio, poly_power, min_factor)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": label}}


def configure_poly_optimizer(module):
    """`configure_optimizers` of a task whose hparams hold optimizer, lr, momentum, weight_decay,
    warmup_iters, warmup_ratio, poly_power and min_lr (SegmentationTask, ClassificationTask)."""
    h = module.hparams
    return build_optimizer(module.model.parameters(), h.optimizer, lr=h.lr, momentum=h.momentum,
                           weight_decay=h.weight_decay, total_steps=module.trainer.estimated_stepping_batches,
                           warmup_iters=h.warmup_iters, warmup_ratio=h.warmup_ratio, poly_power=h.poly_power,
                           min_lr=h.min_lr)
