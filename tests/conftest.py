import os

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("LIT_ATTN_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow or set LIT_ATTN_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """One digits cache folder for the session (the scenes of a parameter set are generated once)."""
    return str(tmp_path_factory.mktemp("digits"))
