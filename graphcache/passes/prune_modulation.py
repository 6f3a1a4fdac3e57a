"""PruneModulationPass: compute only the chunks of a split linear layer that are still used.

adaLN computes all of a block's modulation (shift, scale, gate for each branch) with one linear
layer and splits it with `chunk`. Once a branch is reused or forecast, its shift and scale are
dead and dead-code elimination drops their `getitem`s — but the linear layer still computes, and
on a CPU mostly *reads*, the whole 6C×C weight (32 MB per DiT-XL block) every step. This pass
replaces each live chunk by a linear layer over the matching rows of the same weight (`narrow`
views: nothing is copied) so a FORA step reads a third of it and a ToCa step two thirds.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import ir
from .base import Pass, PassResult


def _chunk_spec(node: fx.Node) -> tuple[fx.Node, int, int] | None:
    """(source, chunks, dim) of a `chunk` node, else None."""
    if node.op == "call_method" and node.target == "chunk":
        source, rest = node.args[0], node.args[1:]
    elif node.op == "call_function" and node.target is torch.chunk:
        source, rest = node.args[0], node.args[1:]
    else:
        return None
    chunks = rest[0] if rest else node.kwargs.get("chunks")
    dim = rest[1] if len(rest) > 1 else node.kwargs.get("dim", 0)
    return (source, chunks, dim) if isinstance(source, fx.Node) and isinstance(chunks, int) else None


class PruneModulationPass(Pass):
    def call(self, gm):
        modules = dict(gm.named_modules())
        for node in list(gm.graph.nodes):
            spec = _chunk_spec(node)
            if spec is None:
                continue
            source, chunks, dim = spec
            linear = modules.get(source.target) if source.op == "call_module" else None
            if not isinstance(linear, nn.Linear):
                continue
            users = list(node.users)
            if not all(u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
                       for u in users):
                self.decline(node.name, "a chunk is used other than by indexing")
                continue
            shape = ir.tensor_shape(source)
            if shape is None or dim not in (-1, len(shape) - 1) or linear.out_features % chunks:
                self.decline(node.name, "it does not split the linear layer's output features evenly")
                continue
            live = {u.args[1] % chunks for u in users}
            if len(live) == chunks:
                continue  # every chunk is used: the one big linear layer is the cheaper form
            size = linear.out_features // chunks
            with gm.graph.inserting_before(node):
                weight = gm.graph.get_attr(f"{source.target}.weight")
                bias = gm.graph.get_attr(f"{source.target}.bias") if linear.bias is not None else None
            for user in users:
                start = user.args[1] % chunks * size
                with gm.graph.inserting_before(user):
                    w = gm.graph.call_function(torch.narrow, (weight, 0, start, size))
                    b = gm.graph.call_function(torch.narrow, (bias, 0, start, size)) if bias is not None else None
                    part = gm.graph.call_function(F.linear, (source.args[0], w, b))
                user.replace_all_uses_with(part)
                gm.graph.erase_node(user)
            self.counters["pruned_chunks"] += chunks - len(live)
            self.counters["split_linear"] += 1
        if self.counters["split_linear"]:
            gm.graph.eliminate_dead_code()
        return PassResult(gm, self.counters["split_linear"] > 0)
