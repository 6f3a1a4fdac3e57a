"""The `aoti` backend (graphcache/exporters/aoti.py) on every method, DiT-S/2 random weights.

For every method with its defaults, DDIM-4 with CFG on `builtin:dit-s2-random` (14 variants,
each compiled by AOTInductor into a `.pt2` package: the slow part, ~20 s each on a 2-core CPU):
per-step model outputs and latents agree with eager graphcache within `tolerance` of their scale
(1e-4; measured < 1e-6. ToCa/DuCa's attention score is allowed 1e-2, as for onnx, where a
near-tied top-k choice may flip: see test_onnx.py) and the RNG state after the run is identical.
"""

from __future__ import annotations

import pytest
import torch

import graphcache
from graphcache.methods import METHODS
from graphcache.models.builtin import resolve_model
from run_helpers import max_rel, run, tolerance

STEPS = 4


@pytest.fixture(scope="module")
def dit_s():
    return resolve_model("builtin:dit-s2-random")


@pytest.mark.parametrize("name", list(METHODS))
def test_aoti_matches_eager(dit_s, name):
    latents, outputs, rng = run(graphcache.optimize(dit_s, name, STEPS), steps=STEPS)
    cached = graphcache.optimize(dit_s, name, STEPS, backend="aoti")
    assert set(cached.runners) == set(cached.variants)
    got_latents, got_outputs, got_rng = run(cached, steps=STEPS)
    assert torch.equal(got_rng, rng)
    rel = max(max_rel(g, w) for g, w in zip(got_outputs, outputs))
    tol = tolerance(name, {})
    assert rel < tol, f"per-step outputs differ by {rel:.2e} of their scale"
    assert max_rel(got_latents, latents) < tol
