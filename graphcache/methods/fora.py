"""FORA (Selvaraju et al., 2024, arXiv 2407.01425): full steps cache every branch's ungated
output; the steps in between reuse them all, multiplied by the current adaLN gates.

Full steps sit where the Shenyi-Z DiT code puts them when it runs FORA (ToCa with fresh_ratio 0,
Shenyi-Z/ToCa `DiT-ToCa/cache_functions/cal_type.py`): the first step, then every step whose
DESCENDING index s is divisible by the interval — so the first cycle is irregular.

`level` replaces that rule by the caching levels EOC is measured at (Qiu et al., arXiv
2501.19243, DDIM-20; the skip matrices of the same group's GOC code), by the sampling-order index
i (0 = the first model call, always computed):

* 25: the odd i of the first half (1, 3, 5, 7, 9 of 20) are cached;
* 50: every odd i is cached (1, 3, ..., 19 of 20);
* 75: every i not divisible by 4 is cached (15 of 20: 0, 4, 8, 12, 16 computed). No published
  pattern exists for this level; this one spreads the computed steps evenly from step 0.
"""

from ..passes.cache_passes import EliminateDeadBranchesPass, InsertCacheWritePass, ReplaceWithCacheReadPass
from ..schedule import FULL, REUSE, StepPlan, descending
from .base import EOC_OPTIONS, Method, Option

LEVELS = {
    25: lambda i, n: i % 2 == 1 and i < n // 2,
    50: lambda i, n: i % 2 == 1,
    75: lambda i, n: i % 4 != 0,
}


def plan(num_steps, depth, num_tokens, options, structure=None):
    n, cached = options["interval"], LEVELS.get(options["level"])
    return [
        StepPlan(i, s, ((REUSE if cached(i, num_steps) else FULL) if cached else
                        (FULL if i == 0 or s % n == 0 else REUSE),) * depth)
        for i, s in descending(num_steps)
    ]


def passes(plan, options):
    full = [b for b, k in enumerate(plan.kinds) if k == FULL]
    reuse = [b for b, k in enumerate(plan.kinds) if k == REUSE]
    return [
        InsertCacheWritePass(blocks=full),
        ReplaceWithCacheReadPass(blocks=reuse),
        EliminateDeadBranchesPass(),
    ]


METHOD = Method(
    name="fora",
    summary="reuse every block's attention and MLP outputs between full steps",
    options=(
        Option("interval", 3, "N: a full step where the descending step index is divisible by N", minimum=1),
        Option("level", 0, "EOC's caching levels instead of the interval: 25, 50 or 75 (% of DDIM-20's steps "
                           "cached; 0: off)", choices=(0, *LEVELS)),
        *EOC_OPTIONS,
    ),
    plan=plan,
    passes=passes,
)
