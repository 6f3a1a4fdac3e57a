"""AnnotateBlocksPass: find the residual stream, its blocks and their branches from the graph alone.

A residual add is an add whose one operand (the stream) is an ancestor of the other (the branch's
contribution). The residual stream is the longest chain of such adds, each consuming the previous
one. On each add, a multiply whose one factor depends on the stream and the other does not splits
the contribution into the gate and the ungated branch output — the cut point every method caches.
Nothing here knows DiT's module names: blocks come from the module that owns each residual add
(or, for a model written in one flat forward, from where token-mixing branches start), and a
branch is attention when its work mixes tokens (SDPA, softmax, multi-head attention).
"""

from __future__ import annotations

import networkx as nx
import torch.fx as fx

from .. import ir
from ..errors import GraphcacheError
from .base import Pass, PassResult



class AnnotateBlocksPass(Pass):
    """Writes `gm.meta["graphcache"]` (an ir.Structure) and tags the nodes it classifies."""

    def requires(self, gm):
        missing = [n.name for n in gm.graph.nodes if n.op == "call_function" and "tensor_meta" not in n.meta]
        if len(missing) == len([n for n in gm.graph.nodes if n.op == "call_function"]) and missing:
            raise GraphcacheError("AnnotateBlocksPass needs shapes: run shape propagation first (graphcache.capture does)")

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        dg = ir.to_digraph(graph)
        by_name = ir.nodes_by_name(graph)
        ancestors = _AncestorCache(dg)
        order = {n: i for i, n in enumerate(graph.nodes)}

        residuals = {}  # add node -> (stream operand, contribution)
        for node in graph.nodes:
            split = _split_residual(node, ancestors)
            if split:
                residuals[node] = split
        chains = _chains(graph, residuals)
        path = _stream_path(graph, residuals)
        # the streams the prediction is read from, output side first: a single-stream DiT's image
        # stream, or FLUX's joint stream and the image stream that joins it
        on_path = [c for c in sorted(chains, key=lambda c: -order[c[-1]]) if path & set(c)]
        if not on_path:
            raise GraphcacheError(_no_stream_message(graph))
        image = on_path[-1]
        shape = ir.tensor_shape(image[0])
        if shape is None or len(shape) != 3:
            raise GraphcacheError(
                f"the residual stream at node '{image[0].name}' has shape {tuple(shape or ())}; "
                "graphcache expects (batch, tokens, channels)"
            )
        latents = {n.name for n in ir.upstream(residuals[image[0]][0]) if n.op == "placeholder"}
        streams, unclassified = _name_streams(chains, on_path, residuals, latents, ancestors, order)

        branches = []
        for name, chain in streams:
            for add in chain:
                stream, contribution = residuals[add]
                gate, out = _split_gate(contribution, stream, ancestors)
                between = ancestors(out.name) & nx.descendants(dg, stream.name)
                work = [n.name for n in graph.nodes if n.name in between] + [out.name]
                branches.append(
                    ir.Branch(
                        block=-1,
                        index=-1,
                        kind=_classify(work, stream, by_name, ancestors),
                        stream_in=stream.name,
                        branch_out=out.name,
                        gate=gate.name if gate is not None else None,
                        residual_add=add.name,
                        module=ir.module_path(out),
                        work=work,
                        stream=name,
                    )
                )
        branches.sort(key=lambda br: order[by_name[br.residual_add]])
        blocks = _group_blocks(branches, [ir.module_path(by_name[br.residual_add]) for br in branches])
        structure = ir.Structure(
            blocks=blocks,
            stream_start=residuals[image[0]][0].name,
            stream_end=on_path[0][-1].name,
            num_tokens=shape[1],
            hidden_size=shape[2],
            input_names=[n.name for n in graph.nodes if n.op == "placeholder"],
            streams=[ir.Stream(name, residuals[c[0]][0].name, c[-1].name, ir.tensor_shape(c[0])[1])
                     for name, c in streams],
            unclassified=unclassified,
        )
        for block in blocks:
            for br in block.branches:
                info = dict(block=block.index, branch=br.name, kind=br.kind)
                for name in br.work:
                    ir.tag(by_name[name], role="work", **info)
                ir.tag(by_name[br.stream_in], role="stream_in", **info)
                ir.tag(by_name[br.branch_out], role="branch_out", **info)
                ir.tag(by_name[br.residual_add], role="residual_add", **info)
                if br.gate:
                    ir.tag(by_name[br.gate], role="gate", **info)
                self.counters[f"branch.{br.kind}"] += 1
                if br.stream != ir.IMAGE:
                    self.counters[f"branch.{br.stream}"] += 1
            self.counters["block"] += 1
        gm.meta[ir.META_KEY] = structure
        return PassResult(gm, True)


class _AncestorCache:
    def __init__(self, dg):
        self.dg, self.cache = dg, {}

    def __call__(self, name: str) -> set[str]:
        if name not in self.cache:
            self.cache[name] = nx.ancestors(self.dg, name)
        return self.cache[name]


def _split_residual(node: fx.Node, ancestors) -> tuple[fx.Node, fx.Node] | None:
    """(the stream the branch reads, the branch's contribution) of a residual add, else None. The
    add may read the stream through a cast the branch does not (Wan adds in float32)."""
    if not ir.is_add(node) or len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    shape = ir.tensor_shape(node)
    if shape is None or len(shape) < 3:
        return None
    for stream, contribution in ((a, b), (b, a)):
        if ir.tensor_shape(stream) != shape or (stream is b and ir.tensor_shape(a) != shape):
            continue
        read = stream
        while read.name not in ancestors(contribution.name) and ir.passes_on(read):
            read = read.args[0]
        if read.name in ancestors(contribution.name):
            return read, contribution
    return None


def _strip_identity(node: fx.Node) -> fx.Node:
    """Follow the stream back through ops that pass it on unchanged (dropout, contiguous, casts, …),
    and through a concatenation of consecutive slices that covers one tensor whole (FLUX's
    single-stream blocks split the joint stream into text and image at their end and concatenate
    it again at the start of the next)."""
    while True:
        if ir.passes_on(node):
            node = node.args[0]
        elif (whole := _rejoined(node)) is not None:
            node = whole
        else:
            return node


def _rejoined(cat: fx.Node) -> fx.Node | None:
    """X, when `cat` is cat([X[a:b], X[b:c], …]) over all of X's extent along the cat's dimension."""
    if not ir.is_call(cat, ir.CAT_TARGETS) or not cat.args or not isinstance(cat.args[0], (list, tuple)):
        return None
    parts = cat.args[0]
    if len(parts) < 2 or not all(ir.is_call(p, ir.SLICE_TARGETS) for p in parts):
        return None
    whole = _strip_identity(parts[0].args[0])
    shape = ir.tensor_shape(whole)
    if shape is None:
        return None
    rank = len(shape)
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    position = 0
    for part in parts:
        source, axis, start, end, step = ir.slice_args(part)
        axis, start = (axis or 0) % rank, start or 0
        end = shape[axis] if end is None else min(end, shape[axis])
        if _strip_identity(source) is not whole or axis != dim % rank or step not in (None, 1) or start != position:
            return None
        position = end
    return whole if position == shape[dim % rank] else None


def _chains(graph, residuals) -> list[list[fx.Node]]:
    """Every maximal chain of residual adds, each add consuming the previous one's result."""
    chains: dict[fx.Node, list[fx.Node]] = {}  # last add -> its chain
    for node in graph.nodes:  # topological order
        if node in residuals:
            prev = _strip_identity(residuals[node][0])
            chains[node] = chains.pop(prev, []) + [node]
    return list(chains.values())


def _stream_path(graph, residuals) -> set[fx.Node]:
    """The nodes on the main data path back from the output: along the stream at a residual add,
    else along the largest tensor input (at a join of streams, the image tokens outnumber the
    text tokens in every MMDiT)."""
    output = next(n for n in graph.nodes if n.op == "output")
    node = output.args[0] if isinstance(output.args[0], fx.Node) else None
    path = set()
    while node is not None and node not in path:
        path.add(node)
        if node in residuals:
            node = residuals[node][0]
            continue
        inputs = [n for n in node.all_input_nodes if ir.tensor_shape(n) is not None and n.op != "get_attr"]
        node = max(inputs, key=lambda n: ir.tensor_shape(n).numel()) if inputs else None
    return path


def _name_streams(chains, on_path, residuals, latents, ancestors, order):
    """(stream name, chain) pairs, and one line per chain left out. The chains the prediction is
    read from are the image stream (the earliest) and the joint stream (after a join); a chain
    whose adds share their blocks with them is a text stream (an MMDiT's double-stream blocks).
    Adds that do not depend on the latent are conditioning (HunyuanVideo's token refiner), not
    cached: they are dropped from the head of a chain."""
    named = [(ir.IMAGE if c is on_path[-1] else ir.JOINT, c) for c in reversed(on_path)]
    owners = {ir.module_path(add) for _, c in named for add in c} - {""}
    unclassified = []
    for chain in sorted((c for c in chains if not any(c is k for _, k in named)), key=lambda c: order[c[0]]):
        live = [add for add in chain if latents & ancestors(add.name)]
        where = ir.module_path(chain[0]) or chain[0].name
        if len(live) < len(chain):
            unclassified.append(f"{len(chain) - len(live)} residual add(s) from {where} do not depend on the "
                                "latent: conditioning, computed once per step, not cached")
        if live and {ir.module_path(add) for add in live} <= owners:
            named.append((ir.TEXT, live))
        elif live:
            unclassified.append(f"{len(live)} residual add(s) from {ir.module_path(live[0]) or live[0].name} "
                                "are outside every block of the image stream: left as they are")
    rank = {ir.IMAGE: 0, ir.TEXT: 1, ir.JOINT: 2}
    return sorted(named, key=lambda pair: rank[pair[0]]), unclassified


def _split_gate(contribution: fx.Node, stream: fx.Node, ancestors):
    """contribution = gate * out with only `out` depending on the stream; else no gate."""
    if ir.is_mul(contribution) and len(contribution.args) == 2:
        a, b = contribution.args
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            a_dep = stream.name in ancestors(a.name) or a is stream
            b_dep = stream.name in ancestors(b.name) or b is stream
            if a_dep != b_dep:
                return (b, a) if a_dep else (a, b)
    return None, contribution


def _classify(work, stream, by_name, ancestors) -> str:
    for name in work:
        node = by_name[name]
        keys = None
        if ir.is_sdpa(node):
            keys = node.args[1] if len(node.args) > 1 else node.kwargs.get("key")
        elif ir.is_call(node, ir.SOFTMAX_TARGETS):
            keys = _logits_keys(node, stream, ancestors)
            if keys is None:
                return ir.ATTENTION
        if keys is not None:
            if not (isinstance(keys, fx.Node) and (keys is stream or stream.name in ancestors(keys.name))):
                return ir.CROSS_ATTENTION
            return ir.PARALLEL if _bypasses(work, name, stream, by_name) else ir.ATTENTION
    return ir.MLP


def _bypasses(work, attention: str, stream, by_name) -> bool:
    """Whether the branch output is reached from the stream by a path that avoids the attention
    node: an MLP working side by side with the attention (FLUX's single-stream blocks). Only
    values count: not a size, dtype or device read off the stream (`ir.data_inputs`)."""
    # an explicit attention softmax(q k^T) @ v takes the values in its second matmul
    core = {attention} | {user.name for user in by_name[attention].users if ir.is_call(user, ir.MATMUL_TARGETS)}
    reached = {stream.name}
    for name in work:
        if name not in core and any(inp.name in reached for inp in ir.data_inputs(by_name[name])):
            reached.add(name)
    return work[-1] in reached


def _logits_keys(softmax: fx.Node, stream: fx.Node, ancestors) -> fx.Node | None:
    """For an explicit softmax(q @ k^T ...): the matmul operand that does not come from the stream
    (the keys of a cross-attention), else the second operand; None if no matmul feeds the softmax.
    The nearest matmul upstream of the softmax (breadth first) computes the attention logits."""
    queue, seen = [softmax.args[0]] if softmax.args and isinstance(softmax.args[0], fx.Node) else [], set()
    while queue:
        node = queue.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if ir.is_call(node, ir.MATMUL_TARGETS):
            operands = [a for a in ir.flat_inputs(node) if a.op != "get_attr"]
            foreign = [a for a in operands if a is not stream and stream.name not in ancestors(a.name)]
            return foreign[0] if foreign else (operands[-1] if operands else None)
        queue.extend(node.all_input_nodes)
    return None


def _group_blocks(branches: list[ir.Branch], owners: list[str]) -> list[ir.Block]:
    """Consecutive residual adds owned by the same module form a block; adds written at the top
    level of a flat forward are grouped so that each self-attention branch starts a new block."""
    groups: list[list[int]] = []
    for i, (br, owner) in enumerate(zip(branches, owners)):
        new = not groups or (owner != owners[groups[-1][-1]] if owner else br.kind == ir.ATTENTION)
        if new:
            groups.append([i])
        else:
            groups[-1].append(i)
    blocks = []
    for b, members in enumerate(groups):
        counts: dict[str, int] = {}
        for j, i in enumerate(members):
            br = branches[i]
            br.block, br.index = b, j
            stem = f"text_{br.kind}" if br.stream == ir.TEXT else br.kind
            counts[stem] = counts.get(stem, 0) + 1
            br.name = f"b{b}_{stem}" + (str(counts[stem] - 1) if counts[stem] > 1 else "")
        main = [i for i in members if branches[i].stream != ir.TEXT] or members
        blocks.append(
            ir.Block(
                index=b,
                stream_in=branches[main[0]].stream_in,
                stream_out=branches[main[-1]].residual_add,
                module=owners[members[0]],
                branches=[branches[i] for i in members],
            )
        )
    return blocks


def _no_stream_message(graph: fx.Graph) -> str:
    """Walk back from the output along the main data path and name where discovery stopped."""
    output = next(n for n in graph.nodes if n.op == "output")
    node = output.args[0] if isinstance(output.args[0], fx.Node) else None
    last = output
    while node is not None:
        last = node
        inputs = [n for n in node.all_input_nodes if ir.tensor_shape(n) is not None and n.op != "get_attr"]
        if not inputs:
            break
        node = max(inputs, key=lambda n: ir.tensor_shape(n).numel())
    return (
        "no residual stream found: no add of the form x + f(x) with a (batch, tokens, channels) "
        f"stream; discovery stopped at node '{last.name}' ({last.op} {getattr(last.target, '__name__', last.target)})"
        " walking back from the output"
    )
