"""EOC's correction (Qiu et al., arXiv 2501.19243): a cached branch output is multiplied by a
per-step factor before the adaLN gate.

The factor, (1 + λ (P[t] - P[t-1])) accumulated over the cached steps since the branch was last
computed (graphcache/eoc.py), is a graph input of shape (tokens, channels) per branch,
`schedule.correction_input(branch)`: one variant serves every step, and a step the judgment leaves alone
passes ones (x * 1 is x exactly).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .. import ir
from ..cache import slot_name
from ..schedule import correction_input
from .base import BranchPass, PassResult


class InsertErrorCorrectionPass(BranchPass):
    """Where the gate (or, ungated, the residual add) of a selected branch reads a value computed
    from the cache alone — a cache read or a forecast, not the stream entering the branch nor a
    slot this variant updates — multiply that value by the branch's factor input. Branches
    computed in this variant, fully or on some tokens (their fresh tokens must not be scaled), and
    branches of skipped blocks are declined."""

    def call(self, gm):
        graph = gm.graph
        nodes = ir.nodes_by_name(graph)
        # slots this variant writes or updates in place: a value read from one holds fresh tokens
        # (a token-select scatter returns a new read of the updated slot, with no data edge to them)
        updated = {slot_name(n.args[0]) for n in graph.nodes
                   if n.op == "call_function" and n.args and ir.has_side_effects(n)} - {None}
        for br, out in self.branches(gm):
            if out is not None and out.users:
                self.decline(br.name, "computed in this variant")
                continue
            consumer = nodes.get(br.residual_add)
            if consumer is None:
                self.decline(br.name, "its block is skipped in this variant")
                continue
            stream = ir.stream_operand(consumer, br.stream_in)
            gated = next(a for a in consumer.args if isinstance(a, fx.Node) and a is not stream)
            if br.gate is not None:
                consumer = gated
                gated = next(a for a in consumer.args if isinstance(a, fx.Node) and a.name != br.gate)
            sources = ir.upstream(gated)
            if nodes[br.stream_in] in sources or any(slot_name(n) in updated for n in sources):
                self.decline(br.name, "partially computed in this variant (only a cached read is corrected)")
                continue
            factor = ir.graph_input(graph, correction_input(br.name), type_expr=torch.Tensor)
            with graph.inserting_before(consumer):
                corrected = graph.call_function(torch.ops.aten.mul.Tensor, (gated, factor))
            consumer.replace_input_with(gated, corrected)
            self.counters["correction"] += 1
        return PassResult(gm, self.counters["correction"] > 0)
