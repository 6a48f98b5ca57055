import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """One digits cache folder for the session (the scenes of a parameter set are generated once)."""
    return str(tmp_path_factory.mktemp("digits"))
