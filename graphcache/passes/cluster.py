"""ClusCa's rewrites (Zheng et al., arXiv 2509.10312; Shenyi-Z/Cache4Diffusion `dit/clusca-dit/`
`models.py`, `cluster_utils/`, `cache_functions/select_fresh_tokens.py`, `update_cache.py`): cluster
the tokens at full steps, and at ClusCa steps compute the MLP on one random member per cluster,
propagating its update to the whole cluster.

* `InsertClusterPass` (full steps): batched K-means with L1 distance on the stream leaving the last
  block (B, N, C), warm-started from the cached centroids; at the first full step of a run it
  starts from K random tokens per row (one global-RNG `torch.randint` node, at the official point:
  after the last block's MLP). It writes `cluster_labels` (B, N) int64 and `cluster_centroids`
  (B, K, C). On a two-stream model (ClusCa's FLUX code) the image and the text stream are
  clustered apart, each where it leaves the last double-stream block (`text_cluster_…` slots).
* `ClusterRepresentativeSelector` (a `TokenSelector` for `InsertTokenSelectPass`): one global-RNG
  `torch.rand(B, N)` per block, and per cluster the member with the largest draw (the top
  `per_cluster` ones when > 1), so (B, K * per_cluster) indices.
* `ClusterPropagationMerger` (its `TokenMerger`): scatter the fresh MLP outputs into the order-0
  Taylor factor and, with γ > 0, pull every token towards its cluster's fresh value, both in place
  on the cached factor (`cache_scatter`, `cache_propagate`: the change persists, as in the official
  code), and return the Taylor forecast over the updated factor.

The K-means loop is data-dependent (it stops on convergence), so it is one custom op,
`graphcache::kmeans_l1`: opaque to tracing compilers, no graph break, no RNG inside (tagged
`cudagraph_unsafe`: it syncs with the host, so CUDA graphs are split around it).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import Tensor

from .. import ir
from ..cache import CacheSlot, declare_slot, read_slot, update_slot, write_slot
from ..ops import (
    CACHE_SCATTER,
    CACHE_UPDATES,
    EAGER_KERNELS,
    HOST_OPS,
    gather_tokens,
    put_tokens_,
    scatter_tokens,
    token_index,
)
from .base import Pass, PassResult
from .taylor import declare_taylor_slots, taylor_forecast, taylor_slot
from .token_select import SelectContext, TokenMerger, TokenSelector

LABELS_SLOT = "cluster_labels"
CENTROIDS_SLOT = "cluster_centroids"
KMEANS_EPS = 1e-8  # added to the cluster sizes: an empty cluster gets a zero centroid


# --------------------------------------------------------------------------------------------
# K-means
# --------------------------------------------------------------------------------------------


def kmeans_l1_eager(x: Tensor, centroids: Tensor, max_iter: int = 100, rtol: float = 1e-4,
                    check_every: int = 5) -> tuple[Tensor, Tensor]:
    """Batched K-means, L1 distance: x (B, N, C), initial centroids (B, K, C) -> labels, centroids.

    Semantics of the loop it replaces (one host check per iteration):

        for _ in range(max_iter):
            labels = argmin cdist_L1(x, centroids);  new = (onehot^T @ x) / (counts + 1e-8)
            if allclose(centroids, new, rtol): break    # labels from the OLD centroids, kept
            centroids = new

    The convergence test is global over the whole batch (one `allclose`). Here the host looks at it
    only every `check_every` iterations; iterations after convergence leave labels and centroids
    frozen (`torch.where`), so the result is bit-identical to checking every iteration.

    A half-precision stream (a bf16 model) is clustered in float32 and the centroids are returned
    in the stream's dtype: `cdist` has no bf16/fp16 kernels, and bf16 sums over a cluster's members
    would round away the convergence test's 1e-4.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    dtype = centroids.dtype
    work = torch.promote_types(x.dtype, torch.float32)
    x, centroids = x.to(work), centroids.to(work)
    clusters = torch.arange(centroids.shape[1], device=x.device)
    done = torch.zeros((), dtype=torch.bool, device=x.device)
    labels = None
    for it in range(max_iter):
        step_labels = torch.cdist(x, centroids, p=1).argmin(dim=-1)
        onehot = (step_labels.unsqueeze(-1) == clusters).to(x.dtype)  # (B, N, K); F.one_hot would sync
        counts = onehot.sum(dim=1)  # (B, K)
        new = onehot.transpose(1, 2) @ x / (counts.unsqueeze(-1) + KMEANS_EPS)
        converged = torch.isclose(centroids, new, rtol=rtol, atol=1e-8).all()
        labels = step_labels if labels is None else torch.where(done, labels, step_labels)
        centroids = torch.where(done | converged, centroids, new)
        done = done | converged
        if (it + 1) % check_every == 0 and it + 1 < max_iter and bool(done):
            break
    return labels, centroids.to(dtype)


# cudagraph_unsafe: the loop reads a flag on the host (`bool(done)`), which a CUDA graph cannot
# capture; Inductor's reduce-overhead mode partitions the graph around this op instead.
@torch.library.custom_op("graphcache::kmeans_l1", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def kmeans_l1(x: Tensor, centroids: Tensor, max_iter: int, rtol: float, check_every: int) -> tuple[Tensor, Tensor]:
    """K-means (see `kmeans_l1_eager`); returns fresh tensors (labels int64, centroids)."""
    labels, out = kmeans_l1_eager(x, centroids, max_iter, rtol, check_every)
    return labels.clone(), out.clone()


@kmeans_l1.register_fake
def _(x, centroids, max_iter, rtol, check_every):
    return x.new_empty(x.shape[:2], dtype=torch.int64), centroids.new_empty(centroids.shape)


KMEANS = torch.ops.graphcache.kmeans_l1.default
HOST_OPS.add(KMEANS)  # it syncs with the host; exporters run it after the exported graph


def _draw_shape(graph: fx.Graph, labels: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node]:
    """(B, N, device) for a draw, read off the labels slot (B, N) rather than the stream: an
    exporter moves each draw, with what its shape is computed from, to a prologue graph
    (passes/functionalize.py), and sizes of the stream would bring the whole step's computation
    along (DiT-XL/2 ClusCa on aoti: every step ran twice)."""
    b = graph.call_method("size", (labels, 0))
    n = graph.call_method("size", (labels, 1))
    return b, n, graph.call_function(getattr, (labels, "device"))


def cluster_slots(stream: str = ir.IMAGE) -> tuple[str, str]:
    """The (labels, centroids) slots of a stream's clustering."""
    prefix = "text_" if stream == ir.TEXT else ""
    return prefix + LABELS_SLOT, prefix + CENTROIDS_SLOT


def clustered_streams(structure: ir.Structure) -> list[ir.Stream]:
    """The streams ClusCa clusters: the image stream (and an MMDiT's text stream), where each
    leaves its last block; the joint stream of single-stream blocks is forecast, not clustered."""
    return [st for st in structure.streams if st.name != ir.JOINT]


def declare_cluster_slots(gm: fx.GraphModule, clusters: int, stream: str = ir.IMAGE) -> None:
    end = next(st.end for st in ir.structure_of(gm).streams if st.name == stream)
    labels, centroids = cluster_slots(stream)
    declare_slot(gm, CacheSlot(labels, like=end, shape=lambda s: (s[0], s[1]), dtype=torch.int64))
    declare_slot(gm, CacheSlot(centroids, like=end, shape=lambda s, k=clusters: (s[0], k, s[2])))


class InsertClusterPass(Pass):
    """K-means on the last block's output; `init` marks the run's first full step (random start)."""

    def __init__(self, clusters: int, init: bool, max_iter: int = 100, rtol: float = 1e-4, check_every: int = 5):
        super().__init__()
        if clusters < 1:
            raise ValueError(f"clusters must be >= 1, got {clusters}")
        self.clusters, self.init, self.max_iter, self.rtol, self.check_every = (
            clusters, init, max_iter, rtol, check_every)

    def call(self, gm):
        for stream in clustered_streams(ir.structure_of(gm)):
            self._cluster(gm, stream)
        return PassResult(gm, True)

    def _cluster(self, gm, stream: ir.Stream) -> None:
        graph = gm.graph
        x = ir.nodes_by_name(graph)[stream.end]
        labels_slot, centroids_slot = cluster_slots(stream.name)
        declare_cluster_slots(gm, self.clusters, stream.name)
        with ir.insert_after(x):
            if self.init:
                b, n, device = _draw_shape(graph, read_slot(graph, labels_slot))
                start = graph.call_function(torch.randint, (0, n, (b, self.clusters)), {"device": device})
                centroids = graph.call_function(gather_tokens, (x, start))
                self.count("randint", stream.name)
            else:
                centroids = read_slot(graph, centroids_slot)
                self.count("centroid_read", stream.name)
            result = graph.call_function(KMEANS, (x, centroids, self.max_iter, self.rtol, self.check_every))
            labels = graph.call_function(operator.getitem, (result, 0))
            new_centroids = graph.call_function(operator.getitem, (result, 1))
            write_slot(graph, labels_slot, labels)
            write_slot(graph, centroids_slot, new_centroids)
        self.count("kmeans", stream.name)
        self.count("cache_write", stream.name, 2)


# --------------------------------------------------------------------------------------------
# ClusCa partial MLP: representatives, scatter, propagation
# --------------------------------------------------------------------------------------------


def cluster_representatives(r: Tensor, labels: Tensor, clusters: int, per_cluster: int = 1) -> Tensor:
    """(B, K * per_cluster) token indices: per cluster, its members with the largest draws r.

    One per cluster is `argmax` of r masked (-inf) to the cluster: an empty cluster gives token 0
    (so duplicates are possible). With per_cluster > 1 the members are taken in decreasing r; a
    cluster with fewer members is padded with the lowest-indexed non-members (stable order).
    Indices are cluster-major: [cluster 0's picks, cluster 1's picks, ...].
    """
    ks = torch.arange(clusters, device=labels.device).view(1, clusters, 1)
    masked = torch.where(labels.unsqueeze(1) == ks, r.unsqueeze(1), float("-inf"))  # (B, K, N)
    if per_cluster == 1:
        return masked.argmax(dim=-1)
    order = masked.sort(dim=-1, descending=True, stable=True).indices[..., :per_cluster]
    return order.reshape(r.shape[0], clusters * per_cluster)


def cluster_pull(labels: Tensor, idx: Tensor, fresh: Tensor, clusters: int, gamma: float) -> Tensor:
    """γ · rep[cluster(b, i)] (B, N, C), where rep[b, k] = Σ fresh[b, j] over the picks idx[b, j]
    in cluster k.

    A pick's cluster is that of the token actually picked, so an empty cluster's token 0 counts for
    token 0's cluster, and duplicates count twice. γ scales the (B, K, C) sums before the gather:
    the same products, since the gather only copies them.
    """
    channels = fresh.shape[-1]
    picked = labels.gather(1, idx)  # (B, k)
    rep = fresh.new_zeros(fresh.shape[0], clusters, channels).scatter_add_(1, token_index(picked, channels), fresh)
    return gather_tokens(rep.mul_(gamma), labels)


def propagate_to_clusters(old0: Tensor, labels: Tensor, idx: Tensor, fresh: Tensor, clusters: int,
                          gamma: float) -> Tensor:
    """(1 - γ) · order0 + `cluster_pull`, where order0 is old0 with the fresh values scattered in
    (`scatter_tokens`), out of place: in place on the scatter's new full-size tensor, with the
    official roundings in the official order."""
    pull = cluster_pull(labels, idx, fresh, clusters, gamma)
    return scatter_tokens(old0, idx, fresh).mul_(1 - gamma).add_(pull)


def propagate_into_(dst: Tensor, labels: Tensor, idx: Tensor, fresh: Tensor, clusters: int,
                    gamma: float) -> Tensor:
    """`propagate_to_clusters` in place on `dst`: `cache_propagate`'s kernel."""
    pull = cluster_pull(labels, idx, fresh, clusters, gamma)
    return put_tokens_(dst, idx, fresh, unique=False).mul_(1 - gamma).add_(pull)


@torch.library.custom_op("graphcache::cache_propagate", mutates_args=("dst",))
def cache_propagate(dst: Tensor, labels: Tensor, idx: Tensor, fresh: Tensor, clusters: int,
                    gamma: float) -> None:
    """`propagate_to_clusters` in place on the cached order-0 factor, as the official code updates
    it: the same values, with one new full-size tensor (the pull) instead of two and a copy back
    into the slot."""
    propagate_into_(dst, labels, idx, fresh, clusters, gamma)


@cache_propagate.register_fake
def _(dst, labels, idx, fresh, clusters, gamma):
    return None


CACHE_PROPAGATE = torch.ops.graphcache.cache_propagate.default
CACHE_UPDATES[CACHE_PROPAGATE] = propagate_to_clusters
EAGER_KERNELS[CACHE_PROPAGATE] = propagate_into_


class ClusterRepresentativeSelector(TokenSelector):
    """One `torch.rand(B, N)` draw (global RNG) per block, then `cluster_representatives`."""

    def __init__(self, clusters: int, per_cluster: int = 1):
        self.clusters, self.per_cluster = clusters, per_cluster

    def indices(self, ctx: SelectContext) -> fx.Node:
        graph = ctx.gm.graph
        declare_cluster_slots(ctx.gm, self.clusters, ctx.branch.stream)
        labels = read_slot(graph, cluster_slots(ctx.branch.stream)[0])
        b, n, device = _draw_shape(graph, labels)
        r = graph.call_function(torch.rand, (b, n), {"device": device})
        return graph.call_function(cluster_representatives, (r, labels, self.clusters, self.per_cluster))


class ClusterPropagationMerger(TokenMerger):
    """Fresh tokens into the order-0 factor (+ propagation), in place; returns the forecast.

    order: the highest Taylor factor (all are read; the forecast coefficients say which exist).
    A text stream's fresh tokens are scattered without propagation, as ClusCa's FLUX code does.
    """

    def __init__(self, clusters: int, order: int, propagation: float = 0.0):
        self.clusters, self.order, self.propagation = clusters, order, propagation

    def merge(self, ctx: SelectContext, idx: fx.Node, fresh: fx.Node) -> fx.Node:
        graph, branch = ctx.gm.graph, ctx.branch
        declare_taylor_slots(ctx.gm, branch, self.order)
        old = [read_slot(graph, taylor_slot(branch, i)) for i in range(1, self.order + 1)]
        slot0 = taylor_slot(branch, 0)
        if self.propagation > 0 and branch.stream != ir.TEXT:
            labels = read_slot(graph, cluster_slots(branch.stream)[0])
            order0 = update_slot(graph, slot0, CACHE_PROPAGATE, labels, idx, fresh, self.clusters, self.propagation)
        else:
            order0 = update_slot(graph, slot0, CACHE_SCATTER, idx, fresh, False)  # picks may repeat
        return taylor_forecast(ctx.gm, [order0, *old])
