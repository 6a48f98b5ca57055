"""`lit-attn` console script.

`lit-attn blocks` lists the registered blocks; `lit-attn demo` trains a timm ResNet-18 with a
lit_attn block on scikit-learn's bundled handwritten digits for a few seconds on the CPU and
reports test accuracy (the Lightning training CLI replaces this in the training-system issue).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def _digits(device):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    train, test = perm[:1400], perm[1400:]
    return (x[train].to(device), y[train].to(device)), (x[test].to(device), y[test].to(device))


def demo(attn: str, epochs: int, seed: int) -> float:
    import timm

    import lit_attn  # noqa: F401  (registers the block names in timm)

    torch.manual_seed(seed)
    (xt, yt), (xv, yv) = _digits("cpu")
    model = timm.create_model("resnet18", block_args={"attn_layer": attn}, num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    start = time.time()
    for epoch in range(epochs):
        model.train()
        for i in torch.randperm(len(yt)).split(64):
            loss = F.cross_entropy(model(xt[i]), yt[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xv).argmax(1) == yv).float().mean().item()
        print(f"epoch {epoch + 1}/{epochs}  train loss {loss.item():.3f}  test acc {acc:.3f}  "
              f"({time.time() - start:.0f} s)")
    return acc


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="lit-attn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("blocks", help="list the registered attention blocks")
    d = sub.add_parser("demo", help="train resnet18 + an attention block on sklearn digits (CPU, ~1 min)")
    d.add_argument("--attn", default="psa_p")
    d.add_argument("--epochs", type=int, default=3)
    d.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.cmd == "blocks":
        import lit_attn

        for name in lit_attn.list_attn():
            e = lit_attn.get_attn_entry(name)
            print(f"{name:20s} {e.kind:7s} {e.cost:28s} {e.paper}")
    else:
        demo(args.attn, args.epochs, args.seed)
