"""TransposeFewTokenLinearsPass: the selected tokens' linears computed as W·xᵀ."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphcache
from graphcache import ir
from graphcache.models.dit import DiT, DiTConfig, init_random_
from graphcache.ops import gather_tokens
from graphcache.capture import export_graph
from graphcache.passes.few_token_linears import TransposeFewTokenLinearsPass, linear_token_columns
from graph_queries import layer_calls

CFG = DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=3, num_heads=4, num_classes=10)


@pytest.mark.parametrize("tokens", [0, 1, 7])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_is_linear_in_the_transposed_layout(tokens, bias):
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(2, tokens, 24, generator=gen)
    fc1, fc2 = torch.randn(40, 24, generator=gen), torch.randn(24, 40, generator=gen)
    b1, b2 = (torch.randn(40, generator=gen), torch.randn(24, generator=gen)) if bias else (None, None)
    hidden = linear_token_columns(x, fc1, b1)
    torch.testing.assert_close(hidden, F.linear(x, fc1, b1))
    # an (out, rows) product seen as (B, k, out): the rows are its columns, so no copy was made
    assert hidden.shape == (2, tokens, 40) and hidden.reshape(-1, 40).t().is_contiguous()
    # ... and the next linear reads the GELU of that layout as a contiguous xᵀ
    out = linear_token_columns(F.gelu(hidden), fc2, b2)
    torch.testing.assert_close(out, F.linear(F.gelu(F.linear(x, fc1, b1)), fc2, b2))


def test_kernel_is_f_linear_for_other_dtypes():
    x, w, b = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    got = linear_token_columns(x, w, b)
    assert torch.equal(got, F.linear(x, w, b)) and got.is_contiguous()


class _Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.full = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        few = self.fc2(F.gelu(self.fc1(x)))  # marked below: rewritten
        by_function = F.linear(few, self.w)  # marked: rewritten
        by_keywords = F.linear(few, self.w)  # marked, given keyword arguments below: declined
        return self.full(x) + by_function + by_keywords  # not marked: left alone


def test_rewrites_exactly_the_marked_linears():
    x = torch.randn(2, 5, 8)
    gm, _ = export_graph(_Branches(), (x,))
    want = gm(x)
    fc1, fc2, by_function, by_keywords, full = [n for n in gm.graph.nodes if ir.is_linear(n)]
    by_keywords.args, by_keywords.kwargs = by_keywords.args[:1], {"weight": by_keywords.args[1]}
    for node in (fc1, fc2, by_function, by_keywords):
        node.meta[ir.ON_SELECTED_TOKENS] = True
    p = TransposeFewTokenLinearsPass()
    assert p(gm).modified and p.counters == {"linear": 3}
    assert [n.target for n in (fc1, fc2, by_function)] == [linear_token_columns] * 3
    assert [a.target for a in fc1.args[1:]] == ["fc1.weight", "fc1.bias"]
    assert full.target is by_keywords.target is torch.ops.aten.linear.default
    assert [(d.target, d.reason) for d in p.declined] == [
        (by_keywords.name, "a linear with keyword arguments ['weight']")]
    torch.testing.assert_close(gm(x), want)


@pytest.mark.parametrize("method", ["toca", "duca", "clusca"])
def test_token_select_marks_the_branch_it_moves_onto_the_gathered_tokens(method):
    """InsertTokenSelectPass marks exactly the work it clones after each gather: in every variant,
    a block's MLP runs on selected tokens (norm, modulation, fc1, GELU, fc2) or on all of them,
    and only the former are marked."""
    model = init_random_(DiT(CFG), seed=5).eval()
    cached = graphcache.optimize(model, method, 10)
    seen = 0
    for plan in cached.schedule.steps:
        gm = cached.variants[plan.variant]
        gathers = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is gather_tokens
                   and n.args[0].name.startswith("add")]
        marked = [n for n in gm.graph.nodes if n.meta.get(ir.ON_SELECTED_TOKENS)]
        linears = Counter(ir.layer_path(n).rsplit(".", 1)[-1] for n in marked if n in layer_calls(gm))
        blocks = plan.kinds.count("partial")
        assert linears == ({"norm2": blocks, "fc1": blocks, "act": blocks, "fc2": blocks} if blocks else {})
        reachable = set()
        for gather in gathers:
            stack = [gather]
            while stack:
                for user in stack.pop().users:
                    if user.meta.get(ir.ON_SELECTED_TOKENS) and user not in reachable:
                        reachable.add(user)
                        stack.append(user)
        assert set(marked) == reachable
        seen += blocks
    assert seen > 0
