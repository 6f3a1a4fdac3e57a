"""ToCa (Zou et al., ICLR 2025, arXiv 2410.05317; official code Shenyi-Z/ToCa): token-wise
caching. Full steps cache every branch; partial steps take self-attention entirely from the cache
and recompute the top-scoring tokens of the other branches.

Three profiles follow the official codes; `profile=auto` takes FLUX's for a model whose blocks
carry image and text streams, PixArt's for a model whose blocks have a cross-attention branch,
DiT's otherwise:

* `dit` (`DiT-ToCa/models.py`, `DiT-ToCa/cache_functions/`): the MLP alone is partially computed,
  scored by the self-attention map; the interval is rescheduled at layer 0 of every full step (so
  a step can be mixed: block 0 full, the rest partial) and the ratio scheduler sets each block's
  fresh-token count. Defaults are the DDIM-50 README command; for DDPM-250 use interval=4
  ratio_scheduler=ToCa-ddpm250.
* `pixart` (`PixArt-alpha-ToCa`): cross-attention and MLP are partially computed (module factors
  0.6 and 1.6), each with its own staleness counters; the score is s2, the entropy of each token's
  cross-attention over the text recorded at full steps, in the place DiT's code gives s1, plus
  λ3·staleness/N and the s4 bonus as in DiT (0.4 on 4x4 cells). The step counter runs up,
  force_scheduler has weight 0.2 and no sensitive window, and the 'ToCa' ratio scheduler has
  sw = -0.9, lw = 0.6. Defaults are the README's (fresh_ratio 0.30, N = 3, DPM-Solver 20 steps).
  As in DiT's code, force_scheduler runs in a full layer-0 block, so mixed steps occur here too.
* `flux` (ToCa's FLUX code; METHODS.md §3.7; rules.py `flux_toca_plans`): the step counter runs
  up, the first 3 steps are full, then every N-th; defaults fresh_ratio 0.1, N = 4, the
  attention-map score, no spatial bonus (text and joint tokens form no grid). A partial step takes
  each double-stream block's image and text attention from the cache and recomputes the top-k
  image and top-k text tokens of their MLPs, each stream scored by its own tokens' share of the
  joint attention map; a single-stream block recomputes its top-k joint tokens through its
  attention (as queries: keys and values stay computed from every token) and its MLP. Stream
  factors 0.4 (double) and 1.6 (single), layer factor 1.5 -> 0.5 over each block type.
"""

from .. import ir
from ..passes.cache_passes import EliminateDeadBranchesPass, InsertCacheWritePass, ReplaceWithCacheReadPass
from ..passes.token_score import SCORES, RecordTokenScorePass, ScatterIntoCacheMerger, ToCaSelector
from ..passes.token_select import InsertTokenSelectPass
from ..schedule import FULL, PARTIAL
from .base import EOC_OPTIONS, Method, Option
from .rules import DIT, PIXART, flux_toca_plans, stream_layout, toca_plans

RULES = {"dit": DIT, "pixart": PIXART}
PIXART_DEFAULTS = dict(ratio_scheduler="ToCa", score="cross-attention", spatial_bonus=0.4, spatial_grid=4)
FLUX_DEFAULTS = dict(fresh_ratio=0.1, interval=4, ratio_scheduler="flux", spatial_bonus=0.0)


def detect_profile(structure) -> str:
    """FLUX's rules for a model with image and text streams, PixArt's for a model with
    cross-attention (text-conditioned), DiT's otherwise."""
    if structure is not None and structure.multi_stream:
        return "flux"
    return "pixart" if structure is not None and structure.select(kinds={ir.CROSS_ATTENTION}) else "dit"


def options(fresh_ratio, scheduler, bonus, profiles=tuple(RULES)):
    return (
        Option("profile", "auto", f"whose official settings: {', '.join(profiles)}, or auto (flux for a model "
                                  "with image and text streams, pixart for one with cross-attention); the "
                                  "profile sets the other defaults", str, ("auto", *profiles)),
        Option("interval", 3, "N (fresh_threshold): full where the step index is divisible by the rescheduled interval", minimum=1),
        Option("fresh_ratio", fresh_ratio, "base fraction of tokens recomputed in partial steps", float,
               minimum=0, maximum=1),
        Option("ratio_scheduler", scheduler, "how the fresh ratio varies by step and layer: ToCa-ddim50 or "
                                             "ToCa-ddpm250 (DiT), ToCa (PixArt), flux (FLUX)", str),
        Option("score", "attention", "token score: self-attention map, value norms (V-caching), random, or "
                                     "cross-attention entropy (PixArt's s2)", str, SCORES),
        Option("soft_fresh_weight", 0.25, "λ3: weight of staleness (steps since a token was computed)", float),
        Option("spatial_bonus", bonus, "s4: bonus for each grid cell's best token (0 disables)", float, minimum=0),
        Option("spatial_grid", 2, "s4: side of the token-grid cells", minimum=1),
        *EOC_OPTIONS,
    )


def partial_kinds(options) -> tuple[str, ...]:
    if options["profile"] == "flux":  # double blocks' MLPs, single blocks' attention-and-MLP
        return (ir.MLP, ir.PARALLEL)
    return (ir.CROSS_ATTENTION, ir.MLP) if "cross-attn" in RULES[options["profile"]].module_factors else (ir.MLP,)


def plan(num_steps, depth, num_tokens, options, structure=None):
    if options["profile"] == "flux":
        return flux_toca_plans(num_steps, stream_layout(structure), options)
    return toca_plans(num_steps, depth, num_tokens, options, RULES[options["profile"]])


def token_wise_passes(plan, options):
    """Full blocks cache and record scores; partial blocks reuse self-attention and recompute the
    top-k tokens of the partially computed branches. Shared with DuCa, whose aggressive (skip)
    blocks are added on top."""
    full = [b for b, k in enumerate(plan.kinds) if k == FULL]
    partial = [b for b, k in enumerate(plan.kinds) if k == PARTIAL]
    selector = ToCaSelector(options["score"], options["interval"], options["soft_fresh_weight"],
                            options["spatial_bonus"], options["spatial_grid"])
    kinds = partial_kinds(options)
    return [
        InsertCacheWritePass(blocks=full),
        RecordTokenScorePass(full, options["score"], kinds),
        ReplaceWithCacheReadPass(blocks=partial, kinds=(ir.ATTENTION,)),
        *(InsertTokenSelectPass(partial, selector, ScatterIntoCacheMerger(), kind=kind) for kind in kinds),
        EliminateDeadBranchesPass(),
    ]


METHOD = Method(
    name="toca",
    summary="token-wise caching: reuse self-attention, recompute the top-scoring tokens of the MLP "
            "(PixArt-α profile: of cross-attention and MLP; FLUX profile: of each stream)",
    options=options(0.07, "ToCa-ddim50", 0.6, profiles=(*RULES, "flux")),
    plan=plan,
    passes=token_wise_passes,
    profiles={"dit": {}, "pixart": dict(PIXART_DEFAULTS, fresh_ratio=0.30), "flux": FLUX_DEFAULTS},
    detect_profile=detect_profile,
)
