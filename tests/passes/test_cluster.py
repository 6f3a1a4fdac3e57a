"""ClusCa's passes and functions (Shenyi-Z/Cache4Diffusion `dit/clusca-dit/`: K-means, representatives,
propagation).

* K-means: the batched, chunk-checked op against the literal loop (a host check every iteration),
  bit for bit, converged or not, with empty clusters; `InsertClusterPass`'s nodes, its single
  global-RNG `randint` at the first full step, and the labels/centroids it stores.
* Representatives and propagation against loops written here from the official ClusCa step; the in-place
  propagation op (`cache_propagate`) against its out-of-place form, and its registration.
* The ClusCa token-select variant: one `rand` per block, counts, and its numbers against the eager
  model; the negative case: a branch whose MLP mixes tokens is declined, naming the node.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import graphcache
from graphcache import ir
from graphcache.cache import CACHE_ATTR, CacheState
from graphcache.models.dit import DiT, DiTConfig, init_random_
from graphcache.ops import CACHE_SCATTER, CACHE_UPDATES, is_cache_write
from graphcache.passes.cache_passes import EliminateDeadBranchesPass
from graphcache.passes.cluster import (
    CACHE_PROPAGATE,
    CENTROIDS_SLOT,
    KMEANS,
    LABELS_SLOT,
    ClusterPropagationMerger,
    ClusterRepresentativeSelector,
    InsertClusterPass,
    cluster_representatives,
    kmeans_l1,
    kmeans_l1_eager,
    propagate_to_clusters,
)
from graphcache.passes.manager import PassManager
from graphcache.passes.taylor import ReplaceWithTaylorForecastPass, forecast_coefficients
from graphcache.passes.token_select import InsertTokenSelectPass
from graphcache.runtime import new_variant
from graph_queries import calls, layer_calls

DEPTH = 2
K = 4
CFG = DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=DEPTH, num_heads=4, num_classes=10)
N = (8 // 2) ** 2


@pytest.fixture(scope="module")
def model():
    return init_random_(DiT(CFG), seed=5).eval()


@pytest.fixture(scope="module")
def captured(model):
    return graphcache.capture(model)


def build(captured, passes):
    gm = new_variant(captured, CacheState())
    return gm, PassManager(passes)(gm)


def allocate(captured, gm):
    cache = getattr(gm, CACHE_ATTR)
    nodes = ir.nodes_by_name(captured.graph)
    specs = {n: s.resolve(nodes[s.like].meta["tensor_meta"]) for n, s in gm.meta["graphcache_slots"].items()}
    cache.allocate(specs, torch.device("cpu"), signature=None)
    return cache


def inputs():
    g = torch.Generator().manual_seed(11)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([600, 600]), torch.tensor([4, 10])


# ---------------------------------------------------------------------------------------------
# K-means
# ---------------------------------------------------------------------------------------------


def literal_kmeans(x, centroids, max_iter=100, rtol=1e-4):
    """The official K-means as written: one allclose (host check) per iteration, labels from the OLD centroids."""
    k = centroids.shape[1]
    for _ in range(max_iter):
        labels = torch.cdist(x, centroids, p=1).argmin(dim=-1)
        onehot = F.one_hot(labels, k).float()
        counts = onehot.sum(dim=1)
        new = onehot.transpose(1, 2) @ x / (counts.unsqueeze(-1) + 1e-8)
        if torch.allclose(centroids, new, rtol=rtol):
            break
        centroids = new
    return labels, centroids


def blobs(seed, b=2, n=64, c=16, k=4):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(b, k, c, generator=g) * 3
    member = torch.randint(0, k, (b, n), generator=g)
    return centers.gather(1, member.unsqueeze(-1).expand(-1, -1, c)) + torch.randn(b, n, c, generator=g)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("check_every", [1, 3, 100])
@pytest.mark.parametrize("max_iter", [1, 2, 100])
def test_kmeans_matches_literal_loop(seed, check_every, max_iter):
    x = blobs(seed)
    g = torch.Generator().manual_seed(100 + seed)
    start = x.gather(1, torch.randint(0, 64, (2, 8), generator=g).unsqueeze(-1).expand(-1, -1, 16))
    start[:, 1] = start[:, 0]  # duplicate centroids: one cluster empties and gets a zero centroid
    want = literal_kmeans(x, start.clone(), max_iter)
    got = kmeans_l1_eager(x, start.clone(), max_iter, 1e-4, check_every)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[0].dtype == torch.int64 and got[0].shape == (2, 64) and got[1].shape == (2, 8, 16)


def test_kmeans_of_a_bf16_stream_runs_in_float32():
    """cdist has no bf16 kernel: a bf16 stream (a bf16 model's) is clustered in float32, and the
    centroids come back in bf16."""
    x = blobs(4).bfloat16()
    start = x[:, :8].clone()
    labels, cents = kmeans_l1(x, start, 100, 1e-4, 5)
    want = kmeans_l1_eager(x.float(), start.float(), 100, 1e-4, 5)
    assert cents.dtype == torch.bfloat16 and torch.equal(labels, want[0])
    assert torch.equal(cents, want[1].bfloat16())


def test_clusca_samples_a_bf16_model():
    model = init_random_(DiT(DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4,
                                       num_classes=10))).eval().to(torch.bfloat16)
    cached = graphcache.optimize(model, "clusca", num_steps=6, interval=3, clusters=4)
    out = graphcache.sample(cached, [1, 2], seed=0, num_steps=6)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert cached.cache.get_buffer("cluster_centroids").dtype == torch.bfloat16


def test_kmeans_empty_cluster_and_convergence():
    x = blobs(9)
    start = x[:, :4].clone()
    start[:, 3] = start[:, 2]
    labels, cents = kmeans_l1(x, start, 100, 1e-4, 5)
    # converged: the labels are the assignment to the returned centroids
    assert torch.equal(torch.cdist(x, cents, p=1).argmin(-1), labels)
    for b in range(2):
        for k in range(4):
            members = x[b][labels[b] == k]
            want = members.mean(0) if len(members) else torch.zeros(16)
            torch.testing.assert_close(cents[b, k], want, rtol=1e-5, atol=1e-5)
    # the op never hands back its input
    assert labels.data_ptr() != start.data_ptr() and cents.data_ptr() != start.data_ptr()


def test_cluster_pass_structure(captured):
    first, rec1 = build(captured, [InsertClusterPass(K, init=True)])
    later, rec2 = build(captured, [InsertClusterPass(K, init=False)])
    assert rec1[0].counters == {"randint": 1, "kmeans": 1, "cache_write": 2}
    assert rec2[0].counters == {"centroid_read": 1, "kmeans": 1, "cache_write": 2}
    for gm, randints in ((first, 1), (later, 0)):
        assert len(calls(gm, torch.randint)) == randints
        (km,) = calls(gm, KMEANS)
        assert km.args[0].name == ir.structure_of(gm).stream_end  # on the last block's output
        assert km.args[2:] == (100, 1e-4, 5)
        writes = [n.args[0].target for n in gm.graph.nodes if is_cache_write(n)]
        assert writes == [f"{CACHE_ATTR}.{LABELS_SLOT}", f"{CACHE_ATTR}.{CENTROIDS_SLOT}"]
        assert sorted(gm.meta["graphcache_slots"]) == [CENTROIDS_SLOT, LABELS_SLOT]
    # warm start: the later variant reads the centroids the previous full step stored
    assert km.args[1].op == "get_attr" and km.args[1].target == f"{CACHE_ATTR}.{CENTROIDS_SLOT}"


def test_cluster_pass_rng_and_values(model, captured):
    gm, _ = build(captured, [InsertClusterPass(K, init=True)])
    cache = allocate(captured, gm)
    assert cache.cluster_labels.shape == (2, N) and cache.cluster_labels.dtype == torch.int64
    assert cache.cluster_centroids.shape == (2, K, 64)
    args = inputs()
    seen = {}
    hook = model.blocks[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("x", o.clone()))
    try:
        with torch.no_grad():
            plain = model(*args)
    finally:
        hook.remove()
    torch.manual_seed(123)
    with torch.no_grad():
        out = gm(*args)
    after = torch.rand(3)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)  # clustering does not touch the output
    torch.manual_seed(123)
    start = torch.randint(0, N, (2, K))  # exactly one draw, (B, K), then nothing else
    assert torch.equal(torch.rand(3), after)
    x = seen["x"]
    want = literal_kmeans(x, x[torch.arange(2)[:, None], start])
    assert torch.equal(cache.cluster_labels, want[0]) and torch.equal(cache.cluster_centroids, want[1])

    # a later full step starts from the stored centroids and draws nothing
    warm, _ = build(captured, [InsertClusterPass(K, init=False)])
    setattr(warm, CACHE_ATTR, cache)
    before = cache.cluster_centroids.clone()
    torch.manual_seed(5)
    with torch.no_grad():
        warm(*args)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))
    want = literal_kmeans(x, before)
    assert torch.equal(cache.cluster_labels, want[0]) and torch.equal(cache.cluster_centroids, want[1])


# ---------------------------------------------------------------------------------------------
# Representatives and propagation
# ---------------------------------------------------------------------------------------------


def test_representatives_one_per_cluster():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (3, 40), generator=g)
    labels[1][labels[1] == 2] = 3  # row 1: cluster 2 is empty
    r = torch.rand(3, 40, generator=g)
    idx = cluster_representatives(r, labels, 6)  # cluster 5 empty everywhere
    assert idx.shape == (3, 6) and idx.dtype == torch.int64
    for b in range(3):
        for k in range(6):
            members = (labels[b] == k).nonzero().flatten()
            if len(members) == 0:
                assert idx[b, k] == 0
            else:
                assert idx[b, k] == members[r[b, members].argmax()]


def test_representatives_top_per_cluster():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (2, 30), generator=g)
    labels[0, :] = 0
    labels[0, 7] = 1  # row 0: cluster 1 has one member, cluster 2 none
    r = torch.rand(2, 30, generator=g)
    idx = cluster_representatives(r, labels, 3, per_cluster=2)
    assert idx.shape == (2, 6)
    for b in range(2):
        for k in range(3):
            members = (labels[b] == k).nonzero().flatten()
            ranked = members[r[b, members].argsort(descending=True)].tolist()
            padding = [i for i in range(30) if i not in members.tolist()]  # stable: lowest index first
            assert idx[b, 2 * k: 2 * k + 2].tolist() == (ranked + padding)[:2]


def test_propagation_matches_loop():
    g = torch.Generator().manual_seed(2)
    b, n, c, k = 2, 20, 5, 4
    labels = torch.randint(0, k, (b, n), generator=g)
    idx = torch.tensor([[3, 0, 0, 9], [1, 2, 19, 1]])  # duplicates double-count
    fresh = torch.randn(b, 4, c, generator=g)
    old0 = torch.randn(b, n, c, generator=g)
    gamma = 0.3
    rep = torch.zeros(b, k, c)
    order0 = old0.clone()
    for bb in range(b):
        for j in range(idx.shape[1]):
            rep[bb, labels[bb, idx[bb, j]]] += fresh[bb, j]
            order0[bb, idx[bb, j]] = fresh[bb, j]  # a duplicate pick: the last one wins, as in scatter
    want = torch.stack([gamma * rep[bb, labels[bb]] + (1 - gamma) * order0[bb] for bb in range(b)])
    before = old0.clone()
    got = propagate_to_clusters(old0, labels, idx, fresh, k, gamma)
    torch.testing.assert_close(got, want)
    assert torch.equal(old0, before)  # out of place: the functional form exporters use
    # the in-place op eager graphs use: the slot itself becomes the same values
    storage = old0.data_ptr()
    torch.ops.graphcache.cache_propagate(old0, labels, idx, fresh, k, gamma)
    assert torch.equal(old0, got) and old0.data_ptr() == storage


def test_cache_propagate_is_an_in_place_cache_update():
    assert CACHE_PROPAGATE is torch.ops.graphcache.cache_propagate.default
    assert CACHE_UPDATES[CACHE_PROPAGATE] is propagate_to_clusters  # what FunctionalizeCachePass substitutes
    g = fx.Graph()
    args = [g.placeholder(name) for name in ("slot", "labels", "idx", "fresh")]
    node = g.call_function(CACHE_PROPAGATE, (*args, K, 0.5))
    assert is_cache_write(node) and node.is_impure()


# ---------------------------------------------------------------------------------------------
# The ClusCa step variant
# ---------------------------------------------------------------------------------------------


def clusca_passes(gamma, per_cluster=1, order=2):
    return [
        ReplaceWithTaylorForecastPass(order=order, kinds={ir.ATTENTION}),
        InsertTokenSelectPass(
            range(DEPTH), ClusterRepresentativeSelector(K, per_cluster),
            ClusterPropagationMerger(K, order, gamma)),
        EliminateDeadBranchesPass(),
    ]


@pytest.mark.parametrize("gamma,update", [(0.1, CACHE_PROPAGATE), (0.0, CACHE_SCATTER)])
def test_clusca_step_structure(captured, gamma, update):
    gm, records = build(captured, clusca_passes(gamma=gamma))
    assert records[0].counters == {"taylor_read": 3 * DEPTH, "forecast": DEPTH}  # order 2: 3 factors
    assert records[1].counters == {"token_select": DEPTH} and not records[1].declined
    assert len(calls(gm, torch.rand)) == DEPTH  # exactly one draw per block
    assert not calls(gm, torch.randint) and not calls(gm, KMEANS)
    # the order-0 MLP factor is updated in place (it persists), with propagation only when γ > 0
    writes = [(n.target, n.args[0].target) for n in gm.graph.nodes if is_cache_write(n)]
    assert writes == [(update, f"{CACHE_ATTR}.b{b}_mlp_taylor0") for b in range(DEPTH)]
    mlp = [n for n in layer_calls(gm, "blocks.") if ".mlp." in ir.layer_path(n)]
    assert len(mlp) == 3 * DEPTH  # fc1, act, fc2 once per block, on the gathered tokens only
    # each block's rand comes after the previous block's work and before its own MLP
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    rands = calls(gm, torch.rand)
    fc1 = layer_calls(gm, suffix="mlp.fc1")
    assert order[rands[0]] < order[fc1[0]] < order[rands[1]] < order[fc1[1]]


@pytest.mark.parametrize("gamma,per_cluster", [(0.0, 1), (0.2, 1), (0.2, 2)])
def test_clusca_step_numbers(model, captured, gamma, per_cluster):
    """The variant against the eager model, with the ClusCa step computed here block by block. Two of the
    three factors exist: the third holds random values its zero weight must leave out."""
    order, factors, dist = 2, 2, -2
    gm, _ = build(captured, clusca_passes(gamma, per_cluster, order))
    cache = allocate(captured, gm)
    g = torch.Generator().manual_seed(4)
    for name, buf in cache.named_buffers():
        if name == LABELS_SLOT:
            buf.copy_(torch.randint(0, K, buf.shape, generator=g))
        else:
            buf.copy_(torch.randn(buf.shape, generator=g))
    old = {name: buf.clone() for name, buf in cache.named_buffers()}
    args = inputs()
    torch.manual_seed(77)
    with torch.no_grad():
        out = gm(*args, **forecast_coefficients(dist, factors, order))

    torch.manual_seed(77)
    labels = old[LABELS_SLOT]
    x, t, y = args
    with torch.no_grad():
        h = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y)
        for b, blk in enumerate(model.blocks):
            _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = blk.adaLN_modulation(c).chunk(6, dim=1)
            f = [old[f"b{b}_attention_taylor{i}"] for i in range(factors)]
            h = h + gate_msa.unsqueeze(1) * sum(f[i] * dist**i / math.factorial(i) for i in range(factors))
            r = torch.rand(2, N)
            picks = []
            for k in range(K):
                masked = torch.where(labels == k, r, -math.inf)
                top = masked.argmax(-1, keepdim=True) if per_cluster == 1 else masked.sort(
                    dim=-1, descending=True, stable=True).indices[:, :per_cluster]
                picks.append(top)
            idx = torch.cat(picks, 1)
            rows = torch.arange(2)[:, None]
            fresh = blk.mlp(blk.norm2(h[rows, idx]) * (1 + scale_mlp.unsqueeze(1)) + shift_mlp.unsqueeze(1))
            m0 = old[f"b{b}_mlp_taylor0"].clone()
            m0[rows, idx] = fresh
            if gamma > 0:
                rep = torch.zeros(2, K, 64)
                for bb in range(2):
                    for j in range(idx.shape[1]):
                        rep[bb, labels[bb, idx[bb, j]]] += fresh[bb, j]
                m0 = gamma * rep[rows, labels] + (1 - gamma) * m0
            torch.testing.assert_close(getattr(cache, f"b{b}_mlp_taylor0"), m0, rtol=1e-5, atol=1e-5)
            fm = [m0] + [old[f"b{b}_mlp_taylor{i}"] for i in range(1, factors)]
            h = h + gate_mlp.unsqueeze(1) * sum(fm[i] * dist**i / math.factorial(i) for i in range(factors))
        want = model.unpatchify(model.final_layer(h, c), 8, 8)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # the higher MLP factors and every attention factor are untouched
    for name, buf in cache.named_buffers():
        if not name.endswith("mlp_taylor0"):
            assert torch.equal(buf, old[name]), name


class MixingMlp(nn.Module):
    """An MLP that also adds the token mean: not token-local, so gather-first would be wrong."""

    def __init__(self, dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x))) + x.mean(dim=1, keepdim=True)


def test_token_select_declines_token_mixing_mlp():
    model = DiT(CFG)
    model.blocks[1].mlp = MixingMlp(64)
    init_random_(model, seed=2).eval()
    captured = graphcache.capture(model)
    assert [br.kind for br in ir.structure_of(captured).branches] == ["attention", "mlp"] * DEPTH
    gm, records = build(captured, clusca_passes(gamma=0.1))
    assert records[1].counters == {"token_select": 1}
    (declined,) = records[1].declined
    assert declined.target == "b1_mlp" and declined.reason.startswith("node mean ")
    assert len(calls(gm, torch.rand)) == 1  # no draw for the declined block
