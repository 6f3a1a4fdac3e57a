"""What a caching method is: options with defaults, a schedule, and the passes of each variant."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from ..eoc import FITS, JUDGMENTS
from ..errors import GraphcacheError
from ..passes.base import Pass
from ..passes.error_correction import InsertErrorCorrectionPass
from .. import ir
from ..schedule import FULL, PARTIAL, Schedule, StepPlan, correction_input


@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    help: str
    type: type = int
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None

    def parse(self, value):
        """Coerce a value (possibly a CLI string) and validate it."""
        try:
            if self.type is bool and isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                value = value.lower() in ("1", "true", "yes")
            else:
                value = self.type(value)
        except (TypeError, ValueError):
            raise GraphcacheError(f"option {self.name}={value!r} is not a valid {self.type.__name__}") from None
        if self.choices and value not in self.choices:
            raise GraphcacheError(f"option {self.name}={value!r}: choose one of {', '.join(map(str, self.choices))}")
        if self.minimum is not None and value < self.minimum:
            raise GraphcacheError(f"option {self.name}={value!r} must be >= {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise GraphcacheError(f"option {self.name}={value!r} must be <= {self.maximum}")
        if isinstance(value, float) and value != value:  # NaN passes every comparison
            raise GraphcacheError(f"option {self.name}={value!r} is not a number")
        return value


def number_or_fit(value):
    """EOC's λ: a number, or "fit" / "signed-fit" for the least-squares weight of each step and branch."""
    if isinstance(value, str) and value.strip().lower() in FITS:
        return value.strip().lower()
    return float(value)


# EOC (Qiu et al., arXiv 2501.19243; graphcache/eoc.py) corrects the cached reads of any method that
# has these options: `eoc=PRIOR` turns it on. The judgment ("held-out") corrects a step and branch
# only where, on the prior's held-out uncached runs, multiplying the previous step's output by
# the correction brings it closer to this step's (graphcache/eoc.py `step_weights`). Defaults
# (fit, held-out) are the setting that raised PSNR at every FORA level and seed measured
# (docs/benchmarks.md, 2026-12-04); λ = 0.01 on every step (the authors' first code) barely
# changes the output of the MNIST DiT.
EOC_OPTIONS = (
    Option("eoc", "", "EOC: prior file from `graphcache calibrate --method eoc` (empty: no correction)", str),
    Option("eoc_lambda", "fit", "EOC: λ in reuse * (1 + λ (P[t] - P[t-1])) (the authors': 0.01), or fit: least "
                                "squares per step and branch on the prior's held-out runs, where positive, "
                                "or signed-fit: of either sign", number_or_fit),
    Option("eoc_judgment", "held-out", "EOC: which cached steps to correct: held-out (where the correction "
                                       "lowers the one-step error on the prior's held-out runs) or all",
           str, JUDGMENTS),
)


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    options: tuple[Option, ...]
    # (num_steps, depth, num_tokens, options, structure) -> per-step plans in sampling order;
    # structure: the captured model's ir.Structure, None when planning without a model
    plan: Callable[[int, int, int, dict, Any], list[StepPlan]]
    # (plan of a step, options) -> the passes that turn the captured graph into that step's variant
    passes: Callable[[StepPlan, dict], list[Pass]]
    # A method whose official settings differ by backbone has a `profile` option: profile name ->
    # the option defaults it changes; "auto" picks `detect_profile(structure)` (structure None
    # when planning without a model: DiT-XL/2)
    profiles: dict[str, dict] = field(default_factory=dict)
    detect_profile: Callable[[Any], str] | None = None

    @property
    def corrects(self) -> bool:
        """Whether the method takes EOC's options (its cached reads can be corrected)."""
        return any(o.name == "eoc" for o in self.options)

    def variant_passes(self, plan: StepPlan, options: dict) -> list[Pass]:
        """The passes of a step's variant: the method's, then EOC's correction when it is on."""
        passes = list(self.passes(plan, options))
        if options.get("eoc"):
            passes.append(InsertErrorCorrectionPass())
        return passes

    def resolve_options(self, given: dict, structure=None) -> dict:
        known = {o.name: o for o in self.options}
        unknown = sorted(set(given) - set(known))
        if unknown:
            valid = ", ".join(known) or "none"
            raise GraphcacheError(f"method {self.name} has no option {unknown[0]!r} (its options: {valid})")
        options = {name: o.parse(given[name]) if name in given else o.default for name, o in known.items()}
        if self.corrects and not options["eoc"]:  # EOC off: its settings are not in effect, nor shown
            stray = [name for name in given if name.startswith("eoc_")]
            if stray:
                raise GraphcacheError(f"option {stray[0]} needs eoc=PRIOR (a prior from `graphcache calibrate`)")
            options = {name: v for name, v in options.items() if not name.startswith("eoc")}
        if self.profiles:
            if options["profile"] == "auto":
                options["profile"] = self.detect_profile(structure)
            for name, value in self.profiles[options["profile"]].items():
                if name not in given:
                    options[name] = value
        return options

    def schedule(self, num_steps: int, depth: int = 28, options: dict | None = None, num_tokens: int = 256,
                 structure=None) -> Schedule:
        """The plan of a sampling run; depth and token count default to DiT-XL/2 at 256px, the
        profile to the captured `structure`'s."""
        if not 1 <= num_steps <= 1000:
            raise GraphcacheError(f"num_steps must be between 1 and 1000, got {num_steps}")
        options = self.resolve_options(options or {}, structure)
        plans = self.plan(num_steps, depth, num_tokens, options, structure)
        if options.get("eoc"):
            plans = with_corrections(self.name, plans, options, num_tokens, structure)
        # a profile planned without a model plans the model it is named for (FLUX.1-dev's 57 blocks)
        return Schedule(self.name, options, num_steps, len(plans[0].kinds), plans)



def computed_branches(plans: list[StepPlan], branches: dict[str, tuple[int, str]]) -> list[set[str]]:
    """Per step, the branches ({name: (block, kind)}) that compute there: those of full blocks, and
    the ones a partial block computes on some tokens (its MLP where the plan gives it a token
    count, its cross-attention where it gives that one a count); a partial block's other
    branches read the cache."""
    steps = []
    for p in plans:
        partly = {b: ({ir.MLP} if p.tokens and p.tokens[b] is not None else set())
                  | ({ir.CROSS_ATTENTION} if p.cross_tokens and p.cross_tokens[b] is not None else set())
                  for b, k in enumerate(p.kinds) if k == PARTIAL}
        steps.append({br for br, (b, kind) in branches.items()
                      if p.kinds[b] == FULL or kind in partly.get(b, ())})
    return steps


def with_corrections(method: str, plans: list[StepPlan], options: dict, num_tokens: int,
                     structure) -> list[StepPlan]:
    """The plans with EOC's per-step factor inputs: every branch of the prior gets one at every
    step (ones where nothing is corrected, so that each variant's inputs are always given), and
    `corrected` names the branches whose factor is not ones: cached reads, never a branch the
    step computes on some tokens (InsertErrorCorrectionPass declines those too)."""
    from ..eoc import load_prior, step_factors, steps_read

    if structure is not None and structure.multi_stream:
        raise GraphcacheError("EOC's correction does not run on blocks with image and text streams (MMDiT) yet: "
                              "calibrate and correct a single-stream model")
    prior = load_prior(options["eoc"])
    hidden = structure.hidden_size if structure is not None else prior.meta["hidden_size"]
    if structure is not None:
        branches = {br.name: (br.block, br.kind) for br in structure.branches}
    else:
        branches = {br: (b, prior.meta["kinds"][br]) for br, b in prior.meta["branches"].items()}
    prior.check(num_steps=len(plans), num_tokens=num_tokens, hidden_size=hidden, branches=branches)
    computed = computed_branches(plans, branches)
    prior.require_steps(steps_read(computed, branches), method)
    factors = step_factors(prior, computed, options["eoc_lambda"], options["eoc_judgment"])
    ones = torch.ones(num_tokens, hidden)
    return [replace(p, inputs={**p.inputs, **{correction_input(br): f.get(br, ones) for br in branches}},
                    corrected=tuple(br for br in branches if br in f))
            for p, f in zip(plans, factors)]
