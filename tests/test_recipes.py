"""The per-head recipes are what scripts/make_recipes.py writes, and cover every smp architecture."""
import subprocess
import sys
from pathlib import Path

from lit_attn.integrations.smp import ARCHITECTURES

ROOT = Path(__file__).resolve().parent.parent


def test_head_recipes_are_current():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_recipes.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_head_has_cityscapes_and_ade20k_recipes():
    for arch in ARCHITECTURES:
        assert (ROOT / "recipes" / "cityscapes" / f"{arch}_r50_d8_512x1024_80k.yaml").exists()
        assert (ROOT / "recipes" / "ade20k" / f"{arch}_r50_d8_512x512_80k.yaml").exists()
