"""AnnotateBlocksPass run by itself (graphcache/passes/annotate_blocks.py).

tests/test_capture.py checks the discovered structure of DiT and of many DiT-like models through
`graphcache.capture`; this file runs the pass directly on traced, shape-propagated graphs:
its counters and tags, exactly which nodes a branch's work is, the stream followed through
identity ops, the fields of the Structure, and each of its errors (no shapes, no stream, a stream
that does not reach the output, a stream that is not (batch, tokens, channels)).
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import pytest
import torch
from torch import nn

from graphcache import ir
from graphcache.capture import export_graph, propagate_shapes
from graphcache.errors import GraphcacheError
from graphcache.models.dit import DiT, DiTConfig, init_random_
from graphcache.passes.annotate_blocks import AnnotateBlocksPass

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
from test_capture import B, C, CrossNet, FeedForward, Mixer, PlainNet, _inputs  # noqa: E402

DEPTH = 2


def traced(model, inputs, shapes=True):
    gm, _ = export_graph(model.eval(), inputs)
    if shapes:
        propagate_shapes(gm, inputs)
    return gm


@pytest.fixture(scope="module")
def dit():
    cfg = DiTConfig(input_size=8, patch_size=2, hidden_size=32, depth=DEPTH, num_heads=2, num_classes=10)
    model = init_random_(DiT(cfg), seed=2).eval()
    inputs = (torch.zeros(2, 4, 8, 8), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    gm = traced(model, inputs)
    annotate = AnnotateBlocksPass()
    result = annotate(gm)
    return gm, annotate, result


def test_counters_and_result(dit):
    gm, annotate, result = dit
    assert result.modified and result.gm is gm
    assert annotate.counters == {"block": DEPTH, "branch.attention": DEPTH, "branch.mlp": DEPTH}
    assert not annotate.declined
    s = gm.meta[ir.META_KEY]
    assert isinstance(s, ir.Structure) and ir.structure_of(gm) is s
    assert (s.depth, s.num_tokens, s.hidden_size, s.input_names) == (DEPTH, 16, 32, ["x", "t", "y"])
    assert [br.name for br in s.branches] == ["b0_attention", "b0_mlp", "b1_attention", "b1_mlp"]
    assert [(br.block, br.index) for br in s.branches] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_branch_work_is_exactly_the_branch(dit):
    gm, _, _ = dit
    s = ir.structure_of(gm)
    nodes = ir.nodes_by_name(gm.graph)
    for b in range(DEPTH):
        attn, mlp = s.blocks[b].branches
        layers = lambda br: {ir.layer_path(nodes[n]) for n in br.work}  # noqa: E731
        assert layers(mlp) == {f"blocks.{b}", f"blocks.{b}.norm2", f"blocks.{b}.mlp.fc1", f"blocks.{b}.mlp.act",
                               f"blocks.{b}.mlp.fc2"}
        assert layers(attn) == {f"blocks.{b}", f"blocks.{b}.norm1", f"blocks.{b}.attn", f"blocks.{b}.attn.qkv",
                                f"blocks.{b}.attn.proj"}
        for br in (attn, mlp):
            assert br.work[-1] == br.branch_out
            # work: what depends on the stream and feeds the output, in graph order, nothing else
            order = [n.name for n in gm.graph.nodes]
            assert br.work == sorted(br.work, key=order.index)
            up = {n.name for n in ir.upstream(nodes[br.branch_out])}
            for name in br.work:
                assert name in up and br.stream_in in {n.name for n in ir.upstream(nodes[name])}
            assert not any("adaLN" in str(nodes[n].target) for n in br.work)  # the modulation is outside
            assert br.module == f"blocks.{b}.{'attn' if br is attn else 'mlp'}"


def test_tags(dit):
    gm, _, _ = dit
    s = ir.structure_of(gm)
    roles = Counter(t["role"] for n in gm.graph.nodes for t in n.meta.get(ir.META_KEY, []))
    assert roles == {
        "work": sum(len(br.work) for br in s.branches),
        "stream_in": 2 * DEPTH, "branch_out": 2 * DEPTH, "residual_add": 2 * DEPTH, "gate": 2 * DEPTH,
    }
    nodes = ir.nodes_by_name(gm.graph)
    for br in s.branches:
        assert nodes[br.gate].meta[ir.META_KEY] == [
            {"role": "gate", "block": br.block, "branch": br.name, "kind": br.kind}]


def test_cross_attention_counters():
    torch.manual_seed(0)
    gm = traced(CrossNet(depth=2), _inputs("cross"))
    annotate = AnnotateBlocksPass()
    annotate(gm)
    assert annotate.counters == {"block": 2, "branch.attention": 2, "branch.cross_attention": 2, "branch.mlp": 2}
    assert ir.structure_of(gm).input_names == ["x", "c", "context"]


def test_plain_residuals_have_no_gate():
    torch.manual_seed(0)
    gm = traced(PlainNet(depth=3), _inputs("plain"))
    annotate = AnnotateBlocksPass()
    annotate(gm)
    s = ir.structure_of(gm)
    assert annotate.counters == {"block": 3, "branch.attention": 3, "branch.mlp": 3}
    assert all(br.gate is None for br in s.branches)
    assert not any(t["role"] == "gate" for n in gm.graph.nodes for t in n.meta.get(ir.META_KEY, []))


class PassThroughNet(nn.Module):
    """Between blocks the stream goes through nn.Identity, .contiguous() and .clone()."""

    def __init__(self, depth=4):
        super().__init__()
        self.attn = nn.ModuleList(Mixer(C) for _ in range(depth))
        self.ff = nn.ModuleList(FeedForward(C) for _ in range(depth))
        self.keep = nn.Identity()

    def forward(self, x):
        for i, (attn, ff) in enumerate(zip(self.attn, self.ff)):
            x = x + attn(x)
            x = x + ff(x)
            x = (self.keep(x), x.contiguous(), x.clone())[i % 3]
        return x


def test_stream_followed_through_identity_ops():
    torch.manual_seed(0)
    gm = traced(PassThroughNet(depth=4), _inputs("plain"))
    AnnotateBlocksPass()(gm)
    s = ir.structure_of(gm)
    nodes = ir.nodes_by_name(gm.graph)
    assert s.depth == 4 and [[br.kind for br in b.branches] for b in s.blocks] == [[ir.ATTENTION, ir.MLP]] * 4
    # export drops nn.Identity and .contiguous() of a contiguous tensor; the clone stays in the
    # graph, and the stream is followed through it
    assert [s.blocks[b].stream_in for b in (1, 2)] == [s.blocks[0].stream_out, s.blocks[1].stream_out]
    clone = nodes[s.blocks[3].stream_in]
    assert clone.target is torch.ops.aten.clone.default and clone.args[0].name == s.blocks[2].stream_out


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_requires_shapes():
    gm = traced(PlainNet(depth=1), _inputs("plain"), shapes=False)
    with pytest.raises(GraphcacheError, match="needs shapes: run shape propagation first"):
        AnnotateBlocksPass()(gm)
    assert ir.META_KEY not in gm.meta


class TokenwiseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(C, C), nn.Linear(C, C)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_no_residual_stream_names_where_it_stopped():
    gm = traced(TokenwiseNet(), _inputs("plain"))
    with pytest.raises(GraphcacheError) as info:
        AnnotateBlocksPass()(gm)
    msg = str(info.value)
    assert msg.startswith("no residual stream found")
    # walking back from the output along the largest input: b, relu, a, then the input x
    assert "stopped at node 'x' (placeholder x)" in msg


class DeadStreamNet(PlainNet):
    """The residual blocks run, but the output is computed from the input alone."""

    def forward(self, x):
        h = x
        for b in self.blocks:
            h = b(h)
        return self.norm(x)


def test_stream_must_reach_the_output():
    """A residual stream the output does not read is dead code: capture drops it, none is found."""
    torch.manual_seed(0)
    gm = traced(DeadStreamNet(depth=2), _inputs("plain"))
    assert not [n for n in gm.graph.nodes if ir.is_add(n)]
    with pytest.raises(GraphcacheError, match="no residual stream found"):
        AnnotateBlocksPass()(gm)


class ConvResNet(nn.Module):
    """A residual stream of shape (batch, channels, height, width)."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(2))

    def forward(self, x):
        for conv in self.convs:
            x = x + conv(x)
        return x


def test_stream_must_be_batch_tokens_channels():
    gm = traced(ConvResNet(), (torch.randn(B, 4, 6, 6),))
    expected = r"has shape \(2, 4, 6, 6\); graphcache expects \(batch, tokens, channels\)"
    with pytest.raises(GraphcacheError, match=expected):
        AnnotateBlocksPass()(gm)
