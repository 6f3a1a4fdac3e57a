"""The backend tests' DiT-S/2-shaped model has 2 blocks instead of 12 (conftest.py `dit_s`): the
claim that makes it a stand-in is that every method's schedule, at the step counts those tests
run, has the same variants at both depths, each block of a variant the same kind."""

from __future__ import annotations

import pytest

from graphcache.methods import get_method
from run_helpers import CASES, DIT_S_DEPTH, case_id


def variant_shapes(name, options, steps, depth):
    method = get_method(name)
    schedule = method.schedule(steps, depth, method.resolve_options(options), num_tokens=256)
    shapes = []
    for kinds, init_clusters in schedule.variants():
        assert len(set(kinds)) == 1, (name, depth, kinds)  # every block of a variant the same kind
        shapes.append((kinds[0], init_clusters))
    return shapes


@pytest.mark.parametrize("steps", [4, 5])  # test_aoti/test_compile: DDIM-4; test_onnx: DDIM-5
@pytest.mark.parametrize("name,options", CASES, ids=[case_id(c) for c in CASES])
def test_every_exported_schedule_has_the_depth_12_variants(name, options, steps):
    assert DIT_S_DEPTH < 12
    assert variant_shapes(name, options, steps, DIT_S_DEPTH) == variant_shapes(name, options, steps, 12)
