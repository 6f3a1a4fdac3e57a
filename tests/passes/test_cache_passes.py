"""InsertCacheWritePass, ReplaceWithCacheReadPass, EliminateDeadBranchesPass.

Structural: exact rewrite counts, measured both on the pass counters and on the graph itself.
Numerical: the variants against the plain model and against a reuse step written here by hand
from the model's own submodules. Negative: declines, and the manager's cache-aliasing lint.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import graphcache
from graphcache import ir
from graphcache.cache import CACHE_ATTR, CacheSlot, CacheState, declare_slot, read_slot, update_slot, write_slot
from graphcache.models.dit import DiT, DiTConfig, init_random_
from graphcache.ops import CACHE_SCATTER, CACHE_WRITE, gather_tokens, is_cache_write, scatter_tokens
from graphcache.passes.base import Pass, PassResult
from graphcache.passes.cache_passes import (
    EliminateDeadBranchesPass,
    InsertCacheWritePass,
    ReplaceWithCacheReadPass,
)
from graphcache.passes.manager import PassManager, PassPipelineError
from graphcache.runtime import new_variant
from graph_queries import layer_calls

DEPTH = 4
BATCH = 2  # the batch of capture's example inputs: slots allocated from its shapes


@pytest.fixture(scope="module")
def model():
    cfg = DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=DEPTH, num_heads=4, num_classes=10)
    return init_random_(DiT(cfg), seed=1).eval()


@pytest.fixture(scope="module")
def captured(model):
    return graphcache.capture(model)


def build(captured, passes, cache=None):
    cache = cache if cache is not None else CacheState()
    gm = new_variant(captured, cache)
    records = PassManager(passes)(gm)
    return gm, records


def allocate(captured, *variants):
    """What the runtime does: one zeroed buffer per declared slot, shaped like its node."""
    cache = getattr(variants[0], CACHE_ATTR)
    nodes = ir.nodes_by_name(captured.graph)
    specs = {}
    for gm in variants:
        for name, slot in gm.meta.get("graphcache_slots", {}).items():
            specs[name] = slot.resolve(nodes[slot.like].meta["tensor_meta"])
    cache.allocate(specs, torch.device("cpu"), signature=None)
    return cache


def cache_writes(gm):
    return [n for n in gm.graph.nodes if is_cache_write(n)]


def cache_reads(gm):
    """get_attr nodes of slots that are not the destination of a write."""
    return [
        n for n in gm.graph.nodes
        if n.op == "get_attr" and n.target.startswith(CACHE_ATTR + ".")
        and not all(is_cache_write(u) and u.args[0] is n for u in n.users)
    ]


def inputs(seed, t=500):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 4, 8, 8, generator=g)
    return x, torch.tensor([t, t]), torch.tensor([3, 7])


# --------------------------------------------------------------------------------------------
# Structure: exact counts
# --------------------------------------------------------------------------------------------


def test_insert_cache_write_counts(captured):
    gm, records = build(captured, [InsertCacheWritePass()])
    assert records[0].counters == {"cache_write": 2 * DEPTH} and records[0].modified
    writes = cache_writes(gm)
    assert len(writes) == 2 * DEPTH
    s = ir.structure_of(gm)
    # each write stores exactly one branch's ungated output into that branch's slot
    assert sorted((w.args[0].target, w.args[1].name) for w in writes) == sorted(
        (f"{CACHE_ATTR}.{br.name}", br.branch_out) for br in s.branches)
    assert set(gm.meta["graphcache_slots"]) == {br.name for br in s.branches}
    assert not cache_reads(gm)


def test_insert_cache_write_dit_s2(dit_s2_captured):
    gm, records = build(dit_s2_captured[1], [InsertCacheWritePass()])
    assert records[0].counters["cache_write"] == 24 and len(cache_writes(gm)) == 24


def test_insert_cache_write_selected_blocks(captured):
    gm, records = build(captured, [InsertCacheWritePass(blocks=[0, 2])])
    assert records[0].counters["cache_write"] == 4
    assert {w.args[0].target for w in cache_writes(gm)} == {
        f"{CACHE_ATTR}.b{b}_{k}" for b in (0, 2) for k in ("attention", "mlp")}


def test_replace_with_cache_read_counts(captured):
    gm, records = build(captured, [ReplaceWithCacheReadPass()])
    assert records[0].counters == {"cache_read": 2 * DEPTH}
    assert len(cache_reads(gm)) == 2 * DEPTH

    gm, records = build(captured, [ReplaceWithCacheReadPass(blocks=[1])])
    assert records[0].counters == {"cache_read": 2}
    reads = cache_reads(gm)
    assert sorted(r.target for r in reads) == [f"{CACHE_ATTR}.b1_attention", f"{CACHE_ATTR}.b1_mlp"]
    # each read now feeds the gate multiply in place of the branch output
    s = ir.structure_of(gm)
    nodes = ir.nodes_by_name(gm.graph)
    for br in s.blocks[1].branches:
        read = nodes[br.residual_add]
        mul = next(a for a in read.args if a.name != br.stream_in)
        assert nodes[br.gate] in mul.args
        assert any(a.op == "get_attr" and a.target == f"{CACHE_ATTR}.{br.name}" for a in mul.args)
        assert not nodes[br.branch_out].users


def test_eliminate_dead_branches(captured):
    gm, records = build(captured, [ReplaceWithCacheReadPass(blocks=[1]), EliminateDeadBranchesPass()])
    s = ir.structure_of(captured)
    work = {n for br in s.blocks[1].branches for n in br.work}
    removed = {n.name for n in captured.graph.nodes} - {n.name for n in gm.graph.nodes}
    assert records[1].counters["removed_nodes"] == len(removed)
    assert removed >= work  # all the branch work goes ...
    # ... plus what only fed it: block 1's shift/scale (chunks 0, 1, 3, 4), not its gates (2, 5)
    nodes = ir.nodes_by_name(captured.graph)
    for name in removed - work:
        assert all(u.name in removed for u in nodes[name].users), name
    chunk = {n.args[1]: n.name for n in captured.graph.nodes
             if n.op == "call_function" and n.target.__name__ == "getitem"
             and n.args[0].target is torch.ops.aten.chunk.default
             and ir.layer_path(n.args[0].args[0]) == "blocks.1.adaLN_modulation.1"}
    assert {i for i, name in chunk.items() if name in removed} == {0, 1, 3, 4}
    names = {n.name for n in gm.graph.nodes}
    assert not names & set(work)
    assert not layer_calls(gm, "blocks.1.attn") and not layer_calls(gm, "blocks.1.mlp")
    # the other blocks keep their work; block 1 keeps its modulation: the gates are still used
    for b in (0, 2, 3):
        assert layer_calls(gm, f"blocks.{b}.attn.") and layer_calls(gm, f"blocks.{b}.mlp.")
    assert layer_calls(gm, "blocks.1.adaLN_modulation")
    for br in s.blocks[1].branches:
        assert br.gate in names and br.residual_add in names

    gm, _ = build(captured, [ReplaceWithCacheReadPass(), EliminateDeadBranchesPass()])
    assert not layer_calls(gm, "blocks.0.attn") and not layer_calls(gm, "blocks.3.mlp")
    assert len(layer_calls(gm, "blocks.")) == DEPTH * 2  # adaLN SiLU + Linear per block


def test_full_variant_pipeline_keeps_everything(captured):
    gm, records = build(captured, [InsertCacheWritePass(), ReplaceWithCacheReadPass(blocks=[]),
                                   EliminateDeadBranchesPass()])
    assert [dict(r.counters) for r in records] == [{"cache_write": 2 * DEPTH}, {}, {"removed_nodes": 0}]
    assert [r.modified for r in records] == [True, False, False]


# --------------------------------------------------------------------------------------------
# Dead-code elimination: why the custom op exists
# --------------------------------------------------------------------------------------------


def test_cache_write_survives_dce_but_copy_does_not(captured):
    gm, _ = build(captured, [InsertCacheWritePass()])
    before = len(cache_writes(gm))
    gm.graph.eliminate_dead_code()
    assert len(cache_writes(gm)) == before == 2 * DEPTH

    # the same write as a plain `buf.copy_(x)` call_method: fx deems it pure, DCE deletes it
    gm = new_variant(captured, CacheState())
    s = ir.structure_of(gm)
    nodes = ir.nodes_by_name(gm.graph)
    for br in s.branches:
        declare_slot(gm, CacheSlot(br.name, like=br.branch_out))
        with ir.insert_after(nodes[br.branch_out]):
            gm.graph.call_method("copy_", (read_slot(gm.graph, br.name), nodes[br.branch_out]))
    copies = lambda: [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "copy_"]  # noqa: E731
    assert len(copies()) == 2 * DEPTH
    gm.graph.eliminate_dead_code()
    assert copies() == []


# --------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------


def branch_outputs(model, x, t, y):
    """The ungated outputs of every blocks[i].attn / .mlp, by forward hooks on the plain model."""
    outs, hooks = {}, []
    for i, block in enumerate(model.blocks):
        for kind, mod in (("attention", block.attn), ("mlp", block.mlp)):
            hooks.append(mod.register_forward_hook(
                lambda m, args, out, key=f"b{i}_{kind}": outs.__setitem__(key, out.detach().clone())))
    try:
        with torch.no_grad():
            y_out = model(x, t, y)
    finally:
        for h in hooks:
            h.remove()
    return y_out, outs


def reuse_reference(model, x, t, y, cached):
    """One reuse step written by hand: every branch is replaced by its cached ungated output,
    scaled by the gate of THIS step."""
    with torch.no_grad():
        h = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y)
        for i, block in enumerate(model.blocks):
            _, _, gate_msa, _, _, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
            h = h + gate_msa.unsqueeze(1) * cached[f"b{i}_attention"]
            h = h + gate_mlp.unsqueeze(1) * cached[f"b{i}_mlp"]
        out = model.final_layer(h, c)
        return model.unpatchify(out, x.shape[2], x.shape[3])


def test_full_variant_numerics(model, captured):
    full, _ = build(captured, [InsertCacheWritePass(), EliminateDeadBranchesPass()])
    cache = allocate(captured, full)
    x, t, y = inputs(0, t=900)
    expected, hooked = branch_outputs(model, x, t, y)
    with torch.no_grad():
        out = full(x, t, y)
    assert torch.equal(out, expected)
    assert set(dict(cache.named_buffers())) == set(hooked)
    for name, buf in cache.named_buffers():
        assert torch.equal(buf, hooked[name]), name


def test_reuse_variant_numerics(model, captured):
    cache = CacheState()
    full, _ = build(captured, [InsertCacheWritePass(), EliminateDeadBranchesPass()], cache)
    reuse, _ = build(captured, [ReplaceWithCacheReadPass(), EliminateDeadBranchesPass()], cache)
    allocate(captured, full, reuse)
    x1, t1, y = inputs(1, t=900)
    x2, t2, _ = inputs(2, t=700)
    with torch.no_grad():
        full(x1, t1, y)
        _, cached = branch_outputs(model, x1, t1, y)
        out = reuse(x2, t2, y)
        plain = model(x2, t2, y)
    expected = reuse_reference(model, x2, t2, y, cached)
    assert torch.equal(out, expected)
    assert not torch.allclose(out, plain, atol=1e-4)  # the cache is really used
    # a reuse step reads, never writes: the cache still holds step t1's outputs
    for name, buf in cache.named_buffers():
        assert torch.equal(buf, cached[name])


def test_partial_reuse_numerics(model, captured):
    """Blocks 0 and 3 recompute (and write), blocks 1 and 2 reuse: checked against hooks for the
    fresh blocks and a hand-written mix."""
    cache = CacheState()
    full, _ = build(captured, [InsertCacheWritePass(), EliminateDeadBranchesPass()], cache)
    mixed, _ = build(captured, [InsertCacheWritePass(blocks=[0, 3]), ReplaceWithCacheReadPass(blocks=[1, 2]),
                                EliminateDeadBranchesPass()], cache)
    allocate(captured, full, mixed)
    x1, t1, y = inputs(3, t=900)
    x2, t2, _ = inputs(4, t=600)
    with torch.no_grad():
        full(x1, t1, y)
        old = {k: v.clone() for k, v in cache.named_buffers()}
        out = mixed(x2, t2, y)
        h = model.x_embedder(x2) + model.pos_embed
        c = model.t_embedder(t2) + model.y_embedder(y)
        fresh = {}
        for i, block in enumerate(model.blocks):
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
            if i in (1, 2):
                a = old[f"b{i}_attention"]
            else:
                a = fresh[f"b{i}_attention"] = block.attn(
                    block.norm1(h) * (1 + scale_msa.unsqueeze(1)) + shift_msa.unsqueeze(1))
            h = h + gate_msa.unsqueeze(1) * a
            if i in (1, 2):
                f = old[f"b{i}_mlp"]
            else:
                f = fresh[f"b{i}_mlp"] = block.mlp(
                    block.norm2(h) * (1 + scale_mlp.unsqueeze(1)) + shift_mlp.unsqueeze(1))
            h = h + gate_mlp.unsqueeze(1) * f
        expected = model.unpatchify(model.final_layer(h, c), 8, 8)
    assert torch.equal(out, expected)
    bufs = dict(cache.named_buffers())
    for name, value in fresh.items():
        assert torch.equal(bufs[name], value), name
    for b in (1, 2):
        for k in ("attention", "mlp"):
            assert torch.equal(bufs[f"b{b}_{k}"], old[f"b{b}_{k}"])


# --------------------------------------------------------------------------------------------
# Negative cases
# --------------------------------------------------------------------------------------------


def test_passes_decline_replaced_branches(captured):
    gm, _ = build(captured, [ReplaceWithCacheReadPass(blocks=[0]), EliminateDeadBranchesPass()])

    read = ReplaceWithCacheReadPass(blocks=[0, 1])
    result = read(gm)
    assert read.counters["cache_read"] == 2  # block 1 only
    assert [d.target for d in read.declined] == ["b0_attention", "b0_mlp"]
    assert all(d.reason for d in read.declined)
    assert result.modified

    write = InsertCacheWritePass(blocks=[0, 2])
    write(gm)
    assert write.counters["cache_write"] == 2  # block 2 only
    assert [d.target for d in write.declined] == ["b0_attention", "b0_mlp"]
    assert all("replaced" in d.reason for d in write.declined)
    assert {w.args[0].target for w in cache_writes(gm)} == {f"{CACHE_ATTR}.b2_attention", f"{CACHE_ATTR}.b2_mlp"}

    # nothing left to do: the pass says so and does not modify the graph
    again = ReplaceWithCacheReadPass(blocks=[0])
    assert not again(gm).modified and len(again.declined) == 2


def test_replace_declines_before_dce(captured):
    """A branch already replaced but not yet dead-code-eliminated is declined too: a second read
    would be dead on arrival and the counter would lie."""
    gm, _ = build(captured, [ReplaceWithCacheReadPass(blocks=[0])])
    again = ReplaceWithCacheReadPass(blocks=[0])
    result = again(gm)
    assert again.counters["cache_read"] == 0 and not result.modified
    assert [d.target for d in again.declined] == ["b0_attention", "b0_mlp"]
    assert len(cache_reads(gm)) == 2


def test_records_carry_declines(captured):
    gm, records = build(captured, [ReplaceWithCacheReadPass(blocks=[2]), EliminateDeadBranchesPass(),
                                   InsertCacheWritePass()])
    assert records[2].counters == {"cache_write": 2 * DEPTH - 2}
    assert {d.target for d in records[2].declined} == {"b2_attention", "b2_mlp"}


class StaleReadPass(Pass):
    """Reads block 1's attention slot, writes the slot, then uses the read: the bug lint catches."""

    def call(self, gm):
        s = ir.structure_of(gm)
        br = s.branch(1, ir.ATTENTION)
        out = ir.nodes_by_name(gm.graph)[br.branch_out]
        declare_slot(gm, CacheSlot(br.name, like=br.branch_out))
        with ir.insert_after(out):
            old = read_slot(gm.graph, br.name)
            write_slot(gm.graph, br.name, out)
            mixed = gm.graph.call_function(torch.add, (out, old))
        out.replace_all_uses_with(mixed, delete_user_cb=lambda n: n is not mixed and not is_cache_write(n))
        return PassResult(gm, True)


def test_lint_names_the_failing_pass(captured):
    gm = new_variant(captured, CacheState())
    manager = PassManager([InsertCacheWritePass(blocks=[0]), ReplaceWithCacheReadPass(blocks=[3]), StaleReadPass(),
                           EliminateDeadBranchesPass()])
    with pytest.raises(PassPipelineError) as info:
        manager(gm)
    err = info.value
    assert err.failed == "StaleReadPass"
    assert err.before == ["InsertCacheWritePass", "ReplaceWithCacheReadPass"]
    msg = str(err)
    assert "StaleReadPass" in msg and "InsertCacheWritePass, ReplaceWithCacheReadPass" in msg
    assert f"{CACHE_ATTR}.b1_attention" in msg  # the lint names the slot
    assert "EliminateDeadBranchesPass" not in msg


def test_lint_accepts_read_after_write(captured):
    """Reading a slot AFTER writing it (a fresh alias) is fine: only stale reads are errors."""

    class FreshReadPass(Pass):
        def call(self, gm):
            br = ir.structure_of(gm).branch(1, ir.MLP)
            out = ir.nodes_by_name(gm.graph)[br.branch_out]
            declare_slot(gm, CacheSlot(br.name, like=br.branch_out))
            with ir.insert_after(out):
                write_slot(gm.graph, br.name, out)
                fresh = read_slot(gm.graph, br.name)
                mixed = gm.graph.call_function(torch.add, (out, fresh))
            out.replace_all_uses_with(mixed, delete_user_cb=lambda n: n is not mixed and not is_cache_write(n))
            return PassResult(gm, True)

    gm = new_variant(captured, CacheState())
    records = PassManager([FreshReadPass()])(gm)
    assert records[0].modified


def test_cache_write_op_is_registered():
    assert CACHE_WRITE is torch.ops.graphcache.cache_write.default
    dst, src = torch.zeros(3), torch.arange(3.0)
    torch.ops.graphcache.cache_write(dst, src)
    assert torch.equal(dst, src)
    g = fx.Graph()
    a, b = g.placeholder("a"), g.placeholder("b")
    node = g.call_function(CACHE_WRITE, (a, b))
    assert is_cache_write(node) and node.is_impure()


def test_cache_scatter_op_is_registered():
    assert CACHE_SCATTER is torch.ops.graphcache.cache_scatter.default
    torch.manual_seed(0)
    dst, values = torch.randn(2, 5, 3), torch.randn(2, 2, 3)
    idx = torch.tensor([[4, 1], [0, 3]])
    want = scatter_tokens(dst, idx, values)
    storage = dst.data_ptr()
    torch.ops.graphcache.cache_scatter(dst, idx, values)
    assert torch.equal(dst, want) and dst.data_ptr() == storage  # in place
    assert torch.equal(dst[0, 4], values[0, 0]) and torch.equal(dst[1, 0], values[1, 0])
    g = fx.Graph()
    a, i, v = g.placeholder("a"), g.placeholder("i"), g.placeholder("v")
    node = g.call_function(CACHE_SCATTER, (a, i, v))
    assert is_cache_write(node) and node.is_impure()


def test_update_slot_takes_only_in_place_cache_updates(captured):
    gm = new_variant(captured, CacheState())
    declare_slot(gm, CacheSlot("s", like="x"))
    with pytest.raises(ValueError, match="not a registered in-place cache update"):
        update_slot(gm.graph, "s", CACHE_WRITE, gm.graph.find_nodes(op="placeholder")[0])


def test_gather_tokens_eager_and_traced():
    """Eager indexes whole rows, a traced graph gathers: both are x[b, idx[b, j]], bit for bit."""
    torch.manual_seed(0)
    x, idx = torch.randn(3, 7, 5), torch.tensor([[6, 0], [2, 2], [1, 5]])
    want = torch.stack([x[b, idx[b]] for b in range(3)])
    assert torch.equal(gather_tokens(x, idx), want)
    traced = torch.compile(gather_tokens, backend="eager", fullgraph=True)
    assert torch.equal(traced(x, idx), want)

    class Gather(torch.nn.Module):
        def forward(self, x, idx):
            return gather_tokens(x, idx)

    exported = torch.export.export(Gather(), (x, idx))
    assert [n.target for n in exported.graph.nodes if n.op == "call_function"][-1] is torch.ops.aten.gather.default
    assert torch.equal(exported.module()(x, idx), want)


class ScatterPass(Pass):
    """Scatter the first two tokens of block 1's MLP output into its slot; `stale` uses a read made
    BEFORE the scatter after it (an error), otherwise the read update_slot returns."""

    def __init__(self, stale: bool):
        super().__init__()
        self.stale = stale

    def call(self, gm):
        br = ir.structure_of(gm).branch(1, ir.MLP)
        out = ir.nodes_by_name(gm.graph)[br.branch_out]
        declare_slot(gm, CacheSlot(br.name, like=br.branch_out))
        with ir.insert_after(out):
            old = read_slot(gm.graph, br.name)
            idx = gm.graph.call_function(torch.zeros, (2, 2), {"dtype": torch.long})
            part = gm.graph.call_method("narrow", (out, 1, 0, 2))
            merged = update_slot(gm.graph, br.name, CACHE_SCATTER, idx, part)
            mixed = gm.graph.call_function(torch.add, (merged, old if self.stale else out))
        out.replace_all_uses_with(mixed, delete_user_cb=lambda n: n not in (mixed, part))
        return PassResult(gm, True)


def test_lint_stale_read_across_a_scatter(captured):
    with pytest.raises(PassPipelineError, match=f"{CACHE_ATTR}.b1_mlp"):
        PassManager([ScatterPass(stale=True)])(new_variant(captured, CacheState()))
    records = PassManager([ScatterPass(stale=False)])(new_variant(captured, CacheState()))
    assert records[0].modified
