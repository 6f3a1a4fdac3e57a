"""ToCa-family token scoring (graphcache/passes/token_score.py).

The functions against references written here from their definitions (loops over cells and
rows, hand-made values); RecordTokenScorePass's counters, slots and nodes for each score, and the
scores it records against ones computed from the q/k/v of the plain model's attention; a partial
step built from ToCaSelector + ScatterIntoCacheMerger against the same step written by hand from
the model's submodules. Negative: blocks without an MLP branch, or without a plain SDPA call to
read the score from, are declined with a reason.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphcache
from graphcache import ir
from graphcache.cache import CACHE_ATTR, CacheState
from graphcache.models.dit import DiT, DiTConfig, init_random_, modulate
from graphcache.ops import CACHE_SCATTER, CACHE_WRITE, RANDOM_FUNCTIONS
from graphcache.passes.cache_passes import EliminateDeadBranchesPass, InsertCacheWritePass, ReplaceWithCacheReadPass
from graphcache.passes.token_score import (
    SCORES,
    RecordTokenScorePass,
    ScatterIntoCacheMerger,
    ToCaSelector,
    explicit_attention,
    random_scores,
    score_slot,
    spatial_bonus,
    staleness_slot,
    toca_select,
    value_norm_score,
)
from graphcache.passes.token_select import InsertTokenSelectPass
from graphcache.runtime import new_variant

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (HERE, os.path.dirname(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)
from test_cache_passes import allocate, build, cache_writes, inputs  # noqa: E402
from test_capture import FusedNet, Mixer, _inputs  # noqa: E402

DEPTH, HEADS = 2, 2
BATCH, TOKENS = 2, 16  # input 8, patch 2: a 4x4 token grid (2x2 cells for the spatial bonus)


@pytest.fixture(scope="module")
def model():
    cfg = DiTConfig(input_size=8, patch_size=2, hidden_size=32, depth=DEPTH, num_heads=HEADS, num_classes=10)
    return init_random_(DiT(cfg), seed=7).eval()


@pytest.fixture(scope="module")
def captured(model):
    return graphcache.capture(model)


def calls(gm, fn):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is fn]


def qkv(seed, b=BATCH, h=HEADS, n=TOKENS, d=8):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g) for _ in range(3))


# --------------------------------------------------------------------------------------------
# The score functions
# --------------------------------------------------------------------------------------------


def test_explicit_attention_matches_sdpa_and_column_sums():
    q, k, v = qkv(0)
    out, s1 = explicit_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)
    d = q.shape[-1]
    want = torch.zeros(BATCH, TOKENS)
    for b in range(BATCH):
        attn = torch.stack([torch.softmax(q[b, h] @ k[b, h].T / d**0.5, dim=-1) for h in range(HEADS)])
        received = attn.mean(dim=0).sum(dim=0)  # column j: attention every query pays to token j
        want[b] = received / received.norm()
    torch.testing.assert_close(s1, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s1.norm(dim=1), torch.ones(BATCH))


def test_value_norm_score():
    _, _, v = qkv(1)
    got = value_norm_score(v)
    want = torch.zeros(BATCH, TOKENS)
    for b in range(BATCH):
        for j in range(TOKENS):
            want[b, j] = sum(1 - v[b, h, j].norm() for h in range(HEADS))
        want[b] /= want[b].norm()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def bonus_reference(score, bonus, grid):
    """Loops over the grid x grid cells of the square token grid: the cell's best token gets
    bonus x its own score added."""
    out = score.clone()
    side = int(score.shape[1] ** 0.5)
    for b in range(score.shape[0]):
        for ci in range(0, side, grid):
            for cj in range(0, side, grid):
                cell = [(ci + di) * side + cj + dj for di in range(grid) for dj in range(grid)]
                best = max(cell, key=lambda t: score[b, t].item())
                out[b, best] += bonus * score[b, best]
    return out


def test_spatial_bonus_by_hand():
    # one 2x2 cell: only the best token (index 1) gets 0.5 x 3 added
    assert torch.equal(spatial_bonus(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), 0.5, 2),
                       torch.tensor([[1.0, 4.5, 2.0, 0.0]]))
    score = torch.rand(3, TOKENS, generator=torch.Generator().manual_seed(2))
    got = spatial_bonus(score, 0.6, 2)
    torch.testing.assert_close(got, bonus_reference(score, 0.6, 2), rtol=0, atol=1e-7)
    assert (got != score).sum(dim=1).tolist() == [4, 4, 4]  # one token per cell, four cells per row
    # a 1x1 "cell" is every token: all of them get the bonus
    torch.testing.assert_close(spatial_bonus(score, 0.5, 1), 1.5 * score)


def test_toca_select_by_hand():
    base = torch.tensor([[0.1, 0.5, 0.3, 0.2], [0.4, 0.3, 0.2, 0.1]])
    stale = torch.tensor([[0, 0, 3, 6], [0, 0, 0, 0]], dtype=torch.int32)
    # row 0: 0.1, 0.5, 0.3 + 0.25, 0.2 + 0.5 -> tokens 3 then 2; row 1: no staleness -> 0 then 1
    idx, new = toca_select(base, stale, 2, interval=3, soft_fresh_weight=0.25, bonus=0.0, grid=2)
    assert idx.tolist() == [[3, 2], [0, 1]]
    assert new.tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]] and new.dtype == torch.int32
    # with the bonus: the 2x2 grid is one cell whose best token (3, after staleness) gets +0.7 x 0.7
    idx, _ = toca_select(base, stale, 1, interval=3, soft_fresh_weight=0.25, bonus=1.0, grid=2)
    assert idx.tolist() == [[3], [0]]


def test_toca_select_against_reference():
    g = torch.Generator().manual_seed(4)
    base = torch.rand(BATCH, TOKENS, generator=g)
    stale = torch.randint(0, 5, (BATCH, TOKENS), generator=g, dtype=torch.int32)
    idx, new = toca_select(base, stale, 5, interval=4, soft_fresh_weight=0.25, bonus=0.6, grid=2)
    score = bonus_reference(base + 0.25 * stale.float() / 4, 0.6, 2)
    assert torch.equal(idx, score.topk(5, dim=1).indices)
    want = stale + 1
    for b in range(BATCH):
        want[b, idx[b]] = 0
    assert torch.equal(new, want)


def test_random_scores_share_one_draw_between_the_cfg_halves():
    assert random_scores in RANDOM_FUNCTIONS  # exporters hoist it out of the graph
    stale = torch.zeros(4, TOKENS, dtype=torch.int32)
    torch.manual_seed(0)
    got = random_scores(stale)
    torch.manual_seed(0)
    half = torch.rand(2, TOKENS)
    assert torch.equal(got, torch.cat([half, half]))
    torch.manual_seed(0)
    odd = random_scores(torch.zeros(3, TOKENS, dtype=torch.int32))
    torch.manual_seed(0)
    assert torch.equal(odd, torch.rand(3, TOKENS))


# --------------------------------------------------------------------------------------------
# RecordTokenScorePass
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("score", [s for s in SCORES if s != "cross-attention"])  # DiT: no cross-attention
def test_record_counts_and_slots(captured, score):
    gm, records = build(captured, [RecordTokenScorePass(range(DEPTH), score)])
    counters = {"staleness_reset": DEPTH}
    if score != "random":
        counters["score_record"] = DEPTH
    if score == "attention":
        counters["explicit_attention"] = DEPTH
    assert records[0].counters == counters and not records[0].declined and records[0].modified
    assert len(calls(gm, explicit_attention)) == (DEPTH if score == "attention" else 0)
    assert len(calls(gm, torch.ops.aten.scaled_dot_product_attention.default)) == (0 if score == "attention" else DEPTH)
    assert len(calls(gm, value_norm_score)) == (DEPTH if score == "kv-norm" else 0)
    slots = gm.meta["graphcache_slots"]
    want = {staleness_slot(b) for b in range(DEPTH)}
    if score != "random":
        want |= {score_slot(b) for b in range(DEPTH)}
    assert set(slots) == want
    nodes = ir.nodes_by_name(captured.graph)
    for name, slot in slots.items():
        shape, dtype = slot.resolve(nodes[slot.like].meta["tensor_meta"])
        assert shape == (BATCH, TOKENS)
        assert dtype == (torch.int32 if "staleness" in name else torch.float32)
    written = sorted(w.args[0].target.removeprefix(CACHE_ATTR + ".") for w in cache_writes(gm))
    assert written == sorted(want)


def attention_inputs(model, x, t, y):
    """q, k, v of every block's attention in the plain model (from the input a pre-hook sees)."""
    seen, hooks = {}, []
    for b, block in enumerate(model.blocks):
        hooks.append(block.attn.register_forward_pre_hook(lambda m, args, b=b: seen.__setitem__(b, args[0].clone())))
    try:
        with torch.no_grad():
            out = model(x, t, y)
    finally:
        for h in hooks:
            h.remove()
    qkvs = {}
    for b, h in seen.items():
        attn = model.blocks[b].attn
        q, k, v = attn.qkv(h).reshape(BATCH, TOKENS, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        qkvs[b] = (q, k, v)
    return out, qkvs


@pytest.mark.parametrize("score", ["attention", "kv-norm"])
def test_record_writes_the_scores(model, captured, score):
    gm, _ = build(captured, [RecordTokenScorePass(range(DEPTH), score)])
    cache = allocate(captured, gm)
    for b in range(DEPTH):
        getattr(cache, staleness_slot(b)).fill_(7)
    x, t, y = inputs(21, t=800)
    plain, qkvs = attention_inputs(model, x, t, y)
    with torch.no_grad():
        out = gm(x, t, y)
    if score == "attention":  # explicit attention instead of SDPA: the same up to rounding
        torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-6)
    else:
        assert torch.equal(out, plain)
    for b, (q, k, v) in qkvs.items():
        if score == "attention":
            attn = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
            want = F.normalize(attn.mean(dim=1).sum(dim=1), dim=1)
        else:
            want = F.normalize((1 - v.norm(dim=-1)).sum(dim=1), dim=1)
        torch.testing.assert_close(getattr(cache, score_slot(b)), want, rtol=1e-4, atol=1e-6)
        assert not torch.equal(getattr(cache, score_slot(0)), getattr(cache, score_slot(1)))
        stale = getattr(cache, staleness_slot(b))
        assert stale.dtype == torch.int32 and not stale.any()  # a full block resets the counters


class AttentionOnlyBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Mixer(dim)

    def forward(self, x):
        return x + self.attn(self.norm(x))


class AttentionOnlyNet(nn.Module):
    def __init__(self, depth=2, dim=32):
        super().__init__()
        self.blocks = nn.ModuleList(AttentionOnlyBlock(dim) for _ in range(depth))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_record_declines_a_block_without_mlp():
    torch.manual_seed(0)
    gm = new_variant(graphcache.capture(AttentionOnlyNet().eval(), _inputs("plain")), CacheState())
    assert [[br.kind for br in b.branches] for b in ir.structure_of(gm).blocks] == [[ir.ATTENTION]] * 2
    record = RecordTokenScorePass([0, 1], "attention")
    result = record(gm)
    assert not result.modified and record.counters == {}
    assert [(d.target, d.reason) for d in record.declined] == [
        ("block 0", "has no MLP branch to score tokens for"), ("block 1", "has no MLP branch to score tokens for")]


def test_record_declines_attention_without_sdpa():
    """Inline softmax attention has no SDPA node to take q, k, v from: the staleness counters are
    still reset (the selector needs them), the score is declined."""
    torch.manual_seed(0)
    gm = new_variant(graphcache.capture(FusedNet(depth=3).eval(), _inputs("fused")), CacheState())
    record = RecordTokenScorePass(range(3), "kv-norm")
    result = record(gm)
    assert result.modified and record.counters == {"staleness_reset": 3}
    assert [d.target for d in record.declined] == ["block 0", "block 1", "block 2"]
    assert all("scaled_dot_product_attention" in d.reason for d in record.declined)
    assert set(gm.meta["graphcache_slots"]) == {staleness_slot(b) for b in range(3)}
    assert not calls(gm, value_norm_score)
    # the random score reads nothing from the attention: nothing to decline
    random = RecordTokenScorePass(range(3), "random")
    random(new_variant(graphcache.capture(FusedNet(depth=3).eval(), _inputs("fused")), CacheState()))
    assert random.counters == {"staleness_reset": 3} and not random.declined


# --------------------------------------------------------------------------------------------
# A partial step: ToCaSelector + ScatterIntoCacheMerger
# --------------------------------------------------------------------------------------------

K = (5, 3)  # fresh tokens of blocks 0 and 1
SELECT = dict(interval=3, soft_fresh_weight=0.25, bonus=0.6)


def partial_passes(score):
    selector = ToCaSelector(score, SELECT["interval"], SELECT["soft_fresh_weight"], SELECT["bonus"])
    return [ReplaceWithCacheReadPass(blocks=range(DEPTH), kinds=(ir.ATTENTION,)),
            InsertTokenSelectPass(range(DEPTH), selector, ScatterIntoCacheMerger()),
            EliminateDeadBranchesPass()]


def test_partial_structure(captured):
    for score in ("attention", "random"):
        gm, records = build(captured, partial_passes(score))
        assert records[1].counters == {"token_select": DEPTH} and not records[1].declined
        assert len(calls(gm, toca_select)) == DEPTH
        assert len(calls(gm, random_scores)) == (DEPTH if score == "random" else 0)
        scatters = calls(gm, CACHE_SCATTER)
        assert [n.args[0].target for n in scatters] == [f"{CACHE_ATTR}.b{b}_mlp" for b in range(DEPTH)]
        writes = calls(gm, CACHE_WRITE)
        assert sorted(w.args[0].target for w in writes) == [f"{CACHE_ATTR}.{staleness_slot(b)}" for b in range(DEPTH)]
        want = {f"b{b}_{k}" for b in range(DEPTH) for k in ("attention", "mlp")} | {
            staleness_slot(b) for b in range(DEPTH)}
        if score != "random":
            want |= {score_slot(b) for b in range(DEPTH)}
        assert set(gm.meta["graphcache_slots"]) == want
        assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == [
            "x", "t", "y", "gc_tokens_b0", "gc_tokens_b1"]


def fill(cache, seed):
    g = torch.Generator().manual_seed(seed)
    for name, buf in cache.named_buffers():
        if buf.dtype == torch.int32:
            buf.copy_(torch.randint(0, 6, buf.shape, generator=g, dtype=torch.int32))
        else:
            buf.copy_(torch.randn(buf.shape, generator=g))
    return {name: buf.clone() for name, buf in cache.named_buffers()}


def partial_by_hand(model, x, t, y, old, score):
    """Attention from the cache, the MLP on the k top-scoring tokens scattered into its cached
    output, as the ToCa definition reads; returns the output and the new cache contents."""
    new = {}
    with torch.no_grad():
        h = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y)
        for b, block in enumerate(model.blocks):
            _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
            h = h + gate_msa.unsqueeze(1) * old[f"b{b}_attention"]
            stale = old[staleness_slot(b)]
            if score == "random":
                half = torch.rand(BATCH // 2, TOKENS)
                base = torch.cat([half, half])
            else:
                base = old[score_slot(b)]
            s = bonus_reference(base + SELECT["soft_fresh_weight"] * stale.float() / SELECT["interval"],
                                SELECT["bonus"], 2)
            idx = s.topk(K[b], dim=1).indices
            rows = torch.arange(BATCH)[:, None]
            fresh = block.mlp(modulate(block.norm2(h[rows, idx]), shift_mlp, scale_mlp))
            merged = old[f"b{b}_mlp"].clone()
            merged[rows, idx] = fresh
            h = h + gate_mlp.unsqueeze(1) * merged
            new[f"b{b}_mlp"] = merged
            new[staleness_slot(b)] = (stale + 1).scatter(1, idx, 0)
        out = model.unpatchify(model.final_layer(h, c), x.shape[2], x.shape[3])
    return out, new


@pytest.mark.parametrize("score", ["attention", "random"])
def test_partial_step_numerics(model, captured, score):
    gm, _ = build(captured, partial_passes(score))
    cache = allocate(captured, gm)
    old = fill(cache, seed=5)
    x, t, y = inputs(22, t=500)
    torch.manual_seed(9)
    with torch.no_grad():
        out = gm(x, t, y, gc_tokens_b0=K[0], gc_tokens_b1=K[1])
    torch.manual_seed(9)
    want, new = partial_by_hand(model, x, t, y, old, score)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    bufs = dict(cache.named_buffers())
    for name, value in new.items():
        torch.testing.assert_close(bufs[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for b in range(DEPTH):
        # exactly K[b] tokens of each row were recomputed; the rest of the MLP slot is untouched
        changed = (bufs[f"b{b}_mlp"] != old[f"b{b}_mlp"]).any(dim=-1).sum(dim=1)
        assert changed.tolist() == [K[b]] * BATCH
        assert (bufs[staleness_slot(b)] == 0).sum(dim=1).tolist() == [K[b]] * BATCH
        assert torch.equal(bufs[f"b{b}_attention"], old[f"b{b}_attention"])  # read only
        if score != "random":
            assert torch.equal(bufs[score_slot(b)], old[score_slot(b)])


def test_full_then_partial_uses_the_recorded_score(model, captured):
    """A full step (cache writes + score record) followed by a partial step: the tokens the
    partial step recomputes are the top-k of the attention score the full step recorded."""
    cache = CacheState()
    full, _ = build(captured, [InsertCacheWritePass(), RecordTokenScorePass(range(DEPTH), "attention"),
                               EliminateDeadBranchesPass()], cache)
    part, _ = build(captured, partial_passes("attention"), cache)
    allocate(captured, full, part)
    x1, t1, y = inputs(23, t=900)
    x2, t2, _ = inputs(24, t=800)
    _, qkvs = attention_inputs(model, x1, t1, y)
    with torch.no_grad():
        full(x1, t1, y)
        before = {name: buf.clone() for name, buf in cache.named_buffers()}
        part(x2, t2, y, gc_tokens_b0=K[0], gc_tokens_b1=K[1])
    for b, (q, k, v) in qkvs.items():
        s1 = F.normalize(torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1).mean(1).sum(1), dim=1)
        idx = bonus_reference(s1, SELECT["bonus"], 2).topk(K[b], dim=1).indices  # staleness 0 after a full step
        changed = (getattr(cache, f"b{b}_mlp") != before[f"b{b}_mlp"]).any(dim=-1)
        assert [set(r.nonzero().flatten().tolist()) for r in changed] == [set(r.tolist()) for r in idx]
