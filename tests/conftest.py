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
