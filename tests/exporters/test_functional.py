"""Running functional variants (graphcache/exporters/functional.py).

ScalarTensors and step_tensor: the dtype, shape and identity of the tensors per-step inputs
become. FunctionalRunner on a signature written here (three small traced graphs whose results
are computed by hand): what each graph receives, in which order, the cache carried between calls
by swapping buffers (the very tensors the graphs return, no copies), and the output. Then on a
ToCa partial variant of the tiny builtin DiT made by `functionalize` (random draws in the
prologue, token counts as shapes): one call gives the eager variant's output and cache contents
bit for bit, from the same cache and RNG state. tests/passes/test_functionalize.py runs whole
samplings of every method this way.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import graphcache
from graphcache.cache import CacheState
from graphcache.exporters.functional import FunctionalRunner, ScalarTensors, step_tensor
from graphcache.models.builtin import resolve_model
from graphcache.passes.functionalize import Signature, functionalize
from graphcache.runtime import extra_inputs
from graphcache.schedule import step_inputs

CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------
# ScalarTensors, step_tensor
# --------------------------------------------------------------------------------------------


def test_scalar_tensors_dtypes_and_values():
    scalars = ScalarTensors()
    i, f = scalars("step", 7, CPU), scalars("coef", 0.1, CPU)
    assert (i.shape, i.dtype, i.item()) == ((), torch.int64, 7)
    assert (f.shape, f.dtype) == ((), torch.float32)
    assert f.item() == torch.tensor(0.1, dtype=torch.float32).item()  # rounded to float32 once
    x = torch.randn(5)
    assert torch.equal(x * f, x * 0.1)  # computes as the Python scalar does


def test_scalar_tensors_are_made_once_per_name_and_value():
    scalars = ScalarTensors()
    a = scalars("a", 3, CPU)
    assert scalars("a", 3, CPU) is a  # cached
    assert scalars("b", 3, CPU) is not a  # another input: never the same object
    assert scalars("a", 4, CPU) is not a and scalars("a", 4, CPU).item() == 4
    as_float = scalars("a", 3.0, CPU)  # 3 == 3.0, but another type: another tensor and dtype
    assert as_float is not a and as_float.dtype == torch.float32 and a.dtype == torch.int64
    assert len(scalars._made) == 4


def test_step_tensor():
    scalars = ScalarTensors()
    k = step_tensor("gc_tokens_b2", 5, CPU, scalars)
    assert k.shape == (5,) and k.device == CPU  # a token count is read as the size
    assert step_tensor("gc_tokens_b0", 0, CPU, scalars).shape == (0,)
    assert not scalars._made  # token counts are not cached scalars
    s = step_tensor("gc_delta", 2.5, CPU, scalars)
    assert s.shape == () and s.item() == 2.5 and s is scalars("gc_delta", 2.5, CPU)
    # not a token count, whatever its prefix
    assert step_tensor("gc_tokens_bx", 3, CPU, scalars).shape == ()


# --------------------------------------------------------------------------------------------
# FunctionalRunner on a hand-made signature
# --------------------------------------------------------------------------------------------


def prologue_fn(cache__acc):
    return (torch.rand_like(cache__acc),)


def main_fn(x, y, gc_tokens_b0, scale, cache__acc, random__0):
    k = gc_tokens_b0.shape[0]
    out = x * scale + cache__acc * y
    new_acc = cache__acc + random__0 * k
    return (out, new_acc, out.sum())


def epilogue_fn(host__0, cache__count):
    return (cache__count + host__0,)


SIG = dict(
    inputs=["x", "y", "gc_tokens_b0", "scale", "cache__acc", "random__0"],
    outputs=["out", "new_cache__acc", "host__0"],
    prologue_inputs=["cache__acc"], prologue_outputs=["random__0"],
    epilogue_inputs=["host__0", "cache__count"], epilogue_outputs=["new_cache__count"],
)


def hand_made():
    sig = Signature(prologue=fx.symbolic_trace(prologue_fn), epilogue=fx.symbolic_trace(epilogue_fn), **SIG)
    cache = CacheState()
    cache.allocate({"acc": ((2, 3), torch.float32), "count": ((), torch.float32)}, CPU, signature=None)
    cache.acc.copy_(torch.arange(6.0).reshape(2, 3))
    return sig, cache


class Recording:
    def __init__(self, fn):
        self.fn, self.args, self.results = fn, [], []

    def __call__(self, *args):
        self.args.append(args)
        self.results.append(self.fn(*args))
        return self.results[-1]


def test_runner_resolves_cache_names():
    sig, cache = hand_made()
    runner = FunctionalRunner(sig, main_fn, cache, ["x", "y"])
    # the slot only the epilogue reads is an input too; the order: main's, prologue's, epilogue's
    assert runner.cache_inputs == [("cache__acc", "acc"), ("cache__count", "count")]
    assert runner.cache_outputs == [("new_cache__acc", "acc"), ("new_cache__count", "count")]
    assert runner.prologue is sig.prologue and runner.epilogue is sig.epilogue
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    env = runner.values((x, y), {"gc_tokens_b0": 4, "scale": 0.5})
    assert set(env) == {"x", "y", "gc_tokens_b0", "scale", "cache__acc", "cache__count"}
    assert env["x"] is x and env["cache__acc"] is cache.acc and env["cache__count"] is cache.count
    assert env["gc_tokens_b0"].shape == (4,) and env["scale"].dtype == torch.float32


def test_runner_calls_the_three_graphs_and_swaps_the_cache():
    sig, cache = hand_made()
    main = Recording(main_fn)
    epilogue = Recording(sig.epilogue)
    runner = FunctionalRunner(sig, main, cache, ["x", "y"], epilogue=epilogue)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    acc0, old_acc = cache.acc.clone(), cache.acc

    torch.manual_seed(1)
    out = runner(x, y, gc_tokens_b0=4, scale=0.5)
    torch.manual_seed(1)
    draw = torch.rand(2, 3)  # the prologue's draw, from the same RNG state
    want = x * 0.5 + acc0 * y
    assert torch.equal(out, want)
    (args,) = main.args
    assert args[0] is x and args[1] is y and args[2].shape == (4,) and args[4] is old_acc
    assert torch.equal(args[5], draw)
    # the cache now holds the tensors the graphs returned, not copies of them
    assert cache._buffers["acc"] is main.results[0][1]
    assert cache._buffers["count"] is epilogue.results[0][0]
    assert torch.equal(cache.acc, acc0 + draw * 4)
    assert torch.equal(cache.count, want.sum())
    assert epilogue.args[0][0] is main.results[0][2]  # host__0 goes from main to the epilogue

    # a second call reads what the first wrote, and the same scalar tensors
    torch.manual_seed(2)
    out2 = runner(x, y, gc_tokens_b0=2, scale=0.5)
    torch.manual_seed(2)
    draw2 = torch.rand(2, 3)
    assert torch.equal(out2, x * 0.5 + (acc0 + draw * 4) * y)
    assert torch.equal(cache.acc, acc0 + draw * 4 + draw2 * 2)
    assert torch.equal(cache.count, want.sum() + out2.sum())
    assert main.args[1][3] is main.args[0][3]  # scale=0.5 made once


def test_runner_without_prologue_and_epilogue():
    sig = Signature(inputs=["x", "cache__s"], outputs=["out", "new_cache__s"])
    cache = CacheState()
    cache.allocate({"s": ((3,), torch.float32)}, CPU, signature=None)
    runner = FunctionalRunner(sig, lambda x, s: (x + s, x * 2), cache, ["x"])
    assert runner.prologue is None and runner.epilogue is None
    x = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(runner(x), x)  # zeros in the slot
    assert torch.equal(runner(x), x + 2 * x)  # the slot holds 2x now
    assert torch.equal(cache.s, 2 * x)


# --------------------------------------------------------------------------------------------
# FunctionalRunner on a functionalized variant
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toca():
    tiny = resolve_model("builtin:dit-tiny-random")
    return graphcache.optimize(tiny, "toca", 6, hoist_conditioning=False, score="random")


def test_functionalized_variant_runs_like_the_eager_one(toca):
    plan = next(p for p in toca.schedule.steps if set(p.kinds) == {"partial"})
    gm = toca.variants[plan.variant]
    kwargs = extra_inputs(gm, step_inputs(plan))
    assert sorted(kwargs) == ["gc_tokens_b0", "gc_tokens_b1"]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t, y = torch.tensor([400, 400]), torch.tensor([1, 10])
    toca._allocate((x, t, y), None)
    for buf in toca.cache.buffers():
        if buf.dtype == torch.int32:
            buf.copy_(torch.randint(0, 4, buf.shape, generator=g, dtype=torch.int32))
        else:
            buf.copy_(torch.randn(buf.shape, generator=g))
    start = {name: buf.clone() for name, buf in toca.cache.named_buffers()}

    torch.manual_seed(4)
    with torch.no_grad():
        want = gm(x, t, y, **kwargs)
    eager = {name: buf.clone() for name, buf in toca.cache.named_buffers()}
    assert any(not torch.equal(eager[n], start[n]) for n in start)  # the step wrote the cache

    for name, buf in toca.cache.named_buffers():
        buf.copy_(start[name])
    main, sig = functionalize(gm)
    assert sig.prologue is not None and sig.prologue_outputs == ["random__0", "random__1"]
    runner = FunctionalRunner(sig, main, toca.cache, toca.structure.input_names)
    torch.manual_seed(4)
    with torch.no_grad():
        got = runner(x, t, y, **kwargs)
    assert torch.equal(got, want)
    written = dict(toca.cache.named_buffers())
    assert set(written) == set(eager)
    for name in eager:
        assert torch.equal(written[name], eager[name]), name
