"""`lit-attn`: LightningCLI with `fit`, `validate`, `test`, `predict`, `--config`, `--print_config`.

    lit-attn fit  --config recipes/quickstart.yaml
    lit-attn test --config recipes/quickstart.yaml --ckpt_path best

Models are LightningModules given by class path (`lit_attn.tasks.SegmentationTask`, or a user's
own); data modules likewise. `data.num_classes` is linked to `model.init_args.num_classes`. The
resolved config is saved next to the logs and, with a WandbLogger, into the W&B run config.
`--ckpt_path best` / `last` also work in a fresh process (outside `fit`): they resolve to
`best*.ckpt` / `last.ckpt` in the ModelCheckpoint callback's `dirpath`.
"""
from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

import lit_attn  # noqa: F401  (registers the blocks and timm names)
import lit_attn.data  # noqa: F401  (short class names in configs)
import lit_attn.heads  # noqa: F401
import lit_attn.tasks  # noqa: F401


class WandbSaveConfigCallback(SaveConfigCallback):
    """Save the resolved config as config.yaml and, with a WandbLogger, into the run's config."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if isinstance(trainer.logger, WandbLogger):
            trainer.logger.experiment.config.update(self.config.as_dict(), allow_val_change=True)


class LitAttnCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")

    def _resolve_ckpt_path(self) -> None:
        cfg = self.config_init[self.subcommand]
        wanted = cfg.get("ckpt_path")
        if wanted not in ("best", "last"):
            return
        ckpt_cb = next((c for c in self.trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
        dirpath = Path(ckpt_cb.dirpath) if ckpt_cb is not None and ckpt_cb.dirpath else None
        if dirpath is None:
            raise ValueError(f"--ckpt_path {wanted} needs a ModelCheckpoint callback with a dirpath in the config")
        if wanted == "last":
            candidates = [dirpath / "last.ckpt"]
        else:
            candidates = sorted(dirpath.glob("best*.ckpt"), key=os.path.getmtime, reverse=True)
        found = next((p for p in candidates if p.exists()), None)
        if found is None:
            raise FileNotFoundError(f"--ckpt_path {wanted}: no {'last.ckpt' if wanted == 'last' else 'best*.ckpt'} "
                                    f"in {dirpath}; run `lit-attn fit` with this config first")
        cfg["ckpt_path"] = str(found)

    before_validate = before_test = before_predict = _resolve_ckpt_path


def cli_main(args=None, run: bool = True) -> LitAttnCLI:
    os.environ.setdefault("WANDB_MODE", "offline")  # W&B stays offline unless configured
    return LitAttnCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        save_config_callback=WandbSaveConfigCallback, save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False, args=args, run=run,
        parser_kwargs={"default_env": True, "env_prefix": "LIT_ATTN"})


def main() -> None:
    cli_main()


if __name__ == "__main__":
    main()
