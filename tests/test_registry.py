"""Registry API and the README's block table."""
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import lit_attn
from lit_attn.registry import _REGISTRY

ROOT = Path(__file__).resolve().parents[1]


def test_create_list_and_errors():
    block = lit_attn.create_attn("nonlocal", 16)
    assert type(block).__name__ == "NonLocal2d" and block.mode == "embedded"
    assert lit_attn.create_attn("NONLOCAL_DOT", 16).mode == "dot"  # names are case-insensitive
    assert lit_attn.list_attn("psa_*") == ["psa_channel", "psa_p", "psa_s", "psa_spatial"]
    assert "aa_conv" in lit_attn.list_attn(kind="conv") and "aa_conv" not in lit_attn.list_attn(kind="gate")
    assert set(lit_attn.list_attn(source="timm")) >= {"se", "cbam", "eca", "gc", "nl"}
    assert lit_attn.list_attn(family="danet") == ["danet", "danet_cam", "danet_pam"]
    with pytest.raises(KeyError, match="unknown attention block 'nope'.*psa_p"):
        lit_attn.create_attn("nope", 8)
    cls = type(block)
    assert isinstance(lit_attn.create_attn(cls, 16), cls)
    assert lit_attn.create_attn(block, 99) is block


def test_timm_names_point_at_timm_classes():
    from timm.layers.squeeze_excite import SEModule

    se = lit_attn.create_attn("se", 64)
    assert type(se) is SEModule and lit_attn.get_attn_entry("se").source == "timm"


def test_register_attn_decorator_and_conflicts():
    @lit_attn.register_attn("unit_test_gate", family="test", kind="gate", paper="none", year=2026,
                            attends="channels", cost="O(NC)", scale=2.0)
    class Doubler(nn.Module):
        def __init__(self, channels, scale=1.0, **kwargs):
            super().__init__()
            self.scale = scale

        def forward(self, x):
            return x * self.scale

    try:
        assert lit_attn.create_attn("unit_test_gate", 4).scale == 2.0
        assert lit_attn.create_attn("unit_test_gate", 4, scale=3.0)(torch.ones(1)).item() == 3.0
        with pytest.raises(ValueError, match="already registered"):
            lit_attn.register_attn("unit_test_gate", family="x", kind="gate", paper="", year=1, attends="",
                                   cost="", cls=nn.Identity)
        with pytest.raises(ValueError, match="kind must be one of"):
            lit_attn.register_attn("bad_kind", family="x", kind="nope", paper="", year=1, attends="", cost="")
    finally:
        _REGISTRY.pop("unit_test_gate")


def test_readme_block_table_is_current():
    spec = importlib.util.spec_from_file_location("block_table", ROOT / "scripts" / "block_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.readme_table((ROOT / "README.md").read_text()) == mod.table(), \
        "README block table is stale: run `python scripts/block_table.py --update`"
