"""The tensorrt backend's logic that needs no TensorRT (graphcache/exporters/tensorrt.py).

TensorRT is not installable on the machines this project is developed on, so: the optimisation
profile derived from a hand-made signature, token ranges and batch range; the TopK limit at its
boundary; the error every entry point raises when the package is missing; and, with a stand-in
`tensorrt` module that records what it is asked, which profile shapes `build` sets (only for the
inputs the parsed network kept), where it writes the engine and how it reports parse and build
failures, which engine tensors `Runner` binds, and the dtype table. tests/exporters/test_export.py
checks the profiles of real exported ToCa variants.
"""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch

from graphcache.errors import GraphcacheError
from graphcache.exporters import tensorrt
from graphcache.passes.functionalize import Signature

INPUTS = ["x", "t", "y", "gc_tokens_b0", "gc_tokens_b3", "cache__b0_mlp", "cache__b0_staleness", "scale",
          "random__0", "gc_eoc_b0_attention"]
SHAPES = {
    "x": (4, 4, 8, 8), "t": (4,), "y": (4,), "gc_tokens_b0": (9,), "gc_tokens_b3": (1,),
    "cache__b0_mlp": (4, 16, 64), "cache__b0_staleness": (4, 16), "scale": (), "random__0": (2, 16),
    "gc_eoc_b0_attention": (16, 64),  # EOC's factor: (tokens, channels), the same for every batch
    "unused": (4, 3),  # not an input of this signature: no profile
}
RANGES = {"gc_tokens_b0": [3, 8], "gc_tokens_b3": [5, 5]}


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails, even where it is installed


# --------------------------------------------------------------------------------------------
# profile
# --------------------------------------------------------------------------------------------


def test_profile_by_input_kind():
    prof = tensorrt.profile(Signature(inputs=INPUTS), SHAPES, RANGES, batch=(2, 6, 16))
    assert list(prof) == INPUTS
    assert prof["x"] == ((2, 4, 8, 8), (6, 4, 8, 8), (16, 4, 8, 8))
    assert prof["t"] == prof["y"] == ((2,), (6,), (16,))
    assert prof["cache__b0_mlp"] == ((2, 16, 64), (6, 16, 64), (16, 16, 64))
    assert prof["cache__b0_staleness"] == ((2, 16), (6, 16), (16, 16))
    assert prof["random__0"] == ((2, 16), (6, 16), (16, 16))  # every batch-major input takes the range
    # token counts: the range the schedule feeds, opt in the middle (rounded down), not the batch
    assert prof["gc_tokens_b0"] == ((3,), (5,), (8,))
    assert prof["gc_tokens_b3"] == ((5,), (5,), (5,))
    assert prof["scale"] == ((), (), ())
    assert prof["gc_eoc_b0_attention"] == ((16, 64),) * 3


def test_profile_default_batch():
    assert tensorrt.DEFAULT_BATCH == (2, 2, 16)
    prof = tensorrt.profile(Signature(inputs=["x", "scale"]), SHAPES, {})
    assert prof == {"x": ((2, 4, 8, 8), (2, 4, 8, 8), (16, 4, 8, 8)), "scale": ((), (), ())}


@pytest.mark.parametrize("batch", [(0, 1, 2), (3, 2, 4), (2, 5, 4), (-1, 2, 4)])
def test_profile_refuses_a_bad_batch_range(batch):
    with pytest.raises(GraphcacheError, match=r"batch range must satisfy 1 <= min <= opt <= max, got"):
        tensorrt.profile(Signature(inputs=["x"]), SHAPES, {}, batch=batch)


def test_profile_keeps_inputs_without_a_batch():
    prof = tensorrt.profile(Signature(inputs=["x", "unused"]), SHAPES, {}, fixed={"unused"})
    assert prof["unused"] == ((4, 3),) * 3 and prof["x"][2] == (16, 4, 8, 8)


def test_profile_single_batch():
    prof = tensorrt.profile(Signature(inputs=["x"]), SHAPES, {}, batch=(1, 1, 1))
    assert prof == {"x": ((1, 4, 8, 8),) * 3}


def test_topk_limit_boundary():
    assert tensorrt.TOPK_LIMIT == 3840
    tensorrt.check_topk(3840)
    with pytest.raises(GraphcacheError) as info:
        tensorrt.check_topk(3841)
    assert "3841 tokens" in str(info.value) and "TopK limit of 3840" in str(info.value)
    assert "--backend onnx or aoti" in str(info.value)


# --------------------------------------------------------------------------------------------
# A missing TensorRT
# --------------------------------------------------------------------------------------------


def test_missing_tensorrt_is_named(no_tensorrt, tmp_path):
    with pytest.raises(GraphcacheError) as info:
        tensorrt.require_tensorrt()
    msg = str(info.value)
    assert "`tensorrt`" in msg and "not installed" in msg and "--backend onnx / aoti" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__  # one clear line, no chain
    cached = SimpleNamespace(structure=SimpleNamespace(num_tokens=16))
    for call in (lambda: tensorrt.check(cached),
                 lambda: tensorrt.build(None, tmp_path / "v0.onnx", tmp_path / "w"),
                 lambda: tensorrt.Runner(tmp_path / "v0.onnx", Signature(), "cpu")):
        with pytest.raises(GraphcacheError, match="`tensorrt`"):
            call()
    assert not list(tmp_path.iterdir())  # nothing was written before the error
    versions = tensorrt.versions()
    assert versions["tensorrt"] is None and {"onnx", "onnxruntime", "onnxscript"} <= set(versions)


# --------------------------------------------------------------------------------------------
# With a stand-in tensorrt module
# --------------------------------------------------------------------------------------------


class FakeTRT(types.ModuleType):
    """Just the TensorRT API surface the backend calls, recording what it is asked."""

    def __init__(self, network_inputs, parse_ok=True, engine=b"ENGINE"):
        super().__init__("tensorrt")
        self.__version__ = "0.0-test"
        self.network_inputs, self.parse_ok, self.engine = network_inputs, parse_ok, engine
        self.shapes, self.parsed, self.profiles = {}, [], []
        fake = self
        for name in ("float32", "float16", "int32", "int64", "bool", "bfloat16"):
            setattr(self, name, f"trt.{name}")

        class Logger:
            WARNING = "warning"

            def __init__(self, level):
                self.level = level

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                fake.shapes[name] = (lo, opt, hi)

        class Parser:
            num_errors = 2

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                fake.parsed.append(path)
                return fake.parse_ok

            def get_error(self, i):
                return f"error {i}"

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                names = fake.network_inputs
                return SimpleNamespace(num_inputs=len(names), get_input=lambda i: SimpleNamespace(name=names[i]))

            def create_builder_config(self):
                return SimpleNamespace(add_optimization_profile=fake.profiles.append)

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return fake.engine

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, Parser


def placeholder(name, shape):
    return SimpleNamespace(op="placeholder", name=name, meta={"val": SimpleNamespace(shape=shape)})


BATCH_DIM = object()  # stands for the exported program's symbolic batch size


def exported_variant():
    sig = Signature(inputs=["x", "t", "gc_tokens_b0", "cache__b0_mlp"])
    nodes = [placeholder("x", (BATCH_DIM, 4, 8, 8)), placeholder("t", (BATCH_DIM,)),
             placeholder("gc_tokens_b0", (BATCH_DIM,)), placeholder("cache__b0_mlp", (BATCH_DIM, 16, 64)),
             placeholder("not_in_sig", (3,)), SimpleNamespace(op="call_function", name="add", meta={})]
    return SimpleNamespace(main=SimpleNamespace(graph=SimpleNamespace(nodes=nodes)), sig=sig,
                           token_ranges={"gc_tokens_b0": [2, 7]})


@pytest.fixture
def onnx_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(tensorrt.onnx_backend, "build", lambda variant, path, weights: calls.append((variant, path)))
    return calls


def test_build_sets_the_profile_of_the_kept_inputs(monkeypatch, tmp_path, onnx_calls):
    fake = FakeTRT(["x", "gc_tokens_b0", "cache__b0_mlp"])  # the ONNX file dropped t (unused)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    variant, path = exported_variant(), tmp_path / "v0.onnx"
    tensorrt.build(variant, path, tmp_path / "weights.safetensors")
    assert onnx_calls == [(variant, path)] and fake.parsed == [str(path)]
    assert fake.shapes == {
        "x": ((2, 4, 8, 8), (2, 4, 8, 8), (16, 4, 8, 8)),
        "gc_tokens_b0": ((2,), (4,), (7,)),
        "cache__b0_mlp": ((2, 16, 64), (2, 16, 64), (16, 16, 64)),
    }
    assert len(fake.profiles) == 1  # ONE optimisation profile
    assert (tmp_path / "v0.onnx.engine").read_bytes() == b"ENGINE"
    assert tensorrt.versions()["tensorrt"] == "0.0-test"


def test_build_reports_parse_errors(monkeypatch, tmp_path, onnx_calls):
    fake = FakeTRT(["x"], parse_ok=False)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(GraphcacheError, match=r"TensorRT cannot parse v1.onnx: error 0; error 1"):
        tensorrt.build(exported_variant(), tmp_path / "v1.onnx", tmp_path / "w")
    assert fake.shapes == {} and not (tmp_path / "v1.onnx.engine").exists()


def test_build_reports_a_failed_engine(monkeypatch, tmp_path, onnx_calls):
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTRT(["x"], engine=None))
    with pytest.raises(GraphcacheError, match="TensorRT failed to build an engine for v2.onnx"):
        tensorrt.build(exported_variant(), tmp_path / "v2.onnx", tmp_path / "w")
    assert not (tmp_path / "v2.onnx.engine").exists()


def test_check_with_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTRT([]))
    tensorrt.check(SimpleNamespace(structure=SimpleNamespace(num_tokens=256)))
    with pytest.raises(GraphcacheError, match="4096 tokens"):
        tensorrt.check(SimpleNamespace(structure=SimpleNamespace(num_tokens=4096)))


def test_runner_binds_the_engine_tensors(monkeypatch, tmp_path):
    fake = FakeTRT([])
    engine_names = ["x", "cache__b0_mlp", "out", "new_cache__b0_mlp"]  # t, y and host__0 were dropped
    engine = SimpleNamespace(num_io_tensors=len(engine_names), get_tensor_name=engine_names.__getitem__,
                             create_execution_context=lambda: "context")
    seen = []
    fake.Runtime = lambda logger: SimpleNamespace(
        deserialize_cuda_engine=lambda data: seen.append(data) or engine)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    (tmp_path / "v0.onnx.engine").write_bytes(b"serialized")
    sig = Signature(inputs=["x", "t", "y", "cache__b0_mlp"], outputs=["out", "new_cache__b0_mlp", "host__0"])
    runner = tensorrt.Runner(tmp_path / "v0.onnx", sig, "cpu")
    assert seen == [b"serialized"] and runner.context == "context"
    assert runner.inputs == [(0, "x"), (3, "cache__b0_mlp")]  # positions in the signature's inputs
    assert runner.outputs == ["out", "new_cache__b0_mlp"] and runner.device == torch.device("cpu")


def test_dtype_table(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTRT([]))
    names = ("float32", "float16", "int32", "int64", "bool", "bfloat16")
    assert [tensorrt._torch_dtype(f"trt.{n}") for n in names] == [
        torch.float32, torch.float16, torch.int32, torch.int64, torch.bool, torch.bfloat16]
    with pytest.raises(KeyError):
        tensorrt._torch_dtype("trt.int8")
