"""Shared test utilities (imported by the test modules; pytest puts tests/ on sys.path)."""
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor produced by any aten op (forward and backward): a block that never
    builds an N x N matrix keeps `max_numel` far below N**2."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def tiny_config(tmp: Path, digits_root: str, logger: str = "wandb", **trainer) -> Path:
    """A small but complete config: digits data, an attention segmentor, checkpoints, panel, writer."""
    run = tmp / "run"
    loggers = {
        "wandb": {"class_path": "lightning.pytorch.loggers.WandbLogger",
                  "init_args": {"project": "test", "save_dir": str(run), "offline": True}},
        "csv": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(run), "name": "csv"}},
    }
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 6, "val_check_interval": 3,
                    "check_val_every_n_epoch": None, "log_every_n_steps": 1, "enable_progress_bar": False,
                    "logger": loggers[logger],
                    "callbacks": [
                        {"class_path": "lit_attn.callbacks.RunCheckpoint",
                         "init_args": {"dirpath": str(run / "ckpt"), "filename": "best", "monitor": "val/mIoU",
                                       "mode": "max", "save_last": True}},
                        {"class_path": "lit_attn.callbacks.SegmentationPanel", "init_args": {"num_images": 2}},
                        {"class_path": "lit_attn.callbacks.SegmentationMaskWriter",
                         "init_args": {"output_dir": str(run / "pred")}}],
                    **trainer},
        "model": {"class_path": "lit_attn.tasks.SegmentationTask",
                  "init_args": {"model": {"class_path": "lit_attn.heads.AttnSegmentor",
                                          "init_args": {"encoder": "resnet10t", "num_classes": 11,
                                                        "attention": "psa_p", "channels": 32, "aux_channels": 16}},
                                "optimizer": "adamw", "lr": 0.002, "weight_decay": 0.0}},
        "data": {"class_path": "lit_attn.data.DigitsDataModule",
                 "init_args": {"root": digits_root, "num_train": 48, "num_val": 8, "num_test": 7, "image_size": 32,
                               "digit_size": [10, 18],
                               "batch_size": 8, "eval_batch_size": 2}},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def slow_unless(names, default) -> list:
    """`names` as parametrize values: those in `default` always run, the others are marked slow (run with --runslow
    or LIT_ATTN_RUN_SLOW=1, see conftest.py)."""
    return [n if n in default else pytest.param(n, marks=pytest.mark.slow) for n in names]


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor informative, in place: conv weights N(0, 2 / fan_in), conv biases N(0, 0.1^2), BN / LN affine
    and BN running statistics random (eval-mode BN is not the identity). Returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def onnx_bytes(model: torch.nn.Module, x: torch.Tensor, dynamo: bool, min_size: int = 32,
               dynamic: bool = True) -> bytes:
    """`model` exported to ONNX at `x` (input "x"), H and W dynamic (>= `min_size`) unless `dynamic` is False: with
    torch.onnx's dynamo exporter, or the TorchScript-based one (`dynamo=False`). Warnings silenced."""
    import io
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            dim = torch.export.Dim
            shapes = {"x": {2: dim("h", min=min_size, max=512), 3: dim("w", min=min_size, max=512)}} if dynamic \
                else None
            return torch.onnx.export(model, (x,), dynamo=True, input_names=["x"], verbose=False,
                                     dynamic_shapes=shapes).model_proto.SerializeToString()
        f = io.BytesIO()
        torch.onnx.export(model, (x,), f, dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {2: "h", 3: "w"}} if dynamic else None)
        return f.getvalue()
