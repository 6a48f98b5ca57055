"""Export a trained lit_attn model (ONNX or torch.export) and verify the file against PyTorch.

    lit-attn export --config recipes/quickstart.yaml --ckpt_path best --format onnx --output model.onnx
    lit-attn export --config recipes/quickstart.yaml --ckpt_path best --format export --output model.pt2

The network (the task's `model`, in eval mode) is exported with dynamic height and width where the model allows
it (else at the example size, said on stdout), then the written file is run (onnxruntime, or the saved
ExportedProgram) on a fresh input of the example size and of a second size (when dynamic), and its output must
match PyTorch's within `atol` (1e-4 by default): a file that does not match is deleted and the command fails, so
no silently wrong model is left behind. `--exporter torchscript` uses PyTorch's TorchScript-based ONNX exporter
instead of the dynamo one.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["ExportError", "ExportReport", "export_model", "main"]

FORMATS = ("onnx", "export")
EXPORTERS = ("dynamo", "torchscript")


class ExportError(RuntimeError):
    """The model could not be exported, or the exported file does not match PyTorch."""


@dataclass
class ExportReport:
    path: Path
    dynamic: bool
    checks: list[tuple[tuple[int, ...], float]] = field(default_factory=list)  # (input shape, max |diff|)
    why_static: str = ""  # the dynamic export's error, when it fell back to the example size

    def __str__(self) -> str:
        sizes = ", ".join(f"{'x'.join(map(str, s))}: max |diff| {d:.2e}" for s, d in self.checks)
        shape = "dynamic H, W" if self.dynamic else "static H, W" + (
            f"; dynamic export failed: {self.why_static}" if self.why_static else "")
        return f"wrote {self.path} ({shape}); verified against PyTorch: {sizes}"


def _main_output(out) -> Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = out.get("out", next(iter(out.values())))
    return out


class _MainOutput(nn.Module):
    """The model with its main output only (segmentation logits / class scores)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return _main_output(self.model(x))


def _second_size(h: int, w: int) -> tuple[int, int]:
    return h + 32, w + 16


def _export_program(model: nn.Module, x: Tensor, dynamic: bool):
    if not dynamic:
        return torch.export.export(model, (x,))
    # Dim.DYNAMIC lets the exporter narrow the range to what the model supports (e.g. maps larger than 1 pixel)
    dynamic = torch.export.Dim.DYNAMIC
    return torch.export.export(model, (x,), dynamic_shapes=({2: dynamic, 3: dynamic},))


def _write(model: nn.Module, x: Tensor, path: Path, fmt: str, exporter: str, dynamic: bool, opset: int | None):
    if fmt == "export":
        torch.export.save(_export_program(model, x, dynamic), str(path))
        return
    kwargs = {"input_names": ["image"], "output_names": ["logits"]}
    if opset is not None:
        kwargs["opset_version"] = opset
    if exporter == "dynamo":
        shapes = ({2: "height", 3: "width"},) if dynamic else None
        torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=shapes, **kwargs)
    else:
        axes = {"image": {2: "height", 3: "width"}, "logits": {2: "height", 3: "width"}} if dynamic else None
        torch.onnx.export(model, (x,), str(path), dynamo=False, dynamic_axes=axes, **kwargs)


def _runner(path: Path, fmt: str):
    if fmt == "export":
        module = torch.export.load(str(path)).module()
        return lambda x: _main_output(module(x)).detach()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def export_model(model: nn.Module, example: Tensor, path: str | os.PathLike, fmt: str = "onnx",
                 exporter: str = "dynamo", dynamic: bool = True, atol: float = 1e-4,
                 opset: int | None = None) -> ExportReport:
    """Export `model` (eval mode, main output only) to `path` and verify it (see the module docstring)."""
    if fmt not in FORMATS:
        raise ValueError(f"export format must be one of {FORMATS}, got {fmt!r}")
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = _MainOutput(model).eval()
    errors = []
    for dyn in ((True, False) if dynamic else (False,)):
        try:
            with torch.no_grad():
                _write(wrapped, example, path, fmt, exporter, dyn, opset)
            break
        except Exception as e:  # noqa: BLE001 - reported below (dynamic first, then static)
            errors.append(f"{'dynamic' if dyn else 'static'}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    else:
        path.unlink(missing_ok=True)
        raise ExportError(f"could not export {type(model).__name__} to {fmt} ({exporter}): " + "; ".join(errors))
    report = ExportReport(path, dynamic=dyn, why_static=errors[0] if errors and not dyn else "")
    h, w = example.shape[-2:]
    sizes = [(h, w), _second_size(h, w)] if dyn else [(h, w)]
    run = _runner(path, fmt)
    gen = torch.Generator().manual_seed(0)
    for size in sizes:
        x = torch.randn(example.shape[0], example.shape[1], *size, generator=gen, dtype=example.dtype)
        with torch.no_grad():
            want = wrapped(x)
        got = run(x)
        diff = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
        report.checks.append((tuple(x.shape), diff))
        if not diff <= atol:
            path.unlink(missing_ok=True)
            raise ExportError(f"the exported {fmt} model does not match PyTorch at input {tuple(x.shape)} (max |diff| "
                              f"{diff:.3g} > {atol:g}; shapes {tuple(got.shape)} vs {tuple(want.shape)}): the file "
                              f"was removed. Try --exporter {'torchscript' if exporter == 'dynamo' else 'dynamo'} or "
                              "--static")
    return report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lit-attn export", description=__doc__.split("\n\n")[0],
                                epilog="Other arguments (--config, --model.*, --data.*) are LightningCLI's, as for "
                                       "lit-attn test.")
    p.add_argument("--ckpt_path", required=True, help="checkpoint file, or best / last (as lit-attn test)")
    p.add_argument("--format", choices=FORMATS, default="onnx")
    p.add_argument("--output", required=True, help="file to write (.onnx or .pt2)")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=(512, 512),
                   help="example input size (default 512 512)")
    p.add_argument("--exporter", choices=EXPORTERS, default="dynamo", help="ONNX exporter (default dynamo)")
    p.add_argument("--static", action="store_true", help="export at the example size only (no dynamic H, W)")
    p.add_argument("--opset", type=int, default=None)
    p.add_argument("--atol", type=float, default=1e-4, help="tolerance of the verification (default 1e-4)")
    return p


def main(argv: list[str] | None = None) -> int:
    from .checkpoints import check_checkpoint_fits, find_checkpoint, load_checkpoint
    from .cli import LitAttnCLI, _configured_callbacks, cli_main

    args, rest = _parser().parse_known_args(argv)
    cli: LitAttnCLI = cli_main(rest, run=False)
    path = args.ckpt_path
    if path in ("best", "last"):
        from lightning.pytorch.callbacks import ModelCheckpoint

        dirs = [a.get("dirpath") for _, a in _configured_callbacks(cli.config, ModelCheckpoint) if a.get("dirpath")]
        found = find_checkpoint(dirs[0], path) if dirs else None
        if found is None:
            print(f"error: --ckpt_path {path}: no {path}*.ckpt under the config's ModelCheckpoint dirpath "
                  f"({dirs[0] if dirs else 'none configured'})", file=sys.stderr)
            return 2
        path = str(found)
    if not Path(path).is_file():
        print(f"error: --ckpt_path {path}: no such checkpoint file", file=sys.stderr)
        return 2
    checkpoint = load_checkpoint(path)
    task = cli.model
    try:
        check_checkpoint_fits(task, checkpoint, f"checkpoint {path}", getattr(task, "architecture_hparams", ("model",)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    task.load_state_dict(checkpoint["state_dict"])
    network = getattr(task, "model", task).eval()
    example = torch.randn(1, 3, *args.input_size, generator=torch.Generator().manual_seed(1))
    try:
        report = export_model(network, example, args.output, args.format, args.exporter, not args.static,
                              args.atol, args.opset)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{path} -> {report}")
    return 0
