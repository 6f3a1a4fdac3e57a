"""HoistConditioningPass: move the work that depends only on the conditioning out of the variant.

A DiT's adaLN modulation is a function of (t, y) alone, yet every step recomputes it, and on a
CPU that is a memory-bound GEMV per block (32 MB of weights per DiT-XL block):
it reads a third of the model's weights to produce a few vectors. The sampler knows every step's
(t, y) before the first step, so the runtime can compute all steps' modulations in one batched
GEMM per block — reading each weight once per run instead of once per step.

This pass finds the nodes whose value depends on the conditioning inputs only (not on the latent,
the cache, per-step token counts or random draws), moves them into a separate GraphModule over the
same root (`gm.meta[CONDITIONING_KEY]`, a `Conditioning`), and turns each value the rest of the
graph reads from them into a graph input `gc_condition_<node>`. The runtime either evaluates the
conditioning graph once on every step's inputs stacked along the batch (graphcache/runtime.py:
`CachedModel.announce_inputs`), or once per step when the inputs were not announced.

It declines, leaving the graph unchanged, when a hoisted value is not a tensor whose first
dimension is the batch: stacking steps along the batch would then be meaningless.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.fx as fx

from .. import ir
from ..cache import CACHE_ATTR
from ..ops import RANDOM_FUNCTIONS
from .base import Pass, PassResult

CONDITIONING_KEY = "graphcache_conditioning"
INPUT_PREFIX = "gc_condition_"

_CONST, _COND, _VARYING = "const", "cond", "varying"


@dataclass
class Conditioning:
    """What a variant reads from its conditioning: `graph(*inputs) -> tuple` of the values the
    variant takes as the graph inputs `names` (in that order), all batch-first."""

    graph: fx.GraphModule
    inputs: tuple[int, ...]  # positions of the conditioning inputs in the model's forward signature
    names: tuple[str, ...]
    row_bytes: int  # memory of the values for one batch row (the runtime sizes its tables by it)

    def values(self, args) -> dict:
        """The graph inputs `names` -> values for the model's positional inputs `args`."""
        return dict(zip(self.names, self.graph(*(args[p] for p in self.inputs))))


def conditioning_inputs(captured: fx.GraphModule) -> dict[str, int]:
    """The captured model's inputs that do not feed its residual stream (t, y), by name, with
    their positions in the forward signature."""
    placeholders = [n for n in captured.graph.nodes if n.op == "placeholder"]
    stream = ir.nodes_by_name(captured.graph)[ir.structure_of(captured).stream_start]
    latents = ir.upstream(stream)
    return {n.target: i for i, n in enumerate(placeholders) if n not in latents}


class HoistConditioningPass(Pass):
    def __init__(self, conditions: dict[str, int]):
        """`conditions`: the conditioning inputs (`conditioning_inputs` of the captured model)."""
        super().__init__()
        self.conditions = dict(conditions)

    def call(self, gm):
        graph = gm.graph
        if not self.conditions:
            self.decline("inputs", "every model input feeds the residual stream")
            return PassResult(gm, False)
        kind = {}
        for node in graph.nodes:
            kind[node] = _classify(node, kind, self.conditions)
        # Tensors only: shapes, dtypes and devices read from t or y are free and stay in the variant
        frontier = [n for n in graph.nodes if kind[n] == _COND and ir.tensor_shape(n) is not None
                    and any(kind[u] == _VARYING for u in n.users)]
        if not frontier:
            self.decline("conditioning", "nothing outside the conditioning reads a tensor computed from it")
            return PassResult(gm, False)
        nodes = ir.nodes_by_name(graph)
        batch = {ir.tensor_shape(nodes[name])[:1] for name in self.conditions if name in nodes}
        for node in frontier:
            if len(batch) != 1 or ir.tensor_shape(node)[:1] not in batch:
                self.decline(node.name, "a value computed from the conditioning is not batch-first: "
                                        "steps cannot be stacked along the batch")
                return PassResult(gm, False)

        gm.meta[CONDITIONING_KEY] = Conditioning(
            graph=_extract(gm, frontier, list(self.conditions)),
            inputs=tuple(self.conditions.values()),
            names=tuple(INPUT_PREFIX + n.name for n in frontier),
            row_bytes=sum(math.prod(n.meta["tensor_meta"].shape[1:]) * n.meta["tensor_meta"].dtype.itemsize
                          for n in frontier),
        )
        for node in frontier:
            value = ir.graph_input(graph, INPUT_PREFIX + node.name)
            value.meta = dict(node.meta)
            node.replace_all_uses_with(value)  # its conditioning users die with it
            self.counters["hoisted_values"] += 1
        ir.eliminate_dead_code(graph)
        self.counters["hoisted_nodes"] = sum(1 for n in gm.meta[CONDITIONING_KEY].graph.graph.nodes
                                             if n.op not in ("placeholder", "output"))
        return PassResult(gm, True)


def _classify(node: fx.Node, kind: dict, conditions) -> str:
    """const: the same every call (parameters, constants); cond: a function of the conditioning
    inputs and constants only; varying: everything else."""
    if node.op == "placeholder":
        return _COND if node.target in conditions else _VARYING
    if node.op == "get_attr":
        return _VARYING if node.target.startswith(CACHE_ATTR) else _CONST
    if node.op == "output" or node.is_impure() or node.target in RANDOM_FUNCTIONS:
        return _VARYING
    inputs = {kind[n] for n in node.all_input_nodes}
    if _VARYING in inputs:
        return _VARYING
    return _COND if _COND in inputs else _CONST


def _extract(gm: fx.GraphModule, frontier: list[fx.Node], conditions: list[str]) -> fx.GraphModule:
    """A GraphModule over `gm`'s root computing `frontier` from the conditioning inputs."""
    needed = ir.upstream(frontier)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    for name in conditions:  # every conditioning input, in signature order, used or not
        node = graph.placeholder(name)
        if name in placeholders:
            env[placeholders[name]] = node
    for node in gm.graph.nodes:
        if node in needed and node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[n] for n in frontier))
    return fx.GraphModule(gm, graph, class_name="Conditioning")

