"""InsertTokenSelectPass: compute a token-local branch on k selected tokens only.

For each selected branch, the pass inserts (just before the branch output's first use):

    idx   = selector.indices(...)                       # (B, k) token indices, method-specific
    x_k   = gather_tokens(stream_in, idx)               # (B, k, C)
    y_k   = <the branch's own work, cloned, on x_k>     # (B, k, C): norm, modulation, MLP, …
    new   = merger.merge(..., idx, y_k)                 # (B, N, C), method-specific (scatter, …)

and routes every use of the branch output to `new`; dead-code elimination then removes the
full-width work. Gather-first is exact only if every op between the stream and the branch output
treats tokens independently (per-token norm, modulation broadcast over tokens, linear layers,
pointwise activations). The pass proves that on the graph and declines the branch otherwise,
naming the op that mixes tokens.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from .. import ir
from ..ops import gather_tokens
from ..schedule import tokens_input
from .base import Pass, PassResult

aten = torch.ops.aten
# operators that treat tokens independently (each token's output reads only that token's row);
# the torch-level ones are what passes insert
_LOCAL_OPERATORS = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default,
    aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar, aten.rsub.Scalar, aten.pow.Tensor_Scalar,
    aten.tanh.default, aten.sigmoid.default, aten.exp.default, aten.rsqrt.default, aten.sqrt.default,
    aten.gelu.default, aten.silu.default, aten.relu.default, aten.mish.default, aten.clamp.default,
    aten.linear.default, aten.dropout.default, aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default,
    aten.type_as.default, aten.contiguous.default, aten.clone.default, aten.alias.default,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, torch.add, torch.sub, torch.mul,
    F.linear,
}
# normalisations over the channel axis only: local when normalized_shape has one entry
_CHANNEL_NORMS = {aten.layer_norm.default, aten.rms_norm.default, F.layer_norm}


@dataclass
class SelectContext:
    """What a selector/merger may use: the graph, the branch, its nodes, and the token count."""

    gm: fx.GraphModule
    branch: ir.Branch
    stream_in: fx.Node
    branch_out: fx.Node

    def tokens(self) -> fx.Node:
        """The graph input carrying this block's fresh-token count (created on first use)."""
        return ir.graph_input(self.gm.graph, tokens_input(self.branch.block), type_expr=int)


class TokenSelector:
    def indices(self, ctx: SelectContext) -> fx.Node:
        """Insert nodes computing (B, k) int64 indices at the current insertion point."""
        raise NotImplementedError


class TokenMerger:
    def merge(self, ctx: SelectContext, idx: fx.Node, fresh: fx.Node) -> fx.Node:
        """Insert nodes producing the (B, N, C) value that replaces the branch output."""
        raise NotImplementedError


def token_locality_problem(gm: fx.GraphModule, branch: ir.Branch) -> str | None:
    """None if the branch treats tokens independently, else why not (naming the node)."""
    nodes = ir.nodes_by_name(gm.graph)
    on_path = set(branch.work) | {branch.stream_in}
    n_tokens = ir.tensor_shape(nodes[branch.stream_in])[1]
    for name in branch.work:
        node = nodes[name]
        shape = ir.tensor_shape(node)
        if shape is None or len(shape) < 2 or shape[1] != n_tokens:
            return f"node {name} changes the token axis (shape {tuple(shape or ())})"
        ok = node.op == "call_function" and (node.target in _LOCAL_OPERATORS or (
            node.target in _CHANNEL_NORMS and len(node.args) > 1 and len(node.args[1]) == 1))
        if not ok:
            return f"node {name} ({ir.op_name(node)}) may mix tokens"
        for inp in node.all_input_nodes:
            if inp.name in on_path:
                continue
            side = ir.tensor_shape(inp)
            if side is not None and len(side) >= 2 and len(side) == len(shape) and side[1] != 1:
                return f"node {name} reads {inp.name} of shape {tuple(side)}, which varies over tokens"
    return None


class InsertTokenSelectPass(Pass):
    def __init__(self, blocks, selector: TokenSelector, merger: TokenMerger, kind: str = ir.MLP):
        super().__init__()
        self.blocks, self.selector, self.merger, self.kind = list(blocks), selector, merger, kind

    def call(self, gm):
        structure = ir.structure_of(gm)
        for b in self.blocks:
            branch = structure.branch(b, self.kind)
            if branch is None:
                self.decline(f"block {b}", f"has no {self.kind} branch")
                continue
            problem = token_locality_problem(gm, branch)
            if problem:
                self.decline(branch.name, problem)
                continue
            nodes = ir.nodes_by_name(gm.graph)
            stream_in, out = nodes[branch.stream_in], nodes[branch.branch_out]
            ctx = SelectContext(gm, branch, stream_in, out)
            users = list(out.users)
            first_use = min(users, key=_position)
            with gm.graph.inserting_before(first_use):
                idx = self.selector.indices(ctx)
                gathered = gm.graph.call_function(gather_tokens, (stream_in, idx))
                env = {stream_in: gathered}
                for name in branch.work:
                    node = nodes[name]
                    env[node] = gm.graph.node_copy(node, lambda n: env.get(n, n))
                    env[node].meta[ir.ON_SELECTED_TOKENS] = True  # the copy's own meta dict
                fresh = env[out]
                new = self.merger.merge(ctx, idx, fresh)
            for user in users:
                user.replace_input_with(out, new)
            self.counters["token_select"] += 1
        return PassResult(gm, self.counters["token_select"] > 0)


def _position(node: fx.Node) -> int:
    i, n = 0, node
    while n.op != "root":
        n = n.prev
        i += 1
    return i

