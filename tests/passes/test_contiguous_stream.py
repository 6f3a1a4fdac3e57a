"""MakeStreamContiguousPass: DiT's transposed patch-embedding stream becomes row-major once."""

import torch
from torch import nn

import graphcache
from graphcache import ir
from graphcache.cache import CacheState
from graphcache.capture import capture
from graphcache.models.dit import DiT, DiTConfig, init_random_
from graphcache.passes.contiguous_stream import MakeStreamContiguousPass
from graphcache.runtime import new_variant

CFG = DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=3, num_heads=4, num_classes=10)


def _dit():
    return init_random_(DiT(CFG), seed=5).eval()


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 500]), torch.tensor([3, 10])


def _stream_start(gm):
    return ir.nodes_by_name(gm.graph)[ir.structure_of(gm).stream_start]


def test_dit_stream_is_transposed_and_made_row_major_once():
    gm = new_variant(capture(_dit()), CacheState())
    start = _stream_start(gm)
    assert start.meta["tensor_meta"].stride == (16 * 64, 1, 16)  # flatten(2).transpose(1, 2) of the patches
    users = set(start.users)  # block 0's norm and residual add (and what else reads the stream)
    assert len(users) >= 2
    p = MakeStreamContiguousPass()
    assert p(gm).modified and p.counters == {"contiguous": 1} and not p.declined
    [copy] = start.users  # every former user now reads the copy
    assert copy.op == "call_method" and copy.target == "contiguous" and set(copy.users) == users


def test_every_variant_ends_with_it_and_outputs_are_bitwise_the_plain_model():
    model = _dit()
    x, t, y = _inputs()
    with torch.no_grad():
        want = model(x, t, y)
        # (not ToCa/DuCa: their full steps compute attention explicitly, as the official code does)
        for method in ("none", "fora", "taylorseer", "clusca"):
            cached = graphcache.optimize(model, method, 4)
            for records in cached.records.values():  # the last rewrite of the stream: only hoisting follows
                assert [r.name for r in records[-2:]] == ["MakeStreamContiguousPass", "HoistConditioningPass"]
                assert records[-2].counters == {"contiguous": 1}
            assert torch.equal(cached(x, t, y), want), method  # step 0 is a full step in every method


class _RowMajorNet(nn.Module):
    """A pre-norm transformer fed a (B, N, C) tensor: its stream is row-major from the start."""

    def __init__(self, dim=32, depth=2):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2 * depth))
        self.attn = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
                                 for _ in range(depth))

    def forward(self, x):
        for i, (attn, mlp) in enumerate(zip(self.attn, self.mlp)):
            h = self.norms[2 * i](x)
            q = h @ h.transpose(1, 2)
            x = x + attn(torch.softmax(q, dim=-1) @ h)
            x = x + mlp(self.norms[2 * i + 1](x))
        return x


def test_declines_a_row_major_stream():
    gm = new_variant(capture(_RowMajorNet(), (torch.randn(2, 16, 32),)), CacheState())
    p = MakeStreamContiguousPass()
    assert not p(gm).modified and p.counters == {}
    assert [(d.target, d.reason) for d in p.declined] == [(_stream_start(gm).name, "the stream is already row-major")]
