"""The `aoti` backend (graphcache/exporters/aoti.py) on every method, DiT-S/2 random weights.

For every method with its defaults (FORA with EOC's correction: run_helpers.eoc_options), DDIM-4
with CFG on conftest.py's `dit_s` (DiT-S/2's width, heads and 256 tokens, 2 blocks: the same 14
variants as at depth 12, each compiled by AOTInductor into a `.pt2` package: the slow part):
per-step model outputs and latents agree with eager graphcache within `tolerance` of their scale
(1e-4; measured < 1e-6. ToCa/DuCa's attention score is allowed 1e-2, as for onnx, where a
near-tied top-k choice may flip: see test_onnx.py) and the RNG state after the run is identical.
FORA's artifact, which stores EOC's factors, runs without the prior file.
"""

from __future__ import annotations

import pytest
import torch

import graphcache
from graphcache.methods import METHODS
from graphcache.schedule import is_correction_input
from run_helpers import eoc_options, max_rel, run, run_saved_without_prior, tolerance

STEPS = 4


@pytest.mark.parametrize("name", list(METHODS), ids=lambda name: "fora-eoc" if name == "fora" else name)
def test_aoti_matches_eager(dit_s, dit_s_prior, eager_run, name, tmp_path):
    options = eoc_options(name, dit_s_prior, STEPS)
    latents, outputs, rng = eager_run(name, STEPS, options)
    cached = graphcache.optimize(dit_s, name, STEPS, backend="aoti", **options)
    assert set(cached.runners) == set(cached.variants)
    if options:  # the factors are inputs of the exported reuse variant
        assert any(p.corrected for p in cached.schedule.steps)
        assert any(is_correction_input(n) for v in cached.exported for n in v.sig.inputs)
    got_latents, got_outputs, got_rng = run(cached, steps=STEPS)
    assert torch.equal(got_rng, rng)
    rel = max(max_rel(g, w) for g, w in zip(got_outputs, outputs))
    tol = tolerance(name, {})
    assert rel < tol, f"per-step outputs differ by {rel:.2e} of their scale"
    assert max_rel(got_latents, latents) < tol
    if options:  # the artifact carries the factors: it runs without the prior
        loaded = run_saved_without_prior(cached, tmp_path, dit_s_prior(STEPS), STEPS)
        assert max(max_rel(g, w) for g, w in zip(loaded[1], outputs)) < tol
