"""Capture: trace a model with torch.fx, propagate shapes, and annotate its residual structure.

The whole forward is traced inline (torch.nn layers are the only leaves), so the passes can see
inside attention: ToCa's attention-map pass finds the SDPA node and its q/k/v without knowing how
a model lays out its qkv projection. Shapes come from fake tensors: no real compute, no memory.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp

from .errors import GraphcacheError
from .passes.annotate_blocks import AnnotateBlocksPass
from .passes.manager import PassManager, PassPipelineError


def example_inputs(model: torch.nn.Module, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """(x, t, y) for a class-conditional diffusion model exposing in_channels/input_size."""
    try:
        c, s = model.in_channels, model.input_size
    except AttributeError:
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


def capture(model: torch.nn.Module, inputs=None) -> fx.GraphModule:
    """Trace `model`, record shapes for `inputs` (default: `example_inputs(model)`), find its blocks.

    The returned GraphModule shares the model's parameters and carries `gm.meta["graphcache"]`.
    """
    model.eval()
    try:
        graph = fx.Tracer().trace(model)
    except Exception as e:  # fx raises many types; the user needs one line
        raise GraphcacheError(f"cannot trace {type(model).__name__} with torch.fx: {e}".splitlines()[0]) from e
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    inputs = inputs if inputs is not None else example_inputs(model)
    try:
        propagate_shapes(gm, inputs)
    except Exception as e:
        raise GraphcacheError(f"cannot run {type(model).__name__} on example inputs: {e}".splitlines()[0]) from e
    try:
        PassManager([AnnotateBlocksPass()], name="capture")(gm)
    except PassPipelineError as e:
        if isinstance(e.cause, GraphcacheError):  # the pass's own explanation of what it could not find
            raise e.cause from None
        raise GraphcacheError(f"cannot find the blocks of {type(model).__name__}: {e}") from e
    return gm
