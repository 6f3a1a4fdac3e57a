"""Caching methods on diffusers' MMDiT and video transformers (FLUX, SD3, HunyuanVideo and Wan,
small random configs): every method runs on each; FORA and TaylorSeer cache every branch of every
stream; ToCa and DuCa (their FLUX profile) read both streams' attention from the cache and select
tokens within each stream, DuCa's aggressive steps reusing the final hidden state; ClusCa clusters
the image and the text tokens apart and computes each stream's MLP on its own clusters'
representatives. EOC's correction refuses such models with the reason.

Each run feeds the model a different latent at every step, as a sampler does, so that a cached
step's output differs from the plain model's.
"""

from __future__ import annotations

import functools

import pytest
import torch

import graphcache
from graphcache import ir
from graphcache.errors import GraphcacheError
from graphcache.methods import get_method
from graphcache.schedule import FORECAST, FULL, PARTIAL, REUSE, SKIP

import diffusers_models as dm

STEPS = 5
MODELS = ("flux", "sd3", "hunyuan_video", "wan")
METHODS = ("fora", "taylorseer", "toca", "duca", "clusca")
# branches per stream: FLUX's and HunyuanVideo's 2 double blocks have image and text attention and
# MLP, their 2 single blocks one joint branch each; SD3's second (last) block has no text branches;
# Wan's 2 blocks have self-attention, cross-attention and MLP on the one (image) stream
BRANCHES = {"flux": {ir.IMAGE: 4, ir.TEXT: 4, ir.JOINT: 2}, "sd3": {ir.IMAGE: 4, ir.TEXT: 2},
            "hunyuan_video": {ir.IMAGE: 4, ir.TEXT: 4, ir.JOINT: 2}, "wan": {ir.IMAGE: 6}}


@functools.cache
def model_and_inputs(name):
    model = getattr(dm, f"{name}_transformer")()
    kwargs = getattr(dm, f"{name}_inputs")()
    g = torch.Generator().manual_seed(7)
    latents = [kwargs["hidden_states"] + 0.3 * i * torch.randn(kwargs["hidden_states"].shape, generator=g)
               for i in range(STEPS)]
    with torch.no_grad():
        plain = [model(**{**kwargs, "hidden_states": x}, return_dict=False)[0] for x in latents]
    return model, kwargs, latents, plain


def sample(cached, kwargs, latents):
    cached.reset()
    with torch.no_grad():
        return [cached(**{**kwargs, "hidden_states": x}, return_dict=False)[0] for x in latents]


@functools.cache
def plain_capture(name):
    """`none` on the model: its capture, which every method's CachedModel builds on (exporting the
    model is most of the cost of optimizing these small ones)."""
    model, kwargs, _, _ = model_and_inputs(name)
    return graphcache.optimize(model, "none", STEPS, kwargs=kwargs)


@functools.cache
def cached_run(name, method):
    model, kwargs, latents, _ = model_and_inputs(name)
    cached = plain_capture(name)
    if method != "none":
        cached = graphcache.optimize(model, method, STEPS)  # no example inputs: not captured yet
        cached.share_capture(plain_capture(name))
    runs = []
    for _ in range(2):
        torch.manual_seed(0)  # ClusCa's K-means start and picks draw from the global RNG
        runs.append(sample(cached, kwargs, latents))
    return cached, *runs


def counters(cached, kind, pass_name):
    """The counters `pass_name` reported on the variant whose blocks are all `kind` (a list when
    the variant runs the pass more than once)."""
    variant = next(v for v in cached.describe()["variants"] if v["kinds"] == f"{kind}×{cached.structure.depth}")
    found = [p["counters"] for p in variant["passes"] if p["pass"] == pass_name]
    return found[0] if len(found) == 1 else found


def per_stream(name, key):
    """`key` counted once per branch, with the text and joint streams' shares named."""
    n = BRANCHES[name]
    return {key: sum(n.values()), **{f"{key}.{s}": k for s, k in n.items() if s != ir.IMAGE}}


@pytest.mark.parametrize("name", MODELS)
def test_none_is_the_model(name):
    _, _, _, plain = model_and_inputs(name)
    _, first, _ = cached_run(name, "none")
    assert all(torch.equal(a, b) for a, b in zip(first, plain))


@pytest.mark.parametrize("name, method", [(name, method) for method in METHODS for name in MODELS])
def test_runs_changes_the_output_and_is_reproducible(name, method):
    _, _, _, plain = model_and_inputs(name)
    cached, first, second = cached_run(name, method)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    computed = [all(k == FULL for k in p.kinds) for p in cached.schedule.steps]
    assert computed[0] and not all(computed)
    for out, ref, full in zip(first, plain, computed):
        assert torch.isfinite(out).all()
        if full:  # ToCa's and DuCa's full steps write the attention out to score tokens: equal up to rounding
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 if method in ("toca", "duca") else 0)
        else:
            assert not torch.allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_fora_caches_every_branch_of_every_stream(name):
    cached, _, _ = cached_run(name, "fora")
    assert counters(cached, FULL, "InsertCacheWritePass") == per_stream(name, "cache_write")
    assert counters(cached, REUSE, "ReplaceWithCacheReadPass") == per_stream(name, "cache_read")
    # a reuse step computes no attention and no block's projections: the joint attention of both
    # streams went with their two cached branches (HunyuanVideo's token refiner, conditioning
    # outside the blocks, keeps its own)
    reuse = next(gm for key, gm in cached.variants.items() if key[0] == (REUSE,) * cached.structure.depth)
    modules = tuple(b.module + "." for b in cached.structure.blocks)
    in_blocks = [n for n in reuse.graph.nodes if (ir.module_path(n) + ".").startswith(modules)]
    assert not [n for n in in_blocks if ir.is_sdpa(n)]
    assert not [n for n in in_blocks if ir.is_linear(n)
                and not ir.layer_path(n).endswith((".norm.linear", ".norm1.linear", ".norm1_context.linear"))]


def test_toca_selects_tokens_within_each_stream():
    """A partial step reads both streams' attention from the cache, recomputes the image and the
    text MLP of each double-stream block on their own top-k tokens, and each single-stream block's
    attention-and-MLP on its top-k joint tokens; full steps score every stream's tokens."""
    for name, text_blocks in (("flux", 2), ("sd3", 1)):
        cached, _, _ = cached_run(name, "toca")
        s = cached.structure
        double = sum(1 for b in s.blocks if b.branches[0].stream == ir.IMAGE)
        single = s.depth - double
        assert counters(cached, PARTIAL, "ReplaceWithCacheReadPass") == {
            "cache_read": double + text_blocks, "cache_read.text": text_blocks}
        mlp, parallel = counters(cached, PARTIAL, "InsertTokenSelectPass")
        assert mlp == {"token_select": double + text_blocks, "token_select.text": text_blocks}
        assert parallel == ({"token_select": single, "token_select.joint": single} if single else {})
        record = counters(cached, FULL, "RecordTokenScorePass")
        selected = double + text_blocks + single
        assert record == {"staleness_reset": selected, "score_record": selected, "explicit_attention": s.depth,
                          **{f"{key}.text": text_blocks for key in ("staleness_reset", "score_record")},
                          **{f"{key}.joint": single for key in ("staleness_reset", "score_record") if single}}
        # each stream's tokens have their own score and staleness counters, sized by the stream
        tokens = {st.name: st.num_tokens for st in s.streams}
        assert cached.cache.b0_text_score.shape[1] == tokens[ir.TEXT] == cached.cache.b0_text_staleness.shape[1]
        assert cached.cache.b0_score.shape[1] == tokens[ir.IMAGE]
        if single:
            assert cached.cache.b2_score.shape[1] == tokens[ir.JOINT] == cached.cache.b2_parallel_staleness.shape[1]


def test_taylorseer_forecasts_every_branch_of_every_stream():
    cached, _, _ = cached_run("flux", "taylorseer")
    factors = cached.options["order"] + 1  # a forecast reads every Taylor factor of its branch
    reads = {key: factors * n for key, n in per_stream("flux", "taylor_read").items()}
    assert counters(cached, FORECAST, "ReplaceWithTaylorForecastPass") == {**per_stream("flux", "forecast"), **reads}


def test_duca_aggressive_steps_reuse_the_final_hidden_state():
    cached, _, _ = cached_run("flux", "duca")
    depth = cached.structure.depth
    assert [p.kinds[0] for p in cached.schedule.steps] == [FULL, FULL, FULL, PARTIAL, SKIP]
    assert counters(cached, SKIP, "SkipBlocksPass") == {"skipped_block": depth, "final_stream_read": 1}
    skip = next(gm for key, gm in cached.variants.items() if key[0] == (SKIP,) * depth)
    assert not [n for n in skip.graph.nodes if ir.is_sdpa(n) or (ir.is_linear(n) and "blocks" in ir.module_path(n))]
    assert counters(cached, FULL, "InsertFinalStreamWritePass") == {"final_stream_write": 1}
    assert cached.cache.final_stream.shape[1] == cached.structure.streams[-1].num_tokens  # the joint stream


def test_clusca_clusters_each_stream_and_forecasts_single_blocks():
    cached, _, _ = cached_run("flux", "clusca")
    s = cached.structure
    assert cached.options["profile"] == "flux" and cached.options["order"] == 1
    assert [p.kinds[0] for p in cached.schedule.steps] == [FULL, FULL, FULL, PARTIAL, PARTIAL]
    assert cached.schedule[3].kinds == (PARTIAL, PARTIAL, FORECAST, FORECAST)
    first = next(v for v in cached.describe()["variants"] if v["steps"] == [0])
    cluster = next(p["counters"] for p in first["passes"] if p["pass"] == "InsertClusterPass")
    assert cluster == {"randint": 2, "kmeans": 2, "cache_write": 4, "randint.text": 1, "kmeans.text": 1,
                       "cache_write.text": 2}
    tokens = {st.name: st.num_tokens for st in s.streams}
    assert cached.cache.cluster_labels.shape[1] == tokens[ir.IMAGE]
    assert cached.cache.text_cluster_labels.shape[1] == tokens[ir.TEXT]
    step = next(v for v in cached.describe()["variants"] if v["steps"][0] == 3)
    forecast_single, forecast_attention = [p["counters"] for p in step["passes"]
                                           if p["pass"] == "ReplaceWithTaylorForecastPass"]
    assert forecast_single["forecast"] == forecast_single["forecast.joint"] == 2
    assert forecast_attention["forecast"] == 4 and forecast_attention["forecast.text"] == 2
    assert counters_of(step, "InsertTokenSelectPass") == {"token_select": 4, "token_select.text": 2}


def counters_of(variant, pass_name):
    return next(p["counters"] for p in variant["passes"] if p["pass"] == pass_name)


def test_eoc_refuses_two_streams():
    structure = cached_run("flux", "fora")[0].structure
    with pytest.raises(GraphcacheError, match="EOC's correction does not run on blocks with image and text streams"):
        get_method("fora").schedule(STEPS, structure.depth, {"eoc": "prior.safetensors"}, structure=structure)
