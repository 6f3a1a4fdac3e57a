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
"""

from __future__ import annotations

from .. import ir
from ..passes.cache_passes import EliminateDeadBranchesPass
from ..passes.cluster import ClusterPropagationMerger, ClusterRepresentativeSelector, InsertClusterPass
from ..passes.taylor import ReplaceWithTaylorForecastPass
from ..passes.token_select import InsertTokenSelectPass
from . import taylorseer
from ..schedule import FULL
from .base import EOC_OPTIONS, Method, Option


def plan(num_steps, depth, num_tokens, options, structure=None):
    k = options["clusters"]
    return taylorseer.taylor_plans(
        num_steps, depth, options["interval"], options["order"],
        partial_tokens=k * options["tokens_per_cluster"] if k else None, clustering=k > 0,
    )


def passes(plan, options):
    k, order = options["clusters"], options["order"]
    blocks = list(range(len(plan.kinds)))
    if k == 0:  # TaylorSeer
        return taylorseer.passes(plan, options)
    if plan.kinds[0] == FULL:
        return [*taylorseer.passes(plan, options), InsertClusterPass(k, init=plan.init_clusters)]
    return [
        ReplaceWithTaylorForecastPass(blocks, order=order, kinds={ir.ATTENTION, ir.CROSS_ATTENTION}),
        InsertTokenSelectPass(
            blocks,
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
)
