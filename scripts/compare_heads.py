#!/usr/bin/env python
"""Compare every lit_attn head (the smp architectures) on the embedded digits data, and check the
architectures at full size. Writes docs/heads.md.

    python scripts/compare_heads.py train        # train each head, same encoder and budget (CPU)
    python scripts/compare_heads.py cost         # params, FLOPs, latency at 512x1024, peak training memory
    python scripts/compare_heads.py acceptance   # 2x3x512x512 and 2x3x481x353, resnet34 and tu-resnet50, OS 8
    python scripts/compare_heads.py report       # docs/heads.md from the cached results

Results are cached in runs/compare_heads/<part>.json (a re-run skips what is there; --redo to
repeat). Training: smp's "tu-resnet18" encoder (random init, output stride 8), every head with
decoder_channels=128 (EMANet: 64, its mmseg ratio), AdamW lr 3e-3 with poly decay and warm-up (the
quickstart recipe's schedule), batch 16, --epochs epochs of DigitsDataModule (64x64 scenes, 11
classes), seed 0 (`--seeds 0,1` adds repeats, cached as "<arch>@<seed>"); test/mIoU on the 300
test scenes. Cost: the mmseg R-50-D8 configuration (tu-resnet50c, OS 8, mmseg's head widths, 19
classes) at 1x3x512x1024: parameters, forward GFLOPs (torch.utils.flop_counter), eval forward
latency (median), and the peak extra memory of one training forward+backward at 1x3x512x1024 (CPU:
resident high-water mark; CUDA: max_memory_allocated). Baseline: "fcn" is mmseg's FCN-D8 head
(`attnfcn` with attention=None), the same head without any attention block.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # see bench_blocks.py: a truthful high-water mark
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench_blocks import PeakMemory, machine  # noqa: E402

import lit_attn  # noqa: E402,F401  (registers the architectures)
from lit_attn.integrations.smp import ARCHITECTURES  # noqa: E402

CACHE = ROOT / "runs" / "compare_heads"
MMSEG_CITYSCAPES_80K = {"danet": 79.34, "ccnet": 79.03, "isanet": 78.68, "emanet": 77.59, "nlnet": 78.01,
                        "gcnet": 78.48, "psanet": 77.24, "apcnet": 78.96, "ann": 77.34, "dnlnet": 79.33}
MMSEG_ADE20K_80K = {"danet": 41.66, "ccnet": 41.78, "isanet": 41.12, "nlnet": 40.75, "gcnet": 41.47,
                    "psanet": 41.14, "apcnet": 42.20, "ann": 41.01, "dnlnet": 41.76}
FCN = {"cityscapes": 73.61, "ade20k": 35.94}
BASELINE = "fcn"  # mmseg's FCN-D8 head: attnfcn without an attention block


def create(arch: str, encoder: str, classes: int, **kwargs):
    import segmentation_models_pytorch as smp

    if arch == BASELINE:
        arch, kwargs = "attnfcn", {**kwargs, "attention": None}
    return smp.create_model(arch, encoder_name=encoder, encoder_weights=None, classes=classes, **kwargs)


def load(part: str) -> dict:
    path = CACHE / f"{part}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save(part: str, data: dict) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / f"{part}.json").write_text(json.dumps(data, indent=1))


def train(arch: str, epochs: int, seed: int = 0) -> dict:
    import lightning as L

    from lit_attn.data import DigitsDataModule
    from lit_attn.tasks import SegmentationTask

    L.seed_everything(seed, verbose=False)
    width = 64 if arch == "emanet" else 128
    model = create(arch, "tu-resnet18", 11, decoder_channels=width)
    task = SegmentationTask(model, num_classes=11, optimizer="adamw", lr=3e-3, weight_decay=1e-4, warmup_iters=30,
                            warmup_ratio=0.01, min_lr=1e-5)
    data = DigitsDataModule(batch_size=16)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    t = time.perf_counter()
    trainer.fit(task, datamodule=data)
    fit_s = time.perf_counter() - t
    metrics = trainer.test(task, datamodule=data, verbose=False)[0]
    return {"test_miou": metrics["test/mIoU"], "test_acc": metrics.get("test/acc"), "fit_s": fit_s,
            "steps": trainer.global_step, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def cost(arch: str, device: torch.device, reps: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = create(arch, "tu-resnet50c", 19).to(device)
    x = torch.randn(1, 3, 512, 1024, device=device)
    row = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6,
           "head_params_m": sum(p.numel() for p in model.decoder.parameters()) / 1e6}
    model.eval()
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            model(x)
        row["gflops"] = fc.get_total_flops() / 1e9
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        row["latency_ms"] = statistics.median(times) * 1e3
    model.train()
    row["train_batch"] = 1
    try:
        with PeakMemory(device) as mem:
            outs = model.forward_with_aux(x)
            sum(o.float().mean() for o in outs).backward()
    except ValueError:  # BN over a 1x1 global feature (APCNet's ACM) needs batch >= 2, as in mmseg
        model.zero_grad(set_to_none=True)
        row["train_batch"] = 2
        with PeakMemory(device) as mem:
            outs = model.forward_with_aux(x.expand(2, -1, -1, -1).clone())
            sum(o.float().mean() for o in outs).backward()
    row["train_peak_mb"] = mem.peak / 2**20
    row["machine"] = machine(device)
    return row


def acceptance(arch: str) -> dict:
    out = {}
    for encoder in ("resnet34", "tu-resnet50"):
        for shape in ((2, 3, 512, 512), (2, 3, 481, 353)):
            torch.manual_seed(0)
            model = create(arch, encoder, 19, encoder_output_stride=8).train()
            x = torch.randn(shape)
            outs = model.forward_with_aux(x)  # main, extras and aux, as SegmentationTask trains
            ok_shape = all(o.shape == (shape[0], 19, *shape[2:]) for o in outs)
            finite = all(torch.isfinite(o).all().item() for o in outs)
            sum(o.mean() for o in outs).backward()
            grads = all(torch.isfinite(p.grad).all().item() for p in model.parameters() if p.grad is not None)
            out[f"{encoder} {shape[2]}x{shape[3]}"] = bool(ok_shape and finite and grads)
            del model, outs
    return out


def report(path: Path) -> None:
    tr, co, ac = load("train"), load("cost"), load("acceptance")
    meta = load("meta")
    lines = ["# Segmentation heads: comparison", "",
             "Produced by `scripts/compare_heads.py` (see its docstring for the exact settings). Every head is an "
             "smp architecture (`smp.create_model(name, ...)`) with mmseg's R-50-D8 defaults; the recipes in "
             "`recipes/{cityscapes,ade20k}/` train them at full scale.", ""]
    if not tr:
        lines += ["## Digits (embedded data), same budget for every head", "",
                  "Not run yet (about 1-2 CPU minutes per head and epoch on the 2-core machine): "
                  "`python scripts/compare_heads.py train --epochs 3`.", ""]
    repeats: dict[str, list[float]] = {}
    for key, r in tr.items():
        if "@" in key:
            repeats.setdefault(key.split("@")[0], []).append(r["test_miou"])
    tr = {k: r for k, r in tr.items() if "@" not in k}
    if tr:
        lines += [f"## Digits (embedded data), same budget for every head: {meta.get('train', '')}", "",
                  "Encoder tu-resnet18 (random init), output stride 8, head width 128 (EMANet 64), AdamW 3e-3 with "
                  "poly + warm-up, batch 16, seed 0; the 'other seeds' column repeats some heads with seeds 1, 2, "
                  "... to show the run-to-run spread on this small data set and budget."
                  + ("" if len(tr) == len(ARCHITECTURES) + 1 else
                     f" **Partial: {len(tr)} of {len(ARCHITECTURES) + 1} runs so far** (each takes about 6 CPU "
                     f"minutes here); `python scripts/compare_heads.py train --epochs 3` resumes the rest."), "",
                  "| head | test mIoU | other seeds | pixel acc | params (M) | fit time (s) | mmseg Cityscapes 80k | "
                  "mmseg ADE20K 80k |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for arch, r in sorted(tr.items(), key=lambda kv: -kv[1]["test_miou"]):
            cs, ade = MMSEG_CITYSCAPES_80K.get(arch, "–"), MMSEG_ADE20K_80K.get(arch, "–")
            acc = f"{r['test_acc']:.3f}" if r.get("test_acc") is not None else "–"
            if arch == BASELINE:
                cs, ade = FCN["cityscapes"], FCN["ade20k"]
            more = ", ".join(f"{v:.3f}" for v in repeats.get(arch, [])) or "–"
            lines.append(f"| {_label(arch)} | {r['test_miou']:.3f} | {more} | {acc} | {r['params_m']:.2f} | "
                         f"{r['fit_s']:.0f} | {cs} | {ade} |")
        lines += ["", "mmseg columns: published single-scale val mIoU of the R-50-D8 models (HEADS_REFERENCE.md), "
                  "for orientation only. Three epochs from a random encoder measure how fast a head gets going on "
                  "a small task, not its accuracy at convergence (mmseg's columns are the reference for that): "
                  "runs start on the all-background plateau (fcn and ann follow the same train loss, ~0.45-0.75, "
                  "for their first 100 steps) and leave it at different times."
                  + (" A row with pixel accuracy 0.850 and mIoU 0.077 is the all-background prediction (digits "
                     "cover 15% of the test pixels): that run had not left the plateau when the budget ended."
                     if any(r["test_miou"] < 0.1 for r in tr.values()) else ""), ""]
    if co:
        lines += ["## Cost at 512x1024, mmseg R-50-D8 configuration (tu-resnet50c, OS 8, 19 classes)", "",
                  f"Machine: {next(iter(co.values()))['machine']}. Measured one head after the other on a shared "
                  "machine (other jobs overlapped some rows): latency differences under ~20% are noise.", "",
                  "| head | params (M) | head params (M) | GFLOPs | eval latency B=1 (ms) | "
                  "train fwd+bwd peak B=1 (MB) |", "|---|---:|---:|---:|---:|---:|"]
        for arch, r in sorted(co.items()):
            batch = "" if r.get("train_batch", 1) == 1 else f" (B={r['train_batch']})"
            lines.append(f"| {_label(arch)} | {r['params_m']:.2f} | {r['head_params_m']:.2f} | {r['gflops']:.0f} | "
                         f"{r['latency_ms']:.0f} | {r['train_peak_mb']:.0f}{batch} |")
        lines.append("")
    if ac:
        cols = list(next(iter(ac.values())))
        lines += ["## Acceptance: logits at the input size, finite forward and backward (train mode, OS 8)", "",
                  "| head | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for arch, r in sorted(ac.items()):
            lines.append(f"| `{arch}` | " + " | ".join("ok" if r[c] else "FAIL" for c in cols) + " |")
        lines.append("")
    path.write_text("\n".join(lines))


def _label(arch: str) -> str:
    return f"`{arch}` (baseline: FCN-D8, no attention)" if arch == BASELINE else f"`{arch}`"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["train", "cost", "acceptance", "report"])
    p.add_argument("--archs", default=None, help="comma-separated; default: every architecture (+ the fcn "
                   "baseline for train and cost)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", default="0", help="train: comma-separated seeds (0 is the main column)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--redo", action="store_true")
    p.add_argument("--out", default=str(ROOT / "docs" / "heads.md"))
    args = p.parse_args()
    if args.part == "train":
        save("meta", {**load("meta"), "train": f"{args.epochs} epochs, {machine(torch.device('cpu'))}"})
    if args.part != "report":
        results = {} if args.redo else load(args.part)
        archs = args.archs.split(",") if args.archs else [*ARCHITECTURES] + (
            [BASELINE] if args.part != "acceptance" else [])
        seeds = [int(v) for v in args.seeds.split(",")] if args.part == "train" else [0]
        for arch in archs:
            for seed in seeds:
                key = arch if seed == 0 else f"{arch}@{seed}"
                if key in results:
                    continue
                if args.part == "train":
                    results[key] = train(arch, args.epochs, seed)
                elif args.part == "cost":
                    results[key] = cost(arch, torch.device(args.device), args.reps)
                else:
                    results[key] = acceptance(arch)
                print(key, results[key], flush=True)
                save(args.part, results)
    report(Path(args.out))


if __name__ == "__main__":
    main()
