"""graphcache.enable / disable on diffusers pipelines (graphcache/pipelines.py): DiT (DDIM),
PixArt-α (DPM-Solver, prompt embeddings, classifier-free guidance in one batch), and the
flow-matching FLUX (guidance embedding, or true CFG: two transformer calls per step) and SD3
(classifier-free guidance in one batch), every weight random.

`none` runs the captured graph with no rewrite: it is the pipeline bit for bit (the graph holds the
very ATen operators the transformer's forward runs, in the same order, on the same inputs).
"""

from __future__ import annotations

import pytest
import torch

import graphcache
from graphcache import GraphcacheError
from graphcache.diffusers_models import TEXT_COMPONENTS, load_pipeline
from diffusers_models import diffusers, dit_pipeline, flux_pipeline, pixart_pipeline, run_pipeline, sd3_pipeline

METHODS = ["fora", "toca", "duca", "taylorseer", "clusca"]
STEPS = 6
# flow-matching runs: ToCa's, DuCa's and ClusCa's FLUX profiles compute the first 3 steps in
# full and FORA's default interval 3 makes steps 1 and 2 reuse steps, so that every method caches
FLOW_STEPS = 5
FLOW_PIPELINES = {"flux": flux_pipeline, "sd3": sd3_pipeline}


@pytest.fixture(scope="module", params=["dit", "pixart"])
def pipeline(request):
    pipe = {"dit": dit_pipeline, "pixart": pixart_pipeline}[request.param]()
    return pipe, run_pipeline(pipe, STEPS)


def _cached_run(pipe, method, steps=STEPS, **options):
    graphcache.enable(pipe, method, **options)
    try:
        return run_pipeline(pipe, steps)
    finally:
        graphcache.disable(pipe)


def _equal(a, b) -> bool:
    (out_a, pred_a), (out_b, pred_b) = a, b
    return torch.equal(out_a, out_b) and len(pred_a) == len(pred_b) and all(map(torch.equal, pred_a, pred_b))


def assert_cached_run(first, second, reference, method):
    """Two runs of a cached pipeline against the plain one's predictions: they are equal, step 0
    computes everything and gives the plain prediction (to float rounding where ToCa's attention
    score writes the attention out instead of calling SDPA), and some later step differs."""
    assert _equal(first, second)
    predictions = first[1]
    assert len(predictions) == len(reference)
    scale = max(float(p.abs().max()) for p in reference)
    exact = method not in ("toca", "duca")
    torch.testing.assert_close(predictions[0], reference[0], rtol=0, atol=0 if exact else 1e-6 * scale)
    assert max(float((p - r).abs().max()) for p, r in zip(predictions, reference)) > 1e-6 * scale


def test_none_is_the_pipeline_bit_for_bit(pipeline):
    pipe, reference = pipeline
    assert _equal(_cached_run(pipe, "none"), reference)


def test_fora_with_interval_1_is_none(pipeline):
    pipe, reference = pipeline
    assert _equal(_cached_run(pipe, "fora", interval=1), reference)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_changes_the_predictions_and_is_reproducible(pipeline, method):
    pipe, (_, reference) = pipeline
    graphcache.enable(pipe, method)
    try:
        first, second = run_pipeline(pipe, STEPS), run_pipeline(pipe, STEPS)
        assert sorted(pipe.transformer.by_steps) == [str(STEPS)]  # one build, reused by the second call
    finally:
        graphcache.disable(pipe)
    assert_cached_run(first, second, reference, method)


def test_each_step_count_is_built_once(pipeline):
    pipe, _ = pipeline
    graphcache.enable(pipe, "fora")
    try:
        run_pipeline(pipe, 4)
        cached = pipe.transformer.by_steps["4"]
        run_pipeline(pipe, 5)
        run_pipeline(pipe, 4)
        assert sorted(pipe.transformer.by_steps) == ["4", "5"] and pipe.transformer.by_steps["4"] is cached
        assert [model.num_steps for model in pipe.transformer.by_steps["5"]] == [5]
    finally:
        graphcache.disable(pipe)


def test_disable_restores_the_pipeline_exactly(pipeline):
    pipe, reference = pipeline
    transformer, cls, config = pipe.transformer, type(pipe), dict(pipe.config)
    graphcache.enable(pipe, "toca")
    assert isinstance(pipe, cls) and type(pipe) is not cls
    assert pipe.transformer is not transformer and dict(pipe.config) == config
    # what pipelines read from their transformer reaches the original
    assert pipe.transformer.config is transformer.config and pipe.transformer.dtype == transformer.dtype
    run_pipeline(pipe, STEPS)
    graphcache.disable(pipe)
    assert pipe.transformer is transformer and type(pipe) is cls and dict(pipe.config) == config
    assert _equal(run_pipeline(pipe, STEPS), reference)


def test_refusals(pipeline):
    pipe, _ = pipeline
    with pytest.raises(GraphcacheError, match="unknown method 'nope'"):
        graphcache.enable(pipe, "nope")
    with pytest.raises(GraphcacheError, match="interval"):
        graphcache.enable(pipe, "fora", interval=0)
    assert not hasattr(type(pipe), "_graphcache_original_class")  # nothing was changed
    with pytest.raises(GraphcacheError, match="not enabled"):
        graphcache.disable(pipe)
    graphcache.enable(pipe, "fora")
    try:
        with pytest.raises(GraphcacheError, match="already enabled"):
            graphcache.enable(pipe, "fora")
        with pytest.raises(GraphcacheError, match="called outside a pipeline call"):
            pipe.transformer(torch.zeros(1))
    finally:
        graphcache.disable(pipe)


def test_second_order_schedulers_are_refused():
    pipe = dit_pipeline()
    pipe.scheduler = diffusers.HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(GraphcacheError, match="HeunDiscreteScheduler evaluates the model 2 times per step"):
        graphcache.enable(pipe, "fora")


def test_more_calls_than_steps_are_refused():
    """A pipeline that calls its transformer twice per step is stopped, not silently mis-scheduled."""
    pipe = dit_pipeline()
    graphcache.enable(pipe, "fora")
    try:
        pipe.transformer.start_run(2)
        x = torch.zeros(2, 4, 8, 8)
        for _ in range(2):
            pipe.transformer(x, timestep=torch.tensor([10, 10]), class_labels=torch.tensor([1, 2]))
        with pytest.raises(GraphcacheError, match=r"more than 2 times in a 2-step run \(1 per step\)"):
            pipe.transformer(x, timestep=torch.tensor([10, 10]), class_labels=torch.tensor([1, 2]))
    finally:
        graphcache.disable(pipe)


@pytest.fixture(scope="module", params=list(FLOW_PIPELINES))
def flow_pipeline(request):
    pipe = FLOW_PIPELINES[request.param]()
    return request.param, pipe, run_pipeline(pipe, FLOW_STEPS)


@pytest.fixture(scope="module")
def enabled_pipelines():
    """(name, method) -> another pipeline of that kind (the same weights) with the method enabled,
    made at its first use and shared: each of its CachedModels is built once in this module."""
    enabled = {}

    def get(name, method="fora"):
        if (name, method) not in enabled:
            enabled[name, method] = graphcache.enable(FLOW_PIPELINES[name](), method)
        return enabled[name, method]
    return get


def test_flow_matching_none_is_the_pipeline_bit_for_bit(flow_pipeline):
    _, pipe, reference = flow_pipeline
    assert _equal(_cached_run(pipe, "none", FLOW_STEPS), reference)


@pytest.mark.parametrize("method", METHODS)
def test_flow_matching_every_method_changes_the_predictions_and_is_reproducible(flow_pipeline, enabled_pipelines,
                                                                                 method):
    name, _, (_, reference) = flow_pipeline
    pipe = enabled_pipelines(name, method)
    first, second = run_pipeline(pipe, FLOW_STEPS), run_pipeline(pipe, FLOW_STEPS)
    assert sorted(pipe.transformer.by_steps) == [str(FLOW_STEPS)] and len(pipe.transformer.run_models) == 1
    assert_cached_run(first, second, reference, method)


def test_flux_true_cfg_keeps_a_cache_per_call_of_a_step(enabled_pipelines):
    """true_cfg_scale > 1 with negative embeddings: FluxPipeline calls the transformer on the
    positive, then on the negative prompt at every step. Each call's CachedModel must see exactly
    the calls of its own branch: replayed as a run of its own, each branch's calls give every
    prediction again. A cache shared by the two calls would reuse the positive branch's features
    for the negative one, or count two steps per step."""
    pipe = enabled_pipelines("flux")
    calls = []
    recorder = pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs),
                                                          with_kwargs=True)
    try:
        first, second = (run_pipeline(pipe, FLOW_STEPS, true_cfg_scale=2.0) for _ in range(2))
    finally:
        recorder.remove()
    models = list(pipe.transformer.by_steps[str(FLOW_STEPS)])
    assert len(models) == 2 and models[0].cache is not models[1].cache
    assert models[1].captured is models[0].captured  # exported once, for both calls
    assert _equal(first, second)
    predictions = first[1]
    assert len(predictions) == 2 * FLOW_STEPS
    replay = models[0]
    with torch.no_grad():
        for branch in (0, 1):  # positive, negative
            replay.reset()
            for kwargs, want in zip(calls[branch:2 * FLOW_STEPS:2], predictions[branch::2]):
                assert torch.equal(replay(**kwargs)[0], want)


def test_sd3_skip_layer_guidance_is_refused():
    pipe = graphcache.enable(sd3_pipeline(), "fora")
    try:
        with pytest.raises(GraphcacheError, match="skip_guidance_layers calls its transformer a third time"):
            run_pipeline(pipe, FLOW_STEPS, skip_guidance_layers=[0])
    finally:
        graphcache.disable(pipe)


def test_flow_matching_pipeline_folders_load_without_text_encoders(flow_pipeline, tmp_path):
    """A saved FLUX or SD3 pipeline loads with its transformer, VAE and scheduler only, and samples
    as the pipeline it was saved from."""
    _, pipe, reference = flow_pipeline
    pipe.save_pretrained(tmp_path)
    loaded = load_pipeline(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe) and type(loaded.scheduler) is type(pipe.scheduler)
    assert all(getattr(loaded, name) is None for name in TEXT_COMPONENTS[type(pipe).__name__])
    assert _equal(run_pipeline(loaded, FLOW_STEPS), reference)
