"""What a caching method is: options with defaults, a schedule, and the passes of each variant."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import GraphcacheError
from ..passes.base import Pass
from ..schedule import Schedule, StepPlan


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


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    options: tuple[Option, ...]
    # (num_steps, depth, num_tokens, options) -> per-step plans in sampling order
    plan: Callable[[int, int, int, dict], list[StepPlan]]
    # (plan of a step, options) -> the passes that turn the captured graph into that step's variant
    passes: Callable[[StepPlan, dict], list[Pass]]
    # A method whose official settings differ by backbone has a `profile` option: profile name ->
    # the option defaults it changes; "auto" picks `detect_profile(structure)` (structure None
    # when planning without a model: DiT-XL/2)
    profiles: dict[str, dict] = field(default_factory=dict)
    detect_profile: Callable[[Any], str] | None = None

    def resolve_options(self, given: dict, structure=None) -> dict:
        known = {o.name: o for o in self.options}
        unknown = sorted(set(given) - set(known))
        if unknown:
            valid = ", ".join(known) or "none"
            raise GraphcacheError(f"method {self.name} has no option {unknown[0]!r} (its options: {valid})")
        options = {name: o.parse(given[name]) if name in given else o.default for name, o in known.items()}
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
        return Schedule(self.name, options, num_steps, depth, self.plan(num_steps, depth, num_tokens, options))
