"""The `onnx` backend: one ONNX file per variant's main graph, run by onnxruntime.

Export goes through `torch.onnx.export(exported_program, dynamo=True)` (needs onnxscript);
every file is checked with `onnx.checker.check_model` (by path, so models with external weights
are checked too). Dynamic axes are the batch and the token counts (`torch.empty(k)` inputs).
The runner keeps one `InferenceSession` per variant; on CPU, inputs and outputs cross as NumPy
arrays that share memory with the torch tensors (no copies), on CUDA through IO binding.
Inputs the exporter found unused (e.g. a token count only read for a shape it folded) are not
fed.

Weights are stored once for all variants: every file's initializers that are model weights are
ONNX external data pointing into the shared `weights.safetensors` (a safetensors file is a JSON
header followed by each tensor's raw little-endian bytes, which is exactly ONNX's external-data
layout, so the offsets are read from its header). For that the exporter's optimizer must leave
the weights as they are: it would otherwise fold `Transpose(W)` of every linear layer into a
new, unshared initializer; onnxruntime folds those itself when it loads the session. Every file
stays a plain ONNX model that any ONNX tool (TensorRT's parser included) reads on its own.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import GraphcacheError

SUFFIX = ".onnx"
WEIGHTS_IN_MEMORY = False  # the files reference the weights file beside them; onnxruntime reads it


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise GraphcacheError(
            f"the onnx backend needs the Python package {module!r}: pip install 'graphcache[onnx]'"
        ) from None


def check(cached) -> None:
    """Before exporting anything: the packages the export and the runner need are there."""
    for module in ("onnxscript", "onnx", "onnxruntime"):
        _require(module)


def build(variant, path: Path, weights_file: Path) -> None:
    """The ONNX file of `variant`'s main graph at `path`, its weights read from `weights_file`
    (in the same directory), checked."""
    onnx = _require("onnx")
    optimizer = _require("onnxscript.optimizer")
    sig = variant.sig
    program = torch.onnx.export(variant.main, dynamo=True, input_names=list(sig.inputs),
                                output_names=list(sig.outputs), verbose=False, optimize=False,
                                custom_translation_table={torch.ops.aten.sort.stable: _sort_stable})
    stored = safetensors_layout(weights_file)
    optimizer.optimize_ir(program.model, should_fold=lambda node: False if _reads(node, stored) else None)
    model = _require("onnx_ir").serde.serialize_model(program.model)  # onnxscript's IR package
    for tensor in model.graph.initializer:
        _point_into(tensor, stored.get(tensor.name), weights_file.name)
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path), full_check=False)


# safetensors dtype codes -> ONNX TensorProto data types (those a model's weights may have)
_ONNX_TYPES = {"F64": 11, "F32": 1, "F16": 10, "BF16": 16, "I64": 7, "I32": 6, "I16": 5, "I8": 3, "U8": 2,
               "BOOL": 9}


def safetensors_layout(path: Path) -> dict[str, tuple[int, list[int], int, int]]:
    """{tensor name: (ONNX data type, shape, byte offset in the file, byte length)} of a
    safetensors file, read from its header alone."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    layout = {}
    for name, entry in header.items():
        if name == "__metadata__" or entry["dtype"] not in _ONNX_TYPES:
            continue
        begin, end = entry["data_offsets"]
        layout[name] = (_ONNX_TYPES[entry["dtype"]], list(entry["shape"]), 8 + size + begin, end - begin)
    return layout


def _reads(node, stored) -> bool:
    """Whether the ONNX IR `node` reads one of the stored weights (folding it would copy it)."""
    return any(v is not None and v.is_initializer() and v.name in stored for v in node.inputs)


def _point_into(tensor, entry, location: str) -> None:
    """Make the initializer `tensor` external data at `entry` of the weights file, when that
    entry is the same tensor (name, type and shape); anything else stays in the ONNX file."""
    if entry is None:
        return
    data_type, shape, offset, length = entry
    if tensor.data_type != data_type or list(tensor.dims) != shape:
        return
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                  "external_data"):
        tensor.ClearField(field)
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        item = tensor.external_data.add()
        item.key, item.value = key, str(value)
    tensor.data_location = tensor.EXTERNAL


def _sort_stable(self, *, stable=None, dim: int = -1, descending: bool = False):
    """aten.sort.stable (ClusCa's tokens_per_cluster > 1) as ONNX TopK over the whole axis: the
    ONNX spec orders equal elements by index, which is exactly a stable sort."""
    from onnxscript import opset18 as op

    size = op.Reshape(op.Gather(op.Shape(self), dim, axis=0), op.Constant(value_ints=[1]))
    return op.TopK(self, size, axis=dim, largest=descending, sorted=True)


class Runner:
    """An onnxruntime session fed with the tensors of `sig.inputs` (those the file kept)."""

    def __init__(self, path: Path, sig, device, weights=None):  # weights: the file references them
        ort = _require("onnxruntime")
        device = torch.device(device)
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise GraphcacheError(
                    "this onnxruntime has no CUDA provider: install onnxruntime-gpu or run the artifact on cpu"
                )
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.device = device
        kept = {i.name for i in self.session.get_inputs()}
        self.feed = [(i, name) for i, name in enumerate(sig.inputs) if name in kept]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, *tensors):
        if self.device.type == "cpu":
            feeds = {name: tensors[i].detach().contiguous().numpy() for i, name in self.feed}
            return [torch.from_numpy(np.asarray(a)) for a in self.session.run(self.outputs, feeds)]
        binding = self.session.io_binding()
        for i, name in self.feed:
            t = tensors[i].contiguous()
            binding.bind_input(name, self.device.type, self.device.index or 0, _numpy_dtype(t.dtype),
                               tuple(t.shape), t.data_ptr())
        for name in self.outputs:
            binding.bind_output(name, self.device.type, self.device.index or 0)
        self.session.run_with_iobinding(binding)
        return [torch.from_dlpack(v.to_dlpack()) if hasattr(v, "to_dlpack")
                else torch.from_numpy(v.numpy()).to(self.device)
                for v in binding.get_outputs()]


def _numpy_dtype(dtype: torch.dtype):
    return torch.empty(0, dtype=dtype).numpy().dtype.type


def versions() -> dict:
    out = {}
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out
