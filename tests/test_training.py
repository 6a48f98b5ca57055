"""End-to-end training through the `lit-attn` CLI: recipes, W&B offline, checkpoints, predict, bf16,
resume, and 2-process CPU DDP evaluation equal to a single-process one."""
import csv
import glob
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import tiny_config
from PIL import Image

from lit_attn.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml"))


@pytest.fixture(autouse=True)
def _wandb_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("recipe", RECIPES)
def test_print_config_of_every_recipe(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(ROOT / recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path: lit_attn.tasks.SegmentationTask" in capsys.readouterr().out


def test_fit_test_predict_with_wandb_offline(tmp_path, digits_root):
    cfg = tiny_config(tmp_path, digits_root)
    cli = cli_main(["fit", "--config", str(cfg)])
    assert cli.trainer.global_step == 6
    ckpt = tmp_path / "run" / "ckpt" / "version_0"
    assert (ckpt / "best.ckpt").exists() and (ckpt / "last.ckpt").exists()
    state = torch.load(ckpt / "last.ckpt", weights_only=True, map_location="cpu")
    assert state["hyper_parameters"]["model"]["class_path"] == "lit_attn.heads.AttnSegmentor"

    # the offline W&B run holds the metrics, the resolved config and the logged images
    runs = glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    log = Path(glob.glob(os.path.join(runs[0], "run-*.wandb"))[0]).read_bytes()
    for key in (b"val/mIoU", b"val/acc", b"train/loss", b"val/IoU_background", b"lr"):
        assert key in log, key
    images = glob.glob(os.path.join(runs[0], "files", "media", "images", "**", "*.png"), recursive=True)
    assert any("predictions" in p for p in images) and any("attention" in p for p in images)
    assert glob.glob(os.path.join(runs[0], "files", "media", "table", "**", "*.json"), recursive=True)

    test = cli_main(["test", "--config", str(cfg), "--ckpt_path", "best"])
    miou = float(test.trainer.callback_metrics["test/mIoU"])
    assert 0.0 <= miou <= 1.0 and "test/IoU_9" in test.trainer.callback_metrics

    cli_main(["predict", "--config", str(cfg), "--ckpt_path", "last"])
    pngs = sorted((tmp_path / "run" / "pred").glob("*.png"))
    assert len(pngs) == 7
    img = Image.open(pngs[0])
    assert img.mode == "P" and np.asarray(img).max() < 11 and img.size == (32, 32)


def test_bf16_mixed_fit_on_cpu(tmp_path, digits_root):
    cfg = tiny_config(tmp_path, digits_root, logger="csv", precision="bf16-mixed", max_steps=3)
    cli = cli_main(["fit", "--config", str(cfg)])
    assert cli.trainer.precision == "bf16-mixed" and cli.trainer.global_step == 3
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_resume_continues_step_count_and_learning_rate(tmp_path, digits_root):
    cfg = tiny_config(tmp_path, digits_root, logger="csv", max_steps=8, val_check_interval=4)
    every4 = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath", str(tmp_path / "mid"),
              "--trainer.callbacks.every_n_train_steps", "4", "--trainer.callbacks.save_top_k", "-1",
              "--trainer.callbacks.filename", "{step}"]
    straight = cli_main(["fit", "--config", str(cfg), *every4])
    lr_straight = straight.trainer.optimizers[0].param_groups[0]["lr"]
    mid = tmp_path / "mid" / "step=4.ckpt"
    assert torch.load(mid, weights_only=True, map_location="cpu")["global_step"] == 4

    resumed = cli_main(["fit", "--config", str(cfg), "--ckpt_path", str(mid)])
    assert resumed.trainer.global_step == 8
    assert resumed.trainer.lr_scheduler_configs[0].scheduler.last_epoch == 8
    assert resumed.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(lr_straight)
    assert lr_straight < 0.002  # the poly schedule did move


def _csv_metric(run: Path, key: str) -> float:
    rows = [r for f in run.rglob("metrics.csv") for r in csv.DictReader(f.open()) if r.get(key)]
    assert rows, f"{key} not logged under {run}"
    return float(rows[-1][key])


def test_ddp_two_processes_match_single_process_evaluation(tmp_path, digits_root):
    cfg = tiny_config(tmp_path, digits_root, logger="csv", max_steps=4, val_check_interval=2)
    exe = [sys.executable, "-m", "lit_attn.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    for cmd in (["fit", "--config", str(cfg), *ddp],
                ["test", "--config", str(cfg), *ddp, "--ckpt_path", "last",
                 "--trainer.logger.init_args.name", "ddp_test"]):
        proc = subprocess.run(exe + cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
    ddp_miou = _csv_metric(tmp_path / "run" / "ddp_test", "test/mIoU")
    single = cli_main(["test", "--config", str(cfg), "--ckpt_path", "last", "--trainer.logger.init_args.name", "one"])
    assert float(single.trainer.callback_metrics["test/mIoU"]) == pytest.approx(ddp_miou, abs=1e-6)
    # 7 test images over 2 ranks: a padding sampler would count one image twice and change the value
    assert len(single.datamodule.test_dataloader().dataset) == 7


def test_quickstart_head_selectable_from_the_command_line(tmp_path, digits_root, capsys):
    """The README's head switch: a new model class_path keeps the quickstart's compatible arguments."""
    cfg = tmp_path / "quickstart.yaml"
    text = (ROOT / "recipes" / "quickstart.yaml").read_text()
    cfg.write_text(text.replace("batch_size: 16", f"batch_size: 16\n    root: {digits_root}"))
    head = ["--model.init_args.model.class_path", "lit_attn.integrations.smp.OCRNet",
            "--model.init_args.model.init_args.decoder_channels", "16"]
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(cfg), *head, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["model"]
    assert printed["class_path"] == "lit_attn.integrations.smp.OCRNet"
    assert printed["init_args"]["encoder_name"] == "tu-resnet18" and printed["init_args"]["classes"] == 11
    assert printed["init_args"]["decoder_channels"] == 16
    cli_main(["fit", "--config", str(cfg), *head, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
              "--trainer.logger", "false", "--trainer.callbacks", "[]",
              "--data.init_args.num_train", "32", "--data.init_args.num_val", "4", "--data.init_args.num_test", "4"])
    ckpt = torch.load(sorted(glob.glob(str(tmp_path / "**" / "*.ckpt"), recursive=True))[-1], weights_only=False)
    assert any(k.startswith("model.auxiliary_head.") for k in ckpt["state_dict"])  # OCR's first stage
    assert ckpt["hyper_parameters"]["model"]["class_path"] == "lit_attn.integrations.smp.OCRNet"
