"""The benchmark's reference implementations compute the same maths as the blocks they are timed
against (scripts/bench_refs): same parameters, same output, so the speed/memory ratios are fair."""
import os
import sys

import pytest
import torch

import lit_attn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "scripts"))
from bench_refs import load  # noqa: E402

REFERENCES, INPUTS = load()
CASES = [(name, i) for name, pairs in sorted(REFERENCES.items()) for i in range(len(pairs))]


@pytest.mark.parametrize(("name", "index"), CASES)
def test_reference_matches_block(name, index):
    torch.manual_seed(0)
    c, shape = 32, (2, 32, 11, 13)
    block = lit_attn.create_attn(name, c).double()
    with torch.no_grad():  # non-zero gammas / norms, so the attention path is exercised
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    block.eval()
    label, factory = REFERENCES[name][index]
    ref = factory(block).eval()
    xs = tuple(t.double() for t in (INPUTS[name](*shape) if name in INPUTS else (torch.randn(shape),)))
    with torch.no_grad():
        out, expected = block(*xs), ref(*xs)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-8, msg=lambda m: f"{name} vs {label}: {m}")


def test_every_reference_names_a_registered_block():
    assert set(REFERENCES) <= set(lit_attn.list_attn())
    assert set(INPUTS) <= set(REFERENCES)
