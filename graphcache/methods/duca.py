"""DuCa (Zou et al., 2024, arXiv 2412.18911): dual caching. After each full step the official
code (DuCa-DiT, cache_functions/cal_type.py) alternates aggressive steps (every block skipped: the
previous step's final hidden state is reused and only the final layer runs with the new timestep)
and conservative ToCa steps.
V-caching is `score=kv-norm`; DuCa v2's random selection is `score=random`.

Profiles as ToCa's (toca.py): `pixart` (DuCa-PixArt-alpha) counts steps up, force_scheduler has
weight 0 (T = N: full, conservative, aggressive for N = 3), conservative steps recompute
cross-attention and MLP tokens; README defaults fresh_ratio 0.75, N = 3. `flux`: no DuCa FLUX code
is documented; this profile takes ToCa's FLUX rules (step counter up, first 3 steps full, then
every N-th; its fresh ratios and token selection per stream) with DuCa's alternation after each
full step: odd distances conservative, even ones aggressive. An aggressive step reuses the final
hidden state (the joint stream leaving FLUX's last single block, holding both streams' tokens;
SD3's image stream, the only one its output reads).
"""

from ..passes.cache_passes import EliminateDeadBranchesPass
from ..passes.skip_blocks import InsertFinalStreamWritePass, SkipBlocksPass
from ..schedule import SKIP
from .base import Method
from .rules import DUCA_DIT, DUCA_PIXART, flux_toca_plans, stream_layout, toca_plans
from .toca import FLUX_DEFAULTS, PIXART_DEFAULTS, detect_profile, options, token_wise_passes

RULES = {"dit": DUCA_DIT, "pixart": DUCA_PIXART}


def plan(num_steps, depth, num_tokens, options, structure=None):
    if options["profile"] == "flux":
        return flux_toca_plans(num_steps, stream_layout(structure), options, alternate=True)
    return toca_plans(num_steps, depth, num_tokens, options, RULES[options["profile"]])


def passes(plan, options):
    """ToCa's passes with the aggressive steps' two: skip the blocks, and write the final stream
    for the next aggressive step to reuse, before ToCa's clean-up (which would otherwise drop the
    blocks whose output only that write reads)."""
    skip = [b for b, k in enumerate(plan.kinds) if k == SKIP]
    toca = token_wise_passes(plan, options)
    cleanup = next(i for i, p in enumerate(toca) if isinstance(p, EliminateDeadBranchesPass))
    return [SkipBlocksPass(skip), *toca[:cleanup], InsertFinalStreamWritePass(), *toca[cleanup:]]


METHOD = Method(
    name="duca",
    summary="dual caching: aggressive steps skip every block, conservative steps are ToCa steps "
            "(PixArt-α profile as ToCa's)",
    options=options(0.05, "ToCa", 0.8, profiles=(*RULES, "flux")),
    plan=plan,
    passes=passes,
    profiles={"dit": {}, "pixart": dict(PIXART_DEFAULTS, fresh_ratio=0.75), "flux": FLUX_DEFAULTS},
    detect_profile=detect_profile,
)
