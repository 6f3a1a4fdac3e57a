"""The `onnx` backend: one ONNX file per variant's main graph, run by onnxruntime.

Export goes through `torch.onnx.export(exported_program, dynamo=True)` (needs onnxscript);
every file is checked with `onnx.checker.check_model` (by path, so models with external weights
are checked too). Dynamic axes are the batch and the token counts (`torch.empty(k)` inputs).
The runner keeps one `InferenceSession` per variant; on CPU, inputs and outputs cross as NumPy
arrays that share memory with the torch tensors (no copies), on CUDA through IO binding.
Inputs the exporter found unused (e.g. a token count only read for a shape it folded) are not
fed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import GraphcacheError

SUFFIX = ".onnx"


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


def build(variant, path: Path) -> None:
    """The ONNX file of `variant`'s main graph at `path`, checked."""
    onnx = _require("onnx")
    sig = variant.sig
    torch.onnx.export(variant.main, f=str(path), dynamo=True, input_names=list(sig.inputs),
                      output_names=list(sig.outputs), verbose=False,
                      custom_translation_table={torch.ops.aten.sort.stable: _sort_stable})
    onnx.checker.check_model(str(path), full_check=False)


def _sort_stable(self, *, stable=None, dim: int = -1, descending: bool = False):
    """aten.sort.stable (ClusCa's tokens_per_cluster > 1) as ONNX TopK over the whole axis: the
    ONNX spec orders equal elements by index, which is exactly a stable sort."""
    from onnxscript import opset18 as op

    size = op.Reshape(op.Gather(op.Shape(self), dim, axis=0), op.Constant(value_ints=[1]))
    return op.TopK(self, size, axis=dim, largest=descending, sorted=True)


class Runner:
    """An onnxruntime session fed with the tensors of `sig.inputs` (those the file kept)."""

    def __init__(self, path: Path, sig, device, weights=None):  # weights: inside the file
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
