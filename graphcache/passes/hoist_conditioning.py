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

When a hoisted value is not a tensor whose first dimension is the batch (PixArt-α's attention
mask repeated per head), stacking steps along the batch would be meaningless: the conditioning is
then `stackable=False` and evaluated step by step. Either way, the values that depend only on
inputs a run passes unchanged at every step (a pipeline's prompt embeddings) are computed once per
run (`ConditioningPart`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from .. import ir
from ..cache import CACHE_ATTR
from ..ops import RANDOM_FUNCTIONS
from .base import Pass, PassResult

CONDITIONING_KEY = "graphcache_conditioning"
INPUT_PREFIX = "gc_condition_"

_CONST, _COND, _VARYING = "const", "cond", "varying"


def _versions(tensors) -> tuple | None:
    """The in-place version counters of `tensors`; None when one has none (an inference-mode tensor)."""
    try:
        return tuple(t._version if isinstance(t, torch.Tensor) else None for t in tensors)
    except RuntimeError:
        return None


@dataclass(eq=False)
class ConditioningPart:
    """The hoisted values that depend on one set of conditioning inputs: `graph(*inputs) -> tuple`
    of the values named `names`.

    A part whose inputs are the very tensors of its last evaluation, unchanged since (no in-place
    write), returns that evaluation's values: a pipeline passes the same prompt embeddings at every
    step of a run, and what depends on them alone — PixArt-α's caption projection and the keys and
    values of every cross-attention — is then computed once per run, not once per step. `forget()`
    drops the memo (the runtime does at every new run: weights may have changed in between)."""

    graph: fx.GraphModule
    inputs: tuple[int, ...]  # positions in the model's forward signature
    names: tuple[str, ...]
    memo: tuple | None = None  # (input tensors, their versions, values)

    def values(self, args) -> dict:
        given = tuple(args[p] for p in self.inputs)
        versions = _versions(given)
        memo = self.memo
        if (memo is not None and versions is not None and versions == memo[1]
                and all(a is b for a, b in zip(given, memo[0]))):
            return memo[2]
        values = dict(zip(self.names, self.graph(*given)))
        self.memo = (given, versions, values) if versions is not None else None
        return values

    def forget(self) -> None:
        self.memo = None


@dataclass
class Conditioning:
    """What a variant reads from its conditioning: `graph(*inputs) -> tuple` of the values the
    variant takes as the graph inputs `names` (in that order), all batch-first; `parts`, the same
    values grouped by the inputs they depend on."""

    graph: fx.GraphModule
    inputs: tuple[int, ...]  # positions of the conditioning inputs in the model's forward signature
    names: tuple[str, ...]
    row_bytes: int  # memory of the values for one batch row (the runtime sizes its tables by it)
    parts: tuple[ConditioningPart, ...]
    # whether every value is batch-first, so that steps can be stacked along the batch (a
    # per-head attention mask, (batch * heads, ...), is not: such a conditioning runs step by step)
    stackable: bool

    def values(self, args) -> dict:
        """The graph inputs `names` -> values for the model's positional inputs `args`."""
        values = {}
        for part in self.parts:
            values.update(part.values(args))
        return values

    def forget(self) -> None:
        for part in self.parts:
            part.forget()


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
        # A size of another input that is a size of a conditioning input too (PixArt-α reshapes the
        # caption by the latent's batch) is read off the conditioning input: the values it shapes
        # stay hoistable
        sizes: dict[str, list[tuple[str, int]]] = {}
        for node in graph.nodes:
            if node.op == "placeholder" and node.target in self.conditions:
                for dim, symbol in enumerate(node.meta.get(ir.DIM_SYMBOLS, ())):
                    if symbol is not None:
                        sizes.setdefault(symbol, []).append((node.target, dim))
        kind = {}
        for node in graph.nodes:
            kind[node] = _classify(node, kind, self.conditions, sizes)
        # Tensors only: shapes, dtypes and devices read from t or y are free and stay in the variant
        frontier = [n for n in graph.nodes if kind[n] == _COND and ir.tensor_shape(n) is not None
                    and any(kind[u] == _VARYING for u in n.users)]
        if not frontier:
            self.decline("conditioning", "nothing outside the conditioning reads a tensor computed from it")
            return PassResult(gm, False)
        nodes = ir.nodes_by_name(graph)
        batch = {ir.tensor_shape(nodes[name])[:1] for name in self.conditions if name in nodes}
        unstackable = [n for n in frontier if len(batch) != 1 or ir.tensor_shape(n)[:1] not in batch]
        self.counters["unstackable_values"] = len(unstackable)

        gm.meta[CONDITIONING_KEY] = Conditioning(
            graph=_extract(gm, frontier, list(self.conditions), sizes),
            inputs=tuple(self.conditions.values()),
            names=tuple(INPUT_PREFIX + n.name for n in frontier),
            row_bytes=sum(math.prod(n.meta["tensor_meta"].shape[1:]) * n.meta["tensor_meta"].dtype.itemsize
                          for n in frontier),
            parts=self._parts(gm, frontier, sizes),
            stackable=not unstackable,
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


    def _parts(self, gm: fx.GraphModule, frontier: list[fx.Node], sizes: dict) -> tuple[ConditioningPart, ...]:
        """`frontier` grouped by the conditioning inputs each value depends on (a size read off
        another input comes from one of them if it can, else from the first that has it)."""
        groups: dict[tuple[str, ...], list[fx.Node]] = {}
        for node in frontier:
            upstream = ir.upstream([node])
            uses = {n.target for n in upstream if n.op == "placeholder" and n.target in self.conditions}
            for n in upstream:
                sources = sizes.get(n.meta.get(ir.SIZE_SYMBOL), []) if _is_size_of_other(n, self.conditions) else []
                if sources and not any(name in uses for name, _ in sources):
                    uses.add(sources[0][0])
            groups.setdefault(tuple(name for name in self.conditions if name in uses), []).append(node)
        return tuple(ConditioningPart(graph=_extract(gm, nodes, list(names), sizes),
                                      inputs=tuple(self.conditions[name] for name in names),
                                      names=tuple(INPUT_PREFIX + n.name for n in nodes))
                     for names, nodes in groups.items())


def _is_size_of_other(node: fx.Node, conditions) -> bool:
    """A `sym_size` of a model input that is not a conditioning input."""
    source = node.args[0] if node.target is ir.SYM_SIZE else None
    return isinstance(source, fx.Node) and source.op == "placeholder" and source.target not in conditions


def _classify(node: fx.Node, kind: dict, conditions, sizes: dict) -> str:
    """const: the same every call (parameters, constants); cond: a function of the conditioning
    inputs and constants only; varying: everything else."""
    if _is_size_of_other(node, conditions) and node.meta.get(ir.SIZE_SYMBOL) in sizes:
        return _COND
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


def _extract(gm: fx.GraphModule, frontier: list[fx.Node], conditions: list[str], sizes: dict) -> fx.GraphModule:
    """A GraphModule over `gm`'s root computing `frontier` from the conditioning inputs
    `conditions`; a size of another input is read off one of them (`sizes`: symbol -> (input, dim))."""
    needed = ir.upstream(frontier)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    for name in conditions:  # every conditioning input, in signature order, used or not
        node = graph.placeholder(name)
        if name in placeholders:
            env[placeholders[name]] = node
    for node in gm.graph.nodes:
        if node not in needed or node.op == "placeholder":
            continue
        if _is_size_of_other(node, conditions):
            name, dim = next((n, d) for n, d in sizes[node.meta[ir.SIZE_SYMBOL]] if n in conditions)
            env[node] = graph.call_function(ir.SYM_SIZE, (env[placeholders[name]], dim))
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[n] for n in frontier))
    return fx.GraphModule(gm, graph, class_name="Conditioning")

