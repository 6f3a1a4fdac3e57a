"""Ahead-of-time artifacts (graphcache/exporters/export.py) and TensorRT's profile derivation.

* `optimize --backend onnx|aoti -o OUT` writes the variant files and a manifest with what a
  loader needs; `graphcache.load(OUT)` runs them without the model (an `ExportedModel`) and
  gives the in-process backend's samples exactly, at the export's batch and at other batches;
* an artifact stores the weights once (weights.safetensors): every aoti package uses the
  loaded tensors in place, every ONNX file references them as external data;
* it refuses, with a message saying why, an artifact built by another torch release or for
  another device, inputs of another shape, dtype or a batch outside the exported range, and
  damaged artifacts; a failed export leaves no OUT behind;
* TensorRT: profiles come from the schedule's token counts and the batch option; a missing
  TensorRT fails up front with a message naming it; the engine test runs only where TensorRT is
  installed (never on the CPU machines this project is developed on).
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import graphcache
from graphcache.artifact import MANIFEST, save_artifact
from graphcache.cli import main
from graphcache.errors import GraphcacheError
from graphcache.exporters import tensorrt
from graphcache.aot_artifact import ExportedModel
from graphcache.exporters.export import WEIGHTS_FILE, token_ranges
from graphcache.models.builtin import resolve_model
from run_helpers import max_rel, run

STEPS = 10


@pytest.fixture(scope="module")
def tiny():
    return resolve_model("builtin:dit-tiny-random")


@pytest.fixture(scope="module")
def onnx_toca(tiny):
    return graphcache.optimize(tiny, "toca", STEPS, backend="onnx", score="random")


@pytest.fixture(scope="module")
def saved(onnx_toca, tmp_path_factory):
    return save_artifact(onnx_toca, tmp_path_factory.mktemp("art") / "toca", model_spec="builtin:dit-tiny-random")


@pytest.fixture
def copy(saved, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    return dst


def edit(path, **changes):
    manifest = json.loads((path / MANIFEST).read_text())
    manifest.update(changes)
    (path / MANIFEST).write_text(json.dumps(manifest))


def test_manifest(saved, onnx_toca):
    m = json.loads((saved / MANIFEST).read_text())
    assert m["backend"] == "onnx" and m["device"] == "cpu" and m["batch"] == [2, None]
    assert m["inputs"] == {"x": {"shape": [4, 8, 8], "dtype": "float32"}, "t": {"shape": [], "dtype": "int64"},
                           "y": {"shape": [], "dtype": "int64"}}
    assert {"onnx", "onnxruntime", "onnxscript"} <= set(m["backend_versions"]) and m["versions"]["torch"]
    keys = onnx_toca.schedule.variants()
    assert len(m["variants"]) == len(keys) and len(m["steps"]) == STEPS
    for v, key in zip(m["variants"], keys):
        assert v["token_ranges"] == token_ranges(onnx_toca.schedule, key)
        for f in v["files"].values():
            assert (saved / f).is_file()
    assert m["weights"] == WEIGHTS_FILE and not (saved / "model.safetensors").exists()


def test_loaded_artifact_runs_without_the_model(saved, onnx_toca, tiny):
    loaded = graphcache.load(saved)
    assert isinstance(loaded, ExportedModel) and not hasattr(loaded, "model")
    eager_toca = graphcache.optimize(tiny, "toca", STEPS, score="random")
    for labels in ([1, 2], [3], [4, 5, 6]):  # batch 4 (the export's example), 2 and 6
        got = run(loaded, labels=labels, steps=STEPS)
        want = run(onnx_toca, labels=labels, steps=STEPS)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        eager = run(eager_toca, labels=labels, steps=STEPS)
        assert max_rel(got[1], eager[1]) < 1e-4


@pytest.fixture(scope="module")
def aoti_fora(tmp_path_factory):
    """`graphcache optimize --backend aoti` of FORA, 4 steps (2 variants): one AOTInductor build
    for the CLI test and the weights test."""
    out = tmp_path_factory.mktemp("aoti") / "fora"
    assert main(["optimize", "builtin:dit-tiny-random", "--method", "fora", "--steps", "4", "--backend", "aoti",
                 "-o", str(out)]) == 0
    return out


def test_cli_optimize_and_sample(aoti_fora, tmp_path):
    out = aoti_fora
    assert {p.name for p in out.iterdir()} == {MANIFEST, "v0.pt2", "v1.pt2", WEIGHTS_FILE}
    assert main(["sample", str(out), "--labels", "1,2", "--seed", "3", "--quiet", "-o", str(tmp_path / "a.pt")]) == 0
    assert main(["sample", "builtin:dit-tiny-random", "--method", "fora", "--steps", "4", "--labels", "1,2",
                 "--seed", "3", "--quiet", "-o", str(tmp_path / "b.pt")]) == 0
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert max_rel(a, b) < 1e-4


def test_aoti_weights_stored_once_and_used_in_place(aoti_fora, tmp_path, tiny):
    from safetensors.torch import load_file

    out = tmp_path / "fora"
    shutil.copytree(aoti_fora, out)  # its weights file is removed below
    weights, state = load_file(out / WEIGHTS_FILE), tiny.state_dict()
    assert weights and set(weights) <= set(state)  # the model's own names, each stored once
    assert all(torch.equal(w, state[name]) for name, w in weights.items())
    loaded = graphcache.load(out)
    assert len(loaded.runners_by_variant) == 2
    _, before, _ = run(loaded, labels=[1, 2], steps=4)
    loaded.weights["final_layer.linear.bias"].add_(1.0)  # one tensor: both packages read it
    _, after, _ = run(loaded, labels=[1, 2], steps=4)
    assert all(not torch.equal(a, b) for a, b in zip(after, before))  # every step, either variant
    (out / WEIGHTS_FILE).unlink()
    load_error(out, "has no weights.safetensors")


def test_onnx_weights_stored_once_as_external_data(saved, tiny):
    """Every ONNX file's weight initializers are external data at the right bytes of the one
    weights.safetensors; nothing else is written beside the files."""
    import onnx
    from safetensors.torch import load_file

    weights, state = load_file(saved / WEIGHTS_FILE), tiny.state_dict()
    assert weights and all(torch.equal(w, state[name]) for name, w in weights.items())
    files = sorted(saved.glob("*.onnx"))
    assert len(files) == 3 and not list(saved.glob("*.data"))
    raw = (saved / WEIGHTS_FILE).read_bytes()
    matrices = {w.numel() for w in weights.values() if w.ndim == 2}
    for path in files:
        linked = 0
        for tensor in onnx.load(str(path), load_external_data=False).graph.initializer:
            if tensor.name not in weights:  # the exporter's own constants, not folded copies of weights
                assert math.prod(tensor.dims) not in matrices, tensor.name
                continue
            assert tensor.data_location == onnx.TensorProto.EXTERNAL
            info = {e.key: e.value for e in tensor.external_data}
            assert info["location"] == WEIGHTS_FILE
            start, length = int(info["offset"]), int(info["length"])
            want = weights[tensor.name].contiguous().view(-1).view(torch.uint8)
            assert torch.equal(torch.frombuffer(bytearray(raw[start:start + length]), dtype=torch.uint8), want)
            linked += 1
        assert linked >= len([n for n in weights if n.startswith("blocks.1.")])  # at least one whole block


def test_onnx_files_read_the_shared_weights(copy):
    """Changing a weight in weights.safetensors changes what every variant computes."""
    from safetensors.torch import load_file, save_file

    _, before, _ = run(graphcache.load(copy), labels=[1, 2], steps=STEPS)
    weights = load_file(copy / WEIGHTS_FILE)
    weights["final_layer.linear.bias"] += 1.0
    save_file(weights, str(copy / WEIGHTS_FILE))  # same names, shapes and order: same offsets
    _, after, _ = run(graphcache.load(copy), labels=[1, 2], steps=STEPS)
    assert all(not torch.equal(a, b) for a, b in zip(after, before))


def load_error(path, *needles):
    with pytest.raises(GraphcacheError) as e:
        graphcache.load(path)
    for needle in needles:
        assert needle in str(e.value)


def test_refuses_another_torch_release(copy):
    edit(copy, versions={"torch": "2.1.0", "graphcache": "0.1.0", "python": "3.11"})
    load_error(copy, "built with torch 2.1.0", "re-create")


def test_refuses_another_device(copy):
    edit(copy, device="cuda")
    load_error(copy, "built for cuda")


def test_refuses_another_backend(saved):
    with pytest.raises(GraphcacheError, match="onnx backend"):
        graphcache.load(saved, backend="aoti")


def test_refuses_missing_files(copy):
    (copy / "v1.onnx").unlink()
    load_error(copy, "v1.onnx", "incomplete")


def test_refuses_inputs_outside_the_export(saved):
    loaded = graphcache.load(saved)
    loaded.start_sampling(STEPS)
    t = torch.zeros(4, dtype=torch.long)
    with pytest.raises(GraphcacheError, match=r"built for \(batch, 4, 8, 8\)"):
        loaded(torch.zeros(4, 4, 16, 16), t, t)  # another resolution
    with pytest.raises(GraphcacheError, match="float32"):
        loaded(torch.zeros(4, 4, 8, 8, dtype=torch.float64), t, t)
    with pytest.raises(GraphcacheError, match="batch 1 is outside"):
        loaded(torch.zeros(1, 4, 8, 8), t[:1], t[:1])


def test_failed_export_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "trt"
    assert main(["optimize", "builtin:dit-tiny-random", "--method", "toca", "--backend", "tensorrt",
                 "-o", str(out)]) != 0
    assert "tensorrt" in capsys.readouterr().err and not out.exists()
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# TensorRT
# ---------------------------------------------------------------------------------------------


def test_tensorrt_profiles_come_from_the_schedule(onnx_toca):
    schedule = onnx_toca.schedule
    for v, key in zip(onnx_toca.exported, schedule.variants()):
        shapes = {n.name: tuple(n.meta["val"].shape) for n in v.main.graph.nodes if n.op == "placeholder"}
        prof = tensorrt.profile(v.sig, shapes, v.token_ranges, batch=(2, 4, 8))
        assert set(prof) == set(v.sig.inputs)
        ks = {}
        for plan in schedule.steps:
            if plan.variant == key:
                for b, k in enumerate(plan.tokens or ()):
                    if k is not None and f"gc_tokens_b{b}" in v.sig.inputs:
                        ks.setdefault(f"gc_tokens_b{b}", []).append(k)
        for name, values in ks.items():  # the k the run feeds this variant, nothing wider
            lo, opt, hi = prof[name]
            assert lo == (min(values),) and hi == (max(values),) and lo <= opt <= hi
        assert prof["x"] == ((2, 4, 8, 8), (4, 4, 8, 8), (8, 4, 8, 8))
        for name in v.sig.inputs:
            if name.startswith("cache__b0_mlp"):
                assert prof[name] == ((2, 16, 64), (4, 16, 64), (8, 16, 64))
    assert any(v.token_ranges for v in onnx_toca.exported)
    with pytest.raises(GraphcacheError, match="batch range"):
        tensorrt.profile(onnx_toca.exported[0].sig, {"x": (4, 4, 8, 8)}, {}, batch=(4, 2, 8))


def test_tensorrt_limits_and_missing_package(tiny, monkeypatch):
    with pytest.raises(GraphcacheError, match="TopK limit of 3840"):
        tensorrt.check_topk(4096)
    tensorrt.check_topk(1024)
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)  # absent, even where installed
    with pytest.raises(GraphcacheError, match="`tensorrt`"):
        graphcache.optimize(tiny, "toca", STEPS, backend="tensorrt")


def test_tensorrt_engine_matches_eager(tiny):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed on this machine")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU")
    model = resolve_model("builtin:dit-tiny-random").cuda()
    want = run(graphcache.optimize(model, "toca", STEPS), steps=STEPS)
    got = run(graphcache.optimize(model, "toca", STEPS, backend="tensorrt"), steps=STEPS)
    assert max_rel(got[1], want[1]) < 1e-3
