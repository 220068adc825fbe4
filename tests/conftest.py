import os

import pytest
import torch

# Tests are sized for 2 cores; keep torch from oversubscribing them.
torch.set_num_threads(1)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def finished_project(tmp_path_factory):
    """One tiny finished `dvc repro` of the project for the session; tests take copies (`copy_workspace`)."""
    from tests import tiny

    return tiny.finished_project(tmp_path_factory.mktemp("finished") / "repo")
