"""ReuseDeadTemporariesPass: elementwise ops computed into an operand nothing else reads."""

import operator
from collections import Counter

import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import graphcache
from graphcache.models.dit import DiT, DiTConfig, init_random_
from graphcache.passes.reuse_temporaries import ReuseDeadTemporariesPass

CFG = DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=3, num_heads=4, num_classes=10)


class _Elementwise(nn.Module):
    """One case per line; `g` is (B, 1, C), every other input (B, N, C)."""

    def forward(self, x, g, y):
        a = x + g * y  # the product dies at the add: add_ into it
        b = (y * 3.0) - x  # the dead operand comes first: sub_ into it
        c = x - (y * 3.0)  # ... second: sub does not commute, left alone
        shared = x * y  # two users: left alone
        d = shared + shared.sin()
        e = (g * 2.0) + g  # the dead operand is (B, 1, C): declined
        return a, b, c, d, e


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(2, 5, 8, generator=gen), torch.randn(2, 1, 8, generator=gen),
            torch.randn(2, 5, 8, generator=gen))


def _by_name(gm):
    return {n.name: n for n in gm.graph.nodes}


def test_rewrites_exactly_the_dead_operands_and_keeps_values():
    gm = torch.fx.symbolic_trace(_Elementwise())
    ShapeProp(gm).propagate(*_inputs())
    want = gm(*_inputs())
    p = ReuseDeadTemporariesPass()
    assert p(gm).modified and p.counters == {"add_": 1, "sub_": 1}
    nodes = _by_name(gm)
    assert (nodes["add"].op, nodes["add"].target, nodes["add"].args) == ("call_method", "add_", (nodes["mul"], nodes["x"]))
    assert (nodes["sub"].target, nodes["sub"].args[0]) == ("sub_", nodes["mul_1"])
    assert nodes["sub_1"].target is operator.sub and nodes["add_1"].target is operator.add
    assert [(d.target, d.reason.split(":")[0]) for d in p.declined] == [
        ("add_2", "its dead operand has a size-1 dimension")]
    got = gm(*_inputs())
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_dit_runners_reuse_four_temporaries_per_block_and_stay_bitwise():
    """Per block: the two modulations (norm·(1 + scale) + shift) and the two gated residual adds;
    plus the final layer's modulation, and with the conditioning in the graph the timestep
    frequencies' division. The eager runner equals the plain model bit for bit."""
    model = init_random_(DiT(CFG), seed=5).eval()
    gen = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([999, 500]), torch.tensor([3, 10])
    for hoist in (False, True):
        cached = graphcache.optimize(model, "none", 4, hoist_conditioning=hoist)
        [runner] = cached.runners.values()
        in_place = Counter(n.target for n in runner.graph.nodes if n.op == "call_method" and n.target.endswith("_"))
        assert in_place == {"add_": 4 * CFG.depth + 1, **({} if hoist else {"div_": 1})}, hoist
    with torch.no_grad():
        assert torch.equal(cached(x, t, y), model(x, t, y))  # (hoisted: unannounced, so step by step)
