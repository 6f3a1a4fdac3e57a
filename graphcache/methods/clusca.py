"""ClusCa (Zheng et al., ACM MM 2025, arXiv 2509.10312; official code: Shenyi-Z/Cache4Diffusion
`dit/clusca-dit/`): TaylorSeer's forecasts, plus at every non-full step the MLP of K cluster
representatives per row, whose fresh values are scattered into the order-0 Taylor factor and
propagated (γ) to the other tokens of their cluster (`models.py`, `cache_functions/`
`select_fresh_tokens.py`, `update_cache.py`).

* Schedule: TaylorSeer's (`cache_functions/cal_type.py`): the first two steps full, then every
  `interval`-th step.
  Default interval 5 is the paper's DiT table setting (N=5, K=16); the official scripts default to
  `--interval 4`. γ defaults to 0.005, the FID script's (`sample_ddp.py`; `sample.py` uses 0).
* Full steps: every branch computes and refreshes its Taylor factors; K-means (L1) on the last
  block's output, warm-started, the first full step drawing its random start.
* ClusCa steps: attention is a pure Taylor forecast; the MLP runs on K·tokens_per_cluster tokens
  (one global-RNG `rand(B, N)` per block picks them), the order-0 MLP factor is updated and kept,
  and the MLP output is the forecast over it. With clusters=0 every such step is a pure Taylor
  forecast (TaylorSeer).
* Profile `flux` (ClusCa's FLUX code, METHODS.md §6.6; auto for a model whose blocks carry image
  and text streams): the first 3 steps full, order 1; K-means on the image and on the text tokens
  apart, where they leave the last double-stream block; a ClusCa step computes each double-stream
  block's image MLP on the image clusters' representatives (propagated, γ) and its text MLP on the
  text clusters' (scattered only), forecasts both streams' attention, and forecasts the
  single-stream blocks whole (their partial path is commented out in that code). The snapshot
  cannot run as published (its cluster scheduler reads a `topk` key its cache init names `k`);
  this is its evident intent.
"""

from __future__ import annotations

from dataclasses import replace

from .. import ir
from ..passes.cache_passes import EliminateDeadBranchesPass
from ..passes.cluster import ClusterPropagationMerger, ClusterRepresentativeSelector, InsertClusterPass
from ..passes.taylor import ReplaceWithTaylorForecastPass
from ..passes.token_select import InsertTokenSelectPass
from . import taylorseer
from ..schedule import FORECAST, FULL, PARTIAL
from .base import EOC_OPTIONS, Method, Option
from .rules import FLUX_FIRST_FULL, stream_layout


def detect_profile(structure) -> str:
    return "flux" if structure is not None and structure.multi_stream else "dit"


def plan(num_steps, depth, num_tokens, options, structure=None):
    k = options["clusters"]
    fresh = k * options["tokens_per_cluster"] if k else None
    if options["profile"] != "flux":
        return taylorseer.taylor_plans(num_steps, depth, options["interval"], options["order"],
                                       partial_tokens=fresh, clustering=k > 0)
    layout = stream_layout(structure)
    plans = taylorseer.taylor_plans(num_steps, len(layout.blocks), options["interval"], options["order"],
                                    partial_tokens=fresh, clustering=k > 0, first_enhance=FLUX_FIRST_FULL)
    if not k:
        return plans
    # the double blocks compute their MLPs on the representatives, the single blocks are forecast
    kinds = tuple(PARTIAL if block_type == "double" else FORECAST for block_type, _ in layout.blocks)
    return [p if p.kinds[0] == FULL else replace(
        p, kinds=kinds,
        tokens=tuple(fresh if kind == PARTIAL else None for kind in kinds),
        text_tokens=tuple(fresh if kind == PARTIAL and has_text else None
                          for kind, (_, has_text) in zip(kinds, layout.blocks)))
        for p in plans]


def passes(plan, options):
    k, order = options["clusters"], options["order"]
    if k == 0:  # TaylorSeer
        return taylorseer.passes(plan, options)
    if plan.kinds[0] == FULL:
        return [*taylorseer.passes(plan, options), InsertClusterPass(k, init=plan.init_clusters)]
    partial = [b for b, kind in enumerate(plan.kinds) if kind == PARTIAL]
    forecast = [b for b, kind in enumerate(plan.kinds) if kind == FORECAST]
    return [
        *([ReplaceWithTaylorForecastPass(forecast, order=order)] if forecast else []),
        ReplaceWithTaylorForecastPass(partial, order=order, kinds={ir.ATTENTION, ir.CROSS_ATTENTION}),
        InsertTokenSelectPass(
            partial,
            ClusterRepresentativeSelector(k, options["tokens_per_cluster"]),
            ClusterPropagationMerger(k, order, options["propagation"]),
            kind=ir.MLP,
        ),
        EliminateDeadBranchesPass(),
    ]


METHOD = Method(
    name="clusca",
    summary="TaylorSeer forecasts plus the MLP of one token per K-means cluster, propagated to the cluster",
    options=(
        Option("profile", "auto", "whose official settings: dit, flux, or auto (flux for a model with image and "
                                  "text streams); the profile sets the other defaults", str, ("auto", "dit", "flux")),
        Option("interval", 5, "N: after the first two full steps, every N-th step is full "
                              "(official script default 4; the paper's DiT table uses 5)", minimum=1),
        Option("clusters", 16, "K: K-means clusters per row (0 = TaylorSeer)", minimum=0),
        Option("order", 4, "highest Taylor order kept", minimum=0),
        Option("propagation", 0.005, "γ: weight of the cluster's fresh value on its other tokens",
               type=float, minimum=0.0, maximum=1.0),
        Option("tokens_per_cluster", 1, "fresh MLP tokens per cluster", minimum=1),
        *EOC_OPTIONS,
    ),
    plan=plan,
    passes=passes,
    profiles={"dit": {}, "flux": {"order": 1}},
    detect_profile=detect_profile,
)
