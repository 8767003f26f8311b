# Let the tests import the repo's top-level modules (model, cli, train, ...) under plain `pytest` too.
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def one_thread():
    """In-process tests use tiny models, which gain nothing from threads; on shared cores extra threads
    can stall badly. (Subprocesses started by the tests keep their own thread count.)"""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
