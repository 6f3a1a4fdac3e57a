"""diffusers' DiT and PixArt-α transformers (loaded from folders by graphcache.diffusers_models)
through graphcache.capture and graphcache.optimize, with no adapter code: the structure found, the
drop-in module (call signature, return type, lazy capture, re-capture for a new resolution), what
each method's passes insert, and diffusers' DiT against the built-in DiT with the same weights.
FLUX, SD3, Wan and HunyuanVideo: captured, run by `none` as their forward, example inputs."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._subclasses import FakeTensorMode

import graphcache
from graphcache import ir
from graphcache.diffusers_models import (example_kwargs, is_text_conditioned, load_pipeline, load_transformer,
                                         text_pipeline)
from graphcache.models.convert_diffusers import dit_to_diffusers
from graphcache.models.dit import DiT, DiTConfig, init_random_
from diffusers_models import (DEPTH, diffusers, dit_inputs, dit_transformer, flow_matching_call, flux_inputs,
                              flux_transformer,
                              hunyuan_video_inputs, hunyuan_video_transformer, pixart_inputs, pixart_pipeline,
                              pixart_transformer, sd3_inputs, sd3_transformer, wan_inputs, wan_transformer)

A, X, M = ir.ATTENTION, ir.CROSS_ATTENTION, ir.MLP
MODELS = {"dit": (dit_transformer, dit_inputs, [[A, M]] * DEPTH), "pixart": (pixart_transformer, pixart_inputs,
                                                                           [[A, X, M]] * DEPTH)}

# MMDiT and video transformers, whose structure discovery does not describe yet in full
STREAM_MODELS = {"flux": (flux_transformer, flux_inputs), "sd3": (sd3_transformer, sd3_inputs),
                 "wan": (wan_transformer, wan_inputs),
                 "hunyuan_video": (hunyuan_video_transformer, hunyuan_video_inputs)}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    factory, inputs, kinds = MODELS[request.param]
    return request.param, factory(), inputs, kinds


def test_structure_is_found_without_adapter_code(model):
    name, transformer, inputs, kinds = model
    s = ir.structure_of(graphcache.capture(transformer, kwargs=inputs()))
    assert [[br.kind for br in b.branches] for b in s.blocks] == kinds
    assert [b.module for b in s.blocks] == [f"transformer_blocks.{i}" for i in range(DEPTH)]
    assert (s.num_tokens, s.hidden_size) == (16, 32)
    # the adaLN gates multiply self-attention and MLP; PixArt adds its cross-attention ungated
    assert [[br.gate is not None for br in b.branches] for b in s.blocks] == [[k != X for k in b] for b in kinds]
    assert s.input_names == (["hidden_states", "timestep", "class_labels"] if name == "dit"
                             else ["hidden_states", "encoder_hidden_states", "timestep"])


def test_none_is_a_drop_in_module(model):
    """Captured at its first call, called as the transformer is, returning what it returns."""
    _, transformer, inputs, _ = model
    cached = graphcache.optimize(transformer, "none", num_steps=3)
    assert cached.spec is None  # nothing captured yet: no example inputs for a diffusers model
    with torch.no_grad():
        for _ in range(3):
            out = cached(**inputs())
            want = transformer(**inputs())
            assert type(out) is type(want) and torch.equal(out.sample, want.sample)
        positional = inputs()
        args = [positional.pop("hidden_states")]
        out = cached(*args, **positional, return_dict=False)
        want = transformer(*args, **positional, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and torch.equal(out[0], want[0])
    assert cached.config is transformer.config and cached.dtype == transformer.dtype


def test_new_shapes_capture_again(model):
    name, transformer, inputs, _ = model
    cached = graphcache.optimize(transformer, "fora", num_steps=4, kwargs=inputs())
    captured = cached.captured
    with torch.no_grad():
        cached(**inputs(batch=4))  # another batch: the same capture
        assert cached.captured is captured
        bigger = inputs()
        bigger["hidden_states"] = torch.randn(2, 4, 16, 16)
        with pytest.warns(UserWarning, match="captured again and the schedule restarts"):
            out = cached(**bigger)
        assert cached.captured is not captured and ir.structure_of(cached.captured).num_tokens == 64
        assert torch.equal(out.sample, transformer(**bigger).sample)  # the restarted schedule's full step
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(3):
                cached(**bigger)


def test_a_capture_on_one_image_serves_any_batch():
    """Export specialises dimensions of size 1: capture widens a batch of 1 to 2, so that the graph
    of one unguided image also runs a guided batch (no second capture)."""
    transformer = pixart_transformer()
    cached = graphcache.optimize(transformer, "none", num_steps=2)
    with torch.no_grad():
        out = cached(**pixart_inputs(batch=1))
        captured = cached.captured
        assert cached.spec.symbolic_batch == (True, True, True)
        assert torch.equal(out.sample, transformer(**pixart_inputs(batch=1)).sample)
        cached.reset()  # a new sampling run, with guidance
        out = cached(**pixart_inputs(batch=2))
    assert cached.captured is captured and torch.equal(out.sample, transformer(**pixart_inputs(batch=2)).sample)


EXPECTED_COUNTS = {
    # method: (branches per model, whether its blocks have cross-attention) -> the counters of the
    # passes that rewrite branches, per kind of variant, pass by pass
    "fora": lambda branches, cross: [[("InsertCacheWritePass", {"cache_write": branches})],
                                     [("ReplaceWithCacheReadPass", {"cache_read": branches})]],
    # ToCa: self-attention read from the cache, the MLP on the selected tokens; PixArt's profile
    # selects cross-attention tokens too (each with its own staleness) and scores by its entropy
    "toca": lambda branches, cross: [
        [("InsertCacheWritePass", {"cache_write": branches}),
         ("RecordTokenScorePass", {"staleness_reset": DEPTH * (1 + cross), "explicit_attention": DEPTH,
                                   "score_record": DEPTH})],
        [("ReplaceWithCacheReadPass", {"cache_read": DEPTH}),
         *[("InsertTokenSelectPass", {"token_select": DEPTH})] * (1 + cross)]],
}


@pytest.mark.parametrize("method", list(EXPECTED_COUNTS))
def test_what_the_passes_insert(model, method):
    _, transformer, inputs, kinds = model
    cached = graphcache.optimize(transformer, method, num_steps=10, kwargs=inputs())
    branches = sum(len(k) for k in kinds)
    expected = EXPECTED_COUNTS[method](branches, X in kinds[0])
    names = {name for variant in expected for name, _ in variant}
    counted = []
    for key in cached.schedule.variants():
        if len(set(key[0])) == 1:  # ToCa's mixed steps (some blocks full, some partial) combine the two
            counted.append([(r.name, dict(r.counters)) for r in cached.records[key]
                            if r.counters and r.name in names])
    assert sorted(counted, key=str) == sorted(expected, key=str)


def test_pixart_conditioning_is_hoisted():
    """adaLN-single (one modulation from t for all blocks, plus each block's scale_shift_table) and
    the caption projection depend on (t, text) only: they leave the variant like DiT's adaLN."""
    transformer = pixart_transformer()
    cached = graphcache.optimize(transformer, "fora", num_steps=4, kwargs=pixart_inputs())
    for key, records in cached.records.items():
        hoist = records[-1]
        assert hoist.name == "HoistConditioningPass" and hoist.counters["hoisted_values"] > 0, key
    assert cached.condition_inputs == {"encoder_hidden_states": 1, "timestep": 2}
    with torch.no_grad():
        torch.testing.assert_close(cached(**pixart_inputs()).sample, transformer(**pixart_inputs()).sample,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("method", ["none", "fora", "toca", "duca", "taylorseer", "clusca"])
def test_diffusers_dit_behaves_like_the_builtin_dit(method):
    """The same weights (models/convert_diffusers.py), the same method: the same outputs at every
    step, to float rounding (the built-in DiT's fused qkv GEMM against diffusers' three)."""
    config = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=DEPTH, num_heads=2,
                       num_classes=10, frequency_shift=1)
    builtin = init_random_(DiT(config), seed=4).eval()
    state, diffusers_config = dit_to_diffusers(builtin.state_dict(), config)
    transformer = diffusers.DiTTransformer2DModel(**diffusers_config).eval()
    transformer.load_state_dict(state)
    ours = graphcache.optimize(builtin, method, num_steps=6, hoist_conditioning=False)
    theirs = graphcache.optimize(transformer, method, num_steps=6, kwargs=dit_inputs())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for step in range(6):
            x, t, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([900 - 150 * step] * 2), torch.tensor([3, 7])
            torch.manual_seed(step)
            want = ours(x, t, y)
            torch.manual_seed(step)
            got = theirs(x, timestep=t, class_labels=y).sample
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_example_kwargs_capture_from_the_config(model):
    name, transformer, inputs, _ = model
    kwargs = example_kwargs(transformer, text_tokens=7)
    assert {k: tuple(v.shape) for k, v in kwargs.items() if isinstance(v, torch.Tensor)} == {
        "hidden_states": (2, 4, 8, 8), "timestep": (2,),
        **({"class_labels": (2,)} if name == "dit" else {"encoder_hidden_states": (2, 7, 24)})}
    if name == "pixart":
        assert kwargs["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}
    s = ir.structure_of(graphcache.capture(transformer, kwargs=kwargs))
    assert s.depth == DEPTH and s.num_tokens == 16


def test_pipeline_folder_loads_without_text_encoder(tmp_path):
    """The transformer of a saved pipeline, alone or in the pipeline, has exactly the saved weights."""
    pipe = pixart_pipeline()
    pipe.save_pretrained(tmp_path)
    want = pipe.transformer.state_dict()
    for transformer in (load_transformer(tmp_path), load_pipeline(tmp_path).transformer):
        got = transformer.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    loaded = load_pipeline(tmp_path)
    assert type(loaded) is type(pipe) and loaded.text_encoder is None and loaded.tokenizer is None
    assert type(loaded.scheduler) is type(pipe.scheduler)


@pytest.mark.parametrize("name", list(STREAM_MODELS))
def test_mmdit_and_video_transformers_capture_and_none_is_their_forward(name):
    """One capture serves the call it was made on and other batch sizes (FLUX's token positions
    have no batch dimension), and `none` returns what the transformer does, bit for bit."""
    factory, inputs = STREAM_MODELS[name]
    transformer = factory()
    cached = graphcache.optimize(transformer, "none", num_steps=2, kwargs=inputs())
    captured = cached.captured
    with torch.no_grad():
        for batch in (1, 3):
            cached.reset()  # a sampling run per batch size
            out, want = cached(**inputs(batch=batch)), transformer(**inputs(batch=batch))
            assert type(out) is type(want) and torch.equal(out.sample, want.sample)
    assert cached.captured is captured


def test_example_kwargs_of_mmdit_and_video_transformers():
    """From the config and the released models' prompt lengths and default resolutions: FLUX one
    image of 64×64 packed tokens with its guidance scale, SD3 a CFG batch of 77 CLIP + 256 T5
    tokens, Wan and HunyuanVideo a video of `frames` latent frames (shapes checked on fake tensors:
    the transformers run on them)."""
    models = {name: factory() for name, (factory, _) in STREAM_MODELS.items()}
    shapes = {name: {k: tuple(v.shape) for k, v in example_kwargs(model).items()} for name, model in models.items()}
    assert shapes == {
        "flux": {"hidden_states": (1, 4096, 16), "encoder_hidden_states": (1, 512, 24), "pooled_projections": (1, 16),
                 "timestep": (1,), "img_ids": (4096, 3), "txt_ids": (512, 3), "guidance": (1,)},
        "sd3": {"hidden_states": (2, 16, 8, 8), "encoder_hidden_states": (2, 333, 24), "pooled_projections": (2, 16),
                "timestep": (2,)},
        "wan": {"hidden_states": (1, 4, 1, 60, 104), "timestep": (1,), "encoder_hidden_states": (1, 512, 24)},
        "hunyuan_video": {"hidden_states": (1, 4, 1, 90, 160), "timestep": (1,), "encoder_hidden_states": (1, 256, 24),
                          "encoder_attention_mask": (1, 256), "pooled_projections": (1, 16), "guidance": (1,)}}
    with FakeTensorMode(allow_non_fake_inputs=True):
        for name, model in models.items():
            kwargs = example_kwargs(model, text_tokens=7, frames=2)
            assert kwargs["encoder_hidden_states"].shape[1] == 7
            assert model(**kwargs).sample.shape == kwargs["hidden_states"].shape, name


@pytest.mark.parametrize("factory, pipeline", [(flux_transformer, "FluxPipeline"),
                                               (sd3_transformer, "StableDiffusion3Pipeline")], ids=["flux", "sd3"])
def test_flux_and_sd3_sample_latents_in_their_text_pipelines(factory, pipeline):
    """What `graphcache bench` builds for a text-conditioned transformer: its pipeline with the
    flow-matching Euler scheduler and no VAE (8 pixels per latent pixel), from prompt embeddings."""
    transformer = factory()
    assert is_text_conditioned(transformer)
    pipe = text_pipeline(transformer)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == pipeline and type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    call = {**flow_matching_call(), "height": 32, "width": 32}
    latents = pipe(**call, num_inference_steps=2, output_type="latent").images
    assert torch.isfinite(latents).all()
