"""The `onnx` backend (graphcache/exporters/onnx.py) on every method, DiT-S/2 random weights.

For every method with its defaults (FORA with EOC's correction: run_helpers.eoc_options), ToCa's
random score and ClusCa with 2 tokens per cluster (`aten.sort.stable`, translated to ONNX TopK),
DDIM-5 with CFG on conftest.py's `dit_s` (DiT-S/2's width, heads and 256 tokens, 2 blocks: the
same variants as at depth 12): each
variant is exported to ONNX (checked by `onnx.checker` in `build`), run by onnxruntime, and the
per-step model outputs and latents agree with eager graphcache within TOL of their scale
(measured: < 1e-6); the RNG state after the run is identical (the draws happen in the eager
prologue, in the same order). The files have dynamic batch and token-count axes.

Tolerance where tokens are chosen by a computed score (ToCa/DuCa with `attention` or `kv-norm`):
onnxruntime's kernels differ from eager's by ~1e-7, and on random weights the attention map is
nearly uniform, so two tokens' scores can be that close: a near-tie at the top-k cut may flip,
and the step then computes a different token fresh. Measured on DiT-S/2 DDIM-5: up to 4e-4 of
the output scale for DuCa (2e-3 for ToCa at batch 2). Those runs are held to SELECTED_TOL (in
run_helpers.py); every method whose choices do not depend on computed values (none, FORA,
TaylorSeer, ClusCa, the `random` score) is held to TOL.
"""

from __future__ import annotations

import onnx
import pytest
import torch

import graphcache
from graphcache.schedule import is_correction_input
from run_helpers import CASES, TOL, case_id, eoc_options, max_rel, run, run_saved_without_prior, tolerance

STEPS = 5


# also read by test_onnx_files_have_dynamic_batch_and_token_axes and test_onnx_artifact_carries_eoc_factors
SHARED = {"toca-random", "fora-default"}


@pytest.fixture(scope="module")
def onnx_cached(dit_s):
    """`get(name, options)`: the onnx-backend CachedModel; the SHARED ones are exported once."""
    built = {}

    def get(name, options, eoc=None):
        key = case_id((name, options))
        if key in built:
            return built[key]
        cached = graphcache.optimize(dit_s, name, STEPS, backend="onnx", **options, **(eoc or {}))
        if key in SHARED:
            built[key] = cached
        return cached

    return get


@pytest.mark.parametrize("name,options", CASES, ids=[case_id(c) for c in CASES])
def test_onnx_matches_eager(eager_run, onnx_cached, dit_s_prior, name, options):
    eoc = eoc_options(name, dit_s_prior, STEPS) if not options else {}
    latents, outputs, rng = eager_run(name, STEPS, {**options, **eoc})
    cached = onnx_cached(name, options, eoc)
    assert set(cached.runners) == set(cached.variants)
    if eoc:  # the factors are inputs of the exported reuse variant
        assert any(p.corrected for p in cached.schedule.steps)
        assert any(is_correction_input(n) for v in cached.exported for n in v.sig.inputs)
    got_latents, got_outputs, got_rng = run(cached, steps=STEPS)
    assert torch.equal(got_rng, rng)
    rel = max(max_rel(g, w) for g, w in zip(got_outputs, outputs))
    tol = tolerance(name, options)
    assert rel < tol, f"per-step outputs differ by {rel:.2e} of their scale"
    assert max_rel(got_latents, latents) < tol


def test_onnx_files_have_dynamic_batch_and_token_axes(dit_s, onnx_cached):
    cached = onnx_cached("toca", {"score": "random"})
    partial = next(v for v in cached.exported if any(n.startswith("gc_tokens") for n in v.sig.inputs))
    model = onnx.load(f"{cached.files.name}/v{partial.index}.onnx", load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert isinstance(dims["x"][0], str) and dims["x"][1:] == [4, 32, 32]  # batch is symbolic
    assert isinstance(dims["gc_tokens_b1"][0], str)
    assert isinstance(dims["cache__b1_mlp"][0], str) and dims["cache__b1_mlp"][1:] == [256, 384]
    # another batch than the export's example (4 rows) runs the same files
    one = run(cached, labels=[5], steps=STEPS)
    want = run(graphcache.optimize(dit_s, "toca", STEPS, score="random"), labels=[5], steps=STEPS)
    assert max_rel(one[1], want[1]) < TOL


def test_onnx_artifact_carries_eoc_factors(eager_run, onnx_cached, dit_s_prior, tmp_path):
    """The artifact stores the per-step factors (step_inputs.safetensors) and runs without the prior."""
    eoc = eoc_options("fora", dit_s_prior, STEPS)
    cached = onnx_cached("fora", {}, eoc)
    got = run_saved_without_prior(cached, tmp_path, dit_s_prior(STEPS), STEPS)
    _, outputs, _ = eager_run("fora", STEPS, eoc)
    assert max(max_rel(g, w) for g, w in zip(got[1], outputs)) < TOL
