"""Queries the tests make of captured graphs, in terms of the modules that wrote the nodes.

A captured graph holds ATen operators; each node's `nn_module_stack` names the modules whose
forward ran it. A torch.nn layer (Linear, LayerNorm, GELU) runs one operator, so "the calls of
blocks.1.mlp.fc1" are the nodes whose innermost module is that layer — copies a pass made of them
included (node_copy keeps the meta).
"""

from __future__ import annotations

import torch.fx as fx

from graphcache import ir


def layer_calls(gm: fx.GraphModule, prefix: str = "", suffix: str = "") -> list[fx.Node]:
    """The operator nodes of torch.nn layers whose path starts with `prefix` and ends with `suffix`."""
    found = []
    for node in gm.graph.nodes:
        path = ir.layer_path(node)
        if node.op == "call_function" and path and path != ir.module_path(node) \
                and path.startswith(prefix) and path.endswith(suffix):
            found.append(node)
    return found


def calls(gm: fx.GraphModule, target) -> list[fx.Node]:
    """The nodes calling `target`."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]
