"""The `tensorrt` backend: TensorRT engines built from the onnx backend's files.

Each variant's ONNX file (exporters/onnx.py) is parsed with the TensorRT Python API and built
into an engine with ONE optimization profile, derived by `profile`:

* a token-count input `gc_tokens_b<i>` (shape (k,)) gets min/opt/max = the smallest, middle
  and largest k the schedule actually feeds this variant (`export.token_ranges`);
* every batch-major input gets the batch range `batch` = (min, opt, max) (default: 2 to 16 rows,
  i.e. 1 to 8 images with guidance; opt 2), the other dimensions fixed at their exported size;
* an input exported with a static first dimension (FLUX's token positions, which have no batch)
  is fixed at its exported shape;
* 0-d inputs (per-step scalars) and EOC's factors (tokens, channels) are fixed.

The ToCa/DuCa selection sorts the N token scores inside the graph (ONNX TopK with k = N);
TensorRT's TopK takes k <= 3840, so `check_topk` refuses models with more tokens (passing the
indices in from outside would be the way there; not built).

TensorRT cannot be installed on the machines this project is developed on (its packages fetch
from a host outside the reachable registries): `tensorrt` is imported lazily and a missing one
fails with a message naming it. The profile derivation and the ONNX files it consumes are
tested without it; the engine build and the runner are not exercised here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import GraphcacheError
from ..passes.functionalize import Signature
from ..schedule import is_correction_input, is_token_input
from . import onnx as onnx_backend

SUFFIX = ".onnx"  # the engine is written beside it as v<i>.onnx.engine
WEIGHTS_IN_MEMORY = False  # the engines hold their own copy (their ONNX files reference the weights file)
ENGINE_SUFFIX = ".engine"
TOPK_LIMIT = 3840
DEFAULT_BATCH = (2, 2, 16)


def require_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise GraphcacheError(
            "the tensorrt backend needs NVIDIA TensorRT's Python package `tensorrt` and a CUDA GPU; "
            "it is not installed (pip install tensorrt, on a machine that can reach NVIDIA's package "
            "index), or use --backend onnx / aoti"
        ) from None
    return tensorrt


def check_topk(num_tokens: int) -> None:
    if num_tokens > TOPK_LIMIT:
        raise GraphcacheError(
            f"the model has {num_tokens} tokens: the in-graph token sort exceeds TensorRT's TopK limit of "
            f"{TOPK_LIMIT}; use --backend onnx or aoti for this model"
        )


def profile(sig: Signature, shapes: dict[str, tuple[int, ...]], token_ranges: dict[str, list[int]],
            batch: tuple[int, int, int] = DEFAULT_BATCH, fixed=frozenset()) -> dict[str, tuple[tuple, tuple, tuple]]:
    """{input: (min shape, opt shape, max shape)} for one variant.

    `shapes` are the exported example shapes of the main graph's inputs (batch first), as
    `ExportedProgram` placeholders or the ONNX file declare them with the batch as any value;
    the inputs named in `fixed` have no batch and keep their shape."""
    lo, opt, hi = batch
    if not 1 <= lo <= opt <= hi:
        raise GraphcacheError(f"batch range must satisfy 1 <= min <= opt <= max, got {batch}")
    out = {}
    for name in sig.inputs:
        shape = tuple(shapes[name])
        if is_token_input(name):
            k_lo, k_hi = token_ranges[name]
            out[name] = ((k_lo,), ((k_lo + k_hi) // 2,), (k_hi,))
        elif len(shape) == 0 or is_correction_input(name) or name in fixed:
            out[name] = (shape, shape, shape)
        else:
            rest = shape[1:]
            out[name] = ((lo, *rest), (opt, *rest), (hi, *rest))
    return out


def check(cached) -> None:
    """Before exporting anything: TensorRT is there and the model's token sort fits it."""
    require_tensorrt()
    check_topk(cached.structure.num_tokens)


def build(variant, path: Path, weights_file: Path) -> None:
    """The ONNX file at `path`, then its engine at `<path>.engine`."""
    trt = require_tensorrt()
    program, sig = variant.main, variant.sig
    onnx_backend.build(variant, path, weights_file)
    exported = {s.name: s.meta["val"].shape for s in program.graph.nodes
                if s.op == "placeholder" and s.name in sig.inputs}
    shapes = {name: tuple(int(d) if isinstance(d, int) else 1 for d in shape) for name, shape in exported.items()}
    fixed = {name for name, shape in exported.items() if len(shape) and isinstance(shape[0], int)}
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise GraphcacheError(f"TensorRT cannot parse {path.name}: {errors}")
    config = builder.create_builder_config()
    prof = builder.create_optimization_profile()
    kept = {network.get_input(i).name for i in range(network.num_inputs)}
    for name, (lo, opt, hi) in profile(sig, shapes, variant.token_ranges, fixed=fixed).items():
        if name in kept:
            prof.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(prof)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise GraphcacheError(f"TensorRT failed to build an engine for {path.name}")
    Path(str(path) + ENGINE_SUFFIX).write_bytes(bytes(engine))


class Runner:
    """Runs an engine on torch CUDA tensors (execute_async_v3 on the current stream)."""

    def __init__(self, path: Path, sig, device, weights=None):  # weights: inside the engine
        trt = require_tensorrt()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(str(path) + ENGINE_SUFFIX).read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [(i, n) for i, n in enumerate(sig.inputs) if n in names]
        self.outputs = [n for n in sig.outputs if n in names]
        self.device = torch.device(device)

    def __call__(self, *tensors):
        keep = []
        for i, name in self.inputs:
            t = tensors[i].contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = _torch_dtype(self.engine.get_tensor_dtype(name))
            out = torch.empty(shape, dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream)
        return outs


def _torch_dtype(trt_dtype) -> torch.dtype:
    trt = require_tensorrt()
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int64: torch.int64, trt.bool: torch.bool, trt.bfloat16: torch.bfloat16}
    return table[trt_dtype]


def versions() -> dict:
    try:
        import tensorrt

        version = tensorrt.__version__
    except ImportError:
        version = None
    return {**onnx_backend.versions(), "tensorrt": version}
