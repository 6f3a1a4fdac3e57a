"""AnnotateBlocksPass: find the residual stream, its blocks and their branches from the graph alone.

A residual add is an add whose one operand (the stream) is an ancestor of the other (the branch's
contribution). The residual stream is the longest chain of such adds, each consuming the previous
one. On each add, a multiply whose one factor depends on the stream and the other does not splits
the contribution into the gate and the ungated branch output — the cut point every method caches.
Nothing here knows DiT's module names: blocks come from the module that owns each residual add
(or, for a model written in one flat forward, from where token-mixing branches start), and a
branch is attention when its work mixes tokens (SDPA, softmax, multi-head attention).
"""

from __future__ import annotations

import networkx as nx
import torch
import torch.fx as fx

from .. import ir
from ..errors import GraphcacheError
from .base import Pass, PassResult

# ops that pass the stream on unchanged (export keeps dropout, with train=False, in eval graphs)
_IDENTITY = {torch.ops.aten.clone.default, torch.ops.aten.contiguous.default, torch.ops.aten.alias.default,
             torch.ops.aten.dropout.default}


class AnnotateBlocksPass(Pass):
    """Writes `gm.meta["graphcache"]` (an ir.Structure) and tags the nodes it classifies."""

    def requires(self, gm):
        missing = [n.name for n in gm.graph.nodes if n.op == "call_function" and "tensor_meta" not in n.meta]
        if len(missing) == len([n for n in gm.graph.nodes if n.op == "call_function"]) and missing:
            raise GraphcacheError("AnnotateBlocksPass needs shapes: run shape propagation first (graphcache.capture does)")

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        dg = ir.to_digraph(graph)
        by_name = ir.nodes_by_name(graph)
        ancestors = _AncestorCache(dg)

        residuals = {}  # add node -> (stream operand, contribution)
        for node in graph.nodes:
            split = _split_residual(node, ancestors)
            if split:
                residuals[node] = split
        chain = _longest_chain(graph, residuals)
        if not chain:
            raise GraphcacheError(_no_stream_message(graph))
        shape = ir.tensor_shape(chain[0])
        if shape is None or len(shape) != 3:
            raise GraphcacheError(
                f"the residual stream at node '{chain[0].name}' has shape {tuple(shape or ())}; "
                "graphcache expects (batch, tokens, channels)"
            )

        branches = []
        for add in chain:
            stream, contribution = residuals[add]
            gate, out = _split_gate(contribution, stream, ancestors)
            between = ancestors(out.name) & nx.descendants(dg, stream.name)
            work = [n.name for n in graph.nodes if n.name in between] + [out.name]
            branches.append(
                ir.Branch(
                    block=-1,
                    index=-1,
                    kind=_classify(work, stream, by_name, ancestors),
                    stream_in=stream.name,
                    branch_out=out.name,
                    gate=gate.name if gate is not None else None,
                    residual_add=add.name,
                    module=ir.module_path(out),
                    work=work,
                )
            )
        blocks = _group_blocks(branches, [ir.module_path(a) for a in chain])
        structure = ir.Structure(
            blocks=blocks,
            stream_start=branches[0].stream_in,
            stream_end=chain[-1].name,
            num_tokens=shape[1],
            hidden_size=shape[2],
            input_names=[n.name for n in graph.nodes if n.op == "placeholder"],
        )
        for block in blocks:
            for br in block.branches:
                info = dict(block=block.index, branch=br.name, kind=br.kind)
                for name in br.work:
                    ir.tag(by_name[name], role="work", **info)
                ir.tag(by_name[br.stream_in], role="stream_in", **info)
                ir.tag(by_name[br.branch_out], role="branch_out", **info)
                ir.tag(by_name[br.residual_add], role="residual_add", **info)
                if br.gate:
                    ir.tag(by_name[br.gate], role="gate", **info)
                self.counters[f"branch.{br.kind}"] += 1
            self.counters["block"] += 1
        gm.meta[ir.META_KEY] = structure
        return PassResult(gm, True)


class _AncestorCache:
    def __init__(self, dg):
        self.dg, self.cache = dg, {}

    def __call__(self, name: str) -> set[str]:
        if name not in self.cache:
            self.cache[name] = nx.ancestors(self.dg, name)
        return self.cache[name]


def _split_residual(node: fx.Node, ancestors) -> tuple[fx.Node, fx.Node] | None:
    if not ir.is_add(node) or len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    shape = ir.tensor_shape(node)
    if shape is None or len(shape) < 3 or ir.tensor_shape(a) != shape:
        return None
    if a.name in ancestors(b.name):
        return a, b
    if b.name in ancestors(a.name) and ir.tensor_shape(b) == shape:
        return b, a
    return None


def _strip_identity(node: fx.Node) -> fx.Node:
    """Follow the stream back through ops that pass it on unchanged (dropout, contiguous, …)."""
    while ir.is_call(node, _IDENTITY):
        node = node.args[0]
    return node


def _longest_chain(graph, residuals) -> list[fx.Node]:
    best: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:  # topological order
        if node in residuals:
            prev = _strip_identity(residuals[node][0])
            best[node] = best.get(prev, []) + [node]
    return max(best.values(), key=len, default=[])


def _split_gate(contribution: fx.Node, stream: fx.Node, ancestors):
    """contribution = gate * out with only `out` depending on the stream; else no gate."""
    if ir.is_mul(contribution) and len(contribution.args) == 2:
        a, b = contribution.args
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            a_dep = stream.name in ancestors(a.name) or a is stream
            b_dep = stream.name in ancestors(b.name) or b is stream
            if a_dep != b_dep:
                return (b, a) if a_dep else (a, b)
    return None, contribution


def _classify(work, stream, by_name, ancestors) -> str:
    for name in work:
        node = by_name[name]
        keys = None
        if ir.is_sdpa(node):
            keys = node.args[1] if len(node.args) > 1 else node.kwargs.get("key")
        elif ir.is_call(node, ir.SOFTMAX_TARGETS):
            keys = _logits_keys(node, stream, ancestors)
            if keys is None:
                return ir.ATTENTION
        if keys is not None:
            from_stream = isinstance(keys, fx.Node) and (keys is stream or stream.name in ancestors(keys.name))
            return ir.ATTENTION if from_stream else ir.CROSS_ATTENTION
    return ir.MLP


def _logits_keys(softmax: fx.Node, stream: fx.Node, ancestors) -> fx.Node | None:
    """For an explicit softmax(q @ k^T ...): the matmul operand that does not come from the stream
    (the keys of a cross-attention), else the second operand; None if no matmul feeds the softmax.
    The nearest matmul upstream of the softmax (breadth first) computes the attention logits."""
    queue, seen = [softmax.args[0]] if softmax.args and isinstance(softmax.args[0], fx.Node) else [], set()
    while queue:
        node = queue.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if ir.is_call(node, ir.MATMUL_TARGETS):
            operands = [a for a in ir.flat_inputs(node) if a.op != "get_attr"]
            foreign = [a for a in operands if a is not stream and stream.name not in ancestors(a.name)]
            return foreign[0] if foreign else (operands[-1] if operands else None)
        queue.extend(node.all_input_nodes)
    return None


def _group_blocks(branches: list[ir.Branch], owners: list[str]) -> list[ir.Block]:
    """Consecutive residual adds owned by the same module form a block; adds written at the top
    level of a flat forward are grouped so that each self-attention branch starts a new block."""
    groups: list[list[int]] = []
    for i, (br, owner) in enumerate(zip(branches, owners)):
        new = not groups or (owner != owners[groups[-1][-1]] if owner else br.kind == ir.ATTENTION)
        if new:
            groups.append([i])
        else:
            groups[-1].append(i)
    blocks = []
    for b, members in enumerate(groups):
        counts: dict[str, int] = {}
        for j, i in enumerate(members):
            br = branches[i]
            br.block, br.index = b, j
            counts[br.kind] = counts.get(br.kind, 0) + 1
            br.name = f"b{b}_{br.kind}" + (str(counts[br.kind] - 1) if counts[br.kind] > 1 else "")
        blocks.append(
            ir.Block(
                index=b,
                stream_in=branches[members[0]].stream_in,
                stream_out=branches[members[-1]].residual_add,
                module=owners[members[0]],
                branches=[branches[i] for i in members],
            )
        )
    return blocks


def _no_stream_message(graph: fx.Graph) -> str:
    """Walk back from the output along the main data path and name where discovery stopped."""
    output = next(n for n in graph.nodes if n.op == "output")
    node = output.args[0] if isinstance(output.args[0], fx.Node) else None
    last = output
    while node is not None:
        last = node
        inputs = [n for n in node.all_input_nodes if ir.tensor_shape(n) is not None and n.op != "get_attr"]
        if not inputs:
            break
        node = max(inputs, key=lambda n: ir.tensor_shape(n).numel())
    return (
        "no residual stream found: no add of the form x + f(x) with a (batch, tokens, channels) "
        f"stream; discovery stopped at node '{last.name}' ({last.op} {getattr(last.target, '__name__', last.target)})"
        " walking back from the output"
    )
