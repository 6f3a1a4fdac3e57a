"""The official ToCa / DuCa step decisions as pure functions: step types and the interval from
`cache_functions/cal_type.py`, `force_init.py`, `force_scheduler.py`, fresh-token counts from
`fresh_ratio_scheduler.py` (Shenyi-Z/ToCa `DiT-ToCa/`, arXiv 2410.05317; Shenyi-Z/DuCa `DuCa-DiT/`,
arXiv 2412.18911).

Everything here is decided on the host from the step index alone, so a whole sampling run can be
planned before it starts. The arithmetic follows the official code's precision: the interval
scheduler divides in float32 and rounds half-to-even (as `torch.round` does), and the fresh-ratio
scheduler clamps in float32 and truncates `ratio * num_tokens` toward zero.

Steps count DOWN (`s = num_steps-1` is the first model call), as in every Shenyi-Z DiT loop. The
PixArt-α code (Shenyi-Z/ToCa `PixArt-alpha-ToCa`, Shenyi-Z/DuCa `DuCa-PixArt-alpha`) counts UP
(`s = 0` first) and differs in constants: a `Rules` holds one backbone's set.

Generalisations beyond DiT-XL/2 (documented choices, identical on DiT-XL/2):

- The layer factor of the fresh-ratio scheduler divides by 27 in the official code, i.e. by
  `depth - 1` of DiT-XL. Here it divides by `depth - 1` of the model being planned, so the factor
  still runs from `1 + lw` at the first block to `1 - lw` at the last. With `depth == 1` the single
  block gets `1 + lw`.
- The ratio scheduler name `'ToCa'` is not a branch of ToCa's DiT `fresh_ratio_scheduler` (the
  official ToCa raises on it, and it is ToCa's argparse default), while DuCa's scheduler of the same
  name has exactly `ToCa-ddim50`'s constants. So `'ToCa'` is accepted only with DuCa's rules, where it
  means `ToCa-ddim50`; with ToCa's DiT rules it raises a GraphcacheError that names the valid
  choices. The PixArt rules have a 'ToCa' scheduler of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import GraphcacheError
from ..schedule import FULL, PARTIAL, REUSE, SKIP, StepPlan


@dataclass(frozen=True)
class Rules:
    """One backbone's official ToCa/DuCa step decisions, as data.

    schedulers: ratio-scheduler name -> (step weight sw, layer weight lw); aliases: other accepted
    names; module_factors: module -> ratio factor (a module missing here is never partially
    computed); force_weight: force_scheduler's w when fresh_ratio != 0; sensitive_window: T = 2 for
    s in [0.2 S, 0.4 S); counts_up: the step counter runs up from 0 (PixArt) instead of down;
    alternate: DuCa's type rule (odd residue conservative, even residue aggressive).
    """

    schedulers: dict
    module_factors: dict
    force_weight: float
    sensitive_window: bool = True
    counts_up: bool = False
    alternate: bool = False
    aliases: dict = field(default_factory=dict)


MODULE_WEIGHT, MODULE_SCALE = 0.6, 2.5
DIT = Rules(
    schedulers={"ToCa-ddim50": (2.0, -0.2), "ToCa-ddpm250": (0.4, 0.8)},
    module_factors={
        "attn": 1 - (1 - MODULE_WEIGHT) * MODULE_SCALE,  # 0.0: attention is never partially computed
        "mlp": 1 + MODULE_WEIGHT * MODULE_SCALE,  # 2.5
    },
    force_weight=0.4,
)
# DuCa's 'ToCa' scheduler == ToCa's 'ToCa-ddim50'
DUCA_DIT = replace(DIT, alternate=True, aliases={"ToCa": "ToCa-ddim50"})
# PixArt-α: self-attention from cache, cross-attention and MLP partially recomputed; the 'ToCa'
# scheduler's step factor is written 1 - sw + 2 sw s/S for the counter running up
PIXART = Rules(
    schedulers={"ToCa": (-0.9, 0.6)},
    module_factors={"cross-attn": 0.6, "mlp": 1.6},
    force_weight=0.2,
    sensitive_window=False,
    counts_up=True,
)
DUCA_PIXART = replace(PIXART, force_weight=0.0, alternate=True)


def force_interval(step: int, num_steps: int, fresh_threshold: int, fresh_ratio: float, rules: Rules = DIT) -> int:
    """ToCa/DuCa `force_scheduler`: the interval T a full layer-0 block sets at step s.

    T = round_half_even(float32(N) / float32(1 + w - 2*w*s/S)), w = rules.force_weight (0 in FORA
    mode, where fresh_ratio == 0 and T = N); with a sensitive window (DiT), T = 2 for s in
    [int(0.2*S), int(0.4*S)).
    """
    w = rules.force_weight if fresh_ratio != 0 else 0.0
    step_factor = np.float32(1 + w - 2 * w * step / num_steps)
    t = int(np.round(np.float32(fresh_threshold) / step_factor))
    if rules.sensitive_window and fresh_ratio != 0 and step in range(int(0.2 * num_steps), int(0.4 * num_steps)):
        t = 2
    return t


def resolve_scheduler(scheduler: str, rules: Rules = DIT) -> str:
    """The canonical ratio-scheduler name, or a GraphcacheError naming the valid ones."""
    if scheduler in rules.schedulers:
        return scheduler
    if scheduler in rules.aliases:
        return rules.aliases[scheduler]
    valid = [*rules.schedulers, *rules.aliases]
    hint = (
        " ('ToCa' is the official ToCa default but no branch of its DiT ratio scheduler; "
        "DuCa's 'ToCa' equals 'ToCa-ddim50')"
        if scheduler == "ToCa"
        else ""
    )
    raise GraphcacheError(
        f"unknown ratio scheduler {scheduler!r}; choose one of {', '.join(valid)}{hint}"
    )


def fresh_tokens(
    scheduler: str,
    fresh_ratio: float,
    step: int,
    num_steps: int,
    layer: int,
    depth: int,
    module: str,
    num_tokens: int,
    rules: Rules = DIT,
) -> int:
    """ToCa/DuCa `fresh_ratio_scheduler` + top-k size: tokens recomputed by (step, layer, module).

    ratio = fresh_ratio * layer_factor * step_factor * module_factor, clamped to [0, 1] in float32;
    topk = int(ratio * num_tokens) (float32 product, truncated). step_factor = 1 + sw - 2*sw*s/S
    for a counter running down (DiT), 1 - sw + 2*sw*s/S for one running up (PixArt).
    """
    sw, lw = rules.schedulers[resolve_scheduler(scheduler, rules)]
    if module not in rules.module_factors:
        raise GraphcacheError(f"unknown module {module!r}; choose one of {', '.join(rules.module_factors)}")
    if rules.counts_up:
        step_factor = 1 - sw + 2 * sw * step / num_steps
    else:
        step_factor = 1 + sw - 2 * sw * step / num_steps
    layer_factor = 1 + lw - (2 * lw * layer / (depth - 1) if depth > 1 else 0.0)
    ratio = fresh_ratio * layer_factor * step_factor * rules.module_factors[module]
    ratio32 = np.clip(np.float32(ratio), np.float32(0.0), np.float32(1.0))
    return int(np.float32(ratio32) * np.float32(num_tokens))


def toca_plans(num_steps: int, depth: int, num_tokens: int, options: dict, rules: Rules = DIT) -> list[StepPlan]:
    """Per-step, per-block kinds of a ToCa (or, with alternating rules, DuCa) sampling run.

    options: `interval` (N = fresh_threshold), `fresh_ratio`, `ratio_scheduler`.

    Each block decides BEFORE it runs, with the interval in force at that moment (ToCa's `cal_type`):
    full if it is the first step or s % T == 0; otherwise ToCa's partial block, or for DuCa
    partial when (s % T) is odd and skip ('aggressive') when it is even (DuCa's `cal_type`). A full
    block 0 reschedules T right after it runs, so blocks 1.. of the same step may already see a T that does
    not divide s: the mixed step (block 0 full, the rest partial/skipped).
    Partial blocks carry their MLP fresh-token count, and with rules that recompute cross-attention
    partially (PixArt) its count too; every other block has None.
    """
    n = int(options["interval"])
    fresh_ratio = float(options["fresh_ratio"])
    scheduler = resolve_scheduler(options["ratio_scheduler"], rules)
    if n < 1:
        raise GraphcacheError(f"interval must be >= 1, got {n}")
    partial_cross = "cross-attn" in rules.module_factors
    cal_threshold = n
    plans = []
    for index in range(num_steps):
        s = index if rules.counts_up else num_steps - 1 - index
        first = index == 0
        kinds, tokens, cross = [], [], []
        for layer in range(depth):
            interval = n if first else cal_threshold
            residue = s % interval
            if first or residue == 0:
                kind = FULL
                if layer == 0:  # force_init -> force_scheduler, after the block's attention
                    cal_threshold = force_interval(s, num_steps, n, fresh_ratio, rules)
            elif not rules.alternate or residue % 2 == 1:
                kind = PARTIAL
            else:
                kind = SKIP
            kinds.append(kind)

            for module, counts in (("mlp", tokens), ("cross-attn", cross)):
                partial = kind == PARTIAL and module in rules.module_factors
                counts.append(fresh_tokens(scheduler, fresh_ratio, s, num_steps, layer, depth, module, num_tokens,
                                           rules) if partial else None)
        plans.append(StepPlan(index, s, tuple(kinds), tuple(tokens), cross_tokens=tuple(cross) if partial_cross else None))
    return plans


def _step_char(kinds: tuple[str, ...]) -> str:
    rest = set(kinds[1:])
    if all(k == FULL for k in kinds):
        return "F"
    if all(k == PARTIAL for k in kinds):
        return "T"
    if all(k == SKIP for k in kinds):
        return "A"
    if all(k == REUSE for k in kinds):
        return "R"
    if kinds[0] == FULL and rest == {PARTIAL}:
        return "M"
    if kinds[0] == FULL and rest == {SKIP}:
        return "X"
    return "?"


def kinds_string(plans) -> str:
    """One character per step, for tests and docs.

    F all full; T all partial; M block 0 full and the rest partial (ToCa's mixed step);
    A all skipped (DuCa aggressive); X block 0 full and the rest skipped (DuCa's mixed step);
    R all reuse; ? anything else.
    """
    return "".join(_step_char(p.kinds) for p in plans)


# ToCa's FLUX rules (Shenyi-Z/ToCa FLUX code; METHODS.md §3.7), for any model whose blocks carry
# two streams. The step counter runs up; the first FLUX_FIRST_FULL steps are full, then a counter
# makes every N-th step full (as ClusCa's and TaylorSeer's `cal_type` do after their first steps).
# A block's fresh ratio is fresh_ratio * stream factor * layer factor, the layer factor running
# from 1 + lw at a block type's first block to 1 - lw at its last; no step factor is documented
# for FLUX, so the ratio is the same at every step.
FLUX_FIRST_FULL = 3
FLUX_STREAM_FACTORS = {"double": 0.4, "single": 1.6}
FLUX_LAYER_WEIGHT = 0.5


@dataclass(frozen=True)
class StreamLayout:
    """A two-stream model's blocks as ToCa's FLUX rules count them: per block "double" (image and
    text streams) or "single" (one joint stream), whether it has a text MLP (SD3's last block has
    none), and the tokens of each stream."""

    blocks: tuple[tuple[str, bool], ...]
    image: int
    text: int

    @classmethod
    def of(cls, structure) -> StreamLayout:
        from .. import ir

        blocks = tuple(("single" if any(br.stream == ir.JOINT for br in b.branches) else "double",
                        any(br.stream == ir.TEXT and br.kind == ir.MLP for br in b.branches))
                       for b in structure.blocks)
        tokens = {s.name: s.num_tokens for s in structure.streams}
        return cls(blocks, tokens[ir.IMAGE], tokens.get(ir.TEXT, 0))


# FLUX.1-dev at 1024x1024: 19 double-stream and 38 single-stream blocks, 4096 image tokens and the
# pipeline's 512 text tokens (what `graphcache schedule --set profile=flux` plans without a model)
FLUX_DEV = StreamLayout((("double", True),) * 19 + (("single", False),) * 38, image=4096, text=512)


def stream_layout(structure) -> StreamLayout:
    """The captured model's layout, or FLUX.1-dev's when planning without a model."""
    return StreamLayout.of(structure) if structure is not None else FLUX_DEV


def flux_full(index: int, interval: int) -> bool:
    """Whether sampling step `index` (counting up from 0) is full under ToCa's FLUX schedule."""
    return index < FLUX_FIRST_FULL or (index - (FLUX_FIRST_FULL - 1)) % interval == 0


def flux_fresh_tokens(fresh_ratio: float, block_type: str, layer: int, layers: int, num_tokens: int) -> int:
    """Tokens a partial block of `block_type` recomputes (per stream of `num_tokens` tokens), the
    float32 clamp and truncation of the DiT rules."""
    layer_factor = 1 + FLUX_LAYER_WEIGHT - (2 * FLUX_LAYER_WEIGHT * layer / (layers - 1) if layers > 1 else 0.0)
    ratio = fresh_ratio * FLUX_STREAM_FACTORS[block_type] * layer_factor
    ratio32 = np.clip(np.float32(ratio), np.float32(0.0), np.float32(1.0))
    return int(np.float32(ratio32) * np.float32(num_tokens))


def flux_toca_plans(num_steps: int, layout: StreamLayout, options: dict, alternate: bool = False) -> list[StepPlan]:
    """Per-step plans of ToCa's FLUX rules: all blocks full, or all partial with a double block's
    image and text MLPs and a single block's joint branch each on their own fresh-token count.
    With `alternate` (DuCa), a step an even number of steps after the last full one skips every
    block instead (aggressive), as DuCa's DiT rule does with the residue."""
    fresh_ratio, n = float(options["fresh_ratio"]), int(options["interval"])
    layers = {t: sum(1 for bt, _ in layout.blocks if bt == t) for t in FLUX_STREAM_FACTORS}
    image, text, joint = [], [], []
    seen = {t: 0 for t in FLUX_STREAM_FACTORS}
    for block_type, has_text in layout.blocks:
        layer = seen[block_type]
        seen[block_type] += 1
        count = lambda tokens: flux_fresh_tokens(fresh_ratio, block_type, layer, layers[block_type], tokens)  # noqa: E731
        double = block_type == "double"
        image.append(count(layout.image) if double else None)
        text.append(count(layout.text) if double and has_text else None)
        joint.append(None if double else count(layout.image + layout.text))
    depth = len(layout.blocks)
    plans = []
    for index in range(num_steps):
        if flux_full(index, n):
            plans.append(StepPlan(index, index, (FULL,) * depth))
        elif alternate and (index - (FLUX_FIRST_FULL - 1)) % n % 2 == 0:
            plans.append(StepPlan(index, index, (SKIP,) * depth))
        else:
            plans.append(StepPlan(index, index, (PARTIAL,) * depth, tuple(image), text_tokens=tuple(text),
                                  joint_tokens=tuple(joint)))
    return plans
