"""DuCa (Zou et al., 2024): dual caching. After each full step the official DiT code alternates
aggressive steps (every block skipped: the previous step's final hidden state is reused and only
the final layer runs with the new timestep) and conservative ToCa steps (METHODS.md §4.2).
V-caching is `score=kv-norm`; DuCa v2's random selection is `score=random`.
"""

from ..passes.skip_blocks import InsertFinalStreamWritePass, SkipBlocksPass
from ..schedule import SKIP
from .base import Method
from .rules import toca_plans
from .toca import options, token_wise_passes


def passes(plan, options):
    skip = [b for b, k in enumerate(plan.kinds) if k == SKIP]
    return [SkipBlocksPass(skip), *token_wise_passes(plan, options)[:-1], InsertFinalStreamWritePass(),
            *token_wise_passes(plan, options)[-1:]]


METHOD = Method(
    name="duca",
    summary="dual caching: aggressive steps skip every block, conservative steps are ToCa steps",
    options=options(0.05, "ToCa", 0.8),
    plan=lambda num_steps, depth, num_tokens, options: toca_plans(num_steps, depth, num_tokens, options, duca=True),
    passes=passes,
)
