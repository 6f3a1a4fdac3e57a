"""TaylorSeer (Liu et al., ICCV 2025, arXiv 2503.06923; official code Shenyi-Z/TaylorSeer): full
steps keep Taylor factors of every branch output, the steps in between forecast them: ClusCa with
no clusters, as Shenyi-Z/Cache4Diffusion `dit/clusca-dit/` runs it (`cluster_num=0`).

Schedule (`cache_functions/cal_type.py`, decided once per forward): the first two steps are full
(first_enhance = 2), then a counter makes every `interval`-th step full. A full step takes m = min(#old factors, order)
finite differences (none at the first step), so the factors grow by one per full step up to
`order`; d = activated_steps[-1] - activated_steps[-2] and the forecast coefficients
dist**i / i! (dist = s - activated_steps[-1]; both negative: steps count down) are per-step
inputs, and so is which factors exist (passes/taylor.py): one full and one forecast graph serve
the whole run. `activated_steps` starts as [49], as in the official code (it only ever matters
for DDIM-50).
"""

from __future__ import annotations

from ..passes.cache_passes import EliminateDeadBranchesPass
from ..passes.taylor import DELTA_INPUT, InsertTaylorUpdatePass, ReplaceWithTaylorForecastPass, forecast_coefficients
from ..schedule import FORECAST, FULL, PARTIAL, StepPlan, descending
from .base import EOC_OPTIONS, Method, Option

FIRST_ENHANCE = 2


def taylor_plans(num_steps, depth, interval, order, partial_tokens=None, clustering=False,
                 first_enhance=FIRST_ENHANCE):
    """The TaylorSeer / ClusCa `cal_type` schedule. Non-full steps are FORECAST, or PARTIAL with
    `partial_tokens` fresh MLP tokens per block when given (ClusCa). With `clustering`, the first full step initialises K-means
    (`init_clusters`). The first `first_enhance` steps are full."""
    plans = []
    cache_counter = 0
    activated_steps = [49]  # hard-coded in the official cache init
    factors = 0  # Taylor factors in the cache after the last full step
    for index, s in descending(num_steps):
        first_steps = s > num_steps - first_enhance - 1
        if first_steps or cache_counter == interval - 1:
            cache_counter = 0
            activated_steps.append(s)
            old = 0 if s == num_steps - 1 else factors  # taylor_cache_init at the first step
            m = min(old, order) if s < num_steps - first_enhance + 1 else 0
            factors = m + 1
            # m = 0: no previous factors; d only has to be non-zero (passes/taylor.py)
            inputs = {DELTA_INPUT: activated_steps[-1] - activated_steps[-2] if m else 1} if order else {}
            plans.append(StepPlan(index, s, (FULL,) * depth, init_clusters=clustering and index == 0,
                                  inputs=inputs))
        else:
            cache_counter += 1
            kind = FORECAST if partial_tokens is None else PARTIAL
            tokens = None if partial_tokens is None else (partial_tokens,) * depth
            inputs = forecast_coefficients(s - activated_steps[-1], factors, order)
            plans.append(StepPlan(index, s, (kind,) * depth, tokens=tokens, inputs=inputs))
    return plans


def plan(num_steps, depth, num_tokens, options, structure=None):
    return taylor_plans(num_steps, depth, options["interval"], options["order"])


def passes(plan, options):
    blocks = list(range(len(plan.kinds)))
    if plan.kinds[0] == FULL:
        return [InsertTaylorUpdatePass(blocks, order=options["order"])]
    return [
        ReplaceWithTaylorForecastPass(blocks, order=options["order"]),
        EliminateDeadBranchesPass(),
    ]


METHOD = Method(
    name="taylorseer",
    summary="forecast every block's attention and MLP outputs with Taylor factors between full steps",
    options=(
        Option("interval", 4, "N: after the first two full steps, every N-th step is full", minimum=1),
        Option("order", 4, "highest Taylor order kept (0 = reuse, as FORA)", minimum=0),
        *EOC_OPTIONS,
    ),
    plan=plan,
    passes=passes,
)
