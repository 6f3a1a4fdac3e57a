"""graphcache.enable / disable on diffusers pipelines (graphcache/pipelines.py): DiT (DDIM) and
PixArt-α (DPM-Solver, prompt embeddings, classifier-free guidance in one batch), every weight random.

`none` runs the captured graph with no rewrite: it is the pipeline bit for bit (the graph holds the
very ATen operators the transformer's forward runs, in the same order, on the same inputs).
"""

from __future__ import annotations

import pytest
import torch

import graphcache
from graphcache import GraphcacheError
from diffusers_models import diffusers, dit_pipeline, pixart_pipeline, run_pipeline

METHODS = ["fora", "toca", "duca", "taylorseer", "clusca"]
STEPS = 6


@pytest.fixture(scope="module", params=["dit", "pixart"])
def pipeline(request):
    pipe = {"dit": dit_pipeline, "pixart": pixart_pipeline}[request.param]()
    return pipe, run_pipeline(pipe, STEPS)


def _cached_run(pipe, method, **options):
    graphcache.enable(pipe, method, **options)
    try:
        return run_pipeline(pipe, STEPS)
    finally:
        graphcache.disable(pipe)


def _equal(a, b) -> bool:
    (out_a, pred_a), (out_b, pred_b) = a, b
    return torch.equal(out_a, out_b) and len(pred_a) == len(pred_b) and all(map(torch.equal, pred_a, pred_b))


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
    assert _equal(first, second)
    predictions = first[1]
    assert len(predictions) == STEPS
    # step 0 computes everything: the plain prediction (to float rounding where ToCa's attention
    # score writes the attention out instead of calling SDPA)
    scale = max(float(p.abs().max()) for p in reference)
    exact = method not in ("toca", "duca")
    torch.testing.assert_close(predictions[0], reference[0], rtol=0, atol=0 if exact else 1e-6 * scale)
    assert max(float((p - r).abs().max()) for p, r in zip(predictions, reference)) > 1e-6 * scale


def test_each_step_count_is_built_once(pipeline):
    pipe, _ = pipeline
    graphcache.enable(pipe, "fora")
    try:
        run_pipeline(pipe, 4)
        cached = pipe.transformer.by_steps["4"]
        run_pipeline(pipe, 5)
        run_pipeline(pipe, 4)
        assert sorted(pipe.transformer.by_steps) == ["4", "5"] and pipe.transformer.by_steps["4"] is cached
        assert pipe.transformer.by_steps["5"].num_steps == 5
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
        with pytest.raises(GraphcacheError, match="more than 2 times in a 2-step run"):
            pipe.transformer(x, timestep=torch.tensor([10, 10]), class_labels=torch.tensor([1, 2]))
    finally:
        graphcache.disable(pipe)
