"""InsertTokenSelectPass and token_locality_problem (graphcache/passes/token_select.py).

The pass is tested with a selector and a merger written here (fixed per-row token picks, merged
into zeros), so that what is checked is the pass itself: structural — exact counters, one gather
per branch, the branch work cloned once onto the gathered tokens (and tagged so), the full-width
work gone after dead-code elimination, the token-count inputs; numerical — the plain model with
each selected MLP's output kept on the picked tokens only (forward hooks); negative — MLPs that
mix tokens, change the token axis or read a per-token tensor are declined naming the node, and
the graph is left as it was.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphcache
from graphcache import ir
from graphcache.cache import CacheState
from graphcache.capture import call_arguments, capture_call
from graphcache.models.dit import DiT, DiTConfig, init_random_
from graphcache.ops import gather_tokens, scatter_tokens
from graphcache.passes.cache_passes import EliminateDeadBranchesPass
from graphcache.passes.token_select import (
    InsertTokenSelectPass,
    SelectContext,
    TokenMerger,
    TokenSelector,
    _selected_work,
    token_locality_problem,
)
from graphcache.runtime import new_variant

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (HERE, os.path.dirname(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)
from graph_queries import layer_calls  # noqa: E402
from test_cache_passes import build, inputs  # noqa: E402
from test_capture import FeedForward, Mixer  # noqa: E402

DEPTH, BATCH, TOKENS = 2, 2, 16


def spread_tokens(stream, k):
    """Row b takes tokens (b + 3j) mod N, j < k: distinct, and different in every row."""
    b, n = stream.shape[0], stream.shape[1]
    j = torch.arange(k)
    return (torch.arange(b)[:, None] + 3 * j[None, :]) % n


def merge_into_zeros(stream, idx, fresh):
    return scatter_tokens(torch.zeros_like(stream), idx, fresh)


class SpreadSelector(TokenSelector):
    def indices(self, ctx: SelectContext):
        return ctx.gm.graph.call_function(spread_tokens, (ctx.stream_in, ctx.tokens()))


class ZeroMerger(TokenMerger):
    """The branch output becomes zero except on the picked tokens (no cache involved)."""

    def merge(self, ctx: SelectContext, idx, fresh):
        return ctx.gm.graph.call_function(merge_into_zeros, (ctx.stream_in, idx, fresh))


def select_pass(blocks, kind=ir.MLP):
    return InsertTokenSelectPass(blocks, SpreadSelector(), ZeroMerger(), kind=kind)


@pytest.fixture(scope="module")
def model():
    cfg = DiTConfig(input_size=8, patch_size=2, hidden_size=32, depth=DEPTH, num_heads=2, num_classes=10)
    return init_random_(DiT(cfg), seed=11).eval()


@pytest.fixture(scope="module")
def captured(model):
    return graphcache.capture(model)


def calls(gm, fn):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is fn]


def on_selected(gm):
    return [n for n in gm.graph.nodes if n.meta.get(ir.ON_SELECTED_TOKENS)]


def target_of(node):
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


# --------------------------------------------------------------------------------------------
# Structure
# --------------------------------------------------------------------------------------------


def test_counts_and_clones(captured):
    s = ir.structure_of(captured)
    gm, records = build(captured, [select_pass(range(DEPTH))])
    assert records[0].counters == {"token_select": DEPTH} and records[0].modified and not records[0].declined
    nodes = ir.nodes_by_name(gm.graph)
    gathers = calls(gm, gather_tokens)
    assert [g.args[0].name for g in gathers] == [s.branch(b, ir.MLP).stream_in for b in range(DEPTH)]
    assert [g.args[1].target for g in gathers] == [spread_tokens] * DEPTH
    # each block's MLP work is cloned exactly once, onto the gathered tokens, and tagged
    work = [nodes[n] for b in range(DEPTH) for n in s.branch(b, ir.MLP).work]
    clones = on_selected(gm)
    assert len(clones) == len(work)
    assert Counter(map(target_of, clones)) == Counter(map(target_of, work))
    assert not any(n.meta.get(ir.ON_SELECTED_TOKENS) for n in work)
    # the merged value replaces the branch output: the original output is read by nothing now
    for b in range(DEPTH):
        br = s.branch(b, ir.MLP)
        assert not nodes[br.branch_out].users
        mul = next(a for a in nodes[br.residual_add].args if a is not nodes[br.stream_in])
        assert any(a.op == "call_function" and a.target is merge_into_zeros for a in mul.args)
    assert [(n.target, n.type) for n in gm.graph.nodes if n.op == "placeholder"] == [
        ("x", None), ("t", None), ("y", None), ("gc_tokens_b0", int), ("gc_tokens_b1", int)]


def test_full_width_work_is_dead(captured):
    s = ir.structure_of(captured)
    gm, records = build(captured, [select_pass([1]), EliminateDeadBranchesPass()])
    assert records[0].counters == {"token_select": 1}
    names = {n.name for n in gm.graph.nodes}
    assert not names & set(s.branch(1, ir.MLP).work)  # the full-width MLP of block 1 is gone ...
    assert set(s.branch(0, ir.MLP).work) <= names  # ... block 0's stays
    assert len(layer_calls(gm, "blocks.1.mlp.fc1")) == 1  # once: the clone on the selected tokens
    assert all(n.meta.get(ir.ON_SELECTED_TOKENS) for n in layer_calls(gm, "blocks.1.mlp."))
    assert not any(n.meta.get(ir.ON_SELECTED_TOKENS) for n in layer_calls(gm, "blocks.0.mlp."))
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x", "t", "y", "gc_tokens_b1"]


def test_locality_of_dit_branches(captured):
    """The MLP is token-local; the attention is in its queries: what only its keys and values
    need stays on all tokens, everything else is computed on the selected ones."""
    s = ir.structure_of(captured)
    gm = new_variant(captured, CacheState())
    nodes = ir.nodes_by_name(gm.graph)
    for b in range(DEPTH):
        assert token_locality_problem(gm, s.branch(b, ir.MLP)) is None
        attention = s.branch(b, ir.ATTENTION)
        assert token_locality_problem(gm, attention) is None
        selected, queries = _selected_work(attention, nodes)
        sdpa = next(nodes[n] for n in attention.work if ir.is_sdpa(nodes[n]))
        q, k, v = sdpa.args[:3]
        assert sdpa.name in selected and q.name in queries and not {k.name, v.name} & set(selected)
        only_keys_values = {n.name for n in ir.upstream([k, v]) - ir.upstream(q)}
        assert set(attention.work) - set(selected) == only_keys_values & set(attention.work)


# --------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------


def masked_mlp_reference(model, x, t, y, ks):
    """The plain model with blocks[b].mlp's output zeroed except on the picked tokens."""
    hooks = []
    for b, k in ks.items():
        def keep(m, args, out, k=k):
            idx = spread_tokens(out, k)
            rows = torch.arange(out.shape[0])[:, None]
            kept = torch.zeros_like(out)
            kept[rows, idx] = out[rows, idx]
            return kept
        hooks.append(model.blocks[b].mlp.register_forward_hook(keep))
    try:
        with torch.no_grad():
            return model(x, t, y)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("ks", [{0: 4, 1: 7}, {1: 1}, {0: TOKENS}])
def test_selected_tokens_numerics(model, captured, ks):
    gm, _ = build(captured, [select_pass(sorted(ks)), EliminateDeadBranchesPass()])
    x, t, y = inputs(31, t=450)
    with torch.no_grad():
        out = gm(x, t, y, **{f"gc_tokens_b{b}": k for b, k in ks.items()})
        plain = model(x, t, y)
    want = masked_mlp_reference(model, x, t, y, ks)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    if ks == {0: TOKENS}:  # every token picked: the model itself
        torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)
    else:
        assert not torch.allclose(out, plain, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Declines
# --------------------------------------------------------------------------------------------

C = 32


class CumsumMLP(nn.Module):
    """Mixes tokens: a running sum along the token axis."""

    def __init__(self, dim):
        super().__init__()
        self.w_in, self.w_out = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return self.w_out(torch.cumsum(F.silu(self.w_in(x)), dim=1))


class CenteredMLP(nn.Module):
    """Subtracts the token mean first: the mean has one token."""

    def __init__(self, dim):
        super().__init__()
        self.w_in, self.w_out = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return self.w_out(F.silu(self.w_in(x - x.mean(dim=1, keepdim=True))))


class PositionalMLP(nn.Module):
    """Adds a per-token parameter: token-wise, but not the same for every token."""

    def __init__(self, dim, tokens):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, tokens, dim))
        self.w_in, self.w_out = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return self.w_out(F.silu(self.w_in(x + self.pos)))


class Block(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.attn, self.mlp = Mixer(C), mlp

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class MixedNet(nn.Module):
    """Block 0's MLP is token-local; blocks 1-3 each break locality in another way."""

    def __init__(self, tokens=8):
        super().__init__()
        self.blocks = nn.ModuleList([Block(FeedForward(C)), Block(CumsumMLP(C)), Block(CenteredMLP(C)),
                                     Block(PositionalMLP(C, tokens))])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


@pytest.fixture(scope="module")
def mixed():
    torch.manual_seed(0)
    model = MixedNet().eval()
    x = torch.randn(BATCH, 8, C, generator=torch.Generator().manual_seed(1))
    return model, x, graphcache.capture(model, (x,))


def test_declines_branches_that_are_not_token_local(mixed):
    model, x, captured = mixed
    s = ir.structure_of(captured)
    assert [[br.kind for br in b.branches] for b in s.blocks] == [[ir.ATTENTION, ir.MLP]] * 4
    gm = new_variant(captured, CacheState())
    select = select_pass(range(4))
    result = select(gm)
    assert result.modified and select.counters == {"token_select": 1}
    assert [d.target for d in select.declined] == ["b1_mlp", "b2_mlp", "b3_mlp"]
    nodes = ir.nodes_by_name(gm.graph)
    cumsum, centered, positional = (d.reason for d in select.declined)
    assert cumsum.startswith("node ") and "(cumsum) may mix tokens" in cumsum
    assert nodes[cumsum.split()[1]].target is torch.ops.aten.cumsum.default
    assert "changes the token axis (shape (2, 1, 32))" in centered
    assert nodes[centered.split()[1]].target is torch.ops.aten.mean.dim
    assert "which varies over tokens" in positional and "(1, 8, 32)" in positional
    read = positional.split()[3]
    assert nodes[read].op == "get_attr" and nodes[read].target == "blocks.3.mlp.pos"
    # each reason is token_locality_problem's own, for the same branch
    for d in select.declined:
        assert token_locality_problem(captured, next(br for br in s.branches if br.name == d.target)) == d.reason
    assert len(calls(gm, gather_tokens)) == 1 and [n.target for n in gm.graph.nodes if n.op == "placeholder"] == [
        "x", "gc_tokens_b0"]
    # and the selected block still computes what it should
    gm.recompile()
    with torch.no_grad():
        out = gm(x, gc_tokens_b0=3)
        want = masked_mixed_reference(model, x, 3)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def masked_mixed_reference(model, x, k):
    def keep(m, args, out):
        idx = spread_tokens(out, k)
        rows = torch.arange(out.shape[0])[:, None]
        kept = torch.zeros_like(out)
        kept[rows, idx] = out[rows, idx]
        return kept

    hook = model.blocks[0].mlp.register_forward_hook(keep)
    try:
        return model(x)
    finally:
        hook.remove()


def test_declined_only_leaves_the_graph_alone(mixed):
    _, _, captured = mixed
    gm = new_variant(captured, CacheState())
    before = str(gm.graph)
    select = select_pass([1, 2, 3])
    result = select(gm)
    assert not result.modified and select.counters["token_select"] == 0 and len(select.declined) == 3
    assert str(gm.graph) == before


def test_declines_a_missing_branch_kind(captured):
    gm = new_variant(captured, CacheState())
    select = select_pass([0, 1], kind=ir.CROSS_ATTENTION)
    result = select(gm)
    assert not result.modified
    assert [(d.target, d.reason) for d in select.declined] == [
        ("block 0", "has no cross_attention branch"), ("block 1", "has no cross_attention branch")]


# --------------------------------------------------------------------------------------------
# Two streams: diffusers' FLUX (double-stream blocks' image and text MLPs, single-stream blocks'
# attention-and-MLP branch on selected queries)
# --------------------------------------------------------------------------------------------


def merge_into_full(full, idx, fresh):
    return scatter_tokens(full, idx, fresh)


class FullMerger(TokenMerger):
    """The full branch output with the fresh rows written over it: the same tensor only if what
    the branch computed on the selected tokens is what it computes on them among all tokens."""

    def merge(self, ctx: SelectContext, idx, fresh):
        return ctx.gm.graph.call_function(merge_into_full, (ctx.branch_out, idx, fresh))


def test_attention_on_selected_queries_is_exact(model, captured):
    """DiT's self-attention (one fused qkv projection) on selected queries: the projection runs on
    all tokens for the keys and values and on the selected ones for the queries, and the rows it
    computes are the full attention's."""
    gm = new_variant(captured, CacheState())
    select = InsertTokenSelectPass(range(DEPTH), SpreadSelector(), FullMerger(), kind=ir.ATTENTION)
    select(gm)
    assert select.counters == {"token_select": DEPTH} and not select.declined
    assert len(layer_calls(gm, "blocks.0.attn.qkv")) == 2  # all tokens (keys, values) and the selected
    gm.recompile()
    x, t, y = inputs(4)
    with torch.no_grad():
        torch.testing.assert_close(gm(x, t, y, gc_tokens_b0_attention=5, gc_tokens_b1_attention=3), model(x, t, y), rtol=1e-5, atol=1e-6)


def test_selection_on_two_streams_is_exact_and_stays_in_its_stream():
    import diffusers_models as dm

    model, kwargs = dm.flux_transformer(), dm.flux_inputs()
    captured, spec = capture_call(model, (), kwargs)
    s = ir.structure_of(captured)
    gm = new_variant(captured, CacheState())
    mlp, parallel = (InsertTokenSelectPass(range(s.depth), SpreadSelector(), FullMerger(), kind=kind)
                     for kind in (ir.MLP, ir.PARALLEL))
    mlp(gm)
    parallel(gm)
    assert mlp.counters == {"token_select": 4, "token_select.text": 2}
    assert parallel.counters == {"token_select": 2, "token_select.joint": 2}
    # each gather reads the stream of the branch it selects for: 2 image, 2 text, 2 joint streams
    selected = [br for br in s.branches if br.kind in (ir.MLP, ir.PARALLEL)]
    sources = [g.args[0].name for g in calls(gm, gather_tokens)]
    assert sorted(sources) == sorted(br.stream_in for br in selected)
    tokens = {st.name: st.num_tokens for st in s.streams}
    nodes = ir.nodes_by_name(gm.graph)
    assert Counter(ir.tensor_shape(nodes[n])[1] for n in sources) == {tokens[ir.IMAGE]: 2, tokens[ir.TEXT]: 2,
                                                                      tokens[ir.JOINT]: 2}
    # the single blocks' attention runs its selected queries against keys and values of all tokens
    attention = [n for n in on_selected(gm) if ir.is_sdpa(n)]
    assert len(attention) == 2 and not any(a.meta.get(ir.ON_SELECTED_TOKENS) for n in attention
                                           for a in n.args[1:3])
    gm.recompile()
    counts = {n.target: 3 if n.target.endswith("_parallel") else 2 for n in gm.graph.nodes
              if n.op == "placeholder" and n.target.startswith("gc_tokens_")}
    assert len(counts) == 6
    with torch.no_grad():
        out = gm(*spec.flatten(call_arguments(model, (), kwargs)), **counts)
        torch.testing.assert_close(out, model(**kwargs, return_dict=False)[0], rtol=1e-5, atol=1e-6)
