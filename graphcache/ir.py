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
# set by capture, which keeps only concrete shapes: the symbol (str) of a `sym_size` node, and the
# symbols of a placeholder's dimensions (None where static); equal symbols are equal sizes
SIZE_SYMBOL = "graphcache_size_symbol"
DIM_SYMBOLS = "graphcache_dim_symbols"
SYM_SIZE = torch.ops.aten.sym_size.int

ATTENTION = "attention"
CROSS_ATTENTION = "cross_attention"
MLP = "mlp"
# attention and an MLP side by side on one normed input, summed or concatenated into one output
# projection (FLUX's and HunyuanVideo's single-stream blocks: x + gate * proj(cat(attn, mlp)))
PARALLEL = "parallel"

# The residual streams a block may carry. A single-stream DiT has one, the image tokens. An MMDiT's
# double-stream (joint) blocks carry two, image and text tokens, each with its own branches, joined
# only inside their shared attention; FLUX's and HunyuanVideo's single-stream blocks carry one
# joint stream, the text and image tokens concatenated.
IMAGE, TEXT, JOINT = "image", "text", "joint"


@dataclass
class Branch:
    """One residual branch: stream_out = stream_in + gate * branch_out (gate optional)."""

    block: int
    index: int  # position inside the block
    kind: str  # ATTENTION | CROSS_ATTENTION | MLP | PARALLEL
    stream_in: str  # the residual stream entering the branch
    branch_out: str  # the UNGATED branch output: the cut point every method caches
    gate: str | None  # the tensor multiplying branch_out, None for a plain residual
    residual_add: str  # the add that puts the branch back on the stream
    module: str  # module path that owns the branch work ("" if written inline at the top level)
    work: list[str] = field(default_factory=list)  # nodes computed from stream_in for branch_out
    name: str = ""  # unique stem for cache slots, e.g. "b3_mlp", "b3_text_mlp" (set by the block analysis)
    stream: str = IMAGE  # IMAGE | TEXT | JOINT: the residual stream the branch adds to


@dataclass
class Stream:
    """One residual stream: the chain of residual adds from `start` (the stream entering its first
    branch) to `end` (its last residual add), over `num_tokens` tokens."""

    name: str  # IMAGE | TEXT | JOINT
    start: str
    end: str
    num_tokens: int


@dataclass
class Block:
    index: int
    stream_in: str  # the image (or joint) stream entering the block; a text stream's are its branches'
    stream_out: str
    module: str
    branches: list[Branch]


@dataclass
class Structure:
    blocks: list[Block]
    stream_start: str  # the stream entering block 0
    stream_end: str  # the stream leaving the last block
    num_tokens: int = 0  # image stream shape (batch, num_tokens, hidden_size) at capture
    hidden_size: int = 0
    input_names: list[str] = field(default_factory=list)
    streams: list[Stream] = field(default_factory=list)  # image first, then text and joint if any
    # one line per part of the graph discovery saw but did not make a block of (and why)
    unclassified: list[str] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def multi_stream(self) -> bool:
        """Whether blocks carry more than the image stream (an MMDiT: SD3, FLUX, HunyuanVideo)."""
        return any(s.name != IMAGE for s in self.streams)

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
                    {"kind": br.kind, "stream": br.stream, "module": br.module, "branch_out": br.branch_out,
                     "gate": br.gate, "work_nodes": len(br.work)}
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
    """The innermost model module whose forward created this node ("" at the top level); a
    torch.nn layer (Linear, LayerNorm, GELU, ...) counts as an operator of its owner."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    while stack and _is_torch_layer(stack[-1][1]):
        stack.pop()
    return stack[-1][0] if stack else ""


def layer_path(node: fx.Node) -> str:
    """The innermost module of any kind that created this node: the torch.nn layer itself for the
    operators a Linear, LayerNorm or activation module ran ("" at the top level)."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    return stack[-1][0] if stack else ""


def _is_torch_layer(module_type) -> bool:
    name = module_type if isinstance(module_type, str) else f"{module_type.__module__}.{module_type.__qualname__}"
    return name.startswith("torch.nn.modules.")


aten = torch.ops.aten
# The operator vocabulary of captured graphs (torch.export's ATen operators), plus the torch-level
# functions passes themselves insert
ADD_TARGETS = {aten.add.Tensor, operator.add, torch.add}
MUL_TARGETS = {aten.mul.Tensor, operator.mul, torch.mul}
LINEAR_TARGETS = {aten.linear.default, torch.nn.functional.linear}
SDPA_TARGETS = {aten.scaled_dot_product_attention.default, torch.nn.functional.scaled_dot_product_attention}
CAT_TARGETS = {aten.cat.default, torch.cat}
SLICE_TARGETS = {aten.slice.Tensor}
SOFTMAX_TARGETS = {aten.softmax.int, aten._softmax.default, torch.softmax, torch.nn.functional.softmax}
MATMUL_TARGETS = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default, aten.einsum.default,
                  operator.matmul, torch.matmul, torch.bmm}


def is_call(node, targets) -> bool:
    """Whether `node` calls one of `targets` (a set of operators or functions)."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def flat_inputs(node: fx.Node) -> list[fx.Node]:
    """The nodes among `node`'s positional arguments, lists included, in order (einsum takes its
    operands as a list, baddbmm its bias first)."""
    args = node.args[1:] if node.target in (aten.baddbmm.default, aten.einsum.default) else node.args
    flat = [a for arg in args for a in (arg if isinstance(arg, (list, tuple)) else [arg])]
    return [a for a in flat if isinstance(a, fx.Node)]


def op_name(node: fx.Node) -> str:
    """A short name of what a node runs, for messages: "linear", "gelu", "placeholder x"."""
    if node.op != "call_function":
        return f"{node.op} {node.target}"
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    return getattr(target, "__name__", str(target))


# ops that pass a tensor on with its value unchanged (export keeps dropout, with train=False, in eval
# graphs; a dtype cast changes precision only: Wan adds its residuals in float32 and casts back)
PASS_ON_TARGETS = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.dropout.default,
                   aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default}


def slice_args(node: fx.Node) -> tuple:
    """(source, dim, start, end, step) of an aten.slice node, None where the call left a default."""
    return (*node.args, *(None,) * (5 - len(node.args)))


def passes_on(node) -> bool:
    """Whether `node` is its first argument passed on unchanged: a PASS_ON_TARGETS op, or a slice
    over a dimension's whole extent."""
    if is_call(node, PASS_ON_TARGETS):
        return True
    if not is_call(node, SLICE_TARGETS):
        return False
    source, dim, start, end, step = slice_args(node)
    shape = tensor_shape(source)
    return (shape is not None and not start and step in (None, 1)
            and (end is None or (isinstance(end, int) and end >= shape[(dim or 0) % len(shape)])))


# ops that read only the shape, dtype or device of some inputs: of all (…_like), of all but the first
_SHAPE_ONLY = {aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default}
_DTYPE_OF_SECOND = {aten.type_as.default}


def data_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs whose values `node` computes with: not those it reads only a shape, dtype or
    device from (empty_like, type_as's second argument, sizes)."""
    if is_call(node, _SHAPE_ONLY):
        return []
    inputs = [node.args[0]] if is_call(node, _DTYPE_OF_SECOND) else node.all_input_nodes
    return [n for n in inputs if isinstance(n, fx.Node) and n.meta.get("tensor_meta") is not None]


def stream_operand(add: fx.Node, stream_in: str) -> fx.Node:
    """The operand of a residual add that is the stream `stream_in` (possibly through a cast)."""
    for arg in add.args:
        node = arg
        while isinstance(node, fx.Node):
            if node.name == stream_in:
                return arg
            node = node.args[0] if passes_on(node) else None
    raise ValueError(f"{add.name} does not add to the stream {stream_in}")


def is_add(node: fx.Node) -> bool:
    return is_call(node, ADD_TARGETS) and node.kwargs.get("alpha", 1) == 1


def is_mul(node: fx.Node) -> bool:
    return is_call(node, MUL_TARGETS)


def is_linear(node: fx.Node) -> bool:
    return is_call(node, LINEAR_TARGETS)


def is_sdpa(node: fx.Node) -> bool:
    return is_call(node, SDPA_TARGETS)


def has_side_effects(node: fx.Node) -> bool:
    """Whether dead-code elimination must keep `node` although nothing reads it: inputs, the
    output, and operators that mutate an argument (cache writes, in-place updates). fx's own rule
    also keeps every ATen operator tagged as drawing random numbers, SDPA and dropout included,
    which would keep the whole work of a branch that a cache read replaced."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    return node.is_impure()


def eliminate_dead_code(graph: fx.Graph) -> bool:
    """Remove what nothing reads (see `has_side_effects`), and scratch tensors the graph allocates
    and only writes into once their readers are gone (see `_unread_scratch`); whether anything was
    removed."""
    removed = graph.eliminate_dead_code(is_impure_node=has_side_effects)
    while dead := _unread_scratch(graph):
        for node in reversed(dead):
            graph.erase_node(node)
        graph.eliminate_dead_code(is_impure_node=has_side_effects)
        removed = True
    return removed


# operators that allocate a new tensor, which no one else can hold a reference to
ALLOCATION_TARGETS = {aten.empty_like.default, aten.empty.memory_format, aten.zeros_like.default,
                      aten.zeros.default, aten.new_empty.default, aten.new_zeros.default,
                      aten.full_like.default, aten.full.default}


def _use_of(user: fx.Node, node: fx.Node) -> str:
    """How `user` uses `node`: "write" (mutates it in place, and mutates nothing else, and its
    result is unread), "view" (returns an alias of it without writing) or "read"."""
    if user.op != "call_function" or not isinstance(user.target, torch._ops.OpOverload):
        return "read"
    schema = user.target._schema
    arguments = [(a, user.args[i] if i < len(user.args) else user.kwargs.get(a.name))
                 for i, a in enumerate(schema.arguments)]
    aliases = [a.alias_info for a, value in arguments if value is node]
    if len(aliases) != 1 or aliases[0] is None:
        return "read"
    if aliases[0].is_write:
        writes_elsewhere = any(a.alias_info is not None and a.alias_info.is_write and value is not node
                               for a, value in arguments)
        return "read" if writes_elsewhere or user.users else "write"
    returns = schema.returns
    return "view" if len(returns) == 1 and returns[0].alias_info is not None else "read"


def _unread_scratch(graph: fx.Graph) -> list[fx.Node]:
    """The nodes of every tensor the graph allocates whose every use is a view of it or an
    in-place write into it: nothing reads what was written (Wan's rotary fills `empty_like` slices
    with `copy_`, which outlives the attention a cache read replaced). Graph order; [] if none."""
    scratch = set()
    for alloc in graph.nodes:
        if is_call(alloc, ALLOCATION_TARGETS):
            scratch |= _written_only(alloc) or set()
    return [n for n in graph.nodes if n in scratch]


def _written_only(alloc: fx.Node) -> set[fx.Node] | None:
    """`alloc` with its views and the writes into them, or None if any of them is read."""
    scratch, frontier = {alloc}, [alloc]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            use = _use_of(user, node)
            if use == "read":
                return None
            if use == "view" and user not in scratch:
                frontier.append(user)
            scratch.add(user)
    return scratch


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
