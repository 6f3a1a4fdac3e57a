"""ReuseDeadTemporariesPass: compute an elementwise op into its operand when nothing else reads it.

`x + gate * y` makes two new tensors, though the product dies at the add. On a CPU, allocating
and filling a second new (B, N, C) tensor costs about as much as the add itself, so
`(gate * y).add_(x)` does the same work with less memory traffic and gives the same values (IEEE
addition and multiplication commute, and the in-place op rounds once, as the out-of-place one).
Cached steps are mostly such elementwise work (gates, residual adds, forecasts), so it is there
that the saved tensors show.

For eager runners only (exporters/eager.py `eager_runner`): compile fuses these itself, and the
exporters want functional graphs. A node `op(a, b)` becomes `t.op_(other)` when

* op is an elementwise add, mul, sub or true division with no keyword arguments (for sub and
  division only the first operand may be reused: they do not commute);
* t is the result of such an op (a new tensor, aliasing nothing) and this node is its only user;
* t has the node's shape and dtype, with no dimension of size 1: then no other input shapes can
  make the other operand broadcast t larger (shapes are those recorded at capture).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .base import Pass, PassResult

# op -> (in-place method, whether its operands commute)
aten = torch.ops.aten
_IN_PLACE = {
    aten.add.Tensor: ("add_", True), aten.mul.Tensor: ("mul_", True),
    aten.sub.Tensor: ("sub_", False), aten.div.Tensor: ("div_", False),
    operator.add: ("add_", True), torch.add: ("add_", True),
    operator.mul: ("mul_", True), torch.mul: ("mul_", True),
    operator.sub: ("sub_", False), torch.sub: ("sub_", False),
    operator.truediv: ("div_", False), torch.div: ("div_", False),
}


class ReuseDeadTemporariesPass(Pass):
    def call(self, gm):
        for node in gm.graph.nodes:
            out = node.meta.get("tensor_meta")
            if not _is_elementwise(node) or node.kwargs or len(node.args) != 2 or out is None:
                continue
            method, commutes = _IN_PLACE[node.target]
            candidates = [node.args[i] for i in ((0, 1) if commutes else (0,))]
            dead = [t for t in candidates if _is_elementwise(t) and list(t.users) == [node]
                    and _same_tensor_type(t, out)]
            reusable = [t for t in dead if 1 not in t.meta["tensor_meta"].shape]
            if reusable:
                temporary = reusable[0]
                other = node.args[1] if node.args[0] is temporary else node.args[0]
                node.op, node.target, node.args = "call_method", method, (temporary, other)
                self.counters[method] += 1
            elif dead:
                self.decline(node.name, "its dead operand has a size-1 dimension: at other input shapes "
                                        "the other operand could broadcast it larger")
        gm.recompile()
        return PassResult(gm, bool(self.counters))


def _is_elementwise(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in _IN_PLACE


def _same_tensor_type(node: fx.Node, out) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and meta.shape == out.shape and meta.dtype == out.dtype
