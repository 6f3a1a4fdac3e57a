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
from ..ops import gather_positions, gather_tokens
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
# layout ops: local when they keep the axes up to the token axis (_moved_token_axis)
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


@dataclass
class SelectContext:
    """What a selector/merger may use: the graph, the branch, its nodes, and the token count."""

    gm: fx.GraphModule
    branch: ir.Branch
    stream_in: fx.Node
    branch_out: fx.Node

    def tokens(self) -> fx.Node:
        """The graph input carrying this block's fresh-token count (created on first use)."""
        name = tokens_input(self.branch.block, kind=self.branch.kind, stream=self.branch.stream)
        return ir.graph_input(self.gm.graph, name, type_expr=int)


class TokenSelector:
    def indices(self, ctx: SelectContext) -> fx.Node:
        """Insert nodes computing (B, k) int64 indices at the current insertion point."""
        raise NotImplementedError


class TokenMerger:
    def merge(self, ctx: SelectContext, idx: fx.Node, fresh: fx.Node) -> fx.Node:
        """Insert nodes producing the (B, N, C) value that replaces the branch output."""
        raise NotImplementedError


def token_locality_problem(gm: fx.GraphModule, branch: ir.Branch) -> str | None:
    """None if the branch treats tokens independently, else why not (naming the node).

    The token axis is followed through the branch: it starts at axis 1 of the stream, layout ops
    (view/reshape that keep the axes up to it, transpose, permute) move it, and an attention keeps
    it local in its queries: each query token attends to the same keys on its own, whether they
    come from the text (PixArt-α's cross-attention) or from the stream itself, which then stays
    computed on all tokens (FLUX's single-stream blocks).
    """
    return _analyse(gm, branch)[0]


def _analyse(gm: fx.GraphModule, branch: ir.Branch):
    """(why the branch is not token-local or None, the work to run on the selected tokens, the
    per-token position tables its queries read -> their token axis, the reshapes whose size
    argument holds the token count -> the position of that size)."""
    nodes = ir.nodes_by_name(gm.graph)
    stream_in = nodes[branch.stream_in]
    n_tokens = ir.tensor_shape(stream_in)[1]
    selected, queries = _selected_work(branch, nodes)
    axes = {stream_in: 1}  # node on the path -> its token axis
    positions, baked = {}, {}
    for name in selected:
        node = nodes[name]
        shape = ir.tensor_shape(node)
        on_path = [inp for inp in node.all_input_nodes if inp in axes]
        in_axes = {axes[inp] for inp in on_path}
        if len(in_axes) != 1:
            problem = f"node {name} ({ir.op_name(node)}) combines the stream in different layouts" if in_axes else \
                f"node {name} ({ir.op_name(node)}) does not read the stream"
            return problem, selected, positions, baked
        in_axis = in_axes.pop()
        if ir.is_call(node, {aten.unbind.int}):  # a tuple: its items carry the axis (operator.getitem)
            dim = (node.args[1] if len(node.args) > 1 else 0) % len(ir.tensor_shape(on_path[0]))
            if dim == in_axis:
                return f"node {name} (unbind) splits the token axis", selected, positions, baked
            axes[node] = in_axis if dim > in_axis else in_axis - 1
            continue
        axis = _moved_token_axis(node, in_axis, on_path[0])
        checked = in_axis if isinstance(axis, str) else axis  # a shape change is the clearer reason
        if shape is None or len(shape) <= checked or shape[checked] != n_tokens:
            return f"node {name} changes the token axis (shape {tuple(shape or ())})", selected, positions, baked
        if isinstance(axis, str):
            return f"node {name} ({ir.op_name(node)}) {axis}", selected, positions, baked
        if ir.is_sdpa(node):
            problem = _attention_problem(node, stream_in, axes, axis)
            if problem:
                return f"node {name} ({ir.op_name(node)}) {problem}", selected, positions, baked
        else:
            for inp in node.all_input_nodes:
                side = ir.tensor_shape(inp)
                if inp in axes or side is None or len(side) != len(shape) or side[axis] == 1:
                    continue
                if name in queries and stream_in not in ir.upstream(inp) and side[axis] == n_tokens:
                    positions[inp] = axis  # a rotary table of the queries: gathered with them
                    continue
                return f"node {name} reads {inp.name} of shape {tuple(side)}, which varies over tokens", selected, \
                    positions, baked
        if node.target in _RESHAPES and node.args[1][axis] != -1 and isinstance(node.args[1][axis], int):
            baked[node] = axis  # torch.export bakes static sizes in: the copy takes the selected count
        axes[node] = axis
    return None, selected, positions, baked


def _selected_work(branch: ir.Branch, nodes) -> tuple[list[str], set[str]]:
    """The branch's work that runs on the selected tokens — all of it, except what only the keys
    and values of an attention over the stream need, which runs on all tokens — and the part of
    it that computes an attention's queries."""
    work = set(branch.work)
    keep, queries = set(), set()
    todo = [(nodes[branch.branch_out], False)]
    while todo:
        node, query = todo.pop()
        if node.name not in work or (node.name in keep and (not query or node.name in queries)):
            continue
        keep.add(node.name)
        if query:
            queries.add(node.name)
        if ir.is_sdpa(node):
            mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
            todo.extend((n, True) for n in (node.args[0], mask) if isinstance(n, fx.Node))
        else:
            todo.extend((n, query) for n in node.all_input_nodes)
    return [name for name in branch.work if name in keep], queries


def _moved_token_axis(node: fx.Node, axis: int, source: fx.Node) -> int | str:
    """Where `node` puts the token axis of its stream input `source` (at `axis`), or why it is
    not a token-local op."""
    if node.op != "call_function":
        return "may mix tokens"
    target = node.target
    if target in _LOCAL_OPERATORS or ir.is_sdpa(node):
        return axis
    if target in _CHANNEL_NORMS:
        return axis if len(node.args) > 1 and len(node.args[1]) == 1 else "may mix tokens"
    before, after = ir.tensor_shape(source), ir.tensor_shape(node)
    if target in _RESHAPES:
        if after is None or tuple(after[: axis + 1]) != tuple(before[: axis + 1]):
            return "may mix tokens (it reshapes the axes up to the token axis)"
        return axis
    if target is operator.getitem and ir.is_call(source, {aten.unbind.int}):
        return axis  # the item of an unbind that kept the token axis (recorded on the unbind)
    if target == aten.stack.default:  # a new dimension at `dim` of the result
        dim = (node.args[1] if len(node.args) > 1 else 0) % len(after)
        return axis + 1 if dim <= axis else axis
    if target == aten.unflatten.int:  # splits one dimension into several
        dim = node.args[1] % len(before)
        if dim == axis:
            return "may mix tokens (it splits the token axis)"
        return axis if dim > axis else axis + len(node.args[2]) - 1
    if target == aten.flatten.using_ints:  # merges the dimensions start..end into one
        start, end = (d % len(before) for d in (*node.args[1:3], -1)[:2])
        if start <= axis <= end and start != end:
            return "may mix tokens (it merges the token axis with another)"
        return axis if axis < start else axis - (end - start)
    if target == aten.cat.default:
        dim = (node.args[1] if len(node.args) > 1 else 0) % len(after or before)
        return axis if dim != axis else "concatenates along the token axis"
    if target == aten.transpose.int:
        d0, d1 = (d % len(before) for d in node.args[1:3])
        return d1 if axis == d0 else d0 if axis == d1 else axis
    if target == aten.permute.default:
        return [d % len(before) for d in node.args[1]].index(axis)
    return "may mix tokens"


def _attention_problem(sdpa: fx.Node, stream_in: fx.Node, selected: dict, axis: int) -> str | None:
    """Why this scaled_dot_product_attention is not token-local in its queries, or None: the
    selected tokens may reach it only through the queries (sequence axis -2), and its mask must
    not depend on the stream or vary over queries."""
    q, k, v = sdpa.args[:3]
    if k in selected or v in selected:
        return "attends over the selected tokens of the image stream (its keys or values are computed on them)"
    if axis != len(ir.tensor_shape(q)) - 2:
        return "takes the stream's tokens on another axis than the query sequence"
    mask = sdpa.args[3] if len(sdpa.args) > 3 else sdpa.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node) and stream_in in ir.upstream(mask):
        return "attends over the stream's tokens (its mask comes from the stream)"
    if isinstance(mask, fx.Node) and ir.tensor_shape(mask)[-2] != 1:
        return "has a mask that varies over the query tokens"
    if (sdpa.args[5] if len(sdpa.args) > 5 else sdpa.kwargs.get("is_causal", False)):
        return "is causal: each query sees a token-dependent set of keys"
    return None


class InsertTokenSelectPass(Pass):
    def __init__(self, blocks, selector: TokenSelector, merger: TokenMerger, kind: str = ir.MLP):
        super().__init__()
        self.blocks, self.selector, self.merger, self.kind = list(blocks), selector, merger, kind

    def call(self, gm):
        structure = ir.structure_of(gm)
        for b in self.blocks:
            # a two-stream block has one branch of the kind per stream: each selects its own tokens
            branches = [br for br in structure.blocks[b].branches if br.kind == self.kind]
            if not branches:
                self.decline(f"block {b}", f"has no {self.kind} branch")
            for branch in branches:
                self._select(gm, branch)
        return PassResult(gm, self.counters["token_select"] > 0)

    def _select(self, gm, branch: ir.Branch) -> None:
        problem, selected, positions, baked = _analyse(gm, branch)
        if problem:
            self.decline(branch.name, problem)
            return
        nodes = ir.nodes_by_name(gm.graph)
        stream_in, out = nodes[branch.stream_in], nodes[branch.branch_out]
        ctx = SelectContext(gm, branch, stream_in, out)
        users = list(out.users)
        first_use = min(users, key=_position)
        with gm.graph.inserting_before(first_use):
            idx = self.selector.indices(ctx)
            gathered = gm.graph.call_function(gather_tokens, (stream_in, idx))
            env = {stream_in: gathered}
            for table, axis in positions.items():
                env[table] = gm.graph.call_function(gather_positions, (table, idx, axis))
            count = gm.graph.call_function(ir.SYM_SIZE, (gathered, 1)) if baked else None
            for name in selected:
                node = nodes[name]
                env[node] = copy = gm.graph.node_copy(node, lambda n: env.get(n, n))
                copy.meta[ir.ON_SELECTED_TOKENS] = True  # the copy's own meta dict
                if node in baked:
                    sizes = list(copy.args[1])
                    sizes[baked[node]] = count
                    copy.args = (copy.args[0], sizes, *copy.args[2:])
            new = self.merger.merge(ctx, idx, env[out])
        for user in users:
            user.replace_input_with(out, new)
        self.count("token_select", branch)


def _position(node: fx.Node) -> int:
    i, n = 0, node
    while n.op != "root":
        n = n.prev
        i += 1
    return i

