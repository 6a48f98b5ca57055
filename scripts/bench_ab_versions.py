"""Time one block's forward+backward (train mode, CPU, 2 threads) from a given lit_attn checkout: the half of an
old-vs-new A/B comparison. Run it alternately for two checkouts (e.g. a `git worktree` of an older commit and
this one), one process each, so that both import their own lit_attn:

    for r in 1 2 3; do for root in /tmp/old /path/to/lit_attn; do
        python scripts/bench_ab_versions.py $root isa head; done; done

Prints the median of 2 timed runs after a warm-up, in ms. Sizes as scripts/bench_blocks.py.
"""
import statistics
import sys
import time

import torch

torch.set_num_threads(2)
sys.path.insert(0, sys.argv[1])
import lit_attn  # noqa: E402

assert lit_attn.__file__.startswith(sys.argv[1])
sizes = {"backbone": (8, 256, 56, 56), "head": (2, 512, 64, 128)}
name, size = sys.argv[2], sys.argv[3]
b, c, h, w = sizes[size]
torch.manual_seed(0)
m = lit_attn.create_attn(name, c).train()
x = torch.randn(b, c, h, w)


def run() -> float:
    xx = x.clone().requires_grad_()
    t = time.perf_counter()
    m(xx).sum().backward()
    return time.perf_counter() - t


run()
print(statistics.median([run() for _ in range(2)]) * 1e3)
