import os
import sys

import pytest
import torch
from hypothesis import settings

# CI replays the same examples every run (a red CI then always names a real, reproducible
# case); locally hypothesis explores new ones.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test runs torch on one thread, whatever an earlier test set.

    Tests measure no speed; on a loaded 2-core machine two threads spin against each
    other (float64 depthwise convs ran 10-25x slower).
    """
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)
