"""The `compile` backend (graphcache/exporters/compile.py) on every method.

Claims checked, for every method in `graphcache.methods.METHODS` with its defaults (ClusCa's
random draws included), ToCa with the random score and ClusCa with 2 tokens per cluster, on the
tiny builtin DiT (2 blocks, 16 tokens), DDIM-10 with CFG (batch 4; the variants see token counts
0, 1 and larger, and every TaylorSeer variant):

* a full sampling run has zero graph breaks (`counters["graph_break"]` empty after
  `torch._dynamo.reset()`; fullgraph=True would raise anyway);
* it compiles exactly one graph per variant (`len(cached.variants)`), counted by the compiler
  backend itself and by Dynamo's `unique_graphs`; a second run compiles nothing; a new input
  signature compiles each variant exactly once more;
* with `aot_eager` (the same ATen kernels as eager) every per-step model output, the final
  latents and the global RNG state after the run are bit-identical to eager graphcache's
  variants (`run_helpers.variants_of`: its eager runners compute the selected tokens' linears
  as W·xᵀ, which rounds differently) — except
  where a Taylor forecast runs (TaylorSeer, ClusCa): eager adds each term as one fused
  multiply-add, a traced graph as `out + factor * c` (passes/taylor.py `evaluate_taylor`), so
  those outputs agree to TOL of their scale (the RNG state still exactly);
* with Inductor (one end-to-end test, short runs to bound the CPU compile time: ClusCa DDIM-3,
  its 3 variants with randint/rand/K-means/Taylor inputs; ToCa with the random score DDIM-5,
  2 variants, token counts 1 to 7 in one of them), per-step outputs agree with eager graphcache
  within INDUCTOR_TOL of their scale (max |compiled - eager| / max |eager|; measured ~5e-7),
  and the RNG state after the run is identical (`fallback_random`: the same draws, in order);
* with Inductor on DiT-S/2-shaped random weights (conftest.py `dit_s`: DiT-S/2's width, heads
  and 256 tokens, 2 blocks: the same variants as at depth 12), every method with its defaults
  (FORA with EOC's per-step factor inputs: run_helpers.eoc_options), DDIM-4 with CFG:
  per-step outputs and latents within `tolerance` of eager graphcache (as for aoti and onnx:
  1e-4 of scale, 1e-2 where ToCa/DuCa pick tokens by a computed score), no graph break, one
  graph per variant, the same draws.

Threads: single-threaded (restored afterwards), as the method tests: the CI machine has 2 cores.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import graphcache
from graphcache.errors import GraphcacheError
from graphcache.exporters.compile import compile_kwargs, compile_options
from graphcache.schedule import FORECAST, compiled_token_count, correction_input, is_token_input, tokens_input
from graphcache.methods import METHODS
from graphcache.models.builtin import resolve_model
from graphcache.passes.taylor import coefficient_input
from run_helpers import CASES, TOL, case_id, eoc_options, max_rel, run, tolerance, variants_of

STEPS = 10
INDUCTOR_TOL = 1e-4  # per-step model outputs, relative to their max (measured: ~5e-7)

@pytest.fixture(scope="module")
def tiny():
    return resolve_model("builtin:dit-tiny-random")


@pytest.fixture(scope="module")
def eager_fora(tiny):
    """Eager FORA, 4 steps: the reference of the compiled FORA runs (each run starts afresh)."""
    return graphcache.optimize(tiny, "fora", 4)


def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()


@pytest.mark.parametrize("name,options", CASES, ids=[case_id(c) for c in CASES])
def test_aot_eager_run_no_breaks_one_graph_per_variant_bitwise(tiny, name, options):
    eager = run(variants_of(tiny, name, STEPS, **options))
    fresh_dynamo()
    counter = CompileCounterWithBackend("aot_eager")
    cached = graphcache.optimize(tiny, name, STEPS, backend="compile", compile_options={"backend": counter},
                                 **options)
    assert cached.backend == "compile" and set(cached.runners) == set(cached.variants)
    compiled = run(cached)
    assert dict(counters["graph_break"]) == {}
    assert counter.frame_count == len(cached.variants)
    assert counters["stats"]["unique_graphs"] == len(cached.variants)
    assert_same_run(compiled, eager, exact=name not in FORECASTING)
    again = run(cached)  # a second run: nothing recompiles, same samples
    assert counter.frame_count == len(cached.variants)
    assert_same_run(again, eager, exact=name not in FORECASTING)


FORECASTING = {"taylorseer", "clusca"}  # their Taylor forecasts round differently when traced


def assert_same_run(got, want, exact):
    (latents, outputs, rng), (want_latents, want_outputs, want_rng) = got, want
    assert torch.equal(rng, want_rng)
    if exact:
        assert torch.equal(latents, want_latents) and torch.equal(outputs, want_outputs)
    else:
        assert max(max_rel(g, w) for g, w in zip(outputs, want_outputs)) < TOL
        assert max_rel(latents, want_latents) < TOL


def test_every_method_is_covered():
    assert {name for name, _ in CASES} == set(METHODS)


def test_per_step_inputs_never_recompile(tiny):
    # ToCa's token counts (0, 1 and larger: unbacked SymInts) and TaylorSeer's forecast coefficients
    # (0-d tensors; 0 for the factors that do not exist yet) change from step to step inside one variant
    toca = graphcache.optimize(tiny, "toca", STEPS)
    partial = [p for p in toca.schedule.steps if p.variant == (("partial", "partial"), False)]
    assert len({p.tokens for p in partial}) >= 3 and any(0 in p.tokens for p in partial)
    taylor = graphcache.optimize(tiny, "taylorseer", STEPS)
    coefficients = {p.inputs[coefficient_input(2)] for p in taylor.schedule.steps if p.kinds[0] == FORECAST}
    assert len(coefficients) >= 3 and 0 in coefficients
    assert is_token_input("gc_tokens_b3") and not is_token_input(coefficient_input(2))
    # only token counts of attention queries are raised to 2: not an EOC factor of an attention branch
    assert compiled_token_count(tokens_input(3, kind="attention"), 0) == 2
    assert compiled_token_count(correction_input("b3_attention"), 0) == 0


def test_new_input_signature_compiles_each_variant_once_more(tiny, eager_fora):
    fresh_dynamo()
    counter = CompileCounterWithBackend("aot_eager")
    cached = graphcache.optimize(tiny, "fora", 4, backend="compile", compile_options={"backend": counter})
    run(cached, labels=[1, 2], steps=4)
    assert counter.frame_count == len(cached.variants) == 2
    one = run(cached, labels=[3], steps=4)[0]  # batch 2 instead of 4: new buffers, new shapes
    assert counter.frame_count == 2 * len(cached.variants)
    assert torch.equal(one, run(eager_fora, labels=[3], steps=4)[0])


def test_inductor_end_to_end_matches_eager(tiny):
    # ClusCa: torch.randint (K-means start) and torch.rand (representatives) in the graph, the
    # kmeans_l1 custom op, Taylor factors, a per-step distance; ToCa with the random score:
    # one rand per partial block and token counts (1, 2), (3, 4), (4, 7) in one variant
    for name, options, steps, variants in (("clusca", {}, 3, 3), ("toca", {"score": "random"}, 5, 2)):
        latents, outputs, rng = run(graphcache.optimize(tiny, name, steps, **options), steps=steps)
        fresh_dynamo()
        cached = graphcache.optimize(tiny, name, steps, backend="compile", **options)
        assert cached.compile_options["backend"] == "inductor"
        got_latents, got_outputs, got_rng = run(cached, steps=steps)
        assert dict(counters["graph_break"]) == {}
        assert counters["stats"]["unique_graphs"] == len(cached.variants) == variants
        assert torch.equal(got_rng, rng), f"{name}: the compiled run drew different random numbers"
        rel = max((max_rel(g, w) for g, w in zip(got_outputs, outputs)))
        assert rel < INDUCTOR_TOL, f"{name}: per-step outputs differ by {rel:.2e} of their scale"
        assert max_rel(got_latents, latents) < INDUCTOR_TOL
        print(f"{name}: max per-step relative difference {rel:.2e}")


@pytest.mark.parametrize("name", list(METHODS), ids=lambda name: "fora-eoc" if name == "fora" else name)
def test_inductor_matches_eager_dit_s2(dit_s, dit_s_prior, eager_run, name):
    steps = 4
    options = eoc_options(name, dit_s_prior, steps)  # FORA with EOC's per-step factor inputs
    latents, outputs, rng = eager_run(name, steps, options)
    fresh_dynamo()
    cached = graphcache.optimize(dit_s, name, steps, backend="compile", **options)
    got_latents, got_outputs, got_rng = run(cached, steps=steps)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == len(cached.variants)
    assert torch.equal(got_rng, rng)
    tol = tolerance(name, {})
    rel = max(max_rel(g, w) for g, w in zip(got_outputs, outputs))
    assert rel < tol, f"per-step outputs differ by {rel:.2e} of their scale"
    assert max_rel(got_latents, latents) < tol


def test_compile_options():
    assert compile_options(None) == {"backend": "inductor", "mode": None, "dynamic": False, "options": None}
    kwargs = compile_kwargs(compile_options({"mode": "reduce-overhead"}))
    assert kwargs["fullgraph"] is True and "mode" not in kwargs  # expanded into options
    assert kwargs["options"] == {"triton.cudagraphs": True, "fallback_random": True}
    assert compile_kwargs(compile_options({"backend": "aot_eager"})) == {
        "fullgraph": True, "backend": "aot_eager", "dynamic": False}
    with pytest.raises(GraphcacheError, match="unknown compile option"):
        compile_options({"fullgrahp": True})
    with pytest.raises(GraphcacheError, match="fullgraph"):
        compile_options({"fullgraph": False})
    with pytest.raises(GraphcacheError, match="compile mode"):
        compile_kwargs(compile_options({"mode": "fastest"}))


def test_backend_argument(tiny, eager_fora):
    with pytest.raises(GraphcacheError, match="unknown backend"):
        graphcache.optimize(tiny, "fora", 4, backend="tvm")
    with pytest.raises(GraphcacheError, match="compile_options"):
        graphcache.optimize(tiny, "fora", 4, compile_options={"mode": "reduce-overhead"})
    eager = eager_fora
    assert eager.backend == "eager" and set(eager.runners) == set(eager.variants) and eager.compile_options is None


# ---------------------------------------------------------------------------------------------
# artifacts, bench, CLI
# ---------------------------------------------------------------------------------------------


def test_artifact_records_and_recreates_the_backend(tiny, eager_fora, tmp_path):
    from graphcache.artifact import load_artifact, read_manifest, save_artifact

    cached = graphcache.optimize(tiny, "fora", 4, backend="compile", compile_options={"backend": "aot_eager"})
    out = save_artifact(cached, tmp_path / "art", model_spec="builtin:dit-tiny-random")
    m = read_manifest(out)
    assert m["backend"] == "compile"
    assert m["compile_options"] == {"backend": "aot_eager", "mode": None, "dynamic": False, "options": None}
    fresh_dynamo()
    loaded = load_artifact(out)
    assert loaded.backend == "compile" and loaded.compile_options == m["compile_options"]
    got = run(loaded, steps=4)
    assert counters["stats"]["unique_graphs"] == len(loaded.variants)
    want = run(eager_fora, steps=4)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    eager = load_artifact(out, backend="eager")  # the backend can be overridden
    assert eager.backend == "eager" and eager.compile_options is None
    assert all(isinstance(r, torch.fx.GraphModule) for r in eager.runners.values())  # nothing compiled
    counter = CompileCounterWithBackend("aot_eager")  # a Python callable cannot be recorded
    custom = graphcache.optimize(tiny, "fora", 4, backend="compile", compile_options={"backend": counter})
    with pytest.raises(GraphcacheError, match="callable"):
        save_artifact(custom, tmp_path / "custom", model_spec="builtin:dit-tiny-random")


def test_bench_compiles_the_baseline_too(tiny):
    from graphcache.bench import bench

    fresh_dynamo()
    counter = CompileCounterWithBackend("aot_eager")
    report = bench(tiny, [("fora", {})], backend="compile", compile_options={"backend": counter}, num_steps=3,
                   repeats=1, warmup=0)
    assert report["backend"] == "compile" and [r["method"] for r in report["results"]] == ["none", "fora"]
    assert counter.frame_count == 1 + 2  # none's one variant and fora's two: both compiled
    with pytest.raises(GraphcacheError, match="unknown backend"):
        bench(tiny, [("fora", {})], backend="tvm", num_steps=3)


def test_cli_backend_flags(tmp_path, capsys):
    import json

    from graphcache.cli import main

    out = tmp_path / "art"
    code = main(["optimize", "builtin:dit-tiny-random", "--method", "fora", "--steps", "3", "--backend", "compile",
                 "--compile-mode", "max-autotune-no-cudagraphs", "-o", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "backend: compile" in printed
    m = json.loads((out / "manifest.json").read_text())
    assert m["backend"] == "compile" and m["compile_options"]["mode"] == "max-autotune-no-cudagraphs"
    # an artifact's backend can be overridden when sampling (eager here: nothing to compile)
    code = main(["sample", str(out), "--labels", "1", "--backend", "eager", "-q", "-o", str(tmp_path / "x.pt")])
    assert code == 0
    code = main(["sample", "builtin:dit-tiny-random", "--method", "fora", "--steps", "3", "--labels", "1",
                 "--compile-mode", "reduce-overhead", "-o", str(tmp_path / "y.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "--compile-mode reduce-overhead needs --backend compile" in err
    code = main(["bench", "builtin:dit-tiny-random", "--backend", "tvm"])
    assert code == 2 and "invalid choice" in capsys.readouterr().err
