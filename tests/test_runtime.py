"""CachedModel: variants, step counter, cache invalidation, and exactness against the plain model.

The model is a random DiT-S/2 at 8x8 latents (16 tokens) (every weight N(0, 0.02), adaLN gates included, so
a reused branch really changes the output). `none` and FORA with interval 1 must reproduce the
plain model bit for bit; FORA's reuse steps must equal a reuse step written here by hand. Those
models are built with `hoist_conditioning=False`: hoisting computes every step's adaLN modulation
in one batched GEMM, whose sums may round differently; its own tests compare to a tolerance.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import graphcache
from graphcache import CachedModel, GraphcacheError, optimize, sample
from graphcache import ir
from graphcache.ir import ON_SELECTED_TOKENS
from graphcache.methods import get_method
from graphcache.models.dit import DiT, DiTConfig, dit_config, init_random_
from graphcache.ops import CACHE_SCATTER, CACHE_WRITE, EAGER_KERNELS
from graphcache.passes.cluster import CACHE_PROPAGATE
from graphcache.passes.few_token_linears import linear_token_columns
from graphcache.passes.taylor import finite_difference, update_taylor_factors_
from graphcache.schedule import FULL, REUSE

S = 8  # sampling steps of the step-by-step tests
SAMPLE_STEPS = 4  # sampling steps of the end-to-end DiT-S/2 runs


@pytest.fixture(scope="module")
def dit_s2():
    return init_random_(DiT(dit_config("DiT-S/2", input_size=8)), seed=3).eval()


@pytest.fixture(scope="module")
def dit_s2_none(dit_s2):
    return optimize(dit_s2, "none", num_steps=SAMPLE_STEPS, hoist_conditioning=False)


@pytest.fixture(scope="module")
def model():
    """A small DiT (4 blocks, hidden 64) for the many step-by-step calls."""
    cfg = DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=4, num_heads=4, num_classes=1000)
    return init_random_(DiT(cfg), seed=4).eval()


@pytest.fixture(scope="module")
def none_model(model):
    return optimize(model, "none", num_steps=S, hoist_conditioning=False)


@pytest.fixture(scope="module")
def fora3(model):
    return optimize(model, "fora", num_steps=S, interval=3)


@pytest.fixture(scope="module")
def fora1(model):
    return optimize(model, "fora", num_steps=S, interval=1, hoist_conditioning=False)


def step_inputs(i, batch=2):
    g = torch.Generator().manual_seed(100 + i)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.full((batch,), 999 - 120 * i, dtype=torch.long)
    y = torch.arange(batch) * 7 % 1000
    return x, t, y


def branch_outputs(model, x, t, y):
    """Ungated outputs of every blocks[i].attn / .mlp of the plain model, by forward hooks."""
    outs, hooks = {}, []
    for i, block in enumerate(model.blocks):
        for kind, mod in (("attention", block.attn), ("mlp", block.mlp)):
            hooks.append(mod.register_forward_hook(
                lambda m, args, out, key=(i, kind): outs.__setitem__(key, out.detach().clone())))
    try:
        with torch.no_grad():
            model(x, t, y)
    finally:
        for h in hooks:
            h.remove()
    return outs


def pruned_gates(block, c):
    """gate_msa, gate_mlp of `block` computed as a reuse variant computes them: PruneModulationPass
    keeps only the live chunks of adaLN's linear, each an F.linear over its rows of the weight. That
    (B, C)-wide GEMM is not the 6C-wide one chunked: MKL may block the two shapes differently, and
    their roundings then differ on some CPUs, so `adaLN_modulation(c).chunk(6)` would equal the
    variant's gates only by luck of one CPU's kernels. These are the same kernels on the same shapes."""
    silu, linear = block.adaLN_modulation
    s, size = silu(c), linear.out_features // 6
    return [F.linear(s, linear.weight.narrow(0, i * size, size), linear.bias.narrow(0, i * size, size))
            for i in (2, 5)]


def reuse_reference(model, x, t, y, cached):
    """A FORA reuse step by hand: x + gate(t) * cached_attn, then + gate(t) * cached_mlp, per block
    (the gates as the variant computes them: `pruned_gates`)."""
    with torch.no_grad():
        h = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y)
        for i, block in enumerate(model.blocks):
            gate_msa, gate_mlp = pruned_gates(block, c)
            h = h + gate_msa.unsqueeze(1) * cached[(i, "attention")]
            h = h + gate_mlp.unsqueeze(1) * cached[(i, "mlp")]
        return model.unpatchify(model.final_layer(h, c), x.shape[2], x.shape[3])


def plain(model, x, t, y):
    with torch.no_grad():
        return model(x, t, y)


# --------------------------------------------------------------------------------------------
# Sampling: exactness of `none` (and FORA interval 1)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_none_samples_exactly_dit_s2(dit_s2, dit_s2_none, sampler):
    kw = dict(labels=[3, 207], seed=5, num_steps=SAMPLE_STEPS, sampler=sampler, cfg_scale=4.0)
    expected = sample(dit_s2, **kw)
    got = sample(dit_s2_none, **kw)
    assert torch.equal(got, expected)
    assert dit_s2_none.step_index == 0  # num_steps calls: the counter wrapped
    assert dit_s2_none.structure.depth == 12 and len(dit_s2_none.variants) == 1


def test_none_samples_exactly_without_cfg(model, none_model):
    kw = dict(labels=[3, 207, 5], seed=8, num_steps=S, sampler="ddpm", cfg_scale=None)
    assert torch.equal(sample(none_model, **kw), sample(model, **kw))


def test_fora_interval_1_samples_exactly(model, fora1):
    kw = dict(labels=[3, 207], seed=6, num_steps=S, sampler="ddim", cfg_scale=4.0)
    assert torch.equal(sample(fora1, **kw), sample(model, **kw))
    assert all(k == FULL for plan in fora1.schedule.steps for k in plan.kinds)


def test_fora_sampling_differs(model, fora3):
    kw = dict(labels=[3, 207], seed=7, num_steps=S, sampler="ddim", cfg_scale=4.0)
    ref, got = sample(model, **kw), sample(fora3, **kw)
    assert not torch.equal(got, ref)
    assert torch.isfinite(got).all()


# --------------------------------------------------------------------------------------------
# FORA step by step
# --------------------------------------------------------------------------------------------


def test_fora_schedule_and_variants(fora3, none_model):
    kinds = [plan.kinds[0] for plan in fora3.schedule.steps]
    # S=8: descending steps 7..0; full at index 0 and where s % 3 == 0 (s = 6, 3, 0)
    assert kinds == [FULL, FULL, REUSE, REUSE, FULL, REUSE, REUSE, FULL]
    assert len(fora3.variants) == 2
    assert len(none_model.variants) == 1


def test_fora_steps_against_references(model, fora3):
    fora3.reset()
    cached = None
    for i in range(S):
        x, t, y = step_inputs(i)
        with torch.no_grad():
            out = fora3(x, t, y)
        kind = fora3.schedule[i].kinds[0]
        if kind == FULL:
            assert torch.equal(out, plain(model, x, t, y)), f"full step {i}"
            cached = branch_outputs(model, x, t, y)
            slots = dict(fora3.cache.named_buffers())
            for (b, k), value in cached.items():
                assert torch.equal(slots[f"b{b}_{k}"], value)
        else:
            assert cached is not None
            assert (out - plain(model, x, t, y)).abs().max() > 1e-5, f"reuse step {i} did not reuse"
            assert torch.equal(out, reuse_reference(model, x, t, y, cached)), f"reuse step {i}"
    assert fora3.step_index == 0


def test_fora_interval_1_steps_are_plain(model, fora1):
    fora1.reset()
    for i in range(3):
        x, t, y = step_inputs(i)
        with torch.no_grad():
            assert torch.equal(fora1(x, t, y), plain(model, x, t, y))


# --------------------------------------------------------------------------------------------
# Weights are shared
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["dit_s2_none", "none_model", "fora3"])
def test_variants_share_parameters(which, request):
    cm = request.getfixturevalue(which)
    model = cm.model
    params = dict(model.named_parameters())
    for gm in cm.variants.values():
        named = dict(gm.named_parameters())
        assert named, "variant has no parameters"
        for name, p in named.items():
            assert p is params[name], name
            assert p.data_ptr() == params[name].data_ptr()
    # the CachedModel itself holds exactly the model's parameters, once
    ptrs = {p.data_ptr() for p in cm.parameters()}
    assert ptrs == {p.data_ptr() for p in model.parameters()}
    # the cache is not part of any state dict
    assert not any(k.startswith("graphcache_cache") or k.startswith("cache.") for k in cm.state_dict())


def test_variants_share_one_cache(fora3):
    caches = {id(gm.graphcache_cache) for gm in fora3.variants.values()}
    assert caches == {id(fora3.cache)}


ORDER = get_method("clusca").resolve_options({})["order"]


def _taylor_refresh_part(node) -> str | None:
    if node.target is finite_difference:
        return "difference"
    if node.target is CACHE_WRITE and "_taylor" in node.args[0].target:
        return "write"
    if node.op == "get_attr" and "_taylor" in node.target:
        return "slot"
    return None


@pytest.mark.parametrize("method", ["toca", "clusca"])
def test_eager_runners_call_the_cache_kernels(model, method):
    """Eager runs call each cache op's kernel (ops.EAGER_KERNELS) instead of the custom op, some
    elementwise ops in place (ReuseDeadTemporariesPass) and the selected tokens' linears as W·xᵀ
    (TransposeFewTokenLinearsPass) and each branch's Taylor refresh
    as one in-place call (UpdateTaylorFactorsInPlacePass): the variant's nodes
    otherwise, over the variant's own modules and cache, with the same samples (to float rounding,
    which only the transposed linears can change) — also after a batch change re-allocates the
    slots."""
    cached = optimize(model, method, num_steps=8, **({"propagation": 0.1} if method == "clusca" else {}))
    replaced, in_place, transposed, refreshes = Counter(), Counter(), Counter(), Counter()
    for key, gm in cached.variants.items():
        runner = cached.runners[key]
        names = {n.name for n in gm.graph.nodes}
        run_names = {n.name for n in runner.graph.nodes}
        # each Taylor refresh (differences, factor writes, their slot reads) is one in-place call
        refreshed = Counter(_taylor_refresh_part(n) for n in gm.graph.nodes if n.name not in run_names)
        refreshes[key] = sum(n.target is update_taylor_factors_ for n in runner.graph.nodes)
        assert refreshed == (Counter({"difference": ORDER * refreshes[key], "write": (ORDER + 1) * refreshes[key],
                                      "slot": (2 * ORDER + 1) * refreshes[key]}) if refreshes[key] else Counter())
        nodes = [n for n in gm.graph.nodes if n.name in run_names]
        run_nodes = [n for n in runner.graph.nodes if n.name in names]
        assert [n.name for n in run_nodes] == [n.name for n in nodes]
        for node, run in zip(nodes, run_nodes):
            if run.op == "call_method" and node.op == "call_function":
                in_place[run.target] += 1
                assert run.target == {torch.ops.aten.add.Tensor: "add_", torch.ops.aten.mul.Tensor: "mul_"}[node.target]
            elif run.target is linear_token_columns:
                transposed[key] += 1
                assert ir.is_linear(node) and node.meta[ON_SELECTED_TOKENS]
                assert [str(a) for a in run.args] == [str(a) for a in node.args]  # the same inputs, by name
            else:
                assert (run.op, run.target) == (node.op, EAGER_KERNELS.get(node.target, node.target))
        replaced.update(n.target for n in nodes if n.op == "call_function" and n.target in EAGER_KERNELS)
        assert all(getattr(runner, name) is child for name, child in gm.named_children())
    update = CACHE_PROPAGATE if method == "clusca" else CACHE_SCATTER
    assert replaced[CACHE_WRITE] > 0 and replaced[update] > 0
    # ClusCa refreshes both branches of every block at its full steps; ToCa keeps no factors
    full = {p.variant for p in cached.schedule.steps if set(p.kinds) == {FULL}}
    assert refreshes == Counter({key: 2 * len(model.blocks) for key in full} if method == "clusca" else {})
    assert in_place["add_"] > 0
    # fc1 and fc2 of every block whose MLP runs on selected tokens, in those variants only
    partial = {p.variant: p.kinds.count("partial") for p in cached.schedule.steps}
    assert transposed == Counter({key: 2 * blocks for key, blocks in partial.items() if blocks})
    runners = cached.runners
    for labels in ([1], [2, 3]):
        fast = sample(cached, labels, num_steps=8)
        cached.runners = {}  # the variants themselves, with the custom ops
        torch.testing.assert_close(fast, sample(cached, labels, num_steps=8), rtol=1e-5, atol=1e-5)
        cached.runners = runners


# --------------------------------------------------------------------------------------------
# Hoisted conditioning
# --------------------------------------------------------------------------------------------


class Unannounced:
    """`cached` for graphcache.sample without `announce_inputs`: every step computes its own."""

    def __init__(self, cached):
        self.cached = cached
        for attr in ("in_channels", "input_size", "learn_sigma", "num_classes", "start_sampling"):
            setattr(self, attr, getattr(cached, attr))

    def __call__(self, *args):
        return self.cached(*args)


def _count_calls(module, calls):
    return module.register_forward_pre_hook(lambda *_: calls.append(1))


@pytest.mark.parametrize("method", ["toca", "duca"])
def test_announced_runs_evaluate_each_conditioning_once(model, method):
    cached = optimize(model, method, num_steps=S)
    plain_arith = optimize(model, method, num_steps=S, hoist_conditioning=False)
    assert set(cached.conditionings) == set(cached.variants) and not plain_arith.conditionings
    # a table evaluates a conditioning's whole graph; a step on its own, its parts (one here: the
    # modulation depends on t and y together)
    calls, step_calls = [], []
    assert all(len(c.parts) == 1 for c in cached.conditionings.values())
    hooks = [_count_calls(c.graph, calls) for c in cached.conditionings.values()]
    hooks += [_count_calls(p.graph, step_calls) for c in cached.conditionings.values() for p in c.parts]
    try:
        kw = dict(labels=[3, 207], seed=6, num_steps=S, cfg_scale=4.0)
        first = sample(cached, **kw)
        assert len(calls) == len(cached.variants)  # one per variant
        assert len(step_calls) == 1  # the one-off row check
        assert cached.conditioning_is_rowwise is True
        assert {i: set(row) for i, row in cached.condition_table.items()} == {
            plan.index: set(cached.conditionings[plan.variant].names) for plan in cached.schedule.steps}
        calls.clear()
        step_calls.clear()
        assert torch.equal(sample(cached, **kw), first)  # a second run tabulates again, bit for bit
        assert len(calls) == len(cached.variants) and not step_calls
        calls.clear()
        stepwise = sample(Unannounced(cached), **kw)
        assert not calls and len(step_calls) == S  # t changes every step: nothing is kept
    finally:
        for hook in hooks:
            hook.remove()
    want = sample(plain_arith, **kw)
    assert torch.equal(stepwise, want)  # step by step: the plain model's arithmetic exactly
    assert torch.allclose(first, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_steps_with_other_inputs_than_announced_compute_their_own(model, fora3):
    fora3.start_sampling(S)
    announced = [step_inputs(i)[1:] for i in range(S)]
    fora3.announce_inputs(announced)
    x, t, y = step_inputs(0)
    with torch.no_grad():
        assert torch.equal(fora3(x, t.clone(), y), plain(model, x, t, y))  # equal values, other tensors
        assert fora3.condition_table == {}
        x, t, y = step_inputs(1)
        fora3(x, *announced[1])
    assert sorted(fora3.condition_table) == list(range(1, S))  # tabulated from the first step that matched
    fora3.announce_inputs(announced)  # announcing again drops the table made from the last inputs
    assert fora3.condition_table == {}
    with pytest.raises(GraphcacheError, match=f"announced 2 steps' inputs for a {S}-step run"):
        fora3.announce_inputs(announced[:2])
    fora3.reset()
    assert fora3.announced is None and fora3.condition_table == {}


def test_tables_larger_than_the_budget_are_made_window_by_window(model, monkeypatch):
    from graphcache import runtime

    cached = optimize(model, "none", num_steps=S)
    kw = dict(labels=[3, 207], seed=6, num_steps=S, cfg_scale=4.0)
    whole = sample(cached, **kw)
    [conditioning] = cached.conditionings.values()
    per_step = conditioning.row_bytes * 4  # 4 rows: two images with CFG
    monkeypatch.setattr(runtime, "TABLE_BUDGET_BYTES", 3 * per_step)
    windows = []
    original = cached._tabulate_conditioning
    monkeypatch.setattr(cached, "_tabulate_conditioning",
                        lambda index, args: windows.append(index) or original(index, args))
    windowed = sample(cached, **kw)
    assert windows == [0, 3, 6] and len(cached.condition_table) == 2  # steps 6 and 7
    assert torch.allclose(windowed, whole, rtol=1e-4, atol=1e-4 * float(whole.abs().max()))


# --------------------------------------------------------------------------------------------
# Step counter and invalidation
# --------------------------------------------------------------------------------------------


def test_start_sampling_checks_step_count(fora3):
    with pytest.raises(GraphcacheError, match=f"optimized for {S} sampling steps, not {S + 2}"):
        fora3.start_sampling(S + 2)
    with pytest.raises(GraphcacheError, match="num_steps"):
        sample(fora3, labels=[1], num_steps=S + 2, cfg_scale=None)


def test_reset_restarts_at_full_step(model, fora3):
    fora3.reset()
    for i in range(2):
        x, t, y = step_inputs(i)
        with torch.no_grad():
            fora3(x, t, y)
    assert fora3.step_index == 2
    fora3.reset()
    assert fora3.step_index == 0
    assert all((b == 0).all() for b in fora3.cache.buffers())
    x, t, y = step_inputs(5)
    with torch.no_grad():
        assert torch.equal(fora3(x, t, y), plain(model, x, t, y))
    fora3.start_sampling(S)
    assert fora3.step_index == 0


def test_batch_change_mid_run_restarts(model, fora3):
    fora3.reset()
    with torch.no_grad():
        fora3(*step_inputs(0))
        fora3(*step_inputs(1))
    assert fora3.schedule[2].kinds[0] == REUSE  # the next step would reuse ...
    x, t, y = step_inputs(2, batch=3)
    with pytest.warns(UserWarning, match="input shapes changed"):
        with torch.no_grad():
            out = fora3(x, t, y)
    # ... but the cache was dropped: a full step at the new batch size
    assert out.shape[0] == 3
    assert torch.equal(out, plain(model, x, t, y))
    assert fora3.step_index == 1
    assert all(b.shape[0] == 3 for b in fora3.cache.buffers())
    # and the run continues from there: index 1 is a full step for S=8, index 2 a reuse step
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x1, t1, y1 = step_inputs(3, batch=3)
        with torch.no_grad():
            assert torch.equal(fora3(x1, t1, y1), plain(model, x1, t1, y1))
            cached = branch_outputs(model, x1, t1, y1)
            x2, t2, y2 = step_inputs(4, batch=3)
            assert torch.equal(fora3(x2, t2, y2), reuse_reference(model, x2, t2, y2, cached))


def test_first_call_with_new_shape_does_not_warn(model, fora3):
    fora3.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            x, t, y = step_inputs(0, batch=5)
            assert torch.equal(fora3(x, t, y), plain(model, x, t, y))
    fora3.reset()


def test_counter_wraps(fora3):
    fora3.reset()
    with torch.no_grad():
        for i in range(S):
            assert fora3.step_index == i
            fora3(*step_inputs(i))
    assert fora3.step_index == 0


def test_cached_model_looks_like_the_model(model, fora3):
    assert isinstance(fora3, CachedModel) and isinstance(fora3, torch.nn.Module)
    for attr in ("in_channels", "input_size", "learn_sigma", "num_classes", "out_channels", "patch_size"):
        assert getattr(fora3, attr) == getattr(model, attr)
    assert fora3.num_steps == S


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    cfg = DiTConfig(input_size=4, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    return init_random_(DiT(cfg))


def test_unknown_method(tiny):
    with pytest.raises(GraphcacheError) as info:
        graphcache.optimize(tiny, method="nope")
    msg = str(info.value)
    assert "'nope'" in msg and "fora" in msg and "none" in msg


def test_unknown_option(tiny):
    with pytest.raises(GraphcacheError) as info:
        graphcache.optimize(tiny, method="fora", num_steps=10, intervall=2)
    msg = str(info.value)
    assert "'intervall'" in msg and "interval" in msg and "fora" in msg


def test_bad_option_values(tiny):
    with pytest.raises(GraphcacheError, match="interval"):
        graphcache.optimize(tiny, method="fora", num_steps=10, interval=0)
    with pytest.raises(GraphcacheError, match="interval"):
        graphcache.optimize(tiny, method="fora", num_steps=10, interval="three")
    with pytest.raises(GraphcacheError, match="num_steps"):
        graphcache.optimize(tiny, method="none", num_steps=0)


@pytest.mark.parametrize("method,option,value,message", [
    ("toca", "fresh_ratio", 2.0, "fresh_ratio=2.0 must be <= 1"),
    ("duca", "fresh_ratio", -0.1, "fresh_ratio=-0.1 must be >= 0"),
    ("clusca", "propagation", 1.5, "propagation=1.5 must be <= 1.0"),
    ("toca", "fresh_ratio", "nan", "fresh_ratio=nan is not a number"),
])
def test_ratios_outside_zero_one_are_refused(method, option, value, message):
    with pytest.raises(GraphcacheError, match=re.escape(message)):
        get_method(method).resolve_options({option: value})
    for edge in (0.0, 1.0):  # the bounds themselves are ratios
        assert get_method(method).resolve_options({option: edge})[option] == edge


def test_backends_are_checked_before_anything_is_built(tiny):
    from graphcache.exporters import get_backend

    with pytest.raises(GraphcacheError, match="unknown backend 'tpu'; valid: eager, compile"):
        get_backend("tpu")
    with pytest.raises(GraphcacheError, match="compile_options need backend='compile'"):
        get_backend("eager", {"mode": "max-autotune"})
    with pytest.raises(GraphcacheError, match="unknown compile option 'fullgrph'"):
        graphcache.optimize(tiny, method="fora", num_steps=10, backend="compile", compile_options={"fullgrph": True})
    eager = graphcache.optimize(tiny, method="fora", num_steps=10)
    # the backend hands the runners (and what its passes did) to the model, which keeps them
    assert set(eager.runners) == set(eager.variants) == set(eager.runner_records)
    assert all(r[0].name == "CallCacheKernelsPass" for r in eager.runner_records.values())
    assert eager.exported == [] and eager.files is None and eager.compile_options is None
