#!/usr/bin/env python
"""Benchmark every registered attention block: parameters, FLOPs, latency, peak memory.

    python scripts/bench_blocks.py                       # CPU (+ CUDA when present), both sizes
    python scripts/bench_blocks.py --blocks "nonlocal*" --sizes head --device cpu

Sizes: backbone (B=8, C=256, 56x56) and segmentation head (B=2, C=512, 64x128). Dense blocks
are shown next to a naive reference written here (explicit N x N attention, the form most
re-implementations use) and next to timm's equivalent block where one exists. Forward latency is
measured in eval mode under no_grad; forward+backward in train mode; peak memory is the extra
resident memory of one forward+backward (CPU: the process high-water mark, reset before each
case through /proc/self/clear_refs; CUDA: torch.cuda.max_memory_allocated). Results are written
as markdown (default docs/benchmarks.md) with the machine named.
"""
from __future__ import annotations

import argparse
import ctypes
import fnmatch
import gc
import json
import os
import platform
import statistics
import sys
import time

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
    # a fixed mmap threshold makes glibc return large freed blocks to the OS, so that the
    # resident high-water mark measures each case's own peak
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import lit_attn  # noqa: E402

SIZES = {"backbone": (8, 256, 56, 56), "head": (2, 512, 64, 128), "head97": (2, 512, 97, 97)}
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_refs import load as load_bench_refs  # noqa: E402

BENCH_REFS, BENCH_INPUTS = load_bench_refs()


def make_inputs(name: str, shape) -> tuple:
    """The block's forward arguments at `shape` (two maps for AFNB, features + logits for OCR, ...)."""
    if name in BENCH_INPUTS:
        return tuple(BENCH_INPUTS[name](*shape))
    return (torch.randn(shape),)


# ----------------------------------------------------------------------------- naive references
class NaiveNonLocal(nn.Module):
    """Non-local block with the explicit (N, N) affinity (as in most public re-implementations)."""

    def __init__(self, channels, mode="embedded_gaussian"):
        super().__init__()
        inner = channels // 2
        self.mode = mode
        self.g = nn.Conv2d(channels, inner, 1)
        if mode != "gaussian":
            self.theta, self.phi = nn.Conv2d(channels, inner, 1), nn.Conv2d(channels, inner, 1)
        if mode == "concat":
            self.concat = nn.Conv2d(2 * inner, 1, 1, bias=False)
        self.out = nn.Sequential(nn.Conv2d(inner, channels, 1), nn.BatchNorm2d(channels))

    def forward(self, x):
        b, c, h, w = x.shape
        g = self.g(x).flatten(2).transpose(1, 2)                      # (B, N, C/2)
        if self.mode == "gaussian":
            t = x.flatten(2).transpose(1, 2)
            f = torch.softmax(t @ t.transpose(1, 2), -1)
        else:
            t, p = self.theta(x).flatten(2), self.phi(x).flatten(2)   # (B, C/2, N)
            if self.mode == "embedded_gaussian":
                f = torch.softmax(t.transpose(1, 2) @ p * t.shape[1] ** -0.5, -1)
            elif self.mode == "dot":
                f = t.transpose(1, 2) @ p / p.shape[-1]
            else:  # concat: ReLU(w^T [theta_i, phi_j]) / N
                wt, wp = self.concat.weight[0, : t.shape[1], 0, 0], self.concat.weight[0, t.shape[1]:, 0, 0]
                a, bj = torch.einsum("c,bcn->bn", wt, t), torch.einsum("c,bcn->bn", wp, p)
                f = F.relu(a[:, :, None] + bj[:, None, :]) / p.shape[-1]
        y = (f @ g).transpose(1, 2).reshape(b, -1, h, w)
        return x + self.out(y)


class NaivePAM(nn.Module):
    """DANet position attention as in the official code: explicit (N, N) energy."""

    def __init__(self, channels):
        super().__init__()
        self.q, self.k = nn.Conv2d(channels, channels // 8, 1), nn.Conv2d(channels, channels // 8, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        b, c, h, w = x.shape
        energy = self.q(x).flatten(2).transpose(1, 2) @ self.k(x).flatten(2)
        out = self.v(x).flatten(2) @ torch.softmax(energy, -1).transpose(1, 2)
        return x + self.gamma * out.reshape(b, c, h, w)


class NaiveAAConv(nn.Module):
    """Attention-augmented conv as the paper's TF code: dense (B, Nh, N, N) content + relative logits."""

    def __init__(self, block):
        super().__init__()
        self.b = block  # reuse the block's weights; the attention is recomputed densely below

    def forward(self, x):
        from lit_attn.layers.aa_conv import relative_index

        blk = self.b
        b, _, h, w = x.shape
        nh, dk, dv = blk.num_heads, blk.dk, blk.dv
        k, q, v = torch.split(blk.qkv(x), [dk, dk, dv], 1)
        q = q * blk.dkh ** -0.5
        q, k, v = (t.reshape(b, nh, t.shape[1] // nh, h * w).transpose(-1, -2) for t in (q, k, v))
        ys, xs = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
        idx_h = relative_index(h, blk.feat_size[0])[ys[:, None], ys[None, :]].expand(b, nh, -1, -1)
        idx_w = relative_index(w, blk.feat_size[1])[xs[:, None], xs[None, :]].expand(b, nh, -1, -1)
        logits = (q @ k.transpose(-1, -2) + torch.gather(q @ blk.r_height.t(), -1, idx_h)
                  + torch.gather(q @ blk.r_width.t(), -1, idx_w))
        attn = blk.proj((torch.softmax(logits, -1) @ v).transpose(-1, -2).reshape(b, dv, h, w))
        return torch.cat([blk.conv(x), attn], 1)


def references(name: str, channels: int, block: nn.Module):
    """(label, module) pairs to show under a block."""
    timm_nl = lit_attn.create_attn("nl", channels)
    if name == "nonlocal":
        return [("naive N x N", NaiveNonLocal(channels)), ("timm `nl` (NonLocalAttn)", timm_nl)]
    if name.startswith("nonlocal_"):
        return [("naive N x N", NaiveNonLocal(channels, name.split("_", 1)[1]))]
    if name in ("danet_pam", "danet"):
        return [("naive N x N (PAM)", NaivePAM(channels))]
    if name == "aa_conv":
        return [("naive N x N (paper TF code)", NaiveAAConv(block))]
    return [(label, factory(block)) for label, factory in BENCH_REFS.get(name, [])]


# ----------------------------------------------------------------------------- measurement
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Extra peak memory (bytes) of the enclosed code on CPU (RSS high-water mark) or CUDA."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except OSError:
                pass
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = _status("VmHWM") - self.base


def _timed(fn, device, reps):
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def measure(module: nn.Module, shape, device, reps: int, name: str = "") -> dict:
    module = module.to(device)
    xs = tuple(t.to(device) for t in make_inputs(name, shape))
    row = {"params": sum(p.numel() for p in module.parameters())}
    module.eval()
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            module(*xs)
        row["gflops"] = fc.get_total_flops() / 1e9
        module(*xs)
        row["fwd_ms"] = _timed(lambda: module(*xs), device, reps)
    module.train()
    xg = tuple(t.clone().requires_grad_(True) for t in xs)

    def step():
        module(*xg).float().square().mean().backward()
        module.zero_grad(set_to_none=True)
        for t in xg:
            t.grad = None

    with PeakMemory(device) as mem:
        step()
    row["peak_mb"] = mem.peak / 2**20
    row["fwdbwd_ms"] = _timed(step, device, reps)
    return row


def interleaved(name: str, size: str, reps: int) -> dict:
    """Forward+backward of the block and of its first reference, alternating `reps` times (CPU noise
    hits both alike); medians, their ratio, and each one's peak memory."""
    b, c, h, w = SIZES[size]
    b = BATCH_OVERRIDE.get((name, size), b)
    torch.manual_seed(0)
    block = build(name, c, (b, c, h, w)).train()
    label, ref = references(name, c, block)[0]
    ref.train()
    xs = tuple(t.requires_grad_(True) for t in make_inputs(name, (b, c, h, w)))
    device = torch.device("cpu")
    times = {"block": [], "ref": []}
    peaks = {}
    for i in range(reps + 1):
        for key, module in (("block", block), ("ref", ref)):
            def step(module=module):
                module(*xs).square().mean().backward()
                module.zero_grad(set_to_none=True)
                for t in xs:
                    t.grad = None
            if i == 0:  # warm-up, with the memory measurement
                with PeakMemory(device) as mem:
                    step()
                peaks[key] = mem.peak / 2**20
            else:
                times[key].append(_timed(step, device, 1))
    tb, tr = statistics.median(times["block"]), statistics.median(times["ref"])
    return dict(name=name, size=size, batch=b, reference=label, block_ms=tb, ref_ms=tr, time_ratio=tb / tr,
                block_peak_mb=peaks["block"], ref_peak_mb=peaks["ref"], memory_ratio=peaks["block"] / peaks["ref"])


def selected(patterns: str) -> list[str]:
    return [n for n in lit_attn.list_attn() if any(fnmatch.fnmatch(n, p) for p in patterns.split(","))]


def has_reference(name: str) -> bool:
    return name in BENCH_REFS or name == "aa_conv" or name in ("danet_pam", "danet") or name.startswith("nonlocal")


def compare(args) -> list[str]:
    """Markdown table: each selected block next to the naive dense non-local block (explicit N x N
    softmax, `NaiveNonLocal`, C -> C/2 embeddings) and next to the reference implementation its maths
    follows (scripts/bench_refs), at each size; forward+backward time and peak memory with ratios."""
    device = torch.device("cpu")
    out = []
    for size in args.sizes.split(","):
        b, c, h, w = SIZES[size]
        torch.manual_seed(0)
        nl = measure(NaiveNonLocal(c), (b, c, h, w), device, args.reps)
        print(f"{size}: naive NL {nl}", flush=True)
        out += [f"### B={b}, C={c}, {h}x{w} (N={h * w})", "",
                f"Naive dense non-local (explicit N x N softmax): {nl['params'] / 1e6:.3f} M params, "
                f"{nl['gflops']:.1f} GFLOPs, fwd+bwd {nl['fwdbwd_ms']:.0f} ms, peak {nl['peak_mb']:.0f} MB.", "",
                "| block | kind | params (M) | GFLOPs | fwd+bwd ms | peak MB | time / NL | peak / NL | "
                "reference implementation | ref fwd+bwd ms | ref peak MB | time / ref | peak / ref |",
                "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
        for name in selected(args.blocks):
            entry = lit_attn.get_attn_entry(name)
            torch.manual_seed(0)
            block = build(name, c, (b, c, h, w))
            r = measure(block, (b, c, h, w), device, args.reps, name)
            refs = references(name, c, block) or [("—", None)]
            for i, (label, ref) in enumerate(refs):
                head = (f"| `{name}` | {entry.kind} | {r['params'] / 1e6:.3f} | {r['gflops']:.2f} | "
                        f"{r['fwdbwd_ms']:.0f} | {r['peak_mb']:.0f} | {r['fwdbwd_ms'] / nl['fwdbwd_ms']:.2f} | "
                        f"{r['peak_mb'] / nl['peak_mb']:.2f} |") if i == 0 else "| ↳ | | | | | | | |"
                if ref is None:
                    out.append(head + " — | | | | |")
                    continue
                try:
                    q = measure(ref, (b, c, h, w), device, args.reps, name)
                    out.append(head + f" {label} | {q['fwdbwd_ms']:.0f} | {q['peak_mb']:.0f} | "
                               f"{r['fwdbwd_ms'] / q['fwdbwd_ms']:.2f} | {r['peak_mb'] / max(q['peak_mb'], 1):.2f} |")
                except Exception as e:  # noqa: BLE001  (a dense reference may not fit)
                    out.append(head + f" {label} | n/a: {type(e).__name__} | | | |")
                print(out[-1], flush=True)
            del block, refs
            gc.collect()
        out.append("")
    return out


def write_section(path: str, tag: str, lines: list[str], header: str) -> None:
    """Replace the `<!-- tag -->` ... `<!-- /tag -->` section of a markdown file (append it if absent)."""
    text = open(path).read() if os.path.exists(path) else ""
    start, end = f"<!-- {tag} -->", f"<!-- /{tag} -->"
    body = "\n".join([start, header, "", *lines, end])
    if start in text and end in text:
        text = text[:text.index(start)] + body + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    with open(path, "w") as f:
        f.write(text)


def build(name: str, channels: int, shape):
    if name == "aa_conv":  # relative tables sized for the benchmark grid
        return lit_attn.create_attn(name, channels, feat_size=shape[-2:])
    return lit_attn.create_attn(name, channels)


# dense references that would not fit in memory at the full batch are run (with the block) at B=1
BATCH_OVERRIDE = {("aa_conv", "head"): 1}


def machine(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def fmt(row) -> str:
    if "error" in row:
        return f"| {row['label']} | {row.get('kind', '')} | n/a: {row['error']} ||||||"
    return (f"| {row['label']} | {row.get('kind', '')} | {row['params'] / 1e6:.3f} | {row['gflops']:.2f} | "
            f"{row['fwd_ms']:.1f} | {row['fwdbwd_ms']:.1f} | {row['peak_mb']:.0f} |")


def run(args, on_row=None):
    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    names = selected(args.blocks)
    results = []
    for device in devices:
        for size in args.sizes.split(","):
            for name in names:
                b, c, h, w = SIZES[size]
                b = BATCH_OVERRIDE.get((name, size), b)
                entry = lit_attn.get_attn_entry(name)
                torch.manual_seed(0)
                try:
                    block = build(name, c, (b, c, h, w))
                except Exception as e:  # noqa: BLE001  (some timm conv blocks need extra args)
                    results.append(dict(device=str(device), size=size, label=f"`{name}`", kind=entry.kind,
                                        error=f"{type(e).__name__}: {str(e)[:80]}"))
                    continue
                tag = f" (B={b})" if (name, size) in BATCH_OVERRIDE else ""
                refs = [(f"  ↳ {label}", ref) for label, ref in references(name, c, block)]
                pairs = [(f"`{name}`{tag}", block)] + refs
                for label, module in pairs:
                    row = dict(device=str(device), size=size, label=label, name=name, kind=entry.kind)
                    try:
                        row.update(measure(module, (b, c, h, w), device, args.reps, name))
                    except Exception as e:  # noqa: BLE001  (e.g. timm's BAT asserts H, W divisible by 7)
                        msg = str(e).splitlines()[0][:80] if str(e) else "assertion on the input size"
                        row["error"] = f"{type(e).__name__}: {msg}"
                    results.append(row)
                    print(fmt(row), flush=True)
                    if on_row is not None:
                        on_row(devices, results)
                    del module
                del block, pairs
                gc.collect()
    return devices, results


def write_markdown(path, devices, results, args):
    lines = ["# Block benchmarks", "",
             "Produced by `scripts/bench_blocks.py` (" + " ".join(sys.argv[1:]) + "). Params in millions, "
             "GFLOPs of one forward (torch.utils.flop_counter), median latency over "
             f"{args.reps} runs after one warm-up, peak = extra memory of one forward+backward.", ""]
    for device in devices:
        lines += [f"## {device.type.upper()}: {machine(device)}", ""]
        for size in args.sizes.split(","):
            b, c, h, w = SIZES[size]
            lines += [f"### {size}: B={b}, C={c}, {h}x{w} (N={h * w})", "",
                      "| block | kind | params (M) | GFLOPs | fwd ms | fwd+bwd ms | peak MB |",
                      "|---|---|---:|---:|---:|---:|---:|"]
            lines += [fmt(r) for r in results if r["device"] == str(device) and r["size"] == size]
            lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    p.add_argument("--sizes", default="backbone,head")
    p.add_argument("--blocks", default="*", help="comma-separated glob patterns of registry names")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="docs/benchmarks.md", help="markdown output ('' to skip)")
    p.add_argument("--json", default="", help="also write the raw rows as JSON")
    p.add_argument("--interleave", type=int, default=0,
                   help="instead: N alternating forward+backward runs of each block and its naive reference (CPU)")
    p.add_argument("--compare", default="", metavar="TAG",
                   help="instead: a table of the selected blocks next to the naive dense non-local and their "
                        "reference implementations (CPU), written into the TAG section of --out")
    args = p.parse_args()
    if args.compare:
        lines = compare(args)
        header = (f"Produced by `python scripts/bench_blocks.py {' '.join(sys.argv[1:])}` on "
                  f"{machine(torch.device('cpu'))}; forward+backward in train mode, median of {args.reps} runs "
                  "after a warm-up; peak = extra resident memory of one forward+backward. Measured one after the "
                  "other on a shared machine: ratios within about 10% are noise (see the interleaved tables).")
        print("\n".join(lines))
        if args.out:
            write_section(args.out, args.compare, lines, header)
        return
    if args.interleave:
        rows = [interleaved(n, size, args.interleave) for size in args.sizes.split(",")
                for n in selected(args.blocks) if has_reference(n)]
        lines = ["| block | size | batch | reference | block fwd+bwd ms | reference ms | time ratio | block peak MB | "
                 "reference peak MB | memory ratio |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| `{r['name']}` | {r['size']} | {r['batch']} | {r['reference']} | {r['block_ms']:.0f} | "
                  f"{r['ref_ms']:.0f} | {r['time_ratio']:.2f} | {r['block_peak_mb']:.0f} | {r['ref_peak_mb']:.0f} | "
                  f"{r['memory_ratio']:.2f} |" for r in rows]
        print(f"{machine(torch.device('cpu'))}, {args.interleave} alternating runs each\n" + "\n".join(lines))
        return
    def save(devices, results):
        if args.out:
            write_markdown(args.out, devices, results, args)

    devices, results = run(args, on_row=save)
    save(devices, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": {str(d): machine(d) for d in devices}, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
