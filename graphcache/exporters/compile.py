"""The `compile` backend: every variant of a CachedModel under `torch.compile(fullgraph=True)`.

What it guarantees (tests/exporters/test_compile.py checks each point for every method):

* **No graph breaks.** Each variant's whole forward is one graph (`fullgraph=True` raises
  otherwise). The cache slots are buffers of the `CacheState` submodule, written by the mutating
  `graphcache::cache_write` op and the in-place updates of `ops.CACHE_UPDATES` (`cache_scatter`,
  `cache_propagate`), so the compiled graph writes them in place (functionalization turns the
  mutation into a copy back into the buffer); K-means is the opaque custom op
  `graphcache::kmeans_l1`.
* **One compilation per variant** for a given input signature (batch, resolution, dtype,
  device). The per-step inputs a plan passes (`schedule.step_inputs`) never recompile:

  - token counts (`gc_tokens_b<block>`, Python ints) are unbacked SymInts from the first
    compilation: their graph inputs are listed in `torch.compiler.config.unbacked_sources`
    (patched only around this variant's own calls). Backed dynamic ints would be specialised
    for the values 0 and 1 (which ToCa's schedules produce) and `dynamic=None`'s automatic
    dynamic would recompile once per changed count; unbacked ones compile once for every k.
    A count that sizes an attention's queries (PixArt-α ToCa's partial cross-attention) is
    passed as at least 2 and checked so in the graph (`schedule.compiled_token_count`): SDPA's
    shape rules ask whether the query count is 0 or 1, which an unbacked count cannot answer;
  - every other per-step scalar (the Taylor difference step `gc_taylor_delta`, a negative int,
    so not size-like, and the forecast coefficients `gc_taylor_c<i>`, floats) is passed as a 0-d
    tensor on the inputs' device (int64 for ints, float32 for floats): tensor values are not
    guarded, and eager promotion makes `tensor_f32 * t0d` compute exactly as
    `tensor_f32 * python_scalar`;
  - every other shape is static (`dynamic=False` by default), so the model's matmuls and
    attention are specialised. A new input signature compiles each variant once more.

  So a full sampling run compiles exactly `len(cached.variants)` graphs, and later runs none.
* **Same random numbers as eager.** With Inductor, `fallback_random=True` is passed in the
  compile's own `options` (scoped to these compilations, never set globally), so `torch.rand` /
  `torch.randint` (ToCa's `score=random`, ClusCa's representatives and K-means start) call the
  ATen kernels and draw from the global RNG in graph order, exactly as eager does.
* **Numerics.** `aot_eager` runs the same ATen kernels as the eager variants: samples, per-step
  outputs and the RNG state after a run are bit-identical to theirs (eager runners compute the
  selected tokens' linears as W·xᵀ, passes/few_token_linears.py, and round those differently),
  except that a Taylor forecast rounds differently
  once traced (passes/taylor.py `evaluate_taylor`: eager adds each term as a fused
  multiply-add), a few ulps per forecast. Inductor generates its own fused kernels
  (reassociated reductions, fused softmax): per-step outputs agree with eager graphcache to
  ~5e-7 of their scale on CPU (the tests allow 1e-4).

`mode="reduce-overhead"` (CUDA graphs) applies where the model is on a GPU: the cache buffers
are module buffers (static addresses) mutated in place, which CUDA graph trees support; the
K-means op syncs with the host, so it is tagged `cudagraph_unsafe` and Inductor partitions the
graph around it. Each distinct token count records its own CUDA graph (as any dynamic size
does). On CPU the mode compiles and runs, with CUDA graphs skipped. (Not exercised by the test
suite, which runs on CPU.)
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from ..errors import GraphcacheError
from ..schedule import MIN_ATTENTION_TOKENS, compiled_token_count, is_token_input, step_inputs
from .base import Runners
from .functional import ScalarTensors

DEFAULT_COMPILER = "inductor"
_KEYS = ("backend", "mode", "dynamic", "options", "fullgraph")


def _source(name: str) -> str:
    """Dynamo's name for the local (argument) `name` of the compiled frame."""
    return f"L[{name!r}]"


def per_step_inputs(cached, key: tuple) -> dict[str, type]:
    """The names (and Python types) of the per-step inputs variant `key` receives in a run."""
    gm = cached.variants[key]
    placeholders = {n.target for n in gm.graph.nodes if n.op == "placeholder"}
    found: dict[str, type] = {}
    for plan in cached.schedule.steps_of(key):
        for name, value in step_inputs(plan).items():
            if name in placeholders:
                found.setdefault(name, type(value))
    return found


def _check_attention_token_counts(gm: fx.GraphModule, inputs) -> None:
    """`torch._check(k >= MIN_ATTENTION_TOKENS)` on every token count that sizes an attention's
    queries (CompiledVariant passes at least that many): the compiler may then assume that the
    unbacked count is neither 0 nor 1, which attention's shape rules would have to decide."""
    for node in list(gm.graph.nodes):
        if node.op == "placeholder" and node.target in inputs \
                and compiled_token_count(node.target, 0) == MIN_ATTENTION_TOKENS:
            with gm.graph.inserting_after(node):
                at_least = gm.graph.call_function(operator.ge, (node, MIN_ATTENTION_TOKENS))
            with gm.graph.inserting_after(at_least):
                gm.graph.call_function(torch._check, (at_least,))
    gm.recompile()


class CompiledVariant:
    """A variant's compiled forward. Token counts are passed as unbacked SymInts (listed in
    `torch.compiler.config.unbacked_sources` around this variant's calls only); every other
    per-step scalar is passed as a 0-d tensor on the inputs' device."""

    def __init__(self, gm: fx.GraphModule, fn, inputs: dict[str, type]):
        self.gm, self.fn = gm, fn
        self.token_inputs = tuple(n for n in inputs if is_token_input(n))
        self.tensor_inputs = tuple(n for n in inputs if not is_token_input(n))
        self.sources = ",".join(_source(n) for n in self.token_inputs)
        self.scalars = ScalarTensors()

    def __call__(self, *args, **kwargs):
        if self.tensor_inputs:
            device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
            for name in self.tensor_inputs:
                value = kwargs.get(name)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    kwargs[name] = self.scalars(name, value, device)
        for name in self.token_inputs:
            kwargs[name] = compiled_token_count(name, kwargs[name])
        if not self.sources:
            return self.fn(*args, **kwargs)
        theirs = torch.compiler.config.unbacked_sources
        with torch.compiler.config.patch(unbacked_sources=f"{theirs},{self.sources}" if theirs else self.sources):
            return self.fn(*args, **kwargs)


def compile_options(options: dict | None) -> dict[str, Any]:
    """Validated `compile_options` with defaults: backend inductor, mode None, dynamic False."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(_KEYS))
    if unknown:
        raise GraphcacheError(f"unknown compile option {unknown[0]!r} (known: {', '.join(_KEYS)})")
    if options.get("fullgraph", True) is not True:
        raise GraphcacheError("the compile backend always uses fullgraph=True (graphcache variants never break)")
    resolved = {"backend": DEFAULT_COMPILER, "mode": None, "dynamic": False, "options": None}
    resolved.update({k: v for k, v in options.items() if k != "fullgraph"})
    return resolved


def compile_kwargs(options: dict) -> dict[str, Any]:
    """The keyword arguments of `torch.compile` for the resolved `options`."""
    backend, mode, dynamic = options["backend"], options["mode"], options["dynamic"]
    extra = dict(options["options"] or {})
    kwargs: dict[str, Any] = {"fullgraph": True, "backend": backend, "dynamic": dynamic}
    if backend == "inductor":
        # torch.compile takes `mode` or `options`, not both: expand the mode into its options
        if mode not in (None, "default"):
            from torch._inductor import list_mode_options

            known = list_mode_options()
            if mode not in known:
                raise GraphcacheError(f"unknown compile mode {mode!r}; valid: {', '.join(known)}")
            extra = {**list_mode_options(mode, dynamic), **extra}
        extra["fallback_random"] = True  # rand/randint draw from the global RNG, as in eager
        kwargs["options"] = extra
    else:
        if mode is not None:
            kwargs["mode"] = mode
        if extra:
            kwargs["options"] = extra
    return kwargs


def portable_options(options: dict | None) -> dict[str, Any]:
    """Resolved compile options as JSON values (for manifests and reports); a compiler given as
    a Python callable cannot be recorded and raises GraphcacheError."""
    import json

    options = compile_options(options)
    if not isinstance(options["backend"], str):
        raise GraphcacheError(
            f"compile option backend={options['backend']!r} is a Python callable: only a named compiler "
            "backend (e.g. 'inductor') can be recorded"
        )
    try:
        return json.loads(json.dumps(options))
    except (TypeError, ValueError) as e:
        raise GraphcacheError(f"compile options {options!r} are not JSON values: {e}") from e


class CompileBackend:
    """Every variant under torch.compile (lazily: a variant compiles on its first call)."""

    name = "compile"
    hoists_conditioning = True

    def __init__(self, options: dict | None = None):
        self.options = compile_options(options)  # validated before anything is built
        self.kwargs = compile_kwargs(self.options)

    def build(self, cached) -> Runners:
        runners = {}
        for key, gm in cached.variants.items():
            inputs = per_step_inputs(cached, key)
            _check_attention_token_counts(gm, inputs)
            runners[key] = CompiledVariant(gm, torch.compile(gm.forward, **self.kwargs), inputs)
        return Runners(runners, compile_options=self.options)


__all__ = [
    "DEFAULT_COMPILER",
    "CompiledVariant",
    "compile_kwargs",
    "compile_options",
    "CompileBackend",
    "per_step_inputs",
    "portable_options",
]
