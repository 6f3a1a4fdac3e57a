"""TaylorSeer's rewrites: keep Taylor factors of every branch output, forecast them in between.

The cache of a branch is a list of factors `{0: F, 1: dF, 2: d²F, ...}` (METHODS.md §6.3), one
slot each, `"{branch.name}_taylor{i}"` for i = 0..order:

* at a full step (`InsertTaylorUpdatePass`) the branch computes F and the factors are refreshed by
  finite differences against the previous full step's factors,

      new[0] = F,   new[i+1] = (new[i] - old[i]) / d   for i < order,

  where d = activated_steps[-1] - activated_steps[-2] (negative: steps count down) is a per-step
  input;
* at a forecast step (`ReplaceWithTaylorForecastPass`) the branch output is replaced by

      F̂ = Σ_i (1/i!) · new[i] · w_i,   w_i = dist^i for the factors that exist, else 0,

  dist = s - activated_steps[-1] (negative) and the w_i per-step inputs. The current adaLN gate
  still multiplies the forecast, as for every cache read.

How many factors exist is data, not graph: the official cache holds m + 1 factors after a full
step that took m differences (m grows by one per full step up to `order`), and only those enter
its forecasts. Here every full step takes all `order` differences and every forecast reads all
`order + 1` factors, with w_i = 0 for the ones the official cache lacks: `0 · finite = 0` and
`x + 0 = x`, so the result is bit-identical to leaving the term out, and one full variant and one
forecast variant serve a whole run (instead of one per m — fewer graphs to compile and export).
The differences beyond m are finite leftovers that nothing weights before a later full step
overwrites them with real ones (it reads only old[i] for i < m' <= m + 1). The first full step of
a run has no previous factors: its d input is 1 (any non-zero value keeps the leftovers finite).

Per-step scalars are graph placeholders (Python ints at run time) named by `DELTA_INPUT` and
`weight_input(i)`; the schedule puts them in `StepPlan.inputs` (`forecast_weights`).
"""

from __future__ import annotations

import math
import operator

import torch.fx as fx

from .. import ir
from ..cache import CacheSlot, declare_slot, read_slot, write_slot
from .base import Pass, PassError, PassResult

DELTA_INPUT = "gc_taylor_delta"  # activated_steps[-1] - activated_steps[-2] at a full step


def weight_input(i: int) -> str:
    """The per-step input holding factor i's forecast weight: dist**i, or 0 if it does not exist."""
    return f"gc_taylor_w{i}"


def forecast_weights(dist: int, factors: int, order: int) -> dict[str, int]:
    """Per-step inputs of a forecast from `factors` existing factors, `dist` steps away."""
    return {weight_input(i): dist**i if i < factors else 0 for i in range(1, order + 1)}


def taylor_slot(branch: ir.Branch, i: int) -> str:
    return f"{branch.name}_taylor{i}"


def declare_taylor_slots(gm: fx.GraphModule, branch: ir.Branch, order: int) -> None:
    for i in range(order + 1):
        declare_slot(gm, CacheSlot(taylor_slot(branch, i), like=branch.branch_out))


def scalar_input(gm: fx.GraphModule, name: str) -> fx.Node:
    """The graph input `name` (a per-step Python int), created on first use."""
    return ir.graph_input(gm.graph, name, type_expr=int)


def taylor_forecast(gm: fx.GraphModule, factors: list[fx.Node]) -> fx.Node:
    """Insert Σ_i (1/i!) · factors[i] · w_i at the current insertion point (left to right, the
    official order of operations), w_i the per-step inputs `weight_input(i)`."""
    graph = gm.graph
    out = factors[0]
    for i, factor in enumerate(factors[1:], start=1):
        term = graph.call_function(operator.mul, (1 / math.factorial(i), factor))
        term = graph.call_function(operator.mul, (term, scalar_input(gm, weight_input(i))))
        out = graph.call_function(operator.add, (out, term))
    return out


class InsertTaylorUpdatePass(Pass):
    """After each selected branch's ungated output, refresh its Taylor factors (writes last).

    order: the highest factor kept; every slot 0..order is declared, all `order` differences taken.
    """

    def __init__(self, blocks=None, order: int = 1, kinds=None):
        super().__init__()
        if order < 0:
            raise ValueError(f"order must be >= 0, got {order}")
        self.blocks, self.order, self.kinds = blocks, order, kinds

    def call(self, gm):
        nodes = ir.nodes_by_name(gm.graph)
        graph = gm.graph
        for br in ir.structure_of(gm).select(self.blocks, self.kinds):
            out = nodes.get(br.branch_out)
            if out is None or not out.users:
                self.decline(br.name, "its output is not computed in this variant")
                continue
            declare_taylor_slots(gm, br, self.order)
            delta = scalar_input(gm, DELTA_INPUT) if self.order else None
            with ir.insert_after(out):
                old = [read_slot(graph, taylor_slot(br, i)) for i in range(self.order)]
                new = [out]
                for i in range(self.order):
                    diff = graph.call_function(operator.sub, (new[i], old[i]))
                    new.append(graph.call_function(operator.truediv, (diff, delta)))
                for i, value in enumerate(new):
                    write_slot(graph, taylor_slot(br, i), value)
            self.counters["taylor_read"] += len(old)
            self.counters["derivative"] += self.order
            self.counters["taylor_write"] += len(new)
            self.counters["branch"] += 1
        return PassResult(gm, self.counters["branch"] > 0)


class ReplaceWithTaylorForecastPass(Pass):
    """Replace each selected branch's ungated output by the Taylor forecast of its cached factors
    (order 0: plain reuse, as FORA)."""

    def __init__(self, blocks=None, order: int = 1, kinds=None):
        super().__init__()
        if order < 0:
            raise ValueError(f"order must be >= 0, got {order}")
        self.blocks, self.order, self.kinds = blocks, order, kinds

    def call(self, gm):
        nodes = ir.nodes_by_name(gm.graph)
        graph = gm.graph
        for br in ir.structure_of(gm).select(self.blocks, self.kinds):
            out = nodes.get(br.branch_out)
            if out is None or not out.users:
                self.decline(br.name, "its output is not in this graph")
                continue
            declare_taylor_slots(gm, br, self.order)
            with ir.insert_after(out):
                factors = [read_slot(graph, taylor_slot(br, i)) for i in range(self.order + 1)]
                forecast = taylor_forecast(gm, factors)
            out.replace_all_uses_with(forecast)
            self.counters["taylor_read"] += len(factors)
            self.counters["forecast"] += 1
        return PassResult(gm, self.counters["forecast"] > 0)

    def ensures(self, gm):
        nodes = ir.nodes_by_name(gm.graph)
        for br in ir.structure_of(gm).select(self.blocks, self.kinds):
            out = nodes.get(br.branch_out)
            if out is not None and out.users:
                raise PassError(f"branch {br.name} output {out.name} is still used after its forecast")
