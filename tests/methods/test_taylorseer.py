"""TaylorSeer (arXiv 2503.06923): schedule, variants, whole runs against the reference of
tests/methods/clusca_reference.py (with clusters = 0 it is TaylorSeer, as in Shenyi-Z/Cache4Diffusion),
and the identity: order 0 is FORA with the same full steps.

Tolerance: as in test_clusca.py, 1e-5 * max(1, max|reference|) elementwise on the final latents
and on every step's model output. The identity with FORA is exact (torch.equal).
"""

from __future__ import annotations

import pytest
import torch

import graphcache
from graphcache import ir
from graphcache.methods import METHODS, Method, fora, get_method
from graphcache.methods.taylorseer import taylor_plans
from graphcache.methods.base import EOC_OPTIONS
from graphcache.passes.cluster import KMEANS
from graphcache.passes.taylor import DELTA_INPUT, coefficient_input
from graphcache.schedule import FORECAST, FULL, REUSE, StepPlan
from clusca_reference import ClusCaReference
from graph_queries import layer_calls
from test_clusca import (  # the comparison helpers live with the ClusCa tests
    TOL,
    Recorder,
    assert_run_matches,
    caching_effect,
    kinds_string,
    run,
    schedule_by_rule,
    small_dit,
    tiny_dit,
)

EOC_DEFAULTS = {o.name: o.default for o in EOC_OPTIONS}


@pytest.fixture(scope="module")
def dit_s():
    return small_dit(seed=4)


# ---------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------


def test_schedule_anchors():
    method = get_method("taylorseer")
    assert {o.name: o.default for o in method.options} == {"interval": 4, "order": 4, **EOC_DEFAULTS}
    assert kinds_string(method.schedule(50, 28)) == "FF" + "TTTF" * 12
    assert kinds_string(method.schedule(50, 28, {"interval": 3})) == "FF" + "TTF" * 16
    assert kinds_string(method.schedule(250, 28, {"interval": 5})) == "FF" + "TTTTF" * 49 + "TTT"
    plans = method.schedule(10, 28, {"interval": 2, "order": 2}).steps
    assert [p.kinds[0] for p in plans] == [
        FULL, FULL, FORECAST, FULL, FORECAST, FULL, FORECAST, FULL, FORECAST, FULL]
    assert not any(p.init_clusters for p in plans)
    # the first full step has no factors to difference (d = 1, unused); a forecast's coefficients are
    # dist**i / i! for the factors the last full step left (2, then 3), 0 for the rest
    c1, c2 = coefficient_input(1), coefficient_input(2)
    assert [p.inputs for p in plans[:5]] == [{DELTA_INPUT: 1}, {DELTA_INPUT: -1}, {c1: -1.0, c2: 0.0},
                                            {DELTA_INPUT: -2}, {c1: -1.0, c2: 0.5}]


def existing_factors(plan) -> int:
    """How many Taylor factors a forecast step uses: its non-zero weights, plus factor 0."""
    return 1 + sum(w != 0 for w in plan.inputs.values())


@pytest.mark.parametrize("num_steps", [50, 250])
@pytest.mark.parametrize("interval", [1, 2, 3, 4, 5, 6])
def test_schedule_follows_rule(num_steps, interval):
    sched = get_method("taylorseer").schedule(num_steps, 12, {"interval": interval}, 64)
    assert kinds_string(sched) == schedule_by_rule(num_steps, interval).replace("C", "T")
    assert all(p.tokens is None and len(set(p.kinds)) == 1 for p in sched.steps)
    assert "tokens" not in sched.to_json()["steps"][-1]
    # factors grow by one per full step up to order + 1 = 5 (a forecast uses what the last left)
    fulls = 0
    for p in sched.steps:
        if p.kinds[0] == FULL:
            fulls += 1
        else:
            assert existing_factors(p) == min(fulls, 5)
    assert fulls >= 5


def test_variant_structure():
    model = tiny_dit()
    cm = graphcache.optimize(model, "taylorseer", num_steps=10, interval=2, order=2)
    assert len(cm.variants) == 2  # one full, one forecast: which factors exist is an input
    for key, gm in cm.variants.items():
        names = [r.name for r in cm.records[key]]
        work = [n for n in layer_calls(gm, "blocks.") if ".attn." in ir.layer_path(n) or ".mlp." in ir.layer_path(n)]
        assert not [n for n in gm.graph.nodes if n.target in (KMEANS, torch.rand, torch.randint)]
        if key[0][0] == FULL:
            assert names == ["InsertTaylorUpdatePass", "PruneModulationPass", "MakeStreamContiguousPass",
                             "HoistConditioningPass"]
            assert cm.records[key][0].counters == {  # 3 blocks x 2 branches, order 2
                "taylor_read": 2 * 3 * 2, "derivative": 2 * 3 * 2, "taylor_write": 2 * 3 * 3, "branch": 2 * 3}
            assert len(work) == 3 * (2 + 3)  # qkv, proj, fc1, act, fc2 per block
            # per block both branches' shift, 1 + scale and gate; the final layer's shift and 1 + scale
            assert cm.records[key][-1].counters["hoisted_values"] == 3 * 6 + 2
        else:
            assert names == ["ReplaceWithTaylorForecastPass", "EliminateDeadBranchesPass", "PruneModulationPass",
                             "MakeStreamContiguousPass", "HoistConditioningPass"]
            assert cm.records[key][0].counters == {"taylor_read": 2 * 3 * 3, "forecast": 2 * 3}
            assert not work
            assert cm.records[key][-1].counters["hoisted_values"] == 3 * 2 + 2  # the gates only
    assert len(cm.slots()) == 3 * 2 * 3


# ---------------------------------------------------------------------------------------------
# Whole runs against the reference
# ---------------------------------------------------------------------------------------------


def compare(model, steps, sampler, interval, order, plain=False):
    cm = Recorder(graphcache.optimize(model, "taylorseer", num_steps=steps, interval=interval, order=order))
    got = run(cm, steps, sampler)
    ref = Recorder(ClusCaReference(model, interval, clusters=0, order=order))
    want = run(ref, steps, sampler)
    assert set(ref.model.types) == {"full", "Taylor"}
    assert_run_matches(cm, ref, got, want)
    if plain:
        assert caching_effect(model, steps, sampler, ref, (3, 7)) > 100 * TOL
    return got


def test_matches_reference_dit_s(dit_s):
    """DiT-S/2 shapes, 64 tokens, DDIM-50 with CFG (DDPM runs: the tiny model below, and ClusCa's
    tests, which share every Taylor pass)."""
    compare(dit_s, 50, "ddim", interval=4, order=4)


@pytest.mark.parametrize(
    "sampler,steps,interval,order", [("ddpm", 25, 5, 3), ("ddpm", 20, 3, 2), ("ddim", 14, 2, 1)])
def test_matches_reference_tiny(sampler, steps, interval, order):
    compare(tiny_dit(seed=5), steps, sampler, interval, order, plain=True)


# ---------------------------------------------------------------------------------------------
# Order 0 is FORA with the same full steps
# ---------------------------------------------------------------------------------------------


def fora_at_taylorseer_full_steps(interval):
    """FORA's own passes (cache write / cache read), scheduled on TaylorSeer's full steps."""

    def plan(num_steps, depth, num_tokens, options, structure=None):
        return [
            StepPlan(p.index, p.step, tuple(REUSE if k == FORECAST else k for k in p.kinds))
            for p in taylor_plans(num_steps, depth, interval, 0)
        ]

    return Method("fora-at-taylorseer-steps", "test only", (), plan, fora.passes)


@pytest.mark.parametrize("sampler,steps,interval", [("ddim", 20, 4), ("ddpm", 15, 3)])
def test_order_zero_is_fora(monkeypatch, sampler, steps, interval):
    model = tiny_dit(seed=6)
    method = fora_at_taylorseer_full_steps(interval)
    monkeypatch.setitem(METHODS, method.name, method)
    reuse = Recorder(graphcache.optimize(model, method.name, num_steps=steps))
    taylor = Recorder(graphcache.optimize(model, "taylorseer", num_steps=steps, interval=interval, order=0))
    ref = Recorder(ClusCaReference(model, interval, clusters=0, order=0))
    a, b, c = (run(m, steps, sampler) for m in (reuse, taylor, ref))
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(reuse.outputs, taylor.outputs))
    assert_run_matches(taylor, ref, b, c)
    assert {p.kinds[0] for p in reuse.model.schedule.steps} == {FULL, REUSE}
    # and ClusCa with no clusters is the same again
    clusca = graphcache.optimize(model, "clusca", num_steps=steps, interval=interval, order=0, clusters=0)
    assert torch.equal(run(clusca, steps, sampler), b)
