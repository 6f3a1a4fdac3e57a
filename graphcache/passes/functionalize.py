"""Passes that turn a variant into pure functions an exporter can take (graphcache/exporters/).

A variant as the runtime runs it reads cache slots as module buffers, writes them with the
mutating `cache_write` op, draws from the global RNG, receives token counts as Python ints and
runs K-means (a host-synchronising custom op). Exporters need a pure function of tensors, so a
copy of the variant is rewritten by, in order:

* `FunctionalizeCachePass`: every slot read becomes a graph input `cache__<slot>` (or the value
  written before it), a slot's last write a graph output `new_cache__<slot>` (an in-place token
  scatter becomes an out-of-place one); the variant is `(x, t, y, …, cache…) -> (out, cache…)`.
* `HoistRandomPass`: the random draws move to a *prologue* graph (the draws and what their
  shapes are computed from), run eagerly before the main graph, in graph order, so they consume
  the global RNG exactly as the eager variant does; the main graph gets them as `random__<i>`.
* `SplitHostOpsPass`: host operations (K-means) whose results only feed cache outputs move to an
  *epilogue* graph run after the main graph on its outputs `host__<i>`.
* `TokenCountAsShapePass`: a token count `gc_tokens_b<i>` becomes a tensor input of shape (k,),
  read back as its size, so k is a dynamic *dimension* (exporters have no dynamic ints).
* `DropUnusedInputsPass`: inputs nothing reads are removed (exporters disagree about them).

What each graph reads and writes is recorded in `gm.meta[FUNCTIONAL_KEY]` (see `Signature`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .. import ir
from ..cache import CACHE_ATTR, slot_name
from ..ops import CACHE_UPDATES, HOST_OPS, RANDOM_FUNCTIONS, is_cache_write
from ..schedule import is_token_input
from .base import Pass, PassError, PassResult

CACHE_PREFIX = "cache__"
NEW_CACHE_PREFIX = "new_cache__"  # outputs: ONNX wants every value named once, inputs included
RANDOM_PREFIX = "random__"
HOST_PREFIX = "host__"
OUTPUT = "out"
FUNCTIONAL_KEY = "graphcache_functional"


@dataclass
class Signature:
    """Names of a functional variant's inputs and outputs, and its prologue/epilogue graphs.

    `inputs`/`outputs` are the main graph's, in order: inputs are the model's own (x, t, y),
    per-step inputs, `cache__<slot>`, `random__<i>`; outputs are `out`, `new_cache__<slot>` for
    the slots it writes, and `host__<i>` (values the epilogue needs). The epilogue's outputs are
    `new_cache__<slot>` names too. A runner keeps one dict of named values per call."""

    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    prologue: fx.GraphModule | None = None
    prologue_inputs: list[str] = field(default_factory=list)
    prologue_outputs: list[str] = field(default_factory=list)
    epilogue: fx.GraphModule | None = None
    epilogue_inputs: list[str] = field(default_factory=list)
    epilogue_outputs: list[str] = field(default_factory=list)

    NAMES = ("inputs", "outputs", "prologue_inputs", "prologue_outputs", "epilogue_inputs", "epilogue_outputs")

    def names(self) -> dict[str, list[str]]:
        """The name lists (JSON), without the graphs."""
        return {k: list(getattr(self, k)) for k in self.NAMES}

    @classmethod
    def from_names(cls, names: dict) -> "Signature":
        return cls(**{k: list(names.get(k, [])) for k in cls.NAMES})

    def cache_outputs(self) -> list[str]:
        names = [n for n in self.outputs + self.epilogue_outputs if n.startswith(NEW_CACHE_PREFIX)]
        return [n.removeprefix(NEW_CACHE_PREFIX) for n in names]


def signature(gm: fx.GraphModule) -> Signature:
    """The graph's Signature (its `inputs` are filled in by `functionalize`, after every pass)."""
    return gm.meta.setdefault(FUNCTIONAL_KEY, Signature())


def placeholder_names(graph: fx.Graph) -> list[str]:
    return [n.target for n in graph.nodes if n.op == "placeholder"]


def _output_values(graph: fx.Graph) -> list:
    return list(graph.output_node().args[0])


def _set_outputs(graph: fx.Graph, values: list) -> None:
    out = graph.output_node()
    out.args = (tuple(values),)


class FunctionalizeCachePass(Pass):
    """Cache reads become inputs and cache writes outputs: `(…, cache…) -> (out, cache…)`.

    Slots are followed in graph order, as eager runs them: a read sees the slot's input or the
    last value written before it; `cache_write` sets that value, an in-place update sets it to the
    update's out-of-place form (`ops.CACHE_UPDATES`: `cache_scatter(slot, idx, values)` becomes
    `scatter_tokens(value, idx, values)`); the last value is the slot's output."""

    def requires(self, gm):
        if FUNCTIONAL_KEY in gm.meta:
            raise PassError("the graph is functional already")

    def call(self, gm):
        graph = gm.graph
        slot_of = {n: slot_name(n.args[0]) for n in graph.nodes if is_cache_write(n)}
        inputs: dict[str, fx.Node] = {}
        current: dict[str, fx.Node] = {}  # each slot's value at this point of the graph
        for node in list(graph.nodes):
            slot = slot_name(node)
            if slot is not None:
                if slot not in current:
                    inputs[slot] = current[slot] = ir.graph_input(graph, CACHE_PREFIX + slot)
                    self.counters["cache_input"] += 1
                node.replace_all_uses_with(current[slot])
                graph.erase_node(node)
            elif node in slot_of:
                if node.target in CACHE_UPDATES:
                    with graph.inserting_before(node):
                        value = graph.call_function(CACHE_UPDATES[node.target], node.args)
                else:
                    value = node.args[1]
                current[slot_of[node]] = value
                graph.erase_node(node)
        written = {slot: current[slot] for slot in dict.fromkeys(slot_of.values())}
        if written:
            self.counters["cache_output"] = len(written)
        for slot, node in list(inputs.items()):
            if not node.users:  # written here, read only by other variants
                graph.erase_node(node)
                self.counters["cache_input"] -= 1
        if hasattr(gm, CACHE_ATTR):  # the buffers are inputs now: exporters must not see them
            delattr(gm, CACHE_ATTR)
        (out,) = graph.output_node().args
        _set_outputs(graph, [out, *written.values()])
        sig = signature(gm)
        sig.outputs = [OUTPUT, *(NEW_CACHE_PREFIX + s for s in written)]
        return PassResult(gm, bool(inputs or written))

    def ensures(self, gm):
        for node in gm.graph.nodes:
            if is_cache_write(node) or slot_name(node) is not None:
                raise PassError(f"{node.name} still touches the cache buffers")


def _copy_subgraph(gm: fx.GraphModule, keep: set[fx.Node], env: dict, outputs) -> fx.GraphModule:
    """A GraphModule of the nodes in `keep` (graph order); `env` maps outside nodes to the new
    graph's placeholders and is filled with the copies; `outputs(env)` gives the output tuple."""
    graph = fx.Graph()
    for name, node in list(env.items()):
        env[node] = graph.placeholder(name)
        del env[name]
    for node in gm.graph.nodes:
        if node in keep and node not in env:
            env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(tuple(outputs(env)))
    sub = fx.GraphModule(gm, graph)
    sub.graph.lint()
    return sub


class HoistRandomPass(Pass):
    """Random draws (and the shape computations they need) move to an eager prologue graph."""

    def __init__(self, targets=None):
        super().__init__()
        self.targets = set(RANDOM_FUNCTIONS if targets is None else targets)

    def requires(self, gm):
        if FUNCTIONAL_KEY not in gm.meta:
            raise PassError("run FunctionalizeCachePass first")

    def call(self, gm):
        graph = gm.graph
        draws = [n for n in graph.nodes if n.op == "call_function" and n.target in self.targets]
        if not draws:
            return PassResult(gm, False)
        needed = ir.upstream(draws)
        env = {n.target: n for n in graph.nodes if n.op == "placeholder" and n in needed}
        sig = signature(gm)
        sig.prologue = _copy_subgraph(gm, needed, env, lambda e: [e[d] for d in draws])
        sig.prologue_inputs = placeholder_names(sig.prologue.graph)
        sig.prologue_outputs = []
        for i, draw in enumerate(draws):
            name = f"{RANDOM_PREFIX}{i}"
            draw.replace_all_uses_with(ir.graph_input(graph, name))
            graph.erase_node(draw)
            sig.prologue_outputs.append(name)
            self.counters["draw"] += 1
        return PassResult(gm, True)

    def ensures(self, gm):
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in self.targets:
                raise PassError(f"random draw {node.name} left in the main graph")


class SplitHostOpsPass(Pass):
    """Host ops whose results only become cache outputs move to an eager epilogue graph."""

    def __init__(self, targets=None):
        super().__init__()
        self.targets = set(HOST_OPS if targets is None else targets)

    def call(self, gm):
        graph = gm.graph
        hosts = [n for n in graph.nodes if n.op == "call_function" and n.target in self.targets]
        if not hosts:
            return PassResult(gm, False)
        moved: set[fx.Node] = set()
        todo = list(hosts)
        while todo:
            n = todo.pop()
            if n not in moved:
                moved.add(n)
                todo.extend(u for u in n.users if u.op != "output")
        sig = signature(gm)
        outputs = _output_values(graph)
        names = list(sig.outputs)
        if any(v in moved for v, name in zip(outputs, names) if not name.startswith(NEW_CACHE_PREFIX)):
            self.decline(hosts[0].name, "a host op feeds the model's output, not only the cache")
            return PassResult(gm, False)
        boundary = list(dict.fromkeys(a for n in graph.nodes if n in moved for a in n.all_input_nodes if a not in moved))
        env, host_names = {}, []
        for node in boundary:
            name = node.target if node.op == "placeholder" else f"{HOST_PREFIX}{len(host_names)}"
            if node.op != "placeholder":
                host_names.append((name, node))
            env[name] = node
        epi_outputs = [(name, v) for v, name in zip(outputs, names) if v in moved]
        sig.epilogue = _copy_subgraph(gm, moved, env, lambda e: [e[v] for _, v in epi_outputs])
        sig.epilogue_inputs = placeholder_names(sig.epilogue.graph)
        sig.epilogue_outputs = [name for name, _ in epi_outputs]
        kept = [(name, v) for v, name in zip(outputs, names) if v not in moved] + host_names
        _set_outputs(graph, [v for _, v in kept])
        sig.outputs = [name for name, _ in kept]
        for node in reversed(list(graph.nodes)):
            if node in moved:
                graph.erase_node(node)
        self.counters["host_op"] += len(hosts)
        return PassResult(gm, True)


class TokenCountAsShapePass(Pass):
    """`gc_tokens_b<i>` (an int k) becomes a (k,) tensor input; the graph reads k as its size."""

    def call(self, gm):
        changed = False
        for node in list(gm.graph.nodes):
            if node.op == "placeholder" and is_token_input(node.target):
                with gm.graph.inserting_after(node):
                    size = gm.graph.call_function(torch.ops.aten.sym_size.int, (node, 0))
                node.replace_all_uses_with(size, delete_user_cb=lambda u: u is not size)
                node.type = torch.Tensor
                self.counters["token_count"] += 1
                changed = True
        return PassResult(gm, changed)


class DropUnusedInputsPass(Pass):
    """Inputs nothing reads are removed (a DuCa skip step reads no x, only its shape), after dead
    code: the signature then lists what the variant reads. (The ONNX exporter drops unused inputs
    from its files, AOTInductor keeps them: one list that fits both.)"""

    def call(self, gm):
        gm.graph.eliminate_dead_code()  # pure now: what no output needs goes, shape reads included
        for node in list(gm.graph.nodes):
            if node.op == "placeholder" and not node.users:
                gm.graph.erase_node(node)
                self.counters["dropped"] += 1
        return PassResult(gm, self.counters["dropped"] > 0)


def functionalize(gm: fx.GraphModule) -> tuple[fx.GraphModule, Signature]:
    """A functional copy of variant `gm` (the variant itself is left as it is) and its signature."""
    from .manager import PassManager

    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    copy = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    copy.meta.update({k: v for k, v in gm.meta.items() if k != FUNCTIONAL_KEY})
    PassManager([FunctionalizeCachePass(), HoistRandomPass(), SplitHostOpsPass(),
                 TokenCountAsShapePass(), DropUnusedInputsPass()])(copy)
    sig = signature(copy)
    sig.inputs = placeholder_names(copy.graph)
    return copy, sig


__all__ = [
    "CACHE_PREFIX", "FUNCTIONAL_KEY", "NEW_CACHE_PREFIX", "HOST_PREFIX", "OUTPUT", "RANDOM_PREFIX", "FunctionalizeCachePass",
    "DropUnusedInputsPass", "HoistRandomPass", "Signature", "SplitHostOpsPass", "TokenCountAsShapePass", "functionalize",
]
