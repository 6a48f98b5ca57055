"""Reference implementations for `scripts/bench_blocks.py`: one module per block family.

Each module defines `REFERENCES = {block name: [(label, factory)]}`, where `factory(block)` returns a
module that shares the block's parameters and computes the same output the way the official code
(or mmseg/mmcv) does, and optionally `INPUTS = {block name: fn(b, c, h, w) -> tuple of inputs}` for
blocks whose forward takes more than one tensor. `tests/test_bench_refs.py` checks that every
reference matches its block, so the timings compare the same maths.
"""
from __future__ import annotations

import importlib
import os
import pkgutil


def load() -> tuple[dict, dict]:
    """Merged REFERENCES and INPUTS of every module in this folder."""
    refs, inputs = {}, {}
    for info in sorted(pkgutil.iter_modules([os.path.dirname(__file__)]), key=lambda i: i.name):
        mod = importlib.import_module(f"{__name__}.{info.name}")
        for name, pairs in getattr(mod, "REFERENCES", {}).items():
            refs.setdefault(name, []).extend(pairs)
        inputs.update(getattr(mod, "INPUTS", {}))
    return refs, inputs
