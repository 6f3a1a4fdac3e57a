"""FORA's schedule: full at the first call and wherever the DESCENDING step index is divisible by
the interval (the official loop counts s = S-1 .. 0), reuse everywhere else, all blocks alike."""

from __future__ import annotations

import pytest

from graphcache.errors import GraphcacheError
from graphcache.methods import get_method
from graphcache.passes.cache_passes import EliminateDeadBranchesPass, InsertCacheWritePass, ReplaceWithCacheReadPass
from graphcache.schedule import FULL, REUSE

FORA = get_method("fora")
DEPTH = 28


def expected_full(num_steps: int, interval: int) -> list[bool]:
    """Written from the rule, not from the implementation: sampling-order index i calls the
    model at descending step s = num_steps - 1 - i."""
    out = []
    for i in range(num_steps):
        s = num_steps - 1 - i
        out.append(i == 0 or s % interval == 0)
    return out


@pytest.mark.parametrize("num_steps", [10, 20, 50, 250])
@pytest.mark.parametrize("interval", [1, 2, 3, 4, 5])
def test_schedule(num_steps, interval):
    sched = FORA.schedule(num_steps, DEPTH, {"interval": interval})
    assert sched.num_steps == len(sched.steps) == num_steps and sched.depth == DEPTH
    assert sched.options == {"interval": interval, "level": 0}
    full = expected_full(num_steps, interval)
    for i, plan in enumerate(sched.steps):
        assert plan.index == i and plan.step == num_steps - 1 - i
        assert len(plan.kinds) == DEPTH
        assert len(set(plan.kinds)) == 1, "all blocks have the same kind"
        assert plan.kinds[0] in (FULL, REUSE)
        assert (plan.kinds[0] == FULL) == full[i], (i, plan.step)
        assert plan.tokens is None
    assert sched.steps[0].kinds[0] == FULL
    assert sched.steps[-1].kinds[0] == FULL  # s = 0 is divisible by every interval
    # two step kinds at most, so at most two variants (one when every step is full)
    assert len(sched.variants()) == (1 if interval == 1 else 2)
    assert sum(full) == 1 + sum(1 for s in range(num_steps - 1) if s % interval == 0)


def test_first_cycle_is_irregular():
    """S=10, N=3: s = 9 8 7 6 5 4 3 2 1 0 -> F R R F R R F R R F (s=9 is full twice over);
    S=10, N=4: s = 9 .. 0 -> full at s = 9 (first), 8, 4, 0: the first cycle has length 1."""
    def kinds(S, n):
        return "".join("F" if p.kinds[0] == FULL else "R" for p in FORA.schedule(S, 2, {"interval": n}).steps)

    assert kinds(10, 3) == "FRRFRRFRRF"
    assert kinds(10, 4) == "FFRRRFRRRF"
    assert kinds(10, 5) == "FRRRFRRRRF"
    assert kinds(50, 1) == "F" * 50


def test_default_interval_and_json():
    sched = FORA.schedule(20, 4)
    assert sched.options == {"interval": 3, "level": 0}
    j = sched.to_json()
    assert j["method"] == "fora" and j["num_steps"] == 20 and len(j["steps"]) == 20
    assert j["steps"][1] == {"index": 1, "step": 18, "kinds": [FULL] * 4}  # 18 % 3 == 0
    assert j["steps"][2] == {"index": 2, "step": 17, "kinds": [REUSE] * 4}


def test_option_validation():
    with pytest.raises(GraphcacheError, match="interval"):
        FORA.schedule(10, 4, {"interval": 0})
    with pytest.raises(GraphcacheError, match="no option 'ratio'"):
        FORA.schedule(10, 4, {"ratio": 0.5})
    assert FORA.schedule(10, 4, {"interval": "2"}).options == {"interval": 2, "level": 0}


def test_passes_per_kind():
    sched = FORA.schedule(10, 3, {"interval": 3})
    full = FORA.passes(sched.steps[0], sched.options)
    reuse = FORA.passes(sched.steps[1], sched.options)
    assert [type(p) for p in full] == [InsertCacheWritePass, ReplaceWithCacheReadPass, EliminateDeadBranchesPass]
    assert (full[0].blocks, full[1].blocks) == ([0, 1, 2], [])
    assert (reuse[0].blocks, reuse[1].blocks) == ([], [0, 1, 2])
