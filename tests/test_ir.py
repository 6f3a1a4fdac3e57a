"""graphcache.ir's dead-code elimination: what no output needs goes, in-place writes into
tensors the graph allocates included once nothing reads those tensors; mutations of anything
else stay."""

from __future__ import annotations

import torch
import torch.fx as fx

from graphcache import ir

aten = torch.ops.aten


def rotary_like(read_scratch: bool = False, use_write: bool = False) -> fx.Graph:
    """x -> out = x + 1, beside Wan's rotary pattern: an `empty_like` whose even and odd channels
    are filled with `copy_` from work on x; `read_scratch` returns the scratch tensor too,
    `use_write` returns the first `copy_`'s result."""
    g = fx.Graph()
    x = g.placeholder("x")
    scratch = g.call_function(aten.empty_like.default, (x,))
    writes = []
    for start, factor in ((0, 2.0), (1, 3.0)):
        work = g.call_function(aten.mul.Tensor, (g.call_function(aten.slice.Tensor, (x, -1, start, None, 2)), factor))
        view = g.call_function(aten.slice.Tensor, (scratch, -1, start, None, 2))
        writes.append(g.call_function(aten.copy_.default, (view, work)))
    out = g.call_function(aten.add.Tensor, (x, 1.0))
    g.output((out, scratch) if read_scratch else (out, writes[0]) if use_write else out)
    return g


def targets(g: fx.Graph) -> list:
    return [n.target for n in g.nodes if n.op == "call_function"]


def test_unread_scratch_and_the_work_written_into_it_go():
    g = rotary_like()
    assert ir.eliminate_dead_code(g)
    assert targets(g) == [aten.add.Tensor]
    x = torch.randn(2, 4)
    assert torch.equal(fx.GraphModule(torch.nn.Module(), g)(x), x + 1)


def test_a_read_scratch_stays():
    for kwargs in ({"read_scratch": True}, {"use_write": True}):
        g = rotary_like(**kwargs)
        before = targets(g)
        assert not ir.eliminate_dead_code(g)
        assert targets(g) == before
        out, scratch = fx.GraphModule(torch.nn.Module(), g)(torch.arange(4.0))
        assert torch.equal(scratch, torch.tensor([0.0, 3.0, 4.0, 9.0]) if kwargs.get("read_scratch")
                           else torch.tensor([0.0, 4.0]))


def test_a_write_into_an_input_stays():
    g = fx.Graph()
    x, buffer = g.placeholder("x"), g.placeholder("buffer")
    g.call_function(aten.copy_.default, (buffer, g.call_function(aten.mul.Tensor, (x, 2.0))))
    g.output(x)
    assert not ir.eliminate_dead_code(g)
    assert targets(g) == [aten.mul.Tensor, aten.copy_.default]
