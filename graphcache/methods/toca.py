"""ToCa (Zou et al., ICLR 2025, arXiv 2410.05317; official code Shenyi-Z/ToCa): token-wise
caching. Full steps cache every branch; partial steps take attention entirely from the cache and
recompute the MLP for the top-scoring tokens only.

Schedule, token counts and the score follow the official DiT code (`DiT-ToCa/models.py` and
`DiT-ToCa/cache_functions/`): the interval is rescheduled at layer 0 of every full step (so a step can be mixed: block 0 full, the rest partial),
and the ratio scheduler sets each block's fresh-token count. Defaults are the DDIM-50 settings of
the official README; for DDPM-250 use interval=4 ratio_scheduler=ToCa-ddpm250.
"""

from .. import ir
from ..passes.cache_passes import EliminateDeadBranchesPass, InsertCacheWritePass, ReplaceWithCacheReadPass
from ..passes.token_score import SCORES, RecordTokenScorePass, ScatterIntoCacheMerger, ToCaSelector
from ..passes.token_select import InsertTokenSelectPass
from ..schedule import FULL, PARTIAL
from .base import Method, Option
from .rules import toca_plans


def options(fresh_ratio, scheduler, bonus):
    return (
        Option("interval", 3, "N (fresh_threshold): full where the descending step index is divisible by the rescheduled interval", minimum=1),
        Option("fresh_ratio", fresh_ratio, "base fraction of MLP tokens recomputed in partial steps", float,
               minimum=0, maximum=1),
        Option("ratio_scheduler", scheduler, "how the fresh ratio varies by step and layer: ToCa-ddim50 or ToCa-ddpm250", str),
        Option("score", "attention", "token score s1: attention map, value norms (V-caching) or random", str, SCORES),
        Option("soft_fresh_weight", 0.25, "λ3: weight of staleness (steps since a token was computed)", float),
        Option("spatial_bonus", bonus, "s4: bonus for each 2x2 cell's best token (0 disables)", float, minimum=0),
    )


def token_wise_passes(plan, options):
    """Full blocks cache and record scores; partial blocks reuse attention and recompute the MLP
    of the top-k tokens. Shared with DuCa, whose aggressive (skip) blocks are added on top."""
    full = [b for b, k in enumerate(plan.kinds) if k == FULL]
    partial = [b for b, k in enumerate(plan.kinds) if k == PARTIAL]
    selector = ToCaSelector(options["score"], options["interval"], options["soft_fresh_weight"],
                            options["spatial_bonus"])
    return [
        InsertCacheWritePass(blocks=full),
        RecordTokenScorePass(full, options["score"]),
        ReplaceWithCacheReadPass(blocks=partial, kinds=(ir.ATTENTION,)),
        InsertTokenSelectPass(partial, selector, ScatterIntoCacheMerger()),
        EliminateDeadBranchesPass(),
    ]


METHOD = Method(
    name="toca",
    summary="token-wise caching: reuse attention, recompute the MLP of the top-scoring tokens",
    options=options(0.07, "ToCa-ddim50", 0.6),
    plan=lambda num_steps, depth, num_tokens, options: toca_plans(num_steps, depth, num_tokens, options),
    passes=token_wise_passes,
)
