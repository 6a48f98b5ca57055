"""`lit-attn`: LightningCLI with `fit`, `validate`, `test`, `predict`, `--config`, `--print_config`.

    lit-attn fit  --config recipes/quickstart.yaml
    lit-attn test --config recipes/quickstart.yaml --ckpt_path best

Models are LightningModules given by class path (`lit_attn.tasks.SegmentationTask`, or a user's own); data
modules likewise. `data.num_classes` is linked to `model.init_args.num_classes`. The resolved config is saved next
to the logs and, with a WandbLogger, into the W&B run config. On top of LightningCLI:

- `--ckpt_path best` / `last` (every subcommand, also in a fresh process) resolve with
  `lit_attn.checkpoints.find_checkpoint` in the first ModelCheckpoint's `dirpath`: the newest run folder's best /
  newest last file. `fit --ckpt_path last` with no checkpoint yet starts from scratch, as Lightning's does.
- A checkpoint trained with another architecture than the config's is refused with both named (the tasks check
  on load); `--use_checkpoint_architecture true` builds the checkpoint's own architecture instead (only the
  network: the rest of the config still applies). LightningCLI's default, taking every hyper-parameter from the
  checkpoint silently, is not used.
- Checkpoints load with `weights_only=True` and save through `AtomicCheckpointIO`; `fit` refuses to start when a
  ModelCheckpoint with the version counter off would overwrite an earlier run's files.
- `predict` does not keep the predictions in memory when a prediction writer callback writes them.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import BasePredictionWriter, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

import lit_attn  # noqa: F401  (registers the blocks and timm names)
import lit_attn.data  # noqa: F401  (short class names in configs)
import lit_attn.heads  # noqa: F401
import lit_attn.tasks  # noqa: F401
from lit_attn.checkpoints import AtomicCheckpointIO, RunCheckpoint, architecture, find_checkpoint, load_checkpoint


class WandbSaveConfigCallback(SaveConfigCallback):
    """Save the resolved config as config.yaml in the log folder and in each RunCheckpoint run folder, and, with a
    WandbLogger, into the W&B run's config."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if isinstance(trainer.logger, WandbLogger):
            trainer.logger.experiment.config.update(self.config.as_dict(), allow_val_change=True)

    def on_fit_start(self, trainer, pl_module) -> None:  # after every setup: the run folders exist
        if not trainer.is_global_zero:
            return
        for cb in trainer.callbacks:
            if isinstance(cb, RunCheckpoint) and cb.dirpath is not None:
                self.parser.save(self.config, os.path.join(cb.dirpath, self.config_filename), skip_none=False,
                                 overwrite=True, multifile=self.multifile)


def _import(class_path: str):
    module, _, name = str(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _configured_callbacks(cfg, base: type) -> list[tuple[type, dict]]:
    """(class, init_args) of the config's trainer callbacks that subclass `base` (before instantiation)."""
    callbacks = cfg.get("trainer", {}).get("callbacks") or []
    out = []
    for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
        cls = _import(cb.get("class_path", "")) if hasattr(cb, "get") else None
        if isinstance(cls, type) and issubclass(cls, base):
            out.append((cls, dict(cb.get("init_args") or {})))
    return out


# config keys that name a block: timm's attention slots, AttnSegmentor / attnfcn's block, smp's decoder attention
_TIMM_SLOTS = ("attn_layer", "se_layer", "self_attn_layer")
_BLOCK_KEYS = (*_TIMM_SLOTS, "attention", "decoder_attention_type")


def _block_names(value, path: str = ""):
    """(config path, key, name) of every string under a block-naming key of a (nested) config dict."""
    if isinstance(value, dict):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            if k in _BLOCK_KEYS and isinstance(v, str) and v:
                yield sub, k, v
            else:
                yield from _block_names(v, sub)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _block_names(v, f"{path}[{i}]")


def block_name_errors(cfg: dict) -> list[str]:
    """Messages for unknown block names (and non-plug-in blocks in timm's slots) in a config, before anything is
    built: instantiation would bury them in jsonargparse's trace of every class it tried."""
    from lit_attn.integrations.timm import get_attn
    from lit_attn.registry import is_attn, suggest

    errors = []
    for path, key, name in _block_names(cfg):
        if key in _TIMM_SLOTS:
            try:
                get_attn(name)
            except (ValueError, AssertionError) as e:
                errors.append(f"{path}: {e}")
        elif not is_attn(name) and not (key == "decoder_attention_type" and name == "scse"):
            errors.append(f"{path}: unknown attention block {name!r}; {suggest(name)}")
    return errors


class LitAttnCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.add_argument("--use_checkpoint_architecture", type=bool, default=False,
                            help="With --ckpt_path: build the network the checkpoint was trained with instead of the "
                                 "config's (default: refuse a checkpoint of another architecture).")

    # ------------------------------------------------------------------ checkpoint path and architecture
    def _parse_ckpt_path(self) -> None:
        """Resolve `best`/`last`; with --use_checkpoint_architecture, take the network config from the checkpoint."""
        sub = self.config.get("subcommand")
        if not sub:
            return
        cfg = self.config[sub]
        wanted = cfg.get("ckpt_path")
        if wanted in ("best", "last"):
            cfg["ckpt_path"] = wanted = self._resolve_alias(sub, cfg, wanted)
        if not wanted or not cfg.get("use_checkpoint_architecture"):
            return
        if not Path(wanted).is_file():
            raise FileNotFoundError(f"--ckpt_path {wanted}: no such checkpoint file")
        model_cls = _import(cfg.get("model", {}).get("class_path", ""))
        keys = getattr(model_cls, "architecture_hparams", ("model",))
        arch = architecture(load_checkpoint(wanted).get("hyper_parameters", {}), keys)
        if arch is None:
            raise ValueError(f"--use_checkpoint_architecture: {wanted} holds no model config (it was not trained "
                             "through lit-attn's config files), so its architecture cannot be rebuilt")
        class_path = arch.pop("class_path") or cfg["model"]["class_path"]
        self.config = self.parser.parse_object({sub: {"model": {"class_path": class_path, "init_args": arch}}},
                                               self.config)

    def _resolve_alias(self, sub: str, cfg, wanted: str) -> str | None:
        dirs = [a.get("dirpath") for _, a in _configured_callbacks(cfg, ModelCheckpoint) if a.get("dirpath")]
        if not dirs:
            raise ValueError(f"--ckpt_path {wanted} needs a ModelCheckpoint callback with a dirpath in the config")
        found = find_checkpoint(dirs[0], wanted)
        if found is not None:
            return str(found)
        if sub == "fit" and wanted == "last":
            rank_zero_warn(f"--ckpt_path last: no last*.ckpt under {dirs[0]} yet; training starts from scratch")
            return None
        raise FileNotFoundError(f"--ckpt_path {wanted}: no {wanted}*.ckpt in {dirs[0]} or its run folders "
                                f"(version_<N>/); run `lit-attn fit` with this config first")

    def before_instantiate_classes(self) -> None:
        errors = block_name_errors(self.config.as_dict())
        if errors:
            self.parser.error("\n".join(errors))

    # ------------------------------------------------------------------ trainer and subcommands
    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if not trainer.loggers:  # --trainer.logger false: a LearningRateMonitor would refuse to start
            monitors = [c for c in trainer.callbacks if isinstance(c, LearningRateMonitor)]
            if monitors:
                rank_zero_info("lit-attn: no logger, so the LearningRateMonitor callback is left out")
                trainer.callbacks = [c for c in trainer.callbacks if c not in monitors]
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # no CheckpointIO plugin configured
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _before(self) -> None:
        cfg = self.config_init[self.subcommand]
        if cfg.get("weights_only") is None:
            cfg["weights_only"] = True

    before_validate = before_test = _before

    def before_predict(self) -> None:
        self._before()
        cfg = self.config_init["predict"]
        if cfg.get("return_predictions") is None and any(
                isinstance(c, BasePredictionWriter) for c in self.trainer.callbacks):
            cfg["return_predictions"] = False  # the writer has them; do not hold every mask in memory

    def before_fit(self) -> None:
        self._before()
        resume = self.config_init["fit"].get("ckpt_path")
        for cb in self.trainer.callbacks:
            if (not isinstance(cb, ModelCheckpoint) or isinstance(cb, RunCheckpoint) or cb.dirpath is None
                    or cb._enable_version_counter or not os.path.isdir(cb.dirpath)):
                continue
            old = sorted(p.name for p in Path(cb.dirpath).glob("*.ckpt"))
            if old and not (resume and Path(resume).absolute().parent == Path(cb.dirpath).absolute()):
                raise FileExistsError(
                    f"ModelCheckpoint(dirpath={cb.dirpath!r}, enable_version_counter=False) would overwrite the "
                    f"checkpoints of an earlier run there ({', '.join(old[:4])}); use "
                    "lit_attn.callbacks.RunCheckpoint (a folder per run), turn the version counter on, move them, "
                    "or resume from one of them with --ckpt_path")


def cli_main(args=None, run: bool = True) -> LitAttnCLI:
    os.environ.setdefault("WANDB_MODE", "offline")  # W&B stays offline unless configured
    return LitAttnCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        save_config_callback=WandbSaveConfigCallback, save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False, args=args, run=run,
        parser_kwargs={"default_env": True, "env_prefix": "LIT_ATTN"})


def main() -> None:
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "convert":  # `lit-attn convert ...`: not a LightningCLI subcommand
        from lit_attn.convert.cli import main as convert_main

        sys.exit(convert_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "export":  # `lit-attn export ...`: likewise
        from lit_attn.export import main as export_main

        sys.exit(export_main(sys.argv[2:]))
    cli_main()


if __name__ == "__main__":
    main()
