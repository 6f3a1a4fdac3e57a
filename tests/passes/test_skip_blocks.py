"""SkipBlocksPass and InsertFinalStreamWritePass (graphcache/passes/skip_blocks.py).

Structural: exact counters, the final-stream slot and the one read/write each pass inserts, and
the block work dead-code elimination removes once a block is skipped. Numerical: skipped variants
against the model run by hand without those blocks (and, for a skipped last block, with the
cached stream in place of the blocks' output); the stream the write stores against the input of
the model's final layer. Negative: the write declines a variant whose last block is skipped.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import graphcache
from graphcache import ir
from graphcache.cache import CACHE_ATTR, CacheState
from graphcache.models.dit import DiT, DiTConfig, init_random_
from graphcache.passes.cache_passes import EliminateDeadBranchesPass
from graphcache.passes.skip_blocks import FINAL_STREAM_SLOT, InsertFinalStreamWritePass, SkipBlocksPass

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from graph_queries import layer_calls  # noqa: E402
from test_cache_passes import allocate, build, cache_reads, cache_writes, inputs  # noqa: E402

DEPTH = 3


@pytest.fixture(scope="module")
def model():
    cfg = DiTConfig(input_size=8, patch_size=2, hidden_size=32, depth=DEPTH, num_heads=2, num_classes=10)
    return init_random_(DiT(cfg), seed=5).eval()


@pytest.fixture(scope="module")
def captured(model):
    return graphcache.capture(model)


def by_hand(model, x, t, y, skip=(), final_stream=None):
    """The model run block by block, leaving out `skip`; `final_stream` replaces the stream
    entering the final layer (what a skipped last block stands for)."""
    with torch.no_grad():
        h = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y)
        for i, block in enumerate(model.blocks):
            if i not in skip:
                h = block(h, c)
        if final_stream is not None:
            h = final_stream
        return model.unpatchify(model.final_layer(h, c), x.shape[2], x.shape[3])


def final_layer_input(model, x, t, y):
    """The stream entering final_layer in the plain model (a forward pre-hook)."""
    seen = {}
    hook = model.final_layer.register_forward_pre_hook(lambda m, args: seen.__setitem__("h", args[0].clone()))
    try:
        with torch.no_grad():
            out = model(x, t, y)
    finally:
        hook.remove()
    return out, seen["h"]


# --------------------------------------------------------------------------------------------
# Structure
# --------------------------------------------------------------------------------------------


def test_skip_middle_block_counts(captured):
    gm, records = build(captured, [SkipBlocksPass([1]), EliminateDeadBranchesPass()])
    assert records[0].counters == {"skipped_block": 1} and records[0].modified
    assert not records[0].declined
    assert FINAL_STREAM_SLOT not in gm.meta.get("graphcache_slots", {})  # not the last block: no cache
    assert not cache_reads(gm) and not cache_writes(gm)
    # block 1's whole work (attention, MLP, modulation) is gone; blocks 0 and 2 keep theirs
    assert not layer_calls(gm, "blocks.1.")
    for b in (0, 2):
        assert layer_calls(gm, f"blocks.{b}.attn.") and layer_calls(gm, f"blocks.{b}.mlp.")
    # block 2 now reads block 0's output
    s = ir.structure_of(gm)
    nodes = ir.nodes_by_name(gm.graph)
    assert s.blocks[1].stream_out not in nodes
    assert nodes[s.blocks[0].stream_out] in nodes[s.blocks[2].branches[0].residual_add].args


def test_skip_last_block_reads_the_final_stream(captured):
    gm, records = build(captured, [SkipBlocksPass([DEPTH - 1])])
    assert records[0].counters == {"skipped_block": 1, "final_stream_read": 1}
    s = ir.structure_of(gm)
    slot = gm.meta["graphcache_slots"][FINAL_STREAM_SLOT]
    assert slot.like == s.stream_end and slot.shape is None and slot.dtype is None
    (read,) = cache_reads(gm)
    assert read.target == f"{CACHE_ATTR}.{FINAL_STREAM_SLOT}"
    assert not ir.nodes_by_name(gm.graph)[s.stream_end].users  # everything reads the slot instead


def test_skip_every_block_leaves_only_the_final_layer(captured):
    gm, records = build(captured, [SkipBlocksPass(range(DEPTH)), EliminateDeadBranchesPass()])
    assert records[0].counters == {"skipped_block": DEPTH, "final_stream_read": 1}
    assert not layer_calls(gm, "blocks.")
    assert not layer_calls(gm, "x_embedder.")  # the stream itself is not computed any more
    assert layer_calls(gm, "final_layer.") and layer_calls(gm, "t_embedder.")
    assert [r.target for r in cache_reads(gm)] == [f"{CACHE_ATTR}.{FINAL_STREAM_SLOT}"]


def test_skip_nothing_is_no_change(captured):
    gm, records = build(captured, [SkipBlocksPass([])])
    assert records[0].counters == {} and not records[0].modified
    assert len(gm.graph.nodes) == len(captured.graph.nodes)


def test_final_stream_write_counts(captured):
    gm, records = build(captured, [InsertFinalStreamWritePass()])
    assert records[0].counters == {"final_stream_write": 1} and records[0].modified
    (write,) = cache_writes(gm)
    s = ir.structure_of(gm)
    assert write.args[0].target == f"{CACHE_ATTR}.{FINAL_STREAM_SLOT}"
    assert write.args[1].name == s.stream_end
    assert gm.meta["graphcache_slots"][FINAL_STREAM_SLOT].like == s.stream_end


def test_final_stream_write_declines_a_skipped_last_block(captured):
    gm, _ = build(captured, [SkipBlocksPass([0, DEPTH - 1])])
    write = InsertFinalStreamWritePass()
    result = write(gm)
    assert not result.modified and write.counters == {}
    assert [(d.target, d.reason) for d in write.declined] == [
        ("final stream", "the last block is skipped in this variant")]
    assert not cache_writes(gm)


# --------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [[1], [0, 1], [0]])
def test_skipped_blocks_pass_the_stream_on(model, captured, skip):
    gm, _ = build(captured, [SkipBlocksPass(skip), EliminateDeadBranchesPass()])
    x, t, y = inputs(11, t=400)
    with torch.no_grad():
        out = gm(x, t, y)
        plain = model(x, t, y)
    assert torch.equal(out, by_hand(model, x, t, y, skip=skip))
    assert not torch.allclose(out, plain, atol=1e-4)  # the skipped blocks did contribute


def test_final_stream_round_trip(model, captured):
    """A full step stores the last block's output; a step skipping every block runs only the final
    layer on it, with the conditioning of its own timestep."""
    cache = CacheState()
    full, _ = build(captured, [InsertFinalStreamWritePass()], cache)
    skip, _ = build(captured, [SkipBlocksPass(range(DEPTH)), EliminateDeadBranchesPass()], cache)
    allocate(captured, full, skip)
    x1, t1, y = inputs(12, t=900)
    x2, t2, _ = inputs(13, t=600)
    plain1, h1 = final_layer_input(model, x1, t1, y)
    with torch.no_grad():
        assert torch.equal(full(x1, t1, y), plain1)  # the write changes nothing the model computes
        assert torch.equal(getattr(cache, FINAL_STREAM_SLOT), h1)
        out = skip(x2, t2, y)
    assert torch.equal(out, by_hand(model, x2, t2, y, final_stream=h1))
    assert not torch.allclose(out, by_hand(model, x1, t1, y, final_stream=h1), atol=1e-4)  # t2, not t1
    assert torch.equal(getattr(cache, FINAL_STREAM_SLOT), h1)  # a skip step only reads


def test_skipped_last_block_ignores_the_earlier_blocks(model, captured):
    """Blocks 0 and 1 run but the last is skipped: their result is dead, the output is the final
    layer on the cached stream whatever x is."""
    cache = CacheState()
    gm, _ = build(captured, [SkipBlocksPass([DEPTH - 1]), EliminateDeadBranchesPass()], cache)
    allocate(captured, gm)
    stored = torch.randn(getattr(cache, FINAL_STREAM_SLOT).shape, generator=torch.Generator().manual_seed(3))
    getattr(cache, FINAL_STREAM_SLOT).copy_(stored)
    x, t, y = inputs(14, t=300)
    with torch.no_grad():
        out = gm(x, t, y)
        again = gm(torch.randn_like(x), t, y)
    assert torch.equal(out, by_hand(model, x, t, y, final_stream=stored))
    assert torch.equal(out, again)
    assert not layer_calls(gm, "blocks.0.attn") and not layer_calls(gm, "blocks.1.mlp")
