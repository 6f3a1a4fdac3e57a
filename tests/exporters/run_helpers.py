"""Helpers shared by the backend tests: a sampling run that keeps every step's model output."""

from __future__ import annotations

import torch

import graphcache
from graphcache.methods import METHODS

LABELS = [1, 2]
# conftest.py `dit_s`: the DiT-S/2 shape with 2 blocks instead of 12 (test_dit_s_depth.py checks
# that every method's schedule has the same variants at both depths)
DIT_S_DEPTH = 2

# every method with its defaults, plus the options that draw random numbers or change the graph
CASES = [(name, {}) for name in METHODS] + [
    ("toca", {"score": "random"}),
    ("clusca", {"clusters": 4, "tokens_per_cluster": 2}),
]


TOL = 1e-4  # exported vs eager graphcache, relative to the max |output|; measured < 1e-6
SELECTED_TOL = 1e-2  # ToCa/DuCa with a computed score: a near-tied top-k choice may flip (test_onnx.py)


def tolerance(name, options) -> float:
    return SELECTED_TOL if name in ("toca", "duca") and options.get("score", "attention") != "random" else TOL


# The backends' tests run FORA with EOC's correction: its reuse variant then also multiplies every
# cached read by a per-step factor tensor input. FORA without it is that graph less the
# multiplications, the cached reads every other method's variants exercise too. λ large enough
# that the correction shows on random weights (it changes DiT-S/2's DDIM-4 outputs by ~1x their scale).
EOC_FORA = {"eoc_lambda": 300.0, "eoc_judgment": "all"}


def eoc_options(name, prior_of, steps) -> dict:
    """EOC's options for method `name` in the backends' tests: FORA's, with a prior for `steps`."""
    return {"eoc": str(prior_of(steps)), **EOC_FORA} if name == "fora" else {}


def case_id(case) -> str:
    name, options = case
    return f"{name}-{'-'.join(map(str, options.values())) or 'default'}"


def variants_of(model, method, steps, **options):
    """An eager CachedModel that runs its variants as they are, with the custom cache ops: the
    graphs compile and the exporters trace (eager runners differ from them only in rounding, by
    computing the selected tokens' linears as W·xᵀ)."""
    cached = graphcache.optimize(model, method, steps, **options)
    cached.runners = {}
    return cached


class Recorder:
    """Calls the cached model and keeps every step's output (and looks like it to `sample`)."""

    def __init__(self, model):
        self.model, self.outputs = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def start_sampling(self, num_steps):
        self.model.start_sampling(num_steps)

    def __call__(self, *args):
        out = self.model(*args)
        self.outputs.append(out.clone())
        return out


def run(cached, labels=LABELS, steps=10):
    """(final latents, per-step outputs (S, ...), global RNG state after the run)."""
    rec = Recorder(cached)
    latents = graphcache.sample(rec, labels, seed=0, num_steps=steps)
    return latents, torch.stack(rec.outputs), torch.get_rng_state()


def max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def run_saved_without_prior(cached, directory, prior, steps):
    """Save `cached` as an artifact in `directory`, then load and run it with the EOC prior file
    moved away: the artifact carries the per-step factors. Returns `run`'s result."""
    from graphcache.artifact import load_artifact, save_artifact

    save_artifact(cached, directory / "art", model_spec="dit-s")
    prior.rename(directory / "elsewhere")
    try:
        return run(load_artifact(directory / "art"), steps=steps)
    finally:
        (directory / "elsewhere").rename(prior)
