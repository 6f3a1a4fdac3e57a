"""Schedules: the host-side plan of a sampling run, decided from the step index alone.

A `Schedule` is a list of `StepPlan`s in sampling order. Each says what kind every block is at
that step and, for partial blocks, how many tokens they compute. Deciding on the host from the
step index costs no device sync; the runtime turns a plan into a variant key and its inputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

FULL, REUSE, PARTIAL, SKIP, FORECAST = "full", "reuse", "partial", "skip", "forecast"
KINDS = (FULL, REUSE, PARTIAL, SKIP, FORECAST)


@dataclass(frozen=True)
class StepPlan:
    index: int  # position in the sampling loop: 0 is the first model call
    step: int  # the official "current step": num_steps-1 first, counting DOWN to 0 (PixArt ToCa: UP from 0)
    kinds: tuple[str, ...]  # one per block
    tokens: tuple[int | None, ...] | None = None  # fresh-token count per block (partial blocks' MLP)
    cross_tokens: tuple[int | None, ...] | None = None  # the same for a partially computed cross-attention
    # the same for the text stream's MLP of a two-stream block (MMDiT), and for the one branch
    # (attention and MLP in parallel) of a single-stream block of FLUX or HunyuanVideo
    text_tokens: tuple[int | None, ...] | None = None
    joint_tokens: tuple[int | None, ...] | None = None
    # ClusCa: K-means starts from fresh random centres at this full step (its first), not from the
    # last full step's: the one graph choice the block kinds do not show
    init_clusters: bool = False
    inputs: dict = field(default_factory=dict, compare=False)  # per-step scalars (and EOC factors) the graph reads
    corrected: tuple[str, ...] = field(default=(), compare=False)  # branches EOC corrects at this step

    @property
    def variant(self) -> tuple:
        """Steps with equal keys run the same graph; token counts and scalars are its inputs."""
        return (self.kinds, self.init_clusters)

    def to_json(self) -> dict:
        d = {"index": self.index, "step": self.step, "kinds": list(self.kinds)}
        if self.tokens is not None:
            d["tokens"] = list(self.tokens)
        if self.cross_tokens is not None:
            d["cross_tokens"] = list(self.cross_tokens)
        if self.text_tokens is not None:
            d["text_tokens"] = list(self.text_tokens)
        if self.joint_tokens is not None:
            d["joint_tokens"] = list(self.joint_tokens)
        if self.corrected:
            d["corrected"] = list(self.corrected)
        return d


@dataclass
class Schedule:
    method: str
    options: dict
    num_steps: int
    depth: int
    steps: list[StepPlan]

    def __post_init__(self):
        assert len(self.steps) == self.num_steps
        for plan in self.steps:
            assert len(plan.kinds) == self.depth and all(k in KINDS for k in plan.kinds), plan

    def __getitem__(self, index: int) -> StepPlan:
        return self.steps[index]

    def __len__(self) -> int:
        return self.num_steps

    def variants(self) -> list[tuple]:
        return list(dict.fromkeys(p.variant for p in self.steps))

    def steps_of(self, variant: tuple) -> list[StepPlan]:
        """The plans of the steps that run `variant`, in sampling order."""
        return [p for p in self.steps if p.variant == variant]

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "options": self.options,
            "num_steps": self.num_steps,
            "depth": self.depth,
            "steps": [p.to_json() for p in self.steps],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)


CROSS_SUFFIX = "_cross_attention"
TEXT_SUFFIX = "_text"
PARALLEL_SUFFIX = "_parallel"
# the suffixes of counts whose branch computes an attention on the selected tokens' queries
_ATTENTION_SUFFIXES = ("_attention", PARALLEL_SUFFIX)


def tokens_input(block: int, cross_attention: bool = False, kind: str = "mlp", stream: str = "image") -> str:
    """Name of the graph input that carries a partial block's fresh-token count for one branch:
    gc_tokens_b3 (its MLP), gc_tokens_b3_cross_attention, gc_tokens_b3_text (a two-stream block's
    text MLP), gc_tokens_b3_parallel (a single-stream block's attention-and-MLP branch), … (kind
    and stream as in graphcache.ir)."""
    if cross_attention:
        kind = "cross_attention"
    return (f"gc_tokens_b{block}" + (TEXT_SUFFIX if stream == "text" else "")
            + ("" if kind == "mlp" else f"_{kind}"))


def token_input_stream(name: str) -> str:
    """The stream a token-count input selects from: "text", "joint" or "image"."""
    rest = name.removeprefix("gc_tokens_b").lstrip("0123456789")
    return "text" if rest.startswith(TEXT_SUFFIX) else "joint" if rest == PARALLEL_SUFFIX else "image"


# torch.compile and torch.export cannot decide attention's shape rules for a query count that may
# be 0 or 1, so compiled and exported variants compute a partial attention (PixArt-α's ToCa
# cross-attention, FLUX's single-stream blocks) on at least this many tokens; eager computes the
# schedule's count exactly
MIN_ATTENTION_TOKENS = 2


def compiled_token_count(name: str, k: int) -> int:
    """The token count a compiled or exported variant takes for the per-step token input `name`."""
    return max(k, MIN_ATTENTION_TOKENS) if is_token_input(name) and name.endswith(_ATTENTION_SUFFIXES) else k


def correction_input(branch: str) -> str:
    """Name of the graph input that carries a branch's EOC correction factor (tokens, channels)."""
    return f"gc_eoc_{branch}"


def is_correction_input(name: str) -> bool:
    """Whether the per-step input `name` is an EOC factor: a (tokens, channels) tensor of fixed
    shape, the same for every batch (not batch-major as the other tensor inputs are)."""
    return name.startswith(correction_input(""))


def is_token_input(name: str) -> bool:
    """Whether the per-step input `name` is a partial block's fresh-token count."""
    rest = name.removeprefix("gc_tokens_b")
    digits = rest.lstrip("0123456789")
    return rest != name and digits != rest and (digits == "" or digits.startswith("_"))


def step_inputs(plan: StepPlan) -> dict:
    """Everything a variant may read at this step: the plan's scalars and its token counts."""
    inputs = dict(plan.inputs)
    for block, k in enumerate(plan.tokens or ()):
        if k is not None:
            inputs[tokens_input(block)] = k
    for block, k in enumerate(plan.cross_tokens or ()):
        if k is not None:
            inputs[tokens_input(block, cross_attention=True)] = k
    for block, k in enumerate(plan.text_tokens or ()):
        if k is not None:
            inputs[tokens_input(block, stream="text")] = k
    for block, k in enumerate(plan.joint_tokens or ()):
        if k is not None:
            inputs[tokens_input(block, kind="parallel", stream="joint")] = k
    return inputs


def run_lengths(items) -> list[tuple[object, int]]:
    """Run-length encoding: ("full", "partial", "partial") -> [("full", 1), ("partial", 2)]."""
    out: list[list] = []
    for item in items:
        if out and out[-1][0] == item:
            out[-1][1] += 1
        else:
            out.append([item, 1])
    return [(a, n) for a, n in out]


def index_ranges(indices) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    parts, indices = [], sorted(indices)
    start = prev = None
    for i in indices + [None]:
        if start is not None and (i is None or i != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    return ", ".join(parts)


def descending(num_steps: int):
    """(index, step) pairs in sampling order; step counts down as in the official loops."""
    return [(i, num_steps - 1 - i) for i in range(num_steps)]
