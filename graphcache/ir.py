"""The annotated-graph vocabulary shared by capture, passes, methods and the CLI.

Capture writes a `Structure` into `gm.meta["graphcache"]`: the residual stream, its blocks and
their branches, each part named by fx node names. Node names survive graph copies and rewrites
(passes add nodes, they never rename), so every variant of a model can resolve the same structure
in its own graph with `nodes_by_name`. Each classified node also carries a human-readable tag in
`node.meta["graphcache"]` (block, branch, role) for dumps and `graphcache inspect`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx

META_KEY = "graphcache"
# set (True) on the nodes InsertTokenSelectPass clones onto the gathered tokens: they run on the
# step's few selected tokens, not on all N (TransposeFewTokenLinearsPass reads it)
ON_SELECTED_TOKENS = "graphcache_on_selected_tokens"

ATTENTION = "attention"
CROSS_ATTENTION = "cross_attention"
MLP = "mlp"


@dataclass
class Branch:
    """One residual branch: stream_out = stream_in + gate * branch_out (gate optional)."""

    block: int
    index: int  # position inside the block
    kind: str  # ATTENTION | CROSS_ATTENTION | MLP
    stream_in: str  # the residual stream entering the branch
    branch_out: str  # the UNGATED branch output: the cut point every method caches
    gate: str | None  # the tensor multiplying branch_out, None for a plain residual
    residual_add: str  # the add that puts the branch back on the stream
    module: str  # module path that owns the branch work ("" if written inline at the top level)
    work: list[str] = field(default_factory=list)  # nodes computed from stream_in for branch_out
    name: str = ""  # unique stem for cache slots, e.g. "b3_mlp" (set by the block analysis)


@dataclass
class Block:
    index: int
    stream_in: str
    stream_out: str
    module: str
    branches: list[Branch]


@dataclass
class Structure:
    blocks: list[Block]
    stream_start: str  # the stream entering block 0
    stream_end: str  # the stream leaving the last block
    num_tokens: int = 0  # stream shape (batch, num_tokens, hidden_size) at capture
    hidden_size: int = 0
    input_names: list[str] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def branches(self) -> list[Branch]:
        return [br for b in self.blocks for br in b.branches]

    def select(self, blocks=None, kinds=None) -> list[Branch]:
        """Branches of the given blocks (None: all) whose kind is in `kinds` (None: any)."""
        wanted = set(range(self.depth)) if blocks is None else set(blocks)
        return [br for br in self.branches if br.block in wanted and (kinds is None or br.kind in kinds)]

    def branch(self, block: int, kind: str) -> Branch | None:
        return next((br for br in self.blocks[block].branches if br.kind == kind), None)

    def describe(self) -> list[dict]:
        return [
            {
                "block": b.index,
                "module": b.module,
                "branches": [
                    {"kind": br.kind, "module": br.module, "branch_out": br.branch_out, "gate": br.gate,
                     "work_nodes": len(br.work)}
                    for br in b.branches
                ],
            }
            for b in self.blocks
        ]


def structure_of(gm: fx.GraphModule) -> Structure:
    try:
        return gm.meta[META_KEY]
    except KeyError:
        raise ValueError("graph has no graphcache structure: capture it with graphcache.capture") from None


def nodes_by_name(graph: fx.Graph) -> dict[str, fx.Node]:
    return {n.name: n for n in graph.nodes}


def tag(node: fx.Node, **info) -> None:
    """Add a classification tag to a node (a node can hold several, e.g. stream_in and residual_add)."""
    node.meta.setdefault(META_KEY, []).append(info)


def upstream(nodes) -> set[fx.Node]:
    """`nodes` (one node or several) and every node they depend on, transitively."""
    seen: set[fx.Node] = set()
    todo = [nodes] if isinstance(nodes, fx.Node) else list(nodes)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def to_digraph(graph: fx.Graph) -> nx.DiGraph:
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node.name)
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def tensor_shape(node: fx.Node) -> torch.Size | None:
    """The shape shape-propagation recorded for a node, if it produced a tensor."""
    tm = node.meta.get("tensor_meta")
    return getattr(tm, "shape", None)


def module_path(node: fx.Node) -> str:
    """Innermost module whose forward created this node ("" at the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # A call_module node's own stack ends in the called module; its owner is one level up.
    if node.op == "call_module" and path == node.target:
        return list(stack.values())[-2][0] if len(stack) > 1 else ""
    return path


ADD_TARGETS = {operator.add, torch.add, operator.iadd}
MUL_TARGETS = {operator.mul, torch.mul, operator.imul}


def is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in ADD_TARGETS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )


def is_mul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in MUL_TARGETS) or (
        node.op == "call_method" and node.target in ("mul", "mul_")
    )


def graph_input(graph: fx.Graph, name: str, type_expr=None) -> fx.Node:
    """The placeholder `name`, created after the last input on first use (passes add per-step
    inputs, cache inputs and draws this way; callers pass them by name)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in placeholders:
        if node.target == name:
            return node
    with insert_after(placeholders[-1]):
        return graph.placeholder(name, type_expr=type_expr)


def insert_after(node: fx.Node):
    """Context manager placing new nodes right after `node`, in the order they are created
    (fx's own `inserting_after` puts each new node directly after `node`, reversing the order)."""
    return node.graph.inserting_before(node.next)
