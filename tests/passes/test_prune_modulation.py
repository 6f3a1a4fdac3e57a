"""PruneModulationPass: only the live chunks of a split linear layer are computed."""

import torch
from torch import nn

import graphcache
from graphcache import ir
from graphcache.cache import CacheState
from graphcache.capture import capture, export_graph, propagate_shapes
from graphcache.models.dit import DiT, DiTConfig, init_random_
from graphcache.passes.cache_passes import EliminateDeadBranchesPass, ReplaceWithCacheReadPass
from graphcache.passes.manager import PassManager
from graphcache.passes.prune_modulation import PruneModulationPass
from graphcache.runtime import new_variant
from graph_queries import layer_calls

CFG = DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=3, num_heads=4, num_classes=10)


def _model():
    return init_random_(DiT(CFG), seed=3).eval()


def _count(gm, pred):
    return sum(1 for n in gm.graph.nodes if pred(n))


def _adaln_calls(gm):
    return len(layer_calls(gm, suffix="adaLN_modulation.1"))


def _narrow_linears(gm):
    """The linears PruneModulationPass made: over a narrowed weight."""
    return _count(gm, lambda n: ir.is_linear(n) and n.args[1].target is torch.ops.aten.narrow.default)


def _reuse_variant(model, prune: bool, blocks=(0, 1, 2)):
    gm = new_variant(capture(model), CacheState())
    passes = [ReplaceWithCacheReadPass(blocks=list(blocks)), EliminateDeadBranchesPass()]
    prune_pass = PruneModulationPass()
    records = PassManager(passes + ([prune_pass] if prune else []))(gm)
    return gm, records


def test_reuse_blocks_compute_only_their_gates():
    gm, records = _reuse_variant(_model(), prune=True)
    assert records[-1].counters == {"pruned_chunks": 4 * CFG.depth, "split_linear": CFG.depth}
    # the blocks' adaLN layers are gone; the final layer's (both chunks used) stays
    assert _adaln_calls(gm) == 1
    assert _narrow_linears(gm) == 2 * CFG.depth
    assert _count(gm, lambda n: n.target is torch.ops.aten.chunk.default) == 1


def test_partially_reused_model_prunes_only_reused_blocks():
    gm, records = _reuse_variant(_model(), prune=True, blocks=[1])
    assert records[-1].counters == {"pruned_chunks": 4, "split_linear": 1}
    assert _adaln_calls(gm) == CFG.depth  # blocks 0 and 2 plus the final layer


def test_pruned_variant_equals_unpruned_and_shares_weights():
    model = _model()
    pruned, _ = _reuse_variant(model, prune=True)
    plain, _ = _reuse_variant(model, prune=False)
    for cache in (getattr(pruned, "graphcache_cache"), getattr(plain, "graphcache_cache")):
        for name in list(cache._buffers):
            cache.register_buffer(name, torch.randn(2, 16, 64), persistent=False)
    getattr(plain, "graphcache_cache").load_state_dict(getattr(pruned, "graphcache_cache").state_dict(), strict=False)
    for name, buf in getattr(pruned, "graphcache_cache").named_buffers():
        getattr(plain, "graphcache_cache")._buffers[name] = buf
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 10])
    want = plain(x, t, y)
    # the pruned gates are (B, C)-wide GEMMs, the unpruned ones a 6C-wide GEMM chunked: MKL may block
    # the two shapes differently, so they are bit-equal only on some CPUs; equal within 2e-6 of the scale
    # (one block's gate_mlp taken from gate_msa's rows moves the output by ~1e-1 of it)
    torch.testing.assert_close(pruned(x, t, y), want, rtol=0, atol=2e-6 * float(want.detach().abs().max()))
    narrowed = [n for n in pruned.graph.nodes if n.op == "get_attr" and n.target.endswith("adaLN_modulation.1.weight")]
    assert narrowed and all(pruned.get_parameter(n.target) is model.get_parameter(n.target) for n in narrowed)


def test_every_method_samples_the_same_with_the_cleanup():
    """The runtime appends the pass to every variant; FORA's samples equal a hand-built pipeline
    without it (the tests of each method compare against literal references as well)."""
    model = _model()
    cached = graphcache.optimize(model, "fora", num_steps=6)
    assert any(r.name == "PruneModulationPass" and r.counters for rec in cached.records.values() for r in rec)
    out = graphcache.sample(cached, [1, 2], num_steps=6)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


class _Split(nn.Module):
    def __init__(self, dim_ok=True):
        super().__init__()
        self.lin = nn.Linear(8, 12)
        self.dim_ok = dim_ok

    def forward(self, x):
        parts = self.lin(x).chunk(3, dim=1 if self.dim_ok else 0)
        return parts[0] * 2


def _traced(module):
    x = torch.randn(4, 8)
    gm, _ = export_graph(module, (x,))
    propagate_shapes(gm, (x,))
    return gm


def test_declines_chunks_it_cannot_split():
    gm = _traced(_Split(dim_ok=False))
    p = PruneModulationPass()
    result = p(gm)
    assert not result.modified and not p.counters
    assert [d.reason for d in p.declined] == ["it does not split the linear layer's output features evenly"]


def test_splits_a_plain_model_exactly():
    module = _Split()
    gm = _traced(module)
    x = torch.randn(4, 8)
    expected = module(x)
    p = PruneModulationPass()
    assert p(gm).modified and p.counters == {"pruned_chunks": 2, "split_linear": 1}
    gm.recompile()
    # a GEMM over fewer output rows may block its reduction differently: equal up to rounding
    torch.testing.assert_close(gm(x), expected, rtol=1e-6, atol=1e-7)
