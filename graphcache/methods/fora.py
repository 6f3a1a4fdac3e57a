"""FORA (Selvaraju et al., 2024): full steps cache every branch's ungated output; the steps in
between reuse them all, multiplied by the current adaLN gates.

Full steps sit where the official code puts them (METHODS.md §3.3, §9): the first step, then every
step whose DESCENDING index s is divisible by the interval — so the first cycle is irregular.
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
