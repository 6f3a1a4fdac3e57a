"""InsertTaylorUpdatePass and ReplaceWithTaylorForecastPass (TaylorSeer's factors and forecasts).

Structural: exact counts of reads, differences, writes and forecasts, the placeholders they add,
the slots they declare, and the work dead-code elimination removes. Numerical: the factors written
and the forecasts used, against the eager model with its attention/MLP outputs observed or
replaced by forward hooks, computed here from TaylorSeer's finite-difference and forecast formulas. The eager runners' in-place
refresh (UpdateTaylorFactorsInPlacePass) against the variant's differences and writes, bit for bit.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import graphcache
from graphcache import ir
from graphcache.cache import CACHE_ATTR, CacheState
from graphcache.models.dit import DiT, DiTConfig, init_random_
from graphcache.ops import is_cache_write
from graphcache.passes.cache_passes import EliminateDeadBranchesPass
from graphcache.passes.manager import PassManager
from graphcache.passes.taylor import (
    DELTA_INPUT,
    InsertTaylorUpdatePass,
    ReplaceWithTaylorForecastPass,
    UpdateTaylorFactorsInPlacePass,
    finite_difference,
    forecast_coefficients,
    coefficient_input,
    update_taylor_factors_,
)
from graphcache.ops import copy_into_
from graphcache.exporters.eager import with_cache_kernels
from graphcache.passes.base import PassError
from graphcache.runtime import new_variant
from graph_queries import layer_calls

DEPTH = 3
ORDER = 3


@pytest.fixture(scope="module")
def model():
    cfg = DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=DEPTH, num_heads=4, num_classes=10)
    return init_random_(DiT(cfg), seed=3).eval()


@pytest.fixture(scope="module")
def captured(model):
    return graphcache.capture(model)


def build(captured, passes):
    gm = new_variant(captured, CacheState())
    records = PassManager(passes)(gm)
    return gm, records


def allocate(captured, gm, seed=0):
    """Every declared slot, filled with random values (the 'old' factors)."""
    cache = getattr(gm, CACHE_ATTR)
    nodes = ir.nodes_by_name(captured.graph)
    specs = {n: s.resolve(nodes[s.like].meta["tensor_meta"]) for n, s in gm.meta["graphcache_slots"].items()}
    cache.allocate(specs, torch.device("cpu"), signature=None)
    g = torch.Generator().manual_seed(seed)
    for buf in cache.buffers():
        buf.copy_(torch.randn(buf.shape, generator=g))
    return cache


def inputs():
    g = torch.Generator().manual_seed(7)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([321, 321]), torch.tensor([3, 10])


def slot(cache, block, kind, i):
    return getattr(cache, f"b{block}_{kind}_taylor{i}")


def placeholders(gm):
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


def observed_outputs(model, args):
    """The ungated attention/MLP outputs of the eager model, per (block, kind)."""
    seen, hooks = {}, []
    for b, block in enumerate(model.blocks):
        for kind, mod in (("attention", block.attn), ("mlp", block.mlp)):
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, key=(b, kind): seen.__setitem__(key, o.clone())))
    try:
        with torch.no_grad():
            out = model(*args)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


@pytest.mark.parametrize("order", [0, 1, ORDER])
def test_update_counts_and_slots(captured, order):
    gm, records = build(captured, [InsertTaylorUpdatePass(order=order)])
    branches = 2 * DEPTH
    assert records[0].counters == {
        "taylor_read": order * branches, "derivative": order * branches, "taylor_write": (order + 1) * branches,
        "branch": branches,
    }
    writes = [n for n in gm.graph.nodes if is_cache_write(n)]
    assert len(writes) == (order + 1) * branches
    assert sorted(gm.meta["graphcache_slots"]) == sorted(
        f"b{b}_{k}_taylor{i}" for b in range(DEPTH) for k in ("attention", "mlp") for i in range(order + 1)
    )
    assert [p for p in placeholders(gm) if p.startswith("gc_")] == ([DELTA_INPUT] if order else [])


def test_update_writes_finite_differences(model, captured):
    gm, _ = build(captured, [InsertTaylorUpdatePass(order=ORDER)])
    cache = allocate(captured, gm)
    old = {name: buf.clone() for name, buf in cache.named_buffers()}
    args, d = inputs(), -3
    with torch.no_grad():
        out = gm(*args, **{DELTA_INPUT: d})
    expected_out, seen = observed_outputs(model, args)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)  # a full step is the plain model
    for (b, kind), f in seen.items():
        new = [f]
        for i in range(ORDER):  # every difference, whether or not the official cache has it yet
            new.append((new[i] - old[f"b{b}_{kind}_taylor{i}"]) / d)
        for i in range(ORDER + 1):
            torch.testing.assert_close(slot(cache, b, kind, i), new[i], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("factors", [1, 2, ORDER + 1])
def test_forecast_replaces_every_branch(model, captured, factors):
    """Slots beyond `factors` hold random values: their zero weights must leave them out."""
    gm, records = build(captured, [ReplaceWithTaylorForecastPass(order=ORDER), EliminateDeadBranchesPass()])
    assert records[0].counters == {"taylor_read": (ORDER + 1) * 2 * DEPTH, "forecast": 2 * DEPTH}
    assert records[1].counters["removed_nodes"] > 0
    # the attention and MLP work is gone; adaLN (the gates) stays
    calls = [ir.layer_path(n) for n in layer_calls(gm, "blocks.")]
    assert not [c for c in calls if ".attn." in c or ".mlp." in c or c.endswith(("norm1", "norm2"))]
    assert sum(c.endswith("adaLN_modulation.1") for c in calls) == DEPTH
    assert not [n for n in gm.graph.nodes if is_cache_write(n)]
    assert [p for p in placeholders(gm) if p.startswith("gc_")] == [coefficient_input(i) for i in range(1, ORDER + 1)]

    cache = allocate(captured, gm, seed=factors)
    args, dist = inputs(), -2
    with torch.no_grad():
        out = gm(*args, **forecast_coefficients(dist, factors, ORDER))

    def forecast(b, kind):
        return sum(slot(cache, b, kind, i) * dist**i / math.factorial(i) for i in range(factors))

    hooks = []
    for b, block in enumerate(model.blocks):
        for kind, mod in (("attention", block.attn), ("mlp", block.mlp)):
            hooks.append(mod.register_forward_hook(lambda m, i, o, f=forecast(b, kind): f))
    try:
        with torch.no_grad():
            expected = model(*args)
    finally:
        for h in hooks:
            h.remove()
    # one factor: the zero-weighted terms add exactly nothing, so the result is bit-identical
    tol = 0 if factors == 1 else 1e-5
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


def test_forecast_of_order_zero_is_plain_reuse(captured):
    gm, _ = build(captured, [ReplaceWithTaylorForecastPass(order=0), EliminateDeadBranchesPass()])
    assert not [p for p in placeholders(gm) if p.startswith("gc_")]
    nodes = ir.nodes_by_name(gm.graph)
    structure = ir.structure_of(gm)
    for br in structure.branches:
        gate_mul = next(u for u in nodes[br.gate].users)
        used = [a for a in gate_mul.args if a is not nodes[br.gate]][0]
        assert used.op == "get_attr" and used.target == f"{CACHE_ATTR}.{br.name}_taylor0"


def test_forecast_subset_of_kinds(captured):
    gm, records = build(captured, [ReplaceWithTaylorForecastPass(order=ORDER, kinds={ir.ATTENTION})])
    assert records[0].counters["forecast"] == DEPTH
    assert sorted(gm.meta["graphcache_slots"]) == sorted(
        f"b{b}_attention_taylor{i}" for b in range(DEPTH) for i in range(ORDER + 1)
    )


def test_declines_and_bad_arguments(captured):
    forecast = ReplaceWithTaylorForecastPass(blocks=[0], order=ORDER)
    update = InsertTaylorUpdatePass(blocks=[0], order=ORDER)
    gm, records = build(captured, [forecast, update])
    assert records[1].counters == {} and not records[1].modified
    assert sorted(d.target for d in records[1].declined) == ["b0_attention", "b0_mlp"]
    with pytest.raises(ValueError):
        InsertTaylorUpdatePass(order=-1)
    with pytest.raises(ValueError):
        ReplaceWithTaylorForecastPass(order=-1)


# --------------------------------------------------------------------------------------------
# The eager runners' in-place refresh
# --------------------------------------------------------------------------------------------


def eager_copy(gm):
    """`gm` with its cache ops as their kernels, as exporters/eager.py's runners make it (nothing else), and
    a cache of its own."""
    out = with_cache_kernels(gm)
    out.meta.update(gm.meta)
    setattr(out, CACHE_ATTR, CacheState())
    return out


@pytest.mark.parametrize("d", [1, -3, -5])
def test_in_place_refresh_kernel_equals_the_differences_and_moves_buffers_up(d):
    cache = CacheState()
    names = tuple(f"f{i}" for i in range(ORDER + 1))
    g = torch.Generator().manual_seed(d + 10)
    cache.allocate({n: ((2, 5, 3), torch.float32) for n in names}, torch.device("cpu"), None)
    for buf in cache.buffers():
        buf.copy_(torch.randn(buf.shape, generator=g))
    value = torch.randn(2, 5, 3, generator=g)
    buffers = [getattr(cache, n) for n in names]
    new = [value]
    for i in range(ORDER):
        new.append(finite_difference(new[i], buffers[i], d))
    update_taylor_factors_(cache, names, value, d)
    for i, name in enumerate(names):
        assert torch.equal(getattr(cache, name), new[i]), name
    # the old highest factor's buffer now holds factor 0, every other one the factor above its own
    assert [getattr(cache, n) for n in names] == [buffers[-1], *buffers[:-1]]
    assert getattr(cache, names[0]) is not value


def test_in_place_refresh_replaces_each_branch_chain_bitwise(model, captured):
    gm, _ = build(captured, [InsertTaylorUpdatePass(order=ORDER)])
    plain = eager_copy(gm)
    runner = eager_copy(gm)
    p = UpdateTaylorFactorsInPlacePass()
    assert p(runner).modified and not p.declined
    branches = 2 * DEPTH
    assert p.counters == {"branch": branches, "difference": ORDER * branches}
    targets = Counter(n.target for n in runner.graph.nodes if n.op == "call_function")
    assert targets[update_taylor_factors_] == branches
    assert targets[finite_difference] == 0 and targets[copy_into_] == 0
    assert not [n for n in runner.graph.nodes if n.op == "get_attr" and "_taylor" in n.target]
    kernels = [n for n in runner.graph.nodes if n.target is update_taylor_factors_]
    assert {n.args[1] for n in kernels} == {
        tuple(f"b{b}_{k}_taylor{i}" for i in range(ORDER + 1)) for b in range(DEPTH) for k in ("attention", "mlp")}

    args = inputs()
    for run in (plain, runner):
        allocate(captured, run, seed=1)
    results = []
    for run in (plain, runner):
        with torch.no_grad():
            out = run(*args, **{DELTA_INPUT: -3})
            out = run(args[0] * 0.5, *args[1:], **{DELTA_INPUT: -2})  # a second refresh reads the first's slots
        results.append((out, dict(getattr(run, CACHE_ATTR).named_buffers())))
    (want, want_slots), (got, got_slots) = results
    assert torch.equal(got, want)
    assert want_slots.keys() == got_slots.keys() and all(torch.equal(got_slots[k], want_slots[k]) for k in want_slots)


class _Refresh(torch.nn.Module):
    """One order-1 refresh of slots s0, s1 from x; `peek` reads s1 before the refresh and returns it
    after (it must see the old factor); `leak` also returns the difference itself."""

    def __init__(self, peek=False, leak=False):
        super().__init__()
        self.peek, self.leak = peek, leak
        self.graphcache_cache = CacheState()
        self.graphcache_cache.allocate({"s0": ((2, 3), torch.float32), "s1": ((2, 3), torch.float32)},
                                       torch.device("cpu"), None)

    def graph(self):
        graph = torch.fx.Graph()
        x, d = graph.placeholder("x"), graph.placeholder("d")
        peeked = graph.get_attr(f"{CACHE_ATTR}.s1") if self.peek else None
        diff = graph.call_function(finite_difference, (x, graph.get_attr(f"{CACHE_ATTR}.s0"), d))
        graph.call_function(copy_into_, (graph.get_attr(f"{CACHE_ATTR}.s0"), x))
        graph.call_function(copy_into_, (graph.get_attr(f"{CACHE_ATTR}.s1"), diff))
        graph.output(graph.call_method("clone", (peeked,)) if self.peek else (diff if self.leak else x))
        return torch.fx.GraphModule(self, graph)


@pytest.mark.parametrize("case, reason", [
    ({}, None),
    ({"peek": True}, "reads a factor slot while it is refreshed"),
    ({"leak": True}, "or the factor it reads has another reader"),
])
def test_in_place_refresh_declines_what_others_read(case, reason):
    gm = _Refresh(**case).graph()
    p = UpdateTaylorFactorsInPlacePass()
    p(gm)
    if reason is None:
        assert p.counters == {"branch": 1, "difference": 1} and not p.declined
    else:
        assert not p.counters and [d.target for d in p.declined] == ["finite_difference"]
        assert reason in p.declined[0].reason
        assert sum(n.target is copy_into_ for n in gm.graph.nodes) == 2


def test_in_place_refresh_requires_the_cache_kernels(captured):
    """On a variant whose writes are still `cache_write` ops the pass would match nothing and
    decline silently: it refuses to run instead, naming the pass that must come first."""
    gm, _ = build(captured, [InsertTaylorUpdatePass(order=ORDER)])
    with pytest.raises(PassError, match="run CallCacheKernelsPass first"):
        UpdateTaylorFactorsInPlacePass()(gm)
    p = UpdateTaylorFactorsInPlacePass()
    assert p(eager_copy(gm)).modified  # the same graph once the kernels are in
