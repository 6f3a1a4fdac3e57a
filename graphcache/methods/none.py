"""none: the identity. One variant, the captured graph unchanged; the baseline every method is
measured against on the same backend."""

from ..schedule import FULL, StepPlan, descending
from .base import Method


def plan(num_steps, depth, num_tokens, options, structure=None):
    return [StepPlan(i, s, (FULL,) * depth) for i, s in descending(num_steps)]


METHOD = Method(
    name="none",
    summary="no caching: every step computes every block (the baseline)",
    options=(),
    plan=plan,
    passes=lambda plan, options: [],
)
