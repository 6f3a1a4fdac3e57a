"""ClusCa (arXiv 2509.10312): its schedule, its variants, and whole sampling runs against a reference.

`ClusCaReference` (clusca_reference.py) is a plain-PyTorch ClusCa / TaylorSeer written literally
after Shenyi-Z/Cache4Diffusion `dit/clusca-dit/`: its own loop over the DiT blocks, its own cache dicts, K-means and RNG
draws in the official order, driven by `graphcache.sample` exactly like the compiled model.

Tolerance of the end-to-end comparisons: |graphcache - reference| <= 1e-5 * max(1, max|reference|),
elementwise, on the final latents AND on every step's model output. Both sides run the same
kernels on the same shapes, so in practice they agree bit for bit; the tolerance only leaves room
for summation-order differences. Where a plain run is affordable, the tests also check that
caching moved the outputs by more than 100x that tolerance (so the comparison has teeth).

Model sizes (all weights random, `init_random_`, adaLN gates included):
* DiT-S/2-shaped: depth 12, hidden 384, 6 heads, input 16 (64 tokens), 10 classes;
* DiT-XL/2-shaped: depth 28, hidden 1152, 16 heads, input 8 (16 tokens), 10 classes, K = 4,
  one 4-step DDPM run (two full steps, two ClusCa steps): the expensive check, kept to one;
* a tiny DiT (depth 3, hidden 64, 16 tokens) for the cheaper option sweeps.
"""

from __future__ import annotations

import math

import pytest
import torch

import graphcache
from graphcache.methods import get_method
from graphcache.methods.base import EOC_OPTIONS
from graphcache.models.dit import DiT, DiTConfig, dit_config, init_random_, sincos_pos_embed_2d
from graphcache.passes.cluster import KMEANS
from graphcache.passes.taylor import DELTA_INPUT, coefficient_input
from graphcache.schedule import FORECAST, FULL, PARTIAL

from clusca_reference import ClusCaReference  # pytest puts tests/methods on sys.path

TOL = 1e-5

EOC_DEFAULTS = {o.name: o.default for o in EOC_OPTIONS}


def run(model, num_steps, sampler, labels=(3, 7), seed=0, cfg=1.5):
    return graphcache.sample(model, list(labels), seed=seed, num_steps=num_steps, sampler=sampler, cfg_scale=cfg)


class Recorder:
    """Wraps a model for `graphcache.sample` and keeps a copy of every model output."""

    def __init__(self, model):
        self.model, self.outputs = model, []

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)

    def start_sampling(self, num_steps):
        self.outputs = []
        start = getattr(self.model, "start_sampling", None)
        if start is not None:
            start(num_steps)

    def __call__(self, *args):
        out = self.model(*args)
        self.outputs.append(out.clone())
        return out


def scale_of(t):
    return max(1.0, t.abs().max().item())


def assert_matches(got, want):
    err = (got - want).abs().max().item()
    assert err <= TOL * scale_of(want), f"max |graphcache - reference| = {err:.3g} (scale {scale_of(want):.3g})"


def assert_run_matches(got: Recorder, want: Recorder, got_latents, want_latents):
    """Final latents and every step's model output (the sharper test: the latents of a random
    model are dominated by the sampler's drift, the outputs by the blocks)."""
    assert len(got.outputs) == len(want.outputs)
    for i, (a, b) in enumerate(zip(got.outputs, want.outputs)):
        err = (a - b).abs().max().item()
        assert err <= TOL * scale_of(b), f"step {i}: max |graphcache - reference| = {err:.3g}"
    assert_matches(got_latents, want_latents)


def caching_effect(model, steps, sampler, want: Recorder, labels):
    """max over steps of |plain output - cached output| / scale: how much caching changed things."""
    plain = Recorder(model)
    run(plain, steps, sampler, labels)
    return max((p - w).abs().max().item() / scale_of(w) for p, w in zip(plain.outputs, want.outputs))


def small_dit(seed=0):
    cfg = dit_config("DiT-S/2", input_size=16, num_classes=10)
    return init_random_(DiT(cfg), seed=seed).eval()


@pytest.fixture(scope="module")
def dit_s():
    return small_dit()


# ---------------------------------------------------------------------------------------------
# Schedule (cal_type.py)
# ---------------------------------------------------------------------------------------------


def schedule_by_rule(num_steps, interval):
    """The official `cal_type` replayed: one character per step, F full, C ClusCa."""
    counter, out = 0, []
    for s in range(num_steps - 1, -1, -1):
        if s > num_steps - 3 or counter == interval - 1:
            counter = 0
            out.append("F")
        else:
            counter += 1
            out.append("C")
    return "".join(out)


TYPE_CHARS = {"full": "F", "ClusCa": "C", "Taylor": "T"}


def kinds_string(schedule):
    return "".join({FULL: "F", PARTIAL: "C", FORECAST: "T"}[p.kinds[0]] for p in schedule.steps)


def test_schedule_anchors():
    method = get_method("clusca")
    assert kinds_string(method.schedule(50, 28)) == "FF" + "CCCCF" * 9 + "CCC"  # default N=5
    assert kinds_string(method.schedule(50, 28, {"interval": 4})) == "FF" + "CCCF" * 12
    assert kinds_string(method.schedule(10, 28, {"interval": 1})) == "F" * 10
    assert kinds_string(method.schedule(12, 28, {"interval": 3, "clusters": 0})) == "FF" + "TTF" * 3 + "T"


@pytest.mark.parametrize("num_steps", [50, 250])
@pytest.mark.parametrize("interval", [1, 2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("order", [0, 1, 4])
def test_schedule_follows_rule(num_steps, interval, order):
    k, per = 16, 2
    sched = get_method("clusca").schedule(
        num_steps, 28, {"interval": interval, "order": order, "tokens_per_cluster": per}, 256)
    assert kinds_string(sched) == schedule_by_rule(num_steps, interval)
    activated, factors = [49], 0
    for plan in sched.steps:
        s = plan.step
        assert plan.step == num_steps - 1 - plan.index
        if plan.kinds[0] == FULL:
            assert set(plan.kinds) == {FULL} and plan.tokens is None
            activated.append(s)
            m = 0 if s == num_steps - 1 else min(factors, order)
            factors = m + 1
            assert plan.init_clusters == (plan.index == 0)
            # the first full step differences nothing: d = 1 only keeps the unused leftovers finite
            assert plan.inputs == ({DELTA_INPUT: activated[-1] - activated[-2] if m else 1} if order else {})
            if m:
                assert plan.inputs[DELTA_INPUT] < 0
        else:
            assert set(plan.kinds) == {PARTIAL} and plan.tokens == (k * per,) * 28
            assert not plan.init_clusters
            dist = s - activated[-1]
            assert plan.inputs == {coefficient_input(i): dist**i / math.factorial(i) if i < factors else 0.0
                                   for i in range(1, order + 1)}
            assert plan.to_json()["tokens"] == [k * per] * 28
    assert sched.options == {"profile": "dit", "interval": interval, "clusters": k, "order": order,
                             "propagation": 0.005, "tokens_per_cluster": per}


def test_options_and_variants():
    method = get_method("clusca")
    assert {o.name: o.default for o in method.options} == {
        "profile": "auto", "interval": 5, "clusters": 16, "order": 4, "propagation": 0.005, "tokens_per_cluster": 1,
        **EOC_DEFAULTS}
    sched = method.schedule(50, 28)
    # full with the K-means start, full, ClusCa: how many Taylor factors exist is a per-step input
    assert len(sched.variants()) == 3
    taylor = method.schedule(50, 28, {"clusters": 0})
    assert {p.kinds[0] for p in taylor.steps} == {FULL, FORECAST}
    assert all(p.tokens is None for p in taylor.steps)


# ---------------------------------------------------------------------------------------------
# Variants: structure
# ---------------------------------------------------------------------------------------------


def test_variant_structure():
    model = init_random_(DiT(DiTConfig(input_size=8, hidden_size=64, depth=3, num_heads=4, num_classes=10))).eval()
    cm = graphcache.optimize(model, "clusca", num_steps=12, interval=3, clusters=4, order=2)
    depth = 3

    def count(gm, target):
        return sum(n.op == "call_function" and n.target is target for n in gm.graph.nodes)

    seen = set()
    for key, gm in cm.variants.items():
        records = {r.name: r for r in cm.records[key]}
        kinds, init_clusters = key
        if kinds[0] == FULL:
            assert count(gm, KMEANS) == 1 and count(gm, torch.rand) == 0
            assert count(gm, torch.randint) == (1 if init_clusters else 0)
            assert records["InsertTaylorUpdatePass"].counters == {  # order 2: 2 differences, 3 writes
                "taylor_read": 2 * depth * 2, "derivative": 2 * depth * 2, "taylor_write": 2 * depth * 3,
                "branch": 2 * depth}
            assert records["InsertClusterPass"].counters["kmeans"] == 1
        else:
            assert count(gm, KMEANS) == 0 and count(gm, torch.randint) == 0
            assert count(gm, torch.rand) == depth  # one draw per ClusCa block
            assert records["ReplaceWithTaylorForecastPass"].counters == {"taylor_read": depth * 3, "forecast": depth}
            assert records["InsertTokenSelectPass"].counters == {"token_select": depth}
        seen.add((kinds[0], init_clusters))
    assert seen == {(FULL, True), (FULL, False), (PARTIAL, False)}
    assert sorted(cm.slots()) == sorted(
        [f"b{b}_{k}_taylor{i}" for b in range(depth) for k in ("attention", "mlp") for i in range(3)]
        + ["cluster_centroids", "cluster_labels"])


# ---------------------------------------------------------------------------------------------
# Whole runs against the reference
# ---------------------------------------------------------------------------------------------


def tiny_dit(seed=0):
    """Depth 3, hidden 64, 16 tokens; std 0.1: at 64 channels N(0, 0.02) blocks barely move the
    stream, and caching would change too little for the comparisons to mean much."""
    cfg = DiTConfig(input_size=8, hidden_size=64, depth=3, num_heads=4, num_classes=10)
    return init_random_(DiT(cfg), std=0.1, seed=seed).eval()


def random_xl(input_size=8, num_classes=10, seed=1):
    """A DiT-XL/2-shaped model, every weight random with std 0.02 like `init_random_`, but drawn
    uniformly (U(-0.02·√3, 0.02·√3)) and in place: 675M normal draws would be most of this test's
    time (and of test_toca.py's DiT-XL/2 test). The fixed sin-cos positional embedding is kept."""
    with torch.device("meta"):
        dit = DiT(dit_config("DiT-XL/2", input_size=input_size, num_classes=num_classes))
    dit = dit.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if name != "pos_embed":
                p.uniform_(-0.02 * math.sqrt(3), 0.02 * math.sqrt(3), generator=g)
        grid = input_size // dit.patch_size
        dit.pos_embed.copy_(torch.from_numpy(sincos_pos_embed_2d(dit.config.hidden_size, grid)).unsqueeze(0))
    return dit


def compare(model, steps, sampler, options, labels=(3, 7), plain=False):
    """graphcache's ClusCa against the reference on one sampling run; with `plain`, also check
    that caching changed the model outputs far beyond the tolerance."""
    cm = Recorder(graphcache.optimize(model, "clusca", num_steps=steps, **options))
    got = run(cm, steps, sampler, labels)
    ref = Recorder(ClusCaReference(model, options["interval"], options["clusters"], options["order"],
                                   options["propagation"], options["tokens_per_cluster"]))
    want = run(ref, steps, sampler, labels)
    assert "".join(TYPE_CHARS[k] for k in ref.model.types) == kinds_string(cm.model.schedule)
    assert_run_matches(cm, ref, got, want)
    if plain:
        assert caching_effect(model, steps, sampler, ref, labels) > 100 * TOL
    return cm, ref


@pytest.mark.parametrize(
    "sampler,steps,options",
    [
        ("ddim", 50, dict(interval=5, clusters=16, order=4, propagation=0.005, tokens_per_cluster=1)),
        ("ddpm", 20, dict(interval=4, clusters=16, order=2, propagation=0.0, tokens_per_cluster=2)),
    ],
)
def test_matches_reference_dit_s(dit_s, sampler, steps, options):
    compare(dit_s, steps, sampler, options)


@pytest.mark.parametrize(
    "sampler,steps,options",
    [
        ("ddpm", 25, dict(interval=3, clusters=8, order=3, propagation=0.05, tokens_per_cluster=2)),
        ("ddim", 16, dict(interval=2, clusters=16, order=1, propagation=0.0, tokens_per_cluster=1)),
        ("ddim", 12, dict(interval=4, clusters=3, order=0, propagation=0.5, tokens_per_cluster=3)),
    ],
)
def test_matches_reference_tiny(sampler, steps, options):
    compare(tiny_dit(), steps, sampler, options, plain=True)


def test_options_change_the_result():
    """γ and tokens_per_cluster change the model outputs well beyond the comparison tolerance."""
    model = tiny_dit(1)
    base = dict(interval=4, clusters=4, order=2, propagation=0.0, tokens_per_cluster=1)
    outputs = []
    for change in ({}, {"propagation": 0.3}, {"tokens_per_cluster": 2}):
        rec = Recorder(graphcache.optimize(model, "clusca", num_steps=12, **{**base, **change}))
        run(rec, 12, "ddim")
        outputs.append(rec.outputs)
    for other in outputs[1:]:
        effect = max((a - b).abs().max().item() / scale_of(a) for a, b in zip(outputs[0], other))
        assert effect > 100 * TOL


def test_rerun_is_identical():
    """A new sampling run resets the cache (K-means starts again from a random draw)."""
    model = tiny_dit(2)
    cm = graphcache.optimize(model, "clusca", num_steps=10, interval=3, clusters=4)
    first = run(cm, 10, "ddpm", seed=4)
    other = run(cm, 10, "ddpm", seed=5)
    assert torch.equal(run(cm, 10, "ddpm", seed=4), first) and not torch.equal(first, other)


def test_no_clusters_is_taylorseer():
    model = tiny_dit(3)
    options = dict(interval=3, order=2)
    a = run(graphcache.optimize(model, "clusca", num_steps=15, clusters=0, **options), 15, "ddpm")
    b = run(graphcache.optimize(model, "taylorseer", num_steps=15, **options), 15, "ddpm")
    assert torch.equal(a, b)


def test_matches_reference_dit_xl():
    """DiT-XL/2 shapes (28 blocks, 1152 channels, 16 heads), 16 tokens, DDPM-4 with CFG:
    F F C C — K-means from its random start then warm-started, Taylor factors m = 0, 1, and two
    ClusCa steps, the second over the order-0 factor the first one changed."""
    options = dict(interval=3, clusters=4, order=4, propagation=0.005, tokens_per_cluster=1)
    cm, _ = compare(random_xl(), 4, "ddpm", options, labels=(5,))
    assert kinds_string(cm.model.schedule) == "FFCC"


def test_flux_schedule_follows_its_rule():
    """ClusCa's FLUX code (planned without a model: FLUX.1-dev's 19 double and 38 single blocks):
    the first 3 steps full, then every N-th (N = 5); order 1; a ClusCa step computes the double
    blocks' MLPs on K representatives per stream and forecasts the single blocks."""
    sched = get_method("clusca").schedule(50, options={"profile": "flux"})
    assert sched.options["order"] == 1 and sched.options["interval"] == 5 and sched.options["clusters"] == 16
    full = [p.kinds[0] == "full" for p in sched.steps]
    assert full == [i in (0, 1, 2) or (i - 2) % 5 == 0 for i in range(50)]
    double, single = range(19), range(19, 57)
    for plan, is_full in zip(sched.steps, full):
        if is_full:
            assert set(plan.kinds) == {"full"} and plan.tokens is None
            continue
        assert [plan.kinds[b] for b in double] == ["partial"] * 19 and [plan.kinds[b] for b in single] == ["forecast"] * 38
        assert [plan.tokens[b] for b in double] == [plan.text_tokens[b] for b in double] == [16] * 19
        assert all(plan.tokens[b] is None and plan.text_tokens[b] is None for b in single)
