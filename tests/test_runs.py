"""Runs and checkpoints are never lost, never half-written, never loaded into the wrong model (issue 10, points
3-7): one folder per fit, `--ckpt_path best|last` resolution, architecture checks, atomic saves, safe loading."""
import errno
import hashlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import tomllib
import torch
import yaml
from helpers import tiny_config

from lit_attn.checkpoints import (
    AtomicCheckpointIO,
    CheckpointMismatchError,
    RunCheckpoint,
    check_checkpoint_fits,
    find_checkpoint,
)
from lit_attn.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = ["--data.init_args.num_train", "16", "--data.init_args.num_val", "4", "--data.init_args.num_test", "4",
             "--data.init_args.image_size", "32", "--data.init_args.digit_size", "[10, 18]"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _quickstart(digits_root: str, *extra: str) -> list[str]:
    """The README's quickstart recipe, shrunk to seconds (2 steps, tiny data); checkpoints as configured."""
    return ["--config", str(ROOT / "recipes" / "quickstart.yaml"),
            "--trainer.logger", "{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: logs}}",
            "--trainer.max_steps", "2", "--trainer.max_epochs", "1",
            "--data.init_args.root", digits_root, "--data.init_args.batch_size", "8", *TINY_DATA, *extra]


def test_second_fit_of_the_quickstart_keeps_the_first_runs_checkpoints(tmp_path, digits_root):
    """The README's own sequence: fit the quickstart, then fit it again with another block."""
    cli_main(["fit", *_quickstart(digits_root)])
    ckpts = tmp_path / "runs" / "quickstart" / "checkpoints"
    first = {p.relative_to(ckpts): _digest(p) for p in ckpts.rglob("*.ckpt")}
    assert {p.name for p in first} == {"best.ckpt", "last.ckpt"}
    time.sleep(0.05)
    second = cli_main(["fit", *_quickstart(digits_root, "--model.init_args.model.dict_kwargs.block_args",
                                           "{attn_layer: se}")])
    for rel, digest in first.items():
        assert _digest(ckpts / rel) == digest, f"{rel} of the first run was overwritten"
    run0, run1 = ckpts / "version_0", ckpts / "version_1"
    assert (run1 / "best.ckpt").is_file() and (run1 / "last.ckpt").is_file()
    assert (run1 / "config.yaml").is_file() and "attn_layer: se" in (run1 / "config.yaml").read_text()
    assert second.trainer.checkpoint_callback.dirpath == str(run1)
    # best / last now mean the newest run's files
    assert find_checkpoint(ckpts, "best") == run1 / "best.ckpt"
    assert find_checkpoint(ckpts, "last") == run1 / "last.ckpt"
    assert len(list(run0.glob("*.ckpt"))) == 2


def _fake_run(folder: Path, names_and_steps, best: str | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, step) in enumerate(names_and_steps):
        state = {"global_step": step, "callbacks": {}}
        if best is not None:
            state["callbacks"]["RunCheckpoint{}"] = {"best_model_path": f"/elsewhere/{best}", "dirpath": str(folder)}
        torch.save(state, folder / name)
        os.utime(folder / name, (1000 + i, 1000 + i))  # later in the list = newer


def test_find_checkpoint_newest_run_and_newest_last(tmp_path):
    root = tmp_path / "ckpt"
    _fake_run(root / "version_0", [("best.ckpt", 1), ("last.ckpt", 2)])
    _fake_run(root / "version_2", [("last.ckpt", 5), ("last-v1.ckpt", 7), ("best.ckpt", 6)])
    (root / "version_10").mkdir()  # a run that crashed before its first checkpoint
    (root / "version_10" / ".last.ckpt.tmp-1-abc").write_bytes(b"partial")
    assert find_checkpoint(root, "last") == root / "version_2" / "last-v1.ckpt"  # newest last*, as Lightning's
    assert find_checkpoint(root, "best") == root / "version_2" / "best.ckpt"
    # several best files: the one the ModelCheckpoint state of the newest checkpoint recorded wins over mtime
    _fake_run(root / "version_3", [("best-step=4.ckpt", 4), ("best-step=2.ckpt", 2), ("last.ckpt", 9)],
              best="best-step=4.ckpt")
    assert find_checkpoint(root, "best") == root / "version_3" / "best-step=4.ckpt"
    # a flat folder (a plain ModelCheckpoint) works too
    _fake_run(tmp_path / "flat", [("last.ckpt", 1), ("last-v1.ckpt", 2)])
    assert find_checkpoint(tmp_path / "flat", "last") == tmp_path / "flat" / "last-v1.ckpt"
    assert find_checkpoint(tmp_path / "nothing", "best") is None


def test_ckpt_path_last_uses_the_newest_last_file_and_fit_best_resumes(tmp_path, digits_root):
    cfg = tiny_config(tmp_path, digits_root, logger="csv", max_steps=4, val_check_interval=2)
    cli_main(["fit", "--config", str(cfg)])
    run = tmp_path / "run" / "ckpt" / "version_0"
    # a newer last-v1.ckpt (as Lightning's version counter writes) holding other weights
    ckpt = torch.load(run / "last.ckpt", weights_only=True)
    ckpt["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, run / "last-v1.ckpt")
    val = cli_main(["validate", "--config", str(cfg), "--ckpt_path", "last"])
    assert Path(val.trainer.ckpt_path) == run / "last-v1.ckpt"
    weight = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    assert torch.equal(val.model.state_dict()[weight], ckpt["state_dict"][weight])

    # fit --ckpt_path best resumes from the best file of the newest run, into a new run folder
    best = find_checkpoint(tmp_path / "run" / "ckpt", "best")
    best_step = torch.load(best, weights_only=True)["global_step"]
    resumed = cli_main(["fit", "--config", str(cfg), "--ckpt_path", "best", "--trainer.max_steps", "6"])
    assert Path(resumed.trainer.ckpt_path) == best
    assert resumed.trainer.global_step == 6 and best_step < 6
    assert resumed.trainer.checkpoint_callback.dirpath == str(tmp_path / "run" / "ckpt" / "version_1")

    text = yaml.safe_load(cfg.read_text())
    text["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / "empty")
    cfg.write_text(yaml.safe_dump(text))
    with pytest.raises(FileNotFoundError, match="no best"):
        cli_main(["test", "--config", str(cfg), "--ckpt_path", "best"])


def test_fit_ckpt_path_last_without_checkpoints_starts_fresh(tmp_path, digits_root):
    cfg = tiny_config(tmp_path, digits_root, logger="csv", max_steps=2, val_check_interval=2)
    with pytest.warns(UserWarning, match="starts from scratch"):
        cli = cli_main(["fit", "--config", str(cfg), "--ckpt_path", "last"])
    assert cli.trainer.global_step == 2 and cli.trainer.ckpt_path is None


def test_checkpoint_of_another_architecture_is_refused_with_both_named(tmp_path, digits_root):
    cfg = tiny_config(tmp_path, digits_root, logger="csv", max_steps=2, val_check_interval=2)
    cli_main(["fit", "--config", str(cfg)])
    path = tmp_path / "run" / "ckpt" / "version_0" / "best.ckpt"
    other = ["--model.init_args.model.init_args.attention", "nonlocal"]
    for ckpt in (str(path), "best"):
        with pytest.raises(CheckpointMismatchError) as info:
            cli_main(["test", "--config", str(cfg), "--ckpt_path", ckpt, *other])
        msg = str(info.value)
        assert "'psa_p'" in msg and "'nonlocal'" in msg and "attention" in msg and len(msg) < 1000, msg
        assert "--use_checkpoint_architecture true" in msg
    # the opt-in builds the checkpoint's architecture (and keeps the rest of the config)
    ok = cli_main(["test", "--config", str(cfg), "--ckpt_path", str(path), *other,
                   "--use_checkpoint_architecture", "true", "--model.init_args.test_flip", "true"])
    assert ok.model.hparams["model"]["init_args"]["attention"] == "psa_p" and ok.model.hparams["test_flip"]
    same = cli_main(["test", "--config", str(cfg), "--ckpt_path", str(path), "--model.init_args.test_flip", "true"])
    assert float(ok.trainer.callback_metrics["test/mIoU"]) == float(same.trainer.callback_metrics["test/mIoU"])
    # a model built in Python (no saved model config): the state-dict check still gives a short message
    from lit_attn.heads import AttnSegmentor
    from lit_attn.tasks import SegmentationTask

    task = SegmentationTask(AttnSegmentor(encoder="resnet10t", num_classes=5, attention="se", channels=16,
                                          aux_channels=8), 5)
    with pytest.raises(CheckpointMismatchError, match="does not fit the model") as info:
        check_checkpoint_fits(task, torch.load(path, weights_only=True))
    assert len(str(info.value)) < 1000


def test_plain_modelcheckpoint_without_version_counter_refuses_to_overwrite(tmp_path, digits_root):
    cfg = tiny_config(tmp_path, digits_root, logger="csv", max_steps=2, val_check_interval=2)
    text = yaml.safe_load(cfg.read_text())
    text["trainer"]["callbacks"][0]["class_path"] = "lightning.pytorch.callbacks.ModelCheckpoint"
    text["trainer"]["callbacks"][0]["init_args"]["enable_version_counter"] = False
    cfg.write_text(yaml.safe_dump(text))
    cli_main(["fit", "--config", str(cfg)])
    best = tmp_path / "run" / "ckpt" / "best.ckpt"
    digest = _digest(best)
    with pytest.raises(FileExistsError, match="would overwrite"):
        cli_main(["fit", "--config", str(cfg)])
    assert _digest(best) == digest
    resumed = cli_main(["fit", "--config", str(cfg), "--ckpt_path", str(best), "--trainer.max_steps", "4"])
    assert resumed.trainer.global_step == 4  # resuming the same run may write its own folder


def test_cli_saves_atomically_and_loads_weights_only(tmp_path, digits_root):
    cfg = tiny_config(tmp_path, digits_root, logger="csv", max_steps=2, val_check_interval=2)
    cli = cli_main(["fit", "--config", str(cfg)])
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    # a checkpoint whose pickle would run code is refused, and nothing runs
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = torch.load(tmp_path / "run" / "ckpt" / "version_0" / "last.ckpt", weights_only=True)
    evil["hyper_parameters"]["payload"] = Payload()
    torch.save(evil, tmp_path / "evil.ckpt")
    for extra in ([], ["--use_checkpoint_architecture", "true"]):
        with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
            cli_main(["test", "--config", str(cfg), "--ckpt_path", str(tmp_path / "evil.ckpt"), *extra])
        assert not marker.exists()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(d for d in deps if d.startswith("torch>"))
    assert tuple(int(v) for v in torch_req.split(">=")[1].split(".")[:2]) >= (2, 6)  # safe torch.load default


# ---------------------------------------------------------------------------------------------- kill during save
CHILD = textwrap.dedent("""
    import errno, os, signal, sys, threading
    from pathlib import Path
    import torch
    from lit_attn.checkpoints import AtomicCheckpointIO
    target, mode = Path(sys.argv[1]), sys.argv[2]
    if mode == "simulate-cross-device":  # /tmp and $TMPDIR on one file system: make cross-folder renames fail
        real_rename, real_replace = os.rename, os.replace
        def cross(real):
            def rename(src, dst, *a, **k):
                if os.path.dirname(os.path.abspath(src)) != os.path.dirname(os.path.abspath(dst)):
                    raise OSError(errno.EXDEV, "Invalid cross-device link")
                return real(src, dst, *a, **k)
            return rename
        os.rename, os.replace = cross(real_rename), cross(real_replace)
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.arange(1000.0)}, target)
    def kill_once_changed(path, size):  # SIGKILL as soon as the target's bytes start to change
        while True:
            try:
                now = os.stat(path).st_size
            except FileNotFoundError:
                now = -1
            if now != size:
                os.kill(os.getpid(), signal.SIGKILL)
    def kill_on_write(event, args):
        if event == "open" and args[0] is not None and str(args[0]).startswith(str(target.parent)):
            mode_, flags = args[1], args[2]
            if (mode_ and any(c in mode_ for c in "wax+")) or (flags and flags & (os.O_WRONLY | os.O_RDWR)):
                if sys.argv[3] == "kill-any":  # any file written next to the target: die before writing it
                    os.kill(os.getpid(), signal.SIGKILL)
                elif str(args[0]) == str(target):  # the target itself opened for writing: die mid-write
                    threading.Thread(target=kill_once_changed, args=(target, target.stat().st_size),
                                     daemon=True).start()
    sys.addaudithook(kill_on_write)
    io.save_checkpoint({"step": 2, "w": torch.arange(5_000_000.0)}, target)
    print("saved")
""")


def _other_filesystem(path: Path) -> str | None:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != path.stat().st_dev:
        return str(shm)
    return None


@pytest.mark.parametrize("kill", ["kill-target", "kill-any"])
def test_kill_during_checkpoint_save_keeps_the_previous_file(tmp_path, kill):
    target = tmp_path / "ckpt" / "last.ckpt"
    target.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    other = _other_filesystem(tmp_path)
    if other is not None:
        env["TMPDIR"] = other
    mode = "real-tmpdir" if other is not None else "simulate-cross-device"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(target), mode, kill], env=env, capture_output=True,
                          text=True, timeout=120)
    saved = torch.load(target, weights_only=True)
    if kill == "kill-target":  # the target is never opened for writing: the save completes
        assert proc.returncode == 0 and "saved" in proc.stdout, proc.stderr
        assert saved["step"] == 2 and torch.equal(saved["w"], torch.arange(5_000_000.0))
    else:  # killed while writing the temporary file: the previous checkpoint is intact
        assert proc.returncode == -9, proc.stderr
        assert saved["step"] == 1 and torch.equal(saved["w"], torch.arange(1000.0))
        AtomicCheckpointIO().save_checkpoint({"step": 3}, target)  # the next save removes the leftover
        assert torch.load(target, weights_only=True)["step"] == 3
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def test_failed_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)

    def broken(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="No space"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.load(target, weights_only=True)["step"] == 1


def test_run_checkpoint_refuses_remote_dirpath():
    with pytest.raises(ValueError, match="local dirpath"):
        RunCheckpoint(dirpath="s3://bucket/ckpt")


def test_init_weights_start_a_fit_but_not_a_resumed_one(tmp_path, digits_root):
    """SegmentationTask(init_weights=...): a converted / saved model folder or state dict starts a new fit."""
    cfg = tiny_config(tmp_path, digits_root, logger="csv", max_steps=2, val_check_interval=2)
    first = cli_main(["fit", "--config", str(cfg)])
    trained = {k: v.clone() for k, v in first.model.model.state_dict().items()}
    torch.save(trained, tmp_path / "weights.pth")
    seen = {}

    from lit_attn.tasks import SegmentationTask

    def grab(self):
        seen["weights"] = {k: v.clone() for k, v in self.model.state_dict().items()}

    original = SegmentationTask.on_train_start
    SegmentationTask.on_train_start = grab
    try:
        cli_main(["fit", "--config", str(cfg), "--model.init_args.init_weights", str(tmp_path / "weights.pth"),
                  "--seed_everything", "1"])
        assert all(torch.equal(seen["weights"][k], v) for k, v in trained.items())  # started from the file
        last = tmp_path / "run" / "ckpt" / "version_0" / "last.ckpt"
        resumed_from = {k[len("model."):]: v for k, v in torch.load(last, weights_only=True)["state_dict"].items()
                        if k.startswith("model.")}
        torch.save({k: v + 1 if v.is_floating_point() else v for k, v in trained.items()}, tmp_path / "other.pth")
        cli_main(["fit", "--config", str(cfg), "--model.init_args.init_weights", str(tmp_path / "other.pth"),
                  "--ckpt_path", str(last), "--trainer.max_steps", "3"])
        assert all(torch.equal(seen["weights"][k], v) for k, v in resumed_from.items())  # the checkpoint wins
    finally:
        SegmentationTask.on_train_start = original
    bad = {k: v for k, v in trained.items() if "aux" not in k}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError, match="missing"):
        cli_main(["fit", "--config", str(cfg), "--model.init_args.init_weights", str(tmp_path / "bad.pth")])


def test_load_model_weights_from_an_smp_folder(tmp_path):
    import segmentation_models_pytorch as smp

    from lit_attn.checkpoints import load_model_weights

    src = smp.create_model("danet", encoder_name="resnet18", encoder_weights=None, classes=3, decoder_channels=32)
    src.save_pretrained(str(tmp_path / "folder"))
    dst = smp.create_model("danet", encoder_name="resnet18", encoder_weights=None, classes=3, decoder_channels=32)
    load_model_weights(dst, tmp_path / "folder")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True))
    # same shapes, other output stride: refused by the folder's config.json, naming the field
    other = smp.create_model("danet", encoder_name="resnet18", encoder_weights=None, classes=3, decoder_channels=32,
                             encoder_output_stride=16)
    with pytest.raises(CheckpointMismatchError, match="encoder_output_stride: saved 8, model 16"):
        load_model_weights(other, tmp_path / "folder")
