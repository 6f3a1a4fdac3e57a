"""ClusCa (METHODS.md §6): its schedule, its variants, and whole sampling runs against a reference.

`ClusCaReference` below is a plain-PyTorch ClusCa / TaylorSeer written literally from §2, §6.2-6.5
and §7: its own loop over the DiT blocks (the model's own submodules), its own cache dicts and step
state, its own K-means and its own RNG draws in the official order. It is driven by
`graphcache.sample` exactly like the compiled model, so both see the same global RNG stream
(DDPM's and DDIM's per-step `randn_like` interleaved with ClusCa's draws).

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
from torch import nn

import graphcache
from graphcache.methods import get_method
from graphcache.models.dit import DiT, DiTConfig, dit_config, init_random_, sincos_pos_embed_2d
from graphcache.passes.cluster import KMEANS
from graphcache.passes.taylor import DELTA_INPUT, coefficient_input
from graphcache.schedule import FORECAST, FULL, PARTIAL

TOL = 1e-5


# ---------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------


class ClusCaReference(nn.Module):
    """ClusCa (clusters > 0) or TaylorSeer (clusters == 0) on a DiT, from METHODS.md alone."""

    first_enhance = 2

    def __init__(self, dit, interval, clusters, order, gamma=0.0, per_cluster=1):
        super().__init__()
        self.dit = dit
        self.interval, self.clusters, self.order = interval, clusters, order
        self.gamma, self.per_cluster = gamma, per_cluster
        for attr in ("in_channels", "input_size", "num_classes", "learn_sigma"):
            setattr(self, attr, getattr(dit, attr))

    # -- cache_init, once per sampling loop (§2) --
    def start_sampling(self, num_steps):
        self.num_steps = num_steps
        self.calls = 0
        self.cache = {}  # layer -> 'attn' | 'mlp' -> {i: factor}
        self.cache_counter = 0
        self.activated_steps = [49]
        self.labels = self.centroids = None
        self.types = []

    # -- §6.2, once per forward before the blocks --
    def cal_type(self, s):
        first_steps = s > self.num_steps - self.first_enhance - 1
        if first_steps or self.cache_counter == self.interval - 1:
            self.cache_counter = 0
            self.activated_steps.append(s)
            return "full"
        self.cache_counter += 1
        return "ClusCa" if self.clusters > 0 else "Taylor"

    # -- §6.3 --
    def derivative_approximation(self, layer, module, feature, s):
        d = self.activated_steps[-1] - self.activated_steps[-2]
        old = self.cache.setdefault(layer, {}).get(module, {})
        new = {0: feature}
        for i in range(self.order):
            if old.get(i) is not None and s < self.num_steps - self.first_enhance + 1:
                new[i + 1] = (new[i] - old[i]) / d
            else:
                break
        self.cache[layer][module] = new

    def taylor_formula(self, layer, module, s):
        dist = s - self.activated_steps[-1]
        out = 0
        for i, factor in self.cache[layer][module].items():
            out = out + (1 / math.factorial(i)) * factor * dist**i
        return out

    # -- §6.4 --
    def kmeans(self, x):
        B, N, _ = x.shape
        K = self.clusters
        if self.centroids is None:
            centroids = x[torch.arange(B)[:, None], torch.randint(0, N, (B, K), device=x.device)]
        else:
            centroids = self.centroids
        for _ in range(100):
            labels = torch.cdist(x, centroids, p=1).argmin(dim=-1)
            onehot = torch.nn.functional.one_hot(labels, K).float()
            counts = onehot.sum(dim=1)
            new = onehot.transpose(1, 2) @ x / (counts.unsqueeze(-1) + 1e-8)
            if torch.allclose(centroids, new, rtol=1e-4):
                break
            centroids = new
        self.labels, self.centroids = labels, centroids

    # -- §6.5 --
    def clusca_mlp(self, layer, block, x, shift, scale):
        B, N, C = x.shape
        r = torch.rand(B, N, device=x.device)
        picks = []
        for k in range(self.clusters):
            masked = torch.where(self.labels == k, r, -math.inf)
            if self.per_cluster == 1:
                picks.append(masked.argmax(dim=-1, keepdim=True))
            else:
                picks.append(masked.sort(dim=-1, descending=True, stable=True).indices[:, : self.per_cluster])
        idx = torch.cat(picks, dim=1)
        rows = torch.arange(B)[:, None]
        fresh = block.mlp(block.norm2(x[rows, idx]) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1))
        cache0 = self.cache[layer]["mlp"][0].clone()
        cache0[rows, idx] = fresh
        if self.gamma > 0:
            rep = torch.zeros(B, self.clusters, C)
            for b in range(B):  # rep[b, k] = sum of the fresh values whose token is in cluster k
                rep[b].index_add_(0, self.labels[b, idx[b]], fresh[b])
            cache0 = self.gamma * rep[rows, self.labels] + (1 - self.gamma) * cache0
        self.cache[layer]["mlp"][0] = cache0

    def forward(self, x, t, y):
        dit = self.dit
        s = self.num_steps - 1 - self.calls
        self.calls += 1
        if s == self.num_steps - 1:
            self.cache = {}  # taylor_cache_init
        kind = self.cal_type(s)
        self.types.append(kind)
        height, width = x.shape[2:]
        h = dit.x_embedder(x) + dit.pos_embed
        c = dit.t_embedder(t) + dit.y_embedder(y)
        for layer, block in enumerate(dit.blocks):
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
            if kind == "full":
                a = block.attn(block.norm1(h) * (1 + scale_msa.unsqueeze(1)) + shift_msa.unsqueeze(1))
                self.derivative_approximation(layer, "attn", a, s)
                h = h + gate_msa.unsqueeze(1) * a
                m = block.mlp(block.norm2(h) * (1 + scale_mlp.unsqueeze(1)) + shift_mlp.unsqueeze(1))
                self.derivative_approximation(layer, "mlp", m, s)
                h = h + gate_mlp.unsqueeze(1) * m
                if layer == len(dit.blocks) - 1 and self.clusters > 0:
                    self.kmeans(h)
            else:
                h = h + gate_msa.unsqueeze(1) * self.taylor_formula(layer, "attn", s)
                if kind == "ClusCa":
                    self.clusca_mlp(layer, block, h, shift_mlp, scale_mlp)
                h = h + gate_mlp.unsqueeze(1) * self.taylor_formula(layer, "mlp", s)
        out = dit.final_layer(h, c)
        return dit.unpatchify(out, height, width)


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
# Schedule (§6.2)
# ---------------------------------------------------------------------------------------------


def schedule_by_rule(num_steps, interval):
    """§6.2 replayed: one character per step, F full, C ClusCa."""
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
            assert plan.extra == ("full", plan.index == 0)
            # the first full step differences nothing: d = 1 only keeps the unused leftovers finite
            assert plan.inputs == ({DELTA_INPUT: activated[-1] - activated[-2] if m else 1} if order else {})
            if m:
                assert plan.inputs[DELTA_INPUT] < 0
        else:
            assert set(plan.kinds) == {PARTIAL} and plan.tokens == (k * per,) * 28
            assert plan.extra == (PARTIAL,)
            dist = s - activated[-1]
            assert plan.inputs == {coefficient_input(i): dist**i / math.factorial(i) if i < factors else 0.0
                                   for i in range(1, order + 1)}
            assert plan.to_json()["tokens"] == [k * per] * 28
    assert sched.options == {"interval": interval, "clusters": k, "order": order, "propagation": 0.005,
                             "tokens_per_cluster": per}


def test_options_and_variants():
    method = get_method("clusca")
    assert {o.name: o.default for o in method.options} == {
        "interval": 5, "clusters": 16, "order": 4, "propagation": 0.005, "tokens_per_cluster": 1}
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

    kinds = {}
    for key, gm in cm.variants.items():
        records = {r.name: r for r in cm.records[key]}
        extra = key[1]
        if extra[0] == "full":
            assert count(gm, KMEANS) == 1 and count(gm, torch.rand) == 0
            assert count(gm, torch.randint) == (1 if extra[1] else 0)
            assert records["InsertTaylorUpdatePass"].counters == {  # order 2: 2 differences, 3 writes
                "taylor_read": 2 * depth * 2, "derivative": 2 * depth * 2, "taylor_write": 2 * depth * 3,
                "branch": 2 * depth}
            assert records["InsertClusterPass"].counters["kmeans"] == 1
        else:
            assert count(gm, KMEANS) == 0 and count(gm, torch.randint) == 0
            assert count(gm, torch.rand) == depth  # one draw per ClusCa block
            assert records["ReplaceWithTaylorForecastPass"].counters == {"taylor_read": depth * 3, "forecast": depth}
            assert records["InsertTokenSelectPass"].counters == {"token_select": depth}
        kinds[extra] = True
    assert set(kinds) == {("full", True), ("full", False), (PARTIAL,)}
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


def random_xl(input_size=8, seed=1):
    """A DiT-XL/2-shaped model, every weight random with std 0.02 like `init_random_`, but drawn
    uniformly (U(-0.02·√3, 0.02·√3)) and in place: 675M normal draws would be most of this test's
    time. The fixed sin-cos positional embedding is kept."""
    with torch.device("meta"):
        dit = DiT(dit_config("DiT-XL/2", input_size=input_size, num_classes=10))
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
