"""TaylorSeer's rewrites: keep Taylor factors of every branch output, forecast them in between.

The cache of a branch is a list of factors `{0: F, 1: dF, 2: d²F, ...}` (TaylorSeer, arXiv
2503.06923; Shenyi-Z/Cache4Diffusion `dit/clusca-dit/taylor_utils/__init__.py`), one slot each,
`"{branch.name}_taylor{i}"` for i = 0..order:

* at a full step (`InsertTaylorUpdatePass`) the branch computes F and the factors are refreshed by
  finite differences against the previous full step's factors,

      new[0] = F,   new[i+1] = (new[i] - old[i]) / d   for i < order,

  where d = activated_steps[-1] - activated_steps[-2] (negative: steps count down) is a per-step
  input;
* at a forecast step (`ReplaceWithTaylorForecastPass`) the branch output is replaced by

      F̂ = new[0] + Σ_{i>=1} c_i · new[i],   c_i = dist^i / i! for the factors that exist, else 0,

  dist = s - activated_steps[-1] (negative) and the c_i per-step inputs. The current adaLN gate
  still multiplies the forecast, as for every cache read.

The official code evaluates each term as `(1/i!) · new[i] · w_i` and adds it: three elementwise
passes and three new tensors per factor. Here the coefficient is one host-side number and eager
adds each term in place in one pass (`evaluate_taylor`), equal to float rounding (a few ulps of
each term): one pass over memory and no new tensor per factor, which matters because a forecast
step is nothing but such elementwise work.

How many factors exist is data, not graph: the official cache holds m + 1 factors after a full
step that took m differences (m grows by one per full step up to `order`), and only those enter
its forecasts. Here every full step takes all `order` differences and every forecast reads all
`order + 1` factors, with c_i = 0 for the ones the official cache lacks: `0 · finite = 0` and
`x + 0 = x`, so the result is bit-identical to leaving the term out, and one full variant and one
forecast variant serve a whole run (instead of one per m — fewer graphs to compile and export).
The differences beyond m are finite leftovers that nothing weights before a later full step
overwrites them with real ones (it reads only old[i] for i < m' <= m + 1). The first full step of
a run has no previous factors: its d input is 1 (any non-zero value keeps the leftovers finite).

Per-step scalars are graph placeholders (Python numbers at run time, 0-d tensors in the exported
graphs) named by `DELTA_INPUT` and `coefficient_input(i)`; the schedule puts them in
`StepPlan.inputs` (`forecast_coefficients`).
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch import Tensor

from .. import ir
from ..cache import CACHE_ATTR, CacheSlot, declare_slot, read_slot, slot_name, write_slot
from ..ops import copy_into_
from .base import BranchPass, Pass, PassResult
from .cache_kernels import require_cache_kernels

DELTA_INPUT = "gc_taylor_delta"  # activated_steps[-1] - activated_steps[-2] at a full step


def coefficient_input(i: int) -> str:
    """The per-step input holding factor i's forecast coefficient: dist**i / i!, or 0 if it does
    not exist."""
    return f"gc_taylor_c{i}"


def forecast_coefficients(dist: int, factors: int, order: int) -> dict[str, float]:
    """Per-step inputs of a forecast from `factors` existing factors, `dist` steps away (floats
    throughout, zeros included: an exported graph takes them as float32 0-d tensors)."""
    return {coefficient_input(i): dist**i / math.factorial(i) if i < factors else 0.0
            for i in range(1, order + 1)}


def taylor_slot(branch: ir.Branch, i: int) -> str:
    return f"{branch.name}_taylor{i}"


def declare_taylor_slots(gm: fx.GraphModule, branch: ir.Branch, order: int) -> None:
    for i in range(order + 1):
        declare_slot(gm, CacheSlot(taylor_slot(branch, i), like=branch.branch_out))


def scalar_input(gm: fx.GraphModule, name: str, type_expr: type = int) -> fx.Node:
    """The graph input `name` (a per-step Python number), created on first use."""
    return ir.graph_input(gm.graph, name, type_expr=type_expr)


def finite_difference(new: Tensor, old: Tensor, d) -> Tensor:
    """(new - old) / d, the division done in place on the difference: one new tensor instead of
    two (the same two roundings as the official code)."""
    return torch.sub(new, old).div_(d)


def update_taylor_factors_(cache: torch.nn.Module, slots: tuple[str, ...], value: Tensor, delta) -> None:
    """Refresh one branch's factors (`slots`: factor 0..order) in place, with the values of the
    finite differences and cache writes it replaces: each difference is computed into the buffer of
    the old factor it consumes, then the buffers move up one slot (the cache's attribute names are
    rebound) and the highest factor's old buffer, read by nobody, takes the copy of `value`.

    (old - new) / -d equals (new - old) / d bit for bit (IEEE negation is exact), so this costs one
    copy and no new tensor instead of `order` new tensors and `order + 1` copies."""
    *consumed, spare = (getattr(cache, name) for name in slots)
    new = value
    for buffer in consumed:
        new = buffer.sub_(new).div_(-delta)
    copy_into_(spare, value)
    for name, buffer in zip(slots, (spare, *consumed)):
        setattr(cache, name, buffer)


def evaluate_taylor(factors: tuple[Tensor, ...], coefficients: tuple) -> Tensor:
    """factors[0] + Σ_{i>=1} coefficients[i-1] · factors[i].

    Eager (Python-number coefficients): one new tensor, each term added in place in one pass, the
    zero terms skipped (adding them is exact anyway). Traced (0-d tensor coefficients, every
    exporter): one expression that a compiler fuses into a single kernel."""
    head, *rest = factors
    if any(isinstance(c, Tensor) for c in coefficients):
        out = head
        for factor, c in zip(rest, coefficients):
            out = out + factor * c
        return out
    out = None
    for factor, c in zip(rest, coefficients):
        if c:
            out = torch.add(head, factor, alpha=c) if out is None else out.add_(factor, alpha=c)
    return head if out is None else out


def taylor_forecast(gm: fx.GraphModule, factors: list[fx.Node]) -> fx.Node:
    """Insert the forecast from `factors` (0..order) at the current insertion point, with the
    per-step inputs `coefficient_input(i)`."""
    if len(factors) == 1:
        return factors[0]
    coefficients = tuple(scalar_input(gm, coefficient_input(i), float) for i in range(1, len(factors)))
    return gm.graph.call_function(evaluate_taylor, (tuple(factors), coefficients))


class TaylorBranchPass(BranchPass):
    """A BranchPass that keeps Taylor factors 0..`order` of each branch."""

    def __init__(self, blocks=None, order: int = 1, kinds=None):
        super().__init__(blocks, kinds)
        if order < 0:
            raise ValueError(f"order must be >= 0, got {order}")
        self.order = order


class InsertTaylorUpdatePass(TaylorBranchPass):
    """After each selected branch's ungated output, refresh its Taylor factors (writes last).

    order: the highest factor kept; every slot 0..order is declared, all `order` differences taken.
    """

    def call(self, gm):
        graph = gm.graph
        for br, out in self.branches(gm):
            if out is None or not out.users:
                self.decline(br.name, "its output is not computed in this variant")
                continue
            declare_taylor_slots(gm, br, self.order)
            delta = scalar_input(gm, DELTA_INPUT) if self.order else None
            with ir.insert_after(out):
                old = [read_slot(graph, taylor_slot(br, i)) for i in range(self.order)]
                new = [out]
                for i in range(self.order):
                    new.append(graph.call_function(finite_difference, (new[i], old[i], delta)))
                for i, value in enumerate(new):
                    write_slot(graph, taylor_slot(br, i), value)
            self.count("taylor_read", br, len(old))
            self.count("derivative", br, self.order)
            self.count("taylor_write", br, len(new))
            self.count("branch", br)
        return PassResult(gm, self.counters["branch"] > 0)


class ReplaceWithTaylorForecastPass(TaylorBranchPass):
    """Replace each selected branch's ungated output by the Taylor forecast of its cached factors
    (order 0: plain reuse, as FORA)."""

    def call(self, gm):
        graph = gm.graph
        for br, out in self.branches(gm):
            if out is None or not out.users:
                self.decline(br.name, "its output is not in this graph")
                continue
            declare_taylor_slots(gm, br, self.order)
            with ir.insert_after(out):
                factors = [read_slot(graph, taylor_slot(br, i)) for i in range(self.order + 1)]
                forecast = taylor_forecast(gm, factors)
            out.replace_all_uses_with(forecast)
            self.count("taylor_read", br, len(factors))
            self.count("forecast", br)
        return PassResult(gm, self.counters["forecast"] > 0)

    def ensures(self, gm):
        self.check_replaced(gm, "its forecast")


class UpdateTaylorFactorsInPlacePass(Pass):
    """Each branch's refresh as InsertTaylorUpdatePass writes it (the chain of finite differences
    from the branch output, and one cache write per factor) becomes one `update_taylor_factors_`
    call, at the last write. For eager runners only (exporters/eager.py `eager_runner`, after the
    cache writes became `copy_into_`): the variants keep the functional differences that compile
    and the exporters trace. At DiT-XL/2 size the functional refresh of a full step (56 branches,
    order 4) allocates 224 tensors of 2.4 MB and copies 280.

    It declines a chain whose nodes anything else reads, or whose slots another node reads or writes
    before the last write (the buffers then hold other values than the variant's).
    """

    def requires(self, gm):
        # it matches the refresh's writes as kernel calls: on the cache ops it would find none
        require_cache_kernels(gm, self.name)

    def call(self, gm):
        graph = gm.graph
        position = {node: i for i, node in enumerate(graph.nodes)}
        heads = [n for n in graph.nodes if _is_difference(n) and not _is_difference(n.args[0])]
        for head in heads:
            chain = _refresh_chain(head)
            if isinstance(chain, str):
                self.decline(head.name, chain)
                continue
            slots, writes, removed = chain
            first = min(position[n] for n in removed)
            last = max(writes, key=position.__getitem__)
            clash = [n for n in graph.nodes if slot_name(n) in slots and n not in removed
                     and position[n] < position[last] and any(position[u] >= first for u in n.users)]
            if clash:
                self.decline(head.name, f"{clash[0].name} reads a factor slot while it is refreshed")
                continue
            with graph.inserting_before(last):
                cache = graph.get_attr(CACHE_ATTR)
                graph.call_function(update_taylor_factors_, (cache, slots, head.args[0], head.args[2]))
            for node in sorted(removed, key=position.__getitem__, reverse=True):
                graph.erase_node(node)
            self.counters["branch"] += 1
            self.counters["difference"] += len(slots) - 1
        gm.recompile()
        return PassResult(gm, bool(self.counters))


def _is_difference(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is finite_difference


def _refresh_chain(head: fx.Node):
    """(slots, writes, nodes to remove) of the refresh starting at `head`, or why it is not one."""
    differences = [head]
    while nxt := [u for u in differences[-1].users if _is_difference(u)]:
        differences.append(nxt[0])
    values = [head.args[0], *differences]
    writes = []
    for value in values:
        found = [u for u in value.users if u.op == "call_function" and u.target is copy_into_ and u.args[1] is value]
        if len(found) != 1 or slot_name(found[0].args[0]) is None:
            return f"{value.name} is not written to one cache slot"
        writes.append(found[0])
    slots = tuple(slot_name(w.args[0]) for w in writes)
    reads = [d.args[1] for d in differences]
    if [slot_name(r) for r in reads] != list(slots[:-1]) or len(set(slots)) != len(slots):
        return "its differences do not consume the factors it writes, each once"
    if len({d.args[2] for d in differences}) != 1:
        return "its differences divide by different step distances"
    for i, d in enumerate(differences):
        expected = {writes[i + 1], *differences[i + 1:i + 2]}
        if set(d.users) != expected or list(reads[i].users) != [d]:
            return f"{d.name} or the factor it reads has another reader"
    if any(w.users or list(w.args[0].users) != [w] for w in writes):
        return "a write's result or its slot read is used elsewhere"
    return slots, writes, [*differences, *reads, *writes, *(w.args[0] for w in writes)]
