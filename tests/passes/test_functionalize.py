"""The passes that make a variant a pure function (graphcache/passes/functionalize.py).

Structural: each pass's inputs/outputs and counters on known variants of the tiny builtin DiT
(2 blocks, 16 tokens). Negative: a host op that feeds the model output is declined with a reason;
running the passes in the wrong order fails. Numerical: for every method (random draws and
K-means included), running the functional graphs eagerly through `FunctionalRunner` gives
bit-identical per-step outputs, latents and RNG state to the eager variants themselves, given the
same per-step scalars (`with_scalar_tensors`).

The variants are built as the ahead-of-time backends build them: with the conditioning inside
(`hoist_conditioning=False`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx

import graphcache
from graphcache.exporters.functional import FunctionalRunner, ScalarTensors
from graphcache.models.builtin import resolve_model
from graphcache.ops import CACHE_SCATTER, RANDOM_FUNCTIONS, scatter_tokens
from graphcache.passes.cluster import CACHE_PROPAGATE, KMEANS, propagate_to_clusters
from graphcache.passes.functionalize import (
    FUNCTIONAL_KEY,
    FunctionalizeCachePass,
    HoistRandomPass,
    SplitHostOpsPass,
    functionalize,
)
from graphcache.passes.manager import PassPipelineError, PassManager
from graphcache.passes.taylor import evaluate_taylor
from graphcache.schedule import is_token_input

sys.path.insert(0, str(Path(__file__).parents[1] / "exporters"))
from run_helpers import CASES, case_id, run  # noqa: E402

STEPS = 10


def optimize(model, method, steps, **options):
    return graphcache.optimize(model, method, steps, hoist_conditioning=False, **options)


@pytest.fixture(scope="module")
def tiny():
    return resolve_model("builtin:dit-tiny-random")


@pytest.fixture(scope="module")
def built(tiny):
    """`built(method, **options)`: `optimize(tiny, method, STEPS, **options)`, made once for the
    structural tests (they functionalize copies of its variants and never run it)."""
    models = {}

    def get(method, **options):
        key = (method, tuple(sorted(options.items())))
        if key not in models:
            models[key] = optimize(tiny, method, STEPS, **options)
        return models[key]

    return get


def variant(cached, kinds):
    keys = [k for k in cached.variants if k[0] == kinds]
    assert keys, f"no variant {kinds} in {list(cached.variants)}"
    return cached.variants[keys[0]]


def graph_copy(gm):
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, graph)


def calls(gm, targets):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def test_fora_full_and_reuse_variants(built):
    cached = built("fora")
    slots = ["b0_attention", "b0_mlp", "b1_attention", "b1_mlp"]
    full, sig = functionalize(variant(cached, ("full", "full")))
    assert sig.inputs == ["x", "t", "y"]  # a full step reads nothing
    assert sig.outputs == ["out", *(f"new_cache__{s}" for s in slots)]
    assert sig.prologue is None and sig.epilogue is None and sig.cache_outputs() == slots
    reuse, sig = functionalize(variant(cached, ("reuse", "reuse")))
    assert sig.inputs == ["x", "t", "y", *(f"cache__{s}" for s in slots)] and sig.outputs == ["out"]
    for gm in (full, reuse):
        assert not hasattr(gm, "graphcache_cache")  # the buffers are not part of the function
        assert all(n.op != "get_attr" or not n.target.startswith("graphcache_cache") for n in gm.graph.nodes)


def test_counters(built):
    cached = built("toca", score="random")
    copy = graph_copy(variant(cached, ("partial", "partial")))
    functional = FunctionalizeCachePass()
    hoist = HoistRandomPass()
    records = PassManager([functional, hoist])(copy)
    # per block: attention and mlp outputs and the staleness counters read; mlp and staleness written
    assert records[0].counters == {"cache_input": 6, "cache_output": 4}
    assert records[1].counters == {"draw": 2}  # one random score per partial block
    sig = copy.meta[FUNCTIONAL_KEY]
    assert sig.prologue_outputs == ["random__0", "random__1"]
    assert not calls(copy, RANDOM_FUNCTIONS) and len(calls(sig.prologue, RANDOM_FUNCTIONS)) == 2
    assert sig.prologue_inputs == ["cache__b0_staleness", "cache__b1_staleness"]  # shapes come from them


def test_token_counts_become_shapes(built):
    cached = built("toca")
    gm, sig = functionalize(variant(cached, ("partial", "partial")))
    tokens = [n for n in gm.graph.nodes if n.op == "placeholder" and n.target.startswith("gc_tokens")]
    assert [n.target for n in tokens] == ["gc_tokens_b0", "gc_tokens_b1"]
    for node in tokens:
        (user,) = node.users  # only read as its size
        assert user.target is torch.ops.aten.sym_size.int and user.args == (node, 0)


def test_kmeans_moves_to_the_epilogue(built):
    cached = built("clusca")
    first = cached.variants[cached.schedule[0].variant]  # the first full step: random K-means start
    gm, sig = functionalize(first)
    assert not calls(gm, {KMEANS}) and len(calls(sig.epilogue, {KMEANS})) == 1
    assert sig.epilogue_outputs == ["new_cache__cluster_labels", "new_cache__cluster_centroids"]
    assert [n for n in sig.outputs if n.startswith("host__")] == ["host__0", "host__1"]  # stream, start centroids
    assert sig.epilogue_inputs == ["host__0", "host__1"]
    assert sig.prologue_outputs == ["random__0"]  # the randint of the K-means start


def test_draws_take_their_shape_from_the_cache_not_the_step(built):
    """The prologue only draws: its inputs are the labels slot whose shape it reads, and it calls
    nothing but the draws (sizes of the stream would drag the step's computation into it)."""
    cached = built("clusca")
    for index in (0, 2):  # the first full step (K-means start), a ClusCa step (one draw per block)
        gm, sig = functionalize(cached.variants[cached.schedule[index].variant])
        assert sig.prologue_inputs == ["cache__cluster_labels"]
        work = [n.target for n in sig.prologue.graph.nodes if n.op in ("call_module", "call_function")
                and n.target not in RANDOM_FUNCTIONS and n.target is not getattr]
        assert work == [], work
        assert len(calls(sig.prologue, RANDOM_FUNCTIONS)) == (1 if index == 0 else 2)


def test_host_op_feeding_the_output_is_declined():
    def forward(x):
        labels, centroids = KMEANS(x, x[:, :2], 10, 1e-4, 5)
        return centroids * 2

    gm = fx.symbolic_trace(forward)
    PassManager([FunctionalizeCachePass()])(gm)
    split = SplitHostOpsPass()
    result = split(gm)
    assert not result.modified and split.declined and "model's output" in split.declined[0].reason


def test_passes_run_in_order(built):
    cached = built("fora")
    with pytest.raises(PassPipelineError, match="FunctionalizeCachePass first"):
        PassManager([HoistRandomPass()])(graph_copy(variant(cached, ("full", "full"))))


def with_scalar_tensors(cached):
    """`cached` passing its per-step scalars (not token counts) as the 0-d tensors a
    FunctionalRunner passes. A Taylor forecast adds Python-number coefficients as one multiply-add
    per term (`torch.add(..., alpha=c)`, fused on some CPUs' vector paths and not on others) and
    tensor coefficients as a product then a sum: with the same inputs both sides run the same
    kernels, so their equality holds on every CPU, not by luck of one."""
    scalars = ScalarTensors()
    cached.step_kwargs = [{k: v if is_token_input(k) else scalars(k, v, torch.device("cpu")) for k, v in kw.items()}
                          for kw in cached.step_kwargs]
    return cached


@pytest.mark.parametrize("name,options", CASES, ids=[case_id(c) for c in CASES])
def test_functional_graphs_run_bitwise_like_the_variants(tiny, name, options):
    # one model for both runs: the functional graphs first, on the fresh model; then its variants
    # as they are (`run_helpers.variants_of`), from the cache the first run left (reset by the run)
    cached = optimize(tiny, name, STEPS, **options)
    cached.runners = {}
    for key, gm in cached.variants.items():
        main, sig = functionalize(gm)
        cached.runners[key] = FunctionalRunner(sig, main, cached.cache, cached.structure.input_names)
    got = run(cached, steps=STEPS)
    cached.runners = {}
    want = run(with_scalar_tensors(cached), steps=STEPS)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("method,update,functional,slot,consumer", [
    ("toca", CACHE_SCATTER, scatter_tokens, "mlp", {torch.ops.aten.mul.Tensor}),  # the gated residual
    ("clusca", CACHE_PROPAGATE, propagate_to_clusters, "mlp_taylor0", {evaluate_taylor}),  # the forecast
])
def test_slots_follow_graph_order(built, method, update, functional, slot, consumer):
    """A partial step updates each MLP slot in place (ToCa: scatters the fresh tokens; ClusCa:
    scatters and propagates them into the order-0 factor) and then reads the slot: functional, the
    update is out of place and that read is its result (not the input)."""
    cached = built(method)
    eager = next(gm for gm in cached.variants.values() if len(calls(gm, {update})) == 2)  # both blocks
    assert not calls(eager, {functional})
    gm, sig = functionalize(eager)
    assert not calls(gm, {update})
    updates = calls(gm, {functional})
    assert [u.args[0].target for u in updates] == [f"cache__b0_{slot}", f"cache__b1_{slot}"]
    outputs = dict(zip(sig.outputs, gm.graph.output_node().args[0]))
    for b, updated in enumerate(updates):
        assert outputs[f"new_cache__b{b}_{slot}"] is updated
        # what reads the slot after the update reads the updated value, never the slot's old one
        assert any(u.target in consumer for u in updated.users), list(updated.users)
        assert all(u is updated or u.target is torch.ops.aten.sym_size.int
                   for u in gm.graph.find_nodes(op="placeholder", target=f"cache__b{b}_{slot}")[0].users)
