"""The compile, aoti and onnx backends on diffusers' DiT, PixArt-α, FLUX and SD3 transformers (random,
2 blocks of each kind, 16 image tokens: tests/diffusers_models.py), as the other backend tests check
them on the built-in DiT.

Each model is called as a diffusers pipeline calls it (keyword arguments, diffusers' output
dataclass), STEPS steps of new latents and timesteps under one condition; PixArt-α with an
`encoder_attention_mask` that masks caption tokens. Methods: ToCa (its full step records the
attention score through an explicit attention; its partial step reads self-attention from the
cache, recomputes PixArt's cross-attention over the caption and runs the MLP on selected tokens)
and FORA (a reuse step reads every branch, cross-attention included, from the cache): together
every kind of variant these models get. FLUX (double- and single-stream blocks) and SD3 (joint
blocks) cache both streams: FORA, and TaylorSeer's forecasts on SD3. Each backend compiles or
exports every variant (C++ builds: the slow part), so it runs one method per model (CASES).

* compile (Inductor on PixArt-α, aot_eager on DiT, FLUX and SD3): per-step outputs within `tolerance` of eager
  graphcache, no graph break, one compilation per variant (counted by the compiler backend and
  by Dynamo);
* aoti, onnx: the same, then the artifact is saved, loaded with `graphcache.load` while
  `import diffusers` fails, called with the transformer's keyword arguments, and its outputs
  equal the in-process run's; it was exported at batch 4 and runs at batch 2 (FLUX: 1) (dynamic
  batch). The prompt length is fixed by the capture (the passes split the joint stream at it):
  a caption of another length is refused with the exported shape and the given one.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import replace

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import graphcache
from diffusers_models import (dit_inputs, dit_transformer, flux_inputs, flux_transformer, pixart_inputs,
                              pixart_transformer, sd3_inputs, sd3_transformer)
from graphcache.artifact import read_manifest, save_artifact
from graphcache.errors import GraphcacheError
from graphcache.methods import METHODS
from graphcache.schedule import MIN_ATTENTION_TOKENS
from run_helpers import max_rel, tolerance

STEPS = 5
MODELS = {"dit": (dit_transformer, dit_inputs), "pixart": (pixart_transformer, pixart_inputs),
          "flux": (flux_transformer, flux_inputs), "sd3": (sd3_transformer, sd3_inputs)}
# every (model, method) runs on aoti or onnx; compile runs ToCa, whose token counts change per step,
# and the two-stream models' methods; ToCa's variants, one per token count, go to onnx, whose
# export is cheaper than AOTInductor's C++ build
CASES = [("compile", "dit", "toca"), ("compile", "pixart", "toca"),
         ("compile", "flux", "fora"), ("compile", "sd3", "taylorseer"),
         ("aoti", "dit", "fora"), ("aoti", "pixart", "fora"), ("aoti", "flux", "fora"),
         ("onnx", "dit", "toca"), ("onnx", "pixart", "toca"), ("onnx", "flux", "fora")]
# PixArt-α's ToCa profile: cross-attention recomputed on selected tokens, with a ratio small enough
# that the 16 tokens' partial steps stay partial (all of them cannot be exported)
OPTIONS = {("pixart", "toca"): {"profile": "pixart", "fresh_ratio": 0.1}}
# Inductor's C++ build is the slow part: diffusers' DiT compiles with aot_eager (what Dynamo
# captures does not depend on the compiler), PixArt-α with Inductor
COMPILER = {"dit": "aot_eager", "pixart": "inductor", "flux": "aot_eager", "sd3": "aot_eager"}


def call_inputs(model: str, step: int, **call) -> dict:
    """The transformer's keyword arguments at `step`: new latents and timestep, the same condition;
    PixArt's caption has its last two tokens masked out for the second row; FLUX takes timesteps in
    [0, 1]."""
    inputs = MODELS[model][1](**call)
    inputs["hidden_states"] = torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(step))
    inputs["timestep"] = torch.full_like(inputs["timestep"], (900 - 150 * step) / (1000 if model == "flux" else 1))
    if model == "pixart":
        mask = torch.ones(2, inputs["encoder_hidden_states"].shape[1])
        mask[1, -2:] = 0
        inputs["encoder_attention_mask"] = mask
    return inputs


@contextlib.contextmanager
def at_least_two_cross_tokens(model, method):
    """For PixArt-α's ToCa: its schedule with every partial cross-attention on at least 2 tokens,
    what compiled and exported variants compute (schedule.compiled_token_count; this schedule has
    counts of 0 and 1), so that eager computes the same and the outputs compare."""
    original = METHODS[method]
    if (model, method) == ("pixart", "toca"):
        def plan(*args):
            return [replace(p, cross_tokens=tuple(k if k is None else max(k, MIN_ATTENTION_TOKENS)
                                                  for k in p.cross_tokens)) if p.cross_tokens else p
                    for p in original.plan(*args)]
        METHODS[method] = replace(original, plan=plan)
    try:
        yield
    finally:
        METHODS[method] = original


def prediction(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.sample


def run_steps(cached, model: str) -> torch.Tensor:
    """Every step's prediction (STEPS, ...), the global RNG seeded as for every run compared."""
    torch.manual_seed(0)
    with torch.no_grad():
        return torch.stack([prediction(cached(**call_inputs(model, i))).clone() for i in range(STEPS)])


@pytest.fixture(scope="session")
def transformers():
    return {name: factory() for name, (factory, _) in MODELS.items()}


@pytest.fixture(scope="session")
def eager_steps(transformers):
    runs = {}

    def get(model, method):
        if (model, method) not in runs:
            with at_least_two_cross_tokens(model, method):
                cached = graphcache.optimize(transformers[model], method, STEPS, kwargs=call_inputs(model, 0),
                                             **OPTIONS.get((model, method), {}))
                runs[model, method] = run_steps(cached, model)
        return runs[model, method]

    return get


def assert_close_to_eager(got, want, method, what):
    rel = max_rel(got, want)
    print(f"{what}: max per-step difference {rel:.2e} of scale")
    assert rel < tolerance(method, {}), f"{what}: per-step outputs differ by {rel:.2e} of their scale"


@pytest.mark.parametrize("backend,model,method", [c for c in CASES if c[0] == "compile"])
def test_compile_no_breaks_one_compilation_per_variant(transformers, eager_steps, backend, model, method):
    want = eager_steps(model, method)
    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend(COMPILER[model])
    with at_least_two_cross_tokens(model, method):
        cached = graphcache.optimize(transformers[model], method, STEPS, kwargs=call_inputs(model, 0),
                                     backend="compile", compile_options={"backend": counter},
                                     **OPTIONS.get((model, method), {}))
        got = run_steps(cached, model)
    assert dict(counters["graph_break"]) == {}
    assert counter.frame_count == counters["stats"]["unique_graphs"] == len(cached.variants) >= 2
    assert_close_to_eager(got, want, method, f"compile ({COMPILER[model]}) {model} {method}")
    if model == "pixart":  # the schedule's own cross-attention counts of 0 and 1 run (as 2), compiled once too
        counters.clear()
        cached = graphcache.optimize(transformers[model], method, STEPS, kwargs=call_inputs(model, 0),
                                     backend="compile", compile_options={"backend": "aot_eager"},
                                     **OPTIONS[model, method])
        assert any(k in (0, 1) for p in cached.schedule.steps for k in p.cross_tokens or () if k is not None)
        assert run_steps(cached, model).isfinite().all()
        assert counters["stats"]["unique_graphs"] == len(cached.variants)


@pytest.mark.parametrize("backend,model,method", [c for c in CASES if c[0] != "compile"])
def test_artifact_runs_without_diffusers(transformers, eager_steps, tmp_path, monkeypatch, backend, model, method):
    want = eager_steps(model, method)
    with at_least_two_cross_tokens(model, method):
        cached = graphcache.optimize(transformers[model], method, STEPS, kwargs=call_inputs(model, 0),
                                     backend=backend, **OPTIONS.get((model, method), {}))
        got = run_steps(cached, model)
    assert_close_to_eager(got, want, method, f"{backend} {model} {method}")
    out = save_artifact(cached, tmp_path / "art", model_spec=f"diffusers:{type(transformers[model]).__name__}")
    manifest = read_manifest(out)
    assert list(manifest["inputs"]) == cached.structure.input_names
    assert manifest["batch"][0] <= 2 and manifest["model"]["diffusers_class"] == type(transformers[model]).__name__
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` raises from here on
    loaded = graphcache.load(out)
    assert torch.equal(run_steps(loaded, model), got)
    tupled = loaded(**call_inputs(model, 0), return_dict=False)
    assert isinstance(tupled, tuple) and len(tupled) == 1 and isinstance(tupled[0], torch.Tensor)
    if model in ("pixart", "flux"):
        loaded.reset()  # a new run: a new prompt length is refused, not taken for a change mid-run
        with pytest.raises(GraphcacheError, match=r"input encoder_hidden_states is \(\d, 7, 24\) float32; the "
                                                  r"artifact was built for \(batch, 5, 24\)"):
            loaded(**call_inputs(model, 0, text=7))
