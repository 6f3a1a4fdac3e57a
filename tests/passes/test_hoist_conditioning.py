"""HoistConditioningPass: what depends only on (t, y) leaves the variant for a conditioning graph."""

import pytest
import torch

from graphcache import ir
from graphcache.cache import CacheState
from graphcache.capture import capture
from graphcache.models.dit import DiT, DiTConfig, init_random_
from graphcache.passes.cache_passes import EliminateDeadBranchesPass, ReplaceWithCacheReadPass
from graphcache.passes.hoist_conditioning import (CONDITIONING_KEY, INPUT_PREFIX, HoistConditioningPass,
                                                  conditioning_inputs)
from graphcache.passes.manager import PassManager
from graphcache.passes.prune_modulation import PruneModulationPass
from graphcache.runtime import new_variant
from graph_queries import layer_calls

CFG = DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=3, num_heads=4, num_classes=10)


class PooledConditioningDiT(DiT):
    """A DiT whose conditioning is pooled over the batch: (1, C) when `keep_batch` is False,
    broadcast back to (B, C) — batch-first, but mixing rows — when it is True."""

    def __init__(self, cfg, keep_batch):
        super().__init__(cfg)
        self.keep_batch = keep_batch

    def forward(self, x, t, y):
        height, width = x.shape[2], x.shape[3]
        x = self.x_embedder(x) + self.pos_embed
        c = (self.t_embedder(t) + self.y_embedder(y)).mean(0, keepdim=True)
        if self.keep_batch:
            c = c.expand(t.shape[0], -1)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c), height, width)


def _model():
    return init_random_(DiT(CFG), seed=3).eval()


def _inputs(batch=2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10, 900][:batch]), torch.tensor([1, 7][:batch])


def _count(gm, pred):
    return sum(1 for n in gm.graph.nodes if pred(n))


def _is_adaln(n):
    return "adaLN_modulation" in ir.layer_path(n)


def _hoisted(model, passes=()):
    captured = capture(model)
    assert conditioning_inputs(captured) == {"t": 1, "y": 2}
    gm = new_variant(captured, CacheState())
    records = PassManager([*passes, HoistConditioningPass(conditioning_inputs(captured))])(gm)
    return gm, records[-1]


def _run(gm, x, t, y):
    """The variant on (x, t, y), its conditioning inputs computed by its conditioning graph."""
    conditioning = gm.meta[CONDITIONING_KEY]
    values = conditioning.graph(*((x, t, y)[p] for p in conditioning.inputs))
    return gm(x, t, y, **dict(zip(conditioning.names, values)))


def test_the_whole_modulation_leaves_the_uncached_graph():
    model = _model()
    gm, record = _hoisted(model)
    # per block shift, 1 + scale and gate of both branches; the final layer's shift and 1 + scale
    assert record.counters["hoisted_values"] == 6 * CFG.depth + 2
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder" and n.target.startswith(INPUT_PREFIX)]
    assert tuple(names) == gm.meta[CONDITIONING_KEY].names and len(names) == 6 * CFG.depth + 2
    assert _count(gm, _is_adaln) == 0
    conditioning = gm.meta[CONDITIONING_KEY]
    assert conditioning.inputs == (1, 2)
    assert conditioning.row_bytes == (6 * CFG.depth + 2) * CFG.hidden_size * 4  # (B, 1, C) float32 each
    assert len(layer_calls(conditioning.graph, suffix="adaLN_modulation.1")) == CFG.depth + 1
    # nothing left in the variant reads t or y, except for the batch size (a shape, free to read)
    assert all(u.target is torch.ops.aten.sym_size.int for n in gm.graph.nodes
               if n.op == "placeholder" and n.target in ("t", "y") for u in n.users)
    # the conditioning graph shares the model's weights
    w = "blocks.0.adaLN_modulation.1.weight"
    assert conditioning.graph.get_parameter(w) is model.get_parameter(w)


def test_hoisted_variant_computes_the_plain_model_exactly():
    model = _model()
    gm, _ = _hoisted(model)
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(_run(gm, x, t, y), model(x, t, y))


def test_pruned_chunks_stay_pruned():
    """After a reuse rewrite and PruneModulationPass only the gates are hoisted, as narrow linears."""
    gm, record = _hoisted(_model(), [ReplaceWithCacheReadPass(blocks=[0, 1, 2]), EliminateDeadBranchesPass(),
                                     PruneModulationPass()])
    assert record.counters["hoisted_values"] == 2 * CFG.depth + 2
    graph = gm.meta[CONDITIONING_KEY].graph
    assert _count(graph, lambda n: ir.is_linear(n) and n.args[1].target is torch.ops.aten.narrow.default) \
        == 2 * CFG.depth


@pytest.mark.parametrize("keep_batch", [False, True])
def test_conditioning_of_another_shape_is_hoisted_but_not_stacked(keep_batch):
    model = init_random_(PooledConditioningDiT(CFG, keep_batch), seed=3).eval()
    gm, record = _hoisted(model)
    assert record.counters["hoisted_values"] == 6 * CFG.depth + 2 and not record.declined
    # (1, C) values cannot be stacked along the batch: computed step by step. Batch-first ones can;
    # the pass cannot tell that their rows mix: the runtime checks (test_runtime)
    assert gm.meta[CONDITIONING_KEY].stackable is keep_batch
    assert record.counters["unstackable_values"] == (0 if keep_batch else 6 * CFG.depth + 2)


def test_declines_when_every_input_feeds_the_stream():
    gm = new_variant(capture(_model()), CacheState())
    record = PassManager([HoistConditioningPass({})])(gm)[-1]
    assert [(d.target, d.reason) for d in record.declined] == [("inputs", "every model input feeds the residual stream")]
    assert CONDITIONING_KEY not in gm.meta


def test_values_of_the_prompt_alone_are_computed_once_per_run():
    """PixArt-α: the caption projection and every cross-attention's keys and values depend on the
    prompt embeddings (and their mask) alone, the adaLN-single modulation on t alone: two parts. A
    part given the very tensors of its last call, unchanged, is not evaluated again."""
    from diffusers_models import DEPTH, pixart_inputs, pixart_transformer

    import graphcache

    model, inputs = pixart_transformer(), pixart_inputs()
    inputs["encoder_attention_mask"] = torch.ones(2, 5)
    cached = graphcache.optimize(model, "none", 3, kwargs=inputs)
    (conditioning,) = cached.conditionings.values()
    # encoder_hidden_states (reshaped by the latent's batch, read off its own), timestep, the mask
    text, mask, time = sorted(conditioning.parts, key=lambda p: p.inputs)
    assert (text.inputs, time.inputs, mask.inputs) == ((1,), (2,), (1, 3))
    assert len(layer_calls(text.graph, suffix="attn2.to_k")) == len(layer_calls(text.graph, suffix="attn2.to_v")) \
        == DEPTH
    assert not layer_calls(time.graph, suffix="attn2.to_k")
    with torch.no_grad():
        want = model(**inputs).sample
        cached.reset()
        assert torch.allclose(cached(**inputs).sample, want, rtol=1e-5, atol=1e-6)
        first = text.memo[2]
        cached(**{**inputs, "timestep": torch.tensor([500, 500])})
        assert text.memo[2] is first  # the same prompt tensors: not computed again
        inputs["encoder_hidden_states"].mul_(2)  # written in place: computed again
        cached(**inputs)
        assert text.memo[2] is not first
        cached.reset()
        assert text.memo is None
