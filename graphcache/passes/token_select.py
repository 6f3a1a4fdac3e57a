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
from torch import nn

from .. import ir
from ..ops import gather_tokens
from ..schedule import tokens_input
from .base import Pass, PassResult

_LOCAL_MODULES = (nn.Linear, nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity, nn.Mish)
_LOCAL_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, torch.add, torch.sub,
    torch.mul, torch.div, torch.tanh, torch.sigmoid, torch.exp, torch.rsqrt, torch.sqrt,
    F.gelu, F.silu, F.relu, F.linear, F.dropout, torch.nn.functional.mish,
}
_LOCAL_METHODS = {"add", "sub", "mul", "div", "float", "to", "type_as", "contiguous", "tanh", "sigmoid",
                  "exp", "neg", "clone"}


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
    modules = dict(gm.named_modules())
    on_path = set(branch.work) | {branch.stream_in}
    n_tokens = ir.tensor_shape(nodes[branch.stream_in])[1]
    for name in branch.work:
        node = nodes[name]
        shape = ir.tensor_shape(node)
        if shape is None or len(shape) < 2 or shape[1] != n_tokens:
            return f"node {name} changes the token axis (shape {tuple(shape or ())})"
        if node.op == "call_module":
            mod = modules[node.target]
            ok = isinstance(mod, _LOCAL_MODULES) or (
                isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) == 1
            )
        elif node.op == "call_function":
            ok = node.target in _LOCAL_FUNCTIONS or (
                node.target is F.layer_norm and len(node.args) > 1 and len(node.args[1]) == 1
            )
        elif node.op == "call_method":
            ok = node.target in _LOCAL_METHODS
        else:
            ok = False
        if not ok:
            what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
            return f"node {name} ({what}) may mix tokens"
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

