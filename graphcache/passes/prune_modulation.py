"""PruneModulationPass: compute only the chunks of a split linear layer that are still used.

adaLN computes all of a block's modulation (shift, scale, gate for each branch) with one linear
layer and splits it with `chunk`. Once a branch is reused or forecast, its shift and scale are
dead and dead-code elimination drops their `getitem`s — but the linear layer still computes, and
on a CPU mostly *reads*, the whole 6C×C weight (32 MB per DiT-XL block) every step. This pass
replaces each live chunk by a linear layer over the matching rows of the same weight (`narrow`
views: nothing is copied) so a FORA step reads a third of it and a ToCa step two thirds.
"""

from __future__ import annotations


import torch
import torch.fx as fx

from .. import ir
from .base import Pass, PassResult


def _chunk_spec(node: fx.Node) -> tuple[fx.Node, int, int] | None:
    """(source, chunks, dim) of a `chunk` node, else None."""
    if not ir.is_call(node, {torch.ops.aten.chunk.default, torch.chunk}):
        return None
    source, rest = node.args[0], node.args[1:]
    chunks = rest[0] if rest else node.kwargs.get("chunks")
    dim = rest[1] if len(rest) > 1 else node.kwargs.get("dim", 0)
    return (source, chunks, dim) if isinstance(source, fx.Node) and isinstance(chunks, int) else None


class PruneModulationPass(Pass):
    def call(self, gm):
        aten = torch.ops.aten
        for node in list(gm.graph.nodes):
            spec = _chunk_spec(node)
            if spec is None:
                continue
            source, chunks, dim = spec
            if not ir.is_linear(source) or source.kwargs:
                continue
            users = list(node.users)  # getitems: captured graphs unpack every multi-output op
            shape, (x, weight, bias) = ir.tensor_shape(source), (list(source.args) + [None])[:3]
            out_features = shape[-1] if shape is not None else 0
            if shape is None or dim not in (-1, len(shape) - 1) or out_features % chunks:
                self.decline(node.name, "it does not split the linear layer's output features evenly")
                continue
            live = {u.args[1] % chunks for u in users}
            if len(live) == chunks:
                continue  # every chunk is used: the one big linear layer is the cheaper form
            size = out_features // chunks
            for user in users:
                start = user.args[1] % chunks * size
                with gm.graph.inserting_before(user):
                    w = gm.graph.call_function(aten.narrow.default, (weight, 0, start, size))
                    b = gm.graph.call_function(aten.narrow.default, (bias, 0, start, size)) if bias is not None else None
                    part = gm.graph.call_function(aten.linear.default, (x, w, b))
                user.replace_all_uses_with(part)
                gm.graph.erase_node(user)
            self.counters["pruned_chunks"] += chunks - len(live)
            self.counters["split_linear"] += 1
        if self.counters["split_linear"]:
            ir.eliminate_dead_code(gm.graph)
        return PassResult(gm, self.counters["split_linear"] > 0)
