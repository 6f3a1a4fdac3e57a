import os
import sys

import pytest
import torch

# test modules share helpers (graph_queries, test_capture's models) by plain import
TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    """Test models are small: one intra-op thread is faster than two, and immune to a busy
    machine's stalls. Equivalence tests compare runs made under the same setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
