"""FORA (Selvaraju et al., 2024, arXiv 2407.01425): full steps cache every branch's ungated
output; the steps in between reuse them all, multiplied by the current adaLN gates.

Full steps sit where the Shenyi-Z DiT code puts them when it runs FORA (ToCa with fresh_ratio 0,
Shenyi-Z/ToCa `DiT-ToCa/cache_functions/cal_type.py`): the first step, then every step whose
DESCENDING index s is divisible by the interval — so the first cycle is irregular.
"""

from ..passes.cache_passes import EliminateDeadBranchesPass, InsertCacheWritePass, ReplaceWithCacheReadPass
from ..schedule import FULL, REUSE, StepPlan, descending
from .base import Method, Option


def plan(num_steps, depth, num_tokens, options):
    n = options["interval"]
    return [
        StepPlan(i, s, ((FULL if i == 0 or s % n == 0 else REUSE),) * depth)
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
    options=(Option("interval", 3, "N: a full step where the descending step index is divisible by N", minimum=1),),
    plan=plan,
    passes=passes,
)
