"""A plain-PyTorch ClusCa / TaylorSeer on the DiT, written literally after the official DiT code
(Shenyi-Z/Cache4Diffusion `dit/clusca-dit/`; ClusCa arXiv 2509.10312, TaylorSeer arXiv 2503.06923).

Helper module for tests/methods/test_clusca.py and test_taylorseer.py (not collected: no `test_`
prefix) and tools/versus_reference.py. It shares nothing with graphcache: its own loop over the
DiT blocks (the model's own submodules), its own cache dicts and step state, its own K-means and
its own RNG draws in the official order. It is driven by `graphcache.sample` exactly like the
compiled model, so both see the same global RNG stream (DDPM's and DDIM's per-step `randn_like`
interleaved with ClusCa's draws).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ClusCaReference(nn.Module):
    """ClusCa (clusters > 0) or TaylorSeer (clusters == 0) on a DiT, sharing nothing with graphcache."""

    first_enhance = 2

    def __init__(self, dit, interval, clusters, order, gamma=0.0, per_cluster=1):
        super().__init__()
        self.dit = dit
        self.interval, self.clusters, self.order = interval, clusters, order
        self.gamma, self.per_cluster = gamma, per_cluster
        for attr in ("in_channels", "input_size", "num_classes", "learn_sigma"):
            setattr(self, attr, getattr(dit, attr))

    # -- cache_init, once per sampling loop --
    def start_sampling(self, num_steps):
        self.num_steps = num_steps
        self.calls = 0
        self.cache = {}  # layer -> 'attn' | 'mlp' -> {i: factor}
        self.cache_counter = 0
        self.activated_steps = [49]
        self.labels = self.centroids = None
        self.types = []

    # -- cal_type.py, once per forward before the blocks --
    def cal_type(self, s):
        first_steps = s > self.num_steps - self.first_enhance - 1
        if first_steps or self.cache_counter == self.interval - 1:
            self.cache_counter = 0
            self.activated_steps.append(s)
            return "full"
        self.cache_counter += 1
        return "ClusCa" if self.clusters > 0 else "Taylor"

    # -- taylor_utils: finite differences and forecasts --
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

    # -- cluster_utils: K-means --
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

    # -- ClusCa partial step: select_fresh_tokens.py, update_cache.py --
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
