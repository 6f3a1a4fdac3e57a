"""Capture: export a model with torch.export (non-strict), record shapes, annotate its residual structure.

Every model is captured the same way, the built-in DiT and diffusers' transformers alike.
torch.export runs the forward once with fake tensors and records what it did as ATen operators,
so Python control flow on shapes or config flags (diffusers is full of it) is specialised away
and the passes see one vocabulary of operators (ir.py) whatever module wrote them. The whole
forward is inlined, so the passes can see inside attention: ToCa's attention-map pass finds the
SDPA node and its q/k/v without knowing how a model lays out its qkv projection.

The batch dimension stays symbolic (`Dim.AUTO`): one graph serves the CFG batch, another number
of images and the hoisted conditioning's steps stacked along the batch. Token counts are static;
other resolutions are captured again. Parameters stay the model's own (get_attr nodes resolve to
the same tensors): variants never copy weights.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses import FakeTensorMode
from torch.export import Dim
from torch.fx.passes.shape_prop import ShapeProp

from . import ir
from .errors import GraphcacheError, exception_line, one_line
from .passes.annotate_blocks import AnnotateBlocksPass
from .passes.manager import PassManager, PassPipelineError

# what export leaves in the graph that is not the model's computation: its input guards and dtype
# assertions (they would pin the example's shapes and dtypes)
_ASSERTIONS = {torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default,
               torch.ops.aten.sym_constrain_range_for_size.default}


def example_inputs(model: torch.nn.Module, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """(x, t, y) for a class-conditional diffusion model exposing in_channels/input_size."""
    try:  # attributes of the model itself (diffusers models keep theirs in `config`)
        c, s = vars(model)["in_channels"], vars(model)["input_size"]
    except KeyError:
        raise GraphcacheError(
            f"{type(model).__name__} has no in_channels/input_size attributes: pass example_inputs"
        ) from None
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    return (
        torch.zeros(batch, c, s, s, device=device, dtype=dtype),
        torch.zeros(batch, dtype=torch.long, device=device),
        torch.zeros(batch, dtype=torch.long, device=device),
    )


def with_batch(inputs, batch: int, batched) -> list[torch.Tensor]:
    """Flat graph inputs resized to `batch` rows (rows repeat cyclically): a captured call's inputs
    at another batch size, for models that have no `example_inputs`. `batched` says, per input,
    whether its dim 0 is the batch (`CallSpec.symbolic_batch`): FLUX's token positions `img_ids`
    and `txt_ids` have none and keep their shape."""
    return [t[torch.arange(batch, device=t.device) % t.shape[0]] if is_batch else t
            for t, is_batch in zip(inputs, batched, strict=True)]


def shapes_recorded(gm: fx.GraphModule, inputs) -> bool:
    """Whether `gm`'s `tensor_meta` was last recorded for tensor inputs of these shapes and dtypes
    (any other input, or another number of them, counts as not recorded)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        return False
    for node, value in zip(placeholders, inputs):
        meta = node.meta.get("tensor_meta")
        if not isinstance(value, torch.Tensor) or meta is None:
            return False
        if tuple(meta.shape) != tuple(value.shape) or meta.dtype != value.dtype:
            return False
    return True


def propagate_shapes(gm: fx.GraphModule, inputs) -> None:
    """Record `tensor_meta` on every node, computing on fake tensors only. Nothing to do when the
    inputs have the shapes last recorded: fake dispatch over a whole DiT-XL/2 graph is slow, and the
    first call of every cached model at the capture's own shapes (a CFG batch of 2) would otherwise pay for."""
    if shapes_recorded(gm, inputs):
        return
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs]
        ShapeProp(gm).propagate(*fake)


def call_arguments(model: torch.nn.Module, args=(), kwargs=None) -> dict:
    """A call's arguments by parameter name, in the forward's order: how graphcache captures and
    later matches calls, so that `model(x, t)` and `model(x, timestep=t)` are the same call."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **dict(kwargs or {}))
    except TypeError as e:
        raise GraphcacheError(f"{type(model).__name__}.forward does not take these inputs: {e}") from None
    named = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            raise GraphcacheError(f"{type(model).__name__}.forward takes *{name}: graphcache needs named inputs")
        named.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
    return named


def _batch_of_two(arguments: dict) -> dict:
    """The arguments with every batch of 1 repeated to 2: export specialises a dimension of size 1
    (0/1 specialisation), and one image without guidance would pin every graph to a batch of 1."""
    def widen(value):
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == 1:
            return value.expand(2, *value.shape[1:])
        return value
    return pytree.tree_map(widen, arguments)


def _batch_dynamic(arguments: dict) -> dict:
    """dynamic_shapes for export: dim 0 of every tensor input of rank >= 1 is `Dim.AUTO` (export
    makes it symbolic where the model allows, and equal across inputs where the model needs)."""
    def spec(value):
        return {0: Dim.AUTO} if isinstance(value, torch.Tensor) and value.dim() >= 1 else None
    return {name: pytree.tree_map(spec, value) for name, value in arguments.items()}


class TensorLeaf:
    """CallSpec.constants' mark of a leaf that is a tensor (a graph input)."""

    def __repr__(self):
        return "<tensor>"


TENSOR = TensorLeaf()


@dataclass(frozen=True)
class CallSpec:
    """How a call of the model maps onto its captured graph. The call's arguments, by name
    (`call_arguments`), flatten into leaves: the tensors are the graph's inputs, in order; every
    other leaf (None, a flag, a number) was specialised at capture and must come again with the
    same value. `output` wraps the graph's one output tensor as the model returns it (a tensor, a
    tuple, diffusers' output dataclass)."""

    inputs: pytree.TreeSpec
    constants: tuple  # per leaf: TENSOR for a graph input, else the value captured
    output: pytree.TreeSpec
    symbolic_batch: tuple[bool, ...]  # per graph input: whether its first dimension is the (symbolic) batch

    def signature(self, flat) -> list[tuple]:
        """What the graph is specialised on, input by input: the shape (past the batch where the
        batch is symbolic), the dtype and the device (export bakes the dtypes and devices of the
        tensors the forward creates into the graph)."""
        return [(tuple(t.shape[1:] if symbolic else t.shape), t.dtype, t.device)
                for t, symbolic in zip(flat, self.symbolic_batch)]

    def flatten(self, arguments: dict) -> list[torch.Tensor] | None:
        """The graph's inputs for a call with these arguments; None if the call is not one this
        capture serves (other arguments given, another structure, another flag or number)."""
        leaves, spec = pytree.tree_flatten(arguments)
        if spec != self.inputs:
            return None
        for leaf, constant in zip(leaves, self.constants):
            if isinstance(leaf, torch.Tensor) != isinstance(constant, TensorLeaf):
                return None
            if not isinstance(leaf, torch.Tensor) and not _same_constant(leaf, constant):
                return None
        return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]

    def unflatten(self, output: torch.Tensor):
        """The model's return value around the graph's output."""
        return pytree.tree_unflatten([output], self.output)


def _same_constant(a, b) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # a value without a usable ==: only itself matches
        return a is b


def _drop_noop_squeezes(graph: fx.Graph) -> None:
    """Remove `squeeze(x, dim)` where that dim of x is a static size other than 1 (a no-op that
    diffusers' blocks leave behind: `hidden_states.squeeze(1)` on a 3-d tensor). ONNX's Squeeze
    refuses such a dim, and no backend needs the node."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims):
            continue
        shape = node.args[0].meta["val"].shape
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        if all(isinstance(shape[d], int) and shape[d] != 1 for d in dims):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


def _pin_static_view_sizes(graph: fx.Graph) -> None:
    """Write the size a view's or reshape's -1 stands for when export found it to be 1. Export
    infers it from the input's size, and each input has its own batch symbol: PixArt's
    `encoder_attention_mask.view(batch, heads, -1, text)` divides the mask's batch by the latents'
    there, a quotient that a later export of the variant cannot prove to be 1 (it broadcasts
    against the queries). With the 1 written, that export sees that the two batches are equal.
    Other sizes keep their -1: a token axis written as -1 is what lets a branch's work run on
    the selected tokens only (passes/token_select.py)."""
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in (torch.ops.aten.view.default,
                                                             torch.ops.aten.reshape.default):
            continue
        sizes = list(node.args[1])
        if -1 in sizes:
            known = node.meta["val"].shape[sizes.index(-1)]
            if isinstance(known, int) and known == 1:
                sizes[sizes.index(-1)] = known
                node.args = (node.args[0], sizes, *node.args[2:])


def export_graph(model: torch.nn.Module, args=(), kwargs=None) -> tuple[fx.GraphModule, CallSpec]:
    """`model`'s forward on these inputs as a flat GraphModule of ATen operators over the model's
    own parameters: placeholders are the call's tensor inputs in pytree order (by parameter name),
    the output is the one output tensor; and the CallSpec that maps a call of the model onto them."""
    arguments = call_arguments(model, args, kwargs)
    try:
        exported = torch.export.export(model, (), _batch_of_two(arguments), strict=False,
                                       dynamic_shapes=_batch_dynamic(arguments))
    except Exception as e:  # export raises many types; the user needs one line
        raise GraphcacheError(f"cannot capture {type(model).__name__} with torch.export: {exception_line(e)}") from e
    unlifted = exported.module()
    graph = unlifted.graph
    _drop_noop_squeezes(graph)
    _pin_static_view_sizes(graph)
    for node in list(graph.nodes):
        if node.op == "call_module" or (node.op == "call_function" and node.target in _ASSERTIONS):
            graph.erase_node(node)  # export's guard module and assertions: nothing reads them
    leaves, in_spec = pytree.tree_flatten(arguments)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    symbolic_batch = []
    batch = next(leaf.shape[0] for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.dim() > 0)
    for node, leaf in zip(placeholders, leaves, strict=True):
        if not isinstance(leaf, torch.Tensor):  # specialised: export baked its value in
            graph.erase_node(node)
        else:
            # a symbolic dim 0 is the batch when it has the latents' (first input's) size: FLUX's
            # token positions `txt_ids` and `img_ids` have symbolic first dims too, sized by the
            # text and the image (export only pins their sum)
            value = node.meta.get("val")
            symbolic_batch.append(value is not None and value.dim() > 0 and isinstance(value.shape[0], torch.SymInt)
                                  and leaf.shape[0] == batch)
    for node in graph.nodes:  # export's shapes are symbolic in the batch; propagate_shapes records concrete ones
        node.meta.pop("tensor_meta", None)
        value = node.meta.pop("val", None)
        # which sizes are one symbol (HoistConditioningPass reads a latent's batch off the text's)
        if node.target is ir.SYM_SIZE and isinstance(value, torch.SymInt):
            node.meta[ir.SIZE_SYMBOL] = str(value.node.expr)
        elif node.op == "placeholder" and isinstance(value, torch.Tensor):
            node.meta[ir.DIM_SYMBOLS] = tuple(str(d.node.expr) if isinstance(d, torch.SymInt) else None
                                              for d in value.shape)
    output = next(n for n in graph.nodes if n.op == "output")
    outputs = pytree.tree_leaves(output.args[0])
    if len(outputs) != 1 or not isinstance(outputs[0], fx.Node):
        raise GraphcacheError(f"{type(model).__name__} returns {len(outputs)} tensors; graphcache expects one "
                              "(the model's prediction)")
    output.args = (outputs[0],)
    ir.eliminate_dead_code(graph)  # export keeps the unused outputs of multi-output ops (chunks)
    graph._codegen = fx.graph.CodeGen()  # flat inputs and output: the runtime maps the call onto them
    # The unlifted module holds the model's own parameters and buffers (the same tensors, so
    # variants share the weights) plus the constants export lifted out of the forward.
    gm = fx.GraphModule(unlifted, graph, class_name=type(model).__name__)
    constants = tuple(TENSOR if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves)
    return gm, CallSpec(in_spec, constants, exported.call_spec.out_spec, tuple(symbolic_batch))


def capture(model: torch.nn.Module, inputs=None, kwargs=None) -> fx.GraphModule:
    """Export `model` on `inputs` (positional, default `example_inputs(model)`) and `kwargs`,
    record shapes, find its blocks. The returned GraphModule shares the model's parameters and
    carries `gm.meta["graphcache"]` (ir.Structure)."""
    return capture_call(model, inputs, kwargs)[0]


def capture_call(model: torch.nn.Module, inputs=None, kwargs=None) -> tuple[fx.GraphModule, CallSpec]:
    """`capture`, and the CallSpec mapping calls of the model onto the captured graph."""
    model.eval()
    inputs = tuple(inputs) if inputs is not None else (example_inputs(model) if not kwargs else ())
    gm, spec = export_graph(model, inputs, kwargs)
    flat = spec.flatten(call_arguments(model, inputs, kwargs))
    try:
        propagate_shapes(gm, flat)
    except Exception as e:
        raise GraphcacheError(f"cannot run {type(model).__name__} on example inputs: {one_line(e)}") from e
    try:
        PassManager([AnnotateBlocksPass()], name="capture")(gm)
    except PassPipelineError as e:
        if isinstance(e.cause, GraphcacheError):  # the pass's own explanation of what it could not find
            raise e.cause from None
        raise GraphcacheError(f"cannot find the blocks of {type(model).__name__}: {e}") from e
    return gm, spec
