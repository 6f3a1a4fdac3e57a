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


@pytest.fixture(scope="session")
def dit_s2_captured():
    """(DiT-S/2 at a 16x16 latent (64 tokens, 12 blocks), every weight N(0, 0.02); its capture), for
    the capture and pass tests. The passes rewrite copies (`new_variant`); a test that records
    other shapes on the graph records the capture's again before it ends."""
    import graphcache
    from graphcache.models.dit import DiT, dit_config, init_random_

    model = init_random_(DiT(dit_config("DiT-S/2", input_size=16)))
    return model, graphcache.capture(model)


@pytest.fixture(scope="session")
def eoc_model():
    """builtin:dit-tiny-random: depth 2, 16 tokens, every weight N(0, 0.02)."""
    from graphcache.models.builtin import resolve_model

    return resolve_model("builtin:dit-tiny-random")


@pytest.fixture(scope="session")
def eoc_prior(eoc_model, tmp_path_factory):
    """An EOC prior of `eoc_model` for EOC_STEPS DDIM steps without guidance (2 + 2 samples), on disk."""
    from eoc_setup import EOC_STEPS

    from graphcache.calibration import calibrate

    path = tmp_path_factory.mktemp("eoc") / "prior.safetensors"
    calibrate(eoc_model, EOC_STEPS, samples=2, held_out=2, cfg_scale=None).save(path)
    return path
