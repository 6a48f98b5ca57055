"""`lit-attn export`: ONNX / torch.export files of a trained model, verified against PyTorch; a model that exports
wrong is refused, never written (issue 12)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from helpers import tiny_config
from torch import nn

from lit_attn.cli import cli_main
from lit_attn.export import ExportError, export_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def trained(tmp_path, digits_root):
    cfg = tiny_config(tmp_path, digits_root, logger="csv", max_steps=2, val_check_interval=2)
    cli = cli_main(["fit", "--config", str(cfg)])
    return cfg, cli.model.model.eval()


def _lit_attn(*argv, cwd):
    return subprocess.run([sys.executable, "-m", "lit_attn.cli", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_onnx_from_the_cli_matches_the_trained_model(trained, tmp_path, exporter):
    cfg, model = trained
    out = tmp_path / "model.onnx"
    proc = _lit_attn("export", "--config", str(cfg), "--ckpt_path", "last", "--format", "onnx", "--output", str(out),
                     "--input-size", "64", "64", "--exporter", exporter, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verified against PyTorch" in proc.stdout and out.is_file()
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for size in ((64, 64), (80, 48)):  # dynamic height and width
        x = torch.randn(1, 3, *size)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            want = model(x).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_export_program_from_the_cli(trained, tmp_path):
    cfg, model = trained
    out = tmp_path / "model.pt2"
    proc = _lit_attn("export", "--config", str(cfg), "--ckpt_path", "last", "--format", "export", "--output", str(out),
                     "--input-size", "64", "64", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(str(out)).module()(x), model(x), atol=1e-5, rtol=0)


class _Branchy(nn.Module):
    """Data-dependent Python control flow: a trace bakes in one branch, so the TorchScript-based exporter writes a
    graph that is wrong for inputs taking the other branch."""

    def forward(self, x):
        return x * 2 if float(x.mean()) > 0 else x * 3


def test_a_wrong_export_is_refused_and_removed(tmp_path):
    example = torch.ones(1, 3, 8, 8)   # mean > 0 while tracing; the verification inputs are random (mean ~ 0 or <)
    out = tmp_path / "wrong.onnx"
    with pytest.raises(ExportError, match="does not match PyTorch") as info:
        for seed in range(8):  # the verification draws a new input; one of them takes the other branch
            torch.manual_seed(seed)
            export_model(_Branchy(), example * (-1) ** seed, out, exporter="torchscript", dynamic=False)
    assert not out.exists() and "removed" in str(info.value)


def test_export_errors_are_one_line(tmp_path, trained):
    cfg, _ = trained
    proc = _lit_attn("export", "--config", str(cfg), "--ckpt_path", str(tmp_path / "nope.ckpt"), "--output",
                     str(tmp_path / "m.onnx"), cwd=tmp_path)
    assert proc.returncode == 2 and "no such checkpoint file" in proc.stderr and "Traceback" not in proc.stderr


def test_fit_without_a_logger_drops_the_lr_monitor(tmp_path, digits_root):
    """The quickstart recipe has a LearningRateMonitor; `--trainer.logger false` must still train."""
    cli = cli_main(["fit", "--config", str(ROOT / "recipes" / "quickstart.yaml"), "--trainer.logger", "false",
                    "--trainer.max_steps", "1", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1",
                    "--data.init_args.root", digits_root, "--data.init_args.num_train", "16",
                    "--data.init_args.num_val", "4", "--data.init_args.num_test", "4",
                    "--data.init_args.image_size", "32", "--data.init_args.digit_size", "[10, 18]"])
    assert cli.trainer.global_step == 1 and not cli.trainer.loggers
