"""TaylorSeer's rewrites: keep Taylor factors of every branch output, forecast them in between.

The cache of a branch is a list of factors `{0: F, 1: dF, 2: d²F, ...}` (METHODS.md §6.3), one
slot each, `"{branch.name}_taylor{i}"` for i = 0..order:

* at a full step (`InsertTaylorUpdatePass`) the branch computes F and the factors are refreshed by
  finite differences against the previous full step's factors,

      new[0] = F,   new[i+1] = (new[i] - old[i]) / d   for i < m,

  where d = activated_steps[-1] - activated_steps[-2] (negative: steps count down) is a per-step
  input and m, the number of differences taken, is static for the variant (the schedule knows it);
* at a forecast step (`ReplaceWithTaylorForecastPass`) the branch output is replaced by

      F̂ = Σ_{i < n} (1/i!) · new[i] · dist^i,   dist = s - activated_steps[-1] (negative),

  with the number of factors n static and dist a per-step input. The current adaLN gate still
  multiplies the forecast, as for every cache read.

Per-step scalars are graph placeholders (Python ints at run time) named by `DELTA_INPUT` and
`DIST_INPUT`; the schedule puts them in `StepPlan.inputs`.
"""

from __future__ import annotations

import math
import operator

import torch.fx as fx

from .. import ir
from ..cache import CacheSlot, declare_slot, read_slot, write_slot
from .base import Pass, PassError, PassResult

DELTA_INPUT = "gc_taylor_delta"  # activated_steps[-1] - activated_steps[-2] at a full step
DIST_INPUT = "gc_taylor_dist"  # s - activated_steps[-1] at a forecast step


def taylor_slot(branch: ir.Branch, i: int) -> str:
    return f"{branch.name}_taylor{i}"


def declare_taylor_slots(gm: fx.GraphModule, branch: ir.Branch, order: int) -> None:
    for i in range(order + 1):
        declare_slot(gm, CacheSlot(taylor_slot(branch, i), like=branch.branch_out))


def scalar_input(gm: fx.GraphModule, name: str) -> fx.Node:
    """The graph input `name` (a per-step Python int), created on first use."""
    return ir.graph_input(gm.graph, name, type_expr=int)


def taylor_forecast(graph: fx.Graph, factors: list[fx.Node], dist: fx.Node) -> fx.Node:
    """Insert Σ_i (1/i!) · factors[i] · dist**i at the current insertion point (left to right)."""
    out = factors[0]
    for i, factor in enumerate(factors[1:], start=1):
        term = graph.call_function(operator.mul, (1 / math.factorial(i), factor))
        power = graph.call_function(operator.pow, (dist, i))
        term = graph.call_function(operator.mul, (term, power))
        out = graph.call_function(operator.add, (out, term))
    return out


class InsertTaylorUpdatePass(Pass):
    """After each selected branch's ungated output, refresh its Taylor factors (writes last).

    derivatives: m, how many finite differences this variant takes (0 <= m <= order).
    order: the highest factor kept; every slot 0..order is declared so all variants agree.
    """

    def __init__(self, blocks=None, derivatives: int = 0, order: int = 1, kinds=None):
        super().__init__()
        if not 0 <= derivatives <= order:
            raise ValueError(f"derivatives must be in 0..order ({order}), got {derivatives}")
        self.blocks, self.derivatives, self.order, self.kinds = blocks, derivatives, order, kinds

    def call(self, gm):
        nodes = ir.nodes_by_name(gm.graph)
        graph = gm.graph
        for br in ir.structure_of(gm).select(self.blocks, self.kinds):
            out = nodes.get(br.branch_out)
            if out is None or not out.users:
                self.decline(br.name, "its output is not computed in this variant")
                continue
            declare_taylor_slots(gm, br, self.order)
            delta = scalar_input(gm, DELTA_INPUT) if self.derivatives else None
            with ir.insert_after(out):
                old = [read_slot(graph, taylor_slot(br, i)) for i in range(self.derivatives)]
                new = [out]
                for i in range(self.derivatives):
                    diff = graph.call_function(operator.sub, (new[i], old[i]))
                    new.append(graph.call_function(operator.truediv, (diff, delta)))
                for i, value in enumerate(new):
                    write_slot(graph, taylor_slot(br, i), value)
            self.counters["taylor_read"] += len(old)
            self.counters["derivative"] += self.derivatives
            self.counters["taylor_write"] += len(new)
            self.counters["branch"] += 1
        return PassResult(gm, self.counters["branch"] > 0)


class ReplaceWithTaylorForecastPass(Pass):
    """Replace each selected branch's ungated output by the Taylor forecast of its cached factors.

    factors: n, how many factors the last full step left (1 = plain reuse, as FORA).
    """

    def __init__(self, blocks=None, factors: int = 1, order: int | None = None, kinds=None):
        super().__init__()
        order = factors - 1 if order is None else order
        if not 1 <= factors <= order + 1:
            raise ValueError(f"factors must be in 1..order+1 ({order + 1}), got {factors}")
        self.blocks, self.factors, self.order, self.kinds = blocks, factors, order, kinds

    def call(self, gm):
        nodes = ir.nodes_by_name(gm.graph)
        graph = gm.graph
        for br in ir.structure_of(gm).select(self.blocks, self.kinds):
            out = nodes.get(br.branch_out)
            if out is None or not out.users:
                self.decline(br.name, "its output is not in this graph")
                continue
            declare_taylor_slots(gm, br, self.order)
            dist = scalar_input(gm, DIST_INPUT) if self.factors > 1 else None
            with ir.insert_after(out):
                factors = [read_slot(graph, taylor_slot(br, i)) for i in range(self.factors)]
                forecast = taylor_forecast(graph, factors, dist)
            out.replace_all_uses_with(forecast)
            self.counters["taylor_read"] += self.factors
            self.counters["forecast"] += 1
        return PassResult(gm, self.counters["forecast"] > 0)

    def ensures(self, gm):
        nodes = ir.nodes_by_name(gm.graph)
        for br in ir.structure_of(gm).select(self.blocks, self.kinds):
            out = nodes.get(br.branch_out)
            if out is not None and out.users:
                raise PassError(f"branch {br.name} output {out.name} is still used after its forecast")
